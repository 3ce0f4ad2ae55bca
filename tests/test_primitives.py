"""Unit tests of the engine's primitives, each against a plain-Python statement of its rule."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from divjax import clock, fates, queue, replies, ring
from divjax import timebase as tb


def test_round_clock():
  period = jnp.array([1, 2, 3])
  t = 5                                       # tick 5: steps of nodes with 6 % period == 0
  chex.assert_trees_all_equal(clock.steps_now(t, period), jnp.array([True, True, True]))
  chex.assert_trees_all_equal(clock.steps_now(4, period), jnp.array([True, False, False]))
  # H = 2: node 0 ends its 6th step slot at tick 5 (a round end), node 1 its 3rd (not one),
  # node 2 its 2nd; slots, not steps taken: an offline node's slots pass too (divjax.churn)
  chex.assert_trees_all_equal(clock.round_ends(t, period, 2), jnp.array([True, False, True]))
  chex.assert_trees_all_equal(clock.round_ends(7, period, 2), jnp.array([True, True, False]))


def test_consume_tick_is_the_first_round_end_at_or_after_arrival():
  dt, r = 10, 4                                # receiver rounds end at ticks 3, 7, 11, ...
  for t in range(0, 8):
    for arrival in range(0, 100, 3):           # us after the end of tick t
      got = int(clock.consume_tick(jnp.int32(t), jnp.int32(arrival), jnp.int32(r), dt))
      arrive_abs = (t + 1) * dt + arrival
      # the first round end (k + 1) r - 1 whose end ((k + 1) r) dt is at or after the arrival
      want = next((k + 1) * r - 1 for k in range(100) if (k + 1) * r * dt >= arrive_abs)
      assert got == want, (t, arrival)


def test_since_send_and_rounds_finished():
  since = clock.since_send_us(jnp.array([[3, 9]]), 10, 5, age_cap=4)
  chex.assert_trees_all_equal(since, jnp.array([[[20], [5]]]))        # age 7 capped at 4 ticks
  # rounds of 4 ticks (dt 10) end at 40, 80, 120 us; the end of tick 9 is at 100 us
  assert int(clock.rounds_finished_before(9, -15, 4, 10)) == 2     # at 85 us
  assert int(clock.rounds_finished_before(9, -20, 4, 10)) == 1     # at 80 us: strictly before
  assert int(clock.rounds_finished_before(9, -25, 4, 10)) == 1     # at 75 us
  assert int(clock.rounds_finished_before(2, -5, 4, 10)) == 0


def test_enqueue_is_a_fifo_behind_the_backlog_unless_flushed():
  busy = tb.wide(jnp.array([-5, 7], jnp.int32))
  service = tb.wide(jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32))
  kept = tb.narrow(queue.enqueue(busy, service, flush=False))
  chex.assert_trees_all_equal(kept, jnp.array([[1, 3, 6], [11, 16, 22]]))
  flushed = tb.narrow(queue.enqueue(busy, service, flush=True))
  chex.assert_trees_all_equal(flushed, jnp.array([[1, 3, 6], [4, 9, 15]]))


def test_serve_matches_a_plain_fifo():
  rng = np.random.default_rng(0)
  k, n = 40, 5
  server = rng.integers(0, n, k).astype(np.int32)
  arrive = rng.integers(-50, 0, k).astype(np.int32)
  svc = rng.integers(0, 20, k).astype(np.int32)
  live = rng.random(k) < 0.8
  svc = np.where(live, svc, 0)
  tie = rng.permutation(k).astype(np.int32)
  busy0 = rng.integers(-60, 10, n).astype(np.int32)
  serve = jax.jit(lambda *a: queue.serve(*a[:5], ties=(a[5],)))   # one compile, not op by op
  done, busy = serve(jnp.asarray(server), jnp.asarray(arrive), tb.wide(jnp.asarray(svc)),
                     tb.wide(jnp.asarray(busy0)), jnp.asarray(live), jnp.asarray(tie))
  done, busy = np.asarray(tb.narrow(done)), np.asarray(tb.narrow(busy))
  want_busy = busy0.copy()
  for i in sorted(np.flatnonzero(live), key=lambda i: (server[i], arrive[i], tie[i])):
    want_busy[server[i]] = max(want_busy[server[i]], arrive[i]) + svc[i]
    assert done[i] == want_busy[server[i]], i
  np.testing.assert_array_equal(busy, want_busy)


def test_fates_at_send():
  dt, depth, t = 10, 2, 3
  round_ticks = jnp.array([4, 4])            # sender rounds: 40 us
  completion = jnp.array([[10, 50], [10, 20]])
  arrival = completion + 5
  rdst = jnp.array([[4, 4], [8, 4]])
  fate, tick = fates.at_send(t, completion, arrival, round_ticks, rdst, depth, dt, flush=True)
  # node 0: message 1 not uploaded within its 40 us round: flushed at the next round end
  chex.assert_trees_all_equal(fate, jnp.array([[fates.DELIVERED, fates.FLUSHED],
                                               [fates.DELIVERED, fates.DELIVERED]]))
  chex.assert_trees_all_equal(tick, jnp.array([[7, 7], [7, 7]]))
  fate, tick = fates.at_send(t, completion, arrival + 100, round_ticks, rdst, depth, dt, flush=False)
  # arrival 115-155 us after tick 3 ends: past the sender's round 3 + 2 * 4 = tick 11
  chex.assert_trees_all_equal(fate, jnp.full((2, 2), fates.EXPIRED))
  chex.assert_trees_all_equal(tick, jnp.full((2, 2), 11))


def test_supersede_marks_only_same_key_same_tick_pending():
  old_key = jnp.array([[[1, 2]], [[1, 1]]])                # (N=2, D=1, M=2)
  old_tick = jnp.array([[[9, 9]], [[9, 5]]])
  pending = jnp.array([[[True, True]], [[True, False]]])
  new_key = jnp.array([[1, 7], [1, 1]])
  new_tick = jnp.array([[9, 9], [8, 9]])
  live = jnp.array([[True, True], [True, False]])
  got = fates.supersede(old_key, old_tick, pending, new_key, new_tick, live)
  chex.assert_trees_all_equal(got, jnp.array([[[True, False]], [[False, False]]]))


def test_newest_per_sender_keeps_the_last_upload():
  recv = jnp.array([0, 0, 0, 1, 2, 2])
  sender = jnp.array([5, 5, 6, 5, 5, 5])
  done = jnp.array([30, 10, 20, 5, 1, 2])
  got = fates.newest_per_sender(recv.at[4].set(3), sender, done, n=3)  # recv == n: not taking part
  chex.assert_trees_all_equal(got, jnp.array([False, True, False, False, False, False]))


def test_retire_and_counts_add_up():
  retired = fates.retire(jnp.zeros(7, jnp.int32), jnp.array([[1, 3], [4, 2]]), jnp.array([True, False]))
  chex.assert_trees_all_equal(retired, jnp.array([0, 1, 0, 1, 0, 0, 0]))
  c = fates.to_host(jax.jit(fates.counts)(jnp.array([1, 2, 3, 4, 1, 5, 6]), jnp.array([2, 2, 2, 2, 9, 2, 1]),
                                          retired, 9, 5))
  assert c == {"msgs_sent": 9, "msgs_delivered": 4, "msgs_superseded": 1, "msgs_overflow": 1,
               "msgs_flushed": 2, "msgs_expired": 1, "msgs_lost": 1, "msgs_in_flight": 1}


def _random_records(rng, n=4, d=3, m=5, f=2):
  due = rng.random((n, d, m)) < 0.5
  src = np.broadcast_to(np.arange(n)[:, None, None], (n, d, m))
  slot = np.broadcast_to(np.arange(d)[None, :, None], (n, d, m))
  dst = rng.integers(0, n, (n, d, m))
  frag = rng.integers(0, f, (n, d, m))
  return [jnp.asarray(a, jnp.int32 if a.dtype != bool else bool) for a in (due, src, slot, dst, frag)]


def test_route_sums_due_payloads_into_receivers():
  rng = np.random.default_rng(1)
  n, d, m, f, width = 4, 3, 5, 2, 3
  payload = jnp.asarray(rng.normal(size=(d, n, f, width)), jnp.float32)
  due, src, slot, dst, frag = _random_records(rng, n, d, m, f)
  weight = jnp.asarray(rng.random((n, d, m)), jnp.float32)
  sums, counts = ring.route(payload, due, src, slot, dst, frag)
  wsums, wcounts = ring.route(payload, due, src, slot, dst, frag, weight)
  want, wwant = np.zeros((n, f, width)), np.zeros((n, f, width))
  wc, c = np.zeros((n, f)), np.zeros((n, f))
  for i, s, k in zip(*np.nonzero(np.asarray(due))):
    r, g = int(dst[i, s, k]), int(frag[i, s, k])
    want[r, g] += np.asarray(payload[slot[i, s, k], src[i, s, k], g])
    wwant[r, g] += float(weight[i, s, k]) * np.asarray(payload[slot[i, s, k], src[i, s, k], g])
    c[r, g] += 1
    wc[r, g] += float(weight[i, s, k])
  np.testing.assert_allclose(sums, want, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(counts, c)
  np.testing.assert_allclose(wsums, wwant, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(wcounts, wc, rtol=1e-6)
  # the Inbox view routes its copy sets and adds them up
  copies = ring.Copies(due, src, slot, dst, frag, jnp.zeros_like(src))
  s2, c2 = ring.Inbox(payload, (copies, copies)).sum()
  np.testing.assert_allclose(s2, 2 * sums, rtol=1e-6)
  np.testing.assert_array_equal(c2, 2 * counts)


def test_ring_write_touches_only_ending_nodes():
  r = jnp.zeros((2, 3, 1, 2))
  x = jnp.ones((3, 1, 2))
  out = ring.write(r, jnp.array([1, 0, 1]), x, jnp.array([True, True, False]))
  chex.assert_trees_all_equal(out[1, 0], x[0])
  chex.assert_trees_all_equal(out[0, 1], x[1])
  assert float(out.sum()) == 4.0                                   # node 2 unchanged


def test_pairwise_exchange_averages_both_partners_in_order():
  n, d, m = 3, 1, 1
  params = jnp.array([[0.0], [4.0], [8.0]])
  dst = jnp.array([[[1]], [[2]], [[0]]])            # 0 -> 1, 1 -> 2, 2 -> 0
  rep = replies.empty(n, d, m)._replace(done=jnp.array([[[3]], [[1]], [[2]]]))
  due = jnp.array([[[True]], [[True]], [[False]]])
  out = replies.exchange(params, dst, rep, jnp.zeros((n, d), jnp.int32), 0, due,
                         lat_us=jnp.zeros(n, jnp.int32), dt_us=1, age_cap=10)
  # by pinger: (0, 1) -> 2, 2, 8; then (1, 2) -> 2, 5, 5
  chex.assert_trees_all_close(out, jnp.array([[2.0], [5.0], [5.0]]))


def _one_ping():
  """Node 0 pinged node 1 at the end of tick 3 (table slot 0); the upload took 5 us, no latency."""
  n, d, m = 2, 2, 1
  z = jnp.zeros((n, d, m), jnp.int32)
  msg_dst = z.at[0, 0, 0].set(1)
  msg_fate = z.at[0, 0, 0].set(fates.DELIVERED)
  msg_done = z.at[0, 0, 0].set(5)
  slot_tick = jnp.zeros((n, d), jnp.int32).at[0, 0].set(3)
  return n, d, m, msg_dst, msg_fate, msg_done, slot_tick


def test_a_reply_is_queued_at_the_ping_arrival_and_consumed_at_the_next_round_end():
  n, d, m, msg_dst, msg_fate, msg_done, slot_tick = _one_ping()
  busy = tb.wide(jnp.full((n,), -40, jnp.int32))            # both queues idle
  kw = dict(lat_us=jnp.zeros(n, jnp.int32), round_ticks=jnp.array([4, 4]),
            service=lambda s, r, f: tb.wide(jnp.full(s.shape, 7, jnp.int32)), depth=d, dt_us=10,
            block_us=40, age_cap=100)
  # t = 7 (end at 80 us): the ping arrived at 45 us (-35), node 1 had ended round 0 (at 40 us)
  rep, busy2, made = replies.make(replies.empty(n, d, m), msg_dst, msg_fate, msg_done, slot_tick, 7, busy,
                                  pairwise=False, **kw)
  assert int(made) == 1
  assert (int(rep.fate[0, 0, 0]), int(rep.tick[0, 0, 0])) == (fates.DELIVERED, 7)   # back at 52 us
  assert (int(rep.done[0, 0, 0]), int(rep.slot[0, 0, 0]), int(rep.made[0, 0, 0])) == (12, 0, 3)
  assert int(tb.narrow(busy2)[1]) == -28 and int(tb.narrow(busy2)[0]) == -40
  # a replier behind its queue answers later: busy until 10 us after the block's end
  rep, _, _ = replies.make(replies.empty(n, d, m), msg_dst, msg_fate, msg_done, slot_tick, 7,
                           tb.wide(jnp.array([-40, 10], jnp.int32)), pairwise=False, **kw)
  assert (int(rep.done[0, 0, 0]), int(rep.tick[0, 0, 0])) == (57, 11)
  # push-pull: a replier that has finished no round yet does not answer; pairwise always does
  late = slot_tick.at[0, 0].set(1)
  _, _, made = replies.make(replies.empty(n, d, m), msg_dst, msg_fate, msg_done.at[0, 0, 0].set(0), late, 3,
                            busy, pairwise=False, **kw)
  assert int(made) == 0
  _, _, made = replies.make(replies.empty(n, d, m), msg_dst, msg_fate, msg_done.at[0, 0, 0].set(0), late, 3,
                            busy, pairwise=True, **kw)
  assert int(made) == 1


def test_newest_only_supersedes_the_earlier_upload_of_the_same_sender():
  n, d, m, msg_dst, msg_fate, msg_done, slot_tick = _one_ping()
  # node 1 pinged node 0 too (slot 0, done 5 us), and node 0's ping got a reply from node 1
  msg_dst = msg_dst.at[1, 0, 0].set(0)
  msg_fate = msg_fate.at[1, 0, 0].set(fates.DELIVERED)
  msg_done = msg_done.at[1, 0, 0].set(5)
  slot_tick = slot_tick.at[1, 0].set(3)
  msg_tick = jnp.zeros_like(msg_fate).at[:, 0, 0].set(7)
  rep = replies.empty(n, d, m)._replace(fate=msg_fate.at[1, 0, 0].set(0), tick=msg_tick,
                                        done=jnp.zeros_like(msg_done).at[0, 0, 0].set(12))
  fate, rep2, due_ping, due_pong = replies.newest_only(msg_dst, msg_fate, msg_tick, msg_done, rep, slot_tick, 7,
                                                       dt_us=10, age_cap=100, pairwise=False)
  # at node 0: node 1's ping (done 5 us) is older than node 1's reply (done 12 us): superseded
  assert int(fate[1, 0, 0]) == fates.SUPERSEDED and not bool(due_ping[1, 0, 0])
  assert bool(due_pong[0, 0, 0]) and bool(due_ping[0, 0, 0])
  # pairwise replies are never averaged, so they replace nothing
  fate, _, due_ping, _ = replies.newest_only(msg_dst, msg_fate, msg_tick, msg_done, rep, slot_tick, 7,
                                             dt_us=10, age_cap=100, pairwise=True)
  assert int(fate[1, 0, 0]) == fates.DELIVERED and bool(due_ping[1, 0, 0])


def test_threefry_unrolled_on_cpu_gives_jaxs_bits():
  """divjax.xla_cpu registers JAX's unrolled Threefry for CPUs: no loop in the program, and
  the bits JAX's own (rolled) CPU lowering gives (recorded from a process without divjax)."""
  from divjax import xla_cpu
  assert xla_cpu.unroll_threefry()
  draw = jax.jit(lambda k: jax.random.bits(jax.random.fold_in(k, 7), (4,)))
  key = jax.random.key(3)
  if jax.default_backend() == "cpu":
    assert " while(" not in draw.lower(key).compile().as_text()
  np.testing.assert_array_equal(np.asarray(draw(key)), [1876654423, 1575774796, 3466474743, 3854236509])
