"""Tests of erf.nets.pooling_net and swap_pooling (conv_stack is tested with the theory)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from erf.nets import pooling_net, swap_pooling
from erf.pooling import REGISTRY, MaxPool2d, SoftPool2d, list_pools
from erf.rfrule import RFRule

COMPARE = list_pools(head=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _trf(net: nn.Sequential) -> int:
    """TRF side of the last layer, composing the rules in order (convs 3x3 p1 by hand)."""
    r, j = 1, 1

    def walk(m):
        nonlocal r, j
        if hasattr(m, "rf_rule"):  # a leaf for the analyser
            rule = m.rf_rule()
            if rule.is_global:
                rule = rule.local or RFRule.identity()
            r += (rule.kernel_eff[0] - 1) * j
            j *= rule.stride[0]
        elif isinstance(m, nn.Conv2d):
            r += (m.kernel_size[0] - 1) * m.dilation[0] * j
        else:
            for child in m.children():
                walk(child)

    walk(net)
    return int(round(r))


def test_structure_and_names():
    net = pooling_net("max", depth=3, convs=2, width=8)
    assert [n for n, _ in net.named_children()] == ["stage0", "stage1", "stage2", "head"]
    assert [n for n, _ in net.stage0.named_children()] == ["conv0", "act0", "conv1", "act1", "pool"]
    assert isinstance(net.get_submodule("stage2.pool"), MaxPool2d)
    assert net.stage0.conv0.in_channels == 3 and net.head.conv1.out_channels == 8
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 8, 4, 4)
    assert [n for n, _ in pooling_net("avg", act=None).stage0.named_children()] == ["conv0", "conv1", "pool"]


@pytest.mark.parametrize("name", COMPARE)
def test_every_module_builds_a_net(name):
    torch.manual_seed(0)
    net = pooling_net(name, width=4).eval()
    y = net(torch.randn(1, 3, 32, 32))
    assert y.shape[:2] == (1, 4) and torch.isfinite(y).all()
    pools = [net.get_submodule(f"stage{s}.pool") for s in range(3)]
    assert len({id(p) for p in pools}) == 3  # fresh module per stage
    if REGISTRY[name].downsampling:
        assert y.shape[-2:] == (4, 4)
        if name != "spectral":  # global, no local rule
            assert 68 <= _trf(net) <= 89, (name, _trf(net))
    else:  # dilated keeps the size: 1 + 3 stages x (4 + 4) + 4
        assert _trf(net) == 29


def test_trf_extremes():
    assert _trf(pooling_net("max")) == 68
    assert _trf(pooling_net("median")) == 75
    assert _trf(pooling_net("maxblur")) == 89


@pytest.mark.parametrize("name,trf", [("avg", 68), ("maxblur", 89), ("median", 75)])
def test_trf_equals_gradient_support(name, trf):
    torch.manual_seed(0)
    net = pooling_net(name, width=2, act=None).eval().double()
    x = torch.randn(16, 3, 112, 112, dtype=torch.float64, requires_grad=True)
    y = net(x)
    c = y.shape[-1] // 2
    y[:, :, c, c].sum().backward()
    nz = (x.grad != 0).any(0).any(0)
    rows = nz.any(1).nonzero().flatten()
    assert int(rows.max() - rows.min()) + 1 == trf


def test_pool_as_module_or_factory():
    net = pooling_net(SoftPool2d(2), width=4)
    assert isinstance(net.stage1.pool, SoftPool2d) and net.stage1.pool is not net.stage0.pool
    net = pooling_net(lambda ch: nn.Conv2d(ch, ch, 2, 2), width=4)
    assert net.stage0.pool.in_channels == 4
    net = pooling_net(lambda: nn.AvgPool2d(2), width=4)
    assert net(torch.randn(1, 3, 16, 16)).shape == (1, 4, 2, 2)


def test_validation():
    with pytest.raises(ValueError, match="valid names"):
        pooling_net("nope")
    with pytest.raises(ValueError):
        pooling_net("max", depth=-1)
    with pytest.raises(ValueError):
        pooling_net("max", act="bogus")
    with pytest.raises(TypeError):
        pooling_net(3)


@pytest.mark.parametrize("name", ["softpool", "lip", "dpp", "stochastic"])
def test_swap_pooling_resnet18(name, tv):
    torch.manual_seed(0)
    model = tv.models.resnet18(weights=None)
    out = swap_pooling(model, name)
    assert out is model
    assert not any(type(m) in (nn.MaxPool2d, nn.AvgPool2d) for m in model.modules())
    assert type(model.maxpool).__name__ == type(REGISTRY[name].make(64)).__name__
    model.eval()
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 1000)


def test_swap_pooling_resnet18_convs(tv):
    model = swap_pooling(tv.models.resnet18(weights=None), "dpp", convs=True).eval()
    strided = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]
    assert strided == []
    assert model.layer2[0].conv1.pool.channels == 128
    assert model.layer2[0].downsample[0].pool.channels == 128
    assert model.conv1.pool.channels == 64
    ref = tv.models.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = {}
    for tag, net in (("ref", ref), ("new", model)):
        net.layer4.register_forward_hook(lambda m, i, o, tag=tag: feats.__setitem__(tag, o.shape))
        net(x)
    assert feats["ref"] == feats["new"]


def test_swap_pooling_vgg11(tv):
    torch.manual_seed(0)
    model = tv.models.vgg11(weights=None)
    assert swap_pooling(model, "lip") is model
    chans = [m.logit.conv.in_channels for m in model.features if hasattr(m, "logit")]
    assert chans == [64, 128, 256, 512, 512]
    assert not any(type(m) is nn.MaxPool2d for m in model.modules())
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)  # global pooling kept
    model.eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_swap_pooling_rejects_heads():
    with pytest.raises(ValueError, match="does not downsample"):
        swap_pooling(nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(2)), "gap")
