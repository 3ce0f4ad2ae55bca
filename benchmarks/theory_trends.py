"""Convergence trends of docs/THEORY.md section 2, measured with sweeps and observe.grad_norm.

    python3 benchmarks/theory_trends.py [--config configs/theory_logreg.yaml] [--seeds 3] [--only plateau|decay|divergence|speedup]

plateau: constant step size, ||grad f(xbar)||^2 averaged over the last quarter of the run,
  against lr, recipients J, heterogeneity (classes per node), gradient noise (batch size) and
  delay (link latency), each swept alone from the config, mean and spread over seeds.
divergence: the largest constant lr that does not diverge, against the link latency (delay).
decay: eta = c / sqrt(K) for K rounds, (1/T) sum_t ||grad f(xbar_t)||^2 over the whole run,
  against K; the log-log slope (theory: -1/2 once the sqrt(sigma^2 / (n K)) term dominates)
  with a 95% confidence interval from the regression over every seed's point.
speedup: eta = c / sqrt(K) at a fixed K, the same average against n (--nodes); theory: slope
  -1/2 once gradient noise dominates (least squares: configs/theory_lsq.yaml, zeta = 0).
With a least-squares config (task: lsq) the plateau sweeps zeta and the target noise and prints
each point's exact zeta^2 and sigma^2 (divjax.theory.least_squares_constants).
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


PLATEAU_AXES = {
    # logistic regression / MLP on the synthetic mixture: heterogeneity is classes per node
    "synthetic": [("lr", "0.05,0.1,0.2,0.4"), ("recipients", "1,2,6"), ("data.classes_per_node", "1,2,5,10"),
                  ("batch_size", "2,8,32"), ("network.latency_ms", "1,50,150")],
    # least squares: zeta and the target noise set zeta^2 and sigma^2, computed exactly
    "lsq": [("lr", "0.02,0.05,0.1,0.2"), ("recipients", "1,2,6"), ("data.zeta", "0,1,3"),
            ("data.noise", "0.1,1,3"), ("batch_size", "2,8,32"), ("network.latency_ms", "1,50,150"),
            # q < 1: links too slow for all of a round's J model-sized messages (PAPER.md 4.8)
            ("network.upload_mbps", "100,0.04,0.02")],
}


def task_of(args) -> str:
  from divjax import configure
  return configure.load(args.config, args.set).task


def constants(cfg) -> str:
  """zeta^2 and sigma^2 of a least-squares point (divjax.theory), or '' for other tasks."""
  if cfg.task != "lsq":
    return ""
  from divjax import theory
  c = theory.least_squares_constants(cfg)
  return f"{c['zeta2']:.3g} | {c['sigma2']:.3g} | "


def plateau(args, tmp: Path) -> None:
  lsq = task_of(args) == "lsq"
  extra = "zeta^2 | sigma^2 | " if lsq else ""
  print(f"| swept key | value | {extra}plateau of ||grad f(xbar)||^2, mean over seeds | min | max |")
  print("|---|---|" + "---|" * (2 if lsq else 0) + "---|---|---|")
  for key, values in PLATEAU_AXES[task_of(args)]:
    if args.axes and key not in args.axes:
      continue
    res = run_grid(args.config, [f"{key}={values}", f"seed=0..{args.seeds - 1}"], args.set,
                   tmp / key.replace(".", "_"))
    for v in values.split(","):
      mine = [r for r in res if str(r["values"][key]) == v]
      ys = [tail_mean(r["records"]) for r in mine]
      print(f"| {key} | {v} | {constants(mine[0]['cfg'])}{np.mean(ys):.3g} | {min(ys):.3g} | {max(ys):.3g} |",
            flush=True)


def speedup(args, tmp: Path) -> None:
  """Linear speed-up: eta = c / sqrt(K) for a fixed K, the run-averaged ||grad f(xbar)||^2
  against n; in the noise-dominated regime theory predicts a log-log slope of -1/2."""
  import yaml
  base = yaml.safe_load(Path(args.config).read_text())
  k = args.rounds
  round_s = base["local_steps"] * base["network"]["compute_s_per_step"]
  sets = args.set + [f"duration_s={k * round_s:g}", f"eval_every_s={k * round_s / 20:g}"]
  lrs = [args.c * n ** args.eta_n / math.sqrt(k) for n in args.nodes]
  grid = [f"n_nodes={','.join(map(str, args.nodes))}", f"lr={','.join(f'{x:.6g}' for x in lrs)}"]
  res = [r for s in range(args.seeds) for r in run_grid(args.config, grid, sets + [f"seed={s}"],
                                                        tmp / f"speedup_{s}", zip_=True)]
  print(f"K = {k} rounds, eta = {args.c} n^{args.eta_n} / sqrt(K); (1/T) sum_t ||grad f(xbar_t)||^2 over the "
        f"run's evaluations")
  print("| n | " + ("zeta^2 | sigma^2 | " if task_of(args) == "lsq" else "") + "average over seeds | per seed |")
  print("|---|" + ("---|---|" if task_of(args) == "lsq" else "") + "---|---|")
  xs, ys = [], []
  for n in args.nodes:
    mine = [r for r in res if r["values"]["n_nodes"] == n]
    avgs = [float(np.mean([x["grad_norm_sq"] for x in r["records"][1:]])) for r in mine]
    xs += [math.log(n)] * len(avgs)
    ys += [math.log(a) for a in avgs]
    print(f"| {n} | {constants(mine[0]['cfg'])}{np.mean(avgs):.4g} | {', '.join(f'{a:.4g}' for a in avgs)} |",
          flush=True)
  print(slope_line(np.asarray(xs), np.asarray(ys), "theory in the noise-dominated regime: -0.5"))


def slope_line(x, y, theory: str) -> str:
  slope, intercept = np.polyfit(x, y, 1)
  resid = y - (slope * x + intercept)
  se = math.sqrt(np.sum(resid ** 2) / (len(x) - 2) / np.sum((x - x.mean()) ** 2))
  t = t975(len(x) - 2)
  return f"log-log slope {slope:.3f}, 95% CI [{slope - t * se:.3f}, {slope + t * se:.3f}] ({len(x)} points; {theory})"


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
  print(slope_line(np.asarray(xs), np.asarray(ys), "theory: -0.5"))


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
  ap.add_argument("--only", choices=["plateau", "decay", "divergence", "speedup"])
  ap.add_argument("--nodes", type=int, nargs="+", default=[4, 8, 16, 32], help="speedup: node counts")
  ap.add_argument("--axes", nargs="+", help="plateau: only these swept keys")
  ap.add_argument("--rounds", type=int, default=400, help="speedup: rounds K")
  ap.add_argument("--eta-n", type=float, default=0.0,
                  help="speedup: eta = c n^a / sqrt(K) (0: PAPER.md 3.3's c / sqrt(T); 0.5: the theorem's "
                       "sqrt(n / K) scaling)")
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
    if args.only == "speedup":
      speedup(args, Path(tmp))


if __name__ == "__main__":
  main()
