"""Sparse inference: eval-only sparse modules and ``convert`` (README "Quickstart: sparse inference").

``convert(model, min_speedup=1.0)`` swaps each ``nn.Linear`` / ``nn.Conv2d`` for the sparse
module (csr, block, nm or ck format; csr for grouped / depthwise convs) that a cost model ranks best and a short measurement
confirms faster than dense. Weight formats: ``formats``; the layers on the spmm ops
(``sparsekern.ops.spmm``): ``functional``. Large layer outputs (>= 8 MB) are reused once freed
(``functional.new_output``; ``empty_output_cache()`` releases them, ``SPARSEKERN_OUTPUT_CACHE_MB``
bounds them, default 2048 or an eighth of the RAM, 0 off); ``retain_freed_memory()`` keeps freed
memory in the heap (glibc), so smaller outputs cost no page faults either.
"""
from .convert import Candidate, ConversionReport, LayerReport, convert, rank_formats
from .functional import empty_output_cache, retain_freed_memory
from .fuse import SeparableMaxPool2d
from .modules import (BitmapConv1x1, BitmapLinear, BSRConv1x1, BSRLinear, CKConv2d, CSRConv1x1, CSRConv2d, CSRGroupConv2d,
                      CSRLinear, NMConv1x1, NMLinear, SemiStructuredLinear)

__all__ = ["convert", "rank_formats", "Candidate", "ConversionReport", "LayerReport",
           "CSRLinear", "CSRConv1x1", "CSRConv2d", "BSRLinear", "BSRConv1x1", "NMLinear", "NMConv1x1",
           "CKConv2d", "CSRGroupConv2d", "SemiStructuredLinear", "BitmapLinear", "BitmapConv1x1", "SeparableMaxPool2d",
           "empty_output_cache", "retain_freed_memory"]
