"""Experiment configuration: YAML files plus dotted `--set` overrides, validated up front.

Validation uses pydantic (strict types, unknown keys forbidden) so that every mistake is
reported before anything is compiled, with the dotted key and what is allowed:

    config error: network.upload_mbps: must be > 0 (got -5)

Everything here is plain data and imports nothing from divjax: this is the schema (types,
ranges, relations between keys). What only the algorithms or the models know (registered
names, graphs, the keys an algorithm ignores, default fragments, fragments per tensor) is
checked by divjax.configure, which every entry point loads configs through. What fixes an
array shape (n_nodes, fragments, recipients, batch_size, ring_depth, the task) forces a new
compile; the numbers one sweeps (seed, lr, momentum, bandwidths, latencies, slowdowns) do
not (engine.PARAM_KEYS).
"""

from __future__ import annotations

import copy
import functools
import math
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
  """A configuration file, override or value is invalid. The message names the key."""


MAX_NODES = 1 << 24          # node ids and (N, D, M) table indices stay far from int32 overflow
# Simulated time is int32 on the device (divjax.timebase): ticks and a message's horizon stay
# below 2**30 so that tick + horizon never overflows, a queue's backlog is exact below 2**49 us.
MAX_TICKS = (1 << 30) - 1
MAX_LATENCY_MS = 1e6         # 1000 s one way, below timebase.CAP_US (17.9 min)
MAX_DURATION_S = float(1 << 48) / 1e6  # 8.9 years: saturated queue times (2**49 us) lie beyond any run
MAX_HEADER_BITS = 1 << 40


class _Strict(BaseModel):
  # inf/nan are never meaningful here, and would overflow the integer tick arithmetic
  model_config = ConfigDict(extra="forbid", frozen=True, strict=False, allow_inf_nan=False)

  @field_validator("*", mode="before")
  @classmethod
  def _no_bools_as_numbers(cls, v, info):
    """Lax mode would read YAML's true/false as 1/0 for a number (`recipients: true` as 1),
    and 1/0 as true/false for a switch: both are refused, naming the key."""
    ann = cls.model_fields[info.field_name].annotation
    if _mentions(ann, bool):
      if isinstance(v, (int, float)) and not isinstance(v, bool):
        raise ValueError(f"must be true or false (got {v!r})")
    elif (_mentions(ann, int) or _mentions(ann, float)) and _holds_bool(v):
      raise ValueError(f"must be a number, not true/false (got {v!r})")
    return v


def _mentions(ann, t: type) -> bool:
  """Whether type annotation `ann` is `t` or has it inside (Optional[t], list[t], Union)."""
  return ann is t or any(_mentions(a, t) for a in typing.get_args(ann))


def _holds_bool(v) -> bool:
  return isinstance(v, bool) or (isinstance(v, (list, tuple)) and any(_holds_bool(x) for x in v))


class StragglerConfig(_Strict):
  """Slow nodes: either a fraction (chosen deterministically from the seed) or explicit ids."""
  fraction: float = Field(0.0, ge=0.0, le=1.0)
  slowdown: float = Field(1.0, ge=1.0)
  # The paper's stragglers are communication-only (slow links, equal compute).
  kind: Literal["communication", "compute", "both"] = "communication"
  nodes: Optional[list[int]] = None  # explicit straggler ids; overrides `fraction`


class BandwidthConfig(_Strict):
  """Time-varying upload and download rates (divjax.bandwidth), piecewise constant per block
  of local_steps ticks: `trace`, a CSV file with columns node, upload_mbps [, download_mbps]
  [, time_s]; or `random_walk`, the standard deviation of each node's log-rate step every
  `interval_s`, kept within `max_factor` of the configured rates."""
  trace: Optional[str] = None
  random_walk: Optional[float] = Field(None, gt=0.0)
  interval_s: float = Field(1.0, gt=0.0)
  max_factor: float = Field(10.0, gt=1.0)

  @model_validator(mode="after")
  def _one_source(self) -> "BandwidthConfig":
    if self.trace is not None and self.random_walk is not None:
      raise ValueError("trace: give either a trace or random_walk, not both")
    return self


class NetworkConfig(_Strict):
  upload_mbps: float = Field(60.0, gt=0.0)
  download_mbps: float = Field(60.0, gt=0.0)
  latency_ms: float = Field(1.0, ge=0.0, le=MAX_LATENCY_MS)
  compute_s_per_step: float = Field(0.01, gt=0.0)
  # Serve each message at min(sender upload, receiver download) (a per-flow cap). Off by
  # default: with one FIFO per sender, a capped flow to a slow receiver blocks every message
  # queued behind it (head-of-line blocking that TCP flows sharing an uplink do not have).
  download_cap: bool = False
  # Extra bits per message (headers); DivShare's pickled fragments carry a few hundred bytes.
  header_bits: int = Field(0, ge=0, le=MAX_HEADER_BITS)
  # "diablo": the artifact's real-world inter-region bandwidths (10 regions, PAPER.md 4.4),
  # capping each message at its region pair's rate on top of the node links.
  preset: Optional[Literal["diablo"]] = None
  stragglers: StragglerConfig = StragglerConfig()
  bandwidth: BandwidthConfig = BandwidthConfig()


class ServerConfig(_Strict):
  """FedAvg's server: its own links, and how many clients it samples per round."""
  cohort: Optional[int] = Field(None, ge=1)  # clients per round; None: every node
  upload_mbps: float = Field(1000.0, gt=0.0)
  download_mbps: float = Field(1000.0, gt=0.0)
  latency_ms: float = Field(1.0, ge=0.0, le=MAX_LATENCY_MS)


class DataConfig(_Strict):
  """Task data. `dir` is for real datasets; the other keys shape the synthetic task."""
  dir: Optional[str] = None
  # Seed of the host-side draws: data partition, fragment partition, straggler choice, random
  # graphs. None: the run's `seed` (which also keys the initial model, batches and plans).
  seed: Optional[int] = Field(None, ge=0)
  # "auto": `classes` for the synthetic task, the paper's `kshard` for image data
  partition: Literal["auto", "classes", "kshard", "dirichlet", "iid"] = "auto"
  shards: int = Field(5, ge=1)  # blocks per node for kshard
  n_classes: int = Field(10, ge=2)
  dim: int = Field(32, ge=1)
  samples_per_node: int = Field(128, ge=1)
  classes_per_node: int = Field(2, ge=1)
  noise: float = Field(1.0, ge=0.0)
  alpha: float = Field(0.5, gt=0.0)
  test_size: int = Field(2000, ge=1)
  # least squares (task lsq): node i's optimum is x* + zeta * u_i with u_i ~ N(0, I/dim), so
  # zeta sets the heterogeneity; `noise` is the targets' Gaussian noise (the gradient noise)
  zeta: float = Field(1.0, ge=0.0)


class EvalConfig(_Strict):
  """Cheaper evaluation (divjax.simulate.evaluate); the default evaluates every node on the
  whole test set, as the paper's numbers need. Records name what was evaluated
  (`eval_test`, `eval_nodes`) whenever an option is set.
  test_subsample: a fixed, seeded subset of this many test examples (classification tasks).
  nodes: a fixed, seeded subset of this many nodes for the per-node metrics (acc_mean, ...);
    0: only the network-average model (the per-node metrics are null, and the target and the
    best accuracy read acc_avg_model instead)."""
  test_subsample: Optional[int] = Field(None, ge=1)
  nodes: Optional[int] = Field(None, ge=0)


class InitConfig(_Strict):
  """Initial models. spread: every node starts from its own random model (seeded by `seed`
  and the node id) instead of one shared model, e.g. for pure-averaging experiments
  (`divjax theory contraction`)."""
  spread: bool = False


class ObserveConfig(_Strict):
  """Optional observers of the asynchronous engine. versions: per-pair version ages
  (divjax.versions), `relay` (merged through mixing) or `direct` (only senders' own
  versions); (ring_depth + 1) x n_nodes^2 int32 of memory."""
  versions: Literal["off", "relay", "direct"] = "off"
  # f(xbar) and ||grad f(xbar)||^2 of the global objective at the network-average model at
  # every evaluation (divjax.objective): a pass over the whole training set each time
  grad_norm: bool = False


class ByzantineConfig(_Strict):
  """Byzantine nodes (divjax.byzantine): they train like the others but send an attack
  instead of their model. Chosen like stragglers: explicit ids, or round(fraction * n_nodes)
  drawn from the data seed. attack:
    sign_flip  -scale x (own model x; scale 1 by default)
    gaussian   x + scale N(0, I) (scale 1 by default)
    alie       mean - z std of the honest models, coordinate-wise ("a little is enough",
               Baruch et al. 2019; z by default their z_max for n_nodes and the Byzantine count)
    ipm        -scale mean of the honest models (inner-product manipulation, Xie et al. 2020;
               scale 0.1 by default)
    crash      silent from crash_at_s on: neither trains, sends nor receives (messages to it
               and its unsent queue end as `lost`, as for a node offline under churn)
  per_recipient (gaussian): a different noisy payload for every recipient."""
  fraction: float = Field(0.0, ge=0.0, lt=1.0)
  nodes: Optional[list[int]] = None
  attack: Literal["sign_flip", "gaussian", "alie", "ipm", "crash"] = "sign_flip"
  scale: Optional[float] = Field(None, gt=0.0)
  z: Optional[float] = Field(None, gt=0.0)
  # gaussian: each recipient gets its own noise (a different payload per recipient)
  per_recipient: bool = False
  # crash: the nodes fall silent from this simulated time on (offline for good, divjax.churn)
  crash_at_s: float = Field(0.0, ge=0.0)

  @model_validator(mode="after")
  def _per_recipient_gaussian(self) -> "ByzantineConfig":
    if self.per_recipient and self.attack != "gaussian":
      raise ValueError(f"per_recipient: only the gaussian attack draws per recipient (got attack {self.attack!r})")
    return self


class ChurnConfig(_Strict):
  """Nodes going offline and coming back (divjax.churn; synchronous algorithms: divjax.sync): an
  exponential on/off process per node (mean_online_s and mean_offline_s, both),
  or `trace`, a CSV file of offline intervals `node,start_s,end_s`. A node is offline in a
  round if it is offline when the round starts; it then neither trains, sends nor receives,
  and messages to it or not uploaded when it leaves end as `lost`."""
  mean_online_s: Optional[float] = Field(None, gt=0.0)
  mean_offline_s: Optional[float] = Field(None, gt=0.0)
  trace: Optional[str] = None

  @model_validator(mode="after")
  def _one_schedule(self) -> "ChurnConfig":
    if (self.mean_online_s is None) != (self.mean_offline_s is None):
      missing = "mean_offline_s" if self.mean_offline_s is None else "mean_online_s"
      raise ValueError(f"{missing}: the exponential schedule needs both mean_online_s and mean_offline_s")
    if self.trace is not None and self.mean_online_s is not None:
      raise ValueError("trace: give either a trace or mean_online_s/mean_offline_s, not both")
    return self


class CompressionConfig(_Strict):
  """Compressed messages (divjax.compression; divjax.sync_wrap for the synchronous algorithms),
  over every algorithm but sgp and adpsgd_pairwise. kind: none; top_k (per fragment, the `fraction` of coordinates
  that changed most since last sent); random_k (a random `fraction` of them); qsgd (every
  coordinate rounded to `levels` levels of the fragment's norm). error_feedback: top_k's
  change accumulates over unsent coordinates (else: this round's change only); qsgd's
  rounding error is carried to the next round. Message sizes shrink accordingly."""
  kind: Literal["none", "top_k", "random_k", "qsgd"] = "none"
  fraction: float = Field(0.01, gt=0.0, le=1.0)
  levels: int = Field(16, ge=1)
  error_feedback: bool = True


class AggregationConfig(_Strict):
  """How receivers combine copies (divjax.robust). rule "mean" is the algorithm's own rule;
  the robust rules replace a uniform mean, per coordinate, over the own model and every copy:
    median               coordinate-wise median
    trimmed_mean         drop the `trim` largest and smallest values (fewer when fewer remain)
    centered_clip        v <- v + mean(clip(y - v, clip_tau)) for clip_iters iterations from
                         the node's previous aggregate (Karimireddy et al. 2021)
    self_centered_clip   x + mean(clip(y - x, clip_tau)) around the own model (He et al. 2022)
  clip(z, tau) = z min(1, tau / ||z||), the norm over one fragment's coordinates.
  inbox: at most this many copies per fragment reach an aggregation (the rest end as
  `overflow`); robust rules need one (None: 4 x recipients; N - 1 for swift_original; a
  synchronous algorithm's largest in-degree, 4 x recipients for EL-Local, FedAvg's cohort), the
  mean may use one (asynchronous algorithms only)."""
  rule: Literal["mean", "median", "trimmed_mean", "centered_clip", "self_centered_clip"] = "mean"
  inbox: Optional[int] = Field(None, ge=1)
  trim: int = Field(1, ge=0)
  clip_tau: float = Field(1.0, gt=0.0)
  clip_iters: int = Field(3, ge=1)


class Config(_Strict):
  algorithm: str = "divshare"
  seed: int = Field(0, ge=0)
  n_nodes: int = Field(16, ge=2)
  fragments: Optional[int] = Field(None, ge=1)  # None: the algorithm's default (DivShare 8, Swift 1)
  recipients: int = Field(3, ge=1)
  local_steps: int = Field(16, ge=1)
  batch_size: int = Field(8, ge=1)
  lr: float = Field(0.05, ge=0.0)
  momentum: float = Field(0.0, ge=0.0, lt=1.0)
  task: Literal["synthetic", "lsq", "cifar10", "mnist", "movielens-latest-small", "movielens-100k"] = "synthetic"
  # auto: mlp for synthetic and MNIST, gn_lenet for CIFAR-10, mf for MovieLens, linear for lsq
  model: Literal["auto", "mlp", "logreg", "gn_lenet", "mf", "linear"] = "auto"
  mf_dim: int = Field(20, ge=1)
  # How gn_lenet runs N nodes at once (models.make_model): "fast", hand-written per-node
  # convolutions (quickest on a CPU); "vmap", one grouped convolution (for GPUs); "auto", fast
  # on a CPU backend, vmap elsewhere. Same numbers to float32 rounding.
  model_impl: Literal["auto", "fast", "vmap"] = "auto"
  # MovieLens: "none" predicts <u, v> (the paper's model); "global_mean" predicts
  # mean_train + <u, v>, a constant of the task, not a parameter (divjax.tasks.movielens says why)
  mf_offset: Literal["none", "global_mean"] = "none"
  hidden: list[int] = Field(default_factory=lambda: [64])
  duration_s: float = Field(60.0, gt=0.0, le=MAX_DURATION_S)
  eval_every_s: float = Field(10.0, gt=0.0)
  target: Optional[float] = None
  # Graph of the algorithms that need one (dpsgd, adpsgd_pairwise, swift_original): divjax.topology
  topology: Literal["ring", "torus", "regular", "complete", "edges", "random_ring"] = "complete"
  topology_degree: int = Field(4, ge=1)
  topology_edges: Optional[list[list[int]]] = None
  # Depth of the delay ring in sender rounds; 0 picks the smallest depth that loses nothing
  # for flushing algorithms, and 8 rounds of backlog for the others.
  ring_depth: int = Field(0, ge=0)
  # The delay ring's payload type. bfloat16 halves the ring's memory (the largest part of the
  # state for small models: ring_depth x fragments x fragment width per node); payloads are
  # rounded once, at the snapshot, and summed in float32. Models and optimizer stay float32.
  ring_dtype: Literal["float32", "bfloat16"] = "float32"
  eval_batch: int = Field(1024, ge=1)
  # Nodes differentiated together in a local step (a lax.map over blocks of this many, each
  # vmapped; models.map_groups): bounds training activations to one block's. None: the
  # model's own (GN-LeNet on a CPU: 16; otherwise all nodes at once). Same results.
  train_block: Optional[int] = Field(None, ge=1)
  # Checkpoints (divjax.checkpoint), in simulated seconds, rounded up to evaluation boundaries.
  # None: about every 5% of duration_s; 0: only the final one (and on Ctrl-C / SIGTERM).
  checkpoint_every_s: Optional[float] = Field(None, ge=0.0)
  # Memory the run may use, in GB (1e9 bytes); None: what the device reports available.
  # The estimate (divjax.memory) is checked before compiling.
  memory_limit_gb: Optional[float] = Field(None, gt=0.0)
  # Devices the node axis is sharded over (divjax.sharding); n_nodes must be a multiple. On a
  # CPU, `divjax run` creates that many host devices (one thread each). "auto": the most
  # devices that divide n_nodes, up to the accelerators present, or on a CPU the cores.
  devices: Union[Literal["auto"], int] = 1
  network: NetworkConfig = NetworkConfig()
  server: ServerConfig = ServerConfig()
  data: DataConfig = DataConfig()
  init: InitConfig = InitConfig()
  observe: ObserveConfig = ObserveConfig()
  eval: EvalConfig = EvalConfig()
  byzantine: ByzantineConfig = ByzantineConfig()
  aggregation: AggregationConfig = AggregationConfig()
  compression: CompressionConfig = CompressionConfig()
  churn: ChurnConfig = ChurnConfig()

  @property
  def data_seed(self) -> int:
    """The seed of the host-side draws (data.seed, defaulting to seed)."""
    return self.seed if self.data.seed is None else self.data.seed

  @field_validator("devices", mode="before")
  @classmethod
  def _devices(cls, v):
    if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
      return v
    raise ValueError(f"must be a positive integer or 'auto' (got {v!r})")

  @model_validator(mode="after")
  def _check_relations(self) -> "Config":
    if self.recipients >= self.n_nodes:
      raise ValueError(f"recipients: must be < n_nodes = {self.n_nodes} (got {self.recipients})")
    if self.duration_s < self.network.compute_s_per_step:
      raise ValueError(
          f"duration_s: must be at least one local step, network.compute_s_per_step = "
          f"{self.network.compute_s_per_step} s (got {self.duration_s})")
    if self.eval_every_s < self.network.compute_s_per_step:
      raise ValueError(
          f"eval_every_s: must be at least one local step ({self.network.compute_s_per_step} s)"
          f" (got {self.eval_every_s})")
    if round(self.network.compute_s_per_step * 1e6) < 1:
      raise ValueError("network.compute_s_per_step: must be at least 1e-6 s (1 microsecond)")
    nodes = self.network.stragglers.nodes
    if nodes is not None and any(not 0 <= i < self.n_nodes for i in nodes):
      raise ValueError(f"network.stragglers.nodes: ids must be in 0..{self.n_nodes - 1} (got {nodes})")
    byz = self.byzantine.nodes
    if byz is not None and any(not 0 <= i < self.n_nodes for i in byz):
      raise ValueError(f"byzantine.nodes: ids must be in 0..{self.n_nodes - 1} (got {byz})")
    if byz is not None and len(set(byz)) >= self.n_nodes:
      raise ValueError(f"byzantine.nodes: at least one node must be honest (got all {self.n_nodes})")
    if byz is None and round(self.byzantine.fraction * self.n_nodes) >= self.n_nodes:
      raise ValueError(f"byzantine.fraction: at least one of the {self.n_nodes} nodes must be honest "
                       f"(got {self.byzantine.fraction})")
    if self.aggregation.inbox is not None and self.aggregation.inbox < self.recipients:
      raise ValueError(f"aggregation.inbox: must be >= recipients = {self.recipients}, the copies of a "
                       f"fragment one round sends (got {self.aggregation.inbox})")
    if self.devices != "auto" and self.n_nodes % self.devices:
      raise ValueError(f"devices: n_nodes = {self.n_nodes} must be a multiple of devices (got {self.devices})")
    if self.server.cohort is not None and self.server.cohort > self.n_nodes:
      raise ValueError(f"server.cohort: must be <= n_nodes = {self.n_nodes} (got {self.server.cohort})")
    if self.data.classes_per_node > self.data.n_classes:
      raise ValueError(f"data.classes_per_node: must be <= data.n_classes = {self.data.n_classes}")
    if self.eval.nodes is not None and self.eval.nodes > self.n_nodes:
      raise ValueError(f"eval.nodes: must be <= n_nodes = {self.n_nodes} (got {self.eval.nodes})")
    if self.eval.test_subsample is not None and self.task.startswith("movielens"):
      raise ValueError(f"eval.test_subsample: allowed only for tasks with one test set (synthetic, lsq, "
                       f"cifar10, mnist); {self.task} tests each node on its own users' ratings")
    if (self.task == "lsq") != (self.model == "linear") and self.model != "auto":
      raise ValueError(f"model: task {self.task} cannot use model {self.model!r} (lsq takes linear, "
                       f"linear takes lsq; auto picks the task's model)")
    self._check_limits()
    return self

  def _check_limits(self) -> None:
    """Sizes that validate but could not run: node ids, ticks and seeds are 32-bit on the device."""
    if self.seed >= 2**32:
      raise ValueError(f"seed: must be < 2**32 (got {self.seed})")
    if self.data.seed is not None and self.data.seed >= 2**32:
      raise ValueError(f"data.seed: must be < 2**32 (got {self.data.seed})")
    if self.n_nodes > MAX_NODES:
      raise ValueError(f"n_nodes: at most {MAX_NODES} (got {self.n_nodes})")
    ticks = self.duration_s / self.network.compute_s_per_step
    if ticks > MAX_TICKS:
      raise ValueError(f"duration_s: at most {MAX_TICKS} ticks of network.compute_s_per_step = "
                       f"{self.network.compute_s_per_step} s (got {ticks:.3g} ticks)")
    if self.local_steps * self.network.stragglers.slowdown > MAX_TICKS:
      raise ValueError(f"local_steps: a round of a straggler (local_steps x network.stragglers.slowdown"
                       f" ticks) must be at most {MAX_TICKS} ticks")
    if any(w < 1 for w in self.hidden):
      raise ValueError(f"hidden: layer widths must be >= 1 (got {self.hidden})")
    edges = self.topology_edges
    if edges is not None and any(len(e) != 2 or not all(0 <= v < self.n_nodes for v in e) for e in edges):
      raise ValueError(f"topology_edges: expected [u, v] pairs with ids in 0..{self.n_nodes - 1}")
    if self.data.dir is not None and not Path(self.data.dir).expanduser().is_dir():
      raise ValueError(f"data.dir: {self.data.dir!r} is not an existing directory")

  # --- derived quantities (the engine's time base) ---------------------------------------
  @property
  def dt_us(self) -> int:
    """Tick length in integer microseconds: one local step of a normal-speed node."""
    return int(round(self.network.compute_s_per_step * 1e6))

  @property
  def n_ticks(self) -> int:
    return int(math.floor(self.duration_s * 1e6 / self.dt_us + 1e-9))

  @property
  def eval_every_ticks(self) -> int:
    """Evaluations fall on round boundaries of normal-speed nodes (whole multiples of H ticks),
    as the paper evaluates models saved every few rounds."""
    rounds = max(1, int(round(self.eval_every_s * 1e6 / (self.dt_us * self.local_steps))))
    return rounds * self.local_steps


# ------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------

def _format_errors(err: pydantic.ValidationError) -> str:
  lines = []
  for e in err.errors():
    loc = ".".join(str(p) for p in e["loc"])
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
      parent = _schema_at(e["loc"][:-1])
      allowed = ", ".join(sorted(parent.model_fields)) if parent is not None else "?"
      msg = f"unknown key (allowed here: {allowed})"
    elif e["type"] == "value_error":
      msg = msg.removeprefix("Value error, ")
    got = e.get("input")
    got_s = "" if e["type"] in ("extra_forbidden", "value_error", "missing") else f" (got {got!r})"
    lines.append(f"{loc}: {msg}{got_s}" if loc else f"{msg}{got_s}")
  return "; ".join(lines)


def _schema_at(loc) -> Optional[type[BaseModel]]:
  model: Any = Config
  for part in loc:
    field = model.model_fields.get(str(part)) if isinstance(part, str) else None
    if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
      return None
    model = field.annotation
  return model


def parse_override(item: str) -> tuple[list[str], Any]:
  """'network.upload_mbps=30' -> (['network', 'upload_mbps'], 30) (value parsed as YAML)."""
  if not isinstance(item, str):
    raise ConfigError(f"--set {item!r}: expected a KEY=VALUE string")
  if "=" not in item:
    raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set network.upload_mbps=30")
  key, raw = item.split("=", 1)
  key = key.strip()
  if not key or any(not p for p in key.split(".")):
    raise ConfigError(f"--set {item!r}: empty key")
  try:
    value = yaml.safe_load(raw) if raw.strip() else None
  except yaml.YAMLError as e:
    raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML ({e})") from None
  return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise ConfigError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
  if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
    raise ConfigError(f"--set: expected a list of KEY=VALUE strings, got {overrides!r}")
  raw = copy.deepcopy(raw)
  for item in overrides:
    path, value = parse_override(item)
    node = raw
    for i, part in enumerate(path[:-1]):
      sub = node.get(part)
      if sub is None:
        sub = node[part] = {}
      if not isinstance(sub, dict):
        raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[:i + 1])} is not a section")
      node = sub
    node[path[-1]] = value
  return raw


def from_dict(raw: Any) -> Config:
  if raw is None:
    raw = {}
  if not isinstance(raw, dict):
    raise ConfigError(f"config: expected a mapping of keys to values, got {type(raw).__name__}")
  try:
    cfg = Config.model_validate(raw)
  except pydantic.ValidationError as e:
    raise ConfigError(_format_errors(e)) from None
  return cfg


def load(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
  """Reads a YAML config (or the defaults if `path` is None), applies overrides, validates the
  schema. `fragments` may be left None (the algorithm's default): divjax.configure.load resolves it."""
  raw: Any = {}
  if path is not None:
    if not isinstance(path, (str, Path)):
      raise ConfigError(f"config file: expected a path, got {type(path).__name__}")
    p = Path(path)
    if not p.is_file():
      what = "is a directory, not a file" if p.is_dir() else "does not exist"
      raise ConfigError(f"config file {str(p)!r} {what}")
    try:
      raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as e:
      raise ConfigError(f"config file {str(p)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
      raise ConfigError(f"config file {str(p)!r}: expected a mapping of keys to values")
  raw = apply_overrides(raw, overrides or [])
  return from_dict(raw)


def to_dict(cfg: Config) -> dict:
  return cfg.model_dump(mode="json")


def dump_yaml(cfg: Config) -> str:
  return yaml.safe_dump(to_dict(cfg), sort_keys=False)
