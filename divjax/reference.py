"""A deliberately plain discrete-event simulator of the same semantics as divjax.engine.

Nothing here is vectorised or clever: a heap of timed events, one Python object per message,
explicit FIFO send queues and receive buffers, and one node's gradient at a time. It replays
the engine's random plan (the same batch indices, recipients and queue order, drawn by the
functions in divjax.sampling) and must reach the same parameters and message counts. When the
two disagree, read this file first.

Events at the same instant are processed in this order: local steps, message arrivals,
aggregations of every node that ends a round, then every such node's send phase (expire
messages older than D rounds, flush the queue if the algorithm flushes, enqueue the new
round). Times are integer microseconds.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import churn
from divjax import fragments as fragments_lib
from divjax import inbox as inbox_lib
from divjax import network as network_lib
from divjax import sampling, sync_wrap
from divjax.algorithms.base import AsyncAlgorithm, Received
from divjax.config import Config


class Event(enum.IntEnum):
  """Event kinds, in the order same-instant events are processed."""
  UPLOADED = -1   # a message leaves its sender's queue (before anything else at that instant)
  STEP = 0        # a node finishes a local step
  SNAPSHOT = 1    # a node that ended a round takes what it sends (after every step of the instant)
  ARRIVE = 2      # a message reaches its receiver
  AGGREGATE = 3   # a node that ended a round averages what it received
  SEND = 4        # ... then starts its next round's sends


@dataclass(eq=False)  # messages are compared by identity
class Message:
  src: int
  dst: int
  frag: int
  round: int
  send_time: int
  payload: np.ndarray                 # the fragment's values at send time
  completion: int = 0                 # end of upload
  status: str = "queued"  # queued, transit, buffered, replaced; then delivered, superseded, flushed, expired
  ping: bool = False                  # asks the receiver for a reply (AD-PSGD)
  reply: bool = False                 # is such a reply
  info: object = None                 # what the algorithm attaches to it (reference_message)
  versions: Optional[np.ndarray] = None  # observe.versions: the sender's vector at its snapshot


@dataclass
class Node:
  params: np.ndarray
  momentum: np.ndarray
  alg_state: object = None            # the algorithm's own state (reference_init)
  steps: int = 0                      # local steps taken
  slots: int = 0                      # step slots passed (steps + those spent offline, divjax.churn)
  rounds: int = 0
  busy_until: int = 0                 # the upload link is busy until then
  queue: list = field(default_factory=list)      # messages not fully uploaded, FIFO
  buffer: dict = field(default_factory=dict)     # (src, frag) -> newest arrived Message
  replaced: list = field(default_factory=list)   # older copies replaced in the buffer
  sent: dict = field(default_factory=dict)       # round -> messages whose payload slot is that round's
  latest: Optional[np.ndarray] = None            # last post-training snapshot (what a reply carries)
  latest_round: int = -1
  latest_time: int = 0
  exchanges: list = field(default_factory=list)  # arrived replies of pairwise exchanges, in order
  known: Optional[np.ndarray] = None             # observe.versions: newest version of each node seen
  latest_known: Optional[np.ndarray] = None      # the vector attached to `latest`


class _Sim:
  """The event loop's state and one handler per Event kind."""

  def __init__(self, cfg: Config, task, alg: AsyncAlgorithm, n_ticks: int, depth: int, run_key, trace):
    self.cfg, self.alg, self.depth, self.trace = cfg, alg, depth, trace
    self.h = cfg.local_steps
    self.net = net = network_lib.build(cfg)
    frags = fragments_lib.partition(task.tensor_sizes, alg.fragments, cfg.data_seed)
    self.coords = [np.flatnonzero(frags.frag_of == f) for f in range(frags.n)]
    self.bits = alg.payload_bits(frags.sizes) + cfg.network.header_bits
    self.dt = net.dt_us
    self.horizon = n_ticks * self.dt
    self.reply = alg.replies is not None
    self.pairwise = self.reply and alg.replies.pairwise
    k_batch = sampling.stream(run_key, sampling.STREAM_BATCH)
    k_plan = sampling.stream(run_key, sampling.STREAM_PLAN)
    self.k_snapshot = sampling.stream(run_key, sampling.STREAM_SNAPSHOT)
    self.k_received = sampling.stream(run_key, sampling.STREAM_RECEIVED)
    self.width = max(c.size for c in self.coords)
    self.inbox_seed = np.uint32(inbox_lib.seed(run_key))
    x0 = np.asarray(task.initial_models(run_key, cfg.n_nodes, cfg.init.spread), np.float32)
    self.nodes = [Node(p.copy(), np.zeros_like(p), alg.reference_init(p)) for p in x0]
    self.observe = cfg.observe.versions   # divjax.versions, written plainly here
    if self.observe != "off":
      for node in self.nodes:
        node.known = np.zeros(cfg.n_nodes, np.int64)
    self.grad_fn = jax.jit(jax.grad(lambda p, x, y: task.loss_stacked(p[None], task.inputs(x)[None], y[None])[0]))
    self.batch_fn = jax.jit(lambda i, k: sampling.batch_indices(k_batch, i, k, task.parts, task.counts,
                                                                cfg.batch_size))
    self.plan_fn = jax.jit(lambda i, r: alg.plan(k_plan, i, r))
    self.x_train, self.y_train = np.asarray(task.x_train), np.asarray(task.y_train)
    self.counts = dict(sent=0, delivered=0, superseded=0, overflow=0, flushed=0, expired=0, lost=0)
    self.round_ticks = cfg.local_steps * net.period
    self.avail = churn.Reference(cfg, self.round_ticks, net.dt_us, cfg.n_ticks)
    self.age_sum, self.age_count = 0, 0
    self.events, self.seq = [], itertools.count()
    for i in range(cfg.n_nodes):
      self.push(self.step_time(i, 1), Event.STEP, i)

  def push(self, time, kind, data, key=()):
    # Same-time events of one kind run in `key` order, then in creation order. Arrivals at the
    # same instant are taken in (upload completion, sender) order, which is what fixes the order
    # of simultaneous replies in a queue (the engine sorts the same way).
    heapq.heappush(self.events, (time, kind, key, next(self.seq), data))

  def step_time(self, i, k):  # the k-th step slot (1-based) of node i ends then
    return k * int(self.net.period[i]) * self.dt

  def service(self, s, d, f, now):
    tick = -(-now // self.dt) - 1   # rates in effect in the tick in which it is enqueued (divjax.bandwidth)
    return network_lib.one_service_us(self.bits[f], network_lib.link_rate_bps(self.net, s, d, tick))

  def enqueue(self, msg: Message, now: int, sender_slot: Optional[int]):
    """Puts a message in its sender's FIFO queue; its payload lives in the sender's round
    `sender_slot` (None: the payload is never read, so it is not the sender's to expire)."""
    node = self.nodes[msg.src]
    start = max(node.busy_until, now)
    msg.completion = node.busy_until = start + self.service(msg.src, msg.dst, msg.frag, now)
    node.queue.append(msg)
    self.counts["sent"] += 1
    self.push(msg.completion, Event.UPLOADED, msg)
    if sender_slot is not None:
      node.sent.setdefault(sender_slot, []).append(msg)

  def run(self):
    handlers = {Event.STEP: self.on_step, Event.ARRIVE: self.on_arrive, Event.AGGREGATE: self.on_aggregate,
                Event.SEND: self.on_send, Event.UPLOADED: self.on_uploaded, Event.SNAPSHOT: self.on_snapshot}
    while self.events and self.events[0][0] <= self.horizon:
      now, kind, _, _, data = heapq.heappop(self.events)
      handlers[kind](now, data)

  def on_step(self, now, i):
    """One local SGD step; after the H-th, the round ends (aggregate, then send)."""
    node, cfg = self.nodes[i], self.cfg
    online = self.avail.online(i, node.rounds)
    if online:  # an offline node does not train (divjax.churn)
      idx = np.asarray(self.batch_fn(i, node.steps))
      g = np.asarray(self.grad_fn(node.params, self.x_train[idx], self.y_train[idx]))
      node.momentum = g + cfg.momentum * node.momentum if cfg.momentum > 0 else g
      node.params = (node.params - np.float32(cfg.lr) * node.momentum).astype(np.float32)
      node.steps += 1
    node.slots += 1
    self.push(self.step_time(i, node.slots + 1), Event.STEP, i)
    if node.slots % self.h != 0:
      return
    if not online:  # the slot of an offline round ends: only its oldest messages expire
      self.push(now, Event.SEND, (i, None, None))
    elif self.alg.reference_snapshot is not None:
      self.push(now, Event.SNAPSHOT, i, key=(i,))  # once every node's steps of this instant are done
    else:
      self.on_snapshot(now, i)

  def on_snapshot(self, now, i):
    """The round's end: what node i sends, then its aggregation and its sends."""
    node, cfg = self.nodes[i], self.cfg
    snapshot = node.params.copy()  # post-training, pre-aggregation model
    if self.alg.reference_snapshot is not None:  # what it sends instead (wrappers)
      models = np.stack([nd.params for nd in self.nodes])
      snapshot, node.alg_state = self.alg.reference_snapshot(i, models, self.coords, self.k_snapshot,
                                                             node.rounds, node.alg_state)
      snapshot = np.asarray(snapshot, np.float32)
    if cfg.ring_dtype != "float32":  # payloads travel rounded (config ring_dtype)
      snapshot = np.asarray(jnp.asarray(snapshot).astype(cfg.ring_dtype).astype(jnp.float32))
    vec = None
    if node.known is not None:     # its version: rounds of training it holds; before any merge
      node.known[i] = node.rounds + 1
      vec = node.known.copy()
    self.push(now, Event.AGGREGATE, i, key=(i,))  # same-instant round ends in node order
    self.push(now, Event.SEND, (i, snapshot, vec))

  def on_uploaded(self, now, msg):
    """Upload done: the message leaves the queue and travels for the link latency."""
    if msg.status != "queued":
      return
    self.nodes[msg.src].queue.remove(msg)
    msg.status = "transit"
    latency = (int(self.net.latency_us[msg.src]) + int(self.net.latency_us[msg.dst])) // 2
    self.push(now + latency, Event.ARRIVE, msg, key=(msg.completion, msg.src))

  def on_arrive(self, now, msg):
    """Into the receiver's buffer (a newer copy replaces an older one); pings get replies."""
    if msg.status != "transit":  # expired on the way
      return
    rcv = self.nodes[msg.dst]
    arrive_tick = -(-now // self.dt) - 1
    if not self.avail.online(msg.dst, arrive_tick // int(self.round_ticks[msg.dst])):
      msg.status = "lost"     # its receiver is offline
      self.counts["lost"] += 1
      return
    if msg.reply and self.pairwise:  # completes an exchange at the pinger's next round end
      msg.status = "buffered"
      rcv.exchanges.append(msg)
      return
    old = rcv.buffer.get((msg.src, msg.frag))
    if old is not None:  # the newer copy replaces the older one
      old.status = "replaced"  # counted as superseded at the receiver's next aggregation
      rcv.replaced.append(old)
    msg.status = "buffered"
    rcv.buffer[(msg.src, msg.frag)] = msg
    if msg.ping and self.pairwise:  # the exchange's reply; its payload is never read
      pong = Message(msg.dst, msg.src, 0, msg.round, msg.send_time, rcv.params.copy(), reply=True)
      self.enqueue(pong, now, None)
      self.nodes[msg.src].sent[msg.round].append(pong)
    elif msg.ping and rcv.latest is not None and rcv.rounds <= rcv.latest_round + self.depth:
      # reply at once with the latest snapshot, unless its slot is gone (offline rounds, churn)
      pong = Message(msg.dst, msg.src, 0, rcv.latest_round, rcv.latest_time, rcv.latest.copy(), reply=True,
                     versions=rcv.latest_known)
      # its payload slot is the replier's round; the ping's table slot holds its record
      self.enqueue(pong, now, rcv.latest_round)
      if self.trace is not None:
        self.trace.append((now, "reply", pong))
      self.nodes[msg.src].sent[msg.round].append(pong)

  def on_aggregate(self, now, i):
    """The algorithm's rule over what arrived; pairwise exchanges average both partners."""
    node = self.nodes[i]
    received, arrived = [], list(node.buffer.values())
    if self.alg.inbox is not None:  # at most K copies per fragment: the rest overflow
      arrived, over = inbox_lib.reference_keep(arrived, self.inbox_seed, i, node.rounds, self.alg.inbox)
      for msg in over:
        msg.status = "overflow"
        self.counts["delivered"] += 1
        self.counts["overflow"] += 1
    for msg in arrived:
      if node.known is not None and self.observe == "relay":
        node.known = np.maximum(node.known, msg.versions)
      elif node.known is not None:   # direct: only the sender's own version
        node.known[msg.src] = max(node.known[msg.src], msg.versions[msg.src])
      payload = msg.payload
      if self.alg.reference_received is not None:  # what this receiver gets (a per-recipient payload)
        payload = np.asarray(self.alg.reference_received(payload, msg.src, i, msg.frag, node.rounds,
                                                         self.k_received, self.width), np.float32)
      received.append(Received(msg.src, self.coords[msg.frag], payload, (now - msg.send_time) // self.dt,
                               msg.info))
      msg.status = "delivered"
      self.counts["delivered"] += 1
      if not self.pairwise:
        self.age_sum += (now - msg.send_time) // self.dt
        self.age_count += 1
    for msg in node.exchanges:  # AD-PSGD: both models become their average, atomically
      other = self.nodes[msg.src]
      if self.alg.reference_exchanged is None:
        mean = ((node.params + other.params) / np.float32(2)).astype(np.float32)
        node.params, other.params = mean, mean.copy()
      else:  # Byzantine partners give their attack instead, from the live models
        models = np.stack([nd.params for nd in self.nodes])
        give_i = self.alg.reference_exchanged(models, i, msg.src, node.rounds, self.k_received)
        give_o = self.alg.reference_exchanged(models, msg.src, i, node.rounds, self.k_received)
        node.params, other.params = (((node.params + give_o) / np.float32(2)).astype(np.float32),
                                     ((other.params + give_i) / np.float32(2)).astype(np.float32))
      msg.status = "delivered"
      self.counts["delivered"] += 1
      self.age_sum += (now - msg.send_time) // self.dt
      self.age_count += 1
    node.exchanges = []
    for msg in node.replaced:
      msg.status = "superseded"
      self.counts["delivered"] += 1
      self.counts["superseded"] += 1
    if self.trace is not None:
      self.trace.extend((now, "used", m) for m in arrived)
      self.trace.extend((now, "superseded", m) for m in node.replaced)
    node.params, node.alg_state = self.alg.reference_aggregate(i, node.params, received, node.alg_state)
    node.buffer, node.replaced = {}, []

  def on_send(self, now, data):
    """Expire round r - D, flush the queue if the algorithm does, enqueue the new round."""
    i, snapshot, vec = data
    node = self.nodes[i]
    r = node.rounds
    online = snapshot is not None
    # messages of round r - D lose their payload slot now
    # (a copy already replaced by a newer one in a buffer loses its payload all the same)
    for msg in node.sent.pop(r - self.depth, []):
      if msg.status in ("queued", "transit", "buffered", "replaced"):
        self.expire(msg)
    if self.alg.queue.flush:
      for msg in node.queue:
        msg.status = "flushed"
        self.counts["flushed"] += 1
      node.queue = []
      node.busy_until = now
    if not online:
      node.rounds += 1
      return
    dst, frag = (np.asarray(a) for a in self.plan_fn(i, r))
    node.sent.setdefault(r, [])
    info = self.alg.reference_message(node.alg_state)
    for d, f in zip(dst.tolist(), frag.tolist()):
      self.enqueue(Message(i, d, f, r, now, snapshot[self.coords[f]].copy(), ping=self.reply, info=info,
                           versions=vec), now, r)
    node.latest, node.latest_round, node.latest_time, node.latest_known = snapshot, r, now, vec
    node.rounds += 1
    if not self.avail.online(i, node.rounds):  # it leaves now: what is not uploaded is lost
      for msg in node.queue:
        msg.status = "lost"
        self.counts["lost"] += 1
      node.queue = []
      node.busy_until = now

  def expire(self, msg):
    if msg.status == "buffered" and msg.reply and self.pairwise:
      self.nodes[msg.dst].exchanges.remove(msg)
    elif msg.status == "buffered":
      del self.nodes[msg.dst].buffer[(msg.src, msg.frag)]
    if msg.status == "replaced":
      self.nodes[msg.dst].replaced.remove(msg)
    if msg.status == "queued":
      self.nodes[msg.src].queue.remove(msg)
    msg.status = "expired"
    self.counts["expired"] += 1

  def results(self):
    nodes = self.nodes
    alive = {id(m) for node in nodes for msgs in node.sent.values() for m in msgs
             if m.status in ("queued", "transit", "buffered")}  # a reply is listed twice
    c = self.counts
    return np.stack([nd.params for nd in nodes]), {
        "msgs_sent": c["sent"],
        "msgs_delivered": c["delivered"],
        "msgs_superseded": c["superseded"],
        "msgs_overflow": c["overflow"],
        "msgs_flushed": c["flushed"],
        "msgs_expired": c["expired"],
        "msgs_lost": c["lost"],
        "msgs_in_flight": len(alive) + sum(len(nd.replaced) for nd in nodes),
        "age_sum": self.age_sum,
        "age_count": self.age_count,
        "steps": np.array([nd.steps for nd in nodes]),
        "rounds": np.array([nd.rounds for nd in nodes]),
        "versions": None if self.observe == "off" else np.stack([nd.known for nd in nodes]),
    }


def simulate(cfg: Config, task, alg: AsyncAlgorithm, n_ticks: int, depth: int,
             run_key: Optional[jax.Array] = None, trace: Optional[list] = None):
  """Runs the event simulation up to simulated time n_ticks * dt.

  Returns:
    params (N, P) float32 and a dict of message counts in the engine's vocabulary. If `trace`
    is a list, consumed messages and replies are appended to it (for debugging).
  """
  run_key = jax.random.key(cfg.seed) if run_key is None else run_key
  sim = _Sim(cfg, task, alg, n_ticks, depth, run_key, trace)
  sim.run()
  return sim.results()


def simulate_sync(cfg: Config, task, protocol, n_ticks: int, run_key: Optional[jax.Array] = None):
  """Plain round-by-round simulation of a synchronous algorithm (divjax.sync semantics).

  Each round: every node takes H SGD steps (one at a time), each sender serves its messages
  FIFO in edge-list order, the barrier waits for the last arrival, then x_i <- sum_j W_ij x_j
  computed with explicit loops. A round that would end after n_ticks * dt is not run.
  Server algorithms (FedAvg): the cohort trains, the server averages (see divjax.sync).
  """
  n, h = cfg.n_nodes, cfg.local_steps
  net = network_lib.build(cfg)
  dt = net.dt_us
  horizon = n_ticks * dt
  run_key = jax.random.key(cfg.seed) if run_key is None else run_key
  k_batch = sampling.stream(run_key, sampling.STREAM_BATCH)
  k_mix = sampling.stream(run_key, sampling.STREAM_PLAN)
  k_send = sampling.stream(run_key, sampling.STREAM_SNAPSHOT)
  wrap = sync_wrap.make(cfg, task.n_params, protocol)   # byzantine, compression, robust rules
  bits = wrap.payload_bits + cfg.network.header_bits    # what a node uploads
  dense_bits = 32 * task.n_params + cfg.network.header_bits
  grad_fn = jax.jit(jax.grad(lambda p, x, y: task.loss_stacked(p[None], task.inputs(x)[None], y[None])[0]))
  batch_fn = jax.jit(lambda i, k: sampling.batch_indices(k_batch, i, k, task.parts, task.counts,
                                                         cfg.batch_size))
  x_train, y_train = np.asarray(task.x_train), np.asarray(task.y_train)
  params = np.array(task.initial_models(run_key, n, cfg.init.spread), np.float32)
  velocity = np.zeros_like(params)
  steps, rounds, now, sent, overflow, lost = np.zeros(n, np.int64), 0, 0, 0, 0, 0
  wstate = [wrap.reference_init(params[i]) for i in range(n)]
  offline = churn.offline_intervals(cfg, cfg.duration_s + 1) if churn.enabled(cfg) else [[] for _ in range(n)]
  compute = [h * int(net.period[i]) * dt for i in range(n)]

  def online(i):
    """Node i takes part in the round starting now unless one of its offline intervals holds now."""
    return not any(a * 1e6 <= now < b * 1e6 for a, b in offline[i])

  def upload(i):
    """What node i sends this round (params hold every node's post-training model)."""
    if wrap.reference_send is None:
      return params[i].copy()
    payload, wstate[i] = wrap.reference_send(i, params, k_send, rounds, wstate[i])
    return payload

  def train(i):
    for _ in range(h):
      idx = np.asarray(batch_fn(i, int(steps[i])))
      g = np.asarray(grad_fn(params[i], x_train[idx], y_train[idx]))
      velocity[i] = g + cfg.momentum * velocity[i] if cfg.momentum > 0 else g
      params[i] = params[i] - np.float32(cfg.lr) * velocity[i]
      steps[i] += 1

  while protocol.cohort is not None:  # FedAvg: a server round with the cohort's online members
    cohort = [i for i in np.asarray(protocol.cohort(k_mix, rounds)).tolist() if online(i)]
    srv = cfg.server
    lat = {i: (int(round(srv.latency_ms * 1e3)) + int(net.latency_us[i])) // 2 for i in cohort}
    down = network_lib.one_service_us(dense_bits, srv.upload_mbps * 1e6)
    into_server = network_lib.one_service_us(bits, srv.download_mbps * 1e6)
    t, alone = 0, {}
    for i in cohort:                      # the server sends the model to one client after another
      t += down
      ready = t + lat[i] + compute[i]     # its upload is queued, at the rates of that moment
      rate = net.upload_bps[i] if net.upload_bps_t is None else net.upload_bps_t[i, network_lib.block_of(
          net, (now + ready) // dt)]
      alone[i] = ready + network_lib.one_service_us(bits, rate) + lat[i]  # its upload, if alone
    busy = 0 if cohort else min(compute)  # nobody online: the round lasts the fastest node's steps
    for i in sorted(cohort, key=lambda i: (alone[i], i)):  # the server link takes one per into_server
      busy = max(busy + into_server, alone[i])
    if now + busy > horizon:
      break
    if cohort:
      start = params[cohort].copy()
      for i in cohort:
        train(i)
      uploads = np.stack([upload(i) for i in cohort])
      sizes = np.asarray(task.counts, np.float32)[cohort]
      weights = sizes / sizes.sum()
      params[:] = sync_wrap.reference_server(wrap, start, uploads, weights)
    sent += 2 * len(cohort)
    rounds += 1
    now += busy

  while protocol.cohort is None:
    src, dst, w, self_w = (np.asarray(a) for a in protocol.mixing(k_mix, rounds))
    on = [online(i) for i in range(n)]
    finish = max([compute[i] for i in range(n) if on[i]] + [min(compute)])
    busy = dict(enumerate(compute))       # each sender starts after its compute
    for s, d, we in zip(src.tolist(), dst.tolist(), w.tolist()):
      if we <= 0 or not on[s]:            # an offline node sends nothing
        continue
      rate = network_lib.link_rate_bps(net, s, d, (now + compute[s]) // dt)   # queued after its H steps
      busy[s] += network_lib.one_service_us(bits, rate)
      finish = max(finish, busy[s] + (int(net.latency_us[s]) + int(net.latency_us[d])) // 2)
    if now + finish > horizon:
      break
    start = params.copy()
    for i in range(n):
      if on[i]:
        train(i)
    payload = np.stack([upload(i) if on[i] else params[i] for i in range(n)])
    arrived = np.array([we > 0 and on[s] and on[d] for s, d, we in zip(src.tolist(), dst.tolist(), w.tolist())])
    mixed, over = sync_wrap.reference_gossip(wrap, start, params, payload, src, dst, w, self_w, run_key, rounds,
                                             arrived)
    params = np.where(np.array(on)[:, None], mixed, params).astype(np.float32)   # offline: unchanged
    sent += sum(1 for s, we in zip(src.tolist(), w.tolist()) if we > 0 and on[s])
    lost += sum(1 for s, d, we in zip(src.tolist(), dst.tolist(), w.tolist()) if we > 0 and on[s] and not on[d])
    overflow += over
    rounds += 1
    now += finish

  out = {"msgs_sent": int(sent), "msgs_delivered": int(sent - lost), "msgs_superseded": 0,
         "msgs_overflow": int(overflow), "msgs_lost": int(lost),
         "msgs_flushed": 0, "msgs_expired": 0, "msgs_in_flight": 0, "age_sum": 0, "age_count": 0,
         "steps": steps, "rounds": np.full(n, rounds), "time_us": now}
  return params, out
