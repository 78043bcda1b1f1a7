"""What calibration times: small random networks (whole models, reproducible from a seed) and single kernels
(random configurations spanning what small CNNs use, each as a module with a cheap prefix layer)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, relu: bool) -> None:
        super().__init__()
        self.body, self.relu = body, relu

    def forward(self, x):
        y = x + self.body(x)
        return torch.relu(y) if self.relu else y


class _SE(nn.Module):
    """Squeeze-and-excitation: the input scaled per channel by a gate computed from its spatial mean."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, max(c // 4, 4), 1), nn.ReLU(),
                                  nn.Conv2d(max(c // 4, 4), c, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.gate(x)


class _Ghost(nn.Module):
    """A ghost module's output: half the channels from the layer before, half from a cheap depthwise conv of them."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.cheap = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU())

    def forward(self, x):
        return torch.cat([x, self.cheap(x)], 1)


def _mbv3_block(rng, c: int, w: int, size: int) -> tuple[list[nn.Module], int]:
    """A MobileNetV3 / GhostNet-style block from ``c`` to ``w`` channels: a (sometimes grouped) 1x1 expansion and
    a depthwise convolution with Hardswish, sometimes squeeze-and-excitation, a 1x1 projection (sometimes half of
    it and a ghost concat), a residual add where the shapes allow; (its layers, its output size)."""
    e = c * int(rng.choice([2, 3, 4]))
    g = int(rng.choice([1, 1, 2, 4]))
    g = g if c % g == 0 and e % g == 0 else 1
    k, stride = int(rng.choice([3, 5])), int(rng.choice([1, 2])) if size > 7 else 1
    body: list[nn.Module] = [nn.Conv2d(c, e, 1, groups=g, bias=False), nn.BatchNorm2d(e), nn.Hardswish(),
                             nn.Conv2d(e, e, k, stride, k // 2, groups=e, bias=False), nn.BatchNorm2d(e),
                             nn.Hardswish()]
    if rng.random() < 0.6:
        body.append(_SE(e))
    ghost = w % 2 == 0 and rng.random() < 0.3
    body += [nn.Conv2d(e, w // 2 if ghost else w, 1, bias=False), nn.BatchNorm2d(w // 2 if ghost else w)]
    if ghost:
        body.append(_Ghost(w // 2))
    if stride == 1 and w == c:
        return [_Residual(nn.Sequential(*body), relu=False)], size
    return body, -(-size // stride)


def calibration_models(count: int, seed: int = 0) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Small random networks, reproducible from ``seed``: plain CNNs, CNNs with residual blocks,
    depthwise-separable CNNs, MobileNetV2-style inverted residuals, MobileNetV3-style blocks (Hardswish,
    squeeze-and-excitation, grouped and ghost layers) and MLPs; widths include the odd ones structured pruning
    leaves, first layers vary in kernel size and stride."""
    rng = np.random.default_rng(seed)
    widths = [6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96]
    models = []
    for i in range(count):
        kind = ["cnn", "rescnn", "dwcnn", "invres", "mlp", "mbse"][i % 6]
        torch.manual_seed(seed + i)
        if kind == "mbse":
            c = int(rng.choice([8, 12, 16, 24]))
            stride = int(rng.choice([1, 2]))
            layers = [nn.Conv2d(1, c, 3, stride, 1, bias=False), nn.BatchNorm2d(c), nn.Hardswish()]
            size = -(-28 // stride)
            for _ in range(int(rng.integers(2, 5))):
                w = int(rng.choice([8, 12, 16, 20, 24, 32, 40, 48]))
                block, size = _mbv3_block(rng, c, w, size)
                layers += block
                c = w
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
            models.append((f"mbse{i}", nn.Sequential(*layers).eval(), (1, 28, 28)))
            continue
        if kind == "mlp":
            dims = [int(d) for d in rng.choice([42, 64, 120, 128, 256, 512, 1024], size=rng.integers(2, 5))]
            layers: list[nn.Module] = [nn.Flatten()]
            cin = 28 * 28
            for d in dims:
                layers += [nn.Linear(cin, d), nn.ReLU()]
                cin = d
            models.append((f"mlp{i}", nn.Sequential(*layers, nn.Linear(cin, 10)).eval(), (1, 28, 28)))
            continue
        c, size = 1, 28
        layers = []
        if kind in ("rescnn", "invres"):
            c = int(rng.choice(widths))
            k, stride = int(rng.choice([3, 5])), int(rng.choice([1, 2]))
            layers += [nn.Conv2d(1, c, k, stride, k // 2, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            size = -(-size // stride)
        for _ in range(int(rng.integers(2, 5))):
            w = int(rng.choice(widths))
            if kind == "rescnn":
                body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                                     nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
                layers.append(_Residual(body, relu=True))
                if w != c:
                    layers += [nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            elif kind == "invres":
                e = c * int(rng.choice([2, 4, 6]))
                body = nn.Sequential(nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
                                     nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e), nn.ReLU6(),
                                     nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c))
                layers.append(_Residual(body, relu=False))
                if w != c:
                    layers += [nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w)]
            elif kind == "dwcnn" and c > 1:
                layers += [nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU6(),
                           nn.Conv2d(c, w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU6()]
            else:
                k = int(rng.choice([1, 3, 5]))
                layers += [nn.Conv2d(c, w, k, padding=k // 2, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
            c = w
            if size > 7 and rng.random() < 0.6:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10)]
        models.append((f"{kind}{i}", nn.Sequential(*layers).eval(), (1, 28, 28)))
    return models


_CH = [1, 3, 8, 12, 16, 24, 32, 40, 48, 64, 80, 88, 96, 128, 160, 192]
_DW = [16, 24, 32, 48, 64, 72, 96, 128, 144, 192, 256, 384]
_FC_IN = [64, 84, 120, 128, 256, 400, 512, 784, 1024, 1568, 2048]
_FC_OUT = [10, 32, 64, 84, 120, 128, 256, 512]
_PW = [6, 11, 16, 20, 24, 40, 44, 64, 72, 96, 120, 144, 192, 240, 320]


def kernel_configs(seed: int = 0, scale: float = 1) -> list:
    """Random single-kernel configurations spanning what small CNNs and their pruned versions use, and the
    larger inputs of 224-pixel networks. ``scale`` multiplies every family's count (each keeps one at least);
    the families are drawn in a fixed order from one stream, so a family added at the end leaves the earlier
    ones as they were."""
    from ..kernels import ELTWISE_OPS, Kernel

    rng = np.random.default_rng(seed)
    pick = lambda xs: int(rng.choice(xs))  # noqa: E731
    n = lambda count: max(1, round(count * scale))  # noqa: E731
    out = []
    for _ in range(n(140)):
        h = pick([28, 28, 14, 14, 7, 4])
        k = pick([1, 3, 3, 5])
        out.append(Kernel("conv", False, pick(_CH), pick(_CH[2:]), k, pick([1, 1, 2]) if h >= 14 else 1, h, h))
    # first layers: one or three input channels on a full-size input, every output width including the odd
    # ones structured pruning leaves (their int8 kernels are im2col-bound and much slower than MACs say)
    for _ in range(n(30)):
        h = pick([28, 28, 14])
        out.append(Kernel("conv", False, pick([1, 1, 3]), pick([3, 4, 6, 8, 12, 16, 24, 32, 48, 64]),
                          pick([3, 5, 5, 7]), pick([1, 1, 2]), h, h))
    for _ in range(n(20)):  # pruned widths in the body
        h = pick([14, 10, 7, 4])
        out.append(Kernel("conv", False, pick([3, 5, 6, 8, 11, 12, 20, 24]), pick([4, 6, 8, 11, 12, 16, 20, 24]),
                          pick([3, 5]), 1, h, h))
    for _ in range(n(50)):
        h = pick([28, 14, 14, 7, 4])
        c = pick(_DW)
        out.append(Kernel("dwconv", False, c, c, 3, pick([1, 1, 2]) if h >= 14 else 1, h, h))
    for _ in range(n(50)):
        out.append(Kernel("gemm", False, pick(_FC_IN), pick(_FC_OUT), 1, 1, 1, 1))
    for _ in range(n(15)):  # the small heads of pruned networks
        out.append(Kernel("gemm", False, pick([42, 60, 64, 100, 200, 392, 400]), pick([10, 21, 42, 60, 64]), 1, 1, 1, 1))
    for _ in range(n(25)):
        h = pick([28, 14, 10, 7])
        c = pick(_CH[2:])
        out.append(Kernel("pool", False, c, c, 2, 2, h, h))
    for _ in range(n(20)):
        h = pick([7, 4, 2, 1])
        c = pick(_CH[4:] + [256, 384])
        out.append(Kernel("gpool", False, c, c, 1, 1, h, h))
    for _ in range(n(25)):
        h = pick([28, 14, 7, 4])
        c = pick(_CH[4:])
        out.append(Kernel("add", False, c, c, 1, 1, h, h))
    for _ in range(n(40)):  # pointwise (1x1) convolutions at the widths pruning and expansion leave
        h = pick([56, 28, 28, 14, 14, 7])
        out.append(Kernel("conv", False, pick(_PW), pick(_PW), 1, 1, h, h))
    for _ in range(n(25)):  # depthwise at odd (pruned) widths, 5x5, and the large inputs of 224-pixel networks
        h = pick([112, 56, 56, 28, 14, 7])
        c = pick([20, 40, 56, 88, 120, 144, 200, 240] if h <= 56 else [16, 24, 32, 48])
        out.append(Kernel("dwconv", False, c, c, pick([3, 3, 5]), pick([1, 2]) if h >= 14 else 1, h, h))
    for _ in range(n(10)):  # first layers of 224-pixel networks: three channels, stride 2
        h = pick([224, 112])
        out.append(Kernel("conv", False, 3, pick([8, 16, 24, 32]), 3, 2, h, h))
    # the body of 128- to 224-pixel networks and their pruned versions: dense 3x3 convolutions on large inputs at
    # widths that are multiples of 8 (structured pruning's round_to), the stride-2 ones and 1x1 shortcuts
    for _ in range(n(32)):
        h = pick([112, 64, 56, 56, 40, 32, 28, 28])
        widths = [16, 24, 32, 40, 48] if h > 64 else [16, 24, 32, 40, 48, 56, 64, 72, 80, 96, 112, 128]
        out.append(Kernel("conv", False, pick(widths), pick(widths), 3, pick([1, 1, 2]), h, h))
    for _ in range(n(16)):  # wide layers on small inputs (the last stages of ResNets and VGGs)
        h = pick([14, 10, 7, 5])
        out.append(Kernel("conv", False, pick([144, 176, 192, 256, 272, 336, 352, 512]),
                          pick([144, 176, 192, 256, 272, 336, 352, 512]), pick([1, 3, 3]), pick([1, 1, 2]), h, h))
    for _ in range(n(8)):
        h = pick([56, 40, 28, 14])
        out.append(Kernel("conv", False, pick([32, 48, 64, 96, 128, 256]), pick([64, 96, 128, 176, 256, 512]), 1, 2,
                          h, h))
    # widths on either side of every channel block a runtime may compute in (4, 8, 16): what the fit chooses the
    # class's block from (``block.choose_block``)
    odd = [10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 32, 34, 36, 40, 42, 44, 48, 50, 52, 56, 60, 64, 72, 80, 88, 96,
           104, 112, 120, 128]
    for _ in range(n(36)):
        h = pick([56, 28, 28, 14])
        out.append(Kernel("conv", False, pick(odd), pick(odd), pick([1, 3]), 1, h, h))
    for _ in range(n(16)):
        h = pick([56, 28, 14])
        c = pick([24, 40, 56, 72, 88, 104, 120, 136, 184, 232, 36, 44, 18, 26, 42, 50, 66, 100])
        out.append(Kernel("dwconv", False, c, c, pick([3, 5]), pick([1, 2]), h, h))
    for _ in range(n(16)):  # grouped convolutions (ghost and grouped 1x1 layers)
        g = pick([2, 4, 8])
        h = pick([80, 40, 28, 20, 14])
        out.append(Kernel("conv", False, g * pick([2, 3, 4, 6, 8, 12, 20]), g * pick([4, 6, 8, 12, 20, 40]),
                          pick([1, 1, 3]), 1, h, h, groups=g))
    # elementwise ops no runtime fuses, the common ones (Hardswish, SE scales, products, concats) most often
    ops = [op for op in ELTWISE_OPS for _ in range(3 if op in ("hardswish", "bcast") else
                                                     2 if op in ("mul", "concat") else 1)]
    for _ in range(n(60)):
        h = pick([112, 80, 56, 40, 28, 20, 14, 10, 7])
        c = pick([16, 24, 40, 48, 72, 96, 120, 160, 240, 576] if h <= 56 else [16, 24, 32, 48])
        out.append(Kernel("eltwise", False, c, c, 1, 1, h, h, op=ops[pick(range(len(ops)))]))
    for _ in range(n(6)):  # 7x7 and 5x5 stride-2 stems
        h = pick([224, 160, 128])
        out.append(Kernel("conv", False, 3, pick([16, 32, 48, 64]), pick([5, 7]), 2, h, h))
    for _ in range(n(6)):  # classifiers of 224-pixel networks: weights streamed from memory
        out.append(Kernel("gemm", False, pick([512, 576, 840, 960, 1024, 1280]), pick([1000, 1024, 1280]), 1, 1, 1, 1))
    return out


class _Add(nn.Module):
    def forward(self, x):
        return x + x


class _Eltwise(nn.Module):
    """One elementwise op on a ``c``-channel input (see ``kernels.ELTWISE_OPS``): ``bcast`` scales it by a per-channel
    vector computed from it (not a constant, which a runtime would fold into the convolution before it), ``concat``
    joins it with itself."""

    def __init__(self, op: str) -> None:
        super().__init__()
        self.op = op

    def forward(self, x):
        if self.op == "hardswish":
            return nn.functional.hardswish(x)
        if self.op == "hardsigmoid":
            return nn.functional.hardsigmoid(x)
        if self.op == "sigmoid":
            return torch.sigmoid(x)
        if self.op == "act":
            return torch.tanh(x)
        if self.op == "mul":
            return x * x
        if self.op == "bcast":
            return x * x[:, :, :1, :1]
        return torch.cat([x, x], 1)  # a concat's kernel is its output: its input has half the channels


def _in_channels(k) -> int:
    return k.cin // 2 if k.kind == "eltwise" and k.op == "concat" else k.cin


def kernel_module(k) -> tuple[nn.Module, tuple[int, ...]]:
    if k.kind == "conv":
        m = nn.Sequential(nn.Conv2d(k.cin, k.cout, k.k, k.stride, k.k // 2, groups=k.groups, bias=False),
                          nn.BatchNorm2d(k.cout), nn.ReLU())
    elif k.kind == "eltwise":
        m = _Eltwise(k.op)
    elif k.kind == "dwconv":
        m = nn.Sequential(nn.Conv2d(k.cin, k.cin, k.k, k.stride, k.k // 2, groups=k.cin, bias=False),
                          nn.BatchNorm2d(k.cin), nn.ReLU6())
    elif k.kind == "gemm":
        return nn.Sequential(nn.Flatten(), nn.Linear(k.cin, k.cout), nn.ReLU()).eval(), (k.cin, 1, 1)
    elif k.kind == "pool":
        m = nn.MaxPool2d(k.k, k.stride)
    elif k.kind == "gpool":
        m = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    else:
        m = _Add()
    return m.eval(), (_in_channels(k), k.h, k.w)


def kernel_suffix(k, after: bool) -> nn.Module | None:
    """A cheap last layer after an elementwise kernel (``after``: on the kernel's output; else on its input, for
    the prefix's file), so that the kernel sits between two convolutions as it does in a network: what it costs in
    context then includes leaving the runtime's blocked layout and entering it again (onnxruntime's NCHWc reorders;
    an int8 graph's Q/DQ around a float op), which the output of a file alone would hide. None for other kinds."""
    if k.kind != "eltwise":
        return None
    c = k.cout if after else _in_channels(k)
    return nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.ReLU())


def kernel_prefix(k) -> nn.Module:
    """A cheap first layer on the kernel's input: the kernel is then timed in context (the input already in
    the runtime's internal layout, as it is inside a network), as T(prefix + kernel) - T(prefix)."""
    if k.kind == "gemm":
        return nn.ReLU()
    c = _in_channels(k)
    return nn.Sequential(nn.Conv2d(c, c, 1, groups=c, bias=False), nn.ReLU())
