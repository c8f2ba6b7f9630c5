"""RF-DETR Seg's mask head (``segmentation_head`` in its checkpoints), plain PyTorch.

Inputs: the projector map (B, D, H/ps, W/ps) - the same map the decoder reads as memory - and
per-layer query features (the decoder states after its final LayerNorm). The map is upsampled
bilinearly to input / 4, refined by one depthwise-conv block per decoder layer (cumulative:
block l runs on block l-1's output), projected, and dotted with each query's projected feature:

    mask_l[b, q] = <proj(block_l(...block_0(up(map)))), query_proj(query_mlp(hs_l[b, q]))> + bias

The encoder's masks skip the blocks and the map projection. Eval returns dense logits
(B, Q, H/4, W/4); training returns the factors (``SparseMasks``) so that logits are formed only
for matched queries and sampled points, as RF-DETR does (a dense (B, 13*Q, H/4, W/4) tensor
would not fit in memory at training sizes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class DepthwiseConvBlock(nn.Module):
    """x + GELU(pwconv1(LN(dwconv3x3(x)))): ConvNeXt's block without its MLP (no layer scale)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # channels last for LN / Linear
        y = F.gelu(self.pwconv1(self.norm(y)))
        return x + y.permute(0, 3, 1, 2)


class MLPBlock(nn.Module):
    """x + Linear(GELU(Linear(LN(x)))), 4x wide; ``layers.1`` is the GELU (no parameters)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim)])

    def forward(self, x: Tensor) -> Tensor:
        y = self.norm_in(x)
        for layer in self.layers:
            y = layer(y)
        return x + y


def sparse_masks(spatial: Tensor, queries: Tensor, bias: Tensor) -> dict[str, Tensor]:
    """The factors of the mask logits, as RF-DETR's training forward returns them:
    spatial_features (B, D, h, w), query_features (B, Q, D), bias (1,).

    The bias goes out through a view, not as the Parameter itself: a Parameter returned from
    forward and used by several loss terms is marked ready twice by DDP's unused-parameter
    search (the rfdetr family trains with find_unused_parameters)."""
    return {"spatial_features": spatial, "query_features": queries, "bias": bias.view(-1)}


def dense_mask_logits(masks: Tensor | dict[str, Tensor]) -> Tensor:
    """(B, Q, h, w) logits from either form of ``pred_masks``."""
    if isinstance(masks, Tensor):
        return masks
    return (torch.einsum("bchw,bnc->bnhw", masks["spatial_features"], masks["query_features"])
            + masks["bias"])


class SegmentationHead(nn.Module):
    def __init__(self, dim: int, num_blocks: int, downsample_ratio: int = 4,
                 gradient_checkpointing: bool = False) -> None:
        super().__init__()
        # Registration order = RF-DETR's state_dict order (own parameter first).
        self.bias = nn.Parameter(torch.zeros(1))
        self.blocks = nn.ModuleList(DepthwiseConvBlock(dim) for _ in range(num_blocks))
        self.spatial_features_proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.query_features_block = MLPBlock(dim)
        self.query_features_proj = nn.Linear(dim, dim)
        self.downsample_ratio = downsample_ratio
        self.gradient_checkpointing = gradient_checkpointing

    def _queries(self, hs: Tensor) -> Tensor:
        return self.query_features_proj(self.query_features_block(hs))

    def _upsample(self, feature_map: Tensor, image_hw: tuple[int, int]) -> Tensor:
        size = (image_hw[0] // self.downsample_ratio, image_hw[1] // self.downsample_ratio)
        return F.interpolate(feature_map, size=size, mode="bilinear", align_corners=False)

    def forward(self, feature_map: Tensor, hs: Tensor, image_hw: tuple[int, int],
                dense: bool, last_only: bool = False) -> list[Tensor | dict[str, Tensor] | None]:
        """feature_map (B, D, H/ps, W/ps); hs (L, B, Q, D) -> one entry per decoder layer:
        (B, Q, H/4, W/4) logits when ``dense``, else the ``sparse_masks`` factors. With
        ``last_only`` the earlier layers' entries are None (their blocks still run: each
        block refines the previous one's map)."""
        spatial = self._upsample(feature_map, image_hw)
        out: list[Tensor | dict[str, Tensor] | None] = []
        for i, (block, hs_l) in enumerate(zip(self.blocks, hs)):
            if self.gradient_checkpointing and self.training:
                spatial = checkpoint(block, spatial, use_reentrant=False)
            else:
                spatial = block(spatial)
            if last_only and i < len(hs) - 1:
                out.append(None)
                continue
            projected = self.spatial_features_proj(spatial)
            factors = sparse_masks(projected, self._queries(hs_l), self.bias)
            out.append(dense_mask_logits(factors) if dense else factors)
        return out

    def encoder_masks(self, feature_map: Tensor, enc_feats: Tensor, image_hw: tuple[int, int],
                      dense: bool) -> Tensor | dict[str, Tensor]:
        """Masks of the two-stage selection: the raw upsampled map, no blocks, no projection."""
        factors = sparse_masks(self._upsample(feature_map, image_hw), self._queries(enc_feats),
                               self.bias)
        return dense_mask_logits(factors) if dense else factors
