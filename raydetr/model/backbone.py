"""ResNet-18/34/50 in plain torch, state_dict keys identical to torchvision's.

Returns the stride 8/16/32 feature maps (layer2, layer3, layer4). ``fc`` is not built:
torchvision files load with their ``fc.*`` keys ignored.

Normalisation choice: trained from scratch (the CPU path: nothing is downloaded) the backbone
uses ordinary trainable ``BatchNorm2d``; from scratch a frozen BN would pin every layer to the
identity statistics and the network trains far slower. When ``backbone_weights`` is given the
BN layers are replaced by ``FrozenBatchNorm2d`` (as DETR does): per-worker batches are small
(4 images), so batch statistics would be noisy and differ between DDP workers, while the
pretrained statistics are already good.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

ARCHS: dict[str, tuple[str, list[int]]] = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
}


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, not parameters).

    Same state_dict keys as BatchNorm2d (weight, bias, running_mean, running_var; the
    ``num_batches_tracked`` key of a torchvision file is accepted and dropped).
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        bias = self.bias - self.running_mean * scale
        return x * scale[None, :, None, None] + bias[None, :, None, None]


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # torchvision v1.5
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk. forward(images [B,3,H,W]) -> [C3 [B,c,H/8,W/8], C4 (/16), C5 (/32)]."""

    def __init__(self, name: str = "resnet18", gradient_checkpointing: bool = False) -> None:
        super().__init__()
        if name not in ARCHS:
            raise ValueError(f"unknown backbone '{name}'; choose one of {sorted(ARCHS)}")
        kind, layers = ARCHS[name]
        block: type[BasicBlock] | type[Bottleneck] = BasicBlock if kind == "basic" else Bottleneck
        self.name = name
        self.gradient_checkpointing = gradient_checkpointing
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.out_channels = [128 * block.expansion, 256 * block.expansion, 512 * block.expansion]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: each block starts as identity
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, 1, None) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def _run(self, layer: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and self.training and x.requires_grad:
            return torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
        return layer(x)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer1(x)
        c3 = self._run(self.layer2, x)
        c4 = self._run(self.layer3, c3)
        c5 = self._run(self.layer4, c4)
        return [c3, c4, c5]


def freeze_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with the same values."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def load_resnet_state_dict(backbone: ResNet, path: str | Path) -> None:
    """Load a local torchvision ResNet state_dict file into ``backbone``.

    Strict on backbone keys; ``fc.*`` is ignored. Raises ValueError naming the file and the
    missing / unexpected keys (usually: the file is for another depth, e.g. resnet50 vs 18).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights not found: {path} (model.backbone_weights must be a local "
            "torchvision ResNet state_dict file; nothing is downloaded)"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own = set(backbone.state_dict())
    tracked = {k for k in state if k.endswith("num_batches_tracked")}
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own - tracked)
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a torchvision {backbone.name} state_dict. missing keys "
            f"({len(missing)}): {missing[:10]}; unexpected keys ({len(unexpected)}): "
            f"{unexpected[:10]}. Check model.backbone matches the file."
        )
    backbone.load_state_dict(state, strict=False)
