"""L2 prefetch tables (kernels/prefetch.py) and what the MoE layer prefetches. The
prefetch itself only moves data into L2 (no result to compare): on a Hopper GPU it must run,
inside a captured graph too, and leave the decode step's output unchanged (tests/test_gpu.py
runs every fixture with it on)."""
import pytest
import torch

from mixprec.kernels import prefetch as l2

CUDA = torch.cuda.is_available()


def test_rows_cover_a_tensor_and_one_expert_slice():
    t = torch.empty(300_001, dtype=torch.uint8)
    rows = l2.table_rows(t)
    assert rows[0][0] == t.data_ptr() and all(r[1] <= l2.ROW_BYTES and r[2:] == (0, -1) for r in rows)
    assert [r[0] for r in rows] == [t.data_ptr() + i * l2.ROW_BYTES for i in range(len(rows))]
    assert sum(r[1] for r in rows) == t.numel()
    s = torch.empty(3, 1000, 100, dtype=torch.float16)       # a stack of 3 experts
    rows = l2.table_rows(s, bucket=2)
    assert sum(r[1] for r in rows) == 200_000 and {r[2] for r in rows} == {200_000} and {r[3] for r in rows} == {2}


def test_layer_table_holds_the_down_slices_within_the_window(monkeypatch):
    from mixprec.formats.base import Packed
    from mixprec.layers.moe import MoE
    E, H, I, k = 4, 64, 32, 2
    moe = MoE(H, I, E, k, True, torch.float16, "cpu")
    for e in range(E):
        for p, (n, kk) in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            moe.set_expert(e, p, Packed("dense", n, kk, {"weight": torch.zeros(n, kk, dtype=torch.float16)}))
    moe.finalize()
    di = [i for i, b in enumerate(moe.buckets) if b.proj == "down"][0]
    down = k * H * I * 2                                        # bytes of k experts' down weights
    for lo, hi, rows in ((0, down - 1, 0), (0, down, 1), (down, down, 1), (down + 1, 2 * down, 0)):
        monkeypatch.setattr(l2, "MIN_BYTES", lo)
        monkeypatch.setattr(l2, "BUDGET", hi)
        moe.__dict__.pop("_l2tab", None)
        tab = moe._prefetch_table().tolist()
        assert len(tab) == rows
        if rows:
            w = moe.buckets[di].w.tensors()["weight"]
            assert tab[0] == [w.data_ptr(), H * I * 2, H * I * 2, di]


@pytest.mark.skipif(not CUDA or not l2.enabled(0), reason="needs a Hopper GPU")
def test_prefetch_runs_eagerly_and_in_a_graph():
    w = torch.randn(4, 512, 256, device="cuda", dtype=torch.bfloat16)
    fixed = torch.randn(100_000, device="cuda")
    tab = l2.make_table(l2.table_rows(w, 0) + l2.table_rows(fixed), "cuda")
    maps = torch.tensor([[0, -1, 1, 3, 2]], dtype=torch.int32, device="cuda")   # expert 1 held elsewhere
    ids = torch.tensor([1, 4, 0], dtype=torch.int32, device="cuda")
    before = (w.clone(), fixed.clone())
    l2.launch_side(tab, ids, maps)
    l2.join(w.device)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        l2.launch_side(tab, ids, maps)
        y = fixed * 2
        l2.join(w.device)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(w, before[0]) and torch.equal(y, before[1] * 2)
