"""Models behind one small interface: one node (`apply`) and N nodes at once (`apply_stacked`).

`init(key)` gives one node's parameter pytree; `apply_stacked` takes the same pytree with a
leading node axis N (what `jax.vmap(init)` or `jax.vmap(unravel)` produce) and inputs
(N, B, ...), and returns (N, B, ...). Every model's `apply_stacked` equals
`jax.vmap(apply)` to float32 rounding (tests/test_models.py).

GN-LeNet's `apply_stacked` is hand-written because XLA:CPU runs the plain `vmap` very
slowly: vmapping a convolution over per-node kernels gives a grouped convolution (about
250 samples/s for a training step at N = 16 here), and inside a `lax.scan` (where the engine
runs its steps) the kernel-gradient convolution of autodiff falls back to a naive loop, about
40 times slower still. The fast version therefore

* runs each node's convolutions as ordinary NHWC convolutions with a custom VJP that keeps
  all three (forward, input gradient, kernel gradient) in forms XLA:CPU executes with its
  fast library kernels: the input gradient is a convolution with the flipped kernel, the
  kernel gradient a convolution whose batch is the input channels and whose features are
  the images;
* fuses conv bias + GroupNorm + 2x2 max-pool + ReLU into one op with a hand-written VJP:
  the statistics of y = conv + bias come from sums over the conv output and the pool picks
  on it (the bias is per channel), so y itself is never written out; the picks, and which
  corner of each window they came from, are pooled-size arrays built from the four window
  corners, so the backward pass's sums run over pooled-size arrays and its one full-size
  pass writes the input gradient (about ten full-size passes before; the step is about 4%
  faster, BENCHMARKS.md);
* unrolls `unroll` nodes' networks side by side, in a `lax.map` over groups of nodes
  (`map_groups`): with one multi-threaded device XLA:CPU runs independent per-node chains
  on both cores, while a `lax.map` over single nodes keeps one core busy. Larger `unroll`
  compiles longer (about 0.8 s per unrolled node); with several one-thread CPU devices
  (`devices` > 1) divjax.tasks uses unroll 1, as fast there and quicker to compile. The
  training step differentiates each group on its own (`Model.group`, used by
  divjax.nodes) rather than the whole `lax.map`: the residuals of one group stay in cache
  instead of being stacked for all N nodes, which measured 15-25% faster at N = 64 (BENCHMARKS.md);
* splits the stacked parameters into per-node rows with a custom VJP that stacks the rows'
  gradients in a separate op: autodiff's own version fuses that stack into the SGD update
  as a loop choosing among all N rows per element, which cost as much as a conv layer.

benchmarks/conv_speed.py measures the variants. Only reverse-mode differentiation is
supported through the fast GN-LeNet (custom VJPs); `apply` is plain flax for everything.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

NAMES = ("gn_lenet", "mlp", "logreg", "mf", "linear")
IMPLS = ("auto", "fast", "vmap")  # how gn_lenet runs N nodes at once (make_model)
GN_EPS = 1e-5     # PyTorch's GroupNorm default (flax's is 1e-6)
GN_GROUPS = 2


class Model(NamedTuple):
  init: Callable           # key -> params pytree of one node
  apply: Callable          # (params, x (B, ...)) -> outputs (B, ...)
  apply_stacked: Callable  # (params with leading axis N, x (N, B, ...)) -> (N, B, ...)
  kind: str                # "classification" (logits (B, C)) or "regression" (predictions (B,))
  # (params with leading axis N, x (B, ...) shared by all nodes) -> (N, B, ...): evaluation on
  # a common test set; None means jax.vmap(apply, in_axes=(0, None)) (see `apply_shared`)
  shared: Optional[Callable] = None
  # nodes differentiated together in a training step (one `map_groups` iteration); None: all
  group: Optional[int] = None


def map_groups(fn: Callable, group: Optional[int], *args):
  """fn over the leading (node) axis of args in groups of about `group` nodes, one group
  per `lax.map` iteration; fn must treat nodes independently. None or group >= N: one call.

  The group size is the largest divisor of N not above `group` when that is at least half of
  it (no leftover group, so fn is compiled once); otherwise `group`, plus one call for the
  N mod group nodes left over.
  """
  n = jax.tree.leaves(args)[0].shape[0]
  if group is None or group >= n:
    return fn(*args)
  g = max(d for d in range(1, group + 1) if n % d == 0)
  g = g if 2 * g >= group else group
  k, rest = divmod(n, g)
  head = lambda a: a[: k * g].reshape((k, g) + a.shape[1:])
  out = lax.map(lambda a: fn(*a), jax.tree.map(head, args))
  out = jax.tree.map(lambda a: a.reshape((k * g,) + a.shape[2:]), out)
  if rest:
    tail = fn(*jax.tree.map(lambda a: a[k * g:], args))
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
  return out


def apply_shared(model: Model, params, x):
  """Every node's model on the same inputs x (B, ...) -> (N, B, ...)."""
  if model.shared is not None:
    return model.shared(params, x)
  return jax.vmap(model.apply, in_axes=(0, None))(params, x)


def make_model(name: str, *, input_shape=None, hidden=(64,), n_classes: int = 10,
               n_users: int | None = None, n_items: int | None = None, dim: int = 20,
               unroll: int = 16, impl: str = "auto") -> Model:
  """Builds a model by name (one of NAMES).

  gn_lenet: input_shape (H, W, C), default CIFAR-10's (32, 32, 3); n_classes; unroll = nodes
    run side by side in apply_stacked (speed/compile-time trade-off, results identical;
    compile time grows about 0.8 s per unrolled node); impl = "fast" (the hand-written
    per-node convolutions above), "vmap" (`jax.vmap` of the flax model: one grouped
    convolution for all nodes, which GPU libraries run as a single kernel while the
    per-node loop would launch thousands of tiny ones) or "auto" (default): "fast" on a
    CPU backend, "vmap" elsewhere. Both give the same numbers to float32 rounding.
  mlp, logreg: input_shape (required; inputs are flattened), hidden sizes (mlp), n_classes.
  mf: n_users, n_items (required), dim; inputs are int (B, 2) (user, item) pairs.
  linear: input_shape (required); prediction <w, x>, no bias (least squares).
  """
  if name == "gn_lenet":
    shape = tuple(input_shape or (32, 32, 3))
    if len(shape) != 3:
      raise ValueError(f"input_shape: gn_lenet needs (H, W, C), got {shape}")
    if unroll < 1:
      raise ValueError(f"unroll={unroll}: must be >= 1")
    if impl not in IMPLS:
      raise ValueError(f"impl: {impl!r} is not one of {', '.join(IMPLS)}")
    module = GNLeNet(n_classes)
    init, apply = _init_apply(module, shape, jnp.float32)
    if impl == "vmap" or (impl == "auto" and jax.default_backend() != "cpu"):
      return Model(init, apply, jax.vmap(apply), "classification")
    stacked = _gn_lenet_stacked(unroll)
    # evaluation through the fast per-node convolutions too (vmap(apply) would be a grouped
    # convolution, several times slower on CPU); the broadcast copy is N x B images
    shared = lambda p, x: stacked(p, jnp.broadcast_to(x, (jax.tree.leaves(p)[0].shape[0],) + x.shape))
    return Model(init, apply, stacked, "classification", shared, group=unroll)
  if name in ("mlp", "logreg"):
    if input_shape is None:
      raise ValueError(f"input_shape: required for {name} (the shape of one sample)")
    module = MLP(tuple(hidden) if name == "mlp" else (), n_classes)
    init, apply = _init_apply(module, tuple(input_shape), jnp.float32)
    return Model(init, apply, jax.vmap(apply), "classification")
  if name == "linear":
    if input_shape is None:
      raise ValueError("input_shape: required for linear (the shape of one sample)")
    init, apply = _init_apply(Linear(), tuple(input_shape), jnp.float32)
    return Model(init, apply, jax.vmap(apply), "regression")
  if name == "mf":
    if n_users is None or n_items is None:
      raise ValueError("n_users, n_items: both required for mf")
    init, apply = _init_apply(MF(n_users, n_items, dim), (2,), jnp.int32)
    return Model(init, apply, jax.vmap(apply), "regression")
  raise ValueError(f"model: unknown {name!r}; allowed names: {', '.join(NAMES)}")


def _init_apply(module: nn.Module, input_shape: tuple, dtype):
  def init(key):
    return module.init(key, jnp.zeros((1,) + input_shape, dtype))["params"]

  def apply(params, x):
    return module.apply({"params": params}, x)

  return init, apply


# ------------------------------------------------------------------------------ flax modules


def _torch_uniform(fan_in: int):
  """PyTorch's default Conv2d/Linear init (weights and biases): U(-1/sqrt(fan_in), +)."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class GNLeNet(nn.Module):
  """The artifact's `LeNet` (PAPER.md 4.2): 3 x [conv 5x5 'same' -> GroupNorm(2) -> ReLU ->
  maxpool 2x2] with 32, 32, 64 channels, then one linear layer; 89,834 parameters on
  32x32x3. PyTorch's initialisation and GroupNorm epsilon (1e-5), as the artifact trains it.
  (The flatten order is HWC rather than PyTorch's CHW: a fixed permutation of `fc`'s rows.)
  """
  n_classes: int = 10

  @nn.compact
  def __call__(self, x):
    for i, feats in enumerate((32, 32, 64), start=1):
      fan_in = 25 * x.shape[-1]
      x = nn.Conv(feats, (5, 5), padding="SAME", kernel_init=_torch_uniform(fan_in),
                  bias_init=_torch_uniform(fan_in), name=f"conv{i}")(x)
      x = nn.GroupNorm(num_groups=2, epsilon=GN_EPS, name=f"gn{i}")(x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.n_classes, kernel_init=_torch_uniform(x.shape[-1]),
                    bias_init=_torch_uniform(x.shape[-1]), name="fc")(x)


class MLP(nn.Module):
  """Flatten, then ReLU layers of `hidden` sizes and a linear output (logreg: hidden = ())."""
  hidden: tuple
  n_classes: int

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0], -1))
    for h in self.hidden:
      x = nn.relu(nn.Dense(h)(x))
    return nn.Dense(self.n_classes)(x)


class Linear(nn.Module):
  """Linear regression without bias: prediction = <w, x> (the least-squares task)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(1, use_bias=False)(x.reshape((x.shape[0], -1)))[:, 0]


class MF(nn.Module):
  """Matrix factorisation (PAPER.md 4.3): rating = <user embedding, item embedding>."""
  n_users: int
  n_items: int
  dim: int = 20

  @nn.compact
  def __call__(self, x):
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -0.05, 0.05)
    u = nn.Embed(self.n_users, self.dim, embedding_init=init, name="user")(x[:, 0])
    v = nn.Embed(self.n_items, self.dim, embedding_init=init, name="item")(x[:, 1])
    return jnp.sum(u * v, axis=-1)


# ------------------------------------------------------------- fast stacked GN-LeNet (one node)

_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=_DN)


def _conv_dx(dy, w):
  """Input gradient of a stride-1 'SAME' conv with an odd kernel: conv with the flipped kernel."""
  return _conv(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3))


def _conv_dw(x, dy, k: int):
  """Kernel gradient as a plain convolution: batch = input channels, features = images,
  the (H, W) output gradient as the window. (Autodiff's version of this convolution is not
  in canonical form, and inside loops XLA:CPU runs it with a naive emitter.)"""
  p = k // 2
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = lax.conv_general_dilated(jnp.transpose(xp, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)),
                                 (1, 1), "VALID", dimension_numbers=_DN)          # (C, k, k, O)
  return jnp.transpose(out, (1, 2, 0, 3))


@jax.custom_vjp
def _conv_op(x, w):
  """Stride-1 'SAME' conv of one node's batch, with the fast VJP above. The input gradient is
  computed only when x is being differentiated (not for the first layer, whose input is data).
  Inputs with fewer than 4 channels are zero-padded to 4 for the forward pass: XLA:CPU runs
  3-channel convolutions about 4x slower."""
  c = x.shape[-1]
  if c < 4:
    x = jnp.pad(x, ((0, 0),) * 3 + ((0, 4 - c),))
    w = jnp.pad(w, ((0, 0),) * 2 + ((0, 4 - c), (0, 0)))
  return _conv(x, w)


def _conv_op_fwd(x, w):
  # symbolic_zeros=True: primals arrive wrapped, with `perturbed` telling if they need a gradient
  return _conv_op(x.value, w.value), (x.value, w.value, x.perturbed)


def _conv_op_bwd(res, dy):
  x, w, need_dx = res
  return (_conv_dx(dy, w) if need_dx else None), _conv_dw(x, dy, w.shape[0])


_conv_op.defvjp(_conv_op_fwd, _conv_op_bwd, symbolic_zeros=True)


def _windows(t):
  """(B, H, W, C) -> the four (B, H//2, W//2, C) corners of the 2x2 pool windows in row-major
  window order, dropping an odd last row/column (a VALID pool)."""
  b, h, w, c = t.shape
  v = t[:, : h // 2 * 2, : w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return [v[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


def _gn_stats(yc, bias_c):
  """GroupNorm statistics of y = yc + bias_c from sums over yc: y itself is never formed
  (XLA:CPU would write it out, a full pass over the largest activations)."""
  b, h, w, c = yc.shape
  t1 = yc.sum(axis=(1, 2))                                                    # (B, C)
  t2 = jnp.square(yc).sum(axis=(1, 2))
  s1 = t1 + h * w * bias_c                                                    # sum y
  s2 = t2 + 2 * bias_c * t1 + h * w * jnp.square(bias_c)                      # sum y^2
  cnt = h * w * (c // GN_GROUPS)
  mean = s1.reshape(b, GN_GROUPS, -1).sum(-1) / cnt                          # (B, G)
  var = jnp.maximum(s2.reshape(b, GN_GROUPS, -1).sum(-1) / cnt - mean * mean, 0.0)
  return s1, mean, lax.rsqrt(var + GN_EPS)


def _per_channel(v, c):
  return jnp.repeat(v, c // GN_GROUPS, axis=-1)                               # (B, G) -> (B, C)


@jax.custom_vjp
def _gn_pool_relu(yc, bias_c, scale, bias):
  """relu(maxpool2x2(GroupNorm(yc + bias_c))) for one node's (B, H, W, C) conv output.

  GroupNorm as flax computes it (variance = E[y^2] - E[y]^2). Max-pool and ReLU commute, and
  GroupNorm is a per-channel affine map a*y + c after the statistics, so the pool picks on y
  (the largest y where a > 0, the smallest where not), and adding the per-channel bias_c
  does not change which element it picks: it picks on yc.
  """
  return _gn_pool_relu_fwd(yc, bias_c, scale, bias)[0]


def _gn_pool_relu_fwd(yc, bias_c, scale, bias):
  c_dim = yc.shape[-1]
  s1, mean, inv = _gn_stats(yc, bias_c)
  a = _per_channel(inv, c_dim) * scale                                        # (B, C)
  c = bias + (bias_c - _per_channel(mean, c_dim)) * a                         # a*yc + c = GN(y)
  w0, w1, w2, w3 = _windows(yc)
  up = (a > 0)[:, None, None, :]
  pick = jnp.where(up, jnp.maximum(jnp.maximum(w0, w1), jnp.maximum(w2, w3)),
                   jnp.minimum(jnp.minimum(w0, w1), jnp.minimum(w2, w3)))   # picked yc, pooled
  # which corner was picked; on ties the first in row-major window order, as flax's
  # (XLA's select-and-scatter) and PyTorch's max-pool send the gradient: flat image regions
  # tie exactly. XLA:CPU fuses this pooled-size compare into the backward pass's one
  # full-size loop; storing it through a reduction measured slower (BENCHMARKS.md).
  idx = jnp.where(w0 == pick, 0, jnp.where(w1 == pick, 1, jnp.where(w2 == pick, 2, 3)))
  zp = a[:, None, None, :] * pick + c[:, None, None, :]
  return jnp.maximum(zp, 0.0), (yc, bias_c, scale, s1, mean, inv, a, pick, idx.astype(jnp.int8), zp)


def _gn_pool_relu_bwd(res, dout):
  yc, bias_c, scale, s1, mean, inv, a, pick, idx, zp = res
  b, h, w, c_dim = yc.shape
  g = jnp.where(zp > 0, dout, 0.0)               # grad of the GN output at the picked element
  # only the picked element of each window has a gradient, so the sums over the full-size
  # gradient are sums over the pooled one
  s_dz = g.sum(axis=(1, 2))                                                   # (B, C)
  s_dzy = (g * pick).sum(axis=(1, 2)) + bias_c * s_dz                        # sum dz * y
  mean_c, inv_c = _per_channel(mean, c_dim), _per_channel(inv, c_dim)
  s_dzx = inv_c * (s_dzy - mean_c * s_dz)                                     # sum dz * xhat
  cnt = h * w * (c_dim // GN_GROUPS)
  g_mean = (scale * s_dz).reshape(b, GN_GROUPS, -1).sum(-1) / cnt             # mean_g(dxhat)
  g_corr = (scale * s_dzx).reshape(b, GN_GROUPS, -1).sum(-1) / cnt            # mean_g(dxhat*xhat)
  # dy = inv * (dxhat - mean_g(dxhat) - xhat * mean_g(dxhat * xhat)) = a*dz + k1 + k2*y
  k2 = _per_channel(-inv * inv * g_corr, c_dim)
  k1 = _per_channel(inv * inv * g_corr * mean - inv * g_mean, c_dim)
  win = lambda t: t[:, :, None, :, None, :]                                   # broadcast over the 2x2
  corner = jnp.arange(4, dtype=jnp.int8).reshape(1, 1, 2, 1, 2, 1)
  a_dz = jnp.where(win(idx) == corner, win(a[:, None, None, :] * g), 0.0)   # a*dz, full size
  a_dz = a_dz.reshape(b, h // 2 * 2, w // 2 * 2, c_dim)
  if a_dz.shape[1:3] != (h, w):
    a_dz = jnp.pad(a_dz, ((0, 0), (0, h - a_dz.shape[1]), (0, w - a_dz.shape[2]), (0, 0)))
  k1y = k1 + k2 * bias_c                                                      # k1 + k2*y = k1y + k2*yc
  dy = a_dz + k1y[:, None, None, :] + k2[:, None, None, :] * yc
  d_bias_c = (a * s_dz + h * w * k1 + k2 * s1).sum(0)                         # sum of dy, no extra pass
  return dy, d_bias_c, s_dzx.sum(0), s_dz.sum(0)


_gn_pool_relu.defvjp(_gn_pool_relu_fwd, _gn_pool_relu_bwd)


def _gn_lenet_one(p, x):
  """GN-LeNet of one node with the fast ops; same parameters and outputs as GNLeNet."""
  for i in (1, 2, 3):
    y = _conv_op(x, p[f"conv{i}"]["kernel"])
    x = _gn_pool_relu(y, p[f"conv{i}"]["bias"], p[f"gn{i}"]["scale"], p[f"gn{i}"]["bias"])
  return x.reshape(x.shape[0], -1) @ p["fc"]["kernel"] + p["fc"]["bias"]


@jax.custom_vjp
def _unstack(a):
  """The rows of a, with a gradient that stacks the rows' gradients in a separate op.
  (Autodiff's stack of slice gradients fuses with what consumes it, e.g. the SGD update,
  into one loop that picks among all rows per element: about as slow as a conv layer.)"""
  return tuple(a[i] for i in range(a.shape[0]))


_unstack.defvjp(lambda a: (_unstack(a), None),
                lambda _, rows: (lax.optimization_barrier(jnp.stack(rows)),))


def _gn_lenet_stacked(unroll: int):
  def side_by_side(p, x):
    rows = jax.tree.map(_unstack, p)                                          # leaves: tuples of rows
    node = lambda i: jax.tree.map(lambda r: r[i], rows, is_leaf=lambda t: isinstance(t, tuple))
    return jnp.stack([_gn_lenet_one(node(i), x[i]) for i in range(x.shape[0])])

  return lambda params, x: map_groups(side_by_side, unroll, params, x)
