"""This tree's DivShare tick against an earlier commit's, on benchmarks/overhead.py's workload.

    python3 benchmarks/against_commit.py REV [--nodes 16 64 256] [--ticks 1024] [--rounds 2]

Checks REV out into a temporary git worktree and runs each tree's own benchmarks/overhead.py
in turn (REV, this tree, REV, this tree, ...: `--rounds` alternations, so that a busy moment
of a shared machine hits both alike), each in a fresh process on its own sources. Reports per
N the best DivShare node-steps/s of each tree, their ratio, and each tree's overhead ratio
(local-only / DivShare, measured inside one process).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def overhead(tree: Path, nodes: list[int], ticks: int) -> list[dict]:
  env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  cmd = [sys.executable, str(tree / "benchmarks" / "overhead.py"), "--nodes", *map(str, nodes),
         "--ticks", str(ticks), "--repeats", "3"]
  out = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("rev")
  ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64, 256])
  ap.add_argument("--ticks", type=int, default=1024)
  ap.add_argument("--rounds", type=int, default=2)
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    old = Path(tmp) / "old"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.rev],
                   check=True, capture_output=True)
    try:
      best = {"old": {}, "new": {}}
      for _ in range(args.rounds):
        for name, tree in (("old", old), ("new", ROOT)):
          for row in overhead(tree, args.nodes, args.ticks):
            b = best[name].setdefault(row["n"], row)
            if row["divshare"] > b["divshare"]:
              best[name][row["n"]] = row
    finally:
      subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
  print(f"against {args.rev}, {args.ticks} ticks, best of {args.rounds} alternations x 3 repeats")
  print("| N | DivShare node-steps/s, REV | this tree | this / REV | overhead REV | overhead this tree |")
  print("|---|---|---|---|---|---|")
  for n in args.nodes:
    o, w = best["old"][n], best["new"][n]
    print(f"| {n} | {o['divshare']:,.0f} | {w['divshare']:,.0f} | {w['divshare'] / o['divshare']:.3f} | "
          f"{o['ratio']:.2f}x | {w['ratio']:.2f}x |")


if __name__ == "__main__":
  main()
