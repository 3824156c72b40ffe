"""Networks whose receptive fields the toolkit studies.

- :func:`conv_stack`: the plain convolution stacks of Luo et al. (NIPS 2016).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": lambda: nn.ReLU(),
    "tanh": lambda: nn.Tanh(),
    "sigmoid": lambda: nn.Sigmoid(),
    "gelu": lambda: nn.GELU(),
    "silu": lambda: nn.SiLU(),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def make_activation(act: str | None) -> nn.Module | None:
    """Return a fresh activation module for a name (``None``/``"none"``/``"linear"`` gives ``None``)."""
    if act is None or act in ("none", "linear", "identity"):
        return None
    if not isinstance(act, str):
        raise TypeError(f"act must be a string or None, got {type(act).__name__}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {sorted(ACTIVATIONS)} or None, got {act!r}")
    return ACTIVATIONS[act]()


def conv_stack(n: int, k: int | tuple[int, ...] = 3, width: int = 1, act: str | None = None,
               padding: str | int = "same", bias: bool = False, dim: int = 2,
               in_channels: int | None = None, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    """``n`` convolutions of kernel ``k`` with ``width`` channels: the stacks of Luo et al. 2016.

    With ``init="ones"`` and no activation the ERF of the centre unit is the multinomial
    profile (1 + x + ... + x^(k-1))^n per axis; TRF = n (k - 1) + 1.

    Args:
        n: number of convolutions (>= 1).
        k: kernel size, an int or one per spatial axis.
        width: channels of every layer (the input has ``in_channels``, default ``width``).
        act: activation after each conv (``"relu"``, ``"tanh"``, ...) or ``None`` (linear).
        padding: ``"same"`` (keeps the size; needs stride 1), ``"valid"`` or an int.
        bias: whether convs have a bias.
        dim: number of spatial axes (1, 2 or 3).
    Returns:
        ``nn.Sequential`` with children ``conv0, act0, conv1, ...``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if dim not in _CONV:
        raise ValueError(f"dim must be 1, 2 or 3, got {dim!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be a positive int, got {width!r}")
    ks = (k,) * dim if isinstance(k, int) else tuple(k)
    if len(ks) != dim or any((not isinstance(v, int)) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive int or {dim} positive ints, got {k!r}")
    if not (padding in ("same", "valid") or (isinstance(padding, int) and not isinstance(padding, bool)
                                             and padding >= 0)):
        raise ValueError(f"padding must be 'same', 'valid' or an int >= 0, got {padding!r}")
    for name, value in (("stride", stride), ("dilation", dilation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if in_channels is not None and (not isinstance(in_channels, int) or isinstance(in_channels, bool)
                                    or in_channels < 1):
        raise ValueError(f"in_channels must be None or a positive int, got {in_channels!r}")
    if padding == "same" and stride != 1:
        padding = tuple((dilation * (v - 1)) // 2 for v in ks)
    layers: list[tuple[str, nn.Module]] = []
    cin = width if in_channels is None else in_channels
    for i in range(n):
        layers.append((f"conv{i}", _CONV[dim](cin, width, ks, stride=stride, padding=padding,
                                              dilation=dilation, bias=bias)))
        a = make_activation(act)
        if a is not None:
            layers.append((f"act{i}", a))
        cin = width
    return nn.Sequential(OrderedDict(layers))


# --- pooling networks ---------------------------------------------------------------------

def _build_pool(pool, channels: int, stride: int = 2) -> nn.Module:
    """A fresh pooling module: a registry name, a module (deep-copied) or ``factory(channels)``."""
    import copy
    import inspect

    if isinstance(pool, str):
        from .pooling import get_entry

        return get_entry(pool).make(channels, stride=stride)
    if isinstance(pool, nn.Module):
        return copy.deepcopy(pool)
    if callable(pool):
        try:
            inspect.signature(pool).bind(channels)
            module = pool(channels)
        except (TypeError, ValueError):
            module = pool()
        if not isinstance(module, nn.Module):
            raise TypeError(f"pool factory must return an nn.Module, got {type(module).__name__}")
        return module
    raise TypeError(f"pool must be a registry name, an nn.Module or a factory, got {type(pool).__name__}")


def pooling_net(pool, depth: int = 3, convs: int = 2, width: int = 16, act: str | None = "relu",
                in_channels: int = 3, norm: bool = False) -> nn.Sequential:
    """The canonical network of one pooling module: ``depth`` x (``convs`` x [conv3x3 + act], pool),
    then ``convs`` x [conv3x3 + act].

    With the default k2 s2 pooling the TRF is 68 px (1 + 4 + 1 + 8 + 2 + 16 + 4 + 32); k3 s2
    modules give 75, maxblur (k5) 89. Analyse it at 128x128 or more.

    Args:
        pool: an ``erf.pooling`` registry name, an ``nn.Module`` (deep-copied per stage) or a
            factory ``f(channels) -> nn.Module`` (or ``f()``).
        depth: number of pooling stages (>= 0); convs: 3x3 convs (padding 1) per stage (>= 1).
        width: channels of every conv; act: activation name or ``None``.
        norm: a BatchNorm2d after every conv (``conv{i}``, ``norm{i}``, ``act{i}``): for training.
    Returns:
        ``nn.Sequential`` with children ``stage0 .. stage{depth-1}`` (each ``conv0, act0, ...,
        pool``) and ``head`` (``conv0, act0, ...``): layer paths like ``"stage2.pool"``.
    """
    for name, value, low in (("depth", depth, 0), ("convs", convs, 1), ("width", width, 1),
                             ("in_channels", in_channels, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    make_activation(act)  # validate early

    def block(cin: int) -> list[tuple[str, nn.Module]]:
        layers: list[tuple[str, nn.Module]] = []
        for i in range(convs):
            layers.append((f"conv{i}", nn.Conv2d(cin if i == 0 else width, width, 3, padding=1)))
            if norm:
                layers.append((f"norm{i}", nn.BatchNorm2d(width)))
            a = make_activation(act)
            if a is not None:
                layers.append((f"act{i}", a))
        return layers

    stages: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for s in range(depth):
        stages.append((f"stage{s}", nn.Sequential(OrderedDict(block(cin) + [("pool", _build_pool(pool, width))]))))
        cin = width
    stages.append(("head", nn.Sequential(OrderedDict(block(cin)))))
    return nn.Sequential(OrderedDict(stages))


def _stride_of(module: nn.Module) -> int:
    s = module.stride
    s = s if isinstance(s, (tuple, list)) else (s, s)
    return int(max(s))


def _set_child(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, new)


def swap_pooling(model: nn.Module, pool, convs: bool = False) -> nn.Module:
    """Replace every downsampling pooling layer of ``model`` with ``pool``, in place.

    Every ``nn.MaxPool2d`` / ``nn.AvgPool2d`` of stride > 1 becomes the pooling module built for
    its channel count (that of the nearest preceding conv / norm layer) and stride; adaptive
    (global) pools are kept. With ``convs=True`` each convolution of stride > 1 (ResNet stem,
    downsampling blocks and their 1x1 shortcuts) becomes ``Sequential(conv with stride 1, pool)``,
    so both branches of a residual block shrink alike. Channel counts are unchanged.

    Args:
        model: e.g. a torchvision ResNet or VGG.
        pool: a registry name of a downsampling module, an ``nn.Module`` or a factory (as
            :func:`pooling_net`).
    Returns:
        ``model`` itself.
    Raises:
        ValueError: ``pool`` names a head (non-downsampling) module, or a channel count is needed
            and cannot be inferred.
    """
    import copy

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (e.g. a torchvision ResNet), got {type(model).__name__}")
    if isinstance(pool, str):
        from .pooling import get_entry

        if not get_entry(pool).downsampling:
            raise ValueError(f"pool {pool!r} does not downsample; use one of the downsampling modules")
    targets: list[tuple[str, nn.Module, int | None]] = []
    channels: int | None = None
    for path, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            if convs and _stride_of(m) > 1:
                targets.append((path, m, m.out_channels))
            channels = m.out_channels
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)):
            channels = m.num_features if hasattr(m, "num_features") else m.num_channels
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) and _stride_of(m) > 1:
            targets.append((path, m, channels))
    for path, m, ch in targets:
        if ch is None:
            raise ValueError(f"cannot infer the channels at {path!r}")
        new_pool = _build_pool(pool, ch, stride=_stride_of(m))
        if isinstance(m, nn.Conv2d):
            conv = copy.deepcopy(m)
            conv.stride = (1,) * len(conv.stride)
            new = nn.Sequential(OrderedDict([("conv", conv), ("pool", new_pool)]))
        else:
            new = new_pool
        _set_child(model, path, new)
    return model


def pooling_classifier(pool, classes: int, depth: int = 3, convs: int = 2, width: int = 16,
                       act: str | None = "relu", in_channels: int = 3, norm: bool = True) -> nn.Sequential:
    """:func:`pooling_net` as an image classifier: ``features`` (the pooling net, with BatchNorm after
    each conv unless ``norm=False``), then global average pooling and a linear layer to ``classes``
    logits. The ERF is read at ``"features"`` (BatchNorm in eval mode, folded by the engine).

    Returns:
        ``nn.Sequential`` with children ``features``, ``gap``, ``flatten``, ``fc``.
    """
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ValueError(f"classes must be an int >= 2, got {classes!r}")
    features = pooling_net(pool, depth=depth, convs=convs, width=width, act=act, in_channels=in_channels, norm=norm)
    return nn.Sequential(OrderedDict([("features", features), ("gap", nn.AdaptiveAvgPool2d(1)),
                                      ("flatten", nn.Flatten()), ("fc", nn.Linear(width, classes))]))
