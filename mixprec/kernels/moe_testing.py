"""Random MoE layers in the kernel layouts, for tests and benchmarks (not checkpoint packers:
codes and scales are drawn directly in each layout, so the reference dequant of the same tensors
is the ground truth).

A layer is described per expert by three specs (gate, up, down); a spec is a short name from
SPECS or a (layout, params) pair. Experts whose gate and up specs agree share a gate_up bucket.
"""
from __future__ import annotations

import torch
from torch import Tensor

SPECS = {
    "bf16": ("dense", {}),
    "fp16": ("dense", {}),
    "fp8": ("fp8", {"block": (128, 128), "act": "w8a8"}),
    "fp8_w8a16": ("fp8", {"block": (128, 128), "act": "w8a16"}),
    "fp8_ch": ("fp8", {"block": (1, -1), "act": "w8a16"}),  # per-channel: bk = K
    "fp8_ch_w8a8": ("fp8", {"block": (1, -1), "act": "w8a8"}),
    "int4": ("intq", {"bits": 4, "group_size": 128}),
    "int4_g32": ("intq", {"bits": 4, "group_size": 32}),
    "int4_asym": ("intq", {"bits": 4, "group_size": 128, "zeros": True}),
    "int4_perm": ("intq", {"bits": 4, "group_size": 128, "perm": True}),
    "int8q": ("intq", {"bits": 8, "group_size": 128}),
    "int8": ("int8", {"act": "w8a8"}),
    "int8_w8a16": ("int8", {"act": "w8a16"}),
    "int8_zp": ("int8", {"act": "w8a16", "zero": True}),
}


def _spec(s) -> tuple[str, dict]:
    return SPECS[s] if isinstance(s, str) else s


def _key(spec) -> tuple:
    layout, params = _spec(spec)
    return (layout, tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in params.items())))


def random_weights(layout: str, params: dict, e: int, n: int, k: int, dtype: torch.dtype, device,
                   gen: torch.Generator) -> tuple[dict[str, Tensor], dict]:
    """e experts of [n, k] in `layout`, scaled so that y = W x has unit-ish variance for x ~ N(0, 1).
    Returns (tensors, kernel params) (params with test-only flags removed)."""
    amp = k ** -0.5

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    if layout == "dense":
        return {"weight": (rnd(e, n, k) * amp).to(dtype)}, {}
    if layout == "fp8":
        bn, bk = params["block"]
        bn, bk = (n if bn == -1 else bn), (k if bk == -1 else bk)
        w = rnd(e, n, k).clamp(-8, 8).to(torch.float8_e4m3fn)
        s = (torch.rand(e, -(-n // bn), -(-k // bk), generator=gen, device=device) + 0.5) * amp
        return {"weight": w, "scale": s}, {"block": (bn, bk), "act": params["act"]}
    if layout == "int8":
        w = torch.randint(-127, 128, (e, n, k), generator=gen, device=device, dtype=torch.int8)
        s = (torch.rand(e, n, 1, generator=gen, device=device) + 0.5) * amp / 64
        t = {"weight": w, "scale": s}
        if params.get("zero"):
            t["zero"] = torch.randint(-8, 9, (e, n, 1), generator=gen, device=device).float()
        return t, {"act": params["act"]}
    bits, G = params["bits"], params["group_size"]
    pf = 32 // bits
    qw = torch.randint(-2 ** 31, 2 ** 31, (e, k // pf, n), generator=gen, device=device, dtype=torch.int64)
    t = {"qweight": qw.to(torch.int32),
         "scales": ((torch.rand(e, -(-k // G), n, generator=gen, device=device) + 0.5)
                    * amp * 2.0 / (1 << (bits - 1))).to(dtype)}
    if params.get("zeros"):
        t["zeros"] = torch.randint(0, 1 << bits, (e, -(-k // G), n), generator=gen, device=device,
                                   dtype=torch.int32).to(torch.uint8)
    if params.get("perm"):
        t["perm"] = torch.stack([torch.randperm(k, generator=gen, device=device) for _ in range(e)]).to(torch.int32)
    return t, {"bits": bits, "group_size": G}


def build_buckets(specs: list[tuple], hidden: int, inter: int, *, dtype=torch.bfloat16, device="cpu",
                  seed: int = 0) -> list[dict]:
    """specs[e] = (gate, up, down) spec of expert e -> bucket dicts (fused_moe's input)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    E = len(specs)
    groups: dict[tuple, list[int]] = {}
    spec_of: dict[tuple, tuple] = {}
    for e, (g, u, d) in enumerate(specs):
        if _key(g) == _key(u):
            key = ("gate_up",) + _key(g)
            groups.setdefault(key, []).append(e)
            spec_of[key] = _spec(g)
        else:
            for proj, s in (("gate", g), ("up", u)):
                key = (proj,) + _key(s)
                groups.setdefault(key, []).append(e)
                spec_of[key] = _spec(s)
        key = ("down",) + _key(d)
        groups.setdefault(key, []).append(e)
        spec_of[key] = _spec(d)
    buckets = []
    maps: dict[tuple, torch.Tensor] = {}   # buckets of the same experts share one map (as layers/moe.py)
    for key, experts in groups.items():
        proj = key[0]
        layout, params = spec_of[key]
        n, k = {"gate_up": (2 * inter, hidden), "gate": (inter, hidden), "up": (inter, hidden),
                "down": (hidden, inter)}[proj]
        t, p = random_weights(layout, params, len(experts), n, k, dtype, device, gen)
        if tuple(experts) not in maps:
            emap = torch.full((E,), -1, dtype=torch.int32)
            emap[torch.tensor(experts)] = torch.arange(len(experts), dtype=torch.int32)
            maps[tuple(experts)] = emap.to(device)
        buckets.append({"proj": proj, "layout": layout, "params": p, "tensors": t,
                        "expert_map": maps[tuple(experts)], "identity": experts == list(range(E))})
    return buckets


def uniform(spec, E: int) -> list[tuple]:
    return [(spec, spec, spec)] * E


def split(specs: list, E: int, seed: int = 0) -> list[tuple]:
    """Each expert gets one of `specs` (whole expert), in equal shares, randomly assigned."""
    g = torch.Generator()
    g.manual_seed(seed)
    order = torch.randperm(E, generator=g).tolist()
    out = [None] * E
    for i, e in enumerate(order):
        s = specs[i * len(specs) // E]
        out[e] = (s, s, s)
    return out


def sqnr_db(ref: Tensor, out: Tensor) -> float:
    ref, out = ref.double(), out.double()
    err = (ref - out).pow(2).sum().clamp_min(1e-300)
    return float(10 * torch.log10(ref.pow(2).sum() / err))
