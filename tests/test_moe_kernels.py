"""Fused mixed-format MoE kernels (mixprec/kernels/moe.py) against the per-token per-expert
reference. CPU: Triton interpreter, fp16, tiny shapes. CUDA: bf16, Qwen3-30B-A3B shapes."""
import pytest
import torch

from mixprec.errors import FormatError, ShapeMismatch
from mixprec.kernels import moe, moe_configs
from mixprec.kernels import moe_testing as mt
from mixprec.kernels.quant import act_quant, div_exact

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
E, K_TOP, H, I = 8, 2, 128, 64
DOT = ("dot", dict(BM=16, BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=2),
       dict(BM=16, BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=2))

MIX_A = ["fp16", "fp8", "int4_g32", "int8"]                 # fp8 w8a8, int4 g32, int8 w8a8
MIX_B = ["fp8_w8a16", "int4_perm", "int8q", "int8_zp"]      # act-order int4, 8-bit intq, int8 w/ zero
PER_PROJ = ([("int4", "fp8", "int8")] * 3 + [("fp16", "fp16", "fp8_w8a16")] * 3
            + [("int4_asym", "int4_asym", "fp16")] * 2)      # gate and up of one expert in two buckets


def _layer(specs, seed=1, dtype=torch.float16, h=H, i=I):
    return mt.build_buckets(specs, h, i, dtype=dtype, device=DEV, seed=seed)


def _inputs(m, e=E, k=K_TOP, h=H, seed=0, dtype=torch.float16):
    g = torch.Generator(device=DEV)
    g.manual_seed(seed)
    x = torch.randn(m, h, generator=g, device=DEV).to(dtype)
    w, ids = moe.route(torch.randn(m, e, generator=g, device=DEV), k, True)
    return x, w, ids


def _check(buckets, x, w, ids, inter=I, min_db=40.0, **kw):
    y = moe.fused_moe(x, ids, w, buckets, inter, **kw)
    assert y.shape == x.shape and y.dtype == x.dtype
    ref = moe.moe_reference(x, ids, w, buckets, inter)
    assert torch.isfinite(y).all()
    db = mt.sqnr_db(ref, y.float())
    assert db >= min_db, f"SQNR {db:.1f} dB"
    return y


# ---------------------------------------------------------------------------------------------
# routing and alignment

@pytest.mark.parametrize("m,e,k,renorm", [(5, 8, 2, True), (3, 12, 3, False), (1, 128, 8, True)])
def test_route_matches_torch(m, e, k, renorm):
    logits = torch.randn(m, e, device=DEV) * 3
    w, ids = moe.route(logits, k, renorm)
    p = torch.softmax(logits.float(), -1)
    rw, ri = torch.topk(p, k, -1)
    if renorm:
        rw = rw / rw.sum(-1, keepdim=True)
    assert ids.dtype == torch.int32 and w.dtype == torch.float32
    assert torch.equal(ids.long(), ri)
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["gemv", "dot"])
def test_nan_router_logits_stay_in_their_token(path):
    """A token whose router logits hold a NaN (an fp16 overflow upstream) gets valid expert ids and
    NaN weights, as torch's softmax gives: its output row is NaN, the other tokens' are right (ids
    >= E had made the GEMV read past the expert map and the dot path drop the token's pairs)."""
    e, k = 12, 2
    logits = torch.randn(3, e, device=DEV)
    logits[1, 3] = float("nan")
    w, ids = moe.route(logits, k, True)
    assert ((ids >= 0) & (ids < e)).all(), ids
    assert torch.isnan(w[1]).all() and torch.isfinite(w[[0, 2]]).all()
    b = _layer(mt.uniform("fp16", e))
    x = _inputs(3, e=e, k=k)[0]
    cfg = DOT if path == "dot" else ("gemv",) + (dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4,
                                                      num_stages=1),) * 2
    y = moe.fused_moe(x, ids, w, b, I, config=cfg)
    assert torch.isnan(y[1]).all()
    ok = [0, 2]
    assert mt.sqnr_db(moe.moe_reference(x[ok], ids[ok], w[ok], b, I), y[ok].float()) > 40


@pytest.mark.parametrize("e,k", [(128, 8), (12, 3), (300, 8)])
def test_route_ties_go_to_the_lower_expert(e, k):
    # integer logits: many exact ties; slots are ordered by weight, then by expert id
    g = torch.Generator().manual_seed(e)
    logits = torch.randint(-3, 4, (4, e), generator=g).float().to(DEV)
    w, ids = moe.route(logits, k, True)
    p = torch.softmax(logits.float(), -1)
    rw, ri = torch.sort(p, dim=-1, descending=True, stable=True)
    rw = rw[:, :k] / rw[:, :k].sum(-1, keepdim=True)
    assert torch.equal(ids.long(), ri[:, :k])
    torch.testing.assert_close(w, rw, rtol=1e-5, atol=1e-6)
    # the readable path breaks ties the same way (x = identity [4, 4], router = logits^T: x W^T = logits)
    from mixprec.layers.moe import route as readable_route
    w2, ids2 = readable_route(torch.eye(4, device=DEV), logits.t().contiguous(), k, True)
    assert torch.equal(ids2, ids.long())
    # so does the one-launch decode router, two tokens at a time (x = identity [2, 2])
    for t in (0, 2):
        w3, ids3 = moe.router_route(torch.eye(2, device=DEV), logits[t:t + 2].t().contiguous(), k, True)
        assert torch.equal(ids3, ids[t:t + 2])
        torch.testing.assert_close(w3, w[t:t + 2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("m,e,k,h", [(1, 128, 8, 2048), (2, 60, 4, 200), (2, 16, 2, 64), (3, 128, 8, 512)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_router_route_matches_linear_then_route(m, e, k, h, dtype):
    """The one-launch decode router (logits rounded to x's dtype) picks the experts and weights
    of F.linear + route(); twice, so the arrival counter is seen reset."""
    g = torch.Generator().manual_seed(m + e)
    x = torch.randn(m, h, generator=g).to(DEV, dtype)
    gw = (torch.randn(e, h, generator=g) * h ** -0.5).to(DEV, dtype)
    rw, ri = moe.route(torch.nn.functional.linear(x, gw), k, True)
    for _ in range(2):
        w, ids = moe.router_route(x, gw, k, True)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(w, rw, rtol=2e-3, atol=1e-4)


@pytest.mark.parametrize("m,e,k,h", [(1, 128, 8, 2048), (2, 60, 4, 200), (2, 16, 2, 4096), (4, 128, 8, 1024),
                                     (1, 16, 4, 4096)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_norm_router_route_matches_norm_then_route(m, e, k, h, dtype):
    """Residual add + RMSNorm inside the router launch == the norm kernel, then F.linear + route().
    (1, 16, 4, 4096): one token on two warps, whose top-k runs on a second, repeated row."""
    from mixprec.kernels.norm import rms_norm
    g = torch.Generator().manual_seed(m + e + h)
    x, r = (torch.randn(m, h, generator=g).to(DEV, dtype) for _ in range(2))
    nw = (1 + 0.1 * torch.randn(h, generator=g)).to(DEV, dtype)
    gw = (torch.randn(e, h, generator=g) * h ** -0.5).to(DEV, dtype)
    ry, rh = rms_norm(x, nw, 1e-6, residual=r)
    rw, ri = moe.route(torch.nn.functional.linear(ry, gw), k, True)
    for _ in range(2):
        w, ids, y, hsum = moe.norm_router_route(x, r, nw, 1e-6, gw, k, True)
        assert torch.equal(hsum, x + r)
        tol = 1e-5 if dtype == torch.float32 else 2 * torch.finfo(dtype).eps
        torch.testing.assert_close(y, ry, rtol=tol, atol=tol)
        assert torch.equal(ids, ri)
        torch.testing.assert_close(w, rw, rtol=2e-3, atol=1e-4)
    with pytest.raises(ShapeMismatch, match="norm_router_route"):
        n = moe.ROUTER_FUSED_MAX_M + 1      # one token row past the one launch's range
        moe.norm_router_route(x.repeat(n, 1), r.repeat(n, 1), nw, 1e-6, gw, k, True)


@pytest.mark.parametrize("ids_kind,m,k,e,bm", [("random", 300, 2, 7, 4), ("one_expert", 300, 2, 8, 4),
                                               ("random", 128, 8, 128, 16), ("random", 1, 1, 3, 16)])
def test_align_groups_pairs_by_expert(ids_kind, m, k, e, bm, monkeypatch):
    """moe_align's two kernels (one program sorting the pairs in registers; count / scan / scatter
    launches over chunks of 128 pairs) give the same bits: pairs grouped by expert into blocks,
    stable inside an expert. 7 experts: not a power of two; 128 x top-8: the sort kernel's largest
    size (1024 pairs) at the Qwen3 expert count; one pair."""
    if ids_kind == "random":
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(m)]).to(torch.int32)
    else:
        ids = torch.stack([torch.tensor([3, j % 7 + (j % 7 >= 3)]) for j in range(m)]).to(torch.int32)
    ids = ids.to(DEV)
    sorted_ids, blk = moe.moe_align(ids, e, bm)
    monkeypatch.setattr(moe, "ALIGN_SORT_MAX_P", 0)
    chunks = moe.moe_align(ids, e, bm)
    assert torch.equal(chunks[0], sorted_ids) and torch.equal(chunks[1], blk)
    nb, smax = moe.align_bounds(m * k, e, bm)
    assert sorted_ids.shape == (smax,) and blk.shape == (nb,)
    s, b = sorted_ids.cpu().tolist(), blk.cpu().tolist()
    flat = ids.reshape(-1).cpu().tolist()
    seen = []
    for bi, ex in enumerate(b):
        rows = s[bi * bm:(bi + 1) * bm]
        if ex < 0:
            assert all(r == m * k for r in rows)
            continue
        real = [r for r in rows if r < m * k]
        assert real and all(flat[r] == ex for r in real)
        seen += real
    assert sorted(seen) == list(range(m * k))                  # every pair exactly once
    for ex in range(e):                                          # stable inside an expert
        mine = [r for r in seen if flat[r] == ex]
        assert mine == sorted(mine)
    used = [ex for ex in b if ex >= 0]
    assert used == sorted(used)                                  # blocks in expert order


# ---------------------------------------------------------------------------------------------
# the fused MoE vs the reference (CPU interpreter in fp16; GPU too when present)

@pytest.mark.parametrize("mix,m", [(MIX_A, 3), (MIX_A, 6), (MIX_B, 1)])   # MIX_A: GEMV_MIXED rows
def test_mixed_formats_decode(mix, m):
    _check(_layer(mt.split(mix, E)), *_inputs(m))


def test_per_projection_mixing_decode_and_prefill():
    b = _layer(PER_PROJ)
    projs = sorted(bb["proj"] for bb in b)
    assert "gate" in projs and "up" in projs and "gate_up" in projs
    _check(b, *_inputs(2, seed=3))
    _check(b, *_inputs(9, seed=4), config=DOT, min_db=35.0 if not CUDA else 40.0)


def test_dot_path_odd_m_and_idle_experts():
    b = _layer(mt.split(MIX_A, E), seed=2)
    x, w, ids = _inputs(5, seed=5)
    ids[:, 0] = 0                       # experts 0.. take most tokens, several get none
    ids[:, 1] = torch.where(ids[:, 1] == 0, 1, ids[:, 1])
    assert len(set(ids.reshape(-1).tolist())) < E
    _check(b, x, w, ids, config=DOT)


def test_all_tokens_one_expert_and_m1():
    b = _layer(mt.split(MIX_B, E), seed=3)
    x, w, ids = _inputs(4, seed=6)
    ids[:, 0] = 5
    ids[:, 1] = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    _check(b, x, w, ids)
    _check(b, x, w, ids, config=DOT)
    _check(b, *_inputs(1, seed=7))


def test_many_down_buckets_and_per_bucket_launches():
    downs = ["fp16", "fp8", "int4", "int8", "int8_w8a16", "fp8_w8a16"]   # 6 > 4 slots: chunked
    b = _layer([("fp16", "fp16", downs[e % 6]) for e in range(E)], seed=4)
    assert sum(bb["proj"] == "down" for bb in b) == 6
    _check(b, *_inputs(3, seed=8))
    ba = _layer(mt.split(MIX_A, E), seed=5)
    _check(ba, *_inputs(3, seed=9), one_launch=False)


@pytest.mark.parametrize("path,split", [("gemv", 1), ("gemv", 4), ("dot", 2), ("dot", 1)])
def test_expert_absent_from_all_buckets_adds_zero(path, split):
    # expert parallel: experts of other ranks are in no bucket and contribute nothing (also with
    # several GEMV / dot programs per tile: their partials of an absent expert are zero; and with
    # gate and up in one K loop: the int4 GEMV rows at 3 tokens, the dot config of split 1)
    b = _layer(mt.uniform("int4", E), seed=6)
    for bb in b:
        bb["expert_map"] = bb["expert_map"].clone()
        bb["expert_map"][6:] = -1
        bb["identity"] = False       # the map is read again
    x, w, ids = _inputs(3, seed=10)
    ids[0, 1] = 7
    cfg = (dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1, split=split) if path == "gemv"
           else dict(DOT[1], BKQ=128 if split == 1 else DOT[1]["BKQ"], split=split))
    y = moe.fused_moe(x, ids, w, b, I, config=None if (path, split) == ("gemv", 1) else (path, cfg, cfg))
    keep = ids < 6
    ref = torch.zeros(3, H, device=DEV)
    for mm in range(3):
        sub_ids, sub_w = ids[mm:mm + 1][keep[mm:mm + 1]].view(1, -1), w[mm:mm + 1][keep[mm:mm + 1]].view(1, -1)
        ref[mm] = moe.moe_reference(x[mm:mm + 1], sub_ids, sub_w, b, I)[0]
    assert mt.sqnr_db(ref, y.float()) >= 40


def _pad_act_order(b: dict, extra: int) -> None:
    """Turn an act-order intq bucket into a padded shard: `extra` stored rows of exact zeros
    (symmetric code 2^(bits-1)) that point at input 0, as TP shards of act-order weights store."""
    t = b["tensors"]
    e, kp, n = t["qweight"].shape
    pad_words = torch.full((e, extra // 8, n), -2004318072, dtype=torch.int32, device=t["qweight"].device)  # 0x88888888
    t["qweight"] = torch.cat([t["qweight"], pad_words], 1).contiguous()
    rows = kp * 8 + extra
    g = b["params"]["group_size"]
    more = -(-rows // g) - t["scales"].shape[1]
    t["scales"] = torch.cat([t["scales"], t["scales"][:, :1].expand(e, more, n)], 1).contiguous()
    t["perm"] = torch.cat([t["perm"], torch.zeros(e, extra, dtype=torch.int32, device=t["perm"].device)], 1).contiguous()


def test_padded_act_order_and_per_channel_w8a8():
    b = _layer([("int4_perm", "int4_perm", "fp8_ch_w8a8") if e % 2 else ("fp16", "fp16", "int4_perm")
                for e in range(E)], seed=7)
    for bb in b:
        if bb["layout"] == "intq":
            _pad_act_order(bb, 32)
    moe.validate_buckets(b, E, H, I)
    _check(b, *_inputs(3, seed=11))
    _check(b, *_inputs(6, seed=12), config=DOT)


def test_dequant_matches_format_layouts():
    # the reference's own dequant against the format engineers' LAYOUTS (same packed tensors)
    import mixprec.formats  # noqa: F401  (registers the layouts)
    from mixprec.formats.base import LAYOUTS, Packed
    for spec in ["fp16", "fp8", "fp8_ch", "int4_asym", "int4_perm", "int8q", "int8_zp"]:
        for bb in mt.build_buckets(mt.uniform(spec, 3), H, I, dtype=torch.float16, seed=1):
            n, k = moe._bucket_dims(bb, H, I)
            want = LAYOUTS[bb["layout"]].dequant(Packed(bb["layout"], n, k, bb["tensors"], bb["params"]))
            got = torch.stack([moe.dequant_expert(bb, i, n, k) for i in range(3)])
            torch.testing.assert_close(got, want.float(), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# the reference itself, against integer codes (independent of the kernels)

def test_reference_dequant_from_codes():
    g = torch.Generator().manual_seed(0)
    n, k, G = 16, 64, 32
    codes = torch.randint(0, 16, (k, n), generator=g)
    words = torch.zeros(k // 8, n, dtype=torch.int64)
    for i in range(8):
        words |= codes[i::8] << (4 * i)
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    scales = torch.rand(k // G, n, generator=g).half()
    zeros = torch.randint(0, 16, (k // G, n), generator=g).to(torch.uint8)
    b = {"proj": "down", "layout": "intq", "params": {"bits": 4, "group_size": G},
         "tensors": {"qweight": words[None], "scales": scales[None], "zeros": zeros[None]},
         "expert_map": torch.zeros(1, dtype=torch.int32)}
    W = moe.dequant_expert(b, 0, n, k)
    want = (scales.float().repeat_interleave(G, 0) * (codes.float() - zeros.float().repeat_interleave(G, 0))).t()
    torch.testing.assert_close(W, want)
    perm = torch.randperm(k, generator=g).to(torch.int32)
    b["tensors"]["perm"] = perm[None]
    Wp = moe.dequant_expert(b, 0, n, k)
    torch.testing.assert_close(Wp[:, perm.long()], want)    # stored row j is input perm[j]


def test_reference_fp8_act_quant():
    v = torch.randn(3, 200) * 5
    q = moe.quant_act(v, "fp8", {"act": "w8a8"})
    a = v[:, :128].abs().amax(-1, keepdim=True) / 448
    torch.testing.assert_close(q[:, :128], (v[:, :128] / a).to(torch.float8_e4m3fn).float() * a)
    assert torch.equal(moe.quant_act(v, "fp8", {"act": "w8a16"}), v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16] if CUDA else [torch.float16])
def test_act_quant_prepass_matches_reference_codes(dtype):
    # the once-per-row W8A8 pre-pass the kernels read: codes and scales equal quant_act's
    g = torch.Generator(device=DEV)
    g.manual_seed(5)
    K = 300                                                   # 3 slices, the last one partial
    v = (torch.randn(6, K, generator=g, device=DEV) * torch.logspace(-3, 3, 6, device=DEV)[:, None]).to(dtype)
    v[2] = 0                                                  # all-zero row: the eps scales
    v[4, 130:] = 0                                            # zero slices after a non-zero one
    q, qs, ns = act_quant(v, True, True)
    assert q.shape == (6, 2, K) and qs.shape == (6, ns) and ns == 4
    vf = v.float()
    a = div_exact(vf.abs().amax(-1, keepdim=True).clamp_min(1e-10), 127.0)
    assert torch.equal(q[:, 0].view(torch.int8).float(), torch.round(vf / a).clamp(-127, 127))
    assert torch.equal(qs[:, :1], a)
    vp = torch.nn.functional.pad(vf, (0, 84)).view(6, 3, 128)
    a8 = div_exact(vp.abs().amax(-1).clamp_min(1e-10), 448.0)
    want = (vp / a8[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(6, 384)[:, :K]
    assert torch.equal(q[:, 1], want.view(torch.uint8))
    assert torch.equal(qs[:, 1:], a8)
    # codes x scale is the reference's quantized activation (what the kernels multiply)
    torch.testing.assert_close(q[:, 0].view(torch.int8).float() * qs[:, :1],
                               moe.quant_act(vf, "int8", {"act": "w8a8"}), rtol=0, atol=0)
    assert act_quant(v, False, False)[2] == 0             # no W8A8 bucket: nothing launched


# ---------------------------------------------------------------------------------------------
# bad input

def test_bad_buckets_raise_clear_errors():
    b = _layer(mt.uniform("int4", E))
    x, w, ids = _inputs(2)
    bad = [dict(bb) for bb in b]
    bad[0] = {**bad[0], "layout": "int3"}
    with pytest.raises(FormatError, match="bucket 0.*layout 'int3'"):
        moe.fused_moe(x, ids, w, bad, I)
    bad = [dict(bb) for bb in b]
    bad[0] = {**bad[0], "tensors": {**bad[0]["tensors"], "scales": bad[0]["tensors"]["scales"][:, :, :8]}}
    with pytest.raises(ShapeMismatch, match="scales has shape"):
        moe.fused_moe(x, ids, w, bad, I)
    fp8 = _layer(mt.uniform("fp8", E))
    fp8[0]["params"] = {"block": (128, 64), "act": "w8a8"}
    fp8[0]["tensors"]["scale"] = torch.ones(fp8[0]["tensors"]["scale"].shape[0], 1, 2, device=DEV)
    with pytest.raises(FormatError, match="multiple of the activation group"):
        moe.fused_moe(x, ids, w, fp8, I)
    # one gate bucket whose experts' up rows are in 5 buckets: no split into launches of <= 4
    ups = ["fp8", "int4", "int8", "int8q", "int4_asym"]
    chain = _layer([("fp16", ups[e % 5], "fp16") for e in range(E)])
    with pytest.raises(FormatError, match="at most 4"):
        moe.fused_moe(x, ids, w, chain, I)
    with pytest.raises(ShapeMismatch):
        moe.route(torch.randn(2, 4), 5, True)
    odd = dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1, split=3)
    with pytest.raises(FormatError, match="split 3 must be 1 or even"):
        moe.fused_moe(x, ids, w, b, I, config=("gemv", odd, odd))


@pytest.mark.parametrize("m", [1, 7, 40])
def test_more_than_four_gate_up_buckets_take_several_launches(m):
    # 6 gate_up formats + an expert whose gate and up differ: 8 gate/up buckets, 3 launches
    specs = [(s, s, "fp16") for s in ["fp16", "fp8", "int4", "int8", "int8q", "int4_asym"]]
    specs += [("int4", "fp8", "int8"), ("fp16", "fp16", "fp8_w8a16")]
    b = _layer(specs)
    groups = moe.up_launches(b)
    assert len(groups) >= 2 and all(len(g) <= moe.MAX_SLOTS for g in groups)
    assert sorted(i for g in groups for i in g) == [i for i, bb in enumerate(b) if bb["proj"] != "down"]
    x, w, ids = _inputs(m, seed=m)
    _check(b, x, w, ids, up_groups=groups)
    if m == 40:   # (DOT at m = 7 left out: the pick's dot row runs at 7 as at 40, DOT's tiles at 40)
        _check(b, x, w, ids, config=DOT, up_groups=groups)
    if m == 7:   # several programs per tile: a launch leaves the act rows of other launches' experts alone
        # (BN 64: one whole tile of I and two of H, half the programs of BN 32)
        dot = dict(DOT[1], BN=64, split=2)
        gemv = dict(BN=64, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1, split=2)
        _check(b, x, w, ids, config=("dot", dot, dot), up_groups=groups)
        _check(b, x, w, ids, config=("gemv", gemv, gemv), up_groups=groups)


def test_validate_buckets():
    b = _layer(PER_PROJ)
    moe.validate_buckets(b, E, H, I)
    dup = [dict(bb) for bb in b]
    gu = next(i for i, bb in enumerate(dup) if bb["proj"] == "gate_up")
    g = next(i for i, bb in enumerate(dup) if bb["proj"] == "gate")
    e_in_gate = int((dup[g]["expert_map"] >= 0).nonzero()[0])
    emap = dup[gu]["expert_map"].clone()
    emap[e_in_gate] = 0
    emap[int((dup[gu]["expert_map"] == 0).nonzero()[0])] = -1
    dup[gu] = {**dup[gu], "expert_map": emap}
    with pytest.raises(FormatError, match="gate rows of experts"):
        moe.validate_buckets(dup, E, H, I)


@pytest.mark.parametrize("m,config", [(1, None), (3, None), (5, DOT)])
def test_identity_buckets_skip_the_map_with_the_same_result(m, config):
    """A bucket of every expert in order ("identity", as layers/moe.py marks uniform layers) runs
    without reading its expert map and gives bitwise the same output as through the map (GEMV and
    dot paths); validate_buckets refuses the mark on a map that is not 0..E-1."""
    b = _layer(mt.uniform("int4", E), seed=4)
    assert all(bb["identity"] for bb in b)
    x, w, ids = _inputs(m, seed=8)
    kw = {} if config is None else {"config": config}
    fast = _check(b, x, w, ids, **kw)
    # the same tensors through the map (read), a map sending every expert to row 0 (read: other
    # outputs), and that map under the mark (not read: the same outputs)
    assert torch.equal(moe.fused_moe(x, ids, w, [dict(bb, identity=False) for bb in b], I, **kw), fast)
    row0 = [dict(bb, expert_map=torch.zeros_like(bb["expert_map"]), identity=False) for bb in b]
    assert not torch.equal(moe.fused_moe(x, ids, w, row0, I, **kw), fast)
    ignored = [dict(bb, identity=True) for bb in row0]      # the kernels never read the map
    assert torch.equal(moe.fused_moe(x, ids, w, ignored, I, **kw), fast)
    with pytest.raises(FormatError, match="marked identity"):
        moe.validate_buckets([dict(bb, expert_map=bb["expert_map"].flip(0)) for bb in b], E, H, I)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at Qwen3-30B-A3B shapes, CUDA graphs

GPU = pytest.mark.skipif(not CUDA, reason="needs CUDA")
BIG = dict(e=128, k=8, h=2048, i=768)


@GPU
@pytest.mark.parametrize("specs", ["bf16", "fp8", "fp8_w8a16", "int4", "int4_asym", "int8", "int8_w8a16",
                                   "mixA", "mixB", "perproj"])
def test_gpu_realistic_shapes(specs):
    e, k, h, i = BIG["e"], BIG["k"], BIG["h"], BIG["i"]
    if specs == "mixA":
        sp = mt.split(["bf16", "fp8", "int4", "int8"], e)
    elif specs == "mixB":
        sp = mt.split(["fp8_w8a16", "int4_perm", "int8q", "int8_zp"], e)
    elif specs == "perproj":
        sp = [("int4", "fp8", "bf16")] * (e // 2) + [("bf16", "bf16", "fp8")] * (e // 2)
    else:
        sp = mt.uniform(specs, e)
    b = mt.build_buckets(sp, h, i, dtype=torch.bfloat16, device="cuda", seed=11)
    for m in (1, 5, 40):                                 # decode path, odd M, prefill (dot) path
        x, w, ids = _inputs(m, e=e, k=k, h=h, seed=m, dtype=torch.bfloat16)
        _check(b, x, w, ids, inter=i)


def _graph_replay_matches_reference(b, m, layer, replays=1, no_sync=False):
    """route + layer(x, ids, w, b, I) on m tokens, captured in a CUDA graph and replayed on new
    inputs: equal to the reference. no_sync: an eager call first runs in sync debug mode "error"."""
    e, k, h, i = BIG["e"], BIG["k"], BIG["h"], BIG["i"]
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    logits = torch.randn(m, e, device="cuda")

    def step():
        w, ids = moe.route(logits, k, True)
        return layer(x, ids, w, b, i)
    step()
    torch.cuda.synchronize()
    if no_sync:
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    x.copy_(torch.randn_like(x))
    logits.copy_(torch.randn_like(logits))
    for _ in range(replays):
        graph.replay()
    w, ids = moe.route(logits, k, True)
    assert mt.sqnr_db(moe.moe_reference(x, ids, w, b, i), y.float()) >= 40


@GPU
def test_gpu_cuda_graph_replay():
    b = mt.build_buckets(mt.split(["int4", "fp8", "bf16"], BIG["e"]), BIG["h"], BIG["i"], dtype=torch.bfloat16,
                         device="cuda", seed=12)
    for m in (2, 24):
        _graph_replay_matches_reference(b, m, moe.fused_moe, replays=2)   # counters must reset between replays


def test_layer_with_folded_input_scales_runs_fused():
    """A MoE layer whose experts come from sources with different folded-norm corrections (AWQ):
    one gate/up launch per correction, x scaled per launch; equal to the readable path, no warning."""
    import warnings

    from mixprec.formats.base import Packed, interpreter_kernels, reference_path
    from mixprec.layers.moe import MoE
    g = torch.Generator().manual_seed(5)
    Hm, Im, Em, dt = 64, 32, 6, torch.float16
    s1, s2 = 0.5 + torch.rand(Hm, generator=g), 0.5 + torch.rand(Hm, generator=g)
    layer = MoE(Hm, Im, Em, top_k=2, renorm=True, dtype=dt, device=DEV, name="model.layers.0.mlp")
    layer.gate.weight = torch.randn(Em, Hm, generator=g).to(DEV, dt)
    scale_of = {0: s1, 1: s1, 2: s2, 3: None, 4: None, 5: s2}
    for e in range(Em):
        for p in ("gate", "up", "down"):
            n, k = (Hm, Im) if p == "down" else (Im, Hm)
            w = (torch.randn(n, k, generator=g) / 4).to(DEV, dt)
            # experts 0-2 in one dtype bucket, 3-5 in another (fp32 storage stands in for a format)
            pk = Packed("dense", n, k, {"weight": w if e < 3 else w.float()})
            sc = scale_of[e] if p != "down" else None
            layer.set_expert(e, p, pk, None if sc is None else sc.to(DEV, dt))
    layer.finalize()
    x = torch.randn(9, Hm, generator=g).to(DEV, dt)
    with reference_path():
        ref = layer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if CUDA:
            got = layer(x)
        else:
            with interpreter_kernels():
                got = layer(x)
    assert layer._kernel_buckets() is not None and len(layer._up_groups) == 3
    assert mt.sqnr_db(ref.float(), got.float()) >= 40


def test_float32_layer_takes_the_readable_path_on_the_kernel_path():
    """float32 is a model dtype the dense kernels take; the fused MoE does not: such a layer (and
    its fused add + norm + router step at decode sizes) runs the readable path instead of raising."""
    import contextlib

    from mixprec.formats.base import Packed, interpreter_kernels, reference_path
    from mixprec.layers.moe import MoE
    from mixprec.layers.norm import RMSNorm
    g = torch.Generator().manual_seed(5)
    Hm, Im, Em = 64, 32, 4
    layer = MoE(Hm, Im, Em, top_k=2, renorm=True, dtype=torch.float32, device=DEV)
    layer.gate.weight = torch.randn(Em, Hm, generator=g).to(DEV)
    for e in range(Em):
        for p in ("gate", "up", "down"):
            n, k = (Hm, Im) if p == "down" else (Im, Hm)
            layer.set_expert(e, p, Packed("dense", n, k, {"weight": (torch.randn(n, k, generator=g) / 4).to(DEV)}))
    layer.finalize()
    norm = RMSNorm(Hm, 1e-6, dtype=torch.float32, device=DEV)
    norm.weight.copy_(1 + torch.rand(Hm, generator=g))
    x, res, x3 = (torch.randn(m, Hm, generator=g).to(DEV) for m in (1, 1, 3))
    with reference_path():
        ref, ref_h, ref3 = *layer.forward_norm(norm, x, res), layer(x3)
    with contextlib.nullcontext() if CUDA else interpreter_kernels():
        (got, h), got3 = layer.forward_norm(norm, x, res), layer(x3)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(h, ref_h)
    torch.testing.assert_close(got3, ref3)


@pytest.mark.parametrize("bkf", [64, 256])
def test_fp8_gemv_tiles_spanning_scale_blocks(bkf):
    """GEMV fp8 tiles that fold the block scales into x: a K tile of two 128-wide blocks (W8A8
    quantizes each 128 slice on its own) and a 64-wide tile (absmax over the whole slice), with a
    partial last tile (K=384); per-channel fp8 in the same launch keeps the per-row scale path."""
    gemv = dict(BN=32, BKD=64, BKF=bkf, BKQ=64, BKI=64, num_warps=4, num_stages=1)
    b = _layer(mt.split(["fp8", "fp8_w8a16", "fp16"], E), h=384, i=128)
    _check(b, *_inputs(2, h=384, seed=21), inter=128, config=("gemv", gemv, gemv))
    b = _layer(mt.split(["fp8", "fp8_ch"], E), h=384, i=128)
    _check(b, *_inputs(1, h=384, seed=22), inter=128, config=("gemv", gemv, gemv))


@pytest.mark.parametrize("narrow_first", [True, False])
def test_dot_fp8_k_tile_fits_every_slot_in_any_order(narrow_first):
    """Dot path: a W8A8 fp8 slot keeps the K tile that another fp8 slot of the launch lowered to
    its 64-wide weight blocks, whichever comes first (a 128-wide tile would span two blocks and
    read one scale for both)."""
    b64 = ("fp8", {"block": (128, 64), "act": "w8a16"})
    a8 = ("fp8", {"block": (128, 128), "act": "w8a8"})
    b = _layer([(b64,) * 3 if e % 2 == 0 else (a8,) * 3 for e in range(E)], h=256, i=128)
    b = sorted(b, key=lambda x: (x["proj"] == "down", x["params"]["block"][1] != (64 if narrow_first else 128)))
    _check(b, *_inputs(3, h=256, seed=2), inter=128, config=DOT)


@pytest.mark.parametrize("paths", [("gemv", "dot"), ("dot", "gemv")])
def test_sides_on_different_paths(paths):
    """gate/up on one path and down on the other (as moe_configs.pick does for a per-projection
    mix whose sides have different crossovers): the intermediate is exchanged by pair index."""
    gemv = dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1)
    cfg = {"gemv": gemv, "dot": DOT[1]}
    b = _layer([("int4", "int4", "fp8")] * E)
    _check(b, *_inputs(3, seed=31), config=(paths[0], cfg[paths[0]], paths[1], cfg[paths[1]]))


def test_sides_on_two_alignments():
    """gate/up on 8-pair blocks (BM 8, int4 on the tensor-core tiles) and down on BM-16 dots, as
    `scripts/sweep_moe_dot.py --apart` times for the per-projection mix (int4 gate/up, fp8 down):
    each side reads its own alignment of the pairs; equal to the reference."""
    up = dict(BM=8, BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=2, num_stages=1, mma=True)
    down = dict(moe_configs.DOT[0][1], BKD=64, BKI=64)
    b = _layer([("int4", "int4", "fp8")] * E, h=256, i=128)
    _check(b, *_inputs(9, h=256, seed=33), inter=128, config=("dot", up, "dot", down))


def test_pick_per_side_layouts():
    from mixprec.kernels import moe_configs as mc
    up_max = mc.GEMV_LAYOUT["intq"][0]
    dn_max = mc.GEMV_LAYOUT["fp8"][0]
    m = min(up_max, max(dn_max + 1, 2))
    pu, cu, pd, cd = mc.pick(m, {"intq"}, {"fp8"})
    assert (pu, cu) == ("gemv", mc.GEMV_LAYOUT["intq"][1])
    assert pd == ("gemv" if m <= dn_max else "dot")
    assert mc.pick(1, {"intq", "fp8"}, {"fp8"})[:2] == ("gemv", mc.GEMV["up"])
    for (lay, h), c in mc.GEMV_M1.items():     # batch 1 of a listed shape: its own config(s)
        layouts = {"intq", "fp8"} if lay == "mixed" else {lay}
        down = mc.GEMV_M1_DOWN_MMA.get((lay, h)) or mc.GEMV_M1_DOWN.get((lay, h), c)
        assert mc.pick(1, layouts, layouts, hidden=h) == ("gemv", c, "gemv", down)
        if (lay, h) not in mc.GEMV_UP and (lay, h) not in mc.GEMV_DOWN:
            assert mc.pick(2, layouts, layouts, hidden=h) == mc.pick(2, layouts, layouts)
    # a listed shape from 2 tokens: its gate/up (GEMV_UP) and down (GEMV_DOWN) rows in order; where
    # a side's int4 slots cannot run the tensor-core tiles, the rows without "mma"
    for table, side in ((mc.GEMV_UP, slice(0, 2)), (mc.GEMV_DOWN, slice(2, 4))):
        for (lay, h), rows in table.items():
            for tiles in (True, False):
                lo = 2
                for bound, c in [(b, c) for b, beside, c in rows if (tiles or not c.get("mma"))
                                 and beside in (None, lay)]:
                    if bound < lo:
                        continue    # a twin for sides without the tiles, after an "mma" row of its bound
                    for m in (lo, bound):
                        if lay == "intq" and any(r["min_m"] <= m <= r["max_m"] for r in mc.DOT_INTQ_MMA.get(h, ())):
                            continue    # DOT_INTQ_MMA's rows first (below)
                        assert mc.pick(m, {lay}, {lay}, hidden=h, mma=(tiles, tiles))[side] == ("gemv", c)
                    lo = bound + 1
                if not (lay == "intq" and h in mc.DOT_INTQ_MMA):
                    assert mc.pick(lo, {lay}, {lay}, hidden=h)[side] == mc.pick(lo, {lay}, {lay})[side]
    # M=1 down of an int4 layer that can run the tiles: GEMV_M1_DOWN_MMA's row, else GEMV_M1_DOWN's
    # a row measured beside one layout of the other side holds only there (the 30B's 2-token int4
    # gate/up tile beside int4 down launches; beside fp8 ones the word-loop row after it)
    beside_rows = [(lay, h, bound, beside, c) for (lay, h), rows in mc.GEMV_UP.items()
                   for bound, beside, c in rows if beside is not None]
    assert beside_rows
    for lay, h, bound, beside, c in beside_rows:
        other = "fp8" if beside != "fp8" else "intq"
        assert mc.pick(bound, {lay}, {beside}, hidden=h)[:2] == ("gemv", c)
        assert mc.pick(bound, {lay}, {other}, hidden=h)[:2] != ("gemv", c)
    for (lay, h), c in mc.GEMV_M1_DOWN_MMA.items():
        assert mc.pick(1, {lay}, {lay}, hidden=h)[2:] == ("gemv", c)
        assert mc.pick(1, {lay}, {lay}, hidden=h, mma=(True, False))[2:] == ("gemv", mc.GEMV_M1_DOWN[(lay, h)])
    for h, rows in mc.DOT_INTQ_MMA.items():    # int4 layers: the 8-pair mma blocks, rows in order
        for row in rows:
            for m in (row["min_m"], row["max_m"]):
                assert mc.pick(m, {"intq"}, {"intq"}, hidden=h) == ("dot", row["up"], "dot", row["down"])
                # not where the other side has another layout (its BM-16 blocks: one alignment for both)
                assert mc.pick(m, {"intq"}, {"fp8"}, hidden=h)[1] is not row["up"]
        assert mc.pick(rows[-1]["max_m"] + 1, {"intq"}, {"intq"}, hidden=h) == ("dot", mc.DOT[0][1], "dot", mc.DOT[0][1])
        assert mc.pick(rows[0]["min_m"] - 1, {"intq"}, {"intq"}, hidden=h)[0::2] == ("gemv", "gemv")
    for lays, rows in mc.GEMV_MIXED.items():   # layers of these layouts: their GEMV rows from 2 tokens
        lo = 2
        for row in rows:     # each row from the token after the row before, up to its max_m
            want = ("gemv", row["up"], "gemv", row["down"])
            assert mc.pick(lo, set(lays), set(lays)) == mc.pick(row["max_m"], set(lays), set(lays)) == want
            lo = row["max_m"] + 1
        assert mc.pick(lo, set(lays), set(lays))[0::2] == ("dot", "dot")
        assert mc.pick(1, set(lays), set(lays)) == ("gemv", mc.GEMV["up"], "gemv", mc.GEMV["down"])
    # keyed by the layer's layouts: the runtime's mixed preset splits them over its two sides; a
    # side of one layout keeps that layout's row; int4 + fp8 + bf16 is not listed
    rt_up, rt_down = {"intq", "fp8", "int8"}, {"intq", "dense", "fp8"}
    rt = mc.GEMV_MIXED[frozenset(rt_up | rt_down)]
    assert mc.pick(3, rt_up, rt_down) == ("gemv", rt[0]["up"], "gemv", rt[0]["down"])
    assert mc.pick(8, rt_up, rt_down) == ("gemv", rt[1]["up"], "gemv", rt[1]["down"])
    assert mc.pick(3, {"intq"}, rt_down | {"int8"})[:2] == ("gemv", mc.GEMV_LAYOUT["intq"][1])
    assert mc.pick(2, rt_down, rt_down)[0::2] == ("dot", "dot")
    # uniform int4 sides keep the BM-16 (per-field) dot row up to DOT_INTQ_MAX_M tokens, others
    # and larger M the prefill row; each side by its own layouts
    m = mc.DOT_INTQ_MAX_M
    assert mc.DOT[0][1]["BM"] == 16 and mc.DOT[-1][1]["BM"] > 16
    assert mc.pick(m, {"intq"}, {"fp8"}) == ("dot", mc.DOT[0][1], "dot", mc.DOT[-1][1])
    assert mc.pick(m + 1, {"intq"}, {"intq"}) == ("dot", mc.DOT[-1][1], "dot", mc.DOT[-1][1])
    assert mc.pick(m, {"intq", "fp8"}, {"intq"})[:2] == ("dot", mc.DOT[-1][1])


def _distinct_gemv_m1():
    from mixprec.kernels import moe_configs as mc
    out = []
    for c in [*mc.GEMV_M1.values(), *mc.GEMV_M1_DOWN.values(), *mc.GEMV_M1_DOWN_MMA.values()]:
        if c not in out:
            out.append(c)
    return out


def _same_launch(a: dict, b: dict) -> bool:
    """Configs that launch the same kernel here (the interpreter ignores num_warps / num_stages)."""
    if CUDA:
        return a == b
    drop = ("num_warps", "num_stages")
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def _batch1_pairs():
    """The (gate/up, down) configs pick pairs at M=1 (a GEMV_M1 row on gate/up, its GEMV_M1_DOWN_MMA
    row, its GEMV_M1_DOWN row or itself on down), each pair once, so every distinct config runs on the side(s) it serves
    (the gate/up-only rows of BN 4 on the down side had cost the most and are never launched). A
    pair both of whose sides other pairs launch is left out: in the interpreter, which ignores
    num_warps, the mixed 2048 pair (fp8's gate/up row; intq 4096's down row but for num_warps)."""
    from mixprec.kernels import moe_configs as mc
    pairs = []
    for key, up in mc.GEMV_M1.items():
        for down in (mc.GEMV_M1_DOWN_MMA.get(key), mc.GEMV_M1_DOWN.get(key, up)):
            if down is not None and (up, down) not in pairs:
                pairs.append((up, down))
    for p in list(pairs):
        rest = [q for q in pairs if q is not p]
        if any(_same_launch(q[0], p[0]) for q in rest) and any(_same_launch(q[1], p[1]) for q in rest):
            pairs.remove(p)
    return pairs


@pytest.mark.parametrize("ci", range(len(_batch1_pairs())))
def test_batch1_configs(ci):
    """Every distinct batch-1 GEMV config (moe_configs.GEMV_M1, GEMV_M1_DOWN) on a mixed layer at
    M=1, on the side(s) pick gives it (_batch1_pairs)."""
    from mixprec.kernels import moe_configs as mc
    pairs = _batch1_pairs()
    assert all(any(_same_launch(c, side) for p in pairs for side in p) for c in _distinct_gemv_m1())
    h, i = 640, 64         # up: a full and a partial 512 K step; down: K below one step
    specs = mt.split(["fp16", "fp8", "int4", "int8"], E)
    b = _layer(specs, h=h, i=i)
    x, w, _ = _inputs(1, e=E, k=4, h=h, seed=60 + ci)
    # the token's top 4: one expert of each layout, so every config sees all four tile loops
    ids = torch.tensor([[specs.index((s,) * 3) for s in ("fp16", "fp8", "int4", "int8")]], dtype=torch.int32,
                       device=DEV).roll(ci, 1)
    _check(b, x, w, ids, inter=i, config=("gemv",) + pairs[ci])
    assert mc.pick(10 ** 6, {"dense"}, {"dense"})[0::2] == ("dot", "dot")


_SIDE_ROWS = {(side, lay, bound, str(cfg)): (side, lay, bound, cfg)
              for side, table in (("up", moe_configs.GEMV_UP), ("down", moe_configs.GEMV_DOWN))
              for (lay, _), rows in table.items() for bound, _, cfg in rows}   # each distinct row once


@pytest.mark.parametrize("row", list(_SIDE_ROWS.values()), ids=[f"{k[0]}-{k[1]}-{k[2]}" for k in _SIDE_ROWS])
def test_side_rows_from_2_tokens(row):
    """Each gate/up row of moe_configs.GEMV_UP / down row of GEMV_DOWN with the other side as pick
    gives it, on a layer of its layout, at 2-3 tokens (one full and one partial K step on gate/up;
    down over two 128-input groups, so the int4 tensor-core tiles run)."""
    side, lay, bound, cfg = row
    spec = {"intq": "int4_asym", "dense": "fp16"}[lay]
    h, i, m = 384, 256 if side == "down" else 64, min(bound, 3)
    b = _layer([(spec,) * 3] * E, h=h, i=i)
    other = moe_configs.pick(m, {lay}, {lay})
    config = ("gemv", cfg, *other[2:]) if side == "up" else (*other[:2], "gemv", cfg)
    _check(b, *_inputs(m, h=h, seed=71), inter=i, config=config)


@pytest.mark.parametrize("spec,tiles", [("int4_asym", True), ("int4_perm", False), ("int4_g32", False)])
def test_pick_is_told_whether_the_tiles_run(monkeypatch, spec, tiles):
    """fused_moe tells pick whether each side's int4 slots can run the tensor-core tiles: act-order
    slots (x gathered through perm below PERMUTE_PAIRS_MIN_M tokens) and group-32 ones cannot, so
    their layers keep the word-loop rows (moe_configs.GEMV_M1_DOWN_MMA / GEMV_UP / GEMV_DOWN)."""
    seen, real = [], moe_configs.pick
    monkeypatch.setattr(moe_configs, "pick", lambda *a, **kw: seen.append(kw["mma"]) or real(*a, **kw))
    h, i, m = 256, 256, 2
    b = _layer([(spec,) * 3] * E, h=h, i=i)
    _check(b, *_inputs(m, h=h, seed=5), inter=i)
    assert seen == [(tiles, tiles)]


def test_int4_fp8_layer_on_gemv_rows():
    """A layer of int4 and fp8 experts at 2-8 tokens as pick gives it (moe_configs.GEMV_MIXED: the
    GEMV path with the intq row on both sides, fp8 slots in the same launches), 3 tokens; gate/up
    over one full and one partial 256-wide K step."""
    m = 3
    b = _layer(mt.split(["int4_asym", "fp8"], E), h=384, i=64)
    assert moe_configs.pick(m, *moe.side_layouts(b))[0::2] == ("gemv", "gemv")
    _check(b, *_inputs(m, h=384, seed=83), inter=64)


@pytest.mark.parametrize("spec", ["fp8", "fp8_w8a16"])
def test_fp8_layer_on_gemv_rows(spec):
    """Uniform fp8 experts (W8A8 on the word loops, W8A16 on the row loops) at 2-4 tokens as pick
    gives them (moe_configs.GEMV_LAYOUT["fp8"]: the GEMV path since session 33), 3 tokens; gate/up
    over one 256-wide fp8 K tile, down over a partial one."""
    b = _layer(mt.uniform(spec, E), h=256, i=128)
    assert moe_configs.pick(3, *moe.side_layouts(b))[0::2] == ("gemv", "gemv")
    _check(b, *_inputs(3, h=256, seed=93), inter=128)


@pytest.mark.parametrize("mix,split,calls", [(MIX_B, 4, 1), (PER_PROJ, 2, 2)])
def test_gemv_split_programs(mix, split, calls):
    """GEMV with several programs per output tile: gate and up halves (and K chunks) in separate
    programs joined by the last to arrive; down K chunks summed with the token's TOPK rows.
    Called twice once, so the self-resetting counters are seen reused. (BN 128: two whole tiles
    of H and of I, as 32 gave eight, in a quarter of the programs; fp8 slots still fold their
    128-row scale blocks, and the K chunks are those of BN 32.)"""
    h = i = 256
    gemv = dict(BN=128, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1, split=split)
    b = _layer(mix if mix is PER_PROJ else mt.split(mix, E), h=h, i=i)
    for seed in range(41, 41 + calls):
        _check(b, *_inputs(2, h=h, seed=seed), inter=i, config=("gemv", gemv, gemv))


@pytest.mark.parametrize("mix,split,m,calls", [(MIX_A, 2, 2, 2), (MIX_B, 2, 3, 1), (PER_PROJ, 3, 1, 1)])
def test_dot_split_k(mix, split, m, calls):
    """Dot path with K in several chunks, one program each: gate / up partials joined by the last
    of a tile's programs to arrive, down chunks summed with the token's TOPK rows; the int4 chunk
    starts mid-K (the per-field dots' activation prefetch starts there too); split 3 of two 128
    K tiles leaves one chunk empty. Called twice once, so the self-resetting counters are seen reused.
    (BN 128: two whole N tiles, as 32 gave eight, in a quarter of the programs; K chunks unchanged.)"""
    h = i = 256
    dot = dict(BM=16, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=2, split=split)
    b = _layer(mix if mix is PER_PROJ else mt.split(mix, E), h=h, i=i)
    for seed in range(43, 43 + calls):
        _check(b, *_inputs(m, h=h, seed=seed), inter=i, config=("dot", dot, dot))



@pytest.mark.parametrize("specs,bm,split", [(["int4"], 16, 1), (["int4_asym", "int4_perm"], 16, 1),
                                           (["int4_asym", "int4_g32"], 64, 1), (["int4_g32", "int4_asym"], 16, 1),
                                           (["int4", "int4_perm"], 64, 2)])
def test_int4_dot_lattice(specs, bm, split):
    """int4 dot path with K tiles of 128: one dot per code field (K sub-lattice 8r + j) with
    16-row blocks (a group smaller than the tile scales each word row first); with 64-row blocks
    (the prefill row) the same dots transposed for tiles in one group (_dot_intq_t), codes
    reshuffled into K order for group 32; sym / asym / act-order, over three K tiles (H=384) and
    one (I=128), with and without a K split. (BN 128: whole N tiles, as 32 gave, in a quarter of
    the programs; the lattice and group cases are all along K.)"""
    dot = dict(BM=bm, BN=128, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=2, split=split)
    b = _layer(mt.split(specs, E), h=384, i=128)
    _check(b, *_inputs(9, h=384, seed=51), inter=128, config=("dot", dot, dot))


@pytest.mark.parametrize("path,specs", [("dot", ["int4", "int4_asym", "int4_perm"]), ("dot", ["fp8", "fp8_w8a16"]),
                                        ("gemv", ["int4_g32", "int4_perm", "int8q", "int4_asym"]),
                                        ("gemv", ["fp8", "fp8_ch", "int8", "int8_zp"]),
                                        ("gemv", ["int4", "fp8_w8a16", "fp16", "int8_w8a16"])])
def test_gate_up_in_one_k_loop(path, specs, monkeypatch):
    """A launch of gate_up slots only runs gate and up in one K loop (moe._gate_up_fused): GEMV
    tiles of any layout (configs with "gu"; fp8 with the scales folded into x per half, fp8_ch
    not, int8 with per-row scales and zeros, dense, launches that mix them), 16-row dot tiles of
    int4 (per-field) or fp8 (up to DOT_GATE_UP_FP8_MAX_M tokens); equal to one loop per half (bit
    for bit in the interpreter; the GPU may reduce in another order)."""
    cfg = (dict(BM=16, BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=2) if path == "dot" else
           dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1, gu=True))
    b = _layer(mt.split(specs, E), h=256, i=128)
    inputs = _inputs(3 if path == "gemv" or specs[0] == "fp8" else 9, h=256, seed=52)
    picked = []
    fused = moe._gate_up_fused
    monkeypatch.setattr(moe, "_gate_up_fused", lambda *a: picked.append(fused(*a)) or picked[-1])
    # the down launch (run alike twice) on tiles of 128 rows: 2 programs per pair instead of 8
    config = (path, cfg, dict(cfg, BN=128))
    one = _check(b, *inputs, inter=128, config=config)
    assert picked == [True, False]          # gate/up launch fused; down is not gate_up
    monkeypatch.setattr(moe, "_gate_up_fused", lambda *a: False)
    two = _check(b, *inputs, inter=128, config=config)
    assert mt.sqnr_db(two.float(), one.float()) >= 60 if CUDA else torch.equal(one, two)


@pytest.mark.parametrize("path", ["gemv", "dot"])
@pytest.mark.parametrize("per_projection", [False, True])
def test_act_order_input_permuted_per_pair_or_gathered(path, per_projection, monkeypatch):
    """Act-order launches read their input permuted per (token, expert) pair by one launch before
    (moe._permute_pairs, from PERMUTE_PAIRS_MIN_M tokens) or gather x through perm in every
    program; both equal the reference, beside slots without perm. A gate or up bucket of its own
    with a perm (per-projection mix) keeps the gather on its side (gate and up may differ there)."""
    specs = (mt.split(["int4_perm", "fp8_w8a16", "int4_asym"], E) if not per_projection else
             [("int4_perm", "fp16", "int4_perm") if e % 2 else ("int4", "int4", "fp16") for e in range(E)])
    b = _layer(specs, h=256, i=128)
    cfg = (dict(BM=16, BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=2) if path == "dot" else
           dict(BN=32, BKD=64, BKF=128, BKQ=64, BKI=64, num_warps=4, num_stages=1))
    inputs = _inputs(3 if path == "gemv" else 9, h=256, seed=53)
    monkeypatch.setattr(moe, "PERMUTE_PAIRS_MIN_M", 1)     # the GEMV case runs 3 tokens
    calls = []
    permute = moe._permute_pairs
    monkeypatch.setattr(moe, "_permute_pairs", lambda *a: calls.append(a[3]) or permute(*a))
    permuted = _check(b, *inputs, inter=128, config=(path, cfg, cfg))
    assert calls == ([1] if per_projection else [K_TOP, 1])     # (down only) / gate_up and down
    monkeypatch.setattr(moe, "PERMUTE_PAIRS_MIN_M", 1 << 30)
    gathered = _check(b, *inputs, inter=128, config=(path, cfg, cfg))
    assert len(calls) == 2 - per_projection
    assert mt.sqnr_db(gathered.float(), permuted.float()) >= 60 if CUDA else torch.equal(gathered, permuted)


@pytest.mark.parametrize("gu,split", [(True, 1), (False, 2)])
def test_int4_gemv_fp16_word_loop(gu, split):
    """GEMV configs with "f16" run their int4 slots in packed fp16 math (gemv_tiles): sym, asym,
    group 32, act-order and an int8 slot beside them (which keeps its own loop), gate and up in
    one K loop or split in K; equal to the reference at 1 and 3 tokens, in bf16 on the GPU too."""
    cfg = dict(BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, gu=gu, split=split, f16=True)
    b = _layer(mt.split(["int4", "int4_asym", "int4_g32", "int4_perm", "int8q"], E), h=256, i=128)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        for m in (1, 3):
            x, w, ids = _inputs(m, h=256, seed=58 + m, dtype=dtype)
            _check(b if dtype == torch.float16 else _layer(mt.split(["int4", "int4_asym", "int4_g32", "int4_perm",
                                                                    "int8q"], E), h=256, i=128, dtype=dtype),
                   x, w, ids, inter=128, config=("gemv", cfg, cfg))


@pytest.mark.parametrize("h,i,bn,ms", [(256, 128, 32, (1, 3)), (384, 96, 32, (3,)), (384, 96, 16, (1,))])
def test_int4_gemv_mma_tiles(h, i, bn, ms):
    """GEMV configs with "mma" run int4 slots of 128-input groups on the tensor cores (gemv_mma:
    gate and up of 32 rows, 64 down rows): sym and asym beside a group-32 and an act-order slot
    (which keep the word loop) and an int8 slot; K not a multiple of 128 (384 -> 3 groups over 4
    warps, 96 -> one partial group), column tiles past the end, 4 or 2 column tiles per lane
    (BN 32 / 16 gate and up rows); equal to the reference at 1 and 3 tokens, in bf16 on the GPU too.
    (Checked to fail, in the interpreter, with the lo / hi column sets swapped and with the scale
    rows shifted by one group.)"""
    up = dict(BN=bn, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, gu=True, f16=True, mma=True)
    down = dict(up, BN=2 * bn, gu=False)
    specs = mt.split(["int4", "int4_asym", "int4_g32", "int4_perm", "int8q"], E)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer(specs, h=h, i=i, dtype=dtype, seed=5)
        for m in ms:
            _check(b, *_inputs(m, h=h, seed=70 + m, dtype=dtype), inter=i, config=("gemv", up, "gemv", down))


def test_int4_gemv_mma_tiles_beside_other_layouts():
    """A GEMV config with "mma" on a layer mixing int4 with fp8 (W8A8, W8A16), int8 and bf16
    experts (the mixed GEMV rows' candidates in scripts/sweep_moe_m1.py): the int4 slots on the
    tensor-core tiles, the others on their own loops in the same launch; equal to the reference at
    1 and 3 tokens, in bf16 on the GPU too."""
    up = dict(BN=16, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, gu=True, f16=True, mma=True)
    down = dict(up, BN=32, gu=False)
    specs = mt.split(["int4", "fp8", "int4_asym", "fp8_w8a16", "int8", "bf16"], E)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer(specs, h=256, i=128, dtype=dtype, seed=9)
        for m in (1, 3):
            _check(b, *_inputs(m, h=256, seed=75 + m, dtype=dtype), inter=128, config=("gemv", up, "gemv", down))


@pytest.mark.parametrize("specs,h,i,bn,dbn,split,m", [
    (["int4", "int4_asym"], 256, 128, 32, 64, 1, 9),          # 4 column tiles per lane, gate and up in one loop
    (["int4_asym", "int4_perm", "int4"], 384, 96, 16, 32, 1, 11),   # 2 per lane; act-order, permuted per pair
    (["int4", "int4_asym"], 256, 128, 32, 32, 2, 9)])        # K split: gate and up in their own programs
def test_int4_dot_mma_blocks(specs, h, i, bn, dbn, split, m):
    """Dot rows with "mma" (BM 8) run every int4 slot on gemv_mma's tiles, the block's 8 pairs as
    the mma's B columns gathered by each lane (moe_triton._moe_dot_kernel): sym / asym, act-order
    (its input permuted per pair from PERMUTE_PAIRS_MIN_M tokens), K = 384 over 4 warps (3 groups)
    and 96 (one partial group), partial column tiles, partial blocks (padding pairs), experts with
    more than 8 pairs (several blocks); equal to the reference, in bf16 on the GPU too. (Checked to
    fail, in the interpreter, with each lane loading the next lane's pair.)"""
    up = dict(BM=8, BN=bn, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, mma=True, split=split)
    down = dict(up, BN=dbn)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer(mt.split(specs, E), h=h, i=i, dtype=dtype, seed=6)
        _check(b, *_inputs(m, h=h, seed=80, dtype=dtype), inter=i, config=("dot", up, "dot", down))


@pytest.mark.parametrize("specs,bn,dbn,split,m", [
    (["int4", "fp8", "fp8_w8a16"], 32, 64, 1, 9),          # gate and up in one loop (int4 + fp8)
    ([("int4", "fp8", "bf16"), ("int4",) * 3, "int8", "int8_w8a16"], 32, 64, 1, 11),  # per projection; halves
    (["int4_asym", "fp8", "bf16"], 32, 64, 2, 9)])         # K split
def test_mixed_dot_mma_blocks(specs, bn, dbn, split, m):
    """A dot row with "mma" (BM 8) on a layer mixing int4 with fp8 (W8A8, W8A16), int8 and bf16
    experts, or projections of one expert in different formats: int4 slots on the mma tiles, the
    others' dots on 16 rows of which the block's 8 count (moe_triton._rows16); equal to the
    reference, in bf16 on the GPU too. (Checked to fail, in the interpreter, with the second 8
    rows left unmasked.)"""
    up = dict(BM=8, BN=bn, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=1, num_stages=1, mma=True, split=split)
    down = dict(up, BN=dbn)
    specs = [s if isinstance(s, tuple) else (s, s, s) for s in specs]
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer([specs[e % len(specs)] for e in range(E)], h=256, i=128, dtype=dtype, seed=7)
        x = _inputs(m, h=256, seed=90, dtype=dtype)
        assert moe._mma_dot_fits([bk for bk in b if bk["proj"] != "down"], up, 256, m, x[0], 256, 128, True)
        assert moe._mma_dot_fits([bk for bk in b if bk["proj"] == "down"], down, 128, m, x[0], 256, 128, False)
        _check(b, *x, inter=128, config=("dot", up, "dot", down))


@pytest.mark.parametrize("specs,m", [
    (["int4", "fp8", "bf16", "int4_asym"], 9),                                    # per expert
    ([("int4", "fp8", "int4"), ("int4",) * 3, ("fp8",) * 3], 11)])                 # per projection
def test_int4_buckets_apart(monkeypatch, specs, m):
    """A dot config naming an "intq" row runs a side's int4 buckets in a launch of their own on
    that row's 8-pair blocks (moe._apart) and the others on the config itself (BM 16), the down
    launches summing in the last; on the gate/up side only gate_up buckets go apart (an expert
    whose gate and up differ in format stays in one launch). Equal to the reference; a base config
    that splits K keeps one launch per side."""
    row_up = dict(BM=8, BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=2, num_stages=1, mma=True)
    row_dn = dict(row_up, BN=64, num_warps=1)
    base = dict(moe_configs.DOT[0][1], BKD=64, BKI=64)
    runs, real = [], moe._apart
    monkeypatch.setattr(moe, "_apart", lambda *a: runs.append(real(*a)) or runs[-1])
    specs = [s if isinstance(s, tuple) else (s, s, s) for s in specs]
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        runs.clear()
        b = _layer([specs[e % len(specs)] for e in range(E)], h=256, i=128, dtype=dtype, seed=8)
        x = _inputs(m, h=256, seed=91, dtype=dtype)
        _check(b, *x, inter=128, config=("dot", dict(base, intq=row_up), "dot", dict(base, intq=row_dn)))
        (up_runs, dn_runs), ups = runs, [bk for bk in b if bk["proj"] != "down"]
        assert [c for _, _, c in up_runs] == [row_up, base] and [c for _, _, c in dn_runs] == [row_dn, base]
        assert all(bk["layout"] == "intq" and bk["proj"] == "gate_up" for bk in up_runs[0][1])
        assert all(bk["layout"] == "intq" for bk in dn_runs[0][1])
        assert len(up_runs[0][1]) + len(up_runs[1][1]) == len(ups)
        assert any(bk["layout"] == "intq" for bk in up_runs[1][1]) == any(bk["proj"] == "gate" for bk in ups)
        runs.clear()
        split = dict(base, split=2)
        _check(b, *x, inter=128, config=("dot", dict(split, intq=row_up), "dot", dict(split, intq=row_dn)))
        assert [len(r) for r in runs] == [1, 1]


def test_int4_dot_mma_rows_fall_back_where_the_tiles_do_not_fit(monkeypatch):
    """A BM-8 mma dot row on a side the tiles cannot run (int4 of group 32, 8-bit intq codes, fp32
    x, act-order read through perm below PERMUTE_PAIRS_MIN_M tokens, BN not 2 or 4 tiles per
    lane) takes the BM-16 dot row; the result still equals the reference. fp8 / int8 buckets
    beside int4 fit (test_mixed_dot_mma_blocks)."""
    up = dict(BM=8, BN=32, BKD=64, BKF=128, BKQ=128, BKI=64, num_warps=4, num_stages=1, mma=True)
    x = torch.zeros(3, 256, dtype=torch.float16)
    for specs, bn, dtype, fits in ((["int4", "int4_asym"], 32, torch.float16, True),
                                   (["int4", "int4_g32"], 32, torch.float16, False),
                                   (["int4", "int8q"], 32, torch.float16, False),
                                   (["int4", "fp8"], 32, torch.float16, True),
                                   (["int4", "int8", "bf16"], 32, torch.float16, True),
                                   (["int4"], 32, torch.float32, False),
                                   (["int4", "int4_perm"], 32, torch.float16, False),
                                   (["int4"], 64, torch.float16, False)):
        b = mt.build_buckets(mt.split(specs, E), 256, 128, dtype=torch.float16, device="cpu", seed=1)
        ups = [bk for bk in b if bk["proj"] != "down"]
        assert moe._mma_dot_fits(ups, dict(up, BN=bn), 256, 3, x.to(dtype), 256, 128, True) == fits, specs
    b = _layer(mt.split(["int4", "int4_g32"], E), h=256, i=128)
    _check(b, *_inputs(9, h=256, seed=81), inter=128, config=("dot", up, "dot", dict(up, BN=64)))


@pytest.mark.parametrize("gu,split,bkf", [(True, 1, 128), (False, 2, 256)])
def test_fp8_gemv_fp16_word_loop(gu, split, bkf):
    """GEMV configs with "f16" also run fp8 W8A8 slots whose tile rows share a scale row in packed
    fp16 (moe_triton._gemv_fp8_words: weight and activation codes as words), beside fp8 W8A16,
    per-channel W8A8 (their own loop) and int4 (its word loop): 128- and 256-wide K tiles (a tile
    of two scale blocks), gate and up in one K loop or split in K, 1 and 3 tokens; equal to the
    reference. (Checked to fail when two activation pairs of the word loop are swapped.)"""
    cfg = dict(BN=32, BKD=64, BKF=bkf, BKQ=128, BKI=64, num_warps=4, num_stages=1, gu=gu, split=split, f16=True)
    specs = mt.split(["fp8", "fp8_w8a16", "fp8_ch_w8a8", "int4"], E)
    # 384: a partial last 256-wide tile (EVK off); 256: two 128 tiles (EVK on, as at 384), fewer
    # programs; its seeds route the 3 tokens to all four formats, the 1 token to both fp8 blocked ones
    h, seed = (384, 60) if bkf == 256 else (256, 65)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer(specs, h=h, i=128, dtype=dtype, seed=3)
        for m in (1, 3):
            _check(b, *_inputs(m, h=h, seed=seed + m, dtype=dtype), inter=128, config=("gemv", cfg, cfg))


@pytest.mark.parametrize("gu,split", [(True, 1), (False, 2)])
def test_int8_gemv_dp4a_word_loop(gu, split):
    """GEMV configs with "f16" run int8 W8A8 slots as dp4a over int32 words
    (moe_triton._gemv_int8_words: exact int32 sums), symmetric and with zero points, beside an
    int8 W8A16 slot and an fp8 one (their own loops); gate and up in one K loop or split in K; 1
    and 3 tokens; equal to the reference. (Checked to fail with the codes' sum left out.)"""
    cfg = dict(BN=32, BKD=64, BKF=128, BKQ=128, BKI=128, num_warps=4, num_stages=1, gu=gu, split=split, f16=True)
    specs = mt.split(["int8", ("int8", {"act": "w8a8", "zero": True}), "int8_w8a16", "fp8"], E)
    for dtype in (torch.float16, torch.bfloat16) if CUDA else (torch.float16,):
        b = _layer(specs, h=256, i=128, dtype=dtype, seed=4)
        for m in (1, 3):
            _check(b, *_inputs(m, h=256, seed=70 + m, dtype=dtype), inter=128, config=("gemv", cfg, cfg))


def test_int4_layer_past_128_tokens_on_the_field_row():
    """A uniform int4 layer of 129..DOT_INTQ_MAX_M tokens takes the BM-16 dot row (pick), with
    groups of 128 and of 32; equal to the reference. (H 128: one K tile each side, half the down
    programs of 256; test_int4_dot_lattice runs the field dots over several K tiles.)"""
    from mixprec.kernels import moe_configs as mc
    b = _layer(mt.split(["int4", "int4_g32"], E), h=128, i=128)
    assert mc.pick(140, *moe.side_layouts(b))[1]["BM"] == 16
    _check(b, *_inputs(140, h=128, seed=57), inter=128)


def test_bench_goal_lines_say_not_measured_without_points():
    """bench-moe's goal lines: a baseline that failed (nan) or a missing format is 'not measured',
    never 'met' (they had read 'met' with nothing compared)."""
    from mixprec.kernels.moe_bench import summarize
    row = lambda cfg, M, us, **kw: dict(shape="30b", config=cfg, M=M, us=us, pct=50.0, by_format={cfg: 1}, **kw)  # noqa: E731
    lines = summarize([row("int4", 1, 10.0), row("bf16", 1, 30.0, grouped_mm_us=float("nan"))], 3000.0)
    assert any(ln.startswith("int4 < fp8 < bf16 for M <= 64: not measured") for ln in lines), lines
    assert any(ln.startswith("bf16 <= torch._grouped_mm: not measured") for ln in lines), lines
    lines = summarize([row("int4", 1, 10.0), row("fp8", 1, 20.0), row("bf16", 1, 15.0, grouped_mm_us=14.0)], 3000.0)
    assert any("int4 < fp8 < bf16 for M <= 64: missed at 1 of 1" in ln for ln in lines), lines
    assert any("bf16 <= torch._grouped_mm: missed at 1 of 1" in ln for ln in lines), lines


GROUPED_CASES = [(mt.uniform("fp16", E), torch.bfloat16), (mt.uniform("fp16", E), torch.float32),
                 (mt.split(["fp16", "int4", "int4_asym", "int4_g32", "int4_perm"], E), torch.float16),
                 ([("int4_perm", "fp16", "int4_asym")] * E, torch.float16)]


@pytest.mark.parametrize("specs,dtype", GROUPED_CASES if not CUDA else [(c[0], torch.bfloat16) for c in GROUPED_CASES[::2]])
def test_grouped_moe_matches_reference(specs, dtype):
    """The torch._grouped_mm path (moe.grouped_moe): all-dense layers with their weights in place,
    mixed dense / int4 layers (sym, asym, group 32, act-order: rows back in input order; gate and
    up in two buckets) through the dequantized stacks; equal to the reference, with an expert that receives no token and experts
    absent from the buckets (expert parallel: their pairs add zero)."""
    b = _layer(specs, dtype=dtype)
    x, w, ids = _inputs(37, seed=71, dtype=dtype)
    ids = torch.where(ids == 3, 4, ids)                  # expert 3 gets no token
    assert moe.grouped_fits(b, x, I, 1 << 20)
    y = moe.grouped_moe(x, ids, w, b, I)
    ref = moe.moe_reference(x, ids, w, b, I)
    assert y.dtype == dtype and mt.sqnr_db(ref, y.float()) >= 40.0
    # experts 0 and 5 live elsewhere: -1 in every bucket's map, their pairs add zero
    part = []
    for t in b:
        emap = t["expert_map"].clone()
        emap[[0, 5]] = -1
        part.append(dict(t, expert_map=emap, identity=False))
    keep = ~((ids == 0) | (ids == 5))
    want = moe.moe_reference(x, torch.where(keep, ids, 1), torch.where(keep, w, 0.0), b, I)
    assert mt.sqnr_db(want, moe.grouped_moe(x, ids, w, part, I).float()) >= 40.0


def test_grouped_path_dispatch(monkeypatch):
    """fused_moe takes grouped_moe from GROUPED_MIN_M tokens for all-dense layers, from
    GROUPED_DEQUANT_MIN_M for dense / intq mixes whose stacks fit (act-order too), never for padded
    act-order shards, fp8 or int8 buckets, an explicit launch config, or (CUDA) other activations
    than bf16."""
    from mixprec.kernels import moe_configs as mc
    calls = []
    monkeypatch.setattr(moe, "grouped_moe", lambda *a: calls.append(1) or moe.moe_reference(*a).to(a[0].dtype))
    monkeypatch.setattr(mc, "GROUPED_MIN_M", 4)
    monkeypatch.setattr(mc, "GROUPED_DEQUANT_MIN_M", 5)
    launches = []
    if not CUDA:    # the fused kernels' results are not looked at here (other tests check them): the
        # interpreter records their launches instead of running them
        class _Record:
            def __getitem__(self, grid):
                return lambda *a, **kw: launches.append(grid)
        monkeypatch.setattr(moe, "_moe_gemv_kernel", _Record())
        monkeypatch.setattr(moe, "_moe_dot_kernel", _Record())
    x, w, ids = _inputs(5, seed=72)
    runs = [(mt.uniform("fp16", E), 5, {}, 1), (mt.uniform("fp16", E), 3, {}, 0),
            (mt.uniform("fp16", E), 5, {"config": DOT}, 0), (mt.split(["fp16", "int4"], E), 5, {}, 1),
            (mt.split(["fp16", "int4"], E), 4, {}, 0), (mt.uniform("int4_perm", E), 5, {}, 1), ("padded", 5, {}, 0),
            (mt.split(["int4", "fp8"], E), 5, {}, 0), (mt.uniform("int8", E), 5, {}, 0)]
    for specs, m, kw, want in runs:
        calls.clear()
        launches.clear()
        b = _layer(mt.uniform("int4_perm", E) if specs == "padded" else specs)
        if specs == "padded":
            for bb in b:
                _pad_act_order(bb, 32)
        moe.fused_moe(x[:m], ids[:m], w[:m], b, I, **kw)
        assert len(calls) == (0 if CUDA else want), (specs[0], m, kw)    # CUDA: fp16 is not _grouped_mm's
        assert CUDA or (len(launches) == 2) == (want == 0), (specs[0], m, kw, launches)  # gate/up + down
    monkeypatch.setattr(mc, "GROUPED_STACK_MAX_BYTES", 1024)
    calls.clear()
    launches.clear()
    moe.fused_moe(x, ids, w, _layer(mt.split(["fp16", "int4"], E)), I)
    assert calls == [] and (CUDA or len(launches) == 2)


@GPU
@pytest.mark.parametrize("specs", [mt.uniform("bf16", BIG["e"]), mt.split(["int4", "bf16"], BIG["e"])])
def test_gpu_grouped_path_no_host_sync_and_graph_replay(specs):
    """grouped_moe (bf16 weights in place; int4 + bf16 through the dequantized stacks) syncs with
    the host nowhere (sync debug mode raises) and replays from a CUDA graph (a decode batch of
    GROUPED_MIN_M sequences takes this path inside the captured step)."""
    b = mt.build_buckets(specs, BIG["h"], BIG["i"], dtype=torch.bfloat16, device="cuda", seed=13)
    _graph_replay_matches_reference(b, 640, moe.grouped_moe, no_sync=True)


# (fp8 at 4096 takes the configs of the mixed 2048 rows, run here: left out for CI time, 30 s)
@pytest.mark.parametrize("name,h", [("fp8", 2048), ("rt_mixed", 2048), ("rt_mixed", 4096)])
def test_batch1_rows_at_listed_hidden_sizes(name, h):
    """The batch-1 launch configs keyed by hidden size (moe_configs.GEMV_M1: gate and up in one
    loop, for fp8 layers and for the runtime's mixed preset: intq, fp8 and int8 gate/up;
    GEMV_M1_DOWN: wider tiles for its intq, dense and fp8 down; 30B 2048, 235B 4096) on a layer of
    that hidden size, against the reference (small I, 8 experts)."""
    from mixprec.kernels import moe_bench as mb
    from mixprec.kernels import moe_configs as mc
    i = 16     # 1-4 gate/up tiles of the BN 4-16 rows; the cost is the wide K and N
    b = _layer(mb.CONFIGS[name](E), h=h, i=i)
    up, dn = moe.side_layouts(b)
    path_up, cu, path_dn, cd = mc.pick(1, up, dn, hidden=h)
    assert path_up == path_dn == "gemv" and cu["gu"]
    assert cu == mc.GEMV_M1[(mc.side_key(up), h)] and cd == mc.GEMV_M1_DOWN[(mc.side_key(dn), h)]
    _check(b, *_inputs(1, h=h, seed=61), inter=i)
