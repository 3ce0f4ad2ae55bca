"""DivShare's model fragmentation (PAPER.md 1.4) and the padded fragment layout.

The flat parameter vector (P,) is the concatenation of the model's tensors. For every tensor
separately, a random permutation of its m indices (seeded by the global seed, identical at
all nodes, fixed for the run) is cut into fragments: fragments 0..F-2 take floor(m/F) indices
each and the last fragment takes the rest. So each fragment holds about 1/F of every layer,
and tensors with m < F fall entirely into the last fragment.

For routing, a model is viewed in a padded *fragment layout* (F, L): row f lists fragment
f's coordinates, padded to the largest fragment size L with a dummy coordinate P whose value
is always 0. Gathering `x_padded[..., layout]` gives (..., F, L); scattering back is a gather
with `position` (P,), the flat index of each coordinate inside the (F*L) layout.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np


class Fragments(NamedTuple):
  frag_of: np.ndarray   # (P,) int32, fragment id of every coordinate
  sizes: np.ndarray     # (F,) int64, coordinates per fragment
  layout: np.ndarray    # (F, L) int32, coordinate ids; padding points at P
  position: np.ndarray  # (P,) int32, index of each coordinate in the flattened (F*L) layout

  @property
  def n(self) -> int:
    return self.layout.shape[0]

  @property
  def width(self) -> int:
    return self.layout.shape[1]


def partition(tensor_sizes: Sequence[int], n_fragments: int, seed: int) -> Fragments:
  """Per-tensor random fragment assignment, as in DivShareSharing.serialized_models."""
  rng = np.random.default_rng([seed, 0xF4A6])
  frag_of = []
  for m in tensor_sizes:
    perm = rng.permutation(m)
    per = m // n_fragments
    ids = np.full(m, n_fragments - 1, np.int32)
    # permuted slot k goes to fragment k // per for the first (F-1)*per slots
    if per > 0:
      ids[perm[: per * (n_fragments - 1)]] = np.arange(per * (n_fragments - 1)) // per
    frag_of.append(ids)
  frag_of = np.concatenate(frag_of) if frag_of else np.zeros(0, np.int32)
  return from_assignment(frag_of, n_fragments)


def from_assignment(frag_of: np.ndarray, n_fragments: int) -> Fragments:
  p = frag_of.shape[0]
  sizes = np.bincount(frag_of, minlength=n_fragments).astype(np.int64)
  width = max(1, int(sizes.max()))
  layout = np.full((n_fragments, width), p, np.int32)
  position = np.empty(p, np.int32)
  for f in range(n_fragments):
    coords = np.flatnonzero(frag_of == f).astype(np.int32)
    layout[f, : coords.size] = coords
    position[coords] = f * width + np.arange(coords.size)
  return Fragments(frag_of.astype(np.int32), sizes, layout, position)


def to_layout(x: jnp.ndarray, frags: Fragments) -> jnp.ndarray:
  """(..., P) -> (..., F, L); padding entries are 0."""
  padded = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (1,), x.dtype)], axis=-1)
  layout = jnp.asarray(frags.layout)
  # indices per row: XLA gathers along each row and lays the result out row-major (indexing
  # with `padded[..., layout]` gathers columns across the rows, lays them out row-minor and
  # costs a transposing copy wherever the result is used)
  idx = jnp.broadcast_to(layout.reshape(-1), x.shape[:-1] + (layout.size,))
  out = jnp.take_along_axis(padded, idx, axis=-1, mode="promise_in_bounds")
  return out.reshape(x.shape[:-1] + layout.shape)


def from_layout(y: jnp.ndarray, frags: Fragments) -> jnp.ndarray:
  """(..., F, L) -> (..., P)."""
  flat = y.reshape(y.shape[:-2] + (-1,))
  return flat[..., jnp.asarray(frags.position)]
