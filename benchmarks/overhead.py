"""Node-steps/s of the DivShare tick vs. the same vmapped local training without communication.

    python3 benchmarks/overhead.py [--nodes 16 64 256] [--ticks 2048] [--repeats 3]

The ratio (local-only throughput / DivShare throughput) is the cost of simulating the network:
round ends (aggregation via gather + segment_sum, plan sampling, queue timing) amortised over
the H local steps of a round. Compile time is excluded (ahead-of-time compile, then timed runs,
the two variants interleaved, best of --repeats each).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from divjax import config, configure, simulate

BASE = ["task=synthetic", "model=mlp", "hidden=[64]", "data.dim=32", "data.samples_per_node=128",
        "fragments=8", "recipients=3", "local_steps=16", "batch_size=8", "lr=0.02",
        "network.upload_mbps=4", "network.download_mbps=4", "network.stragglers.fraction=0.125",
        "network.stragglers.slowdown=5", "duration_s=100", "eval_every_s=100"]


def prepare(cfg, communicate: bool, ticks: int):
  sim = simulate.build(cfg, communicate=communicate)
  state = sim.engine.init(sim.run_key)
  run = simulate.compile_chunk(sim, state, ticks)
  state, _ = run(state, sim.params)  # warm-up
  jax.block_until_ready(state.params)
  return [sim, run, state]


def timed(prep) -> float:
  sim, run, state = prep
  t0 = time.perf_counter()
  state, _ = run(state, sim.params)
  jax.block_until_ready(state.params)
  prep[2] = state
  return time.perf_counter() - t0


def throughputs(cfg, ticks: int, repeats: int) -> tuple[float, float]:
  """Best-of-`repeats` node-steps/s without and with communication, measured interleaved so
  that a busy moment on the machine hits both variants alike."""
  off, on = prepare(cfg, False, ticks), prepare(cfg, True, ticks)
  best_off = best_on = float("inf")
  for _ in range(repeats):
    best_off = min(best_off, timed(off))
    best_on = min(best_on, timed(on))
  return cfg.n_nodes * ticks / best_off, cfg.n_nodes * ticks / best_on


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64, 256])
  ap.add_argument("--ticks", type=int, default=2048)
  ap.add_argument("--repeats", type=int, default=3)
  args = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
  print("| N | P | local only (node-steps/s) | DivShare (node-steps/s) | overhead |")
  print("|---|---|---|---|---|")
  rows = []
  for n in args.nodes:
    cfg = configure.load(None, BASE + [f"n_nodes={n}"])
    off, on = throughputs(cfg, args.ticks, args.repeats)
    p = simulate.build(cfg).task.n_params
    rows.append(dict(n=n, p=p, local=off, divshare=on, ratio=off / on))
    print(f"| {n} | {p} | {off:,.0f} | {on:,.0f} | {off / on:.2f}x |", flush=True)
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
