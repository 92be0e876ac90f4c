"""Test set-up: without a GPU, the Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, so it is set here,
before any test module imports linattn's kernels.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
