"""Sparse weights in any module (docs/sparsify.md) and the drop-in sparse layers."""
from .layers import (SparseConv2d, SparseLayer, SparseLinear, SparseWeight, default_weights, prunable_weights,
                     raw_weights, sparse_weights)

__all__ = ["SparseConv2d", "SparseLinear", "SparseLayer", "SparseWeight", "default_weights", "prunable_weights",
           "raw_weights", "sparse_weights"]
