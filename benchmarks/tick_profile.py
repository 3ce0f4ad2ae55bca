"""Where the round end's time goes: the DivShare chunk with one stage at a time left out.

    python3 benchmarks/tick_profile.py --nodes 1024 4096 16384

For each N, the chunk of benchmarks/scale.py's MLP workload is compiled several times: local
training only, the full DivShare tick, the round ends alone (the local step replaced by a
step counter, so that rounds still end on time), and the round ends alone with one stage
replaced by a trivial stand-in of the same shapes (a knock-out). Each variant's CPU time per
chunk is measured interleaved (best of --repeats); a stage's share is (round ends alone -
knock-out) / round ends alone. The knock-outs change the simulation (their numbers are
meaningless); only their time is used.

Stages:
  supersede  fates.supersede: which pending records a new message replaces
  route      ring.route: gather + segment_sum of the due payloads (a scan over columns)
  plan       the algorithm's plan: sampling each node's receivers and fragments
  service    network.service: each message's upload time from the link tables
  ring       ring.write: the new snapshot into the ring
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import scale  # noqa: E402


@contextlib.contextmanager
def knocked_out(stage: str, extras: tuple = ()):
  """Replaces one stage by a same-shaped stand-in while the chunk is traced."""
  from divjax import engine, fates, ring
  saved = []

  def patch(mod, name, fn):
    saved.append((mod, name, getattr(mod, name)))
    setattr(mod, name, fn)

  if stage == "supersede":
    patch(fates, "supersede", lambda old_key, old_tick, pending, *a: jnp.zeros_like(pending))
  elif stage == "route":
    def route(ring_, due, *a, **k):
      d, n, f, w = ring_.shape
      return jnp.zeros((n, f, w), jnp.float32), jnp.zeros((n, f), jnp.float32) + jnp.sum(due[:, :1, :1])
    patch(ring, "route", route)
  elif stage == "plan":  # receivers and fragments without sampling: a fixed rotation
    from divjax import algorithms
    real_make = algorithms.make

    def make(cfg):
      alg = real_make(cfg)
      m, f, n = alg.messages, alg.fragments, cfg.n_nodes
      fixed = lambda key, node, rnd: ((node + 1 + jnp.arange(m, dtype=jnp.int32) + rnd) % n,
                                      jnp.arange(m, dtype=jnp.int32) % f)
      return alg._replace(plan=fixed)
    patch(algorithms, "make", make)
  elif stage == "service":
    from divjax import timebase
    patch(engine.network_lib, "service", lambda lk, src, dst, frag: timebase.wide(jnp.full(dst.shape, 1000, jnp.int32)))
  elif stage == "ring":
    patch(ring, "write", lambda ring_, slot, x, ends: ring_)
  elif stage == "no_training":
    def counter(st, sgd, s, p):
      active = engine.clock.steps_now(s.tick, p.links.period)
      s = s._replace(nodes=s.nodes._replace(steps=s.nodes.steps + active), tick=s.tick + 1)
      return s, (jnp.zeros(active.shape, jnp.float32), active)
    patch(engine, "local_tick", counter)
  elif stage != "none":
    raise ValueError(stage)
  try:
    with contextlib.ExitStack() as more:
      for extra in extras:
        more.enter_context(knocked_out(extra))
      yield
  finally:
    for mod, name, fn in reversed(saved):
      setattr(mod, name, fn)


def variants(cfg, ticks: int, stages: list[str]):
  out = {"local": scale._prepare(cfg, False, ticks)[0], "full": scale._prepare(cfg, True, ticks)[0]}
  for stage in ["none"] + stages:   # the round ends alone, then with one stage knocked out
    with knocked_out(stage, ("no_training",)):
      out[stage] = scale._prepare(cfg, True, ticks)[0]
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--nodes", type=int, nargs="+", default=[1024, 4096])
  ap.add_argument("--node-steps", type=int, default=2**20)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--stages", nargs="+", default=["supersede", "route", "plan", "service", "ring"])
  args = ap.parse_args()
  from divjax import configure
  print(f"device: {jax.devices()[0].device_kind}; CPU time per chunk, best of {args.repeats}; "
        f"load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
  print("| N | local only (s) | full / local | round ends alone / local | "
        + " | ".join(f"{s}" for s in args.stages) + " |")
  print("|" + "---|" * (4 + len(args.stages)))
  for n in args.nodes:
    path, sets = scale.overrides("mlp", n, False, "")
    cfg = configure.load(path, sets)
    ticks = max(cfg.local_steps, args.node_steps // n // cfg.local_steps * cfg.local_steps)
    preps = variants(cfg, ticks, args.stages)
    best = {k: float("inf") for k in preps}
    for _ in range(args.repeats):
      for k, prep in preps.items():
        best[k] = min(best[k], scale._timed_chunk(prep))
    local, ends = best["local"], best["none"]
    shares = [(ends - best[s]) / ends for s in args.stages]
    print(f"| {n:,} | {local:.2f} | {best['full'] / local:.2f} | {ends / local:.2f} | "
          + " | ".join(f"{x:.0%}" for x in shares) + " |", flush=True)


if __name__ == "__main__":
  main()
