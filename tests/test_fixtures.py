"""The fixture checkpoints: configs, tensor names / dtypes / shapes per format, values against
independent pure-torch decoders written here from FORMATS.md, the bf16 model and tokenizer
through transformers, AWQ folding, per-module overrides, the CLI."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors import safe_open

from mixprec.config import ModelArgs
from mixprec.formats import dequant, load_module, resolve_scheme
from mixprec.testing import fixtures as fx
from mixprec.testing.tokenizer import SPECIAL_TOKENS, build_tokenizer, special_token_ids

E4M3 = torch.float8_e4m3fn
SEED = 0


@pytest.fixture(scope="module")
def fixture_dirs():
    paths = fx.shared_fixture(seed=SEED)
    assert fx.shared_fixture(seed=SEED) == paths          # built once per process
    return paths


@pytest.fixture(scope="module")
def ref():
    """(cfg, bf16-valued float32 weights) the fixtures were packed from."""
    return fx.fixture_weights(seed=SEED)


def read_all(path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"{k} in two shards"
                out[k] = h.get_tensor(k)
    return out


def linear_modules(cfg) -> dict[str, tuple[int, int]]:
    return {n.removesuffix(".weight"): s for n, s in fx.weight_shapes(cfg).items()
            if len(s) == 2 and n not in ("model.embed_tokens.weight", "lm_head.weight") and ".mlp.gate." not in n}


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    return 10 * math.log10(ref.pow(2).sum() / (ref - x).pow(2).sum().clamp(min=1e-30))


# ---- independent decoders (FORMATS.md), [N, K] float32 -----------------------------------

def unpack_rows(words: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> unsigned fields in natural order along `dim` (field i at bits b*i)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    fields = [(w >> (bits * i)) & ((1 << bits) - 1) for i in range(32 // bits)]
    return torch.stack(fields, dim=dim + 1).flatten(dim, dim + 1)


def dq_gptq(t, v2: bool, G: int = 32):
    q = unpack_rows(t["qweight"], 4, 0).float()                          # [K, N]
    z = unpack_rows(t["qzeros"], 4, 1).float() + (0 if v2 else 1)        # [K/G, N]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (q - z[g])).t()


def dq_awq(t, G: int = 32):
    order = [0, 2, 4, 6, 1, 3, 5, 7]                                     # nibble i -> column 8c+order[i]
    inv = torch.argsort(torch.tensor(order))

    def unpack(words):
        f = unpack_rows(words, 4, 1)                                     # [R, N] in nibble order
        return f.view(f.shape[0], -1, 8)[..., inv].reshape(f.shape[0], -1).float()
    q, z = unpack(t["qweight"]), unpack(t["qzeros"])
    g = torch.arange(q.shape[0]) // G
    return (t["scales"].float()[g] * (q - z[g])).t()


def dq_ct_pack(t, G: int = 32):
    q = unpack_rows(t["weight_packed"], 4, 1).float() - 8                # [N, K] signed
    g = torch.arange(q.shape[1]) // G
    return t["weight_scale"].float()[:, g] * q


def dq_fp8_block(t, bn=64, bk=64):
    s = t["weight_scale_inv"].float()
    n, k = t["weight"].shape
    return t["weight"].float() * s[torch.arange(n)[:, None] // bn, torch.arange(k)[None, :] // bk]


def dq_scaled(t):
    return t["weight"].float() * t["weight_scale"].float()


# name -> (expected suffix -> (dtype, shape fn(N, K)), decoder, min SQNR dB vs the reference)
SPECS = {
    "bf16": ({"weight": (torch.bfloat16, lambda n, k: (n, k))}, lambda t: t["weight"].float(), 200),
    "fp8": ({"weight": (E4M3, lambda n, k: (n, k)),
             "weight_scale_inv": (torch.bfloat16, lambda n, k: (-(-n // 64), -(-k // 64)))}, dq_fp8_block, 25),
    "gptq": ({"qweight": (torch.int32, lambda n, k: (k // 8, n)), "qzeros": (torch.int32, lambda n, k: (k // 32, n // 8)),
              "scales": (torch.float16, lambda n, k: (k // 32, n)), "g_idx": (torch.int32, lambda n, k: (k,))},
             lambda t: dq_gptq(t, v2=False), 15),
    "gptq_v2_asym_actorder": ({"qweight": (torch.int32, lambda n, k: (k // 8, n)),
                               "qzeros": (torch.int32, lambda n, k: (k // 32, n // 8)),
                               "scales": (torch.float16, lambda n, k: (k // 32, n)),
                               "g_idx": (torch.int32, lambda n, k: (k,))}, lambda t: dq_gptq(t, v2=True), 15),
    "awq": ({"qweight": (torch.int32, lambda n, k: (k, n // 8)), "qzeros": (torch.int32, lambda n, k: (k // 32, n // 8)),
             "scales": (torch.float16, lambda n, k: (k // 32, n))}, dq_awq, 15),
    "int8": ({"weight": (torch.int8, lambda n, k: (n, k)), "weight_scale": (torch.bfloat16, lambda n, k: (n, 1))},
             dq_scaled, 35),
    "ct_w4a16": ({"weight_packed": (torch.int32, lambda n, k: (n, k // 8)), "weight_shape": (torch.int64, lambda n, k: (2,)),
                  "weight_scale": (torch.bfloat16, lambda n, k: (n, k // 32))}, dq_ct_pack, 15),
    "fp8_ct": ({"weight": (E4M3, lambda n, k: (n, k)), "weight_scale": (torch.bfloat16, lambda n, k: (n, 1))},
               dq_scaled, 25),
}


def test_fixture_names_match_specs():
    assert set(fx.FIXTURES) == set(SPECS)


# ---- every checkpoint --------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SPECS))
def test_checkpoint_files_config_and_tensors(fixture_dirs, ref, name):
    cfg, W = ref
    d = fixture_dirs[name]
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f"{name}: {f} missing"
    config = json.loads((d / "config.json").read_text())
    args = ModelArgs.from_hf(d)
    assert args.identity() == ModelArgs.from_hf(cfg).identity()
    assert (args.hidden_size, args.num_experts, args.moe_intermediate_size, args.head_dim) == (256, 8, 96, 64)
    assert args.is_moe_layer(1) and not args.is_moe_layer(0)
    fmt, params, _ = fx.FIXTURES[name]
    qc = config.get("quantization_config")
    assert (qc is None) == (fmt == "dense")
    plain_dtype = torch.float16 if name == "awq" else torch.bfloat16
    assert args.torch_dtype == {torch.float16: "float16", torch.bfloat16: "bfloat16"}[plain_dtype]

    tensors = read_all(d)
    spec, decode, min_db = SPECS[name]
    linears = linear_modules(cfg)
    expected_names = {n for n in fx.weight_shapes(cfg) if n.removesuffix(".weight") not in linears}
    expected_names |= {f"{m}.{s}" for m in linears for s in spec}
    assert set(tensors) == expected_names
    for n, shape in fx.weight_shapes(cfg).items():
        if n.removesuffix(".weight") not in linears:       # embeddings, norms, router, lm_head
            assert tensors[n].dtype == plain_dtype and tuple(tensors[n].shape) == shape, n
            if name != "awq" or "layernorm" not in n:       # AWQ folds its norms
                assert torch.equal(tensors[n].float(), W[n].to(plain_dtype).float()), n
    for m, (N, K) in linears.items():
        for s, (dtype, shape) in spec.items():
            t = tensors[f"{m}.{s}"]
            assert t.dtype == dtype and tuple(t.shape) == shape(N, K), (m, s, t.dtype, tuple(t.shape))
        if qc is not None:
            assert resolve_scheme(qc, m) is not None, m     # the config says every linear is quantized
    for m in ("lm_head", "model.layers.1.mlp.gate"):            # linears the producers leave in float
        assert resolve_scheme(qc, m) is None, m

    # values: decode with the independent decoders, compare with what was packed
    ref_w = fx.awq_fold(cfg, W, fx.awq_fold_scales(cfg, SEED)) if name == "awq" else W
    for m in ("model.layers.0.self_attn.k_proj", "model.layers.0.mlp.down_proj",
              "model.layers.1.mlp.experts.3.up_proj", "model.layers.1.mlp.experts.5.down_proj"):
        t = {s: tensors[f"{m}.{s}"] for s in spec}
        got = decode(t)
        assert got.shape == ref_w[f"{m}.weight"].shape
        # mixprec's own loader reads it back to the same values (config keys as the loader expects)
        N, K = linears[m]
        packed = load_module(t, N, K, resolve_scheme(qc, m), f"{name}:{m}", dtype=torch.float32)
        torch.testing.assert_close(dequant(packed), got, rtol=0, atol=0)
        db = sqnr_db(ref_w[f"{m}.weight"], got)
        assert db >= min_db, f"{name} {m}: SQNR {db:.1f} dB < {min_db}"
        assert db < 60 or name == "bf16", f"{name} {m}: SQNR {db:.1f} dB, not quantized?"


def test_format_specific_details(fixture_dirs, ref):
    cfg, _ = ref
    # fp8: the expert dims (96) leave a partial 32-row / 32-col edge block of 64
    t = read_all(fixture_dirs["fp8"])
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"].shape == (2, 4)
    assert t["model.layers.1.mlp.experts.0.down_proj.weight_scale_inv"].shape == (4, 2)
    # gptq v1 symmetric: every zero word stores zero-1 = 7 in each nibble; g_idx natural
    t = read_all(fixture_dirs["gptq"])
    for m in linear_modules(cfg):
        assert bool((t[f"{m}.qzeros"] == 0x77777777).all()), m
        K = t[f"{m}.g_idx"].shape[0]
        assert torch.equal(t[f"{m}.g_idx"], (torch.arange(K) // 32).to(torch.int32)), m
    # gptq v2 asym act-order: g_idx a non-monotonic grouping of 32 inputs per group, different
    # per module; zero points not all the symmetric value
    t = read_all(fixture_dirs["gptq_v2_asym_actorder"])
    g1, g2 = t["model.layers.0.self_attn.q_proj.g_idx"], t["model.layers.0.self_attn.k_proj.g_idx"]
    assert not bool((g1[1:] >= g1[:-1]).all())
    assert torch.equal(torch.bincount(g1.long()), torch.full((256 // 32,), 32))
    assert not torch.equal(g1, g2)
    assert not bool((t["model.layers.0.self_attn.q_proj.qzeros"] == -2004318072).all())  # 0x88888888
    # ct_pack: weight_shape holds [N, K]
    t = read_all(fixture_dirs["ct_w4a16"])
    assert t["model.layers.1.mlp.experts.2.down_proj.weight_shape"].tolist() == [256, 96]
    # sharded checkpoints: an index over exactly the tensors of the shards
    for name in ("bf16", "fp8"):
        d = fixture_dirs[name]
        index = json.loads((d / "model.safetensors.index.json").read_text())
        files = sorted(p.name for p in d.glob("*.safetensors"))
        assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert sorted(set(index["weight_map"].values())) == files
        t = read_all(d)
        assert set(index["weight_map"]) == set(t)
        assert index["metadata"]["total_size"] == sum(x.numel() * x.element_size() for x in t.values())
    # configs: published spelling for bf16/fp8/gptq/awq, transformers>=5 spelling for the others
    for name, keys in (("bf16", ("num_experts", "rope_theta", "torch_dtype")),
                       ("int8", ("num_local_experts", "rope_parameters", "dtype"))):
        c = json.loads((fixture_dirs[name] / "config.json").read_text())
        assert all(k in c for k in keys), (name, keys)


# ---- transformers ------------------------------------------------------------------------

def test_bf16_loads_in_transformers(fixture_dirs, ref):
    transformers = pytest.importorskip("transformers")
    cfg, W = ref
    model = transformers.Qwen3MoeForCausalLM.from_pretrained(fixture_dirs["bf16"], torch_dtype=torch.float32)
    sd = model.state_dict()
    seen = set()
    for n, w in W.items():
        m = n.split(".mlp.experts.")
        if len(m) == 2:                           # transformers >= 5 stacks experts: gate_up_proj [E, 2I, H]
            e, proj = int(m[1].split(".")[0]), m[1].split(".")[1]
            if f"{m[0]}.mlp.experts.gate_up_proj" in sd:
                I = cfg["moe_intermediate_size"]
                if proj == "down_proj":
                    key, got = f"{m[0]}.mlp.experts.down_proj", sd[f"{m[0]}.mlp.experts.down_proj"][e]
                else:
                    key = f"{m[0]}.mlp.experts.gate_up_proj"
                    got = sd[key][e, :I] if proj == "gate_proj" else sd[key][e, I:]
                seen.add(key)
                assert torch.equal(got, w), n
                continue
        assert torch.equal(sd[n], w), n
        seen.add(n)
    assert seen == set(sd)
    # the model's function is not degenerate: activations O(1), top-1 varies with the input
    ids = torch.randint(0, cfg["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    for h in out.hidden_states:
        assert 0.3 < float(h.pow(2).mean().sqrt()) < 3
    assert out.logits.argmax(-1).unique().numel() >= 16
    # the v5-spelled configs read the same in transformers >= 5 (4.x does not know num_local_experts)
    if int(transformers.__version__.split(".")[0]) >= 5:
        c = transformers.AutoConfig.from_pretrained(fixture_dirs["int8"])
        assert (c.num_experts, c.rope_parameters["rope_theta"], c.head_dim) == (8, 1e6, 64)


def test_tokenizer_in_transformers(fixture_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    d = fixture_dirs["gptq"]
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    assert len(tok) == cfg["vocab_size"] == 512
    ids = special_token_ids(512)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == ids["<|im_end|>"] == cfg["eos_token_id"]
    assert tok.pad_token_id == ids["<|endoftext|>"] == cfg["bos_token_id"] and tok.bos_token is None
    for text in ("The quick brown fox jumps over 13 lazy dogs.", "naïve café — 東京\n\n  x[0] = {'a': 1}"):
        enc = tok.encode(text)
        assert tok.decode(enc) == text
        assert max(enc) < ids["<|endoftext|>"]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == ids["<|im_start|>"]
    assert tok.encode("The morning train")[:3] != [ord(c) for c in "The"]  # merges are used
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nok\n</think>\n\nHello."}, {"role": "user", "content": "Bye"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
                    "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # our renderer (runtime/text.py) gives transformers' text: the template's default (Qwen3:
    # thinking on) and its non-thinking mode
    from mixprec.runtime.text import Tokenizer
    ours = Tokenizer.from_dir(d)
    assert ours.apply_chat_template(msgs, enable_thinking=False) == text
    default = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.apply_chat_template(msgs) == default != text and default.endswith("<|im_start|>assistant\n")
    # tools, an earlier call and its result (serve's tool calling renders through this)
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    turns = [{"role": "user", "content": "Weather?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
             {"role": "tool", "content": "sunny"}]
    assert ours.apply_chat_template(turns, tools=tools) == tok.apply_chat_template(
        turns, tools=tools, tokenize=False, add_generation_prompt=True)
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    # deterministic: a fresh build is byte-identical; other sizes keep the specials on top
    build_tokenizer(tmp_path / "again", 512)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (d / "tokenizer.json").read_bytes()
    big = build_tokenizer(tmp_path / "big", 1500)
    assert big == special_token_ids(1500) and list(big) == list(SPECIAL_TOKENS)
    assert len(transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "big")) == 1500


# ---- AWQ folding -------------------------------------------------------------------------

def rms(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def test_awq_fold_preserves_function(fixture_dirs, ref):
    cfg, W = ref
    s = fx.awq_fold_scales(cfg, SEED)
    assert s == {} or all(float(v.std()) > 0.1 for v in s.values())
    F = fx.awq_fold(cfg, W, s)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, cfg["hidden_size"], generator=g)
    D, nq, nkv = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}"
        # the folded norm / q_proj pair gives the original q (and k, v)
        for proj in ("q_proj", "k_proj", "v_proj"):
            a = rms(x, F[f"{p}.input_layernorm.weight"]) @ F[f"{p}.self_attn.{proj}.weight"].t()
            b = rms(x, W[f"{p}.input_layernorm.weight"]) @ W[f"{p}.self_attn.{proj}.weight"].t()
            if proj == "v_proj":                      # v carries 1/s2 until o_proj
                b = b / s[f"{p}.self_attn.v_proj"]
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # v -> o across GQA groups: o(expand(v / s2)) with o*s2 == o(expand(v))
        v = torch.randn(5, nkv * D, generator=g)

        def expand(t):
            return t.view(-1, nkv, 1, D).expand(-1, nkv, nq // nkv, D).reshape(-1, nq * D)
        a = expand(v / s[f"{p}.self_attn.v_proj"]) @ F[f"{p}.self_attn.o_proj.weight"].t()
        torch.testing.assert_close(a, expand(v) @ W[f"{p}.self_attn.o_proj.weight"].t(), rtol=1e-5, atol=1e-5)
        # the MLP (dense or one expert) with its folded norm
        m = f"{p}.mlp.experts.6" if fx.is_moe_layer(cfg, l) else f"{p}.mlp"

        def mlp(Wd, norm_w):
            h = rms(x, norm_w)
            return (torch.nn.functional.silu(h @ Wd[f"{m}.gate_proj.weight"].t()) * (h @ Wd[f"{m}.up_proj.weight"].t())
                    ) @ Wd[f"{m}.down_proj.weight"].t()
        torch.testing.assert_close(mlp(F, F[f"{p}.post_attention_layernorm.weight"]),
                                   mlp(W, W[f"{p}.post_attention_layernorm.weight"]), rtol=1e-4, atol=1e-5)
    # the scales are really applied: folded weights differ, the router is left as is (AutoAWQ)
    assert not torch.allclose(F["model.layers.0.self_attn.q_proj.weight"], W["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(F["model.layers.1.mlp.gate.weight"], W["model.layers.1.mlp.gate.weight"])
    F3 = fx.awq_fold(cfg, W, s, fold_vo=False)            # AutoAWQ's GQA behaviour: v/o untouched
    o, v = "model.layers.1.self_attn.o_proj.weight", "model.layers.1.self_attn.v_proj.weight"
    assert torch.equal(F3[o], W[o]) and not torch.equal(F[o], W[o])
    assert torch.equal(F3[v], W[v] * s["model.layers.1.input_layernorm"]) and not torch.equal(F[v], F3[v])
    F2 = fx.awq_fold(cfg, W, s, fold_router=True)
    torch.testing.assert_close(F2["model.layers.1.mlp.gate.weight"],
                               W["model.layers.1.mlp.gate.weight"] * s["model.layers.1.post_attention_layernorm"])
    # the AWQ checkpoint stores the folded norms (fp16) and the unfolded router
    t = read_all(fixture_dirs["awq"])
    for n in ("model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"):
        assert torch.equal(t[n], F[n].half()), n
    assert torch.equal(t["model.layers.1.mlp.gate.weight"], W["model.layers.1.mlp.gate.weight"].half())


# ---- write_checkpoint options ------------------------------------------------------------

SMALL = dict(layers=2, hidden=64, experts=4, top_k=2, heads=2, kv_heads=1, head_dim=32,
             moe_intermediate=32, intermediate=64, vocab=300)


@pytest.mark.parametrize("fmt,params,overrides", [
    ("gptq", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "checkpoint_format": "gptq"},
     {r".*\.experts\.1\.": None, r"model\.layers\.1\.self_attn\.o_proj": {"bits": 8}}),
    ("ct_pack", {"bits": 4, "group_size": 32, "sym": True},
     {r".*\.layers\.0\.mlp\.": None, r".*experts\.(0|2)\.down_proj": {"bits": 8}}),
    ("awq", {"bits": 4, "group_size": 32}, {r"model\.layers\.0\.self_attn\.[qk]_proj": None}),
    ("fp8_block", {"block": [32, 32]}, {r".*\.experts\.3\.(up|gate)_proj": None}),
])
def test_overrides_recorded_in_config(tmp_path, fmt, params, overrides):
    cfg = fx.tiny_config(**SMALL)
    W = fx.round_to(fx.random_weights(cfg, 5))
    d = fx.write_checkpoint(tmp_path / fmt, cfg, W, fmt, params, overrides=overrides, tokenizer=False)
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    t = read_all(d)
    for m, (N, K) in linear_modules(cfg).items():
        hit = next((o for pat, o in overrides.items() if re.match(pat, m)), "base")
        scheme = resolve_scheme(qc, m)
        if hit is None:
            assert scheme is None, m
            assert t[f"{m}.weight"].dtype == torch.bfloat16 and torch.equal(t[f"{m}.weight"].float(), W[f"{m}.weight"])
        else:
            assert scheme is not None, m
            bits = hit["bits"] if hit != "base" else params.get("bits")
            if fmt == "gptq":
                assert scheme["bits"] == bits and t[f"{m}.qweight"].shape == (K * bits // 32, N), m
            elif fmt == "ct_pack":
                assert scheme["weights"]["num_bits"] == bits and t[f"{m}.weight_packed"].shape == (N, K * bits // 32), m
            elif fmt == "awq":
                assert t[f"{m}.qweight"].shape == (K, N // 8) and f"{m}.weight" not in t, m
            else:
                assert t[f"{m}.weight"].dtype == E4M3, m
    assert not (tmp_path / fmt / "tokenizer.json").exists()


def test_write_checkpoint_rejects_bad_input(tmp_path):
    cfg = fx.tiny_config(**SMALL)
    W = fx.random_weights(cfg, 1)
    with pytest.raises(ValueError, match="match no targeted module"):
        fx.write_checkpoint(tmp_path / "a", cfg, W, "gptq", {"bits": 4, "group_size": 32},
                            overrides={r"model\.layers\.9\.": None}, tokenizer=False)
    with pytest.raises(ValueError, match="cannot record"):
        fx.write_checkpoint(tmp_path / "b", cfg, W, "awq", {"group_size": 32},
                            overrides={r".*down_proj": {"group_size": 64}}, tokenizer=False)
    with pytest.raises(ValueError, match="ignore list always wins"):
        fx.write_checkpoint(tmp_path / "d", cfg, W, "ct_pack", {"group_size": 32},
                            overrides={r".*down_proj": {"bits": 8}, r".*experts\.0\.": None}, tokenizer=False)
    bad = dict(W)
    del bad["model.layers.1.mlp.experts.2.up_proj.weight"]
    with pytest.raises(ValueError, match="experts.2.up_proj"):
        fx.write_checkpoint(tmp_path / "c", cfg, bad, tokenizer=False)
    with pytest.raises(ValueError, match="kv_heads"):
        fx.tiny_config(heads=4, kv_heads=3)


def test_random_weights_seeded_and_tied(tmp_path):
    cfg = fx.tiny_config(**SMALL, tie=True, mlp_only_layers=())
    a, b, c = fx.random_weights(cfg, 1), fx.random_weights(cfg, 1), fx.random_weights(cfg, 2)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["model.norm.weight"], c["model.norm.weight"])
    assert "lm_head.weight" not in a and "model.layers.0.mlp.gate.weight" in a
    d = fx.write_checkpoint(tmp_path / "tied", cfg, a, shards=3)
    assert len(list(d.glob("*.safetensors"))) == 3
    args = ModelArgs.from_hf(d)
    assert args.tie_word_embeddings and args.is_moe_layer(0)


def test_cli(tmp_path):
    rc = fx.main([str(tmp_path), "--formats", "bf16,ct_w4a16", "--layers", "3", "--hidden", "64", "--experts", "4",
                  "--top-k", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "32", "--moe-intermediate", "32",
                  "--intermediate", "64", "--vocab", "300", "--seed", "7", "--mlp-only-layers", ""])
    assert rc == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "ct_w4a16"]
    args = ModelArgs.from_hf(tmp_path / "ct_w4a16")
    assert (args.num_hidden_layers, args.hidden_size, args.num_experts, args.num_experts_per_tok) == (3, 64, 4, 1)
    assert all(args.is_moe_layer(l) for l in range(3))
    _, W = fx.fixture_weights(seed=7, layers=3, hidden=64, experts=4, top_k=1, heads=2, kv_heads=1, head_dim=32,
                              moe_intermediate=32, intermediate=64, vocab=300, mlp_only_layers=())
    t = read_all(tmp_path / "bf16")
    assert torch.equal(t["model.layers.2.mlp.experts.3.down_proj.weight"].float(),
                       W["model.layers.2.mlp.experts.3.down_proj.weight"])
