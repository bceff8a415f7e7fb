"""scripts/bench_gpu.py, the prepared GPU benchmark, runs its whole code path on CPU with --tiny."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_tiny_writes_the_page_and_figures(tmp_path):
    page, data = tmp_path / "gpu.md", tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "scripts/bench_gpu.py"), "--tiny", "--steps", "1",
                           "--out", str(page), "--json", str(data)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(data.read_text())["rows"]
    assert [r["status"] for r in rows] == ["ok"] * 3, rows
    assert all(r["step_s"] > 0 and r["tokens_per_s"] > 0 and r["trainable"] < r["params"] for r in rows)
    by_name = {r["name"]: r for r in rows}
    assert by_name["tiny, no reducer"]["vol_tokens"] > by_name["tiny, ckpt on"]["vol_tokens"]  # the reducer reduces
    text = page.read_text()
    assert "scripts/bench_gpu.py --tiny" in text and text.count("\n| tiny, ") == 3 and "not measured" not in text


def test_bench_gpu_refuses_without_cuda(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs the real benchmark")
    done = subprocess.run([sys.executable, str(REPO / "scripts/bench_gpu.py"), "--out", str(tmp_path / "g.md")],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2 and "needs a CUDA device" in done.stderr and not (tmp_path / "g.md").exists()
