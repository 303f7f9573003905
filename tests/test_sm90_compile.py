"""Every kernel launch of a realistic set of calls compiles for sm_90 (tests/sm90_compile.py runs in
its own process: the kernels there must not be in interpreter mode). CPU machines only: on a GPU
the kernels compile and run in the GPU tests."""
import os
import subprocess
import sys

import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sm90_compile.py")
    r = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=1200)
    if r.returncode == 77:
        pytest.skip(r.stdout.strip().splitlines()[-1])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert " 0 failed" in r.stdout
