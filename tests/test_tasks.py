"""Real tasks end to end on tiny generated arrays in the shared `.npz` layout (no download)."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from divjax import models, simulate, tasks
from divjax.data import DataError
from conftest import tiny_config


def n_params(model):
  """Parameter count from the shapes alone (no compile)."""
  return sum(leaf.size for leaf in jax.tree.leaves(jax.eval_shape(model.init, jax.random.key(0))))


def test_paper_model_sizes():
  assert n_params(models.make_model("gn_lenet")) == 89_834           # PAPER.md 4.2
  assert n_params(models.make_model("mf", n_users=610, n_items=9724)) == 206_680  # PAPER.md 4.3
  with pytest.raises(ValueError, match="allowed"):
    models.make_model("resnet")


def write_cifar(tmp_path, n_train=200, n_test=40):
  rng = np.random.default_rng(0)
  np.savez(tmp_path / "cifar10.npz",
           x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
           y_train=np.arange(n_train, dtype=np.uint8) % 10,
           x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
           y_test=np.arange(n_test, dtype=np.uint8) % 10)


def write_movielens(tmp_path, n_users=12, n_items=30, per_user=10):
  rng = np.random.default_rng(1)
  user = np.repeat(np.arange(n_users), per_user).astype(np.int32)
  item = rng.integers(0, n_items, user.size).astype(np.int32)
  rating = (rng.integers(1, 11, user.size) / 2).astype(np.float32)
  np.savez(tmp_path / "movielens_ml-latest-small.npz", user=user, item=item, rating=rating,
           movie_id=item + 1, timestamp=np.zeros(user.size, np.int64),
           n_users=np.int64(n_users), n_items=np.int64(n_items))


def test_cifar_task_runs_from_a_data_directory(tmp_path):
  write_cifar(tmp_path)
  cfg = tiny_config("task=cifar10", f"data.dir={tmp_path}", "n_nodes=4", "recipients=2",
                    "batch_size=2", "local_steps=2", "duration_s=0.04", "eval_every_s=0.02",
                    "eval_batch=16", "data.shards=2")
  task = tasks.build(cfg)
  assert task.n_params == 89_834 and task.x_train.shape == (200, 32, 32, 3)
  assert task.x_train.dtype == np.uint8 and task.test[0].dtype == np.uint8   # a quarter of floats' bytes
  x = np.asarray(task.inputs(task.x_train[:5]))
  assert x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
  assert int(task.counts.sum()) <= 200 and task.label_hist.shape == (4, 10)
  # kshard: label-sorted blocks, so no node sees every class (blocks of 25 here span 2-3)
  classes_seen = (task.label_hist > 0).sum(1)
  assert classes_seen.max() < 10 and classes_seen.mean() <= 6
  summary, _ = simulate.run(cfg)
  assert 0.0 <= summary["final"]["acc_mean"] <= 1.0


def test_gn_lenet_follows_the_images_and_the_devices():
  """MNIST's 28x28x1 images get a GN-LeNet of that shape; several (one-thread CPU) devices
  differentiate one node at a time, one device 16 side by side."""
  one = tasks.make_classifier(tiny_config("model=gn_lenet"), input_shape=(28, 28, 1), n_classes=10)
  assert one.group == 16
  assert one.apply(one.init(jax.random.key(0)), np.zeros((2, 28, 28, 1), np.float32)).shape == (2, 10)
  two = tasks.make_classifier(tiny_config("model=gn_lenet", "n_nodes=4", "devices=2"),
                              input_shape=(32, 32, 3), n_classes=10)
  assert two.group == 1


@pytest.mark.slow  # test_grouped_evaluation_matches_one_model_at_a_time covers the default run
def test_evaluation_matches_a_per_node_loop(tmp_path):
  write_cifar(tmp_path)
  cfg = tiny_config("task=cifar10", f"data.dir={tmp_path}", "n_nodes=3", "recipients=1", "eval_batch=16")
  task = tasks.build(cfg)
  model = models.make_model("gn_lenet")
  params = jax.vmap(task.init_flat)(jax.random.split(jax.random.key(0), 3))
  ev = task.evaluate(params)
  ds = np.load(tmp_path / "cifar10.npz")
  x = ds["x_test"].astype(np.float32) / 255 * 2 - 1
  _, unravel = ravel_pytree(model.init(jax.random.key(0)))
  for i in range(3):
    logits = np.asarray(model.apply(unravel(params[i]), x))
    acc = np.mean(logits.argmax(-1) == ds["y_test"])
    np.testing.assert_allclose(float(ev["acc"][i]), acc, atol=1e-6)


def test_movielens_task_and_rmse(tmp_path):
  write_movielens(tmp_path)
  cfg = tiny_config("task=movielens-latest-small", f"data.dir={tmp_path}", "n_nodes=4",
                    "recipients=2", "duration_s=0.08", "eval_every_s=0.04")
  task = tasks.build(cfg)
  assert task.kind == "regression" and task.n_params == (12 + 30) * 20
  params = jax.vmap(task.init_flat)(jax.random.split(jax.random.key(0), 4))
  ev = task.evaluate(params)
  # predictions are ~0 at init, ratings 0.5..5: RMSE is about the root mean square rating
  assert np.all(np.asarray(ev["loss"]) > 1.0)
  summary, _ = simulate.run(cfg)
  assert np.isfinite(summary["final"]["loss_mean"])


def test_global_mean_baseline_is_the_rmse_of_the_training_mean():
  rating = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 3.0])
  item = np.array([0, 1, 0, 2, 1, 3])
  train, test = [np.array([0, 1]), np.array([2])], [np.array([3, 5]), np.array([4])]
  b = tasks.global_mean_baseline(rating, train, test, item)
  # mean of the training ratings 1, 2, 3 is 2; node 0 errs by 2 and 1, node 1 by 3
  assert b["mean"] == 2.0
  np.testing.assert_allclose(b["loss"], (np.sqrt((4 + 1) / 2) + 3) / 2)
  np.testing.assert_allclose(b["pooled"], np.sqrt((4 + 1 + 9) / 3))
  assert b["cold"] == 2 / 3  # items 2 and 3 have no training rating, item 1 has


def test_movielens_offset_starts_at_the_global_mean_baseline(tmp_path):
  write_movielens(tmp_path)
  cfg = tiny_config("task=movielens-latest-small", f"data.dir={tmp_path}", "n_nodes=4",
                    "recipients=2", "duration_s=0.08", "eval_every_s=0.04")
  plain, shifted = tasks.movielens(cfg), tasks.movielens(cfg, offset="global_mean")
  assert plain.baseline["offset"] == "none" and shifted.baseline["offset"] == "global_mean"
  assert plain.n_params == shifted.n_params  # the offset is a constant, not a parameter
  params = jax.vmap(plain.init_flat)(jax.random.split(jax.random.key(0), 4))
  # at init <u, v> is about 0, so the shifted model is the global-mean predictor
  np.testing.assert_allclose(np.mean(shifted.evaluate(params)["loss"]), shifted.baseline["loss"], atol=0.02)
  assert np.mean(plain.evaluate(params)["loss"]) > 1.5 * plain.baseline["loss"]
  summary, _ = simulate.run(cfg, sim=simulate.build(cfg, shifted))
  assert summary["baseline"]["loss"] == shifted.baseline["loss"]
  with pytest.raises(ValueError, match="mf_offset"):
    tasks.movielens(cfg, offset="user_mean")


def mlp_task(n_test, *, eval_batch, eval_nodes, shape=(8, 8, 3), hidden=16):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n_test,) + shape).astype(np.float32)
  y = (np.arange(n_test) % 10).astype(np.int32)
  model = models.make_model("mlp", input_shape=shape, hidden=(hidden,), n_classes=10)
  task = tasks.classification_task("t", model, x[:10], y[:10], [np.arange(10)], x, y, n_classes=10,
                                   eval_batch=eval_batch, eval_nodes=eval_nodes)
  return task, model, x, y


def test_grouped_evaluation_matches_one_model_at_a_time():
  # 5 models in groups of 2 (the last group overlaps the one before), 30 images in chunks of 7
  task, model, x, y = mlp_task(30, eval_batch=7, eval_nodes=2)
  params = jax.vmap(task.init_flat)(jax.random.split(jax.random.key(3), 5))
  ev = task.evaluate(params)
  _, unravel = ravel_pytree(model.init(jax.random.key(0)))
  for i in range(5):
    logits = np.asarray(model.apply(unravel(params[i]), x), np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    np.testing.assert_allclose(float(ev["acc"][i]), np.mean(logits.argmax(-1) == y), atol=1e-6)
    np.testing.assert_allclose(float(ev["loss"][i]), -np.mean(logp[np.arange(30), y]), rtol=1e-5)


def test_evaluation_memory_does_not_grow_with_nodes_times_test_set():
  """XLA's temporaries of one evaluation stay flat from 16 to 1,024 nodes and 500 to 4,000
  test images, while the naive (N, T, 10) logits would grow 500-fold
  (benchmarks/eval_memory.py: the same at 1,000 nodes x 10,000 CIFAR-10-shaped images)."""
  def temp(n, t, eval_nodes=16):
    task, *_ = mlp_task(t, eval_batch=50, eval_nodes=eval_nodes)
    mem = task.eval_fn.lower(jax.ShapeDtypeStruct((n, task.n_params), np.float32), task.test).compile().memory_analysis()
    if mem is None:
      pytest.skip("this backend has no compiled memory analysis")
    return mem.temp_size_in_bytes

  small = temp(16, 500)
  naive_growth = (1024 * 4000 - 16 * 500) * 10 * 4
  for n, t in ((1024, 500), (16, 4000), (1024, 4000)):
    assert temp(n, t) - small < 0.01 * naive_growth, (n, t)
    assert temp(n, t) < 1.5 * small
  # the measurement sees scaling where there is some: all 1,024 models side by side
  assert temp(1024, 500, eval_nodes=1024) > 20 * small


def test_missing_data_says_how_to_get_it(tmp_path):
  cfg = tiny_config("task=cifar10", f"data.dir={tmp_path}", "n_nodes=4", "recipients=2")
  with pytest.raises(DataError, match="cifar10.npz") as info:
    tasks.build(cfg)
  assert "tensorflow-datasets" in str(info.value)
