"""benchmarks/op_profile.py and benchmarks/collectives.py at tiny sizes (issue 23): both run
and report what they measured (slow set: about a minute)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
  r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_op_profile_splits_ticks_from_round_ends():
  out = _run("benchmarks/op_profile.py", "--nodes", "16", "--ticks", "64", "--top", "5").stdout
  assert "64 ticks (4 round ends)" in out
  per_tick = float(out.split("per-tick ops ")[1].split(" ms")[0].replace(",", ""))
  ends = float(out.split("round-end ops ")[1].split(" ms")[0].replace(",", ""))
  assert per_tick > 0 and ends > 0
  table = [l for l in out.splitlines() if l.startswith("| ") and not l.startswith("| round-end op")]
  assert len(table) == 5 and all(int(l.split("|")[2]) % 64 for l in table)   # none ran every tick


@pytest.mark.slow
def test_collectives_one_process_against_two(tmp_path):
  _run("benchmarks/collectives.py", "--nodes", "16", "--node-steps", "512", "--repeats", "1",
       "--json", str(tmp_path / "rows.json"))
  one, two = json.loads((tmp_path / "rows.json").read_text())
  assert (one["processes"], two["processes"]) == (1, 2)
  # the same program over the same 4 devices: the same collectives, run as often
  assert one["calls_per_round_end"] == two["calls_per_round_end"] > 0
  assert one["bytes_per_round_end"] == two["bytes_per_round_end"] > 0
  assert one["overhead"] > 0 and two["overhead"] > 0
