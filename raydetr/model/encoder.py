"""RT-DETR-style hybrid encoder.

Intra-scale interaction (AIFI): a transformer encoder layer with 2-D sine position embeddings
on the top level only (stride 32, few tokens: cheap). Cross-scale fusion (CCFM): a top-down
FPN then a bottom-up PAN of conv blocks. Input: backbone maps [C3 /8, C4 /16, C5 /32];
output: three maps of ``hidden_dim`` channels at the same strides.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class ConvNorm(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> SiLU (or identity)."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, act: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class RepBlock(nn.Module):
    """3x3 + 1x1 conv branches summed (RepVGG block without the re-parameterisation)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv3 = ConvNorm(dim, dim, 3, act=False)
        self.conv1 = ConvNorm(dim, dim, 1, act=False)
        self.act = nn.SiLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class CSPBlock(nn.Module):
    """Cross-stage-partial fusion block: [B,cin,H,W] -> [B,cout,H,W]."""

    def __init__(self, cin: int, cout: int, num_blocks: int = 3) -> None:
        super().__init__()
        self.conv1 = ConvNorm(cin, cout, 1)
        self.conv2 = ConvNorm(cin, cout, 1)
        self.blocks = nn.Sequential(*[RepBlock(cout) for _ in range(num_blocks)])

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.conv1(x)) + self.conv2(x)


def sincos_position_embedding_2d(h: int, w: int, dim: int, temperature: float = 10000.0) -> Tensor:
    """[1, h*w, dim] fixed 2-D sine/cosine embedding (row-major over the h x w grid)."""
    if dim % 4:
        raise ValueError(f"hidden_dim must be divisible by 4 for 2-D sincos embedding, got {dim}")
    gy, gx = torch.meshgrid(torch.arange(h, dtype=torch.float32),
                            torch.arange(w, dtype=torch.float32), indexing="ij")
    pos_dim = dim // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_x = gx.flatten()[:, None] * omega[None]
    out_y = gy.flatten()[:, None] * omega[None]
    emb = torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)
    return emb[None]


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention + FFN. forward(src [B,N,D], pos [1,N,D]) -> [B,N,D]."""

    def __init__(self, dim: int, nhead: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        q = k = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, k, src, need_weights=False)[0]))
        ffn = self.linear2(self.dropout(F.gelu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class HybridEncoder(nn.Module):
    """Hybrid encoder: AIFI on the stride-32 map + CCFM (FPN + PAN) fusion.

    forward(feats: [B,c_i,H/s,W/s] for s in 8, 16, 32) -> [B,D,H/s,W/s] x 3 (D = hidden_dim).
    """

    def __init__(self, in_channels: list[int], hidden_dim: int, nhead: int = 8,
                 ffn_dim: int = 1024, num_encoder_layers: int = 1, csp_blocks: int = 3,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gradient_checkpointing = gradient_checkpointing
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, hidden_dim, 1, bias=False), nn.BatchNorm2d(hidden_dim))
            for c in in_channels
        )
        self.encoder = nn.ModuleList(
            TransformerEncoderLayer(hidden_dim, nhead, ffn_dim) for _ in range(num_encoder_layers)
        )
        n = len(in_channels)
        self.lateral = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim) for _ in range(n - 1))
        self.fpn = nn.ModuleList(CSPBlock(2 * hidden_dim, hidden_dim, csp_blocks) for _ in range(n - 1))
        self.down = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 3, 2) for _ in range(n - 1))
        self.pan = nn.ModuleList(CSPBlock(2 * hidden_dim, hidden_dim, csp_blocks) for _ in range(n - 1))
        self._pos_cache: dict[tuple[int, int], Tensor] = {}

    def _pos(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if (h, w) not in self._pos_cache:
            self._pos_cache[(h, w)] = sincos_position_embedding_2d(h, w, self.hidden_dim)
        return self._pos_cache[(h, w)].to(device=device, dtype=dtype)

    def _maybe_ckpt(self, fn, *args: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        top = proj[-1]
        b, d, h, w = top.shape
        tokens = top.flatten(2).transpose(1, 2)  # [B, h*w, D]
        pos = self._pos(h, w, top.device, top.dtype)
        for layer in self.encoder:
            tokens = self._maybe_ckpt(layer, tokens, pos)
        proj[-1] = tokens.transpose(1, 2).reshape(b, d, h, w)

        # top-down (FPN): inner[0] is the coarsest
        inner = [proj[-1]]
        for i in range(len(proj) - 1, 0, -1):
            j = len(proj) - 1 - i
            high = self.lateral[j](inner[0])
            inner[0] = high
            up = F.interpolate(high, size=proj[i - 1].shape[-2:], mode="nearest")
            inner.insert(0, self._maybe_ckpt(self.fpn[j], torch.cat([up, proj[i - 1]], 1)))
        # bottom-up (PAN)
        outs = [inner[0]]
        for i in range(len(proj) - 1):
            down = self.down[i](outs[-1])
            outs.append(self._maybe_ckpt(self.pan[i], torch.cat([down, inner[i + 1]], 1)))
        return outs
