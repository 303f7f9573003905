"""Continuous-batching engine: every request must get exactly what the static-batch Generator
gives it alone, whatever else runs beside it (admission mid-flight, bucket changes, slot reuse,
cancellation), plus queue bounds, stop strings and the thread / asyncio interfaces.

The fixture model runs in float32 on CPU (bf16 matmuls are very slow there; batching logic does
not depend on the dtype). GPU tests (bf16, CUDA graphs) run when CUDA is present."""
import asyncio
import contextlib
import json
import threading
import time

import pytest
import torch

import mixprec
from mixprec.runtime.engine import _common_prefix, Engine, EngineStopped, QueueFull
from mixprec.runtime.generate import Generator
from mixprec.runtime.prefill import Prefill, bucket
from mixprec.runtime.sampling import SamplingParams
from mixprec.testing.fixtures import make_fixture

T_OUT = 60          # seconds any single wait may take before the test fails


@pytest.fixture(scope="module")
def model(tiny_f32_model):
    return tiny_f32_model


def prompts(n, lo=1, hi=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, 500, (k,), generator=g).tolist() for k in lens]


def alone(model, prompt, params):
    return Generator(model).generate([prompt], params)[0]


def test_greedy_matches_generator_under_load(model):
    ps = prompts(10, seed=1)
    params = [SamplingParams(max_new_tokens=4 + 3 * (i % 5)) for i in range(10)]
    ref = [alone(model, p, sp) for p, sp in zip(ps, params)]
    # a stop id that greedy decoding of prompt 0 hits at its 3rd token: both must stop there
    params[0] = SamplingParams(max_new_tokens=16, stop_token_ids=(ref[0][2], 10_000))
    ref[0] = alone(model, ps[0], params[0])
    assert len(ref[0]) == 3
    with Engine(model, max_batch=4, max_len=96) as eng:      # 10 requests through 4 slots
        reqs = [eng.submit(p, sp) for p, sp in zip(ps, params)]
        got = [r.result(T_OUT) for r in reqs]
        assert [r.output_ids for r in got] == ref
        assert got[0].finish_reason == "stop" and all(r.finish_reason == "length" for r in got[1:])
        m = eng.metrics()
        assert m["tokens_generated"] == sum(map(len, ref)) and m["requests_finished"] == 10
        assert m["requests_active"] == 0 and m["requests_queued"] == 0 and m["gpu_memory_allocated_bytes"] == 0
        assert m["decode_steps"] < sum(map(len, ref))                  # steps were shared
        # text: the decoded ids (special tokens skipped), streamed as deltas that add up to it
        tok = model.tokenizer
        for r in got:
            assert r.text == tok.decode(r.output_ids)
            assert "".join(d.text for d in r.deltas()) == r.text


@pytest.mark.parametrize("n,T", [(1, 1), (1, 17), (3, 5), (2, 40)])
def test_staged_prefill_equals_plain_prefill(model, n, T):
    """The graph path of Prefill (here run eagerly on the CPU: the same padded forward into the
    staging cache, then the copy) gives the plain forward's logits and cache rows [:T], fills rows
    at an offset of a bigger cache, and leaves slots past T alone; over graph_tokens it is plain."""
    g = torch.Generator().manual_seed(n * 100 + T)
    lens = [T] + torch.randint(1, T + 1, (n - 1,), generator=g).tolist()
    ids = torch.zeros(n, T, dtype=torch.long)
    for i, k in enumerate(lens):
        ids[i, :k] = torch.randint(0, 500, (k,), generator=g)
    last = torch.tensor(lens) - 1
    plain, staged = (model.make_cache(6, 64) for _ in range(2))
    for c in (plain, staged):
        c.k.fill_(7.0)
        c.v.fill_(7.0)
    want = Prefill(model, use_graphs=False)(ids, last, plain.rows(2, 2 + n, 48))
    pre = Prefill(model, use_graphs=True)
    for _ in range(2):              # the second call reuses the bucket's static buffers
        got = pre(ids, last, staged.rows(2, 2 + n, 48))
    assert list(pre._shapes) == [(bucket(n), bucket(T, 16))]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(staged.k[:, 2:2 + n, :, :T], plain.k[:, 2:2 + n, :, :T], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(staged.v[:, 2:2 + n, :, :T], plain.v[:, 2:2 + n, :, :T], rtol=1e-5, atol=1e-5)
    untouched = torch.ones_like(staged.k, dtype=torch.bool)
    untouched[:, 2:2 + n, :, :T] = False
    assert (staged.k[untouched] == 7.0).all() and (staged.v[untouched] == 7.0).all()
    small = Prefill(model, use_graphs=True, graph_tokens=bucket(n) * bucket(T, 16) - 1)
    torch.testing.assert_close(small(ids, last, staged.rows(2, 2 + n, 48)), want, rtol=1e-5, atol=1e-5)
    assert not small._shapes


@pytest.mark.parametrize("kernels", [False, True])
def test_tail_graph_path_equals_eager_tail(model, kernels, tmp_path):
    """Prefill.tail's graph path (run eagerly on the CPU: the bucket's padded forward through the
    cache mapped to a row given as a tensor) gives the eager tail's logits and K/V for any row and
    prefix length with one bucket, and writes nothing but its row's slots from the prefix on (the
    padding's clamped to the last slot). kernels: the norm / RoPE / cache-write and prefill
    attention kernels in the interpreter (fp16 model), else the readable path."""
    from mixprec.formats.base import interpreter_kernels
    m = model if not kernels else mixprec.load(make_fixture(tmp_path, formats=["bf16"])["bf16"], device="cpu",
                                                dtype="float16", progress=False)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 500, (2, 60), generator=g)
    tol = dict(rtol=1e-5, atol=1e-5) if not kernels else dict(rtol=1e-2, atol=1e-2)   # fp16: SDPA vs the kernel
    with interpreter_kernels() if kernels else contextlib.nullcontext():
        plain, mapped = (m.make_cache(4, 64) for _ in range(2))
        eager, graph = Prefill(m, use_graphs=False), Prefill(m, use_graphs=True)
        for c in (plain, mapped):
            c.k.fill_(7.0)
            c.v.fill_(7.0)
        for (row, first, R) in ((2, 0, 24), (2, 24, 20), (0, 0, 30), (0, 30, 18)):   # a prefix, then its rest
            seq = ids[0 if row == 2 else 1]
            want = eager.tail(seq[None, first:first + R], first, row, plain)
            got = graph.tail(seq[None, first:first + R], first, row, mapped)
            torch.testing.assert_close(got, want, **tol)
        assert sorted(graph._tails) == [32]
        for c, want in ((mapped.k, plain.k), (mapped.v, plain.v)):
            torch.testing.assert_close(c[:, 2, :, :44], want[:, 2, :, :44], **tol)
            torch.testing.assert_close(c[:, 0, :, :48], want[:, 0, :, :48], **tol)
            assert (c[:, [1, 3]] == 7.0).all()                       # other rows untouched


def test_engine_with_staged_prefill_matches_generator(model):
    """The engine's prefills through Prefill's graph path (staged eagerly on the CPU): requests
    admitted into rows at offsets, beside running ones, still get the Generator's tokens."""
    ps = prompts(7, seed=21)
    params = [SamplingParams(max_new_tokens=3 + 2 * (i % 4)) for i in range(7)]
    ref = [alone(model, p, sp) for p, sp in zip(ps, params)]
    with Engine(model, max_batch=4, max_len=96) as eng:
        eng._prefill_fwd = Prefill(model, use_graphs=True)
        got = [r.result(T_OUT).output_ids for r in [eng.submit(p, sp) for p, sp in zip(ps, params)]]
        assert eng._prefill_fwd._shapes            # the staged path ran
    assert got == ref


def test_prefill_warm_up_covers_every_bucket_the_engine_uses(model):
    """Prefill.warm_up(max_rows, max_len) makes every (rows, length) bucket up to graph_tokens up
    front; an engine's prefills of mixed prompt lengths and admission sizes then find theirs
    (staged eagerly on the CPU) and make no new one."""
    pre = Prefill(model, use_graphs=True, graph_tokens=256)
    assert pre.warm_up(3, 96) == 11
    assert set(pre._shapes) == {(nb, Tb) for nb in (1, 2, 4) for Tb in (16, 32, 64, 128) if nb * Tb <= 256}
    assert Prefill(model, use_graphs=False).warm_up(3, 96) == 0
    ps = prompts(9, seed=23) + [[3] * 70]       # 70 tokens: bucket 128
    params = [SamplingParams(max_new_tokens=2 + i % 3) for i in range(10)]
    ref = [alone(model, p, sp) for p, sp in zip(ps, params)]
    with Engine(model, max_batch=3, max_len=96) as eng:
        eng._prefill_fwd = pre
        got = [r.result(T_OUT).output_ids for r in [eng.submit(p, sp) for p, sp in zip(ps, params)]]
    assert got == ref and len(pre._shapes) == 11


@pytest.mark.parametrize("rows,max_len,tokens,graph", [(16, 1024, 4096, 2048), (16, 4096, 4096, 2048),
                                                      (8, 1024, 4096, 256), (4, 256, 4096, 2048)])
def test_eager_prefill_shapes_for_the_warm_up(rows, max_len, tokens, graph):
    """eager_shapes: admissible prefills (rows x length <= the prefill tokens, in the rows and
    slots of the engine's cache) that a Prefill with those graph tokens runs eagerly (a stub model
    sees exactly them; it has no `args`, so a staged graph shape would fail), one row (where it can
    be eager) and the largest odd row count, with token totals odd, 8 and 0 mod 16 each (the
    classes Triton specializes int arguments on); none where every prefill is a graph."""
    from mixprec.layers.attention import KVCache
    from mixprec.runtime.prefill import MIN_LENGTH, eager_shapes

    class Stub(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("b", torch.zeros(1))
            self.seen = []

        def forward(self, ids, positions, cache, logits_index, tail):
            assert tail
            self.seen.append((tuple(ids.shape), tuple(cache.k.shape[1:4:2])))
            return torch.zeros(ids.shape[0], 1, 8)

    got = eager_shapes(rows, max_len, tokens, graph)
    stub, cache = Stub(), KVCache(1, rows, 1, max_len, 1, torch.float32, "cpu")
    pre = Prefill(stub, use_graphs=True, graph_tokens=graph)
    for n, T in got:
        assert n * T <= tokens
        pre(torch.zeros(n, T, dtype=torch.long), torch.full((n,), T - 1), cache.rows(0, n, T))
        assert stub.seen[-1] == ((n, T), (n, T))        # the cache view has the rows and slots it asked for
    assert not pre._shapes
    eager_possible = any(bucket(n) * bucket(min(max_len, tokens // n), MIN_LENGTH) > graph
                         for n in range(1, rows + 1))
    assert bool(got) == eager_possible
    for n in {n for n, _ in got}:
        totals = [n * T for m, T in got if m == n]
        assert {t % 16 if t % 2 == 0 else 1 for t in totals} == {0, 8, 1}, got


def test_engine_warmup_without_graphs(model):
    """warmup=True on an engine without CUDA graphs does nothing and the engine is ready at once."""
    from mixprec.serve import build_parser
    assert build_parser().parse_args(["m.yaml", "--warmup"]).warmup
    with Engine(model, max_batch=2, max_len=64, warmup=True) as eng:
        assert eng.ready.wait(T_OUT) and eng.warmup_s == 0.0 and eng.metrics()["cuda_graphs"] == 0
        assert eng.submit([5, 9, 2], SamplingParams(max_new_tokens=3)).result(T_OUT).output_ids == \
            alone(model, [5, 9, 2], SamplingParams(max_new_tokens=3))


def test_prefill_graph_tokens_setting(model):
    """serve --prefill-graph-tokens reaches the engine's Prefill; 0 turns prefill graphs off and a
    negative count is refused."""
    from mixprec.serve import build_parser
    assert build_parser().parse_args(["m.yaml", "--prefill-graph-tokens", "0"]).prefill_graph_tokens == 0
    with Engine(model, max_batch=1, max_len=64, prefill_graph_tokens=0) as eng:
        assert not eng._prefill_fwd.use_graphs
    with Engine(model, max_batch=1, max_len=64, use_cuda_graphs=True, prefill_graph_tokens=512) as eng:
        assert eng._prefill_fwd.use_graphs and eng._prefill_fwd.graph_tokens == 512
    with pytest.raises(ValueError, match="prefill_graph_tokens"):
        Engine(model, max_batch=1, max_len=64, prefill_graph_tokens=-1)


def test_attention_length_buckets(model):
    """Steps attend over cache slots [:256], [:512] or all: requests crossing those lengths,
    beside short ones that come and go, still match the Generator."""
    ps = prompts(2, lo=230, hi=250, seed=11) + prompts(3, lo=3, hi=9, seed=12)
    params = [SamplingParams(max_new_tokens=n) for n in (300, 40, 5, 9, 30)]
    ref = [alone(model, p, sp) for p, sp in zip(ps, params)]
    with Engine(model, max_batch=4, max_len=600) as eng:
        assert eng.len_buckets == [256, 512, 600]
        got = [r.result(T_OUT).output_ids for r in [eng.submit(p, sp) for p, sp in zip(ps, params)]]
    assert got == ref


@pytest.mark.parametrize("top_k,top_p", [(40, 0.9), (0, 1.0)])
def test_seeded_sampling_independent_of_batch(model, top_k, top_p):
    # (0, 1.0): alone it takes the sampler's unfiltered path, beside `late` (top_p 0.5) the
    # filtered one: both must draw the same tokens
    p = prompts(1, lo=12, hi=12, seed=2)[0]
    sp = SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, seed=1234, max_new_tokens=12)
    ref = alone(model, p, sp)
    other = prompts(7, seed=3)
    with Engine(model, max_batch=8, max_len=64) as eng:
        solo = eng.submit(p, sp).result(T_OUT).output_ids
        # every row used once, so the requests below reuse rows whose old state must not leak
        for r in [eng.submit(q, SamplingParams(temperature=1.0, max_new_tokens=6)) for q in other + [p]]:
            r.result(T_OUT)
        # the same request between others (sampled with other seeds / params, greedy ones too),
        # one of them admitted while it runs
        before = [eng.submit(q, SamplingParams(temperature=1.0, seed=i, max_new_tokens=5 + i))
                  for i, q in enumerate(other[:3])]
        mid = eng.submit(p, sp)
        after = [eng.submit(q, SamplingParams(max_new_tokens=9)) for q in other[3:]]
        next(iter(mid))
        late = eng.submit(other[0], SamplingParams(temperature=0.7, top_p=0.5, seed=9, max_new_tokens=8))
        batched = mid.result(T_OUT).output_ids
        for r in before + after + [late]:
            r.result(T_OUT)
        reseeded = eng.submit(p, SamplingParams(temperature=0.9, top_k=top_k, top_p=top_p, seed=99,
                                                max_new_tokens=12)).result(T_OUT).output_ids
    assert solo == ref and batched == ref
    assert reseeded != ref                   # the seed matters: this is really sampling
    assert len(set(ref)) > 3


def penalized_reference(model, prompt, n, presence, frequency):
    """Greedy decoding by full forwards, with OpenAI's penalties on the tokens generated so far."""
    seq, out = list(prompt), []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(torch.tensor([seq]))[0, -1].float()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
        tok = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
        seq.append(tok)
        out.append(tok)
    return out


def test_presence_and_frequency_penalties(model):
    """Greedy with penalties equals a full-forward loop that applies them (Generator alone and the
    engine beside unpenalized, sampled and later-admitted requests, in reused rows); the penalties
    change the tokens (this model repeats itself without them); a sampled penalized request draws
    the same tokens alone and batched."""
    ps = prompts(4, lo=6, hi=20, seed=7)
    n = 12
    plain = [alone(model, p, SamplingParams(max_new_tokens=n)) for p in ps]
    assert [len(set(o)) < n for o in plain[:3]] == [True] * 3        # repeats to penalize
    cases = [(2.0, 0.0), (0.0, 1.5), (0.7, 0.4), (-0.5, 0.0)]
    ref = [penalized_reference(model, p, n, pr, fr) for p, (pr, fr) in zip(ps, cases)]
    assert all(r != o and len(set(r)) == n for r, o in zip(ref[:3], plain))   # no token twice now
    params = [SamplingParams(max_new_tokens=n, presence_penalty=pr, frequency_penalty=fr) for pr, fr in cases]
    assert [alone(model, p, sp) for p, sp in zip(ps, params)] == ref
    sampled = SamplingParams(max_new_tokens=n, temperature=0.8, seed=5, presence_penalty=1.0)
    sampled_ref = alone(model, ps[1], sampled)
    with Engine(model, max_batch=4, max_len=64) as eng:
        # rows used first by unpenalized requests: their counts must not leak into the reuse
        for r in [eng.submit(q, SamplingParams(temperature=1.0, max_new_tokens=6)) for q in ps]:
            r.result(T_OUT)
        first = [eng.submit(p, sp) for p, sp in zip(ps[:2], params[:2])]
        other = eng.submit(ps[3], SamplingParams(max_new_tokens=n))
        next(iter(first[0]))
        late = [eng.submit(p, sp) for p, sp in zip(ps[2:], params[2:])] + [eng.submit(ps[1], sampled)]
        got = [r.result(T_OUT).output_ids for r in first + late]
        assert got[:4] == ref and got[4] == sampled_ref
        assert other.result(T_OUT).output_ids == plain[3]


def test_logprobs_are_the_models(model):
    """Delta.logprobs: each token's log-probability and the top ones are the model's own
    (log_softmax of a full forward's logits: before penalties and temperature), for greedy,
    penalized and sampled requests beside requests without them (whose deltas carry none); the
    first token's (from the prefill) too. The Generator refuses them."""
    p = prompts(4, lo=6, hi=20, seed=7)[0]          # greedy repeats a token within 12 (above)
    n = 12
    with Engine(model, max_batch=4, max_len=64) as eng:
        plain = eng.submit(p, SamplingParams(max_new_tokens=n))
        pen = eng.submit(p, SamplingParams(max_new_tokens=n, logprobs=4, presence_penalty=2.0))
        hot = eng.submit(p, SamplingParams(max_new_tokens=n, temperature=0.9, seed=3, logprobs=0))
        reqs = [r.result(T_OUT) for r in (plain, pen, hot)]
    assert all(d.logprobs is None for d in reqs[0].deltas())
    for r, k in zip(reqs[1:], (4, 0)):
        lps = [d.logprobs for d in r.deltas() if d.token_ids]
        assert len(lps) == len(r.output_ids) == n and all(len(x) == 1 for x in lps)
        seq = list(p)
        for (lp, top), tok in zip((x[0] for x in lps), r.output_ids):
            with torch.inference_mode():
                ref = torch.log_softmax(model(torch.tensor([seq]))[0, -1].float(), -1)
            assert abs(lp - float(ref[tok])) < 1e-4
            want = ref.topk(k)
            assert [i for i, _ in top] == want.indices.tolist()
            assert max((abs(v - w) for (_, v), w in zip(top, want.values.tolist())), default=0) < 1e-4
            seq.append(tok)
    assert reqs[1].output_ids != reqs[0].output_ids           # the penalty acted; logprobs stay raw
    # the prompt's: each token's given the ones before it (one full forward), the first has none
    with Engine(model, max_batch=4, max_len=64) as eng:
        r = eng.submit(p, SamplingParams(max_new_tokens=2, prompt_logprobs=3)).result(T_OUT)
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([p]))[0, :-1].float(), -1)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(p)
    for (lp, top), row, tok in zip(r.prompt_logprobs[1:], ref, p[1:]):
        assert abs(lp - float(row[tok])) < 1e-4 and [i for i, _ in top] == row.topk(3).indices.tolist()
    assert reqs[0].prompt_logprobs is None
    with pytest.raises(ValueError, match="Engine"):
        Generator(model).generate([p], SamplingParams(max_new_tokens=2, logprobs=1))
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21).validate()


def test_logit_bias(model):
    """OpenAI's logit_bias: +100 on a token makes greedy pick it every step, -100 on greedy's
    first token moves it (the prefill's token too), alike in the Generator and the Engine beside
    other requests; log-probabilities stay the model's own; ids outside the vocab are refused."""
    p = prompts(1, lo=7, hi=7, seed=12)[0]
    plain = alone(model, p, SamplingParams(max_new_tokens=6))
    force = SamplingParams(max_new_tokens=6, logit_bias=((42, 100.0),))
    ban = SamplingParams(max_new_tokens=6, logit_bias={plain[0]: -100.0})
    assert alone(model, p, force) == [42] * 6
    banned = alone(model, p, ban)
    assert banned[0] != plain[0] and plain[0] not in banned
    with Engine(model, max_batch=4, max_len=64) as eng:
        reqs = [eng.submit(p, sp) for sp in (SamplingParams(max_new_tokens=6), ban,
                                             SamplingParams(max_new_tokens=6, logit_bias=((42, 100.0),), logprobs=1))]
        got = [r.result(T_OUT) for r in reqs]
        with pytest.raises(ValueError, match="logit_bias"):
            eng.submit(p, SamplingParams(logit_bias=((10**6, 1.0),)))
    assert [r.output_ids for r in got] == [plain, banned, [42] * 6]
    with torch.inference_mode():
        ref = torch.log_softmax(model(torch.tensor([p]))[0, -1].float(), -1)
    first = next(d for d in got[2].deltas() if d.token_ids).logprobs[0]
    assert abs(first[0] - float(ref[42])) < 1e-4 and first[1][0][0] == int(ref.argmax())
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((3, 101.0),)).validate()
    # a row a biased request left: the next occupant (no bias) keeps none while another request's
    # extras run beside it
    with Engine(model, max_batch=2, max_len=64) as eng:
        other = eng.submit([3, 4, 5], SamplingParams(max_new_tokens=40, presence_penalty=1.0))
        eng.submit(p, SamplingParams(max_new_tokens=2, logit_bias=((42, 100.0),))).result(T_OUT)
        after = eng.submit(p, SamplingParams(max_new_tokens=6)).result(T_OUT)
        assert not other.done                    # the extras ran beside it all along
        other.result(T_OUT)
    assert after.output_ids == plain


def test_penalty_values_are_checked():
    for bad in (dict(presence_penalty=2.5), dict(frequency_penalty=-3.0), dict(presence_penalty=float("nan"))):
        with pytest.raises(ValueError, match="penalty"):
            SamplingParams(**bad).validate()
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty="1").plain()
    assert SamplingParams(presence_penalty=1.5).penalized and not SamplingParams().penalized


@pytest.mark.parametrize("top", [12, 700])
def test_common_prefix(top):
    """Against a brute-force scan; up to 700 tokens: the doubling windows (64, 128, 256...) too."""
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        a = torch.randint(0, 3, (int(torch.randint(0, top, (1,), generator=g)),), generator=g).tolist()
        b = a[:int(torch.randint(0, len(a) + 1, (1,), generator=g))] + torch.randint(0, 3, (4,), generator=g).tolist()
        brute = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        assert _common_prefix(a, b) == brute


def steps_after(req, k):
    """Wait until `req` got k more tokens than it has now (decode steps ran meanwhile)."""
    n, t0 = len(req.output_ids), time.monotonic()
    while len(req.output_ids) < n + k:
        assert time.monotonic() - t0 < T_OUT and not req.done
        time.sleep(0.001)


def greedy_margins(model, prompt, out):
    """Per generated token: how far its logit is below the best one of the reference (one uncached
    forward over prompt + out): 0 where greedy decoding would pick it."""
    ids = torch.tensor([prompt + out[:-1]], device=next(model.buffers()).device)
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:]                          # [len(out), V]
    return (logits.max(-1).values - logits[torch.arange(len(out)), torch.tensor(out)]).tolist()


def taken(prompt, shared):
    """Prompt tokens an engine takes from a row holding `shared` of them: the rest a multiple of 16."""
    return len(prompt) - -(-(len(prompt) - shared) // 16) * 16


@pytest.mark.parametrize("staged", [False, True])
def test_prefix_reuse_equals_whole_prefill(model, staged):
    """A prompt that starts with tokens a row's K/V hold prefills only the rest: from the free row
    its earlier turn finished in (idle in the decode steps meanwhile, which rewrite its slot 0),
    copied from a running request's row, and from a row that was itself reused; the tokens equal
    a whole prefill's (Generator), cached_tokens counts the taken ones, and prefix_reuse=False
    takes none. staged: Prefill's graph paths (run eagerly on the CPU), the rests through the
    tail path (the cache mapped to the row)."""
    g = torch.Generator().manual_seed(11)
    sysp = torch.randint(0, 500, (40,), generator=g).tolist()          # a shared "system prompt"
    turn = [torch.randint(0, 500, (k,), generator=g).tolist() for k in (5, 9, 3)]
    sp = SamplingParams(max_new_tokens=12)
    lps = {}
    for reuse in (True, False):
        with Engine(model, max_batch=4, max_len=160, prefix_reuse=reuse) as eng:
            if staged:
                eng._prefill_fwd = Prefill(model, use_graphs=True)
            first = eng.submit(sysp + turn[0], sp)
            keep = eng.submit(turn[1] + turn[2], SamplingParams(max_new_tokens=60))  # row 1 decodes on
            out1 = first.result(T_OUT).output_ids
            steps_after(keep, 3)                                    # row 0 idle in those steps
            # a second turn: the first's prompt, its reply and a new message (row 0, idle till now)
            p2 = sysp + turn[0] + out1 + turn[2]
            second = eng.submit(p2, SamplingParams(max_new_tokens=12, logprobs=1)).result(T_OUT)
            lps[reuse] = [e[0] for d in second.deltas() if d.logprobs for e in d.logprobs]
            # while the second turn's prompt runs again (row 0, the second's K/V) and row 1 does:
            # a prompt sharing only the system prompt copies it from row 0 into a free row
            busy = eng.submit(p2, SamplingParams(max_new_tokens=40))
            next(iter(busy))
            third = eng.submit(sysp + turn[1], sp).result(T_OUT)
            busy.result(T_OUT)
            # a later turn of the second conversation: from the row that took it (itself reused)
            p4 = p2 + second.output_ids + turn[1]
            fourth = eng.submit(p4, sp).result(T_OUT)
            keep.result(T_OUT)
            got = [second.output_ids, busy.output_ids, third.output_ids, fourth.output_ids]
            cached = [r.cached_tokens for r in (first, second, busy, third, fourth)]
            assert eng.metrics()["prompt_tokens_cached"] == sum(cached)
            assert bool(eng._prefill_fwd._tails) == (staged and reuse)
        assert got == [alone(model, p, q) for p, q in ((p2, sp), (p2, busy.params), (sysp + turn[1], sp), (p4, sp))]
        if reuse:   # a reply's last token was never fed; a prompt's last one always runs
            n4 = min(_common_prefix(p2 + busy.output_ids[:-1], p4), len(p4) - 1)
            shared = [len(sysp + turn[0] + out1) - 1, len(p2) - 1, len(sysp), n4]
            assert cached == [0] + [taken(p, n) for p, n in zip((p2, p2, sysp + turn[1], p4), shared)]
            assert cached[4] > len(p2) - 16
        else:
            assert cached == [0] * 5
    # the reused K/V are the ones a whole prefill computes (fp32: up to rounding), slot 0 included
    assert lps[True] == pytest.approx(lps[False], abs=1e-4)


def queued_together(eng, ps, sp):
    """Submit prompts ps while the engine's loop waits (in its token reading: a request must be
    running), so that its next admission sees them all queued. -> the requests."""
    waiting, go, process = threading.Event(), threading.Event(), eng._process

    def hold(item):
        if not waiting.is_set():
            waiting.set()
            go.wait(T_OUT)
        process(item)
    eng._process = hold
    assert waiting.wait(T_OUT)
    reqs = [eng.submit(p, sp) for p in ps]
    go.set()
    return reqs


def test_a_free_row_serves_requests_in_place_and_by_copies(model):
    """Two requests admitted together take the prefix of one free row: the longer in place (38 of
    its tokens), the other by a copy of 47, issued before the first's prefill rewrites slots 38 ..
    (its slot 0 from the set-aside copy, since idle decode steps rewrite a free row's); both get
    the Generator's tokens."""
    g = torch.Generator().manual_seed(33)
    sysp = torch.randint(0, 500, (40,), generator=g).tolist()
    t0, t1, t2 = (torch.randint(0, 500, (k,), generator=g).tolist() for k in (6, 30, 12))
    sp = SamplingParams(max_new_tokens=6)
    with Engine(model, max_batch=4, max_len=128) as eng:
        a = eng.submit(sysp + t0, sp).result(T_OUT)                   # row 0 keeps its K/V
        record = a.prompt_ids + a.output_ids[:-1]                     # 51 tokens
        busy = eng.submit(t1[:3], SamplingParams(max_new_tokens=80))  # row 1: rows with K/V go last
        next(iter(busy))
        steps_after(busy, 2)                                          # row 0 idle meanwhile
        b, c = (r.result(T_OUT) for r in queued_together(eng, [sysp + t1, record + t2], sp))
        busy.result(T_OUT)
    assert [r.cached_tokens for r in (b, c)] == [38, 47]
    assert [r.cached_tokens for r in (b, c)] == [taken(r.prompt_ids, _common_prefix(record, r.prompt_ids))
                                                 for r in (b, c)]
    assert [r.output_ids for r in (b, c)] == [alone(model, r.prompt_ids, sp) for r in (b, c)]


def test_a_burst_sharing_a_long_prefix_computes_it_once(model, monkeypatch):
    """Requests queued together whose prompts share SHARE_WAIT or more tokens (a long system
    prompt): the first is admitted, the others wait for the next step and then all copy its K/V
    from its (busy) row in one admission; a request sharing less is admitted at once; outputs
    equal the Generator's."""
    from mixprec.runtime import engine as engine_module
    monkeypatch.setattr(engine_module, "SHARE_WAIT", 32)
    g = torch.Generator().manual_seed(31)
    sysp = torch.randint(0, 500, (40,), generator=g).tolist()
    tails = [torch.randint(0, 500, (k,), generator=g).tolist() for k in (9, 5, 7, 30)]
    ps = [sysp + t for t in tails[:3]] + [sysp[:20] + tails[3]]
    sp = SamplingParams(max_new_tokens=6)
    with Engine(model, max_batch=5, max_len=128) as eng:
        busy = eng.submit(tails[3][:4], SamplingParams(max_new_tokens=80))
        next(iter(busy))
        admitted = []
        admit = eng._admit
        eng._admit = lambda rs: (admitted.append([ps.index(r.prompt_ids) for r in rs]), admit(rs))[1]
        got = [r.result(T_OUT) for r in queued_together(eng, ps, sp)]
        busy.result(T_OUT)
    assert admitted[:2] == [[0, 3], [1, 2]]
    assert [r.cached_tokens for r in got] == [0, taken(ps[1], _common_prefix(ps[0], ps[1])),
                                              taken(ps[2], _common_prefix(ps[0], ps[2])), 0]
    assert [r.output_ids for r in got] == [alone(model, p, sp) for p in ps]


def test_rows_holding_a_prefix_are_taken_last(model):
    """A request that reuses nothing takes a row without a reusable prefix before one with (the
    least recently freed of those first), so a chat's next turn still finds its history."""
    g = torch.Generator().manual_seed(5)
    a, b, c = (torch.randint(0, 500, (k,), generator=g).tolist() for k in (40, 30, 35))
    sp = SamplingParams(max_new_tokens=6)
    with Engine(model, max_batch=3, max_len=128) as eng:
        first = eng.submit(a, sp).result(T_OUT)                    # row 0 keeps a's K/V
        other = eng.submit(b, sp).result(T_OUT)                    # row 1, not row 0
        third = eng.submit(c, sp).result(T_OUT)                    # row 2, then the oldest: row 0
        again = eng.submit(b + other.output_ids + a[:5], sp).result(T_OUT)
        assert other.cached_tokens == third.cached_tokens == 0
        assert again.cached_tokens == taken(b + other.output_ids + a[:5], len(b) + 5) > 0
        fourth = eng.submit(c[::-1], sp).result(T_OUT)             # every row holds a prefix: row 0 (a's)
        assert eng.submit(c + third.output_ids, sp).result(T_OUT).cached_tokens > 0      # row 2 kept
        assert eng.submit(a + first.output_ids, sp).result(T_OUT).cached_tokens == 0     # row 0 was not
        assert fourth.cached_tokens == 0


def test_a_record_of_prefix_min_tokens_is_kept_like_longer_ones(model):
    """A row whose record is exactly PREFIX_MIN tokens can serve a prefix, so it goes last like
    longer records: the next unrelated request takes the other row and the record stays."""
    from mixprec.runtime.engine import PREFIX_MIN
    g = torch.Generator().manual_seed(9)
    a, b, more = (torch.randint(0, 500, (k,), generator=g).tolist() for k in (PREFIX_MIN - 5, 20, 16))
    with Engine(model, max_batch=2, max_len=128) as eng:
        first = eng.submit(a, SamplingParams(max_new_tokens=6)).result(T_OUT)      # record: 11 + 5 tokens
        assert len(first.output_ids) == 6
        eng.submit(b, SamplingParams(max_new_tokens=2)).result(T_OUT)              # the other row
        again = eng.submit(a + first.output_ids[:5] + more, SamplingParams(max_new_tokens=2)).result(T_OUT)
        assert again.cached_tokens == PREFIX_MIN


def test_random_requests_match_the_generator(model):
    """A random mix (prompts sharing prefixes of 4 bases, lengths past prefill_tokens, greedy and
    seeded sampling with top-k / top-p, penalties, logit bias, some cancelled at once) through 4
    rows with prefix reuse and chunked prefill: each request not cancelled gets what the
    Generator gives it alone, and rows were reused."""
    import random
    rng = random.Random(12)
    bases = [[rng.randrange(500) for _ in range(rng.randrange(10, 150))] for _ in range(4)]

    def prompt():
        if rng.random() < 0.6:
            b = rng.choice(bases)
            return b[:rng.randrange(1, len(b) + 1)] + [rng.randrange(500) for _ in range(rng.randrange(0, 40))]
        return [rng.randrange(500) for _ in range(rng.randrange(1, 160))]

    def params():
        kw = dict(max_new_tokens=rng.randrange(1, 12))
        if rng.random() < 0.6:
            kw.update(temperature=rng.choice([0.5, 1.0, 1.3]), seed=rng.randrange(1000),
                      top_k=rng.choice([0, 1, 5, 50]), top_p=rng.choice([1.0, 0.3, 0.8, 0.95]))
        if rng.random() < 0.3:
            kw.update(presence_penalty=rng.choice([0.5, 1.5]), frequency_penalty=rng.choice([0.0, 0.7]))
        if rng.random() < 0.2:
            kw["logit_bias"] = ((rng.randrange(500), 5.0), (rng.randrange(500), -100.0))
        return SamplingParams(**kw)

    reqs = [(prompt(), params()) for _ in range(30)]
    ref = [alone(model, p, sp) for p, sp in reqs]
    with Engine(model, max_batch=4, max_len=256, prefill_tokens=48) as eng:
        handles, cancelled = [], set()
        for i, (p, sp) in enumerate(reqs):
            handles.append(eng.submit(p, sp))
            if rng.random() < 0.1:
                eng.cancel(handles[-1])
                cancelled.add(i)
        got = [h.result(T_OUT) for h in handles]
    assert [r.output_ids for i, r in enumerate(got) if i not in cancelled] == \
        [o for i, o in enumerate(ref) if i not in cancelled]
    assert sum(r.cached_tokens for r in got) > 0 and len(cancelled) > 0


def test_long_prompts_prefill_in_chunks_between_decode_steps(model, monkeypatch):
    """A prompt longer than prefill_tokens is prefilled a chunk per loop step (as the tail of its
    row so far) while running requests decode between the chunks; its tokens equal a whole
    prefill's, also after a reused prefix and beside a request cancelled mid-chunks."""
    g = torch.Generator().manual_seed(21)
    long_a, long_b, short = (torch.randint(0, 500, (k,), generator=g).tolist() for k in (100, 90, 8))
    sp = SamplingParams(max_new_tokens=8)
    calls = []
    forward = type(model).forward

    def logged(self, ids, *a, **kw):
        calls.append((ids.shape[1], bool(kw.get("tail"))))
        return forward(self, ids, *a, **kw)

    monkeypatch.setattr(type(model), "forward", logged)
    with Engine(model, max_batch=4, max_len=256, prefill_tokens=32) as eng:
        # a decoding request in row 1 and row 0 free (a short record: not kept), so the long prompt
        # takes row 0, idle in the decode steps between its chunks (they rewrite its slot 0)
        first = eng.submit(short[:3], SamplingParams(max_new_tokens=40))
        next(iter(first))
        run = eng.submit(short, SamplingParams(max_new_tokens=40))
        next(iter(run))
        eng.cancel(first)
        first.result(T_OUT)
        calls.clear()
        a = eng.submit(long_a, SamplingParams(max_new_tokens=8, logprobs=1)).result(T_OUT)
        assert run._slot == 1 and not run.done
        # 100 tokens: chunks of 32 at 0, 32, 64 with decode steps (1 token) between, the last 4 a prefill
        tails = [i for i, (T, tail) in enumerate(calls) if tail]
        assert [calls[i][0] for i in tails[:4]] == [32, 32, 32, 4]
        assert all(any(calls[j][0] == 1 for j in range(i + 1, k)) for i, k in zip(tails, tails[1:4]))
        # its next turn reuses its 100 + 7 tokens but for the rest's rounding (91 -> 96: 3 chunks)
        p2 = long_a + a.output_ids + long_b
        gone = eng.submit(long_b + long_a, sp)                     # cancelled during its chunks
        b = eng.submit(p2, sp)
        t0 = time.monotonic()
        while gone not in eng._chunking:
            assert time.monotonic() - t0 < T_OUT
            time.sleep(0.001)
        eng.cancel(gone)
        assert b.result(T_OUT).output_ids == alone(model, p2, sp)
        assert gone.result(T_OUT).finish_reason == "cancelled" and run.result(T_OUT).output_ids == alone(
            model, short, run.params)
        assert b.cached_tokens == taken(p2, len(long_a) + 7)
    assert a.output_ids == alone(model, long_a, sp)
    with Engine(model, max_batch=1, max_len=256) as eng:           # one whole prefill: the same model outputs
        whole = eng.submit(long_a, SamplingParams(max_new_tokens=8, logprobs=1)).result(T_OUT)
    lp = [[e[0] for d in r.deltas() if d.logprobs for e in d.logprobs] for r in (a, whole)]
    assert lp[0] == pytest.approx(lp[1], abs=1e-4)


def test_many_concurrent_requests_from_threads(model):
    ps = prompts(24, lo=1, hi=30, seed=4)
    params = [SamplingParams(max_new_tokens=1 + (7 * i) % 13) for i in range(24)]
    ref = [alone(model, p, sp) for p, sp in zip(ps, params)]
    got: dict[int, list[int]] = {}
    with Engine(model, max_batch=8, max_len=64, prefill_tokens=64) as eng:
        def client(i):
            got[i] = list(eng.submit(ps[i], params[i]))      # streamed, token by token
        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T_OUT)
        assert not any(t.is_alive() for t in threads)
        assert eng.metrics()["requests_active"] == 0
    assert [got[i] for i in range(24)] == ref


def test_cancel_frees_slot(model):
    p, q = prompts(2, lo=8, hi=8, seed=5)
    with Engine(model, max_batch=1, max_len=128) as eng:
        long = eng.submit(p, SamplingParams(max_new_tokens=100))
        waiting = eng.submit(q, SamplingParams(max_new_tokens=6))
        queued_then_cancelled = eng.submit(q, SamplingParams(max_new_tokens=6))
        it = iter(long)
        first = [next(it) for _ in range(3)]
        assert eng.metrics()["requests_active"] == 1 and eng.metrics()["requests_queued"] == 2
        eng.cancel(queued_then_cancelled)
        eng.cancel(long)
        assert long.result(T_OUT).finish_reason == "cancelled"
        assert queued_then_cancelled.result(T_OUT).finish_reason == "cancelled"
        assert queued_then_cancelled.output_ids == []
        assert long.output_ids[:3] == first and len(long.output_ids) < 100
        # the freed slot serves the waiting request, which is unaffected by the cancelled one
        assert waiting.result(T_OUT).output_ids == alone(model, q, SamplingParams(max_new_tokens=6))
        m = eng.metrics()
        assert m["requests_active"] == 0 and m["requests_cancelled"] == 2 and m["requests_finished"] == 1


def test_queue_bound_and_request_limits(model):
    p = prompts(1, lo=5, hi=5, seed=6)[0]
    with Engine(model, max_batch=1, max_len=64, max_queue=2) as eng:
        busy = eng.submit(p, SamplingParams(max_new_tokens=59))
        next(iter(busy))                                         # admitted: the slot is taken
        queued = [eng.submit(p, SamplingParams(max_new_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFull):
            eng.submit(p, SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="exceeds this engine's context of 64"):
            eng.submit(p, SamplingParams(max_new_tokens=60))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            eng.submit([1, model.args.vocab_size], SamplingParams(max_new_tokens=2))
        with pytest.raises(ValueError, match="empty prompt"):
            eng.submit([], SamplingParams(max_new_tokens=2))
        eng.cancel(busy)
        assert [r.result(T_OUT).finish_reason for r in queued] == ["length", "length"]
        assert len(busy.result(T_OUT).output_ids) < 59
        ok = eng.submit(p, SamplingParams(max_new_tokens=3)).result(T_OUT)   # room again
        assert len(ok.output_ids) == 3
    with pytest.raises(EngineStopped):
        eng.submit(p, SamplingParams(max_new_tokens=2))


def test_stop_strings_trim_text(model):
    tok = model.tokenizer
    p = tok.encode("The morning train left the station")
    full = eng_text = None
    with Engine(model, max_batch=2, max_len=96) as eng:
        full = eng.submit(p, SamplingParams(max_new_tokens=24)).result(T_OUT)
        eng_text = full.text
        assert eng_text == tok.decode(full.output_ids) and len(eng_text) > 12
        stop = eng_text[6:9]                       # spans whatever tokens make it up
        cut = eng_text.find(stop)
        r = eng.submit(p, SamplingParams(max_new_tokens=24, stop=("never-there", stop))).result(T_OUT)
        assert r.finish_reason == "stop" and r.text == eng_text[:cut]
        # it stopped on the token that completed the stop string, not later
        n = len(r.output_ids)
        assert r.output_ids == full.output_ids[:n]
        assert stop in tok.decode(r.output_ids) and stop not in tok.decode(r.output_ids[:-1])
        assert "".join(d.text for d in r.deltas()) == r.text


def test_stop_prefix_tail_equals_brute_force():
    # the text held back in streaming: the longest tail of the text that is a proper prefix of a
    # stop string, checked against every (stop, length) pair
    import random

    from mixprec.runtime.engine import stop_prefix_tail
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 12)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 8))) for _ in range(rng.randint(1, 3))]
        want = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        assert stop_prefix_tail(text, stops) == want, (text, stops)


def test_generator_zero_token_rows_and_unseeded_rows(model):
    gen = Generator(model)
    p = prompts(1, lo=6, hi=6, seed=5)[0]
    # a row asking for no tokens, beside a longer one, gets none
    out = gen.generate([p, p], [SamplingParams(max_new_tokens=0), SamplingParams(max_new_tokens=3)])
    assert [len(o) for o in out] == [0, 3]
    with pytest.raises(ValueError, match=r"prompt token ids \[99999, -1\] are outside the vocabulary"):
        gen.generate([[5, 99999, -1]], SamplingParams(max_new_tokens=2))
    np = pytest.importorskip("numpy")                # numpy ints and a set of stop ids, as the engine takes them
    assert len(gen.generate([p], SamplingParams(max_new_tokens=np.int64(3), stop_token_ids={10**6}))[0]) == 3
    # without a seed each row draws its own: two equal prompts sample apart (16 tokens each)
    a, b = gen.generate([p, p], SamplingParams(temperature=1.0, max_new_tokens=16))
    assert a != b


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the loop re-raises
def test_failed_send_to_other_ranks_ends_admitted_requests(model, monkeypatch):
    """Rank 0 of a parallel model sends each admission to the other ranks; if that send fails,
    the requests it took from the queue end with "error" like every other (they must not hang,
    held by nobody)."""
    import types

    from mixprec.runtime import engine as engine_mod

    class BrokenLink:                      # rank 0's side of the lockstep, whose link breaks
        leader = True
        last_send = 0.0

        def __init__(self, rank):
            pass

        def agree(self, settings):
            pass

        def send(self, msg):
            if msg.get("admit"):
                raise ConnectionError("rank 1 is gone")

    monkeypatch.setattr(engine_mod, "_Lockstep", BrokenLink)
    monkeypatch.setattr(model, "parallel", types.SimpleNamespace(rank=0, world=2), raising=False)
    eng = Engine(model, max_batch=2, max_len=64)
    r = eng.submit(prompts(1, seed=4)[0], SamplingParams(max_new_tokens=4))
    assert r.result(T_OUT).finish_reason == "error" and isinstance(r.error, ConnectionError)
    with pytest.raises(EngineStopped):
        eng.submit([5], SamplingParams(max_new_tokens=1))
    eng.shutdown()


class _Link:
    """Rank 0's side of a lockstep that records what it sends (as JSON, as the real one does)."""
    leader = True
    last = None

    def __init__(self, rank):
        self.sent, self.last_send = [], time.monotonic()
        _Link.last = self

    def agree(self, settings):
        pass

    def send(self, msg):
        self.sent.append(json.loads(json.dumps(msg)))
        self.last_send = time.monotonic()


@pytest.fixture
def rank0_engine(model, monkeypatch):
    """An Engine as rank 0 of a two-rank model, its lockstep recorded (no other process)."""
    import types

    from mixprec.runtime import engine as engine_mod
    monkeypatch.setattr(engine_mod, "_Lockstep", _Link)
    monkeypatch.setattr(engine_mod, "HEARTBEAT_S", 0.2)
    monkeypatch.setattr(model, "parallel", types.SimpleNamespace(rank=0, world=2), raising=False)
    eng = Engine(model, max_batch=2, max_len=64)
    yield eng, _Link.last
    eng.shutdown()


def test_lockstep_sends_numpy_params_as_plain_numbers(rank0_engine):
    np = pytest.importorskip("numpy")
    eng, link = rank0_engine
    r = eng.submit([5, 6, 7], SamplingParams(temperature=np.float32(0.7), top_k=np.int64(5), seed=np.int64(3),
                                            max_new_tokens=3)).result(T_OUT)
    assert r.finish_reason == "length"           # a TypeError (not JSON serializable) had killed the loop
    params = next(m for m in link.sent if m.get("admit"))["admit"][0]["params"]
    assert params["top_k"] == 5 and abs(params["temperature"] - 0.7) < 1e-6


def test_lockstep_heartbeat_despite_wakeups_without_work(rank0_engine):
    eng, link = rank0_engine
    done = eng.submit([5, 6], SamplingParams(max_new_tokens=1)).result(T_OUT)
    n0, t0 = len([m for m in link.sent if m == {}]), time.monotonic()
    while time.monotonic() - t0 < 1.2:        # cancels of a finished request wake the loop, no work
        eng.cancel(done)
        time.sleep(0.05)
    assert len([m for m in link.sent if m == {}]) - n0 >= 3   # HEARTBEAT_S 0.2: none were sent before


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")   # the loop re-raises
def test_lockstep_prefill_oom_stops_the_engine(rank0_engine, monkeypatch):
    """Alone, an out-of-memory prefill fails its requests and the engine goes on; with other ranks
    in the prefill's collectives it must fail the loop (going on deadlocked them)."""
    eng, _ = rank0_engine

    def oom(reqs):
        raise torch.OutOfMemoryError("simulated")
    monkeypatch.setattr(eng, "_prefill", oom)
    r = eng.submit([5, 6], SamplingParams(max_new_tokens=2)).result(T_OUT)
    assert r.finish_reason == "error"
    with pytest.raises(EngineStopped):
        eng.submit([5], SamplingParams(max_new_tokens=1))


def test_asyncio_stream_and_shutdown(model):
    ps = prompts(3, seed=7)
    ref = [alone(model, p, SamplingParams(max_new_tokens=5)) for p in ps]
    eng = Engine(model, max_batch=2, max_len=64)

    async def consume(p):
        ids = []
        async for d in eng.submit(p, SamplingParams(max_new_tokens=5)).stream():
            ids += d.token_ids
        return ids

    async def main():
        return await asyncio.wait_for(asyncio.gather(*(consume(p) for p in ps)), T_OUT)
    assert asyncio.run(main()) == ref
    long = eng.submit(ps[0], SamplingParams(max_new_tokens=40))
    eng.shutdown()
    assert long.result(T_OUT).finish_reason == "abort"
    assert not eng.healthy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("experts", [0, 8])
def test_gpu_cuda_graphs_match_generator(tmp_path, experts):
    path = make_fixture(tmp_path, formats=["bf16"], experts=experts)["bf16"]
    m = mixprec.load(path, device="cuda", progress=False)
    ps = prompts(12, seed=8)
    params = [SamplingParams(max_new_tokens=8 + i) for i in range(12)]
    params[3] = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_new_tokens=10)
    # sampled without top-k / top-p: alone (Generator) the one-launch race (kernels/sampling.py); in
    # an engine batch beside request 3, the filtered launches (first tokens too): the draws must agree
    params[5] = SamplingParams(temperature=0.7, seed=5, max_new_tokens=9)
    gen = Generator(m)
    # penalized (greedy and sampled): the penalized graphs, float32 logits into the sampling kernels;
    # the greedy one on a prompt whose output the penalty changes: a random model seldom repeats a
    # token in 11 (which a positive penalty would need), a negative one makes it repeat
    pen, plain = SamplingParams(presence_penalty=-2.0, max_new_tokens=11), SamplingParams(max_new_tokens=11)
    i = next((i for i in (1, 2, 4, 6, 7, 8, 10, 11) if gen.generate([ps[i]], pen) != gen.generate([ps[i]], plain)),
             None)
    assert i is not None, "presence_penalty=-2 changed no prompt's greedy output"
    params[i] = pen
    params[9] = SamplingParams(temperature=0.9, seed=9, frequency_penalty=0.8, max_new_tokens=12)
    ref = [gen.generate([p], sp)[0] for p, sp in zip(ps, params)]
    with Engine(m, max_batch=8, max_len=128) as eng:
        assert eng.use_graphs
        reqs = [eng.submit(p, sp) for p, sp in zip(ps, params)]
        got = [r.result(T_OUT).output_ids for r in reqs]
        # log-probabilities on the GPU graphs: same tokens as without, greedy's the most likely
        lp = eng.submit(ps[0], SamplingParams(max_new_tokens=8, logprobs=5)).result(T_OUT)
        entries = [e for d in lp.deltas() if d.logprobs for e in d.logprobs]
        assert lp.output_ids == ref[0] and len(entries) == 8
        assert all(v <= 0 and len(top) == 5 and top[0][1] == v for v, top in entries)
        t0 = time.perf_counter()
        eng.submit(ps[0], SamplingParams(max_new_tokens=64)).result(T_OUT)
        assert eng.metrics()["gpu_memory_allocated_bytes"] > 0
        print(f"\n64 tokens alone: {64 / (time.perf_counter() - t0):.0f} tok/s")
    assert got == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_prefix_reuse(tmp_path):
    """Prefix reuse on the GPU (bf16 kernels, decode graphs; prefill graphs of up to 64 tokens:
    the rests of up to 64 tokens are tail graphs over the cache row): a second turn, in place and
    copied from a running row, gets the Generator's tokens."""
    path = make_fixture(tmp_path, formats=["bf16"], experts=8)["bf16"]
    m = mixprec.load(path, device="cuda", progress=False)
    first, other = prompts(2, lo=70, hi=90, seed=12)
    sp = SamplingParams(max_new_tokens=10)
    gen = Generator(m)
    with Engine(m, max_batch=4, max_len=256, prefill_graph_tokens=64) as eng:
        out = eng.submit(first, sp).result(T_OUT).output_ids
        assert out == gen.generate([first], sp)[0]
        second = first + out + other[:7]
        busy = eng.submit(second, SamplingParams(max_new_tokens=60))
        next(iter(busy))
        third = eng.submit(first + other[:5], sp).result(T_OUT)
        got = [busy.result(T_OUT), third]
    # bf16: the Generator's whole prefill and the rest's attention kernel round apart; on a near-tie
    # (a random model has gaps of 0.003) greedy picks may differ (session 43: token 3 of `busy`,
    # where fp16 in the interpreter agreed with the engine), so every token must be the reference's
    # argmax up to 0.1 (logits' std ~1: a wrong K/V row would miss that at once)
    for p, r in zip((second, first + other[:5]), got):
        assert max(greedy_margins(m, p, r.output_ids)) <= 0.1, (p, r.output_ids)
    assert [r.cached_tokens for r in got] == [taken(second, len(first + out) - 1),
                                              taken(first + other[:5], len(first))]
    assert eng._prefill_fwd._tails and all(s.graph is not None for s in eng._prefill_fwd._tails.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_chunked_prefill(tmp_path):
    """Chunked prefill on the GPU: a 150-token prompt goes in as 32-token chunks (tail graphs) while
    a request decodes on the graphs between them; both get the Generator's tokens, and so does the
    long prompt's next turn (a reused prefix, then chunks of its rest)."""
    path = make_fixture(tmp_path, formats=["bf16"], experts=8)["bf16"]
    m = mixprec.load(path, device="cuda", progress=False)
    short, long_a, more = prompts(3, lo=150, hi=151, seed=13)
    short, more = short[:9], more[:70]
    sp, run_sp = SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=80)
    gen = Generator(m)
    with Engine(m, max_batch=4, max_len=512, prefill_tokens=32, prefill_graph_tokens=32) as eng:
        run = eng.submit(short, run_sp)
        next(iter(run))
        n_run = len(run.output_ids)
        a = eng.submit(long_a, sp)
        a.result(T_OUT)
        assert not run.done and len(run.output_ids) > n_run + 3      # decoded between the chunks
        b = eng.submit(long_a + a.output_ids + more, sp).result(T_OUT)
        run.result(T_OUT)
    assert b.cached_tokens == taken(b.prompt_ids, len(long_a) + 7)
    for r, p in ((run, short), (a, long_a), (b, long_a + a.output_ids + more)):
        assert r.output_ids == gen.generate([p], r.params)[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_warmup_captures_every_graph_up_front(tmp_path):
    """Engine(warmup=True): before the first request every decode graph (3 batch x 2 length
    buckets x 4 sampling modes) and every prefill bucket graph is captured; requests of every
    kind then capture nothing new and get the Generator's tokens."""
    path = make_fixture(tmp_path, formats=["bf16"], experts=8)["bf16"]
    m = mixprec.load(path, device="cuda", progress=False)
    ps = prompts(6, seed=9)
    params = [SamplingParams(max_new_tokens=6 + i) for i in range(6)]
    params[2] = SamplingParams(temperature=0.8, top_k=5, seed=2, max_new_tokens=9)
    params[4] = SamplingParams(temperature=0.7, seed=4, max_new_tokens=12)
    params[5] = SamplingParams(presence_penalty=1.0, max_new_tokens=7)
    gen = Generator(m)
    ref = [gen.generate([p], sp)[0] for p, sp in zip(ps, params)]
    with Engine(m, max_batch=4, max_len=512, warmup=True) as eng:
        assert eng.ready.wait(T_OUT) and eng.healthy and eng.warmup_s > 0
        n = eng.metrics()["cuda_graphs"]
        assert len(eng._graphs) == 3 * 2 * 4 and eng._prefill_fwd.graphs == n - 24 > 0
        got = [r.result(T_OUT).output_ids for r in [eng.submit(p, sp) for p, sp in zip(ps, params)]]
        assert eng.metrics()["cuda_graphs"] == n
    assert got == ref
