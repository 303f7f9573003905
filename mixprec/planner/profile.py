"""Calibration profile: per (layer, expert) routing, and the error of every candidate source of
every planning unit, measured layer by layer on the reference (dequant + matmul) path.

Only one layer's activations exist at a time: the hidden states of the calibration tokens
[S, T, H] flow through the base model one layer at a time, and each candidate weight is read
from its checkpoint, dequantized, used and dropped (one module of one source at a time).

Units (what the planner assigns a source to) and how their error is measured, always against
the base checkpoint's own weights on the same (reference) input:
  q/k/v/o_proj, dense gate/up/down_proj, lm_head   module output, every token (weight 1)
  experts.E.gate_up     silu(gate x) * up x, on the tokens routed to E, weighted by routing weight
  experts.E.down_proj   down(h_ref) fed the reference intermediate, same tokens and weights
error = sqrt(sum_t w_t ||y_src - y_ref||^2 / sum_t w_t ||y_ref||^2).

Sources that fold activation scales into their norms (AWQ, SmoothQuant: their norms differ from
the base's) are corrected per input channel as the loader does (norm_src / norm_base). Their
v_proj/o_proj, dense up/down and expert gate_up/down are only valid together (the inner scale
is not recoverable), so for such a source those are measured as one *pair* at the pair's output
(`pairs` in the profile) and the planner offers them only together.

Profile JSON: {"version", "kind": "measured"|"synthetic", "config" (config.json dict), "dtype",
"tokens", "plain_bytes", "sources": {name: {"path", "formats"}}, "units": {name: {"layer",
"kind", "expert", "modules", "mass", "count", "bytes": {src: n}, "format": {src: fmt},
"error": {src: e | null}}}, "pairs": [{"units": [a, b], "layer", "error": {src: e | null}}],
"routing": {layer: {"count": [E], "mass": [E]}}}. Bytes are what the loaded (packed, on-device)
weights occupy, in the model dtype for dense weights.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from ..config import MixConfig, ModelArgs, Rule, load_config
from ..errors import ConfigError
from ..formats import FORMATS, dequant, load_module, resolve_scheme
from ..layers.moe import route
from ..layers.norm import Rotary, apply_rope, rms_norm
from ..loader.assemble import input_rescales, linear_bytes
from ..loader.plan import Plan, make_plan

VERSION = 1
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
_ELEM = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}


# -- units --------------------------------------------------------------------------------------
def unit_layout(args: ModelArgs) -> dict[str, dict]:
    """Every planning unit of the architecture -> {layer, kind, expert, modules}. Kinds: attn,
    mlp (dense), gate_up / down (experts), lm_head. Module order follows linear_shapes()."""
    out: dict[str, dict] = {}
    for l in range(args.num_hidden_layers):
        p = f"model.layers.{l}"
        for proj in _ATTN:
            out[f"{p}.self_attn.{proj}"] = dict(layer=l, kind="attn", expert=None, modules=[f"{p}.self_attn.{proj}"])
        if args.is_moe_layer(l):
            for e in range(args.num_experts):
                q = f"{p}.mlp.experts.{e}"
                out[f"{q}.gate_up"] = dict(layer=l, kind="gate_up", expert=e,
                                           modules=[f"{q}.gate_proj", f"{q}.up_proj"])
                out[f"{q}.down_proj"] = dict(layer=l, kind="down", expert=e, modules=[f"{q}.down_proj"])
        else:
            for proj in _MLP:
                out[f"{p}.mlp.{proj}"] = dict(layer=l, kind="mlp", expert=None, modules=[f"{p}.mlp.{proj}"])
    if not args.tie_word_embeddings:
        out["lm_head"] = dict(layer=None, kind="lm_head", expert=None, modules=["lm_head"])
    return out


def pair_units(args: ModelArgs, layer: int) -> list[tuple[str, str]]:
    """Units a folding source must supply together in `layer`: (v, o), (up, down) or, per
    expert, (gate_up, down). A dense gate_proj, q and k only need the norm correction."""
    p = f"model.layers.{layer}"
    out = [(f"{p}.self_attn.v_proj", f"{p}.self_attn.o_proj")]
    if args.is_moe_layer(layer):
        out += [(f"{p}.mlp.experts.{e}.gate_up", f"{p}.mlp.experts.{e}.down_proj") for e in range(args.num_experts)]
    else:
        out.append((f"{p}.mlp.up_proj", f"{p}.mlp.down_proj"))
    return out


def plain_bytes(args: ModelArgs, dtype: torch.dtype) -> int:
    """Embeddings, norms and routers as the model holds them (model dtype); a tied lm_head adds nothing."""
    return sum(math.prod(s) for s in args.plain_tensors().values()) * _ELEM[dtype]


# -- calibration tokens -------------------------------------------------------------------------
def calibration_ids(tokenizer, text: str | None, tokens: int, synthetic: int, seq_len: int, vocab: int,
                    seed: int = 0, where: str = "--text") -> Tensor:
    """[S, seq_len] int64: the first `tokens` tokens of `text` (tokenizer.encode), then `synthetic`
    uniformly random ids (seeded), cut into full sequences (a short tail is dropped)."""
    ids: list[int] = []
    if text is not None:
        if tokenizer is None:
            raise ConfigError(f"{where}: the base checkpoint has no tokenizer.json to encode the text with")
        ids = tokenizer.encode(text)[:tokens] if tokens else tokenizer.encode(text)
        if tokens and len(ids) < tokens:
            raise ConfigError(f"{where}: the text holds {len(ids)} tokens, fewer than --tokens {tokens}")
    if synthetic:
        g = torch.Generator().manual_seed(seed)
        ids += torch.randint(0, vocab, (synthetic,), generator=g).tolist()
    if len(ids) < seq_len:
        raise ConfigError(f"{where}: {len(ids)} calibration tokens, fewer than one sequence of {seq_len}")
    S = len(ids) // seq_len
    return torch.tensor(ids[: S * seq_len], dtype=torch.long).view(S, seq_len)


# -- measured profile ---------------------------------------------------------------------------
class _Source:
    """One candidate source: its full-model plan (every module resolved in it) and the input
    rescale factors of its folded norms (what the loader would apply)."""

    def __init__(self, name: str, plan: Plan, device):
        self.name, self.plan, self.device = name, plan, device
        self.ck = plan.sources[name]
        self.rescale = {m: f.to(device) for m, f in input_rescales(plan).items()}
        self.folds = {int(m.split(".")[2]) for m in self.rescale if m.startswith("model.layers.")}

    def weight(self, module: str, dtype: torch.dtype) -> tuple[Tensor, int, str]:
        """-> (W float32 [N, K] on the device, loaded bytes (with the input rescale the loader
        keeps beside a folded-norm linear), format name)."""
        e = self.plan.entries[module]
        packed = load_module(self.ck.module(module), e.n, e.k, e.scheme, where=f"{self.ck.path}: {module}",
                             dtype=dtype)
        nb = linear_bytes(packed, self.rescale.get(module))
        return dequant(packed.to(self.device)).float(), nb, e.fmt_name

    def linear(self, x: Tensor, module: str, W: Tensor) -> Tensor:
        r = self.rescale.get(module)
        return F.linear(x if r is None else x * r, W)


def source_plans(cfg: MixConfig) -> dict[str, Plan]:
    """name -> plan that takes every linear from that source (headers only). Every source must
    hold the whole model; a problem in any raises (one error listing all, as make_plan does)."""
    out = {}
    for name, path in cfg.sources.items():
        rules = () if name == "model" else (Rule(".", None, name, f"profile candidate {name!r}"),)
        srcs = {} if name == "model" else {name: path}
        one = MixConfig(model=cfg.model, sources=srcs, rules=rules, dtype=cfg.dtype,
                        origin=f"{cfg.origin} (candidate source {name!r})")
        out[name] = make_plan(one)
    return out


class _Acc:
    """sum_t w_t ||y_src - y_ref||^2 per (unit, source) and sum_t w_t ||y_ref||^2 per unit."""

    def __init__(self):
        self.err2: dict[str, dict[str, float]] = defaultdict(dict)
        self.ref2: dict[str, float] = defaultdict(float)

    def ref(self, unit: str, y: Tensor, w: Tensor | None = None) -> None:
        r = y.pow(2).sum(-1)
        self.ref2[unit] += float((r if w is None else r * w).sum())

    def err(self, unit: str, src: str, y: Tensor, y_ref: Tensor, w: Tensor | None = None) -> None:
        d = (y - y_ref).pow(2).sum(-1)
        self.err2[unit][src] = self.err2[unit].get(src, 0.0) + float((d if w is None else d * w).sum())

    def rel(self, unit: str, src: str, ref_unit: str | None = None) -> float | None:
        """Relative error; None when no token reached the unit. `ref_unit`: whose reference
        norm to divide by (a pair is measured at its second unit's output)."""
        ref2 = self.ref2.get(ref_unit or unit, 0.0)
        if src not in self.err2.get(unit, {}) or ref2 <= 0:
            return None
        return math.sqrt(self.err2[unit][src] / ref2)


@torch.inference_mode()
def profile_model(config, ids: Tensor, device="cpu", progress: bool = True) -> dict:
    """Measure routing and per-source errors for the mix config's model and sources (every source,
    the base included, is a candidate for every unit). ids [S, T] calibration tokens. Runs in
    float32 on `device`; bytes are counted in the config's dtype."""
    cfg = load_config(config)
    device = torch.device(device)
    plans = source_plans(cfg)
    base_plan = plans["model"]
    args, base = base_plan.args, base_plan.sources["model"]
    srcs = {name: _Source(name, p, device) for name, p in plans.items()}
    others = [s for s in srcs.values() if s.name != "model"]
    units = unit_layout(args)
    if ids.dim() != 2 or ids.numel() == 0:
        raise ConfigError(f"calibration ids: expected a non-empty [S, T] tensor, got shape {tuple(ids.shape)}")
    if int(ids.max()) >= args.vocab_size or int(ids.min()) < 0:
        raise ConfigError(f"calibration ids outside the vocabulary 0..{args.vocab_size - 1}")
    acc, meta = _Acc(), {u: {"bytes": {}, "format": {}} for u in units}
    routing: dict[int, dict] = {}
    pairs: list[dict] = []
    dt = cfg.dtype

    def plain(name: str) -> Tensor:
        return base.get(name).to(device, torch.float32)

    def load(src: _Source, unit: str, module: str) -> Tensor:
        W, nb, fmt = src.weight(module, dt)
        m = meta[unit]
        m["bytes"][src.name] = m["bytes"].get(src.name, 0) + nb
        m["format"].setdefault(src.name, fmt)
        return W

    S, T = ids.shape
    x = plain("model.embed_tokens.weight")[ids.to(device)]                     # [S, T, H]
    rotary = Rotary(args.head_dim, args.rope_theta, args.rope_scaling, args.max_position_embeddings).to(device)
    cos, sin = rotary(torch.arange(T, device=device).expand(S, T), torch.float32)
    eps = args.rms_norm_eps
    bar = tqdm(total=args.num_hidden_layers + 1, desc="profile", unit="layer", disable=not progress)
    for l in range(args.num_hidden_layers):
        p = f"model.layers.{l}"
        folding = [s for s in others if l in s.folds]
        for s in folding:
            for a, b in pair_units(args, l):
                pairs.append({"units": [a, b], "layer": l, "source": s.name})
        # -- attention
        xn = rms_norm(x, plain(f"{p}.input_layernorm.weight"), eps)
        qn, kn = plain(f"{p}.self_attn.q_norm.weight"), plain(f"{p}.self_attn.k_norm.weight")

        def attend(q, k, v):   # [S, T, n*D] each -> o_proj input [S, T, heads*D]
            D = args.head_dim
            q = apply_rope(rms_norm(q.view(S, T, -1, D), qn, eps), cos, sin).transpose(1, 2)
            k = apply_rope(rms_norm(k.view(S, T, -1, D), kn, eps), cos, sin).transpose(1, 2)
            v = v.view(S, T, -1, D).transpose(1, 2)
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            return o.transpose(1, 2).reshape(S, T, -1)

        W = {proj: load(srcs["model"], f"{p}.self_attn.{proj}", f"{p}.self_attn.{proj}") for proj in _ATTN}
        ref = {proj: F.linear(xn, W[proj]) for proj in ("q_proj", "k_proj", "v_proj")}
        o_in = attend(ref["q_proj"], ref["k_proj"], ref["v_proj"])
        ref["o_proj"] = F.linear(o_in, W["o_proj"])
        for proj in _ATTN:
            acc.ref(f"{p}.self_attn.{proj}", ref[proj])
        for s in others:
            for proj in _ATTN:
                u = f"{p}.self_attn.{proj}"
                Ws = load(s, u, u)
                if s in folding and proj == "v_proj":
                    v_s = s.linear(xn, u, Ws)
                    continue
                if s in folding and proj == "o_proj":   # the pair, at o_proj's output
                    acc.err(f"{u}+pair", s.name, s.linear(attend(ref["q_proj"], ref["k_proj"], v_s), u, Ws),
                            ref["o_proj"])
                    continue
                acc.err(u, s.name, s.linear(o_in if proj == "o_proj" else xn, u, Ws), ref[proj])
        h = x + ref["o_proj"]
        del xn, ref, o_in, W
        # -- MLP
        hn = rms_norm(h, plain(f"{p}.post_attention_layernorm.weight"), eps).reshape(S * T, -1)
        if args.is_moe_layer(l):
            out, count, mass = _moe_layer(args, l, hn, plain(f"{p}.mlp.gate.weight"), srcs, others, folding, acc,
                                          load)
            routing[l] = {"count": count, "mass": mass}
        else:
            out = _dense_mlp(p, hn, srcs, others, folding, acc, load)
        x = h + out.view(S, T, -1)
        del h, hn, out
        bar.update(1)
    if "lm_head" in units:
        xf = rms_norm(x, plain("model.norm.weight"), eps).reshape(S * T, -1)
        chunks = [xf[i: i + 1024] for i in range(0, xf.shape[0], 1024)]   # logits [<=1024, V] at a time
        W = load(srcs["model"], "lm_head", "lm_head")
        for c in chunks:
            acc.ref("lm_head", F.linear(c, W))
        for s in others:      # one [V, H] head besides the base's at a time
            Ws = load(s, "lm_head", "lm_head")
            for c in chunks:
                acc.err("lm_head", s.name, F.linear(c, Ws), F.linear(c, W))
            del Ws
    bar.update(1)
    bar.close()
    return _assemble(cfg, base.config, args, units, meta, acc, routing, pairs, S * T)


def _moe_layer(args, l, hn, router, srcs, others, folding, acc, load):
    """Route with the base router; per expert: reference MLP, then each source's gate+up / down
    (or, for a folding source, the whole expert). -> (output [NT, H], counts, masses)."""
    p = f"model.layers.{l}"
    NT = hn.shape[0]
    topk_w, topk_ids = route(hn, router, args.num_experts_per_tok, args.norm_topk_prob)
    topk_w = topk_w.float()
    out = torch.zeros_like(hn)
    count, mass = [], []
    for e in range(args.num_experts):
        q = f"{p}.mlp.experts.{e}"
        gu, dn = f"{q}.gate_up", f"{q}.down_proj"
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        w = topk_w[tok, slot]                                                       # [n]
        count.append(int(tok.numel()))
        mass.append(float(w.sum()) / NT)
        xe = hn[tok]                                                                # [n, H]
        Wg, Wu, Wd = (load(srcs["model"], gu, f"{q}.gate_proj"), load(srcs["model"], gu, f"{q}.up_proj"),
                      load(srcs["model"], dn, f"{q}.down_proj"))
        h_ref = F.silu(F.linear(xe, Wg)) * F.linear(xe, Wu)                          # [n, I]
        y_ref = F.linear(h_ref, Wd)                                                 # [n, H]
        out.index_add_(0, tok, y_ref * w[:, None])
        acc.ref(gu, h_ref, w)
        acc.ref(dn, y_ref, w)
        for s in others:     # loaded even for an expert no token reached: its bytes are needed
            Gs, Us, Ds = (load(s, gu, f"{q}.gate_proj"), load(s, gu, f"{q}.up_proj"), load(s, dn, f"{q}.down_proj"))
            if tok.numel() == 0:
                continue
            h_s = F.silu(s.linear(xe, f"{q}.gate_proj", Gs)) * s.linear(xe, f"{q}.up_proj", Us)
            if s in folding:
                acc.err(f"{dn}+pair", s.name, F.linear(h_s, Ds), y_ref, w)
            else:
                acc.err(gu, s.name, h_s, h_ref, w)
                acc.err(dn, s.name, F.linear(h_ref, Ds), y_ref, w)
    return out, count, mass


def _dense_mlp(p, hn, srcs, others, folding, acc, load):
    """Dense SwiGLU layer: gate/up/down per source (up+down as a pair for a folding source)."""
    W = {proj: load(srcs["model"], f"{p}.mlp.{proj}", f"{p}.mlp.{proj}") for proj in _MLP}
    g, u = F.linear(hn, W["gate_proj"]), F.linear(hn, W["up_proj"])
    a = F.silu(g) * u
    y = F.linear(a, W["down_proj"])
    for proj, ref in (("gate_proj", g), ("up_proj", u), ("down_proj", y)):
        acc.ref(f"{p}.mlp.{proj}", ref)
    for s in others:
        Ws = {proj: load(s, f"{p}.mlp.{proj}", f"{p}.mlp.{proj}") for proj in _MLP}
        acc.err(f"{p}.mlp.gate_proj", s.name, s.linear(hn, f"{p}.mlp.gate_proj", Ws["gate_proj"]), g)
        if s in folding:
            a_s = F.silu(g) * s.linear(hn, f"{p}.mlp.up_proj", Ws["up_proj"])
            acc.err(f"{p}.mlp.down_proj+pair", s.name, F.linear(a_s, Ws["down_proj"]), y)
        else:
            acc.err(f"{p}.mlp.up_proj", s.name, s.linear(hn, f"{p}.mlp.up_proj", Ws["up_proj"]), u)
            acc.err(f"{p}.mlp.down_proj", s.name, F.linear(a, Ws["down_proj"]), y)
    return y


def _assemble(cfg, base_config, args, units, meta, acc, routing, pairs, n_tokens) -> dict:
    out_units = {}
    for name, u in units.items():
        rt = routing.get(u["layer"]) if u["kind"] in ("gate_up", "down") else None
        mass = rt["mass"][u["expert"]] if rt else 1.0
        count = rt["count"][u["expert"]] if rt else n_tokens
        folded = {pr["source"] for pr in pairs if name in pr["units"]}
        err = {"model": 0.0}
        for src in meta[name]["bytes"]:
            if src != "model" and src not in folded:
                err[src] = acc.rel(name, src)
        out_units[name] = {**u, "mass": mass, "count": count, "bytes": meta[name]["bytes"],
                           "format": meta[name]["format"], "error": err}
    merged: dict[tuple, dict] = {}
    for pr in pairs:   # one entry per unit pair, errors of every folding source
        a, b = pr["units"]
        d = merged.setdefault((a, b), {"units": [a, b], "layer": pr["layer"], "error": {}})
        d["error"][pr["source"]] = acc.rel(f"{b}+pair", pr["source"], ref_unit=b)
    formats = defaultdict(Counter)
    for u in out_units.values():
        for src, fmt in u["format"].items():
            formats[src][fmt] += len(u["modules"])
    config = {k: v for k, v in base_config.items() if k not in ("quantization_config", "compression_config")}
    return {"version": VERSION, "kind": "measured", "config": config, "dtype": str(cfg.dtype).removeprefix("torch."),
            "tokens": n_tokens, "plain_bytes": plain_bytes(args, cfg.dtype),
            "sources": {n: {"path": str(p), "formats": dict(formats[n])} for n, p in cfg.sources.items()},
            "units": out_units, "pairs": list(merged.values()),
            "routing": {str(l): r for l, r in routing.items()}}


# -- synthetic profile --------------------------------------------------------------------------
# spec name (runtime/synthetic.py SPECS) -> the source name it gets in a synthetic profile
SYNTHETIC_BASE = "bf16"


def spec_nbytes(spec: str, n: int, k: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one [N, K] weight of a runtime/synthetic.py SPECS format once loaded (its packed
    layout): dense N*K*elem; fp8 block e4m3 N*K + fp32 scales per block; gptq int4 sym: qweight
    N*K/2 + fp16 scales per group (zeros dropped: symmetric); awq int4: + uint8 zeros per group;
    ct_int8 channel: int8 N*K + fp32 scale per row."""
    from ..runtime.synthetic import SPECS
    if spec not in SPECS:
        raise ConfigError(f"format spec {spec!r} unknown; known: {', '.join(SPECS)}")
    fmt, params = SPECS[spec]
    cd = lambda a, b: -(-a // b)  # noqa: E731
    if fmt == "dense":
        return n * k * _ELEM[dtype]
    if fmt == "fp8_block":
        bn, bk = params.get("block", (128, 128))
        return n * k + cd(n, bn) * cd(k, bk) * 4
    if fmt in ("gptq", "awq"):
        bits, G = params.get("bits", 4), params.get("group_size", 128)
        G = k if G == -1 else G
        zeros = 0 if (fmt == "gptq" and params.get("sym", True)) else cd(k, G) * n
        return cd(k, 32 // bits) * n * 4 + cd(k, G) * n * 2 + zeros
    if fmt == "ct_int8":
        return n * k + n * 4
    raise ConfigError(f"format spec {spec!r} ({fmt}): no byte formula")


def format_error_model(specs, seed: int = 0, n: int = 512, k: int = 1024) -> dict[str, float]:
    """Relative weight error ||W_q - W|| / ||W|| of each spec on a Gaussian [n, K] matrix,
    through the real pack -> load -> dequant path: the per-format error of a synthetic profile."""
    from ..runtime.synthetic import SPECS
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g) / k ** 0.5
    out = {}
    for spec in specs:
        fmt_name, params = SPECS[spec]
        fmt = FORMATS[fmt_name]
        raw = fmt.pack(W, **params)
        scheme = resolve_scheme(fmt.config_block(**params) or None, "model.layers.0.mlp.experts.0.up_proj")
        Wq = dequant(load_module(raw, n, k, scheme, where=f"synthetic {spec}", dtype=torch.float32)).float()
        out[spec] = float((Wq - W).norm() / W.norm())
    return out


def synthetic_profile(arch: str, sources=("bf16", "fp8", "int4"), seed: int = 0, tokens: int = 8192,
                      skew: float = 1.0, spread: float = 0.5, dtype: torch.dtype = torch.bfloat16,
                      config: dict | None = None) -> dict:
    """A profile for an architecture without weights (runtime/synthetic.py ARCHS, or `config`, a
    config.json dict): bytes exact from shapes (spec_nbytes); error of a unit in format f =
    err_f * sensitivity_u with err_f from format_error_model and sensitivity ~ lognormal(0, spread);
    expert routing mass per layer ~ softmax(skew * N(0, 1)) (a few hot experts). The source named
    "bf16" is the base ("model"). Lm_head stays bf16 in every source, as in published releases."""
    from ..runtime.synthetic import ARCHS, SPECS
    if config is None:
        if arch not in ARCHS:
            raise ConfigError(f"--arch {arch!r}: known architectures: {', '.join(ARCHS)}")
        config = dict(ARCHS[arch])
    bad = [s for s in sources if s not in SPECS]
    if bad or SYNTHETIC_BASE not in sources:
        raise ConfigError(f"synthetic sources {list(sources)}: each must be one of {', '.join(SPECS)}, "
                          f"and {SYNTHETIC_BASE!r} (the base) must be among them")
    if any(SPECS[s][0] == "awq" for s in sources):
        raise ConfigError("synthetic sources: AWQ folds scales into norms; a synthetic profile has no norms "
                          "to model that with (use gptq-style 'int4')")
    args = ModelArgs.from_hf(config)
    rng = random.Random(seed)
    err_f = format_error_model(sources, seed)
    err_f[SYNTHETIC_BASE] = 0.0       # the base is the reference
    names = {s: ("model" if s == SYNTHETIC_BASE else s) for s in sources}
    units = unit_layout(args)
    shapes = args.linear_shapes()
    routing = {}
    for l in range(args.num_hidden_layers):
        if args.is_moe_layer(l):
            z = [math.exp(skew * rng.gauss(0, 1)) for _ in range(args.num_experts)]
            mass = [v / sum(z) for v in z]
            routing[l] = {"mass": mass, "count": [round(m * tokens * args.num_experts_per_tok) for m in mass]}
    out_units = {}
    for name, u in units.items():
        sens = math.exp(spread * rng.gauss(0, 1))
        use = [SYNTHETIC_BASE] if u["kind"] == "lm_head" else list(sources)
        rt = routing.get(u["layer"]) if u["kind"] in ("gate_up", "down") else None
        out_units[name] = {
            **u, "mass": rt["mass"][u["expert"]] if rt else 1.0,
            "count": rt["count"][u["expert"]] if rt else tokens,
            "bytes": {names[s]: sum(spec_nbytes(s, *shapes[m], dtype) for m in u["modules"]) for s in use},
            "format": {names[s]: SPECS[s][0] for s in use},
            "error": {names[s]: err_f[s] * sens for s in use}}
    return {"version": VERSION, "kind": "synthetic", "arch": arch, "config": dict(config),
            "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "seed": seed,
            "error_model": {names[s]: err_f[s] for s in sources},
            "plain_bytes": plain_bytes(args, dtype),
            "sources": {names[s]: {"path": f"<{arch} {s}>", "formats": {SPECS[s][0]: len(shapes)}} for s in sources},
            "units": out_units, "pairs": [], "routing": {str(l): r for l, r in routing.items()}}


# -- files --------------------------------------------------------------------------------------
_KEYS = ("version", "kind", "config", "plain_bytes", "sources", "units", "pairs")


def load_profile(path: str | Path) -> dict:
    """Read a profile JSON written by `mixprec profile`; ConfigError naming the file otherwise."""
    p = Path(path)
    try:
        d = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError(f"{p}: cannot read the profile ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(d, dict) or any(k not in d for k in _KEYS):
        missing = [k for k in _KEYS if not isinstance(d, dict) or k not in d]
        raise ConfigError(f"{p}: not a mixprec profile (missing {', '.join(missing)})")
    if d["version"] != VERSION:
        raise ConfigError(f"{p}: profile version {d['version']}, this mixprec reads version {VERSION}")
    if "model" not in d["sources"]:
        raise ConfigError(f"{p}: the profile has no base source 'model' (sources: {', '.join(d['sources'])})")
    for name, u in d["units"].items():
        if not isinstance(u, dict) or not {"bytes", "error", "mass", "modules", "kind"} <= set(u):
            raise ConfigError(f"{p}: unit {name!r} lacks bytes/error/mass/modules/kind")
        if "model" not in u["bytes"]:
            raise ConfigError(f"{p}: unit {name!r} has no bytes for the base source 'model'")
    return d


def save_profile(profile: dict, path: str | Path) -> Path:
    p = Path(path)
    try:
        p.write_text(json.dumps(profile, indent=None, separators=(",", ":")) + "\n")
    except OSError as e:
        raise ConfigError(f"{p}: cannot write the profile ({e.strerror})") from None
    return p
