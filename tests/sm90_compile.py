"""Compile, for sm_90 and without a GPU, every Triton kernel launch the host code makes on a set of
realistic calls (Qwen3-30B-A3B shapes, every MoE layout mix and path, every dense format).

Triton's CPU interpreter runs kernel logic but accepts code that the real compiler rejects (e.g.
two `return`s of different shapes under a constexpr `if`); CI has no GPU. Here `JITFunction.run`
is replaced by a compile-only stand-in: each launch is specialised from its real arguments the way
the JIT does it on a GPU (constexprs, and the 16-byte alignment / divisibility of pointers and
integers, without which Triton neither vectorises loads nor pipelines them through shared memory,
so a different kernel would be compiled) and compiled with Triton's own toolchain (ptxas ships with
Triton); nothing runs, so outputs stay uninitialised (the host code only reads shapes). Run by
tests/test_sm90_compile.py in a fresh process (kernels must not be in interpreter mode). Exit 0: all
compiled; 1: a kernel failed (listed); 77: the toolchain cannot compile a trivial kernel here (skip).

`MIXPREC_SM90_REGS=1 python tests/sm90_compile.py` also prints, per compiled kernel, ptxas's
registers and spills: an occupancy check for kernel work without a GPU. `MIXPREC_SM90_PDL_ALL=1`
compiles every specialization a second time with PDL on (else the first of each kernel only).
`MIXPREC_SM90_DUMP=DIR` writes each specialization's TTGIR, PTX and cubin (`cuobjdump -sass` from
Triton's bin folder reads the latter) with its launch key, so a kernel change can be compared
instruction by instruction (shared-memory round trips, PRMT, MMA counts) on the real launches before
any device run. Layouts and instruction counts differ between Triton versions: compile with the
version the GPU machine runs (session 14: 3.9's SASS promised a win that 3.6, the device's, turned
into a 30% loss)."""
import os
import re
import subprocess
import sys
import tempfile
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.float8_e4m3fn: "fp8e4nv",
          torch.bool: "i1"}
compiled: set = set()
unspecialised: set = set()   # compiled without the JIT's argument specialisation (other Triton internals)
failures: list[str] = []


def _signature(fn: JITFunction, args, kwargs):
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    sig, consts = {}, {}
    for p in fn.params:
        v = bound.get(p.name, p.default)
        if p.is_constexpr or v is None:
            sig[p.name] = "constexpr"
            consts[p.name] = v
        elif isinstance(v, torch.Tensor):
            sig[p.name] = "*" + DTYPES[v.dtype]
        elif isinstance(v, bool):
            sig[p.name] = "i1"
        elif isinstance(v, int):
            sig[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(v).__name__}")
    return sig, consts


def _jit_source(fn: JITFunction, args, kwargs, opts):
    """(ASTSource, options) as the JIT builds them for a launch on an sm_90 device (argument
    specialisation included); None where this Triton's internals differ (the caller falls back)."""
    try:
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
        backend = make_backend(TARGET)
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        kw = dict(kwargs, **opts)
        bound, spec, options = binder(*args, **kw)
        options, sig, consts, attrs = fn._pack_args(backend, kw, bound, spec, options)
        return ASTSource(fn, sig, consts, attrs), options.__dict__
    except (ImportError, AttributeError, TypeError, ValueError):
        return None


def _regs_report(name: str, ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{TARGET.arch}a", src, "-o", os.path.join(d, "k.o")],
                           capture_output=True, text=True)
    return name + ": " + " | ".join(ln.split(":", 1)[-1].strip() for ln in r.stderr.splitlines()
                                    if "spill" in ln or "Used" in ln)


def _dump(folder: str, name: str, key, c) -> None:
    """PTX, cubin and launch key of one compiled specialization, named by a hash of the key."""
    import hashlib
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{name}_{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}")
    for ext in ("ttgir", "ptx"):
        with open(f"{stem}.{ext}", "w") as f:
            f.write(c.asm[ext])
    with open(stem + ".cubin", "wb") as f:
        f.write(c.asm["cubin"])
    with open(stem + ".key.txt", "w") as f:
        f.write(repr(key) + "\n")


def _mma_layout_problem(ttgir: str) -> str:
    """gemv_mma's asm (warp-level mma.sync in tl.inline_asm_elementwise) is right only when its
    [32 NW, T] operands have the layout of their loads: row i in lane i % 32 of warp i // 32, T
    consecutive columns per thread (gemv_mma's docstring). Triton picks layouts itself; this reads
    the one it picked. -> "" when right (or no such asm), else what is wrong."""
    layouts = dict(re.findall(r"^(#\w+) = (#ttg\.\w+<.*>)$", ttgir, flags=re.M))
    for line in ttgir.splitlines():
        if "tt.elementwise_inline_asm" not in line or "mma.sync" not in line:
            continue
        m = re.search(r"-> tensor<(\d+)x(\d+)xf32, (#\w+)>", line)
        if m:
            rows, T, name = int(m.group(1)), int(m.group(2)), m.group(3)
            if not _lane_rows_layout(layouts.get(name, ""), rows // 32, T):
                return f"mma asm on layout {layouts.get(name, name)}, needs {_lane_rows_want(rows // 32, T)}"
            continue
        # the x-sum mmas: [L] per lane, row i in lane i % 32 of warp i // 32 (a blocked layout of
        # its own, or the T columns of a [L, T] one sliced away)
        m = re.search(r"-> tensor<(\d+)xf32, (#\w+)>", line)
        if not m:
            return f"mma asm without a [L, T] or [L] fp32 result: {line[-200:]}"
        rows, lay = int(m.group(1)), layouts.get(m.group(2), m.group(2))
        nw = rows // 32
        par = re.search(r"#ttg\.slice<\{dim = 1, parent = (#\w+)\}>", lay)
        if par:
            ok = _lane_rows_layout(layouts.get(par.group(1), ""), nw)
        else:
            ok = f"sizePerThread = [1], threadsPerWarp = [32], warpsPerCTA = [{nw}]" in lay
        if not ok:
            return f"mma asm on [L] layout {lay}, needs row i in lane i % 32 of warp i // 32"
    return ""


def _lane_rows_want(nw: int, T) -> str:
    return f"sizePerThread = [1, {T}], threadsPerWarp = [32, 1], warpsPerCTA = [{nw}, 1]"


def _lane_rows_layout(layout: str, nw: int, T: int | None = None) -> bool:
    """Whether a [32 nw, T] layout puts row i in lane i % 32 of warp i // 32, T consecutive
    columns per thread (T None: any T)."""
    if T is not None:
        return _lane_rows_want(nw, T) in layout
    return re.search(re.escape(_lane_rows_want(nw, "@")).replace("@", r"\d+"), layout) is not None


SM90_SHARED = 232448      # bytes of shared memory one block may use on an H100 / H200 (227 KB)


pdl_compiled: set = set()   # kernels also compiled with PDL=True (once each: the launches here run on CPU tensors)


def compile_only(self, *args, grid, warmup, **kwargs):
    opts = {k: kwargs.pop(k) for k in ("num_warps", "num_stages", "maxnreg") if k in kwargs}
    kwargs.pop("launch_pdl", None)
    _compile(self, args, kwargs, opts)
    # the programmatic-dependent-launch code (griddepcontrol wait / launch_dependents) is only
    # compiled for CUDA tensors: once per kernel, its first launch again with PDL on
    name = self.__name__ + ("/early" if kwargs.get("EARLY") else "")    # the early trigger's variant too
    if "PDL" in self.arg_names and (name not in pdl_compiled or os.environ.get("MIXPREC_SM90_PDL_ALL")):
        pdl_compiled.add(name)
        c = _compile(self, args, dict(kwargs, PDL=True), opts)
        if c is not None and "griddepcontrol.wait" not in c.asm["ptx"]:
            failures.append(f"{self.__name__}: PDL=True compiled without griddepcontrol.wait")
        if c is not None and kwargs.get("EARLY") and "griddepcontrol.launch_dependents" not in c.asm["ptx"]:
            failures.append(f"{self.__name__}: EARLY and PDL=True compiled without griddepcontrol.launch_dependents")
    return None


def _compile(self, args, kwargs, opts):
    """Compile one launch (once per specialization); -> the compiled kernel, None if done before or failed."""
    sig, consts = _signature(self, args, kwargs)
    key = (self.__name__, tuple(sig.items()), tuple((k, repr(v)) for k, v in consts.items()), tuple(opts.items()))
    if key in compiled:
        return None
    compiled.add(key)
    try:
        src = _jit_source(self, args, kwargs, opts)
        if src is None:
            unspecialised.add(self.__name__)
        c = triton.compile(*((src[0],) if src else (ASTSource(self, sig, consts),)), target=TARGET,
                           options=src[1] if src else opts)
        if os.environ.get("MIXPREC_SM90_DUMP"):
            _dump(os.environ["MIXPREC_SM90_DUMP"], self.__name__, key, c)
        if os.environ.get("MIXPREC_SM90_REGS"):
            print(_regs_report(f"{self.__name__} {opts}", c.asm["ptx"]), flush=True)
        bad = _mma_layout_problem(c.asm["ttgir"])
        if bad:
            failures.append(f"{self.__name__} {consts} {opts}: {bad}")
        if c.metadata.shared > SM90_SHARED:   # compiles, but the launch would fail: OutOfResources
            failures.append(f"{self.__name__} {consts} {opts}: {c.metadata.shared} B of shared memory, "
                            f"an H100 block has {SM90_SHARED}")
        return c
    except Exception as e:  # noqa: BLE001 - every failure is reported
        cause = e
        while cause.__cause__ is not None:
            cause = cause.__cause__
        failures.append(f"{self.__name__} {consts} {opts}: {type(e).__name__}: {str(e)[-1500:]}\n"
                        f"  cause: {type(cause).__name__}: {str(cause)[-600:]}")
    return None


@triton.jit
def _canary(x_ptr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(x_ptr + i, tl.load(x_ptr + i) * 2)


def toolchain_ok() -> bool:
    try:
        triton.compile(ASTSource(_canary, {"x_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 32}), target=TARGET)
        return True
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return False


def drive() -> None:
    from mixprec.kernels import moe, pdl
    from mixprec.kernels import moe_testing as mt
    from mixprec.kernels.attention import decode_attention, decode_attention_new, qk_norm_rope_store
    from mixprec.kernels.fp8 import fp8_linear, fp8_linear_cfg
    from mixprec.kernels.int8 import int8_linear, int8_linear_cfg
    from mixprec.kernels.configs import cfg, get
    from mixprec.kernels.intq import intq_linear, intq_linear_cfg
    from mixprec.kernels.norm import rms_norm

    moe._triton_ok = lambda t: True          # the kernel path for CPU tensors (compile only)
    g = torch.Generator().manual_seed(0)
    H, I, E, k = 2048, 768, 8, 8
    for specs in (mt.uniform("int4", E), mt.uniform("fp8", E), mt.uniform("bf16", E), mt.uniform("int8", E),
                  mt.split(["int4", "fp8", "bf16", "int8"], E), [("int4", "int4", "fp8")] * E,
                  mt.split(["int4_perm", "fp8"], E), mt.uniform("int4_perm", E),   # act-order
                  mt.split(["int4", "fp8"], E)):     # moe_configs.GEMV_MIXED's row at 2-8 tokens
        b = mt.build_buckets(specs, H, I, dtype=torch.bfloat16, device="cpu", seed=0)
        # GEMV (2: GEMV_UP; 6: GEMV_MIXED's 5-8 token row), mixed dot, the M <= 128 and prefill dot rows
        for M in (1, 2, 3, 6, 40, 200):
            x = torch.randn(M, H, generator=g).to(torch.bfloat16)
            w, _ = moe.route(torch.randn(M, E, generator=g), k, True)    # compiles the top-k kernel
            ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(M)]).to(torch.int32)
            moe.fused_moe(x, ids, w, b, I)
            if moe.grouped_fits(b, x, I, 1 << 20):   # the kernels around torch._grouped_mm (prefill)
                moe.grouped_moe(x, ids, w, b, I)
    moe.router_route(torch.randn(1, H).to(torch.bfloat16), torch.randn(128, H).to(torch.bfloat16), 8, True)
    # fp8 / int8 W8A8 experts on the packed word loops (a GEMV config's "f16"; off in the tables),
    # with the configs the batch-1 launches of those layers use
    from mixprec.kernels import moe_configs as mc
    x = torch.randn(1, H, generator=g).to(torch.bfloat16)
    w, ids = moe.route(torch.randn(1, E, generator=g), k, True)
    for fmt in ("fp8", "int8"):
        b = mt.build_buckets(mt.uniform(fmt, E), H, I, dtype=torch.bfloat16, device="cpu", seed=0)
        up_path, up, down_path, down = mc.pick(1, [fmt], [fmt], hidden=H)
        moe.fused_moe(x, ids, w, b, I, config=(up_path, dict(up, f16=True), down_path, dict(down, f16=True)))
    # int4 slots on the tensor cores (a config's "mma": the 235B's batch-1 gate/up row; one launch keeps
    # CI short, the asym and 2-8 token rows compile the same asm)
    b = mt.build_buckets(mt.uniform("int4", E), H, I, dtype=torch.bfloat16, device="cpu", seed=0)
    moe.fused_moe(x, ids, w, b, I, config=mc.pick(1, ["intq"], ["intq"], hidden=4096))
    # the dot path's 8-row blocks on the same tiles (a dot row's "mma"), 4 and 2 column tiles per lane
    xs = torch.randn(40, H, generator=g).to(torch.bfloat16)
    w, _ = moe.route(torch.randn(40, E, generator=g), k, True)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(40)]).to(torch.int32)
    for bn, dbn in ((32, 64), (16, 32)):
        up = dict(mc.DOT[0][1], BM=8, BN=bn, num_stages=1, mma=True)
        moe.fused_moe(xs, ids, w, b, I, config=("dot", up, dict(up, BN=dbn)))
    # and beside fp8 / int8 / bf16 slots (their dots on 16 rows; no library row yet), one warp
    up = dict(mc.DOT[0][1], BM=8, BN=32, num_stages=1, mma=True, num_warps=1)
    for specs in (mt.split(["int4", "fp8"], E), [("int4", "fp8", "bf16"), ("int4",) * 3, ("int8",) * 3] * 3):
        bm = mt.build_buckets(specs[:E], H, I, dtype=torch.bfloat16, device="cpu", seed=0)
        moe.fused_moe(xs, ids, w, bm, I, config=("dot", up, dict(up, BN=64)))
    # a mixed layer's int4 buckets apart on the blocks (a dot config's "intq" row; sweep_moe_dot --apart)
    bm = mt.build_buckets(mt.split(["int4", "fp8"], E), H, I, dtype=torch.bfloat16, device="cpu", seed=0)
    dot = mc.DOT[0][1]
    moe.fused_moe(xs, ids, w, bm, I, config=("dot", dict(dot, intq=dict(up, num_warps=2)), "dot",
                                              dict(dot, intq=dict(up, BN=64))))

    for N, K in ((5120, 2048), (2048, 768)):
        for M in (1, 2, 4, 40, 200):   # 4: the tuned BN-128 8-warp row, with group 32 on per-field dots;
            # 40: swap tiles (group 128), 200: the dequant kernel
            x = torch.randn(M, K, generator=g).to(torch.bfloat16)
            w8 = torch.randn(N, K, generator=g).to(torch.float8_e4m3fn)
            s8 = torch.rand(N // 128, K // 128, generator=g)
            for act in ("w8a8", "w8a16"):
                fp8_linear(x, w8, s8, (128, 128), act)
                if M == 1:      # the decode o_proj's GEMV, which triggers its successor early
                    with pdl.early_trigger():
                        fp8_linear(x, w8, s8, (128, 128), act)
                if M in (2, 4):     # the word loops at a few rows (TUNED rows and tuner candidates)
                    fp8_linear_cfg(x, w8, s8, (128, 128), act, cfg("gemv", 1, 8, 1024, 1, 4, 1))
                    int8_linear_cfg(x, torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N, 1), None,
                                    "w8a8", cfg("gemv", 1, 8, 1024, 1, 4, 1, words=True))
                int8_linear(x, torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N, 1), None, act)
            if M == 1:   # the tuned int8 w8a8 M=1 rows run dp4a ("words"); the int32 loop stays for the rest
                int8_linear_cfg(x, torch.randint(-128, 128, (N, K), dtype=torch.int8), torch.rand(N, 1), None, "w8a8",
                                dict(get("int8_w8a8", 1, N, K), words=False))
            for G, zeros, perm in ((128, True, False), (32, False, True)):
                qw = torch.randint(-2 ** 31, 2 ** 31 - 1, (K // 8, N), dtype=torch.int32)
                sc = torch.rand(K // G, N).to(torch.bfloat16)
                z = torch.randint(0, 16, (K // G, N), dtype=torch.uint8) if zeros else None
                p = torch.randperm(K).to(torch.int32) if perm else None
                intq_linear(x, qw, sc, z, p, 4, G)
                if M in (2, 4):     # several rows per GEMV program (the tuner's BM > 1 candidates)
                    intq_linear_cfg(x, qw, sc, z, p, 4, G, cfg("gemv", M, 16, 512, 1, 4, 1))
                if M in (1, 4) and G == 128 and K == 2048:   # the tensor-core GEMV (one row; 8 B columns)
                    intq_linear_cfg(x, qw, sc, z, p, 4, G, cfg("gemv", 1, 64, 128, 2, 4, 1, mma=True))
    # the tensor-core GEMV on a width Triton does not know to be a multiple of 16 (its layout check)
    intq_linear_cfg(torch.randn(1, 384, generator=g).to(torch.float16),
                    torch.randint(-2 ** 31, 2 ** 31 - 1, (48, 72), dtype=torch.int32),
                    torch.rand(3, 72).to(torch.float16), None, None, 4, 128, cfg("gemv", 1, 32, 128, 1, 4, 1, mma=True))
    # the swap tiles of wide outputs (a vocabulary head: intq.SWAP_WIDE_MIN_N), BN 128 / 8 warps
    intq_linear(torch.randn(40, 256, generator=g).to(torch.bfloat16),
                torch.randint(-2 ** 31, 2 ** 31 - 1, (32, 1 << 16), dtype=torch.int32),
                torch.rand(2, 1 << 16).to(torch.bfloat16), None, None, 4, 128)

    B, HQ, HK, D, S = 2, 32, 4, 128, 256
    rms_norm(torch.randn(B, H).to(torch.bfloat16), torch.ones(H).to(torch.bfloat16), 1e-6,
             torch.randn(B, H).to(torch.bfloat16))
    kc = torch.zeros(B, HK, S, D).to(torch.bfloat16)
    q = qk_norm_rope_store(torch.randn(B, 1, HQ * D).to(torch.bfloat16), torch.randn(B, 1, HK * D).to(torch.bfloat16),
                           torch.randn(B, 1, HK * D).to(torch.bfloat16), torch.randn(B, 1, D).to(torch.bfloat16),
                           torch.randn(B, 1, D).to(torch.bfloat16), torch.ones(D).to(torch.bfloat16),
                           torch.ones(D).to(torch.bfloat16), 1e-6, kc, kc.clone(), torch.full((B, 1), 7))
    decode_attention(q.view(B, HQ, D), kc, kc, torch.zeros(B, dtype=torch.long), torch.full((B,), 7))
    qkv = torch.randn(B, (HQ + 2 * HK) * D).to(torch.bfloat16)
    # 32- and 128-slot tiles (block_n), splits of one tile (attention.ONE_TILE) and, at 8192 slots, of two
    for kc in (kc, torch.zeros(B, HK, 2048, D).to(torch.bfloat16), torch.zeros(B, HK, 8192, D).to(torch.bfloat16)):
        # cos / sin rows per token, or a table by position (Rotary.table; not again for the loop path)
        for table in (False, True) if kc.shape[2] < 8192 else (False,):
            decode_attention_new(qkv[:, :HQ * D], qkv[:, HQ * D:(HQ + HK) * D], qkv[:, (HQ + HK) * D:],
                                 torch.randn(S if table else B, D).to(torch.bfloat16),
                                 torch.randn(S if table else B, D).to(torch.bfloat16),
                                 torch.ones(D).to(torch.bfloat16), torch.ones(D).to(torch.bfloat16), 1e-6, kc,
                                 kc.clone(), torch.zeros(B, dtype=torch.long), torch.full((B,), 7), rope_table=table)
    # the 235B's 64 query heads at batch 1 over 2048 slots: decode_warps' wide (8-warp) programs
    q1 = torch.randn(1, (64 + 2 * HK) * D).to(torch.bfloat16)
    k1 = torch.zeros(1, HK, 2048, D).to(torch.bfloat16)
    decode_attention_new(q1[:, :64 * D], q1[:, 64 * D:(64 + HK) * D], q1[:, (64 + HK) * D:],
                         torch.randn(2048, D).to(torch.bfloat16), torch.randn(2048, D).to(torch.bfloat16),
                         torch.ones(D).to(torch.bfloat16), torch.ones(D).to(torch.bfloat16), 1e-6, k1, k1.clone(),
                         torch.zeros(1, dtype=torch.long), torch.full((1,), 7), rope_table=True)
    qk_norm_rope_store(torch.randn(B, 1, HQ * D).to(torch.bfloat16), torch.randn(B, 1, HK * D).to(torch.bfloat16),
                       torch.randn(B, 1, HK * D).to(torch.bfloat16), torch.randn(S, D).to(torch.bfloat16),
                       torch.randn(S, D).to(torch.bfloat16), torch.ones(D).to(torch.bfloat16),
                       torch.ones(D).to(torch.bfloat16), 1e-6, kc, kc.clone(), torch.full((B, 1), 7), rope_table=True)
    # the rest-of-prompt graphs: the cache write into rows given on the device, and the prefill
    # attention over them, in one program per token block (2048 tokens) and in split slots (16)
    from mixprec.kernels.attention import prefill_attention
    kt = torch.zeros(4, HK, 8192, D).to(torch.bfloat16)
    for T in (16, 2048):
        qt = qk_norm_rope_store(torch.randn(1, T, HQ * D).to(torch.bfloat16), torch.randn(1, T, HK * D).to(torch.bfloat16),
                                torch.randn(1, T, HK * D).to(torch.bfloat16), torch.randn(8192, D).to(torch.bfloat16),
                                torch.randn(8192, D).to(torch.bfloat16), torch.ones(D).to(torch.bfloat16),
                                torch.ones(D).to(torch.bfloat16), 1e-6, kt, kt.clone(), torch.arange(T)[None],
                                rope_table=True, rows=torch.tensor([2]))
        prefill_attention(qt, kt, kt, torch.tensor([2]), torch.arange(T)[None])
    from mixprec.kernels.sampling import next_token_advance
    for B in (1, 64):
        tok, pos = torch.zeros(B, 1, dtype=torch.long), torch.zeros(B, 1, dtype=torch.long)
        for race in (None, (torch.rand(B), torch.arange(B), 1e-5)):     # greedy, sampled
            next_token_advance(torch.randn(B, 151936).to(torch.bfloat16), tok[:, 0], pos[:, 0],
                               torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long), race)
        if B == 1:      # top-k / top-p (its large kernels compile slowly: one batch size)
            next_token_advance(torch.randn(B, 151936).to(torch.bfloat16), tok[:, 0], pos[:, 0],
                               torch.zeros(B, dtype=torch.long), torch.ones(B, dtype=torch.long), race,
                               (torch.full((B,), 20), torch.full((B,), 0.9)))


def main() -> int:
    if not toolchain_ok():
        print("SKIP: Triton cannot compile for sm_90 here")
        return 77
    JITFunction.run = compile_only
    drive()
    print(f"compiled {len(compiled)} kernel specializations for sm_90 ({len(pdl_compiled)} kernels also with PDL on), "
          f"{len(failures)} failed")
    if unspecialised:
        print("without the JIT's argument specialisation (this Triton's internals differ):", sorted(unspecialised))
    for f in failures:
        print("FAILED", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
