"""RF-DETR Large and Seg files, and the two file kinds RF-DETR 1.11's trainer writes, convert
with pickle disabled: preset inferred, EMA by default, class names from the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from rfdetr_support import write_rfdetr111_checkpoint, write_rfdetr_checkpoint
from safetensors.torch import load_file

from raydetr.model.convert import ConvertError, convert_checkpoint, read_rfdetr_checkpoint
from raydetr.serve.detector import Detector
from raydetr.train.pretrained import load_pretrained


def _no_pickle(path: Path) -> None:
    """The file loads with weights_only=True and nothing allow-listed (1.11 writes no Namespace)."""
    torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("preset", ["rfdetr-seg-nano", "rfdetr-seg-preview", "rfdetr-large"])
def test_large_and_seg_files_convert_with_the_preset_inferred(preset, tmp_path):
    pth = write_rfdetr_checkpoint(tmp_path / "ckpt.pth", preset=preset, resolution=None)
    meta = convert_checkpoint(pth, tmp_path / "out")
    assert (meta.preset, meta.variant, meta.num_classes) == (preset, "ema", 91)
    assert meta.resolution == {"rfdetr-seg-nano": 312, "rfdetr-seg-preview": 432,
                                  "rfdetr-large": 704}[preset]


def test_a_converted_seg_file_predicts_masks(tmp_path):
    pth = write_rfdetr_checkpoint(tmp_path / "seg.pth", preset="rfdetr-seg-nano", resolution=96,
                                  num_logits=3, class_names=["tumor", "other"])
    meta = convert_checkpoint(pth, tmp_path / "m")
    assert meta.classes == ["unused_0", "tumor", "other"] and meta.resolution == 96
    det = Detector.from_dir(tmp_path / "m", device="cpu")
    with torch.no_grad():
        out = det.model.eval()(torch.randn(1, 3, 96, 96))
    assert out["pred_masks"].shape == (1, 100, 24, 24) and torch.isfinite(out["pred_masks"]).all()
    assert out["pred_masks"].std() > 0  # the head's weights were loaded, not a zero map


@pytest.mark.parametrize("kind", ["pth", "ckpt"])
def test_rfdetr_111_files_convert_ema_by_default(kind, tmp_path):
    src = write_rfdetr111_checkpoint(tmp_path / f"best.{kind}", kind=kind,
                                     preset="rfdetr-seg-nano", model_name="RFDETRSegNano",
                                     num_logits=3, class_names=["tumor", "other"], resolution=96)
    _no_pickle(src)
    ckpt = read_rfdetr_checkpoint(src)
    assert ckpt.kind == ("RF-DETR 1.11 .pth" if kind == "pth" else "RF-DETR 1.11 Lightning .ckpt")
    assert ckpt.model_name == "RFDETRSegNano" and ckpt.rfdetr_version == "1.11.2"
    assert "_kp_active_mask" not in ckpt.weights and "n_averaged" not in ckpt.ema_weights
    meta = convert_checkpoint(src, tmp_path / "ema")
    assert (meta.preset, meta.variant) == ("rfdetr-seg-nano", "ema")
    assert meta.classes == ["unused_0", "tumor", "other"]
    assert meta.source["converted_from"]["entry"] == (
        "callbacks['RFDETREMACallback']['average_model_state_dict']")
    convert_checkpoint(src, tmp_path / "reg", variant="regular")
    ema, reg = (load_file(tmp_path / d / "model.safetensors") for d in ("ema", "reg"))
    assert set(ema) == set(reg) and torch.allclose(ema["class_embed.weight"],
                                                   0.5 * reg["class_embed.weight"])
    model_from_file = Detector.from_dir(tmp_path / "ema", device="cpu").model
    assert torch.equal(model_from_file.state_dict()["segmentation_head.bias"],
                       ema["segmentation_head.bias"])


def test_rfdetr_111_file_fine_tunes_from_its_ema(tmp_path):
    from raydetr.model.rfdetr import build_rfdetr

    src = write_rfdetr111_checkpoint(tmp_path / "last.ckpt", kind="ckpt", preset="rfdetr-large",
                                     model_name="RFDETRLarge")
    model = build_rfdetr("rfdetr-large", num_classes=4)
    reinit, description = load_pretrained(model, src)
    assert reinit == [] and "rfdetr-large checkpoint (ema weights)" in description
    assert "1.11 Lightning .ckpt" in description
    ema = read_rfdetr_checkpoint(src).ema_weights
    assert torch.equal(model.state_dict()["query_feat.weight"], ema["query_feat.weight"])


def test_a_legacy_file_converted_by_rfdetr_111_keeps_its_ema_and_names(tmp_path):
    """1.11's convert_legacy_checkpoint: 'model.'-prefixed state_dict, args as
    hyper_parameters, the old ema_model as legacy_ema_state_dict."""
    old = write_rfdetr_checkpoint(tmp_path / "old.pth", preset="rfdetr-seg-nano", num_logits=3,
                                  class_names=["tumor", "other"], resolution=96)
    legacy = torch.load(old, weights_only=False)
    torch.save({"state_dict": {f"model.{k}": v for k, v in legacy["model"].items()},
                "epoch": 11, "global_step": 0, "hyper_parameters": vars(legacy["args"]),
                "legacy_checkpoint_format": True,
                "legacy_ema_state_dict": legacy["ema_model"]}, tmp_path / "conv.ckpt")
    _no_pickle(tmp_path / "conv.ckpt")
    meta = convert_checkpoint(tmp_path / "conv.ckpt", tmp_path / "m")
    assert (meta.preset, meta.variant) == ("rfdetr-seg-nano", "ema")
    assert meta.source["converted_from"]["entry"] == "legacy_ema_state_dict"
    assert meta.classes == ["unused_0", "tumor", "other"] and meta.resolution == 96
    weights = load_file(tmp_path / "m" / "model.safetensors")
    assert torch.equal(weights["class_embed.bias"], legacy["ema_model"]["class_embed.bias"])


def test_rfdetr_111_without_ema_takes_the_model_weights(tmp_path):
    src = write_rfdetr111_checkpoint(tmp_path / "r.pth", ema=False)
    meta = convert_checkpoint(src, tmp_path / "o")
    assert meta.variant == "regular" and meta.source["converted_from"]["entry"] == "model"
    with pytest.raises(ConvertError, match="no EMA"):
        convert_checkpoint(src, tmp_path / "o2", variant="ema")


def test_files_raydetr_cannot_convert_name_what_was_found(tmp_path):
    kp = write_rfdetr111_checkpoint(tmp_path / "kp.pth", model_name="RFDETRKeypointPreview",
                                    keypoint_mask=torch.ones(2, 17, dtype=torch.bool))
    with pytest.raises(ConvertError, match="keypoint model"):
        read_rfdetr_checkpoint(kp)
    wrong = write_rfdetr111_checkpoint(tmp_path / "w.pth", model_name="RFDETRSmall")
    with pytest.raises(ConvertError, match="model_name 'RFDETRSmall' but the weights are those "
                                           "of rfdetr-nano"):
        convert_checkpoint(wrong, tmp_path / "o")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"net.w": torch.zeros(1)}, "epoch": 1}, other)
    with pytest.raises(ConvertError, match="no weights with the 'model.' prefix"):
        read_rfdetr_checkpoint(other)
    neither = tmp_path / "n.pth"
    torch.save({"weights": {}, "meta": 1}, neither)
    with pytest.raises(ConvertError, match=r"found keys \['meta', 'weights'\]"):
        read_rfdetr_checkpoint(neither)
    not_a_state = tmp_path / "s.pth"
    torch.save({"model": {"a": 1}}, not_a_state)
    with pytest.raises(ConvertError, match="'a' holds a int"):
        read_rfdetr_checkpoint(not_a_state)


def test_the_111_fixture_has_rfdetr_111s_keys(tmp_path):
    """The files written above carry exactly the state-dict entries RF-DETR 1.11.2's own model
    has (data/keys_seg_nano_rfdetr111.json, generated from its wheel), and conversion maps them
    to 1.4's list (its one extra entry, the empty keypoint buffer, dropped)."""
    ref = json.loads((Path(__file__).parent / "data" / "keys_seg_nano_rfdetr111.json").read_text())
    src = write_rfdetr111_checkpoint(tmp_path / "b.pth", preset="rfdetr-seg-nano",
                                     model_name="RFDETRSegNano")
    written = torch.load(src, weights_only=True)["model"]
    entries = {(k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
               for k, v in written.items()}
    assert entries == {(k, tuple(shape), dtype) for k, shape, dtype in ref["state_dict"]}
    read = read_rfdetr_checkpoint(src).weights
    assert set(read) == {k for k, _, _ in ref["state_dict"]} - {"_kp_active_mask"}
