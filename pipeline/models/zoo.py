"""Built-in models sized for a 2-core CPU."""

from __future__ import annotations

from torch import nn

from .registry import MODELS


@MODELS.register("small-cnn")
def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Two conv blocks and a two-layer head: ~94% on mnist-5k after 8 epochs, ~1 s per epoch."""
    c, h, w = input_shape
    flat = 32 * (h // 4) * (w // 4)
    return nn.Sequential(
        nn.Conv2d(c, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, num_classes),
    )


@MODELS.register("lenet5")
def lenet5(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """LeCun et al. 1998, with ReLU and max-pooling, padded to fit 28x28 inputs."""
    c, h, w = input_shape
    fh, fw = (h // 2 - 4) // 2, (w // 2 - 4) // 2
    if fh < 1 or fw < 1:
        raise ValueError(f"lenet5 needs inputs of at least 12x12, got {h}x{w}")
    return nn.Sequential(
        nn.Conv2d(c, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * fh * fw, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )


class BasicBlock(nn.Module):
    """He et al. 2016: two 3x3 convolutions with BatchNorm and a residual add (1x1 projection when needed)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, widths=(32, 64, 128), blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for b in range(blocks):
                layers.append(BasicBlock(cin, w, 2 if i > 0 and b == 0 else 1))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@MODELS.register("resnet-small")
def resnet_small(input_shape: tuple[int, ...], num_classes: int, widths=(32, 64, 128), blocks: int = 2) -> nn.Module:
    """Three stages of basic residual blocks (6 blocks at widths 32/64/128: ~81 M MACs at 28x28)."""
    return SmallResNet(input_shape[0], num_classes, tuple(widths), blocks)


class InvertedResidual(nn.Module):
    """Sandler et al. 2018: 1x1 expand, 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
                   nn.ReLU6(), nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


@MODELS.register("mobilenetv2-small")
def mobilenetv2_small(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """A MobileNetV2-style net for small inputs: depthwise convolutions and inverted residuals."""

    def c(n: int) -> int:
        return max(8, int(round(n * width / 8)) * 8)

    config = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 1)]  # expand, channels, repeats, stride
    cin = c(16)
    layers: list[nn.Module] = [nn.Conv2d(input_shape[0], cin, 3, 1, 1, bias=False), nn.BatchNorm2d(cin), nn.ReLU6()]
    for t, ch, n, s in config:
        for i in range(n):
            layers.append(InvertedResidual(cin, c(ch), s if i == 0 else 1, t))
            cin = c(ch)
    last = c(128)
    layers += [nn.Conv2d(cin, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
               nn.Flatten(), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


# Real-scale architectures, defined in code with torchvision's layer shapes (and so its parameter counts); they
# take any input size (adaptive pooling), 224x224x3 being the one their published numbers are for.

#: the input each real-scale entry was designed for (CHW)
DEFAULT_INPUT_SHAPES = {"mobilenetv2": (3, 224, 224), "mobilenetv3-small": (3, 224, 224),
                        "resnet18": (3, 224, 224), "ds-cnn": (1, 49, 10)}


def make_divisible(v: float, divisor: int = 8) -> int:
    """torchvision's channel rounding: the nearest multiple of ``divisor``, never 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type | None = nn.ReLU6,
            **bn) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(cout, **bn)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class MobileNetV2(nn.Module):
    """Sandler et al. 2018, torchvision's layout (3,504,872 parameters at width 1.0 and 1000 classes)."""

    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]  # expand, channels, repeats, first stride

    def __init__(self, in_channels: int = 3, num_classes: int = 1000, width: float = 1.0, dropout: float = 0.2):
        super().__init__()
        cin, last = make_divisible(32 * width), make_divisible(1280 * max(1.0, width))
        layers: list[nn.Module] = [conv_bn(in_channels, cin, 3, 2)]
        for t, c, n, s in self.SETTING:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@MODELS.register("mobilenetv2")
def mobilenetv2(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0) -> nn.Module:
    """MobileNetV2 at 224x224 (any size works); ``width`` multiplies every layer's channels (0.35 ... 1.4)."""
    if not 0 < width <= 4:
        raise ValueError(f"width must be in (0, 4], got {width}")
    return MobileNetV2(input_shape[0], num_classes, width)


class SqueezeExcite(nn.Module):
    """Hu et al. 2018 as MobileNetV3 uses it: pooled 1x1 squeeze (ReLU) and excite (hard sigmoid) gates."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)
        self.relu, self.gate = nn.ReLU(), nn.Hardsigmoid()

    def forward(self, x):
        return x * self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class MobileNetV3Block(nn.Module):
    def __init__(self, cin: int, k: int, hidden: int, cout: int, se: bool, act: type, stride: int) -> None:
        super().__init__()
        bn = {"eps": 0.001, "momentum": 0.01}
        layers: list[nn.Module] = [] if hidden == cin else [conv_bn(cin, hidden, 1, act=act, **bn)]
        layers.append(conv_bn(hidden, hidden, k, stride, groups=hidden, act=act, **bn))
        if se:
            layers.append(SqueezeExcite(hidden, make_divisible(hidden // 4)))
        layers.append(conv_bn(hidden, cout, 1, act=None, **bn))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


@MODELS.register("mobilenetv3-small")
def mobilenetv3_small(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Howard et al. 2019, the small variant in torchvision's layout (2,542,856 parameters at 1000 classes)."""
    re, hs = nn.ReLU, nn.Hardswish
    setting = [(16, 3, 16, 16, True, re, 2), (16, 3, 72, 24, False, re, 2), (24, 3, 88, 24, False, re, 1),
               (24, 5, 96, 40, True, hs, 2), (40, 5, 240, 40, True, hs, 1), (40, 5, 240, 40, True, hs, 1),
               (40, 5, 120, 48, True, hs, 1), (48, 5, 144, 48, True, hs, 1), (48, 5, 288, 96, True, hs, 2),
               (96, 5, 576, 96, True, hs, 1), (96, 5, 576, 96, True, hs, 1)]  # in, k, expanded, out, SE, act, stride
    bn = {"eps": 0.001, "momentum": 0.01}
    return nn.Sequential(
        conv_bn(input_shape[0], 16, 3, 2, act=hs, **bn), *[MobileNetV3Block(*s) for s in setting],
        conv_bn(96, 576, 1, act=hs, **bn), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(576, 1024), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(1024, num_classes))


class ResNet18(nn.Module):
    """He et al. 2016, torchvision's resnet18 (11,689,512 parameters at 1000 classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for i, w in enumerate((64, 128, 256, 512)):
            blocks += [BasicBlock(cin, w, 2 if i > 0 else 1), BasicBlock(w, w, 1)]
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


@MODELS.register("resnet18")
def resnet18(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """ResNet-18 at 224x224 (any size of at least 32x32 works)."""
    return ResNet18(input_shape[0], num_classes)


@MODELS.register("ds-cnn")
def ds_cnn(input_shape: tuple[int, ...], num_classes: int, channels: int = 64, blocks: int = 4) -> nn.Module:
    """Keyword spotting on 49x10 MFCCs (Zhang et al. 2017, "Hello Edge", DS-CNN-S: ~24k parameters at 12
    classes): a 10x4 stride-2 convolution, four depthwise-separable 3x3 blocks, average pooling, one linear layer.
    Like the reference, every convolution keeps its bias before the BatchNorm."""
    def block(cin: int, cout: int, k, stride, groups: int = 1, pad=1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, pad, groups=groups), nn.BatchNorm2d(cout), nn.ReLU()]

    layers = block(input_shape[0], channels, (10, 4), 2, pad=(5, 1))
    for _ in range(blocks):
        layers += block(channels, channels, 3, 1, groups=channels) + block(channels, channels, 1, 1, pad=0)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, num_classes))
