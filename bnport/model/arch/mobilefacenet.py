"""insightface MobileFaceNet (arcface_torch `backbones/mobilefacenet.py`): same module tree, names and BN placement.

ConvBlock = conv -> BN -> PReLU; LinearBlock = conv -> BN; DepthWise = 1x1 ConvBlock -> depthwise ConvBlock ->
1x1 LinearBlock (+ shortcut when residual); head GDC = depthwise 7x7 LinearBlock -> flatten -> Linear -> BatchNorm1d.
`base` exists only for the tiny test variant (it scales the fixed widths 64/128/256/512); the default reproduces
insightface exactly.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from bnport.model.arch._registry import register_model


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), -1)


class ConvBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, groups=groups, stride=stride, padding=padding, bias=False),
            nn.BatchNorm2d(num_features=out_c),
            nn.PReLU(num_parameters=out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(num_features=out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                 groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, out_c=groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.residual:
            return x + self.layers(x)
        return self.layers(x)


class Residual(nn.Module):
    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    def __init__(self, embedding_size: int, channels: int = 512):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, groups=channels, kernel=(7, 7), stride=(1, 1), padding=(0, 0)),
            Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    def __init__(self, fp16: bool = False, num_features: int = 512, blocks=(1, 4, 6, 2), scale: int = 2,
                 base: int = 64):
        super().__init__()
        self.scale = scale
        self.fp16 = fp16
        c1, c2, head = base * scale, 2 * base * scale, 8 * base
        self.layers = nn.ModuleList()
        self.layers.append(ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)))
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=base))
        else:
            self.layers.append(Residual(c1, num_block=blocks[0], groups=2 * base, kernel=(3, 3), stride=(1, 1),
                                        padding=(1, 1)))
        self.layers.extend([
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=2 * base),
            Residual(c1, num_block=blocks[1], groups=2 * base, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=4 * base),
            Residual(c2, num_block=blocks[2], groups=4 * base, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=8 * base),
            Residual(c2, num_block=blocks[3], groups=4 * base, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
        ])
        self.conv_sep = ConvBlock(c2, head, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(num_features, channels=head)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", enabled=True) if self.fp16 else contextlib.nullcontext():
            for func in self.layers:
                x = func(x)
        x = self.conv_sep(x.float() if self.fp16 else x)
        return self.features(x)


@register_model("mobilefacenet")
def mobilefacenet(**kwargs) -> MobileFaceNet:
    """insightface MobileFaceNet (`mbf`: blocks 1,4,6,2, scale 2, 512-d embedding, 112x112)."""
    return MobileFaceNet(**kwargs)


@register_model("mobilefacenet_large")
def mobilefacenet_large(**kwargs) -> MobileFaceNet:
    """insightface MobileFaceNet-large (`mbf_large`: blocks 2,8,12,4, scale 4)."""
    return MobileFaceNet(**{"blocks": (2, 8, 12, 4), "scale": 4, **kwargs})


@register_model("mobilefacenet_tiny")
def mobilefacenet_tiny(**kwargs) -> MobileFaceNet:
    """Test variant: MobileFaceNet structure, blocks 1,1,1,1, base width 8, scale 1, 32-d embedding, 112x112."""
    return MobileFaceNet(**{"blocks": (1, 1, 1, 1), "scale": 1, "base": 8, "num_features": 32, **kwargs})
