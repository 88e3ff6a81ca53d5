"""insightface IResNet (arcface_torch `backbones/iresnet.py`): same module tree, parameter names and BN placement.

Block: bn1 -> conv1 (3x3, pad 1) -> bn2 -> PReLU -> conv2 (3x3, stride) -> bn3, plus identity or conv1x1+BN
downsample. Head: bn2 -> flatten -> dropout -> fc -> features (BatchNorm1d). iresnet100 has 154 BatchNorm layers.
`width` and `input_size` exist only for the tiny test variants; defaults reproduce insightface exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from bnport.model.arch._registry import register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
                     dilation=dilation)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    def __init__(self, block: type[IBasicBlock], layers: list[int], dropout: float = 0.0, num_features: int = 512,
                 fp16: bool = False, width: int = 64, input_size: int = 112):
        super().__init__()
        self.fp16 = fp16
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(block, width, layers[0], stride=2)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(8 * width * block.expansion, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        fc_scale = (input_size // 16) ** 2
        self.fc = nn.Linear(8 * width * block.expansion * fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[IBasicBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion, eps=1e-05))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=True) if self.fp16 else contextlib.nullcontext():
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.prelu(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        x = self.fc(x.float() if self.fp16 else x)
        x = self.features(x)
        return x


def _iresnet(layers: list[int], **kwargs) -> IResNet:
    return IResNet(IBasicBlock, layers, **kwargs)


@register_model("iresnet18")
def iresnet18(**kwargs) -> IResNet:
    """insightface IResNet-18 (512-d embedding, 112x112)."""
    return _iresnet([2, 2, 2, 2], **kwargs)


@register_model("iresnet34")
def iresnet34(**kwargs) -> IResNet:
    """insightface IResNet-34 (512-d embedding, 112x112)."""
    return _iresnet([3, 4, 6, 3], **kwargs)


@register_model("iresnet50")
def iresnet50(**kwargs) -> IResNet:
    """insightface IResNet-50 (512-d embedding, 112x112)."""
    return _iresnet([3, 4, 14, 3], **kwargs)


@register_model("iresnet100")
def iresnet100(**kwargs) -> IResNet:
    """insightface IResNet-100 (512-d embedding, 112x112; 154 BatchNorm layers)."""
    return _iresnet([3, 13, 30, 3], **kwargs)


@register_model("iresnet200")
def iresnet200(**kwargs) -> IResNet:
    """insightface IResNet-200 (512-d embedding, 112x112)."""
    return _iresnet([6, 26, 60, 6], **kwargs)


@register_model("iresnet_tiny")
def iresnet_tiny(**kwargs) -> IResNet:
    """Test variant: IResNet block structure, one block per stage, width 8, 32-d embedding, 112x112."""
    kwargs = {"width": 8, "num_features": 32, **kwargs}
    return _iresnet([1, 1, 1, 1], **kwargs)
