"""ImageNet ResNet-50 (v1.5) and MobileNetV1 in plain torch (no torchvision), 1000 classes, 224×224.

For parameter/FLOP accounting (SPEC §8, ``sk.count_flops``) and benchmarks. Build them on the meta
device when only shapes matter: ``with torch.device("meta"): model = resnet50()``.
Prunable parameters (Conv2d + Linear weights, SPEC §0): ResNet-50 25,502,912, MobileNetV1 4,209,088.
"""
from torch import Tensor, nn


class Bottleneck(nn.Module):
    """1×1 → 3×3 (stride here: v1.5, as torchvision) → 1×1 (×4 channels), BN after each conv,
    projection shortcut (1×1 conv + BN) when the shape changes."""

    def __init__(self, inplanes: int, width: int, stride: int = 1):
        super().__init__()
        out = 4 * width
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return self.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 v1.5 with torchvision's module names (conv1, layer1.0.conv1, …, fc)."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = 64
        for i, (width, blocks) in enumerate(((64, 3), (128, 4), (256, 6), (512, 3))):
            stages = []
            for b in range(blocks):
                stages.append(Bottleneck(inplanes, width, 2 if b == 0 and i > 0 else 1))
                inplanes = 4 * width
            setattr(self, f"layer{i + 1}", nn.Sequential(*stages))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    """MobileNetV1, width 1.0: stem 3×3/2 conv, 13 × (depthwise 3×3 + pointwise 1×1), global
    average pool, classifier (as in the STR code: BN + ReLU after every conv, no conv bias)."""

    #: (in, out, stride of the depthwise conv) of the 13 separable blocks
    BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
              *[(512, 512, 1)] * 5, (512, 1024, 2), (1024, 1024, 1))

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        layers = [_conv_bn(3, 32, 3, 2)]
        for cin, cout, stride in self.BLOCKS:
            layers += [_conv_bn(cin, cin, 3, stride, groups=cin), _conv_bn(cin, cout, 1, 1)]
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(1024, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.avgpool(self.features(x)).flatten(1))


def resnet50(num_classes: int = 1000) -> ResNet50:
    return ResNet50(num_classes)


def mobilenet_v1(num_classes: int = 1000) -> MobileNetV1:
    return MobileNetV1(num_classes)


MODELS = {"resnet50": resnet50, "mobilenet_v1": mobilenet_v1}


def prune_to_budget_(model: nn.Module, budget) -> nn.Module:
    """Magnitude-prune ``model`` in place to a per-layer budget: rows ``(module name, weight
    elements, sparsity %)`` as ``bench.suites.STR_RESNET50_90``; each named Conv2d/Linear weight keeps
    its entries with ``|w|`` above its exact ``sparsity``-quantile (``sk.magnitude_thresholds``,
    one call for all layers). Returns ``model``."""
    import torch

    import sparsekern as sk

    weights = []
    for name, numel, _ in budget:
        w = model.get_submodule(name).weight
        if w.numel() != numel:
            raise ValueError(f"budget row {name!r}: {numel} weights, the model's has {w.numel()}")
        weights.append(w)
    with torch.no_grad():
        thresholds = sk.magnitude_thresholds([w.detach() for w in weights], [s / 100 for _, _, s in budget])
        for w, t in zip(weights, thresholds):
            w.mul_(w.abs() > t)
    return model
