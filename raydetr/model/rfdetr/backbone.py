"""Windowed DINOv2-small ViT (RF-DETR's ``dinov2_windowed_small`` encoder), plain PyTorch.

Module and parameter names follow RF-DETR's (which follow Hugging Face's DINOv2), so its
checkpoints load key for key: ``embeddings.*``, ``encoder.layer.<k>.*``, ``layernorm.*``.

Frames: images (B, 3, H, W), H == W; tokens (B * nw^2, 1 + T_win, C) while windowed, where
nw = windows per side and T_win = (H / ps / nw)^2 patch tokens in row-major order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class PatchEmbeddings(nn.Module):
    def __init__(self, width: int, patch_size: int) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(images).flatten(2).transpose(1, 2)  # (B, h*w, C)


class Embeddings(nn.Module):
    """CLS + patch tokens + learned absolute positions, then cut into windows."""

    def __init__(self, width: int, patch_size: int, pos_grid: int, num_windows: int) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        # Unused by detection but part of RF-DETR's state_dict (DINOv2 masked pre-training).
        self.mask_token = nn.Parameter(torch.zeros(1, width))
        self.patch_embeddings = PatchEmbeddings(width, patch_size)
        self.position_embeddings = nn.Parameter(torch.zeros(1, pos_grid * pos_grid + 1, width))
        self.patch_size = patch_size
        self.num_windows = num_windows

    def positions(self, grid_h: int, grid_w: int, square_input: bool) -> Tensor:
        """(1, 1 + grid_h*grid_w, C): the stored table, resized bicubically when the grid differs."""
        table = self.position_embeddings
        n_stored = table.shape[1] - 1
        if n_stored == grid_h * grid_w and square_input:
            return table
        side = int(math.sqrt(n_stored))
        patch_pos = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
        # float32 interpolation (as DINOv2 does) so half-precision runs resize identically.
        patch_pos = F.interpolate(patch_pos.float(), size=(grid_h, grid_w), mode="bicubic",
                                  align_corners=False, antialias=True).to(table.dtype)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([table[:, :1], patch_pos], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        b, _, height, width = images.shape
        patches = self.patch_embeddings(images.to(self.patch_embeddings.projection.weight.dtype))
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), patches], dim=1)
        gh, gw = height // self.patch_size, width // self.patch_size
        tokens = tokens + self.positions(gh, gw, height == width)
        nw = self.num_windows
        if nw == 1:
            return tokens
        cls, grid = tokens[:, :1], tokens[:, 1:]
        wh, ww = gh // nw, gw // nw
        # (B, nw, wh, nw, ww, C) -> windows row-major, tokens row-major inside each window.
        grid = grid.reshape(b, nw, wh, nw, ww, -1).permute(0, 1, 3, 2, 4, 5)
        grid = grid.reshape(b * nw * nw, wh * ww, -1)
        # Each window gets its own copy of the position-embedded CLS token (identical for
        # every image at this point, so which image's copy a window takes does not matter).
        cls = cls.repeat(nw * nw, 1, 1)
        return torch.cat([cls, grid], dim=1)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)

    def _split(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        return x.view(b, t, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim)
        b, _, t, _ = out.shape
        return out.permute(0, 2, 1, 3).contiguous().view(b, t, -1)


class AttentionOutput(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.dense(x)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attention = SelfAttention(width, heads)
        self.output = AttentionOutput(width)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.attention(x))


class LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.lambda1


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; a global block attends across all windows of an image at once."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, num_windows: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attention = Attention(width, heads)
        self.layer_scale1 = LayerScale(width)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, width * mlp_ratio)
        self.layer_scale2 = LayerScale(width)
        self.num_windows = num_windows

    def forward(self, x: Tensor, global_attention: bool) -> Tensor:
        attn_in = self.norm1(x)
        if global_attention:
            bw, t, c = x.shape
            n2 = self.num_windows ** 2
            attn = self.attention(attn_in.view(bw // n2, n2 * t, c)).view(bw, t, c)
        else:
            attn = self.attention(attn_in)
        x = x + self.layer_scale1(attn)
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class BlockStack(nn.Module):
    """Holds the blocks as ``layer`` (the name RF-DETR's checkpoints use)."""

    def __init__(self, blocks: list[Block]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(blocks)


class WindowedDinov2(nn.Module):
    """Returns the tapped hidden states as (B, C, H/ps, W/ps) maps after the shared final LN.

    ``out_feature_indexes`` k taps the hidden state after k blocks; block i is global iff
    i is one of those indexes or beyond the last one (RF-DETR: window set = {0..last} minus
    the taps). Blocks after the last tap are not run: their output is never used.
    """

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: int, patch_size: int,
                 num_windows: int, pos_grid: int, out_feature_indexes: list[int],
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if sorted(out_feature_indexes) != list(out_feature_indexes) or \
                not 1 <= out_feature_indexes[0] or out_feature_indexes[-1] > depth:
            raise ValueError(f"out_feature_indexes must ascend within 1..{depth}, "
                             f"got {out_feature_indexes}")
        self.embeddings = Embeddings(width, patch_size, pos_grid, num_windows)
        self.encoder = BlockStack([Block(width, heads, mlp_ratio, num_windows)
                                   for _ in range(depth)])
        self.layernorm = nn.LayerNorm(width, eps=1e-6)
        self.patch_size = patch_size
        self.num_windows = num_windows
        self.out_feature_indexes = list(out_feature_indexes)
        windowed = set(range(out_feature_indexes[-1] + 1)) - set(out_feature_indexes)
        self.global_blocks = [i not in windowed for i in range(depth)]
        self.gradient_checkpointing = gradient_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # DINOv2's init (as RF-DETR builds the encoder without hub weights).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.position_embeddings, std=0.02)
        nn.init.trunc_normal_(self.embeddings.cls_token, std=0.02)

    def _unwindow(self, tokens: Tensor, b: int, gh: int, gw: int) -> Tensor:
        """(B*nw^2, 1+T_win, C) -> (B, C, gh, gw), dropping each window's CLS token."""
        nw = self.num_windows
        grid = tokens[:, 1:]
        c = grid.shape[-1]
        grid = grid.reshape(b, nw, nw, gh // nw, gw // nw, c).permute(0, 1, 3, 2, 4, 5)
        return grid.reshape(b, gh, gw, c).permute(0, 3, 1, 2).contiguous()

    def forward(self, images: Tensor) -> list[Tensor]:
        b, _, height, width = images.shape
        gh, gw = height // self.patch_size, width // self.patch_size
        x = self.embeddings(images)
        taps: list[Tensor] = []
        last = self.out_feature_indexes[-1]
        for i in range(last + 1):
            if i in self.out_feature_indexes:
                taps.append(self._unwindow(self.layernorm(x), b, gh, gw))
            if i == last:
                break
            block = self.encoder.layer[i]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, self.global_blocks[i], use_reentrant=False)
            else:
                x = block(x, self.global_blocks[i])
        return taps
