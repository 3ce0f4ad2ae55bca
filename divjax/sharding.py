"""The node axis over several devices (DESIGN.md section 7).

With `devices: K` in the config, the N nodes are split into K equal blocks, one per device of
a one-axis `jax.sharding.Mesh` named "nodes":

* every state array whose leading axis is the node axis is sharded along it, the rest is
  replicated (`place`, `constrain`);
* the local training step, where all the compute is, runs under `jax.shard_map`: each device
  trains its own N/K nodes with no communication at all (`over_nodes`);
* everything else (routing, queues, mixing) is left to XLA's partitioner.

Sharding is a layout, never a change of semantics: per-node randomness is keyed by node id
and step, so a sharded run sends the same messages at the same times as the unsharded one,
with parameters equal up to float32 rounding (XLA may pick another matmul kernel for N/K
nodes than for N); tests/test_sharding.py checks both.

On a CPU, K host devices are a way to use the cores: XLA:CPU runs the devices' programs side
by side, one thread each, which keeps the cores busier than one program of many small
convolutions does (BENCHMARKS.md). `request_cpu_devices` asks for them; it must run before
JAX initialises its backend (the CLI calls it before anything touches a device).
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "nodes"


def _largest_divisor(n: int, at_most: int) -> int:
  return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def cpu_cores() -> int:
  """The cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def request_cpu_devices(k: Union[int, str], n_nodes: Optional[int] = None, processes: int = 1) -> None:
  """Asks XLA:CPU for k host devices in all, k / processes in this process (divjax.multihost),
  each running its program on one thread.

  k = "auto" (the config's `devices: auto`) asks for the most devices that divide this
  process's share of n_nodes, up to the cores it may use. Only effective before the backend
  starts (it is a no-op afterwards, and harmless on an accelerator, where the CPU devices are
  not used). Eigen's intra-op threads are turned off because the k devices already occupy the
  cores (BENCHMARKS.md has the measurement).
  """
  if k == "auto":
    if n_nodes is None:
      raise ValueError("devices: 'auto' needs n_nodes")
    k = processes * _largest_divisor(n_nodes // processes, cpu_cores())
  k //= processes
  if k <= 1:
    return
  jax.config.update("jax_num_cpu_devices", k)
  flag = "--xla_cpu_multi_thread_eigen=false"
  flags = os.environ.get("XLA_FLAGS", "")
  if flag not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {flag}".strip()


def device_count(devices: Union[int, str], n_nodes: int) -> int:
  """The config's `devices` as a number: "auto" is the most of JAX's devices (accelerators,
  or the host devices `request_cpu_devices` created) that divide n_nodes."""
  if devices == "auto":
    return _largest_divisor(n_nodes, len(jax.devices()))
  return devices


def node_mesh(devices: int) -> Optional[Mesh]:
  """The one-axis mesh of the first `devices` devices, or None for one device.
  (The config has already checked that n_nodes is a multiple of `devices`.)"""
  if devices <= 1:
    return None
  have = jax.devices()
  if len(have) < devices:
    raise ValueError(
        f"devices: {devices} requested but only {len(have)} {have[0].platform} device(s) exist "
        f"(on a CPU, `divjax run` creates host devices itself; elsewhere set "
        f"jax.config.update('jax_num_cpu_devices', {devices}) before JAX starts)")
  return Mesh(have[:devices], (AXIS,))


def _spec(leaf, axis: Optional[int]) -> P:
  shape = tuple(getattr(leaf, "shape", ()))
  # empty arrays stay replicated: JAX normalises them so
  if axis is None or len(shape) <= axis or 0 in shape:
    return P()
  return P(*([None] * axis), AXIS)


def shardings(tree, mesh: Mesh, axes):
  """NamedShardings for a pytree: each leaf split along its node axis, or replicated.

  `axes` is a prefix of `tree` whose leaves are node-axis indices or None (replicated), as
  an engine's node_axes(state) gives them; a single 0 means every leaf leads with the nodes.
  """
  def one(axis, sub):
    return jax.tree.map(lambda a: NamedSharding(mesh, _spec(a, axis)), sub)
  return jax.tree.map(one, axes, tree, is_leaf=lambda x: x is None)


def place(tree, mesh: Optional[Mesh], axes):
  """Puts a (host or device) pytree on the mesh, split along its node axes; unchanged without a mesh."""
  if mesh is None:
    return tree
  return jax.device_put(tree, shardings(tree, mesh, axes))


def gather(tree, mesh: Optional[Mesh]):
  """A whole (replicated) copy on every device of the mesh; unchanged without a mesh."""
  if mesh is None:
    return tree
  return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(tree):
  """The tree's values as numpy arrays on this process (jax.device_get), including arrays split
  over other processes' devices in a multi-process run: those are all-gathered, so every
  process gets the whole array (a collective: every process must make the same call)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils

  def one(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return jax.device_get(a)
  return jax.tree.map(one, tree)


def constrain(tree, mesh: Optional[Mesh], axes):
  """Inside jit: pins a state pytree to the same layout as `place`, so that a compiled chunk
  returns its state in the layout it takes (and can be called again on its own output)."""
  if mesh is None:
    return tree
  return jax.lax.with_sharding_constraint(tree, shardings(tree, mesh, axes))


def over_nodes(fn: Callable, mesh: Optional[Mesh], node_args: tuple[bool, ...]) -> Callable:
  """fn, run on every device for its own block of nodes.

  `node_args[i]` says whether argument i has the node axis leading on all its leaves (it is
  split) or not (it is replicated). Every output must have the node axis leading. fn must
  treat nodes independently: it sees N/K of them, and their global ids only if it is given
  them as an argument.
  """
  if mesh is None:
    return fn
  in_specs = tuple(P(AXIS) if split else P() for split in node_args)
  # check_vma=False: fn has no collectives, and its loops (e.g. a lax.map whose carry starts
  # from a constant) would otherwise need explicit pvary annotations
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(AXIS), check_vma=False)
