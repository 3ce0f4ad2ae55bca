"""Training throughput inside a real run: timed compiled chunks of a run's own tick loop.

    python3 benchmarks/inrun_speed.py configs/cifar10_divshare.yaml --data ../shared/data \
        --nodes 16 64 --devices 2 --ticks 256 --repeats 3

Builds the simulation exactly as `divjax run` does (the config, with n_nodes, devices and
data.dir overridden), compiles one chunk of --ticks ticks ahead of time and times --repeats
calls of it, carrying the state from call to call as the run does. Every node's local step
is computed on every tick (with compute stragglers, a slow node's step is masked on the
ticks it is busy, and still counted here), so samples/s = N * ticks * batch / wall. The
chunk includes everything a run's chunk does: minibatch sampling, the local steps and,
unless --local-only, the algorithm's communication (round ends, fragment routing, the
network model). Evaluation and checkpoints are outside chunks and not timed.
"""

from __future__ import annotations

import argparse
import json
import time


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("config")
  ap.add_argument("--data", default=None, help="data.dir (the .npz directory)")
  ap.add_argument("--nodes", type=int, nargs="+", default=[16])
  ap.add_argument("--devices", type=int, default=2)
  ap.add_argument("--ticks", type=int, default=256)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--local-only", action="store_true", help="no communication (local steps only)")
  ap.add_argument("--set", nargs="*", default=[], help="further config overrides key=value")
  args = ap.parse_args()

  from divjax import sharding, simulate as _sim  # noqa: F401
  sharding.request_cpu_devices(args.devices)  # before the backend starts
  import jax
  from divjax import configure, simulate

  for n in args.nodes:
    over = [f"n_nodes={n}", f"devices={args.devices}"] + args.set
    if args.data:
      over.append(f"data.dir={args.data}")
    cfg = configure.load(args.config, over)
    sim = simulate.build(cfg, communicate=not args.local_only)
    state = simulate.place(sim, sim.engine.init(sim.run_key))
    t0 = time.perf_counter()
    run = simulate.compile_chunk(sim, state, args.ticks)
    compile_s = time.perf_counter() - t0
    state, _ = run(state, sim.params)  # warm-up call
    jax.block_until_ready(state.params)
    rates = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      state, _ = run(state, sim.params)
      jax.block_until_ready(state.params)
      rates.append(n * args.ticks * cfg.batch_size / (time.perf_counter() - t0))
    print(json.dumps({"config": args.config, "n_nodes": n, "devices": args.devices,
                      "ticks": args.ticks, "local_only": args.local_only,
                      "device": jax.devices()[0].device_kind, "compile_s": round(compile_s, 1),
                      "samples_per_s": [round(r) for r in rates]}), flush=True)


if __name__ == "__main__":
  main()
