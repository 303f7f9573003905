"""Choose one source per unit under a byte budget: a multiple-choice knapsack.

Each *group* (one unit, or a pair a folding source can only supply together) has options
(bytes, cost). cost = mass_eff * error^2: a unit's squared relative output error, weighted by the
routing mass of the tokens that reach it (1 for attention / dense / lm_head; an expert's share of
its layer's routing weight, Laplace-smoothed by `mass_prior` so an expert that calibration never
reached still costs a little). Squared errors of independent units add like noise power does.

`solve`: per group the Pareto front and its lower convex hull; all hull steps sorted by error
reduction per byte and taken greedily while they fit (the Lagrangian relaxation solution, exact
up to the one step that no longer fits); then the leftover bytes are filled with the largest
single-group improvements that fit. The total never exceeds the budget; a budget below the
smallest mix raises InfeasibleBudget naming that minimum.
"""
from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import MixConfig, ModelArgs, Rule
from ..errors import ConfigError
from ..runtime.prefill import GRAPH_TOKENS

# nvidia-smi "total" memory (the marketing "80 GB" / "141 GB" are these in GiB, rounded)
DEVICES = {"h100": 81559 * 2**20, "h200": 143771 * 2**20, "a100": 81920 * 2**20, "l40s": 46068 * 2**20}
DEFAULT_MARGIN = "7%"      # CUDA context, allocator fragmentation, cuBLAS / NCCL workspaces, CUDA graphs
PREFILL_CHUNK = 8192       # tokens of one prefill step, for the activation estimate
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


class InfeasibleBudget(ConfigError):
    """The budget is below the smallest possible mix. `.minimum` holds that mix's bytes."""

    def __init__(self, msg: str, minimum: int):
        super().__init__(msg)
        self.minimum = minimum


def parse_bytes(text: str | int, what: str = "--budget") -> int:
    """'60GiB', '141GB', '512MiB', '1.5e9', 123 -> bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if m is None or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"{what} {text!r}: expected a size like 60GiB, 141GB, 512MiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.2f} MiB" if abs(n) >= 2**20 else f"{n:.0f} B"


# -- the device fit -------------------------------------------------------------------------------
def kv_bytes(args: ModelArgs, context: int, batch: int, elem: int = 2) -> int:
    """K and V of every layer in the model's dtype (elem bytes a value): 2 * layers * kv_heads *
    head_dim * elem bytes per token."""
    return 2 * args.num_hidden_layers * args.num_key_value_heads * args.head_dim * elem * context * batch


def activation_bytes(args: ModelArgs, context: int, batch: int, elem: int = 2) -> int:
    """Peak activations, estimated: one prefill step of min(context, PREFILL_CHUNK) tokens holds
    ~8 hidden-sized buffers (residual, norm, q/k/v/o, attention out) and the MLP's gate, up
    and activation for every routed (token, expert) pair, in the model's dtype; plus fp32 logits
    for the batch (x2 for sampling)."""
    T = min(context, PREFILL_CHUNK)
    inner = max(args.num_experts_per_tok * args.moe_intermediate_size, args.intermediate_size)
    return T * (8 * args.hidden_size + 3 * inner) * elem + 2 * batch * args.vocab_size * 4


def fit_budget(args: ModelArgs, device: str, context: int, batch: int,
               margin: str = DEFAULT_MARGIN, elem: int = 2, graph_tokens: int = GRAPH_TOKENS) -> tuple[int, dict]:
    """Weight budget for `device` ('h200', 'h100', ... or a size like '80GiB'): its memory minus
    the KV cache for `context` x `batch`, activations, the prefill graphs' staging KV cache
    (runtime/prefill.py: `graph_tokens` tokens, the engine's prefill_graph_tokens; 0 = no prefill
    graphs, no staging cache) and a margin ('7%' of the device, or a size).
    -> (budget, breakdown {device, kv_cache, activations, prefill_graphs, margin})."""
    mem = DEVICES.get(device.lower()) if isinstance(device, str) else None
    if mem is None:
        try:
            mem = parse_bytes(device, "--fit")
        except ConfigError:
            raise ConfigError(f"--fit {device!r}: expected one of {', '.join(DEVICES)} or a size like 80GiB") from None
    if context < 1 or batch < 1:
        raise ConfigError(f"--context {context}, --batch {batch}: both must be >= 1")
    if graph_tokens < 0:
        raise ConfigError(f"--prefill-graph-tokens {graph_tokens}: must be >= 0")
    m = str(margin).strip()
    try:
        reserve = int(mem * float(m[:-1]) / 100) if m.endswith("%") else parse_bytes(m, "--margin")
    except ValueError:
        reserve = -1
    if not 0 <= reserve < mem:
        raise ConfigError(f"--margin {margin!r}: expected a share like 7% or a size like 4GiB, at least 0 and "
                          f"below the device's {fmt_bytes(mem)}")
    parts = {"device": mem, "kv_cache": kv_bytes(args, context, batch, elem),
             "activations": activation_bytes(args, context, batch, elem),
             "prefill_graphs": kv_bytes(args, graph_tokens, 1, elem), "margin": reserve}
    budget = mem - parts["kv_cache"] - parts["activations"] - parts["prefill_graphs"] - reserve
    if budget <= 0:
        raise InfeasibleBudget(f"--fit {device}: the KV cache ({fmt_bytes(parts['kv_cache'])} for {context} tokens x "
                               f"{batch}), activations ({fmt_bytes(parts['activations'])}), the prefill graphs' "
                               f"staging cache ({fmt_bytes(parts['prefill_graphs'])}) and margin "
                               f"({fmt_bytes(reserve)}) alone exceed the device's {fmt_bytes(mem)}", 0)
    return budget, parts


# -- the solver ---------------------------------------------------------------------------------
def _hull(opts: list[tuple[int, float]]) -> list[int]:
    """Indices of the lower convex hull of the Pareto front, by increasing bytes."""
    order = sorted(range(len(opts)), key=lambda i: (opts[i][0], opts[i][1], i))
    front: list[int] = []
    for i in order:
        if not front or opts[i][1] < opts[front[-1]][1]:
            front.append(i)
    hull: list[int] = []
    for i in front:
        while len(hull) >= 2:
            (b0, c0), (b1, c1), (b2, c2) = opts[hull[-2]], opts[hull[-1]], opts[i]
            if (b1 - b0) * (c2 - c0) - (c1 - c0) * (b2 - b0) > 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def solve(options: list[list[tuple[int, float]]], budget: int) -> list[int]:
    """options[g] = [(bytes, cost), ...] -> the chosen option of every group; total bytes <= budget.
    InfeasibleBudget (with .minimum) when even the smallest option of every group does not fit."""
    hulls = []
    for g, opts in enumerate(options):
        if not opts:
            raise ConfigError(f"knapsack group {g} has no option")
        hulls.append(_hull(opts))
    pick = [h[0] for h in hulls]
    used = sum(options[g][i][0] for g, i in enumerate(pick))
    if used > budget:
        raise InfeasibleBudget(f"budget {fmt_bytes(budget)} is below the smallest possible mix ({fmt_bytes(used)})",
                               used)
    steps = []    # (-error reduction per byte, group, position on its hull)
    for g, h in enumerate(hulls):
        for j in range(1, len(h)):
            (b0, c0), (b1, c1) = options[g][h[j - 1]], options[g][h[j]]
            steps.append(((c1 - c0) / (b1 - b0), g, j))
    steps.sort()
    pos, blocked = [0] * len(options), [False] * len(options)
    for _, g, j in steps:
        if blocked[g] or pos[g] != j - 1:
            continue
        db = options[g][hulls[g][j]][0] - options[g][hulls[g][j - 1]][0]
        if used + db > budget:
            blocked[g] = True     # the group's later steps are less efficient and depend on this one
            continue
        used += db
        pos[g] = j
        pick[g] = hulls[g][j]
    changed = True
    while changed:      # fill: the biggest single-group improvements that still fit
        changed = False
        cands = sorted((c - options[g][pick[g]][1], b - options[g][pick[g]][0], g, i)
                       for g, opts in enumerate(options) for i, (b, c) in enumerate(opts)
                       if c < opts[pick[g]][1] and b - opts[pick[g]][0] <= budget - used)
        touched = set()
        for dc, db, g, i in cands:
            if g in touched or used + db > budget:
                continue
            touched.add(g)
            used += db
            pick[g] = i
            changed = True
    assert used <= budget, (used, budget)
    return pick


# -- from a profile -----------------------------------------------------------------------------
@dataclass
class PlanResult:
    choice: dict[str, str]                 # unit -> source
    budget: int
    bytes: int                             # weights + plain tensors
    plain_bytes: int
    cost: float                            # predicted error: sum of mass * rel_err^2
    min_bytes: int
    max_bytes: int
    unit_cost: dict[str, float] = field(default_factory=dict)


def _errors_with_fallback(profile: dict) -> tuple[dict, dict]:
    """Unit and pair errors with None (no calibration token reached the unit) replaced by the
    median error of the same kind of unit from the same source."""
    units, pairs = profile["units"], profile.get("pairs", [])
    pool = defaultdict(list)
    for u in units.values():
        for s, e in u["error"].items():
            if e is not None:
                pool[(u["kind"], s)].append(e)
    for pr in pairs:
        for s, e in pr["error"].items():
            if e is not None:
                pool[("pair:" + units[pr["units"][1]]["kind"], s)].append(e)

    def fix(kind, s, e, where):
        if e is not None:
            return e
        if pool[(kind, s)]:
            return statistics.median(pool[(kind, s)])
        raise ConfigError(f"profile: no measured error for source {s!r} on any {kind} unit (e.g. {where}); "
                          "profile with more calibration tokens")
    uerr = {n: {s: fix(u["kind"], s, e, n) for s, e in u["error"].items()} for n, u in units.items()}
    perr = [{s: fix("pair:" + units[pr["units"][1]]["kind"], s, e, pr["units"][1]) for s, e in pr["error"].items()}
            for pr in pairs]
    return uerr, perr


def _mass(profile: dict, name: str, prior: float) -> float:
    u = profile["units"][name]
    if u["kind"] not in ("gate_up", "down"):
        return 1.0
    E = len(profile["routing"][str(u["layer"])]["mass"])
    return (u["mass"] + prior / E) / (1 + prior)


def groups_of(profile: dict, sources=None, mass_prior: float = 0.05) -> list[list[tuple[int, float, tuple]]]:
    """Knapsack groups: [[(bytes, cost, ((unit, source), ...)), ...], ...]. A unit pair that some
    source can only supply together (see profile.pair_units) is one group whose options are every
    combination of the other sources plus each folding source for both."""
    units = profile["units"]
    allowed = set(profile["sources"]) if sources is None else set(sources)
    unknown = allowed - set(profile["sources"])
    if unknown:
        raise ConfigError(f"--use {', '.join(sorted(unknown))}: not in the profile "
                          f"(it has {', '.join(profile['sources'])})")
    uerr, perr = _errors_with_fallback(profile)

    def single(name):
        u, m = units[name], _mass(profile, name, mass_prior)
        return [(u["bytes"][s], m * uerr[name][s] ** 2, ((name, s),))
                for s in u["error"] if s in allowed and s in u["bytes"]]

    paired = {}
    for pr, err in zip(profile.get("pairs", []), perr):
        paired[tuple(pr["units"])] = err
    in_pair = {n for pair in paired for n in pair}
    out, units_of = [], []       # units_of[g]: the unit names of group g
    for name in units:
        if name not in in_pair:
            out.append(single(name))
            units_of.append((name,))
    for (a, b), err in paired.items():
        m = _mass(profile, b, mass_prior)
        opts = [(ba + bb, ca + cb, pa + pb) for ba, ca, pa in single(a) for bb, cb, pb in single(b)]
        opts += [(units[a]["bytes"][f] + units[b]["bytes"][f], m * e ** 2, ((a, f), (b, f)))
                 for f, e in err.items() if f in allowed]
        out.append(opts)
        units_of.append((a, b))
    for opts, us in zip(out, units_of):
        if not opts:
            have = ", ".join(units[us[0]]["bytes"])
            raise ConfigError(f"--use {', '.join(sorted(allowed))}: unit {' + '.join(us)} has no candidate among them "
                              f"(it can come from {have})")
    return out


def plan_budget(profile: dict, budget: int, sources=None, mass_prior: float = 0.05) -> PlanResult:
    """The mix that minimises the predicted error with total bytes (plain tensors included) <= budget."""
    groups = groups_of(profile, sources, mass_prior)
    plain = profile["plain_bytes"]
    lo = plain + sum(min(o[0] for o in g) for g in groups)
    hi = plain + sum(max(o[0] for o in g) for g in groups)
    if budget < lo:
        raise InfeasibleBudget(f"budget {fmt_bytes(budget)} ({budget} bytes) is below the smallest possible mix: "
                               f"{fmt_bytes(lo)} ({lo} bytes: every unit in its smallest format + "
                               f"{fmt_bytes(plain)} embeddings/norms/routers)", lo)
    pick = solve([[(b, c) for b, c, _ in g] for g in groups], budget - plain)
    choice, unit_cost, total, cost = {}, {}, plain, 0.0
    for g, i in zip(groups, pick):
        b, c, assign = g[i]
        total += b
        cost += c
        for unit, s in assign:
            choice[unit] = s
        unit_cost[assign[0][0]] = c
    order = {n: i for i, n in enumerate(profile["units"])}
    choice = dict(sorted(choice.items(), key=lambda kv: order[kv[0]]))
    return PlanResult(choice, budget, total, plain, cost, lo, hi, unit_cost)


def assignment_bytes(profile: dict, choice: dict[str, str]) -> int:
    return profile["plain_bytes"] + sum(profile["units"][u]["bytes"][s] for u, s in choice.items())


def predicted_cost(profile: dict, choice: dict[str, str], mass_prior: float = 0.05) -> float:
    """The planner's objective for any assignment (pairs from a folding source: the pair error)."""
    uerr, perr = _errors_with_fallback(profile)
    cost, done = 0.0, set()
    for pr, err in zip(profile.get("pairs", []), perr):
        a, b = pr["units"]
        if choice[a] == choice[b] and choice[a] in err:
            cost += _mass(profile, b, mass_prior) * err[choice[a]] ** 2
            done |= {a, b}
    for u, s in choice.items():
        if u not in done:
            if s not in uerr[u]:
                raise ConfigError(f"{u}: source {s!r} is only valid together with its pair unit")
            cost += _mass(profile, u, mass_prior) * uerr[u][s] ** 2
    return cost


def module_sources(profile: dict, choice: dict[str, str]) -> dict[str, str]:
    """unit -> source  ==>  HF module -> source."""
    return {m: s for u, s in choice.items() for m in profile["units"][u]["modules"]}


def to_mix_config(profile: dict, choice: dict[str, str], model: str | Path, sources: dict[str, str | Path],
                  dtype: torch.dtype = torch.bfloat16, origin: str = "<planner>") -> MixConfig:
    """The assignment as a MixConfig: one exact rule per module not taken from the base; to_yaml()
    compacts them into expert ranges."""
    used = sorted({s for s in choice.values() if s != "model"})
    missing = [s for s in used if s not in sources]
    if missing:
        raise ConfigError(f"no path for source(s) {', '.join(missing)}: pass --source NAME=PATH")
    rules = [Rule(m, None, s, f"{origin} {m}", exact=True) for m, s in module_sources(profile, choice).items()
             if s != "model"]
    return MixConfig(model=Path(model), sources={s: Path(sources[s]) for s in used}, rules=tuple(rules),
                     dtype=dtype, origin=origin)


# -- reports ------------------------------------------------------------------------------------
def _format_of(profile: dict, unit: str, src: str) -> str:
    return profile["units"][unit].get("format", {}).get(src, src)


def by_format(profile: dict, choice: dict[str, str]) -> dict[str, list[int]]:
    """format name -> [linears, bytes]."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u, s in choice.items():
        d = out[_format_of(profile, u, s)]
        d[0] += len(profile["units"][u]["modules"])
        d[1] += profile["units"][u]["bytes"][s]
    return dict(sorted(out.items()))


def header(profile: dict, res: PlanResult, fit: dict | None = None, fit_desc: str = "") -> str:
    lines = [f"planned by `mixprec plan` from a {profile['kind']} profile ({profile.get('tokens', 0)} tokens)",
             f"budget {fmt_bytes(res.budget)}; total {fmt_bytes(res.bytes)} = linears "
             f"{fmt_bytes(res.bytes - res.plain_bytes)} + embeddings/norms/routers {fmt_bytes(res.plain_bytes)}",
             f"possible: {fmt_bytes(res.min_bytes)} (smallest) .. {fmt_bytes(res.max_bytes)} (largest)",
             f"predicted error (sum of routing mass x relative error^2): {res.cost:.6g}",
             "bytes per format: " + ", ".join(f"{f} {fmt_bytes(b)} ({n} linears)"
                                              for f, (n, b) in by_format(profile, res.choice).items())]
    if fit:
        lines.append(f"fit {fit_desc}: device {fmt_bytes(fit['device'])} - KV cache {fmt_bytes(fit['kv_cache'])} - "
                     f"activations {fmt_bytes(fit['activations'])} - prefill graphs' staging cache "
                     f"{fmt_bytes(fit['prefill_graphs'])} - margin {fmt_bytes(fit['margin'])}")
    return "".join(f"# {x}\n" for x in lines)


def summary(profile: dict, res: PlanResult) -> str:
    """Per layer: units per source, bytes, predicted error; then per format."""
    srcs = list(profile["sources"])
    rows = [("layer", *srcs, "bytes", "pred. error")]
    per = defaultdict(lambda: {"n": defaultdict(int), "b": 0, "c": 0.0})
    for u, s in res.choice.items():
        layer = profile["units"][u]["layer"]
        d = per["head" if layer is None else layer]
        d["n"][s] += 1
        d["b"] += profile["units"][u]["bytes"][s]
    for u, c in res.unit_cost.items():
        layer = profile["units"][u]["layer"]
        per["head" if layer is None else layer]["c"] += c
    for key in sorted(per, key=lambda k: (isinstance(k, str), k if isinstance(k, int) else 0)):
        d = per[key]
        rows.append((str(key), *(str(d["n"].get(s, 0)) for s in srcs), fmt_bytes(d["b"]), f"{d['c']:.3g}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    lines.append("per format: " + ", ".join(f"{f}: {n} linears, {fmt_bytes(b)}"
                                            for f, (n, b) in by_format(profile, res.choice).items()))
    lines.append(f"total {fmt_bytes(res.bytes)} of budget {fmt_bytes(res.budget)} "
                 f"({100 * res.bytes / res.budget:.1f}%); predicted error {res.cost:.6g}")
    return "\n".join(lines)


def yaml_text(profile: dict, res: PlanResult, mix: MixConfig, fit: dict | None = None, fit_desc: str = "") -> str:
    return header(profile, res, fit, fit_desc) + mix.to_yaml()


def arch_args(profile: dict) -> ModelArgs:
    return ModelArgs.from_hf(profile["config"])


def uniform_choice(profile: dict, per_layer: dict, default: str = "model") -> dict[str, str]:
    """Every unit of layer l from per_layer[l] (the lm_head from `default`)."""
    return {u: per_layer.get(d["layer"], default) if d["layer"] is not None else default
            for u, d in profile["units"].items()}


def bytes_range(profile: dict, sources=None) -> tuple[int, int]:
    g = groups_of(profile, sources)
    plain = profile["plain_bytes"]
    return plain + sum(min(o[0] for o in x) for x in g), plain + sum(max(o[0] for o in x) for x in g)
