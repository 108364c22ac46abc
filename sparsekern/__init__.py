"""sparsekern: fused kernels for sparse training and sparse inference in PyTorch.

See README.md for the API; the math of every op is in docs/methods.md (SPEC §n, cited per function).
"""
from . import _ext, reference  # noqa: F401  (_ext loads the C++ kernels or warns)
from .ops import asl_threshold, gaussian_bound, gaussian_bounds
from .ops import block_mask, ck_mask, intra_mask, masked_weight, nm_mask, prune_fc_inputs, window_mask
from .ops.masks import pack_mask, unpack_mask
from .ops import global_magnitude_threshold, magnitude_thresholds
from .ops import hard_threshold, power_threshold, soft_threshold, st3_threshold, str_threshold
from . import nn  # noqa: E402  (layers call the ops above)
from . import inference  # noqa: E402
from .flops import FlopReport, count_flops
from .losses import AdaptiveSparsityLoss
from .schedules import CubicSchedule
from .sparsifier import Sparsifier, sparsify

__version__ = "0.1.0"

__all__ = [
    "soft_threshold", "str_threshold", "st3_threshold", "power_threshold", "hard_threshold",
    "global_magnitude_threshold", "magnitude_thresholds",
    "nm_mask", "window_mask", "ck_mask", "intra_mask", "block_mask", "prune_fc_inputs", "masked_weight",
    "pack_mask", "unpack_mask",
    "gaussian_bound", "gaussian_bounds", "asl_threshold",
    "nn", "inference", "sparsify", "Sparsifier", "CubicSchedule",
    "AdaptiveSparsityLoss", "count_flops", "FlopReport",
]
