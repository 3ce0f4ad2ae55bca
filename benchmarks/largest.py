"""The largest node count that fits a memory budget, and a real run of it (issue 23).

    python3 benchmarks/largest.py --model mlp --limit-gb 20 --json runs/largest_mlp.json
    python3 benchmarks/largest.py --model gnlenet --limit-gb 20 --json runs/largest_gnlenet.json
    python3 benchmarks/largest.py --model mlp --limit-gb 80 141 --estimate-only   # GPU sizes

N doubles from --start while divjax's memory estimate (divjax.memory, the guard every run
passes: within 0.75-1.5x of XLA's own analysis) stays within the budget. The largest such N
is then run for real with `divjax run` (--rounds rounds, one device, memory_limit_gb = the
budget), and its wall time, training throughput, compile time, peak memory (the process's
resident set, and the accelerator's own peak where it reports one) are recorded. If that run
fails, the next smaller N is run. Training blocks (train_block) are chosen by `divjax run`'s
guard as for any run.

Workloads as in benchmarks/scale.py (mlp: MLP 32-64-10, DivShare Omega 8, J 3, H 16, batch 8;
gnlenet: configs/cifar10_divshare.yaml at batch 8, H 4, evaluated on 64 nodes and 500 test
images). --tiny: tiny models and a tiny budget, to test the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402  (the workloads)


def _cfg(model: str, n: int, tiny: bool, data_dir: str, limit_gb: float):
  from divjax import configure
  path, sets = scale.overrides(model, n, tiny, data_dir)
  return path, sets + [f"memory_limit_gb={limit_gb}"], configure.load(path, sets)


def estimate_gb(model: str, n: int, tiny: bool, data_dir: str) -> float:
  from divjax import memory
  _, _, cfg = _cfg(model, n, tiny, data_dir, 1.0)
  if cfg.train_block is None:  # as `divjax run` would train it when all nodes at once do not fit
    cfg = memory.blocked_if_needed(cfg.model_copy(update={"memory_limit_gb": 1.0}))
  return memory.parts(memory.shapes(cfg))["total"] / 1e9


def largest_fitting(model: str, start: int, limit_gb: float, tiny: bool, data_dir: str) -> list[tuple[int, float]]:
  """[(N, estimate GB)] for N = start, 2 start, ... up to the first that does not fit."""
  out, n = [], start
  while True:
    gb = estimate_gb(model, n, tiny, data_dir)
    out.append((n, gb))
    if gb > limit_gb or n > 2**24:
      return out
    n *= 2


def run_one(model: str, n: int, rounds: int, limit_gb: float, tiny: bool, data_dir: str) -> dict:
  path, sets, cfg = _cfg(model, n, tiny, data_dir, limit_gb)
  seconds = rounds * cfg.local_steps * cfg.dt_us / 1e6
  # evaluated at the start and the end, on 64 seeded nodes and 500 seeded test samples: the
  # cost measured is the simulation's, not a full evaluation of N models
  sets = sets + [f"duration_s={seconds}", f"eval_every_s={seconds}", "checkpoint_every_s=0",
                 f"eval.nodes={min(n, 64)}", "eval.test_subsample=500"]
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "run")
    rss = os.path.join(tmp, "rss")
    # GNU time writes this run's own peak resident set (KiB) to a file
    cmd = [sys.executable, "-m", "divjax.cli", "run",
           *([path] if path else []), "--set", *sets, "--out", out, "--quiet", "--no-cache"]
    if os.path.exists("/usr/bin/time"):  # absent on some machines: then no resident-set peak
      cmd = ["/usr/bin/time", "-f", "%M", "-o", rss] + cmd
    w0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - w0
    peak = _peak_gb(rss)
    if r.returncode:
      return {"n": n, "status": "failed", "exit": r.returncode, "peak_rss_gb": peak, "wall_s": wall,
              "error": r.stderr.strip().splitlines()[-3:]}
    s = json.load(open(os.path.join(out, "summary.json")))
    conf = open(os.path.join(out, "config.yaml")).read()
  block = next((l.split(":", 1)[1].strip() for l in conf.splitlines() if l.startswith("train_block:")), None)
  return {"n": n, "status": s["status"], "p": s["n_params"], "rounds": rounds,
          "estimate_gb": s["memory"]["estimate_bytes"] / 1e9, "train_block": block,
          "peak_rss_gb": peak,
          "device_peak_gb": (s.get("device_peak_bytes") or 0) / 1e9 or None,
          "wall_s": wall, "compile_s": s["compile_s"], "node_steps_per_s": s["node_steps_per_s"],
          "device": s["device"]}


def _peak_gb(path: str):
  try:  # the last line: a killed run's file starts with a note from time
    return int(open(path).read().split()[-1]) / 2**20
  except (OSError, ValueError, IndexError):
    return None


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=["mlp", "gnlenet"], default="mlp")
  ap.add_argument("--limit-gb", type=float, nargs="+", default=[20.0])
  ap.add_argument("--start", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=2, help="rounds of the real run (default 2)")
  ap.add_argument("--estimate-only", action="store_true", help="only the estimates, no run")
  ap.add_argument("--run", type=int, metavar="N", help="run this N (no search; the estimates are still listed)")
  ap.add_argument("--data-dir", default="../shared/data")
  ap.add_argument("--tiny", action="store_true")
  ap.add_argument("--json")
  args = ap.parse_args()
  rows = []
  for limit in args.limit_gb:
    tried = largest_fitting(args.model, args.start, limit, args.tiny, args.data_dir)
    fits = [(n, gb) for n, gb in tried if gb <= limit]
    row = {"model": args.model, "limit_gb": limit, "estimates_gb": {str(n): round(gb, 3) for n, gb in tried},
           "largest_estimated": fits[-1][0] if fits else None}
    row["runs"] = []  # the largest first, then smaller until one completes
    for n in ([args.run] if args.run else [] if args.estimate_only else [n for n, _ in reversed(fits)]):
      row["runs"].append(run_one(args.model, n, args.rounds, limit, args.tiny, args.data_dir))
      if row["runs"][-1]["status"] == "completed":
        row["run"] = row["runs"][-1]
        break
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
