"""Static structure and traced Params: configs that differ only in Params share one program."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from divjax import fates, simulate

BASE = ["ring_depth=4", "network.stragglers.fraction=0.34", "network.stragglers.slowdown=3",
        "network.stragglers.kind=both", "momentum=0.5"]
# every kind of Params: run key, lr, momentum, link rates, latency, straggler choice and slowdown
CHANGED = ["seed=5", "lr=0.2", "momentum=0.8", "network.upload_mbps=0.2", "network.download_mbps=3",
           "network.download_cap=true", "network.latency_ms=7", "network.stragglers.slowdown=5",
           "network.stragglers.fraction=0.5", "network.header_bits=800", "data.seed=4"]


@pytest.mark.parametrize("algorithm", ["algorithm=divshare", pytest.param("algorithm=adpsgd", marks=pytest.mark.slow),
                                       "algorithm=dpsgd"])
def test_changing_only_params_does_not_compile_again(algorithm):
  cfg_a = tiny_config(*BASE, algorithm, "data.seed=0")
  cfg_b = tiny_config(*BASE, algorithm, "data.seed=0", *CHANGED)
  sim, sim_b = simulate.build(cfg_a), simulate.build(cfg_b)
  traces = []

  def chunk(s, p):
    traces.append(1)
    return sim.engine.advance(s, p, 16)

  run = jax.jit(chunk)
  params_b = sim.engine.params(cfg_b, sim_b.params.data)   # data.seed: cfg_b's own data and partitions
  state_a, _ = run(sim.engine.init(sim.params.key), sim.params)
  state_b, _ = run(sim.engine.init(params_b.key), params_b)
  assert len(traces) == 1

  # the shared program gives exactly what cfg_b's own build gives
  assert sim_b.engine.static == sim.engine.static
  own_b, _ = jax.jit(lambda s, p: sim_b.engine.advance(s, p, 16))(sim_b.engine.init(sim_b.run_key), sim_b.params)
  np.testing.assert_array_equal(np.asarray(state_b.params), np.asarray(own_b.params))
  assert fates.to_host(sim.engine.counts(state_b)) == fates.to_host(sim_b.engine.counts(own_b))
  assert not np.array_equal(np.asarray(state_a.params), np.asarray(state_b.params))


def test_params_of_another_structure_are_refused_naming_the_keys():
  sim = simulate.build(tiny_config(*BASE))
  with pytest.raises(ValueError, match=r"fragments, n_nodes: differ"):
    sim.engine.params(tiny_config(*BASE, "n_nodes=8", "fragments=1"), sim.params.data)


def test_data_seed_drives_host_draws_and_seed_the_run_key():
  """`seed` alone changes the initial model, batches and plans, not the data or stragglers."""
  a = simulate.build(tiny_config(*BASE, "seed=1", "data.seed=3"))
  b = simulate.build(tiny_config(*BASE, "seed=2", "data.seed=3"))
  c = simulate.build(tiny_config(*BASE, "seed=1", "data.seed=4"))
  np.testing.assert_array_equal(a.task.x_train, b.task.x_train)
  np.testing.assert_array_equal(a.engine.net.straggler, b.engine.net.straggler)
  assert a.engine.static == b.engine.static
  assert not np.array_equal(np.asarray(a.task.init_flat(a.run_key)), np.asarray(b.task.init_flat(b.run_key)))
  assert not np.array_equal(a.task.x_train, c.task.x_train)
  assert not np.array_equal(np.asarray(a.params.frag_layout), np.asarray(c.params.frag_layout))
  assert a.engine.static == c.engine.static   # the data and partitions are Params too
  # ... except a random regular graph, which the algorithm closes over
  reg = lambda s: simulate.build(tiny_config("algorithm=dpsgd", "topology=regular", "topology_degree=3",
                                             f"data.seed={s}")).engine.static
  assert reg(3) != reg(4)
  # and data.seed defaults to seed, so a config without it is what it always was
  d = simulate.build(tiny_config(*BASE, "seed=3"))
  np.testing.assert_array_equal(a.task.x_train, d.task.x_train)
