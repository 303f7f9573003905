"""Every checkpoint format: pack -> safetensors on disk -> load -> Packed, checked against the
packer's own integer codes (tier 1), an independent decoding of the on-disk words, the float
weight (tier 3), plus detection / scheme resolution / bad input / cat_n / shard / stack."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixprec.errors import FormatError, MissingWeight, ParallelError, ShapeMismatch
from mixprec.formats import (FORMATS, Packed, apply, cat_n, dequant, detect, load_module, resolve_scheme, shard,
                             stack)
from mixprec.formats.intq import rtn_int, unpack_int32

MODULE = "model.layers.1.mlp.experts.3.down_proj"
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]

# (id, format, params, N, K, kind) -- kind picks the SQNR floor vs the float weight
VARIANTS = [
    ("fp8_block_128", "fp8_block", {}, 256, 384, "fp8"),
    ("fp8_block_ceil_grid", "fp8_block", {"block": [128, 128]}, 96, 192, "fp8"),   # K % 128 != 0
    ("fp8_block_32_bf16scale", "fp8_block", {"block": [32, 32], "scale_dtype": torch.bfloat16}, 96, 192, "fp8"),
    ("ct_fp8_tensor", "ct_fp8", {"strategy": "tensor"}, 96, 192, "fp8"),
    ("ct_fp8_channel", "ct_fp8", {"strategy": "channel"}, 96, 192, "fp8"),
    ("ct_fp8_channel_w8a16", "ct_fp8", {"strategy": "channel", "weight_only": True}, 96, 192, "fp8"),
    ("ct_fp8_block", "ct_fp8", {"strategy": "block", "block": [64, 64]}, 96, 192, "fp8"),
    ("ct_fp8_static_input", "ct_fp8", {"strategy": "tensor", "static_input": True}, 96, 192, "fp8"),
    ("autofp8", "ct_fp8", {"strategy": "tensor", "producer": "autofp8", "static_input": True}, 96, 192, "fp8"),
    ("gptq4_sym_v1", "gptq", {"bits": 4, "group_size": 64}, 96, 192, "int4"),
    ("gptq4_sym_v2", "gptq", {"bits": 4, "group_size": 64, "checkpoint_format": "gptq_v2"}, 96, 192, "int4"),
    ("gptq4_asym_v1", "gptq", {"bits": 4, "group_size": 32, "sym": False}, 96, 192, "int4"),
    ("gptq4_asym_v2", "gptq", {"bits": 4, "group_size": 128, "sym": False, "checkpoint_format": "gptq_v2"},
     96, 192, "int4"),                                                                  # K % G != 0
    ("gptq4_group_all", "gptq", {"bits": 4, "group_size": -1}, 96, 192, "int4"),
    ("gptq4_actorder_sym", "gptq", {"bits": 4, "group_size": 64, "desc_act": True}, 96, 192, "int4"),
    ("gptq4_actorder_asym_v2", "gptq", {"bits": 4, "group_size": 32, "desc_act": True, "sym": False,
                                        "checkpoint_format": "gptq_v2", "seed": 3}, 96, 192, "int4"),
    ("gptq8_sym_v1", "gptq", {"bits": 8, "group_size": 64}, 96, 192, "int8"),
    ("gptq8_asym_v2", "gptq", {"bits": 8, "group_size": 128, "sym": False, "checkpoint_format": "gptq_v2"},
     96, 256, "int8"),
    ("awq_g64", "awq", {"group_size": 64}, 96, 192, "int4"),
    ("awq_g128", "awq", {"group_size": 128}, 128, 256, "int4"),
    ("ct_w4a16_sym", "ct_pack", {"bits": 4, "group_size": 64}, 96, 192, "int4"),
    ("ct_w4a16_asym", "ct_pack", {"bits": 4, "group_size": 32, "sym": False}, 96, 192, "int4"),
    ("ct_w4a16_actorder", "ct_pack", {"bits": 4, "group_size": 64, "sym": False, "actorder": "group"},
     96, 192, "int4"),
    ("ct_w4a16_channel", "ct_pack", {"bits": 4, "group_size": -1}, 96, 192, "int4"),
    ("ct_w8a16", "ct_pack", {"bits": 8, "group_size": 64}, 96, 192, "int8"),
    ("ct_int8_w8a8", "ct_int8", {}, 96, 192, "int8"),
    ("ct_int8_asym_tensor", "ct_int8", {"sym": False, "strategy": "tensor", "activations": "static"},
     96, 192, "int8"),
    ("ct_int8_w8a16", "ct_int8", {"activations": None}, 96, 192, "int8"),
]
SQNR_FLOOR = {"int4": 15.0, "int8": 35.0, "fp8": 25.0}


def weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.float().pow(2).sum() / (ref.float() - x.float()).pow(2).sum()))


def roundtrip(tmp_path, tensors: dict, module: str = MODULE) -> dict:
    """Write with safetensors, read back with safe_open (what the loader does)."""
    path = tmp_path / "model.safetensors"
    save_file({f"{module}.{s}": t.contiguous() for s, t in tensors.items()}, str(path))
    with safe_open(str(path), framework="pt") as f:
        return {name.removeprefix(module + "."): f.get_tensor(name) for name in f.keys()}


def build(fmt: str, params: dict, n: int, k: int, tmp_path, seed: int = 0):
    W = weight(n, k, seed)
    f = FORMATS[fmt]
    raw = roundtrip(tmp_path, f.pack(W, **params))
    scheme = resolve_scheme(f.config_block(**params), MODULE)
    return W, f.quantize(W, **params), raw, scheme


def loaded(fmt, params, n, k, tmp_path, seed=0) -> Packed:
    _, _, raw, scheme = build(fmt, params, n, k, tmp_path, seed)
    return load_module(raw, n, k, scheme, MODULE)


# -------- independent readers of the on-disk words (formulas from FORMATS.md, not mixprec code)

def field(words: torch.Tensor, shift: torch.Tensor, bits: int) -> torch.Tensor:
    return ((words.long() & 0xFFFFFFFF) >> shift) & ((1 << bits) - 1)


def disk_codes(fmt: str, raw: dict, bits: int, n: int, k: int) -> torch.Tensor:
    """Codes [K, N] read straight from the stored words."""
    pf = 32 // bits
    kk, nn = torch.arange(k)[:, None], torch.arange(n)[None, :]
    if fmt == "gptq":   # row k in word row k // pf, bits bits*(k % pf)
        return field(raw["qweight"][kk // pf, nn], bits * (kk % pf), bits)
    if fmt == "awq":    # column 8c + ORDER[i] in nibble i of word c
        pos = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
        return field(raw["qweight"][kk, nn // 8], 4 * pos[nn % 8], 4)
    if fmt == "ct_pack":  # weight_packed [N, K/pf]: value k of row n in word k // pf
        return field(raw["weight_packed"][nn, kk // pf], bits * (kk % pf), bits)
    raise AssertionError(fmt)


def disk_zeros(fmt: str, raw: dict, bits: int, n: int, ng: int, label: str = "") -> torch.Tensor | None:
    """True zero points [ng, N] from the stored words (None when none are stored)."""
    pf = 32 // bits
    gg, nn = torch.arange(ng)[:, None], torch.arange(n)[None, :]
    if fmt == "gptq":
        z = field(raw["qzeros"][gg, nn // pf], bits * (nn % pf), bits)
        return z + 1 if label == "gptq" else z     # v1 stores zero - 1 (fields here never wrap)
    if fmt == "awq":
        pos = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])
        return field(raw["qzeros"][gg, nn // 8], 4 * pos[nn % 8], 4)
    if fmt == "ct_pack" and "weight_zero_point" in raw:  # [N/pf, ng], packed along N
        return field(raw["weight_zero_point"][nn // pf, gg], bits * (nn % pf), bits)
    return None


def block_expand(scale: torch.Tensor, bn: int, bk: int, n: int, k: int) -> torch.Tensor:
    return scale.float()[torch.arange(n)[:, None] // bn, torch.arange(k)[None, :] // bk]


# ---------------------------------------------------------------------------------------- tier 1

@pytest.mark.parametrize("vid,fmt,params,n,k,kind", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_pack_disk_load_dequant(vid, fmt, params, n, k, kind, tmp_path):
    W, q, raw, scheme = build(fmt, params, n, k, tmp_path)
    w = load_module(raw, n, k, scheme, MODULE)
    assert w.layout == FORMATS[fmt].layout and (w.n, w.k) == (n, k) and w.source == fmt
    D = dequant(w)
    assert D.dtype == torch.float32 and D.shape == (n, k)

    if w.layout == "intq":
        bits, G = params.get("bits", 4), w.params["group_size"]
        ng = -(-k // G)
        label = params.get("checkpoint_format", "gptq")
        # the on-disk words hold exactly the packer's codes / zeros (independent decoding)
        assert torch.equal(disk_codes(fmt, raw, bits, n, k), q["codes"].long())
        z_disk = disk_zeros(fmt, raw, bits, n, ng, label)
        if z_disk is not None:
            assert torch.equal(z_disk, q["zeros"].long())
        if fmt == "gptq" and params.get("sym", True):     # the well-known constant words
            word = {("gptq", 4): 0x77777777, ("gptq_v2", 4): 0x88888888 - 2 ** 32,
                    ("gptq", 8): 0x7F7F7F7F, ("gptq_v2", 8): 0x80808080 - 2 ** 32}[(label, bits)]
            assert bool((raw["qzeros"] == word).all())
        # Packed: codes in stored (group-sorted) order, scales bit-identical, zeros or symmetric
        perm = w.perm.long() if "perm" in w.tensors() else torch.arange(k)
        assert torch.equal(unpack_int32(w.qweight, bits, 0, k), q["codes"][perm])
        assert w.scales.dtype == q["scales"].dtype and torch.equal(w.scales, q["scales"])
        if "zeros" in w.tensors():
            assert torch.equal(w.zeros, q["zeros"])
        else:
            assert bool((q["zeros"] == 2 ** (bits - 1)).all())
        if (fmt == "gptq" and params.get("desc_act")) or params.get("actorder") == "group":
            assert "perm" in w.tensors()
            assert torch.equal(q["g_idx"].long()[perm], torch.arange(k) // G)   # sorted into whole groups
        g = q["g_idx"].long()
        ref = q["scales"].float()[g] * (q["codes"].float() - q["zeros"].float()[g])   # [K, N], original order
        assert torch.equal(D, ref.t())
    elif w.layout == "fp8":
        assert torch.equal(w.weight.view(torch.uint8), q["codes"].view(torch.uint8))
        assert torch.equal(raw["weight"].view(torch.uint8), q["codes"].view(torch.uint8))
        s = q["scale"].float()
        bn, bk = w.params["block"]
        assert torch.equal(w.scale, s.reshape(w.scale.shape))
        assert torch.equal(D, q["codes"].float() * block_expand(s.reshape(w.scale.shape), bn, bk, n, k))
        strategy = params.get("strategy", "block")
        assert (bn, bk) == {"tensor": (n, k), "channel": (1, k)}.get(strategy, tuple(params.get("block", (128, 128))))
        weight_only = params.get("weight_only")
        assert w.params["act"] == ("w8a16" if weight_only else "w8a8")
    else:  # int8
        assert torch.equal(w.weight, q["codes"])
        s = q["scale"].float().reshape(-1, 1).expand(n, 1)
        zp = q.get("zero_point", torch.zeros(1)).float().reshape(-1, 1).expand(n, 1)
        assert torch.equal(w.scale, s)
        assert ("zero" in w.tensors()) == ("zero_point" in q)
        assert torch.equal(D, s * (q["codes"].float() - zp))
        assert w.params["act"] == ("w8a8" if params.get("activations", "dynamic") == "dynamic" else "w8a16")

    assert sqnr(W, D) >= SQNR_FLOOR[kind], f"{vid}: {sqnr(W, D):.1f} dB"
    x = torch.randn(3, 2, k, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(apply(x, w), x @ D.t(), rtol=1e-5, atol=1e-4)


def test_sqnr_levels_are_meaningful():
    """The floors can fail: int4 is far below the int8 floor, so a format mixup would show."""
    W = weight(128, 256)
    w = FORMATS["gptq"].load(FORMATS["gptq"].pack(W, bits=4, group_size=128), 128, 256,
                             resolve_scheme(FORMATS["gptq"].config_block(bits=4, group_size=128), MODULE), MODULE)
    assert 15 < sqnr(W, dequant(w)) < 35


# -------------------------------------------------------------------------- canonicalisation

def test_gptq_sym_and_ct_pack_sym_canonicalise_identically(tmp_path):
    for extra_g, extra_c in [({}, {}), ({"desc_act": True, "seed": 5}, {"actorder": "group", "seed": 5})]:
        pg = dict(bits=4, group_size=64, sym=True, **extra_g)
        pc = dict(bits=4, group_size=64, sym=True, scale_dtype=torch.float16, **extra_c)
        a = loaded("gptq", pg, 96, 192, tmp_path)
        b = loaded("ct_pack", pc, 96, 192, tmp_path)
        assert a.key() == b.key()
        for name, t in a.tensors().items():
            assert torch.equal(t, b.tensors()[name]), name


def test_awq_and_gptq_from_same_codes_canonicalise_identically(tmp_path):
    W = weight(128, 256)
    q = rtn_int(W, 4, 64, sym=False, zero_in_range=False)
    assert not bool((q["zeros"] == 8).all())
    awq_t = FORMATS["awq"].encode(q, group_size=64)
    ref = FORMATS["awq"].load(roundtrip(tmp_path, awq_t), 128, 256, {"quant_method": "awq", "group_size": 64}, MODULE)
    for label in ("gptq", "gptq_v2"):
        p = dict(bits=4, group_size=64, sym=False, checkpoint_format=label)
        g = FORMATS["gptq"].load(roundtrip(tmp_path, FORMATS["gptq"].encode(q, **p)), 128, 256,
                                 resolve_scheme(FORMATS["gptq"].config_block(**p), MODULE), MODULE)
        assert g.key() == ref.key()
        for name, t in ref.tensors().items():
            assert torch.equal(t, g.tensors()[name]), (label, name)


def test_gptq_v1_zero_zero_roundtrips():
    """Asym v1 with a true zero 0: GPTQModel writes v2 words - 0x11111111 (borrowing into the
    next field); the word-wide +1 at load restores every field."""
    W = weight(64, 128).abs() + 0.1                           # all positive: min 0 -> zero 0
    p = dict(bits=4, group_size=64, sym=False, checkpoint_format="gptq")
    q = FORMATS["gptq"].quantize(W, **p)
    assert bool((q["zeros"] == 0).any())
    w = FORMATS["gptq"].load(FORMATS["gptq"].pack(W, **p), 64, 128, resolve_scheme(FORMATS["gptq"].config_block(**p), MODULE), MODULE)
    assert torch.equal(w.zeros, q["zeros"])


@pytest.mark.parametrize("stored,label", [("gptq_v2", "gptq"), ("gptq", "gptq_v2")])
def test_mislabelled_gptq_follows_values_with_warning(stored, label, tmp_path):
    W = weight(96, 192)
    p = dict(bits=4, group_size=64, sym=True)
    raw = roundtrip(tmp_path, FORMATS["gptq"].pack(W, checkpoint_format=stored, **p))
    scheme = resolve_scheme(FORMATS["gptq"].config_block(checkpoint_format=label, **p), MODULE)
    with pytest.warns(UserWarning, match=MODULE):
        w = load_module(raw, 96, 192, scheme, MODULE)
    q = FORMATS["gptq"].quantize(W, **p)
    g = q["g_idx"].long()
    assert torch.equal(dequant(w), (q["scales"].float()[g] * (q["codes"].float() - 8)).t())
    with warnings.catch_warnings():   # correctly labelled: silent
        warnings.simplefilter("error")
        load_module(raw, 96, 192, resolve_scheme(FORMATS["gptq"].config_block(checkpoint_format=stored, **p), MODULE),
                    MODULE)


# -------------------------------------------------------------------------------- bad input

def gptq_raw(**over):
    raw = FORMATS["gptq"].pack(weight(96, 192), bits=4, group_size=64)
    raw.update(over)
    return {k: v for k, v in raw.items() if v is not None}


GPTQ_SCHEME = {"quant_method": "gptq", "bits": 4, "group_size": 64, "sym": True, "desc_act": False,
               "checkpoint_format": "gptq"}


@pytest.mark.parametrize("case,raw,scheme,err,needle", [
    ("qweight_shape", gptq_raw(qweight=torch.zeros(23, 96, dtype=torch.int32)), GPTQ_SCHEME, ShapeMismatch, "qweight"),
    ("qweight_dtype", gptq_raw(qweight=torch.zeros(24, 96, dtype=torch.int64)), GPTQ_SCHEME, FormatError, "qweight"),
    ("scales_dtype", gptq_raw(scales=torch.zeros(3, 96)), GPTQ_SCHEME, FormatError, "scales"),
    ("qzeros_shape", gptq_raw(qzeros=torch.zeros(2, 12, dtype=torch.int32)), GPTQ_SCHEME, ShapeMismatch, "qzeros"),
    ("missing_scales", gptq_raw(scales=None), GPTQ_SCHEME, FormatError, "scales"),
    ("bits3", gptq_raw(), {**GPTQ_SCHEME, "bits": 3}, FormatError, "unsupported bits"),
    ("bits2", gptq_raw(), {**GPTQ_SCHEME, "bits": 2}, FormatError, "unsupported bits"),
    ("marlin_format", gptq_raw(), {**GPTQ_SCHEME, "checkpoint_format": "marlin"}, FormatError, "marlin"),
    ("nonzero_bias", gptq_raw(bias=torch.ones(96, dtype=torch.float16)), GPTQ_SCHEME, FormatError, "bias"),
    ("act_order_without_g_idx", gptq_raw(g_idx=None), {**GPTQ_SCHEME, "desc_act": True}, MissingWeight, "g_idx"),
    ("g_idx_uneven", gptq_raw(g_idx=torch.cat([torch.zeros(100), torch.ones(60), torch.full((32,), 2)]).int()),
     GPTQ_SCHEME, FormatError, "g_idx"),
    ("g_idx_range", gptq_raw(g_idx=torch.full((192,), 7, dtype=torch.int32)), GPTQ_SCHEME, FormatError, "g_idx"),
    ("unexpected_tensor", gptq_raw(extra=torch.zeros(3)), GPTQ_SCHEME, FormatError, "extra"),
    ("config_says_fp8", gptq_raw(), {"quant_method": "fp8"}, FormatError, "'fp8'"),
    ("config_says_plain", gptq_raw(), None, FormatError, "not quantized"),
    ("awq_gemv", FORMATS["awq"].pack(weight(96, 192), group_size=64),
     {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemv"}, FormatError, "gemv"),
    ("awq_marlin", FORMATS["awq"].pack(weight(96, 192), group_size=64),
     {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "marlin"}, FormatError, "marlin"),
    ("awq_missing_qzeros", {k: v for k, v in FORMATS["awq"].pack(weight(96, 192), group_size=64).items()
                            if k != "qzeros"}, {"quant_method": "awq", "group_size": 64}, FormatError, "qzeros"),
    ("fp8_scale_shape", {"weight": torch.zeros(96, 192, dtype=torch.float8_e4m3fn),
                         "weight_scale_inv": torch.ones(1, 1)}, {"quant_method": "fp8"}, ShapeMismatch,
     "weight_scale_inv"),
    ("fp8_scale_dtype", {"weight": torch.zeros(96, 192, dtype=torch.float8_e4m3fn),
                         "weight_scale_inv": torch.ones(1, 2, dtype=torch.float64)}, {"quant_method": "fp8"},
     FormatError, "weight_scale_inv"),
    ("fp8_weight_shape", {"weight": torch.zeros(95, 192, dtype=torch.float8_e4m3fn),
                          "weight_scale_inv": torch.ones(1, 2)}, {"quant_method": "fp8"}, ShapeMismatch, "weight"),
    ("fp8_missing_scale", {"weight": torch.zeros(96, 192, dtype=torch.float8_e4m3fn)},
     {"quant_method": "fp8"}, FormatError, "weight_scale"),
    ("dense_but_config_quantized", {"weight": torch.zeros(96, 192, dtype=torch.bfloat16)}, GPTQ_SCHEME,
     FormatError, "gptq"),
    ("dense_wrong_shape", {"weight": torch.zeros(96, 191, dtype=torch.bfloat16)}, None, ShapeMismatch, "weight"),
    ("ct_fp8_strategy_mismatch", FORMATS["ct_fp8"].pack(weight(96, 192), strategy="channel"),
     resolve_scheme(FORMATS["ct_fp8"].config_block(strategy="tensor"), MODULE), FormatError, "strategy"),
    ("ct_pack_weight_shape", {**FORMATS["ct_pack"].pack(weight(96, 192), group_size=64),
                              "weight_shape": torch.tensor([96, 190])},
     resolve_scheme(FORMATS["ct_pack"].config_block(group_size=64), MODULE), ShapeMismatch, "weight_shape"),
    ("ct_pack_asym_missing_zp", FORMATS["ct_pack"].pack(weight(96, 192), group_size=64),
     resolve_scheme(FORMATS["ct_pack"].config_block(group_size=64, sym=False), MODULE), FormatError,
     "weight_zero_point"),
    ("ct_pack_actorder_without_g_idx", FORMATS["ct_pack"].pack(weight(96, 192), group_size=64),
     resolve_scheme(FORMATS["ct_pack"].config_block(group_size=64, actorder="group"), MODULE), MissingWeight,
     "weight_g_idx"),
    ("ct_pack_says_int8", FORMATS["ct_pack"].pack(weight(96, 192), group_size=64),
     resolve_scheme(FORMATS["ct_int8"].config_block(), MODULE), FormatError, "int-quantized"),
    ("ct_int8_group_scale", {"weight": torch.zeros(96, 192, dtype=torch.int8), "weight_scale": torch.ones(96, 3)},
     resolve_scheme(FORMATS["ct_int8"].config_block(), MODULE), ShapeMismatch, "weight_scale"),
    ("ct_int8_weight_dtype", {"weight": torch.zeros(96, 192, dtype=torch.int8).int(),
                              "weight_scale": torch.ones(96, 1)},
     resolve_scheme(FORMATS["ct_int8"].config_block(), MODULE), FormatError, "weight"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_names_the_tensor(case, raw, scheme, err, needle):
    with pytest.raises(err) as e:
        load_module(raw, 96, 192, scheme, MODULE)
    assert MODULE in str(e.value) and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("qc", [
    {"quant_method": "mixprec", "modules": {MODULE: "s0"}, "schemes": {}},
    {"quant_method": "compressed-tensors", "config_groups": {"group_0": ["Linear"]}},
    {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"targets": ["Linear"], "weights": ["x"]}}},
])
def test_malformed_quantization_config_is_a_format_error(qc):
    with pytest.raises(FormatError, match=f"malformed where it describes {MODULE}"):
        resolve_scheme(qc, MODULE)


@pytest.mark.parametrize("fmt,params", [("ct_fp8", dict(strategy="channel")), ("ct_fp8", dict(strategy="block")),
                                        ("fp8_block", dict(block=(64, 64))), ("ct_int8", {})])
def test_pack_with_fp16_scales_keeps_zero_channels_finite(fmt, params):
    """All-zero channels / blocks with fp16 scales: a minimum scale clamped in fp32 underflowed to 0
    in fp16, and the codes were 0/0 (NaN); the fixtures' producers must not write that."""
    W = weight(96, 192)
    W[:8] = 0
    f = FORMATS[fmt]
    raw = f.pack(W, scale_dtype=torch.float16, **params)
    w = load_module(raw, 96, 192, resolve_scheme(f.config_block(scale_dtype=torch.float16, **params) or None, MODULE),
                    MODULE)
    assert torch.isfinite(dequant(w)).all() and sqnr(W, dequant(w)) > 25


@pytest.mark.parametrize("n,k", [(128, 128), (64, 128), (96, 192)])
def test_ct_fp8_block_of_one_block_grid(n, k):
    # a [1, 1] scale grid (the weight fits one block) is a block scale, not a per-tensor one
    f, W = FORMATS["ct_fp8"], weight(n, k)
    w = load_module(f.pack(W, strategy="block", block=(128, 128)), n, k,
                    resolve_scheme(f.config_block(strategy="block", block=(128, 128)), MODULE), MODULE)
    assert w.params["block"] == (128, 128)
    assert sqnr(W, dequant(w)) > 25


def test_zero_bias_is_ignored():
    raw = gptq_raw(bias=torch.zeros(96, dtype=torch.float16))
    w = load_module(raw, 96, 192, GPTQ_SCHEME, MODULE)
    assert torch.equal(dequant(w), dequant(load_module(gptq_raw(), 96, 192, GPTQ_SCHEME, MODULE)))


def test_detect_uses_metadata_only():
    meta = {"qweight": (torch.int32, (24, 96)), "qzeros": (torch.int32, (3, 12)),
            "scales": (torch.float16, (3, 96)), "g_idx": (torch.int32, (192,))}
    assert detect(meta, GPTQ_SCHEME, MODULE).name == "gptq"
    awq = {"qweight": (torch.int32, (192, 12)), "qzeros": (torch.int32, (3, 12)), "scales": (torch.float16, (3, 96))}
    assert detect(awq, {"quant_method": "awq"}, MODULE).name == "awq"
    with pytest.raises(FormatError, match="awq"):
        detect(awq, GPTQ_SCHEME, MODULE)
    with pytest.raises(FormatError, match="no known weight format"):
        detect({"weight": (torch.int16, (96, 192))}, None, MODULE)


# --------------------------------------------------------------------------------- schemes

def test_resolve_scheme_gptq_dynamic():
    cfg = FORMATS["gptq"].config_block(bits=4, group_size=128, dynamic={
        r"-:model\.layers\.0\..*": {},
        r"+:.*\.down_proj": {"bits": 8, "group_size": 64},
        r".*\.layers\.1\..*": {"desc_act": True},
    })
    assert resolve_scheme(cfg, "model.layers.0.self_attn.q_proj") is None
    s = resolve_scheme(cfg, "model.layers.1.mlp.experts.0.down_proj")      # first match wins
    assert (s["quant_method"], s["bits"], s["group_size"], s["desc_act"]) == ("gptq", 8, 64, False)
    s = resolve_scheme(cfg, "model.layers.1.self_attn.o_proj")
    assert (s["bits"], s["group_size"], s["desc_act"]) == (4, 128, True)
    assert resolve_scheme(cfg, "model.layers.2.self_attn.o_proj")["desc_act"] is False
    assert resolve_scheme(cfg, "lm_head") is None and resolve_scheme(cfg, "model.layers.1.mlp.gate") is None
    assert resolve_scheme({**cfg, "lm_head": True}, "lm_head")["bits"] == 4
    with pytest.raises(FormatError, match="invalid regex"):
        resolve_scheme({**cfg, "dynamic": {"+:(": {}}}, "model.layers.1.mlp.down_proj")


def test_resolve_scheme_compressed_tensors_targets_and_ignore():
    w4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}
    w8 = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    f8 = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
    cfg = {"quant_method": "compressed-tensors", "format": "mixed-precision",
           "ignore": ["lm_head", "re:.*mlp.gate$", "model.layers.0.self_attn.k_proj"],
           "config_groups": {
               "class": {"targets": ["Linear"], "weights": w4, "format": "pack-quantized"},
               "regex": {"targets": [r"re:.*\.down_proj$"], "weights": w8, "format": "pack-quantized"},
               "exact": {"targets": ["model.layers.1.mlp.experts.3.down_proj"], "weights": f8,
                         "input_activations": {"num_bits": 8, "type": "float", "dynamic": True, "strategy": "token"}},
           }}
    assert resolve_scheme(cfg, "model.layers.1.mlp.experts.3.down_proj")["group"] == "exact"
    assert resolve_scheme(cfg, "model.layers.1.mlp.experts.3.down_proj")["format"] == "float-quantized"
    assert resolve_scheme(cfg, "model.layers.1.mlp.experts.2.down_proj")["group"] == "regex"
    s = resolve_scheme(cfg, "model.layers.1.mlp.experts.2.up_proj")
    assert (s["group"], s["format"], s["weights"]["num_bits"]) == ("class", "pack-quantized", 4)
    assert resolve_scheme(cfg, "model.layers.0.self_attn.k_proj") is None        # exact ignore
    assert resolve_scheme(cfg, "model.layers.0.mlp.gate") is None                # regex ignore
    assert resolve_scheme(cfg, "model.layers.0.mlp.gate_proj")["group"] == "class"
    assert resolve_scheme(cfg, "lm_head") is None
    # ignore wins even over an exact target
    cfg2 = {**cfg, "ignore": ["re:.*experts\\.3\\..*"]}
    assert resolve_scheme(cfg2, "model.layers.1.mlp.experts.3.down_proj") is None


def test_resolve_scheme_fp8_and_awq_skips():
    cfg = FORMATS["fp8_block"].config_block(ignored_layers=["model.layers.0.self_attn.q_proj"])
    assert resolve_scheme(cfg, "model.layers.0.self_attn.q_proj") is None
    assert resolve_scheme(cfg, "model.layers.0.self_attn.k_proj")["weight_block_size"] == [128, 128]
    assert resolve_scheme(cfg, "lm_head") is None and resolve_scheme(cfg, "model.layers.3.mlp.gate") is None
    cfg = {"quant_method": "fp8", "activation_scheme": "dynamic", "modules_to_not_convert": ["mlp.experts.7."]}
    assert resolve_scheme(cfg, "model.layers.2.mlp.experts.7.up_proj") is None
    assert resolve_scheme(cfg, "model.layers.2.mlp.experts.17.up_proj")["quant_method"] == "fp8"
    awq = FORMATS["awq"].config_block(modules_to_not_convert=["self_attn"])
    assert resolve_scheme(awq, "model.layers.2.self_attn.o_proj") is None
    assert resolve_scheme(awq, "model.layers.2.mlp.down_proj")["version"] == "gemm"
    assert resolve_scheme(None, "model.layers.2.mlp.down_proj") is None
    with pytest.raises(FormatError, match="bitsandbytes"):
        resolve_scheme({"quant_method": "bitsandbytes"}, "model.layers.2.mlp.down_proj")


# ------------------------------------------------------------------------- cat_n and shard

SHARD_CASES = [  # (id, fmt, params, size) -- the split dim is `size`, the other 128; per-rank
    ("dense", "dense", {}, 768),                     # sizes (768/4 = 192, /8 = 96) straddle groups / blocks
    ("fp8_block128", "fp8_block", {}, 768),
    ("fp8_block_ragged", "fp8_block", {"block": [64, 64]}, 480),
    ("fp8_channel", "ct_fp8", {"strategy": "channel"}, 384),
    ("fp8_tensor", "ct_fp8", {"strategy": "tensor"}, 384),
    ("int8", "ct_int8", {"sym": False}, 384),
    ("gptq_g128", "gptq", {"bits": 4, "group_size": 128, "sym": False}, 768),
    ("gptq8_g128", "gptq", {"bits": 8, "group_size": 128}, 768),
    ("gptq_actorder", "gptq", {"bits": 4, "group_size": 128, "desc_act": True, "sym": False}, 768),
    ("gptq_actorder_sym", "gptq", {"bits": 4, "group_size": 64, "desc_act": True}, 768),
    ("awq_channel", "awq", {"group_size": -1}, 768),
]


def shard_weight(fmt: str, params: dict, n: int, k: int) -> Packed:
    f = FORMATS[fmt]
    scheme = resolve_scheme(f.config_block(**params), MODULE) if fmt != "dense" else None
    return load_module(f.pack(weight(n, k), **params), n, k, scheme, MODULE)


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("dim", ["n", "k"])
@pytest.mark.parametrize("cid,fmt,params,size", SHARD_CASES, ids=[c[0] for c in SHARD_CASES])
def test_shard_equivalence(cid, fmt, params, size, dim, world):
    n, k = (size, 128) if dim == "n" else (128, size)
    w = shard_weight(fmt, params, n, k)
    D = dequant(w)
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = x @ D.double().t()
    per = size // world
    ys = []
    for r in range(world):
        s = shard(w, dim, r, world)
        sl = slice(r * per, (r + 1) * per)
        assert (s.n, s.k) == ((per, k) if dim == "n" else (n, per))
        for name, t in s.tensors().items():    # owns its memory: a view would keep all of w alive
            assert t.untyped_storage().nbytes() == t.nbytes, name
        Ds = dequant(s)
        assert torch.equal(Ds, D[sl] if dim == "n" else D[:, sl])    # bit-exact slice of the whole
        xr = x if dim == "n" else x[:, sl]
        ys.append(xr @ Ds.double().t())
        torch.testing.assert_close(apply(xr.float(), s), xr.float() @ Ds.t(), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(torch.cat(ys, 1) if dim == "n" else sum(ys), ref)


def test_shard_refines_straddling_groups():
    """I=768 at TP4: 192 rows per rank with G=128 -> sub-groups of 64, scale rows replicated."""
    p = dict(bits=4, group_size=128)
    w = FORMATS["gptq"].load(FORMATS["gptq"].pack(weight(256, 768), **p), 256, 768,
                             resolve_scheme(FORMATS["gptq"].config_block(**p), MODULE), MODULE)
    s = shard(w, "k", 1, 4)
    assert s.params["group_size"] == 64
    assert torch.equal(s.scales, w.scales[[1, 2, 2]])
    f = FORMATS["fp8_block"]
    w = f.load(f.pack(weight(768, 256)), 768, 256, resolve_scheme(f.config_block(), MODULE), MODULE)
    s = shard(w, "n", 1, 4)
    assert s.params["block"] == (64, 128) and torch.equal(s.scale, w.scale[[1, 2, 2]])


def test_shard_errors():
    w = load_module({"weight": torch.zeros(96, 192)}, 96, 192, None, MODULE)
    with pytest.raises(ParallelError, match="does not split"):
        shard(w, "n", 0, 5)
    with pytest.raises(ParallelError, match="dim"):
        shard(w, "m", 0, 2)
    with pytest.raises(ParallelError, match="rank"):
        shard(w, "n", 2, 2)
    p = dict(bits=4, group_size=-1)
    g = FORMATS["gptq"].load(FORMATS["gptq"].pack(weight(32, 96), **p), 32, 96,
                             resolve_scheme(FORMATS["gptq"].config_block(**p), MODULE), MODULE)
    with pytest.raises(ParallelError, match="multiple of 8"):
        shard(g, "k", 0, 24)                 # 4 input rows per rank: half an int32 word


@pytest.mark.parametrize("cid", ["gptq_actorder", "gptq_g128", "fp8_block128", "int8", "dense"])
def test_shard_stack(cid):
    """Expert stacks shard like their members; act-order experts with different perms share one
    padded group size, so the shard is still one stack."""
    _, fmt, params, size = next(c for c in SHARD_CASES if c[0] == cid)
    f = FORMATS[fmt]
    scheme = resolve_scheme(f.config_block(**params), MODULE) if fmt != "dense" else None
    per_expert = [{**params, "seed": e} if params.get("desc_act") else params for e in range(3)]
    ws = [load_module(f.pack(weight(size, size, e), **per_expert[e]), size, size, scheme, MODULE) for e in range(3)]
    st = stack(ws)
    per = size // 4
    for dim in ("n", "k"):
        for r in range(4):
            s = shard(st, dim, r, 4)
            D = dequant(s)
            for e in range(3):
                full = dequant(ws[e])
                assert torch.equal(D[e], full[r * per:(r + 1) * per] if dim == "n" else full[:, r * per:(r + 1) * per])
                assert torch.equal(dequant(s.select(e)), D[e])


CAT_CASES = [  # parts (fmt, params, N) with equal K; expect fusable?
    ("dense", [("dense", {}, 64), ("dense", {}, 32)], True),
    ("fp8_block", [("fp8_block", {"block": [32, 32]}, 64), ("fp8_block", {"block": [32, 32]}, 32),
                   ("fp8_block", {"block": [32, 32]}, 48)], True),
    ("fp8_straddle", [("fp8_block", {"block": [32, 32]}, 48), ("fp8_block", {"block": [32, 32]}, 32)], False),
    ("fp8_tensor", [("ct_fp8", {"strategy": "tensor"}, 64), ("ct_fp8", {"strategy": "tensor"}, 32)], True),
    ("fp8_tensor_channel", [("ct_fp8", {"strategy": "tensor"}, 64), ("ct_fp8", {"strategy": "channel"}, 32)], True),
    ("fp8_block_vs_channel", [("fp8_block", {"block": [32, 32]}, 64), ("ct_fp8", {"strategy": "channel"}, 32)],
     False),
    ("int8_sym_asym", [("ct_int8", {}, 64), ("ct_int8", {"sym": False}, 32)], True),
    ("int8_act", [("ct_int8", {}, 64), ("ct_int8", {"activations": None}, 32)], False),
    ("intq_sym_asym", [("gptq", {"group_size": 32}, 64), ("awq", {"group_size": 32}, 32),
                       ("ct_pack", {"group_size": 32, "scale_dtype": torch.float16}, 40)], True),
    ("intq_groups", [("gptq", {"group_size": 32}, 64), ("gptq", {"group_size": 64}, 32)], False),
    ("intq_scale_dtype", [("gptq", {"group_size": 32}, 64), ("ct_pack", {"group_size": 32}, 32)], False),
    ("intq_perm_same", [("gptq", {"group_size": 32, "desc_act": True, "seed": 0}, 64),
                        ("gptq", {"group_size": 32, "desc_act": True, "seed": 0}, 32)], True),
    ("intq_perm_differs", [("gptq", {"group_size": 32, "desc_act": True, "seed": 0}, 64),
                           ("gptq", {"group_size": 32, "desc_act": True, "seed": 1}, 32)], False),
    ("layouts_differ", [("gptq", {"group_size": 32}, 64), ("dense", {}, 32)], False),
]


@pytest.mark.parametrize("cid,parts,ok", CAT_CASES, ids=[c[0] for c in CAT_CASES])
def test_cat_n(cid, parts, ok):
    K = 128
    ws = []
    for i, (fmt, params, n) in enumerate(parts):
        f = FORMATS[fmt]
        scheme = resolve_scheme(f.config_block(**params), MODULE) if fmt != "dense" else None
        ws.append(load_module(f.pack(weight(n, K, i), **params), n, K, scheme, MODULE))
    c = cat_n(ws)
    if not ok:
        assert c is None
        return
    assert c.n == sum(w.n for w in ws) and c.k == K
    assert torch.equal(dequant(c), torch.cat([dequant(w) for w in ws]))


# ------------------------------------------------------------------------------------ stack

@pytest.mark.parametrize("vid", ["fp8_block_32_bf16scale", "ct_fp8_tensor", "gptq4_actorder_asym_v2",
                                 "ct_w8a16", "ct_int8_asym_tensor"])
def test_stack_select_roundtrip(vid):
    _, fmt, params, n, k, _ = next(v for v in VARIANTS if v[0] == vid)
    f = FORMATS[fmt]
    scheme = resolve_scheme(f.config_block(**params), MODULE)
    per_expert = [{**params, "seed": e} if params.get("desc_act") else params for e in range(3)]
    ws = [f.load(f.pack(weight(n, k, e), **per_expert[e]), n, k, scheme, MODULE) for e in range(3)]
    if params.get("desc_act"):   # different perms per expert, same key: still one stack
        assert not torch.equal(ws[0].perm, ws[1].perm)
    st = stack(ws)
    D = dequant(st)
    assert D.shape == (3, n, k)
    for e, w in enumerate(ws):
        sel = st.select(e)
        assert sel.key() == w.key()
        for name, t in w.tensors().items():
            assert torch.equal(sel.tensors()[name], t)
        assert torch.equal(D[e], dequant(w))


# --------------------------------------------------------------------------------------- GPU

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("vid", ["fp8_block_128", "ct_fp8_channel_w8a16", "gptq4_sym_v1", "gptq4_actorder_asym_v2",
                                 "awq_g128", "ct_w8a16", "ct_int8_w8a8", "ct_int8_w8a16"])
@pytest.mark.parametrize("m", [1, 7])
def test_apply_cuda_matches_dequant(vid, m, tmp_path):
    _, fmt, params, n, k, _ = next(v for v in VARIANTS if v[0] == vid)
    w = loaded(fmt, params, n, k, tmp_path).to("cuda")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    y = apply(x, w)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    ref = x.float() @ dequant(w).t()
    floor = 25.0 if w.params.get("act") == "w8a8" else 40.0   # w8a8 also quantizes x
    assert sqnr(ref, y) >= floor


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cid,dim", [(c, d) for c in ("gptq_g128", "gptq_actorder", "gptq8_g128", "fp8_channel",
                                                      "fp8_tensor", "int8", "dense", "fp8_block128") for d in "nk"])
def test_apply_cuda_shards(cid, dim):
    """TP4 shards (refined groups / blocks, padded act-order rows) run through the kernels. (A TP4 K
    shard of an fp8 block-128 weight has 64-wide K blocks: the layout runs it W8A16.)"""
    _, fmt, params, size = next(c for c in SHARD_CASES if c[0] == cid)
    n, k = (size, 256) if dim == "n" else (256, size)
    w = shard_weight(fmt, params, n, k)
    x = torch.randn(3, k, device="cuda", dtype=torch.bfloat16)
    parts = []
    for r in range(4):
        s = shard(w, dim, r, 4).to("cuda")
        parts.append(apply(x if dim == "n" else x[:, r * k // 4:(r + 1) * k // 4], s).float())
    y = torch.cat(parts, 1) if dim == "n" else sum(parts)
    ref = x.float() @ dequant(w).cuda().t()
    assert sqnr(ref, y) >= (25.0 if w.params.get("act") == "w8a8" else 35.0), sqnr(ref, y)
