"""Does the int4 GEMV's memory pattern cost bandwidth at M = 1? (session 31: little; a measured
dead end, benchmarks/moe_diag/session31_int4_gemv_layout*_h100.log)
Same tile loop (mixprec gemv_intq_cols, f16 words), 8 of 128 experts per launch, two weight
layouts: canonical [E, K/8, N] (a BN-column tile reads BN*4-byte segments at row stride N*4) and
tile-contiguous [E, N/BN, K/8, BN] (each program streams one contiguous block). Floor: a pure read
of the same bytes. CUDA graph of 16 launches cycling disjoint expert sets (800 MB > L2). Also a
loop with two tiles in flight (gemv_deep) and wider K tiles. GPU only:

    python scripts/diag_int4_gemv_layout.py"""
import sys, os
import torch, triton, triton.language as tl
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mixprec.kernels.gemv_tiles import gemv_intq_cols, _word_rows, _x_row_pairs, intq_sz
from mixprec.kernels import timing
from mixprec.kernels.quant import int4_word_dot, zero_pairs16


@triton.jit
def gemv_deep(xrow, qp, sp, zp, cols, nw, K, k_lo, k_hi, GS: tl.constexpr, BK: tl.constexpr):
    # gemv_intq_cols's f16 loop (asym int4) with two tiles in flight instead of one
    PF: tl.constexpr = 8
    R: tl.constexpr = BK // PF
    BN: tl.constexpr = cols.shape[0]
    nm = cols < 1 << 30
    r = tl.arange(0, R)
    KP = k_hi // PF
    qcol = qp + cols[None, :]
    q_n1 = _word_rows(qcol, k_lo // PF + r, nw, KP, nm)
    q_n2 = _word_rows(qcol, k_lo // PF + R + r, nw, KP, nm)
    acc = tl.zeros([R, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        q = q_n1
        q_n1 = q_n2
        q_n2 = _word_rows(qcol, k0 // PF + 2 * R + r, nw, KP, nm)
        xp0, xp1, xp2, xp3, f_out = _x_row_pairs(xrow, sp, k0 + r * PF, K, False, False)
        s, z = intq_sz(sp, zp, k0, K, cols, nm, nw, r, True, 4, GS, PF, BK)
        zc1, zc16 = zero_pairs16(z)
        part = int4_word_dot(q, tl.broadcast_to(xp0[:, None], q.shape), tl.broadcast_to(xp1[:, None], q.shape),
                             tl.broadcast_to(xp2[:, None], q.shape), tl.broadcast_to(xp3[:, None], q.shape),
                             tl.broadcast_to(zc1, q.shape), tl.broadcast_to(zc16, q.shape))
        acc += part * (s * f_out[:, None])
    return tl.sum(acc, axis=0)


@triton.jit
def _k(x_ptr, q_ptr, s_ptr, z_ptr, ids_ptr, y_ptr, N, K, TILED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
       F16: tl.constexpr, SPLITK: tl.constexpr, DEEP: tl.constexpr = False):
    p = tl.program_id(0)
    t = tl.program_id(1)
    zk = tl.program_id(2)
    e = tl.load(ids_ptr + p).to(tl.int64)
    G = K // 128
    qe = q_ptr + e * (K // 8) * N
    se = s_ptr + e * G * N
    ze = z_ptr + e * G * N
    if TILED:
        qp = qe + t * (K // 8) * BN
        sp = se + t * G * BN
        zp = ze + t * G * BN
        cols = tl.arange(0, BN)
        nw = BN
    else:
        qp, sp, zp = qe, se, ze
        cols = t * BN + tl.arange(0, BN)
        nw = N
    kper = K // SPLITK
    if DEEP:
        y = gemv_deep(x_ptr, qp, sp, zp, cols, nw, K, zk * kper, zk * kper + kper, 128, BK)
    else:
        y = gemv_intq_cols(x_ptr, qp, sp, zp, sp, cols, cols < 1 << 30, nw, K, 15, zk * kper, zk * kper + kper,
                           4, 128, True, False, BK, True, False, F16)
    rn = t * BN + tl.arange(0, BN)
    if SPLITK == 1:
        tl.store(y_ptr + p * N + rn, y)
    else:
        tl.atomic_add(y_ptr + p * N + rn, y, sem="relaxed")


@triton.jit
def _read(q_ptr, ids_ptr, y_ptr, WORDS, BLK: tl.constexpr):
    p = tl.program_id(0)
    c = tl.program_id(1)
    e = tl.load(ids_ptr + p).to(tl.int64)
    base = q_ptr + e * WORDS + c * BLK
    acc = tl.zeros([1024], tl.int32)
    for i in range(0, BLK, 1024):
        acc ^= tl.load(base + i + tl.arange(0, 1024), eviction_policy="evict_first")
    tl.store(y_ptr + p * 1024 * tl.num_programs(1) + c * 1024 + tl.arange(0, 1024), acc)


def graph_time(fn, sets):
    """µs per launch of fn over the expert sets, one CUDA graph (mixprec's timing.graph_us)."""
    return timing.graph_us([lambda ids=ids: fn(ids) for ids in sets])


def main():
    torch.manual_seed(0)
    bw = timing.copy_bandwidth_gbps() * 1e9    # bytes/s, read + write
    print(f"{torch.cuda.get_device_name()}  copy {bw / 1e12:.2f} TB/s")
    E, TOP = 128, 8
    shapes = [("235b gate_up", 4096, 3072), ("235b down", 1536, 4096), ("30b gate_up", 2048, 1536), ("30b down", 768, 2048)]
    variants = [(v[0], v[1], v[2], 1, v[3]) for v in
                ((16, 512, 4, 0), (16, 1024, 4, 0), (16, 1024, 8, 0), (8, 1024, 2, 0), (8, 512, 2, 0), (32, 256, 4, 0),
                 (32, 512, 4, 0), (16, 512, 4, 1), (16, 256, 4, 1), (32, 256, 4, 1), (8, 512, 2, 1), (32, 128, 4, 1))]
    sets = [torch.arange(i * TOP, (i + 1) * TOP, device="cuda", dtype=torch.int32) for i in range(E // TOP)]
    for name, K, N in shapes:
        G = K // 128
        q = torch.randint(-2**31, 2**31 - 1, (E, K // 8, N), dtype=torch.int32, device="cuda")
        s = (torch.rand(E, G, N, device="cuda") * 0.01 + 0.001).to(torch.bfloat16)
        z = torch.randint(0, 16, (E, G, N), dtype=torch.uint8, device="cuda")
        x = torch.randn(K, device="cuda").to(torch.bfloat16)
        byts = TOP * (q[0].numel() * 4 + s[0].numel() * 2 + z[0].numel())
        words = q[0].numel()
        yr = torch.empty(TOP * 1024 * 64, dtype=torch.int32, device="cuda")
        blk = words // 64
        t_read = graph_time(lambda ids: _read[(TOP, 64)](q, ids, yr, words, BLK=blk, num_warps=8), sets)
        print(f"{name}: K={K} N={N} {byts / 1e6:.1f} MB/launch; pure read of the codes {t_read:.2f} us "
              f"({TOP * words * 4 / (t_read * 1e-6) / bw * 100:.0f}% copy)")
        ref = None
        tiled = {}
        for BN, BK, W, SK, DEEP in variants:
            if N % BN or (K // SK) % BK:
                continue
            if BN not in tiled:
                tiled[BN] = (q.view(E, K // 8, N // BN, BN).permute(0, 2, 1, 3).contiguous(),
                             s.view(E, G, N // BN, BN).permute(0, 2, 1, 3).contiguous(),
                             z.view(E, G, N // BN, BN).permute(0, 2, 1, 3).contiguous())
            for lay in (0, 1):
                qq, ss, zz = (q, s, z) if lay == 0 else tiled[BN]
                y = torch.zeros(TOP, N, dtype=torch.float32, device="cuda")
                def fn(ids, qq=qq, ss=ss, zz=zz, y=y):
                    if SK > 1:
                        y.zero_()
                    _k[(TOP, N // BN, SK)](x, qq, ss, zz, ids, y, N, K, TILED=lay == 1, BN=BN, BK=BK, F16=True,
                                           SPLITK=SK, DEEP=DEEP == 1, num_warps=W, num_stages=1)
                fn(sets[0]); torch.cuda.synchronize()
                if ref is None:
                    ref = y.clone()
                err = (y - ref).abs().max().item() / ref.abs().max().item()
                t = graph_time(fn, sets)
                print(f"  BN={BN:3d} BK={BK:4d} warps={W} deep={DEEP} {'tiled' if lay else 'canon'}: {t:7.2f} us "
                      f"{byts / (t * 1e-6) / bw * 100:5.1f}% copy  (rel err vs first {err:.1e})")


if __name__ == "__main__":
    main()
