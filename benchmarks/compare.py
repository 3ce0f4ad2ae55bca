"""Compare algorithms on one config: time-to-target and final accuracy, as a Markdown table.

    python3 benchmarks/compare.py configs/quickstart.yaml --algorithms divshare adpsgd swift \\
        --set recipients=6 --seeds 0 1

Every algorithm runs the same task, data split, network and stragglers; keys an algorithm
does not use (`fragments` for AD-PSGD, `recipients` for D-PSGD, ...) are dropped for it
(configure.load_for). With J = recipients,
DivShare and Swift send J full-model equivalents per round and AD-PSGD floor(J/2) pings plus
about as many replies, the paper's equal-volume comparison for J = 6.
"""

from __future__ import annotations

import argparse
import statistics

from divjax import configure, sharding, simulate


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("config")
  ap.add_argument("--algorithms", nargs="+", default=["divshare", "adpsgd", "swift"])
  ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0])
  args = ap.parse_args()
  base = configure.load_for(args.algorithms[0], args.config, args.set)
  sharding.request_cpu_devices(base.devices, base.n_nodes)  # `devices` as `divjax run` has them
  rows = []
  for name in args.algorithms:
    per_seed = []
    for seed in args.seeds:
      cfg = configure.load_for(name, args.config, args.set + [f"seed={seed}"])
      summary, _ = simulate.run(cfg)
      f = summary["final"]
      per_seed.append((summary["time_to_target_s"], f["acc_mean"], f["acc_min"], f["msgs_delivered"] / max(1, f["msgs_sent"]),
                       f["staleness_s"] or 0.0, summary["wall_s"]))
    ttt = [p[0] for p in per_seed]
    reached = [x for x in ttt if x is not None]
    ttt_s = (f"{statistics.mean(reached):.1f}" if len(reached) == len(ttt) else
             f"{statistics.mean(reached):.1f} ({len(reached)}/{len(ttt)} seeds)" if reached else "never")
    mean = lambda i: statistics.mean(p[i] for p in per_seed)
    rows.append((name, ttt_s, mean(1), mean(2), mean(3), mean(4), mean(5)))
  target = base.target
  print(f"config {args.config} {' '.join(args.set)}; seeds {args.seeds}; target acc_mean >= {target}")
  print("| algorithm | time to target (s) | final acc (mean) | final acc (min node) | delivered / sent | staleness (s) | wall (s) |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.0f} |")


if __name__ == "__main__":
  main()
