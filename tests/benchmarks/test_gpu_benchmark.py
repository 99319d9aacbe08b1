"""tests/benchmarks/gpu.py: refuses clearly without CUDA; on a CUDA machine, one short round works."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.benchmarks import gpu

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_and_exits_2() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tests.benchmarks.gpu"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == gpu.EXIT_NO_CUDA == 2
    assert "needs a CUDA GPU" in done.stderr and "tests/benchmarks/pipeline.py" in done.stderr
    assert done.stdout == ""


def test_a_cpu_device_is_refused_even_where_cuda_exists() -> None:
    assert gpu.main(["--device", "cpu"]) == gpu.EXIT_NO_CUDA


@pytest.mark.gpu
@needs_cuda
def test_one_short_round_on_cuda(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--slices", "32", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    assert "| **pipeline total (s)** |" in out and "peak GPU memory allocated (GiB)" in out
