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
      total = total + task.loss_stacked(p[None], task.x_train[idx][None], task.y_train[idx][None])[0]
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
