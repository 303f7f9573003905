"""All-reduce latency inside CUDA graphs: NCCL vs torch symmetric memory's one-shot all-reduce
(parallel/context.py OneShotAllReduce uses its copy variant) and two-shot all-reduce, bf16,
4 KiB .. 512 KiB. 50 back-to-back calls per graph replay, best of 5 replays, µs per call;
also the one-shot result's max error against an fp32 NCCL sum.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 4 scripts/bench_allreduce.py
"""
import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

REPS = 50
SIZES = [2048, 4096, 8 * 4096, 32 * 2048, 32 * 4096, 64 * 4096]   # bf16 values: [B, hidden] at decode


def graph_us(fn) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    best = float("inf")
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        best = min(best, a.elapsed_time(b) * 1e3 / REPS)
    return best


def main() -> None:
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    name = dist.group.WORLD.group_name
    for n in SIZES:
        x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        buf = symm_mem.empty(n, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(buf, name)
        out = torch.empty_like(buf)
        ref = x.float()
        dist.all_reduce(ref)
        err = (torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", name, out).float() - ref).abs().max()
        res = {"one_shot_max_err": err.item(), "nccl": graph_us(lambda: dist.all_reduce(x)),
               "one_shot_copy": graph_us(lambda: torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", name, out)),
               "one_shot": graph_us(lambda: torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", name, out)),
               "two_shot": graph_us(lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name))}
        if rank == 0:
            print(f"{dist.get_world_size()} GPUs, {n * 2 // 1024} KiB: " + ", ".join(f"{k} {v:.2f}" for k, v in res.items()),
                  flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
