"""`raydetr predict` on a local winner dir, the Python API, and its error paths."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raydetr.commands.predict import predict_command
from raydetr.serve.images import encode_png


@pytest.fixture
def image_dir(tmp_path, rgb_images):
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    (d / "a.png").write_bytes(encode_png(rgb_images[0]))
    (d / "sub" / "a.png").write_bytes(encode_png(rgb_images[1]))  # same stem, other dir
    (d / "readme.txt").write_text("not an image, ignored by the directory scan")
    return d


def test_predict_command_writes_json_and_drawn_images(winner_dir, image_dir, rgb_images,
                                                      tmp_path, capsys):
    out = tmp_path / "out"
    assert predict_command(str(winner_dir), [str(image_dir)], out, threshold=0.0) == 0
    summary = json.loads((out / "detections.json").read_text())
    assert [r["output"] for r in summary["images"]] == ["a.jpg", "a_1.jpg"]
    for rec, img in zip(summary["images"], rgb_images):
        assert (rec["height"], rec["width"]) == img.shape[:2]
        assert rec["file"].endswith("a.png") and len(rec["detections"]) == 40
        assert set(rec["detections"][0]) == {"class_id", "class_name", "score",
                                             "x1", "y1", "x2", "y2"}
        from PIL import Image

        assert Image.open(out / rec["output"]).size == (img.shape[1], img.shape[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "out"]  # no staging left
    assert "80 detections in 2 images" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not_image", "empty_dir"])
def test_predict_command_bad_inputs(winner_dir, image_dir, tmp_path, capsys, case):
    if case == "missing":
        inputs, expect = [image_dir / "a.png", tmp_path / "nope.jpg"], f"{tmp_path / 'nope.jpg'}: no such file"
    elif case == "not_image":
        (image_dir / "fake.jpg").write_text("definitely not a JPEG")
        inputs, expect = [image_dir], f"{image_dir / 'fake.jpg'}: not an image"
    else:
        (tmp_path / "empty").mkdir()
        inputs, expect = [tmp_path / "empty"], "directory holds no images"
    out = tmp_path / "out"
    assert predict_command(str(winner_dir), inputs, out, 0.5) == 2
    assert expect in capsys.readouterr().err
    assert not out.exists()


def test_predict_command_unknown_model_dir(image_dir, tmp_path, capsys):
    assert predict_command(str(tmp_path / "no-model"), [image_dir], tmp_path / "out", 0.5) == 2
    assert "not a model directory" in capsys.readouterr().err


def test_python_api_from_a_dir(winner_dir, rgb_images):
    from raydetr.api import RayDETR

    det = RayDETR.from_registry(str(winner_dir))
    assert det.classes == ["circle", "square"]
    df = det.predict(rgb_images[0], threshold=0.0, max_detections=2)
    assert len(df) == 2 and set(df.image_index) == {0}
    assert np.asarray(det.draw(rgb_images[0], df)).shape == rgb_images[0].shape


def test_python_api_train_config_mapping():
    from raydetr.api import RayDETR
    from raydetr.config import ConfigError

    cfg = RayDETR(size="rtdetr-r34").build_config(dataset_dir="data/x", epochs=3, ema_decay=0.999,
                                             early_stopping=True, num_workers=2, batch_size=8,
                                             lr=1e-4, output_dir="out", resolution=320)
    assert (cfg.model.preset, cfg.data.path, cfg.optim.epochs, cfg.ema.decay) == ("rtdetr-r34", "data/x", 3, [0.999])
    assert cfg.early_stopping.enabled and cfg.scaling.num_workers == 2 and cfg.optim.batch_size == 8
    assert (cfg.optim.lr, cfg.run.output_dir, cfg.model.resolution) == (1e-4, "out", 320)
    with pytest.raises(ConfigError, match="unknown train\\(\\) argument 'epoch'"):
        RayDETR().build_config(epoch=3)


def test_evaluation_table_lists_overall_and_per_class():
    from raydetr.serve.evaluation import format_table

    text = format_table({"map": 0.1234, "map50": 0.3, "mar": 0.2,
                         "per_class": {"dog": 0.2, "person": 0.05}}, "title")
    lines = text.splitlines()
    assert lines[0] == "title" and "map             0.1234" in lines
    assert lines[-2:] == ["dog             0.2000", "person          0.0500"]
