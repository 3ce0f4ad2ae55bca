"""The global objective at the network-average model: f(xbar) and ||grad f(xbar)||^2.

Convergence theorems for decentralized SGD (PAPER.md 3) bound the squared gradient norm of
f = (1/n) sum_i f_i at the network average xbar, where f_i is node i's mean loss over its own
training samples. `observe.grad_norm: true` adds both to every evaluation record
(`objective`, `grad_norm_sq`). Each sample s enters f with the weight
w_s = sum_i 1[s in D_i] / (n |D_i|), so nodes with fewer samples weigh as much as the others;
the pass over the training set runs in chunks (one batched forward and backward each).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

CHUNK = 1024   # training samples per step of the pass


def sample_weights(parts, counts, n_samples: int) -> np.ndarray:
  """(S,) float32: w_s = sum_i 1[s in D_i] / (n |D_i|) (sums to 1)."""
  parts, counts = np.asarray(parts), np.asarray(counts)
  n = len(counts)
  w = np.zeros(n_samples, np.float64)
  for i in range(n):
    if counts[i]:
      np.add.at(w, parts[i, : counts[i]], 1.0 / (n * counts[i]))
  return w.astype(np.float32)


def make(task) -> Callable:
  """A jitted (xbar (P,), x_train, y_train, w (S,)) -> (f(xbar), ||grad f(xbar)||^2)."""

  def f(xbar, x, y, w):
    tree = jax.tree.map(lambda a: a[None], task.unravel(xbar))        # one model, stacked
    s = x.shape[0]
    chunks = -(-s // CHUNK)
    pad = chunks * CHUNK - s
    xs = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]).reshape((chunks, CHUNK) + x.shape[1:])
    ys = jnp.concatenate([y, jnp.zeros((pad,), y.dtype)]).reshape(chunks, CHUNK)
    ws = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)]).reshape(chunks, CHUNK)

    def chunk_loss(args):
      xc, yc, wc = args
      # each sample as a batch of one: per-sample losses from the task's own loss
      per = jax.vmap(lambda xi, yi: task.loss_tree(tree, xi[None, None], yi[None, None])[0])(xc, yc)
      return jnp.sum(wc * per)

    return jnp.sum(jax.lax.map(chunk_loss, (xs, ys, ws)))

  value_and_grad = jax.value_and_grad(f)

  @jax.jit
  def objective(xbar, x, y, w):
    value, g = value_and_grad(xbar, x, y, w)
    return value, jnp.sum(g * g)

  return objective
