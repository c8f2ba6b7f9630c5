"""RF-DETR's multi-scale projector at the single P4 level: a C2f block over the ViT taps.

Names follow RF-DETR's checkpoints: ``stages.0.0`` is the C2f, ``stages.0.1`` its output
LayerNorm; every conv is ``<name>.conv`` followed by a channel LayerNorm ``<name>.bn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ChannelLayerNorm(nn.Module):
    """LayerNorm over C at every pixel of a (B, C, H, W) map (ConvNeXt-style)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        # normalized_shape from the weight: a constant when traced with a dynamic batch (ONNX)
        x = F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNormAct(nn.Module):
    """conv (no bias, 'same' padding) -> channel LN -> SiLU."""

    def __init__(self, c_in: int, c_out: int, kernel: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False)
        self.bn = ChannelLayerNorm(c_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(self.bn(self.conv(x.contiguous())))


class Bottleneck(nn.Module):
    """Two 3x3 ConvNormAct; RF-DETR's C2f builds them without the residual."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.cv1 = ConvNormAct(channels, channels, 3)
        self.cv2 = ConvNormAct(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv2(self.cv1(x))


class C2f(nn.Module):
    """Split cv1's output in halves, chain ``n`` bottlenecks on the last, fuse all with cv2."""

    def __init__(self, c_in: int, c_out: int, n: int) -> None:
        super().__init__()
        self.half = c_out // 2
        self.cv1 = ConvNormAct(c_in, 2 * self.half, 1)
        self.cv2 = ConvNormAct((2 + n) * self.half, c_out, 1)
        self.m = nn.ModuleList(Bottleneck(self.half) for _ in range(n))

    def forward(self, x: Tensor) -> Tensor:
        parts = list(self.cv1(x).split((self.half, self.half), dim=1))
        for block in self.m:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, dim=1))


class Projector(nn.Module):
    """Concatenate the ViT taps on channels and fuse them to one ``out_channels`` map."""

    def __init__(self, in_channels: list[int], out_channels: int, num_blocks: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList([nn.Sequential(
            C2f(sum(in_channels), out_channels, num_blocks), ChannelLayerNorm(out_channels))])

    def forward(self, taps: list[Tensor]) -> list[Tensor]:
        return [stage(torch.cat(taps, dim=1)) for stage in self.stages]
