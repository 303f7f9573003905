"""Checkpoint: lazy sharded safetensors, header validation, typed errors naming the file."""
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from mixprec.config import ModelArgs
from mixprec.errors import CheckpointError, ConfigError, MissingWeight
from mixprec.loader.checkpoint import Checkpoint

CFG = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 96,
       "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
       "head_dim": 16, "intermediate_size": 96, "moe_intermediate_size": 32, "num_experts": 4,
       "num_experts_per_tok": 2, "rope_theta": 1e6, "torch_dtype": "bfloat16", "tie_word_embeddings": False}


def weights(cfg=CFG, seed=0) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny model, bf16, seeded."""
    args = ModelArgs.from_hf(cfg)
    g = torch.Generator().manual_seed(seed)
    shapes = {**args.plain_tensors(), **{f"{m}.weight": s for m, s in args.linear_shapes().items()}}
    return {n: torch.randn(s, generator=g).to(torch.bfloat16) for n, s in shapes.items()}


def write_ckpt(d, tensors, cfg=CFG, shards=1, extra_cfg=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**cfg, **(extra_cfg or {})}))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names = sorted(tensors)
    wmap = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(d / fname))
        wmap.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return d


@pytest.fixture(scope="module")
def W():
    return weights()


def test_single_file_metadata_and_data(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, extra_cfg={"quantization_config": {"quant_method": "fp8"}})
    (d / "tokenizer.json").write_text("{}")
    c = Checkpoint(d)
    assert set(c.names()) == set(W)
    assert c.quant_config == {"quant_method": "fp8"}
    assert c.args.num_experts == 4 and c.tokenizer_path == d / "tokenizer.json"
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert c.meta(name) == (torch.bfloat16, (64, 32))
    assert c.nbytes(name) == 64 * 32 * 2
    assert torch.equal(c.get(name), W[name])
    assert c.module_meta("model.layers.0.self_attn") == {}   # q_norm.weight is one level deeper
    assert c.module_meta("model.layers.0.self_attn.q_norm") == {"weight": (torch.bfloat16, (16,))}
    assert c.module_meta("model.layers.0.self_attn.q_proj") == {"weight": (torch.bfloat16, (64, 64))}
    mod = c.module("model.layers.0.mlp.experts.2.up_proj")
    assert list(mod) == ["weight"] and torch.equal(mod["weight"], W["model.layers.0.mlp.experts.2.up_proj.weight"])
    assert c.module_meta("model.layers.0.mlp.experts.9.up_proj") == {}


def test_compression_config_spelling_and_no_tokenizer(tmp_path, W):
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized"}
    c = Checkpoint(write_ckpt(tmp_path / "m", {"lm_head.weight": W["lm_head.weight"]}, extra_cfg={"compression_config": qc}))
    assert c.quant_config == qc and c.tokenizer_path is None


def test_sharded_index(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, shards=3)
    c = Checkpoint(d)
    assert set(c.names()) == set(W)
    shards = {c.shard_of(n).name for n in W}
    assert len(shards) == 3
    for n in ("model.embed_tokens.weight", "model.layers.1.self_attn.k_norm.weight", "lm_head.weight",
              "model.layers.0.mlp.experts.1.gate_proj.weight"):
        assert torch.equal(c.get(n), W[n])
    # a module whose tensors are split over shards still reads as one module
    assert torch.equal(c.module("model.layers.1.mlp.gate")["weight"], W["model.layers.1.mlp.gate.weight"])


def test_get_slice_reads_only_the_slice(tmp_path):
    t = torch.arange(8 * 6, dtype=torch.float32).reshape(8, 6)
    d = write_ckpt(tmp_path / "m", {"a": t, "b": t.to(torch.float8_e4m3fn), "c": t[0].to(torch.int32)})
    c = Checkpoint(d)
    assert torch.equal(c.get_slice("a", 0, 2, 5), t[2:5])
    assert torch.equal(c.get_slice("a", 1, 1, 4), t[:, 1:4])
    assert torch.equal(c.get_slice("a", -1, 0, 6), t)
    assert torch.equal(c.get_slice("b", 0, 3, 4).float(), t.to(torch.float8_e4m3fn)[3:4].float())
    assert torch.equal(c.get_slice("c", 0, 2, 3), t[0, 2:3].to(torch.int32))
    c.close()
    # overwrite rows 0-1 and 5-7 of "a" in the file: a slice of rows 2-4 must not see it
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = 8 + n + json.loads(raw[8:8 + n])["a"]["data_offsets"][0]
    row = 6 * 4
    raw[start:start + 2 * row] = b"\xff" * (2 * row)
    raw[start + 5 * row:start + 8 * row] = b"\xff" * (3 * row)
    f.write_bytes(bytes(raw))
    c = Checkpoint(d)
    assert torch.equal(c.get_slice("a", 0, 2, 5), t[2:5])
    assert torch.isnan(c.get("a")[0]).all()
    with pytest.raises(IndexError, match="cannot slice"):
        c.get_slice("a", 0, 4, 9)
    with pytest.raises(IndexError, match="no dim 2"):
        c.get_slice("a", 2, 0, 1)


def test_truncated_shard_fails_at_open(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors: truncated"):
        Checkpoint(d)


def test_corrupt_header_and_header_length(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(4)})
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[9:13] = b"\x00\xff{{"
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        Checkpoint(d)
    f.write_bytes(struct.pack("<Q", 10 ** 6) + b"{}")
    with pytest.raises(CheckpointError, match="header length 1000000 exceeds the file"):
        Checkpoint(d)
    f.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        Checkpoint(d)
    # header whose byte span disagrees with the shape
    hdr = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}).encode()
    f.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"'a' is 12 bytes but F32\[4\] needs 16"):
        Checkpoint(d)


def test_index_naming_missing_shard(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, shards=2)
    (d / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"names shard 'model-00001-of-00002\.safetensors'.*does not exist"):
        Checkpoint(d)


def test_index_tensor_absent_from_shard(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, shards=2)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.layers.5.mlp.gate.weight"] = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(MissingWeight, match=r"'model\.layers\.5\.mlp\.gate\.weight' in model-00001-of-00002"):
        Checkpoint(d)


def test_only_pickle_files_refused_without_unpickling(tmp_path, monkeypatch):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    (d / "pytorch_model.bin").write_bytes(b"not read")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(CheckpointError, match=r"only pytorch_model\.bin; only safetensors"):
        Checkpoint(d)


def test_missing_dir_config_and_tensor(tmp_path, W):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=r"empty/config\.json: config\.json not found"):
        Checkpoint(tmp_path / "empty")
    d = write_ckpt(tmp_path / "m", W)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{nope")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Checkpoint(tmp_path / "bad")
    c = Checkpoint(d)
    with pytest.raises(MissingWeight, match=rf"{d}: no tensor 'model.layers.0.mlp.experts.7.up_proj.weight' "
                                            r"\(nearby: model\.layers\.0\.mlp\.experts\."):
        c.get("model.layers.0.mlp.experts.7.up_proj.weight")
    with pytest.raises(MissingWeight, match="no tensors for module 'model.layers.3.self_attn.q_proj'"):
        c.module("model.layers.3.self_attn.q_proj")
    with pytest.raises(MissingWeight):
        c.meta("x")


def test_unindexed_multi_file_and_duplicates(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(CFG))
    save_file({"a": torch.ones(2)}, str(d / "part-1.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "part-2.safetensors"))
    c = Checkpoint(d)
    assert sorted(c.names()) == ["a", "b"] and torch.equal(c.get("b"), torch.zeros(3))
    save_file({"a": torch.ones(2)}, str(d / "part-3.safetensors"))
    with pytest.raises(CheckpointError, match="'a' is in both part-1.safetensors and part-3.safetensors"):
        Checkpoint(d)


def test_args_errors_name_the_file(tmp_path):
    d = write_ckpt(tmp_path / "m", {"a": torch.ones(1)}, cfg={"hidden_size": 8})
    with pytest.raises(ConfigError, match=r"config\.json: missing key"):
        Checkpoint(d).args


def test_tensor_hidden_by_the_index_is_named(tmp_path, W):
    d = write_ckpt(tmp_path / "m", W, shards=2)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    gone = "model.layers.0.mlp.experts.1.up_proj.weight"
    del idx["weight_map"][gone]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.warns(UserWarning, match=f"1 tensors in the shards are not listed there.*{gone}"):
        Checkpoint(d)


@pytest.mark.parametrize("extra,tied", [("model.layers.2.self_attn.q_proj.weight", False),          # layer 2 of 2
                                        ("model.layers.1.mlp.experts.4.down_proj.weight", False),   # expert 4 of 4
                                        ("model.layers.1.mlp.shared_expert.gate_proj.weight", False),
                                        ("lm_head.weight", True)])                               # beside tied embeddings
def test_tensors_no_module_reads_are_named(tmp_path, W, extra, tied):
    from mixprec.config import load_config
    from mixprec.loader.plan import make_plan
    t = dict(W)               # W holds lm_head.weight: with tied embeddings nothing reads it
    if not tied:
        t[extra] = torch.zeros(8, 8, dtype=torch.bfloat16)
    d = write_ckpt(tmp_path / "m", t, extra_cfg={"tie_word_embeddings": tied})
    with pytest.warns(UserWarning, match=f"1 tensors belong to no module of this model.*{extra}"):
        make_plan(load_config(d))


def test_malformed_json_values_are_typed_errors(tmp_path, W):
    from mixprec.errors import FormatError
    from mixprec.formats import resolve_scheme
    with pytest.raises(ConfigError, match=r"hidden_size: '64' .*num_hidden_layers: -1"):
        ModelArgs.from_hf({**CFG, "hidden_size": "64", "num_hidden_layers": -1})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelArgs.from_hf({**CFG, "hidden_size": None, "text_config": "x"})
    # integral floats (some exporters write 40960.0) and a null text_config read as before
    a = ModelArgs.from_hf({**CFG, "max_position_embeddings": 40960.0, "decoder_sparse_step": 1.0,
                           "text_config": None})
    assert a.max_position_embeddings == 40960 and a.decoder_sparse_step == 1
    # the other keys the model reads, by JSON type (each had been a bare TypeError / ValueError /
    # AttributeError, rms_norm_eps only in the first forward; found by a fuzz of config.json)
    with pytest.raises(ConfigError, match=r"rms_norm_eps: \[0, 0\] \(expected a number > 0\).*"
                                          r"rope_scaling: \[1\] \(expected a JSON object\).*"
                                          r"tie_word_embeddings: 'false' \(expected true or false\).*"
                                          r"mlp_only_layers: 3 \(expected a list of layer indices\)"):
        ModelArgs.from_hf({**CFG, "rms_norm_eps": [0, 0], "rope_scaling": [1], "tie_word_embeddings": "false",
                           "mlp_only_layers": 3})
    with pytest.raises(ConfigError, match=r"rope_parameters\.rope_theta: 'x'"):
        ModelArgs.from_hf({**CFG, "rope_parameters": {"rope_type": "default", "rope_theta": "x"}})
    with pytest.raises(FormatError, match="quantization_config: expected a JSON object"):
        resolve_scheme("gptq", "model.layers.0.mlp.experts.0.up_proj")
    with pytest.raises(FormatError, match="malformed where it describes model.layers.0.mlp.experts.0.up_proj"):
        resolve_scheme({"quant_method": "compressed-tensors", "format": "float-quantized",   # a string: weights
                        "config_groups": {"g": {"targets": ["Linear"], "weights": "gptq"}}},
                       "model.layers.0.mlp.experts.0.up_proj")
    d = write_ckpt(tmp_path / "m", W, shards=2)
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    idx["weight_map"]["model.norm.weight"] = ["model-00001-of-00002.safetensors"]
    (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="must map tensor names to shard file names"):
        Checkpoint(d)
