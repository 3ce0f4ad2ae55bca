"""The vectorised engine: all N nodes stepped together, messages routed in simulated time.

Time and event order
--------------------
A tick lasts dt (one local step of a normal-speed node; network.py). Tick t covers simulated
time (t*dt, (t+1)*dt]. Inside a tick, in this order:

  1. every node whose step completes in this tick takes one local SGD step
     (node i steps in ticks with (t+1) % period_i == 0);
  2. messages arriving at time <= (t+1)*dt are in their receivers' buffers;
  3. nodes that completed their H-th step of the round end it, all together:
     a. aggregate: own post-training model + the newest received copy per (sender, fragment);
     b. retire the ring slot of round r - D and write the post-training snapshot of round r
        (physically at the start of the next round end, before anything reads the ring:
        `Fresh`; no read happens in between, so nothing simulated changes);
     c. flush the send queue (if the algorithm flushes) and enqueue the new round's messages.

A node's round ends at tick (r+1)*R_i - 1 with R_i = H * period_i, so every node's schedule is
known in advance (nothing waits for anybody), and round ends can only fall on every H-th tick:
the driver advances in blocks of H ticks whose last tick does the (masked) round-end work.
The reference simulator (divjax.reference) implements the same rules as a plain event loop
and decides what is right.

Messages
--------
Because schedules and link speeds are known, the whole fate of a message is computed when
it is sent, in integer microseconds relative to the send instant:
  completion = queue backlog + cumulative service times (one FIFO per sender, network.py),
  flushed    if the queue is flushed and completion > the sender's round length,
  arrival    = completion + link latency, consumed at the receiver's first round end whose
               time is >= arrival,
  expired    if that round end comes after the sender's round r + D ends (the ring slot
               holding its payload is reused then),
  superseded if a newer copy of the same (sender, fragment) is consumed by the same
               aggregation at the same receiver (counted as delivered, payload unused).
A copy replaced in the receiver's buffer before it is consumed still expires if its payload
slot is reused first. Replies (AD-PSGD pongs) are the one thing decided later: at the end of
each block, for the pings that reached their receiver in it, since they enter the replier's
queue at the ping's arrival instant.
What a round end does with what is due is the algorithm's `aggregate` (algorithms/base.py),
given an Inbox view of the due copies; replies and pairwise exchanges are divjax.replies.
Message records live in fixed-size edge arrays (N, D, M): slot r % D of a node holds its
round-r messages (and the replies to them). Payloads are never copied: at aggregation the receiver gathers
ring[r % D, src, frag] and sums with jax.ops.segment_sum. Every record ends as delivered,
flushed or expired (or is still in flight), and the counts add up (tested).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import churn, clock, fates, queue, replies as replies_lib, ring as ring_lib, rows, xla_cpu
from divjax import fragments as fragments_lib
from divjax import inbox as inbox_lib
from divjax import network as network_lib
from divjax import nodes as nodes_lib
from divjax import sampling
from divjax import timebase as tb
from divjax import versions as versions_lib
from divjax.algorithms.base import AsyncAlgorithm, Dims
from divjax.config import Config

xla_cpu.unroll_threefry()   # the same random bits with fewer small tasks on CPUs (divjax/xla_cpu.py)

FATES = fates.FATES


class Nodes(NamedTuple):
  params: jax.Array         # (N, P) float32, one flat model per node
  opt_state: Any            # optax state, leaves (N, ...)
  steps: jax.Array          # (N,) int32, local steps done
  rounds: jax.Array         # (N,) int32, rounds completed


class Messages(NamedTuple):
  """Records of sent messages: slot r % D of row i holds node i's round-r messages."""
  dst: jax.Array            # (N, D, M) int32
  frag: jax.Array           # (N, D, M) int32
  fate: jax.Array           # (N, D, M) int32, fates.NONE..EXPIRED
  tick: jax.Array           # (N, D, M) int32, tick at which the fate happens
  done: jax.Array           # (N, D, M) int32, upload completion, us after the send instant (saturating)
  slot_tick: jax.Array      # (N, D) int32, tick at which the slot's round ended (send tick)


class Counters(NamedTuple):
  retired: jax.Array        # (5,) int32, fates of records whose slot was reused
  sent: jax.Array           # () int32
  age_sum: jax.Array        # () float32, summed age in ticks of consumed payloads
  age_count: jax.Array      # () int32


class Fresh(NamedTuple):
  """The snapshots taken at the last round end, not yet in the ring (ring.write_fresh)."""
  x: jax.Array              # (N, F, L) in the ring's dtype
  slot: jax.Array           # (N,) int32, the ring slot each goes to; -1: nothing pending


class State(NamedTuple):
  nodes: Nodes
  msgs: Messages
  replies: Optional[replies_lib.Replies]   # None for algorithms without replies
  backlog_us: tb.Wide       # (N,) each, the send queue is busy until then (us after the last block end)
  ring: jax.Array           # (D, N, F, L) float32, post-training snapshot of round r in slot r % D
  alg: Any                  # the algorithm's own state (node axis first)
  counters: Counters
  tick: jax.Array           # () int32, next tick to simulate
  versions: Optional[versions_lib.Versions] = None   # observe.versions (divjax.versions)
  fresh: Optional[Fresh] = None  # snapshots of the last round end, written into the ring at the next

  # what drivers read, the same for every engine
  params = property(lambda s: s.nodes.params)
  steps = property(lambda s: s.nodes.steps)
  rounds = property(lambda s: s.nodes.rounds)
  sent = property(lambda s: s.counters.sent)
  age_sum = property(lambda s: s.counters.age_sum)
  age_count = property(lambda s: s.counters.age_count)

  def with_params(self, params) -> "State":
    return self._replace(nodes=self.nodes._replace(params=params))

  def ring_now(self) -> jax.Array:
    """The ring as the next round end reads it (with the pending snapshots written)."""
    slot = jnp.asarray(self.fresh.slot)
    return ring_lib.write(jnp.asarray(self.ring), slot, jnp.asarray(self.fresh.x), slot >= 0)


class Params(NamedTuple):
  """Everything a chunk reads that does not fix a shape: traced, so changing it does not recompile."""
  key: jax.Array            # the run key (`seed`): initial model, batches, plans
  lr: jax.Array             # () float32
  momentum: jax.Array       # () float32 (its presence, momentum > 0, is static)
  links: network_lib.Links  # per-node transmission times, latencies, compute periods, region caps
  data: Any                 # the task's TrainData
  frag_layout: jax.Array    # (F, L) int32, the fragment partition (`data.seed`): coordinates of each
  frag_position: jax.Array  # (P,) int32, fragment row; and each coordinate's place in the layout
  availability: Optional[churn.Availability] = None   # churn's schedule; None: always online


class Engine(NamedTuple):
  init: Callable[[jax.Array], Any]              # run key -> state
  advance: Callable[..., tuple[Any, dict]]      # (state, params, length) -> (state, metrics)
  params: Callable[..., Params]                 # (cfg, data) -> Params of a config of this structure
  counts: Callable[[Any], dict]                 # message counts of a state: int32 scalars, jittable
  node_axes: Callable[[Any], Any]               # state -> the same tree of node-axis indices (None: none)
  static: str                                   # what fixes the compiled program (a canonical JSON)
  frags: Optional[fragments_lib.Fragments]
  net: network_lib.Network
  depth: int
  round_ticks: np.ndarray                       # (N,) ticks per round
  ring_bytes: int = 0                           # size of the delay ring
  message_bits: float = 0.0                     # mean bits of a message (payload + header) over fragments


# Config keys read only through Params (traced) or by the driver: two configs that differ in
# nothing else share one compiled program.
PARAM_KEYS = ("seed", "lr", "momentum", "network.upload_mbps", "network.download_mbps",
              "network.latency_ms", "network.download_cap", "network.header_bits", "network.stragglers")
DRIVER_KEYS = ("duration_s", "eval_every_s", "target", "checkpoint_every_s", "memory_limit_gb",
               "eval_batch", "data.test_size", "eval")


def static_key(cfg: Config, depth: int) -> str:
  """The part of a config that is baked into the compiled program, as canonical JSON."""
  d = cfg.model_dump()
  for key in PARAM_KEYS + DRIVER_KEYS:
    *path, last = key.split(".")
    node = d
    for p in path:
      node = node[p]
    node.pop(last, None)
  d["momentum>0"] = cfg.momentum > 0
  # the host draws (data.seed) reach the program as Params (data, fragment partition,
  # stragglers), except a random regular graph, which an algorithm closes over
  d["data"]["seed"] = cfg.data_seed if cfg.topology == "regular" else None
  d["ring_depth"] = depth
  return json.dumps(d, sort_keys=True)


def make_params(cfg: Config, data, bits: np.ndarray, net: network_lib.Network,
                frags: Optional[fragments_lib.Fragments] = None) -> Params:
  no_frags = frags is None  # the synchronous engine sends whole models
  return Params(key=jax.random.key(cfg.seed), lr=jnp.float32(cfg.lr), momentum=jnp.float32(cfg.momentum),
                links=network_lib.links(net, bits), data=data,
                frag_layout=jnp.zeros((0, 0), jnp.int32) if no_frags else jnp.asarray(frags.layout),
                frag_position=jnp.zeros((0,), jnp.int32) if no_frags else jnp.asarray(frags.position),
                availability=None if no_frags else churn.make(cfg, cfg.local_steps * net.period, net.dt_us,
                                                              cfg.n_ticks))


def check_static(engine_static: str, cfg: Config, depth: int) -> None:
  """Refuses Params from a config whose structure differs from the engine's, naming the keys."""
  mine, theirs = json.loads(engine_static), json.loads(static_key(cfg, depth))
  diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
  if diff:
    raise ValueError(f"{', '.join(diff)}: differ from the compiled program's; only "
                     f"{', '.join(PARAM_KEYS)} and data.seed (unless topology is regular) may "
                     f"change without building a new engine")


def ring_depth(cfg: Config, alg: AsyncAlgorithm, net: network_lib.Network) -> int:
  """D, in sender rounds. Auto: the smallest depth at which a flushing algorithm loses nothing."""
  if cfg.ring_depth > 0:
    return cfg.ring_depth
  if not alg.queue.flush:
    return 8
  # A flushed-in-time message is consumed by the receiver's first round end after arrival,
  # at most one receiver round (+ latency) after the sender's next round end.
  r = cfg.local_steps * net.period
  lat_ticks = -(-2 * int(net.latency_us.max()) // net.dt_us)
  return int(2 + -(-(int(r.max()) + lat_ticks) // int(r.min())))


def check_horizon(cfg: Config, depth: int, net: network_lib.Network) -> None:
  """Refuses a run whose message horizon does not fit timebase.CAP_US.

  Per-message times are int32 microseconds that saturate at CAP_US; they are exact as long
  as everything a message can still take part in (ring depth + 2 of the slowest rounds, plus
  a latency) lies below it. Raises ValueError naming the key that makes the horizon long.
  """
  round_us = cfg.local_steps * int(net.period.max()) * net.dt_us
  lat_us = int(net.latency_us.max())
  need = (depth + 2) * round_us + lat_us + net.dt_us
  if need <= tb.CAP_US:
    return
  # the first change that would make it fit: no latency (which also sets an automatic depth),
  # then the shallowest ring, else the rounds themselves are too long
  no_lat_depth = depth if cfg.ring_depth else 2 + -(-cfg.local_steps * int(net.period.max()) //
                                                    (cfg.local_steps * int(net.period.min())))
  if (no_lat_depth + 2) * round_us + net.dt_us <= tb.CAP_US:
    key = "network.latency_ms" + (" (it also sets the automatic ring_depth)" if cfg.ring_depth == 0 else "")
  elif cfg.ring_depth > 1 and 3 * round_us + lat_us + net.dt_us <= tb.CAP_US:
    key = "ring_depth"
  else:
    key = ("local_steps / network.compute_s_per_step" +
           (" / network.stragglers.slowdown" if net.period.max() > 1 else ""))
  raise ValueError(
      f"{key}: a message's time horizon, (ring depth {depth} + 2) x the longest round "
      f"{round_us / 1e6:g} s + latency {lat_us / 1e6:g} s, is {need / 1e6:g} s; simulated per-message "
      f"times are int32 microseconds and must stay below {tb.CAP_US / 1e6:g} s: lower it")


class Static(NamedTuple):
  """What fixes the compiled program's shapes and branches (the rest is Params)."""
  n: int                    # nodes
  h: int                    # local steps per round
  f: int                    # fragments
  width: int                # L, padded fragment length
  m: int                    # messages per node and round
  depth: int                # D, ring slots
  dt_us: int                # tick length
  alg: AsyncAlgorithm
  frags: fragments_lib.Fragments
  versions: str = "off"     # observe.versions: off, relay, direct
  ring_dtype: Any = jnp.float32  # the payloads' type in the ring (config ring_dtype)

  @property
  def block_us(self) -> int:   # a block of H ticks
    return self.h * self.dt_us

  @property
  def age_cap(self) -> int:    # ages beyond the horizon (check_horizon) never matter; keeps int32 exact
    return tb.CAP_US // self.dt_us

  @property
  def reply(self) -> bool:
    return self.alg.replies is not None

  @property
  def pairwise(self) -> bool:
    return self.reply and self.alg.replies.pairwise

  def table(self):
    """(rows, slots): the sender and ring slot of every (N, D, M) record."""
    rows = jnp.broadcast_to(jnp.arange(self.n, dtype=jnp.int32)[:, None, None], (self.n, self.depth, self.m))
    slots = jnp.broadcast_to(jnp.arange(self.depth, dtype=jnp.int32)[None, :, None], rows.shape)
    return rows, slots


def init_state(st: Static, sgd: nodes_lib.LocalSGD, x) -> State:
  """Nodes start from the models x (N, P); no message sent yet."""
  n, d, m = st.n, st.depth, st.m
  zi = lambda *s: jnp.zeros(s, jnp.int32)
  return State(
      nodes=Nodes(params=x, opt_state=sgd.init_opt(x), steps=zi(n), rounds=zi(n)),
      msgs=Messages(*(zi(n, d, m) for _ in range(5)), slot_tick=zi(n, d)),
      replies=replies_lib.empty(n, d, m) if st.reply else None,
      backlog_us=tb.wide(zi(n)), ring=jnp.zeros((d, n, st.f, st.width), st.ring_dtype),
      alg=st.alg.init(fragments_lib.to_layout(x, st.frags), Dims(n, st.f, st.width, d)),
      counters=Counters(retired=zi(len(FATES)), sent=zi(), age_sum=jnp.zeros((), jnp.float32),
                        age_count=zi()),
      tick=zi(),
      versions=versions_lib.init(n, d) if st.versions != "off" else None,
      fresh=Fresh(jnp.zeros((n, st.f, st.width), st.ring_dtype), jnp.full((n,), -1, jnp.int32)))


def send(st: Static, s: State, p: Params, ends, acting, busy, k):
  """The new round's messages of the nodes that `ends` a round and are online (`acting`), their
  upload completions and fates (into table slot k; an offline node's slot gets no message),
  superseding older copies; returns (messages, queue backlogs)."""
  t, n, f, lk, msgs = s.tick, st.n, st.f, p.links, s.msgs
  nodes = jnp.arange(n, dtype=jnp.int32)
  dst, frag = jax.vmap(st.alg.plan, in_axes=(None, 0, 0))(
      sampling.stream(p.key, sampling.STREAM_PLAN), nodes, s.nodes.rounds)                   # (N, M)
  round_ticks = st.h * lk.period
  service = network_lib.service(lk, jnp.broadcast_to(nodes[:, None], dst.shape), dst, frag, t // st.h)
  completions = queue.enqueue(busy, service, st.alg.queue.flush)  # exact, however far behind
  completion = tb.narrow(completions)                               # saturating: exact below the horizon
  arrival = completion + (lk.latency_us[nodes][:, None] + lk.latency_us[dst]) // 2
  leave_us = receiver_online = None
  av = p.availability
  if av is not None:  # churn: when the sender leaves, whether the receiver is there
    gone = jnp.minimum(churn.next_offline(av, nodes, s.nodes.rounds) - s.nodes.rounds - 1, st.depth + 2)
    leave_us = gone * round_ticks * st.dt_us
    receiver_online = lambda u: churn.online_in(av, dst, u // round_ticks[dst])
  fate, ftick = fates.at_send(t, completion, arrival, round_ticks, round_ticks[dst], st.depth,
                              st.dt_us, st.alg.queue.flush, leave_us, receiver_online)
  fate = jnp.where(acting[:, None], fate, fates.NONE)   # an offline node sends nothing
  fate_table = msgs.fate
  if not st.reply:  # a newer copy consumed by the same aggregation replaces the older one
    other_slot = jnp.arange(st.depth)[None, :] != k[:, None]                                  # (N, D)
    pending = (msgs.fate == fates.DELIVERED) & (msgs.tick > t) & other_slot[..., None] & acting[:, None, None]
    replaced = fates.supersede(msgs.dst * f + msgs.frag, msgs.tick, pending,
                               dst * f + frag, ftick, fate == fates.DELIVERED)
    fate_table = jnp.where(replaced, fates.SUPERSEDED, fate_table)

  write = lambda table, new: rows.put(table, k, new, ends)
  msgs = Messages(dst=write(msgs.dst, dst), frag=write(msgs.frag, frag), fate=write(fate_table, fate),
                  tick=write(msgs.tick, ftick), done=write(msgs.done, completion),
                  slot_tick=write(msgs.slot_tick, jnp.broadcast_to(t, (n,))))
  backlog = (tb.where(acting, jax.tree.map(lambda x: x[:, -1], completions), busy) if not st.alg.queue.flush
             else tb.wide(jnp.zeros((n,), jnp.int32)))
  if leave_us is not None:  # a node that leaves now drops its queue
    backlog = tb.where(ends & (leave_us == 0), tb.wide(jnp.zeros((n,), jnp.int32)), backlog)
  return msgs, backlog


def due_copies(st: Static, s: State, p: Params, busy):
  """Replies to the pings that arrived in this block, then the copies due at tick s.tick.

  Returns:
    (msgs, replies, busy, replies made, copies to aggregate, copies used (for the ages)).
  """
  t, lk, msgs, rep = s.tick, p.links, s.msgs, s.replies
  rows, slots = st.table()
  made = jnp.zeros((), jnp.int32)
  if st.reply:
    rep, busy, made = replies_lib.make(
        rep, msgs.dst, msgs.fate, msgs.done, msgs.slot_tick, t, busy, lat_us=lk.latency_us,
        round_ticks=st.h * lk.period, service=lambda *a: network_lib.service(lk, *a, block=t // st.h), depth=st.depth,
        dt_us=st.dt_us, block_us=st.block_us, age_cap=st.age_cap, pairwise=st.pairwise,
        availability=p.availability, rounds=s.nodes.rounds)
    fate_table, rep, due, due_rep = replies_lib.newest_only(
        msgs.dst, msgs.fate, msgs.tick, msgs.done, rep, msgs.slot_tick, t, dt_us=st.dt_us,
        age_cap=st.age_cap, pairwise=st.pairwise)
    msgs = msgs._replace(fate=fate_table)
    if st.alg.inbox is not None:  # push-pull: pings and replies share the K places of a fragment
      over, over_rep = inbox_lib.overflow(
          (ring_lib.Copies(due, rows, slots, msgs.dst, msgs.frag, None),
           ring_lib.Copies(due_rep, msgs.dst, rep.slot, rows, jnp.zeros_like(rows), None)),
          s.nodes.rounds, inbox_lib.seed(p.key), st.f, st.alg.inbox)
      msgs = msgs._replace(fate=jnp.where(over, fates.OVERFLOW, msgs.fate))
      rep = rep._replace(fate=jnp.where(over_rep, fates.OVERFLOW, rep.fate))
      due, due_rep = due & ~over, due_rep & ~over_rep
  else:
    due = (msgs.fate == fates.DELIVERED) & (msgs.tick == t)
    if st.alg.inbox is not None:  # at most K copies per (receiver, fragment): the rest overflow
      over = inbox_lib.overflow(ring_lib.Copies(due, rows, slots, msgs.dst, msgs.frag, None), s.nodes.rounds,
                                inbox_lib.seed(p.key), st.f, st.alg.inbox)
      msgs = msgs._replace(fate=jnp.where(over, fates.OVERFLOW, msgs.fate))
      due = due & ~over
  age = jnp.broadcast_to((t - msgs.slot_tick)[..., None], rows.shape)
  pushes = ring_lib.Copies(due, rows, slots, msgs.dst, msgs.frag, age)
  if st.pairwise:  # the pings carry nothing to average; the replies complete exchanges
    return msgs, rep, busy, made, (), (pushes._replace(due=due_rep),)
  if st.reply:     # push-pull: the replies are averaged like any copy
    pulls = ring_lib.Copies(due_rep, msgs.dst, rep.slot, rows, jnp.zeros_like(rows), t - rep.made)
    return msgs, rep, busy, made, (pushes, pulls), (pushes, pulls)
  return msgs, rep, busy, made, (pushes,), (pushes,)


def wrapper_hooks(st: Static, s: State, p: Params, x_own, acting):
  """What wrappers change at a round end (algorithms/base.py): the payloads the nodes send
  (`snapshot`, with the algorithm's state) and what each recipient reads (`received`).

  Returns:
    (payloads (N, F, L), the algorithm's state, a received function for the Inbox or None).
  """
  sent, alg_state = x_own, s.alg
  real = jnp.arange(st.width)[None, :] < jnp.asarray(st.frags.sizes)[:, None]               # (F, L)
  if st.alg.snapshot is not None:
    sent, alg_state = st.alg.snapshot(x_own, real, sampling.stream(p.key, sampling.STREAM_SNAPSHOT),
                                      s.nodes.rounds, acting, alg_state)
  received = None
  if st.alg.received is not None:
    k_recv = sampling.stream(p.key, sampling.STREAM_RECEIVED)
    # padding stays 0 whatever a wrapper adds: a copy's norm (clipping rules) reads every entry
    received = lambda got, src, dst, frag: jnp.where(
        real[frag], st.alg.received(got, src, dst, frag, s.nodes.rounds[dst], k_recv), 0.0)
  return sent, alg_state, received


def end_rounds(st: Static, s: State, p: Params, ends) -> State:
  """The round-end tick of a block: replies, aggregation, snapshots, new messages. Nodes that
  `ends` a round slot offline (divjax.churn) only retire their oldest table slot."""
  t, nodes = s.tick, jnp.arange(st.n)
  acting = ends if p.availability is None else ends & churn.online_in(p.availability, nodes, s.nodes.rounds)
  # The last round end's snapshots go into the ring first, before anything reads it: written
  # after the reads (at their own round end), the in-place update made XLA copy the whole
  # ring twice per round end (the reads sit in loops and conditionals), most of the round
  # end's time (BENCHMARKS.md, "Where the round end's time goes"). Nothing reads the ring in
  # between, so every round end sees what it saw before.
  s = s._replace(ring=s.ring_now())
  frags = st.frags._replace(layout=p.frag_layout, position=p.frag_position)   # sizes are static
  x_own = fragments_lib.to_layout(s.nodes.params, frags)                                      # (N, F, L)
  # relative to the end of tick t (an idle queue: -block_us, where replies can still start)
  busy = tb.maximum(tb.sub_narrow(s.backlog_us, st.block_us), tb.wide(jnp.full((st.n,), -st.block_us)))

  # a. what is due now (only receivers ending a round have due records)
  msgs, rep, busy, made, copies, used = due_copies(st, s, p, busy)

  # b. aggregate (the algorithm's rule); pairwise exchanges first change both partners
  params = s.nodes.params
  if st.pairwise:
    params = replies_lib.exchange(params, msgs.dst, rep, msgs.slot_tick, t, used[0].due,
                                  lat_us=p.links.latency_us, dt_us=st.dt_us, age_cap=st.age_cap,
                                  exchanged=st.alg.exchanged, rounds=s.nodes.rounds,
                                  key=sampling.stream(p.key, sampling.STREAM_RECEIVED))
  x = x_own if not st.pairwise else fragments_lib.to_layout(params, frags)
  k = s.nodes.rounds % st.depth                                                               # (N,)
  sent, alg_state, received = wrapper_hooks(st, s, p, x_own, acting)
  mixed, alg_state = st.alg.aggregate(x, ring_lib.Inbox(s.ring, copies, acting, k, received), alg_state)
  params = jnp.where(acting[:, None], fragments_lib.from_layout(mixed, frags), params)
  vers = s.versions
  if vers is not None:  # the observer sees exactly the copies just aggregated
    vers = versions_lib.round_end(vers, acting, s.nodes.rounds, k, copies, relay=st.versions == "relay")

  # c. retire slot r % D (its records are all final by now); the snapshot goes into it at the
  # next round end
  old = rows.take(msgs.fate, k) if rep is None else jnp.concatenate([rows.take(msgs.fate, k), rows.take(rep.fate, k)], axis=1)
  fresh = Fresh(sent.astype(s.ring.dtype), jnp.where(acting, k, -1).astype(jnp.int32))

  # d. the new round's messages and their fates
  new_msgs, backlog = send(st, s._replace(msgs=msgs), p, ends, acting, busy, k)
  if rep is not None:  # a new round's pings have no replies yet
    rep = rep._replace(fate=rows.put(rep.fate, k, jnp.zeros((st.n, st.m), rep.fate.dtype), ends))
  c = s.counters
  counters = Counters(retired=fates.retire(c.retired, old, ends),
                      sent=c.sent + made + st.m * jnp.sum(acting, dtype=jnp.int32),
                      age_sum=c.age_sum + sum(jnp.sum(jnp.where(u.due, u.age, 0)) for u in used).astype(jnp.float32),
                      age_count=c.age_count + sum(jnp.sum(u.due, dtype=jnp.int32) for u in used))
  return s._replace(nodes=s.nodes._replace(params=params, rounds=s.nodes.rounds + ends),
                    msgs=new_msgs, replies=rep, backlog_us=backlog, fresh=fresh, alg=alg_state,
                    counters=counters, versions=vers)


def local_tick(st: Static, sgd: nodes_lib.LocalSGD, s: State, p: Params):
  """The local steps of one tick (events 1 of the module docstring)."""
  t = s.tick
  active = clock.steps_now(t, p.links.period)
  if p.availability is not None:  # an offline node does not train
    active = active & churn.online_in(p.availability, jnp.arange(st.n), s.nodes.rounds)
  x, opt_state, steps, losses = sgd.step(s.nodes.params, s.nodes.opt_state, s.nodes.steps,
                                        p.data, p.key, p.lr, p.momentum, active)
  s = s._replace(nodes=s.nodes._replace(params=x, opt_state=opt_state, steps=steps), tick=t + 1)
  # per-node losses, averaged over nodes once per chunk (`advance`): a sum over nodes here
  # would be a collective every tick with `devices` > 1, making the devices wait for each other
  return s, (jnp.where(active, losses, 0.0), active)


def round_end(st: Static, s: State, p: Params) -> State:
  """Events 2-3 of the tick just simulated. Round ends can only fall on ticks t with
  (t+1) % H == 0 (every R_i is a multiple of H), so this runs after every H-th tick,
  masked by which nodes actually end a round: no per-tick branch."""
  t = s.tick - 1
  ends = clock.round_ends(t, p.links.period, st.h)
  return end_rounds(st, s._replace(tick=t), p, ends)._replace(tick=t + 1)


def advance(st: Static, sgd: nodes_lib.LocalSGD, communicate: bool, s: State, p: Params, length: int):
  """Simulates `length` ticks (static) from a tick that is a multiple of H.

  The local step is traced once, as the body of the scan over a block's H ticks (and, if
  `length` is not a multiple of H, once more for the remaining ticks): compile time grows
  with every copy of an unrolled model.

  Returns:
    (state, metrics) with metrics["train_loss"] of shape (length,).
  """
  local = lambda s, _: local_tick(st, sgd, s, p)

  def block(s, _):  # H ticks, the last of which may end rounds
    s, losses = jax.lax.scan(local, s, None, length=st.h)
    return (round_end(st, s, p) if communicate else s), losses

  n_blocks, rest = divmod(length, st.h)
  s, losses = jax.lax.scan(block, s, None, length=n_blocks)
  losses = jax.tree.map(lambda a: a.reshape((-1, st.n)), losses)                             # (ticks, N)
  if rest:
    s, tail = jax.lax.scan(local, s, None, length=rest)
    losses = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), losses, tail)
  losses, active = losses
  mean = jnp.sum(losses, axis=1) / jnp.maximum(jnp.sum(active, axis=1), 1)                   # (length,)
  return s, {"train_loss": mean}


def make(cfg: Config, task, alg: AsyncAlgorithm, *, communicate: bool = True) -> Engine:
  """The engine of one run's structure: Static from the config, composed stages.

  `communicate=False` leaves out round ends entirely (local training only): the baseline
  against which the simulation's overhead is measured (benchmarks/overhead.py).
  """
  alg.check()
  net = network_lib.build(cfg)
  frags = fragments_lib.partition(task.tensor_sizes, alg.fragments, cfg.data_seed)
  d = ring_depth(cfg, alg, net)
  check_horizon(cfg, d, net)
  st = Static(n=cfg.n_nodes, h=cfg.local_steps, f=frags.n, width=frags.width, m=alg.messages,
              depth=d, dt_us=net.dt_us, alg=alg, frags=frags, versions=cfg.observe.versions,
              ring_dtype=jnp.dtype(cfg.ring_dtype))
  sgd = nodes_lib.make(cfg, task)
  static = static_key(cfg, d)

  def params(cfg_p: Config, data) -> Params:
    net_p = network_lib.build(cfg_p)
    check_static(static, cfg_p, ring_depth(cfg_p, alg, net_p))
    check_horizon(cfg_p, d, net_p)
    frags_p = fragments_lib.partition(task.tensor_sizes, alg.fragments, cfg_p.data_seed)
    return make_params(cfg_p, data, alg.payload_bits(frags.sizes) + cfg_p.network.header_bits, net_p, frags_p)

  return Engine(
      init=lambda run_key: init_state(st, sgd, task.initial_models(run_key, st.n, cfg.init.spread)),
      advance=functools.partial(advance, st, sgd, communicate), params=params, counts=device_counts,
      node_axes=node_axes, static=static, frags=frags, net=net, depth=d,
      round_ticks=(cfg.local_steps * net.period).astype(np.int64), ring_bytes=(d + 1) * st.n * st.f * st.width * st.ring_dtype.itemsize,
      message_bits=float(np.mean(alg.payload_bits(frags.sizes) + cfg.network.header_bits)))


def node_axes(state: State):
  """Which axis of each state leaf is the node axis (None: not split over devices).

  The ring (D, N, F, L) and the counters are replicated: routing gathers from every sender.
  """
  zero = lambda tree: jax.tree.map(lambda _: 0, tree)
  none = lambda tree: jax.tree.map(lambda _: None, tree)
  return State(nodes=zero(state.nodes), msgs=zero(state.msgs), replies=zero(state.replies),
               backlog_us=zero(state.backlog_us), ring=None, alg=zero(state.alg),
               counters=none(state.counters), tick=None, versions=none(state.versions),
               fresh=zero(state.fresh))


def device_counts(state: State) -> dict:
  """Cumulative message fates as of the last simulated tick: int32 device scalars (jittable)."""
  fate, tick = state.msgs.fate.reshape(-1), state.msgs.tick.reshape(-1)
  if state.replies is not None:
    fate = jnp.concatenate([fate, state.replies.fate.reshape(-1)])
    tick = jnp.concatenate([tick, state.replies.tick.reshape(-1)])
  return fates.counts(fate, tick, state.counters.retired, state.counters.sent, state.tick)


_device_counts = jax.jit(device_counts)


def message_counts(state: State) -> dict:
  """device_counts as host ints."""
  return fates.to_host(_device_counts(state))
