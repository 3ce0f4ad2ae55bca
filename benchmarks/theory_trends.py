"""Convergence trends of docs/THEORY.md section 2, measured with sweeps and observe.grad_norm.

    python3 benchmarks/theory_trends.py [--config configs/theory_logreg.yaml] [--seeds 3] [--only plateau|decay]

plateau: constant step size, ||grad f(xbar)||^2 averaged over the last quarter of the run,
  against lr, recipients J, heterogeneity (classes per node), gradient noise (batch size) and
  delay (link latency), each swept alone from the config, mean and spread over seeds.
divergence: the largest constant lr that does not diverge, against the link latency (delay).
decay: eta = c / sqrt(K) for K rounds, (1/T) sum_t ||grad f(xbar_t)||^2 over the whole run,
  against K; the log-log slope (theory: -1/2 once the sqrt(sigma^2 / (n K)) term dominates)
  with a 95% confidence interval from the regression over every seed's point.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np

from divjax import sweep


def run_grid(config: str, grid: list[str], sets: list[str], out: Path, zip_: bool = False) -> list[dict]:
  """Runs a sweep in-process; returns each point's values and metrics records."""
  pts = sweep.points(config, sets, sweep.parse_grid(grid, zip_))
  sweep.run(pts, out, progress=False)
  res = []
  for p in pts:
    recs = [json.loads(l) for l in (out / "points" / p.name / "metrics.jsonl").read_text().splitlines()]
    res.append({"values": p.values, "cfg": p.cfg, "records": recs})
  return res


def tail_mean(records: list[dict], frac: float = 0.25) -> float:
  ts = [r for r in records if r["time_s"] >= (1 - frac) * records[-1]["time_s"]]
  return float(np.mean([r["grad_norm_sq"] for r in ts]))


def plateau(args, tmp: Path) -> None:
  axes = [("lr", "0.05,0.1,0.2,0.4"), ("recipients", "1,2,6"), ("data.classes_per_node", "1,2,5,10"),
          ("batch_size", "2,8,32"), ("network.latency_ms", "1,50,150")]
  print("| swept key | value | plateau of ||grad f(xbar)||^2, mean over seeds | min | max |")
  print("|---|---|---|---|---|")
  for key, values in axes:
    res = run_grid(args.config, [f"{key}={values}", f"seed=0..{args.seeds - 1}"], args.set,
                   tmp / key.replace(".", "_"))
    for v in values.split(","):
      ys = [tail_mean(r["records"]) for r in res if str(r["values"][key]) == v]
      print(f"| {key} | {v} | {np.mean(ys):.3g} | {min(ys):.3g} | {max(ys):.3g} |", flush=True)


def decay(args, tmp: Path) -> None:
  rounds = [50, 100, 200, 400, 800]
  import yaml
  base = yaml.safe_load(Path(args.config).read_text())
  round_s = base["local_steps"] * base["network"]["compute_s_per_step"]
  durations = ",".join(f"{k * round_s:g}" for k in rounds)
  lrs = ",".join(f"{args.c / math.sqrt(k):.6g}" for k in rounds)
  evals = ",".join(f"{k * round_s / 20:g}" for k in rounds)
  xs, ys = [], []
  print(f"eta = {args.c} / sqrt(K); (1/T) sum_t ||grad f(xbar_t)||^2 over the run's evaluations")
  print("| K (rounds) | eta | average over seeds | per seed |")
  print("|---|---|---|---|")
  by_k = {}
  for seed in range(args.seeds):
    res = run_grid(args.config, [f"duration_s={durations}", f"lr={lrs}", f"eval_every_s={evals}"],
                   args.set + [f"seed={seed}"], tmp / f"decay_{seed}", zip_=True)
    for k, r in zip(rounds, res):
      avg = float(np.mean([x["grad_norm_sq"] for x in r["records"][1:]]))
      by_k.setdefault(k, []).append(avg)
      xs.append(math.log(k))
      ys.append(math.log(avg))
  for k in rounds:
    print(f"| {k} | {args.c / math.sqrt(k):.4f} | {np.mean(by_k[k]):.4g} | "
          f"{', '.join(f'{v:.4g}' for v in by_k[k])} |")
  x, y = np.asarray(xs), np.asarray(ys)
  slope, intercept = np.polyfit(x, y, 1)
  resid = y - (slope * x + intercept)
  se = math.sqrt(np.sum(resid ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
  t = t975(len(x) - 2)
  print(f"log-log slope {slope:.3f}, 95% CI [{slope - t * se:.3f}, {slope + t * se:.3f}] "
        f"({len(x)} points; theory: -0.5)")


# Student's t 97.5% quantiles (two-sided 95%), by degrees of freedom (no scipy dependency)
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df: int) -> float:
  """The quantile at the largest tabulated df <= df (conservative), 1.96 beyond the table."""
  return _T975[max(k for k in _T975 if k <= df)] if df <= 120 else 1.96


def divergence(args, tmp: Path) -> None:
  """The largest lr that does not diverge, against the delay (link latency; rounds of 40 ms)."""
  lrs, latencies = args.lrs, args.latencies
  res = run_grid(args.config, [f"network.latency_ms={','.join(map(str, latencies))}",
                               f"lr={','.join(f'{lr:g}' for lr in lrs)}"], args.set, tmp / "divergence")
  print("| latency (ms) | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
  print("|---|" + "---|" * len(lrs))
  for lat in latencies:
    cells = []
    for r in (r for r in res if r["values"]["network.latency_ms"] == lat):
      last = r["records"][-1]
      diverged = len(r["records"]) < 2 or last["time_s"] < r["cfg"].duration_s - 1e-9
      cells.append("diverged" if diverged else f"{last['grad_norm_sq']:.3g}")
    print(f"| {lat} | " + " | ".join(cells) + " |", flush=True)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/theory_logreg.yaml")
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--c", type=float, default=1.0, help="eta = c / sqrt(K) in the decay experiment")
  ap.add_argument("--set", nargs="*", default=[])
  ap.add_argument("--only", choices=["plateau", "decay", "divergence"])
  ap.add_argument("--lrs", type=float, nargs="+", default=[0.5, 1, 2, 4, 8, 16, 32],
                  help="divergence: the constant step sizes tried")
  ap.add_argument("--latencies", type=int, nargs="+", default=[1, 50, 150],
                  help="divergence: the link latencies (ms) tried")
  args = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    if args.only in (None, "plateau"):
      plateau(args, Path(tmp))
    if args.only in (None, "decay"):
      decay(args, Path(tmp))
    if args.only in (None, "divergence"):
      divergence(args, Path(tmp))


if __name__ == "__main__":
  main()
