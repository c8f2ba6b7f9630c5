"""RF-DETR family: state_dict keys, shapes, dtypes and parameter counts equal RF-DETR's.

The reference lists come from RF-DETR 1.4.1's own models: ../shared/reference/rfdetr for
nano/small/medium/base and the seven Seg presets, and tests/unit/model/data/keys_large.json for
Large (made the same way by bench/rfdetr_reference.py keys rfdetr-large; see data/README.md).
The parameter counts of N/S/M are RF-DETR's published totals (30.5 / 32.1 / 33.7 M).
"""

import json
from pathlib import Path

import pytest

from raydetr.config.presets import RFDETR_PRESETS as PRESET_NAMES
from raydetr.model.rfdetr import RFDETR_PRESETS, build_rfdetr

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "rfdetr"
DATA = Path(__file__).resolve().parent / "data"

# RF-DETR's parameter totals per config (with its 91-row COCO class head).
PARAMS = {"rfdetr-nano": 30_467_298, "rfdetr-small": 32_111_170,
          "rfdetr-medium": 33_687_458, "rfdetr-base": 32_174_530}


def reference_path(preset: str) -> Path:
    if preset == "rfdetr-large":
        return DATA / "keys_large.json"  # kept with the tests (generated, not in ../shared)
    return REFERENCE / f"keys_{preset.removeprefix('rfdetr-').replace('-', '_')}.json"


@pytest.fixture(scope="module", params=sorted(RFDETR_PRESETS))
def built(request):
    return request.param, build_rfdetr(request.param, num_classes=91)


def test_every_preset_name_has_an_architecture():
    assert sorted(PRESET_NAMES) == sorted(RFDETR_PRESETS)


def test_parameter_count_matches_rfdetr(built):
    preset, model = built
    if preset in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]
    # No buffers: every state_dict entry is a parameter, as in RF-DETR.
    assert len(model.state_dict()) == len(list(model.parameters()))


def test_state_dict_equals_reference_keys(built):
    preset, model = built
    path = reference_path(preset)
    if not path.is_file():
        pytest.skip(f"RF-DETR key reference not found at {path} (../shared beside the repo)")
    ref = json.loads(path.read_text())
    ours = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")]
            for k, v in model.state_dict().items()]
    ref_keys = {k for k, _, _ in ref["state_dict"]}
    our_keys = {k for k, _, _ in ours}
    assert sorted(ref_keys - our_keys) == [], "missing keys"
    assert sorted(our_keys - ref_keys) == [], "unexpected keys"
    assert ours == ref["state_dict"]  # same shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == ref["num_parameters"]
    cfg = RFDETR_PRESETS[preset]
    keys = ["resolution", "patch_size", "num_windows", "positional_encoding_size",
            "out_feature_indexes", "dec_layers", "hidden_dim", "num_queries", "group_detr"]
    # 1.4.1's RFDETRLargeConfig has no num_select (populate_args' default 100 applied); 1.11
    # sets 300 explicitly, which is ours. Every other config states it.
    keys += [] if preset == "rfdetr-large" else ["num_select"]
    for key in keys:
        assert cfg[key] == ref["config"][key], key
    assert cfg["segmentation_head"] == bool(ref["config"].get("segmentation_head", False))


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="rfdetr-nano"):
        build_rfdetr("rfdetr-huge")


def test_readme_model_table_states_the_built_models(built):
    """The README's line-up table: resolution, step, decoder layers, queries and parameter
    count of each RF-DETR preset are those of the model built here."""
    from raydetr.model.rfdetr import resolution_step

    preset, model = built
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    rows = [line for line in readme.splitlines() if line.startswith(f"| `{preset}` |")]
    assert len(rows) == 1, f"README.md has no line-up row for {preset}"
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    cfg = RFDETR_PRESETS[preset]
    assert cells[1] == ("masks + boxes" if cfg["segmentation_head"] else "boxes")
    assert cells[3:6] == [str(cfg["resolution"]), str(resolution_step(preset)),
                          str(cfg["dec_layers"])]
    assert cells[6] == f"{cfg['num_queries']} ({cfg['num_select']})"
    assert cells[7] == f"{sum(p.numel() for p in model.parameters()):,}"
