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


def calibration_models(count: int, seed: int = 0) -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    """Small random networks, reproducible from ``seed``: plain CNNs, CNNs with residual blocks,
    depthwise-separable CNNs, MobileNetV2-style inverted residuals, and MLPs; widths include the odd
    ones structured pruning leaves, first layers vary in kernel size and stride."""
    rng = np.random.default_rng(seed)
    widths = [6, 8, 12, 16, 20, 24, 32, 40, 48, 64, 96]
    models = []
    for i in range(count):
        kind = ["cnn", "rescnn", "dwcnn", "invres", "mlp"][i % 5]
        torch.manual_seed(seed + i)
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
    from ..kernels import Kernel

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
    return out


class _Add(nn.Module):
    def forward(self, x):
        return x + x


def kernel_module(k) -> tuple[nn.Module, tuple[int, ...]]:
    if k.kind == "conv":
        m = nn.Sequential(nn.Conv2d(k.cin, k.cout, k.k, k.stride, k.k // 2, bias=False), nn.BatchNorm2d(k.cout),
                          nn.ReLU())
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
    return m.eval(), (k.cin, k.h, k.w)


def kernel_prefix(k) -> nn.Module:
    """A cheap first layer on the kernel's input: the kernel is then timed in context (the input already in
    the runtime's internal layout, as it is inside a network), as T(prefix + kernel) - T(prefix)."""
    if k.kind == "gemm":
        return nn.ReLU()
    return nn.Sequential(nn.Conv2d(k.cin, k.cin, 1, groups=k.cin, bias=False), nn.ReLU())
