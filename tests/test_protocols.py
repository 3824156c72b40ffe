"""Published ERF protocols against independent transcriptions of their code.

The references below are written here from the published formulas (RepLKNet's
``erf/visualize_erf.py`` + ``erf/analyze_erf.py``; OpenERF's ``erf.py``, ``feature_ops.py``,
``metrics.py``): batch-1 loops over the images, with torchvision's ImageFolder + transforms and
timm's eval transform as the published scripts use them. They never call erf's functions.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import erf
from _deps import lazy
from erf.protocols import (PROTOCOLS, apply_protocol, openerf_metrics, protocol_map, replknet_area_ratio,
                           score)

torchvision = lazy("torchvision")  # per test: the tests without it still run


def _write_imagenet_like(root, sizes=((40, 60), (70, 50), (64, 64))):
    """val/CLASS/*.jpg-like folder: three classes of RGB images of different aspect ratios."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        d = root / f"n0{i}"
        d.mkdir(parents=True, exist_ok=True)
        yy, xx = np.mgrid[0:h, 0:w]
        arr = np.stack([(xx * 255 / w), (yy * 255 / h), rng.random((h, w)) * 255], -1).astype(np.uint8)
        Image.fromarray(arr).save(d / f"img_{i}.png")
    return root


# ---------------------------------------------------------------- RepLKNet transcription
def _replknet_reference(backbone, folder, size, dtype, num_images=50):
    """visualize_erf.py: ImageFolder, Resize((S, S), BICUBIC), ToTensor, Normalize; batch 1;
    scalar = relu(out[:, :, h//2, w//2]).sum(); map = relu(grad).sum((0, 1)); the meter's average."""
    pytest.importorskip("torchvision", reason="the published script reads images with torchvision")
    from torchvision import datasets, transforms
    from torchvision.transforms import InterpolationMode

    t = transforms.Compose([transforms.Resize((size, size), interpolation=InterpolationMode.BICUBIC),
                            transforms.ToTensor(),
                            transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    data = datasets.ImageFolder(str(folder), transform=t)
    model = backbone.to(dtype).eval()
    total, count = None, 0
    for k in range(len(data)):
        if count == num_images:
            break
        x = data[k][0][None].to(dtype).requires_grad_(True)
        out = model(x)
        h, w = out.shape[2], out.shape[3]
        central = torch.relu(out[:, :, h // 2, w // 2]).sum()
        g, = torch.autograd.grad(central, x)
        m = torch.relu(g).sum((0, 1)).detach().numpy()
        if np.isnan(np.sum(m)):
            continue
        total = m.copy() if total is None else total + m
        count += 1
    return total / count


def _replknet_rectangles(data):
    """analyze_erf.py: A = log10(data + 1) / max, then get_rectangle for each threshold."""
    data = np.log10(data + 1)
    data = data / np.max(data)
    h, w = data.shape
    all_sum = np.sum(data)
    out = {}
    for thresh in (0.2, 0.3, 0.5, 0.99):
        out[thresh] = None
        for i in range(1, h // 2):
            area = np.sum(data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i])
            if area / all_sum > thresh:
                out[thresh] = (i * 2 + 1, (i * 2 + 1) / h * (i * 2 + 1) / w)
                break
    return out


def _resnet18_backbone():
    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    return nn.Sequential(*list(net.children())[:-2])  # RepLKNet's resnet_for_erf: the last feature map


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
    return _write_imagenet_like(tmp_path_factory.mktemp("val"))


def test_replknet_map_and_area_ratio_match_the_published_scripts(imagenet_like):
    size = 96
    backbone = _resnet18_backbone()
    # float64: equal to 1e-12 (BatchNorm folding and channels_last change only the rounding)
    ref64 = _replknet_reference(_clone(backbone), imagenet_like, size, torch.float64)
    r64 = erf.effective_rf(_clone(backbone), (3, size, size), protocol="replknet", inputs=f"images:{imagenet_like}",
                           dtype=torch.float64, progress=False)
    assert r64.n == 3 and r64.config["n_inputs"] == 3
    assert r64.config["protocol"]["name"] == "replknet" and not r64.config["protocol"]["overridden"]
    np.testing.assert_allclose(r64.map, ref64, rtol=0, atol=1e-12 * ref64.max())
    rect = _replknet_rectangles(ref64)
    ours = replknet_area_ratio(r64.map)
    assert {t: (None if v is None else (v["side"], v["ratio"])) for t, v in ours.items()} == rect
    assert score(r64, "replknet")["area_ratio"] == {t: (None if v is None else v[1]) for t, v in rect.items()}
    # float32, the published setting: equal to float32 rounding; a saved .npy scores identically
    ref32 = _replknet_reference(_clone(backbone), imagenet_like, size, torch.float32)
    r32 = erf.effective_rf(_clone(backbone), (3, size, size), protocol="replknet", inputs=f"images:{imagenet_like}",
                           progress=False)
    np.testing.assert_allclose(r32.map, ref32, rtol=0, atol=2e-6 * ref32.max())
    ours32 = replknet_area_ratio(ref32)
    assert {t: (None if v is None else (v["side"], v["ratio"])) for t, v in ours32.items()} == \
        _replknet_rectangles(ref32)


def _clone(m):
    import copy

    return copy.deepcopy(m)


def test_replknet_area_ratio_strict_threshold_and_sides():
    # m = 9 on the centre 3x3 and at one corner: A = log10(m + 1) / max = 1 there, 0 elsewhere;
    # the centred squares hold exactly 9 of 10 (sides 3, 5, 7; side 9 is never tried on 9 x 9)
    m = np.zeros((9, 9))
    m[3:6, 3:6] = 9.0
    m[0, 0] = 9.0
    out = replknet_area_ratio(m, thresholds=(0.2, 0.89, 0.9))
    assert out[0.2] == {"side": 3, "ratio": 3 / 9 * 3 / 9}
    assert out[0.89] == {"side": 3, "ratio": 3 / 9 * 3 / 9}
    assert out[0.9] is None  # strict ">": 0.9 of the total is never exceeded
    # the raw-map metric of erf.metrics is a different quantity: sides from 1, ">=", no log scaling
    raw = erf.metrics(m, center=(4, 4))["area_ratio"]
    assert raw[0.2] == 9 / 81  # side 3 holds 9/10 >= 0.2; RepLKNet's first side is 3 as well
    m2 = np.zeros((9, 9))
    m2[4, 4] = 9.0
    m2[0, 0] = 1.0
    assert erf.metrics(m2, center=(4, 4))["area_ratio"][0.2] == 1 / 81  # side 1: RepLKNet never tries it
    assert replknet_area_ratio(m2)[0.2] == {"side": 3, "ratio": 9 / 81}
    with pytest.raises(ValueError, match="negative"):
        replknet_area_ratio(-m)


# ---------------------------------------------------------------- OpenERF transcription
def _openerf_reference(model, folder, token_grid=None):
    """erf.py: timm's eval transform from the model's data config, batch 1, scalar = mean over
    channels of the centre (tokens: prefix dropped, even grids the upper-left central token),
    per image clamp(mean over batch and channels of grad, 0), summed, divided by the total."""
    import os

    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    cfg = resolve_model_data_config(model)
    t = create_transform(**cfg, is_training=False)
    paths = sorted(str(p) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in (".png", ".jpg"))
    acc = None
    model = model.eval()
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
        x = t(im)[None].requires_grad_(True)
        feat = model.forward_features(x)
        if feat.ndim == 3:
            n_prefix = getattr(model, "num_prefix_tokens", 1)
            n = feat.shape[1] - n_prefix
            g = int(math.sqrt(n))
            idx = n_prefix + int(n / 2) - ((n + 1) % 2) * (int(g / 2) + 1)
            act = feat[0, idx, :].mean()
        else:
            act = feat[0, :, feat.shape[2] // 2, feat.shape[3] // 2].mean()
        grad, = torch.autograd.grad(act, x)
        m = grad.detach().mean(dim=(0, 1)).clamp(min=0).to(torch.float32)
        acc = m if acc is None else acc + m
    arr = acc.numpy().astype(np.float64)
    assert os.path.isdir(folder)
    return arr / arr.sum(), cfg


def _radial_reference(p, radii=(5, 10, 20, 30, 40, 60, 80)):
    h, w = p.shape
    ys, xs = np.indices((h, w))
    d = np.sqrt((xs - float(w // 2)) ** 2 + (ys - float(h // 2)) ** 2)
    return {r: float(p[d <= r].sum()) for r in radii}, float((xs * p).sum()), float((ys * p).sum())


@pytest.mark.parametrize("arch", ["resnet10t", "vit_tiny_patch16_224"])
def test_openerf_map_and_radial_mass_match_its_code(arch, imagenet_like):
    timm = lazy("timm")
    kw = {"img_size": 64, "pretrained_cfg_overlay": {"input_size": (3, 64, 64)}} if arch.startswith("vit") else {}
    torch.manual_seed(5)
    model = timm.create_model(arch, pretrained=False, **kw)
    if arch.startswith("vit"):  # LayerNorm's fresh weights (1, 0) make the channel mean 0 exactly: no gradient
        with torch.no_grad():
            model.norm.weight.normal_()
    ref, cfg = _openerf_reference(_clone(model), imagenet_like)
    shape = tuple(cfg["input_size"])
    if arch.startswith("vit"):
        opts = dict(layer="norm")  # tokens: the layout (prefix token, 4 x 4 grid) is inferred
    else:
        opts = dict(layer="layer4")
    r = erf.effective_rf(_clone(model), shape, protocol="openerf", inputs=f"images:{imagenet_like}", progress=False,
                         **opts)
    if arch.startswith("vit"):
        assert r.unit == (1, 1)  # 4 x 4 tokens: the upper-left of the four central ones
    assert r.config["preprocess"]["resize"] == "timm" and r.config["reduce"] == "relu_of_mean"
    ours = protocol_map(r, "openerf")
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5 * ref.max())
    radial, com_x, com_y = _radial_reference(ref)
    met = openerf_metrics(r.map)
    for rad, v in radial.items():
        assert abs(met["radial_cumulative_mass"][rad] - v) < 1e-5
    assert abs(met["com_x"] - com_x) < 1e-5 * shape[2] and abs(met["com_y"] - com_y) < 1e-5 * shape[1]


# ---------------------------------------------------------------- presets
def test_presets_fix_options_and_record_overrides():
    opts, rec = apply_protocol("replknet", {"inputs": "images:/x", "reduce": "abs"}, (3, 64, 64))
    assert opts["unit_relu"] is True and opts["reduce"] == "abs" and opts["n_inputs"] == 50
    assert opts["preprocess"]["resize"] == "squash" and opts["preprocess"]["interpolation"] == "bicubic"
    assert rec["overridden"] == {"reduce": {"protocol": "relu", "given": "abs"}}
    assert "reduce" not in rec["fixed"] and rec["fixed"]["unit_relu"] is True
    opts, rec = apply_protocol("luo2016", {}, (1, 32))
    assert opts["init"] == "normal" and opts["reduce"] == "square" and "n_inputs" not in opts
    opts, _ = apply_protocol("openerf", {"grid": (14, 14)}, (3, 224, 224))
    assert opts["unit"] == "token_centre"
    opts, _ = apply_protocol("openerf", {"unit": (2, 2)}, (3, 224, 224))
    assert opts["unit"] == (2, 2)
    with pytest.raises(ValueError, match="protocol must be one of"):
        apply_protocol("replk", {}, (3, 8, 8))
    with pytest.raises(ValueError, match="defined for images"):
        apply_protocol("replknet", {}, (3, 8, 8, 8))
    assert set(PROTOCOLS) == {"replknet", "openerf", "luo2016"}


def test_effective_rf_protocol_records_and_warns():
    model = erf.nets.conv_stack(2, width=3, act="relu", in_channels=3)
    with pytest.warns(UserWarning, match="override"):
        r = erf.effective_rf(model, (3, 16, 16), protocol="openerf", reduce="abs", n_inputs=2, progress=False)
    assert r.config["protocol"]["overridden"]["reduce"]["given"] == "abs" and r.config["reduce"] == "abs"
    assert r.meta["provenance"]["protocol"] == "openerf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = erf.effective_rf(model, (3, 16, 16), protocol="luo2016", n_inputs=2, progress=False)
    assert r.config["init"] == "normal" and r.config["draws"] == 8 and r.n == 16
    sc = score(r, "luo2016")
    assert sc["erf_size"] > 0
    with pytest.raises(ValueError, match="protocol must be one of"):
        erf.effective_rf(model, (3, 16, 16), protocol="nope", progress=False)


def test_relu_of_mean_reduction_is_openerfs():
    model = erf.nets.conv_stack(2, width=3, act="relu", in_channels=3)
    x = torch.randn(3, 3, 12, 12, dtype=torch.float64)
    r = erf.effective_rf(model, (3, 12, 12), inputs=x, reduce="relu_of_mean", dtype=torch.float64, progress=False)
    ref = 0
    m = model.double().eval()
    for i in range(3):
        xi = x[i:i + 1].clone().requires_grad_(True)
        out = m(xi)
        g, = torch.autograd.grad(out[0, :, 6, 6].sum(), xi)
        ref = ref + torch.clamp(g[0].mean(0), min=0).numpy()
    np.testing.assert_allclose(r.map, ref / 3, rtol=0, atol=1e-14)


# ---------------------------------------------------------------- erf analyze
def test_analyze_rescores_saved_maps(tmp_path, capsys):
    import json

    from erf.cli import main

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:64, 0:64]
    m = (np.exp(-((yy - 32) ** 2 + (xx - 30) ** 2) / 60.0) * 50 + rng.random((64, 64))).astype(np.float32)
    np.save(tmp_path / "erf_matrix.npy", m)  # what RepLKNet's visualize_erf.py saves (float32)
    out = ["--out", str(tmp_path), "--json"]
    assert main(["analyze", str(tmp_path / "erf_matrix.npy"), "--protocol", "replknet"] + out) == 0
    summary = json.loads(capsys.readouterr().out)
    ref = _replknet_rectangles(m)
    got = summary["metrics"]["replknet"]
    assert {float(t): (got["side"][t], got["area_ratio"][t]) for t in got["side"]} == \
        {t: (None, None) if v is None else v for t, v in ref.items()}
    assert summary["dtype"] == "float32" and (tmp_path / "analyze_erf_matrix.png").exists()
    # no protocol: erf's raw metrics and every protocol that applies
    assert main(["analyze", str(tmp_path / "erf_matrix.npy")] + out) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["metrics"]) == {"replknet", "openerf"} and summary["erf_metrics"]["erf_size"] > 0
    radial, com_x, com_y = _radial_reference(m.astype(np.float64) / m.astype(np.float64).sum())
    assert all(abs(summary["metrics"]["openerf"]["radial_cumulative_mass"][str(r)] - v) < 1e-12
               for r, v in radial.items())
    # an erf result re-scored under another protocol
    r = erf.effective_rf(erf.nets.conv_stack(3), (1, 24, 24), init="ones", reduce="mean", n_inputs=1, progress=False)
    r.save(tmp_path / "r.npz")
    assert main(["analyze", str(tmp_path / "r.npz"), "--protocol", "openerf"] + out) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["protocol"] == "openerf" and summary["metrics"]["openerf"]["argmax_yx"] == [12, 12]
    # bad input: exit 2 with one line
    np.save(tmp_path / "signed.npy", m - 10)
    np.save(tmp_path / "cube.npy", np.ones((2, 3, 4)))
    for argv in (["analyze", str(tmp_path / "nope.npy")], ["analyze", str(tmp_path / "signed.npy"), "--protocol",
                 "replknet"], ["analyze", str(tmp_path / "cube.npy")], ["analyze", str(tmp_path / "erf_matrix.npy"),
                 "--protocol", "bogus"]):
        assert main(argv + out) == 2
        assert capsys.readouterr().err.count("\n") == 1
