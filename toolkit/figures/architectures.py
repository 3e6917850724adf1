"""The two networks of Vepakomma et al.'s table, as cuttable ``nn.Sequential`` models: VGG-16
(Simonyan & Zisserman, 2015) and ResNet-50 (He, Zhang, Ren, Sun, 2016) in their CIFAR form (32x32
inputs: a 3x3 stem of stride 1 and no max-pool for ResNet, one linear classifier after the conv
stack for VGG). ``width`` scales every channel count (1.0: the published networks; smaller: tiny
stand-ins for smoke runs). Named layers (``conv1_1``, ``relu1_1``, ..., ``stem``, ``layer1``, ...)
are cut points for :func:`toolkit.models.cut`.
"""
from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from toolkit import validate

VGG16 = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))  # conv widths per block
RESNET50 = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))  # (bottleneck width, blocks, stride) per stage


def _channels(c: int, width: float) -> int:
    return max(1, round(c * width))


def vgg16(*, n_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """VGG-16 for 32x32 images: 13 3x3 convolutions with ReLU in five blocks, each block ending in
    a 2x2 max-pool (``pool1`` ... ``pool5``), then ``flatten`` and ``fc`` (512 -> classes).
    14,719,818 parameters at width 1 with 10 classes."""
    validate.positive_int("n_classes", n_classes)
    validate.positive("width", width)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for b, block in enumerate(VGG16, start=1):
        for i, c in enumerate(block, start=1):
            c_out = _channels(c, width)
            layers[f"conv{b}_{i}"] = nn.Conv2d(c_in, c_out, 3, padding=1)
            layers[f"relu{b}_{i}"] = nn.ReLU()
            c_in = c_out
        layers[f"pool{b}"] = nn.MaxPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c_in, n_classes)  # 32x32 in, 1x1 after five pools
    return nn.Sequential(layers)


class Bottleneck(nn.Module):
    """ResNet's bottleneck block: 1x1 (reduce), 3x3 (stride), 1x1 (expand x4), batch norm after
    each, plus the identity or a 1x1 projection shortcut, then ReLU."""

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = 4 * width
        self.body = nn.Sequential(
            nn.Conv2d(c_in, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out else
                         nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.body(x) + self.shortcut(x))


def resnet50(*, n_classes: int = 100, in_channels: int = 3, width: float = 1.0) -> nn.Sequential:
    """ResNet-50 for 32x32 images: ``stem`` (3x3 conv, batch norm, ReLU), ``layer1`` ... ``layer4``
    (3, 4, 6, 3 bottlenecks), ``pool`` (global average), ``flatten``, ``fc``. 23,705,252
    parameters at width 1 with 100 classes (CIFAR-100)."""
    validate.positive_int("n_classes", n_classes)
    validate.positive("width", width)
    stem = _channels(64, width)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["stem"] = nn.Sequential(nn.Conv2d(in_channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem),
                                   nn.ReLU())
    c_in = stem
    for s, (w, blocks, stride) in enumerate(RESNET50, start=1):
        w = _channels(w, width)
        stage = []
        for i in range(blocks):
            stage.append(Bottleneck(c_in, w, stride if i == 0 else 1))
            c_in = 4 * w
        layers[f"layer{s}"] = nn.Sequential(*stage)
    layers["pool"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(c_in, n_classes)
    return nn.Sequential(layers)


ARCHITECTURES = {"vgg16": vgg16, "resnet50": resnet50}
