"""Test setup. Without CUDA, Triton kernels run in its CPU interpreter (logic tests only:
its bf16 arithmetic is wrong, so interpreter tests use fp16/fp32). The variable must be set
before any kernel module is imported, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
