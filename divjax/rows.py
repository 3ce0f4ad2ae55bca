"""Per-node indexing: node n's entry at an index of its own, kept on node n's device.

Written `a[jnp.arange(N), k]`, the index names the node, and XLA's partitioner (`devices` > 1)
cannot see that row n is read or written by node n: it all-gathers the operand and the
indices across devices (at every round end, each message table and its index). The same indexing vmapped over the node axis is a gather or scatter with a batch
dimension, which the partitioner leaves where the rows are (BENCHMARKS.md, "Messages between
processes"). On one device both compile to the same work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def take(a, k, node_axis: int = 0):
  """Node n's row of `a` (node axis `node_axis`) at index k[n] of its first other axis."""
  return jax.vmap(lambda row, i: row[i], in_axes=(node_axis, 0))(a, k)


def put(a, k, v, write, node_axis: int = 0):
  """`a` with node n's row set to v[n] at index k[n] of its first other axis, for the nodes
  where `write`; the others' rows are left as they are (pointed past the axis and dropped:
  the old values are not read)."""
  size = a.shape[1 if node_axis == 0 else 0]
  set_row = lambda row, i, x: row.at[i].set(x.astype(a.dtype), mode="drop")
  return jax.vmap(set_row, in_axes=(node_axis, 0, 0), out_axes=node_axis)(a, jnp.where(write, k, size), v)
