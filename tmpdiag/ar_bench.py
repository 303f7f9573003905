# torchrun --nproc-per-node N tmpdiag/ar_bench.py : all-reduce latency in CUDA graphs, NCCL vs symm_mem one-shot
import os, torch, torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
r = int(os.environ["LOCAL_RANK"]); torch.cuda.set_device(r)
dist.init_process_group("nccl", device_id=torch.device("cuda", r))
g = dist.group.WORLD; name = g.group_name
REPS = 50
def graph_time(fn):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize(); dist.barrier()
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        for _ in range(REPS): fn()
    ts = []
    for _ in range(5):
        dist.barrier(); torch.cuda.synchronize()
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record(); gr.replay(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1e3 / REPS)
    return min(ts)
for n in [2048, 4096, 8 * 4096, 32 * 2048, 32 * 4096, 64 * 4096]:
    x = torch.randn(n, dtype=torch.bfloat16, device="cuda")
    res = {}
    res["nccl"] = graph_time(lambda: dist.all_reduce(x))
    try:
        buf = symm_mem.empty(n, dtype=torch.bfloat16, device="cuda"); symm_mem.rendezvous(buf, name)
        out = torch.empty_like(buf); buf.copy_(torch.randn_like(buf))
        ref = buf.float().clone(); dist.all_reduce(ref)
        got = torch.ops.symm_mem.one_shot_all_reduce(buf, "sum", name)
        res["oneshot_err"] = (got.float() - ref).abs().max().item()
        res["oneshot"] = graph_time(lambda: torch.ops.symm_mem.one_shot_all_reduce_out(buf, "sum", name, out))
        res["oneshot_copy"] = graph_time(lambda: torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", name, out))
        res["twoshot"] = graph_time(lambda: torch.ops.symm_mem.two_shot_all_reduce_(buf, "sum", name))
    except Exception as e:  # noqa
        res["err"] = repr(e)[:300]
    if r == 0:
        print(f"n={n} ({n*2/1024:.0f} KiB) " + " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()), flush=True)
dist.destroy_process_group()
