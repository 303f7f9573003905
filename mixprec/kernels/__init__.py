"""Kernels: pure functions on tensors (no modules, no config). Each has a torch reference.

Signatures the format layouts call on CUDA (x: [M, K] bf16/fp16 -> [M, N] in x.dtype):
  fp8_linear(x, weight, scale, block, act)                       fp8.py
  intq_linear(x, qweight, scales, zeros, perm, bits, group_size) intq.py
  int8_linear(x, weight, scale, zero, act)                       int8.py
"""
