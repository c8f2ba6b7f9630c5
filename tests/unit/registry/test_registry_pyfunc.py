"""The served model's input handling: paths, bytes, arrays, lists, DataFrames; output frame."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from raydetr.serve.detector import DETECTION_COLUMNS, Detector
from raydetr.serve.images import ImageInputError, encode_png


@pytest.fixture(scope="module")
def served(winner_dir):
    from raydetr.registry.pyfunc import RayDetrModel

    model = RayDetrModel()
    model.load_context(SimpleNamespace(artifacts={
        "weights": str(winner_dir / "model.safetensors"), "meta": str(winner_dir / "meta.json")}))
    return model


ALL = {"threshold": 0.0, "max_detections": 5}


def _check_frame(df: pd.DataFrame, sizes: list[tuple[int, int]], per_image: int = 5) -> None:
    assert list(df.columns) == DETECTION_COLUMNS
    assert str(df["image_index"].dtype) == "int64" and str(df["score"].dtype) == "float64"
    assert sorted(df["image_index"].unique()) == list(range(len(sizes)))
    assert (df.groupby("image_index").size() == per_image).all()
    for idx, (h, w) in enumerate(sizes):
        d = df[df.image_index == idx]
        assert (d.x1 >= 0).all() and (d.x2 <= w).all() and (d.y1 >= 0).all() and (d.y2 <= h).all()
        assert (d.x2 >= d.x1).all() and (d.y2 >= d.y1).all()
        assert list(d.score) == sorted(d.score, reverse=True)
    assert set(df.class_name) <= {"circle", "square"}


def test_paths_bytes_arrays_give_the_same_detections(served, rgb_images, tmp_path):
    paths = []
    for i, img in enumerate(rgb_images):
        paths.append(tmp_path / f"img{i}.png")
        paths[-1].write_bytes(encode_png(img))
    sizes = [img.shape[:2] for img in rgb_images]
    by_path = served.predict(None, [str(p) for p in paths], ALL)
    by_bytes = served.predict(None, [encode_png(img) for img in rgb_images], ALL)
    by_array = served.predict(None, list(rgb_images), ALL)
    by_frame = served.predict(None, pd.DataFrame({"image": list(rgb_images)}), ALL)
    by_unnamed = served.predict(None, pd.DataFrame({0: [str(p) for p in paths]}), ALL)
    for df in (by_path, by_bytes, by_array, by_frame, by_unnamed):
        _check_frame(df, sizes)
        pd.testing.assert_frame_equal(df, by_path)


def test_single_image_series_and_batch_array(served, rgb_images):
    img = rgb_images[0]
    _check_frame(served.predict(None, img, ALL), [img.shape[:2]])
    _check_frame(served.predict(None, pd.Series([encode_png(img)]), ALL), [img.shape[:2]])
    batch = np.stack([img, img])
    _check_frame(served.predict(None, batch, ALL), [img.shape[:2]] * 2)


def test_threshold_and_defaults(served, rgb_images):
    none = served.predict(None, [rgb_images[0]], {"threshold": 1.01})
    assert list(none.columns) == DETECTION_COLUMNS and len(none) == 0
    assert str(none["x1"].dtype) == "float64"
    default = served.predict(None, [rgb_images[0]])  # threshold 0.5, up to 100 per image
    assert (default.score >= 0.5).all()
    some = served.predict(None, [rgb_images[0]], {"threshold": 0.0})
    assert len(some) == min(100, 20 * 2)  # top-k over queries x classes


def test_grey_and_rgba_arrays_are_converted(served, rgb_images):
    grey = rgb_images[0][:, :, 0]
    rgba = np.concatenate([rgb_images[0], np.full((*grey.shape, 1), 255, np.uint8)], axis=2)
    a = served.predict(None, [grey], ALL)
    b = served.predict(None, [np.repeat(grey[:, :, None], 3, axis=2)], ALL)
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(served.predict(None, [rgba], ALL),
                                  served.predict(None, [rgb_images[0]], ALL))


@pytest.mark.parametrize("bad, message", [
    ("/nonexistent/dog.jpg", "file not found: /nonexistent/dog.jpg"),
    (b"not an image at all", "image 0 (bytes): not a readable image"),
    (np.zeros((8, 8, 3), np.float32), "must be uint8"),
    (np.zeros((8, 8, 5), np.uint8), "is not HxWx3"),
    (12, "unsupported input type int"),
])
def test_bad_inputs_name_the_image(served, bad, message):
    with pytest.raises(ImageInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        served.predict(None, [bad], ALL)


def test_text_file_named_like_an_image(served, tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("hello")
    with pytest.raises(ImageInputError, match=f"image 1 \\({fake}\\): not a readable image"):
        served.predict(None, [np.zeros((8, 8, 3), np.uint8), str(fake)], ALL)


def test_dataframe_without_image_column(served):
    with pytest.raises(ImageInputError, match="needs an 'image' column"):
        served.predict(None, pd.DataFrame({"a": [1], "b": [2]}), ALL)


def test_detector_draw(winner_dir, rgb_images):
    det = Detector.from_dir(winner_dir)
    df = det.predict(rgb_images[0], threshold=0.0, max_detections=3)
    drawn = det.draw(rgb_images[0], df)
    assert drawn.size == (rgb_images[0].shape[1], rgb_images[0].shape[0])
    assert np.any(np.asarray(drawn) != rgb_images[0])  # boxes were drawn


def test_weights_that_do_not_match_meta(winner_dir, tmp_path):
    import json
    import shutil

    from raydetr.artifacts import ModelDirError

    bad = tmp_path / "bad"
    shutil.copytree(winner_dir, bad)
    meta = json.loads((bad / "meta.json").read_text())
    for key, value in (("backbone", "resnet34"), ("classes", ["a", "b", "c"])):
        changed = json.loads(json.dumps(meta))
        if key == "classes":
            changed.update(classes=value, num_classes=3)
        else:
            changed["model"][key] = value
        (bad / "meta.json").write_text(json.dumps(changed))
        with pytest.raises(ModelDirError, match="does not match the architecture"):
            Detector.from_dir(bad)
    (bad / "meta.json").write_text("{}")
    with pytest.raises(ModelDirError, match="missing keys"):
        Detector.from_dir(bad)
