"""The byzantine, compression and aggregation sections over a synchronous round (divjax.sync).

The same wrappers as for the asynchronous engine (divjax.byzantine, divjax.compression,
divjax.robust), applied to the one message a synchronous node sends per round: its whole
post-training model, as one fragment of P coordinates.

  what is sent   Byzantine nodes send their attack, every payload is compressed, exactly as an
                 asynchronous node's snapshot at a round end (the wrappers' own `snapshot`
                 functions, over an (N, 1, P) layout; error feedback and top-k memory are kept
                 per node and change only for the nodes that send: the online ones in D-PSGD
                 and EL, the cohort's in FedAvg, so a client's top-k compares against what it
                 last uploaded, rounds ago if it is rarely sampled). ALIE's and IPM's honest
                 statistics are over every honest node's current model, senders or not.
                 Message size: the compressed payload's bits, so round times follow.
  a coordinate   not sent (sparsified payloads) counts as the receiver's own value in D-PSGD
                 and EL, so the mixing weights stay as the protocol gives them (row sums 1); in
                 FedAvg as the value the client started the round from (the global model it
                 received): a client sends what changed most.
  robust rules   replace the weighted mixing with `aggregation.rule` over the receiver's own
                 post-training model and the copies it received this round, uniformly (the
                 mixing weights are not used). At most K copies reach a receiver: the others
                 end as OVERFLOW, chosen by a seeded random priority per edge and round (K:
                 `aggregation.inbox`, by default the largest in-degree of a D-PSGD or EL-Oracle
                 round, 4 J for EL-Local whose in-degrees vary). centered_clip iterates from the
                 receiver's model at the start of the round: its last aggregate.
                 FedAvg's server applies the rule to the cohort's C uploads (self-centered
                 clipping: around the model it sent, which counts as one of C + 1 values),
                 uniformly instead of by training-set size.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import algorithms, robust, sampling
from divjax import inbox as inbox_lib
from divjax.algorithms.base import AsyncAlgorithm, Dims


class SyncWrap(NamedTuple):
  """What a synchronous run's config adds to its messages (see the module docstring).

  send: (x (N, P), key, round, senders (N,) bool, state) -> (payload (N, P), state); NaN: not sent.
  reference_send: (i, models (N, P), key, round, state_i) -> (payload (P,), state_i).
  init: x0 (N, P) -> state (leaves with the node axis first); reference_init: x0 (P,) -> state_i.
  payload_bits: bits of one message's payload (without the header).
  rule: None (the protocol's weighted mixing) or a robust rule of divjax.robust, over at most
    `inbox` copies per receiver.
  """
  send: Optional[Callable]
  reference_send: Optional[Callable]
  init: Callable
  reference_init: Callable
  payload_bits: int
  received: Optional[Callable] = None          # what each receiver gets instead: (got (E, P), src, dst, round, run key)
  reference_received: Optional[Callable] = None   # the same for one copy: (payload (P,), src, dst, round, run key)
  sparse: bool = False     # payloads may leave coordinates out (NaN)
  rule: Optional[str] = None
  inbox: int = 0
  trim: int = 1
  tau: float = 1.0
  iters: int = 3


def make(cfg, n_params: int, protocol) -> SyncWrap:
  """The wrapper of cfg's sections for a synchronous protocol of a model with n_params floats."""
  from divjax import byzantine, compression  # noqa: PLC0415  (they import algorithms.base)
  alg = AsyncAlgorithm(cfg.algorithm, fragments=1, messages=1, plan=None)
  comp = cfg.compression
  if comp.kind != "none":
    alg = compression.with_compression(alg, comp.kind, fraction=comp.fraction, levels=comp.levels,
                                       error_feedback=comp.error_feedback)
  if byzantine.ids(cfg).size and cfg.byzantine.attack != "crash":   # a crash is churn's (divjax.churn)
    alg = byzantine.with_byzantine(alg, byzantine.mask(cfg), cfg.byzantine.attack, cfg.byzantine.scale,
                                   cfg.byzantine.z, cfg.byzantine.per_recipient)
  n, p = cfg.n_nodes, n_params
  dims, real, coords = Dims(n, 1, p, 0), jnp.ones((1, p), bool), [np.arange(p)]
  send = ref_send = None
  if alg.snapshot is not None:
    def send(x, key, round_, senders, state):
      rounds = jnp.full((n,), round_, jnp.int32)
      payload, state = alg.snapshot(x[:, None, :], real, key, rounds, senders, state)
      return payload[:, 0, :], state

    def ref_send(i, models, key, round_, state):
      return alg.reference_snapshot(i, models, coords, key, round_, state)

  agg = cfg.aggregation
  rule = None if agg.rule == "mean" else agg.rule
  received = ref_received = None
  if alg.received is not None:   # per-recipient payloads (byzantine.per_recipient)
    def received(got, src, dst, round_, run_key):
      zero = jnp.zeros_like(src)
      return alg.received(got, src, dst, zero, jnp.full_like(src, round_), k_received(run_key))

    def ref_received(payload, src, dst, round_, run_key):
      return alg.reference_received(payload, src, dst, 0, round_, k_received(run_key), p)

  return SyncWrap(send=send, reference_send=ref_send, received=received, reference_received=ref_received,
                  init=lambda x0: alg.init(x0[:, None, :], dims),
                  reference_init=lambda x0: alg.reference_init(x0),
                  payload_bits=int(alg.payload_bits(np.array([p]))[0]),
                  sparse=comp.kind in ("top_k", "random_k"), rule=rule, inbox=inbox_size(cfg, protocol) if rule else 0,
                  trim=agg.trim, tau=agg.clip_tau, iters=agg.clip_iters)


def k_received(run_key):
  return sampling.stream(run_key, sampling.STREAM_RECEIVED)


def inbox_size(cfg, protocol) -> int:
  """K: aggregation.inbox, else the largest in-degree of round 0 (D-PSGD's and EL-Oracle's
  in-degrees do not change) or 4 J (EL-Local's vary; as for asynchronous algorithms);
  FedAvg's server reads every upload (C)."""
  if protocol.cohort is not None:
    return cfg.server.cohort or cfg.n_nodes
  if cfg.aggregation.inbox is not None:
    return cfg.aggregation.inbox
  if cfg.algorithm in ("el_local", "el"):
    return algorithms.inbox_size(cfg)
  _, dst, w, _ = protocol.mixing(jax.random.key(0), 0)
  return max(1, int(np.bincount(np.asarray(dst)[np.asarray(w) > 0], minlength=cfg.n_nodes).max()))


def priorities(run_key, round_, n_edges: int):
  """(E,) float32: which copies reach a full inbox first (lowest), fresh every round."""
  return jax.random.uniform(sampling.node_key(sampling.stream(run_key, sampling.STREAM_INBOX), 0, round_),
                            (n_edges,), jnp.float32)


def _robust(wrap: SyncWrap, x, vals, valid, center):
  """wrap.rule on (N, P) own values and (N, K, P) copies, valid (N, K): divjax.robust's rules."""
  return robust.apply(wrap.rule, x[:, None], vals[:, None], valid[:, None], center[:, None], wrap.trim,
                      wrap.tau, wrap.iters)[:, 0]


def gossip(wrap: SyncWrap, start, x, payload, src, dst, w, self_w, run_key, round_):
  """D-PSGD / EL mixing of one round: (new params (N, P), copies overflowed ())."""
  n = x.shape[0]
  got = payload[src]
  if wrap.received is not None:
    got = wrap.received(got, src, dst, round_, run_key)
  if wrap.rule is None:
    got = jnp.where(jnp.isnan(got), x[dst], got) if wrap.sparse else got
    return self_w[:, None] * x + jax.ops.segment_sum(w[:, None] * got, dst, num_segments=n), jnp.zeros((), jnp.int32)
  live = w > 0
  # each copy's place at its receiver by (priority, sender), as divjax.inbox ranks the asynchronous ones
  rank = inbox_lib.ranks(dst, priorities(run_key, round_, src.shape[0]), src, live, n)
  kept = live & (rank < wrap.inbox)
  row, col = jnp.where(kept, dst, n), jnp.where(kept, rank, 0)
  vals = jnp.zeros((n + 1, wrap.inbox, x.shape[1]), x.dtype).at[row, col].set(got)[:n]
  valid = jnp.zeros((n + 1, wrap.inbox), bool).at[row, col].set(True)[:n]
  return _robust(wrap, x, vals, valid, start), jnp.sum(live & ~kept, dtype=jnp.int32)


def server(wrap: SyncWrap, start, uploads, weights, ok=None):
  """FedAvg's new global model (P,) from the cohort's uploads (C, P), NaN filled from `start`
  (C, P), the models the clients started from; weights (C,) by training-set size; ok (C,):
  which members took part (churn; None: all), the others left out and the weights renormalized."""
  if wrap.sparse:
    uploads = jnp.where(jnp.isnan(uploads), start, uploads)
  valid = jnp.ones(uploads.shape[:1], bool)
  if ok is not None:
    weights = jnp.where(ok, weights, 0.0)
    weights = weights / jnp.maximum(jnp.sum(weights), 1e-30)
    order = jnp.argsort(~ok, stable=True)          # the members that took part first, in cohort order
    start, uploads, weights, valid = start[order], uploads[order], weights[order], ok[order]
  if wrap.rule is None:
    return jnp.sum(weights[:, None] * uploads, axis=0)
  sent = jnp.sum(weights[:, None] * start, axis=0)       # the model the server sent
  if wrap.rule == "self_centered_clip":
    own, vals = sent, uploads
  else:                                                 # the rule over the C uploads themselves
    own, vals, valid = uploads[0], uploads[1:], valid[1:]
  return _robust(wrap, own[None], vals[None], valid[None], sent[None])[0]


# ---- the same, plainly, for the reference simulator (numpy, one receiver at a time)


def reference_gossip(wrap: SyncWrap, start, x, payload, src, dst, w, self_w, run_key, round_, arrived=None):
  """gossip for the reference; arrived (E,): which copies reached their receiver (churn), the
  weight of one that did not going to the receiver's own value."""
  n = x.shape[0]
  arrived = w > 0 if arrived is None else arrived

  def copy(e):
    """The payload edge e's receiver gets."""
    if wrap.reference_received is None:
      return payload[src[e]]
    return wrap.reference_received(payload[src[e]], int(src[e]), int(dst[e]), round_, run_key)

  if wrap.rule is None:
    mixed = self_w[:, None].astype(np.float32) * x
    for e, (s, d, we) in enumerate(zip(src.tolist(), dst.tolist(), w.tolist())):
      got = copy(e) if arrived[e] else x[d]
      if wrap.sparse:   # a coordinate not sent: the receiver's own value
        got = np.where(np.isnan(got), x[d], got)
      mixed[d] += np.float32(we) * got
    return mixed.astype(np.float32), 0
  prio = np.asarray(priorities(run_key, round_, src.shape[0]))
  out, overflow = np.empty_like(x), 0
  for d in range(n):
    edges = sorted((e for e in range(src.shape[0]) if dst[e] == d and w[e] > 0 and arrived[e]),
                   key=lambda e: (prio[e], src[e]))
    overflow += max(0, len(edges) - wrap.inbox)
    values = np.stack([x[d]] + [copy(e) for e in edges[:wrap.inbox]]).astype(np.float32)
    out[d] = robust.reference_rule(wrap.rule, values, start[d], wrap.trim, wrap.tau, wrap.iters)
  return out.astype(np.float32), overflow


def reference_server(wrap: SyncWrap, start, uploads, weights):
  if wrap.sparse:
    uploads = np.where(np.isnan(uploads), start, uploads).astype(np.float32)
  sent = np.zeros(uploads.shape[1], np.float32)
  for wk, s in zip(weights, start):
    sent += np.float32(wk) * s
  if wrap.rule is None:
    out = np.zeros_like(sent)
    for wk, u in zip(weights, uploads):
      out += np.float32(wk) * u
    return out
  values = np.concatenate([sent[None], uploads]) if wrap.rule == "self_centered_clip" else uploads
  return robust.reference_rule(wrap.rule, values, sent, wrap.trim, wrap.tau, wrap.iters).astype(np.float32)
