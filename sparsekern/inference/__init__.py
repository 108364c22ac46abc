"""Sparse inference: CSR inference modules and ``convert`` (DESIGN.md, issue 6).

``convert(model, min_speedup=1.0, example_input=None)`` swaps each ``nn.Linear`` /
``nn.Conv2d`` for :class:`CSRLinear` / :class:`CSRConv1x1` / :class:`CSRConv2d` where measured faster; kernels in
``sparsekern.ops.spmm`` (``torch.ops.sparsekern.csr_mm``).
"""
from .convert import ConversionReport, LayerReport, convert
from .modules import CSRConv1x1, CSRConv2d, CSRLinear

__all__ = ["convert", "ConversionReport", "LayerReport", "CSRLinear", "CSRConv1x1", "CSRConv2d"]
