"""make_plan: every linear -> one (source, format) from headers; all problems in one error."""
import json

import pytest
import torch
from safetensors.torch import save_file

from mixprec.config import MixConfig, ModelArgs
from mixprec.errors import CheckpointError, ConfigError, FormatError, MissingWeight, ModelMismatch, ShapeMismatch
from mixprec.formats import FORMATS
from mixprec.loader.checkpoint import Checkpoint
from mixprec.loader.plan import make_plan

CFG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96,
       "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
       "num_experts_per_tok": 2, "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
GPTQ = dict(bits=4, group_size=32, sym=True, desc_act=False)
FP8 = dict(block=(128, 128))
E0 = "model.layers.0.mlp.experts"


def respell_v5(cfg):
    """config.json as transformers >= 5 re-saves it (GPTQModel, llm-compressor): same model."""
    c = {k: v for k, v in cfg.items() if k not in ("num_experts", "rope_theta", "torch_dtype")}
    return {**c, "num_local_experts": cfg["num_experts"], "dtype": cfg["torch_dtype"],
            "rope_parameters": {"rope_theta": cfg["rope_theta"], "rope_type": "default"}}


def build(d, cfg=CFG, fmt=None, params=None, edit=None, shards=1, seed=0):
    """Write a full checkpoint of the tiny model: linears packed by FORMATS[fmt] (lm_head stays
    bf16, as the producers leave it), everything else bf16. `edit(tensors)` mutates before saving."""
    args = ModelArgs.from_hf(cfg)
    g = torch.Generator().manual_seed(seed)
    t = {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in args.plain_tensors().items()}
    for m, (n, k) in args.linear_shapes().items():
        W = torch.randn(n, k, generator=g) * 0.05
        if fmt is None or m == "lm_head":
            t[f"{m}.weight"] = W.to(torch.bfloat16)
        else:
            t.update({f"{m}.{s}": v.contiguous() for s, v in FORMATS[fmt].pack(W, **params).items()})
    if edit:
        edit(t)
    d.mkdir(parents=True)
    extra = {"quantization_config": FORMATS[fmt].config_block(**params)} if fmt else {}
    (d / "config.json").write_text(json.dumps({**cfg, **extra}))
    names = sorted(t)
    if shards == 1:
        save_file(t, str(d / "model.safetensors"))
    else:
        wmap = {}
        for i in range(shards):
            f = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: t[n] for n in names[i::shards]}, str(d / f))
            wmap.update({n: f for n in names[i::shards]})
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wmap}))
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {"base": build(root / "base", shards=2),
            "gptq": build(root / "gptq", cfg=respell_v5(CFG), fmt="gptq", params=GPTQ),
            "fp8": build(root / "fp8", fmt="fp8_block", params=FP8)}


def native(ckpts, weights, **kw):
    return MixConfig.from_dict({"model": str(ckpts["base"]),
                                "sources": {"gptq": str(ckpts["gptq"]), "fp8": str(ckpts["fp8"])},
                                "weights": weights, **kw})


def test_single_checkpoint_is_all_dense(ckpts):
    p = make_plan(MixConfig.for_checkpoint(ckpts["base"]))
    shapes = ModelArgs.from_hf(CFG).linear_shapes()
    assert set(p.entries) == set(shapes) and p.errors == []
    for m, e in p.entries.items():
        assert (e.source, e.fmt_name, e.layout, e.params, e.scheme) == ("model", "dense", "dense", "bf16", None)
        assert (e.n, e.k) == shapes[m] and e.nbytes == e.n * e.k * 2 and e.path == ckpts["base"]
    s = p.summary()
    assert s["bytes"] == s["bf16_bytes"] and s["saving"] == 0 and s["by_source"]["model"]["count"] == len(shapes)
    rows = p.table().splitlines()
    # attention (both layers), experts (both layers, all projections), lm_head, header, 3 summary lines
    assert len(rows) == 1 + 3 + 3, p.table()
    assert any(r.split()[:5] == ["layers", "0-1", "experts", "0-3", "gate_proj,up_proj,down_proj"] for r in rows)


def test_mixed_plan_formats_bytes_and_table(ckpts):
    cfg = native(ckpts, [{"match": r"layers\.0\.mlp\.experts", "use": "gptq"},
                         {"match": r"experts\.\d+\.w2", "experts": "0-1", "use": "fp8"},
                         {"match": r"layers\.1\.self_attn\.qkv_proj", "use": "fp8"}])
    p = make_plan(cfg)
    e = p.entries[f"{E0}.2.up_proj"]
    assert (e.source, e.fmt_name, e.layout, e.params, e.rule_origin) == ("gptq", "gptq", "intq", "int4 g32", "weights[0]")
    assert e.scheme["bits"] == 4 and e.scheme["group_size"] == 32
    # on-disk bytes of qweight [8, 32] i32 + qzeros [2, 4] i32 + scales [2, 32] f16 + g_idx [64] i32
    assert e.nbytes == 8 * 32 * 4 + 2 * 4 * 4 + 2 * 32 * 2 + 64 * 4
    d = p.entries["model.layers.1.mlp.experts.1.down_proj"]
    assert (d.source, d.fmt_name, d.layout, d.params) == ("fp8", "fp8_block", "fp8", "e4m3 block 128x128")
    assert d.nbytes == 64 * 32 + 4            # e4m3 weight + one fp32 block scale
    assert p.entries["model.layers.1.mlp.experts.2.down_proj"].source == "model"
    assert p.entries["model.layers.1.self_attn.v_proj"].source == "fp8"
    assert p.entries["model.layers.1.self_attn.o_proj"].source == "model"
    s = p.summary()
    assert s["by_format"]["gptq"]["count"] == 12 and s["by_format"]["fp8_block"]["count"] == 5
    assert s["bytes"] == sum(x.nbytes for x in p.entries.values()) < s["bf16_bytes"]
    rows = [r.split() for r in p.table().splitlines()]
    assert ["layer", "0", "experts", "0-3", "gate_proj,up_proj", "gptq", "gptq", "int4", "g32", "8"] in [r[:10] for r in rows]
    assert ["layer", "0", "experts", "0-3", "down_proj", "gptq", "gptq", "int4", "channel", "4"] in [r[:10] for r in rows]
    assert ["layer", "1", "experts", "0-1", "down_proj", "fp8", "fp8_block", "e4m3", "block", "128x128"] in [r[:10] for r in rows]
    assert ["layer", "1", "experts", "2-3", "down_proj", "model", "dense", "bf16"] in [r[:8] for r in rows]
    assert len(p.table(all=True).splitlines()) == 1 + len(p.entries) + 3
    j = json.loads(json.dumps(p.to_json()))
    assert j["entries"][f"{E0}.2.up_proj"]["format"] == "gptq" and j["sources"]["gptq"] == str(ckpts["gptq"])


def test_seed_form_gives_the_same_plan(ckpts):
    a = native(ckpts, [{"match": r"layers\.0\.mlp\.experts\.\d+\.w13", "experts": "1,3", "use": "gptq"},
                       {"match": r"layers\.1\.self_attn\.o_proj", "use": "fp8"}])
    b = MixConfig.from_dict({"mixed_precision": {
        "base_model_path": str(ckpts["base"]), "gptq_int4_path": str(ckpts["gptq"]), "fp8_path": str(ckpts["fp8"]),
        "weight_mapping": {f"{E0}.1.w13_weight": "gptq_int4", f"{E0}.3.gate_proj.weight": "gptq_int4",
                           f"{E0}.3.up_proj": "gptq_int4", "model.layers.1.self_attn.o_proj.weight": "fp8"}}})
    pa, pb = make_plan(a), make_plan(b)
    ga = {m: (e.fmt_name, e.path, e.nbytes) for m, e in pa.entries.items()}
    assert ga == {m: (e.fmt_name, e.path, e.nbytes) for m, e in pb.entries.items()}
    assert ga[f"{E0}.3.up_proj"][0] == "gptq" and ga[f"{E0}.2.up_proj"][0] == "dense"


def test_different_model_is_refused_and_spelling_is_not(tmp_path, ckpts):
    other = build(tmp_path / "other", cfg={**CFG, "hidden_size": 128, "num_experts": 8})
    cfg = MixConfig.from_dict({"model": str(ckpts["base"]), "sources": {"o": str(other), "g": str(ckpts["gptq"])},
                               "weights": [{"match": "lm_head", "use": "o"}]})
    with pytest.raises(ModelMismatch) as ei:
        make_plan(cfg)
    msg = str(ei.value)
    assert f"source 'o' ({other}) is not the same model as model ({ckpts['base']})" in msg
    assert "hidden_size 64 vs 128" in msg and "num_experts 4 vs 8" in msg
    assert "'g'" not in msg   # the gptq source differs only in config.json spelling


def test_missing_module_in_source(tmp_path, ckpts):
    def drop(t):
        for s in ("qweight", "qzeros", "scales", "g_idx"):
            del t[f"{E0}.3.down_proj.{s}"]
    g = build(tmp_path / "g", fmt="gptq", params=GPTQ, edit=drop)
    cfg = MixConfig.from_dict({"model": str(ckpts["base"]), "sources": {"g": str(g)},
                               "weights": [{"match": r"layers\.0\.mlp\.experts", "use": "g"}]})
    with pytest.raises(MissingWeight, match=rf"{g}: no tensors for {E0}.3.down_proj \(source 'g', chosen by "
                                            rf"weights\[0\]; nearby: {E0}.3.(gate|up)_proj."):
        make_plan(cfg)


def test_all_problems_in_one_error(tmp_path, ckpts):
    def damage(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:, :32].contiguous()
        t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 64, dtype=torch.int16)   # no format
        del t["model.layers.1.post_attention_layernorm.weight"]
        t["model.layers.0.mlp.gate.weight"] = torch.zeros(5, 64, dtype=torch.bfloat16)
    base = build(tmp_path / "b", edit=damage)
    cfg = MixConfig.from_dict({"model": str(base), "sources": {"g": str(ckpts["gptq"])},
                               "weights": [{"match": "experts", "experts": "0-7", "use": "g"}]})
    with pytest.raises(Exception) as ei:
        make_plan(cfg)
    err = ei.value
    assert type(err).__name__ == "MixprecError" and len(err.errors) == 5, str(err)
    msg = str(err)
    assert "model.layers.0.self_attn.q_proj (dense, source 'model', the default): weight [64, 32], expected [N, K] = [64, 64]" in msg
    assert "model.layers.1.self_attn.k_proj: tensors [weight int16[32, 64]] are no known weight format" in msg
    assert "no tensor 'model.layers.1.post_attention_layernorm.weight'" in msg
    assert "model.layers.0.mlp.gate.weight is bf16[5, 64], expected a float tensor of shape [4, 64]" in msg
    assert "experts 4-7 do not exist (the model has experts 0-3)" in msg
    p = make_plan(cfg, strict=False)
    assert p.errors == err.errors and "model.layers.0.self_attn.q_proj" not in p.entries
    assert "model.layers.0.self_attn.k_proj" in p.entries and "5 errors:" in p.table()
    # problems of one kind raise that kind: a missing tensor and a wrong shape are CheckpointErrors
    def two(t):
        t["lm_head.weight"] = t["lm_head.weight"][:5].contiguous()
        del t["model.norm.weight"]
    with pytest.raises(CheckpointError) as ei:
        make_plan(MixConfig.for_checkpoint(build(tmp_path / "two", edit=two)))
    assert type(ei.value) is CheckpointError and len(ei.value.errors) == 2


def test_quantized_shape_and_format_checks(tmp_path, ckpts):
    def bad_qweight(t):
        t[f"{E0}.0.up_proj.qweight"] = t[f"{E0}.0.up_proj.qweight"][:, :16].contiguous()
    g = build(tmp_path / "g", fmt="gptq", params=GPTQ, edit=bad_qweight)
    cfg = MixConfig.from_dict({"model": str(ckpts["base"]), "sources": {"g": str(g)},
                               "weights": [{"match": r"experts\.0\.up_proj", "use": "g"}]})
    with pytest.raises((ShapeMismatch, FormatError), match=rf"{E0}.0.up_proj"):
        make_plan(cfg)
    # the fp8 source's lm_head is stored bf16 (unquantized, as producers do): plans as dense from fp8
    p = make_plan(native(ckpts, [{"match": "lm_head", "use": "fp8"}]))
    assert (p.entries["lm_head"].source, p.entries["lm_head"].fmt_name) == ("fp8", "dense")


def test_tied_embeddings_have_no_lm_head_entry(tmp_path):
    cfg = {**CFG, "tie_word_embeddings": True}
    d = build(tmp_path / "t", cfg=cfg)
    assert "lm_head.weight" not in Checkpoint(d)
    p = make_plan(MixConfig.for_checkpoint(d))
    assert "lm_head" not in p.entries and p.errors == []
    with pytest.raises(ConfigError, match="tied"):
        make_plan(MixConfig.from_dict({"mixed_precision": {"base_model_path": str(d), "bf16_path": str(d),
                                                           "weight_mapping": {"lm_head.weight": "bf16"}}}))
