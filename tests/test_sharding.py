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
