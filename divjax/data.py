"""Datasets and their split over nodes: host-side numpy, deterministic per seed.

Sources, tried in this order by `load`:

1. `data_dir` (the config key `data.dir`), a directory of `.npz` archives laid out as
   follows (the files may also hold other arrays; only numeric arrays, no object arrays):

     cifar10.npz                    x_train (50000, 32, 32, 3) uint8 HWC RGB, y_train (50000,),
                                    x_test (10000, 32, 32, 3) uint8, y_test (10000,)
     mnist.npz                      x_train (60000, 28, 28) uint8, y_train (60000,),
                                    x_test (10000, 28, 28) uint8, y_test (10000,)
                                    (a trailing channel axis of size 1 is accepted too)
     movielens_ml-latest-small.npz  user, item (int, 0-based), rating (float), one entry per
                                    rating; n_users, n_items (scalars)
     movielens_ml-100k.npz          the same arrays for MovieLens 100K

   Other arrays in a file (movie_id, timestamp) are ignored. A file that cannot be read
   (truncated, corrupted, object arrays, wrong shapes or types) gives a `DataError` naming it.
2. tensorflow_datasets, when it can be imported (it downloads on first use, so it needs
   internet the first time).
3. Otherwise a `DataError` that says how to provide either.

Images come back as their uint8 pixels, NHWC, a quarter of the memory of floats; the model
sees PIXEL_LEVELS[x], float32 in [-1, 1] (x / 255 * 2 - 1: per-channel mean 0.5, std 0.5, as
the artifact's torchvision transform), looked up batch by batch on the device. Labels come
back as int32.

Partitioners return one int64 index array per node into the training set.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np


class DataError(ValueError):
  """A dataset could not be found or is malformed; the message says how to fix it."""


# the model input of each pixel value: float32 in [-1, 1], as (x / 255 * 2 - 1) was computed
# for the float32 images the engine first kept (the same floats exactly, so the same results)
PIXEL_LEVELS = (np.arange(256).astype(np.float32) * np.float32(2 / 255) - np.float32(1)).astype(np.float32)


class ImageDataset(NamedTuple):
  x_train: np.ndarray   # (S, H, W, C) uint8 pixels; PIXEL_LEVELS[x] is what a model sees
  y_train: np.ndarray   # (S,) int32
  x_test: np.ndarray    # (T, H, W, C) uint8
  y_test: np.ndarray    # (T,) int32


class RatingDataset(NamedTuple):
  user: np.ndarray      # (R,) int32, 0-based user id
  item: np.ndarray      # (R,) int32, 0-based item id
  rating: np.ndarray    # (R,) float32
  n_users: int
  n_items: int


Dataset = Union[ImageDataset, RatingDataset]

# name -> (file in data_dir, tensorflow_datasets name, image shape or None for ratings)
_SOURCES = {
    "cifar10": ("cifar10.npz", "cifar10", (32, 32, 3)),
    "mnist": ("mnist.npz", "mnist", (28, 28, 1)),
    "movielens-latest-small": ("movielens_ml-latest-small.npz", "movielens/latest-small-ratings", None),
    "movielens-100k": ("movielens_ml-100k.npz", "movielens/100k-ratings", None),
}
NAMES = tuple(_SOURCES)


def image_shape(name: str) -> Optional[tuple]:
  """(H, W, C) of one image of dataset `name`, or None for a rating dataset or unknown name."""
  return _SOURCES[name][2] if name in _SOURCES else None


def rating_counts(name: str, data_dir: Optional[str]) -> Optional[tuple[int, int]]:
  """(n_users, n_items) of rating dataset `name` as its file in data_dir records them, read
  without loading the ratings; None when there is no such file or it cannot be read (`load`
  then says why)."""
  if name not in _SOURCES or _SOURCES[name][2] is not None or data_dir is None:
    return None
  path = os.path.join(os.path.expanduser(os.fspath(data_dir)), _SOURCES[name][0])
  try:
    with open(path, "rb") as f, np.load(f) as archive:
      return (_count(archive["n_users"], f"{path} n_users"),
              _count(archive["n_items"], f"{path} n_items"))
  except Exception:
    return None


def load(name: str, data_dir: Optional[str] = None) -> Dataset:
  """Loads dataset `name` (one of NAMES) from `data_dir`, else from tensorflow_datasets."""
  if name not in _SOURCES:
    raise DataError(f"unknown dataset {name!r}; allowed names: {', '.join(NAMES)}")
  file_name, tfds_name, shape = _SOURCES[name]
  tried = ""
  if data_dir is not None:
    path = os.path.join(os.path.expanduser(os.fspath(data_dir)), file_name)  # as config checks it
    if os.path.isfile(path):
      return _from_npz(path, shape)
    where = "directory does not exist" if not os.path.isdir(data_dir) else "file not found"
    tried = f"{path}: {where}. "
  tfds = _tfds_module()
  if tfds is not None:
    return _from_tfds(tfds, tfds_name, shape)
  raise DataError(
      f"{tried}Dataset {name!r} is not available. Either set data.dir (e.g. --set data.dir=DIR) "
      f"to a directory holding {file_name} with the arrays {', '.join(_needed(shape))} (layout: "
      f"the docstring of divjax/data.py), or `pip install tensorflow-datasets` on a machine with "
      f"internet access so it can be downloaded as {tfds_name!r}.")


def _needed(shape: Optional[tuple]) -> tuple:
  """The arrays an .npz file of an image (shape given) or a rating dataset must hold."""
  return (("x_train", "y_train", "x_test", "y_test") if shape is not None
          else ("user", "item", "rating", "n_users", "n_items"))


def _images(x: np.ndarray, shape: tuple, what: str) -> np.ndarray:
  if x.ndim == 3 and shape[2] == 1:
    x = x[..., None]
  if x.ndim != 4 or tuple(x.shape[1:]) != shape:
    raise DataError(f"{what}: expected shape (S, {', '.join(map(str, shape))}), got {x.shape}")
  if x.dtype != np.uint8:
    raise DataError(f"{what}: expected uint8 pixels in 0..255, got dtype {x.dtype}")
  return x


def _integers(a: np.ndarray, what: str) -> np.ndarray:
  """a as int64 if it holds integers (an integer dtype, or floats with integral values)."""
  if a.dtype.kind in "iu":
    return a.astype(np.int64)
  if a.dtype.kind == "f" and np.all(np.isfinite(a)) and np.all(a == np.round(a)):
    return a.astype(np.int64)
  raise DataError(f"{what}: expected integers, got dtype {a.dtype}"
                  + (" with non-integral or non-finite values" if a.dtype.kind == "f" else ""))


def _labels(y: np.ndarray, n: int, what: str) -> np.ndarray:
  if y.ndim != 1 or y.shape[0] != n:
    raise DataError(f"{what}: expected shape ({n},) to match the images, got {y.shape}")
  y = _integers(y, what)
  if n and (y.min() < 0 or y.max() > 9):
    raise DataError(f"{what}: labels must lie in 0..9, found {y.min()}..{y.max()}")
  return y.astype(np.int32)


def _image_dataset(arrays, shape: tuple, origin: str) -> ImageDataset:
  out = []
  for split in ("train", "test"):
    x = _images(np.asarray(arrays[f"x_{split}"]), shape, f"{origin} x_{split}")
    y = _labels(np.asarray(arrays[f"y_{split}"]), x.shape[0], f"{origin} y_{split}")
    out += [x, y]
  return ImageDataset(*out)


def _rating_dataset(user, item, rating, n_users: int, n_items: int, origin: str) -> RatingDataset:
  user, item, rating = (np.asarray(a) for a in (user, item, rating))
  if not (user.ndim == item.ndim == rating.ndim == 1 and user.shape == item.shape == rating.shape):
    raise DataError(f"{origin}: user, item and rating must be 1-D arrays of equal length, got "
                    f"shapes {user.shape}, {item.shape}, {rating.shape}")
  user, item = _integers(user, f"{origin} user"), _integers(item, f"{origin} item")
  if rating.dtype.kind not in "iuf" or not np.all(np.isfinite(rating)):
    raise DataError(f"{origin} rating: expected finite numbers, got dtype {rating.dtype}"
                    + (" with NaN or infinite values" if rating.dtype.kind == "f" else ""))
  for a, n, what in ((user, n_users, "user"), (item, n_items, "item")):
    if a.size and (a.min() < 0 or a.max() >= n):
      raise DataError(f"{origin}: {what} ids must lie in 0..n_{what}s-1 = 0..{n - 1}, "
                      f"found {a.min()}..{a.max()}")
  return RatingDataset(user.astype(np.int32), item.astype(np.int32), rating.astype(np.float32),
                       int(n_users), int(n_items))


def _count(a: np.ndarray, what: str) -> int:
  """A scalar count (n_users, n_items) stored as an array."""
  if a.size != 1 or a.ndim > 1:
    raise DataError(f"{what}: expected a single integer, got shape {a.shape}")
  n = int(_integers(a.reshape(()), what))
  if n < 1:
    raise DataError(f"{what}: must be >= 1, got {n}")
  return n


def _from_npz(path: str, shape: Optional[tuple]) -> Dataset:
  needed = _needed(shape)
  member = ""  # the array being read, for the messages
  try:
    # Opened here so that it is closed on every error (np.load leaks it when the zip is bad).
    # allow_pickle=False (np.load's default): object arrays are refused, never unpickled.
    with open(path, "rb") as f:
      archive = np.load(f)
      if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds a single array, expected an .npz archive of {list(needed)}")
      missing = [k for k in needed if k not in archive.files]
      if missing:
        raise DataError(f"{path}: missing arrays {missing}; the file must hold {list(needed)}")
      arrays = {}
      for k in needed:  # members are read (and decompressed) here, not by np.load
        member = f"array {k!r}"
        arrays[k] = archive[k]
  except DataError:
    raise
  except MemoryError as e:
    raise DataError(f"{path}: out of memory reading {member or 'it'} (a corrupted header can claim "
                    f"a huge shape; if the file is intact, it needs more memory)") from e
  except ValueError as e:
    if "Object arrays cannot be loaded" in str(e):
      raise DataError(f"{path}: {member or 'its array'} holds Python objects (dtype object); object "
                      f"arrays are not supported (reading them would mean unpickling): save numeric "
                      f"arrays, e.g. np.asarray(a, np.uint8)") from e
    if "pickled" in str(e):  # np.load's guess for a file that is neither a zip nor an .npy
      raise DataError(f"{path}: not a readable .npz archive (neither a zip file nor an .npy array)") from e
    raise DataError(f"{path}: not a readable .npz archive{member and ', reading ' + member}: "
                    f"{type(e).__name__}: {e}") from e
  except Exception as e:
    # A truncated or corrupted archive fails in zipfile, zlib or numpy's header parser with
    # many exception types: OSError, zipfile.BadZipFile, zlib.error, EOFError,
    # tokenize.TokenError, NotImplementedError (an unknown compression method), ...
    raise DataError(f"{path}: not a readable .npz archive (truncated or corrupted?)"
                    f"{member and ', reading ' + member}: {type(e).__name__}: {e}") from e
  if shape is not None:
    return _image_dataset(arrays, shape, path)
  return _rating_dataset(arrays["user"], arrays["item"], arrays["rating"],
                         _count(arrays["n_users"], f"{path} n_users"),
                         _count(arrays["n_items"], f"{path} n_items"), path)


def _tfds_module():
  """tensorflow_datasets with TensorFlow kept off the GPUs (JAX owns them), or None."""
  try:
    import tensorflow as tf
    import tensorflow_datasets as tfds
  except ImportError:
    return None
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TensorFlow already initialised its devices: nothing to hide any more
    pass
  return tfds


def _from_tfds(tfds, tfds_name: str, shape: Optional[tuple]) -> Dataset:
  origin = f"tensorflow_datasets {tfds_name!r}"
  try:
    if shape is not None:
      arrays = {}
      for split in ("train", "test"):
        d = tfds.as_numpy(tfds.load(tfds_name, split=split, batch_size=-1))
        arrays[f"x_{split}"], arrays[f"y_{split}"] = d["image"], d["label"]
      return _image_dataset(arrays, shape, origin)
    d = tfds.as_numpy(tfds.load(tfds_name, split="train", batch_size=-1))
  except Exception as e:  # download or preparation failed (often: no internet)
    raise DataError(f"{origin} could not be loaded ({type(e).__name__}: {e}). Set data.dir to a "
                    f"directory with the .npz files instead (layout: the docstring of divjax/data.py).") from e
  users = d["user_id"].astype(np.int64)       # tfds stores ids as byte strings
  movies = d["movie_id"].astype(np.int64)
  # The artifact's ids: users 1..U -> 0..U-1; items = rank among the sorted distinct movie ids.
  # Rows are put in (user, movie) order, the order of ratings.csv; tfds does not keep it.
  order = np.lexsort((movies, users))
  u_ids, user = np.unique(users[order], return_inverse=True)
  m_ids, item = np.unique(movies[order], return_inverse=True)
  return _rating_dataset(user, item, d["user_rating"][order], len(u_ids), len(m_ids), origin)


# ----------------------------------------------------------------------------- partitioners


def _check_nodes(n_nodes: int, n_samples: int, need_per_node: int = 1, what: str = "samples"):
  if not 1 <= n_nodes * need_per_node <= n_samples:
    hi = n_samples // need_per_node
    raise ValueError(f"n_nodes={n_nodes}: must be in 1..{hi} for {n_samples} {what}"
                     + (f" and {need_per_node} per node" if need_per_node > 1 else ""))


def partition_iid(n_samples: int, n_nodes: int, seed: int) -> list[np.ndarray]:
  """A random permutation cut into n_nodes parts whose sizes differ by at most one."""
  _check_nodes(n_nodes, n_samples)
  perm = np.random.default_rng(seed).permutation(n_samples)
  return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_nodes)]


def partition_kshard(labels, n_nodes: int, shards: int = 5, *, seed: int) -> list[np.ndarray]:
  """decentralizepy's KShardDataPartitioner (PAPER.md 4.2), with numpy's generator.

  The training set is sorted by label (stably). Node sizes are e = floor(S/n) for nodes
  0..n-2 and S - (n-1)e for the last. Each node in turn takes `shards` blocks of
  floor(size / shards) consecutive samples of the still-unassigned pool; a block starts at a
  uniformly random position of the pool and is removed from it. Two details follow the
  artifact's code: a block that runs past the end of the pool wraps around to its start
  (so it may join the last and the first label), and the floor(size / shards) rounding
  leaves a few samples unassigned (CIFAR-10 on 60 nodes: blocks of 166, the last node's
  of floor(853 / 5) = 170, and 180 of the 50,000 samples belong to no node).
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
  if shards < 1:
    raise ValueError(f"shards={shards}: must be >= 1")
  s = labels.shape[0]
  _check_nodes(n_nodes, s, shards, "samples (one per block)")
  rng = np.random.default_rng(seed)
  pool = np.argsort(labels, kind="stable")
  base = s // n_nodes
  parts = []
  for node in range(n_nodes):
    size = base if node < n_nodes - 1 else s - (n_nodes - 1) * base
    block = size // shards
    taken = []
    for _ in range(shards):
      start = int(rng.integers(len(pool)))
      end = start + block
      if end <= len(pool):
        taken.append(pool[start:end])
        pool = np.concatenate([pool[:start], pool[end:]])
      else:  # wrap around: the tail of the pool, then its head
        wrap = end - len(pool)
        taken += [pool[start:], pool[:wrap]]
        pool = pool[wrap:start]
    parts.append(np.concatenate(taken).astype(np.int64))
  return parts


def partition_dirichlet(labels, n_nodes: int, alpha: float, seed: int) -> list[np.ndarray]:
  """Label skew: each class is split over the nodes by proportions drawn from Dir(alpha).

  For every class, its samples are shuffled and cut at the cumulative proportions (the
  usual construction of Hsu et al. 2019, without the size balancing some codes add). Small
  alpha gives each node few classes; large alpha approaches an iid split. A node left empty
  then receives one random sample from the currently largest node, so every node has at
  least one sample.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels: expected a 1-D array, got shape {labels.shape}")
  if not alpha > 0:
    raise ValueError(f"alpha={alpha}: must be > 0 (small: strong label skew, large: near iid)")
  _check_nodes(n_nodes, labels.shape[0])
  rng = np.random.default_rng(seed)
  buckets = [[] for _ in range(n_nodes)]
  for c in np.unique(labels):
    idx = rng.permutation(np.flatnonzero(labels == c))
    cuts = (np.cumsum(rng.dirichlet(np.full(n_nodes, float(alpha)))) * len(idx)).astype(np.int64)
    for node, chunk in enumerate(np.split(idx, cuts[:-1])):
      buckets[node].append(chunk)
  parts = [np.concatenate(b).astype(np.int64) for b in buckets]
  for node in range(n_nodes):
    if len(parts[node]) == 0:
      donor = int(np.argmax([len(p) for p in parts]))
      k = int(rng.integers(len(parts[donor])))
      parts[node] = parts[donor][k:k + 1]
      parts[donor] = np.delete(parts[donor], k)
  return [np.sort(p) for p in parts]


def split_movielens(user, item, rating, n_nodes: int, seed: int,
                    train_frac: float = 0.7) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """DivShare's MovieLens split (PAPER.md 4.3): users in contiguous blocks, 70/30 per user.

  With U users, nodes 0..(U mod n)-1 get ceil(U/n) users and the rest floor(U/n), in id
  order (610 users on 60 nodes: nodes 0-9 get 11, the others 10). Each user's ratings are
  split at random into round(train_frac * count) training ratings (pandas' `sample(frac=)`
  rounding) and the rest for testing; a node's test set is its own users' held-out ratings.

  Returns:
    (train, test): per-node int64 arrays of rating indices, each sorted.
  """
  user = np.asarray(user)
  if not (user.ndim == 1 and np.shape(item) == np.shape(rating) == user.shape):
    raise ValueError(f"user, item, rating: expected 1-D arrays of equal length, got "
                     f"{user.shape}, {np.shape(item)}, {np.shape(rating)}")
  if not 0.0 < train_frac < 1.0:
    raise ValueError(f"train_frac={train_frac}: must lie strictly between 0 and 1")
  n_users = int(user.max()) + 1 if user.size else 0
  _check_nodes(n_nodes, n_users, what="users")
  rng = np.random.default_rng(seed)
  order = np.argsort(user, kind="stable")
  bounds = np.searchsorted(user[order], np.arange(n_users + 1))
  per, extra = divmod(n_users, n_nodes)
  train, test = [], []
  first = 0
  for node in range(n_nodes):
    count = per + (node < extra)
    tr, te = [], []
    for u in range(first, first + count):
      rows = order[bounds[u]:bounds[u + 1]]
      pick = rng.permutation(len(rows)) < round(train_frac * len(rows))
      tr.append(rows[pick])
      te.append(rows[~pick])
    first += count
    train.append(np.sort(np.concatenate(tr)).astype(np.int64))
    test.append(np.sort(np.concatenate(te)).astype(np.int64))
  return train, test


def pad_partition(parts: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-node index lists as a dense (N, L) int32 array (L = largest part) and (N,) counts.

  Padding entries are 0, a valid index that is never read: batches are drawn from the first
  counts[i] entries of row i.
  """
  counts = np.array([len(p) for p in parts], np.int32)
  idx = np.zeros((len(parts), max(1, int(counts.max(initial=0)))), np.int32)
  for i, p in enumerate(parts):
    idx[i, :len(p)] = p
  return idx, counts


def label_histograms(labels, parts: Sequence[np.ndarray], n_classes: int) -> np.ndarray:
  """(N, n_classes) int64: how many training samples of each label every node holds."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
    raise ValueError(f"labels: must lie in 0..n_classes-1 = 0..{n_classes - 1}, "
                     f"found {labels.min()}..{labels.max()}")
  return np.stack([np.bincount(labels[p], minlength=n_classes) for p in parts])
