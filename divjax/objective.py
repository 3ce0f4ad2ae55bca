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

  def chunk_value(xbar, xc, yc, wc):
    tree = jax.tree.map(lambda a: a[None], task.unravel(xbar))        # one model, stacked
    # each sample as a batch of one: per-sample losses from the task's own loss
    per = jax.vmap(lambda xi, yi: task.loss_tree(tree, xi[None, None], yi[None, None])[0])(task.inputs(xc), yc)
    return jnp.sum(wc * per)

  chunk_value_and_grad = jax.value_and_grad(chunk_value)

  @jax.jit
  def objective(xbar, x, y, w):
    s = x.shape[0]
    chunks = -(-s // CHUNK)
    pad = chunks * CHUNK - s
    split = lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)]).reshape(
        (chunks, CHUNK) + a.shape[1:])

    # the gradient is summed chunk by chunk, so one chunk's activations are alive at a time
    # (differentiating through a map over the chunks kept all of them: CIFAR-10's 50,000
    # images with GN-LeNet needed more than 24 GB)
    def body(g, args):
      value, g_chunk = chunk_value_and_grad(xbar, *args)
      return g + g_chunk, value

    g, values = jax.lax.scan(body, jnp.zeros_like(xbar), (split(x), split(y), split(w)))
    return jnp.sum(values), jnp.sum(g * g)

  return objective
