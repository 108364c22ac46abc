"""Weight-shape suites of real networks: every prunable weight (Conv2d and Linear, first conv and
classifier included, SPEC §0), in model order. Totals match the papers' parameter counts minus
biases and norms: ResNet-50 25,502,912 (of 25.56 M), MobileNetV1 4,209,088 (of 4.23 M)."""
import math

import torch


def resnet50():
    """The 54 weights of torchvision's ResNet-50 (v1.5: stride on the 3×3 conv; shapes only)."""
    shapes = [(64, 3, 7, 7)]
    inplanes = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            shapes += [(width, inplanes, 1, 1), (width, width, 3, 3), (4 * width, width, 1, 1)]
            if b == 0:
                shapes.append((4 * width, inplanes, 1, 1))  # downsample projection
            inplanes = 4 * width
    return shapes + [(1000, 2048)]


def mobilenet_v1():
    """The 28 weights of MobileNetV1 (width 1.0, 224): stem conv, 13 × (depthwise 3×3,
    pointwise 1×1), classifier."""
    shapes = [(32, 3, 3, 3)]
    for cin, cout in ((32, 64), (64, 128), (128, 128), (128, 256), (256, 256), (256, 512),
                      *[(512, 512)] * 5, (512, 1024), (1024, 1024)):
        shapes += [(cin, 1, 3, 3), (cout, cin, 1, 1)]
    return shapes + [(1000, 1024)]


SUITES = {"resnet50": resnet50, "mobilenet_v1": mobilenet_v1}
#: Prunable parameter counts the suites must reproduce.
TOTALS = {"resnet50": 25_502_912, "mobilenet_v1": 4_209_088}


def numel(shapes):
    return sum(math.prod(s) for s in shapes)


def make_weights(shapes, dtype=torch.float32, device="cpu", seed=0):
    """Seeded weights like a trained net's: ``randn · sqrt(2 / fan_in)`` per layer (He init)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in shapes:
        fan_in = math.prod(s[1:])
        w = torch.randn(s, generator=gen) * math.sqrt(2.0 / fan_in)
        out.append(w.to(device=device, dtype=dtype))
    return out


#: STR's learnt per-layer sparsity budget of a 90 % sparse ResNet-50 on ImageNet-1K: Table 7 of
#: Kusupati et al., "Soft Threshold Weight Reparameterization for Learnable Sparsity" (ICML 2020,
#: appendix A.3; ``shared/papers/000_91591e9701e9bc56.txt``), STR column. Rows in the table's
#: (model) order: (module name, weight elements as the table lists them, sparsity in %).
#: Where the extracted text lost the decimal point (9496, 9486, 9536, 9499) it is restored.
#: The table's totals: overall 90.23 % of 25,502,912 weights, backbone (all but fc) 92.47 % of
#: 23,454,912; :data:`STR_RESNET50_90_TOTALS` and the tests check the rows against both.
STR_RESNET50_90 = (
    ("conv1", 9408, 59.80),
    ("layer1.0.conv1", 4096, 83.28), ("layer1.0.conv2", 36864, 89.48),
    ("layer1.0.conv3", 16384, 85.80), ("layer1.0.downsample.0", 16384, 83.34),
    ("layer1.1.conv1", 16384, 89.89), ("layer1.1.conv2", 36864, 90.60),
    ("layer1.1.conv3", 16384, 91.70),
    ("layer1.2.conv1", 16384, 88.07), ("layer1.2.conv2", 36864, 87.03),
    ("layer1.2.conv3", 16384, 90.99),
    ("layer2.0.conv1", 32768, 85.95), ("layer2.0.conv2", 147456, 93.91),
    ("layer2.0.conv3", 65536, 93.13), ("layer2.0.downsample.0", 131072, 94.96),
    ("layer2.1.conv1", 65536, 95.31), ("layer2.1.conv2", 147456, 91.50),
    ("layer2.1.conv3", 65536, 93.66),
    ("layer2.2.conv1", 65536, 94.61), ("layer2.2.conv2", 147456, 94.86),
    ("layer2.2.conv3", 65536, 93.38),
    ("layer2.3.conv1", 65536, 93.26), ("layer2.3.conv2", 147456, 93.21),
    ("layer2.3.conv3", 65536, 94.14),
    ("layer3.0.conv1", 131072, 88.85), ("layer3.0.conv2", 589824, 96.14),
    ("layer3.0.conv3", 262144, 93.19), ("layer3.0.downsample.0", 524288, 97.20),
    ("layer3.1.conv1", 262144, 95.36), ("layer3.1.conv2", 589824, 95.06),
    ("layer3.1.conv3", 262144, 94.84),
    ("layer3.2.conv1", 262144, 96.77), ("layer3.2.conv2", 589824, 95.59),
    ("layer3.2.conv3", 262144, 94.99),
    ("layer3.3.conv1", 262144, 96.08), ("layer3.3.conv2", 589824, 96.10),
    ("layer3.3.conv3", 262144, 94.94),
    ("layer3.4.conv1", 262144, 95.49), ("layer3.4.conv2", 589824, 95.66),
    ("layer3.4.conv3", 262144, 94.49),
    ("layer3.5.conv1", 262144, 95.09), ("layer3.5.conv2", 589824, 94.92),
    ("layer3.5.conv3", 262144, 93.14),
    ("layer4.0.conv1", 524288, 90.32), ("layer4.0.conv2", 2359296, 95.66),
    ("layer4.0.conv3", 1048576, 91.14), ("layer4.0.downsample.0", 2097152, 96.79),
    ("layer4.1.conv1", 1048576, 93.69), ("layer4.1.conv2", 2359296, 93.98),
    ("layer4.1.conv3", 1048576, 90.48),
    ("layer4.2.conv1", 1048576, 87.57), ("layer4.2.conv2", 2359296, 84.37),
    ("layer4.2.conv3", 1048576, 80.29),
    ("fc", 2048000, 64.50),
)
#: Table 7's totals for the STR budget: (weights, sparsity %) overall and for the backbone (no fc).
STR_RESNET50_90_TOTALS = {"overall": (25_502_912, 90.23), "backbone": (23_454_912, 92.47)}


def budget_sparsity(budget, exclude=()):
    """``(weights, sparsity %)`` of a budget's layers (minus the names in ``exclude``): the
    weight-weighted mean of the per-layer sparsities."""
    rows = [(n, p, s) for n, p, s in budget if n not in exclude]
    total = sum(p for _, p, _ in rows)
    return total, sum(p * s for _, p, s in rows) / total


#: STR's learnt per-layer budget of a ~89 % sparse MobileNetV1 on ImageNet-1K: Table 8 of
#: Kusupati et al. (ICML 2020, appendix A.4; ``shared/papers/000_91591e9701e9bc56.txt``), STR
#: column, rows as ``STR_RESNET50_90`` with ``bench.models.mobilenet_v1``'s module names (table
#: layer k = ``features.{k-1}.0``, layer 28 = ``fc``); layer 8's "4436" restored to 44.36.
#: The table's overall sparsity: 89.01 % of 4,209,088.
STR_MOBILENET_V1_89 = tuple(
    (f"features.{i}.0" if i < 27 else "fc", n, s) for i, (n, s) in enumerate((
        (864, 69.10), (288, 69.10), (2048, 93.70), (576, 62.50), (8192, 93.25), (1152, 63.45),
        (16384, 92.19), (1152, 44.36), (32768, 94.65), (2304, 63.76), (65536, 94.91), (2304, 53.43),
        (131072, 96.86), (4608, 67.93), (262144, 97.25), (4608, 78.43), (262144, 96.71), (4608, 77.00),
        (262144, 95.40), (4608, 74.22), (262144, 93.52), (4608, 62.02), (262144, 90.64), (4608, 53.78),
        (524288, 92.23), (9216, 40.89), (1048576, 91.76), (1024000, 76.81)))
)
