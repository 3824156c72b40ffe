"""Published ERF protocols as named presets: ``effective_rf(..., protocol=NAME)``, ``--protocol NAME``.

A protocol fixes every choice its published code makes (the unit, the reduction, the
preprocessing of the images, how maps are combined and normalised) and brings its own
metrics and figure scaling. Options given explicitly override a preset; each override is
recorded in ``config["protocol"]["overridden"]`` (and warned about: the result is then no
longer the published protocol).

``replknet`` — Ding et al., "Scaling Up Your Kernels to 31x31", CVPR 2022
  (https://arxiv.org/abs/2203.06717; code DingXiaoH/RepLKNet-pytorch ``erf/visualize_erf.py``,
  ``erf/analyze_erf.py``, copied by SLaK, VMamba, MambaIR, UniRepLKNet):
  unit = sum_c relu(out[c, h // 2, w // 2]) of the backbone's last feature map (``unit_relu``);
  per image map = sum_c relu(g) (``reduce="relu"``); maps averaged (images with NaN skipped);
  images ``Resize((S, S), BICUBIC)`` (squash, no EXIF rotation), ``ToTensor``, ImageNet mean/std,
  the first 50 of the folder; area ratio on A = log10(map + 1) / max(...): for i = 1 .. H // 2 - 1
  the square rows/cols [H//2 - i, H//2 + i], the first with sum / total > t (strict) gives
  (2i+1)/H * (2i+1)/W, t in 0.2, 0.3, 0.5, 0.99 (:func:`replknet_area_ratio`); the figure shows A
  in colour map RdYlGn.
``openerf`` — OpenERF (kmbmjn/OpenERF, ``src/openerf/erf.py``, ``feature_ops.py``, ``metrics.py``;
  the BMVC 2023 ERF code): unit = mean over channels of the centre of the target layer (token
  outputs: prefix tokens dropped, an even grid takes the upper-left of the four central tokens,
  i.e. ``(g - 1) // 2``; the engine sums the channels instead of averaging them, a constant
  factor the normalisation removes); per image map = relu(mean_c g) (``reduce="relu_of_mean"``);
  maps summed and normalised to sum 1 (:func:`protocol_map`); images through timm's eval
  transform from the model's data config (``preprocess="timm"``); metrics: centre of mass, argmax,
  centre value and the radial cumulative mass within radii 5, 10, 20, 30, 40, 60, 80 of
  (H // 2, W // 2) (:func:`openerf_metrics`).
``luo2016`` — Luo, Li, Urtasun, Zemel, NIPS 2016 (https://arxiv.org/abs/1701.04128): random
  weights N(0, 1/fan_in) (``init="normal"``), Gaussian inputs, the variance map
  (``reduce="square"``), 8 weight draws; ERF size = count^(1/d) of positions above
  (1 - 0.9545) x the centre value (:func:`erf.metrics`).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["PROTOCOLS", "Protocol", "apply_protocol", "get_protocol", "openerf_metrics", "protocol_map",
           "replknet_area_ratio", "score"]

#: RepLKNet's thresholds of the high-contribution area ratio.
REPLKNET_THRESHOLDS: tuple[float, ...] = (0.2, 0.3, 0.5, 0.99)
#: OpenERF's radii of the radial cumulative mass (``compute_erf_metrics`` default).
OPENERF_RADII: tuple[int, ...] = (5, 10, 20, 30, 40, 60, 80)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ProtocolWarning(UserWarning):
    """An explicit option overrides what the named protocol fixes."""


@dataclass(frozen=True)
class Protocol:
    """A published protocol: the options it fixes, why, and how its maps are scored and shown."""

    name: str
    source: str
    options: dict[str, Any]                 # effective_rf options it fixes
    image_options: dict[str, Any]           # options it fixes when the inputs are image files
    choices: dict[str, str]                 # option -> what the published code does
    cmap: str = "viridis"
    scaling: str = "linear"                 # the figure's map: "linear", "log10p1" or "sum1"
    not_fixed: dict[str, str] = field(default_factory=dict)


PROTOCOLS: dict[str, Protocol] = {
    "replknet": Protocol(
        name="replknet",
        source="Ding et al., CVPR 2022 (arXiv:2203.06717); DingXiaoH/RepLKNet-pytorch erf/visualize_erf.py, "
               "erf/analyze_erf.py",
        options={"unit_relu": True, "reduce": "relu", "unit": None, "channel": None, "method": "gradient",
                 "train_mode": False, "nonfinite": "skip"},
        image_options={"n_inputs": 50,
                       "preprocess": {"resize": "squash", "interpolation": "bicubic", "crop_pct": 1.0,
                                      "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "exif": False}},
        choices={"unit_relu": "relu(out[:, :, h//2, w//2]).sum(): ReLU of the centre unit, summed over channels",
                 "reduce": "relu(grad).sum((0, 1)): ReLU of the input gradient summed over RGB",
                 "unit": "(h // 2, w // 2) of the last feature map",
                 "nonfinite": "an image whose map holds NaN is skipped ('got NAN, next image')",
                 "n_inputs": "the first 50 images (--num_images 50) in ImageFolder order",
                 "preprocess": "Resize((S, S), BICUBIC) (aspect ratio squashed), ToTensor, ImageNet mean/std; "
                               "PIL's convert('RGB'), no EXIF rotation",
                 "metrics": "A = log10(map + 1) / max; smallest centred square, sides 3, 5, ..., holding "
                            "> t of sum(A): (2i+1)/H * (2i+1)/W, t = 0.2, 0.3, 0.5, 0.99",
                 "figure": "A in colour map RdYlGn"},
        cmap="RdYlGn", scaling="log10p1",
        not_fixed={"inputs": "ImageNet validation images (pass inputs='images:IMAGENET/val'); S = 1024 in the paper",
                   "layer": "the backbone's last feature map (the model's output in its ERF wrappers)",
                   "weights": "the published ImageNet weights (load them before; random weights otherwise)"}),
    "openerf": Protocol(
        name="openerf",
        source="OpenERF (github.com/kmbmjn/OpenERF, src/openerf/erf.py, feature_ops.py, metrics.py), after the "
               "BMVC 2023 ERF code",
        options={"unit_relu": False, "reduce": "relu_of_mean", "channel": None, "method": "gradient",
                 "train_mode": False},
        image_options={"preprocess": "timm", "n_inputs": 1000},
        choices={"unit": "centre (h // 2, w // 2) of an NCHW feature map; token and channels-last (Swin) outputs: "
                         "prefix tokens dropped and ((g - 1) // 2, (g - 1) // 2), the upper-left of the four central "
                         "tokens of an even grid (unit='token_centre')",
                 "channel": "mean over channels (here: the sum, a constant factor removed by the normalisation)",
                 "reduce": "grad.mean(dim=(0, 1)).clamp(min=0): ReLU of the RGB mean of the gradient",
                 "normalisation": "per-image maps summed, then divided by their total (sum 1)",
                 "n_inputs": "every image of its folder (imagenet_val_1000: 1000), sorted paths",
                 "preprocess": "timm resolve_model_data_config + create_transform(is_training=False): resize by "
                               "crop_pct, centre crop, the model's interpolation and mean/std",
                 "metrics": "centre of mass, argmax, centre value, radial cumulative mass within radii "
                            "5, 10, 20, 30, 40, 60, 80 of (H // 2, W // 2) (distance <= r)"},
        cmap="viridis", scaling="sum1",
        not_fixed={"inputs": "its folder of 1000 ImageNet validation images (pass inputs='images:DIR')",
                   "layer": "timm's forward_features output (the last feature map / the final norm of a ViT)",
                   "weights": "timm's pretrained weights (load them before; random weights otherwise)"}),
    "luo2016": Protocol(
        name="luo2016",
        source="Luo, Li, Urtasun, Zemel, NIPS 2016 (arXiv:1701.04128)",
        options={"init": "normal", "reduce": "square", "inputs": "gaussian", "draws": 8, "unit_relu": False,
                 "method": "gradient", "train_mode": False},
        image_options={},
        choices={"init": "random weights N(0, 1/fan_in), biases 0 (the theory's setting)",
                 "inputs": "N(0, 1) inputs",
                 "reduce": "sum_c g^2, the variance map whose shape the theory predicts ('mean' for uniform weights)",
                 "draws": "8 random weight draws (the expectation is over weights)",
                 "metrics": "ERF size = count^(1/d) of positions above (1 - 0.9545) x the centre value; "
                            "its ratio to the TRF side"},
        cmap="viridis", scaling="linear",
        not_fixed={"layer": "the unit of interest (default the model output)"}),
}


def get_protocol(name: Any) -> Protocol:
    """The :class:`Protocol` named ``name`` (ValueError naming the valid ones otherwise)."""
    if isinstance(name, Protocol):
        return name
    if not isinstance(name, str) or name.lower() not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name.lower()]


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return getattr(v, "__qualname__", repr(v))


def apply_protocol(name: Any, options: dict[str, Any], input_shape: Any = None) -> tuple[dict[str, Any], dict]:
    """Options with the protocol's preset filled in, and the record of what it fixed.

    ``options`` holds only the options the caller gave explicitly; a preset value never
    replaces one of them (the difference is recorded under ``overridden`` and warned about).
    Returns ``(options, record)``; ``record`` is JSON-able: name, source, fixed, overridden, not_fixed.
    """
    proto = get_protocol(name)
    if input_shape is not None and proto.name in ("replknet", "openerf"):
        try:
            nd = len(tuple(input_shape)) - 1
        except TypeError:
            nd = None
        if nd != 2:
            raise ValueError(f"protocol {proto.name!r} is defined for images, input_shape (C, H, W); "
                             f"got {input_shape!r}")
    preset = dict(proto.options)
    inputs = options.get("inputs", preset.get("inputs", "gaussian"))
    images = isinstance(inputs, str) and inputs.startswith("images:")
    if images:
        preset.update(proto.image_options)
    if proto.name == "openerf":  # tokens / NHWC: upper-left central token of an even grid; NCHW: n // 2
        from erf._target import TOKEN_CENTRE

        preset["unit"] = TOKEN_CENTRE
    out = dict(options)
    fixed, overridden = {}, {}
    for key, value in preset.items():
        if key in options:
            if not _same(options[key], value):
                overridden[key] = {"protocol": _jsonable(value), "given": _jsonable(options[key])}
            continue
        out[key] = value
        fixed[key] = _jsonable(value)
    if overridden:
        warnings.warn(f"protocol {proto.name!r}: explicit option(s) override its preset: "
                      + ", ".join(f"{k}={v['given']!r} (protocol: {v['protocol']!r})" for k, v in overridden.items())
                      + "; the result is recorded as a modified protocol", ProtocolWarning, stacklevel=4)
    record = {"name": proto.name, "source": proto.source, "fixed": fixed, "overridden": overridden,
              "not_fixed": dict(proto.not_fixed), "images": images}
    return out, record


def _same(a: Any, b: Any) -> bool:
    try:
        return _jsonable(a) == _jsonable(b)
    except Exception:  # noqa: BLE001 - incomparable values differ
        return False


# ------------------------------------------------------------------------------ scoring
def as_2d_map(map: Any, name: str = "map") -> np.ndarray:
    """``map`` (an array or a result) as a 2-D numeric ndarray; a TypeError/ValueError names ``name``."""
    arr = np.asarray(getattr(map, "map", map))
    if arr.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a numeric array, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map (H, W), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or Inf values")
    if arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    return arr


def replknet_scaled(map: Any) -> np.ndarray:
    """RepLKNet's display and metric map: ``A = log10(map + 1) / max(log10(map + 1))``, in the map's dtype."""
    arr = as_2d_map(map)
    if np.any(arr < 0):
        raise ValueError("map has negative values; RepLKNet's maps are sums of ReLU gradients (non-negative)")
    a = np.log10(arr + 1)
    top = a.max()
    if not top > 0:
        raise ValueError("map is all zeros: RepLKNet's log10(map + 1) / max is undefined")
    return a / top


def replknet_area_ratio(map: Any, thresholds: tuple[float, ...] = REPLKNET_THRESHOLDS,
                        scaled: bool = False) -> dict[float, dict[str, float] | None]:
    """RepLKNet's high-contribution area ratio, exactly as ``analyze_erf.py`` computes it.

    On ``A = log10(map + 1) / max`` (skipped when ``scaled``), for i = 1, 2, ..., H // 2 - 1 the
    square ``A[H//2 - i : H//2 + i + 1, W//2 - i : W//2 + i + 1]``; the first whose sum / sum(A)
    exceeds t (strict ``>``) gives ``{"side": 2i + 1, "ratio": (2i+1)/H * (2i+1)/W}``; None when no
    such square exists (the published script then fails to unpack).
    """
    data = as_2d_map(map) if scaled else replknet_scaled(map)
    h, w = data.shape
    total = np.sum(data)
    out: dict[float, dict[str, float] | None] = {float(t): None for t in thresholds}
    pending = sorted(float(t) for t in thresholds)
    for i in range(1, h // 2):
        if not pending:
            break
        part = np.sum(data[h // 2 - i:h // 2 + 1 + i, w // 2 - i:w // 2 + 1 + i])
        while pending and part / total > pending[0]:
            out[pending.pop(0)] = {"side": i * 2 + 1, "ratio": (i * 2 + 1) / h * (i * 2 + 1) / w}
    return out


def openerf_metrics(map: Any, radii: tuple[int, ...] = OPENERF_RADII) -> dict[str, Any]:
    """OpenERF's metrics of a map (normalised to sum 1 first).

    ``com_y``/``com_x`` (centre of mass), ``argmax_yx``, ``center_yx`` = (H // 2, W // 2),
    ``center_value``, and ``radial_cumulative_mass[r]`` = the mass within Euclidean distance
    ``<= r`` of the centre, for each radius.
    """
    arr = as_2d_map(map).astype(np.float64)
    total = float(arr.sum())
    if not total > 0:
        raise ValueError("map sums to zero or less: OpenERF's normalised map is undefined")
    p = arr / total
    h, w = p.shape
    yy, xx = np.indices((h, w))
    cy, cx = h // 2, w // 2
    dist = np.sqrt((xx - float(cx)) ** 2 + (yy - float(cy)) ** 2)
    radial = {}
    for r in radii:
        if isinstance(r, bool) or int(r) != r or r <= 0:
            raise ValueError(f"radii must be positive ints, got {r!r}")
        radial[int(r)] = float(p[dist <= float(r)].sum())
    peak = np.unravel_index(int(np.argmax(p)), p.shape)
    return {"com_y": float((yy * p).sum()), "com_x": float((xx * p).sum()),
            "argmax_yx": (int(peak[0]), int(peak[1])), "center_yx": (cy, cx),
            "center_value": float(p[cy, cx]), "radial_cumulative_mass": radial}


def protocol_map(map: Any, protocol: Any) -> np.ndarray:
    """The map as the protocol shows and scores it: RepLKNet ``log10(m + 1) / max``, OpenERF
    ``m / sum(m)``, Luo et al. the map itself."""
    proto = get_protocol(protocol)
    if proto.scaling == "log10p1":
        return replknet_scaled(map)
    arr = np.asarray(getattr(map, "map", map), dtype=np.float64)
    if proto.scaling == "sum1":
        arr = as_2d_map(arr)
        total = arr.sum()
        if not total > 0:
            raise ValueError("map sums to zero or less: OpenERF's normalised map is undefined")
        return arr / total
    return arr


def score(result: Any, protocol: Any) -> dict[str, Any]:
    """The protocol's metrics of a result (``ERFResult``) or a bare map.

    ``replknet``: ``area_ratio`` {t: ratio or None} and ``side`` {t: side or None};
    ``openerf``: :func:`openerf_metrics`; ``luo2016``: ``erf_size``, ``erf_extent`` (and
    ``erf_trf_ratio`` with a result whose TRF is known) around the array centre.
    """
    proto = get_protocol(protocol)
    arr = getattr(result, "map", result)
    if proto.name == "replknet":
        ar = replknet_area_ratio(arr)
        return {"protocol": "replknet", "area_ratio": {t: (None if v is None else v["ratio"]) for t, v in ar.items()},
                "side": {t: (None if v is None else v["side"]) for t, v in ar.items()}}
    if proto.name == "openerf":
        return dict(openerf_metrics(arr), protocol="openerf")
    from erf.fit import metrics

    a = np.asarray(arr, dtype=np.float64)
    if np.any(a < 0):
        a = np.abs(a)
    trf = None
    try:
        trf = getattr(result, "trf", None)
    except Exception:  # noqa: BLE001 - the analyser may not support the model; the size stands alone
        trf = None
    met = metrics(a, center=tuple(n // 2 for n in a.shape), trf=trf)
    out = {"protocol": "luo2016", "erf_size": met["erf_size"], "erf_extent": met["erf_extent"]}
    if trf is not None and met["erf_size"] is not None:
        out["erf_trf_ratio"] = float(met["erf_size"] / np.prod(np.asarray(trf.size, float)) ** (1 / a.ndim))
    return out


def describe(protocol: Any) -> str:
    """A few lines naming the protocol's source and every choice it fixes (CLI ``--help``, README)."""
    proto = get_protocol(protocol)
    lines = [f"{proto.name}: {proto.source}"]
    lines += [f"  {k}: {v}" for k, v in proto.choices.items()]
    lines += [f"  (not fixed) {k}: {v}" for k, v in proto.not_fixed.items()]
    return "\n".join(lines)



# ------------------------------------------------------------------------------ wiring and provenance
def resolve_options(model: Any, input_shape: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``effective_rf`` runs with: the protocol's preset applied (``protocol`` becomes its
    JSON-able record) and ``preprocess="timm"`` resolved from the model's timm data config."""
    options = dict(options)
    name = options.pop("protocol", None)
    record = None
    if name is not None:
        options, record = apply_protocol(name, options, input_shape)
    inputs = options.get("inputs", "gaussian")
    images = isinstance(inputs, str) and inputs.startswith("images:")
    pp = options.get("preprocess")
    if images and (pp == "timm" or (isinstance(pp, dict) and pp.get("resize") == "timm" and "timm_config" not in pp)):
        from erf._images import resolve_preprocess

        options["preprocess"] = resolve_preprocess(pp, _module_of(model))
    if record is not None:
        options["protocol"] = record
    return options


def _module_of(model: Any) -> Any:
    import torch
    from torch import nn

    if isinstance(model, nn.Module):
        return model
    if callable(model):
        with torch.random.fork_rng(devices=[]):  # reading a data config must not move the caller's RNG
            return model()
    return model


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def provenance(source: Any, protocol: Any = None, model: Any = None) -> dict[str, Any]:
    """``meta["provenance"]``: what produced a map.

    Keys: ``inputs`` (images: kind, path, files found/used/skipped, sha256 of the sorted
    (name, size) list, preprocessing; generated/tensor inputs: their description and count),
    ``protocol`` (name or None), ``weights`` (``{"file", "sha256", ...}`` as
    :func:`erf.load_weights` records it on the model as ``model._erf_weights``; None for the
    model's own initialisation), ``versions`` (erf, torch, torchvision, timm, numpy, pillow).
    """
    from erf import __version__

    if hasattr(source, "provenance"):
        inputs = source.provenance()
    else:
        inputs = {"kind": source.describe() if hasattr(source, "describe") else type(source).__name__,
                  "files_used": None, "n": getattr(source, "n", None)}
    weights = getattr(model, "_erf_weights", None) if model is not None else None
    name = protocol.get("name") if isinstance(protocol, dict) else protocol
    return {"inputs": inputs, "protocol": name, "weights": weights,
            "versions": {"erf": __version__, "torch": _version("torch"), "torchvision": _version("torchvision"),
                         "timm": _version("timm"), "numpy": _version("numpy"), "pillow": _version("pillow")}}
