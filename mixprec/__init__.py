"""mixprec: one Qwen3 / Qwen3-MoE model whose weights come, per linear and per expert
projection, from several checkpoints in different formats, each kept compressed on the GPU.

    import mixprec
    model = mixprec.load("mix.yaml", device="cuda")
    logits = model(input_ids)
    out = mixprec.generate(model, ["Hello"], max_new_tokens=32)
"""
__version__ = "0.1.0"

_API = {
    "load": "api", "generate": "api", "plan": "api", "dequantize_weight": "api", "load_tokenizer": "api",
    "MixConfig": "config", "ModelArgs": "config", "load_config": "config",
    "TrueMixedPrecisionLoader": "compat", "replace_all_with_mixed_precision": "compat",
    "SamplingParams": "runtime.sampling", "Generator": "runtime.generate", "Engine": "runtime.engine",
}


def __getattr__(name):
    # lazy: `import mixprec` stays cheap (no torch/triton import until used)
    if name in _API:
        import importlib
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'mixprec' has no attribute {name!r}")


__all__ = sorted(_API)
