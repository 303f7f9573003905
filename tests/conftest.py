"""Test setup. Without CUDA, Triton kernels run in its CPU interpreter (logic tests only:
its bf16 arithmetic is wrong, so interpreter tests use fp16/fp32). The variable must be set
before any kernel module is imported, hence here."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def tiny_f32_model(tmp_path_factory):
    """The bf16 fixture loaded in float32 on the CPU, with torch on one thread (tiny matmuls:
    thread hand-offs cost more than they save). Shared by the engine and server tests."""
    import mixprec
    from mixprec.testing.fixtures import make_fixture
    path = make_fixture(tmp_path_factory.mktemp("tiny"), formats=["bf16"])["bf16"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield mixprec.load(path, device="cpu", dtype="float32", progress=False)
    torch.set_num_threads(threads)
