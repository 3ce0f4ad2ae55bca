"""Where a chunk's time goes, op by op: XLA's own profile of the DivShare chunk (issue 23).

    python3 benchmarks/op_profile.py --nodes 4096 [--top 15]

Runs benchmarks/scale.py's MLP workload (DivShare, Omega 8, J 3, H 16) for one chunk of --ticks ticks
under `jax.profiler.trace`, then sums the wall time of every compiled
op (XLA:CPU thunk) over the chunk. Ops that ran once per tick (a multiple of the chunk's ticks)
are the local training; the others ran at round ends. Prints both totals, their ratio (the
overhead as the profile sees it, in wall time) and the round-end ops that took longest, with
their count and per-call time (a round-end op run a multiple of H times per round end would
be counted as per-tick; none of this workload's leaf ops is). The op names are those of the optimised HLO
(`simulate.compile_chunk(...).as_text()` shows what each fuses).
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402


def op_times(trace_dir: str) -> tuple[collections.Counter, collections.Counter]:
  """Summed wall time (microseconds) and call count of every compiled op in a trace."""
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  total, count = collections.Counter(), collections.Counter()
  for e in events:   # complete events; Python frames ($...) and the executor's own spans left out
    if e.get("ph") == "X" and not e["name"].startswith(("$", "ThunkExecutor", "SlinkyThreadPool")):
      total[e["name"]] += e["dur"]
      count[e["name"]] += 1
  return total, count


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nodes", type=int, default=4096)
  ap.add_argument("--ticks", type=int, default=256,
                  help="ticks in the profiled chunk (whole rounds; the trace keeps about a million "
                       "events, some 4,000 ticks of this workload)")
  ap.add_argument("--top", type=int, default=15)
  args = ap.parse_args()
  import jax
  from divjax import configure
  path, sets = scale.overrides("mlp", args.nodes, False, "")
  cfg = configure.load(path, sets)
  ticks = max(cfg.local_steps, args.ticks // cfg.local_steps * cfg.local_steps)
  prep, _ = scale._prepare(cfg, True, ticks)
  scale._timed_chunk(prep)   # a second warm run: first-touch costs out of the way
  with tempfile.TemporaryDirectory() as where:
    with jax.profiler.trace(where, create_perfetto_trace=True):
      scale._timed_chunk(prep)
    total, count = op_times(where)
  # a loop's or conditional's time includes the ops inside it, which appear on their own too:
  # the totals count only the ops that are not control flow
  leaf = lambda k: not k.startswith(("while", "cond"))
  per_tick = sum(v for k, v in total.items() if count[k] % ticks == 0 and leaf(k))
  ends = {k: v for k, v in total.items() if count[k] % ticks}
  flat = sum(v for k, v in ends.items() if leaf(k))
  print(f"N = {args.nodes:,}, {ticks} ticks ({ticks // cfg.local_steps} round ends); "
        f"{jax.devices()[0].device_kind}; load average {os.getloadavg()[0]:.1f}")
  print(f"per-tick ops {per_tick / 1e3:,.0f} ms; round-end ops {flat / 1e3:,.0f} ms "
        f"(not counting loops and conditionals); ratio {(per_tick + flat) / per_tick:.2f}")
  print("| round-end op | calls | total (ms) | per call (ms) |")
  print("|---|---|---|---|")
  for k, v in sorted(ends.items(), key=lambda kv: -kv[1])[: args.top]:
    print(f"| {k} | {count[k]} | {v / 1e3:,.1f} | {v / 1e3 / count[k]:.2f} |")


if __name__ == "__main__":
  main()
