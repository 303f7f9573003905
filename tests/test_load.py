"""Whole-model loading: every fixture format and a per-expert mix of five formats against
transformers run on the dequantized weights; folded-scale (AWQ) correction; seed API; errors."""
from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import mixprec
from mixprec.demo import DEMO_RULES, write_demo_config
from mixprec.errors import ConfigError, MissingWeight, MixprecError, ModelMismatch, ShapeMismatch
from mixprec.testing.fixtures import FIXTURES, make_fixture

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    root = tmp_path_factory.mktemp("fx")
    return make_fixture(root)


def _plain(ckpt_dir) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that is not part of a quantized linear."""
    out = {}
    for f in sorted(ckpt_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                if k.endswith(("norm.weight", "embed_tokens.weight", "mlp.gate.weight")) or k == "lm_head.weight":
                    out[k] = h.get_tensor(k).float()
    return out


def _hf_reference(base_dir, linear_weight):
    """transformers Qwen3MoeForCausalLM (fp32) with the base's plain tensors and the given
    linear weights (module name -> float [N, K])."""
    cfg = transformers.AutoConfig.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager")
    sd = dict(_plain(base_dir))
    for module, W in linear_weight.items():
        sd[f"{module}.weight"] = W
    # transformers >= 5 may fuse experts into 3-D tensors: map per-expert weights onto them
    own = model.state_dict()
    fused = {}
    for k in list(sd):
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", k)
        if m and k not in own:
            fused.setdefault(m.group(1), {})[(int(m.group(2)), m.group(3))] = sd.pop(k)
    for prefix, parts in fused.items():
        E = 1 + max(e for e, _ in parts)
        if f"{prefix}.gate_up_proj" in own:
            sd[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(E)])
            sd[f"{prefix}.down_proj"] = torch.stack([parts[(e, "down")] for e in range(E)])
            if own[f"{prefix}.gate_up_proj"].shape != sd[f"{prefix}.gate_up_proj"].shape:   # [E, K, 2N] layout
                sd[f"{prefix}.gate_up_proj"] = sd[f"{prefix}.gate_up_proj"].transpose(1, 2).contiguous()
                sd[f"{prefix}.down_proj"] = sd[f"{prefix}.down_proj"].transpose(1, 2).contiguous()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not m.endswith("rotary_emb.inv_freq")]
    if cfg.tie_word_embeddings:
        missing = [m for m in missing if m != "lm_head.weight"]
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def _ids(vocab, B=2, T=12, seed=0):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def _compare(model, ref, vocab, tol=1e-4):
    ids = _ids(vocab)
    with torch.inference_mode():
        got = model(ids)
        want = ref(ids).logits.float()
    err = (got - want).abs().max().item()
    assert err <= tol, f"max |dlogit| {err}"
    return got


@pytest.mark.parametrize("name", list(FIXTURES))
def test_single_format_checkpoint_equals_transformers_on_dequantized(fx, name):
    model = mixprec.load(fx[name], device="cpu", dtype=torch.float32, progress=False)
    shapes = model.args.linear_shapes()
    ref = _hf_reference(fx[name], {m: mixprec.dequantize_weight(fx[name], m) for m in shapes})
    _compare(model, ref, model.args.vocab_size)
    assert model.stats.loaded == model.stats.total == len(shapes)


def _mixed_reference(fx, plan):
    """Reference for a mix: each linear dequantized from its own source; a linear whose source
    folded scales into its norm gets its input columns scaled by norm_src / norm_base."""
    base = fx["bf16"]
    plain_base = _plain(base)
    weights = {}
    for module, e in plan.entries.items():
        W = mixprec.dequantize_weight(e.path, module)
        m = re.match(r"(model\.layers\.\d+)\.(self_attn\.[qkv]_proj|mlp\.(experts\.\d+\.)?(gate|up)_proj)$", module)
        if m and e.source != "model":
            norm = "input_layernorm" if "self_attn" in module else "post_attention_layernorm"
            key = f"{m.group(1)}.{norm}.weight"
            s = _plain(e.path)[key] / plain_base[key]
            W = W * s[None, :]
        weights[module] = W
    return _hf_reference(base, weights)


def test_mixed_five_formats_per_expert_and_projection(fx, tmp_path):
    cfg = write_demo_config(fx, tmp_path / "mix.yaml")
    p = mixprec.plan(cfg)
    fmts = {e.fmt_name for e in p.entries.values()}
    assert {"dense", "fp8_block", "gptq", "ct_int8", "awq", "ct_pack"} <= fmts
    # one MoE layer holds experts of several formats, and expert 6 has gate int4 / up bf16
    layer = [e for m, e in p.entries.items() if ".mlp.experts." in m]
    assert len({e.fmt_name for e in layer}) >= 4
    assert p.entries["model.layers.1.mlp.experts.6.gate_proj"].fmt_name == "gptq"
    assert p.entries["model.layers.1.mlp.experts.6.up_proj"].fmt_name == "dense"
    model = mixprec.load(cfg, device="cpu", dtype=torch.float32, progress=False)
    assert any("self_attn.q_proj" in m for m in model.stats.rescaled), "AWQ q_proj should be rescaled"
    _compare(model, _mixed_reference(fx, p), model.args.vocab_size)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_per_module_mixes_equal_transformers(fx, tmp_path, seed):
    """Every linear from a random fixture (seeded), one exact rule each: experts of a layer and the
    projections of one expert in different formats, act-order and asymmetric GPTQ, fp8 / int8
    compressed-tensors beside the others. AWQ (folded scales) takes whole attention blocks or whole
    experts / MLPs, as inner folds cannot be split; the rest is free."""
    import random
    rng = random.Random(seed)
    model0 = mixprec.load(fx["bf16"], device="cpu", dtype=torch.float32, progress=False)
    groups: dict[str, list[str]] = {}
    for m in model0.args.linear_shapes():
        groups.setdefault(m.rsplit(".", 1)[0], []).append(m)      # attention block, expert, dense MLP
    free = [k for k in FIXTURES if k != "awq"]
    rules = []
    for members in groups.values():
        awq = rng.random() < 0.15
        for m in members:
            rules.append({"match": "^" + re.escape(m) + "$", "use": "awq" if awq else rng.choice(free)})
    cfg = tmp_path / "mix.yaml"
    sources = {k: str(fx[k]) for k in FIXTURES if k != "bf16"}
    rules = [dict(r, use="model" if r["use"] == "bf16" else r["use"]) for r in rules]
    cfg.write_text(yaml.safe_dump({"model": str(fx["bf16"]), "sources": sources, "weights": rules}))
    p = mixprec.plan(cfg)
    assert len({e.fmt_name for e in p.entries.values()}) >= 5
    model = mixprec.load(cfg, device="cpu", dtype=torch.float32, progress=False)
    _compare(model, _mixed_reference(fx, p), model.args.vocab_size)


def test_awq_rescale_is_needed_and_recovers_the_original_function(fx, tmp_path):
    """AWQ attention with the base's norm: with the recovered rescale the layer is close to the
    original bf16 model; the same weights without the rescale are far off."""
    cfg = {"model": str(fx["bf16"]), "sources": {"awq": str(fx["awq"])},
           "weights": [{"match": r"self_attn", "use": "awq"}]}
    mixed = mixprec.load(cfg, device="cpu", dtype=torch.float32, progress=False)
    ref = mixprec.load(fx["bf16"], device="cpu", dtype=torch.float32, progress=False)
    ids = _ids(mixed.args.vocab_size, B=2, T=16, seed=3)
    with torch.inference_mode():
        a, b = mixed(ids), ref(ids)
        for name, lin in mixed.named_modules():
            if getattr(lin, "input_scale", None) is not None and "self_attn" in name:
                lin.input_scale = None                       # drop the correction
        c = mixed(ids)
    good = (a.softmax(-1) - b.softmax(-1)).abs().sum(-1).mean().item()
    bad = (c.softmax(-1) - b.softmax(-1)).abs().sum(-1).mean().item()
    assert good < 0.5 * bad, (good, bad)


@pytest.mark.parametrize("match,partner", [(r"experts\.0\.up_proj", "down_proj"),
                                           (r"experts\.0\.down_proj", "up_proj"),   # the second alone:
                                           (r"layers\.0\.self_attn\.o_proj", "v_proj")])  # no norm factor asked
def test_awq_inner_fold_split_is_refused(fx, match, partner):
    cfg = {"model": str(fx["bf16"]), "sources": {"awq": str(fx["awq"])}, "weights": [{"match": match, "use": "awq"}]}
    with pytest.raises(ConfigError, match=f"{partner}.*'awq' folds"):
        mixprec.load(cfg, device="cpu", dtype=torch.float32, progress=False)


def test_seed_and_native_forms_give_the_same_plan(fx, tmp_path):
    seed = {"mixed_precision": {
        "base_model_path": str(fx["bf16"]), "fp8_path": str(fx["fp8"]), "gptq_int4_path": str(fx["gptq"]),
        "weight_mapping": {
            "model.layers.1.mlp.experts.3.w13_weight": "gptq_int4",
            "model.layers.1.mlp.experts.3.w2_weight": "fp8",
            "model.layers.0.self_attn.qkv_proj.weight": "fp8",
            "model.layers.1.mlp.experts.5.up_proj.weight": "fp8"}}}
    native = {"model": str(fx["bf16"]), "sources": {"fp8_src": str(fx["fp8"]), "gptq_src": str(fx["gptq"])},
              "weights": [{"match": r"layers\.1\.mlp\.experts\.3\.(gate|up)_proj$", "use": "gptq_src"},
                          {"match": r"layers\.1\.mlp\.experts\.3\.down_proj$", "use": "fp8_src"},
                          {"match": r"layers\.0\.self_attn\.[qkv]_proj$", "use": "fp8_src"},
                          {"match": r"layers\.1\.mlp\.experts\.5\.up_proj$", "use": "fp8_src"}]}
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump(seed))
    (tmp_path / "native.yaml").write_text(yaml.safe_dump(native))
    a, b = mixprec.plan(tmp_path / "seed.yaml"), mixprec.plan(tmp_path / "native.yaml")
    assert {m: (str(e.path), e.fmt_name) for m, e in a.entries.items()} == \
           {m: (str(e.path), e.fmt_name) for m, e in b.entries.items()}
    assert a.entries["model.layers.0.self_attn.k_proj"].fmt_name == "fp8_block"


def test_seed_api(fx, tmp_path):
    y = tmp_path / "seed.yaml"
    y.write_text(yaml.safe_dump({"mixed_precision": {
        "fp8_path": str(fx["fp8"]), "gptq_int4_path": str(fx["gptq"]),
        "weight_mapping": {"model.layers.1.mlp.experts.0.w13_weight": "gptq_int4",
                           "model.layers.1.mlp.experts.0.w2_weight": "fp8"}}}))
    loader = mixprec.TrueMixedPrecisionLoader(fx["bf16"], y, device="cpu", dtype=torch.float32)
    model = mixprec.replace_all_with_mixed_precision(None, loader)
    stats = loader.load_model_weights(model)
    assert stats["loaded"] == stats["total"] == len(model.args.linear_shapes())
    assert stats["memory_saved_mb"] != 0
    assert set(stats["by_format"]) >= {"gptq", "fp8_block"}
    logits = model(_ids(model.args.vocab_size))
    assert torch.isfinite(logits).all()
    # a model path that is not there, or another checkpoint than the YAML's base, or a bad YAML
    with pytest.raises(ConfigError, match="not a checkpoint directory"):
        mixprec.TrueMixedPrecisionLoader(tmp_path / "nowhere", y)
    based = tmp_path / "based.yaml"
    based.write_text(yaml.safe_dump({"mixed_precision": {"base_model_path": str(fx["bf16"]),
                                                         "weight_mapping": {}}}))
    with pytest.raises(ConfigError, match="different checkpoints"):
        mixprec.TrueMixedPrecisionLoader(fx["gptq"], based)
    # a hub id as model_config stands for the YAML's base_model_path (nothing local to compare)
    assert mixprec.TrueMixedPrecisionLoader("Qwen/Qwen3-30B-A3B", based).plan.sources["model"].path == fx["bf16"]
    for text, needle in (("mixed_precision: [1, 2]", "must be a mapping"), ("a: [", "not valid YAML")):
        y.write_text(text)
        with pytest.raises(ConfigError, match=needle):
            mixprec.TrueMixedPrecisionLoader(fx["bf16"], y)
    with pytest.raises(ConfigError, match="cannot read"):
        mixprec.TrueMixedPrecisionLoader(fx["bf16"], tmp_path / "missing.yaml")


def test_errors_name_the_problem(fx, tmp_path):
    bad = {"mixed_precision": {"base_model_path": str(fx["bf16"]), "fp8_path": str(fx["fp8"]),
                               "weight_mapping": {"model.layers.1.mlp.experts.99.w13_weight": "fp8"}}}
    with pytest.raises(ConfigError, match="experts.99"):
        mixprec.load(bad, device="cpu", progress=False)
    # a source missing one expert's tensor
    broken = tmp_path / "broken"
    shutil.copytree(fx["gptq"], broken)
    idx = broken / "model.safetensors.index.json"
    victim = "model.layers.1.mlp.experts.2.down_proj.qweight"
    files = [broken / "model.safetensors"] if not idx.exists() else \
        sorted({broken / f for f in json.loads(idx.read_text())["weight_map"].values()})
    for f in files:
        with safe_open(str(f), "pt") as h:
            tensors = {k: h.get_tensor(k) for k in h.keys()}
            meta = h.metadata()
        if victim in tensors:
            del tensors[victim]
            save_file(tensors, str(f), metadata=meta)
            if idx.exists():
                j = json.loads(idx.read_text())
                del j["weight_map"][victim]
                idx.write_text(json.dumps(j))
    cfg = {"model": str(fx["bf16"]), "sources": {"q": str(broken)}, "weights": [{"match": "experts", "use": "q"}]}
    with pytest.raises(MissingWeight, match=r"experts\.2\.down_proj\.qweight: missing"):
        mixprec.load(cfg, device="cpu", progress=False)
    # sources of different models
    other = make_fixture(tmp_path / "other", formats=["fp8"], hidden=128)
    cfg = {"model": str(fx["bf16"]), "sources": {"o": str(other["fp8"])}, "weights": [{"match": "q_proj", "use": "o"}]}
    with pytest.raises(ModelMismatch, match="hidden_size"):
        mixprec.load(cfg, device="cpu", progress=False)


@pytest.mark.parametrize("name,tensor", [("gptq", "qweight"), ("ct_w4a16", "weight_packed"), ("awq", "qweight")])
def test_packed_weight_of_another_rank_is_named(fx, tmp_path, name, tensor):
    """A packed int4 weight with an extra leading dimension is a ShapeMismatch naming it and the
    expected shape (the plan's check unpacked it as 2-D: a bare ValueError; found by a fuzz of
    corrupted fixture checkpoints)."""
    ck = tmp_path / name
    shutil.copytree(fx[name], ck)
    key = f"model.layers.1.mlp.experts.3.up_proj.{tensor}"
    for f in sorted(ck.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            tensors, meta = {k: h.get_tensor(k) for k in h.keys()}, h.metadata()
        if key in tensors:
            tensors[key] = tensors[key][None]
            save_file(tensors, str(f), metadata=meta)
    with pytest.raises(ShapeMismatch, match=rf"experts\.3\.up_proj.*{tensor} \[1, \d+, \d+\], expected"):
        mixprec.load(ck, device="cpu", progress=False)


def test_random_config_json_damage_is_a_typed_error(fx, tmp_path):
    """60 seeded mutations of the quantized fixtures' config.json (a value of another type or
    range, a deleted key, inside quantization_config or at the top): loading either works or
    raises a MixprecError, never a bare TypeError / ValueError / AttributeError from inside."""
    import random
    rng = random.Random(7)
    weird = [None, True, False, 0, -1, 1, 3, 8, 128, 1.5, "", "x", "int", "gptq", [], [1], {}, {"a": 1}, "channel",
             "group", "block", [128, 128], [0, 0], [-1], "compressed-tensors", "pack-quantized", 10**12]

    def mutate(d, depth=0):
        if isinstance(d, dict) and d:
            k = rng.choice(list(d))
            r = rng.random()
            if r < 0.5 and depth < 5 and isinstance(d[k], (dict, list)) and d[k]:
                mutate(d[k], depth + 1)
            elif r < 0.8:
                d[k] = rng.choice(weird)
            else:
                del d[k]
        elif isinstance(d, list) and d:
            i = rng.randrange(len(d))
            if isinstance(d[i], (dict, list)) and rng.random() < 0.6:
                mutate(d[i], depth + 1)
            else:
                d[i] = rng.choice(weird)

    for i in range(60):
        name = rng.choice([k for k in FIXTURES if k != "bf16"])
        d = tmp_path / f"c{i}"
        shutil.copytree(fx[name], d)
        cfg = json.loads((d / "config.json").read_text())
        for _ in range(rng.randrange(1, 3)):
            mutate(cfg.get("quantization_config", cfg) if rng.random() < 0.8 else cfg)
        (d / "config.json").write_text(json.dumps(cfg))
        try:
            mixprec.load(d, device="cpu", dtype=torch.float32, progress=False)(torch.tensor([[1, 2, 3]]))
        except MixprecError:
            pass


def test_generate_greedy_equals_full_forward_loop(fx):
    model = mixprec.load(fx["bf16"], device="cpu", dtype=torch.float32, progress=False)
    prompts = [[5, 9, 13, 2, 7], [3, 4]]
    out = mixprec.generate(model, prompts, max_new_tokens=6)
    for p, o in zip(prompts, out):
        seq = list(p)
        for _ in range(len(o)):
            with torch.inference_mode():
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert o == seq[len(p):]
    text = mixprec.generate(model, "the fox", max_new_tokens=4)
    assert isinstance(text, str)


def test_cli_plan_inspect_demo(fx, tmp_path, capsys):
    from mixprec.__main__ import main
    cfg = write_demo_config(fx, tmp_path / "mix.yaml")
    assert main(["plan", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "gptq" in out and "fp8_block" in out
    assert main(["inspect", str(fx["gptq_v2_asym_actorder"])]) == 0
    out = capsys.readouterr().out
    assert "gptq" in out and "desc_act=True" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": str(fx["bf16"]), "weights": [
        {"match": "nothing_matches", "use": "model"},
        {"match": "down_proj", "experts": "99", "use": "model"}]}))
    assert main(["plan", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "weights[0]" in err and "weights[1]" in err          # all errors at once
    assert DEMO_RULES


def test_cli_turns_on_expandable_segments_unless_configured(monkeypatch):
    """The CLI asks for the allocator's expandable segments (the 94-layer 235B model ran out of
    memory on an H200 without them), but never over a setting of the user's."""
    from mixprec.__main__ import _allocator_defaults
    names = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
    for var in names:
        monkeypatch.setenv(var, "")     # so that the test's end restores what was there
    user = "max_split_size_mb:512"
    for mine in (None, *names):
        for var in names:
            monkeypatch.delenv(var, raising=False)
        if mine:
            monkeypatch.setenv(mine, user)
        _allocator_defaults()
        if mine is None:
            assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
        else:
            assert os.environ[mine] == user and os.environ.get("PYTORCH_ALLOC_CONF", user) == user


def test_demo_runs(tmp_path, capsys):
    from mixprec.__main__ import main
    assert main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement" in out


def test_cli_generate_streams_whole_characters(fx, capsys, monkeypatch):
    """Characters split over byte-level tokens are printed once whole, never as U+FFFD."""
    from mixprec.__main__ import main
    from mixprec.runtime import generate
    from mixprec.runtime.text import Tokenizer
    text = "café 日本 😀 ok"
    ids = Tokenizer.from_dir(fx["bf16"]).encode(text)
    assert len(ids) > len(text.split()) + 3          # the multi-byte characters take several tokens
    # the model's own tokens would be random: stream these instead, one per step
    monkeypatch.setattr(generate.Generator, "stream", lambda self, prompts, params: ([t] for t in ids))
    assert main(["generate", str(fx["bf16"]), "--prompt", "hi", "--quiet", "--device", "cpu",
                 "--dtype", "float32", "--no-cuda-graphs"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_cli_generate_and_serve_bad_input_is_a_message(fx, tmp_path, capsys):
    """Bad input to generate / serve / load: exit 2 or a typed error naming it, no traceback."""
    from mixprec.__main__ import main
    from mixprec.errors import ConfigError
    base = ["generate", str(fx["bf16"]), "--device", "cpu", "--quiet"]
    assert main(base + ["--prompt", ""]) == 2 and "--prompt is empty" in capsys.readouterr().err
    assert main(base + ["--prompt", "hi", "--top-p", "0"]) == 2 and "top_p" in capsys.readouterr().err
    assert main(base + ["--prompt", "hi", "--dtype", "foo"]) == 2 and "dtype 'foo'" in capsys.readouterr().err
    # (a CLI fuzz found these three as tracebacks)
    with pytest.raises(SystemExit) as e:
        main(["generate", str(fx["bf16"]), "--prompt", "hi", "--device", "tpu"])
    assert e.value.code == 2 and "'tpu': expected cpu, cuda or cuda:N" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["make-fixture", str(blocker / "sub")]) == 2 and "error:" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": str(fx["bf16"]), "weights": [{"match": "x", "use": "nowhere"}]}))
    assert main(["generate", str(bad), "--prompt", "hi"]) == 2 and "nowhere" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="expected one of"):
        mixprec.load(fx["bf16"], device="cpu", dtype="foo", progress=False)
    with pytest.raises(ConfigError, match="device 'tpu': expected cpu, cuda or cuda:N"):
        mixprec.load(fx["bf16"], device="tpu", progress=False)
    pytest.importorskip("fastapi")
    from mixprec.serve import main as serve_main
    for argv in (["--max-batch", "0"], ["--max-len", "1"], ["--port", "-1"], ["--port", "70000"],
                 ["--device", "tpu"]):
        with pytest.raises(SystemExit) as e:
            serve_main([str(fx["bf16"])] + argv)
        assert e.value.code == 2 and argv[0] in capsys.readouterr().err
    assert serve_main([str(fx["bf16"]), "--device", "cpu", "--max-len", "10000000"]) == 2
    assert "max_len" in capsys.readouterr().err


@pytest.mark.parametrize("name,change,needle", [("gptq", {"bits": 3}, "bits=3"),
                                                 ("gptq", {"group_size": "x"}, "group_size 'x'"),
                                                 ("fp8", {"weight_block_size": "int"}, "block size 'int'")])
def test_plan_refuses_what_load_would(fx, tmp_path, name, change, needle):
    """plan (headers and config.json only) reports a GPTQ / fp8 scheme that load() refuses (it
    printed a normal table, and load raised later: a raw ValueError for group_size 'x'; an fp8
    weight_block_size that is not two ints raised one in plan itself)."""
    import json
    import shutil
    d = tmp_path / name
    shutil.copytree(fx[name], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixprecError, match=needle):
        mixprec.plan(d)


def test_half_after_loading_keeps_rope_and_makes_a_matching_cache(fx):
    """model.half() after loading: the RoPE frequencies stay float32 (rounded to fp16 the cos was
    off by 1.8 at 30k tokens) and the KV cache is made in the new dtype (it stayed float32, and a
    cached forward failed); the result equals a model loaded in float16."""
    a = mixprec.load(fx["bf16"], device="cpu", dtype="float32", progress=False).half()
    b = mixprec.load(fx["bf16"], device="cpu", dtype="float16", progress=False)
    assert a.model.rotary.inv_freq.dtype == torch.float32 and a.dtype == torch.float16
    ids = _ids(a.args.vocab_size)[:, :6]
    pos = torch.arange(6)[None].expand(ids.shape[0], 6)
    with torch.inference_mode():
        outs = []
        for m in (a, b):
            cache = m.make_cache(ids.shape[0], 16)
            assert cache.k[0].dtype == torch.float16
            outs.append(m(ids, positions=pos, cache=cache))
    assert torch.equal(outs[0], outs[1])
