"""Synthetic full-size benchmarking models: presets, rule strings and planner YAMLs resolve to the
intended formats, and a reduced model built through the real pack -> load path generates."""
import collections
import re

import pytest
import torch
import yaml

from mixprec.config import ModelArgs
from mixprec.runtime.generate import Generator
from mixprec.runtime.sampling import SamplingParams
from mixprec.runtime.synthetic import ARCHS, build_synthetic, parse_mix, spec_for, synthetic_args


def test_planner_yaml_rules_resolve_first_match(tmp_path):
    y = tmp_path / "mix.yaml"
    y.write_text(yaml.safe_dump({"model": "<bf16>", "sources": {"int4": "<int4>", "fp8": "<fp8>"}, "weights": [
        {"match": r"^model\.layers\.0\.mlp\.experts\.\d+\.down_proj$", "experts": "0-3", "use": "fp8"},
        {"match": r"mlp\.experts", "use": "int4"},
        {"match": r"self_attn\.q_proj", "use": "model"}]}))
    rules = parse_mix(str(y))
    args = synthetic_args("qwen3-30b-a3b", layers=2)
    got = {m: spec_for(m, rules) for m in args.linear_shapes()}
    assert got["model.layers.0.mlp.experts.2.down_proj"] == "fp8"
    assert got["model.layers.0.mlp.experts.4.down_proj"] == "int4"
    assert got["model.layers.1.mlp.experts.2.down_proj"] == "int4"
    assert got["model.layers.0.self_attn.q_proj"] == "bf16" and got["lm_head"] == "bf16"
    assert collections.Counter(got.values())["int4"] == 2 * 128 * 3 - 4
    y.write_text(yaml.safe_dump({"weights": [{"match": "q_proj", "use": "awq_src"}]}))
    with pytest.raises(ValueError, match="awq_src"):
        parse_mix(str(y))


@pytest.mark.parametrize("mix", ["bf16", "fp8", "int4", "int8", "mixed", r"experts\.[0-3]\.=int4-asym;.=fp8"])
def test_reduced_synthetic_model_generates(mix):
    cfg = dict(ARCHS["qwen3-30b-a3b"])
    cfg.update(num_hidden_layers=2, hidden_size=256, moe_intermediate_size=128, num_experts=16,
               vocab_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    args = ModelArgs.from_hf(cfg)
    model = build_synthetic(args, mix, device="cpu", dtype=torch.float32, progress=False)
    expect = {spec_for(m, parse_mix(mix)) for m in args.linear_shapes()}
    names = {"bf16": "bf16", "fp8": "fp8_block", "int4": "gptq", "int4-asym": "awq", "int8": "ct_int8"}
    assert {names[s] for s in expect} == {w.source for w in model.linear_modules().values()}
    out = Generator(model).generate([[1, 2, 3]], SamplingParams(max_new_tokens=3))
    assert len(out[0]) == 3


def test_bench_mix_list_keeps_regex_commas():
    from mixprec.runtime.synthetic import split_mixes
    assert split_mixes("int4,mixed") == ["int4", "mixed"]
    assert split_mixes(r"experts\.[0-9]{1,2}\.=int4;.=fp8, bf16") == [r"experts\.[0-9]{1,2}\.=int4;.=fp8", "bf16"]
    assert split_mixes(r"a\,b=int4,fp8") == [r"a\,b=int4", "fp8"]   # an escaped comma stays in its regex
    with pytest.raises(ValueError, match="empty mix"):
        split_mixes("int4,,fp8")


def test_mix_rules_that_decide_nothing_or_do_not_compile_are_errors():
    from mixprec.runtime.synthetic import synthetic_linears
    args = synthetic_args("qwen3-30b-a3b", layers=2)
    with pytest.raises(ValueError, match=r"bad regex 'experts\[0'"):
        parse_mix("experts[0=int4")
    with pytest.raises(ValueError, match="no 'regex=format' rule"):
        parse_mix(" ; ")
    with pytest.raises(ValueError, match=re.escape(r"rule layers\.7\.=int4 decides no linear")):
        synthetic_linears(args, r"layers\.7\.=int4;.=fp8")          # the model has layers 0-1
    with pytest.raises(ValueError, match=r"rule q_proj=int4 decides no linear"):
        synthetic_linears(args, "self_attn=fp8;q_proj=int4")        # shadowed by the rule before
    assert synthetic_linears(args, r"layers\.1\.=int4;.=fp8")["model.layers.1.mlp.experts.3.up_proj"][2] == "int4"
    assert len(synthetic_linears(args, "mixed")) > 0                  # presets are not checked


def test_bench_cli_rejects_bad_arguments_before_any_gpu_work(capsys):
    from mixprec.runtime import bench
    for argv, msg in ((["--synthetic", "qwen3-30b-a3b", "--mix", "int4,nope=int5"], "unknown format 'int5'"),
                      (["--synthetic", "qwen3-30b-a3b", "--mix", r"layers\.99\.=int4"], "decides no linear"),
                      (["--synthetic", "qwen3-30b-a3b", "--batch", "1,x"], "'x' is not a number"),
                      (["--synthetic", "qwen3-30b-a3b", "--batch", "0"], "must be >= 1"),
                      (["--synthetic", "qwen3-30b-a3b", "--gen-len", "1"], "must be >= 2")):
        with pytest.raises(SystemExit) as e:
            bench.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err, argv
