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
