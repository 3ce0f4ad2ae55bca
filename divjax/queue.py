"""FIFO send queues: one per node, served at the node's upload rate, in exact microseconds.

Times are timebase.Wide (two int32 words), so a backlog that grows round after round on a
slow link stays exact however far behind it falls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from divjax import timebase as tb


def enqueue(busy: tb.Wide, service: tb.Wide, flush: bool) -> tb.Wide:
  """Upload completions (N, M) of M messages enqueued in order at the send instant 0.

  Args:
    busy: (N,) when each queue becomes idle (us after the send instant; <= 0: idle now).
    service: (N, M) transmission time of each message.
    flush: the queue was emptied at the send instant (what was not uploaded is dropped).
  """
  idle = tb.wide(jnp.zeros((service.hi.shape[0], 1), jnp.int32))
  start = idle if flush else tb.maximum(jax.tree.map(lambda x: x[:, None], busy), idle)
  return tb.add(start, tb.cumsum(service, axis=1))


def serve(server, enqueue_at, service: tb.Wide, busy: tb.Wide, live, ties: tuple):
  """Messages entering the queues of `server` at times `enqueue_at`, served first come first served.

  Each server's messages are served in order of (enqueue time, *ties) after what its queue
  already holds (`busy`), by a segmented max-plus scan: done_k = max(done_{k-1}, enqueue_k)
  + service_k. Dead entries (`live` False) must have service 0 and are ignored.

  Args:
    server, enqueue_at: (K,) int32; service: (K,) Wide; busy: (n,) Wide; live: (K,) bool;
    ties: (K,) keys breaking ties between equal enqueue times, least significant first.

  Returns:
    (done (K,) Wide, busy (n,) Wide updated by the live entries).
  """
  n = busy.hi.shape[0]
  order = jnp.lexsort(tuple(ties) + (enqueue_at, jnp.where(live, server, n)))
  srv = server[order]
  a_ = tb.wide(enqueue_at[order])
  b_ = jax.tree.map(lambda x: x[order], service)
  first = jnp.concatenate([jnp.array([True]), srv[1:] != srv[:-1]])
  a_ = tb.where(first, tb.maximum(a_, tb.gather(busy, jnp.minimum(srv, n - 1))), a_)

  def combine(x, y):  # (a, b, start): f(c) = max(c, a) + b, composed left to right
    (a1, b1, s1), (a2, b2, s2) = x, y
    return (tb.where(s2, a2, tb.maximum(a1, tb.sub(a2, b1))), tb.where(s2, b2, tb.add(b1, b2)), s1 | s2)

  ca, cb, _ = jax.lax.associative_scan(combine, (a_, b_, first))
  done_sorted = tb.add(ca, cb)
  done = jax.tree.map(lambda x: jnp.zeros_like(x).at[order].set(x), done_sorted)
  return done, tb.segment_max(done, live, server, n, busy)
