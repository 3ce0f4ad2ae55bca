"""Byzantine nodes: a wrapper that changes what some nodes send, over any asynchronous algorithm.

Byzantine nodes train and aggregate like the others; what they put in their messages at a
round end is an attack computed from every node's current model (an omniscient attacker, as
in the papers that define these attacks). With x a Byzantine node's own model and mu, sigma
the honest nodes' coordinate-wise mean and (population) standard deviation at that instant:

  sign_flip   -s x                           (s = scale, default 1)
  gaussian    x + s e, e ~ N(0, I) seeded by (node, round)   (default s = 1)
  alie        mu - z sigma                   (Baruch et al. 2019, "A little is enough";
                                              z by default their z_max, below)
  ipm         -s mu                          (Xie et al. 2020, inner-product manipulation;
                                              default s = 0.1)

The engine calls `snapshot` at every round end with all models; the reference simulator
calls `reference_snapshot` for one node, written plainly in numpy.
"""

from __future__ import annotations

import statistics
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import network, sampling
from divjax.algorithms.base import AsyncAlgorithm

ATTACKS = ("sign_flip", "gaussian", "alie", "ipm")   # and "crash": offline for good (divjax.churn)
DEFAULT_SCALE = {"sign_flip": 1.0, "gaussian": 1.0, "ipm": 0.1, "alie": None}


def ids(cfg) -> np.ndarray:
  """The Byzantine nodes: explicit ids, or round(fraction * n) drawn from the data seed."""
  return network.choose_nodes(cfg, cfg.byzantine.fraction, cfg.byzantine.nodes, 0xB42)


def mask(cfg) -> np.ndarray:
  """(N,) bool, True for Byzantine nodes."""
  m = np.zeros(cfg.n_nodes, bool)
  m[ids(cfg)] = True
  return m


def alie_z(n: int, f: int) -> float:
  """Baruch et al.'s z_max: s = floor(n/2 + 1) - f honest supporters needed; z = Phi^-1((n - s) / n)."""
  s = n // 2 + 1 - f
  p = min(max((n - s) / n, 1e-6), 1 - 1e-6)
  return statistics.NormalDist().inv_cdf(p)


def _noise(key, node, round_, shape):
  """N(0, I) in fragment layout (F, L); the reference reads it through each fragment's coordinates."""
  return jax.random.normal(sampling.node_key(key, node, round_), shape, jnp.float32)


def _flat(layout_values: np.ndarray, coords: list, p: int) -> np.ndarray:
  out = np.zeros(p, np.float32)
  for f, c in enumerate(coords):
    out[c] = layout_values[f, :c.size]
  return out


def _recipient_noise(key, src, dst, round_, frag, width: int):
  """N(0, I) (L,) for one (sender, recipient, the recipient's round, fragment)."""
  k = jax.random.fold_in(sampling.node_key(key, src, dst), round_ * 4096 + frag)
  return jax.random.normal(k, (width,), jnp.float32)


def with_byzantine(alg: AsyncAlgorithm, byz: np.ndarray, attack: str, scale: Optional[float] = None,
                   z: Optional[float] = None, per_recipient: bool = False) -> AsyncAlgorithm:
  """`alg` with the nodes in boolean mask `byz` (N,) sending `attack` instead of their model.

  per_recipient (gaussian only): every recipient gets its own noise, drawn for (sender,
  recipient, the recipient's round, fragment), instead of one noisy payload for all.
  """
  if attack not in ATTACKS:
    raise ValueError(f"byzantine.attack: must be one of {', '.join(ATTACKS)} (got {attack!r})")
  if per_recipient and attack != "gaussian":
    raise ValueError(f"byzantine.per_recipient: only the gaussian attack draws per recipient (got {attack!r})")
  if per_recipient:
    return _per_recipient(alg, np.asarray(byz, bool), DEFAULT_SCALE[attack] if scale is None else float(scale))
  byz = np.asarray(byz, bool)
  honest = ~byz
  s = DEFAULT_SCALE[attack] if scale is None else float(scale)
  if attack == "alie" and z is None:
    z = alie_z(byz.size, int(byz.sum()))

  inner, inner_ref = alg.snapshot, alg.reference_snapshot   # e.g. compression: applied after the attack

  def snapshot(x, real, key, rounds, ends, state):
    h = jnp.asarray(honest)[:, None, None]
    mu = jnp.sum(jnp.where(h, x, 0.0), 0) / honest.sum()
    sigma = jnp.sqrt(jnp.sum(jnp.where(h, (x - mu) ** 2, 0.0), 0) / honest.sum())
    if attack == "sign_flip":
      bad = -s * x
    elif attack == "gaussian":
      nodes = jnp.arange(x.shape[0])
      bad = x + s * jax.vmap(_noise, in_axes=(None, 0, 0, None))(key, nodes, rounds, x.shape[1:])
    elif attack == "alie":
      bad = jnp.broadcast_to(mu - z * sigma, x.shape)
    else:  # ipm
      bad = jnp.broadcast_to(-s * mu, x.shape)
    sent = jnp.where(jnp.asarray(byz)[:, None, None], jnp.where(real, bad, 0.0), x)
    return (sent, state) if inner is None else inner(sent, real, key, rounds, ends, state)

  def reference_snapshot(i, models, coords, key, round_, state):
    x = models[i]
    if byz[i]:
      good = models[honest].astype(np.float64)
      mu, sigma = good.mean(0), good.std(0)
      if attack == "sign_flip":
        x = -np.float32(s) * x
      elif attack == "gaussian":
        width = max(c.size for c in coords)
        x = x + np.float32(s) * _flat(np.asarray(_noise(key, i, round_, (len(coords), width))), coords, x.size)
      elif attack == "alie":
        x = (mu - z * sigma).astype(np.float32)
      else:
        x = (-s * mu).astype(np.float32)
    if inner_ref is None:
      return x, state
    return inner_ref(i, np.concatenate([models[:i], x[None], models[i + 1:]]), coords, key, round_, state)

  def exchanged(p, node, partner, round_, key):
    """What `node` gives its partner in a pairwise exchange: the attack from the live models."""
    x = p[node]
    if attack == "sign_flip":
      bad = -s * x
    elif attack == "gaussian":
      bad = x + s * _recipient_noise(key, node, partner, round_, 0, x.shape[0])
    else:   # the honest statistics, O(N P): only when `node` is an attacker
      def statistics(p):
        h = jnp.asarray(honest)[:, None]
        mu = jnp.sum(jnp.where(h, p, 0.0), 0) / honest.sum()
        sigma = jnp.sqrt(jnp.sum(jnp.where(h, (p - mu) ** 2, 0.0), 0) / honest.sum())
        return mu - z * sigma if attack == "alie" else -s * mu
      return jax.lax.cond(jnp.asarray(byz)[node], statistics, lambda p: p[node], p)
    return jnp.where(jnp.asarray(byz)[node], bad, x)

  def reference_exchanged(models, node, partner, round_, key):
    x = models[node]
    if not byz[node]:
      return x
    if attack == "sign_flip":
      return -np.float32(s) * x
    if attack == "gaussian":
      return x + np.float32(s) * np.asarray(_recipient_noise(key, node, partner, round_, 0, x.size))
    good = models[honest].astype(np.float64)
    mu, sigma = good.mean(0), good.std(0)
    return (mu - z * sigma if attack == "alie" else -s * mu).astype(np.float32)

  return alg._replace(snapshot=snapshot, reference_snapshot=reference_snapshot, exchanged=exchanged,
                      reference_exchanged=reference_exchanged)


def _per_recipient(alg: AsyncAlgorithm, byz: np.ndarray, s: float) -> AsyncAlgorithm:
  """The gaussian attack, its noise drawn where each recipient reads the payload."""
  inner, inner_ref = alg.received, alg.reference_received
  mask = jnp.asarray(byz)

  def received(got, src, dst, frag, round_, key):
    if inner is not None:
      got = inner(got, src, dst, frag, round_, key)
    draw = lambda a, b, r, f: _recipient_noise(key, a, b, r, f, got.shape[-1])
    for _ in range(src.ndim):
      draw = jax.vmap(draw)
    return jnp.where(mask[src][..., None], got + s * draw(src, dst, round_, frag), got)

  def reference_received(payload, src, dst, frag, round_, key, width):
    if inner_ref is not None:
      payload = inner_ref(payload, src, dst, frag, round_, key, width)
    if not byz[src]:
      return payload
    return payload + np.float32(s) * np.asarray(_recipient_noise(key, src, dst, round_, frag, width))[:payload.size]

  return alg._replace(received=received, reference_received=reference_received)
