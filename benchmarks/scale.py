"""The cost of N simulated nodes, part by part: one table from one script (issue 23).

    python3 benchmarks/scale.py --model mlp --nodes 16 64 256 1024 4096 16384 --json runs/scale_mlp.json
    python3 benchmarks/scale.py --model gnlenet --nodes 16 64 256 1024 --json runs/scale_gnlenet.json

For every N, in a fresh process (so that its peak memory is its own):
* the DivShare tick and the same vmapped local training without communication are compiled
  (compile time measured), then run in chunks of whole rounds, the two interleaved, each
  chunk's *CPU time* taken (process_time: all threads; robust to other jobs on the machine);
* overhead = CPU per node-step with communication / without (best chunk of each);
* node-steps per CPU-second of the DivShare tick;
* bytes per node of each part of the state as the engine allocates it (params, optimizer,
  ring, message tables, other state), plus the data and the largest temporaries (training,
  evaluation) from divjax.memory's estimate;
* the process's peak resident memory.

Workloads. mlp: benchmarks/overhead.py's (synthetic, MLP 32-64-10, Omega 8, J 3, H 16, batch 8,
12.5% stragglers). gnlenet: the paper's CIFAR-10 DivShare set-up (configs/cifar10_divshare.yaml:
GN-LeNet, Omega 10, J 6) at batch 8, H 4, one device, evaluated on a 500-image subsample of 64
nodes (evaluation is not timed). --tiny shrinks everything for a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import BASE as MLP  # noqa: E402  (the same MLP workload as overhead.py's)

GNLENET = ["batch_size=8", "local_steps=4", "devices=1", "duration_s=100", "eval_every_s=100",
           "eval.test_subsample=500"]
TINY = ["hidden=[8]", "data.dim=4", "data.samples_per_node=16", "local_steps=4"]


def overrides(model: str, n: int, tiny: bool, data_dir: str) -> tuple[str | None, list[str]]:
  if model == "mlp":
    return None, MLP + (TINY if tiny else []) + [f"n_nodes={n}"]
  extra = ["data.samples_per_node=64", "data.partition=iid"] if tiny else []  # a small slice of the data
  return "configs/cifar10_divshare.yaml", GNLENET + extra + [
      f"n_nodes={n}", f"eval.nodes={min(n, 64)}", f"data.dir={data_dir}"]


def _clock():
  """CPU time on a CPU backend (all threads; other jobs on the machine do not count), wall
  time on an accelerator (where the host mostly waits)."""
  import jax
  return time.process_time if jax.default_backend() == "cpu" else time.perf_counter


def _timed_chunk(prep) -> float:
  import jax
  sim, run, state = prep
  clock = _clock()
  c0 = clock()
  state, _ = run(state, sim.params)
  jax.block_until_ready(state.params)
  prep[2] = state
  return clock() - c0


def _prepare(cfg, communicate: bool, ticks: int):
  import jax
  from divjax import simulate
  sim = simulate.build(cfg, communicate=communicate)
  state = simulate.place(sim, sim.engine.init(sim.run_key))
  c0 = time.perf_counter()
  run = simulate.compile_chunk(sim, state, ticks)
  compile_s = time.perf_counter() - c0
  state, _ = run(state, sim.params)  # warm-up
  jax.block_until_ready(state.params)
  return [sim, run, state], compile_s


def per_part(sim) -> dict[str, float]:
  """Bytes per node of each part: the state's parts as the engine allocates them, and the
  data and largest temporaries as divjax.memory estimates them."""
  from divjax import memory
  est = memory.estimate(sim)
  n = sim.cfg.n_nodes
  keys = ("params", "optimizer", "ring", "messages", "other_state", "data", "training", "evaluation")
  out = {k: est.get(k, 0) / n for k in keys}
  out["total_estimate"] = est["total"] / n
  return out


def measure_one(model: str, n: int, ticks: int, repeats: int, tiny: bool, data_dir: str,
                extra: list[str]) -> dict:
  import jax
  from divjax import configure
  path, sets = overrides(model, n, tiny, data_dir)
  cfg = configure.load(path, sets + extra)
  ticks = max(cfg.local_steps, ticks // cfg.local_steps * cfg.local_steps)  # whole rounds
  off, _ = _prepare(cfg, False, ticks)
  on, compile_s = _prepare(cfg, True, ticks)
  cpu_off = cpu_on = float("inf")
  for _ in range(repeats):  # interleaved: a busy moment hits both alike
    cpu_off = min(cpu_off, _timed_chunk(off))
    cpu_on = min(cpu_on, _timed_chunk(on))
  node_steps = n * ticks
  return dict(model=model, set=extra, n=n, p=on[0].task.n_params, ticks=ticks, ring_depth=on[0].engine.depth,
              overhead=cpu_on / cpu_off, node_steps_per_cpu_s=node_steps / cpu_on,
              local_node_steps_per_cpu_s=node_steps / cpu_off, compile_s=compile_s,
              bytes_per_node=per_part(on[0]),
              peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              device=jax.devices()[0].device_kind, clock="cpu" if _clock() is time.process_time else "wall")


def ticks_for(model: str, n: int, node_steps: int) -> int:
  """Chunk length: about `node_steps` node-steps per chunk, at least one round."""
  return max(1, node_steps // n)


def table(rows: list[dict]) -> str:
  lines = ["| N | P | ticks | overhead | node-steps per CPU-s (DivShare) | local only | compile (s) | "
           "params | optimizer | ring | message tables | other state | data | training (temp.) | "
           "evaluation (temp.) | estimate, total | peak RSS (GB) |",
           "|" + "---|" * 17]
  kb = lambda b: f"{b / 1024:,.1f}"
  for r in rows:
    b = r["bytes_per_node"]
    lines.append(
        f"| {r['n']:,} | {r['p']:,} | {r['ticks']} | {r['overhead']:.2f}x | {r['node_steps_per_cpu_s']:,.0f} | "
        f"{r['local_node_steps_per_cpu_s']:,.0f} | {r['compile_s']:.1f} | {kb(b['params'])} | "
        f"{kb(b['optimizer'])} | {kb(b['ring'])} | {kb(b['messages'])} | {kb(b['other_state'])} | "
        f"{kb(b['data'])} | {kb(b['training'])} | {kb(b['evaluation'])} | {kb(b['total_estimate'])} | "
        f"{r['peak_rss_gb']:.2f} |")
  return "\n".join(lines) + "\n(bytes per node in KiB)"


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", choices=["mlp", "gnlenet"], default="mlp")
  ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64, 256, 1024])
  ap.add_argument("--node-steps", type=int, default=2**21,
                  help="node-steps per timed chunk (ticks = this / N, whole rounds; default 2^21)")
  ap.add_argument("--repeats", type=int, default=2, help="timed chunks of each variant (best taken)")
  ap.add_argument("--data-dir", default="../shared/data", help="the .npz data directory (gnlenet)")
  ap.add_argument("--tiny", action="store_true", help="tiny models and data: a test of the script")
  ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                  help="config overrides on top of the workload's, e.g. model_impl=vmap")
  ap.add_argument("--json", help="also write the rows to this JSON file")
  ap.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: measure this N here
  args = ap.parse_args()
  if args.one is not None:
    row = measure_one(args.model, args.one, ticks_for(args.model, args.one, args.node_steps),
                      args.repeats, args.tiny, args.data_dir, args.set)
    print("ROW " + json.dumps(row), flush=True)
    return
  rows, failed = [], []
  for n in args.nodes:  # each N in a fresh process: its own peak memory, no cache effects
    cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--model", args.model,
           "--node-steps", str(args.node_steps), "--repeats", str(args.repeats), "--data-dir", args.data_dir,
           *(["--set", *args.set] if args.set else [])]
    out = subprocess.run(cmd + (["--tiny"] if args.tiny else []), capture_output=True, text=True)
    line = next((l for l in out.stdout.splitlines() if l.startswith("ROW ")), None)
    if out.returncode or line is None:
      print(f"N = {n} failed:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
      failed.append({"n": n, "failed": True, "exit": out.returncode, "error": out.stderr.strip().splitlines()[-3:]})
      break  # a larger N would fail too (memory) or take longer
    rows.append(json.loads(line[4:]))
    print(f"N = {n}: overhead {rows[-1]['overhead']:.2f}x, "
          f"{rows[-1]['node_steps_per_cpu_s']:,.0f} node-steps per CPU-s", file=sys.stderr, flush=True)
    if args.json:  # after every N: a time limit that stops the script keeps the rows measured
      with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
  if failed and args.json:
    with open(args.json, "w") as f:
      json.dump(rows + failed, f, indent=1)
  if not rows:
    sys.exit(1)
  print(f"{args.model} {' '.join(args.set)}, {rows[0]['device']}, {time.strftime('%Y-%m-%d %H:%M')}, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(table(rows))
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  main()
