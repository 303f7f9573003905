"""`mixprec export`: one checkpoint holding every tensor of a mix in its source's on-disk form.

Loading the export must equal loading the YAML bit for bit (every buffer of the model, and the
logits), AWQ's folded-norm factors included; refusals and failures must leave no half-written
checkpoint behind.
"""
from __future__ import annotations

import json

import pytest
import torch

import mixprec
from mixprec.config import MixConfig
from mixprec.errors import ConfigError
from mixprec.inspect import inspect_checkpoint, inspect_rows
from mixprec.loader.checkpoint import Checkpoint
from mixprec.planner import export as export_mod
from mixprec.planner.cli import export_main
from mixprec.planner.export import RESCALE_PREFIX, export_mix
from mixprec.testing.fixtures import shared_fixture

# seven formats; AWQ attention of layer 1 (v with its o) and AWQ expert 7 (up with its down)
RULES = [
    {"match": r"layers\.1\.self_attn", "use": "awq"},
    {"match": r"mlp\.experts\.[01]\.", "use": "gptq"},
    {"match": r"mlp\.experts\.[23]\.down_proj", "use": "fp8"},
    {"match": r"mlp\.experts\.[23]\.", "use": "int8"},
    {"match": r"mlp\.experts\.[45]\.", "use": "ct_w4a16"},
    {"match": r"mlp\.experts\.7\.", "use": "awq"},
    {"match": r"layers\.0\.self_attn\.[qkv]_proj", "use": "fp8"},
    {"match": r"layers\.0\.mlp\.", "use": "gptq_v2_asym_actorder"},
]
CT_RULES = [
    {"match": r"mlp\.experts\.[0-2]\.", "use": "int8"},
    {"match": r"mlp\.experts\.[3-5]\.", "use": "ct_w4a16"},
    {"match": r"self_attn", "use": "fp8_ct"},
]


@pytest.fixture(scope="module")
def fx():
    return shared_fixture(seed=0)


def mix(fx, rules) -> MixConfig:
    used = sorted({r["use"] for r in rules})
    return MixConfig.from_dict({"model": str(fx["bf16"]), "sources": {k: str(fx[k]) for k in used},
                                "weights": rules, "dtype": "float32"})


def load(obj):
    return mixprec.load(obj, device="cpu", dtype=torch.float32, progress=False)


def assert_same_model(a, b):
    ba, bb = dict(a.named_buffers()), dict(b.named_buffers())
    assert sorted(ba) == sorted(bb)
    for k in ba:
        assert ba[k].dtype == bb[k].dtype and ba[k].shape == bb[k].shape, k
        assert torch.equal(ba[k], bb[k]), k
    ids = torch.randint(0, a.args.vocab_size - 3, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(a(ids), b(ids))


def test_export_round_trip_is_bit_identical(fx, tmp_path):
    cfg = mix(fx, RULES)
    out = export_mix(cfg, tmp_path / "out", max_shard_bytes=300_000, progress=False)
    a, b = load(cfg), load(out)
    assert_same_model(a, b)
    assert a.stats.rescaled == b.stats.rescaled and len(a.stats.rescaled) == 5    # AWQ q/k/v + expert 7 gate/up
    assert {k: list(v) for k, v in a.stats.by_format.items()} == {k: list(v) for k, v in b.stats.by_format.items()}
    assert len(a.stats.by_format) >= 6

    # every tensor byte for byte from its source (never dequantized), in shards of <= 300 kB
    plan = mixprec.plan(cfg)
    ck = Checkpoint(out)
    for m, e in plan.entries.items():
        src = plan.sources[e.source]
        for s in src.module_meta(m):
            x, y = src.get(f"{m}.{s}"), ck.get(f"{m}.{s}")
            assert x.dtype == y.dtype and torch.equal(x.view(torch.uint8), y.view(torch.uint8)), f"{m}.{s}"
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for f in shards:
        names = [t for t, sh in index.items() if sh == f.name]
        data = sum(ck.nbytes(t) for t in names)
        assert data <= 300_000 or len(names) == 1
    assert (out / "tokenizer.json").read_bytes() == (fx["bf16"] / "tokenizer.json").read_bytes()

    # the manifest: every module's source, format and scheme; AWQ factors stored as tensors
    conf = json.loads((out / "config.json").read_text())
    man = conf["mixprec"]
    assert conf["quantization_config"]["quant_method"] == "mixprec"     # gptq/awq/fp8: not compressed-tensors
    for m, e in plan.entries.items():
        assert man["modules"][m]["source"] == e.source and man["modules"][m]["format"] == e.fmt_name
        key = man["modules"][m]["scheme"]
        assert (man["schemes"][key] if key else None) == e.scheme
    assert sorted(man["input_rescale"]) == a.stats.rescaled
    for m, t in man["input_rescale"].items():
        assert t == RESCALE_PREFIX + m and ck.get(t).dtype == torch.float32

    # `mixprec inspect` reads it: the formats it detects are the manifest's
    rows = {r["module"]: r["format"] for r in inspect_rows(ck)}
    assert rows == {m: v["format"] for m, v in man["modules"].items()}
    assert inspect_checkpoint(out, as_json=True) == 0

    # the export is itself a valid source of a further mix
    again = MixConfig.from_dict({"model": str(fx["bf16"]), "sources": {"exp": str(out)},
                                 "weights": [{"match": r"layers\.1\.", "use": "exp"}], "dtype": "float32"})
    load(again)


def test_export_keeps_the_dtype_and_eval_compares_with_its_base(fx, tmp_path):
    """load(OUT_DIR) computes in the mix's dtype (the manifest carries it), and `eval OUT_DIR`
    compares the export with the base it was made from, not with itself."""
    from mixprec.planner.evaluate import evaluate
    cfg = MixConfig.from_dict({"model": str(fx["bf16"]), "sources": {"fp8": str(fx["fp8"])},
                               "weights": [{"match": "mlp.experts", "use": "fp8"}], "dtype": "float16"})
    out = export_mix(cfg, tmp_path / "out", progress=False)
    assert MixConfig.for_checkpoint(out).dtype == torch.float16
    a, b = (mixprec.load(x, device="cpu", progress=False) for x in (cfg, out))
    assert a.model.embed_tokens.weight.dtype == b.model.embed_tokens.weight.dtype == torch.float16
    assert_same_model(a, b)
    ids = torch.randint(0, a.args.vocab_size - 3, (2, 16), generator=torch.Generator().manual_seed(1))
    r_mix, r_out = (evaluate(x, ids, device="cpu", dtype=torch.float32, progress=False) for x in (cfg, out))
    assert r_out["ref"] == str(fx["bf16"]) and r_out["mean_kl"] == r_mix["mean_kl"] > 0


def test_compressed_tensors_only_mix_gets_a_real_compressed_tensors_config(fx, tmp_path):
    cfg = mix(fx, CT_RULES)
    out = export_mix(cfg, tmp_path / "ct", progress=False)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    assert {g["format"] for g in qc["config_groups"].values()} == {"int-quantized", "pack-quantized",
                                                                   "float-quantized"}
    targets = [t for g in qc["config_groups"].values() for t in g["targets"]]
    assert sorted(targets) == sorted(m for m, e in mixprec.plan(cfg).entries.items() if e.source != "model")
    assert (out / "model.safetensors").is_file() and not (out / "model.safetensors.index.json").exists()
    assert_same_model(load(cfg), load(out))


def test_refusals_and_force(fx, tmp_path, capsys):
    cfg = mix(fx, CT_RULES)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty; pass --force"):
        export_mix(cfg, out, progress=False)
    yaml_path = tmp_path / "mix.yaml"
    yaml_path.write_text(cfg.to_yaml())
    assert export_main([str(yaml_path), str(out), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    assert export_main([str(yaml_path), str(out), "--quiet", "--force", "--max-shard-size", "200kB"]) == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors.index.json").is_file()
    load(out)
    with pytest.raises(ConfigError, match="is \\(or contains\\) source 'int8'"):
        export_mix(cfg, fx["int8"], force=True, progress=False)
    with pytest.raises(ConfigError, match="is \\(or contains\\) source"):
        export_mix(cfg, fx["bf16"].parent, force=True, progress=False)
    with pytest.raises(ConfigError, match="cannot create the export directory"):    # under a file
        export_mix(cfg, tmp_path / "mix.yaml" / "out", progress=False)
    assert not list(tmp_path.glob(".*partial*")) and not list(tmp_path.glob(".*old*"))


def test_failure_midway_leaves_no_checkpoint(fx, tmp_path, monkeypatch):
    cfg = mix(fx, RULES)
    real = export_mod._Item.write
    calls = {"n": 0}

    def failing(self, f, bar):
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(28, "No space left on device")
        return real(self, f, bar)
    monkeypatch.setattr(export_mod._Item, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        export_mix(cfg, tmp_path / "new", max_shard_bytes=300_000, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []           # no out dir, no temp dir

    monkeypatch.setattr(export_mod._Item, "write", real)
    good = export_mix(mix(fx, CT_RULES), tmp_path / "old", progress=False)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    calls["n"] = 0
    monkeypatch.setattr(export_mod._Item, "write", failing)
    with pytest.raises(OSError):
        export_mix(cfg, good, force=True, max_shard_bytes=300_000, progress=False)
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before    # --force replaces only on success
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_inspect_rows_mean_every_listed_layer_times_every_listed_expert():
    from mixprec.inspect import _collapse
    rows = [dict(module=f"model.layers.{l}.mlp.experts.{e}.up_proj", bytes=1, params="",
                 format="fp8_block" if (l, e // 4) in ((1, 0), (2, 1), (3, 0)) else "dense")
            for l in (1, 2, 3) for e in range(8)]
    got = {(where, fmt, n) for where, fmt, _, n, _ in _collapse(rows)}
    assert got == {("layers 1,3 experts 0-3 mlp.experts.*.up_proj", "fp8_block", 8),
                   ("layers 2 experts 4-7 mlp.experts.*.up_proj", "fp8_block", 4),
                   ("layers 1,3 experts 4-7 mlp.experts.*.up_proj", "dense", 8),
                   ("layers 2 experts 0-3 mlp.experts.*.up_proj", "dense", 4)}
