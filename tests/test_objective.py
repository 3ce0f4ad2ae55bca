"""observe.grad_norm: f(xbar) and ||grad f(xbar)||^2 against a plain per-node computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divjax import objective, simulate, tasks
from conftest import tiny_config


def test_sample_weights_weigh_every_node_equally():
  parts = np.array([[0, 1, 2], [3, 0, 0], [2, 4, 0]])
  counts = np.array([3, 1, 2])
  w = objective.sample_weights(parts, counts, 6)
  np.testing.assert_allclose(w, [1 / 9, 1 / 9, 1 / 9 + 1 / 6, 1 / 3, 1 / 6, 0], rtol=1e-6)
  assert w.sum() == pytest.approx(1.0)


def test_objective_and_gradient_norm_match_the_per_node_definition():
  cfg = tiny_config("observe.grad_norm=true", "data.partition=dirichlet")   # unequal shares
  task = tasks.build(cfg)
  xbar = task.init_flat(jax.random.key(1))
  parts, counts = np.asarray(task.parts), np.asarray(task.counts)
  assert len(set(counts.tolist())) > 1

  def f(p):  # (1/n) sum_i mean over node i's samples, one node at a time
    total = 0.0
    for i in range(cfg.n_nodes):
      idx = parts[i, : counts[i]]
      total = total + task.loss_stacked(p[None], task.inputs(task.x_train[idx])[None], task.y_train[idx][None])[0]
    return total / cfg.n_nodes

  value, g = jax.value_and_grad(f)(xbar)
  sim = simulate.build(cfg)
  got_value, got_g2 = sim.objective(xbar)
  assert float(got_value) == pytest.approx(float(value), rel=1e-5)
  assert float(got_g2) == pytest.approx(float(jnp.sum(g * g)), rel=1e-4)


def test_records_hold_the_objective_only_when_asked():
  recs = []
  simulate.run(tiny_config("observe.grad_norm=true", "duration_s=0.2"), on_eval=recs.append)
  assert all(r["grad_norm_sq"] > 0 and r["objective"] > 0 for r in recs)
  recs = []
  simulate.run(tiny_config("duration_s=0.2"), on_eval=recs.append)
  assert "grad_norm_sq" not in recs[0]


def test_the_pass_keeps_one_chunk_of_activations_alive():
  """Differentiating through a map over the chunks kept every chunk's activations (CIFAR-10
  with GN-LeNet ran out of 24 GB); the gradient is now summed chunk by chunk."""
  task = tasks.build(tiny_config("observe.grad_norm=true"))
  fn = objective.make(task)
  xbar = task.init_flat(jax.random.key(0))

  def temp_bytes(chunks):
    s = chunks * objective.CHUNK
    x = jnp.zeros((s,) + task.x_train.shape[1:], task.x_train.dtype)
    y = jnp.zeros((s,), task.y_train.dtype)
    mem = fn.lower(xbar, x, y, jnp.zeros((s,), jnp.float32)).compile().memory_analysis()
    return mem.temp_size_in_bytes

  one_chunk_inputs = objective.CHUNK * int(np.prod(task.x_train.shape[1:])) * 4
  assert temp_bytes(16) - temp_bytes(2) < 2 * one_chunk_inputs   # not 14 chunks' activations
