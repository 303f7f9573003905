"""Dense linear kernels (intq / fp8 / int8) against their pure-torch references on the same
packed tensors (SQNR >= 40 dB), plus checks of the references themselves against integer codes.

Without CUDA the Triton kernels run in the CPU interpreter (conftest sets TRITON_INTERPRET=1):
small shapes, fp16/fp32 activations (the interpreter's bf16 arithmetic is wrong). With CUDA the
GPU tests run bf16 and fp16 at real sizes, default configs, CUDA-graph capture and determinism."""
import pytest
import torch
import triton
import triton.language as tl

from mixprec.errors import FormatError, ShapeMismatch
from mixprec.kernels import configs
from mixprec.kernels.fp8 import fp8_linear, fp8_linear_cfg, fp8_linear_reference
from mixprec.kernels.int8 import int8_linear, int8_linear_cfg, int8_linear_reference
from mixprec.kernels.intq import intq_linear, intq_linear_cfg, intq_linear_reference
from mixprec.kernels.quant import _e4m3_f32, fp8_act_quant_reference, int8_act_quant_reference

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
cpu_only = pytest.mark.skipif(CUDA, reason="interpreter test (CPU only)")

# small configs that exercise both kernels, with and without split-K, on tiny shapes
GEMV = configs.cfg("gemv", 1, 128, 64, 1, 1, 1)
GEMV_SPLIT = configs.cfg("gemv", 1, 64, 64, 3, 2, 1)
GEMV_WIDE = configs.cfg("gemv", 1, 32, 256, 2, 2, 1)   # fp8: K tiles of two 128-wide slices
GEMV_WHOLE_K = configs.cfg("gemv", 1, 8, 1024, 1, 4, 1)   # one K tile wider than K (30B down rows)
GEMM = configs.cfg("gemm", 16, 32, 128, 1, 4, 2)
GEMM_SPLIT = configs.cfg("gemm", 16, 64, 64, 2, 4, 2)
SWAP = configs.cfg("swap", 16, 64, 128, 1, 4, 2)         # int4, one group per K tile: transposed dots
SWAP_SPLIT = configs.cfg("swap", 64, 64, 128, 2, 4, 2)
SWAP_PAIRED = configs.cfg("swap", 128, 64, 128, 2, 4, 2)   # from quant.PAIRED_MIN_BM rows: fields paired in one dot
SWAP_WIDE = configs.cfg("swap", 32, 128, 128, 1, 8, 2)    # wide outputs (intq.SWAP_WIDE_MIN_N)
DEQUANT = configs.cfg("dequant", 128, 128, 128, 1, 4, 1)   # dequantize, then torch.mm


def sqnr(y, ref):
    y, ref = y.float().cpu(), ref.float().cpu()
    assert torch.isfinite(y).all()
    return (10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum().clamp_min(1e-30))).item()


def gen(seed):
    return torch.Generator(device="cpu").manual_seed(seed)


def make_intq(N, K, G, bits, asym, act_order, seed, sdtype=torch.float16):
    g = gen(seed)
    pf = 32 // bits
    qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // pf, N), dtype=torch.int32, generator=g)
    ng = -(-K // G)
    sc = (torch.rand(ng, N, generator=g) * 0.02 + 0.002).to(sdtype)
    z = torch.randint(0, 2 ** bits, (ng, N), dtype=torch.uint8, generator=g) if asym else None
    perm = torch.randperm(K, generator=g).to(torch.int32) if act_order else None
    return [t.to(DEV) if t is not None else None for t in (qw, sc, z, perm)]


def make_fp8(N, K, block, seed):
    g = gen(seed)
    w = (torch.randn(N, K, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
    s = torch.rand(-(-N // block[0]), -(-K // block[1]), generator=g) * 0.01 + 1e-3
    return w.to(DEV), s.to(DEV)


def make_int8(N, K, asym, seed):
    g = gen(seed)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, 1, generator=g) * 0.01 + 1e-3
    z = torch.randint(-20, 21, (N, 1), generator=g).float() if asym else None
    return w.to(DEV), s.to(DEV), (z.to(DEV) if z is not None else None)


def xin(M, K, dtype, seed):
    return torch.randn(M, K, generator=gen(seed)).to(dtype).to(DEV)


# ------------------------------------------------------------------------------------------
# references against integer codes (independent of the kernels)

def test_intq_reference_matches_integer_codes():
    K, N, G = 64, 8, 32
    for bits in (4, 8):
        pf = 32 // bits
        codes = torch.randint(0, 2 ** bits, (K, N), generator=gen(1))
        words = torch.zeros(K // pf, N, dtype=torch.int64)
        for i in range(pf):
            words |= codes[i::pf].long() << (bits * i)          # row r*pf+i in bits bits*i..
        qw = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
        sc = torch.rand(K // G, N, generator=gen(2)).half()
        z = torch.randint(0, 2 ** bits, (K // G, N), generator=gen(3)).to(torch.uint8)
        perm = torch.randperm(K, generator=gen(4)).int()
        x = torch.randn(3, K, generator=gen(5))
        W = torch.zeros(N, K)                                   # un-permuted dense weight
        for k in range(K):
            W[:, perm[k]] = sc[k // G].float() * (codes[k].float() - z[k // G].float())
        ref = intq_linear_reference(x, qw, sc, z, perm, bits, G)
        torch.testing.assert_close(ref, x @ W.T, rtol=1e-5, atol=1e-4)
        Wsym = (codes.float() - 2 ** (bits - 1)) * sc.float().repeat_interleave(G, 0)
        torch.testing.assert_close(intq_linear_reference(x, qw, sc, None, None, bits, -1 if G == K else G),
                                   x @ Wsym, rtol=1e-5, atol=1e-4)


def test_act_quant_references():
    x = torch.randn(4, 300, generator=gen(6)) * torch.tensor([[1e-3], [1.0], [50.0], [0.0]])
    xq, a = fp8_act_quant_reference(x, 128)
    assert xq.dtype == torch.float8_e4m3fn and a.shape == (4, 3)
    assert torch.isfinite(a).all() and (a > 0).all()                 # zero row: EPS clamp, no NaN
    assert xq[:3, :128].float().abs().amax(1).eq(448).all()          # amax maps to e4m3 max
    rel = (xq.float() * a.repeat_interleave(128, 1)[:, :300] - x).norm() / x.norm()
    assert rel < 0.05
    q8, sx = int8_act_quant_reference(x)
    assert q8.dtype == torch.int8 and q8[:3].abs().amax(1).eq(127).all() and q8[3].eq(0).all()
    assert ((q8.float() * sx - x).abs() <= sx / 2 + 1e-6).all()


def test_int8_codes_of_act_quant_equal_the_reference_on_ties():
    """The dense GEMM reads act_quant's codes; the readable spec rounds half to even too, so the
    two agree bit for bit, also on exact .5 ties (common with bf16 inputs)."""
    from mixprec.kernels.quant import act_codes, act_quant
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 3.0, 0.0], [254.0, 1.0, 3.0, 5.0, -1.0, 7.0, 9.0, 2.0]])
    q, qs, _ = act_quant(x.to(DEV), True, False)
    rq, rs = int8_act_quant_reference(x)
    assert torch.equal(q.view(torch.int8)[:, 0].cpu(), rq) and torch.equal(qs[:, :1].cpu(), rs)
    codes, sx, _ = act_codes(x.to(DEV), "int8")          # the plane the dense GEMM reads
    assert torch.equal(codes.cpu(), rq) and torch.equal(sx.cpu(), rs[:, 0])
    codes8, a8, _ = act_codes(x.to(DEV), "fp8")
    rq8, ra8 = fp8_act_quant_reference(x)
    assert torch.equal(codes8.cpu().view(torch.uint8), rq8.view(torch.uint8)) and torch.equal(a8.cpu(), ra8)
    assert rq[0, 1:4].tolist() == [0, 2, 2] and rq[0, 4:6].tolist() == [0, -2]


def test_fp8_and_int8_references_dequant():
    w, s = make_fp8(96, 256, (32, 128), 7)
    x = xin(2, 256, torch.float32, 8).cpu()
    W = w.cpu().float() * s.cpu().repeat_interleave(32, 0).repeat_interleave(128, 1)
    torch.testing.assert_close(fp8_linear_reference(x, w.cpu(), s.cpu(), (32, 128), "w8a16"), x @ W.T)
    wi, si, zi = (t.cpu() for t in make_int8(40, 64, True, 9))
    torch.testing.assert_close(int8_linear_reference(x[:, :64], wi, si, zi, "w8a16"),
                               x[:, :64] @ ((wi.float() - zi) * si).T)


# ------------------------------------------------------------------------------------------
# interpreter: kernels vs references, small shapes

INTQ_CASES = [  # M, N, K, G, asym, act_order
    (1, 200, 256, 64, True, False),
    (3, 96, 128, 128, False, True),
    (17, 64, 256, 32, True, True),
    (2, 72, 200, 200, True, False),     # G = K (group_size -1), K not a multiple of the tile
    (13, 80, 384, 128, True, True),     # M 9-16: per-field dots on BM-16 tiles, act-order
    (9, 80, 384, 32, True, True),       # per-field dots, groups smaller than the tile: rows scaled first
    (16, 72, 256, 64, False, False),
    (40, 72, 384, 128, True, True),     # swap tiles (BM 64, M and N not multiples of the tile)
    (40, 72, 384, 128, False, False),   # swap tiles without act-order: BM 128 pairs fields (SWAP_PAIRED)
]


@cpu_only
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", INTQ_CASES)
def test_intq_interpreter(bits, case):
    M, N, K, G, asym, act = case
    qw, sc, z, perm = make_intq(N, K, G, bits, asym, act, seed=M + N + bits)
    gs = -1 if G == K else G
    cfgs = [GEMM, GEMM_SPLIT] + ([GEMV, GEMV_SPLIT, GEMV_WHOLE_K] if M <= 3 else [])
    swap = [SWAP, SWAP_SPLIT, SWAP_PAIRED, SWAP_WIDE] if bits == 4 and (G == K or G % 128 == 0) else []
    for dtype, cs in ((torch.float16, cfgs + swap + [DEQUANT]), (torch.float32, cfgs[1::2] + [DEQUANT])):
        x = xin(M, K, dtype, seed=K + M)
        ref = intq_linear_reference(x, qw, sc, z, perm, bits, gs)
        for c in cs:
            y = intq_linear_cfg(x, qw, sc, z, perm, bits, gs, c)
            assert y.dtype == dtype and y.shape == (M, N)
            assert sqnr(y, ref) >= 40, (c, dtype)
    if swap:      # fp32 activations have no 16-bit dot operands for the transposed tiles
        with pytest.raises(FormatError, match="swap tiles"):
            intq_linear_cfg(xin(M, K, torch.float32, seed=1), qw, sc, z, perm, bits, gs, SWAP)


@pytest.mark.parametrize("G,asym,act", [(128, True, False), (2048, False, False), (32, True, True)])
def test_intq_gemv_fp16_word_loop(G, asym, act):
    """int4 GEMV programs over >= F16_MIN_K inputs with 16-bit activations take the packed-fp16
    word loop (gemv_tiles, quant.int4_word_dot; the interpreter runs its plain-Triton twin):
    equal to the reference for groups 128 / -1 / 32, sym / asym, act-order, odd N, M = 1 and 3,
    two tile shapes, and rows of very large and very small activations (the per-row
    power-of-two scaling that keeps the fp16 products finite and precise)."""
    from mixprec.kernels.intq import F16_MIN_K
    M, N, K = 3, 40, F16_MIN_K     # N 40: a partial last 16-row tile, as 72 had, in fewer programs
    qw, sc, z, perm = make_intq(N, K, G, 4, asym, act, seed=G + N)
    gs = -1 if G == K else G
    dtypes = (torch.bfloat16, torch.float16) if CUDA else (torch.float16,)
    for dtype in dtypes:
        x = xin(M, K, torch.float32, seed=7)
        x[1] *= 2000.0 if dtype == torch.bfloat16 else 20.0     # fp16 tops out at 65504
        x[2] *= 1e-3
        x[2, :64] *= 1e-3
        x = x.to(dtype)
        ref = intq_linear_reference(x, qw, sc, z, perm, 4, gs)
        for c in (GEMV_WHOLE_K, configs.cfg("gemv", 1, 16, 512, 1, 4, 1)):   # one K range: F16
            for m in (1, M):
                y = intq_linear_cfg(x[:m], qw, sc, z, perm, 4, gs, c)
                for row in range(m):
                    assert sqnr(y[row], ref[row]) >= 40, (c, dtype, m, row)


@pytest.mark.parametrize("G,asym,act", [(128, True, False), (384, False, False), (32, True, True)])
def test_int4_gemv_several_rows_per_program(G, asym, act):
    """int4 GEMV configs with BM 2 / 4 (gemv_tiles.gemv_int4_rows: each word unpacked once for
    BM activation rows, a packed fp16 dot per row): equal to the reference for groups 128 / -1 /
    32, sym / asym, act-order, N and K not multiples of the tile (K = 384 against 256-input
    tiles), M = 3 (a program with a row past M) and 8, split K and not, rows of very large
    and very small activations; fp32 activations keep one row per program; BM 8 is refused.
    (N 40: against BN 16 / 8 / 32 the same partial / whole / partial last tiles as 72, fewer programs.)"""
    N, K = 40, 384
    qw, sc, z, perm = make_intq(N, K, G, 4, asym, act, seed=G + 3)
    gs = -1 if G == K else G
    for dtype in (torch.bfloat16, torch.float16) if CUDA else (torch.float16,):
        x = xin(8, K, torch.float32, seed=11)
        x[1] *= 2000.0 if dtype == torch.bfloat16 else 20.0
        x[2] *= 1e-3
        x[2, :64] *= 1e-3
        x = x.to(dtype)
        ref = intq_linear_reference(x, qw, sc, z, perm, 4, gs)
        for c in (configs.cfg("gemv", 2, 16, 256, 1, 4, 1), configs.cfg("gemv", 4, 8, 256, 2, 4, 1),
                  configs.cfg("gemv", 4, 32, 128, 1, 4, 1)):
            for m in (3, 8):     # (M = 2 left out: a whole BM-2 program as at 8, a BM-4 one with rows past M as at 3)
                y = intq_linear_cfg(x[:m], qw, sc, z, perm, 4, gs, c)
                for row in range(m):
                    assert sqnr(y[row], ref[row]) >= 40, (c, dtype, m, row)
    x = xin(3, K, torch.float32, seed=12)
    y = intq_linear_cfg(x, qw, sc, z, perm, 4, gs, configs.cfg("gemv", 4, 16, 256, 1, 4, 1))
    assert sqnr(y, intq_linear_reference(x, qw, sc, z, perm, 4, gs)) >= 40
    with pytest.raises(FormatError, match="BM=8"):
        intq_linear_cfg(xin(8, K, torch.float16, seed=13), qw, sc, z, perm, 4, gs, configs.cfg("gemv", 8, 16, 256, 1, 4, 1))


@pytest.mark.parametrize("G,asym,K", [(128, True, 384), (256, False, 512), (-1, False, 256)])
def test_int4_gemv_mma(G, asym, K):
    """int4 GEMV configs with "mma" (gemv_mma: the activation rows are the B columns of
    mma.sync; the interpreter computes the mmas from what each lane loaded): equal to the
    reference for groups 128 / 256 / -1, sym / asym, N = 72 against 32 / 64 columns per program
    (partial last tiles), M = 1 (one row per program), 3 (rows past M), 8 and 11 (a second
    program of rows), split K and not, rows of very large, very small and all-positive activations
    (the last: the tile's (m + z) * sum(x) correction cancels most of its sums' bits). Where the
    tiles cannot run (act-order, group 32, fp32 x, rows not 4-byte aligned, N not a multiple of
    4, qweight not 16-byte aligned) the config runs the word loops, still equal to the reference. (On the GPU a 72-column
    weight once ran the mmas in the wrong layout: tests/sm90_compile.py now checks it.)"""
    from mixprec.kernels.intq import mma_fits
    N = 72
    gs = K if G == -1 else G
    qw, sc, z, perm = make_intq(N, K, gs, 4, asym, False, seed=gs + 5)
    cfgs = (configs.cfg("gemv", 1, 32, 128, 1, 4, 1, mma=True), configs.cfg("gemv", 8, 64, 128, 2, 2, 1, mma=True))
    for dtype in (torch.bfloat16, torch.float16) if CUDA else (torch.float16,):
        x = xin(11, K, torch.float32, seed=21)
        x[1] *= 2000.0 if dtype == torch.bfloat16 else 20.0
        x[2] *= 1e-3
        x[4] = x[4].abs() + 3.0
        x = x.to(dtype)
        ref = intq_linear_reference(x, qw, sc, z, None, 4, G)
        assert mma_fits(4, gs, None, x, qw, 32) and mma_fits(4, gs, None, x, qw, 64)
        for c in cfgs:
            for m in (1, 3, 8, 11):
                y = intq_linear_cfg(x[:m], qw, sc, z, None, 4, G, c)
                for row in range(m):
                    assert sqnr(y[row], ref[row]) >= 40, (c, dtype, m, row)
    # the fallbacks: act-order, group 32, fp32 x, an odd row stride, N not a multiple of 4
    qw32, sc32, z32, _ = make_intq(N, K, 32, 4, asym, False, seed=gs + 6)
    qw70, sc70, z70, _ = make_intq(70, K, gs, 4, asym, False, seed=gs + 7)
    x = xin(3, K, torch.float16, seed=22)
    wide = xin(3, K + 1, torch.float16, seed=23)
    qw_off = torch.empty(qw.numel() + 1, dtype=qw.dtype, device=qw.device)[1:].view(qw.shape)   # 4-byte aligned only
    qw_off.copy_(qw)
    for xx, w, g in ((x, (qw, sc, z, perm_of(K)), G), (x, (qw32, sc32, z32, None), 32),
                     (x.float(), (qw, sc, z, None), G), (wide[:, :K], (qw, sc, z, None), G),
                     (x, (qw70, sc70, z70, None), G), (x, (qw_off, sc, z, None), G)):
        assert not mma_fits(4, K if g == -1 else g, w[3], xx, w[0], 32)
        for c in cfgs:    # (BM 8: word-loop programs of 4 rows)
            y = intq_linear_cfg(xx, *w, 4, g, c)
            assert sqnr(y, intq_linear_reference(xx, *w, 4, g)) >= 40


def perm_of(K):
    return torch.randperm(K, generator=gen(K)).to(torch.int32).to(DEV)


# M >= 32: act_quant codes. (N 136 at M = 1: against BN 128 / 64 / 32 a partial last tile, whole
# 8-row tiles and a partial second 128-row scale block, as 200 had, in fewer programs.)
FP8_CASES = [(1, 136, 384), (3, 96, 256), (17, 64, 200), (33, 64, 200)]
# GEMV_WHOLE_K on 32-row tiles for fp8: the same one K tile wider than K and the same fold bits
# per block (128 % 32 == 0; block rows 1 fold with neither; block rows N with both), a quarter
# of the programs of 8-row tiles
FP8_WHOLE_K = configs.cfg("gemv", 1, 32, 1024, 1, 4, 1)


@cpu_only
@pytest.mark.parametrize("case", FP8_CASES)
@pytest.mark.parametrize("act", ["w8a8", "w8a16"])
def test_fp8_interpreter(case, act):
    M, N, K = case
    x = xin(M, K, torch.float16, seed=M)
    for block in [(128, 128), (1, K), (N, K)]:
        w, s = make_fp8(N, K, block, seed=N + block[0])
        ref = fp8_linear_reference(x, w, s, block, act)
        gemv = [GEMV_SPLIT if block[0] == 128 else GEMV, GEMV_WIDE, FP8_WHOLE_K] if M <= 3 else []
        for c in gemv + [GEMM if block[0] == 128 else GEMM_SPLIT]:
            y = fp8_linear_cfg(x, w, s, block, act, c)
            assert y.dtype == x.dtype and sqnr(y, ref) >= 40, (block, c)
        # the GEMM multiplies exactly the reference's operands (w8a8: act_quant's codes and scales,
        # the spec's e4m3 rounding): only the summation order and the fp16 output differ (~73 dB;
        # the other act spec is ~31 dB away)
        assert sqnr(y, ref) >= 60, block


class _LaunchSpy:
    """Stands in for a Triton kernel object: records each launch's keyword flag `key`."""

    def __init__(self, kernel, key):
        self.kernel, self.key, self.seen = kernel, key, []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.seen.append(kw[self.key])
            return self.kernel[grid](*args, **kw)
        return launch


@triton.jit
def _decode_e4m3(c_ptr, o_ptr):
    i = tl.arange(0, 256)
    tl.store(o_ptr + i, _e4m3_f32(tl.load(c_ptr + i)))


@cpu_only
def test_e4m3_decode_of_the_fp16_word_loop():
    """quant._e4m3_f32, the interpreter's stand-in for cvt.rn.f16x2.e4m3x2 in fp8_words_dot16,
    decodes every non-NaN e4m3 code exactly as torch does."""
    codes = torch.arange(256, dtype=torch.int32)
    out = torch.empty(256)
    _decode_e4m3[(1,)](codes, out)
    ref = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    ok = ~ref.isnan()
    assert ok.sum() == 254 and torch.equal(out[ok], ref[ok])
    assert torch.equal(out[ok].signbit(), ref[ok].signbit())     # -0.0 stays negative


@pytest.mark.parametrize("act", ["w8a8", "w8a16"])
@pytest.mark.parametrize("K", [384, 386])
def test_fp8_gemv_fp16_words_every_code(K, act, monkeypatch):
    """GEMV tiles with folded scales and 16-bit x multiply the codes in packed fp16
    (fp8._gemv_f16_words, quant.fp8_words_dot16; w8a8: with the activation codes, w8a16: with x
    over a power of two): every non-NaN weight code in every row, activations spanning
    2^-12..2^12 inside each 128-input slice, a K tile past K; K % 4 != 0 takes the fp32 loop. Equal
    to the reference (interpreter: exact products, the summation order and the 16-bit output
    differ; GPU: products summed in fp16, 8 per half)."""
    import mixprec.kernels.fp8 as fp8
    spy = _LaunchSpy(fp8._fp8_gemv_kernel, "F16")
    seen = spy.seen
    monkeypatch.setattr(fp8, "_fp8_gemv_kernel", spy)
    g = gen(K)
    N = 24
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[~codes.view(torch.float8_e4m3fn).float().isnan()]                 # 254 codes
    rows = [torch.cat([codes, codes[torch.randint(0, 254, (K - 254,), generator=g)]])[torch.randperm(K, generator=g)]
            for _ in range(N)]
    w = torch.stack(rows).view(torch.float8_e4m3fn).to(DEV)
    x = (torch.randn(2, K, generator=g) * 2.0 ** torch.randint(-12, 13, (2, K), generator=g).float())
    dtypes = (torch.bfloat16, torch.float16) if CUDA else (torch.float16,)
    for dtype in dtypes:
        xd = x.to(dtype).to(DEV)
        for block, c in (((128, 128), GEMV_WIDE), ((128, 128), GEMV_WHOLE_K), ((N, K), GEMV_SPLIT)):
            if block[1] != K and K % 128 and act == "w8a8":
                continue        # w8a8 block scales need K slices of 128
            s = (torch.rand(-(-N // block[0]), -(-K // block[1]), generator=g) * 0.01 + 1e-3).to(DEV)
            seen.clear()
            y = fp8_linear_cfg(xd[:1], w, s, block, act, c)
            assert seen == [K % 4 == 0], (block, c, seen)
            assert sqnr(y, fp8_linear_reference(xd[:1], w, s, block, act)) >= 50, (dtype, block, c)


@pytest.mark.parametrize("act", ["w8a8", "w8a16"])
def test_fp8_gemv_word_loop_rows(act):
    """The fp16 word loop at M = 1 and 3 (one program per activation row, as the TUNED M = 2-8 rows
    run it), a K tile past K, split-K: equal to the reference; a GEMV config of BM != 1 is refused
    (programs of several rows lost at M = 2-8 and are gone). (N 24: against BN 8 / 16 whole / a
    partial last tile and a partial last 16-row scale block, as 40 had, in fewer programs; K 640
    is the least multiple of 128 past one 512 tile, so BK 512 still splits in two.)"""
    g = gen(7)
    N, K = 24, 640
    w = (torch.randn(N, K, generator=g) * 40).to(torch.float8_e4m3fn).to(DEV)
    s = (torch.rand(-(-N // 16), K // 128, generator=g) * 0.01 + 1e-3).to(DEV)
    dtype = torch.bfloat16 if CUDA else torch.float16
    x = (torch.randn(5, K, generator=g) * 2.0 ** torch.randint(-6, 7, (5, K), generator=g).float()).to(dtype).to(DEV)
    for c in (configs.cfg("gemv", 1, 8, 256, 1, 2, 1), configs.cfg("gemv", 1, 16, 512, 2, 4, 1)):
        for M in (1, 3):     # (M = 2 and 5 left out: the same one program per row as at 3)
            y = fp8_linear_cfg(x[:M], w, s, (16, 128), act, c)
            assert sqnr(y, fp8_linear_reference(x[:M], w, s, (16, 128), act)) >= 45, (c, M)
    with pytest.raises(FormatError, match="BM=2"):
        fp8_linear_cfg(x[:2], w, s, (16, 128), act, configs.cfg("gemv", 2, 8, 256, 1, 2, 1))


@cpu_only
@pytest.mark.parametrize("case", FP8_CASES)
@pytest.mark.parametrize("act", ["w8a8", "w8a16"])
def test_int8_interpreter(case, act):
    M, N, K = case
    for asym in (False, True):
        w, s, z = make_int8(N, K, asym, seed=M + N)
        x = xin(M, K, torch.float32 if asym else torch.float16, seed=K)
        ref = int8_linear_reference(x, w, s, z, act)
        gemv = [GEMV_SPLIT if asym else GEMV, GEMV_WHOLE_K] if M <= 3 else []
        for c in gemv + [GEMM if asym else GEMM_SPLIT]:
            y = int8_linear_cfg(x, w, s, z, act, c)
            assert y.dtype == x.dtype and sqnr(y, ref) >= 40, (asym, c)


@pytest.mark.parametrize("asym", [False, True])
def test_int8_w8a8_gemv_dp4a_words_equal_the_int32_loop(asym, monkeypatch):
    """A GEMV config's "words" runs int8 W8A8 as dp4a over int32 words (int8._gemv_dp4a_words):
    the same exact integer sums as the int32 loop, so the outputs are equal bit for bit (K split
    or not, a K tile past K, with zero points, 1 or 3 rows: one program each); K % 4 != 0 keeps the
    int32 loop; a GEMV config of BM != 1 is refused."""
    import mixprec.kernels.int8 as int8
    spy = _LaunchSpy(int8._int8_gemv_kernel, "WORDS")
    monkeypatch.setattr(int8, "_int8_gemv_kernel", spy)
    for N, K in ((40, 384), (24, 386)):
        w, s, z = make_int8(N, K, asym, seed=N + K)
        for M in (1, 3):
            x = xin(M, K, torch.float16, seed=K) * 3.0
            for c in (GEMV, GEMV_SPLIT, GEMV_WHOLE_K):
                spy.seen.clear()
                y = int8_linear_cfg(x, w, s, z, "w8a8", dict(c, words=True))
                assert torch.equal(y, int8_linear_cfg(x, w, s, z, "w8a8", c)), (N, K, M, c)
                assert spy.seen == [K % 4 == 0, False], (N, K, M, c, spy.seen)
                assert sqnr(y, int8_linear_reference(x, w, s, z, "w8a8")) >= 40
    with pytest.raises(FormatError, match="BM=4"):
        int8_linear_cfg(x, w, s, z, "w8a8", dict(GEMV, BM=4, words=True))


@cpu_only
def test_public_entry_points_and_split_counters_reset():
    """Default configs, leading batch dims, and a split-K call repeated (counters reset)."""
    qw, sc, z, perm = make_intq(64, 256, 64, 4, True, False, seed=11)
    x = xin(2, 256, torch.float16, 12)
    ref = intq_linear_reference(x, qw, sc, z, perm, 4, 64)
    for _ in range(2):
        y = intq_linear_cfg(x, qw, sc, z, perm, 4, 64, GEMM_SPLIT)
        assert sqnr(y, ref) >= 40
    y3 = intq_linear(x.view(1, 2, 256), qw, sc, z, perm, 4, 64)
    assert y3.shape == (1, 2, 64) and sqnr(y3.view(2, 64), ref) >= 40
    w, s = make_fp8(64, 256, (128, 128), 13)
    assert sqnr(fp8_linear(x[:1], w, s, (128, 128), "w8a8"), fp8_linear_reference(x[:1], w, s, (128, 128), "w8a8")) >= 40
    wi, si, zi = make_int8(64, 256, False, 14)
    assert sqnr(int8_linear(x[:1], wi, si, zi, "w8a8"), int8_linear_reference(x[:1], wi, si, zi, "w8a8")) >= 40


def test_bad_input_raises_typed_errors():
    qw, sc, z, perm = make_intq(64, 256, 64, 4, True, False, seed=15)
    x = xin(1, 256, torch.float16, 16)
    with pytest.raises(FormatError, match="bits"):
        intq_linear(x, qw, sc, z, perm, 3, 64)
    with pytest.raises(ShapeMismatch, match="scales"):
        intq_linear(x, qw, sc[:2], z, perm, 4, 64)
    with pytest.raises(ShapeMismatch, match="K=256"):
        intq_linear(xin(1, 128, torch.float16, 1), qw, sc, z, perm, 4, 64)
    with pytest.raises(FormatError, match="zeros"):
        intq_linear(x, qw, sc, z.to(torch.int32), perm, 4, 64)
    with pytest.raises(FormatError, match="group_size"):
        intq_linear(x, qw, sc, z, perm, 4, 12)
    wide = torch.cat([qw, qw], dim=1)           # a column slice of it has row stride 2N
    with pytest.raises(FormatError, match="qweight: the gemv kernel needs rows of stride N=64"):
        intq_linear_cfg(x, wide[:, :64], sc, z, perm, 4, 64, GEMV)
    w, s = make_fp8(64, 256, (128, 128), 17)
    with pytest.raises(FormatError, match="act"):
        fp8_linear(x, w, s, (128, 128), "w4a8")
    with pytest.raises(ShapeMismatch, match="scale"):
        fp8_linear(x, w, s[:, :1], (128, 128), "w8a8")
    with pytest.raises(FormatError, match="multiple of 128"):
        fp8_linear(x, w, torch.ones(1, 4, device=DEV), (64, 64), "w8a8")
    wi, si, zi = make_int8(64, 256, False, 18)
    with pytest.raises(FormatError, match="dtype"):
        int8_linear(x, wi.to(torch.uint8), si, zi, "w8a8")
    with pytest.raises(FormatError, match="activation dtype"):
        int8_linear(x.to(torch.int32), wi, si, zi, "w8a16")


# ------------------------------------------------------------------------------------------
# GPU: real sizes, bf16 and fp16, default configs

GPU_M = [1, 5, 16, 17, 200]   # 5, 16: BM-16 gemm tiles (int4 per-field dots)
BF, HF = torch.bfloat16, torch.float16


@gpu
@pytest.mark.parametrize("dtype,bits,G,asym,act", [(BF, 4, 128, True, False), (HF, 4, 128, False, True),
                                                   (BF, 4, 32, True, True), (HF, 8, 128, True, False),
                                                   (BF, 4, -1, False, False)])
def test_intq_gpu(dtype, bits, G, asym, act):
    N, K = 2200, 2048
    qw, sc, z, perm = make_intq(N, K, K if G == -1 else G, bits, asym, act, seed=bits + (G % 7),
                                sdtype=BF if dtype == BF else HF)
    for M in GPU_M + [64, 96, 129]:    # 17-127: swap tiles for int4 in one group per K tile (intq_config;
        # 96: BM 128, the paired fields of quant._field_dots_t)
        x = xin(M, K, dtype, seed=M)
        y = intq_linear(x, qw, sc, z, perm, bits, G)
        assert y.dtype == dtype and sqnr(y, intq_linear_reference(x, qw, sc, z, perm, bits, G)) >= 40, M


@gpu
@pytest.mark.parametrize("dtype,act", [(BF, "w8a8"), (HF, "w8a16")])
def test_fp8_gpu(dtype, act):
    N, K = 2200, 2048
    for block in [(128, 128), (1, K), (N, K)]:
        w, s = make_fp8(N, K, block, seed=block[0])
        for M in GPU_M:
            x = xin(M, K, dtype, seed=M)
            assert sqnr(fp8_linear(x, w, s, block, act), fp8_linear_reference(x, w, s, block, act)) >= 40, (block, M)


@gpu
@pytest.mark.parametrize("dtype,act", [(BF, "w8a8"), (HF, "w8a16")])
def test_int8_gpu(dtype, act):
    N, K = 2200, 2048
    for asym in (False, True):
        w, s, z = make_int8(N, K, asym, seed=3)
        for M in GPU_M:
            x = xin(M, K, dtype, seed=M)
            assert sqnr(int8_linear(x, w, s, z, act), int8_linear_reference(x, w, s, z, act)) >= 40, (asym, M)


@gpu
@pytest.mark.parametrize("m", [1, 3, 20, 100, 300])
def test_gpu_default_configs_untuned_shapes(m):
    """Shapes with no tuned entry take configs.default for every M bucket: they must launch
    (fit the shared memory) and match the reference (the demo model's shapes are such)."""
    N, K = 320, 384
    w8, s8 = make_fp8(N, K, (128, 128), 32)
    wi, si, _ = make_int8(N, K, False, 33)
    x = xin(m, K, torch.bfloat16, 34)
    for act in ("w8a8", "w8a16"):
        assert sqnr(fp8_linear(x, w8, s8, (128, 128), act), fp8_linear_reference(x, w8, s8, (128, 128), act)) >= 40
        assert sqnr(int8_linear(x, wi, si, None, act), int8_linear_reference(x, wi, si, None, act)) >= 40
    for G, asym in ((128, True), (32, True), (32, False)):     # group 32: rows scaled before the field dots
        qw, sc, z, _ = make_intq(N, K, G, 4, asym, False, seed=31)
        assert sqnr(intq_linear(x, qw, sc, z, None, 4, G), intq_linear_reference(x, qw, sc, z, None, 4, G)) >= 40


@gpu
def test_gpu_tuned_configs_all_paths(monkeypatch):
    """Every gemv/gemm path with split-K on a real shape (int4 also the tensor-core GEMV, the swap
    tiles and the dequantize + cuBLAS path, over several column chunks), then CUDA-graph capture + replay,
    deterministic (bitwise equal) results across calls."""
    from mixprec.kernels import intq
    monkeypatch.setattr(intq, "DEQUANT_CHUNK", 1 << 22)         # 1024 columns per chunk: 4 chunks
    N, K = 4096, 4096
    qw, sc, z, _ = make_intq(N, K, 128, 4, True, False, seed=21)
    w8, s8 = make_fp8(N, K, (128, 128), 22)
    wi, si, _ = make_int8(N, K, False, 23)
    ops = [lambda x, c: intq_linear_cfg(x, qw, sc, z, None, 4, 128, c),
           lambda x, c: fp8_linear_cfg(x, w8, s8, (128, 128), "w8a8", c),
           lambda x, c: int8_linear_cfg(x, wi, si, None, "w8a8", c)]
    refs = [lambda x: intq_linear_reference(x, qw, sc, z, None, 4, 128),
            lambda x: fp8_linear_reference(x, w8, s8, (128, 128), "w8a8"),
            lambda x: int8_linear_reference(x, wi, si, None, "w8a8")]
    x1 = xin(1, K, torch.bfloat16, 24)
    x16 = xin(16, K, torch.bfloat16, 25)
    cases = [(op, ref, x, c) for op, ref in zip(ops, refs)
             for x, c in [(x1, configs.cfg("gemv", 1, 16, 512, 8, 8, 1)), (x1, configs.cfg("gemv", 1, 32, 128, 8, 4, 1)),
                          (x16, configs.cfg("gemm", 16, 64, 128, 8, 4, 3))]]
    cases += [(ops[0], refs[0], x, configs.cfg("gemv", 8, 32, 128, 4, 4, 1, mma=True)) for x in (x1, x16[:5])]
    cases += [(ops[0], refs[0], xin(40, K, torch.bfloat16, 26), configs.cfg("swap", 64, 64, 128, 2, 4, 3)),
              (ops[0], refs[0], xin(200, K, torch.bfloat16, 27), configs.cfg("dequant", 200, 128, 128, 1, 4, 1))]
    for op, ref, x, c in cases:
        y = op(x, c)
        assert sqnr(y, ref(x)) >= 40, c
        # split-K reductions are deterministic; cuBLAS (the dequant path) is only checked for accuracy
        same = torch.equal if c["path"] != "dequant" else (lambda a, b: sqnr(a, ref(x)) >= 40)
        assert same(op(x, c), y), c
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            op(x, c)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            yg = op(x, c)
        for _ in range(3):
            g.replay()
        torch.cuda.synchronize()
        assert same(yg, y), c


@pytest.mark.skipif(not CUDA, reason="a 4.3 GB output: GPU only (the interpreter takes minutes)")
def test_gemm_output_beyond_2_31_elements():
    """M * N > 2**31 (a 151936-wide lm_head from 14k rows): the output offsets are 64-bit; rows
    past the wrap were written ~4 GiB before the output (a segfault in the interpreter)."""
    N, K, M = 131072, 16, 16384 + 64
    g = torch.Generator(device=DEV).manual_seed(0)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g, device=DEV)
    s = torch.rand(N, 1, generator=g, device=DEV) * 1e-3 + 1e-4
    x = torch.randn(M, K, generator=g, device=DEV).to(torch.bfloat16)
    y = int8_linear_cfg(x, w, s, None, "w8a16", configs.cfg("gemm", 64, 128, 16, 1, 4, 1))
    for rows in (slice(0, 64), slice(M - 64, M)):
        assert sqnr(y[rows], int8_linear_reference(x[rows], w, s, None, "w8a16")) > 40


def test_intq_config_paths():
    """int4: M >= DEQUANT_MIN_M dequantize + cuBLAS (weights over one chunk from twice that);
    17..DEQUANT_MIN_M-1 rows the swap tiles on
    weights of >= SWAP_MIN_NK elements with one group per K tile, else BM-16 per-field tiles (also
    for groups smaller than the tile); M <= 16 keeps the tuned rows (per-field already); fp32
    activations never take the swap or per-field tiles; 8-bit keeps configs.get below DEQUANT_MIN_M."""
    from mixprec.kernels.intq import DEQUANT_MIN_M, SWAP_MIN_NK, SWAP_WIDE_MIN_N, intq_config
    bf = torch.bfloat16
    assert 5120 * 2048 >= SWAP_MIN_NK > 2048 * 768
    for M in (17, 64, DEQUANT_MIN_M - 1):
        c = intq_config(4, M, 5120, 2048, 128, bf)
        assert c["path"] == "swap" and c["BM"] == min(128, triton.next_power_of_2(M)) and c["BK"] == 128, (M, c)
        assert intq_config(4, M, 5120, 2048, 2048, bf)["path"] == "swap"       # group = K
        for N, K, G in ((2048, 768, 128), (5120, 2048, 32)):
            c = intq_config(4, M, N, K, G, bf)
            assert c["path"] == "gemm" and c["BM"] == 16 and c["BK"] == 128, (M, N, K, G, c)
    # a row on the tensor-core GEMV ("mma") where the tiles take the call, else the row it replaced
    row = configs.get("intq4", 4, 5120, 2048)
    assert row["mma"] and intq_config(4, 4, 5120, 2048, 128, bf) == row
    for G, act, dt in ((32, False, bf), (128, True, bf), (128, False, torch.float32)):
        assert intq_config(4, 4, 5120, 2048, G, dt, act_order=act) == row["alt"], (G, act, dt)
    for G in (32, 128):
        assert intq_config(4, 1, 5120, 2048, G, bf)["path"] == "gemv"
        for M in (DEQUANT_MIN_M, 2048):
            assert intq_config(4, M, 5120, 2048, G, bf)["path"] == "dequant"
    for N, bn, warps in ((5120, 64, 4), (SWAP_WIDE_MIN_N, 128, 8)):    # wide outputs: wider tiles
        c = intq_config(4, 64, N, 2048, 128, bf)
        assert (c["path"], c["BN"], c["warps"]) == ("swap", bn, warps), (N, c)
    # a weight bigger than one dequantization chunk (the 151936 x 2048 head) from twice the rows
    assert intq_config(4, DEQUANT_MIN_M, 151936, 2048, 128, bf)["path"] == "swap"
    assert intq_config(4, 2 * DEQUANT_MIN_M, 151936, 2048, 128, bf)["path"] == "dequant"
    assert intq_config(4, 64, 5120, 2048, 32, torch.float32) == configs.default("intq4", 64, 5120, 2048)
    assert intq_config(4, 64, 5120, 2048, 128, torch.float32) == configs.get("intq4", 64, 5120, 2048)
    assert intq_config(8, 64, 5120, 2048, 128, bf) == configs.get("intq8", 64, 5120, 2048)
    for N in (5120, 151936):      # 8-bit: no swap tiles, so every weight from DEQUANT_MIN_M rows
        assert intq_config(8, DEQUANT_MIN_M, N, 2048, 128, bf)["path"] == "dequant"


@cpu_only
def test_intq_dequant_path_column_chunks(monkeypatch):
    """The dequant path writes each column chunk of the output in place (a partial last chunk,
    act-order x permuted once): equal to the reference."""
    from mixprec.kernels import intq
    monkeypatch.setattr(intq, "DEQUANT_CHUNK", 128 * 384)       # 128 columns per chunk: 128 + 72
    qw, sc, z, perm = make_intq(200, 384, 128, 4, True, True, seed=5)
    x = xin(6, 384, torch.float16, seed=6)
    y = intq_linear_cfg(x, qw, sc, z, perm, 4, 128, DEQUANT)
    assert sqnr(y, intq_linear_reference(x, qw, sc, z, perm, 4, 128)) >= 40



def test_host_int_helpers_match_triton():
    """kernels/ints.py (the launch code's cdiv / next_power_of_2, without triton's constexpr call
    wrapper) gives triton's values, large and non-positive inputs included."""
    from mixprec.kernels.ints import cdiv, next_power_of_2
    for n in [*range(-3, 4200), *(1 << k for k in range(48)), *((1 << k) + 1 for k in range(48))]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
    for x in [*range(-40, 4200, 7), 1 << 40, (1 << 40) + 3]:
        for y in (1, 2, 3, 7, 16, 128, 1000):
            assert cdiv(x, y) == triton.cdiv(x, y), (x, y)
