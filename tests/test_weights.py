"""Weights files as users have them (erf.load_weights, SPEC@WEIGHTS, --weights): every wrapping of a
training checkpoint, safetensors, provenance, and a clear error for each bad file.

Each test writes its own checkpoint from a real timm or torchvision architecture with random
weights, loads it into a freshly (differently) initialised model and checks every tensor.
"""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

import erf
from _deps import lazy
from erf.cli import main
from erf.models import parse_model
from erf.weights import WeightsReport, read_state_dict

timm = lazy("timm")  # per test: the tests without it still run
safetensors_torch = lazy("safetensors.torch")

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(name="test_resnet", seed=0):
    torch.manual_seed(seed)
    if name.startswith("tv:"):
        torchvision = pytest.importorskip("torchvision")
        return torchvision.models.get_model(name[3:], weights=None)
    return timm.create_model(name, pretrained=False)


def _source(name="test_resnet"):
    """A model whose weights differ from a default-seeded one (and non-trivial BatchNorm buffers)."""
    m = _model(name, seed=123)
    with torch.no_grad():
        for k, v in m.state_dict().items():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1)
    return m


def _sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


# (what the file holds, expected unwrapped trail, stripped prefixes, alternatives)
WRAPPINGS = {
    "bare": (lambda sd: sd, [], [], []),
    "state_dict": (lambda sd: {"state_dict": sd, "epoch": 7}, ["state_dict"], [], []),
    "ddp_module_prefix": (lambda sd: {"model": _prefixed(sd, "module."), "optimizer": {"state": {}}},
                          ["model"], ["module."], []),
    "model_ema_preferred": (lambda sd: {"model": {k: v * 0 for k, v in sd.items()}, "model_ema": sd},
                            ["model_ema"], [], ["model"]),
    "state_dict_ema": (lambda sd: {"state_dict": {k: v * 0 for k, v in sd.items()}, "state_dict_ema": sd},
                       ["state_dict_ema"], [], ["state_dict"]),
    "basicsr_params_ema": (lambda sd: {"params": {k: v * 0 for k, v in sd.items()}, "params_ema": sd},
                           ["params_ema"], [], ["params"]),
    "basicsr_params": (lambda sd: {"params": sd}, ["params"], [], []),
    "torch_compile": (lambda sd: _prefixed(sd, "_orig_mod."), [], ["_orig_mod."], []),
    "compiled_ddp": (lambda sd: {"state_dict": _prefixed(sd, "_orig_mod.module.")}, ["state_dict"],
                     ["_orig_mod.", "module."], []),
    "nested": (lambda sd: {"model": {"state_dict": sd}, "epoch": 3}, ["model", "state_dict"], [], []),
    "lightning_prefix": (lambda sd: {"state_dict": _prefixed(sd, "model."), "global_step": 10},
                         ["state_dict"], ["model."], []),
}


@pytest.mark.parametrize("wrapping", list(WRAPPINGS))
def test_each_checkpoint_wrapping_loads(tmp_path, wrapping):
    make, trail, stripped, alternatives = WRAPPINGS[wrapping]
    src = _source()
    path = tmp_path / "ckpt.pth"
    torch.save(make(src.state_dict()), path)
    dst = _model()
    report = erf.load_weights(dst, path)
    _assert_same(dst, src)
    assert isinstance(report, WeightsReport) and dst.erf_weights is report
    assert report.unwrapped == trail and report.stripped == stripped and report.alternatives == alternatives
    assert report.format == "torch" and report.sha256 == _sha(path) and report.path == str(path.resolve())
    assert report.n_tensors == len(src.state_dict())


@pytest.mark.parametrize("name", ["test_vit", "tv:squeezenet1_1", "test_resnet"])
def test_safetensors_file_loads(tmp_path, name):
    src = _source(name)
    path = tmp_path / "model.safetensors"
    # hub files often leave out BatchNorm's num_batches_tracked, which torch fills in itself
    safetensors_torch.save_file({"module." + k: v.contiguous() for k, v in src.state_dict().items()
                                 if not k.endswith("num_batches_tracked")}, str(path))
    dst = _model(name)
    report = erf.load_weights(dst, str(path))
    _assert_same(dst, src)
    assert report.format == "safetensors" and report.stripped == ["module."] and report.sha256 == _sha(path)
    # recognised by its header without the extension, too
    os.rename(path, tmp_path / "model.bin")
    assert erf.load_weights(_model(name), tmp_path / "model.bin").format == "safetensors"


def test_key_picks_the_non_ema_weights(tmp_path):
    src, other = _source(), _model(seed=5)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": src.state_dict(), "model_ema": other.state_dict()}, path)
    dst = _model()
    assert erf.load_weights(dst, path, key="model").unwrapped == ["model"]
    _assert_same(dst, src)
    with pytest.raises(ValueError, match=r"key 'params' is not a dict entry.*'model', 'model_ema'"):
        erf.load_weights(dst, path, key="params")


def test_timm_checkpoint_filter_converts_a_vit_at_another_resolution(tmp_path):
    """timm's own checkpoint_filter_fn (as its pretrained loader applies it) resamples pos_embed."""
    src = timm.create_model("test_vit", img_size=64)
    path = tmp_path / "vit64.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = timm.create_model("test_vit", img_size=96)
    report = erf.load_weights(dst, path)
    assert report.converted == "timm.models.vision_transformer.checkpoint_filter_fn"
    assert dst.pos_embed.shape != src.pos_embed.shape
    assert torch.equal(dst.patch_embed.proj.weight, src.patch_embed.proj.weight)


def _facebook_convnext_keys(sd):
    """timm ConvNeXt keys -> the original facebookresearch/ConvNeXt checkpoint's (written from its model.py)."""
    import re

    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "downsample_layers.0.", k)
        k = re.sub(r"^stages\.(\d+)\.downsample\.", r"downsample_layers.\1.", k)
        k = re.sub(r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2.", k)
        k = k.replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv").replace("head.norm.", "norm.")
        out[k.replace("head.fc.", "head.")] = v
    return out


def test_original_convnext_checkpoint_loads_through_timms_filter(tmp_path):
    src = _source("test_convnext")
    path = tmp_path / "convnext_fb_ema.pth"
    torch.save({"model": _facebook_convnext_keys(src.state_dict()), "epoch": 299}, path)
    dst = _model("test_convnext")
    report = erf.load_weights(dst, path)
    assert report.converted == "timm.models.convnext.checkpoint_filter_fn" and report.unwrapped == ["model"]
    _assert_same(dst, src)
    # as a spec: timm builds the model without pretrained weights and never reaches the network
    import timm.models._builder as builder

    def no_download(*a, **k):
        raise AssertionError("erf asked timm to download weights")

    assert all(hasattr(builder, n) for n in ("load_state_dict_from_url", "load_state_dict_from_hf",
                                             "download_cached_file"))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("load_state_dict_from_url", "load_state_dict_from_hf", "download_cached_file"):
            mp.setattr(builder, name, no_download)
        mp.setattr(torch.hub, "download_url_to_file", no_download)
        _assert_same(parse_model(f"timm:test_convnext@{path}").build(3), src)
    # without timm's filter the same keys are named as missing/unexpected
    from erf.weights import apply_state_dict

    state, rep = read_state_dict(path)
    with pytest.raises(ValueError, match=r"missing keys \(stem.0.weight.*unexpected keys \(downsample_layers.0.0"):
        apply_state_dict(_model("test_convnext"), state, rep)


def _evil_file(path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, path)


BAD_FILES = {
    "missing": (None, "does not exist"),
    "directory": ("dir", "is not a file"),
    "garbage_torch": (b"not a checkpoint at all", "cannot be read as a torch or safetensors weights file"),
    "truncated_zip": ("truncated", "cannot be read as a torch or safetensors weights file"),
    "corrupt_safetensors": (b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken", "cannot be read as a safetensors"),
    "code_pickle": ("evil", "would run code"),
    "a_list": ([torch.zeros(2)], "holds a list, not a state dict"),
    "no_tensors": ({"epoch": 3, "args": {"lr": 0.1}}, "holds no tensors"),
    "int_keys": ({0: torch.zeros(1), 1: torch.zeros(1)}, "keys are not all strings"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_weights_files_get_one_clear_error(tmp_path, case):
    content, message = BAD_FILES[case]
    path = tmp_path / ("w.safetensors" if case == "corrupt_safetensors" else "w.pt")
    if content == "dir":
        path = tmp_path
    elif content == "truncated":
        torch.save(_model().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    elif content == "evil":
        _evil_file(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message) as info:
        erf.load_weights(_model(), path)
    assert info.value.args[0].startswith("path: ") and "\n" not in info.value.args[0]


def test_weights_of_another_model_name_missing_unexpected_and_shapes(tmp_path):
    src = timm.create_model("test_resnet", num_classes=7)
    sd = src.state_dict()
    sd["extra.weight"] = torch.zeros(3)
    del sd["conv1.0.weight"]
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(ValueError) as info:
        erf.load_weights(_model(), path)
    msg = info.value.args[0]
    assert "holds weights for another model" in msg and "1 missing keys (conv1.0.weight)" in msg
    assert "1 unexpected keys (extra.weight)" in msg
    assert "fc.weight: file [7, " in msg and "vs model [1000, " in msg


def test_bad_arguments_are_type_errors(tmp_path):
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        erf.load_weights("resnet", tmp_path / "x.pt")
    with pytest.raises(TypeError, match="path must be a path"):
        erf.load_weights(_model(), 3)


# ------------------------------------------------------------------------------ provenance and specs
def test_result_records_path_and_sha256_of_the_weights(tmp_path):
    from erf.nets import conv_stack

    src = conv_stack(3, in_channels=1)
    path = tmp_path / "stack.pt"
    torch.save({"state_dict_ema": _prefixed(src.state_dict(), "module.")}, path)
    model = conv_stack(3, in_channels=1)
    erf.load_weights(model, path)
    r = erf.effective_rf(model, (1, 16, 16), n_inputs=2, progress=False)
    w = r.meta["provenance"]["weights"]
    assert w["sha256"] == _sha(path) and w["path"] == str(path.resolve()) and w["unwrapped"] == ["state_dict_ema"]
    assert w["file"] == str(path.resolve()) and w["bytes"] == path.stat().st_size
    assert erf.load(r.save(tmp_path / "r.npz")).meta["provenance"]["weights"] == w
    with pytest.warns(UserWarning, match="re-drawn by init='ones'"):
        r = erf.effective_rf(model, (1, 16, 16), n_inputs=1, init="ones", progress=False)
    assert r.meta["provenance"]["weights"] is None
    assert erf.effective_rf(conv_stack(3, in_channels=1), (1, 16, 16), n_inputs=1,
                            progress=False).meta["provenance"]["weights"] is None


def test_spec_at_weights(tmp_path):
    src = _source()
    path = tmp_path / "ep10.pth"
    torch.save({"model_ema": src.state_dict()}, path)
    spec = parse_model(f"timm:test_resnet@{path}")
    assert spec.weights == str(path) and spec.slug == "timm-test_resnet@ep10"
    model = spec.build(3)
    _assert_same(model, src)
    assert model.erf_weights.unwrapped == ["model_ema"]
    assert parse_model("timm:test_resnet", weights=path).weights == str(path)
    with pytest.raises(ValueError, match="names no weights file after '@'"):
        parse_model("timm:test_resnet@")
    with pytest.raises(ValueError, match="give one"):
        parse_model(f"timm:test_resnet@{path}", weights=path)
    with pytest.raises(ValueError, match=r"timm:test_resnet@WEIGHTS: weights file .* does not exist"):
        parse_model("timm:test_resnet@/no/such/file.pth")
    with pytest.raises(ValueError, match="unknown timm model"):
        parse_model(f"timm:no_such_net@{path}")


def test_cli_weights_unwraps_reports_and_records(tmp_path, capsys):
    from erf.nets import conv_stack

    src = conv_stack(3, in_channels=1)
    with torch.no_grad():
        for p in src.parameters():
            p.fill_(1.0)
    path = tmp_path / "ones.safetensors"
    safetensors_torch.save_file(_prefixed(src.state_dict(), "_orig_mod."), str(path))
    code = main(["map", f"stack:3@{path}", "--reduce", "mean", "--input-shape", "1x16x16", "--n-inputs", "1",
                 "--json", "--no-progress", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    s = json.loads(out)
    assert s["weights"]["sha256"] == _sha(path) and s["weights"]["stripped"] == ["_orig_mod."]
    assert s["sigma_moments"] == pytest.approx([np.sqrt(2.0)] * 2, rel=1e-6)  # the all-ones weights
    assert "weights: 3 tensors" in err and "stripped prefix '_orig_mod.'" in err
    r = erf.load(os.path.join(tmp_path, "map_stack-3@ones.npz"))
    assert r.meta["provenance"]["weights"]["sha256"] == _sha(path)
    for argv, message in ((["--weights", str(tmp_path / "nope.pt")], "--weights: weights file"),
                          (["--weights", str(path), "--init", "ones"], "--weights uses the given weights"),
                          (["--weights", str(tmp_path)], "--weights: .* is not a file")):
        code = main(["map", "stack:4"] + argv + ["--input-shape", "1x16x16", "--out", str(tmp_path)])
        out, err = capsys.readouterr()
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), err
