"""Tests of erf.trf: the analytic receptive field against the exact support of the gradient."""
import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import erf
from erf.nets import conv_stack, pooling_net
from erf.pooling import REGISTRY
from erf.trf import RFReport, empirical_trf, theoretical_rf

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def clip(region, shape):
    return tuple((max(a, 0), min(b, n - 1)) for (a, b), n in zip(region, shape))


def assert_matches(model, input_shape, layer=None, unit=None, full_box=True, **kw):
    """Analytic region (clipped to the input) == empirical support; size too when inside."""
    a = theoretical_rf(model, input_shape, layer=layer, unit=unit)
    e = empirical_trf(model, input_shape, layer=layer, unit=unit, **kw)
    assert clip(a.region, input_shape[1:]) == e.region, (a.region, e.region)
    if full_box:
        assert a.size == e.size
    if full_box:
        box = np.zeros_like(e.mask)
        box[tuple(slice(lo, hi + 1) for lo, hi in a.region)] = True
        assert (box == e.mask).all()
    return a, e


# --- conv stacks --------------------------------------------------------------------------

def mixed_stack(dim, specs, width=2):
    layers, cin = [], 1
    for k, s, d, p in specs:
        layers += [CONV[dim](cin, width, k, stride=s, dilation=d, padding=p), nn.ReLU()]
        cin = width
    return nn.Sequential(*layers)


@pytest.mark.parametrize("dim,shape,specs", [
    (1, (1, 200), [(3, 1, 1, 1), (5, 2, 1, 0), (3, 1, 3, 3), (4, 2, 1, 1), (2, 1, 1, 0)]),
    (2, (1, 120, 96), [((3, 5), 1, 1, (1, 2)), ((2, 4), 2, 1, 0), (3, (1, 2), (2, 1), 2), ((5, 1), 2, 1, (2, 0))]),
    (3, (1, 24, 30, 28), [((3, 1, 5), 1, 1, 1), (2, 2, 1, 0), ((3, 3, 1), 1, (2, 1, 1), 1)]),
])
def test_conv_stacks_match_gradient_support(dim, shape, specs):
    a, _ = assert_matches(mixed_stack(dim, specs), shape)
    # the Araujo formula: unit u sees u j - P .. u j - P + r - 1
    for ax in range(dim):
        u, j, p, r = a.unit[ax], a.jump[ax], a.padding[ax], a.size[ax]
        assert a.region[ax] == (u * j - p, u * j - p + r - 1)
        assert a.center[ax] == (2 * (u * j - p) + r - 1) / 2


def test_conv_stack_closed_form_and_same_padding():
    a = theoretical_rf(conv_stack(5, k=(3, 4)), (1, 40, 40))  # padding="same", even kernel
    assert a.size == (11, 16) and a.jump == (1, 1)
    assert_matches(conv_stack(5, k=(3, 4)), (1, 40, 40))


def test_table_rows_compose_per_layer():
    a = theoretical_rf(mixed_stack(2, [(3, 2, 1, 1), (3, 1, 2, 2)]), (1, 33, 33))
    rows = a.table()
    assert [r["type"] for r in rows] == ["Conv2d", "ReLU", "Conv2d", "ReLU"]
    assert rows[0]["size"] == (3, 3) and rows[0]["jump"] == (2, 2) and rows[0]["start"] == (-1, -1)
    assert rows[2]["kernel"] == (3, 3) and rows[2]["dilation"] == (2, 2)
    assert rows[2]["size"] == (3 + 4 * 2,) * 2 and rows[2]["start"] == (-1 - 2 * 2,) * 2


# --- pooling zoo ----------------------------------------------------------------------------

LOCAL_POOLS = [n for n, e in REGISTRY.items() if e.locality == "local" and not e.head]


@pytest.mark.parametrize("name", LOCAL_POOLS)
def test_pooling_net_matches_gradient_support(name):
    torch.manual_seed(0)
    net = pooling_net(name)
    a = theoretical_rf(net, (3, 128, 128))
    e = empirical_trf(net, (3, 128, 128))
    assert not a.is_global and a.aligned
    assert a.region == e.region and a.size == e.size, (a.region, e.region)


@pytest.mark.parametrize("name", [n for n, e in REGISTRY.items() if e.locality == "global" and not e.head])
def test_global_pooling_modules_are_global(name):
    a = theoretical_rf(pooling_net(name), (3, 64, 64))
    assert a.is_global and not a.croppable


# --- graphs: branches, global layers, misalignment ----------------------------------------

class TwoBranch(nn.Module):
    def __init__(self, k2=3, p2=1, s2=2, op="add"):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 3, stride=2, padding=1)
        self.b = nn.Conv2d(1, 2, k2, stride=s2, padding=p2)
        self.op = op

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        if self.op == "cat":
            return torch.cat([a, b], 1)
        return a * b if self.op == "mul" else a + b


@pytest.mark.parametrize("op", ["add", "cat", "mul"])
def test_branches_union_and_alignment(op):
    a, _ = assert_matches(TwoBranch(k2=7, p2=3, op=op), (1, 40, 40))
    assert a.aligned and a.size == (7, 7) and a.croppable
    m = theoretical_rf(TwoBranch(k2=2, p2=0, op=op), (1, 40, 40))  # centres differ by half a pixel
    assert not m.aligned and m.misaligned and not m.croppable
    assert_matches(TwoBranch(k2=2, p2=0, op=op), (1, 40, 40))


class Gated(nn.Module):
    """Squeeze-excitation: y = conv(x) * sigmoid(fc(mean(conv(x))))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Conv2d(4, 4, 1)
        self.out = nn.Conv2d(4, 4, 5, padding=2)

    def forward(self, x):
        y = self.conv(x)
        return self.out(y * torch.sigmoid(self.fc(self.pool(y))))


def test_gates_are_global_with_a_local_part():
    a = theoretical_rf(Gated(), (1, 30, 30))
    assert a.is_global and not a.croppable
    assert a.region == ((-1, 30), (-1, 30))  # the gate pools all of conv(x), which pads by 1
    assert a.local_size == (7, 7) and a.local_region == ((12, 18), (12, 18))
    e = empirical_trf(Gated(), (1, 30, 30), hold_gates=True)
    assert e.region == a.local_region
    assert empirical_trf(Gated(), (1, 30, 30)).region == ((0, 29), (0, 29))


@pytest.mark.parametrize("head", [nn.AdaptiveAvgPool2d(1), nn.Flatten()])
def test_classifier_heads_are_global(head):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), head, nn.Flatten(), nn.LazyLinear(3))
    net(torch.zeros(1, 1, 10, 10))
    a = theoretical_rf(net, (1, 10, 10))
    assert a.is_global and a.unit == () and a.region == ((0, 9), (0, 9))
    assert a.local_region is None and a.jump == (None, None)


def test_instance_norm_is_global_locally_a_conv():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.InstanceNorm2d(2), nn.Conv2d(2, 2, 3, padding=1))
    a = theoretical_rf(net, (1, 20, 20))
    assert a.is_global and a.local_size == (5, 5)


def test_resampling_layers_match_gradient_support():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.PixelShuffle(2), nn.Conv2d(1, 4, 3, padding=1),
        nn.PixelUnshuffle(2), nn.ConvTranspose2d(16, 2, 4, stride=2, padding=1),
        nn.Upsample(scale_factor=2, mode="bilinear"), nn.Conv2d(2, 2, (3, 5), padding="same"),
        nn.Upsample(size=(50, 70), mode="nearest"), nn.ZeroPad2d((1, 2, 3, 0)), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d((9, 13)), nn.Conv2d(2, 2, 3))
    assert_matches(net, (1, 40, 40), full_box=False)
    assert_matches(net, (1, 40, 40), unit=(0, -1), full_box=False)


def test_channels_last_linear_is_pointwise():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.dw = nn.Conv2d(3, 3, 7, padding=3, groups=3)
            self.norm, self.fc = nn.LayerNorm(3), nn.Linear(3, 3)

        def forward(self, x):
            return x + self.fc(self.norm(self.dw(x).permute(0, 2, 3, 1))).permute(0, 3, 1, 2)

    a, _ = assert_matches(nn.Sequential(Block(), Block()), (3, 31, 31))
    assert a.size == (13, 13) and not a.is_global


def test_unknown_ops_are_reported():
    class Rolled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return torch.roll(self.conv(x), 1, -1)

    with pytest.warns(UserWarning, match="roll"):
        a = theoretical_rf(Rolled(), (1, 12, 12))
    assert any("roll" in u for u in a.unknown) and not a.croppable


def test_untraceable_model_falls_back_to_hooks():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 5)

        def forward(self, x):
            y = self.c1(x)
            if y.sum() > -1e9:  # data-dependent control flow: torch.fx cannot trace it
                y = torch.relu(y)
            return self.c2(y)

    with pytest.warns(UserWarning, match="chain"):
        a = theoretical_rf(Branchy(), (1, 41, 41))
    assert a.method == "hooks" and a.size == (11, 11) and not a.croppable
    assert a.region == empirical_trf(Branchy(), (1, 41, 41)).region


# --- API contract ---------------------------------------------------------------------------

def test_report_round_trip_and_text():
    a = theoretical_rf(pooling_net("max"), (3, 128, 128), layer="stage2.pool", unit=(-1, 0))
    assert a.layer == "stage2.pool" and a.unit == (15, 0) and a.input_shape == (3, 128, 128)
    d = json.loads(json.dumps(a.to_dict()))
    assert RFReport.from_dict(d) == a
    text = str(a)
    assert "stage2.pool" in text and "MaxPool2d" in text and text == a.to_text()
    assert a.table()[-1]["name"] == "stage2.pool"
    net = pooling_net("max")
    assert theoretical_rf(net, (3, 128, 128), layer=net.stage2.pool, unit=(15, 0)) == a
    assert erf.theoretical_rf is theoretical_rf and erf.RFReport is RFReport


def test_center_may_be_half_integer():
    a = theoretical_rf(nn.Conv2d(1, 1, 2, stride=2), (1, 8, 8))
    assert a.region == ((4, 5), (4, 5)) and a.center == (4.5, 4.5)


def test_models_are_not_modified():
    net = pooling_net("dynopool").train()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    theoretical_rf(net, (3, 64, 64))
    empirical_trf(net, (3, 64, 64), hold_gates=True)
    assert net.training and all(m.training for m in net.modules())
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.stage0.act0, nn.ReLU)


@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(model=3), TypeError, "model"),
    (dict(input_shape=(3, 0, 8)), ValueError, "input_shape"),
    (dict(input_shape=(8,)), ValueError, "input_shape"),
    (dict(layer="nope"), ValueError, "layer"),
    (dict(layer=3), TypeError, "layer"),
    (dict(layer=nn.Conv2d(1, 1, 1)), ValueError, "layer"),
    (dict(unit=(1,)), ValueError, "unit"),
    (dict(unit=(99, 0)), ValueError, "unit"),
])
def test_arguments_are_validated(kwargs, exc, word):
    args = dict(model=conv_stack(2), input_shape=(1, 16, 16))
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        theoretical_rf(**args)
    with pytest.raises(exc, match=word):
        empirical_trf(**args)


# --- property-based --------------------------------------------------------------------------

layer_st = st.tuples(st.sampled_from(["conv", "max", "avg", "tconv"]), st.integers(1, 4),
                     st.integers(1, 3), st.integers(1, 2), st.integers(0, 2))


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dim=st.sampled_from([1, 2]), specs=st.lists(layer_st, min_size=1, max_size=5))
def test_random_chains_match_gradient_support(dim, specs):
    pools = {"max": (nn.MaxPool1d, nn.MaxPool2d), "avg": (nn.AvgPool1d, nn.AvgPool2d)}
    tconv = (nn.ConvTranspose1d, nn.ConvTranspose2d)
    layers, n = [], 48
    for kind, k, s, d, p in specs:
        p = min(p, k // 2)
        if kind == "conv":
            layers.append(CONV[dim](2, 2, k, stride=s, dilation=d, padding=p))
        elif kind == "tconv":
            layers.append(tconv[dim - 1](2, 2, k, stride=s, dilation=d, padding=min(p, d * (k - 1))))
        else:
            kw = dict(dilation=d) if kind == "max" else {}
            layers.append(pools[kind][dim - 1](k, stride=s, padding=p, **kw))
    net = nn.Sequential(nn.Conv1d(1, 2, 1) if dim == 1 else nn.Conv2d(1, 2, 1), *layers)
    shape = (1,) + (n,) * dim
    try:
        out = net(torch.zeros((1,) + shape))
    except RuntimeError:
        return  # the chain shrinks the input below a kernel: not a network
    if out.numel() == 0:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a unit between the taps of a transposed conv sees nothing
        a = theoretical_rf(net, shape)
    e = empirical_trf(net, shape, n_inputs=1)
    if a.region is None:
        assert e.region is None and a.size == (0,) * dim
        return
    if all(lo >= 0 and hi < n for lo, hi in a.region):
        assert a.region == e.region and a.size == e.size
    else:  # the field reaches into padding: virtual positions of a layer are not clipped per layer
        assert all(c[0] <= r[0] and r[1] <= c[1] for c, r in zip(clip(a.region, shape[1:]), e.region))


# --- torchvision -----------------------------------------------------------------------------

# (model, layer, input side): the side holds the centre unit's field
LOCAL_MODELS = [
    ("resnet18", "layer4", 448, False),
    ("vgg16", "features", 224, False),
    ("alexnet", "features", 256, False),
    ("mobilenet_v2", "features", 512, True),
    ("resnet50", "layer4", 448, True),
]
EXPECTED = {"resnet18": 435, "resnet50": 427, "vgg16": 212, "alexnet": 195, "mobilenet_v2": 491,
            "densenet121": 2071, "convnext_tiny": 1688}


def _tv(name):
    tv = pytest.importorskip("torchvision", reason="torchvision is needed for this architecture")
    torch.manual_seed(0)
    return getattr(tv.models, name)().eval()


@pytest.mark.parametrize("name,layer,side", [pytest.param(n, l, s, marks=[pytest.mark.slow] if slow else [])
                                             for n, l, s, slow in LOCAL_MODELS])
def test_torchvision_field_equals_gradient_support(name, layer, side):
    m = _tv(name)
    a = theoretical_rf(m, (3, side, side), layer=layer)
    assert a.size == (EXPECTED[name],) * 2 and a.jump == (32, 32) and a.aligned and not a.is_global
    assert all(lo >= 0 and hi < side for lo, hi in a.region)
    e = empirical_trf(m, (3, side, side), layer=layer, dtype=torch.float32, n_inputs=1)
    assert e.region == a.region


@pytest.mark.slow
@pytest.mark.parametrize("name", ["densenet121", "convnext_tiny"])
def test_torchvision_large_fields_cover_the_input(name):
    m = _tv(name)
    a = theoretical_rf(m, (3, 224, 224), layer="features")
    assert a.size == (EXPECTED[name],) * 2 and a.aligned and not a.is_global
    e = empirical_trf(m, (3, 224, 224), layer="features", dtype=torch.float32, n_inputs=1)
    assert clip(a.region, (224, 224)) == e.region


@pytest.mark.slow
@pytest.mark.parametrize("name,layer,side", [("efficientnet_b0", "features.4", 256),
                                             ("regnet_y_400mf", "trunk_output", 640)])
def test_torchvision_gated_models_are_global(name, layer, side):
    m = _tv(name)
    a = theoretical_rf(m, (3, side, side), layer=layer)
    assert a.is_global and not a.croppable and a.local_region is not None
    assert all(lo >= 0 and hi < side for lo, hi in a.local_region)
    held = empirical_trf(m, (3, side, side), layer=layer, hold_gates=True, dtype=torch.float32, n_inputs=1)
    assert held.region == a.local_region
    free = empirical_trf(m, (3, side, side), layer=layer, dtype=torch.float32, n_inputs=1)
    assert free.region == clip(a.region, (side, side))
