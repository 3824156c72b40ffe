"""Real timm and torchvision architectures (random weights): layouts, default layers, degenerate units.

Cheap by design: 64x64 inputs (timm img_size=64 where the model fixes its size), 2 inputs per run,
one thread. Every model: the default layer is chosen (and recorded), the map lives on the input
grid, the unit is the centre of the output grid, and trf / metrics / fit / plot / save / load work.
Token and channels-last outputs are checked against an explicit ``select`` that permutes / reshapes
by hand.
"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import erf

from _deps import lazy

timm = lazy("timm")  # tests that touch them are skipped when missing (the others still run)
torchvision = lazy("torchvision")

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (3, 64, 64)
KW = dict(n_inputs=2, progress=False, seed=0)


def _timm(name, **kw):
    def make():
        return timm.create_model(name, pretrained=False, **kw)
    make.__qualname__ = name
    return make


def _tv(name):
    def make():
        return torchvision.models.get_model(name, weights=None)
    make.__qualname__ = name
    return make


# (factory, expected default layer, output grid of that layer, expected layout)
CASES = {
    "vit_tiny": (_timm("vit_tiny_patch16_224", img_size=64), "blocks.11", (4, 4), "tokens"),
    "deit_tiny_distilled": (_timm("deit_tiny_distilled_patch16_224", img_size=64), "blocks.11", (4, 4), "tokens"),
    "swin_tiny": (_timm("swin_tiny_patch4_window7_224", img_size=64, window_size=2), "layers.3", (2, 2), "nhwc"),
    "convnext_atto": (_timm("convnext_atto"), "stages.3", (2, 2), "nchw"),
    "resnet18": (_timm("resnet18"), "layer4", (2, 2), "nchw"),
    "efficientnet_b0": (_timm("efficientnet_b0"), "blocks.6", (2, 2), "nchw"),
    "tv_mobilenet_v3_small": (_tv("mobilenet_v3_small"), "features.12", (2, 2), "nchw"),
    "tv_regnet_y_400mf": (_tv("regnet_y_400mf"), "trunk_output.block4", (2, 2), "nchw"),
}


@pytest.fixture(scope="module")
def results():
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # degenerate-unit warnings are tested below
        for key, (make, *_rest) in CASES.items():
            out[key] = erf.effective_rf(make, SHAPE, **KW)
    return out


@pytest.mark.parametrize("key", list(CASES))
def test_default_layer_map_unit_and_analyses(key, results, tmp_path):
    _make, layer, grid, layout = CASES[key]
    r = results[key]
    assert r.layer == layer
    assert r.meta["default_layer"]["layer"] == layer and "last spatial feature map" in r.meta["default_layer"]["reason"]
    assert r.meta["layout"]["layout"] == layout and r.meta["layout"]["output_spatial"] == list(grid)
    assert r.map.shape == SHAPE[1:] and np.isfinite(r.map).all() and r.map.max() > 0
    assert r.unit == tuple(g // 2 for g in grid)
    trf = r.trf
    assert trf is not None and len(trf.size) == 2
    if layout in ("tokens", "nhwc"):  # attention: global field, the unit's patch as the local field
        assert trf.is_global and trf.size == SHAPE[1:]
        side = SHAPE[1] // grid[0]
        assert trf.local_size == (side, side)
        assert trf.local_region == tuple((u * side, u * side + side - 1) for u in r.unit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        met = r.metrics
    assert met["erf_size"] is not None and met["erf_trf_ratio"] is not None
    assert r.fit is None or np.all(np.isfinite(r.fit.sigma))
    import matplotlib.pyplot as plt

    ax = r.plot()
    plt.close(ax.figure)
    path = r.save(tmp_path / f"{key}.npz")
    back = erf.load(path)
    np.testing.assert_array_equal(back.map, r.map)
    assert back.layer == layer and back.unit == r.unit and back.meta["layout"] == r.meta["layout"]
    assert back.trf is not None and back.trf.size == trf.size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert back.metrics["erf_trf_ratio"] == met["erf_trf_ratio"]


def _tokens_by_hand(prefix, grid):
    def select(out):
        t = out[:, prefix:, :]
        return t.transpose(1, 2).reshape(out.shape[0], out.shape[2], *grid)
    return select


@pytest.mark.parametrize("key, select", [
    ("vit_tiny", _tokens_by_hand(1, (4, 4))),
    ("deit_tiny_distilled", _tokens_by_hand(2, (4, 4))),
    ("swin_tiny", lambda out: out.permute(0, 3, 1, 2)),
])
def test_inferred_layout_equals_explicit_select(key, select, results):
    make, layer, grid, layout = CASES[key]
    by_hand = erf.effective_rf(make, SHAPE, layer=layer, select=select, **KW)
    assert by_hand.meta["layout"]["layout"] == "nchw" and by_hand.unit == results[key].unit
    np.testing.assert_allclose(results[key].map, by_hand.map, rtol=1e-6, atol=1e-12)
    assert results[key].meta["layout"]["prefix_tokens" if layout == "tokens" else "layout"] == (
        {"vit_tiny": 1, "deit_tiny_distilled": 2}.get(key, "nhwc"))


def test_explicit_layout_and_grid_options():
    make = CASES["vit_tiny"][0]
    a = erf.effective_rf(make, SHAPE, layer="blocks.1", layout="tokens", **KW)
    b = erf.effective_rf(make, SHAPE, layer="blocks.1", grid=(4, 4), **KW)
    np.testing.assert_allclose(a.map, b.map, rtol=1e-6)
    assert a.config["layout"] == "tokens" and b.meta["layout"]["source"] == "grid= given"
    with pytest.raises(ValueError, match="layout"):
        erf.effective_rf(make, SHAPE, layer="blocks.1", layout="nchw", **KW)  # tokens are no (N, C, H, W)
    with pytest.raises(ValueError, match="layout must be"):
        erf.effective_rf(make, SHAPE, layout="chw", **KW)
    with pytest.raises(TypeError, match="layout must be"):
        erf.effective_rf(make, SHAPE, layout=3, **KW)


class _Tokens(nn.Module):
    """Patch tokens without timm attributes: 3 register tokens before an 8x8 grid."""

    def __init__(self, extra=3, dim=6):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.extra = nn.Parameter(torch.randn(1, extra, dim))

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        return torch.cat([self.extra.expand(x.shape[0], -1, -1), t], 1)


class _NHWC(nn.Module):
    def __init__(self, c=5):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.norm = nn.LayerNorm(c)

    def forward(self, x):
        return self.norm(self.conv(x).permute(0, 2, 3, 1))


def test_layout_inference_without_model_hints_and_ambiguity():
    r = erf.effective_rf(_Tokens(), (3, 32, 32), **KW)  # 67 tokens = 3 + 8x8 (stride 4, the exact fit)
    assert r.meta["layout"]["grid"] == [8, 8] and r.meta["layout"]["prefix_tokens"] == 3 and r.unit == (4, 4)
    assert r.map[12:20, 16:20].sum() > 0 and r.map[:16].sum() + r.map[20:].sum() == 0  # one 4x4 patch
    r = erf.effective_rf(_NHWC(5), (3, 16, 16), channel=0, **KW)  # (N, 16, 16, 5): channels last by shape
    assert r.meta["layout"]["layout"] == "nhwc" and r.map[7:10, 7:10].all() and r.map.sum() == r.map[7:10, 7:10].sum()
    with pytest.raises(ValueError, match="layout='nchw' or layout='nhwc'"):  # (N, 16, 16, 16): both fit
        erf.effective_rf(_NHWC(16), (3, 16, 16), **KW)
    r = erf.effective_rf(_NHWC(16), (3, 16, 16), layout="nhwc", channel=0, **KW)
    assert r.map[7:10, 7:10].all()
    with pytest.raises(ValueError, match="grid="):  # 12 + 64 tokens: no grid after at most 8 prefix tokens
        erf.effective_rf(_Tokens(extra=12), (3, 32, 32), **KW)
    r = erf.effective_rf(_Tokens(extra=12), (3, 32, 32), grid=(8, 8), **KW)
    assert r.meta["layout"]["prefix_tokens"] == 12


def test_stage_shorthand_and_close_names():
    make = CASES["resnet18"][0]
    r = erf.effective_rf(make, SHAPE, layer="stage:-2", **KW)
    assert r.layer == "layer3"  # timm feature_info: act1, layer1 .. layer4
    tv = erf.effective_rf(_tv("resnet18"), SHAPE, layer=["stage:1", "stage:4"], **KW)
    assert set(tv) == {"stage:1", "stage:4"} and tv["stage:1"].layer == "layer1" and tv["stage:4"].layer == "layer4"
    with pytest.raises(ValueError, match="has 5 stages"):
        erf.effective_rf(make, SHAPE, layer="stage:7", **KW)
    with pytest.raises(ValueError, match="stage:K"):
        erf.effective_rf(make, SHAPE, layer="stage:last", **KW)
    with pytest.raises(ValueError, match="did you mean layer4"):
        erf.effective_rf(make, SHAPE, layer="layr4", **KW)
    model = torchvision.models.resnet18()  # theoretical_rf: the same shorthand, the caller's model untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert erf.theoretical_rf(model, SHAPE, layer="stage:-1").layer == "layer4" and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_zero_initialised_residual_scales_warn_and_kaiming_all_fixes_them():
    make = CASES["resnet18"][0]  # timm zero-initialises the last BatchNorm of every block
    with pytest.warns(UserWarning, match="residual-branch scales") as rec:
        base = erf.effective_rf(make, SHAPE, layer="layer4", n_inputs=4, progress=False)
        base_ratio = base.metrics["erf_trf_ratio"]["overall"]
    assert any("clipped to the input" in str(w.message) for w in rec)  # TRF 435 px > 64 px input
    assert any("layer1.0.bn2.weight" in w for w in base.meta["warnings"])
    assert any("kaiming_all" in w for w in base.meta["warnings"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fixed = erf.effective_rf(make, SHAPE, layer="layer4", n_inputs=4, progress=False, init="kaiming_all")
        fixed_ratio = fixed.metrics["erf_trf_ratio"]["overall"]
    assert not any("residual-branch" in str(w.message) for w in rec)
    assert fixed.config["init"] == "kaiming_all"
    assert fixed_ratio >= 5 * base_ratio, (base_ratio, fixed_ratio)


def test_layer_scale_and_constant_unit_warnings():
    with pytest.warns(UserWarning, match="residual-branch scales.*gamma"):
        erf.effective_rf(CASES["convnext_atto"][0], (3, 32, 32), layer="stages.1", **KW)
    vit = _timm("vit_tiny_patch16_224", img_size=32)  # final LayerNorm at init: channels sum to 0
    with pytest.warns(UserWarning, match="constant over inputs.*LayerNorm"):
        r = erf.effective_rf(vit, (3, 32, 32), layer="norm", **KW)
    assert any("constant over inputs" in w for w in r.meta["warnings"])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        erf.effective_rf(vit, (3, 32, 32), layer="norm", init="kaiming_all", **KW)
    assert not any("constant over inputs" in str(w.message) for w in rec)
    zero = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    nn.init.zeros_(zero[0].weight)
    nn.init.constant_(zero[0].bias, -1.0)
    with pytest.warns(UserWarning, match="identically zero"):
        erf.effective_rf(zero, (1, 12, 12), **KW)


class _KeepsFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.feature_maps = [self.conv(torch.randn(1, 1, 8, 8))]  # a non-leaf tensor attribute

    def forward(self, x):
        y = self.conv(x)
        self.feature_maps = [y]
        return y


def test_awkward_models_work_or_fail_clearly():
    r = erf.effective_rf(_KeepsFeatures(), (1, 12, 12), **KW)
    assert r.map[5:8, 5:8].all() and erf.theoretical_rf(_KeepsFeatures(), (1, 12, 12)).size == (3, 3)
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.ReLU(), nn.LazyConv2d(2, 3))
    r = erf.effective_rf(lazy, (1, 12, 12), draws=2, init="normal", **KW)
    assert r.map.sum() > 0 and r.map.sum() == r.map[4:9, 4:9].sum() and r.trf.size == (5, 5)
    script = torch.jit.script(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)))
    r = erf.effective_rf(script, (1, 12, 12), **KW)
    assert r.map.sum() > 0 and r.map.sum() == r.map[4:9, 4:9].sum()
    with pytest.raises(ValueError, match="TorchScript"):
        erf.effective_rf(script, (1, 12, 12), layer="0", **KW)
    with pytest.raises(ValueError, match="TorchScript"):
        erf.effective_rf(script, (1, 12, 12), init="normal", **KW)
    conv = nn.Conv2d(1, 2, 3)
    ref = erf.effective_rf(conv, (1, 12, 12), **KW)
    for cast in (torch.float64, torch.float16, torch.bfloat16):
        with pytest.warns(UserWarning, match="casts its copy to float32"):
            r = erf.effective_rf(conv.to(cast), (1, 12, 12), **KW)
        np.testing.assert_allclose(r.map, ref.map, rtol=2e-2)
    assert conv.weight.dtype == torch.bfloat16  # the caller's model is untouched


def test_cli_default_layer_grid_layout_and_init(capsys, tmp_path):
    from erf.cli import main

    code = main(["map", "timm:resnet18", "--input-shape", "3x64x64", "--n-inputs", "2", "--no-progress", "--json",
                 "--init", "kaiming_all", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    summary = json.loads(cap.out)
    assert summary["layer"] == "layer4" and "timm feature_info" in summary["layer_chosen_by"]
    assert "erf map: layer layer4 (last spatial feature map" in cap.err
    assert "residual-branch" not in cap.err  # kaiming_all: no zero-initialised scales
    code = main(["map", "timm:vit_tiny_patch16_224", "--input-shape", "3x224x224", "--layer", "blocks.0", "--grid",
                 "14x14", "--n-inputs", "2", "--no-progress", "--json", "--out", str(tmp_path)])
    cap = capsys.readouterr()
    assert code == 0, cap.err
    assert json.loads(cap.out)["layout"] == "tokens (grid 14x14, 1 prefix tokens)"
    for bad, match in ((["--grid", "14xa"], "--grid must look like 14x14"),
                       (["--grid", "15x15"], "--grid (15, 15) needs 225 tokens"),
                       (["--layout", "nchw"], "layout='nchw'"),
                       (["--layout", "hwc"], "invalid choice"),
                       (["--layer", "blocks.11.atn"], "did you mean blocks.11.attn"),
                       ([], "--input-shape (3, 32, 32) is not accepted by the model")):
        code = main(["map", "timm:vit_tiny_patch16_224", "--input-shape", "3x224x224" if bad else "3x32x32",
                     "--n-inputs", "2", "--no-progress", "--out", str(tmp_path)] + (["--layer", "blocks.0"] if "--layer" not in bad else [])
                    + bad)
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and match in err[0], (bad, err)
