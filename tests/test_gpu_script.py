"""benchmarks/gpu.sh, the GPU benchmark script of issue 23, at tiny sizes on the CPU: every
step must run and write its JSON file (slow set: about 4 minutes; the vmap GN-LeNet step is
skipped with --tiny, a grouped convolution takes many minutes on a CPU)."""

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_runs_tiny(tmp_path):
  env = dict(os.environ, OUT=str(tmp_path), JAX_PLATFORMS="cpu")
  r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--tiny"], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "FAILED" not in r.stderr, r.stderr[-3000:]
  device = json.loads((tmp_path / "device.json").read_text())
  assert device["platform"] == "cpu"
  largest = json.loads((tmp_path / "largest_mlp.json").read_text())[0]
  assert largest["run"]["status"] == "completed" and largest["run"]["n"] == largest["largest_estimated"]
  assert largest["estimates_gb"][str(largest["largest_estimated"] * 2)] > largest["limit_gb"]
  rows = json.loads((tmp_path / "overhead_mlp.json").read_text())
  assert [r["n"] for r in rows] == [16, 32] and all(r["overhead"] > 0 for r in rows)
  for impl in ("vmap", "fast"):
    got = json.loads((tmp_path / f"gnlenet_{impl}.json").read_text())
    if isinstance(got, list):
      assert got[0]["set"] == [f"model_impl={impl}"]
    else:
      assert "skipped" in got   # no CIFAR-10 here, or vmap with --tiny (minutes on a CPU)
  if (ROOT.parent / "shared" / "data" / "cifar10.npz").exists():  # the CPU path really ran
    assert isinstance(json.loads((tmp_path / "gnlenet_fast.json").read_text()), list)
  sweep = json.loads((tmp_path / "sweep64.json").read_text())
  assert sweep["exit"] == 0 and sweep["points"] == 4
