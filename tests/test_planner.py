"""Budget planner: profile (routing, per-source errors), knapsack, plans vs baselines, --fit.

The headline test plans the heterogeneous fixture (bf16 / FP8 / GPTQ-int4 sources) at budgets
25/50/75% of the way from all-int4 to all-bf16 and checks, on held-out tokens, that the planned
mix is closer to bf16 (KL) than the best uniform-per-layer assignment and than the median of 10
random per-expert assignments of the same bytes. Run this file directly to print the table.
"""
from __future__ import annotations

import itertools
import json
import random
import statistics

import pytest
import torch
import torch.nn.functional as F
import yaml

import mixprec
from mixprec.config import MixConfig
from mixprec.errors import ConfigError
from mixprec.formats import FORMATS, dequant, load_module, resolve_scheme
from mixprec.formats.base import Packed
from mixprec.layers.moe import route
from mixprec.models.qwen3 import Qwen3ForCausalLM
from mixprec.planner.cli import plan_main, profile_main, eval_main
from mixprec.planner.evaluate import evaluate, kl_metrics
from mixprec.planner.knapsack import (DEVICES, InfeasibleBudget, assignment_bytes, bytes_range, fit_budget,
                                      module_sources, parse_bytes, plan_budget, predicted_cost, solve,
                                      to_mix_config, uniform_choice, yaml_text)
from mixprec.planner.profile import load_profile, profile_model, source_plans, spec_nbytes
from mixprec.runtime.synthetic import SPECS
from mixprec.testing.fixtures import make_fixture
from mixprec.testing.heterogeneous import make_heterogeneous_fixture

FRACTIONS = (0.25, 0.5, 0.75)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a second intra-op thread only adds contention on a loaded 2-core runner
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def hetero(tmp_path_factory):
    root = tmp_path_factory.mktemp("hetero")
    paths = make_heterogeneous_fixture(root, seed=0)
    # bytes are counted in the deployed dtype (bf16); profiling itself always runs in float32
    cfg = MixConfig(model=paths["bf16"], sources={"fp8": paths["fp8"], "gptq": paths["gptq"]}, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    cal = torch.randint(0, 509, (8, 128), generator=g)      # calibration
    held = torch.randint(0, 509, (8, 128), generator=g)     # held-out evaluation tokens
    prof = profile_model(cfg, cal, progress=False)
    info = json.loads((root / "heterogeneous.json").read_text())
    return dict(root=root, paths=paths, cfg=cfg, cal=cal, held=held, prof=prof, info=info)


class DenseMix:
    """Logits of any assignment, fast: every (module, source) weight dequantized once to fp32 and
    given to the model as a dense weight, which is exactly what the CPU reference path computes
    (dequant, then matmul). Cross-checked against mixprec.load below."""

    def __init__(self, cfg: MixConfig):
        plans = source_plans(cfg)
        self.args = plans["model"].args
        base = plans["model"].sources["model"]
        self.W = {}
        for name, p in plans.items():
            ck = p.sources[name]
            for m, e in p.entries.items():
                w = load_module(ck.module(m), e.n, e.k, e.scheme, where=m, dtype=torch.float32)
                self.W[(m, name)] = dequant(w).float()
        self.plain = {n: base.get(n).float() for n in self.args.plain_tensors()}

    @torch.inference_mode()
    def logits(self, sources: dict[str, str], ids):
        model = Qwen3ForCausalLM(self.args, dtype=torch.float32, device="meta")
        for n, t in self.plain.items():
            model.set_tensor(n, t)
        for m in self.args.linear_shapes():
            W = self.W[(m, sources.get(m, "model"))]
            model.set_linear(m, Packed("dense", W.shape[0], W.shape[1], {"weight": W}))
        model.finalize()
        return model(ids)


def random_assignment(prof, budget, rng):
    """A random source per unit, then random downgrades until it fits and random upgrades while
    they fit: a random per-expert mix using (nearly) the whole budget."""
    units = list(prof["units"])
    ladder = {u: sorted(prof["units"][u]["error"], key=lambda s: prof["units"][u]["bytes"][s]) for u in units}
    ch = {u: rng.choice(ladder[u]) for u in units}
    total = assignment_bytes(prof, ch)

    def step(u, d):
        return ladder[u][ladder[u].index(ch[u]) + d]
    while total > budget:
        u = rng.choice([u for u in units if ladder[u].index(ch[u]) > 0])
        s = step(u, -1)
        total += prof["units"][u]["bytes"][s] - prof["units"][u]["bytes"][ch[u]]
        ch[u] = s
    while True:
        ups = [u for u in units if ladder[u].index(ch[u]) < len(ladder[u]) - 1 and total + prof["units"][u]["bytes"][
            step(u, 1)] - prof["units"][u]["bytes"][ch[u]] <= budget]
        if not ups:
            return ch
        u = rng.choice(ups)
        s = step(u, 1)
        total += prof["units"][u]["bytes"][s] - prof["units"][u]["bytes"][ch[u]]
        ch[u] = s


def comparison_table(h) -> list[dict]:
    prof, held = h["prof"], h["held"]
    dm = DenseMix(h["cfg"])
    ref = dm.logits({}, held)

    def kl(choice):
        return kl_metrics(ref, dm.logits(module_sources(prof, choice), held), held)["mean_kl"]
    lo, hi = bytes_range(prof)
    layers = sorted({u["layer"] for u in prof["units"].values() if u["layer"] is not None})
    uniform = []
    for combo in itertools.product(("model", "fp8", "gptq"), repeat=len(layers)):
        ch = uniform_choice(prof, dict(zip(layers, combo)))
        uniform.append((assignment_bytes(prof, ch), combo, ch))
    uniform_kl = {}
    rows = []
    for frac in FRACTIONS:
        budget = int(lo + frac * (hi - lo))
        res = plan_budget(prof, budget)
        fits = [(b, combo, ch) for b, combo, ch in uniform if b <= budget]
        for _, combo, ch in fits:
            if combo not in uniform_kl:
                uniform_kl[combo] = kl(ch)
        best = min(fits, key=lambda f: uniform_kl[f[1]])
        rng = random.Random(int(frac * 100))
        rand = [random_assignment(prof, budget, rng) for _ in range(10)]
        rows.append(dict(frac=frac, budget=budget, bytes=res.bytes, planned=kl(res.choice), choice=res.choice,
                         uniform=uniform_kl[best[1]], uniform_combo=best[1], uniform_bytes=best[0],
                         random_median=statistics.median(kl(c) for c in rand),
                         random_bytes=[assignment_bytes(prof, c) for c in rand], cost=res.cost))
    return rows


def format_table(rows) -> str:
    lines = ["| budget (int4 -> bf16) | bytes | planned KL | best uniform-per-layer KL (layers 0,1,2) | "
             "median of 10 random per-expert KL |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['frac']:.0%} ({r['budget']} B) | {r['bytes']} | {r['planned']:.2e} | "
                     f"{r['uniform']:.2e} ({','.join(r['uniform_combo'])}) | {r['random_median']:.2e} |")
    return "\n".join(lines)


# -- the headline result ----------------------------------------------------------------------------
def test_planned_mix_beats_uniform_and_random(hetero):
    rows = comparison_table(hetero)
    print("\n" + format_table(rows))
    for r in rows:
        assert r["bytes"] <= r["budget"] and r["uniform_bytes"] <= r["budget"]
        assert all(b <= r["budget"] for b in r["random_bytes"])
        assert min(r["random_bytes"]) > 0.9 * r["budget"]           # the random mixes use the budget too
        assert r["planned"] < r["uniform"], r
        assert r["planned"] < r["random_median"], r
    # more budget, closer to bf16
    assert rows[0]["planned"] > rows[1]["planned"] > rows[2]["planned"]

    # the fast harness computes what mixprec.load computes: load the 50% plan from its YAML
    h, r = hetero, rows[1]
    mix = to_mix_config(h["prof"], r["choice"], h["paths"]["bf16"], h["paths"], dtype=torch.float32)
    path = h["root"] / "plan50.yaml"
    path.write_text(yaml_text(h["prof"], plan_budget(h["prof"], r["budget"]), mix))
    names = list(mixprec.plan(path).args.linear_shapes())
    assert {m: s for m, (s, _) in MixConfig.from_yaml(path).resolve(names).items()} == \
        {**{m: "model" for m in names}, **module_sources(h["prof"], r["choice"])}
    with torch.inference_mode():
        ref = mixprec.load(h["paths"]["bf16"], device="cpu", dtype=torch.float32, progress=False)(h["held"])
        got = mixprec.load(path, device="cpu", dtype=torch.float32, progress=False)(h["held"])
    assert kl_metrics(ref, got, h["held"])["mean_kl"] == pytest.approx(r["planned"], rel=1e-3, abs=1e-7)
    assert mixprec.load(path, device="cpu", dtype=torch.bfloat16, progress=False).stats.bytes_total + \
        h["prof"]["plain_bytes"] == r["bytes"]


# -- the profile ------------------------------------------------------------------------------------
def test_profile_routing_and_errors_match_an_independent_computation(hetero):
    h, prof = hetero, hetero["prof"]
    model = mixprec.load(h["paths"]["bf16"], device="cpu", dtype=torch.float32, progress=False)
    seen = {}
    hooks = [layer.mlp.register_forward_hook(lambda mod, inp, out, l=l: seen.__setitem__(l, inp[0].reshape(-1, 128)))
             for l, layer in enumerate(model.model.layers) if l in (1, 2)]
    with torch.inference_mode():
        model(h["cal"])
    for hk in hooks:
        hk.remove()
    args = model.args
    for l in (1, 2):
        x = seen[l]
        w, ids = route(x, model.model.layers[l].mlp.gate.weight, args.num_experts_per_tok, args.norm_topk_prob)
        counts = torch.bincount(ids.reshape(-1), minlength=args.num_experts).tolist()
        mass = torch.zeros(args.num_experts).index_add_(0, ids.reshape(-1), w.reshape(-1).float()) / x.shape[0]
        assert prof["routing"][str(l)]["count"] == counts
        assert prof["routing"][str(l)]["mass"] == pytest.approx(mass.tolist(), abs=1e-5)
        assert sum(prof["routing"][str(l)]["mass"]) == pytest.approx(1.0, abs=1e-5)
        # the hottest expert's int4 gate+up and down errors, from dequantize_weight and plain torch
        e = int(torch.tensor(counts).argmax())
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe, we = x[tok], w[tok, slot].float()
        q = f"model.layers.{l}.mlp.experts.{e}"
        projs = ("gate_proj", "up_proj", "down_proj")
        Wb = {p: mixprec.dequantize_weight(h["paths"]["bf16"], f"{q}.{p}") for p in projs}
        Wq = {p: mixprec.dequantize_weight(h["paths"]["gptq"], f"{q}.{p}") for p in projs}
        hb = F.silu(xe @ Wb["gate_proj"].T) * (xe @ Wb["up_proj"].T)
        hq = F.silu(xe @ Wq["gate_proj"].T) * (xe @ Wq["up_proj"].T)
        rel = lambda a, b: float(((we * (a - b).pow(2).sum(-1)).sum() / (we * b.pow(2).sum(-1)).sum()).sqrt())  # noqa
        assert prof["units"][f"{q}.gate_up"]["error"]["gptq"] == pytest.approx(rel(hq, hb), rel=1e-3)
        assert prof["units"][f"{q}.down_proj"]["error"]["gptq"] == pytest.approx(
            rel(hb @ Wq["down_proj"].T, hb @ Wb["down_proj"].T), rel=1e-3)

    # bytes: what the loader really holds, per source, in the config's dtype (bf16)
    for name, path in (("model", "bf16"), ("fp8", "fp8"), ("gptq", "gptq")):
        stats = mixprec.load(h["paths"][path], device="cpu", dtype=torch.bfloat16, progress=False).stats
        assert stats.bytes_total == sum(u["bytes"][name] for u in prof["units"].values())


def test_profile_sees_the_sensitive_experts(hetero):
    prof, info = hetero["prof"], hetero["info"]
    for l, sensitive in info["sensitive"].items():
        errs = {e: prof["units"][f"model.layers.{l}.mlp.experts.{e}.gate_up"]["error"] for e in range(16)}
        measured = {e: v for e, v in errs.items() if v["gptq"] is not None}
        sens = [v["gptq"] for e, v in measured.items() if e in sensitive]
        rest = [v["gptq"] for e, v in measured.items() if e not in sensitive]
        assert min(sens) > 1.4 * statistics.median(rest)
        assert all(v["fp8"] < 0.5 * v["gptq"] for v in measured.values())      # fp8 barely notices outliers
        assert all(v["model"] == 0.0 for v in errs.values())
        top = max(range(16), key=lambda e: prof["routing"][l]["mass"][e])
        assert prof["routing"][l]["mass"][top] > 0.2                              # the router is skewed
        assert sum(m < 0.005 for m in prof["routing"][l]["mass"]) >= 4


def test_plan_keeps_folded_awq_pairs_together(tmp_path):
    """An AWQ source folds scales into its norms: its v/o, dense up/down and each expert's
    gate_up/down must come together. The profile measures them as pairs, the plan never splits
    them, and the planned YAML loads (the loader refuses split pairs)."""
    paths = make_fixture(tmp_path, formats=["bf16", "awq"], layers=2, hidden=128, experts=4, heads=2, kv_heads=1,
                         moe_intermediate=64, intermediate=128, vocab=512)
    cfg = MixConfig(model=paths["bf16"], sources={"awq": paths["awq"]}, dtype=torch.float32)
    ids = torch.randint(0, 509, (2, 64), generator=torch.Generator().manual_seed(0))
    prof = profile_model(cfg, ids, progress=False)
    assert len(prof["pairs"]) == 2 + 4 + 1          # v/o per layer, experts of layer 1, dense up/down of layer 0
    for pr in prof["pairs"]:
        assert "awq" not in prof["units"][pr["units"][0]]["error"] and pr["error"]["awq"] > 0
    lo, hi = bytes_range(prof)
    for frac in (0.1, 0.4, 0.7):
        res = plan_budget(prof, int(lo + frac * (hi - lo)))
        for pr in prof["pairs"]:
            a, b = pr["units"]
            assert (res.choice[a] == "awq") == (res.choice[b] == "awq")
        assert res.cost == pytest.approx(predicted_cost(prof, res.choice))
        mix = to_mix_config(prof, res.choice, paths["bf16"], paths, dtype=torch.float32)
        model = mixprec.load(mix, device="cpu", progress=False)
        # the budget holds for what the loader keeps, AWQ input rescales included (bookkeeping
        # tensors aside: expert maps, RoPE frequencies)
        assert model.stats.bytes_total + prof["plain_bytes"] == res.bytes
        held = {(t.data_ptr(), t.numel()): t.numel() * t.element_size()
                for n, t in [*model.named_parameters(), *model.named_buffers()]
                if not n.endswith(("expert_map", ".experts", "inv_freq"))}
        assert sum(held.values()) <= res.bytes


# -- the knapsack -----------------------------------------------------------------------------------
def _brute_force(options, budget):
    best = None
    for pick in itertools.product(*[range(len(o)) for o in options]):
        b = sum(options[g][i][0] for g, i in enumerate(pick))
        c = sum(options[g][i][1] for g, i in enumerate(pick))
        if b <= budget and (best is None or c < best):
            best = c
    return best


def test_solver_never_exceeds_the_budget_and_is_near_optimal():
    rng = random.Random(1234)
    feasible, off = 0, []
    for trial in range(300):
        G = rng.randint(1, 6)
        options = [[(rng.randint(1, 100), rng.random() * rng.choice([0.01, 1, 10])) for _ in range(rng.randint(1, 4))]
                   for _ in range(G)]
        lo = sum(min(b for b, _ in o) for o in options)
        hi = sum(max(b for b, _ in o) for o in options)
        budget = rng.randint(max(0, lo - 20), hi + 20)
        if budget < lo:
            with pytest.raises(InfeasibleBudget) as ei:
                solve(options, budget)
            assert ei.value.minimum == lo and str(lo) in str(ei.value) or "below the smallest" in str(ei.value)
            continue
        pick = solve(options, budget)
        used = sum(options[g][i][0] for g, i in enumerate(pick))
        cost = sum(options[g][i][1] for g, i in enumerate(pick))
        assert used <= budget, (trial, options, budget, pick)
        opt = _brute_force(options, budget)
        # Lagrangian + fill: within one group's cost range of the optimum (usually equal)
        slack = max(max(c for _, c in o) - min(c for _, c in o) for o in options)
        assert cost <= opt + slack + 1e-12, (trial, options, budget)
        if budget >= hi:
            assert cost == pytest.approx(sum(min(c for _, c in o) for o in options))
        feasible += 1
        if cost > opt + 1e-12:
            off.append((cost - opt) / opt)
    # usually the optimum itself: the solver misses 7 of these 255 cases, by at most 20%; one that
    # stops at the first step that does not fit or skips the fill pass misses 28, by up to 38%
    assert len(off) <= 0.05 * feasible and max(off, default=0) <= 0.25, (len(off), feasible, max(off, default=0))


def test_plan_budget_over_random_profiles_never_exceeds_and_names_the_minimum():
    rng = random.Random(7)
    for trial in range(40):
        units = {}
        for i in range(rng.randint(3, 40)):
            b = rng.randint(100, 10_000)
            units[f"u{i}"] = {"layer": 0, "kind": "attn", "expert": None, "modules": [f"m{i}"], "mass": 1.0,
                              "count": 1, "bytes": {"model": 4 * b, "fp8": 2 * b + 7, "int4": b // 2 + 3},
                              "error": {"model": 0.0, "fp8": rng.random() * 0.05, "int4": rng.random() * 0.3}}
        prof = {"units": units, "pairs": [], "plain_bytes": rng.randint(0, 5000), "sources": {"model": {}, "fp8": {},
                "int4": {}}, "routing": {}}
        lo, hi = bytes_range(prof)
        for budget in [rng.randint(lo, hi) for _ in range(5)] + [lo, hi]:
            res = plan_budget(prof, budget)
            assert res.bytes == assignment_bytes(prof, res.choice) <= budget
            assert res.cost == pytest.approx(predicted_cost(prof, res.choice))
        with pytest.raises(InfeasibleBudget, match=f"smallest possible mix: .*{lo} bytes"):
            plan_budget(prof, lo - 1)


def test_plan_cli_infeasible_budget_names_the_minimum(hetero, tmp_path, capsys):
    prof_path = tmp_path / "p.json"
    prof_path.write_text(json.dumps(hetero["prof"]))
    lo, _ = bytes_range(hetero["prof"])
    assert plan_main(["--profile", str(prof_path), "--budget", str(lo - 1)]) == 2
    err = capsys.readouterr().err
    assert "below the smallest possible mix" in err and str(lo) in err
    assert plan_main(["--profile", str(prof_path), "--budget", "12parsecs"]) == 2
    assert "expected a size like" in capsys.readouterr().err


def test_cli_refuses_bad_numbers_and_dtypes_with_exit_2(hetero, tmp_path, capsys):
    """Bad option values are exit 2 with a message naming the option (they had crashed with a
    traceback, or planned a budget the model would not fit)."""
    from mixprec.__main__ import main

    def rc(fn, argv):                       # argparse's own refusals exit 2 through SystemExit
        try:
            return fn(argv)
        except SystemExit as e:
            return e.code

    prof_path = tmp_path / "p.json"
    prof_path.write_text(json.dumps(hetero["prof"]))
    _, hi = bytes_range(hetero["prof"])
    p = ["--profile", str(prof_path)]
    cases = [(plan_main, p + ["--fit", "2MiB", "--margin", "abc%"], "--margin"),
             (plan_main, p + ["--fit", "2MiB", "--context", "1", "--margin=-100%"], "--margin"),
             (plan_main, p + ["--budget", str(hi), "--mass-prior", "-1"], "--mass-prior"),
             (plan_main, p + ["--budget", str(hi), "--dtype", "float32"], "--dtype float32"),  # profiled in bf16
             (plan_main, p + ["--budget", str(hi), "-o", str(tmp_path / "no" / "dir" / "x.yaml")], "cannot write"),
             (eval_main, ["x.yaml", "--synthetic-tokens", "64", "--seq-len", "0"], "--seq-len"),
             (eval_main, ["x.yaml", "--synthetic-tokens", "64", "--batch", "0"], "--batch"),
             (eval_main, ["x.yaml", "--text", "t.txt", "--tokens", "-5"], "--tokens"),
             (main, ["plan", "x.yaml", "--tp", "0"], "--tp"),
             (main, ["plan", "x.yaml", "--tp", "-1", "--ep", "-1"], "--tp")]
    for fn, argv, needle in cases:
        assert rc(fn, argv) == 2, argv
        assert needle in capsys.readouterr().err, argv


def test_kv_cache_and_activations_follow_the_dtype():
    args = mixprec.ModelArgs.from_hf({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 100,
                                      "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                      "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
                                      "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2})
    _, b16 = fit_budget(args, "1GiB", context=1000, batch=2)
    _, f32 = fit_budget(args, "1GiB", context=1000, batch=2, elem=4)
    assert b16["kv_cache"] == 2 * 2 * 2 * 16 * 2 * 1000 * 2 and f32["kv_cache"] == 2 * b16["kv_cache"]
    assert f32["activations"] > b16["activations"]


def test_perplexity_beyond_float32_range():
    from mixprec.planner.evaluate import Metrics
    m = Metrics()
    m.n, m.n_next, m.agree, m.kl = 1, 1, 1, [torch.zeros(1)]
    m.nll_ref, m.nll_mix = 95.0, 1000.0        # exp(95) overflows float32; exp(1000) float64 too
    r = m.result()
    assert r["ppl_ref"] == pytest.approx(1.8112e41, rel=1e-3) and r["ppl_mix"] == float("inf")


def test_parse_bytes():
    assert parse_bytes("60GiB") == 60 * 2**30 and parse_bytes("141GB") == 141 * 10**9
    assert parse_bytes("1.5e3") == 1500 and parse_bytes("512MiB") == 512 * 2**20 and parse_bytes(77) == 77


# -- full-size shapes ---------------------------------------------------------------------------------
def test_spec_nbytes_is_what_the_loaded_layout_holds():
    g = torch.Generator().manual_seed(0)
    for spec, (fmt_name, params) in SPECS.items():
        for n, k in ((192, 256), (384, 1024)):      # 192: a partial 128-row fp8 block
            W = torch.randn(n, k, generator=g) / k ** 0.5
            fmt = FORMATS[fmt_name]
            scheme = resolve_scheme(fmt.config_block(**params) or None, "model.layers.0.mlp.experts.0.up_proj")
            w = load_module(fmt.pack(W, **params), n, k, scheme, where=spec, dtype=torch.bfloat16)
            assert spec_nbytes(spec, n, k) == w.nbytes(), spec


def test_fit_h200_qwen3_235b_synthetic_profile(tmp_path):
    p = tmp_path / "s.json"
    assert profile_main(["synthetic", "--arch", "qwen3-235b-a22b", "--sources", "bf16,fp8,int4", "-o", str(p)]) == 0
    prof = load_profile(p)
    args = mixprec.ModelArgs.from_hf(prof["config"])
    budget, parts = fit_budget(args, "h200", context=32768, batch=1)
    assert parts["kv_cache"] == 2 * 94 * 4 * 128 * 2 * 32768          # bf16 K+V, 32k tokens: 5.9 GiB
    assert parts["prefill_graphs"] == 2 * 94 * 4 * 128 * 2 * 2048      # the staging cache of 2048 tokens
    b0, p0 = fit_budget(args, "h200", context=32768, batch=1, graph_tokens=0)   # serve --prefill-graph-tokens 0
    assert p0["prefill_graphs"] == 0 and b0 == budget + parts["prefill_graphs"]
    with pytest.raises(ConfigError, match="prefill-graph-tokens"):
        fit_budget(args, "h200", context=32768, batch=1, graph_tokens=-1)
    res = plan_budget(prof, budget)
    used = res.bytes + parts["kv_cache"] + parts["activations"] + parts["prefill_graphs"]
    assert res.bytes <= budget and used <= 141 * 10**9 and used + parts["margin"] <= DEVICES["h200"]
    assert res.bytes > 0.99 * budget                                   # the leftover is spent
    assert {"fp8", "int4"} <= set(res.choice.values())                 # a real mix
    # bytes from shapes: int4 g128 = 4 bits + an fp16 scale per 128 weights; all-int4 experts are 117 GB
    experts = [u for u, d in prof["units"].items() if d["kind"] in ("gate_up", "down")]
    per_matrix = 1536 * 4096 // 2 + 1536 * 4096 // 128 * 2
    assert sum(prof["units"][u]["bytes"]["int4"] for u in experts) == 94 * 128 * 3 * per_matrix
    hot = [u for u, d in prof["units"].items() if d["kind"] == "gate_up" and d["mass"] > 0.05]
    cold = [u for u, d in prof["units"].items() if d["kind"] == "gate_up" and d["mass"] < 0.001]
    upgraded = lambda us: sum(res.choice[u] != "int4" for u in us) / len(us)  # noqa: E731
    assert upgraded(hot) > 5 * upgraded(cold)                          # routing mass decides who is upgraded
    # the CLI writes the plan as YAML whose rules reproduce it (checked on layers 0-2 and the head:
    # resolving all 36k modules against ~500 rules takes MixConfig.resolve ~40 s)
    dirs = {n: tmp_path / n for n in ("base", "fp8", "int4")}
    for d in dirs.values():
        d.mkdir()
    out = tmp_path / "plan.yaml"
    assert plan_main(["--profile", str(p), "--model", str(dirs["base"]), "--source", f"fp8={dirs['fp8']}",
                      "--source", f"int4={dirs['int4']}", "--fit", "h200", "--context", "32768", "-o", str(out),
                      "--quiet"]) == 0
    text = out.read_text()
    assert "# fit h200, context 32768 x batch 1" in text
    # without --model / --source the synthetic profile's placeholders would land in the YAML
    assert plan_main(["--profile", str(p), "--fit", "h200", "--quiet"]) == 2
    names = [m for m in args.linear_shapes() if m == "lm_head" or int(m.split(".")[2]) < 3]
    got = {m: s for m, (s, _) in MixConfig.from_dict(yaml.safe_load(text)).resolve(names, errors=[]).items()}
    want = module_sources(prof, res.choice)
    assert got == {m: want.get(m, "model") for m in names}
    # --use without the base: lm_head has only the base (bf16) in a synthetic profile; the error names it
    with pytest.raises(ConfigError, match="--use fp8, int4: unit lm_head has no candidate"):
        plan_budget(prof, budget, ["fp8", "int4"])
    # batch 8 x 32k: the KV cache alone is 50 GB, the smallest mix ~123 GB: refused, naming the minimum
    with pytest.raises(InfeasibleBudget, match="smallest possible mix"):
        plan_budget(prof, fit_budget(args, "h200", context=32768, batch=8)[0])


# -- the command lines ------------------------------------------------------------------------------
def test_cli_profile_plan_eval(hetero, tmp_path, capsys):
    h = hetero
    mix = tmp_path / "sources.yaml"
    mix.write_text(yaml.safe_dump({"model": str(h["paths"]["bf16"]), "dtype": "float32",
                                   "sources": {"fp8": str(h["paths"]["fp8"]), "gptq": str(h["paths"]["gptq"])}}))
    text = tmp_path / "cal.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    prof = tmp_path / "prof.json"
    assert profile_main([str(mix), "--text", str(text), "--tokens", "256", "--seq-len", "128",
                         "--synthetic-tokens", "256", "-o", str(prof), "--quiet", "--device", "cpu"]) == 0
    p = json.loads(prof.read_text())
    assert p["tokens"] == 512 and set(p["sources"]) == {"model", "fp8", "gptq"}
    lo, hi = bytes_range(p)
    out = tmp_path / "plan.yaml"
    assert plan_main(["--profile", str(prof), "--budget", str((lo + hi) // 2), "-o", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "per format:" in shown and "pred. error" in shown
    assert out.read_text().startswith("# planned by `mixprec plan`")
    assert eval_main([str(out), "--synthetic-tokens", "256", "--seq-len", "64", "--json", "--quiet",
                      "--device", "cpu", "--dtype", "float32"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens"] == 256 and 0 < r["mean_kl"] <= r["p99_kl"] <= r["max_kl"] and 0.5 < r["top1_agreement"] <= 1
    assert r["ppl_ref"] > 1 and r["ppl_mix"] > 1
    # an all-bf16 "mix" against itself: zero divergence
    assert eval_main([str(h["paths"]["bf16"]), "--synthetic-tokens", "128", "--seq-len", "64", "--json", "--quiet",
                      "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["mean_kl"] == 0 and r["top1_agreement"] == 1 and r["ppl_ref"] == r["ppl_mix"]
    assert profile_main([str(mix), "-o", str(prof)]) == 2
    assert "--text" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_and_eval_on_gpu(hetero, tmp_path):
    h, cpu = hetero, hetero["prof"]
    gpu = profile_model(h["cfg"], h["cal"], device="cuda", progress=False)
    for l, r in cpu["routing"].items():       # fp32 on both; a near-tie in top-k may flip a token or two
        assert sum(abs(a - b) for a, b in zip(gpu["routing"][l]["count"], r["count"])) <= 4
        assert gpu["routing"][l]["mass"] == pytest.approx(r["mass"], abs=2e-3)
    for name, u in cpu["units"].items():
        assert gpu["units"][name]["bytes"] == u["bytes"]
        for s, e in u["error"].items():
            if e is not None and u["count"] >= 20:
                assert gpu["units"][name]["error"][s] == pytest.approx(e, rel=2e-2, abs=1e-6), (name, s)
    lo, hi = bytes_range(cpu)
    res = plan_budget(cpu, (lo + hi) // 2)
    path = tmp_path / "plan.yaml"
    path.write_text(to_mix_config(cpu, res.choice, h["paths"]["bf16"], h["paths"]).to_yaml())
    r = evaluate(path, h["held"], device="cuda", progress=False)
    assert 0 < r["mean_kl"] < 0.05 and r["top1_agreement"] > 0.8 and r["tokens"] == h["held"].numel()


def test_kl_metrics_reference_values():
    ref = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])
    mix = torch.tensor([[[0.0, 0.0], [0.0, 2.0]]])
    r = kl_metrics(ref, mix, torch.tensor([[0, 0]]))
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    kl1 = float((p * (p.log() - p.flip(0).log())).sum())
    assert r["mean_kl"] == pytest.approx(kl1 / 2) and r["max_kl"] == pytest.approx(kl1)
    assert r["top1_agreement"] == 0.5
    assert r["ppl_ref"] == pytest.approx(2.0) and r["ppl_mix"] == pytest.approx(2.0)   # position 0: uniform


if __name__ == "__main__":
    import tempfile
    from pathlib import Path
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp())
    paths = make_heterogeneous_fixture(root, seed=0)
    cfg = MixConfig(model=paths["bf16"], sources={"fp8": paths["fp8"], "gptq": paths["gptq"]}, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    cal, held = torch.randint(0, 509, (8, 128), generator=g), torch.randint(0, 509, (8, 128), generator=g)
    print(format_table(comparison_table(dict(cfg=cfg, held=held, prof=profile_model(cfg, cal, progress=False)))))
