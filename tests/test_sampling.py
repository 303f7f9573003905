"""Sampler: greedy rows, exact distribution of the exponential race, top-k / top-p masks,
per-request determinism of the counter noise."""
import pytest
import torch

from mixprec.runtime.generate import counter_noise
from mixprec.runtime.sampling import sample


def _params(B, temperature=1.0, top_k=0, top_p=1.0):
    return (torch.full((B,), temperature), torch.full((B,), top_k, dtype=torch.long), torch.full((B,), top_p))


def test_greedy_rows_ignore_noise():
    logits = torch.randn(4, 50)
    t, k, p = _params(4, temperature=0.0)
    noise = torch.empty(4, 50).exponential_()
    assert torch.equal(sample(logits, t, k, p, noise), logits.argmax(-1))


def test_exponential_race_matches_softmax():
    torch.manual_seed(0)
    logits = torch.randn(1, 6) * 1.5
    n = 40000
    L = logits.expand(n, 6)
    t, k, p = _params(n, temperature=0.8)
    seeds = torch.arange(n)
    draws = sample(L, t, k, p, counter_noise(seeds, torch.zeros(n, dtype=torch.long), 6), filtered=False)
    freq = torch.bincount(draws, minlength=6).float() / n
    expect = torch.softmax(logits[0] / 0.8, -1)
    assert (freq - expect).abs().max() < 0.01, (freq, expect)


def test_top_k_and_top_p_restrict_support():
    torch.manual_seed(1)
    logits = torch.randn(1, 20).expand(5000, 20)
    order = logits[0].argsort(descending=True)
    t, k, p = _params(5000, temperature=1.0, top_k=3)
    noise = counter_noise(torch.arange(5000), torch.zeros(5000, dtype=torch.long), 20)
    drawn = set(sample(logits, t, k, p, noise).tolist())
    assert drawn == set(order[:3].tolist())
    probs = torch.softmax(logits[0], -1)[order]
    # smallest prefix whose mass reaches 0.5
    need = int((probs.cumsum(0) < 0.5).sum()) + 1
    t, k, p = _params(5000, temperature=1.0, top_p=0.5)
    drawn = set(sample(logits, t, k, p, noise).tolist())
    assert drawn == set(order[:need].tolist())


def test_filtered_draws_follow_the_renormalised_softmax():
    """top-k / top-p rows draw the kept tokens with their renormalised probabilities (not just
    from the right support): 40k draws within 0.01 of softmax over the kept tokens."""
    torch.manual_seed(3)
    logits = torch.randn(1, 12) * 1.5
    n = 40000
    p = torch.softmax(logits[0], -1)
    order = p.argsort(descending=True)
    noise = counter_noise(torch.arange(n), torch.zeros(n, dtype=torch.long), 12)
    for k, top_p, keep in ((3, 1.0, 3), (0, 0.5, int((p[order].cumsum(0) < 0.5).sum()) + 1)):
        t, kk, pp = _params(n, temperature=1.0, top_k=k, top_p=top_p)
        freq = torch.bincount(sample(logits.expand(n, 12), t, kk, pp, noise), minlength=12).float() / n
        expect = torch.zeros(12)
        expect[order[:keep]] = p[order[:keep]] / p[order[:keep]].sum()
        assert keep > 1 and (freq - expect).abs().max() < 0.01, (k, top_p, freq, expect)


def test_counter_noise_is_per_request():
    a = counter_noise(torch.tensor([7, 8]), torch.tensor([3, 3]), 100)
    b = counter_noise(torch.tensor([1, 7]), torch.tensor([0, 3]), 100)
    assert torch.equal(a[0], b[1])           # same (seed, step): same draws whatever the batch
    assert not torch.equal(a[0], a[1])
    assert (a > 0).all() and torch.isfinite(a).all()
    assert abs(a.mean().item() - 1.0) < 0.25  # Exp(1)


def test_unfiltered_rows_draw_the_same_token_on_the_filtered_path():
    # the engine takes the filtered path when any row of the batch uses top-k / top-p: a row that
    # uses neither must draw what it draws alone (same seed, same step), or its tokens depend on
    # its neighbours. top_k = 0 and top_p = 1 keep the whole vocabulary, so the draws are equal.
    torch.manual_seed(2)
    n, V = 256, 40
    logits = torch.randn(n, V) * 2
    t, k, p = _params(n, temperature=0.9)
    noise = counter_noise(torch.arange(n), torch.full((n,), 5), V)
    assert torch.equal(sample(logits, t, k, p, noise, filtered=True),
                       sample(logits, t, k, p, noise, filtered=False))


def test_tiny_temperature_is_greedy_not_nan():
    logits = torch.randn(3, 30) * 20
    noise = torch.empty(3, 30).exponential_()
    for temp in (1e-40, 1e-20, 1e-6):
        t, k, p = _params(3, temperature=temp)
        for filtered in (False, True):
            assert torch.equal(sample(logits, t, k, p, noise, filtered), logits.argmax(-1)), (temp, filtered)


def test_params_that_do_not_fit_the_device_tensors_are_refused():
    import pytest

    from mixprec.runtime.sampling import SamplingParams
    for bad in ({"top_k": 2**63}, {"seed": 2**63}, {"seed": -2**63 - 1}, {"temperature": float("nan")},
                {"temperature": float("inf")}, {"top_p": float("nan")}, {"max_new_tokens": -1},
                {"max_new_tokens": "5"}, {"seed": "x"}, {"stop": "rx"}, {"stop": ("",)}, {"stop_token_ids": ("a",)}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}="):
            SamplingParams(**bad).validate()
    SamplingParams(top_k=2**63 - 1, seed=-2**63, temperature=1e-40).validate()
    for bad in ({"temperature": "0.5"}, {"top_k": 2.0}, {"seed": "7"}):          # plain(): numbers only
        with pytest.raises(ValueError, match="invalid sampling parameters"):
            SamplingParams(**bad).plain()
    # numpy / torch scalars and a set of stop ids become plain values (they worked before validate())
    np = pytest.importorskip("numpy")
    p = SamplingParams(temperature=torch.tensor(0.7), top_p=np.float32(0.9), top_k=np.int64(5),
                       max_new_tokens=np.int64(3), seed=torch.tensor(4), stop_token_ids={1, 2}).plain().validate()
    assert (type(p.temperature), type(p.top_k), type(p.max_new_tokens), type(p.seed)) == (float, int, int, int)
    assert sorted(p.stop_token_ids) == [1, 2]


# the decode step's one-launch next token (kernels/sampling.py), greedy and sampled: CPU runs it in
# Triton's interpreter (fp16 / fp32: its bf16 is wrong), CUDA also in bf16
_DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32] + ([torch.bfloat16] if _DEV == "cuda" else []))
@pytest.mark.parametrize("B, V", [(1, 151936), (3, 20000), (5, 1000), (64, 5000)])
def test_next_token_advance_matches_torch(dtype, B, V):
    from mixprec.kernels.sampling import next_token_advance
    g = torch.Generator(device=_DEV).manual_seed(V + B)
    logits = torch.randn(B, V, generator=g, device=_DEV).to(dtype)
    # ties across chunks and inside one: the first index must win, as in torch.argmax
    logits[0, V // 3] = logits[0, V - 1] = logits[0, V // 2] = 50.0
    if B > 2:
        logits[1] = float("-inf")                       # all -inf: index 0
        logits[2, V // 4] = float("nan")                # NaN counts as the largest
    tokens = torch.full((B, 1), -7, dtype=torch.long, device=_DEV)
    pos = torch.arange(B, dtype=torch.long, device=_DEV)[:, None] + 10
    step = torch.arange(B, dtype=torch.long, device=_DEV) + 3
    live = (torch.arange(B, device=_DEV) % 2 == 0).long()
    want = logits.float().argmax(-1)
    for rep in range(2):                                # the counters are left at zero for the next launch
        next_token_advance(logits, tokens[:, 0], pos[:, 0], step, live)
        assert torch.equal(tokens[:, 0], want)
        torch.testing.assert_close(pos[:, 0], torch.arange(B, device=_DEV) + 10 + (rep + 1) * live)
        torch.testing.assert_close(step, torch.arange(B, device=_DEV) + 3 + (rep + 1) * live)
    assert want[0] == V // 3 and (B <= 2 or (want[1] == 0 and want[2] == V // 4))
    next_token_advance(logits, tokens[:, 0], pos[:, 0], step)          # no live mask: every row advances
    torch.testing.assert_close(step, torch.arange(B, device=_DEV) + 3 + 2 * live + 1)


@pytest.mark.parametrize("B, V", [(1, 151936), (5, 1000), (64, 5000)])
def test_next_token_advance_samples_as_the_torch_race(B, V):
    """With temperatures (some rows 0: greedy, one below MIN_TEMPERATURE) the one launch draws what
    runtime.sampling.sample draws from counter_noise(seed, step) without top-k / top-p, step after
    step; ties in the race are measure-zero, so the tokens must be equal."""
    from mixprec.kernels.sampling import next_token_advance
    from mixprec.runtime.sampling import MIN_TEMPERATURE
    g = torch.Generator(device=_DEV).manual_seed(V)
    logits = (torch.randn(B, V, generator=g, device=_DEV) * 3).to(torch.float16 if _DEV == "cpu" else torch.bfloat16)
    temp = torch.rand(B, generator=g, device=_DEV) * 1.5 + 0.2
    temp[::3] = 0.0
    if B > 1:
        temp[1] = 1e-7
    seed = torch.randint(0, 2 ** 62, (B,), generator=g, device=_DEV)
    tokens = torch.zeros(B, 1, dtype=torch.long, device=_DEV)
    pos = torch.zeros(B, 1, dtype=torch.long, device=_DEV)
    step = torch.randint(0, 100, (B,), generator=g, device=_DEV)
    k, p = torch.zeros(B, dtype=torch.long, device=_DEV), torch.ones(B, device=_DEV)
    drawn = []
    for _ in range(3):
        want = sample(logits.float(), temp, k, p, counter_noise(seed, step, V), filtered=False)
        next_token_advance(logits, tokens[:, 0], pos[:, 0], step, sampling=(temp, seed, MIN_TEMPERATURE))
        assert torch.equal(tokens[:, 0], want)
        drawn.append(want.clone())
    assert torch.equal(pos[:, 0], torch.full((B,), 3, device=_DEV))
    if B > 2:     # sampled rows move between steps, greedy rows (temperature 0) stay
        assert not torch.equal(drawn[0][2], drawn[1][2]) or not torch.equal(drawn[1][2], drawn[2][2])
        assert torch.equal(drawn[0][0], drawn[2][0])


def _filtered_case(B, V, kind, g):
    """Logits with the kept set's boundary inside ties: "peaked" (a few dozen candidates: the sorted
    path on GPU), "flat" (N(0, 0.3) under V / 3 tied top tokens: hundreds to thousands kept) or
    "mid" (N(0, 1) with V / 3 tied at 0: the cut inside the ties, after sure tokens above them)."""
    logits = torch.randn(B, V, generator=g, device=_DEV) * {"peaked": 2.0, "flat": 0.3, "mid": 1.0}[kind]
    if kind == "flat":
        logits[:, ::3] = 1.0
    elif kind == "mid":
        logits[:, 1::3] = 0.0
    else:
        logits[:, 20:50] = 9.0                                  # 30 tied top tokens: top-k 5 keeps 20..24
        logits[:, 60:80] = torch.linspace(8.5, 6.0, 20, device=_DEV)
    return logits


def _kept(scaled: torch.Tensor, top_k: int, top_p: float) -> int:
    """How many tokens of a row top-k / top-p keep (the reference's rule, counted)."""
    probs = torch.softmax(scaled, -1)[scaled.sort(descending=True, stable=True).indices]
    n = int(((probs.cumsum(-1) - probs) < top_p).sum())
    return min(n, top_k) if top_k > 0 else n


def _edge_seeds(scaled: torch.Tensor, n: int, step: int) -> list[int]:
    """Seeds whose race, among the first n + 1 tokens of the order, is won by token n + 1 (a
    kernel keeping one token too many draws it), among the first n by token n (one too few misses
    it), and among all tokens by one after the first n (a kept set far too large may draw it): a
    wrong kept set then draws another token, whatever the noise."""
    V = scaled.shape[-1]
    order = scaled.sort(descending=True, stable=True).indices
    ranked, found = scaled[order], {}
    for seed in range(4000):
        sc = ranked - counter_noise(torch.tensor([seed], device=scaled.device),
                                    torch.tensor([step], device=scaled.device), V)[0][order].log()
        for m in (n + 1, n):
            if m > 1 and m <= V and m not in found and int(sc[:m].argmax()) == m - 1:
                found[m] = seed
        if "all" not in found and int(sc.argmax()) > n and seed not in found.values():
            found["all"] = seed
        if len(found) == 3 - (n == 1):
            break
    return list(found.values())


# CPU: V <= CAP keeps every filtered row's candidates in the buffer (SMALL 8, MID 16: most of
# them narrowed by bins before the sort); CAP 16 sends the flat rows through the refining launch
# (sure tokens, then the band), their ties at the cut (no bin splits them) to the bisection over
# the candidates, and BIG 39 to the bisection over the row, in fp16 and fp32 (the logit keys drop
# 13 / no bits)
@pytest.mark.parametrize("V, cap, big, kind, dtype", [(120, 128, 128, "peaked", "f16"), (120, 128, 128, "flat", "f16"),
                                                      (120, 16, 16384, "flat", "f16"), (120, 16, 16384, "mid", "f16"),
                                                      (120, 16, 39, "flat", "f16"), (120, 16, 39, "mid", "f32")]
                         + ([(151936, None, None, kind, "bf16") for kind in ("peaked", "flat", "mid")]
                            if _DEV == "cuda" else []))
def test_next_token_advance_filters_as_the_torch_sampler(V, cap, big, kind, dtype, monkeypatch):
    """top-k / top-p rows (with greedy, unfiltered and tiny-temperature rows in the batch) draw in
    one call what runtime.sampling.sample draws: the kept set is the first tokens of the order
    (scaled logit descending, token id ascending) in both, the race uses the same noise, and the
    seeds are chosen so that a kept set one token too large or too small draws otherwise. Rounding
    of the masses (the kernel sums in another order) could move a token sitting exactly at the
    top-p boundary; the cases keep clear of that (ties are the same value, so they fall together).
    On CPU (the interpreter) CAP and BIG are set to cover every path at V = 120."""
    from mixprec.kernels import sampling as ks
    from mixprec.kernels.sampling import next_token_advance
    if cap:
        monkeypatch.setattr(ks, "CAP", cap)
        monkeypatch.setattr(ks, "BIG", big)
        monkeypatch.setattr(ks, "SMALL", 8)
        monkeypatch.setattr(ks, "MID", 16)
    from mixprec.runtime.sampling import MIN_TEMPERATURE
    g = torch.Generator(device=_DEV).manual_seed(V + len(kind))
    row = _filtered_case(1, V, kind, g).to({"f16": torch.float16, "f32": torch.float32, "bf16": torch.bfloat16}[dtype])
    configs = [(0.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8 if kind == "mid" else 0.9),     # mid: the cut inside its ties
               (1.3, 20, 0.8), (1e-7, 3, 0.5), (0.9, 0, 1.0),
               (1.0, 60 if kind == "mid" else 90 if cap else 1200, 1.0),    # mid: in its ties; GPU: above CAP
               (2.0, 0, 0.99), (1.0, 0, 0.3)]
    step0 = 7
    rows = []       # (temperature, top_k, top_p, seed): every filtered config with its edge seeds
    for t, k, p in configs:
        if t > 0 and (k > 0 or p < 1):
            scaled = row[0].float() / max(t, MIN_TEMPERATURE)
            rows += [(t, k, p, sd) for sd in _edge_seeds(scaled, _kept(scaled, k, p), step0)]
        else:
            rows.append((t, k, p, 1))
    B = len(rows)
    logits = row.expand(B, V).contiguous()
    temp, k, p, seed = (torch.tensor([r[i] for r in rows], device=_DEV) for i in range(4))
    k = k.long()
    step = torch.full((B,), step0, device=_DEV)
    tokens = torch.zeros(B, 1, dtype=torch.long, device=_DEV)
    pos = torch.zeros(B, 1, dtype=torch.long, device=_DEV)
    live = torch.ones(B, dtype=torch.long, device=_DEV)
    live[B // 2:] = 0
    for _ in range(2):
        before = step.clone()
        want = sample(logits.float(), temp, k, p, counter_noise(seed, step, V), filtered=True)
        next_token_advance(logits, tokens[:, 0], pos[:, 0], step, live, (temp, seed, MIN_TEMPERATURE), (k, p),
                           tiles=(64, 64) if cap else None)     # CPU: two chunks per row, small blocks
        assert torch.equal(tokens[:, 0], want)
        assert torch.equal(step, before + live)
    if kind == "peaked":      # the tied top tokens: top-k 5 keeps the first five ids
        assert 20 <= int(want[1]) < 25


def test_next_token_advance_filters_at_a_tiny_temperature_and_large_logits():
    """s = logit / max(t, MIN_TEMPERATURE) reaches 1e7 with logits near 100, where an fp32 ulp is a
    whole nat: the kernel's thresholds (a level or two below the row max) must not round up onto
    the max and leave the kept set empty. Two rows keep only their top token (as the torch sampler),
    one keeps 3 of 6 exact ties at the max (all equal after the division: the first three ids)."""
    from mixprec.kernels.sampling import next_token_advance
    from mixprec.runtime.sampling import MIN_TEMPERATURE
    V = 120
    g = torch.Generator(device=_DEV).manual_seed(5)
    logits = torch.randn(3, V, generator=g, device=_DEV) + 90.0
    logits[0, 17] = 100.0
    logits[1, 70] = 99.5
    logits[2, 30:36] = 100.0
    temp = torch.full((3,), 1e-7, device=_DEV)
    k = torch.tensor([3, 0, 3], device=_DEV)
    p = torch.tensor([0.9, 0.5, 1.0], device=_DEV)
    seed = torch.arange(3, device=_DEV) + 1
    step = torch.zeros(3, dtype=torch.long, device=_DEV)
    tokens = torch.zeros(3, dtype=torch.long, device=_DEV)
    pos = torch.zeros(3, dtype=torch.long, device=_DEV)
    want = sample(logits, temp, k, p, counter_noise(seed, step, V), filtered=True)
    next_token_advance(logits, tokens, pos, step, None, (temp, seed, MIN_TEMPERATURE), (k, p), tiles=(64, 64))
    assert torch.equal(tokens, want)
    assert int(want[0]) == 17 and int(want[1]) == 70 and 30 <= int(want[2]) < 33


@pytest.mark.parametrize("filtered", [False, True])
def test_first_token_takes_the_kernels_and_draws_as_the_torch_sampler(filtered, monkeypatch):
    """The prefill's token (runtime.generate.first_token, Engine and Generator) comes from the
    decode step's kernels where use_kernels says so (here: CUDA, or the interpreter on CPU), equal
    to the torch sampler's draw row by row (greedy, sampled, top-k / top-p rows), and leaves step
    unchanged (the noise counter of the first token is the caller's step)."""
    from types import SimpleNamespace

    from mixprec.formats.base import interpreter_kernels
    from mixprec.runtime import generate
    g = torch.Generator(device=_DEV).manual_seed(11)
    logits = (torch.randn(5, 120, generator=g, device=_DEV) * 2).to(torch.float16 if _DEV == "cpu" else torch.bfloat16)
    temp = torch.tensor([0.0, 0.8, 1.0, 0.7, 1.2], device=_DEV)
    top_k = torch.tensor([0, 0, 5, 0, 40] if filtered else [0] * 5, device=_DEV)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5, 0.95] if filtered else [1.0] * 5, device=_DEV)
    params = SimpleNamespace(temperature=temp, top_k=top_k, top_p=top_p, seed=torch.arange(5, device=_DEV) + 3)
    step = torch.tensor([0, 0, 3, 5, 9], device=_DEV)
    want = generate.sample_tokens(logits, params, step, True, filtered)
    calls = []
    real = generate.next_token_advance
    monkeypatch.setattr(generate, "next_token_advance", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    with interpreter_kernels():
        got = generate.first_token(logits, params, step, True, filtered)
    assert calls == [1] and torch.equal(got, want)
    assert torch.equal(step, torch.tensor([0, 0, 3, 5, 9], device=_DEV))


def test_penalize_and_count_tokens():
    """OpenAI's penalties: logit - frequency * count - presence * (count > 0), per row; counting
    adds the new token of live rows only."""
    from mixprec.runtime.sampling import count_tokens, penalize
    counts = torch.zeros(3, 6, dtype=torch.int32)
    count_tokens(counts, torch.tensor([2, 2, 5]))
    count_tokens(counts, torch.tensor([2, 4, 5]), live=torch.tensor([1, 1, 0]))
    assert counts.tolist() == [[0, 0, 2, 0, 0, 0], [0, 0, 1, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    logits = torch.arange(18, dtype=torch.bfloat16).reshape(3, 6)
    out = penalize(logits, counts, torch.tensor([1.0, 0.0, -0.5]), torch.tensor([0.25, 2.0, 0.0]))
    want = logits.float().clone()
    want[0, 2] -= 2 * 0.25 + 1.0
    want[1, 2] -= 2.0
    want[1, 4] -= 2.0
    want[2, 5] += 0.5
    assert out.dtype == torch.float32 and torch.equal(out, want)
