"""Spectral pooling: truncation of the discrete Fourier transform.

Rippel, Snoek & Adams, "Spectral Representations for Convolutional Neural Networks",
NeurIPS 2015. https://arxiv.org/abs/1506.03767
"""
from __future__ import annotations

import torch
from torch import nn

from ..rfrule import RFRule
from ._registry import register
from ._utils import pair


def _crop_freq(z: torch.Tensor, n_out: int, dim: int) -> torch.Tensor:
    """Keep the ``n_out`` lowest frequencies of ``z`` along ``dim`` (FFT order in and out).

    Even ``n_out``: the output's Nyquist bin ``-n_out/2`` receives the input bins ``-n_out/2``
    and ``+n_out/2`` (they alias to it), so band-limited signals are resampled exactly.
    """
    n = z.shape[dim]
    if n_out >= n:
        return z
    half = n_out // 2
    if n_out % 2:
        return torch.cat([z.narrow(dim, 0, half + 1), z.narrow(dim, n - half, half)], dim)
    nyq = z.narrow(dim, n - half, 1) + z.narrow(dim, half, 1)
    return torch.cat([z.narrow(dim, 0, half), nyq, z.narrow(dim, n - half + 1, half - 1)], dim)


def spectral_pool2d(x: torch.Tensor, output_size) -> torch.Tensor:
    """``y = Re(IDFT(crop(DFT(x)))) * (h w)/(H W)``: the centred low-frequency ``h x w`` block.

    The scale keeps amplitudes, so a signal whose spectrum lies inside the block is sampled
    exactly: ``y[m] = x[m H / h]``.

    Args:
        x (Tensor[N, C, H, W]): input.
        output_size: ``(h, w)`` with ``h <= H``, ``w <= W``.
    Returns:
        Tensor[N, C, h, w], real, same dtype as ``x``.
    """
    h, w = pair(output_size)
    H, W = x.shape[-2:]
    low = x.dtype in (torch.float16, torch.bfloat16)  # no FFT kernels for those on CPU
    z = torch.fft.fft2(x.float() if low else x)
    z = _crop_freq(_crop_freq(z, h, -2), w, -1)
    return (torch.fft.ifft2(z).real * (h * w / (H * W))).to(x.dtype)


class SpectralPool2d(nn.Module):
    """Spectral pooling to ``floor(H / stride) x floor(W / stride)`` (>= 1); see :func:`spectral_pool2d`.

    Every output depends on the whole input (global). https://arxiv.org/abs/1506.03767
    """

    def __init__(self, stride=2, output_size=None) -> None:
        super().__init__()
        self.stride, self.output_size = stride, output_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.output_size is not None:
            size = pair(self.output_size)
        else:
            sh, sw = pair(self.stride)
            size = (max(1, int(x.shape[-2] // sh)), max(1, int(x.shape[-1] // sw)))
        return spectral_pool2d(x, size)

    def rf_rule(self) -> RFRule:
        return RFRule.global_(note="DFT truncation")

    def extra_repr(self) -> str:
        return f"stride={self.stride}, output_size={self.output_size}"


@register("spectral", kind="fixed", locality="global", rf="global (DFT)",
          paper="Rippel et al., Spectral Representations for CNNs, NeurIPS 2015. "
                "https://arxiv.org/abs/1506.03767")
def _make_spectral(channels: int, stride: int = 2, **kw) -> nn.Module:
    """Spectral pooling to half size: keep the centred low frequencies of the DFT."""
    return SpectralPool2d(stride=stride, **kw)
