"""Communication graphs: fixed undirected graphs as edge lists, and per-round samplers.

Every graph is a fixed-length list of directed edges (src, dst) (an undirected edge appears
in both directions), so that mixing is a gather + segment_sum with a static edge count.
Fixed graphs are built on the host (numpy); per-round random graphs are sampled in JAX from a
key, also with a static edge count.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

FIXED = ("ring", "torus", "regular", "complete", "edges")
RANDOM = ("random_ring",)
NAMES = FIXED + RANDOM


class TopologyError(ValueError):
  """A graph is missing, malformed or disconnected."""


class Edges(NamedTuple):
  src: np.ndarray  # (E,) int32
  dst: np.ndarray  # (E,) int32


def _both_ways(pairs: np.ndarray) -> Edges:
  pairs = np.unique(np.sort(pairs, axis=1), axis=0)
  pairs = pairs[pairs[:, 0] != pairs[:, 1]]
  src = np.concatenate([pairs[:, 0], pairs[:, 1]]).astype(np.int32)
  dst = np.concatenate([pairs[:, 1], pairs[:, 0]]).astype(np.int32)
  return Edges(src, dst)


def torus_shape(n: int) -> tuple[int, int]:
  """The most square a x b = n grid (a <= b)."""
  a = int(np.floor(np.sqrt(n)))
  while n % a:
    a -= 1
  return a, n // a


def fixed(name: str, n: int, *, degree: int = 4, seed: int = 0,
          edge_list: Optional[list] = None) -> Edges:
  """A fixed undirected graph on n nodes."""
  i = np.arange(n)
  if name == "ring":
    pairs = np.stack([i, (i + 1) % n], 1)
  elif name == "torus":
    a, b = torus_shape(n)
    r, c = i // b, i % b
    pairs = np.concatenate([np.stack([i, r * b + (c + 1) % b], 1),
                            np.stack([i, ((r + 1) % a) * b + c], 1)])
  elif name == "complete":
    pairs = np.array([(u, v) for u in range(n) for v in range(u + 1, n)]).reshape(-1, 2)
  elif name == "regular":
    import networkx as nx  # well-kept generator for random regular graphs
    if degree >= n or (degree * n) % 2:
      raise TopologyError(f"topology_degree: a {degree}-regular graph on {n} nodes does not exist "
                          f"(need degree < n_nodes and degree * n_nodes even)")
    g = nx.random_regular_graph(degree, n, seed=seed)
    pairs = np.array(list(g.edges())).reshape(-1, 2)
  elif name == "edges":
    if not edge_list:
      raise TopologyError("topology_edges: topology 'edges' needs a non-empty list of [u, v] pairs")
    pairs = np.asarray(edge_list)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.min() < 0 or pairs.max() >= n:
      raise TopologyError(f"topology_edges: expected [u, v] pairs with ids in 0..{n - 1}")
  else:
    raise TopologyError(f"topology: unknown {name!r} (allowed: {', '.join(NAMES)})")
  edges = _both_ways(pairs.astype(np.int64))
  check_connected(edges, n, name)
  return edges


def check_connected(edges: Edges, n: int, name: str = "graph") -> None:
  seen = np.zeros(n, bool)
  seen[0] = True
  frontier = [0]
  adj = [[] for _ in range(n)]
  for s, d in zip(edges.src.tolist(), edges.dst.tolist()):
    adj[s].append(d)
  while frontier:
    u = frontier.pop()
    for v in adj[u]:
      if not seen[v]:
        seen[v] = True
        frontier.append(v)
  if not seen.all():
    missing = np.flatnonzero(~seen)[:10].tolist()
    raise TopologyError(f"topology: the {name} graph is disconnected (e.g. nodes {missing} cannot be "
                        f"reached from node 0); decentralized averaging needs a connected graph")


def random_ring(key, n: int) -> tuple[jax.Array, jax.Array]:
  """A fresh random ring: nodes in a random cyclic order, each linked to both neighbours.

  Returns (src, dst) of static length 2n (for n = 2 the single edge appears twice, which
  the Metropolis weights below count correctly).
  """
  order = jax.random.permutation(key, n).astype(jnp.int32)
  nxt = jnp.roll(order, -1)
  return jnp.concatenate([order, nxt]), jnp.concatenate([nxt, order])


def metropolis_weights(src, dst, n: int):
  """Metropolis-Hastings weights w_e = 1 / (1 + max(deg_src, deg_dst)) and the self weights.

  Symmetric and doubly stochastic on any undirected (multi)graph given in both directions.
  Returns (w (E,), self_w (N,)).
  """
  deg = jax.ops.segment_sum(jnp.ones_like(src, jnp.float32), src, num_segments=n)
  w = 1.0 / (1.0 + jnp.maximum(deg[src], deg[dst]))
  self_w = 1.0 - jax.ops.segment_sum(w, src, num_segments=n)
  return w, self_w


def dense_mixing(src, dst, w, self_w, n: int) -> np.ndarray:
  """W as a dense numpy matrix (x_new = W @ x), for tests and spectral analysis only."""
  mat = np.diag(np.asarray(self_w, np.float64))
  np.add.at(mat, (np.asarray(dst), np.asarray(src)), np.asarray(w, np.float64))
  return mat


def second_eigenvalue(mat: np.ndarray) -> float:
  """Second-largest eigenvalue modulus of a symmetric mixing matrix."""
  ev = np.sort(np.abs(np.linalg.eigvalsh(mat)))[::-1]
  return float(ev[1])


def neighbour_lists(edges: Edges, n: int, name: str = "graph") -> np.ndarray:
  """(N, K) neighbours of every node, sorted, for a K-regular graph (algorithms that keep one
  slot per neighbour need the same K everywhere)."""
  deg = np.bincount(edges.src, minlength=n)
  if deg.min() != deg.max():
    raise TopologyError(f"topology: the {name} graph is not regular (degrees {deg.min()} to {deg.max()}); "
                        f"this algorithm needs every node to have the same number of neighbours "
                        f"(ring, torus, regular, complete, or such an edge list)")
  order = np.lexsort((edges.dst, edges.src))
  return edges.dst[order].reshape(n, int(deg[0])).astype(np.int32)


MAX_GRAPH_EDGES = 1 << 24    # fixed graphs are built (and checked for connectivity) on the host


def check_config(cfg, algorithm: str, *, fixed_only: bool, regular: bool = False, build: bool = True) -> None:
  """Refuses a graph an algorithm cannot use, before anything is compiled (a ValueError naming
  `topology`): a random one where a fixed one is needed, and unless `build` is False, one too
  large to build on the host, a disconnected one, or (`regular`) one whose nodes have
  different degrees."""
  if fixed_only and cfg.topology not in FIXED:
    raise ValueError(f"topology: algorithm {algorithm!r} needs a fixed graph, one of "
                     f"{', '.join(FIXED)} (got {cfg.topology!r})")
  if cfg.topology not in FIXED or not build:
    return
  n = cfg.n_nodes
  n_edges = {"complete": n * (n - 1), "edges": 2 * len(cfg.topology_edges or [])}.get(
      cfg.topology, 2 * n * max(2, cfg.topology_degree))
  if n_edges > MAX_GRAPH_EDGES:
    raise ValueError(f"topology: a {cfg.topology} graph on n_nodes = {n} has about {n_edges:.3g} "
                     f"edges, more than {MAX_GRAPH_EDGES} (choose a sparser topology, e.g. ring, "
                     f"torus or regular with a small topology_degree)")
  try:
    edges = fixed(cfg.topology, n, degree=cfg.topology_degree, seed=cfg.data_seed,
                  edge_list=cfg.topology_edges)
    if regular:
      neighbour_lists(edges, n, cfg.topology)
  except TopologyError as e:
    raise ValueError(f"{e} (algorithm {algorithm!r} needs a connected graph)") from None
