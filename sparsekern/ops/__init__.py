"""The op surface: ``torch.ops.sparsekern.*`` registrations and validated public functions."""
from .masks import block_mask, ck_mask, intra_mask, masked_weight, nm_mask, prune_fc_inputs, window_mask
from .bound import asl_threshold, gaussian_bound, gaussian_bounds
from .select import global_magnitude_threshold, magnitude_thresholds
from .threshold import hard_threshold, power_threshold, soft_threshold, st3_threshold, str_threshold

__all__ = ["soft_threshold", "str_threshold", "st3_threshold", "power_threshold", "hard_threshold",
           "global_magnitude_threshold", "magnitude_thresholds",
           "gaussian_bound", "gaussian_bounds", "asl_threshold",
           "nm_mask", "window_mask", "ck_mask", "intra_mask", "block_mask", "prune_fc_inputs",
           "masked_weight"]
