"""Orderless global heads: covariance (iSQRT-COV), bilinear pooling and NetVLAD.

- Li, Xie, Wang & Gao, "Towards Faster Training of Global Covariance Pooling Networks by
  Iterative Matrix Square Root Normalization", CVPR 2018. https://arxiv.org/abs/1712.01034
- Lin, RoyChowdhury & Maji, "Bilinear CNN Models for Fine-grained Visual Recognition",
  ICCV 2015. https://arxiv.org/abs/1504.07889
- Arandjelovic, Gronat, Torii, Pajdla & Sivic, "NetVLAD: CNN architecture for weakly supervised
  place recognition", CVPR 2016. https://arxiv.org/abs/1511.07247
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..rfrule import RFRule
from ._registry import register


def isqrt_cov_pool(x: torch.Tensor, iterations: int = 5) -> torch.Tensor:
    """iSQRT-COV: ``y = triu(sqrt(tr S) NS_iter(S / tr S))``, ``S = X (I - 11^T/M) X^T / M``.

    Newton-Schulz: ``Y0 = A, Z0 = I; T = (3I - Z Y)/2; Y <- Y T; Z <- T Z``.

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C (C + 1) / 2]: upper triangle of the approximate matrix square root.
    """
    n, c = x.shape[:2]
    f = x.reshape(n, c, -1)
    f = f - f.mean(-1, keepdim=True)
    cov = f @ f.transpose(1, 2) / f.shape[-1]
    eye = torch.eye(c, dtype=x.dtype, device=x.device).expand(n, c, c)
    # no eps clamp (the authors' code has none): a clamp at float32 eps (1.2e-7) left the trace of
    # small features (scale 1e-4: trace ~1e-8) unnormalised and Newton-Schulz wrong; only a zero
    # trace (constant input, cov = 0) is kept from dividing by zero
    tr = cov.diagonal(dim1=1, dim2=2).sum(-1).clamp_min(torch.finfo(x.dtype).tiny).view(n, 1, 1)
    y, z = cov / tr, eye
    for _ in range(iterations):
        t = 0.5 * (3 * eye - z @ y)
        y, z = y @ t, t @ z
    y = y * tr.sqrt()
    iu = torch.triu_indices(c, c, device=x.device)
    return y[:, iu[0], iu[1]]


class CovariancePool2d(nn.Module):
    """See :func:`isqrt_cov_pool`."""

    def __init__(self, iterations: int = 5) -> None:
        super().__init__()
        if not isinstance(iterations, int) or iterations < 1:
            raise ValueError(f"iterations must be a positive int, got {iterations!r}")
        self.iterations = iterations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return isqrt_cov_pool(x, self.iterations)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="covariance over all positions")


def bilinear_pool(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """``B = X X^T / M``; ``y = l2norm(sign(B) sqrt(|B| + eps))`` flattened to ``(N, C^2)``.

    Args:
        x (Tensor[N, C, H, W]): input.
    Returns:
        Tensor[N, C * C].
    """
    n, c = x.shape[:2]
    f = x.reshape(n, c, -1)
    b = (f @ f.transpose(1, 2) / f.shape[-1]).reshape(n, c * c)
    b = torch.sign(b) * torch.sqrt(b.abs() + eps)
    return F.normalize(b, dim=1)


class BilinearPool2d(nn.Module):
    """See :func:`bilinear_pool`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return bilinear_pool(x)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="sum of outer products")


class NetVLAD(nn.Module):
    """NetVLAD: ``V_k = sum_i a_k(x_i) (x_i - c_k)``, ``a = softmax_k(w_k . x_i + b_k)``.

    Descriptors L2-normalised first; ``V`` intra-normalised per cluster, flattened, then
    L2-normalised; output ``(N, K C)``. Assignment initialised from the centres:
    ``w_k = 2 alpha c_k``, ``b_k = -alpha |c_k|^2``.
    """

    def __init__(self, channels: int, clusters: int = 8, alpha: float = 10.0) -> None:
        super().__init__()
        if not isinstance(clusters, int) or clusters < 1:
            raise ValueError(f"clusters must be a positive int, got {clusters!r}")
        self.channels, self.clusters, self.alpha = channels, clusters, alpha
        self.centroids = nn.Parameter(torch.empty(clusters, channels))
        self.assign = nn.Conv2d(channels, clusters, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.centroids.copy_(F.normalize(torch.randn(self.clusters, self.channels), dim=1))
            self.assign.weight.copy_((2 * self.alpha * self.centroids)[:, :, None, None])
            self.assign.bias.copy_(-self.alpha * self.centroids.pow(2).sum(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        x = F.normalize(x, dim=1)
        a = torch.softmax(self.assign(x), dim=1).reshape(n, self.clusters, -1)  # (N, K, M)
        f = x.reshape(n, c, -1)  # (N, C, M)
        vlad = a @ f.transpose(1, 2) - a.sum(-1, keepdim=True) * self.centroids  # (N, K, C)
        vlad = F.normalize(vlad, dim=2).reshape(n, -1)
        return F.normalize(vlad, dim=1)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="residual sums over all positions")


@register("covariance", kind="data-dependent", locality="global", rf="global", downsampling=False,
          head=True, paper="Li et al., iSQRT-COV, CVPR 2018. https://arxiv.org/abs/1712.01034")
def _make_covariance(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Covariance pooling (iSQRT-COV): Newton-Schulz square root of the covariance, upper triangle."""
    return CovariancePool2d(**kw)


@register("bilinear", kind="data-dependent", locality="global", rf="global", downsampling=False,
          head=True, paper="Lin et al., Bilinear CNN, ICCV 2015. https://arxiv.org/abs/1504.07889")
def _make_bilinear(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Bilinear pooling: averaged outer products, signed sqrt, L2 normalisation."""
    return BilinearPool2d(**kw)


@register("netvlad", kind="learnable", locality="global", rf="global", downsampling=False,
          head=True, paper="Arandjelovic et al., NetVLAD, CVPR 2016. https://arxiv.org/abs/1511.07247")
def _make_netvlad(channels: int, stride: int = 2, **kw) -> nn.Module:
    """NetVLAD: soft-assigned residual sums to 8 learned centres, intra- and L2-normalised."""
    return NetVLAD(channels, **kw)
