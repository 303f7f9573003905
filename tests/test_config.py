"""MixConfig: both YAML forms, SGLang names, expert ranges, rule order, typed errors."""
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from mixprec.config import (MixConfig, ModelArgs, Rule, format_experts, hf_pattern, load_config, normalize_name,
                            parse_experts)
from mixprec.errors import ConfigError

CFG = {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32,
       "num_experts": 8, "num_experts_per_tok": 2, "torch_dtype": "bfloat16"}
NAMES = list(ModelArgs.from_hf(CFG).linear_shapes())
L0E = "model.layers.0.mlp.experts"


@pytest.fixture
def dirs(tmp_path):
    """Checkpoint directories (only their existence matters to the config)."""
    out = {}
    for n in ("base", "fp8", "gptq", "awq"):
        (tmp_path / n).mkdir()
        (tmp_path / n / "config.json").write_text(json.dumps(CFG))
        out[n] = tmp_path / n
    return out


def write(tmp_path, d, name="mix.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def seed(dirs, mapping, **paths):
    mp = {"base_model_path": str(dirs["base"]), **paths, "weight_mapping": mapping}
    return {"mixed_precision": mp}


def test_normalize_and_hf_pattern():
    assert normalize_name(f"{L0E}.7.w13_weight") == [f"{L0E}.7.gate_proj", f"{L0E}.7.up_proj"]
    assert normalize_name(f"{L0E}.7.w2.weight") == [f"{L0E}.7.down_proj"]
    assert normalize_name("model.layers.1.self_attn.qkv_proj.weight") == [
        f"model.layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]
    assert normalize_name("model.layers.1.mlp.gate_up_proj") == ["model.layers.1.mlp.gate_proj",
                                                                 "model.layers.1.mlp.up_proj"]
    assert normalize_name(f"{L0E}.w13_weight") == [f"{L0E}.*.gate_proj", f"{L0E}.*.up_proj"]
    assert normalize_name("lm_head.weight") == ["lm_head"]
    # regex tokens: w1 is gate only (not the w1 of w13), \w stays a regex class
    rx = re.compile(hf_pattern(r"experts\.\d+\.w1"))
    assert rx.search(f"{L0E}.3.gate_proj") and not rx.search(f"{L0E}.3.up_proj")
    rx = re.compile(hf_pattern(r"experts\.(\d+)\.w13_weight$"))
    assert rx.search(f"{L0E}.3.up_proj") and rx.search(f"{L0E}.3.gate_proj") and not rx.search(f"{L0E}.3.down_proj")
    assert hf_pattern(r"self_attn\.qkv_proj\.weight") == r"self_attn\.(?:q_proj|k_proj|v_proj)"
    assert hf_pattern(r"experts\.\w1") == r"experts\.\w1"


def test_expert_ranges():
    assert parse_experts("0-3, 7,10-11", "w") == frozenset({0, 1, 2, 3, 7, 10, 11})
    assert parse_experts([1, "4-5"], "w") == frozenset({1, 4, 5}) and parse_experts(6, "w") == frozenset({6})
    assert format_experts({0, 1, 2, 3, 7, 10, 11}) == "0-3,7,10-11"
    for bad in ("3-1", "a", "", -1, True):
        with pytest.raises(ConfigError, match="w: experts"):
            parse_experts(bad, "w")


def test_seed_and_native_forms_resolve_the_same(tmp_path, dirs):
    s = write(tmp_path, seed(dirs, {
        f"{L0E}.0.w13_weight": "gptq_int4",                       # SGLang: gate+up of expert 0
        f"{L0E}.0.w2_weight": "fp8",
        "model.layers.1.self_attn.qkv_proj.weight": "fp8",
        "model.layers.0.self_attn.o_proj.weight": "gptq_int4",
        **{f"model.layers.1.mlp.experts.{e}.down_proj": "gptq_int4" for e in range(2, 8)},
    }, fp8_path="fp8", gptq_int4_path="gptq"), "seed.yaml")       # relative to the YAML's directory
    n = write(tmp_path, {
        "model": "base", "sources": {"fp8": "fp8", "gptq_int4": str(dirs["gptq"])},
        "weights": [
            {"match": r"layers\.0\.mlp\.experts\.0\.w13", "use": "gptq_int4"},
            {"match": r"layers\.0\.mlp\.experts\.0\.down_proj", "use": "fp8"},
            {"match": r"layers\.1\.self_attn\.(q|k|v)_proj", "use": "fp8"},
            {"match": r"layers\.0\.self_attn\.o_proj", "use": "gptq_int4"},
            {"match": r"layers\.1\.mlp\.experts\.\d+\.down_proj", "experts": "2-7", "use": "gptq_int4"},
        ]}, "native.yaml")
    a, b = MixConfig.from_yaml(s), MixConfig.from_yaml(n)
    assert a.form == "seed" and b.form == "native"
    assert a.sources == b.sources == {"model": dirs["base"], "fp8": dirs["fp8"], "gptq_int4": dirs["gptq"]}
    ra, rb = a.resolve(NAMES), b.resolve(NAMES)
    assert set(ra) == set(NAMES)
    assert {k: v[0] for k, v in ra.items()} == {k: v[0] for k, v in rb.items()}
    assert ra[f"{L0E}.0.up_proj"][0] == "gptq_int4" and ra[f"{L0E}.0.down_proj"][0] == "fp8"
    assert ra[f"{L0E}.1.up_proj"] == ("model", None)
    assert ra["model.layers.1.mlp.experts.1.down_proj"][0] == "model"
    assert ra["model.layers.1.mlp.experts.5.down_proj"][0] == "gptq_int4"
    assert ra["model.layers.1.self_attn.v_proj"][1].origin == "weight_mapping['model.layers.1.self_attn.qkv_proj.weight']"
    assert rb["model.layers.1.mlp.experts.5.down_proj"][1].origin == "weights[4]"
    # both write back to the native form and read back to the same resolution
    for cfg in (a, b):
        back = write(tmp_path, yaml.safe_load(cfg.to_yaml()), "back.yaml")
        assert {k: v[0] for k, v in MixConfig.from_yaml(back).resolve(NAMES).items()} == {k: v[0] for k, v in ra.items()}


def test_first_match_wins(dirs):
    d = {"model": str(dirs["base"]), "sources": {"fp8": str(dirs["fp8"]), "gptq": str(dirs["gptq"])},
         "weights": [{"match": r"layers\.1\.mlp\.experts", "use": "model"},
                     {"match": r"experts\.\d+\.down_proj", "experts": "0-3", "use": "fp8"},
                     {"match": r"mlp\.experts", "use": "gptq"},
                     {"match": "self_attn", "use": "fp8"}],
         "parallel": {"tp": 2}, "dtype": "fp16"}
    cfg = MixConfig.from_dict(d)
    assert cfg.parallel.tp == 2 and cfg.parallel["ep"] == 1 and cfg.dtype == torch.float16
    r = cfg.resolve(NAMES)
    assert r["model.layers.1.mlp.experts.2.down_proj"][0] == "model"
    assert r[f"{L0E}.2.down_proj"][0] == "fp8" and r[f"{L0E}.5.down_proj"][0] == "gptq"
    assert r[f"{L0E}.2.gate_proj"][0] == "gptq" and r["model.layers.0.self_attn.o_proj"][0] == "fp8"
    assert r["lm_head"] == ("model", None)


def test_sglang_stacked_expert_names(tmp_path, dirs):
    cfg = MixConfig.from_dict(seed(dirs, {f"{L0E}.w2_weight": "fp8", f"{L0E}.3.down_proj": "fp8"},
                                   fp8_path=str(dirs["fp8"])))
    r = cfg.resolve(NAMES)
    assert all(r[f"{L0E}.{e}.down_proj"][0] == "fp8" for e in range(8))
    assert r[f"{L0E}.0.up_proj"][0] == "model" and r["model.layers.1.mlp.experts.0.down_proj"][0] == "model"
    back = write(tmp_path, yaml.safe_load(cfg.to_yaml()))
    assert {k: v[0] for k, v in MixConfig.from_yaml(back).resolve(NAMES).items()} == {k: v[0] for k, v in r.items()}


def test_rule_matching_nothing_and_shadowed_rule(dirs):
    d = {"model": str(dirs["base"]), "sources": {"fp8": str(dirs["fp8"])},
         "weights": [{"match": "self_attn", "use": "fp8"},
                     {"match": r"expert\.\d+\.w13", "use": "fp8"},            # typo: expert.
                     {"match": r"self_attn\.q_proj", "use": "model"},         # shadowed by weights[0]
                     {"match": r"experts\.\d+\.w1", "experts": "6-9", "use": "fp8"}]}
    with pytest.raises(ConfigError) as ei:
        MixConfig.from_dict(d).resolve(NAMES)
    msg = str(ei.value)
    assert len(ei.value.errors) == 3, msg
    assert r"weights[1] {match: 'expert\\.\\d+\\.w13', use: fp8}: matches no weight of the model" in msg
    assert "weights[2]" in msg and "taken by an earlier rule" in msg
    assert "weights[3]" in msg and "experts 8-9 do not exist (the model has experts 0-7)" in msg
    assert r"(as HF names: 'expert\\.\\d+\\.(?:gate_proj|up_proj)')" in msg


def test_seed_errors(tmp_path, dirs):
    d = seed(dirs, {f"{L0E}.7.w13_weight": "fp8", f"{L0E}.7.up_proj": "gptq_int4",       # conflict
                    f"{L0E}.99.w2_weight": "fp8",                                          # no expert 99
                    "model.layers.0.mlp.gate.weight": "fp8",                               # the router
                    "model.layers.0.self_attn.q_proj.weight": "awq_int4",                  # no awq path
                    "model.layers.0.self_attn.k_proj.weight": "int4"},                     # unknown format
             fp8_path=str(dirs["fp8"]), gptq_int4_path=str(dirs["gptq"]))
    with pytest.raises(ConfigError) as ei:
        MixConfig.from_dict(d)
    msg = str(ei.value)
    assert len(ei.value.errors) == 2, msg
    assert "weight_mapping['model.layers.0.self_attn.q_proj.weight']: format 'awq_int4' but mixed_precision.awq_int4_path is not set" in msg
    assert "weight_mapping['model.layers.0.self_attn.k_proj.weight']: unknown format 'int4' (known: fp16, bf16, fp8, gptq_int4" in msg
    del d["mixed_precision"]["weight_mapping"]["model.layers.0.self_attn.q_proj.weight"]
    del d["mixed_precision"]["weight_mapping"]["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ConfigError) as ei:
        MixConfig.from_dict(d).resolve(NAMES)
    msg = str(ei.value)
    assert len(ei.value.errors) == 3, msg
    assert (f"{L0E}.7.up_proj: conflicting entries: weight_mapping['{L0E}.7.w13_weight'] says fp8, "
            f"weight_mapping['{L0E}.7.up_proj'] says gptq_int4") in msg
    assert f"weight_mapping['{L0E}.99.w2_weight']: the model has no weight {L0E}.99.down_proj (the model has experts 0-7)" in msg
    assert "weight_mapping['model.layers.0.mlp.gate.weight']: the model has no weight model.layers.0.mlp.gate (not a linear" in msg


def test_paths_keys_and_collected_errors(tmp_path, dirs):
    d = {"model": "base", "sources": {"fp8": "missing_dir"}, "wieghts": [],
         "weights": [{"match": "q_proj", "use": "gptq"}, {"match": "(", "use": "model"},
                     {"match": "k_proj", "use": "model", "expert": "1"}],
         "parallel": {"tp": 0, "pp": 2}, "dtype": "int8"}
    p = write(tmp_path, d)
    with pytest.raises(ConfigError) as ei:
        MixConfig.from_yaml(p)
    msg = str(ei.value)
    assert msg.startswith(f"{p}: 8 errors in the mix config"), msg
    for part in ("unknown key 'wieghts'", f"sources.fp8: 'missing_dir' (resolved to {tmp_path / 'missing_dir'}) does not exist",
                 "weights[0]: use 'gptq' is not a source", "weights[1]: match '(' is not a valid regex",
                 "weights[2]: unknown key(s) 'expert'", "parallel.tp: expected a positive integer",
                 "parallel: unknown key 'pp'", "dtype: 'int8'"):
        assert part in msg, part
    with pytest.raises(ConfigError, match="mixed_precision.base_model_path: missing"):
        MixConfig.from_dict({"mixed_precision": {"fp8_path": str(dirs["fp8"])}})
    with pytest.raises(ConfigError, match="mixed_precision: unknown key 'fp4_path'"):
        MixConfig.from_dict(seed(dirs, {}, fp4_path=str(dirs["fp8"])))
    with pytest.raises(ConfigError, match="model: missing"):
        MixConfig.from_dict({"sources": {}})
    (tmp_path / "bad.yaml").write_text("model: [")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        MixConfig.from_yaml(tmp_path / "bad.yaml")


def test_load_config_accepts_everything(tmp_path, dirs):
    c = load_config(dirs["base"])
    assert c.form == "checkpoint" and c.sources == {"model": dirs["base"]} and c.rules == ()
    assert all(v == ("model", None) for v in c.resolve(NAMES).values())
    p = write(tmp_path, {"model": str(dirs["base"])})
    assert load_config(p).model == dirs["base"] and load_config(str(p)).origin == str(p)
    assert load_config({"model": str(dirs["base"])}).origin == "<dict>"
    assert load_config(c) is c
    with pytest.raises(ConfigError, match="no such mix config"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        load_config(tmp_path)


def test_programmatic_exact_rules_compact_to_ranges(tmp_path, dirs):
    """A planner's per-weight rules write out as a few regex rules with expert ranges."""
    rules = [Rule(f"model.layers.{l}.mlp.experts.{e}.{p}", None, "fp8" if e < 5 else "gptq", f"plan[{l},{e},{p}]", True)
             for l in (0, 1) for e in range(8) for p in ("gate_proj", "up_proj", "down_proj")]
    rules.append(Rule("lm_head", None, "fp8", "plan[lm_head]", True))
    cfg = MixConfig(model=dirs["base"], sources={"fp8": dirs["fp8"], "gptq": dirs["gptq"]}, rules=tuple(rules))
    r = cfg.resolve(NAMES)
    out = yaml.safe_load(cfg.to_yaml())
    assert len(out["weights"]) == 3, out["weights"]
    assert {w["experts"] for w in out["weights"] if "experts" in w} == {"0-4", "5-7"}
    back = MixConfig.from_yaml(write(tmp_path, out))
    assert {k: v[0] for k, v in back.resolve(NAMES).items()} == {k: v[0] for k, v in r.items()}
    with pytest.raises(ConfigError, match="use 'int8' is not a source"):
        MixConfig(model=dirs["base"], rules=(Rule("lm_head", None, "int8", "x", True),))


def test_tied_lm_head_hint(dirs):
    names = [n for n in NAMES if n != "lm_head"]
    cfg = MixConfig.from_dict(seed(dirs, {"lm_head.weight": "fp8"}, fp8_path=str(dirs["fp8"])))
    with pytest.raises(ConfigError, match="lm_head is tied to model.embed_tokens"):
        cfg.resolve(names)


def test_layer_anchored_rules_resolve_like_a_plain_scan():
    """resolve() tests a name only against rules anchored to its layer (the planner writes one rule
    per layer group): the result must equal a plain first-match scan over all rules."""
    import random

    rnd = random.Random(0)
    names = [f"model.layers.{l}.mlp.experts.{e}.{p}_proj" for l in range(12) for e in range(8)
             for p in ("gate", "up", "down")] + [f"model.layers.{l}.self_attn.q_proj" for l in range(12)] + ["lm_head"]
    rules = []
    for i in range(40):
        layers = sorted(rnd.sample(range(12), rnd.randint(1, 4)))
        anchor = (rf"^model\.layers\.{layers[0]}\." if len(layers) == 1
                  else r"^model\.layers\.(?:" + "|".join(map(str, layers)) + r")\.")
        tail = rnd.choice([r"mlp\.experts\.\d+\.down_proj$", r"mlp\.experts\.\d+\.(?:gate_proj|up_proj)$",
                           r"self_attn\.q_proj$", r"mlp\.experts"])
        pat = anchor + tail if i % 5 else tail              # some rules are not anchored
        experts = frozenset(rnd.sample(range(8), 3)) if "experts" in pat and i % 3 == 0 else None
        rules.append(Rule(pat, experts, rnd.choice(["a", "b", "model"]), f"weights[{i}]"))
    # a top-level '|' lets a layer-anchored rule match other layers' names (and lm_head) too
    rules[:0] = [Rule(r"^model\.layers\.0\.self_attn\.q_proj$|^model\.layers\.5\.self_attn\.q_proj$", None, "a",
                      "weights[-2]"),
                 Rule(r"^model\.layers\.2\.mlp\.experts\.1\.up_proj$|lm_head", None, "b", "weights[-1]")]
    cfg = MixConfig(model=Path("."), sources={"model": Path("."), "a": Path("."), "b": Path(".")},
                    rules=tuple(rules), origin="<test>")
    got = cfg.resolve(names, errors=[])             # collects dead-rule complaints instead of raising
    want = {n: next((r.use for r in rules if r.matches(n)), "model") for n in names}
    assert {n: src for n, (src, _) in got.items()} == want


def test_huge_expert_ranges_and_binary_configs_are_refused_at_once(tmp_path):
    from mixprec.config import parse_experts
    with pytest.raises(ConfigError, match="beyond any MoE model"):          # was expanded until out of memory
        parse_experts("0-9999999999", "weights[0]")
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x80\x81\xfe" * 10)
    with pytest.raises(ConfigError, match="not a YAML mix config"):
        MixConfig.from_yaml(f)
