"""What an asynchronous algorithm is: a small bundle of pure functions (DESIGN.md section 8).

Like an optax GradientTransformation, an AsyncAlgorithm is a NamedTuple of functions built
by a factory with explicit keyword arguments. The engine (divjax.engine) owns the shared
machinery: stacked local SGD, simulated time, FIFO send queues, message fates, the delay
ring and routing. An algorithm says
  * what a node sends when it ends a round (`plan`: destinations and fragments in queue order;
    `payload_bits`: the size of each fragment's message),
  * how a node combines its own post-training model with what is due (`aggregate`, with its
    own state from `init`), and the same rule in plain numpy for the reference simulator
    (`reference_aggregate`, written to be obviously right),
  * whether its queue is flushed at the next round end (`queue`), and whether receivers reply
    (`replies`: push-pull, or atomic pairwise exchanges).
Every function is pure; the algorithm's state is a pytree whose leaves have the node axis first.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import numpy as np


class QueuePolicy(NamedTuple):
  flush: bool = True   # drop every message not yet uploaded when the sender's next round ends


class ReplyPolicy(NamedTuple):
  """The round's messages are pings; their receivers reply with a whole model.

  pairwise=False (push-pull, the DivShare artifact's AD-PSGD): a receiver that has finished a
  round replies with its latest post-training snapshot, averaged by the pinger like any copy.
  pairwise=True (Lian et al.'s AD-PSGD): every ping is answered, and when the reply reaches
  the pinger (at the pinger's first round end after its arrival) both models are replaced by
  their average, as they are at that instant (divjax.replies.exchange).
  """
  pairwise: bool = False


class Received(NamedTuple):
  """One copy in the reference simulator's receive buffer (host values)."""
  src: int
  coords: np.ndarray   # the flat coordinates of the fragment
  payload: np.ndarray  # float32 values at those coordinates
  age: int             # ticks since the payload's snapshot
  info: Any = None     # what the sender's reference_message said when it sent the copy


class Dims(NamedTuple):
  """The static dimensions an algorithm's state may need."""
  n_nodes: int
  fragments: int
  width: int           # L, the padded fragment length
  depth: int           # D, ring slots (sender rounds a payload stays readable)


def no_state(x0, dims):
  return ()


def uniform_mean(x, inbox, state):
  """x[k] <- (x[k] + sum of the received copies of k) / (1 + their number)."""
  sums, counts = inbox.sum()
  return (x + sums) / (1.0 + counts)[..., None], state


def reference_uniform_mean(i: int, own: np.ndarray, received: list, state):
  """uniform_mean, one node, in numpy."""
  total, count = own.astype(np.float32).copy(), np.zeros_like(own)
  for c in received:
    total[c.coords] += c.payload
    count[c.coords] += 1
  return (total / (1.0 + count)).astype(np.float32), state


def whole_model_bits(sizes: np.ndarray) -> np.ndarray:
  """32-bit floats, one per coordinate of the fragment (the message header is added on top)."""
  return sizes * 32


class AsyncAlgorithm(NamedTuple):
  """Attributes:
    name: registry name.
    fragments: F, pieces the model is cut into for routing (1 = whole model).
    messages: M, messages a node enqueues per round (fixed, so the tables are static).
    plan: (key, node, round) -> (dst (M,), frag (M,)) int32, the queue in service order.
    aggregate: (x (N, F, L), inbox: ring.Inbox, state) -> (x, state); x is every node's
      post-training model in fragment layout; only the rows of nodes ending a round are kept.
    reference_aggregate: (i, own (P,), received: list[Received], state_i) -> (own, state_i),
      node i, numpy; state_i is the reference's per-node state (reference_init).
    init: (x0 (N, F, L) initial models, Dims) -> the algorithm's state.
    reference_init: x0 (P,) -> one node's state for the reference.
    reference_message: state_i -> what the reference attaches to node i's messages when it
      sends (Received.info), read after its aggregation at the same round end.
    queue: flush or not.
    replies: None, or how receivers reply (replies need F = 1 and no flush).
    payload_bits: (F,) fragment sizes in floats -> (F,) payload bits of a message.
    snapshot: None (a node sends its post-training model), or what the nodes send instead:
      (x (N, F, L), real (F, L) bool: not padding, key, rounds (N,), ends (N,), state) ->
      (payload (N, F, L), state), from every node's current model in fragment layout at a round
      end, before the aggregation; only the rows of nodes that `ends` are sent, and the state
      may change only there. NaN marks a coordinate not sent (sparsified payloads: receivers
      count copies per coordinate). key is the run's STREAM_SNAPSHOT stream. Wrappers:
      divjax.byzantine, divjax.compression.
    reference_snapshot: the same for node i in numpy: (i, models (N, P), coords (list of each
      fragment's flat coordinates), key, round, state_i) -> (payload (P,), state_i).
    inbox: None, or K: at most K copies per (receiver, fragment) reach one aggregation; the
      rest end as OVERFLOW (a seeded random choice of which, divjax.inbox). Rules that need every
      copy (divjax.robust) read them with `Inbox.gather(K)`.
    received: None, or what each receiver gets instead of the payload its sender stored: a
      different payload per recipient, (payloads (..., L), src, dst, frag, receiver round
      (...), key) -> payloads (..., L), applied where the inbox reads the ring (`sum`,
      `gather`); key is the run's STREAM_RECEIVED stream. Wrappers: divjax.byzantine.
    reference_received: the same for one copy in numpy: (payload (len,), src, dst, frag,
      round, key, width L) -> payload.
    sparse_rule: None, or (aggregate, reference_aggregate): the algorithm's own rule where a
      copy may hold only some coordinates (NaN elsewhere: compressed payloads,
      divjax.compression), for a rule other than the uniform mean (whose per-coordinate
      version divjax.compression has).
    averages_copies: the rule is a weighted average of the own model and the inbox's copies,
      which a robust rule (divjax.robust) may replace; the uniform mean is one without saying.
    copies: None (a robust rule reads the inbox's due copies, Inbox.gather), or the copies the
      algorithm's rule combines instead: (x, inbox, state) -> (values (N, F, K, L), valid
      (N, F, K), state), e.g. stored neighbour copies (swift_original).
    reference_copies: the same for one node: (i, own, received, state_i) -> (list of
      Received, state_i).
    exchanged: None (a node gives its model), or what a node gives in a pairwise exchange
      (original AD-PSGD, divjax.replies.exchange), from the live models: (params (N, P), node,
      partner, the pinger's round, key) -> (P,); key is the run's STREAM_RECEIVED stream.
      Wrappers: divjax.byzantine.
    reference_exchanged: the same in numpy: (models (N, P), node, partner, round, key) -> (P,).
  """
  name: str
  fragments: int
  messages: int
  plan: Callable
  aggregate: Callable = uniform_mean
  reference_aggregate: Callable = reference_uniform_mean
  init: Callable = no_state
  reference_init: Callable = lambda x0: None
  reference_message: Callable = lambda state: None
  queue: QueuePolicy = QueuePolicy()
  replies: Optional[ReplyPolicy] = None
  payload_bits: Callable[[np.ndarray], np.ndarray] = whole_model_bits
  snapshot: Optional[Callable] = None
  reference_snapshot: Optional[Callable] = None
  inbox: Optional[int] = None
  received: Optional[Callable] = None
  reference_received: Optional[Callable] = None
  sparse_rule: Optional[tuple] = None
  averages_copies: bool = False
  copies: Optional[Callable] = None
  reference_copies: Optional[Callable] = None
  exchanged: Optional[Callable] = None
  reference_exchanged: Optional[Callable] = None

  def check(self) -> None:
    if self.replies is not None and (self.queue.flush or self.fragments != 1):
      raise ValueError(f"algorithm {self.name}: replies need whole models (fragments = 1) and no flush")
    if self.inbox is not None and self.replies is not None and self.replies.pairwise:
      raise ValueError(f"aggregation.inbox: algorithm {self.name}'s pairwise exchanges average two models, "
                       f"not an inbox of copies: leave the aggregation section out")


def lift(alg: AsyncAlgorithm, init: Callable, reference_init: Callable) -> AsyncAlgorithm:
  """`alg` with state (its own, a wrapper's): every function that reads the state reads the
  first part, and the second, from init(x0, dims) / reference_init(x0), passes through
  unchanged. A wrapper that keeps state lifts the algorithm, then replaces what it changes."""
  agg, ref_agg, ref_msg, snap, ref_snap = (alg.aggregate, alg.reference_aggregate, alg.reference_message,
                                           alg.snapshot, alg.reference_snapshot)
  cop, ref_cop, sparse = alg.copies, alg.reference_copies, alg.sparse_rule

  def snapshot(x, real, key, rounds, ends, state):
    sent, inner = snap(x, real, key, rounds, ends, state[0])
    return sent, (inner, state[1])

  def reference_snapshot(i, models, coords, key, round_, state):
    sent, inner = ref_snap(i, models, coords, key, round_, state[0])
    return sent, (inner, state[1])

  def copies(x, inbox, state):
    vals, valid, inner = cop(x, inbox, state[0])
    return vals, valid, (inner, state[1])

  def reference_copies(i, own, received, state):
    received, inner = ref_cop(i, own, received, state[0])
    return received, (inner, state[1])

  return alg._replace(
      init=lambda x0, dims: (alg.init(x0, dims), init(x0, dims)),
      reference_init=lambda x0: (alg.reference_init(x0), reference_init(x0)),
      aggregate=lift_rule(agg), reference_aggregate=lift_reference_rule(ref_agg),
      reference_message=lambda state: ref_msg(state[0]),
      snapshot=None if snap is None else snapshot,
      reference_snapshot=None if ref_snap is None else reference_snapshot,
      copies=None if cop is None else copies, reference_copies=None if ref_cop is None else reference_copies,
      sparse_rule=None if sparse is None else (lift_rule(sparse[0]), lift_reference_rule(sparse[1])))


def lift_rule(aggregate):
  """A rule reading the first part of a lifted state (see `lift`)."""
  def lifted(x, inbox, state):
    x, inner = aggregate(x, inbox, state[0])
    return x, (inner, state[1])
  return lifted


def lift_reference_rule(reference_aggregate):
  def lifted(i, own, received, state):
    own, inner = reference_aggregate(i, own, received, state[0])
    return own, (inner, state[1])
  return lifted


class SyncProtocol(NamedTuple):
  """A synchronous algorithm: the mixing of round r, sampled from a key.

  mixing(key, round) -> (src (E,), dst (E,), w (E,), self_w (N,)); an edge with w == 0 carries
  no message. E is static. Server algorithms give `cohort(key, round) -> (C,) int32` sorted
  client ids instead (mixing is then unused).
  """
  name: str
  mixing: Optional[Callable] = None
  cohort: Optional[Callable] = None


class Properties(NamedTuple):
  """What the rest of divjax may know about an algorithm before building it."""
  synchronous: bool = False          # a round engine with barriers (divjax.sync)
  doubly_stochastic: bool = False    # the mixing keeps the network mean every round
  needs_graph: bool = False          # mixes over the `topology` graph
  fixed_graph: bool = False          # ... which must be fixed (not resampled per round)
  default_fragments: int = 1         # `fragments` when the config leaves it out
  uses_fragments: bool = False       # reads `fragments` (else it must stay 1)
  uses_recipients: bool = False      # reads `recipients` (else it must keep its default)
  uses_server: bool = False          # reads the `server` section
