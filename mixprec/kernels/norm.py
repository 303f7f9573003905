"""RMSNorm in one launch, optionally with the residual add in front of it (the decoder's
`h = x + residual; y = norm(h)`), rounding like Qwen3RMSNorm: normalise in fp32, cast to the
activation dtype, then multiply by the weight. Reference: layers/norm.py `rms_norm`."""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import pdl
from .ints import next_power_of_2


@triton.jit
def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, h_ptr, D, eps,
                     ADD: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    pdl.launch_dependents(PDL)   # the linear after a norm may start now and prefetch its weights
    row = tl.program_id(0).to(tl.int64) * D
    cols = tl.arange(0, BLOCK)
    m = cols < D
    w = tl.load(w_ptr + cols, mask=m, other=0.0)   # a weight: read before the wait, off the x -> y path
    pdl.wait(PDL)     # from here on, what earlier kernels wrote is visible
    x = tl.load(x_ptr + row + cols, mask=m, other=0.0)
    if ADD:
        # rounded to the activation dtype, as the torch add is, before the norm reads it
        x = (x.to(tl.float32) + tl.load(r_ptr + row + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(h_ptr + row + cols, x, mask=m)
    xf = x.to(tl.float32)
    n = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)).to(x.dtype)
    tl.store(y_ptr + row + cols, (w.to(tl.float32) * n.to(tl.float32)).to(y_ptr.dtype.element_ty), mask=m)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None):
    """x [..., D] -> y [..., D]; with `residual`: h = x + residual, returns (norm(h), h)."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    y = torch.empty_like(x2)
    h = torch.empty_like(x2) if residual is not None else y
    r2 = residual.reshape(-1, D).contiguous() if residual is not None else x2
    if x2.shape[0]:
        block = next_power_of_2(D)
        _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, y, h, D, eps, ADD=residual is not None, BLOCK=block,
                                          num_warps=min(8, max(1, block // 256)), **pdl.launch_kw(x2))
    if residual is None:
        return y.view(x.shape)
    return y.view(x.shape), h.view(x.shape)
