"""divjax.models: sizes, shapes, and apply_stacked == vmap(apply) (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from divjax import models


def n_params(model):
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))


def stacked_params(model, n, seed=0):
  """Random parameters of n nodes, shaped like `init`'s (its values do not matter here, and
  compiling flax's init costs seconds)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal((n,) + s.shape), jnp.float32), shapes)


def node_losses(model, out, y):
  """One loss per node, as the engine sums them (so grad gives each node its own gradient)."""
  if model.kind == "regression":
    return jnp.mean((out - y) ** 2, axis=-1)
  logp = jax.nn.log_softmax(out)
  return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1)[..., 0], axis=-1)


def assert_stacked_matches_vmap(model, params, x, y):
  def outputs_and_grads(apply_stacked):
    def total(p):
      out = apply_stacked(p, x)
      return jnp.sum(node_losses(model, out, y)), out
    return jax.jit(jax.grad(total, has_aux=True))(params)[::-1]
  ref, g_ref = outputs_and_grads(jax.vmap(model.apply))
  out, g_out = outputs_and_grads(model.apply_stacked)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
  assert jax.tree.structure(g_ref) == jax.tree.structure(g_out)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_out)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(a))))


def test_paper_parameter_counts():
  assert n_params(models.make_model("gn_lenet")) == 89_834                       # PAPER.md 4.2
  assert n_params(models.make_model("mf", n_users=610, n_items=9724)) == 206_680  # PAPER.md 4.3
  assert n_params(models.make_model("mlp", input_shape=(5,), hidden=(7,), n_classes=3)) == 5 * 7 + 7 + 7 * 3 + 3
  assert n_params(models.make_model("logreg", input_shape=(2, 3), n_classes=4)) == 6 * 4 + 4


def test_gn_lenet_layers_and_init():
  p = jax.jit(models.make_model("gn_lenet").init)(jax.random.key(1))
  shapes = {k: {kk: vv.shape for kk, vv in v.items()} for k, v in p.items()}
  assert shapes == {"conv1": {"kernel": (5, 5, 3, 32), "bias": (32,)}, "gn1": {"scale": (32,), "bias": (32,)},
                    "conv2": {"kernel": (5, 5, 32, 32), "bias": (32,)}, "gn2": {"scale": (32,), "bias": (32,)},
                    "conv3": {"kernel": (5, 5, 32, 64), "bias": (64,)}, "gn3": {"scale": (64,), "bias": (64,)},
                    "fc": {"kernel": (1024, 10), "bias": (10,)}}
  # PyTorch's default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases
  for name, fan_in in (("conv1", 75), ("conv2", 800), ("fc", 1024)):
    for leaf in p[name].values():
      bound = 1 / np.sqrt(fan_in)
      assert float(jnp.max(jnp.abs(leaf))) <= bound and float(jnp.std(leaf)) > bound / 4
  assert float(jnp.min(p["gn1"]["scale"])) == 1.0 and float(jnp.max(jnp.abs(p["gn1"]["bias"]))) == 0.0


@pytest.mark.parametrize("name, kwargs, x_shape, out_shape", [
    ("gn_lenet", {}, (4, 32, 32, 3), (4, 10)),
    ("gn_lenet", dict(input_shape=(28, 28, 1), n_classes=7), (4, 28, 28, 1), (4, 7)),
    ("mlp", dict(input_shape=(6,), hidden=(5, 4), n_classes=3), (4, 6), (4, 3)),
    ("logreg", dict(input_shape=(3, 2), n_classes=3), (4, 3, 2), (4, 3)),
])
def test_output_shapes(name, kwargs, x_shape, out_shape):
  model = models.make_model(name, **kwargs)
  x = jnp.zeros(x_shape)
  assert model.kind == "classification"
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert jax.eval_shape(model.apply, params, x).shape == out_shape
  stacked = jax.eval_shape(lambda: model.apply_stacked(stacked_params(model, 2), jnp.stack([x, x])))
  assert stacked.shape == (2,) + out_shape


def test_mf_predicts_dot_products():
  model = models.make_model("mf", n_users=4, n_items=6, dim=3)
  p = model.init(jax.random.key(0))
  assert model.kind == "regression" and p["user"]["embedding"].shape == (4, 3)
  assert float(jnp.max(jnp.abs(p["item"]["embedding"]))) <= 0.05
  x = jnp.array([[0, 5], [3, 1]], jnp.int32)
  expect = jnp.sum(p["user"]["embedding"][x[:, 0]] * p["item"]["embedding"][x[:, 1]], -1)
  np.testing.assert_allclose(model.apply(p, x), expect, rtol=1e-6)


@pytest.mark.parametrize("n_nodes, unroll, shape, conv_bias", [
    (3, 8, (8, 8, 3), 0.0),     # all nodes side by side
    # a group of 2 in the lax.map plus a remainder of 1; odd map sizes
    # (12 -> 6 -> 3 -> 1: pooling drops a row and a column)
    pytest.param(3, 2, (12, 12, 1), 0.0, marks=pytest.mark.slow),
    # conv biases large next to the conv outputs' spread: GroupNorm's statistics of conv + bias
    # come from sums over the conv alone
    pytest.param(2, 16, (8, 8, 3), 2.0, marks=pytest.mark.slow),
])
def test_gn_lenet_stacked_matches_vmap(n_nodes, unroll, shape, conv_bias):
  model = models.make_model("gn_lenet", input_shape=shape, unroll=unroll)
  params = stacked_params(model, n_nodes)
  params = {k: ({**v, "bias": v["bias"] + conv_bias} if k.startswith("conv") else v) for k, v in params.items()}
  # random GroupNorm scales include negative ones (the pool then picks the minimum)
  x = jax.random.normal(jax.random.key(1), (n_nodes, 3) + shape)
  y = jax.random.randint(jax.random.key(2), (n_nodes, 3), 0, 10)
  assert_stacked_matches_vmap(model, params, x, y)


@pytest.mark.slow
def test_gn_lenet_vmap_impl_is_the_plain_vmap_and_auto_is_fast_on_cpu():
  vm = models.make_model("gn_lenet", input_shape=(8, 8, 3), impl="vmap")
  fast = models.make_model("gn_lenet", input_shape=(8, 8, 3), impl="fast", unroll=2)
  auto = models.make_model("gn_lenet", input_shape=(8, 8, 3), unroll=2)
  assert vm.group is None and fast.group == 2
  assert jax.default_backend() != "cpu" or auto.group == 2   # auto = fast on a CPU backend
  params = stacked_params(fast, 3)
  x = jax.random.normal(jax.random.key(1), (3, 2, 8, 8, 3))
  np.testing.assert_allclose(vm.apply_stacked(params, x), fast.apply_stacked(params, x),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(models.apply_shared(vm, params, x[0]),
                             models.apply_shared(fast, params, x[0]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_gn_lenet_stacked_matches_vmap_on_ties():
  """Flat image regions give exactly equal values in a pooling window: the gradient must go
  to the first maximum only, as flax's max-pool sends it."""
  model = models.make_model("gn_lenet", input_shape=(8, 8, 3))
  params = stacked_params(model, 2)
  x = jnp.zeros((2, 3, 8, 8, 3)).at[:, :, 2:5, 3:6].set(jax.random.normal(jax.random.key(1), (2, 3, 3, 3, 3)))
  y = jax.random.randint(jax.random.key(2), (2, 3), 0, 10)
  assert_stacked_matches_vmap(model, params, x, y)


def test_unstack_rows_and_their_gradient():
  a = jnp.arange(12.0).reshape(3, 4)
  rows = models._unstack(a)
  assert len(rows) == 3 and all(np.array_equal(r, a[i]) for i, r in enumerate(rows))
  g = jax.jit(jax.grad(lambda a: sum((i + 1.0) * jnp.sum(r * r) for i, r in enumerate(models._unstack(a)))))(a)
  np.testing.assert_allclose(g, 2 * a * jnp.array([1.0, 2.0, 3.0])[:, None])


@pytest.mark.parametrize("name, kwargs, x_fn, y_fn", [
    ("mlp", dict(input_shape=(6,), hidden=(5,), n_classes=3),
     lambda k: jax.random.normal(k, (3, 4, 6)), lambda k: jax.random.randint(k, (3, 4), 0, 3)),
    ("logreg", dict(input_shape=(6,), n_classes=3),
     lambda k: jax.random.normal(k, (3, 4, 6)), lambda k: jax.random.randint(k, (3, 4), 0, 3)),
    ("mf", dict(n_users=5, n_items=7, dim=4),
     lambda k: jnp.stack([jax.random.randint(k, (3, 4), 0, 5), jax.random.randint(k, (3, 4), 0, 7)], -1),
     lambda k: jax.random.uniform(k, (3, 4), minval=0.5, maxval=5.0)),
])
def test_other_models_stacked_matches_vmap(name, kwargs, x_fn, y_fn):
  model = models.make_model(name, **kwargs)
  assert_stacked_matches_vmap(model, stacked_params(model, 3), x_fn(jax.random.key(1)), y_fn(jax.random.key(2)))


@pytest.mark.slow
def test_gn_lenet_flat_rows_unravel_into_apply_stacked_inside_a_scan():
  """The engine's use: (N, P) flat rows -> vmap(unravel) -> apply_stacked, SGD inside lax.scan."""
  model = models.make_model("gn_lenet", input_shape=(8, 8, 3))
  params = stacked_params(model, 2)
  _, unravel = ravel_pytree(jax.tree.map(lambda a: a[0], params))
  flat = jax.vmap(lambda p: ravel_pytree(p)[0])(params)                            # (N, P)
  x = jax.random.normal(jax.random.key(2), (2, 4, 8, 8, 3))
  y = jax.random.randint(jax.random.key(3), (2, 4), 0, 10)

  def grad(apply_stacked, f):
    return jax.grad(lambda f: jnp.sum(node_losses(model, apply_stacked(jax.vmap(unravel)(f), x), y)))(f)

  fast = jax.jit(lambda f: jax.lax.scan(lambda f, _: (f - 0.05 * grad(model.apply_stacked, f), None),
                                        f, None, length=2)[0])(flat)
  ref_grad = jax.jit(lambda f: grad(jax.vmap(model.apply), f))
  ref = flat
  for _ in range(2):
    ref = ref - 0.05 * ref_grad(ref)
  np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-6)


def test_bad_names_and_arguments():
  with pytest.raises(ValueError, match="allowed names: gn_lenet, mlp, logreg, mf"):
    models.make_model("resnet")
  with pytest.raises(ValueError, match="input_shape: required for mlp"):
    models.make_model("mlp")
  with pytest.raises(ValueError, match="n_users, n_items"):
    models.make_model("mf", n_users=3)
  with pytest.raises(ValueError, match="unroll=0"):
    models.make_model("gn_lenet", unroll=0)
  with pytest.raises(ValueError, match="impl: 'cuda' is not one of auto, fast, vmap"):
    models.make_model("gn_lenet", impl="cuda")
  with pytest.raises(ValueError, match=r"input_shape: gn_lenet needs \(H, W, C\)"):
    models.make_model("gn_lenet", input_shape=(784,))


@pytest.mark.slow  # evaluation through apply_shared is checked in test_tasks (grouped evaluation)
def test_apply_shared_matches_vmap_over_params():
  """Evaluation's path: every node's model on one shared batch."""
  model = models.make_model("gn_lenet", input_shape=(8, 8, 3))
  params = stacked_params(model, 3)
  x = jax.random.normal(jax.random.key(3), (5, 8, 8, 3))
  ref = jax.vmap(model.apply, in_axes=(0, None))(params, x)
  np.testing.assert_allclose(models.apply_shared(model, params, x), ref, rtol=1e-4, atol=1e-5)
