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

from divjax import sampling
from divjax.algorithms.base import AsyncAlgorithm

ATTACKS = ("sign_flip", "gaussian", "alie", "ipm")
DEFAULT_SCALE = {"sign_flip": 1.0, "gaussian": 1.0, "ipm": 0.1, "alie": None}


def ids(cfg) -> np.ndarray:
  """The Byzantine nodes: explicit ids, or round(fraction * n) drawn from the data seed."""
  b = cfg.byzantine
  if b.nodes is not None:
    return np.array(sorted(set(b.nodes)), dtype=np.int64)
  k = int(round(b.fraction * cfg.n_nodes))
  rng = np.random.default_rng([cfg.data_seed, 0xB42])  # own stream: independent of the stragglers'
  return np.sort(rng.permutation(cfg.n_nodes)[:k]).astype(np.int64)


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


def _noise(key, node, round_, p: int):
  return jax.random.normal(sampling.node_key(key, node, round_), (p,), jnp.float32)


def with_byzantine(alg: AsyncAlgorithm, byz: np.ndarray, attack: str, scale: Optional[float] = None,
                   z: Optional[float] = None) -> AsyncAlgorithm:
  """`alg` with the nodes in boolean mask `byz` (N,) sending `attack` instead of their model."""
  if attack not in ATTACKS:
    raise ValueError(f"byzantine.attack: must be one of {', '.join(ATTACKS)} (got {attack!r})")
  byz = np.asarray(byz, bool)
  honest = ~byz
  s = DEFAULT_SCALE[attack] if scale is None else float(scale)
  if attack == "alie" and z is None:
    z = alie_z(byz.size, int(byz.sum()))

  def snapshot(models, key, rounds):
    h = jnp.asarray(honest)[:, None]
    mu = jnp.sum(jnp.where(h, models, 0.0), 0) / honest.sum()
    sigma = jnp.sqrt(jnp.sum(jnp.where(h, (models - mu) ** 2, 0.0), 0) / honest.sum())
    if attack == "sign_flip":
      bad = -s * models
    elif attack == "gaussian":
      nodes = jnp.arange(models.shape[0])
      bad = models + s * jax.vmap(_noise, in_axes=(None, 0, 0, None))(key, nodes, rounds, models.shape[1])
    elif attack == "alie":
      bad = jnp.broadcast_to(mu - z * sigma, models.shape)
    else:  # ipm
      bad = jnp.broadcast_to(-s * mu, models.shape)
    return jnp.where(jnp.asarray(byz)[:, None], bad, models)

  def reference_snapshot(i, models, key, round_):
    x = models[i]
    if not byz[i]:
      return x
    good = models[honest].astype(np.float64)
    mu, sigma = good.mean(0), good.std(0)
    if attack == "sign_flip":
      return -np.float32(s) * x
    if attack == "gaussian":
      return x + np.float32(s) * np.asarray(_noise(key, i, round_, x.size))
    if attack == "alie":
      return (mu - z * sigma).astype(np.float32)
    return (-s * mu).astype(np.float32)

  return alg._replace(snapshot=snapshot, reference_snapshot=reference_snapshot)
