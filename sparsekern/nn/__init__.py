"""Sparse drop-in layers (DESIGN.md: nn/)."""
from .layers import SPARSE_LAYERS, SparseConv2d, SparseLayer, SparseLinear

__all__ = ["SparseConv2d", "SparseLinear", "SparseLayer", "SPARSE_LAYERS"]
