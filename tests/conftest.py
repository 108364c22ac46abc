"""Without a GPU, Triton kernels run on CPU tensors under the interpreter (set before triton loads)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
