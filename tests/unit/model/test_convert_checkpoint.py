"""RF-DETR checkpoint files -> winner-format dirs that predict; refused pickles; class heads."""

from __future__ import annotations

import collections
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from rfdetr_support import rfdetr_state_dict, write_rfdetr_checkpoint

from raydetr.commands.cli import main
from raydetr.data.coco_categories import COCO_CATEGORIES
from raydetr.model.convert import (
    ConvertError,
    convert_checkpoint,
    infer_preset,
    read_rfdetr_checkpoint,
    tile_class_head,
)
from raydetr.serve.detector import Detector
from raydetr.train.pretrained import PretrainedError, load_pretrained, resolve_pretrained


@pytest.fixture(scope="module")
def coco_pth(module_tmp) -> Path:
    # resolution 128 (a fine-tune's args.resolution) keeps the forward passes cheap
    return write_rfdetr_checkpoint(module_tmp / "checkpoint.pth",
                                   resolution=128)


def test_converts_with_pickle_disabled_and_predicts_coco_names(coco_pth, tmp_path):
    meta = convert_checkpoint(coco_pth, tmp_path / "out")
    assert (meta.preset, meta.variant, meta.num_classes) == (
        "rfdetr-nano", "ema", 91)
    # logit index = COCO category id
    assert meta.classes[1] == "person" and meta.classes[90] == "toothbrush"
    assert meta.classes[12].startswith("unused") and len(meta.classes) == 91
    assert sum(meta.classes[i] == n for i, n in COCO_CATEGORIES.items()) == 80

    det = Detector.from_dir(tmp_path / "out", device="cpu")
    x = torch.randn(2, 3, 128, 128)  # ImageNet-normalised batch
    with torch.no_grad():
        out = det.model.eval()(x)
    assert out["pred_logits"].shape == (2, 300, 91) and out["pred_boxes"].shape == (2, 300, 4)
    assert torch.isfinite(out["pred_boxes"]).all()
    img = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    df = det.predict([img], threshold=0.0, max_detections=5)
    assert len(df) == 5 and set(df.class_name) <= set(meta.classes)


def test_variant_choice_and_regular_weights(coco_pth, tmp_path):
    from safetensors.torch import load_file

    convert_checkpoint(coco_pth, tmp_path / "reg", variant="regular")
    convert_checkpoint(coco_pth, tmp_path / "ema")
    reg, ema = load_file(tmp_path / "reg/model.safetensors"), load_file(tmp_path / "ema/model.safetensors")
    key = "class_embed.weight"
    assert torch.allclose(ema[key], reg[key] * 0.5)  # the fixture's EMA = 0.5 x model


def test_cli_convert_and_predict(coco_pth, tmp_path, capsys):
    from PIL import Image

    assert main(["convert-checkpoint", str(coco_pth), str(tmp_path / "m")]) == 0
    Image.fromarray(np.zeros((50, 40, 3), np.uint8)).save(tmp_path / "a.png")
    assert main(["predict", "--model", str(tmp_path / "m"), str(tmp_path / "a.png"),
                 "--out", str(tmp_path / "pred"), "--threshold", "0"]) == 0
    assert list((tmp_path / "pred").glob("*.json"))
    # a preset the keys contradict: exit 2, no traceback, nothing written
    assert main(["convert-checkpoint", str(coco_pth), str(tmp_path / "x"),
                 "--preset", "rfdetr-small"]) == 2
    assert "rfdetr-nano" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_other_pickled_class_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"a": torch.zeros(1)}, "args": collections.OrderedDict(x=Path("/x"))}, bad)
    with pytest.raises(ConvertError, match=r"refused to load.*Path"):
        convert_checkpoint(bad, tmp_path / "out")
    assert main(["convert-checkpoint", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "refused" in err and "Traceback" not in err and not (tmp_path / "out").exists()


def test_fine_tune_class_names_and_preset_inference(tmp_path):
    pth = write_rfdetr_checkpoint(tmp_path / "ft.pth", num_logits=4, ema=False,
                                  class_names=["cat", "dog", "fox"], resolution=96)
    meta = convert_checkpoint(pth, tmp_path / "out")
    # RF-DETR's class_names property: logit i+1 -> names[i]
    assert meta.classes == ["unused_0", "cat", "dog", "fox"] and meta.variant == "regular"
    with pytest.raises(ConvertError, match="no 'ema_model'"):
        convert_checkpoint(pth, tmp_path / "o2", variant="ema")
    for preset in ("rfdetr-small", "rfdetr-base"):
        assert infer_preset(rfdetr_state_dict(preset, 3, 0)) == preset


def test_class_head_resize_matches_rfdetrs_tiling_rule():
    from raydetr.model.rfdetr import build_rfdetr

    state = rfdetr_state_dict("rfdetr-nano", 91, 1)
    rows = state["class_embed.weight"]
    small = tile_class_head(state, 3)
    assert torch.equal(small["class_embed.weight"], rows[:3])
    grown = tile_class_head(state, 100)
    assert torch.equal(grown["class_embed.bias"], torch.cat([state["class_embed.bias"],
                                                             state["class_embed.bias"][:9]]))
    changed = {k for k in state if not torch.equal(state[k].flatten()[:1], grown[k].flatten()[:1])
               or state[k].shape != grown[k].shape}
    assert changed == {"class_embed.weight", "class_embed.bias"} | {
        f"transformer.enc_out_class_embed.{g}.{p}" for g in range(13) for p in ("weight", "bias")}
    # the same as the model's own reinitialize_detection_head
    model = build_rfdetr("rfdetr-nano", num_classes=91)
    model.load_state_dict(state)
    model.reinitialize_detection_head(100)
    for k, v in model.state_dict().items():
        assert torch.equal(v, grown[k]), k
    assert math.ceil(100 / 91) == 2


def test_pretrain_weights_from_an_rfdetr_file_tile_the_class_heads(coco_pth):
    from raydetr.model.rfdetr import build_rfdetr

    model = build_rfdetr("rfdetr-nano", num_classes=2)
    reinit, description = load_pretrained(model, coco_pth)
    assert reinit == [] and "RF-DETR rfdetr-nano checkpoint (ema weights)" in description
    assert "resized 91 -> 2 rows by RF-DETR's tiling rule" in description
    ema = read_rfdetr_checkpoint(coco_pth).ema_weights
    assert torch.equal(model.state_dict()["class_embed.weight"], ema["class_embed.weight"][:2])
    assert torch.equal(model.state_dict()["query_feat.weight"], ema["query_feat.weight"])
    with pytest.raises(PretrainedError, match="set model.preset=rfdetr-nano"):
        resolve_pretrained(coco_pth, "rfdetr-small")


def test_evaluate_a_converted_model_with_more_logits_by_class_name(tmp_path, capsys):
    from raydetr.data.parquet import prepare_dataset
    from raydetr.data.synthetic import CLASSES, make_synthetic

    # an RF-DETR fine-tune whose head (5 logits) names every dataset class, plus one more
    pth = write_rfdetr_checkpoint(tmp_path / "ft.pth", num_logits=5, ema=False, resolution=64,
                                  class_names=["kite", *reversed(CLASSES)])
    convert_checkpoint(pth, tmp_path / "m")
    src = make_synthetic(tmp_path / "shapes", train_images=2, val_images=2, image_size=64)
    prepare_dataset(src, tmp_path / "prepared", progress=False)
    assert main(["evaluate", "--model", str(tmp_path / "m"), "--data",
                 str(tmp_path / "prepared")]) == 0
    captured = capsys.readouterr()
    assert "by name" in captured.err and "triangle" in captured.out


def test_train_refuses_a_checkpoint_of_another_preset_before_ray_starts(coco_pth, tmp_path,
                                                                         capsys):
    code = main(["train", "--pretrain-weights", str(coco_pth), "model.preset=rfdetr-small",
                 f"run.output_dir={tmp_path}", "mlflow.enabled=false"])
    err = capsys.readouterr().err
    assert code == 2 and "set model.preset=rfdetr-nano" in err and "Traceback" not in err
    assert not (tmp_path / "raydetr").exists()  # nothing started, nothing written
