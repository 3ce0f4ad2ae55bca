"""Wall time of one `divjax sweep` (imports and compiles included, as a user sees it).

    python3 benchmarks/sweep_wall.py --out DIR --json FILE -- SWEEP ARGS...

Used by benchmarks/gpu.sh for its 64-point sweep.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="the sweep directory (replaced if divjax made it)")
  ap.add_argument("--json", required=True)
  ap.add_argument("sweep", nargs=argparse.REMAINDER, help="after --: divjax sweep's arguments")
  args = ap.parse_args()
  rest = [a for a in args.sweep if a != "--"]
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, "-m", "divjax.cli", "sweep", *rest, "--out", args.out,
                      "--force", "--quiet", "--no-cache"], capture_output=True, text=True)
  wall = time.perf_counter() - t0
  info = json.load(open(f"{args.out}/sweep_summary.json")) if r.returncode == 0 else {}
  points = len(open(f"{args.out}/sweep.csv").read().splitlines()) - 1 if r.returncode == 0 else None
  row = {"argv": rest, "exit": r.returncode, "wall_s": wall, "points": points,
         "wall_s_per_point": wall / points if points else None, "sweep_summary": info}
  if r.returncode:
    row["error"] = r.stderr.strip().splitlines()[-3:]
  json.dump(row, open(args.json, "w"), indent=1)
  print(json.dumps(row))
  sys.exit(r.returncode)


if __name__ == "__main__":
  main()
