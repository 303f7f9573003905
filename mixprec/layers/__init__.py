"""Layers over Packed weights: Linear / FusedLinear, MoE with format buckets, attention, norms."""
from .attention import Attention, KVCache, causal_mask
from .linear import FusedLinear, Linear, bucket_key, cat_n
from .moe import MoE, ExpertBucket, moe_reference, route
from .norm import RMSNorm, Rotary, apply_rope, rms_norm, rope_parameters

__all__ = ["Attention", "KVCache", "causal_mask", "FusedLinear", "Linear", "bucket_key", "cat_n", "MoE",
           "ExpertBucket", "moe_reference", "route", "RMSNorm", "Rotary", "apply_rope", "rms_norm",
           "rope_parameters"]
