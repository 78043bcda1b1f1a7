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
