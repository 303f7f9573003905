"""Whole-model tests: our Qwen3 / Qwen3-MoE against transformers on the same weights, the KV
cache against full forwards, and the bucketed MoE against independent per-expert loops."""
import math

import pytest
import torch
import torch.nn.functional as F

from mixprec.config import ModelArgs
from mixprec.errors import CheckpointError, MissingWeight, MixprecError, ShapeMismatch
import mixprec.formats.dense  # noqa: F401  (registers the dense layout even before formats/__init__ exists)
from mixprec.formats.base import Packed
from mixprec.layers.linear import FusedLinear, Linear
from mixprec.layers.moe import MoE, moe_reference
from mixprec.layers.norm import rope_parameters
from mixprec.models.qwen3 import Qwen3ForCausalLM

transformers = pytest.importorskip("transformers")

V, H, HEADS, KVH, D, I_DENSE, I_MOE, E, TOPK = 128, 64, 4, 2, 16, 96, 32, 8, 2
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


def dense(t: torch.Tensor, dtype=torch.float32, **params) -> Packed:
    return Packed("dense", t.shape[0], t.shape[1], {"weight": t.detach().to(dtype).contiguous()}, params)


def _randomize(model, seed: int) -> None:
    """Weights big enough that logits are O(1) and routing is far from ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))


def hf_model(kind: str, seed: int = 0, **kw):
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS,
                  num_key_value_heads=KVH, head_dim=D, intermediate_size=I_DENSE, max_position_embeddings=256,
                  rope_theta=1e6, rms_norm_eps=1e-6, attn_implementation="eager")
    common.update(kw)
    torch.manual_seed(seed)
    if kind == "moe":
        cfg = transformers.Qwen3MoeConfig(moe_intermediate_size=I_MOE, num_experts=E, num_experts_per_tok=TOPK,
                                          mlp_only_layers=[0], **common)
        model = transformers.Qwen3MoeForCausalLM(cfg)
    else:
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**common))
    _randomize(model, seed)
    return model.float().eval()


def ours_from_hf(hf, dtype=torch.float32, device="cpu", head_as_tensor=False) -> Qwen3ForCausalLM:
    """Copy a transformers model's state dict through the loader interface (set_linear/set_tensor)."""
    args = ModelArgs.from_hf(hf.config.to_dict())
    m = Qwen3ForCausalLM(args, dtype=dtype)
    plain = args.plain_tensors()
    for name, t in hf.state_dict().items():
        t = t.detach().to(device)
        if name.endswith("mlp.experts.gate_up_proj"):        # transformers 5: [E, 2I, H], gate rows first
            pre = name[: -len(".gate_up_proj")]
            for e in range(t.shape[0]):
                g, u = t[e].chunk(2)
                m.set_linear(f"{pre}.{e}.gate_proj", dense(g, dtype))
                m.set_linear(f"{pre}.{e}.up_proj", dense(u, dtype))
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[: -len(".down_proj")]
            for e in range(t.shape[0]):
                m.set_linear(f"{pre}.{e}.down_proj", dense(t[e], dtype))
        elif name == "lm_head.weight":
            if args.tie_word_embeddings:
                continue
            if head_as_tensor:
                m.set_tensor(name, t)
            else:
                m.set_linear("lm_head", dense(t, dtype))
        elif name in plain:
            m.set_tensor(name, t)
        else:
            m.set_linear(name[: -len(".weight")], dense(t, dtype))
    m.finalize()
    return m


def left_padded(lens, T, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (len(lens), T), generator=g)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for b, n in enumerate(lens):
        mask[b, T - n:] = 1
    return ids, mask


CASES = {
    "moe": dict(kind="moe"),
    "moe_tied_no_renorm": dict(kind="moe", tie_word_embeddings=True, norm_topk_prob=False),
    "dense": dict(kind="dense"),
    "dense_yarn": dict(kind="dense", rope_parameters={"rope_theta": 1e6, **YARN}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_transformers(case):
    kw = dict(CASES[case])
    hf = hf_model(kw.pop("kind"), seed=1, **kw)
    ours = ours_from_hf(hf, head_as_tensor=case == "dense")
    if case == "dense_yarn":
        assert ours.args.rope_scaling["rope_type"] == "yarn"
        assert ours.model.rotary.attention_factor > 1.0
    ids, mask = left_padded([7, 4], 7, seed=2)
    pos = (mask.cumsum(1) - 1).clamp(min=0)              # transformers' convention for left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, positions=pos, attn_mask=mask)
    assert got.dtype == torch.float32 and got.shape == (2, 7, V)
    assert torch.isfinite(got).all()                     # padded rows too
    valid = mask.bool()
    assert ref[valid].abs().max() > 0.5                  # the comparison is not trivially small
    assert (got[valid] - ref[valid]).abs().max() <= 1e-4
    # without padding: plain causal path (no mask tensor)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert (got - ref).abs().max() <= 1e-4


@pytest.mark.parametrize("rope", [None, {"rope_type": "linear", "factor": 2.0}, YARN,
                                  dict(YARN, attention_factor=0.8, beta_fast=16, truncate=False),
                                  dict(YARN, mscale=1.0, mscale_all_dim=0.5)])
def test_rope_parameters_match_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    params = {"rope_theta": 5e6, "rope_type": "default", **(rope or {})}
    cfg = transformers.Qwen3Config(hidden_size=H, num_attention_heads=HEADS, head_dim=D,
                                   max_position_embeddings=1024, rope_parameters=params)
    inv, af = rope_parameters(D, 5e6, rope, 1024)
    if rope is None:
        ref_inv = 1.0 / (5e6 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
        ref_af = 1.0
    else:
        ref_inv, ref_af = ROPE_INIT_FUNCTIONS[params["rope_type"]](cfg, "cpu")
    assert torch.allclose(inv, ref_inv, rtol=1e-6, atol=0)
    assert af == pytest.approx(ref_af, rel=1e-9)


_DROP = object()


@pytest.mark.parametrize("kind,change", [
    ("moe", {"norm_topk_prob": _DROP}),                                      # default False
    ("dense", {"rope_theta": _DROP}),                                        # default 1e4
    ("dense", {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}}),   # it wins over the top level
    ("dense", {"rope_scaling": dict(YARN, rope_theta=1e4)}),
    ("dense", {"rope_scaling": YARN, "original_max_position_embeddings": 16}),     # the top level overrides
    ("dense", {"max_position_embeddings": _DROP, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
    ("dense", {"head_dim": _DROP}),                                          # Qwen3Config: 128
    ("moe", {"head_dim": _DROP}),                                            # Qwen3MoeConfig: hidden / heads
])
def test_config_defaults_and_precedence_follow_transformers(kind, change):
    """config.json keys left out or given twice read as transformers reads them (one left-out
    norm_topk_prob had renormalised the routing weights: logits off by 1.3)."""
    cfg = {"model_type": "qwen3_moe" if kind == "moe" else "qwen3", "vocab_size": V, "hidden_size": H,
           "num_hidden_layers": 2, "num_attention_heads": HEADS, "num_key_value_heads": KVH, "head_dim": D,
           "intermediate_size": I_DENSE, "max_position_embeddings": 256, "rope_theta": 1e6, "rms_norm_eps": 1e-6,
           "norm_topk_prob": True, **({"num_experts": E, "num_experts_per_tok": TOPK, "moe_intermediate_size": I_MOE}
                                      if kind == "moe" else {})}
    cfg.update(change)
    cfg = {k: v for k, v in cfg.items() if v is not _DROP}
    ref = (transformers.Qwen3MoeConfig if kind == "moe" else transformers.Qwen3Config)(**cfg)
    ref.standardize_rope_params()     # what transformers computes with (a top-level original_max_... set late)
    ours = ModelArgs.from_hf(cfg)
    rp = ref.rope_parameters
    assert ours.rope_theta == rp["rope_theta"]
    assert ours.max_position_embeddings == ref.max_position_embeddings
    assert ours.head_dim == (getattr(ref, "head_dim", None) or H // HEADS)
    if kind == "moe":
        assert ours.norm_topk_prob == ref.norm_topk_prob
    if rp.get("rope_type", "default") != "default":
        assert (ours.rope_scaling or {}).get("original_max_position_embeddings") == rp.get(
            "original_max_position_embeddings")


def _decode_vs_full(model, ids, mask, steps, seed, cache=None):
    """Prefill `ids` (left padding per `mask`) into a cache, then `steps` single-token decode steps;
    each step's logits must equal the full forward over the whole sequence."""
    B, T = ids.shape
    g = torch.Generator().manual_seed(seed)
    new = torch.randint(0, V, (B, steps), generator=g)
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones(B, steps, dtype=mask.dtype)], 1)
    full_pos = torch.arange(T + steps).expand(B, -1)
    cache = cache if cache is not None else model.make_cache(B, 24)
    with torch.no_grad():
        full = model(full_ids, positions=full_pos, attn_mask=full_mask)
        pre = model(ids, positions=full_pos[:, :T], cache=cache, attn_mask=mask)
        valid = mask.bool()
        assert (pre[valid] - full[:, :T][valid]).abs().max() <= 1e-4
        for s in range(steps):
            step = model(new[:, s:s + 1], positions=full_pos[:, T + s:T + s + 1], cache=cache)
            assert (step[:, 0] - full[:, T + s]).abs().max() <= 1e-4, f"decode step {s}"


def test_kv_cache_prefill_then_decode_left_padded():
    ours = ours_from_hf(hf_model("moe", seed=3))
    cache = ours.make_cache(4, 24)                      # bigger than the batches run in it
    ids, mask = left_padded([6, 3, 1], 6, seed=4)
    _decode_vs_full(ours, ids, mask, steps=4, seed=5, cache=cache)
    # the same cache reused by a new batch: its mask resets `start`, stale K/V stay invisible
    ids, mask = left_padded([2, 4], 4, seed=23)
    _decode_vs_full(ours, ids, mask, steps=3, seed=24, cache=cache)
    assert cache.start[:2].tolist() == [2, 0]
    ours_yarn = ours_from_hf(hf_model("dense", seed=6, rope_parameters={"rope_theta": 1e6, **YARN}))
    ids, mask = left_padded([2, 5], 5, seed=7)
    _decode_vs_full(ours_yarn, ids, mask, steps=3, seed=8)


@pytest.mark.parametrize("tail", [False, True])
def test_kv_cache_right_padded_like_generate(tail):
    """runtime/generate.py's convention: right-padded prefill without a mask, per-row decode
    positions; each row must match the unpadded single-sequence forward. tail: the prefill's
    attention is causal without a mask tensor, as runtime/prefill.py runs it."""
    ours = ours_from_hf(hf_model("moe", seed=9))
    g = torch.Generator().manual_seed(10)
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (5, 2)]
    nxt = torch.randint(0, V, (2, 3), generator=g)
    ids = torch.zeros(2, 5, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
    cache = ours.make_cache(2, 16)
    cache.start.fill_(3)                                 # left over from an earlier left-padded batch
    cache.reset()
    lens = torch.tensor([5, 2])
    with torch.no_grad():
        # tail: the view's last 5 slots are the tokens' (the first 5 of the cache's rows)
        view = cache.rows(0, 2, 5) if tail else cache
        last = ours(ids, positions=torch.arange(5).expand(2, 5), cache=view, logits_index=lens - 1, tail=tail)
        assert last.shape == (2, 1, V)
        if tail:
            with pytest.raises(MixprecError, match="no padding mask"):
                ours(ids, positions=torch.arange(5).expand(2, 5), cache=cache, attn_mask=torch.ones(2, 5), tail=True)
        steps = [ours(nxt[:, s:s + 1], positions=(lens + s)[:, None], cache=cache)[:, 0] for s in range(3)]
        for b, s in enumerate(seqs):
            full = ours(torch.cat([s, nxt[b]])[None])[0]          # [n+3, V]
            n = len(s)
            assert (last[b, 0] - full[n - 1]).abs().max() <= 1e-4
            for t in range(3):
                assert (steps[t][b] - full[n + t]).abs().max() <= 1e-4


def _expert_weights(seed):
    g = torch.Generator().manual_seed(seed)
    Hm, Im = 32, 16
    w = {(e, p): torch.randn((Hm, Im) if p == "down" else (Im, Hm), generator=g) / 4
         for e in range(6) for p in ("gate", "up", "down")}
    return Hm, Im, w, torch.randn(6, Hm, generator=g)


def test_moe_buckets_mixed_formats_match_reference():
    """Experts spread over buckets by dtype (fp32 / bf16 dense stand in for two formats), one
    expert with gate and up in different formats, and one with a folded-norm input scale."""
    Hm, Im, w, router = _expert_weights(11)
    f32, b16 = torch.float32, torch.bfloat16
    dtypes = {0: (f32, f32, f32), 1: (f32, f32, f32), 2: (b16, b16, b16), 3: (b16, b16, b16),
              4: (f32, b16, f32), 5: (b16, f32, f32)}
    scale = 0.5 + torch.rand(Hm, generator=torch.Generator().manual_seed(12))
    scaled = {0}                                    # expert 0's gate/up get an input scale
    moe = MoE(Hm, Im, 6, top_k=3, renorm=True, dtype=f32, device="cpu", name="model.layers.1.mlp")
    moe.gate.weight = router.clone()
    given = []
    for e in range(6):
        for p, dt in zip(("gate", "up", "down"), dtypes[e]):
            pk = dense(w[e, p], dt)
            given.append(pk)
            moe.set_expert(e, p, pk, scale if (e in scaled and p != "down") else None)
    moe.finalize()

    got = [(b.proj, b.experts.tolist(), b.w.weight.dtype, b.input_scale is not None) for b in moe.buckets]
    assert got == [("gate_up", [0], f32, True), ("gate_up", [1], f32, False), ("gate_up", [2, 3], b16, False),
                   ("gate", [4], f32, False), ("gate", [5], b16, False),
                   ("up", [4], b16, False), ("up", [5], f32, False),
                   ("down", [0, 1, 4, 5], f32, False), ("down", [2, 3], b16, False)]
    b = moe.buckets[2]
    assert b.w.weight.shape == (2, 2 * Im, Hm) and b.expert_map.tolist() == [-1, -1, 0, 1, -1, -1]
    assert torch.equal(b.w.weight[1, :Im], w[3, "gate"].to(b16))          # gate rows first
    assert all(not pk.tensors() for pk in given)                          # per-expert copies freed

    x = torch.randn(13, Hm, generator=torch.Generator().manual_seed(13))
    y_buckets = moe(x)
    y_ref = moe.reference(x)

    # independent spec from the original weights (rounded to their dtype), one token at a time
    probs = torch.softmax(x @ router.T, dim=-1)
    y_spec = torch.zeros_like(x)
    for t in range(x.shape[0]):
        top_w, top_i = probs[t].topk(3)
        top_w = top_w / top_w.sum()
        for wt, e in zip(top_w, top_i.tolist()):
            wq = {p: w[e, p].to(dt).float() for p, dt in zip(("gate", "up", "down"), dtypes[e])}
            xi = x[t] * scale if e in scaled else x[t]
            y_spec[t] += wt * (wq["down"] @ (F.silu(wq["gate"] @ xi) * (wq["up"] @ xi)))
    assert (y_ref - y_spec).abs().max() <= 1e-5
    assert (y_buckets - y_spec).abs().max() <= 1e-5
    # every expert was used, so every bucket was exercised
    assert set(torch.topk(probs, 3).indices.flatten().tolist()) == set(range(6))


def test_moe_reference_no_renorm_and_3d_input():
    Hm, Im, w, router = _expert_weights(14)
    moe = MoE(Hm, Im, 6, top_k=2, renorm=False, dtype=torch.float32, device="cpu")
    moe.gate.weight = router.clone()
    for (e, p), t in w.items():
        moe.set_expert(e, p, dense(t))
    moe.finalize()
    assert [b.proj for b in moe.buckets] == ["gate_up", "down"]
    x = torch.randn(2, 5, Hm, generator=torch.Generator().manual_seed(15))
    probs = torch.softmax(x.reshape(-1, Hm) @ router.T, -1)
    top_w, top_i = probs.topk(2)                          # no renormalisation
    spec = torch.stack([sum(wt * (w[e, "down"] @ (F.silu(w[e, "gate"] @ xt) * (w[e, "up"] @ xt)))
                            for wt, e in zip(top_w[t], top_i[t].tolist()))
                        for t, xt in enumerate(x.reshape(-1, Hm))]).reshape(x.shape)
    assert (moe(x) - spec).abs().max() <= 1e-5
    assert (moe_reference(x.reshape(-1, Hm), router, moe.expert_fn, 2, False).reshape(x.shape) - spec).abs().max() <= 1e-5


def test_fused_linear_fuses_only_when_formats_agree():
    g = torch.Generator().manual_seed(16)
    ws = [torch.randn(n, 24, generator=g) for n in (16, 8, 8)]
    x = torch.randn(3, 24, generator=g)
    s = 0.5 + torch.rand(24, generator=g)

    def parts(dtypes, scales):
        out = []
        for t, dt, sc in zip(ws, dtypes, scales):
            lin = Linear(*t.shape)
            lin.set(dense(t, dt), sc)
            out.append(lin)
        return out

    f32, b16 = torch.float32, torch.bfloat16
    cases = [((f32, f32, f32), (None, None, None), True),
             ((f32, f32, f32), (s, s, s), True),
             ((f32, b16, f32), (None, None, None), False),      # dtypes differ: no fusion
             ((f32, f32, f32), (s, None, s), False)]            # input scales differ: no fusion
    for dtypes, scales, fused in cases:
        fl = FusedLinear(parts(dtypes, scales), ["q_proj", "k_proj", "v_proj"], "qkv_proj")
        assert (fl.fused is not None) == fused
        names = list(fl.named_packed("p"))
        assert names == (["p.qkv_proj"] if fused else ["p.q_proj", "p.k_proj", "p.v_proj"])
        for y, t, dt, sc in zip(fl(x), ws, dtypes, scales):
            xi = x * sc if sc is not None else x
            assert torch.allclose(y, xi @ t.to(dt).float().T, atol=1e-5)


def test_loading_errors_are_typed_and_named():
    hf = hf_model("moe", seed=17)
    args = ModelArgs.from_hf(hf.config.to_dict())
    m = Qwen3ForCausalLM(args, dtype=torch.float32)
    sd = hf.state_dict()
    with pytest.raises(ShapeMismatch, match="q_proj.*expected \\[64x64\\]"):
        m.set_linear("model.layers.0.self_attn.q_proj", dense(sd["model.layers.0.self_attn.k_proj.weight"]))
    with pytest.raises(CheckpointError, match="not a linear"):
        m.set_linear("model.layers.0.self_attn.qq_proj", dense(torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match="layer 0 has no experts"):
        m.set_linear("model.layers.0.mlp.experts.0.up_proj", dense(torch.zeros(I_MOE, H)))
    with pytest.raises(ShapeMismatch, match="expert index out of range"):
        m.set_linear(f"model.layers.1.mlp.experts.{E}.up_proj", dense(torch.zeros(I_MOE, H)))
    with pytest.raises(ShapeMismatch, match="model.norm.weight"):
        m.set_tensor("model.norm.weight", torch.ones(H + 1))
    with pytest.raises(CheckpointError, match="not a plain tensor"):
        m.set_tensor("model.layers.0.mlp.gate.weight", torch.ones(E, H))     # layer 0 is dense
    m.set_tensor("model.norm.weight", sd["model.norm.weight"])
    m.set_linear("model.layers.1.mlp.experts.3.up_proj", dense(torch.zeros(I_MOE, H)))
    miss = m.missing()
    assert "model.norm.weight" not in miss and "model.layers.1.mlp.experts.3.up_proj" not in miss
    assert {"model.embed_tokens.weight", "lm_head", "model.layers.1.mlp.gate.weight",
            "model.layers.1.mlp.experts.3.gate_proj", "model.layers.0.self_attn.q_proj"} <= set(miss)
    assert len(miss) == len(args.plain_tensors()) - 1 + len(args.linear_shapes()) - 1
    with pytest.raises(MissingWeight, match="model.layers.1.mlp.experts.7.down_proj"):
        m.finalize()
    with pytest.raises(MixprecError, match="finalize"):
        m(torch.zeros(1, 2, dtype=torch.long))


def test_linear_modules_after_finalize():
    ours = ours_from_hf(hf_model("moe", seed=18))
    mods = ours.linear_modules()
    assert "model.layers.0.self_attn.qkv_proj" in mods and "model.layers.0.mlp.gate_up_proj" in mods
    assert mods["model.layers.1.mlp.buckets.0.gate_up"].weight.shape == (E, 2 * I_MOE, H)
    assert mods["model.layers.1.mlp.buckets.1.down"].weight.shape == (E, H, I_MOE)
    assert mods["lm_head"].n == V and ours.missing() == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu_and_decodes():
    hf = hf_model("moe", seed=19)
    cpu = ours_from_hf(hf)
    gpu = ours_from_hf(hf, device="cuda")
    ids, mask = left_padded([6, 3], 6, seed=20)
    pos = torch.arange(6).expand(2, 6)
    with torch.no_grad():
        ref = cpu(ids, positions=pos, attn_mask=mask)
        got = gpu(ids.cuda(), positions=pos.cuda(), attn_mask=mask.cuda()).cpu()
    valid = mask.bool()
    assert (got[valid] - ref[valid]).abs().max() <= 1e-3      # TF32 / kernel differences
    # bf16 on GPU: loose agreement with fp32 CPU, and cache decode consistent with itself
    gpu16 = ours_from_hf(hf, dtype=torch.bfloat16, device="cuda")
    cache = gpu16.make_cache(2, 16)
    with torch.no_grad():
        got16 = gpu16(ids.cuda(), positions=pos.cuda(), cache=cache, attn_mask=mask.cuda()).cpu()
        step = gpu16(ids[:, -1:].cuda(), positions=torch.full((2, 1), 6, device="cuda"), cache=cache)
    assert torch.isfinite(step).all()
    rel = (got16[valid] - ref[valid]).norm() / ref[valid].norm()
    assert rel < 0.05


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_step_captures_in_cuda_graph():
    """Attention, KV cache, rope and dense layers have no host sync: a decode step captures."""
    gpu = ours_from_hf(hf_model("dense", seed=21), dtype=torch.bfloat16, device="cuda")
    ids, mask = left_padded([5, 2], 5, seed=22)
    cache = gpu.make_cache(2, 32)
    tok = torch.randint(0, V, (2, 1), device="cuda")
    pos = torch.full((2, 1), 5, device="cuda")
    with torch.no_grad():
        gpu(ids.cuda(), positions=torch.arange(5, device="cuda").expand(2, 5), cache=cache, attn_mask=mask.cuda())
        eager = [gpu(tok, positions=pos + s, cache=cache).clone() for s in range(3)]
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            gpu(tok, positions=pos, cache=cache)                 # warm-up
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        static_pos = pos.clone()
        with torch.cuda.graph(graph):
            out = gpu(tok, positions=static_pos, cache=cache)
        for step in range(3):                                    # rewrites slots 5..7 as eager did
            static_pos.copy_(pos + step)
            graph.replay()
            assert torch.equal(out, eager[step])
