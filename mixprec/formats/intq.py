"""The canonical grouped-integer layout `intq` (int4 / int8) that GPTQ, AWQ and
compressed-tensors pack-quantized all load into, plus the helpers those formats share:
int32 bit packing, an RTN group quantizer (fixtures), and `make_intq` (codes -> Packed).

    qweight [R/pf, N] int32   stored row r*pf+i in bits bits*i.. of word row r (unsigned codes)
    scales  [ceil(R/G), N]    fp16 / bf16, scale of stored row j is scales[j // G]
    zeros   [ceil(R/G), N]    uint8 true zero points; absent = symmetric (zero 2^(bits-1))
    perm    [R] int32         act-order only: stored row j multiplies x[:, perm[j]]
    W[n, perm[j]] = scales[j // G, n] * (q[j, n] - zeros[j // G, n])
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FormatError, ParallelError
from .base import Layout, Packed, register_layout, shard_range, sub_blocks, use_kernels

BITS = (4, 8)
SCALE_DTYPES = (torch.float16, torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pack_int32(codes: Tensor, bits: int, dim: int, order: list[int] | None = None) -> Tensor:
    """Unsigned codes (< 2^bits) -> int32 words packed along `dim`: field i (bits bits*i..) of
    word j holds element j*pf + order[i] (order = identity unless given, e.g. AWQ's interleave).
    The packed dim is zero-padded to a multiple of pf = 32 // bits."""
    pf = 32 // bits
    c = codes.movedim(dim, -1)
    c = torch.nn.functional.pad(c, (0, (-c.shape[-1]) % pf)).reshape(*c.shape[:-1], -1, pf)
    order = list(range(pf)) if order is None else order
    words = c[..., order[0]].to(torch.int32)
    for i in range(1, pf):   # torch's int32 << wraps into the sign bit, as the format wants
        words |= c[..., order[i]].to(torch.int32) << (bits * i)
    return words.movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, dim: int, size: int, order: list[int] | None = None) -> Tensor:
    """Inverse of pack_int32 -> uint8 codes with `size` elements along `dim`. Words are read as
    unsigned: arithmetic shift of the int32, then mask."""
    pf = 32 // bits
    w = words.movedim(dim, -1)
    src = range(pf) if order is None else [order.index(j) for j in range(pf)]   # element j <- field src[j]
    f = torch.stack([((w >> (bits * i)) & ((1 << bits) - 1)).to(torch.uint8) for i in src], dim=-1)
    return f.reshape(*w.shape[:-1], -1)[..., :size].movedim(-1, dim)


def natural_gidx(k: int, group_size: int, device=None) -> Tensor:
    return torch.arange(k, device=device) // group_size


def rtn_int(W: Tensor, bits: int, group_size: int, sym: bool, g_idx: Tensor | None = None,
            scale_dtype: torch.dtype = torch.float16, zero_in_range: bool = True) -> dict[str, Tensor]:
    """Round-to-nearest group quantization of W [N, K] (fixtures; not GPTQ's error feedback).

    Group of input k is g_idx[k] (default k // G); every group holds G inputs (the last may be
    short). sym: scale = 2*amax/(2^b-1), zero 2^(b-1) (GPTQ's and compressed-tensors' symmetric
    rule). asym: scale = (max-min)/(2^b-1), zero = round(-min/scale); zero_in_range widens
    [min, max] to include 0 as GPTQ / compressed-tensors do (AWQ does not). Codes use the scale as
    stored (rounded to scale_dtype). Runs on W's device.
    Returns codes [K, N] uint8, scales [ngroups, N] scale_dtype, zeros [ngroups, N] uint8,
    g_idx [K] int32."""
    n, k = W.shape
    dev, maxq, G = W.device, 2 ** bits - 1, group_size
    ng = -(-k // G)
    natural = natural_gidx(k, G, dev)
    g = natural if g_idx is None else g_idx.to(dev).long()
    order = None if g_idx is None else torch.argsort(g, stable=True)
    if order is not None and not torch.equal(g[order], natural):
        raise FormatError(f"rtn_int: g_idx does not sort into {ng} groups of {G} inputs")
    Wt = W.float().t()                                                    # [K, N]
    rows = Wt if order is None else Wt[order]                             # group-sorted
    if k % G:   # short last group: repeat its last row (min / max unchanged), cut off below
        rows = rows[torch.arange(ng * G, device=dev).clamp(max=k - 1)]
    blk = rows.reshape(ng, G, n)                                          # [ng, G, N]
    mx, mn = blk.amax(1), blk.amin(1)
    if sym:
        scale = (2 * torch.maximum(mx.abs(), mn.abs()).clamp(min=1e-5) / maxq).to(scale_dtype)
        zero = torch.full((ng, n), 2 ** (bits - 1), dtype=torch.float32, device=dev)
    else:
        if zero_in_range:
            mn, mx = mn.clamp(max=0), mx.clamp(min=0)
        scale = ((mx - mn).clamp(min=1e-5) / maxq).to(scale_dtype)
        zero = (-torch.round(mn / scale.float())).clamp(0, maxq)
    q = (torch.round(blk / scale.float()[:, None]) + zero[:, None]).clamp(0, maxq).to(torch.uint8)
    q = q.reshape(ng * G, n)[:k]
    if order is not None:   # back to natural input order
        q = torch.empty_like(q).index_copy_(0, order, q)
    return {"codes": q, "scales": scale, "zeros": zero.to(torch.uint8), "g_idx": g.to(torch.int32)}


def act_order_gidx(W: Tensor, group_size: int, perm: Tensor | None = None,
                   seed: int | None = None) -> tuple[Tensor, Tensor]:
    """GPTQ desc_act: inputs are quantized in the order `perm` and grouped in that order:
    g_idx[perm[i]] = i // G. -> (g_idx, perm). perm default: random from `seed` when given, else
    GPTQ's "most important first" order with the column norms of W [N, K] standing in for the
    Hessian diagonal (no calibration data in fixtures)."""
    k = W.shape[1]
    if perm is None:
        perm = (torch.randperm(k, generator=torch.Generator().manual_seed(seed)) if seed is not None
                else torch.argsort(W.float().square().sum(0), descending=True, stable=True))
    perm = torch.as_tensor(perm).long().cpu()
    if not torch.equal(torch.sort(perm).values, torch.arange(k)):
        raise FormatError(f"act-order perm is not a permutation of range({k})")
    g_idx = torch.empty(k, dtype=torch.long)
    g_idx[perm] = torch.arange(k) // group_size
    return g_idx.to(torch.int32).to(W.device), perm.to(W.device)


def make_intq(codes: Tensor | None, scales: Tensor, zeros: Tensor | None, g_idx: Tensor | None, bits: int,
              group_size: int, n: int, k: int, source: str, where: str, qweight: Tensor | None = None,
              g_name: str = "g_idx") -> Packed:
    """Canonical Packed from codes [K, N] (natural input order) or, when the checkpoint already
    stores them that way (GPTQ), `qweight` [K/pf, N]; scales / true zeros [ceil(K/G), N] and an
    optional g_idx [K]. Zeros that are all 2^(bits-1) are dropped (symmetric). A non-trivial g_idx
    must sort into contiguous groups of G (the last may be short): rows are then stored in that
    order with `perm`."""
    ng = cdiv(k, group_size)
    if scales.dtype not in SCALE_DTYPES:
        raise FormatError(f"{where}: scales dtype {scales.dtype}, expected float16 or bfloat16")
    perm = None
    if g_idx is not None:
        g = g_idx.long()
        if int(g.min()) < 0 or int(g.max()) >= ng:
            raise FormatError(f"{where}.{g_name}: values in [{int(g.min())}, {int(g.max())}], expected groups 0..{ng - 1}")
        natural = natural_gidx(k, group_size, g.device)
        if not torch.equal(g, natural):
            perm = torch.sort(g, stable=True).indices
            if not torch.equal(g[perm], natural):
                counts = torch.bincount(g, minlength=ng)
                raise FormatError(f"{where}.{g_name}: groups hold {counts.tolist()} inputs; expected {ng} groups of "
                                  f"{group_size} (last may be short) so rows can be stored sorted by group")
            codes = (unpack_int32(qweight, bits, 0, k) if codes is None else codes)[perm]
            qweight = None
    if zeros is not None and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None
    if qweight is None:
        qweight = pack_int32(codes, bits, 0)
    tensors = {"qweight": qweight.contiguous(), "scales": scales.contiguous(),
               "zeros": None if zeros is None else zeros.to(torch.uint8).contiguous(),
               "perm": None if perm is None else perm.to(torch.int32)}
    return Packed("intq", n, k, tensors, {"bits": bits, "group_size": group_size}, source)


def stored_rows(w: Packed) -> int:
    return w.perm.shape[-1] if "perm" in w.tensors() else w.k


def row_zeros(t: dict[str, Tensor], bits: int) -> Tensor:
    """True zero points [..., ngroups, N] as float (2^(bits-1) when symmetric)."""
    if t.get("zeros") is not None:
        return t["zeros"].float()
    return torch.full(t["scales"].shape, float(2 ** (bits - 1)), device=t["scales"].device)


@register_layout
class IntQLayout(Layout):
    name = "intq"

    def dequant(self, w: Packed) -> Tensor:
        bits, G = w.params["bits"], w.params["group_size"]
        R = stored_rows(w)
        q = unpack_int32(w.qweight, bits, -2, R).float()                         # [..., R, N]
        s = w.scales.float().repeat_interleave(G, dim=-2)[..., :R, :]
        z = row_zeros(w.tensors(), bits).repeat_interleave(G, dim=-2)[..., :R, :]
        rows = s * (q - z)
        if "perm" in w.tensors():   # back to input order; padding rows are exact zeros
            idx = w.perm.long().unsqueeze(-1).expand(rows.shape)
            rows = torch.zeros(*rows.shape[:-2], w.k, w.n, device=rows.device).scatter_add_(-2, idx, rows)
        return rows.transpose(-1, -2)                                            # [..., N, K]

    def apply(self, x: Tensor, w: Packed) -> Tensor:
        if use_kernels(x):
            from ..kernels.intq import intq_linear
            t = w.tensors()
            x2, perm = x.reshape(-1, w.k), t.get("perm")
            if perm is not None and perm.shape[-1] != w.k:
                # padded act-order K shard (R > K rows): the kernel takes K = R, so gather here
                x2, perm = x2.index_select(1, perm), None
            y = intq_linear(x2, w.qweight, w.scales, t.get("zeros"), perm, w.params["bits"], w.params["group_size"])
            return y.reshape(*x.shape[:-1], w.n)
        return torch.nn.functional.linear(x, self.dequant(w).to(x.dtype))

    def cat_n(self, ws: list[Packed]) -> Packed | None:
        w0, t0 = ws[0], ws[0].tensors()
        for w in ws[1:]:
            t = w.tensors()
            if (w.k != w0.k or w.params != w0.params or t["scales"].dtype != t0["scales"].dtype
                    or t["qweight"].shape[-2] != t0["qweight"].shape[-2] or ("perm" in t) != ("perm" in t0)
                    or ("perm" in t and not torch.equal(t["perm"], t0["perm"]))):
                return None
        out = {"qweight": torch.cat([w.qweight for w in ws], dim=-1),
               "scales": torch.cat([w.scales for w in ws], dim=-1)}
        if any("zeros" in w.tensors() for w in ws):   # a symmetric part gets explicit zeros (exact)
            out["zeros"] = torch.cat([row_zeros(w.tensors(), w.params["bits"]).to(torch.uint8) for w in ws], dim=-1)
        if "perm" in t0:
            out["perm"] = t0["perm"]
        return Packed("intq", sum(w.n for w in ws), w0.k, out, w0.params, w0.source)

    def shard(self, w: Packed, dim: str, rank: int, world: int) -> Packed:
        """N split: columns of qweight / scales / zeros; perm unchanged.

        K split without perm: the rank keeps rows k0:k1 (k0 and K/world must be multiples of
        pf); a group straddling two ranks is cut into sub-groups of gcd(G, k0, K/world) with its
        scale / zero row replicated (e.g. K=768, G=128, TP4: group 64, rank 1 gets rows [1, 2, 2]).

        K split with perm (act-order): the rank keeps the stored rows whose ORIGINAL input index
        lies in k0:k1, in stored (group-sorted) order, with perm made local. Groups then hold
        uneven counts, so every group is padded to G' = the most kept rows of any group (rounded
        up to pf) with rows whose codes equal their zero point (exactly 0 after dequant; perm
        entry 0); scales / zeros stay whole (all original groups, in order). For a stack the
        same G' is used for every expert. Costs up to ~1.5x the rank's share for random perms."""
        a, b = shard_range(w, dim, rank, world)
        t = w.tensors()
        if dim == "n":
            out = {name: (x if name == "perm" else x[..., a:b].contiguous()) for name, x in t.items()}
            return Packed("intq", b - a, w.k, out, w.params, w.source)
        bits, G = w.params["bits"], w.params["group_size"]
        pf = 32 // bits
        if "perm" in t:
            return _shard_k_perm(w, a, b)
        if (b - a) % pf:
            raise ParallelError(f"{w.extra_repr()}: K={w.k} over {world} ranks gives {b - a} rows per rank, "
                                f"not a multiple of {pf} (rows per int32 word)")
        g2, idx = sub_blocks(G, w.k, a, b - a)
        out = {"qweight": w.qweight[..., a // pf:b // pf, :].contiguous(),
               "scales": w.scales[..., idx, :].contiguous()}
        if "zeros" in t:
            out["zeros"] = w.zeros[..., idx, :].contiguous()
        return Packed("intq", w.n, b - a, out, {**w.params, "group_size": g2}, w.source)


def _shard_k_perm(w: Packed, a: int, b: int) -> Packed:
    """Act-order K shard (see IntQLayout.shard)."""
    bits, G = w.params["bits"], w.params["group_size"]
    pf = 32 // bits
    stacked = w.qweight.dim() == 3
    t = {name: (x if stacked else x.unsqueeze(0)) for name, x in w.tensors().items()}
    R, ng = t["perm"].shape[-1], t["scales"].shape[-2]
    perm = t["perm"].long()                                                   # [E, R]
    keep = (perm >= a) & (perm < b)
    grp = torch.arange(R) // G
    counts = torch.stack([torch.bincount(grp[m], minlength=ng) for m in keep])  # [E, ng]
    g2 = max(pf, cdiv(int(counts.max()), pf) * pf)
    # new row r = group r // g2, slot r % g2; the slot's source row (or -1: padding)
    src = torch.full((len(keep), ng * g2), -1, dtype=torch.long)
    for e, m in enumerate(keep):
        rows = torch.nonzero(m).squeeze(1)                                    # group-sorted
        slot = torch.arange(len(rows)) - torch.searchsorted(grp[rows], grp[rows], right=False)
        src[e, grp[rows] * g2 + slot] = rows
    pad = src < 0
    codes = unpack_int32(t["qweight"], bits, -2, R)                           # [E, R, N]
    zr = row_zeros(t, bits).to(torch.uint8)                                  # [E, ng, N]
    new_grp = (torch.arange(ng * g2) // g2).expand_as(src)
    gathered = torch.gather(codes, 1, src.clamp(min=0).unsqueeze(-1).expand(-1, -1, w.n))
    padcodes = torch.gather(zr, 1, new_grp.unsqueeze(-1).expand(-1, -1, w.n))
    codes = torch.where(pad.unsqueeze(-1), padcodes, gathered)
    new_perm = torch.where(pad, 0, torch.gather(perm, 1, src.clamp(min=0)) - a)
    out = {"qweight": pack_int32(codes, bits, 1), "scales": t["scales"], "perm": new_perm.to(torch.int32)}
    if "zeros" in t:
        out["zeros"] = t["zeros"]
    if not stacked:
        out = {name: x[0] for name, x in out.items()}
    return Packed("intq", w.n, b - a, {n_: x.contiguous() for n_, x in out.items()},
                  {**w.params, "group_size": g2}, w.source)
