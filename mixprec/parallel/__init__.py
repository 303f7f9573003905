"""Tensor and expert parallelism over torch.distributed, for any mix of formats.

    torchrun --nproc-per-node 4 -m mixprec generate mix.yaml --tp 2 --ep 2 --prompt "..."
    model = mixprec.load("mix.yaml", tp=2, ep=2)     # in each process; logits on every rank

shard.py: who holds what (and why), plan-time checks, what each rank reads; layers.py: the
modules that end in a collective; context.py: process layout and collectives; load.py: one
rank's model.
"""
from ..errors import ParallelError
from .context import ParallelContext, all_gather_last, all_reduce, env_world, init
from .layers import ParallelMoE, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from .load import assemble_parallel, build_model, load_shard
from .synthetic import build_synthetic_shard
from .shard import ShardLayout, Split, check_plan, expert_group, make_layout, rank_bytes, read_module, shard_weight

__all__ = ["ParallelError", "ParallelContext", "all_gather_last", "all_reduce", "env_world", "init",
           "ParallelMoE", "RowParallelLinear", "VocabParallelEmbedding", "VocabParallelHead",
           "assemble_parallel", "build_model", "build_synthetic_shard", "load_shard", "ShardLayout", "Split", "check_plan",
           "expert_group", "make_layout", "rank_bytes", "read_module", "shard_weight"]
