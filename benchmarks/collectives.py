"""What moving messages between processes costs: one process against two (issue 23).

    python3 benchmarks/collectives.py --nodes 256 1024 4096

The node axis of a run spans every device of every process (divjax.multihost); routing a
message from a node on one device to a node on another is left to XLA's partitioner, which
inserts collectives. This script measures their cost on the MLP workload of
benchmarks/scale.py (DivShare, Omega 8, J 3, H 16), with the same 4 devices arranged two ways:

* one process with 4 host devices: the collectives are copies inside one process;
* two processes with 2 host devices each, on localhost: the collectives cross processes
  (gloo over TCP), as they would cross hosts.

For each, the DivShare chunk and the same chunk without communication are compiled and timed
(wall time, best of --repeats, interleaved); one more DivShare chunk runs under XLA's profiler,
which counts how often each collective of the compiled program ran and its wall time (per
device). Bytes
are the collectives' results (an all-gather's whole gathered array, which every device
receives, less its own share). Localhost is not a network: the
two-process column is a lower bound on what hosts pay, which the byte counts let one scale to
a real link (seconds = bytes / link rate).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overhead import BASE as MLP  # noqa: E402

DEVICES = 4
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "pred": 1, "s8": 1, "u8": 1, "s16": 2, "s64": 8, "u64": 8}


def collectives(hlo: str) -> dict[str, dict]:
  """The collectives of a compiled program (its text), by HLO name: op and result bytes."""
  out = {}
  for line in hlo.splitlines():
    m = re.search(r"%(\S+) = (\(?[a-z0-9]+\[[^=]*?\]\S*) (all-gather|all-reduce|all-to-all|collective-permute|"
                  r"reduce-scatter)(-start)?\(", line)
    if m:
      shapes = re.findall(r"([a-z]+[0-9]*)\[([0-9,]*)\]", m.group(2))
      out[m.group(1)] = {"op": m.group(3), "bytes": sum(BYTES.get(t, 4) * _prod(d) for t, d in shapes)}
  return out


def executed(prep, colls: dict[str, dict]) -> dict[str, dict]:
  """One more chunk under the profiler: how often each collective ran and its wall time."""
  import jax
  from op_profile import op_times
  sim, run, state = prep
  with tempfile.TemporaryDirectory() as where:
    with jax.profiler.trace(where, create_perfetto_trace=True):
      prep[2], _ = run(state, sim.params)
      jax.block_until_ready(prep[2].params)
    total, count = op_times(where)
  k = jax.local_device_count()   # every local device runs each collective: per device
  return {name: dict(c, calls=count.get(name, 0) / k, ms=total.get(name, 0) / 1e3 / k) for name, c in colls.items()}


def _prod(dims: str) -> int:
  n = 1
  for d in filter(None, dims.split(",")):
    n *= int(d)
  return n


def measure(n: int, ticks: int, repeats: int) -> dict:
  """In this process (already connected to the others, if any): both variants' wall time."""
  import jax
  from divjax import configure, simulate
  cfg = configure.load(None, MLP + [f"n_nodes={n}", f"devices={DEVICES}"])
  preps = {}
  for name, comm in (("local", False), ("divshare", True)):
    sim = simulate.build(cfg, communicate=comm)
    state = simulate.place(sim, sim.engine.init(sim.run_key))
    run = simulate.compile_chunk(sim, state, ticks)
    state, _ = run(state, sim.params)   # warm-up
    jax.block_until_ready(state.params)
    preps[name] = [sim, run, state]
  best = {k: float("inf") for k in preps}
  for _ in range(repeats):
    for k, prep in preps.items():
      sim, run, state = prep
      t0 = time.perf_counter()
      state, _ = run(state, sim.params)
      jax.block_until_ready(state.params)
      best[k] = min(best[k], time.perf_counter() - t0)
      prep[2] = state
  ran = executed(preps["divshare"], collectives(preps["divshare"][1].as_text()))
  round_ends = ticks // cfg.local_steps
  return dict(n=n, ticks=ticks, processes=jax.process_count(), local_s=best["local"],
              divshare_s=best["divshare"], overhead=best["divshare"] / best["local"],
              node_steps_per_s=n * ticks / best["divshare"], collectives=ran,
              calls_per_round_end=sum(c["calls"] for c in ran.values()) / round_ends,
              bytes_per_round_end=sum(c["calls"] * c["bytes"] for c in ran.values()) / round_ends,
              collective_ms_per_round_end=sum(c["ms"] for c in ran.values()) / round_ends,
              ms_per_round_end=(best["divshare"] - best["local"]) * 1e3 / round_ends)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(n: int, ticks: int, repeats: int, processes: int) -> dict:
  here = os.path.abspath(__file__)
  args = [sys.executable, here, "--one", str(n), "--ticks", str(ticks), "--repeats", str(repeats)]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if processes == 1:
    cmds = [args]
  else:
    port = _free_port()
    cmds = [args + ["--coordinator", f"localhost:{port}", "--processes", str(processes), "--id", str(i)]
            for i in range(processes)]
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
  outs = [p.communicate() for p in procs]
  for p, (_, err) in zip(procs, outs):
    if p.returncode:
      raise RuntimeError(f"N = {n}, {processes} process(es) failed:\n{err[-3000:]}")
  line = next(l for l in outs[0][0].splitlines() if l.startswith("ROW "))
  return json.loads(line[4:])


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nodes", type=int, nargs="+", default=[256, 1024, 4096])
  ap.add_argument("--node-steps", type=int, default=2**19, help="node-steps per timed chunk (whole rounds)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--json", help="also write the rows to this JSON file")
  ap.add_argument("--one", type=int, help=argparse.SUPPRESS)   # internal: measure N in this process
  ap.add_argument("--ticks", type=int, help=argparse.SUPPRESS)
  ap.add_argument("--coordinator", help=argparse.SUPPRESS)
  ap.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  ap.add_argument("--id", type=int, default=0, help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.one is not None:
    from divjax import multihost, sharding
    if args.coordinator:
      multihost.initialize(args.coordinator, args.processes, args.id)
    sharding.request_cpu_devices(DEVICES, processes=args.processes)
    print("ROW " + json.dumps(measure(args.one, args.ticks, args.repeats)), flush=True)
    return
  rows = []
  for n in args.nodes:
    ticks = max(16, args.node_steps // n // 16 * 16)
    for procs in (1, 2):
      rows.append(launch(n, ticks, args.repeats, procs))
      r = rows[-1]
      print(f"N = {n}, {procs} process(es): overhead {r['overhead']:.2f}x, "
            f"{r['node_steps_per_s']:,.0f} node-steps/s", file=sys.stderr, flush=True)
      if args.json:
        with open(args.json, "w") as f:
          json.dump(rows, f, indent=1)
  print(f"{DEVICES} CPU devices in all; {time.strftime('%Y-%m-%d %H:%M')}; load average {os.getloadavg()[0]:.1f}")
  print("| N | processes x devices | ticks | local only (s) | DivShare (s) | overhead | node-steps/s | "
        "round end, beyond training (ms) | collectives per round end | their wall time (ms) | "
        "bytes they gather per round end |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['n']:,} | {r['processes']} x {DEVICES // r['processes']} | {r['ticks']} | {r['local_s']:.2f} | "
          f"{r['divshare_s']:.2f} | {r['overhead']:.2f}x | {r['node_steps_per_s']:,.0f} | "
          f"{r['ms_per_round_end']:.1f} | {r['calls_per_round_end']:.1f} | "
          f"{r['collective_ms_per_round_end']:.1f} | {r['bytes_per_round_end'] / 2**20:,.1f} MiB |")


if __name__ == "__main__":
  main()
