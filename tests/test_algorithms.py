"""Properties every registered algorithm must have, run automatically through the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divjax import algorithms, simulate, topology
from divjax.config import ConfigError
from conftest import tiny_config


def run_with(cfg, params=None, n_calls=1, length=40):
  """Advances `n_calls` chunks of `length` ticks; returns the states after each chunk."""
  sim = simulate.build(cfg)
  state = sim.engine.init(sim.run_key)
  if params is not None:
    state = state.with_params(jnp.array(params, copy=True))  # the chunk donates its input
  chunk = simulate.compile_chunk(sim, state, length)
  states = []
  for _ in range(n_calls):
    state, _ = chunk(state, sim.params)
    states.append(jax.device_get(state))
  return sim, states


# The default run keeps one algorithm of each family (async fragments, async queue, sync);
# `-m slow` runs them all.
IDENTICAL_DEFAULT = {"divshare", "swift", "el"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=() if n in IDENTICAL_DEFAULT else pytest.mark.slow)
                                  for n in sorted(algorithms.REGISTRY)])
def test_identical_models_stay_identical_with_lr_zero(name):
  cfg = tiny_config(f"algorithm={name}", "lr=0", "network.upload_mbps=0.2")
  sim, states = run_with(cfg)
  p0 = np.asarray(sim.task.init_flat(jax.random.fold_in(sim.run_key, 3)))
  assert states[-1].rounds.min() >= 1
  np.testing.assert_allclose(states[-1].params, np.tile(p0, (cfg.n_nodes, 1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(algorithms.DOUBLY_STOCHASTIC))
@pytest.mark.parametrize("topo", ["ring", pytest.param("torus", marks=pytest.mark.slow),
                                  pytest.param("random_ring", marks=pytest.mark.slow)])
def test_doubly_stochastic_mixing_keeps_mean_and_never_grows_consensus(name, topo):
  if name in algorithms.FIXED_TOPOLOGY and topo in topology.RANDOM:
    pytest.skip(f"{name} needs a fixed graph")
  graph = name in algorithms.NEEDS_TOPOLOGY
  if not graph and topo != "ring":
    pytest.skip(f"{name} uses no graph: one case is enough")
  cfg = tiny_config(f"algorithm={name}", *([f"topology={topo}"] if graph else []), "lr=0",
                    "network.latency_ms=0", "n_nodes=8")
  x0 = jax.random.normal(jax.random.key(7), (8, 122))
  _, states = run_with(cfg, params=x0, n_calls=15, length=cfg.local_steps)  # async chunks: whole rounds
  assert states[-1].rounds[0] >= 8
  cons = [float(simulate.consensus_distance(jnp.asarray(s.params))) for s in states]
  assert all(b <= a * (1 + 1e-6) for a, b in zip(cons, cons[1:])), cons
  assert cons[-1] < 0.5 * float(simulate.consensus_distance(x0))
  np.testing.assert_allclose(states[-1].params.mean(0), np.asarray(x0.mean(0)), atol=2e-6)


@pytest.mark.parametrize("topo, rounds", [("ring", 25), pytest.param("torus", 10, marks=pytest.mark.slow)])
def test_dpsgd_contraction_matches_second_eigenvalue(topo, rounds):
  n = 16
  cfg = tiny_config("algorithm=dpsgd", f"topology={topo}", "lr=0", f"n_nodes={n}")
  edges = topology.fixed(topo, n)
  w, self_w = topology.metropolis_weights(jnp.asarray(edges.src), jnp.asarray(edges.dst), n)
  lam2 = topology.second_eigenvalue(topology.dense_mixing(edges.src, edges.dst, w, self_w, n))
  x0 = jax.random.normal(jax.random.key(1), (n, 122))
  _, states = run_with(cfg, params=x0, n_calls=rounds * 5, length=1)
  by_round = {}
  for s in states:
    by_round.setdefault(int(s.rounds[0]), float(simulate.consensus_distance(jnp.asarray(s.params))))
  r = sorted(by_round)[-1]
  r0 = r - 5
  measured = (by_round[r] / by_round[r0]) ** (1 / (2 * (r - r0)))  # consensus is a squared norm
  assert abs(measured - lam2) / lam2 < 0.02, (measured, lam2)


def test_topology_errors():
  with pytest.raises(topology.TopologyError, match="disconnected"):
    topology.fixed("edges", 4, edge_list=[[0, 1], [2, 3]])
  with pytest.raises(topology.TopologyError, match="topology_degree"):
    topology.fixed("regular", 5, degree=3)
  with pytest.raises(ConfigError, match="topology"):
    tiny_config("algorithm=dpsgd", "topology=hypercube")
  with pytest.raises(ConfigError, match="topology_edges"):
    tiny_config("algorithm=dpsgd", "topology=edges")
  with pytest.raises(ConfigError, match="disconnected"):
    tiny_config("algorithm=dpsgd", "topology=edges", "topology_edges=[[0, 1], [2, 3], [4, 5]]")


def test_metropolis_by_hand():
  # path 0-1-2: W = [[2/3,1/3,0],[1/3,1/3,1/3],[0,1/3,2/3]]
  edges = topology._both_ways(np.array([[0, 1], [1, 2]]))
  w, self_w = topology.metropolis_weights(jnp.asarray(edges.src), jnp.asarray(edges.dst), 3)
  mat = topology.dense_mixing(edges.src, edges.dst, w, self_w, 3)
  np.testing.assert_allclose(mat, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]], rtol=1e-6)


def test_new_algorithm_input_errors():
  with pytest.raises(ConfigError, match="fixed graph"):
    tiny_config("algorithm=swift_original", "topology=random_ring")
  with pytest.raises(ConfigError, match="not regular"):
    tiny_config("algorithm=swift_original", "topology=edges", "topology_edges=[[0, 1], [1, 2], [2, 3], [3, 4], [4, 5]]")
  with pytest.raises(ConfigError, match="fixed graph"):
    tiny_config("algorithm=adpsgd_pairwise", "topology=random_ring")
  with pytest.raises(ConfigError, match="server.cohort"):
    tiny_config("algorithm=fedavg", "server.cohort=7")
  with pytest.raises(ConfigError, match="registered: .*adpsgd_pairwise.*fedavg.*swift_original"):
    tiny_config("algorithm=choco")  # not (yet) registered


def test_fedavg_cohort_and_global_model():
  """Only the cohort trains; afterwards every node holds the same (global) model."""
  cfg = tiny_config("algorithm=fedavg", "server.cohort=2", "network.latency_ms=0")
  _, states = run_with(cfg, length=20)
  s = states[-1]
  assert s.rounds[0] >= 2
  assert s.steps.sum() == s.rounds[0] * 2 * cfg.local_steps
  np.testing.assert_array_equal(s.params, np.broadcast_to(s.params[0], s.params.shape))


def test_pairwise_exchanges_need_both_links():
  """An exchange's reply queues behind the replier's backlog: slower links, fewer exchanges done."""
  done = []
  for mbps in (5.0, 0.05):
    cfg = tiny_config("algorithm=adpsgd_pairwise", f"network.upload_mbps={mbps}")
    _, states = run_with(cfg)
    done.append(int(states[-1].age_count))
  assert done[0] > done[1] > 0, done


def test_sgp_push_sum_keeps_mass_and_weighted_sum_including_what_is_in_flight():
  """SGP (algorithms/sgp.py): sum_i w_i + in-flight mass = n, and sum_i w_i z_i + in-flight
  m z = sum of the initial models, at every chunk end, with lr = 0."""
  from divjax import fates
  cfg = tiny_config("algorithm=sgp", "lr=0", "n_nodes=8", "network.stragglers.fraction=0.25",
                    "network.stragglers.slowdown=4")
  x0 = jax.random.normal(jax.random.key(3), (8, 122))
  _, states = run_with(cfg, params=x0, n_calls=6, length=cfg.local_steps)
  for s in states:
    weight, sent = s.alg
    m = s.msgs
    flying = (m.fate == fates.DELIVERED) & (m.tick >= s.tick)                     # (N, D, 1)
    n_i, d_i, _ = np.nonzero(flying)
    mass = sent[n_i, d_i]
    assert abs(weight.sum() + mass.sum() - 8.0) < 1e-5
    total = (weight[:, None] * s.params).sum(0) + (mass[:, None] * s.ring_now()[d_i, n_i, 0, :122]).sum(0)
    np.testing.assert_allclose(total, np.asarray(x0).sum(0), rtol=1e-5, atol=2e-5)
  assert states[-1].rounds.min() >= 4 and weight.min() < 0.99     # weights do move
  cons = float(simulate.consensus_distance(jnp.asarray(states[-1].params)))
  assert cons < 0.5 * float(simulate.consensus_distance(x0))
