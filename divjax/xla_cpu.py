"""Threefry unrolled on CPUs: the same random bits in far fewer small XLA tasks.

JAX lowers its Threefry hash on CPUs as a loop of 5 rounds (to keep compile times down), and on
GPUs unrolled. XLA:CPU runs every op of such a loop as a separate small task, once per round:
the random draws of a round end (receivers, fragments, keys) made about 1,200 of its 1,700
tasks at N = 1,024. Registering the unrolled lowering for CPUs too (what JAX does on GPUs)
computes the identical bits (integer arithmetic, the same function), makes the DivShare tick
about 8% faster at N = 64 and compiles no slower (BENCHMARKS.md, "Where the round end's time
goes"). Relies on JAX internals; if they move, this does nothing.
"""

from __future__ import annotations

import functools


def unroll_threefry() -> bool:
  """Registers the unrolled Threefry lowering for CPUs; False when this JAX has no such hook."""
  try:
    from jax._src.interpreters import mlir
    from jax._src.random import threefry2x32 as threefry
    rule = mlir.lower_fun(functools.partial(threefry._threefry2x32_lowering, use_rolled_loops=False),
                          multiple_results=True)
    mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
    return True
  except (ImportError, AttributeError, TypeError):
    return False
