import pytest
import torch

from raydetr.config import LossConfig, ModelConfig
from raydetr.model.backbone import ARCHS, ResNet
from raydetr.model.build import PRESETS, build, load_backbone_weights, resolve_model_config
from raydetr.model.postprocess import PostProcessor


def _targets():
    return [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3]])},
            {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.2, 0.3, 0.1, 0.2],
                                                                    [0.7, 0.6, 0.3, 0.3]])}]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_resolve_and_build(preset):
    r = resolve_model_config(ModelConfig(preset=preset))
    assert r["resolution"] % 32 == 0 and r["backbone"] in ARCHS
    assert r == resolve_model_config(ModelConfig(preset=preset))
    model, criterion, post = build(ModelConfig(preset=preset), LossConfig(), num_classes=5)
    assert model.num_queries == r["num_queries"] and len(model.decoder.layers) == r["num_decoder_layers"]
    assert isinstance(post, PostProcessor)


def test_config_overrides_preset():
    r = resolve_model_config(ModelConfig(preset="rtdetr-r34", resolution=320, num_queries=7,
                                         backbone="resnet18"))
    assert (r["resolution"], r["num_queries"], r["backbone"]) == (320, 7, "resnet18")


def test_nano_forward_shapes_train_and_eval():
    torch.manual_seed(0)
    model, _, _ = build(ModelConfig(preset="rtdetr-r18", num_queries=30), LossConfig(), num_classes=4)
    images = torch.randn(2, 3, 96, 128)  # non-square works too
    model.train()
    out = model(images, _targets())
    assert out["pred_logits"].shape == (2, 30, 4) and out["pred_boxes"].shape == (2, 30, 4)
    assert len(out["aux_outputs"]) == len(model.decoder.layers) - 1
    assert out["enc_outputs"]["pred_boxes"].shape == (2, 30, 4)
    num_dn = out["dn_meta"]["split"][0]
    assert out["dn_outputs"]["pred_boxes"].shape == (2, num_dn, 4)
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert "dn_outputs" not in out and out["pred_boxes"].shape == (2, 30, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_backbone_strides_and_torchvision_keys(name):
    net = ResNet(name).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats] == [(8, 12), (4, 6), (2, 3)]
    assert [f.shape[1] for f in feats] == net.out_channels
    keys = set(net.state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
            "layer4.1.bn2.num_batches_tracked"} <= keys


def test_load_backbone_weights_round_trip_and_errors(tmp_path):
    src = ResNet("resnet18")
    state = dict(src.state_dict())
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    model, _, _ = build(ModelConfig(preset="rtdetr-r18", backbone_weights=str(path)), LossConfig(), 2)
    assert torch.equal(model.backbone.layer3[0].conv1.weight, src.layer3[0].conv1.weight)
    assert type(model.backbone.bn1).__name__ == "FrozenBatchNorm2d"
    assert not any(n.startswith("backbone.bn1") for n, _ in model.named_parameters())

    bad = tmp_path / "resnet50.pth"
    torch.save(ResNet("resnet50").state_dict(), bad)
    other, _, _ = build(ModelConfig(preset="rtdetr-r18"), LossConfig(), 2)
    with pytest.raises(ValueError, match="resnet50.pth.*missing keys"):
        load_backbone_weights(other, bad)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_backbone_weights(other, tmp_path / "nope.pth")


def test_gradient_checkpointing_same_loss_and_grads():
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model, criterion, _ = build(ModelConfig(preset="rtdetr-r18", num_queries=20,
                                                gradient_checkpointing=ckpt), LossConfig(), 2)
        torch.manual_seed(1)
        images = torch.randn(2, 3, 64, 64)
        losses = criterion(model(images, _targets()), _targets())
        losses["loss"].backward()
        results.append((losses["loss"].detach(), model.decoder.layers[0].linear1.weight.grad,
                        model.backbone.layer2[0].conv1.weight.grad))
    (l0, g0, b0), (l1, g1, b1) = results
    assert torch.allclose(l0, l1, rtol=1e-5)
    assert torch.allclose(g0, g1, rtol=1e-3, atol=1e-6)
    assert torch.allclose(b0, b1, rtol=1e-3, atol=1e-6)


def test_postprocessor_coordinate_frame():
    # one confident query with box cx=0.25, cy=0.5, w=0.5, h=0.2 on a (h=100, w=200) image
    logits = torch.full((1, 3, 2), -10.0)
    logits[0, 1, 1] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.25, 0.5, 0.5, 0.2], [0.9, 0.9, 0.1, 0.1]]])
    dets = PostProcessor()({"pred_logits": logits, "pred_boxes": boxes},
                           torch.tensor([[100, 200]]), top_k=4)
    d = dets[0]
    assert d["boxes"].shape == (4, 4) and d["labels"][0] == 1 and d["scores"][0] > 0.99
    assert torch.allclose(d["boxes"][0], torch.tensor([0.0, 40.0, 100.0, 60.0]))
    assert (d["scores"][:-1] >= d["scores"][1:]).all()
