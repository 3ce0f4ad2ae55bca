"""The node axis sharded over several devices (DESIGN.md 7): a layout, not a change of result.

conftest.py gives the test process 4 CPU devices.
"""

import os

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from divjax import config, engine, sharding, simulate
from conftest import tiny_config

STRAGGLERS = ["network.stragglers.fraction=0.34", "network.stragglers.slowdown=3",
              "network.stragglers.kind=both", "network.upload_mbps=0.3"]


def run(cfg):
  summary, state = simulate.run(cfg)
  return summary, jax.device_get(state)


@pytest.mark.parametrize("algorithm, devices, extra", [
    ("divshare", 2, STRAGGLERS),
    pytest.param("divshare", "auto", [], marks=pytest.mark.slow),  # 6 nodes, 4 test devices: 3
    pytest.param("adpsgd", 2, STRAGGLERS, marks=pytest.mark.slow),
    pytest.param("swift_original", 2, ["topology=ring"], marks=pytest.mark.slow),
    ("dpsgd", 2, ["topology=ring"] + STRAGGLERS),
])
def test_sharded_run_equals_unsharded(algorithm, devices, extra):
  """Same messages, clocks and metrics; parameters equal up to float32 rounding (XLA may pick
  another matmul kernel for N/K nodes than for N: the summation order of a dot can differ)."""
  args = [f"algorithm={algorithm}", "fragments=1" if algorithm != "divshare" else "fragments=2"] + extra
  one, s1 = run(tiny_config(*args))
  many, sk = run(tiny_config(*args, f"devices={devices}"))
  assert one["status"] == many["status"] == "completed"
  assert (one["devices"], many["devices"]) == (1, 3 if devices == "auto" else devices)
  if isinstance(s1, engine.State):
    assert engine.message_counts(s1) == engine.message_counts(sk)
    np.testing.assert_array_equal(s1.msgs.fate, sk.msgs.fate)
    np.testing.assert_array_equal(s1.backlog_us, sk.backlog_us)
  np.testing.assert_array_equal(s1.steps, sk.steps)
  np.testing.assert_array_equal(s1.rounds, sk.rounds)
  np.testing.assert_allclose(s1.params, sk.params, rtol=1e-5, atol=1e-6)
  for key in ("acc_mean", "acc_min", "loss_mean", "consensus", "train_loss", "msgs_delivered"):
    np.testing.assert_allclose(one["final"][key], many["final"][key], rtol=1e-4)


def test_state_is_split_along_nodes():
  """The engine names each leaf's node axis; with ring depth = N (8 here) the ring used to be
  split along its slot axis, because node axes were guessed from shapes."""
  cfg = tiny_config("n_nodes=8", "devices=4", "ring_depth=8")
  sim = simulate.build(cfg)
  state = simulate.place(sim, sim.engine.init(sim.run_key))
  state, _ = simulate.compile_chunk(sim, state, 8)(state, sim.params)
  for leaf in (state.params, state.steps, state.msgs.fate):
    assert leaf.sharding.spec == P(sharding.AXIS)
    assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}  # 8 nodes over 4 devices
  assert len(state.params.sharding.device_set) == 4
  assert state.ring.shape[:2] == (8, 8)
  assert state.ring.sharding.spec == P()  # (D, N, F, W): gathered from by every node, replicated
  assert state.msgs.slot_tick.sharding.spec == P(sharding.AXIS)  # (N, D), D = N: split along N


def test_bad_device_counts_are_refused():
  with pytest.raises(config.ConfigError, match="devices"):
    tiny_config("devices=4")  # 6 nodes
  with pytest.raises(config.ConfigError, match="devices: must be a positive integer or 'auto'"):
    tiny_config("devices=0")
  with pytest.raises(config.ConfigError, match="devices: must be a positive integer or 'auto'"):
    tiny_config("devices=many")
  with pytest.raises(ValueError, match="devices: 12 requested but only"):
    simulate.build(tiny_config("n_nodes=12", "recipients=2", "devices=12"))


def test_auto_devices_is_the_largest_divisor_of_n_nodes_available(monkeypatch):
  assert len(jax.devices()) == 4
  assert [sharding.device_count("auto", n) for n in (6, 8, 7, 2, 1)] == [3, 4, 1, 2, 1]
  assert sharding.device_count(2, 8) == 2
  # before the backend starts, `auto` asks for as many host devices as cores allow
  monkeypatch.setattr(sharding, "cpu_cores", lambda: 2)
  asked = []
  monkeypatch.setattr(jax.config, "update", lambda name, v: asked.append((name, v)))
  monkeypatch.setenv("XLA_FLAGS", "")
  sharding.request_cpu_devices("auto", 60)
  sharding.request_cpu_devices("auto", 7)  # prime: one device, nothing asked
  assert asked == [("jax_num_cpu_devices", 2)]
  assert "--xla_cpu_multi_thread_eigen=false" in os.environ["XLA_FLAGS"]


def test_per_node_indexing_stays_on_its_device():
  """divjax.rows: node n's row at an index of its own, read and written with the node axis
  split over 2 devices: no collective, and the values of plain indexing."""
  from jax.sharding import NamedSharding
  from divjax import rows
  mesh = sharding.node_mesh(2)
  split = NamedSharding(mesh, P(sharding.AXIS))
  a = jax.device_put(np.arange(8 * 3 * 2, dtype=np.int32).reshape(8, 3, 2), split)
  k = jax.device_put(np.array([0, 2, 1, 1, 0, 2, 2, 0], np.int32), split)
  write = jax.device_put(np.arange(8) % 3 != 0, split)
  v = jax.device_put(-np.ones((8, 2), np.int32), split)
  via_rows = jax.jit(lambda a, k, v, w: (rows.take(a, k), rows.put(a, k, v, w)), out_shardings=split)
  text = via_rows.lower(a, k, v, write).compile().as_text()
  assert " all-gather(" not in text and " all-reduce(" not in text
  nodes = np.arange(8)
  a_, k_, v_, w_ = (np.asarray(x) for x in (a, k, v, write))
  want = a_.copy()
  want[nodes[w_], k_[w_]] = v_[w_]
  got_take, got_put = via_rows(a, k, v, write)
  np.testing.assert_array_equal(np.asarray(got_take), a_[nodes, k_])
  np.testing.assert_array_equal(np.asarray(got_put), want)


def test_sharded_round_end_gathers_only_payloads():
  """The DivShare chunk over 2 devices: the message tables are written where their rows are.
  What is left to all-gather is the routing's (payloads, their counts and indices, per routing
  step) and the ring write's (the snapshots and their slots): 6 in this program; writing the
  tables as a[arange(N), k] added 19 more (one per table and index)."""
  cfg = tiny_config("algorithm=divshare", "fragments=2", "devices=2")
  sim = simulate.build(cfg)
  state = simulate.place(sim, sim.engine.init(sim.run_key))
  assert simulate.compile_chunk(sim, state, 8).as_text().count(" all-gather(") <= 6
