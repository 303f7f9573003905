"""Whole model on the GPU: kernels vs the readable reference path, CUDA graphs vs eager.

Greedy tokens must be equal; where they first differ, the two tokens must be a near tie in the
reference logits (bf16 kernels and bf16 dequant+matmul round differently), never a real
disagreement. Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

import mixprec
from mixprec.demo import write_demo_config
from mixprec.formats.base import reference_path
from mixprec.runtime.generate import Generator
from mixprec.runtime.sampling import SamplingParams
from mixprec.testing.fixtures import FIXTURES, make_fixture

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

PROMPTS = [[11, 42, 7, 300, 5], [9, 8], [100, 200, 300, 400, 17, 23, 1, 2, 3]]
NEW = 16


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_fx")
    out = make_fixture(root)
    out["mix"] = write_demo_config(out, root / "mix.yaml")
    return out


def _greedy(model, graphs: bool):
    return Generator(model, use_cuda_graphs=graphs).generate(PROMPTS, SamplingParams(max_new_tokens=NEW))


def _check_tie_tolerant(model, got, want, prompts=PROMPTS, tol=0.05):
    """Sequences equal, or first divergence at a near tie of the reference logits."""
    for p, g, w in zip(prompts, got, want):
        if g == w:
            continue
        i = next(j for j in range(min(len(g), len(w))) if g[j] != w[j])
        with torch.inference_mode(), reference_path():
            ids = torch.tensor([p + w[:i]], device="cuda")
            logits = model(ids)[0, -1].float()
        gap = (logits[w[i]] - logits[g[i]]).abs().item()
        scale = logits.std().item()
        assert gap <= tol * scale, f"prompt {p}: diverged at {i} with a logit gap {gap:.4f} (std {scale:.3f})"


@pytest.mark.parametrize("name", list(FIXTURES) + ["mix"])
def test_kernels_match_reference_greedy(fx, name):
    model = mixprec.load(fx[name], device="cuda", dtype=torch.bfloat16, progress=False)
    fast = _greedy(model, graphs=True)
    with reference_path():
        ref = _greedy(model, graphs=False)
    _check_tie_tolerant(model, fast, ref)


def test_cuda_graph_replay_equals_eager(fx):
    model = mixprec.load(fx["mix"], device="cuda", dtype=torch.bfloat16, progress=False)
    assert _greedy(model, graphs=True) == _greedy(model, graphs=False)


def test_batch_mixing_prompt_lengths_equals_single(fx):
    model = mixprec.load(fx["mix"], device="cuda", dtype=torch.bfloat16, progress=False)
    batch = _greedy(model, graphs=True)
    gen = Generator(model)
    for p, b in zip(PROMPTS, batch):
        single = gen.generate([p], SamplingParams(max_new_tokens=NEW))[0]
        _check_tie_tolerant(model, [b], [single], prompts=[p])


def _gptq_g128(tmp_path, sym: bool):
    """(model on the GPU, its config): a tiny GPTQ checkpoint of group 128 (the fixtures' group 32
    cannot take the tensor-core tiles)."""
    from mixprec.testing.fixtures import random_weights, round_to, tiny_config, write_checkpoint
    cfg = tiny_config()
    ckpt = write_checkpoint(tmp_path / "g128", cfg, round_to(random_weights(cfg, 3), torch.bfloat16), "gptq",
                            dict(bits=4, group_size=128, sym=sym, desc_act=False, checkpoint_format="gptq"))
    return mixprec.load(ckpt, device="cuda", dtype=torch.bfloat16, progress=False), cfg


def _recorded(monkeypatch, module, name: str) -> list:
    """Replace module.name (a predicate) by itself recording each answer; -> the answers."""
    fn, seen = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a: seen.append(fn(*a)) or seen[-1])
    return seen


def _greedy_matches_reference_at_batch_3_and_1(model) -> None:
    for prompts in (PROMPTS, PROMPTS[:1]):
        fast = Generator(model, use_cuda_graphs=True).generate(prompts, SamplingParams(max_new_tokens=NEW))
        with reference_path():
            ref = Generator(model, use_cuda_graphs=False).generate(prompts, SamplingParams(max_new_tokens=NEW))
        _check_tie_tolerant(model, fast, ref, prompts=prompts)


@pytest.mark.parametrize("sym", [True, False])
def test_int4_tensor_core_gemv_matches_reference_greedy(tmp_path, monkeypatch, sym):
    """The int4 linears on the tensor-core GEMV (intq's "mma" rows: one activation row per program
    at batch 1, the batch's rows as the mmas' B columns at 2-8) give the reference's greedy
    tokens: a GPTQ checkpoint of group 128, sym and asym, with every int4 GEMV of 1-8 rows forced
    onto an mma config, batch 3 and batch 1."""
    from mixprec.kernels import configs, intq
    model, _ = _gptq_g128(tmp_path, sym)
    get = configs.get

    def mma_rows(kind, M, N, K):
        if kind == "intq4" and M <= 8:
            return configs.cfg("gemv", 1 if M == 1 else 8, 32, 128, 2, 4, 1, mma=True)
        return get(kind, M, N, K)

    monkeypatch.setattr(configs, "get", mma_rows)
    taken = _recorded(monkeypatch, intq, "mma_fits")
    _greedy_matches_reference_at_batch_3_and_1(model)
    assert taken and all(taken), "the int4 linears did not take the tensor-core GEMV"


@pytest.mark.parametrize("sym", [True, False])
def test_moe_int4_mma_blocks_match_reference_greedy(tmp_path, monkeypatch, sym):
    """MoE layers on the dot path's 8-pair tensor-core blocks (the 235B's row of
    moe_configs.DOT_INTQ_MMA: two-warp gate/up, one-warp down programs; forced for every token
    count at the fixture's hidden size: the prefill of three prompts of different lengths, then
    decode at batch 3 and 1) give the
    reference's greedy tokens: a GPTQ checkpoint of group 128, sym and asym. (Session 37 ran it
    once on the CPU in the interpreter, fp16, two prompts of 3 tokens: equal tokens.)"""
    from mixprec.kernels import moe, moe_configs
    model, cfg = _gptq_g128(tmp_path, sym)
    row = moe_configs.DOT_INTQ_MMA[4096][0]
    monkeypatch.setattr(moe_configs, "DOT_INTQ_MMA", {cfg["hidden_size"]: (dict(row, min_m=1, max_m=1 << 30),)})
    taken = _recorded(monkeypatch, moe, "_mma_dot_fits")
    _greedy_matches_reference_at_batch_3_and_1(model)
    assert taken and all(taken), "the MoE layers did not take the mma blocks"
