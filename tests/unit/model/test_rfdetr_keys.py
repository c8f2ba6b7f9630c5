"""RF-DETR family: state_dict keys, shapes, dtypes and parameter counts equal RF-DETR's.

The reference lists come from RF-DETR 1.4.1's own models (../shared/reference/rfdetr); the
parameter counts are RF-DETR's published totals (30.5 / 32.1 / 33.7 M for N / S / M).
"""

import json
from pathlib import Path

import pytest

from raydetr.model.rfdetr import RFDETR_PRESETS, build_rfdetr

REFERENCE = Path(__file__).resolve().parents[3].parent / "shared" / "reference" / "rfdetr"

# RF-DETR's parameter totals per config (with its 91-row COCO class head).
PARAMS = {"rfdetr-nano": 30_467_298, "rfdetr-small": 32_111_170,
          "rfdetr-medium": 33_687_458, "rfdetr-base": 32_174_530}


@pytest.fixture(scope="module", params=sorted(RFDETR_PRESETS))
def built(request):
    return request.param, build_rfdetr(request.param, num_classes=91)


def test_parameter_count_matches_rfdetr(built):
    preset, model = built
    assert sum(p.numel() for p in model.parameters()) == PARAMS[preset]
    # No buffers: every state_dict entry is a parameter, as in RF-DETR.
    assert len(model.state_dict()) == len(list(model.parameters()))


def test_state_dict_equals_reference_keys(built):
    preset, model = built
    path = REFERENCE / f"keys_{preset.removeprefix('rfdetr-')}.json"
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
    for key in ("resolution", "patch_size", "num_windows", "positional_encoding_size",
                "out_feature_indexes", "dec_layers", "hidden_dim", "num_queries", "group_detr"):
        assert cfg[key] == ref["config"][key], key


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="rfdetr-nano"):
        build_rfdetr("rfdetr-huge")
