"""Norm, q/k-norm + RoPE + cache-write and decode-attention kernels against the readable torch
path (layers/norm.py, layers/attention.py). CPU: Triton interpreter in fp16/fp32; CUDA: bf16 too."""
import pytest
import torch
import torch.nn.functional as F

from mixprec.formats.base import interpreter_kernels, reference_path
from mixprec.kernels.attention import (block_n, decode_attention, decode_attention_new, decode_splits, prefill_attention,
                                       qk_norm_rope_store)
from mixprec.kernels.norm import rms_norm as rms_norm_kernel
from mixprec.layers.attention import KVCache
from mixprec.layers.norm import Rotary, apply_rope, rms_norm

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if CUDA else [])


def _assert_roundings_apart(a, b, dtype, n=2):
    """|a - b| within n roundings of the dtype (fp32: the summation order differs, allow 1e-5)."""
    rel = 1e-5 if dtype == torch.float32 else n * torch.finfo(dtype).eps
    torch.testing.assert_close(a.float(), b.float(), rtol=rel, atol=rel)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [128, 100])
def test_rms_norm_kernel_matches_reference(dtype, D):
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(5, 3, D, generator=g, device=DEV).to(dtype)
    r = torch.randn(5, 3, D, generator=g, device=DEV).to(dtype)
    w = (1 + 0.1 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    y = rms_norm_kernel(x, w, 1e-6)
    with reference_path():
        ref = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype
    _assert_roundings_apart(y, ref, dtype)
    y2, h = rms_norm_kernel(x, w, 1e-6, residual=r)
    assert torch.equal(h, x + r)                    # the add rounds exactly like torch's
    with reference_path():
        _assert_roundings_apart(y2, rms_norm(h, w, 1e-6), dtype)


def _ref_qk(q, k, v, positions, rotary, qw, kw, eps, kc, vc):
    """The readable path of Attention.forward up to the cache write."""
    B, T, _ = q.shape
    D = kc.shape[-1]
    cos, sin = rotary(positions, q.dtype)
    with reference_path():
        qn = apply_rope(rms_norm(q.view(B, T, -1, D), qw, eps), cos, sin)
        kn = apply_rope(rms_norm(k.view(B, T, -1, D), kw, eps), cos, sin)
    idx = positions[:, None, :, None].expand(B, kn.shape[2], T, D)
    kc.scatter_(2, idx, kn.transpose(1, 2))
    vc.scatter_(2, idx, v.view(B, T, -1, D).transpose(1, 2))
    return qn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 5])
def test_qk_norm_rope_store_matches_reference(dtype, T):
    B, HQ, HK, D, S = 3, 8, 2, 64, 24
    g = torch.Generator(device=DEV).manual_seed(1)
    qkv = torch.randn(B, T, (HQ + 2 * HK) * D, generator=g, device=DEV).to(dtype) * 3
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)            # strided views, as FusedLinear gives
    positions = torch.tensor([[4 + t for t in range(T)], [t for t in range(T)], [9 + 2 * t for t in range(T)]],
                             device=DEV)
    rotary = Rotary(D, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 32).to(DEV)
    qw = (1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    kw = (1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    big = torch.zeros(2, B + 1, HK, S + 4, D, dtype=dtype, device=DEV)  # [L, B', kvh, S', D]: write into a view
    kc, vc = big[0, 1:, :, :S], big[1, 1:, :, :S]
    rk, rv = kc.clone(), vc.clone()
    cos, sin = rotary(positions, dtype)
    qo = qk_norm_rope_store(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, positions)
    ref = _ref_qk(q, k, v, positions, rotary, qw, kw, 1e-6, rk, rv)
    assert qo.shape == (B, T, HQ, D)
    _assert_roundings_apart(qo, ref, dtype, n=4)
    _assert_roundings_apart(kc, rk, dtype, n=4)
    assert torch.equal(vc, rv)
    assert big[:, 0].abs().sum() == 0 and big[:, :, :, S:].abs().sum() == 0   # nothing outside the view


def test_qk_norm_rope_store_writes_the_rows_given():
    """rows [B]: sequence b's k / v land in cache row rows[b] (any row, any order), the rest untouched."""
    B, T, HQ, HK, D, S = 2, 3, 4, 2, 32, 16
    g = torch.Generator(device=DEV).manual_seed(2)
    q, k, v = (torch.randn(B, T, h * D, generator=g, device=DEV).half() for h in (HQ, HK, HK))
    positions = torch.tensor([[5, 6, 7], [0, 1, 2]], device=DEV)
    rotary = Rotary(D, 1e4, None, 32).to(DEV)
    qw, kw = torch.ones(D, dtype=torch.half, device=DEV), torch.ones(D, dtype=torch.half, device=DEV)
    cos, sin = rotary(positions, torch.half)
    kc, vc = (torch.zeros(4, HK, S, D, dtype=torch.half, device=DEV) for _ in range(2))
    rk, rv = (torch.zeros(B, HK, S, D, dtype=torch.half, device=DEV) for _ in range(2))
    rows = torch.tensor([3, 1], device=DEV)
    qo = qk_norm_rope_store(q, k, v, cos, sin, qw, kw, 1e-6, kc, vc, positions, rows=rows)
    ref = _ref_qk(q, k, v, positions, rotary, qw, kw, 1e-6, rk, rv)
    _assert_roundings_apart(qo, ref, torch.half, n=4)
    _assert_roundings_apart(kc[rows], rk, torch.half, n=4)
    assert torch.equal(vc[rows], rv) and kc[[0, 2]].abs().sum() == 0 and vc[[0, 2]].abs().sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,HQ,HK,D,S", [(1, 16, 8, 2, 64, 300), (2, 7, 5, 1, 32, 90), (3, 40, 4, 4, 64, 140),
                                            (1, 33, 64, 4, 128, 200), (2, 1, 8, 2, 64, 70)])
@pytest.mark.parametrize("min_split", [256, 16])
def test_prefill_attention_matches_sdpa_over_the_rows(dtype, B, T, HQ, HK, D, S, min_split, monkeypatch):
    """T queries per sequence over cache row rows[b] (rows out of order, in a bigger strided cache),
    query t at pos[b, t] (prefixes of any length, a padded tail clamped to the last slot: repeated
    positions), against SDPA with KVCache.mask over the gathered rows; head groups of 1, 4, 5 (not a
    power of two: padded program rows), 16 (the 235B's 64 / 4: token blocks of 8). min_split 16:
    the slots in up to 32 splits, merged after (splits past the visible slots, rows that see
    nothing in a split)."""
    import mixprec.kernels.attention as attn
    monkeypatch.setattr(attn, "PREFILL_MIN_SPLIT", min_split)
    if min_split < 256:
        assert attn.prefill_splits(1, S) > 1
    g = torch.Generator(device=DEV).manual_seed(T * S + HQ)
    cache = KVCache(2, B + 2, HK, S + 5, D, dtype, DEV)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g, device=DEV).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=DEV).to(dtype))
    kc, vc = cache.k[1, :, :, :S], cache.v[1, :, :, :S]                 # strided [B + 2, HK, S, D]
    rows = torch.randperm(B + 2, generator=torch.Generator().manual_seed(T))[:B].to(DEV)
    first = torch.randint(0, S - T, (B,), generator=g, device=DEV)
    first[0] = 0
    pos = (first[:, None] + torch.arange(T, device=DEV)).clamp(max=S - 1)
    if T > 4:
        pos[-1, -3:] = S - 1                                              # a padded tail: repeated positions
    q = torch.randn(B, T, HQ, D, generator=g, device=DEV).to(dtype)
    o = prefill_attention(q, kc, vc, rows, pos)
    view = KVCache.over(kc[rows][None], vc[rows][None], torch.zeros(B, dtype=torch.long, device=DEV),
                        torch.arange(S, device=DEV))
    ref = F.scaled_dot_product_attention(q.transpose(1, 2).float(), view.k[0].float(), view.v[0].float(),
                                         attn_mask=view.mask(pos), enable_gqa=HQ != HK).transpose(1, 2)
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert o.shape == q.shape and o.dtype == dtype
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,HQ,HK,D,S,one_tile", [(1, 8, 2, 64, 40, True), (3, 16, 1, 128, 200, True),
                                                   (2, 4, 4, 64, 1000, True), (5, 32, 4, 128, 130, True),
                                                   (1, 8, 2, 64, 2100, True), (3, 16, 1, 128, 200, False),
                                                   (1, 8, 2, 64, 2100, False), (1, 64, 4, 128, 1100, True)])
def test_decode_attention_matches_sdpa(dtype, B, HQ, HK, D, S, one_tile, monkeypatch):
    """Splits merged by the last to arrive, padding rows, strided cache views; 32-, 64- and (from
    2048 slots) 128-slot tiles; splits of one tile (kernels/attention.py ONE_TILE: every case here)
    and, for two of the cases, the tile loop (one_tile False); the 235B's 64 query heads on 8-warp
    programs (decode_warps)."""
    import mixprec.kernels.attention as attn
    monkeypatch.setattr(attn, "ONE_TILE", one_tile)
    g = torch.Generator(device=DEV).manual_seed(S)
    cache = KVCache(1, B + 1, HK, S + 3, D, dtype, DEV)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g, device=DEV).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=DEV).to(dtype))
    view = cache.rows(0, B, S)                                          # strided [B, HK, S, D] slices
    pos = torch.randint(0, S, (B,), generator=g, device=DEV)
    pos[0] = S - 1
    start = torch.randint(0, S, (B,), generator=g, device=DEV)
    start[-1] = pos[-1] + 1 if B > 1 else 0                             # a row that is all padding
    view.start.copy_(torch.minimum(start, pos + (B > 1)))
    q = torch.randn(B, HQ, D, generator=g, device=DEV).to(dtype)
    o = decode_attention(q, view.k[0], view.v[0], view.start, pos)
    mask = view.mask(pos[:, None])                                       # [B, 1, 1, S]
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), view.k[0].float(), view.v[0].float(),
                                         attn_mask=mask, enable_gqa=HQ != HK)[:, :, 0]
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)


def test_decode_attention_merges_in_several_steps(monkeypatch):
    """The last split of a head merges the partials MERGE_ELEMS values at a time: one partial per
    step (the tests above merge all in one step) must give the same result."""
    import mixprec.kernels.attention as attn
    g = torch.Generator(device=DEV).manual_seed(7)
    B, HQ, HK, D, S = 1, 8, 2, 64, 1300
    k, v = (torch.randn(B, HK, S, D, generator=g, device=DEV).half() for _ in range(2))
    q = torch.randn(B, HQ, D, generator=g, device=DEV).half()
    start, pos = torch.zeros(B, dtype=torch.long, device=DEV), torch.full((B,), S - 1, device=DEV)
    one = decode_attention(q, k, v, start, pos)
    assert decode_splits(B, HK, S)[0] >= 8
    monkeypatch.setattr(attn, "MERGE_ELEMS", 16 * D)          # GP 16 rows x D: one partial per step
    torch.testing.assert_close(decode_attention(q, k, v, start, pos), one, atol=2e-3, rtol=2e-3)


def test_decode_attention_new_takes_expanded_positions():
    """pos / start as stride-0 views (positions = arange(T).expand(B, T)[:, -1:], the documented
    model call): row b must read its own entry, not memory past the tensor."""
    g = torch.Generator().manual_seed(0)
    B, H, D, S, T = 3, 2, 32, 16, 9
    q, k, v = (torch.randn(B, H * D, generator=g).half().to(DEV) for _ in range(3))
    cos, sin = torch.ones(B, D, dtype=torch.float16, device=DEV), torch.zeros(B, D, dtype=torch.float16, device=DEV)
    w = torch.ones(D, dtype=torch.float16, device=DEV)
    kc = torch.zeros(B, H, S, D, dtype=torch.float16, device=DEV)
    kc[:, :, :T - 1] = torch.randn(B, H, T - 1, D, generator=g).half().to(DEV)
    pos = torch.arange(T, device=DEV).expand(B, T)[:, -1:].reshape(B)
    start = torch.zeros(1, dtype=torch.long, device=DEV).expand(B)
    assert pos.stride() == (0,) and start.stride() == (0,)
    run = lambda p, s: decode_attention_new(q, k, v, cos, sin, w, w, 1e-6, kc.clone(), kc.clone(), s, p)  # noqa: E731
    torch.testing.assert_close(run(pos, start), run(pos.contiguous(), start.contiguous()), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,HQ,HK,D,S,one_tile", [(1, 8, 2, 64, 40, True), (3, 16, 4, 128, 1000, True),
                                                   (2, 4, 4, 64, 130, True), (1, 8, 2, 64, 1300, True),
                                                   (2, 4, 4, 64, 130, False), (1, 8, 2, 64, 1300, False)])
def test_decode_attention_new_matches_reference(dtype, B, HQ, HK, D, S, one_tile, monkeypatch):
    """q/k norm + RoPE + cache write + attention in one launch == the readable path (norm, RoPE,
    scatter into the cache, SDPA over it), with a padding-only row and splits that merge; splits of
    one tile loaded before the new token's k / v are stored (ONE_TILE: every case here) and, for
    two of the cases, the tile loop (one_tile False)."""
    import mixprec.kernels.attention as attn
    monkeypatch.setattr(attn, "ONE_TILE", one_tile)
    g = torch.Generator(device=DEV).manual_seed(S + B)
    cache = KVCache(1, B + 1, HK, S + 3, D, dtype, DEV)
    cache.k.copy_(torch.randn(cache.k.shape, generator=g, device=DEV).to(dtype))
    cache.v.copy_(torch.randn(cache.v.shape, generator=g, device=DEV).to(dtype))
    ref_k, ref_v = cache.k.clone(), cache.v.clone()
    view = cache.rows(0, B, S)
    pos = torch.randint(1, S, (B,), generator=g, device=DEV)
    pos[0] = S - 1
    start = torch.randint(0, S, (B,), generator=g, device=DEV)
    start[-1] = pos[-1] + 1 if B > 1 else 0
    view.start.copy_(torch.minimum(start, pos + (B > 1)))
    qkv = torch.randn(B, 1, (HQ + 2 * HK) * D, generator=g, device=DEV).to(dtype) * 3
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    rotary = Rotary(D, 1e6, None, 4096).to(DEV)
    qw = (1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    kw = (1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype)
    cos, sin = rotary(pos[:, None], dtype)
    o = decode_attention_new(q.view(B, -1), k.view(B, -1), v.view(B, -1), cos, sin, qw, kw, 1e-6, view.k[0],
                             view.v[0], view.start, pos)
    rk, rv = ref_k[0, :B, :, :S], ref_v[0, :B, :, :S]
    qn = _ref_qk(q, k, v, pos[:, None], rotary, qw, kw, 1e-6, rk, rv)         # [B, 1, HQ, D]
    _assert_roundings_apart(view.k[0], rk, dtype, n=4)
    assert torch.equal(view.v[0], rv)
    assert torch.equal(cache.k[0, B:], ref_k[0, B:]) and torch.equal(cache.k[0, :, :, S:], ref_k[0, :, :, S:])
    mask = view.mask(pos[:, None])
    ref = F.scaled_dot_product_attention(qn.transpose(1, 2).float(), rk.float(), rv.float(), attn_mask=mask,
                                         enable_gqa=HQ != HK)[:, :, 0]
    tol = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    torch.testing.assert_close(o.float(), ref, atol=tol, rtol=tol)
    assert decode_splits(B, HK, S)[0] > 1 or S < 100


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_table_rows_equal_per_token_rows(dtype):
    """Rotary.table row p == forward(p) bit for bit, and both kernels give the same bits reading
    cos / sin from the table by position as from per-token rows."""
    from mixprec.errors import ShapeMismatch
    B, T, HQ, HK, D, S = 3, 5, 8, 2, 64, 40
    g = torch.Generator(device=DEV).manual_seed(3)
    rotary = Rotary(D, 1e6, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}, 32).to(DEV)
    cos_t, sin_t = rotary.table(S, dtype)
    assert cos_t.shape[0] >= S and rotary.table(S - 7, dtype)[0] is cos_t      # built once
    positions = torch.stack([torch.randperm(S, generator=g, device=DEV)[:T] for _ in range(B)])   # distinct slots
    cos, sin = rotary(positions, dtype)
    assert torch.equal(cos_t[positions], cos) and torch.equal(sin_t[positions], sin)
    qkv = torch.randn(B, T, (HQ + 2 * HK) * D, generator=g, device=DEV).to(dtype) * 3
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    qw, kw = ((1 + 0.2 * torch.randn(D, generator=g, device=DEV)).to(dtype) for _ in range(2))
    kv = torch.randn(2, B, HK, S, D, generator=g, device=DEV).to(dtype)
    outs = []
    for table in (False, True):
        kc, vc = kv[0].clone(), kv[1].clone()
        c, s_ = (cos_t, sin_t) if table else (cos, sin)
        qo = qk_norm_rope_store(q, k, v, c, s_, qw, kw, 1e-6, kc, vc, positions, rope_table=table)
        c, s_ = (cos_t, sin_t) if table else (cos[:, -1], sin[:, -1])
        o = decode_attention_new(q[:, -1], k[:, -1], v[:, -1], c, s_, qw, kw, 1e-6, kc, vc,
                                 torch.zeros(B, dtype=torch.long, device=DEV), positions[:, -1], rope_table=table)
        outs.append((qo, o, kc, vc))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    with pytest.raises(ShapeMismatch, match="RoPE table"):
        qk_norm_rope_store(q, k, v, cos, sin, qw, kw, 1e-6, kv[0].clone(), kv[1].clone(), positions, rope_table=True)


def test_attention_kernels_refuse_rows_with_a_strided_last_dim():
    from mixprec.errors import ShapeMismatch
    q = torch.randn(2, 64, 2)[..., 0]                                  # last-dim stride 2
    kv = torch.randn(2, 16)
    cache = torch.zeros(2, 1, 8, 16)
    with pytest.raises(ShapeMismatch, match="q .* contiguous last dim"):
        decode_attention_new(q, kv, kv, kv, kv, kv[0], kv[0], 1e-6, cache, cache, torch.zeros(2, dtype=torch.long),
                             torch.zeros(2, dtype=torch.long))


def test_decode_warps_wide_only_where_measured_faster():
    """decode_warps: 8 warps for 16 query heads per kv head in at most ~one program per SM from
    1024 slots (the 235B at batch 1-2, session 40's table), 4 elsewhere."""
    from mixprec.kernels.attention import DECODE_WARPS, WIDE_WARPS, decode_warps
    assert WIDE_WARPS != DECODE_WARPS
    for B, S in [(1, 1024), (1, 4096), (1, 32768), (2, 1024), (2, 2048)]:
        assert decode_warps(B, 4, 16, S) == WIDE_WARPS, (B, S)
    for B, G, S in [(1, 16, 256), (2, 16, 4096), (4, 16, 1024), (8, 16, 8192), (1, 8, 2048), (1, 8, 32768)]:
        assert decode_warps(B, 4, G, S) == DECODE_WARPS, (B, G, S)


def test_decode_splits_cover_the_cache():
    for B, HK, S in [(1, 4, 128), (1, 4, 32768), (64, 4, 4096), (3, 1, 1000), (1, 8, 64)]:
        split, chunk = decode_splits(B, HK, S)
        assert split >= 1 and chunk % block_n(S) == 0 and (split - 1) * chunk < S <= split * chunk


def test_head_dim_not_a_power_of_two_takes_the_readable_path(tmp_path):
    """head_dim 48: the attention kernels (power-of-two tiles) are skipped, not failed to compile."""
    import contextlib

    import mixprec
    from mixprec.testing.fixtures import make_fixture
    path = make_fixture(tmp_path, formats=["bf16"], head_dim=48, layers=1, mlp_only_layers=())["bf16"]
    model = mixprec.load(path, device=DEV, dtype="float16" if not CUDA else "bfloat16", progress=False)
    ids = torch.tensor([[11, 42, 7, 300, 5]], device=DEV)
    pos = torch.arange(5, device=DEV)[None]

    def run():
        cache = model.make_cache(1, 16)
        return torch.cat([model(ids[:, :4], positions=pos[:, :4], cache=cache),
                          model(ids[:, 4:], positions=pos[:, 4:], cache=cache)], 1)
    with torch.inference_mode():
        with reference_path():
            ref = run()
        with contextlib.nullcontext() if CUDA else interpreter_kernels():
            got = run()
    assert torch.isfinite(got).all() and (got.float() - ref.float()).abs().max() < 0.05 * ref.float().abs().max()


@pytest.mark.skipif(CUDA, reason="tests/test_gpu.py covers this on CUDA")
@pytest.mark.parametrize("n_prompts", [3])
def test_whole_model_with_kernels_equals_reference_on_cpu(tmp_path, n_prompts):
    """Generator through the norm/attention/MoE kernels (interpreter, fp16) == the readable path:
    prefill of prompts of different lengths, then decode steps (3 rows: the decode router takes the
    residual add + norm into its launch, up to moe.ROUTER_FUSED_MAX_M = 4 rows; a 2-prompt case,
    the same launches, was dropped for CI time). (3 new tokens: the prefill's and two decode steps,
    the second reading the cache slots the first wrote; each step runs the same launches.)"""
    import mixprec
    from mixprec.runtime.generate import Generator
    from mixprec.runtime.sampling import SamplingParams
    from mixprec.testing.fixtures import make_fixture
    path = make_fixture(tmp_path, formats=["bf16"])["bf16"]
    model = mixprec.load(path, device="cpu", dtype="float16", progress=False)
    prompts = [[11, 42, 7, 300, 5], [9, 8], [100, 200, 300, 17]][:n_prompts]
    sp = SamplingParams(max_new_tokens=3)
    ref = Generator(model, use_cuda_graphs=False).generate(prompts, sp)
    with interpreter_kernels():
        got = Generator(model, use_cuda_graphs=False).generate(prompts, sp)
    assert got == ref


def test_early_triggers_only_where_pdl_allows():
    """kernels/pdl.py: only the RMSNorm, the MoE gate/up GEMV (after its own wait), the decode
    attention and, inside pdl.early_trigger() (the decode o_proj), the fp8 GEMV let their successor
    start early. The decode attention reads the KV cache and the
    positions before its wait (ONE_TILE), which is safe only while the qkv linears before it do
    not trigger before their own wait: a launch_dependents added to any other kernel or shared tile
    function fails here."""
    import importlib
    import inspect
    import pathlib
    import pkgutil

    import mixprec
    import mixprec.kernels
    from triton.runtime.jit import KernelInterface    # JITFunction, or the interpreter's stand-in
    found = set()
    # every kernel module, new ones too, but pdl.py (which defines launch_dependents)
    for name in sorted({m.name for m in pkgutil.iter_modules(mixprec.kernels.__path__)} - {"pdl"}):
        mod = importlib.import_module(f"mixprec.kernels.{name}")
        for attr, fn in vars(mod).items():
            if isinstance(fn, KernelInterface) and "launch_dependents(" in inspect.getsource(fn.fn):
                found.add(attr)
    # the fp8 GEMV's tiles trigger only under EARLY: inside pdl.early_trigger(), which only the
    # decode o_proj takes (test_decode_o_proj_alone_triggers_early)
    assert found == {"_rms_norm_kernel", "_moe_gemv_kernel", "_decode_attn_kernel", "_gemv_f32", "_gemv_f16_words"}
    from mixprec.kernels import fp8
    for fn in (fp8._gemv_f32, fp8._gemv_f16_words):
        assert "if EARLY:\n        pdl.launch_dependents(PDL)" in inspect.getsource(fn.fn)
    root = pathlib.Path(mixprec.__file__).parent
    users = sorted(str(p.relative_to(root)) for p in root.rglob("*.py") if "early_trigger(" in p.read_text())
    assert users == ["kernels/pdl.py", "layers/attention.py"]


def test_decode_o_proj_alone_triggers_early(tmp_path):
    """pdl.early_trigger() holds while the decode o_proj launches (its successor, the norm / router,
    reads only weights before its wait), not during prefill, and not after an exception."""
    import contextlib

    import mixprec
    from mixprec.kernels import pdl
    from mixprec.testing.fixtures import make_fixture
    path = make_fixture(tmp_path, formats=["bf16"], layers=1, mlp_only_layers=())["bf16"]
    model = mixprec.load(path, device=DEV, dtype="float16" if not CUDA else "bfloat16", progress=False)
    seen = []
    o_proj = model.model.layers[0].self_attn.o_proj
    o_proj.register_forward_pre_hook(lambda m, a: seen.append((a[0].shape[1], pdl.early())))
    ids = torch.tensor([[11, 42, 7, 300, 5]], device=DEV)
    pos = torch.arange(5, device=DEV)[None]
    with torch.inference_mode(), (contextlib.nullcontext() if CUDA else interpreter_kernels()):
        cache = model.make_cache(1, 16)
        model(ids[:, :4], positions=pos[:, :4], cache=cache)
        model(ids[:, 4:], positions=pos[:, 4:], cache=cache)
    assert seen == [(4, False), (1, True)] and not pdl.early()
    with pytest.raises(RuntimeError), pdl.early_trigger():
        raise RuntimeError
    assert not pdl.early()
