"""Stacked local training: all N flat models take one SGD step together.

Shared by the asynchronous engine and the synchronous round engine. The per-node gradient is
the gradient of the *sum* of the node losses with respect to the stacked (N, P) parameters:
node losses are independent, so row i of that gradient is node i's own gradient, and one
batched backward pass replaces N small ones. Models that set a group size (GN-LeNet) are
differentiated a group of nodes at a time, in a `lax.map` (models.map_groups): the same
gradients, with one group's activations live at once.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from divjax import models, sampling, sharding
from divjax.config import Config


class LocalSGD(NamedTuple):
  init_opt: Callable   # params (N, P) -> optax state with leaves (N, ...)
  step: Callable       # (params, opt_state, steps, data, run_key, lr, momentum, active) -> (params, opt_state, steps, losses)


def make(cfg: Config, task) -> LocalSGD:
  n, b = cfg.n_nodes, cfg.batch_size
  node_ids = jnp.arange(n, dtype=jnp.int32)
  has_momentum = cfg.momentum > 0   # static: it adds a velocity per node to the state

  def make_opt(lr, momentum):  # both may be traced: sweeping them does not recompile
    return optax.sgd(lr, momentum=momentum if has_momentum else None)

  def init_opt(params):
    return jax.vmap(make_opt(0.0, 0.0).init)(params)

  def step_block(params, opt_state, steps, nodes, data, run_key, lr, momentum, active):
    """One local step of every node where `active` is True; others are left as they are.

    Works on any block of nodes (`nodes`: their global ids); `data` is the task's TrainData,
    whole on every device. Node i's minibatch is drawn from
    key (run, i, steps[i]), so it depends neither on when (in which tick or round) the step
    is taken nor on which device trains node i.
    """
    k_batch = sampling.stream(run_key, sampling.STREAM_BATCH)
    idx = jax.vmap(sampling.batch_indices, in_axes=(None, 0, 0, None, None, None))(
        k_batch, nodes, steps, data.parts, data.counts, b)                                # (N, B)
    x, y = task.inputs(data.x[idx]), data.y[idx]

    def grads_and_losses(tree, x, y):
      def total_loss(t):
        losses = task.loss_tree(t, x, y)                                                   # (G,)
        return losses.sum(), losses
      return jax.grad(total_loss, has_aux=True)(tree)

    # unravelled before the groups are split off: a lax.map slicing flat (N, P) rows would
    # leave XLA:CPU a dynamic slice of the whole row fused into every elementwise pass that
    # reads a parameter (about 25% slower at N = 64)
    grads, losses = models.map_groups(grads_and_losses, task.group, jax.vmap(task.unravel)(params), x, y)
    grads = jax.vmap(lambda t: ravel_pytree(t)[0])(grads)                                  # (N, P)
    updates, new_opt = jax.vmap(make_opt(lr, momentum).update)(grads, opt_state, params)
    keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
    return (keep(params + updates, params), jax.tree.map(keep, new_opt, opt_state),
            steps + active.astype(steps.dtype), losses)

  # with `devices: K`, each device trains its own N/K nodes (no communication in a local step)
  mesh = sharding.node_mesh(sharding.device_count(cfg.devices, n))
  block = sharding.over_nodes(step_block, mesh, (True, True, True, True, False, False, False, False, True))

  def step(params, opt_state, steps, data, run_key, lr, momentum, active):
    """One local step of every node where `active` (N,) is True (see step_block)."""
    return block(params, opt_state, steps, node_ids, data, run_key, lr, momentum, active)

  return LocalSGD(init_opt=init_opt, step=step)
