"""Pooling modules, each a real implementation of its paper, with receptive-field rules.

One family per file; ``REGISTRY`` maps a short name to an entry whose ``make(channels,
stride=2, **overrides)`` builds the module with SPEC's defaults::

    >>> from erf.pooling import get_pool, list_pools
    >>> pool = get_pool("softpool", 16)
    >>> list_pools(kind="stochastic")
    ['mixed', 'fractional', 'stochastic', 's3']

Every module defines ``rf_rule() -> erf.rfrule.RFRule``; irregular ones (fractional, DynOPool,
S3) also ``rf_input_span``. Stochastic modules draw their noise from :mod:`erf._rng`.
"""
from __future__ import annotations

from ._registry import REGISTRY, Entry, get_entry, get_pool, list_pools, register
from .basic import AvgPool2d, MaxAvgPool2d, MaxPool2d, max_avg_pool2d
from .mixed import GatedPool2d, MixedPool2d, TreePool2d
from .lp import GeMPool2d, LpPool2d, gem_pool2d, lp_pool2d
from .fractional import FractionalMaxPool2d, fractional_starts
from .stochastic import S3Pool2d, StochasticPool2d, stochastic_pool2d
from .dpp import DPPool2d
from .lip import LIP2d, lip2d
from .softpool import SoftPool2d, soft_pool2d
from .dynopool import DynOPool2d, dynopool_size_loss
from .rank import MedianPool2d, RankPool2d, median_pool2d, rank_pool2d
from .spectral import SpectralPool2d, spectral_pool2d
from .blur import BlurPool2d, MaxBlurPool2d, binomial_filter, blur_pool2d
from .conv import DilatedConv2d, StridedConv2d
from .heads import SPP2d, GlobalAvgPool2d, YoloSPP2d, spp2d
from .roi import RoIAlign2d, RoIPool2d
from .second_order import BilinearPool2d, CovariancePool2d, NetVLAD, bilinear_pool, isqrt_cov_pool

__all__ = [
    # registry
    "REGISTRY", "Entry", "get_entry", "get_pool", "list_pools", "register",
    # modules
    "AvgPool2d", "BilinearPool2d", "BlurPool2d", "CovariancePool2d", "DPPool2d", "DilatedConv2d",
    "DynOPool2d", "FractionalMaxPool2d", "GatedPool2d", "GeMPool2d", "GlobalAvgPool2d", "LIP2d",
    "LpPool2d", "MaxAvgPool2d", "MaxBlurPool2d", "MaxPool2d", "MedianPool2d", "MixedPool2d",
    "NetVLAD", "RankPool2d", "RoIAlign2d", "RoIPool2d", "S3Pool2d", "SPP2d", "SoftPool2d",
    "SpectralPool2d", "StochasticPool2d", "StridedConv2d", "TreePool2d", "YoloSPP2d",
    # functionals and helpers
    "bilinear_pool", "binomial_filter", "blur_pool2d", "dynopool_size_loss", "fractional_starts",
    "gem_pool2d", "isqrt_cov_pool", "lip2d", "lp_pool2d", "max_avg_pool2d", "median_pool2d",
    "rank_pool2d", "soft_pool2d", "spectral_pool2d", "spp2d", "stochastic_pool2d",
]
