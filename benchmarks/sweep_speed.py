"""Wall time of one `divjax sweep` against the same points as separate `divjax run` invocations.

    python3 benchmarks/sweep_speed.py [CONFIG] [--lr 0.01 0.02 0.05 0.1] [--seeds 2] [--caches off on] [--set KEY=VALUE ...]
    python3 benchmarks/sweep_speed.py [CONFIG] --scaling 1 4 16 [--set ...]

Points: lr x seed. Measured side by side in one script, each variant in fresh processes (so
imports and JAX start-up count, as for a user): the sweep, then the separate runs, both with
the persistent compilation cache off, then both again with a fresh cache (the first process
of each variant fills it). Prints a Markdown table and checks that every point's
metrics.jsonl is the same in the sweep and in its separate run.

--scaling S1 S2 ...: wall time of one sweep of S points (seed = 0..S-1, cache off) for each S,
and the time per point.

--vmap S [--repeats 2]: one sweep of S points (seed = 0..S-1) with --batch 1 (one after the
other) against --batch S (one vmapped program), alternated, cache off: wall and CPU time
(user + system of the process), and how far the vmapped points' metrics are from the others.

--ablation: whether padding the static ablations (recipients J in {3, 6, 9, 12}, fragments in
{1, 2, 10}) into one program could beat one compile per group. One sweep per axis, cache off;
per point its compile and simulation time. A padded program runs every point at the largest
shape, so it costs at least (points x the largest point's simulation) + one compile.

--fold S [--repeats 2]: the cost a node-folded sweep could reach. One sweep of S points (seed =
0..S-1, one after the other) against one `divjax run` of the same config with S x n_nodes
nodes, alternated, cache off: CPU time of each process. A folded sweep would do the work of the
larger run plus keeping the points apart, so the ratio bounds what folding can save.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd, env) -> float:
  t0 = time.perf_counter()
  subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - t0


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("config", nargs="?", default="configs/quickstart.yaml")
  ap.add_argument("--lr", nargs="+", default=["0.01", "0.02", "0.05", "0.1"])
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument("--set", nargs="*", default=[])
  ap.add_argument("--scaling", type=int, nargs="+")
  ap.add_argument("--vmap", type=int)
  ap.add_argument("--caches", nargs="+", default=["off", "on"], choices=["off", "on"],
                  help="persistent-cache settings to measure (default both)")
  ap.add_argument("--fold", type=int)
  ap.add_argument("--ablation", action="store_true")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  if args.scaling:
    return scaling(args)
  if args.fold:
    return folded(args)
  if args.ablation:
    return ablation(args)
  if args.vmap:
    return vmapped(args)
  py = [sys.executable, "-m", "divjax.cli"]
  sets = ["--set", *args.set] if args.set else []
  points = list(itertools.product(args.lr, range(args.seeds)))
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    for cache in args.caches:
      env = dict(os.environ, DIVJAX_COMPILATION_CACHE="off" if cache == "off" else str(tmp / "cache"))
      shutil.rmtree(tmp / "cache", ignore_errors=True)
      out = tmp / f"sweep_{cache}"
      sweep_s = timed(py + ["sweep", args.config, *sets, "--grid", f"lr={','.join(args.lr)}",
                            "--grid", f"seed=0..{args.seeds - 1}", "--out", str(out), "--quiet"], env)
      shutil.rmtree(tmp / "cache", ignore_errors=True)
      runs_s = 0.0
      for i, (lr, seed) in enumerate(points):
        runs_s += timed(py + ["run", args.config, "--set", *args.set, f"lr={lr}", f"seed={seed}",
                              "--out", str(tmp / f"run_{cache}_{i}"), "--quiet"], env)
        point = next((out / "points").glob(f"{i:03d}_*"))
        same = (point / "metrics.jsonl").read_bytes() == (tmp / f"run_{cache}_{i}" / "metrics.jsonl").read_bytes()
        assert same, f"point {i} differs from its separate run"
      results[cache] = (sweep_s, runs_s)
  import jax
  print(f"{len(points)} points (lr {args.lr} x {args.seeds} seeds) of {args.config} {' '.join(args.set)}; "
        f"device {jax.devices()[0].device_kind}; every point's metrics.jsonl identical to its separate run")
  print("| persistent cache | one sweep (s) | separate runs (s) | sweep / runs |")
  print("|---|---|---|---|")
  for cache, (s, r) in results.items():
    print(f"| {cache} | {s:.1f} | {r:.1f} | {s / r:.2f} |")


def scaling(args):
  import json
  py = [sys.executable, "-m", "divjax.cli", "sweep", args.config] + (["--set", *args.set] if args.set else [])
  env = dict(os.environ, DIVJAX_COMPILATION_CACHE="off")
  print(f"sweeps of S points (seed = 0..S-1) of {args.config} {' '.join(args.set)}, cache off")
  print("| S | sweep wall (s) | first point's compile (s) | wall per point (s) |")
  print("|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for s in args.scaling:
      out = Path(tmp) / f"s{s}"
      wall = timed(py + ["--grid", f"seed=0..{s - 1}", "--out", str(out), "--quiet"], env)
      rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
      print(f"| {s} | {wall:.1f} | {rows[0]['compile_s']:.1f} | {wall / s:.1f} |", flush=True)


def cpu_timed(cmd, env) -> tuple[float, float]:
  """(wall, CPU seconds: user + system of the child process)."""
  import resource
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  wall = timed(cmd, env)
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def vmapped(args):
  import json
  py = [sys.executable, "-m", "divjax.cli", "sweep", args.config] + (["--set", *args.set] if args.set else [])
  env = dict(os.environ, DIVJAX_COMPILATION_CACHE="off")
  s = args.vmap
  times = {1: [], s: []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      for b in (1, s):
        out = Path(tmp) / f"b{b}_{r}"
        times[b].append(cpu_timed(py + ["--grid", f"seed=0..{s - 1}", "--out", str(out), "--quiet",
                                        "--batch", str(b)], env))
    worst, identical = 0.0, 0
    for point in sorted((Path(tmp) / "b1_0" / "points").iterdir()):
      a = [json.loads(l) for l in (point / "metrics.jsonl").read_text().splitlines()]
      v = [json.loads(l) for l in (Path(tmp) / f"b{s}_0" / "points" / point.name / "metrics.jsonl").read_text().splitlines()]
      identical += a == v
      for x, y in zip(a, v):
        for k in x:
          if isinstance(x[k], float):
            worst = max(worst, abs(x[k] - y[k]) / max(abs(x[k]), 1e-6))
          else:
            assert x[k] == y[k], (point.name, k)
  import jax
  print(f"{s} points (seed = 0..{s - 1}) of {args.config} {' '.join(args.set)}; device "
        f"{jax.devices()[0].device_kind}; alternated x{args.repeats}, cache off; every count equal, "
        f"{identical}/{s} metrics.jsonl byte-identical, largest relative float difference {worst:.1e}")
  print("| batch | wall (s), each repeat | CPU (s), each repeat | CPU / batch 1 |")
  print("|---|---|---|---|")
  base = sum(c for _, c in times[1])
  for b, ts in times.items():
    print(f"| {b} | {', '.join(f'{w:.1f}' for w, _ in ts)} | {', '.join(f'{c:.1f}' for _, c in ts)} | "
          f"{sum(c for _, c in ts) / base:.2f} |")


def folded(args):
  import json
  from divjax import configure
  n = configure.load(args.config, args.set).n_nodes
  s = args.fold
  sets = ["--set", *args.set] if args.set else []
  env = dict(os.environ, DIVJAX_COMPILATION_CACHE="off")
  cmds = {f"sweep of {s} points x {n} nodes": [sys.executable, "-m", "divjax.cli", "sweep", args.config, *sets,
                                                "--grid", f"seed=0..{s - 1}", "--batch", "1"],
          f"one run of {s * n} nodes": [sys.executable, "-m", "divjax.cli", "run", args.config, "--set",
                                        *args.set, f"n_nodes={s * n}"]}
  times = {k: [] for k in cmds}
  sim_s = {k: [] for k in cmds}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.repeats):
      for i, (k, cmd) in enumerate(cmds.items()):
        out = Path(tmp) / f"{i}_{r}"
        times[k].append(cpu_timed(cmd + ["--out", str(out), "--quiet"], env))
        summaries = ([json.loads(l) for l in (out / "sweep.jsonl").read_text().splitlines()] if i == 0
                     else [json.loads((out / "summary.json").read_text())])
        sim_s[k].append(sum(x["wall_s"] - x["compile_s"] for x in summaries))
  import jax
  print(f"{args.config} {' '.join(args.set)}; device {jax.devices()[0].device_kind}; alternated "
        f"x{args.repeats}, cache off; CPU = user + system of the process; simulated wall = wall_s - "
        f"compile_s summed over the points (evaluations included)")
  print("| variant | wall (s), each repeat | CPU (s), each repeat | simulation wall (s), each repeat | CPU / sweep |")
  print("|---|---|---|---|---|")
  base = sum(c for _, c in next(iter(times.values())))
  for k, ts in times.items():
    print(f"| {k} | {', '.join(f'{w:.1f}' for w, _ in ts)} | {', '.join(f'{c:.1f}' for _, c in ts)} | "
          f"{', '.join(f'{x:.1f}' for x in sim_s[k])} | {sum(c for _, c in ts) / base:.2f} |")


def ablation(args):
  import json
  py = [sys.executable, "-m", "divjax.cli", "sweep", args.config] + (["--set", *args.set] if args.set else [])
  env = dict(os.environ, DIVJAX_COMPILATION_CACHE="off")
  print(f"{args.config} {' '.join(args.set)}; cache off; one sweep per axis (one group per value)")
  print("| axis | values | compile (s), each | simulation (s), each | grouped: sum of both (s) | "
        "padded, at least: points x largest simulation + largest compile (s) |")
  print("|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for key, values in (("recipients", "3,6,9,12"), ("fragments", "1,2,10")):
      out = Path(tmp) / key
      timed(py + ["--grid", f"{key}={values}", "--out", str(out), "--quiet", "--batch", "1"], env)
      rows = [json.loads(line) for line in (out / "sweep.jsonl").read_text().splitlines()]
      comp = [r["compile_s"] for r in rows]
      sim = [r["wall_s"] - r["compile_s"] for r in rows]
      print(f"| {key} | {values} | {', '.join(f'{c:.1f}' for c in comp)} | {', '.join(f'{s:.1f}' for s in sim)} | "
            f"{sum(comp) + sum(sim):.1f} | {len(rows) * max(sim) + max(comp):.1f} |", flush=True)


if __name__ == "__main__":
  main()
