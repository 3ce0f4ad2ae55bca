"""Property tests of the config loader: bad input is refused naming its key, good input accepted.

* Known-bad inputs (out of range, wrong type, true/false for a number, unknown keys, NaN and
  infinities, fragments the model cannot fill, ...) on top of a valid config must raise
  ConfigError whose message starts with the dotted key; known-good ones must validate.
* For every number in the schema, values that break its declared bounds or type are drawn at
  random and must be refused the same way (so a new key is covered without editing this file).
* Random nested dicts, dotted overrides and YAML text (mostly under real key names, so
  validation goes deep) must validate or raise ConfigError, nothing else; and whatever
  validates must not have contained input that has to be refused (an unknown key, true/false
  for a number, NaN or an infinity), and must satisfy every declared bound.

Config validation only: nothing is compiled (the fragments check traces a model's shapes).
"""

import math
import string
import typing

import annotated_types as at
import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from divjax import config, configure
from divjax.config import ConfigError


def _keys(model, prefix=""):
  """Every dotted key of the schema, sections included."""
  out = []
  for name, field in model.model_fields.items():
    out.append(prefix + name)
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, config.BaseModel):
      out += _keys(ann, prefix + name + ".")
  return out


def _leaves(model, prefix=""):
  """(dotted key, pydantic field) of every value of the schema (not the sections)."""
  for name, field in model.model_fields.items():
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, config.BaseModel):
      yield from _leaves(ann, prefix + name + ".")
    else:
      yield prefix + name, field


def _mentions(ann, t) -> bool:
  return ann is t or any(_mentions(a, t) for a in typing.get_args(ann))


def _is_number(ann) -> bool:
  return (_mentions(ann, int) or _mentions(ann, float)) and not _mentions(ann, bool)


KEYS = _keys(config.Config)
LEAVES = dict(_leaves(config.Config))
LEAF_NAMES = sorted({k.split(".")[-1] for k in KEYS})
# Plain numbers (not lists, not devices' "auto"-or-int): their bounds are in the field metadata.
SCALAR_NUMBERS = {k: f for k, f in LEAVES.items()
                  if f.annotation in (int, float, typing.Optional[int], typing.Optional[float])}


def nest(flat: dict) -> dict:
  """{'network.upload_mbps': 5} -> {'network': {'upload_mbps': 5}}"""
  out: dict = {}
  for key, value in flat.items():
    node = out
    *path, last = key.split(".")
    for part in path:
      node = node.setdefault(part, {})
    node[last] = value
  return out


# A valid 6-node config (the tests' TINY run): 5 inputs, hidden 7, 10 classes, so the model's
# tensors have 35, 7, 70 and 10 entries and at most 70 fragments are allowed.
BASE = {"n_nodes": 6, "fragments": 2, "recipients": 2, "local_steps": 4, "batch_size": 4,
        "data.samples_per_node": 16, "data.dim": 5, "data.test_size": 50, "hidden": [7],
        "duration_s": 0.4, "eval_every_s": 0.1, "network.compute_s_per_step": 0.01,
        "network.upload_mbps": 0.5, "network.latency_ms": 3}


def refused(key: str, value) -> str:
  """The ConfigError message for BASE with `key` set to `value`; fails if it validates."""
  with pytest.raises(ConfigError) as info:
    configure.from_dict(nest({**BASE, key: value}))
  return str(info.value)


NAN, INF = float("nan"), float("inf")

KNOWN_BAD = [
    # shapes of the run
    ("n_nodes", 1), ("n_nodes", -3), ("n_nodes", True), ("n_nodes", "many"), ("n_nodes", 2.5),
    ("n_nodes", [6]), ("n_nodes", {"a": 1}), ("n_nodes", None), ("n_nodes", 2**40),
    ("recipients", True), ("recipients", 0), ("recipients", 6), ("recipients", 1.5),
    ("fragments", 0), ("fragments", -1), ("fragments", True), ("fragments", 71), ("fragments", 10**6),
    ("local_steps", 0), ("local_steps", True), ("batch_size", 0), ("batch_size", False),
    ("ring_depth", -1), ("ring_depth", True), ("eval_batch", 0), ("mf_dim", 0),
    ("devices", 0), ("devices", True), ("devices", "many"), ("devices", 4),
    ("hidden", [0]), ("hidden", [True]), ("hidden", "64"), ("hidden", [[7]]),
    ("seed", -1), ("seed", 2**32), ("seed", True), ("seed", 0.5),
    # learning
    ("lr", -0.1), ("lr", NAN), ("lr", INF), ("lr", True), ("lr", "fast"),
    ("momentum", 1.0), ("momentum", -0.1), ("momentum", False),
    ("target", True), ("target", NAN), ("target", "high"),
    # time
    ("duration_s", -1), ("duration_s", 0), ("duration_s", NAN), ("duration_s", INF),
    ("duration_s", 0.001), ("duration_s", True), ("duration_s", 1e12),
    ("eval_every_s", 0), ("eval_every_s", -5), ("eval_every_s", NAN), ("eval_every_s", 0.001),
    ("checkpoint_every_s", -1), ("checkpoint_every_s", NAN), ("checkpoint_every_s", True),
    ("memory_limit_gb", 0), ("memory_limit_gb", -1), ("memory_limit_gb", INF),
    # names
    ("algorithm", "nope"), ("algorithm", True), ("task", "imagenet"), ("model", "resnet"),
    ("topology", "star"), ("topology_edges", [[0, 99]]), ("topology_edges", [[0, True]]),
    ("topology_edges", [[0, 1, 2]]), ("mf_offset", "median"),
    # network
    ("network.upload_mbps", 0), ("network.upload_mbps", -5), ("network.upload_mbps", NAN),
    ("network.upload_mbps", INF), ("network.upload_mbps", True), ("network.download_mbps", -1),
    ("network.latency_ms", -1), ("network.latency_ms", NAN), ("network.compute_s_per_step", 0),
    ("network.compute_s_per_step", 1e-9), ("network.header_bits", -1), ("network.header_bits", True),
    ("network.download_cap", 1), ("network.download_cap", "maybe"), ("network.preset", "lan"),
    ("network.stragglers.fraction", 1.5), ("network.stragglers.fraction", -0.1),
    ("network.stragglers.slowdown", 0.5), ("network.stragglers.kind", "slow"),
    ("network.stragglers.nodes", [99]), ("network.stragglers.nodes", [True]),
    ("network.stragglers.nodes", [-1]),
    ("server.cohort", 0), ("server.cohort", 7), ("server.cohort", True), ("server.upload_mbps", 0),
    # data
    ("data.dir", "/nonexistent/divjax-data"), ("data.dir", True), ("data.partition", "random"),
    ("data.shards", 0), ("data.n_classes", 1), ("data.classes_per_node", 11), ("data.alpha", 0),
    ("data.noise", -1), ("data.noise", NAN), ("data.dim", True), ("data.test_size", 0),
    # unknown keys, and values where a section belongs
    ("bogus", 1), ("network.bogus", 1), ("data.bogus", 1), ("network.stragglers.bogus", 1),
    ("server.bogus", 1), ("network", 5), ("data", [1]), ("network.stragglers", "slow"),
]


@pytest.mark.parametrize("key, value", KNOWN_BAD, ids=[f"{k}={v!r}" for k, v in KNOWN_BAD])
def test_known_bad_input_is_refused_naming_the_key(key, value):
  msg = refused(key, value)
  assert msg.startswith((f"{key}:", f"{key}.")), msg  # hidden.0: names the list entry


def test_fragments_beyond_other_models_are_refused():
  # a model too small for DivShare's default 8 fragments: logreg on 1 input, 2 classes
  with pytest.raises(ConfigError, match=r"^fragments: must be in 1\.\.2 ") as info:
    configure.from_dict(nest({**BASE, "fragments": None, "model": "logreg", "data.dim": 1,
                           "data.n_classes": 2, "data.classes_per_node": 1}))
  assert "(got 8)" in str(info.value)
  with pytest.raises(ConfigError, match=r"^fragments: must be in 1\.\.51200 "):
    configure.from_dict(nest({**BASE, "task": "cifar10", "fragments": 51201}))


KNOWN_GOOD = [
    {}, {"fragments": 1}, {"fragments": 70}, {"fragments": None}, {"lr": 0}, {"lr": 1},
    {"momentum": 0.9}, {"target": 0.5}, {"target": None}, {"checkpoint_every_s": 0},
    {"checkpoint_every_s": None}, {"memory_limit_gb": 0.5}, {"devices": "auto"}, {"devices": 2},
    {"devices": 6}, {"seed": 2**32 - 1}, {"ring_depth": 0}, {"ring_depth": 5}, {"hidden": []},
    {"hidden": [3, 4]}, {"recipients": 5}, {"n_nodes": 2, "recipients": 1},
    {"network.download_cap": True}, {"network.download_cap": False}, {"network.preset": "diablo"},
    {"network.stragglers.nodes": [0, 5]}, {"network.stragglers.fraction": 1.0},
    {"network.stragglers.slowdown": 4, "network.stragglers.kind": "both"},
    {"network.latency_ms": 0}, {"network.header_bits": 800}, {"algorithm": "fedavg", "server.cohort": 6},
    {"data.partition": "iid"}, {"data.partition": "dirichlet", "data.alpha": 0.1},
    {"algorithm": "dpsgd", "topology": "ring"}, {"algorithm": "swift"}, {"algorithm": "el"},
    {"algorithm": "fedavg"}, {"algorithm": "adpsgd"}, {"algorithm": "sgp"}, {"algorithm": "divshare_age"},
    {"algorithm": "dpsgd", "topology": "edges", "topology_edges": [[i, (i + 1) % 6] for i in range(6)]},
    {"task": "cifar10", "fragments": 51200}, {"task": "mnist", "fragments": 8},
    {"task": "movielens-100k", "fragments": 8}, {"duration_s": 3600, "eval_every_s": 60},
    {"lr": "0.5"},  # YAML reads 5e-1 as a string; it is a number all the same
]


def base_for(algorithm: str = "divshare") -> dict:
  """BASE without the keys `algorithm` ignores (configure refuses them)."""
  from divjax import algorithms
  props = algorithms.PROPERTIES[algorithm]
  return {k: v for k, v in BASE.items()
          if not (k == "fragments" and not props.uses_fragments) and not (k == "recipients" and not props.uses_recipients)}


@pytest.mark.parametrize("flat", KNOWN_GOOD, ids=[repr(g) for g in KNOWN_GOOD])
def test_known_good_input_validates(flat):
  cfg = configure.from_dict(nest({**base_for(flat.get("algorithm", "divshare")), **flat}))
  assert _violations(cfg) == []


@pytest.mark.parametrize("algorithm, key, value", [
    ("adpsgd", "fragments", 4), ("dpsgd", "fragments", 2), ("sgp", "fragments", 8),
    ("dpsgd", "recipients", 2), ("swift_original", "recipients", 4), ("fedavg", "recipients", 5),
    ("divshare", "topology", "ring"), ("el", "topology_degree", 6), ("adpsgd", "server.cohort", 3),
    ("swift", "server.upload_mbps", 5.0)])
def test_a_key_the_algorithm_ignores_is_refused_naming_it(algorithm, key, value):
  """Silently dropped before (fragments for AD-PSGD, for example); now refused, and the
  default value (what the algorithm effectively uses) is still accepted."""
  flat = {**base_for(algorithm), "algorithm": algorithm}
  with pytest.raises(ConfigError) as info:
    configure.from_dict(nest({**flat, key: value, "topology": "ring"} if key.startswith("recipients")
                             and algorithm in ("dpsgd", "swift_original") else {**flat, key: value}))
  assert str(info.value).startswith(f"{key}: algorithm {algorithm!r}")
  assert str(value) in str(info.value) or key.startswith("server")
  configure.from_dict(nest(flat))


def test_fragments_bound_is_the_largest_tensor_of_the_model_tasks_builds(tiny):
  """70 for BASE's MLP: its tensors, as divjax.tasks builds the model, have 35, 7, 70, 10
  entries (shapes only: nothing is initialised or compiled)."""
  import jax
  from divjax import tasks
  model = tasks.make_classifier(tiny(), input_shape=(5,), n_classes=10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0)))
  assert sorted(math.prod(s.shape) for s in jax.tree.leaves(shapes)) == [7, 10, 35, 70]
  assert configure.from_dict(nest({**BASE, "fragments": 70})).fragments == 70
  assert refused("fragments", 71).startswith("fragments: must be in 1..70 for this model (mlp, 122 parameters")


# ------------------------------------------------------------------ schema-driven bad values


def _bounds(field):
  out = {}
  for m in field.metadata:
    for name in ("ge", "gt", "le", "lt"):
      if isinstance(m, getattr(at, name.capitalize())):
        out[name] = getattr(m, name)
  return out


def _bad_values(field) -> st.SearchStrategy:
  """Values that `field` (a plain int or float, maybe Optional) must refuse."""
  ann, b = field.annotation, _bounds(field)
  is_int = _mentions(ann, int)
  options = [st.booleans(), st.text(alphabet=string.ascii_letters, min_size=1, max_size=6),
             st.lists(st.integers(0, 3), min_size=1, max_size=2), st.just({"x": 1}),
             st.sampled_from([NAN, INF, -INF])]
  if type(None) not in typing.get_args(ann):
    options.append(st.none())
  if is_int:
    options.append(st.integers(-1000, 1000).map(lambda i: i + 0.5))
  num = st.integers if is_int else (lambda lo=None, hi=None: st.floats(lo, hi, allow_nan=False,
                                                                        allow_infinity=False))
  if "ge" in b:
    options.append(num(-10**9, math.ceil(b["ge"]) - 1) if is_int else
                   st.floats(-1e9, b["ge"], exclude_max=True, allow_nan=False))
  if "gt" in b:
    options.append(num(-10**9, math.floor(b["gt"])) if is_int else st.floats(-1e9, b["gt"]))
  if "le" in b:
    top = max(10**9, 1000 * b["le"])  # bounds can be large (duration_s, header_bits)
    options.append(num(math.floor(b["le"]) + 1, int(top)) if is_int else
                   st.floats(b["le"], top, exclude_min=True, allow_nan=False, allow_infinity=False))
  if "lt" in b:
    options.append(num(math.ceil(b["lt"]), 10**9) if is_int else st.floats(b["lt"], 1e9))
  return st.one_of(options)


bad_scalar = st.sampled_from(sorted(SCALAR_NUMBERS)).flatmap(
    lambda k: st.tuples(st.just(k), _bad_values(SCALAR_NUMBERS[k])))
unknown_key = st.tuples(
    st.sampled_from(["", "network.", "network.stragglers.", "server.", "data."]),
    st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8)).map(
    lambda t: t[0] + t[1]).filter(lambda k: k not in KEYS)

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))


@FUZZ
@given(st.one_of(bad_scalar, st.tuples(unknown_key, st.integers(0, 3))))
def test_values_breaking_the_schema_are_refused_naming_the_key(item):
  key, value = item
  msg = refused(key, value)
  assert msg.startswith((f"{key}:", f"{key}.")), msg  # hidden.0: names the list entry


def test_every_number_key_is_covered():
  """The schema-driven test reaches every plain number, and each has a bound or is a target."""
  assert {"n_nodes", "recipients", "fragments", "seed", "lr", "duration_s", "network.upload_mbps",
          "network.header_bits", "server.cohort", "data.alpha"} <= set(SCALAR_NUMBERS)
  unbounded = {k for k, f in SCALAR_NUMBERS.items() if not _bounds(f)}
  assert unbounded == {"target"}


# ---------------------------------------------------------------------- random input fuzzing


def _must_refuse(raw, model=config.Config, prefix="") -> list:
  """Input that no valid config can hold: unknown keys, true/false for a number, a number for
  a switch, NaN or an infinity. (Values within bounds are checked on the result instead.)"""
  if not isinstance(raw, dict):
    return []
  out = []
  for key, value in raw.items():
    field = model.model_fields.get(key) if isinstance(key, str) else None
    if field is None:
      out.append(f"{prefix}{key}: unknown")
      continue
    ann = field.annotation
    if isinstance(ann, type) and issubclass(ann, config.BaseModel):
      out += _must_refuse(value, ann, prefix + key + ".")
    elif _is_number(ann) and _holds(value, lambda v: isinstance(v, bool)):
      out.append(f"{prefix}{key}: bool for a number")
    elif _mentions(ann, bool) and isinstance(value, (int, float)) and not isinstance(value, bool):
      out.append(f"{prefix}{key}: number for a switch")
    elif _holds(value, lambda v: isinstance(v, float) and not math.isfinite(v)):
      out.append(f"{prefix}{key}: not finite")
  return out


def _holds(value, pred) -> bool:
  return pred(value) or (isinstance(value, list) and any(_holds(v, pred) for v in value))


def _violations(cfg: config.Config) -> list:
  """Declared bounds and types a validated config breaks (should be none)."""
  out = []
  dumped = config.to_dict(cfg)
  for key, field in LEAVES.items():
    value = dumped
    for part in key.split("."):
      value = value[part]
    if value is None:
      continue
    if _holds(value, lambda v: isinstance(v, float) and not math.isfinite(v)):
      out.append(f"{key}: not finite")
    if _is_number(field.annotation) and _holds(value, lambda v: isinstance(v, bool)):
      out.append(f"{key}: bool")
    b = _bounds(field)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        value >= b.get("ge", -INF) and value > b.get("gt", -INF) and value <= b.get("le", INF)
        and value < b.get("lt", INF)):
      out.append(f"{key}: {value} out of {b}")
  if not 1 <= cfg.recipients < cfg.n_nodes:
    out.append("recipients")
  if not cfg.fragments or cfg.fragments < 1:
    out.append("fragments unresolved")
  if not (cfg.n_ticks >= 1 and cfg.eval_every_ticks >= 1 and cfg.dt_us >= 1):
    out.append("time base")
  return out


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(-10, 100), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8), st.sampled_from(["divshare", "dpsgd", "swift", "el", "ring", "classes", "mlp"]))
names = st.one_of(st.sampled_from(LEAF_NAMES + ["network", "data", "stragglers"]), st.text(max_size=6),
                  st.integers(-3, 3))
values = st.recursive(scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                      st.dictionaries(names, kids, max_size=4)),
                      max_leaves=12)
# Mostly-plausible configs: real keys with random values, sections with real sub-keys.
configs = st.one_of(
    st.dictionaries(names, values, max_size=6),
    st.fixed_dictionaries({}, optional={
        "n_nodes": st.one_of(st.integers(-2, 40), scalars), "recipients": st.one_of(st.integers(0, 5), scalars),
        "fragments": st.one_of(st.integers(0, 9), st.integers(1, 10**5), scalars), "algorithm": scalars,
        "duration_s": st.one_of(st.floats(0, 1e12), scalars), "eval_every_s": scalars,
        "checkpoint_every_s": scalars, "memory_limit_gb": scalars, "topology": scalars,
        "topology_edges": values, "hidden": values, "seed": st.one_of(st.integers(-1, 2**65), scalars),
        "network": st.one_of(values, st.fixed_dictionaries({}, optional={
            "compute_s_per_step": st.one_of(st.floats(0, 1), scalars), "upload_mbps": scalars,
            "download_cap": scalars,
            "stragglers": st.one_of(values, st.fixed_dictionaries({}, optional={
                "nodes": values, "fraction": scalars, "kind": scalars}))})),
        "data": st.one_of(values, st.fixed_dictionaries({}, optional={
            "dir": scalars, "partition": scalars, "n_classes": scalars, "classes_per_node": scalars})),
    }),
    values)

dotted = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_lowercase + "._ =", max_size=12))
overrides = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", dotted, st.text(max_size=10)),
    st.builds(lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}", dotted, values),
    st.text(max_size=15))


def _validates_or_config_error(fn, *args, raw=None):
  """fn(*args) raises ConfigError or gives a config that breaks no declared bound; if `raw`
  (the input as a dict) holds something that must be refused, it must have raised."""
  try:
    cfg = fn(*args)
  except ConfigError:
    return
  if isinstance(cfg, config.Config):
    assert _must_refuse(raw) == [], f"accepted bad input {raw!r}"
    assert _violations(cfg) == [], f"{raw!r} validated to {config.to_dict(cfg)}"


def _raw_of(text_or_dict, items):
  try:
    raw = yaml.safe_load(text_or_dict) if isinstance(text_or_dict, str) else text_or_dict
    return config.apply_overrides(raw or {}, items)
  except (ConfigError, yaml.YAMLError):
    return None


@FUZZ
@given(configs)
def test_from_dict_validates_or_raises_config_error(raw):
  _validates_or_config_error(configure.from_dict, raw, raw=raw)


@FUZZ
@given(st.one_of(configs, st.dictionaries(st.text(max_size=4), values, max_size=3)),
       st.lists(overrides, max_size=4))
def test_overrides_validate_or_raise_config_error(raw, items):
  _validates_or_config_error(lambda: configure.from_dict(config.apply_overrides(raw, items)),
                             raw=_raw_of(raw, items))
  _validates_or_config_error(configure.load, None, items, raw=_raw_of({}, items))


@FUZZ
@given(st.one_of(st.text(max_size=60), configs.map(lambda d: yaml.safe_dump(d, allow_unicode=True))),
       st.lists(overrides, max_size=2))
def test_random_yaml_files_validate_or_raise_config_error(tmp_path_factory, text, items):
  path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
  path.write_text(text, encoding="utf-8")
  _validates_or_config_error(configure.load, path, items, raw=_raw_of(text, items))


def test_not_a_list_of_overrides_or_a_mapping():
  for bad in (["n_nodes=3", 7], "n_nodes=3", [None]):
    with pytest.raises(ConfigError, match="--set"):
      configure.load(None, bad)
  with pytest.raises(ConfigError, match="expected a mapping"):
    config.apply_overrides([1, 2], ["n_nodes=3"])
  with pytest.raises(ConfigError, match="config file: expected a path"):
    configure.load(42)
