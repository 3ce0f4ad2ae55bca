"""The least-squares task (task: lsq) and its exact constants (divjax.theory.least_squares_constants)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divjax import configure, objective, sampling, simulate, tasks, theory

LSQ = ["task=lsq", "n_nodes=6", "fragments=2", "recipients=2", "local_steps=4", "batch_size=4",
       "data.dim=5", "data.samples_per_node=24", "data.test_size=64", "duration_s=0.4", "eval_every_s=0.1",
       "network.compute_s_per_step=0.01"]


def cfg_of(*sets):
  return configure.load(None, LSQ + list(sets))


def test_constants_are_those_of_the_trained_objective():
  cfg = cfg_of("data.zeta=2", "data.noise=0.5")
  c = theory.least_squares_constants(cfg)
  task = tasks.build(cfg)
  # the minimiser from the constants' own algebra: f (through the engine's objective) is
  # f_min there and its gradient vanishes
  n, m, d = 6, 24, 5
  a = np.asarray(task.x_train, np.float64).reshape(n, m, d)
  b = np.asarray(task.y_train, np.float64).reshape(n, m)
  x_hat = np.linalg.lstsq(a.reshape(-1, d), b.reshape(-1), rcond=None)[0]
  w = objective.sample_weights(task.parts, task.counts, n * m)
  f, g2 = objective.make(task)(jnp.asarray(x_hat, jnp.float32), task.x_train, task.y_train, jnp.asarray(w))
  assert float(f) == pytest.approx(c["f_min"], rel=1e-5)
  assert float(g2) < 1e-8
  assert c["L"] >= c["L_f"] >= c["mu"] > 0
  # zeta^2 from its definition, one node at a time
  grads = [a[i].T @ (a[i] @ x_hat - b[i]) / m for i in range(n)]
  assert c["zeta2"] == pytest.approx(np.mean([g @ g for g in grads]), rel=1e-9)


def test_zeta_and_noise_control_heterogeneity_and_gradient_noise():
  base = theory.least_squares_constants(cfg_of("data.zeta=1", "data.noise=0.5"))
  assert theory.least_squares_constants(cfg_of("data.zeta=3", "data.noise=0.5"))["zeta2"] > 4 * base["zeta2"]
  assert theory.least_squares_constants(cfg_of("data.zeta=1", "data.noise=2"))["sigma2"] > 4 * base["sigma2"]
  none = theory.least_squares_constants(cfg_of("data.zeta=0", "data.noise=0"))
  assert max(none["zeta2"], none["sigma2"], none["f_min"]) < 1e-10 * base["zeta2"]  # float32 data
  half = theory.least_squares_constants(cfg_of("data.zeta=1", "data.noise=0.5", "batch_size=8"))
  assert half["sigma2"] == pytest.approx(base["sigma2"] / 2, rel=1e-9)


def test_sigma2_is_the_variance_of_the_engines_minibatch_gradients():
  """Monte Carlo over the engine's own batch draws (divjax.sampling, with replacement)."""
  cfg = cfg_of("data.zeta=1", "data.noise=1")
  c = theory.least_squares_constants(cfg)
  task = tasks.build(cfg)
  n, m, d = 6, 24, 5
  a = np.asarray(task.x_train, np.float64)
  b = np.asarray(task.y_train, np.float64)
  x_hat = np.linalg.lstsq(a, b, rcond=None)[0]
  per = a * (a @ x_hat - b)[:, None]                                              # per-sample gradients
  steps = jnp.arange(4000)
  draws = []
  for node in range(n):
    idx = np.asarray(jax.vmap(lambda s: sampling.batch_indices(jax.random.key(3), node, s, task.parts,
                                                               task.counts, 4))(steps))
    g = per[idx].mean(1)                                                          # (steps, d)
    draws.append(np.mean(np.sum((g - per[node * m:(node + 1) * m].mean(0)) ** 2, -1)))
  assert np.mean(draws) == pytest.approx(c["sigma2"], rel=0.05)


def test_a_run_approaches_the_optimum_and_reports_r2():
  cfg = cfg_of("lr=0.05", "observe.grad_norm=true", "duration_s=2", "eval_every_s=0.5")
  summary, _ = simulate.run(cfg)
  c = theory.least_squares_constants(cfg)
  final = summary["final"]
  assert summary["baseline"]["predictor"] == "least-squares optimum"
  assert c["f_min"] <= final["objective"] < 1.1 * c["f_min"] + 0.05
  assert 0 < final["acc_avg_model"] <= 1 and final["grad_norm_sq"] < 0.1


def test_lsq_needs_the_linear_model():
  from divjax.config import ConfigError
  with pytest.raises(ConfigError, match="model"):
    cfg_of("model=mlp")


def test_cli_prints_the_constants_and_refuses_other_tasks(capsys):
  import json
  from divjax import cli
  assert cli.main(["theory", "constants", "--set", *LSQ]) == 0
  assert set(json.loads(capsys.readouterr().out)) >= {"L", "mu", "zeta2", "sigma2", "f_min"}
  assert cli.main(["theory", "constants", "--set", "task=synthetic"]) == 2
  assert "task: `divjax theory constants` needs task 'lsq'" in capsys.readouterr().err
