"""The process layout of a tensor / expert parallel run and its collectives.

    ctx = init(tp=2, ep=2)        # under torchrun (or any env:// launcher): 4 processes
    ctx.rank, ctx.world, ctx.tp_rank, ctx.ep_rank

Ranks are numbered rank = ep_rank * tp + tp_rank: the tp ranks that split one expert group are
neighbours (on one host with NVLink either way). Every collective of the model runs over all
ranks (see parallel/shard.py for why attention is split over all of them), so the context holds
one process group; `tp_group` / `ep_group` are built only for callers that want them
(`subgroups()`), since creating a group is a collective call every rank must make.

The backend follows the device: NCCL for CUDA, gloo for CPU; `backend=` overrides it (e.g.
gloo on CUDA tensors to run several ranks on one GPU in a test). World size 1 never touches
torch.distributed (`mixprec.load` then takes the plain single-process path), except inside a
process group the caller initialised: a 1-rank NCCL group runs the parallel modules and their
collectives on one GPU, which is how the NCCL path (and CUDA-graph capture of its
collectives) is tested without several GPUs.

Small all-reduces on several GPUs (decode activations: [B, hidden] bf16, 4 KiB at batch 1) take
one kernel that reads every peer's copy over NVLink (torch symmetric memory's one-shot
all-reduce, no multicast) instead of NCCL's: in CUDA graphs on 4 H200 7.9 vs 14.5 µs at 4 KiB,
14.3 vs 19.3 at 512 KiB (scripts/bench_allreduce.py, BENCHMARKS.md). It sums the ranks in rank order on every rank, so
all ranks get the same bits, as with NCCL. MIXPREC_ALLREDUCE=nccl keeps NCCL for every size.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ParallelError
from .shard import Ranks

ONE_SHOT_MAX_BYTES = 512 * 1024

# torch >= 2.13 renames all_gather_into_tensor (and warns on the old name)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class ParallelContext(Ranks):
    """rank / world of this process, the tp x ep factorisation, the device it computes on and
    the process group of all ranks (None: the default group). `collective`: the parallel modules
    call torch.distributed (default: world > 1; also true for a world-1 context made inside an
    initialised process group, which runs the NCCL path on one GPU)."""
    rank: int = 0
    world: int = 1
    tp: int = 1
    ep: int = 1
    device: torch.device = torch.device("cpu")
    group: object = None
    collective: bool | None = None
    one_shot: "OneShotAllReduce | None" = None

    def __post_init__(self):
        if self.collective is None:
            object.__setattr__(self, "collective", self.world > 1)
        if self.tp < 1 or self.ep < 1 or self.tp * self.ep != self.world:
            raise ParallelError(f"tp={self.tp} x ep={self.ep} must equal the number of processes {self.world}")
        if not 0 <= self.rank < self.world:
            raise ParallelError(f"rank {self.rank} outside 0..{self.world - 1}")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def subgroups(self) -> tuple[object, object]:
        """(tp_group, ep_group) of this rank: the tp ranks of its expert group, and the ep ranks
        with its tp_rank. Collective: every rank must call it, in the same order."""
        tp_groups = [list(range(g * self.tp, (g + 1) * self.tp)) for g in range(self.ep)]
        ep_groups = [list(range(t, self.world, self.tp)) for t in range(self.tp)]
        tp_group, _ = dist.new_subgroups_by_enumeration(tp_groups)
        ep_group, _ = dist.new_subgroups_by_enumeration(ep_groups)
        return tp_group, ep_group


def env_world() -> int:
    """Processes of this launch: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ParallelError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def init(tp: int = 1, ep: int = 1, device: str | torch.device | None = None, backend: str | None = None,
         timeout_s: float = 600.0) -> ParallelContext:
    """The context of this process. Initialises torch.distributed from the launcher's env://
    variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU) unless a
    group is already initialised. world = tp * ep is required; world 1 initialises nothing.
    device None: cuda:LOCAL_RANK when CUDA is available, else cpu."""
    for name, v in (("tp", tp), ("ep", ep)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ParallelError(f"{name}={v!r}: expected a positive integer")
    world = env_world()
    if tp * ep != world:
        raise ParallelError(f"tp={tp} x ep={ep} = {tp * ep} processes expected, but this launch has {world}: "
                            f"start tp*ep processes (torchrun --nproc-per-node {tp * ep}) or choose tp, ep "
                            f"with tp*ep = {world} (--tp/--ep, or `parallel:` in the config)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)
    if world == 1 and not dist.is_initialized():
        return ParallelContext(0, 1, tp, ep, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    one_shot = None
    if world > 1 and dist.get_backend() == "nccl" and os.environ.get("MIXPREC_ALLREDUCE", "") != "nccl":
        try:
            one_shot = OneShotAllReduce(dist.group.WORLD.group_name, device)
        except (RuntimeError, ImportError) as e:      # e.g. GPUs without peer access
            warnings.warn(f"symmetric memory unavailable, all-reduces use NCCL: {e}", stacklevel=2)
    return ParallelContext(dist.get_rank(), world, tp, ep, device, collective=True, one_shot=one_shot)


class OneShotAllReduce:
    """A symmetric-memory buffer of ONE_SHOT_MAX_BYTES shared by the ranks of `group_name`; each
    call copies x into this rank's buffer, waits for every rank's copy, sums them all into x and
    waits again (so the next call cannot overwrite a buffer a peer still reads)."""

    def __init__(self, group_name: str, device: torch.device):
        import torch.distributed._symmetric_memory as symm_mem   # CUDA only; imported where used
        self.group_name = group_name
        self.buf = symm_mem.empty(ONE_SHOT_MAX_BYTES // 2, dtype=torch.bfloat16, device=device)
        symm_mem.rendezvous(self.buf, group_name)

    def fits(self, x: Tensor) -> bool:
        # the kernel moves 4-byte words at least: an even number of bf16 values
        return (x.dtype == torch.bfloat16 and x.is_contiguous() and x.numel() % 2 == 0
                and x.numel() <= self.buf.numel())

    def __call__(self, x: Tensor) -> Tensor:
        buf = self.buf[:x.numel()].view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", self.group_name, x)


def all_reduce(x: Tensor, ctx: ParallelContext) -> Tensor:
    """Sum of x over all ranks, in place (x's dtype; no host sync)."""
    if not ctx.collective:
        return x
    if ctx.one_shot is not None and ctx.one_shot.fits(x):
        return ctx.one_shot(x)
    dist.all_reduce(x, group=ctx.group)
    return x


def all_gather_last(x: Tensor, ctx: ParallelContext) -> Tensor:
    """x [..., n] from every rank -> [..., world * n], rank r's part at r*n (no host sync)."""
    if not ctx.collective:
        return x
    x = x.contiguous()
    out = torch.empty((ctx.world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather(out, x, group=ctx.group)
    parts = out.view(ctx.world, *x.shape)                               # [world, ..., n]
    return parts.movedim(0, -2).reshape(*x.shape[:-1], ctx.world * x.shape[-1])
