"""The synchronous round engine: D-PSGD, Epidemic Learning and other barrier-based methods.

Every round, all nodes run H local steps from their current models, send their post-training
models along the round's edges, and mix: x_i <- self_w_i x_i + sum_{e: dst_e = i} w_e x_src_e.
Nobody starts the next round before the slowest participant is done, so a round lasts

    max over nodes i and their out-edges e of  compute_i + completion_e + latency_e,

where compute_i = H * period_i * dt, and completion_e is the FIFO upload finish of message e
in sender i's queue (edges served in edge-list order at min(upload, receiver download)),
all in integer microseconds, exactly as in the asynchronous engine's link model. A round's
effect appears when it completes; a round that would end after the time budget is not run.
No message is ever flushed or expired: sent = delivered at every round end.

Server rounds (FedAvg, a SyncProtocol with `cohort`): the server sends the global model to
the round's cohort one client after the other over its upload link (cohort in id order);
each client trains H steps once its copy has arrived and sends the result back over its own
upload link; the server's download link takes in one upload per size/server_download, in the
order the uploads could finish (ties by id), so upload k is done at
max(done_{k-1} + size/server_download, ready_k + size/upload_k).
The round ends when the last upload has arrived; the server's average, weighted by the
clients' training-set sizes, becomes every node's model (nodes outside the cohort hold what
the server would send them next, so per-node evaluation measures the global model).

What is sent and how it is combined can be wrapped (Byzantine attacks, compression, robust
rules: divjax.sync_wrap). Churn (divjax.churn): a node offline when a round starts sits the
round out: it neither trains, sends nor mixes, a message to it is LOST, an online receiver
gives the weight of a copy that did not come to its own model, and the barrier waits for the
online nodes only (at least the fastest node's H steps, so time moves on when nobody is
online); FedAvg's server contacts only the cohort's online members and renormalizes their
weights.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from divjax import churn
from divjax import engine as engine_lib
from divjax import network as network_lib
from divjax import nodes as nodes_lib
from divjax import sampling, sync_wrap
from divjax import timebase as tb
from divjax.algorithms.base import SyncProtocol  # noqa: F401  (the synchronous algorithms' interface)
from divjax.config import Config

_TIME_LIMIT_US = (1 << 31) - 1  # round times saturate here: a round that long never fits a run


def add(a, b):
  """Saturating sum of non-negative int32 times: a round past the limit stays past it."""
  return tb.sat_add(a, b, _TIME_LIMIT_US)


class SyncState(NamedTuple):
  params: jax.Array      # (N, P) float32
  opt_state: Any         # leaves (N, ...)
  steps: jax.Array       # (N,) int32
  rounds: jax.Array      # (N,) int32, rounds completed (equal for all nodes)
  time_us: jax.Array     # () int32, completion time of the last round
  sent: jax.Array        # () int32, messages sent (= delivered) so far
  tick: jax.Array        # () int32, simulated time reached, in ticks
  age_sum: jax.Array     # () float32, always 0: what arrives is used in the same round
  age_count: jax.Array   # () int32
  overflow: jax.Array    # () int32, copies a robust rule's inbox could not take (divjax.sync_wrap)
  lost: jax.Array        # () int32, messages to nodes offline (churn)
  wrap: Any = ()         # the message wrappers' state, leaves (N, ...) (divjax.sync_wrap)

  def with_params(self, params) -> "SyncState":
    return self._replace(params=params)


def node_axes(state: SyncState):
  """The node axis of each state leaf: 0 for the per-node arrays, None for the scalars."""
  per_node = lambda tree: jax.tree.map(lambda _: 0, tree)
  return SyncState(params=0, opt_state=per_node(state.opt_state), steps=0, rounds=0, time_us=None,
                   sent=None, tick=None, age_sum=None, age_count=None, overflow=None, lost=None, wrap=per_node(state.wrap))


def message_counts(state: SyncState) -> dict:
  """Every message sent is delivered within its round (those a robust rule's full inbox could
  not take among them, as OVERFLOW), but those to offline nodes (LOST): int32 scalars, jittable."""
  sent, zero = jnp.asarray(state.sent, jnp.int32), jnp.zeros((), jnp.int32)
  over, lost = jnp.asarray(state.overflow, jnp.int32), jnp.asarray(state.lost, jnp.int32)
  return {"msgs_sent": sent, "msgs_delivered": sent - lost, "msgs_superseded": zero, "msgs_overflow": over,
          "msgs_lost": lost,
          "msgs_flushed": zero,
          "msgs_expired": zero, "msgs_in_flight": zero}


def _round_times(cfg: Config, net, bits: np.ndarray, dense_bits: np.ndarray):
  """The exact round times (module docstring): (round_duration(links, src, dst, w, online,
  start), server_round_duration(links, cohort, online, start)), microseconds, saturating.
  bits: an upload's size (compressed: divjax.sync_wrap); dense_bits: the server's download."""
  n, h, dt_us = cfg.n_nodes, cfg.local_steps, net.dt_us

  def compute_us(lk):
    """(N,) H local steps in us, saturating at the time limit (h * period fits int32)."""
    ticks = h * lk.period
    return jnp.where(ticks > _TIME_LIMIT_US // dt_us, _TIME_LIMIT_US, ticks * dt_us)

  def block_at(t0, t):
    """The rate block (divjax.bandwidth) of time t after the round's start t0, or None (fixed rates)."""
    return None if net.upload_bps_t is None else add(t0, t) // dt_us // net.block_ticks

  def round_duration(lk, src, dst, w, on, t0):
    """Exact barrier time of one round starting at t0 (microseconds, saturating at the time
    limit); with churn, of the nodes online (`on`), and at least the fastest node's H steps.
    With time-varying rates a message is served at those of the block where its sender's
    H steps end (it enters the queue then)."""
    service_of = lambda *a: tb.narrow(network_lib.service(lk, *a), _TIME_LIMIT_US)
    lat_us, compute = lk.latency_us, compute_us(lk)
    live = w > 0 if on is None else (w > 0) & on[src]
    svc = jnp.where(live, service_of(src, dst, jnp.zeros_like(src), block_at(t0, compute[src])), 0)
    order = jnp.argsort(src, stable=True)           # each sender serves its edges in list order
    s_src, s_svc = src[order], svc[order]
    first = jnp.concatenate([jnp.array([True]), s_src[1:] != s_src[:-1]])
    completion = tb.sat_segmented_cumsum(s_svc, first, _TIME_LIMIT_US)
    finish = add(add(compute[s_src], completion), (lat_us[s_src] + lat_us[dst[order]]) // 2)
    busy = jnp.max(compute) if on is None else jnp.maximum(jnp.min(compute), jnp.max(jnp.where(on, compute, 0)))
    return jnp.maximum(busy, jnp.max(jnp.where(live[order], finish, 0)))

  server = cfg.server
  server_lat = int(round(server.latency_ms * 1e3))
  host_svc = lambda size, bps: jnp.asarray(np.minimum(network_lib.service_us(size, bps)[:, 0], _TIME_LIMIT_US),
                                           jnp.int32)
  down_svc = host_svc(dense_bits, np.full(n, server.upload_mbps * 1e6))     # the global model, dense
  in_svc = host_svc(bits, np.array([server.download_mbps * 1e6]))[0]         # an upload

  def server_round_duration(lk, cohort, on, t0):
    """Exact FedAvg round time (microseconds): serial downloads, training, serial uploads;
    with churn, of the cohort's online members (`on`), and at least the fastest node's H steps."""
    to_server_lat = (server_lat + lk.latency_us) // 2                                    # (N,)
    up_svc = None if net.upload_bps_t is not None else tb.narrow(lk.up, _TIME_LIMIT_US)[:, 0]   # (N,)
    compute = compute_us(lk)
    ok = None if on is None else on[cohort]
    first_svc = down_svc[cohort] if ok is None else jnp.where(ok, down_svc[cohort], 0)
    down = tb.sat_segmented_cumsum(first_svc, jnp.arange(cohort.shape[0]) == 0, _TIME_LIMIT_US)
    arrive = add(down, to_server_lat[cohort])                               # client has the model
    ready = add(arrive, compute[cohort])                                    # its upload is queued
    if net.upload_bps_t is not None:   # at the rates of that block (divjax.bandwidth)
      block = jnp.minimum(block_at(t0, ready), lk.up.hi.shape[1] - 1)
      up = tb.narrow(tb.gather(lk.up, cohort, block, jnp.zeros_like(cohort)), _TIME_LIMIT_US)
    else:
      up = up_svc[cohort]
    alone = add(add(ready, up), to_server_lat[cohort])                     # done then, if alone
    order = jnp.lexsort((cohort, alone))

    def serve(busy, k):
      done = jnp.maximum(add(busy, in_svc), alone[k])
      return (done if ok is None else jnp.where(ok[k], done, busy)), None

    last, _ = jax.lax.scan(serve, jnp.zeros((), jnp.int32), order)
    return last if ok is None else jnp.maximum(last, jnp.min(compute))

  return round_duration, server_round_duration


def make(cfg: Config, task, protocol: SyncProtocol) -> engine_lib.Engine:
  n, h = cfg.n_nodes, cfg.local_steps
  if cfg.n_ticks * cfg.dt_us > _TIME_LIMIT_US:
    raise ValueError(f"duration_s: synchronous algorithms simulate at most {_TIME_LIMIT_US / 1e6:.0f} s "
                     f"(got {cfg.duration_s})")
  net = network_lib.build(cfg)
  sgd = nodes_lib.make(cfg, task)
  wrap = sync_wrap.make(cfg, task.n_params, protocol)
  # what nodes upload (compressed: divjax.sync_wrap); FedAvg's server sends the model dense
  bits_of = lambda c: np.array([wrap.payload_bits + c.network.header_bits])
  dense_bits = np.array([32 * task.n_params + cfg.network.header_bits])
  k_send = lambda run_key: sampling.stream(run_key, sampling.STREAM_SNAPSHOT)
  dt_us = net.dt_us
  k_mix = lambda run_key: sampling.stream(run_key, sampling.STREAM_PLAN)
  static = engine_lib.static_key(cfg, 0)

  def params(cfg_p: Config, data) -> engine_lib.Params:
    engine_lib.check_static(static, cfg_p, 0)
    return engine_lib.make_params(cfg_p, data, bits_of(cfg_p), network_lib.build(cfg_p))._replace(
        availability=churn.intervals_us(cfg_p, cfg_p.duration_s + 1, _TIME_LIMIT_US))

  bits = bits_of(cfg)
  round_duration, server_round_duration = _round_times(cfg, net, bits, dense_bits)
  sizes = jnp.asarray(task.counts, jnp.float32)                                          # (N,)

  def init(run_key) -> SyncState:
    params = task.initial_models(run_key, n, cfg.init.spread)
    z = lambda *s: jnp.zeros(s, jnp.int32)
    return SyncState(params=params, opt_state=sgd.init_opt(params), steps=z(n), rounds=z(n),
                     time_us=z(), sent=z(), tick=z(), age_sum=jnp.zeros((), jnp.float32),
                     age_count=z(), overflow=z(), lost=z(), wrap=wrap.init(params))

  def one_round(state: SyncState, hyper: engine_lib.Params, mix, on):
    src, dst, w, self_w = mix
    everyone = jnp.ones((n,), bool) if on is None else on   # offline nodes neither train nor send

    def local(carry, _):
      params, opt_state, steps = carry
      params, opt_state, steps, losses = sgd.step(params, opt_state, steps, hyper.data, hyper.key, hyper.lr,
                                                  hyper.momentum, everyone)
      return (params, opt_state, steps), losses  # averaged after the scan: no collective per step

    (params, opt_state, steps), losses = jax.lax.scan(
        local, (state.params, state.opt_state, state.steps), None, length=h)
    payload, wrap_state = send(params, hyper.key, state.rounds[0], everyone, state.wrap)
    sent, lost, loss = jnp.sum(w > 0, dtype=jnp.int32), jnp.zeros((), jnp.int32), losses.mean()
    if on is not None:   # a message to an offline node is lost; what does not arrive counts as the own value
      arrived = (w > 0) & on[src] & on[dst]
      sent = jnp.sum((w > 0) & on[src], dtype=jnp.int32)
      lost = sent - jnp.sum(arrived, dtype=jnp.int32)
      self_w = self_w + jax.ops.segment_sum(jnp.where(arrived, 0.0, w), dst, num_segments=n)
      w = jnp.where(arrived, w, 0.0)
      loss = jnp.sum(jnp.where(on, losses, 0.0)) / jnp.maximum(1, h * jnp.sum(on))
    mixed, over = sync_wrap.gossip(wrap, state.params, params, payload, src, dst, w, self_w, hyper.key,
                                   state.rounds[0])
    if on is not None:
      mixed = jnp.where(on[:, None], mixed, state.params)
    return state._replace(params=mixed, opt_state=opt_state, steps=steps, rounds=state.rounds + 1,
                          sent=state.sent + sent, overflow=state.overflow + over, lost=state.lost + lost,
                          wrap=wrap_state), loss

  def server_round(state: SyncState, hyper: engine_lib.Params, cohort, on):
    member = jnp.zeros((n,), bool).at[cohort].set(True)
    ok = None if on is None else on[cohort]   # the server contacts the online members only
    if on is not None:
      member = member & on

    def local(carry, _):
      params, opt_state, steps = carry
      params, opt_state, steps, losses = sgd.step(params, opt_state, steps, hyper.data, hyper.key, hyper.lr,
                                                  hyper.momentum, member)
      return (params, opt_state, steps), jnp.where(member, losses, 0.0)

    (params, opt_state, steps), losses = jax.lax.scan(
        local, (state.params, state.opt_state, state.steps), None, length=h)
    payload, wrap_state = send(params, hyper.key, state.rounds[0], member, state.wrap)
    w = sizes[cohort] / jnp.sum(sizes[cohort])
    global_ = sync_wrap.server(wrap, state.params[cohort], payload[cohort], w, ok)
    new = jnp.broadcast_to(global_, params.shape)
    taken = cohort.shape[0] if ok is None else jnp.sum(ok, dtype=jnp.int32)
    if ok is not None:   # nobody online: the global model stays
      new = jnp.where(taken > 0, new, state.params)
    return state._replace(params=new, opt_state=opt_state, steps=steps, rounds=state.rounds + 1,
                          sent=state.sent + 2 * taken, wrap=wrap_state), losses.sum() / (h * jnp.maximum(taken, 1))

  def send(params, run_key, round_, senders, wrap_state):
    """What the nodes upload this round: their models, or what the wrappers make of them."""
    if wrap.send is None:
      return params, wrap_state
    return wrap.send(params, k_send(run_key), round_, senders, wrap_state)

  def advance(state: SyncState, hyper: engine_lib.Params, length: int):
    """Runs every round that completes by tick state.tick + length."""
    target_us = (state.tick + length) * dt_us

    def next_round(s):
      on = churn.online_at(hyper.availability, s.time_us)   # who takes part: online at the round's start
      if protocol.cohort is not None:
        cohort = protocol.cohort(k_mix(hyper.key), s.rounds[0])
        return (cohort, on), server_round_duration(hyper.links, cohort, on, s.time_us)
      mix = protocol.mixing(k_mix(hyper.key), s.rounds[0])
      return (mix, on), round_duration(hyper.links, *mix[:3], on, s.time_us)

    def fits(carry):
      s, _, _ = carry
      _, dur = next_round(s)
      return dur <= target_us - s.time_us   # no overflow: time_us <= target_us

    def body(carry):
      s, loss_sum, count = carry
      mix, dur = next_round(s)
      run = server_round if protocol.cohort is not None else one_round
      s, loss = run(s, hyper, *mix)
      return s._replace(time_us=s.time_us + dur), loss_sum + loss, count + 1

    state, loss_sum, count = jax.lax.while_loop(
        fits, body, (state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)))
    # 0 when no round completed in this chunk (chunks shorter than a round)
    train_loss = loss_sum / jnp.maximum(count, 1)
    return state._replace(tick=state.tick + length), {"train_loss": train_loss[None]}

  return engine_lib.Engine(init=init, advance=advance, params=params, counts=message_counts,
                           node_axes=node_axes, static=static, frags=None, net=net, depth=0,
                           round_ticks=(h * net.period).astype(np.int64), message_bits=float(bits[0]))
