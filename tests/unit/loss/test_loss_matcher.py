import torch

from raydetr.loss.matcher import HungarianMatcher


def _outputs(b=3, q=10, c=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"pred_logits": torch.randn(b, q, c, generator=g),
            "pred_boxes": torch.rand(b, q, 4, generator=g) * 0.5 + 0.25}


def _targets(ns, c=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"labels": torch.randint(0, c, (n,), generator=g),
             "boxes": torch.rand(n, 4, generator=g) * 0.4 + 0.2} for n in ns]


def test_batched_equals_one_by_one():
    m = HungarianMatcher()
    out, tgt = _outputs(), _targets([3, 0, 5])
    batched = m(out, tgt)
    for i in range(3):
        single = m({k: v[i:i + 1] for k, v in out.items()}, [tgt[i]])[0]
        assert torch.equal(batched[i][0], single[0]) and torch.equal(batched[i][1], single[1])
    assert [len(s) for s, _ in batched] == [3, 0, 5]


def test_all_empty_targets():
    m = HungarianMatcher()
    res = m(_outputs(b=2), _targets([0, 0]))
    assert all(len(s) == 0 and len(t) == 0 for s, t in res)
    assert res[0][0].dtype == torch.int64


def test_obvious_assignment():
    # query 2 sits exactly on target 0 with its class; query 0 on target 1
    boxes = torch.tensor([[[0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9], [0.2, 0.2, 0.1, 0.1]]])
    logits = torch.full((1, 3, 2), -5.0)
    logits[0, 2, 1] = 5.0
    logits[0, 0, 0] = 5.0
    tgt = [{"labels": torch.tensor([1, 0]),
            "boxes": torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2]])}]
    pred_idx, tgt_idx = HungarianMatcher()({"pred_logits": logits, "pred_boxes": boxes}, tgt)[0]
    assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 2, 1: 0}


def test_more_targets_than_queries():
    res = HungarianMatcher()(_outputs(b=1, q=2), _targets([5]))
    assert len(res[0][0]) == 2
