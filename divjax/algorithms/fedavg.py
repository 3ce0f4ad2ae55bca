"""FedAvg (McMahan et al., AISTATS 2017) with a server node: a reference point for users
coming from federated learning, not a decentralized algorithm.

Each round the server samples a cohort of C = `server.cohort` clients uniformly without
replacement (all nodes by default), sends them the global model over its own upload link
(`server.upload_mbps`, one copy after another), each client runs H local SGD steps and
sends its model back over its own link, the server's `server.download_mbps` link taking in
one model at a time at its rate, and the new global model is
the average of the cohort's models weighted by their training-set sizes. Round timing:
divjax.sync (server rounds); 2C messages per round.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divjax import sampling
from divjax.config import Config
from divjax.algorithms.base import Properties, SyncProtocol

PROPERTIES = Properties(synchronous=True, uses_server=True)


def make(cfg: Config) -> SyncProtocol:
  n = cfg.n_nodes
  c = cfg.server.cohort or n

  def cohort(key, round_):
    if c == n:
      return jnp.arange(n, dtype=jnp.int32)
    pick = jax.random.choice(sampling.node_key(key, 0, round_), n, (c,), replace=False)
    return jnp.sort(pick).astype(jnp.int32)

  return SyncProtocol("fedavg", cohort=cohort)
