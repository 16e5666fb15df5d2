"""``benchmarks/gpu_check.sh``, the one script that verifies the package on a GPU: on this
CPU its dry run lists the steps and loads everything they would run; its real run refuses
a machine without a GPU at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def _run(*args: str, timeout: float, env: dict[str, str] | None = None):
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


@pytest.mark.slow  # 27 s on the 2-core EPYC (it collects the CUDA tests and loads the scripts)
def test_dry_run_lists_the_steps_and_loads_them(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setenv("PYTHON", sys.executable)
    out = _run("--dry-run", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for step in (
        "-m pytest -m cuda tests/cuda",
        "benchmarks/bench_kernel.py --device cuda --quick",
        "benchmarks/gpu_teacher_fit.py --device cuda --examples 5000",
    ):
        assert step in out.stdout, step
    for check in ("bash -n", "imports", "bench_kernel.py loads", "gpu_teacher_fit.py loads"):
        assert any(line.startswith("ok") and check in line for line in out.stdout.splitlines())
    collected = next(line for line in out.stdout.splitlines() if "tests collected" in line)
    assert int(collected.split(": ")[1].split()[0]) > 0
    assert "every check passed" in out.stdout
    assert (tmp_path / "gpu_check.txt").read_text() == out.stdout  # the summary, kept in $OUT


def test_unknown_argument_is_refused():
    out = _run("--quick", timeout=30)
    assert out.returncode == 2
    assert "unknown argument '--quick'" in out.stderr and "--dry-run" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="here the script would run the GPU check")
def test_without_a_gpu_the_real_run_stops_at_once(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHON": sys.executable}
    out = _run(timeout=120, env=env)
    assert out.returncode == 1
    assert "torch.cuda.is_available() is False" in out.stderr
    assert "--dry-run" in out.stderr
