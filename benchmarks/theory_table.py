"""The contraction table of docs/THEORY.md: divjax theory contraction for n x J, measured and predicted.

    python3 benchmarks/theory_table.py [--n 16 60] [--j 1 3 6] [--rounds 12] [--seeds 4]

Each case is the small configuration of tests/test_theory.py (MLP 8-16-10, 128 fragments,
H = 1, fast links, no stragglers), DivShare, lr = 0, init.spread.
"""

from __future__ import annotations

import argparse

from divjax import configure, theory

SMALL = ["task=synthetic", "model=mlp", "hidden=[16]", "data.dim=8", "data.samples_per_node=8",
         "data.test_size=20", "local_steps=1", "batch_size=2", "network.upload_mbps=1000",
         "network.download_mbps=1000", "network.latency_ms=1", "network.compute_s_per_step=0.01",
         "network.stragglers.fraction=0", "fragments=128"]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--n", type=int, nargs="+", default=[16, 60])
  ap.add_argument("--j", type=int, nargs="+", default=[1, 3, 6])
  ap.add_argument("--rounds", type=int, default=12)
  ap.add_argument("--seeds", type=int, default=4)
  ap.add_argument("--algorithm", default="divshare")
  ap.add_argument("--set", nargs="*", default=[])
  args = ap.parse_args()
  print("| n | J | lambda_2 (closed form) | first step, engine | rho no delay (MC) | steady, engine "
        "| steady predicted, delayed recursion (MC) | steady / predicted |")
  print("|---|---|---|---|---|---|---|---|")
  for n in args.n:
    for j in args.j:
      cfg = configure.load(None, SMALL + [f"n_nodes={n}", f"recipients={j}", f"algorithm={args.algorithm}", *args.set])
      r = theory.contraction(cfg, rounds=args.rounds, seeds=args.seeds, trials=8000)
      print(f"| {n} | {j} | {r['lambda2']:.4f} | {r['first_step']:.4f} | {r['rho_no_delay']:.4f} | "
            f"{r['steady']:.4f} | {r['steady_predicted']:.4f} | {r['steady'] / r['steady_predicted']:.3f} |",
            flush=True)


if __name__ == "__main__":
  main()
