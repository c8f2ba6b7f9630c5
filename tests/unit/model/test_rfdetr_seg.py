"""RF-DETR Seg: mask outputs (dense in eval, factors in training), their agreement, gradient
checkpointing, input sizes. Seg-nano at 96 px (8x8 patches, 24x24 masks) keeps these fast;
output equality with RF-DETR's own models is measured by bench/rfdetr_reference.py compare."""

import pytest
import torch

from raydetr.model.rfdetr import build_rfdetr, resolution_step
from raydetr.model.rfdetr.segmentation import dense_mask_logits


def _noisy(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # fresh-init zeros (refpoints, last box layer, the mask bias) would hide parts of the head
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


@pytest.fixture(scope="module")
def seg_nano():
    torch.manual_seed(0)
    return _noisy(build_rfdetr("rfdetr-seg-nano", num_classes=4))


def test_eval_masks_are_dense_logits_at_a_quarter_of_the_input(seg_nano):
    seg_nano.eval()
    with torch.no_grad():
        out = seg_nano(torch.randn(2, 3, 96, 96))
    assert out["pred_masks"].shape == (2, 100, 24, 24)
    assert [a["pred_masks"].shape for a in out["aux_outputs"]] == [(2, 100, 24, 24)] * 3
    # 96 px -> 8x8 = 64 cells: the two-stage selection keeps all of them
    assert out["enc_outputs"]["pred_masks"].shape == (2, 64, 24, 24)
    assert torch.isfinite(out["pred_masks"]).all()
    # one mask per query: different queries give different maps
    assert (out["pred_masks"][0, 0] - out["pred_masks"][0, 1]).abs().max() > 1e-3


def test_training_factors_give_the_eval_masks_for_the_first_query_group(seg_nano):
    # 120 px -> 10x10 = 100 cells: every group selects 100 = num_queries proposals
    images = torch.randn(1, 3, 120, 120)
    seg_nano.eval()
    with torch.no_grad():
        dense = seg_nano(images)
        seg_nano.train()
        try:
            sparse = seg_nano(images)
        finally:
            seg_nano.eval()
    factors = sparse["pred_masks"]
    assert set(factors) == {"spatial_features", "query_features", "bias"}
    assert factors["spatial_features"].shape == (1, 256, 30, 30)
    assert factors["query_features"].shape == (1, 1300, 256)  # 13 groups x 100 queries
    # group 0 of training attends only to itself, so it is the eval computation
    assert torch.allclose(dense_mask_logits(factors)[:, :100], dense["pred_masks"], atol=1e-4)
    aux = sparse["aux_outputs"][0]["pred_masks"]
    assert torch.allclose(dense_mask_logits(aux)[:, :100], dense["aux_outputs"][0]["pred_masks"],
                          atol=1e-4)
    enc = sparse["enc_outputs"]["pred_masks"]
    assert enc["query_features"].shape == (1, 13 * 100, 256)
    assert torch.allclose(dense_mask_logits(enc)[:, :100], dense["enc_outputs"]["pred_masks"],
                          atol=1e-4)


def test_gradient_checkpointing_gives_the_same_masks_and_gradients():
    torch.manual_seed(0)
    plain = _noisy(build_rfdetr("rfdetr-seg-nano", num_classes=3)).train()
    ckpt = build_rfdetr("rfdetr-seg-nano", num_classes=3, gradient_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    assert ckpt.segmentation_head.gradient_checkpointing and ckpt.vit.gradient_checkpointing
    images = torch.randn(1, 3, 48, 48)
    grads = []
    for model in (plain, ckpt):
        out = model(images)
        loss = dense_mask_logits(out["pred_masks"]).square().mean() + out["pred_logits"].mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if n.startswith("segmentation_head.blocks.0.")
                      or n == "backbone.0.encoder.encoder.embeddings.patch_embeddings.projection.weight"})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 7
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4), name
    plain.gradient_checkpointing = True
    assert plain.segmentation_head.gradient_checkpointing


def test_seg_input_sides_follow_patch_12_and_the_windows():
    assert resolution_step("rfdetr-seg-nano") == 12  # one window
    assert resolution_step("rfdetr-seg-small") == 24 and resolution_step("rfdetr-large") == 32
    model = build_rfdetr("rfdetr-seg-small", num_classes=2)
    with pytest.raises(ValueError, match="multiple of 24"):
        model(torch.randn(1, 3, 84, 84))


def test_postprocessing_gives_each_detection_its_querys_mask():
    from raydetr.model.postprocess import PostProcessor, masks_at_size

    logits = torch.full((1, 3, 2), -9.0)
    logits[0, 2, 1], logits[0, 0, 0] = 5.0, 4.0  # best: query 2 label 1, then query 0 label 0
    mask_logits = torch.stack([torch.tensor([[1.0, -1.0], [-1.0, -1.0]]),  # top-left
                               torch.full((2, 2), -1.0),
                               torch.tensor([[-1.0, -1.0], [-1.0, 1.0]])])  # bottom-right
    outputs = {"pred_logits": logits, "pred_boxes": torch.full((1, 3, 4), 0.5),
               "pred_masks": mask_logits[None]}
    (det,) = PostProcessor()(outputs, torch.tensor([[4, 4]]), top_k=2)
    assert det["labels"].tolist() == [1, 0]
    assert torch.equal(det["mask_logits"], mask_logits[[2, 0]])
    chunks = list(masks_at_size(det["mask_logits"], (4, 4), chunk=1))
    assert [c.shape for c in chunks] == [(1, 4, 4)] * 2
    full = torch.cat(chunks)
    # 2x2 -> 4x4 bilinear (align_corners False) samples the source at 0, .25, .75, 1 per axis:
    # the +1 corner stays > 0 only where both weights are >= .75, its own quarter
    quarter = torch.zeros(4, 4, dtype=torch.bool)
    quarter[2:, 2:] = True
    assert torch.equal(full[0], quarter) and torch.equal(full[1], quarter.flip(0, 1))
    assert torch.equal(torch.cat(list(masks_at_size(det["mask_logits"], (4, 4), chunk=8))), full)


def test_inference_can_skip_the_aux_and_encoder_masks(seg_nano):
    images = torch.randn(1, 3, 48, 48)
    seg_nano.eval()
    with torch.no_grad():
        every = seg_nano(images)
        seg_nano.eval_aux_masks = False
        try:
            final_only = seg_nano(images)
        finally:
            seg_nano.eval_aux_masks = True
    assert torch.equal(final_only["pred_masks"], every["pred_masks"])
    assert torch.equal(final_only["pred_logits"], every["pred_logits"])
    assert all("pred_masks" not in a for a in final_only["aux_outputs"])
    assert "pred_masks" not in final_only["enc_outputs"]
