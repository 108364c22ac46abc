"""Sparse drop-in layers (DESIGN.md: nn/)."""
from .layers import SPARSE_LAYERS, SparseConv2d, SparseLinear

__all__ = ["SparseConv2d", "SparseLinear", "SPARSE_LAYERS"]
