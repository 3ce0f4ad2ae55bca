"""What an asynchronous push-gossip algorithm tells the engine.

The engine (divjax.engine) owns the shared machinery: stacked local SGD, simulated time,
send queues, the delay ring and per-coordinate averaging at each node's round end. An
algorithm only says what a node sends when it ends a round, and whether its queue is
flushed when the next round starts.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import numpy as np


class Protocol(NamedTuple):
  """Static description of a push-gossip algorithm.

  Attributes:
    name: registry name.
    fragments: F, pieces the model is cut into for routing (1 = whole model).
    messages: M, messages a node enqueues per round (fixed, so edge arrays are static).
    flush: drop every message not yet uploaded when the sender starts its next send phase.
    plan: (key, node, round) -> (dst (M,), frag (M,)) int32, the queue in service order.
    reply: the round's messages are pings: on arrival, a receiver that has finished a round
      puts a reply (its latest post-training snapshot, whole model) into its own send queue
      (AD-PSGD's push-pull). Needs fragments == 1 and flush == False.
    pairwise: with `reply`, a ping and its reply form one atomic pairwise exchange (original
      AD-PSGD): when the reply reaches the pinger (at the pinger's first round end after its
      arrival), both nodes' models are replaced by their average, as they are at that
      instant; nothing received is averaged at round ends. Every ping gets a reply.
    neighbours: (N, K) int32 fixed neighbours, or None. With them, a node keeps the newest model received from each neighbour (initially the
      common initial model) and its round end sets x <- (x + sum of the K stored copies) /
      (K + 1) (original SWIFT). The plan must send the whole model to neighbours[i] in order.
  """
  name: str
  fragments: int
  messages: int
  flush: bool
  plan: Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
  reply: bool = False
  pairwise: bool = False
  neighbours: Optional[np.ndarray] = None
