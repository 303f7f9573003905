"""Build and load one rank's shard of a planned mix (the parallel counterpart of loader/assemble.py).

The rank's model is the ordinary Qwen3ForCausalLM built from the rank's `local_args` (per-rank
heads, kv heads, intermediate sizes, vocabulary rows), with the modules that end in a collective
swapped for their parallel subclasses (parallel/layers.py). `model.args` then describes the
rank's model except `vocab_size`, which stays the full vocabulary (the logits are gathered), so
runtime code that sizes KV caches from `model.args` gets the per-rank kv heads;
`model.global_args` is the whole model, `model.parallel` the ParallelContext.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from tqdm import tqdm

from ..errors import ParallelError
from ..formats import load_module
from ..formats.base import Packed, stack
from ..layers.linear import bucket_key
from ..layers.moe import MoE
from ..loader.assemble import Stats, _layer_prefix, input_rescales
from ..loader.plan import Plan
from ..models.qwen3 import Qwen3ForCausalLM
from .context import ParallelContext, all_gather_last, init
from .layers import ParallelMoE, RowParallelLinear, VocabParallelEmbedding, VocabParallelHead
from .shard import ShardLayout, Split, check_plan, make_layout, read_dense, read_module, shard_weight

_EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


def build_model(lay: ShardLayout, ctx: ParallelContext, dtype: torch.dtype) -> Qwen3ForCausalLM:
    """An unloaded (meta) model of rank lay.rank's shard."""
    args, local = lay.args, lay.local_args()
    H, D = args.hidden_size, args.head_dim
    model = Qwen3ForCausalLM(local, dtype=dtype, device="meta")
    start, stop = lay.vocab_range
    model.model.embed_tokens = VocabParallelEmbedding(lay.vocab_rows, H, start, stop, ctx, dtype, "meta")
    model.lm_head = VocabParallelHead(lay.vocab_rows, H, args.vocab_size, ctx)
    for layer in model.model.layers:
        layer.self_attn.o_proj = RowParallelLinear(H, lay.heads * D, ctx)
        m = layer.mlp
        if isinstance(m, MoE):
            layer.mlp = ParallelMoE(H, m.I, m.E, m.top_k, m.renorm, dtype, "meta", m.name, lay.experts, ctx)
        else:
            m.down_proj = RowParallelLinear(H, local.intermediate_size, ctx)
    model.args = replace(local, vocab_size=args.vocab_size)
    model.global_args, model.parallel, model.shard_layout = args, ctx, lay
    return model


def _local_shape(n: int, k: int, sp: Split | None, vocab_rows: int | None) -> tuple[int, int]:
    if sp is None:
        return n, k
    if sp.dim == "k":
        return n, k // sp.parts
    return (vocab_rows if vocab_rows is not None else n // sp.parts), k


def assemble_parallel(plan: Plan, lay: ShardLayout, ctx: ParallelContext, dtype: torch.dtype = torch.bfloat16,
                      progress: bool = True) -> tuple[Qwen3ForCausalLM, Stats]:
    """Read, transcode, shard and place rank lay.rank's weights on ctx.device. Stats count this
    rank's modules and bytes."""
    device = ctx.device
    rescale = input_rescales(plan)
    model = build_model(lay, ctx, dtype)
    base, args = plan.sources["model"], plan.args
    V, H = args.vocab_size, args.hidden_size
    vocab_split = Split("n", lay.rank, lay.world)
    for name in args.plain_tensors():
        t = (read_dense(base, name, vocab_split, V, H, rows=lay.vocab_rows) if name == "model.embed_tokens.weight"
             else base.get(name))
        model.set_tensor(name, t.to(device))
    if not args.tie_word_embeddings and "lm_head" not in plan.entries:
        w = read_dense(base, "lm_head.weight", vocab_split, V, H, rows=lay.vocab_rows).to(dtype)
        model.set_linear("lm_head", Packed("dense", lay.vocab_rows, H, {"weight": w.to(device)}, source="dense"))

    held = [(m, e) for m, e in plan.entries.items() if lay.holds(m)]
    stats = Stats(total=len(held))
    layers: dict[str, list] = {}
    for m, e in held:
        layers.setdefault(_layer_prefix(m)[0], []).append((m, e))
    bar = tqdm(total=sum(e.nbytes for _, e in held), unit="B", unit_scale=True, desc=f"loading rank {lay.rank}",
               disable=not (progress and ctx.is_main))

    def place(module: str, e, packed: Packed, sp: Split | None) -> None:
        scale = rescale.get(module)
        if scale is not None and sp is not None and sp.dim == "k":
            a, b = sp.range(e.k)
            scale = scale[a:b]
        packed = packed.to(device)
        model.set_linear(module, packed, input_scale=None if scale is None else scale.to(device))
        stats.add(packed, e.source)

    for layer, items in layers.items():
        deferred: dict[tuple, list] = {}   # act-order expert K slices, sharded as one stack per bucket
        for module, e in items:
            ckpt, sp = plan.sources[e.source], lay.split(module)
            where = f"{ckpt.path}: {module}"
            if e.fmt_name == "dense":   # read the slice alone, load it as a smaller weight
                rows = lay.vocab_rows if module == "lm_head" else None
                n, k = _local_shape(e.n, e.k, sp, rows)
                raw = {"weight": read_dense(ckpt, f"{module}.weight", sp, e.n, e.k, rows)}
                packed = load_module(raw, n, k, None, where, dtype=dtype)
            else:
                raw = read_module(ckpt, module, e.fmt_name, e.n, e.k, sp)
                packed = load_module(raw, e.n, e.k, e.scheme, where, dtype=dtype)
                if sp is not None and sp.dim == "k" and ".experts." in module and "perm" in packed.tensors():
                    deferred.setdefault(bucket_key(packed), []).append((module, e, packed))
                    bar.update(e.nbytes)
                    continue
                packed = shard_weight(packed, sp)
            del raw
            place(module, e, packed, sp)
            bar.update(e.nbytes)
        for members in deferred.values():
            # one stack -> one padded group size for all of them (formats/intq.py _shard_k_perm)
            sp = lay.split(members[0][0])
            st = shard_weight(stack([p for _, _, p in members]), sp)
            for i, (module, e, _) in enumerate(members):
                place(module, e, st.select(i), sp)
        if layer:
            mlp = model.model.layers[int(layer.rsplit(".", 1)[1])].mlp
            if isinstance(mlp, MoE):
                mlp.finalize()   # stack this layer's experts now: only one layer is held twice
    bar.close()
    stats.rescaled = sorted(m for m in rescale if lay.holds(m))
    model.finalize()
    model.eval()
    return model, stats


def load_shard(plan: Plan, tp: int, ep: int, device=None, dtype: torch.dtype = torch.bfloat16,
               progress: bool = True, backend: str | None = None) -> tuple[Qwen3ForCausalLM, Stats]:
    """This process's shard of `plan` for a tp x ep run: checks the split (ParallelError, before
    any tensor is read or any process group is made), initialises torch.distributed from the
    launcher's environment if needed, and assembles. device None: cuda:LOCAL_RANK or cpu.
    When loading fails on some rank, every rank raises (raise_if_any_failed)."""
    check_plan(plan, tp, ep)
    ctx = init(tp, ep, device, backend)
    try:
        out, err = assemble_parallel(plan, make_layout(plan.args, tp, ep, ctx.rank), ctx, dtype, progress), None
    except Exception as e:      # reported to every rank below, then raised here
        out, err = None, e
    raise_if_any_failed(ctx, err, f"loading the tp={tp} x ep={ep} shards")
    return out


_MSG_BYTES = 2048   # per rank: a failed flag and the start of its error message


def raise_if_any_failed(ctx: ParallelContext, err: Exception | None, what: str) -> None:
    """Every rank's outcome of `what`, exchanged in one all-gather: a rank that failed raises its
    own error (err); every other rank raises a ParallelError naming each failed rank and its
    error, rather than waiting in its first collective for a rank that is gone."""
    if not ctx.collective:
        if err is not None:
            raise err
        return
    mine = torch.zeros(_MSG_BYTES, dtype=torch.uint8)
    if err is not None:
        text = f"{type(err).__name__}: {err}".encode(errors="replace").replace(b"\0", b" ")[:_MSG_BYTES - 1]
        mine[0] = 1
        mine[1:1 + len(text)] = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    parts = all_gather_last(mine.to(ctx.device), ctx).view(ctx.world, _MSG_BYTES).cpu()
    if err is not None:
        raise err
    failed = [(r, bytes(p[1:].tolist()).rstrip(b"\0").decode(errors="replace"))
              for r, p in enumerate(parts) if p[0]]
    if failed:
        raise ParallelError(f"{what} failed on {len(failed)} of {ctx.world} ranks:\n"
                            + "\n".join(f"  rank {r}: {m}" for r, m in failed))
