"""Tiny hand-written modules with the BatchNorm patterns of the timm zoo (issue 9), shared by the fold, parity and
export tests: timm's norm+act layer, MixNet's mixed conv (Concat of convs -> BN), LeViT's LinearNorm and NormLinear,
RepVGG's block with an identity BN branch; image models built from them; and an ill-conditioned model, on which
PyTorch float32 itself is 1e-4 of the output scale away from float64 (as timm's MixNet with randomised statistics)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bnport.export.fx_view
from tests.helpers.models import realistic_bn


class NormAct(nn.BatchNorm2d):
    """The layout of timm's BatchNormAct2d: the BN, then `drop`, then `act`; known to the fold only when registered
    (`register_norm_act`)."""

    def __init__(self, channels: int, act: nn.Module | None = None):
        super().__init__(channels)
        self.drop = nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def register_norm_act(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `NormAct` one of the fold's known norm+act layers for the test."""
    monkeypatch.setattr(bnport.export.fx_view, "NORM_ACT_LAYERS",
                        bnport.export.fx_view.NORM_ACT_LAYERS | {(NormAct.__module__, NormAct.__name__)})


class MixedConv(nn.Module):
    """MixNet's mixed conv: channel groups through convs of different kernels, concatenated, then one BN."""

    def __init__(self, bn: nn.Module | None = None):
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1, groups=2)
        self.b = nn.Conv2d(2, 3, 5, padding=2, bias=False)
        self.c = nn.Conv2d(2, 4, 1)
        self.bn = bn if bn is not None else nn.BatchNorm2d(9)

    def forward(self, x):
        xa, xb, xc = torch.split(x, 2, dim=1)
        return self.bn(torch.cat([self.a(xa), self.b(xb), self.c(xc)], dim=1))


class LinearNorm(nn.Module):
    """timm LeViT's LinearNorm: Linear on (B, N, C), BatchNorm1d over the C features of all B*N tokens."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.linear = nn.Linear(c_in, c_out, bias=False)
        self.bn = nn.BatchNorm1d(c_out)

    def forward(self, x):
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class NormLinear(nn.Module):
    """timm LeViT's head: BatchNorm1d on (B, C), dropout, Linear."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn, self.drop, self.linear = nn.BatchNorm1d(c_in), nn.Dropout(0.1), nn.Linear(c_in, c_out)

    def forward(self, x):
        return self.linear(self.drop(self.bn(x)))


class RepVggBlock(nn.Module):
    """RepVGG's training-time block: 3x3 conv + BN, 1x1 conv + BN, and an identity BN, summed (as timm writes it)."""

    def __init__(self, channels: int, *, groups: int = 1):
        super().__init__()
        self.conv_kxk = nn.Conv2d(channels, channels, 3, padding=1, groups=groups, bias=False)
        self.bn_kxk = nn.BatchNorm2d(channels)
        self.conv_1x1 = nn.Conv2d(channels, channels, 1, groups=groups, bias=False)
        self.bn_1x1 = nn.BatchNorm2d(channels)
        self.identity = nn.BatchNorm2d(channels)
        self.drop_path = nn.Identity()

    def forward(self, x):
        identity = self.identity(x)
        y = self.bn_1x1(self.conv_1x1(x)) + self.bn_kxk(self.conv_kxk(x))
        y = self.drop_path(y)
        y += identity
        return torch.relu(y)


class TinyMixNet(nn.Module):
    """Stem conv -> norm+act, a mixed conv whose BN is a norm+act too, pooled head. 6 input channels split 2/2/2."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn1 = NormAct(6, nn.SiLU())
        self.mixed = MixedConv(NormAct(9, nn.SiLU()))
        self.fc = nn.Linear(9, 8)

    def forward(self, x):
        y = self.mixed(self.bn1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class TinyLevit(nn.Module):
    """Patch conv + BN, tokens through two LinearNorms, mean over tokens, NormLinear head."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 8, 4, stride=4, bias=False)
        self.patch_bn = nn.BatchNorm2d(8)
        self.ln1, self.act, self.ln2 = LinearNorm(8, 16), nn.Hardswish(), LinearNorm(16, 8)
        self.head = NormLinear(8, 6)

    def forward(self, x):
        tokens = self.patch_bn(self.patch(x)).flatten(2).transpose(1, 2)
        tokens = tokens + self.ln2(self.act(self.ln1(tokens)))
        return self.head(tokens.mean(1))


class TinyRepVgg(nn.Module):
    """Stem conv + BN, two RepVGG blocks (one grouped), pooled head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.block1, self.block2 = RepVggBlock(8), RepVggBlock(8, groups=2)
        self.fc = nn.Linear(8, 6)

    def forward(self, x):
        y = self.block2(self.block1(torch.relu(self.stem_bn(self.stem(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


class Offset(nn.Module):
    """Ill-conditioned on purpose: conv1's outputs ride on a constant of 1000 that bn1 takes off again, so float32
    keeps only about 1e-4 of the signal (its ulp at 1000 is 6e-5), in PyTorch as in any float32 runtime that
    computes the layers as written. bn2 sits before a zero-padded conv, so all three wrong folds apply."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.act = nn.PReLU(8)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 16, 16)
        with torch.no_grad():
            self.conv1.bias.add_(1000.0)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn3(self.conv2(self.bn2(y))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


def offset_model() -> nn.Module:
    """`Offset` with realistic BN statistics for 16x16 inputs."""
    torch.manual_seed(0)
    return realistic_bn(Offset(), size=(16, 16))


class OffsetKept(Offset):
    """`Offset` with the constant added after conv1 and a ReLU between it and bn1, so bn1 cannot fold and
    onnxruntime meets the same cancellation as PyTorch: the file is as far from float64 as PyTorch float32 is."""

    def __init__(self):
        super().__init__()
        with torch.no_grad():
            self.conv1.bias.sub_(1000.0)

    def forward(self, x):
        y = self.act(self.bn1(torch.relu(self.conv1(x) + 1000.0)))
        y = torch.relu(self.bn3(self.conv2(self.bn2(y))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(y, 4), 1))


def offset_kept_model() -> nn.Module:
    """`OffsetKept` with realistic BN statistics for 16x16 inputs."""
    torch.manual_seed(0)
    return realistic_bn(OffsetKept(), size=(16, 16))
