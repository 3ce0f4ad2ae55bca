"""Training-step throughput of GN-LeNet for N nodes at once: the stacked-apply variants.

    python3 benchmarks/conv_speed.py [--nodes 16 64] [--batch 8] [--steps 4] [--repeats 3]
                                     [--variants fast vmap loop] [--unroll 16] [--devices 1]

One step = the engine's local step: per-node gradients by
`jax.grad(lambda P: sum(loss_per_node(apply_stacked(P, X), Y)))`, then an SGD update, jitted.
For the fast variant the gradient is taken a group of `Model.group` (= --unroll) nodes at a
time inside a lax.map, as divjax.nodes does; with --devices K each device does this for its
own N/K nodes.
Two settings:
  scan  `--steps` steps inside one `lax.scan` per call, as the engine runs them (buffers are
        allocated once per call, and XLA:CPU compiles loop bodies differently);
  call  one step per jitted call.
Compile time is excluded (and printed); samples/s is the best of `--repeats` timed calls
after a warm-up call (calls slower than 10 s are timed once).
Variants: fast = divjax.models' apply_stacked; vmap = jax.vmap(flax apply); loop = a Python
loop over the nodes of flax apply (unrolled in the jitted step). XLA uses its default threads
(all cores; with --devices K > 1 one thread per device). The slow variants take minutes at
N = 64: leave them out with --variants.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp

from divjax import models, sharding


def loss_per_node(logits, y):
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], axis=-1)


def stacked_variants(model: models.Model) -> dict:
  def loop(params, x):
    return jnp.stack([model.apply(jax.tree.map(lambda a: a[i], params), x[i])
                      for i in range(x.shape[0])])

  return {"fast": model.apply_stacked, "vmap": jax.vmap(model.apply), "loop": loop}


def node_grads(apply_stacked, group=None):
  """Per-node gradients of the summed node losses; `group`: nodes differentiated together, in
  a lax.map over groups, as divjax.nodes does with Model.group (None: all nodes at once)."""
  def grads(params, x, y):
    return jax.grad(lambda p: jnp.sum(loss_per_node(apply_stacked(p, x), y)))(params)
  return lambda params, x, y: models.map_groups(grads, group, params, x, y)


def make_runner(grads, setting: str, steps: int, lr: float = 0.05):
  def step(params, x, y):
    return jax.tree.map(lambda p, g: p - lr * g, params, grads(params, x, y))

  if setting == "call":
    return jax.jit(step, donate_argnums=0), 1
  many = lambda p, x, y: jax.lax.scan(lambda q, _: (step(q, x, y), None), p, None, length=steps)[0]
  return jax.jit(many, donate_argnums=0), steps


def measure(apply_stacked, model, n: int, batch: int, setting: str, steps: int, repeats: int,
            devices: int = 1, group=None):
  """(samples/s, compile seconds) for one variant."""
  key = jax.random.key(0)
  params = jax.vmap(model.init)(jax.random.split(key, n))
  x = jax.random.normal(key, (n, batch, 32, 32, 3))
  y = jax.random.randint(key, (n, batch), 0, 10)
  mesh = sharding.node_mesh(devices)
  # each device differentiates its own nodes, as in the engine's local step
  grads = sharding.over_nodes(node_grads(apply_stacked, group), mesh, (True, True, True))
  params, x, y = sharding.place((params, x, y), mesh, n)
  run, k = make_runner(grads, setting, steps)
  t0 = time.perf_counter()
  compiled = run.lower(params, x, y).compile()
  t_compile = time.perf_counter() - t0
  t0 = time.perf_counter()
  params = compiled(params, x, y)  # warm-up: first touch of the buffers
  jax.block_until_ready(params)
  best = time.perf_counter() - t0
  # a call slower than 10 s is timed once (the warm-up): first-touch costs are negligible there
  for _ in range(repeats if best < 10 else 0):
    t0 = time.perf_counter()
    params = compiled(params, x, y)
    jax.block_until_ready(params)
    best = min(best, time.perf_counter() - t0)
  return n * batch * k / best, t_compile


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--nodes", type=int, nargs="+", default=[16, 64])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=4, help="steps per call in the scan setting")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--variants", nargs="+", default=["fast", "vmap", "loop"], choices=["fast", "vmap", "loop"])
  ap.add_argument("--settings", nargs="+", default=["scan", "call"], choices=["scan", "call"])
  ap.add_argument("--unroll", type=int, default=16, help="make_model('gn_lenet', unroll=...)")
  ap.add_argument("--devices", type=int, default=1, help="CPU devices to shard the nodes over")
  args = ap.parse_args()
  sharding.request_cpu_devices(args.devices)  # before the backend starts

  model = models.make_model("gn_lenet", unroll=args.unroll)
  print(f"jax {jax.__version__}, device {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), "
        f"{os.cpu_count()} CPUs, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"batch {args.batch}, unroll {args.unroll}, devices {args.devices}")
  print(f"{'variant':8s} {'setting':8s} {'N':>4s} {'samples/s':>10s} {'compile s':>10s}")
  for n in args.nodes:
    variants = stacked_variants(model)
    for name in args.variants:
      for setting in args.settings:
        sps, tc = measure(variants[name], model, n, args.batch, setting, args.steps, args.repeats,
                          args.devices, model.group if name == "fast" else None)
        print(f"{name:8s} {setting:8s} {n:4d} {sps:10.0f} {tc:10.1f}", flush=True)


if __name__ == "__main__":
  main()
