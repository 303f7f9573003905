"""Qwen3-MoE sparse block with experts grouped into buckets of equal format.

Each expert projection (gate / up / down) arrives as its own Packed, possibly in a different
format from its neighbours. `finalize()` groups them: all experts whose projection has the same
(proj, layout, params, dtypes) go into one `ExpertBucket` holding one stacked Packed [E_b, ...],
so a single grouped kernel launch per bucket serves them. When an expert's gate and up agree
and their layout can concatenate along N, they become one "gate_up" projection (gate rows first).

Routing (softmax in fp32 over E, top-k, renormalise, cast to x dtype) is shared by every path.
`moe_reference` is the plain per-expert loop every kernel is tested against.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import MissingWeight, MixprecError, ShapeMismatch
from ..formats.base import Packed, apply, dequant, use_kernels
from ..kernels.moe import (MOE_ACT_DTYPES, ROUTER_FUSED_MAX_M, fused_moe, half_cover, norm_router_route, router_route,
                           topk_lowest_id, up_launches)
from .linear import bucket_key, cat_n, same_scale

PROJS = ("gate", "up", "down")
_ORDER = {"gate_up": 0, "gate": 1, "up": 2, "down": 3}


def route(x: Tensor, router_w: Tensor, top_k: int, renorm: bool) -> tuple[Tensor, Tensor]:
    """x [T, H], router_w [E, H] -> (topk_w [T, k] in x.dtype, topk_ids [T, k] int64).
    Logits in the activation dtype (like transformers), softmax in fp32; ties to the lower expert."""
    probs = torch.softmax(F.linear(x, router_w.to(x.dtype)).float(), dim=-1)   # [T, E]
    topk_w, topk_ids = topk_lowest_id(probs, top_k)
    if renorm:
        topk_w = topk_w / topk_w.sum(dim=-1, keepdim=True)
    return topk_w.to(x.dtype), topk_ids


def moe_reference(x: Tensor, router_w: Tensor, experts_fn: Callable[[int], Callable[[Tensor], Tensor]],
                  top_k: int, renorm: bool, experts=None) -> Tensor:
    """The spec: x [T, H] -> [T, H]. `experts_fn(e)` returns expert e's MLP, a function
    [n, H] -> [n, H] (e.g. `MoE.expert_fn`). Weighted sum accumulated in fp32. `experts`: the
    experts that contribute (default all; expert parallel: the rank's own, whose partial sums
    the ranks add)."""
    topk_w, topk_ids = route(x, router_w, top_k, renorm)
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(router_w.shape[0]) if experts is None else experts:
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = experts_fn(e)(x[tok])
        out.index_add_(0, tok, y.float() * topk_w[tok, slot, None].float())
    return out.to(x.dtype)


def _kernel_params(w: Packed) -> dict:
    """FP8 W8A8 quantizes activations per 128 inputs; weight blocks narrower than that along K
    (small fixtures, TP shards) run W8A16 instead, as the dense fp8 layout does."""
    p = dict(w.params)
    if w.layout == "fp8" and p.get("act") == "w8a8" and p["block"][1] < w.k and p["block"][1] % 128:
        p["act"] = "w8a16"
    return p


def _release(w: Packed) -> None:
    """Drop a Packed's buffers (the caller handed ownership to the MoE layer)."""
    for nm in list(w.tensors()):
        delattr(w, nm)


def _stack_consume(ws: list[Packed], where: str) -> Packed:
    """Like formats.base.stack, but frees each expert's buffers once copied, so the layer never
    holds per-expert copies next to the stack longer than needed."""
    k0 = bucket_key(ws[0])
    first = ws[0].tensors()
    out = {nm: torch.empty((len(ws), *t.shape), dtype=t.dtype, device=t.device) for nm, t in first.items()}
    meta = (ws[0].layout, ws[0].n, ws[0].k, dict(ws[0].params), ws[0].source)
    for i, w in enumerate(ws):
        if bucket_key(w) != k0:
            raise ShapeMismatch(f"{where}: cannot stack {w.extra_repr()} with {ws[0].extra_repr()}")
        for nm, t in w.tensors().items():
            out[nm][i].copy_(t)
        _release(w)
    layout, n, k, params, source = meta
    return Packed(layout, n, k, out, params, source)


class ExpertBucket(nn.Module):
    """Experts sharing one projection format.

    proj: "gate_up" | "gate" | "up" | "down"
    experts [E_b] int64: global expert ids, ascending; expert_map [E] int32: global id -> local
    index, -1 when absent; w: Packed stack, every buffer [E_b, ...], n/k of one expert (gate_up:
    n = 2*I, gate rows first); input_scale [E_b, K] or None (folded-norm correction, see Linear).
    """

    def __init__(self, proj: str, experts: list[int], num_experts: int, w: Packed,
                 input_scale: Tensor | None = None):
        super().__init__()
        self.proj = proj
        dev = next(iter(w.tensors().values())).device
        self.register_buffer("experts", torch.tensor(experts, dtype=torch.long, device=dev), persistent=False)
        emap = torch.full((num_experts,), -1, dtype=torch.int32)
        emap[torch.tensor(experts, dtype=torch.long)] = torch.arange(len(experts), dtype=torch.int32)
        self.register_buffer("expert_map", emap.to(dev), persistent=False)
        self.identity = experts == list(range(num_experts))    # the kernels then skip the map
        self.w = w
        self.register_buffer("input_scale", input_scale, persistent=False)

    def extra_repr(self) -> str:
        return f"{self.proj}: {len(self.experts)} experts"


class Router(nn.Module):
    """`mlp.gate`: weight [E, H], kept unquantized (plain tensor)."""

    def __init__(self, num_experts: int, hidden: int, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("weight", torch.empty(num_experts, hidden, dtype=dtype, device=device))


class MoE(nn.Module):
    """Qwen3MoeSparseMoeBlock. `name` is the HF prefix (e.g. "model.layers.1.mlp") for messages."""

    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renorm: bool,
                 dtype: torch.dtype, device, name: str = "mlp"):
        super().__init__()
        self.H, self.I, self.E, self.top_k, self.renorm = hidden, intermediate, num_experts, top_k, renorm
        self.name = name
        self.gate = Router(num_experts, hidden, dtype, device)
        self._pending: dict[tuple[int, str], tuple[Packed, Tensor | None]] = {}
        self.buckets = nn.ModuleList()
        self.finalized = False
        # expert parallel: the experts this process holds (global ids; others route to no bucket)
        self.local_experts: tuple[int, ...] = tuple(range(num_experts))

    # -- loading ---------------------------------------------------------------------------
    def _shape(self, proj: str) -> tuple[int, int]:
        return (self.H, self.I) if proj == "down" else (self.I, self.H)

    def set_expert(self, e: int, proj: str, w: Packed, input_scale: Tensor | None = None) -> None:
        """Expert e's `proj` ("gate" | "up" | "down") weight. The layer takes ownership: finalize()
        frees the given Packed's buffers once they are stacked."""
        where = f"{self.name}.experts.{e}.{proj}_proj"
        if self.finalized:
            raise MixprecError(f"{where}: layer already finalized")
        if proj not in PROJS:
            raise MixprecError(f"{self.name}: unknown expert projection {proj!r}, expected one of {PROJS}")
        if not 0 <= e < self.E:
            raise ShapeMismatch(f"{where}: expert index out of range, the layer has {self.E} experts")
        if len(self.local_experts) != self.E and e not in self.local_experts:
            raise MixprecError(f"{where}: expert {e} is not held by this process (expert parallel)")
        if (w.n, w.k) != self._shape(proj):
            raise ShapeMismatch(f"{where}: weight is [{w.n}x{w.k}], expected {list(self._shape(proj))}")
        if input_scale is not None and tuple(input_scale.shape) != (w.k,):
            raise ShapeMismatch(f"{where}: input_scale shape {tuple(input_scale.shape)}, expected ({w.k},)")
        self._pending[(e, proj)] = (w, input_scale)

    def missing(self) -> list[str]:
        if self.finalized:
            return []
        return [f"{self.name}.experts.{e}.{p}_proj" for e in self.local_experts for p in PROJS
                if (e, p) not in self._pending]

    def finalize(self) -> None:
        """Fuse gate+up where possible and stack experts into buckets. Raises MissingWeight."""
        if self.finalized:
            return
        miss = self.missing()
        if miss:
            raise MissingWeight(f"{self.name}: {len(miss)} expert weights not set: " + ", ".join(miss))
        items: list[tuple[str, int, Packed, Tensor | None]] = []
        for e in self.local_experts:
            (g, sg), (u, su) = self._pending.pop((e, "gate")), self._pending.pop((e, "up"))
            gu = cat_n([g, u]) if same_scale([sg, su]) else None
            if gu is not None:
                _release(g)
                _release(u)
                items.append(("gate_up", e, gu, sg))
            else:
                items += [("gate", e, g, sg), ("up", e, u, su)]
            d, sd = self._pending.pop((e, "down"))
            items.append(("down", e, d, sd))
        groups: dict[tuple, list[tuple[int, Packed, Tensor | None]]] = {}
        for proj, e, w, s in items:
            # experts with different folded-norm corrections (sources) go to different buckets:
            # the fused kernel applies one correction per launch
            skey = None if s is None else s.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
            groups.setdefault((proj, bucket_key(w), skey), []).append((e, w, s))
        for (proj, _, skey), members in sorted(groups.items(), key=lambda kv: (_ORDER[kv[0][0]], kv[1][0][0])):
            experts = [e for e, _, _ in members]
            scale = torch.stack([s for _, _, s in members]) if skey is not None else None
            w = _stack_consume([w for _, w, _ in members], f"{self.name} {proj} experts {experts}")
            self.buckets.append(ExpertBucket(proj, experts, self.E, w, scale))
        self.finalized = True

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """x [..., H] -> [..., H]."""
        shape = x.shape
        x = x.reshape(-1, self.H)
        if self._fast(x):
            y = self._experts_fast(x, *router_route(x, self.gate.weight, self.top_k, self.renorm))
        else:
            topk_w, topk_ids = route(x, self.gate.weight, self.top_k, self.renorm)
            y = self._forward_buckets(x, topk_ids, topk_w)
        return self.finish(y.reshape(shape))

    def finish(self, y: Tensor) -> Tensor:
        """The layer's output from what this module's experts computed (ParallelMoE: the sum over
        ranks)."""
        return y

    def forward_norm(self, norm: nn.Module, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(self(norm(x + residual)), x + residual): the decoder's post-attention step. At decode
        sizes on the kernel path the add + norm run inside the router's launch (one launch fewer)."""
        x2 = x.reshape(-1, self.H)
        if 0 < x2.shape[0] <= ROUTER_FUSED_MAX_M and self._fast(x2):
            topk_w, topk_ids, y, h = norm_router_route(x2, residual.reshape(-1, self.H), norm.weight, norm.eps,
                                                       self.gate.weight, self.top_k, self.renorm)
            return self.finish(self._experts_fast(y, topk_w, topk_ids).reshape(x.shape)), h.reshape(x.shape)
        y, h = norm(x, residual)
        return self(y), h

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_kb", None)      # .to()/.half() replace the tensors the cached views point at
        return super()._apply(fn, recurse)

    def _kernel_buckets(self) -> list[dict] | None:
        """The buckets as the fused kernel takes them (views of the stacked tensors, built once,
        with the gate/up launches and each launch's folded-norm input scale), or None when the
        kernel cannot apply the layer's input scales: such a layer runs the readable path."""
        if not hasattr(self, "_kb"):
            maps: list[Tensor] = []

            def shared(m: Tensor) -> Tensor:   # equal expert maps as one object (kernels.moe.grouped_fits)
                same = next((u for u in maps if torch.equal(u, m)), None)
                if same is None:
                    maps.append(m)
                return m if same is None else same

            self._kb = [{"proj": b.proj, "layout": b.w.layout, "params": _kernel_params(b.w),
                         "tensors": b.w.tensors(), "expert_map": shared(b.expert_map),
                         "identity": b.identity} for b in self.buckets]
            launches = self._scaled_launches()
            if launches is None:
                warnings.warn(f"{self.name}: experts whose folded-scale (AWQ) input corrections differ within "
                              f"one bucket, or between an expert's gate and up, or on down_proj, run on the "
                              f"reference MoE path (slower, not CUDA-graph capturable)")
                self._kb = None
            else:
                self._up_groups, self._up_scales = launches
        return self._kb

    def _scaled_launches(self) -> tuple[list[list[int]], list[Tensor | None]] | None:
        """Gate/up launches (bucket indices) and the input scale [H] each applies to x, or None.
        A source's folded-norm correction is one vector per layer, so the buckets of one source
        share it: buckets are split by scale, each part into launches (host syncs: once)."""
        parts: dict[int, list[int]] = {}
        scales: list[Tensor] = []
        for i, b in enumerate(self.buckets):
            s = b.input_scale
            if b.proj == "down":
                if s is not None:
                    return None
                continue
            if s is None:
                key = -1
            else:
                if not bool((s == s[0]).all()):
                    return None
                key = next((j for j, t in enumerate(scales) if torch.equal(t, s[0])), None)
                if key is None:
                    scales.append(s[0])
                    key = len(scales) - 1
            parts.setdefault(key, []).append(i)
        groups, group_scales = [], []
        for key, idx in parts.items():
            sub = [self._kb[i] for i in idx]
            if not torch.equal(half_cover(sub, "gate", self.E), half_cover(sub, "up", self.E)):
                return None                   # an expert's gate and up carry different corrections
            for g in up_launches(sub):
                groups.append([idx[j] for j in g])
                group_scales.append(None if key < 0 else scales[key])
        return groups, group_scales

    def _fast(self, x: Tensor) -> bool:
        """Whether the fused kernels run this layer on x (else the readable per-bucket path)."""
        return use_kernels(x) and x.dtype in MOE_ACT_DTYPES and self._kernel_buckets() is not None

    def _experts_fast(self, x: Tensor, topk_w: Tensor, topk_ids: Tensor) -> Tensor:
        """The grouped expert kernels over all buckets (CUDA, no host sync) for x [T, H] routed to
        topk_ids with weights topk_w [T, k]."""
        up_x = [x if s is None else x * s.to(x.dtype) for s in self._up_scales]
        return fused_moe(x, topk_ids, topk_w, self._kernel_buckets(), self.I, up_groups=self._up_groups,
                         up_x=up_x)

    def _forward_buckets(self, x: Tensor, topk_ids: Tensor, topk_w: Tensor) -> Tensor:
        """Readable path (any device; host syncs): per bucket, per expert, gather its routed
        (token, slot) rows and run the layout's `apply`. Rows r = t * top_k + slot."""
        T, K = topk_ids.shape
        ids = topk_ids.reshape(-1)                                   # [T*K]
        G = x.new_zeros(T * K, self.I)
        U = x.new_zeros(T * K, self.I)
        Y = x.new_zeros(T * K, self.H)

        def rows_of(b: ExpertBucket):
            local = b.expert_map[ids]                                # [T*K], -1 = other bucket
            for i in range(len(b.experts)):
                r = (local == i).nonzero().squeeze(1)
                if r.numel():
                    yield i, r

        def run(b: ExpertBucket, i: int, inp: Tensor) -> Tensor:
            if b.input_scale is not None:
                inp = inp * b.input_scale[i].to(inp.dtype)
            return apply(inp, b.w.select(i))

        for b in self.buckets:
            if b.proj == "down":
                continue
            for i, r in rows_of(b):
                y = run(b, i, x[r // K])
                if b.proj == "gate_up":
                    G[r], U[r] = y[:, : self.I], y[:, self.I:]
                else:
                    (G if b.proj == "gate" else U)[r] = y
        A = F.silu(G) * U                                            # [T*K, I]
        for b in self.buckets:
            if b.proj == "down":
                for i, r in rows_of(b):
                    Y[r] = run(b, i, A[r])
        out = (Y.view(T, K, self.H).float() * topk_w[..., None].float()).sum(1)
        return out.to(x.dtype)

    # -- reference -------------------------------------------------------------------------
    def expert_weights(self, e: int) -> dict[str, tuple[Packed, Tensor | None]]:
        """Expert e's weights as views into the buckets: proj -> (Packed, input_scale [K] | None)."""
        out = {}
        for b in self.buckets:
            i = int(b.expert_map[e])
            if i >= 0:
                out[b.proj] = (b.w.select(i), None if b.input_scale is None else b.input_scale[i])
        return out

    def expert_fn(self, e: int) -> Callable[[Tensor], Tensor]:
        """Expert e's MLP computed from `dequant` (pure torch): the argument `moe_reference` takes."""
        ws = self.expert_weights(e)
        if not ws:
            raise MixprecError(f"{self.name}: expert {e} is not held by this process "
                               f"(it holds {len(self.local_experts)} of {self.E} experts)")

        def lin(x: Tensor, proj: str) -> Tensor:
            w, s = ws[proj]
            if s is not None:
                x = x * s.to(x.dtype)
            return F.linear(x, dequant(w).to(x.dtype))

        def mlp(x: Tensor) -> Tensor:
            if "gate_up" in ws:
                g, u = lin(x, "gate_up").split(self.I, dim=-1)
            else:
                g, u = lin(x, "gate"), lin(x, "up")
            return lin(F.silu(g) * u, "down")
        return mlp

    def reference(self, x: Tensor) -> Tensor:
        """moe_reference over this layer's own (bucketed) weights, its experts' sum completed as
        `forward` completes it (`finish`: over ranks in parallel). x [..., H]."""
        y = moe_reference(x.reshape(-1, self.H), self.gate.weight, self.expert_fn, self.top_k, self.renorm,
                          experts=self.local_experts)
        return self.finish(y.reshape(x.shape))

    def named_packed(self) -> dict[str, Packed]:
        """{"<name>.buckets.<i>.<proj>": stacked Packed} after finalize."""
        return {f"{self.name}.buckets.{i}.{b.proj}": b.w for i, b in enumerate(self.buckets)}
