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
     b. retire the ring slot of round r - D and write the post-training snapshot of round r;
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
Two algorithm properties change what a round end does with what is due (algorithms/base.py):
`neighbours` (original SWIFT) keeps a stored copy per fixed neighbour, replaced by what is
due and averaged with weights 1/(K+1); `pairwise` (original AD-PSGD) averages nothing at
round ends but applies, one after the other, the atomic pairwise averages of the exchanges
whose reply is due, changing the replier's model as well.
Message records live in fixed-size edge arrays (N, D, M): slot r % D of a node holds its
round-r messages (and the replies to them). Payloads are never copied: at aggregation the receiver gathers
ring[r % D, src, frag] and sums with jax.ops.segment_sum. Every record ends as delivered,
flushed or expired (or is still in flight), and the counts add up (tested).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from divjax import fragments as fragments_lib
from divjax import network as network_lib
from divjax import nodes as nodes_lib
from divjax import sampling
from divjax import timebase as tb
from divjax.algorithms.base import Protocol
from divjax.config import Config

NONE, DELIVERED, SUPERSEDED, FLUSHED, EXPIRED = 0, 1, 2, 3, 4
FATES = ("none", "delivered", "superseded", "flushed", "expired")


class EngineState(NamedTuple):
  params: jax.Array         # (N, P) float32, one flat model per node
  opt_state: Any            # optax state, leaves (N, ...)
  steps: jax.Array          # (N,) int32, local steps done
  rounds: jax.Array         # (N,) int32, rounds completed
  ring: jax.Array           # (D, N, F, L) float32, post-training snapshot of round r in slot r % D
  msg_dst: jax.Array        # (N, D, M) int32
  msg_frag: jax.Array       # (N, D, M) int32
  msg_fate: jax.Array       # (N, D, M) int32, one of NONE..EXPIRED
  msg_tick: jax.Array       # (N, D, M) int32, tick at which the fate happens
  msg_done: jax.Array       # (N, D, M) int32, upload completion, us after the send instant (saturating)
  slot_tick: jax.Array      # (N, D) int32, tick at which the slot's round ended (send tick)
  backlog_us: tb.Wide       # (N,) each, the send queue is busy until then (us after the last block end)
  # Replies (AD-PSGD pongs) to the ping in the same (N, D, M) position, sent by the ping's
  # receiver to this row's node; size 0 along M for algorithms without replies.
  pong_fate: jax.Array      # (N, D, Mr) int32
  pong_tick: jax.Array      # (N, D, Mr) int32
  pong_slot: jax.Array      # (N, D, Mr) int32, ring slot of the replier's snapshot
  pong_done: jax.Array      # (N, D, Mr) int32, upload completion, us after the ping's send instant
  pong_made: jax.Array      # (N, D, Mr) int32, tick at which the replier's snapshot was taken
  # Stored neighbour copies (original SWIFT): (N, K, L), the newest model received from each
  # of a node's K neighbours; size 0 along K for the other algorithms.
  store: jax.Array
  retired: jax.Array        # (5,) int32, fates of records whose slot was reused
  sent: jax.Array           # () int32
  age_sum: jax.Array        # () float32, summed age in ticks of consumed payloads
  age_count: jax.Array      # () int32
  tick: jax.Array           # () int32, next tick to simulate


class Hyper(NamedTuple):
  """Traced inputs of a chunk: sweeping them does not recompile."""
  lr: jax.Array
  data: Any    # the task's TrainData: an argument, not a constant baked into the program


class Engine(NamedTuple):
  init: Callable[[jax.Array], EngineState]
  advance: Callable[..., tuple[EngineState, dict]]  # (state, run_key, hyper, length) -> (state, metrics)
  frags: fragments_lib.Fragments
  net: network_lib.Network
  depth: int
  round_ticks: np.ndarray   # (N,) ticks per round


def ring_depth(cfg: Config, protocol: Protocol, net: network_lib.Network) -> int:
  """D, in sender rounds. Auto: the smallest depth at which a flushing algorithm loses nothing."""
  if cfg.ring_depth > 0:
    return cfg.ring_depth
  if not protocol.flush:
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


def make(cfg: Config, task, protocol: Protocol, *, communicate: bool = True) -> Engine:
  """Builds the pure `init` and `tick` functions of one run (closing over static config).

  `communicate=False` leaves out round ends entirely (local training only): the baseline
  against which the simulation's overhead is measured (benchmarks/overhead.py).
  Synchronous algorithms (a SyncProtocol) get the round engine of divjax.sync instead.
  """
  from divjax import sync
  if isinstance(protocol, sync.SyncProtocol):
    return sync.make(cfg, task, protocol)
  n, h = cfg.n_nodes, cfg.local_steps
  net = network_lib.build(cfg)
  frags = fragments_lib.partition(task.tensor_sizes, protocol.fragments, cfg.seed)
  f, width, m = frags.n, frags.width, protocol.messages
  d = ring_depth(cfg, protocol, net)
  check_horizon(cfg, d, net)
  dt_us = net.dt_us

  bits = frags.sizes * 32 + cfg.network.header_bits
  service_of = network_lib.service_fn(net, bits)                        # (src, dst, frag) -> us
  lat_us = jnp.asarray(net.latency_us, jnp.int32)
  period = jnp.asarray(net.period, jnp.int32)
  round_ticks_np = (h * net.period).astype(np.int64)
  round_ticks = jnp.asarray(round_ticks_np, jnp.int32)
  round_us = round_ticks * dt_us
  nodes = jnp.arange(n, dtype=jnp.int32)
  sgd = nodes_lib.make(cfg, task)
  if protocol.reply and (protocol.flush or f != 1):
    raise ValueError(f"algorithm {protocol.name}: replies need whole models (fragments = 1) and no flush")
  mr = m if protocol.reply else 0
  pairwise = protocol.pairwise
  if pairwise and not protocol.reply:
    raise ValueError(f"algorithm {protocol.name}: pairwise exchanges need reply=True")
  stored = protocol.neighbours is not None
  if stored:
    if f != 1 or protocol.reply:
      raise ValueError(f"algorithm {protocol.name}: stored neighbour copies need whole models, no replies")
    nb = np.asarray(protocol.neighbours, np.int32)                                          # (N, K)
    nbrs = jnp.asarray(nb)
    # the message of neighbour s = nb[i, k] that goes to i is s's message number fwd[i, k]
    fwd = jnp.asarray(np.argmax(nb[nb] == np.arange(n)[:, None, None], axis=2).astype(np.int32))
  n_store = nb.shape[1] if stored else 0
  rows = jnp.broadcast_to(nodes[:, None, None], (n, d, m))
  slots = jnp.broadcast_to(jnp.arange(d, dtype=jnp.int32)[None, :, None], (n, d, m))
  block_us = h * dt_us
  age_cap = tb.CAP_US // dt_us  # ages beyond the horizon (check_horizon) never matter; keeps int32 exact

  def init(run_key) -> EngineState:
    p0 = task.init_flat(sampling.stream(run_key, sampling.STREAM_INIT))
    params = jnp.tile(p0[None, :], (n, 1))  # all nodes start from the same model
    opt_state = sgd.init_opt(params)
    zi = lambda *s: jnp.zeros(s, jnp.int32)
    return EngineState(
        params=params, opt_state=opt_state, steps=zi(n), rounds=zi(n),
        ring=jnp.zeros((d, n, f, width), jnp.float32),
        msg_dst=zi(n, d, m), msg_frag=zi(n, d, m), msg_fate=zi(n, d, m), msg_tick=zi(n, d, m),
        msg_done=zi(n, d, m), slot_tick=zi(n, d), backlog_us=tb.wide(zi(n)),
        pong_fate=zi(n, d, mr), pong_tick=zi(n, d, mr), pong_slot=zi(n, d, mr),
        pong_done=zi(n, d, mr), pong_made=zi(n, d, mr),
        store=jnp.broadcast_to(fragments_lib.to_layout(p0[None], frags)[0, 0], (n, n_store, width)), retired=zi(len(FATES)), sent=zi(),
        age_sum=jnp.zeros((), jnp.float32), age_count=zi(), tick=zi())

  def local_step(state: EngineState, run_key, hyper: Hyper, active):
    params, opt_state, steps, losses = sgd.step(state.params, state.opt_state, state.steps,
                                                hyper.data, run_key, hyper.lr, active)
    return state._replace(params=params, opt_state=opt_state, steps=steps), losses

  # Message records are routed one table slot at a time (split further so that a step gathers
  # at most about 4M payload floats), and a step with nothing due is skipped: at a round end
  # almost everything due comes from the newest slot.
  cols_per_step = int(max(1, min(m, (1 << 22) // max(1, n * width))))
  steps_per_slot = -(-m // cols_per_step)

  def route(ring, due, src, slot, dst, frag):
    """Sums due payloads ring[slot, src, frag] into receivers dst: gather + segment_sum.

    Returns:
      sums (N, F, L) and counts (N, F) of the payloads due now.
    """
    pad = steps_per_slot * cols_per_step - m

    def cols(a):  # (N, D, M) -> (D * steps_per_slot, C, N); padding columns are never due
      a = jnp.pad(a.transpose(1, 2, 0), ((0, 0), (0, pad), (0, 0)))
      return a.reshape(d * steps_per_slot, cols_per_step, n)

    def add(acc, slot_c, src_c, dst_c, frag_c, due_c):
      payload = jnp.where(due_c[..., None], ring[slot_c, src_c, frag_c], 0.0)               # (C, N, L)
      seg = (dst_c * f + frag_c).reshape(-1)
      s = acc[0] + jax.ops.segment_sum(payload.reshape(-1, width), seg, num_segments=n * f)
      c = acc[1] + jax.ops.segment_sum(due_c.reshape(-1).astype(jnp.float32), seg, num_segments=n * f)
      return s, c

    def body(acc, col):
      slot_c, src_c, dst_c, frag_c, due_c = col
      acc = jax.lax.cond(jnp.any(due_c), lambda a: add(a, slot_c, src_c, dst_c, frag_c, due_c),
                         lambda a: a, acc)
      return acc, None

    acc0 = (jnp.zeros((n * f, width), jnp.float32), jnp.zeros((n * f,), jnp.float32))
    (sums, counts), _ = jax.lax.scan(
        body, acc0, (cols(slot), cols(src), cols(dst), cols(frag), cols(due)))
    return sums.reshape(n, f, width), counts.reshape(n, f)

  def consume_tick(t, arrival_now, r_dst):
    """Tick of the receiver's first round end at or after an arrival (us after the end of tick t)."""
    u = t + -(-arrival_now // dt_us)          # the tick during which it arrives
    return (-(-(u + 1) // r_dst)) * r_dst - 1

  def since_send_us(state, t):
    """(N, D, 1) microseconds from each slot's send instant to the end of tick t."""
    return (jnp.minimum(t - state.slot_tick, age_cap) * dt_us)[..., None]

  def make_pongs(state: EngineState, t, busy):
    """Replies to the pings that reached their receiver during this block of H ticks.

    A pong is enqueued at its ping's arrival instant in the replier's FIFO queue, so the
    replies of one node are served in arrival order (a segmented max-plus scan:
    done_k = max(done_{k-1}, arrive_k) + service_k), all before the node's own next pings.
    """
    j = state.msg_dst                                                                       # replier
    lat = (lat_us[rows] + lat_us[j]) // 2
    arrive = state.msg_done + lat - since_send_us(state, t)                # us after end of tick t
    in_block = (state.msg_fate != NONE) & (arrive > -block_us) & (arrive <= 0)
    in_block &= (state.msg_done + lat) <= (d * round_us)[:, None, None]    # arrived before it expired
    # rounds the replier finished strictly before the arrival instant
    r_j = round_ticks[j]
    base = (t + 1) // r_j
    finished = jnp.where(base >= 1, base - 1 + ((base * r_j - t - 1) * dt_us < arrive), 0)
    make = in_block if pairwise else in_block & (finished >= 1)
    latest = finished - 1
    service = tb.where(make, service_of(j, rows, jnp.zeros_like(j)), tb.wide(jnp.zeros_like(j)))
    enqueue = jnp.where(make, arrive, -block_us)

    # serve each replier's pongs in arrival order (ties as the reference: completion, sender)
    flat = lambda a: a.reshape(-1)
    done_ping_now = flat(state.msg_done - since_send_us(state, t))
    order = jnp.lexsort((flat(rows), done_ping_now, flat(enqueue), flat(jnp.where(make, j, n))))
    jj = flat(j)[order]
    a_, b_ = tb.wide(flat(enqueue)[order]), jax.tree.map(lambda x: flat(x)[order], service)
    first = jnp.concatenate([jnp.array([True]), jj[1:] != jj[:-1]])
    a_ = tb.where(first, tb.maximum(a_, tb.gather(busy, jnp.minimum(jj, n - 1))), a_)

    def combine(x, y):  # (a, b, start): f(c) = max(c, a) + b, composed left to right
      (a1, b1, s1), (a2, b2, s2) = x, y
      return (tb.where(s2, a2, tb.maximum(a1, tb.sub(a2, b1))), tb.where(s2, b2, tb.add(b1, b2)), s1 | s2)

    ca, cb, _ = jax.lax.associative_scan(combine, (a_, b_, first))
    done_sorted = tb.add(ca, cb)
    done = jax.tree.map(lambda x: jnp.zeros_like(x).at[order].set(x).reshape(n, d, m), done_sorted)
    busy = tb.segment_max(jax.tree.map(flat, done), flat(make), flat(j), n, busy)
    done = tb.narrow(done)                       # us after end of tick t, saturating (too late)

    # arrival at the pinger; any arrival past the ring horizon expires alike (keeps ticks int32)
    back = jnp.minimum(done + lat, (d * round_us + dt_us)[rows])
    consume = consume_tick(t, back, round_ticks[rows])
    # the record lives in the ping's table slot; a push-pull reply's payload also in the replier's ring
    expire = jnp.broadcast_to((state.slot_tick + d * round_ticks[:, None])[..., None], make.shape)
    if not pairwise:
      expire = jnp.minimum((latest + d + 1) * r_j - 1, expire)
    fate = jnp.where(consume > expire, EXPIRED, DELIVERED)
    keep = lambda new, old: jnp.where(make, new, old)
    state = state._replace(
        pong_fate=keep(fate, state.pong_fate),
        pong_tick=keep(jnp.where(fate == EXPIRED, expire, consume), state.pong_tick),
        pong_slot=keep(latest % d, state.pong_slot),
        pong_done=keep(jnp.minimum(done + since_send_us(state, t), tb.CAP_US), state.pong_done),
        pong_made=keep((latest + 1) * r_j - 1, state.pong_made),
        sent=state.sent + jnp.sum(make, dtype=jnp.int32))
    return state, busy

  def newest_only(state: EngineState, t):
    """Marks copies replaced by a later arrival from the same sender at the same receiver.

    Pings and pongs of one sender share its FIFO queue, so the later arrival is the later
    upload completion. Returns the due masks of pings and pongs still to be averaged.
    """
    due_ping = (state.msg_fate == DELIVERED) & (state.msg_tick == t)
    due_pong = (state.pong_fate == DELIVERED) & (state.pong_tick == t)
    since = since_send_us(state, t)
    # the replies of pairwise exchanges are not averaged at round ends, so never replaced
    pong_recv = jnp.full_like(rows, n) if pairwise else jnp.where(due_pong, rows, n)
    recv = jnp.concatenate([jnp.where(due_ping, state.msg_dst, n).reshape(-1), pong_recv.reshape(-1)])
    sender = jnp.concatenate([rows.reshape(-1), state.msg_dst.reshape(-1)])
    done = jnp.concatenate([(state.msg_done - since).reshape(-1), (state.pong_done - since).reshape(-1)])
    order = jnp.lexsort((done, sender, recv))
    r_s, s_s = recv[order], sender[order]
    replaced_sorted = (r_s[:-1] < n) & (r_s[1:] == r_s[:-1]) & (s_s[1:] == s_s[:-1])
    replaced = jnp.zeros_like(recv, bool).at[order[:-1]].set(replaced_sorted)
    rep_ping, rep_pong = replaced[: n * d * m].reshape(n, d, m), replaced[n * d * m:].reshape(n, d, m)
    state = state._replace(msg_fate=jnp.where(rep_ping, SUPERSEDED, state.msg_fate),
                           pong_fate=jnp.where(rep_pong, SUPERSEDED, state.pong_fate))
    return state, due_ping & ~rep_ping, due_pong & ~rep_pong

  def exchange(params, state: EngineState, t, due_pong):
    """Atomic pairwise averages (original AD-PSGD) of the exchanges completed now, one after
    the other, by pinger, then reply arrival (as the reference processes them)."""
    since = since_send_us(state, t)
    lat = (lat_us[rows] + lat_us[state.msg_dst]) // 2
    flat = lambda a: a.reshape(-1)
    done = flat(state.pong_done - since)
    due = flat(due_pong)
    order = jnp.lexsort((flat(state.msg_dst), done, done + flat(lat), flat(rows), ~due))  # due first
    pinger, replier = flat(rows)[order], flat(state.msg_dst)[order]

    def one(k, p):  # two rows updated in place: O(P) per exchange
      a, b = pinger[k], replier[k]
      mean = (p[a] + p[b]) / 2.0
      return p.at[a].set(mean).at[b].set(mean)

    return jax.lax.fori_loop(0, jnp.sum(due), one, params)

  def refresh_store(store, ring, due):
    """Stored neighbour copies (original SWIFT): the newest model consumed from each neighbour."""
    # at most one due record per (sender, receiver): newer copies supersede older ones
    due_nk = due[nbrs, :, fwd]                                                           # (N, K, D)
    slot = jnp.argmax(due_nk, axis=-1)
    return jnp.where(due_nk.any(-1)[..., None], ring[slot, nbrs, 0], store)

  def end_rounds(state: EngineState, run_key, ends):
    """The round-end tick of a block: replies, aggregation, snapshots, new messages."""
    t = state.tick
    xl = fragments_lib.to_layout(state.params, frags)                                      # (N, F, L)
    # relative to the end of tick t (an idle queue: -block_us, where replies can still start)
    busy = tb.maximum(tb.sub_narrow(state.backlog_us, block_us), tb.wide(jnp.full((n,), -block_us)))

    # a. replies to pings that arrived in this block, then aggregate what is due now
    #    (only receivers ending a round have due records)
    if protocol.reply:
      state, busy = make_pongs(state, t, busy)
      state, due, due_pong = newest_only(state, t)
    else:
      due = (state.msg_fate == DELIVERED) & (state.msg_tick == t)
    store = state.store
    if pairwise:  # the replies complete exchanges; the pings themselves carry nothing to average
      params = exchange(state.params, state, t, due_pong)
      ages = jnp.sum(jnp.where(due_pong, (t - state.slot_tick)[..., None], 0))
      n_used = jnp.sum(due_pong, dtype=jnp.int32)
    else:
      ages = jnp.sum(jnp.where(due, (t - state.slot_tick)[..., None], 0))
      n_used = jnp.sum(due, dtype=jnp.int32)
      if stored:
        store = refresh_store(store, state.ring, due)
        mixed = (xl[:, 0] + store.sum(axis=1)) / (1.0 + n_store)
        mixed = mixed[:, None]
      else:
        sums, counts = route(state.ring, due, rows, slots, state.msg_dst, state.msg_frag)
        if protocol.reply:
          s2, c2 = route(state.ring, due_pong, state.msg_dst, state.pong_slot, rows, jnp.zeros_like(rows))
          sums, counts = sums + s2, counts + c2
          ages += jnp.sum(jnp.where(due_pong, t - state.pong_made, 0))
          n_used += jnp.sum(due_pong, dtype=jnp.int32)
        mixed = (xl + sums) / (1.0 + counts)[..., None]
      params = jnp.where(ends[:, None], fragments_lib.from_layout(mixed, frags), state.params)

    # b. retire slot r % D (its records are all final by now) and write the snapshot
    k = state.rounds % d                                                                     # (N,)
    old = jnp.concatenate([state.msg_fate[nodes, k], state.pong_fate[nodes, k]], axis=1)
    retired = state.retired + jnp.sum(
        jax.nn.one_hot(old, len(FATES), dtype=jnp.int32) * ends[:, None, None], axis=(0, 1))
    ring = state.ring.at[k, nodes].set(jnp.where(ends[:, None, None], xl, state.ring[k, nodes]))

    # c. the new round's messages and their fates
    dst, frag = jax.vmap(protocol.plan, in_axes=(None, 0, 0))(
        sampling.stream(run_key, sampling.STREAM_PLAN), nodes, state.rounds)                 # (N, M)
    service = service_of(jnp.broadcast_to(nodes[:, None], dst.shape), dst, frag)
    idle = tb.wide(jnp.zeros((n, 1), jnp.int32))
    start = idle if protocol.flush else tb.maximum(jax.tree.map(lambda x: x[:, None], busy), idle)
    queue = tb.add(start, tb.cumsum(service, axis=1))              # exact, however far behind
    completion = tb.narrow(queue)                                   # saturating: exact below the horizon
    arrival = completion + (lat_us[nodes][:, None] + lat_us[dst]) // 2
    expire = t + d * round_ticks                                                            # (N,)
    # arrivals past the expiry are all alike: capping keeps the tick arithmetic in int32
    arrival = jnp.minimum(arrival, (d * round_us + dt_us)[:, None])
    consume = consume_tick(t, arrival, round_ticks[dst])
    flushed = (completion > round_us[:, None]) if protocol.flush else jnp.zeros_like(completion, bool)
    expired = ~flushed & (consume > expire[:, None])
    fate = jnp.where(flushed, FLUSHED, jnp.where(expired, EXPIRED, DELIVERED))
    ftick = jnp.where(flushed, (t + round_ticks)[:, None], jnp.where(expired, expire[:, None], consume))

    # d. a newer copy consumed by the same aggregation replaces the older one (for replies,
    #    newest_only above does this at consumption)
    msg_fate = state.msg_fate
    if not protocol.reply:
      other_slot = jnp.arange(d)[None, :] != k[:, None]                                      # (N, D)
      pending = (msg_fate == DELIVERED) & (state.msg_tick > t) & other_slot[..., None] & ends[:, None, None]
      # one (dst, frag, tick) key per record; scanning over the M new records keeps every
      # comparison a fused (N, D, M) pass instead of an (N, D, M, M) array
      old_key = state.msg_dst * f + state.msg_frag

      def match(hit, new):
        key, tick_, live = new                                                                # (N,) each
        return hit | ((old_key == key[:, None, None]) & (state.msg_tick == tick_[:, None, None])
                      & live[:, None, None]), None

      hit, _ = jax.lax.scan(match, jnp.zeros_like(pending),
                            ((dst * f + frag).T, ftick.T, (fate == DELIVERED).T))
      replaced = hit & pending
      msg_fate = jnp.where(replaced, SUPERSEDED, msg_fate)

    def write(table, new):
      return table.at[nodes, k].set(jnp.where(ends[:, None], new, table[nodes, k]))

    return state._replace(
        params=params, ring=ring, retired=retired, store=store,
        msg_dst=write(state.msg_dst, dst), msg_frag=write(state.msg_frag, frag),
        msg_fate=write(msg_fate, fate), msg_tick=write(state.msg_tick, ftick),
        msg_done=write(state.msg_done, completion),
        pong_fate=write(state.pong_fate, jnp.zeros((n, mr), jnp.int32)),
        slot_tick=state.slot_tick.at[nodes, k].set(jnp.where(ends, t, state.slot_tick[nodes, k])),
        backlog_us=(tb.where(ends, jax.tree.map(lambda x: x[:, -1], queue), busy) if not protocol.flush
                    else tb.wide(jnp.zeros((n,), jnp.int32))),
        sent=state.sent + m * jnp.sum(ends, dtype=jnp.int32),
        age_sum=state.age_sum + ages.astype(jnp.float32),
        age_count=state.age_count + n_used,
        rounds=state.rounds + ends)

  def tick(state: EngineState, run_key, hyper: Hyper):
    """The local steps of one tick (events 1 of the module docstring)."""
    t = state.tick
    active = (t + 1) % period == 0
    state, losses = local_step(state, run_key, hyper, active)
    # per-node losses, averaged over nodes once per chunk (`advance`): a sum over nodes here
    # would be a collective every tick with `devices` > 1, making the devices wait for each other
    return state._replace(tick=t + 1), (jnp.where(active, losses, 0.0), active)

  def round_end(state: EngineState, run_key):
    """Events 2-3 of the tick just simulated. Round ends can only fall on ticks t with
    (t+1) % H == 0 (every R_i is a multiple of H), so this runs after every H-th tick,
    masked by which nodes actually end a round: no per-tick branch."""
    t = state.tick - 1
    ends = ((t + 1) % period == 0) & (state.steps % h == 0)
    return end_rounds(state._replace(tick=t), run_key, ends)._replace(tick=t + 1)

  def advance(state: EngineState, run_key, hyper: Hyper, length: int):
    """Simulates `length` ticks (static) from a tick that is a multiple of H.

    The local step is traced once, as the body of the scan over a block's H ticks (and, if
    `length` is not a multiple of H, once more for the remaining ticks): compile time grows
    with every copy of an unrolled model.

    Returns:
      (state, metrics) with metrics["train_loss"] of shape (length,).
    """
    local = lambda s, _: tick(s, run_key, hyper)

    def block(s, _):  # H ticks, the last of which may end rounds
      s, losses = jax.lax.scan(local, s, None, length=h)
      return (round_end(s, run_key) if communicate else s), losses

    n_blocks, rest = divmod(length, h)
    state, losses = jax.lax.scan(block, state, None, length=n_blocks)
    losses = jax.tree.map(lambda a: a.reshape((-1, n)), losses)                              # (ticks, N)
    if rest:
      state, tail = jax.lax.scan(local, state, None, length=rest)
      losses = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), losses, tail)
    losses, active = losses
    mean = jnp.sum(losses, axis=1) / jnp.maximum(jnp.sum(active, axis=1), 1)                # (length,)
    return state, {"train_loss": mean}

  return Engine(init=init, advance=advance, frags=frags, net=net, depth=d, round_ticks=round_ticks_np)


def message_counts(state: EngineState) -> dict:
  """Cumulative message fates as of the last simulated tick (host ints)."""
  if not isinstance(state, EngineState):
    from divjax import sync
    return sync.message_counts(state)
  s = jax.device_get(state)
  fate = np.concatenate([s.msg_fate.reshape(-1), s.pong_fate.reshape(-1)])
  happened = np.concatenate([s.msg_tick.reshape(-1), s.pong_tick.reshape(-1)]) < s.tick
  counts = {name: int(s.retired[i]) + int(np.sum((fate == i) & happened))
            for i, name in enumerate(FATES) if i != NONE}
  in_flight = int(np.sum((fate != NONE) & ~happened))
  return {
      "msgs_sent": int(s.sent),
      "msgs_delivered": counts["delivered"] + counts["superseded"],
      "msgs_superseded": counts["superseded"],
      "msgs_flushed": counts["flushed"],
      "msgs_expired": counts["expired"],
      "msgs_in_flight": in_flight,
  }
