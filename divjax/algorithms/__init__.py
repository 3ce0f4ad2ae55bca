"""Registry of algorithms: name -> module with `make(cfg)` and `PROPERTIES`.

An asynchronous algorithm's make returns an AsyncAlgorithm (algorithms/base.py), a
synchronous one's a sync.SyncProtocol. What divjax may know before building one (a graph,
default fragments, doubly stochastic mixing) is its module's PROPERTIES.
"""

from divjax.algorithms import (adpsgd, adpsgd_pairwise, divshare, divshare_age, dpsgd, el_local, el_oracle,
                               fedavg, sgp, swift, swift_original)

MODULES = {
    "divshare": divshare,
    "divshare_age": divshare_age,
    "swift": swift,
    "adpsgd": adpsgd,
    "adpsgd_pairwise": adpsgd_pairwise,
    "swift_original": swift_original,
    "sgp": sgp,
    "dpsgd": dpsgd,
    "el_local": el_local,
    "el": el_local,          # the name of EL-Local before el_oracle was added
    "el_oracle": el_oracle,
    "fedavg": fedavg,
}
REGISTRY = {name: mod.make for name, mod in MODULES.items()}
PROPERTIES = {name: mod.PROPERTIES for name, mod in MODULES.items()}

# Algorithms whose mixing matrix is doubly stochastic every round (the network mean is kept).
DOUBLY_STOCHASTIC = {a for a, p in PROPERTIES.items() if p.doubly_stochastic}
# Algorithms that mix over the `topology` graph; those in FIXED_TOPOLOGY need a fixed one.
NEEDS_TOPOLOGY = {a for a, p in PROPERTIES.items() if p.needs_graph}
FIXED_TOPOLOGY = {a for a, p in PROPERTIES.items() if p.fixed_graph}
# `fragments` when the config leaves it out.
DEFAULT_FRAGMENTS = {a: p.default_fragments for a, p in PROPERTIES.items() if p.default_fragments != 1}


def make(cfg):
  """The algorithm of a config, with the wrappers its sections ask for, innermost first:
  compression, aggregation (robust rules, bounded inbox), byzantine (attacks, which the
  attackers' compression then compresses). A synchronous algorithm's wrappers are its round
  engine's (divjax.sync_wrap)."""
  alg = REGISTRY[cfg.algorithm](cfg)
  if PROPERTIES[cfg.algorithm].synchronous:
    return alg
  from divjax import byzantine, compression, robust  # noqa: PLC0415  (they import algorithms.base)
  comp, agg = cfg.compression, cfg.aggregation
  if comp.kind != "none":
    alg = compression.with_compression(alg, comp.kind, fraction=comp.fraction, levels=comp.levels,
                                       error_feedback=comp.error_feedback)
  if agg.rule != "mean":
    alg = robust.with_robust_aggregation(alg, agg.rule, inbox_size(cfg), trim=agg.trim, tau=agg.clip_tau,
                                         iters=agg.clip_iters)
  elif agg.inbox is not None:
    alg = robust.with_bounded_inbox(alg, agg.inbox)
  if byzantine.ids(cfg).size and cfg.byzantine.attack != "crash":   # a crash is churn's (divjax.churn)
    alg = byzantine.with_byzantine(alg, byzantine.mask(cfg), cfg.byzantine.attack, cfg.byzantine.scale,
                                   cfg.byzantine.z, cfg.byzantine.per_recipient)
  return alg


def inbox_size(cfg) -> int:
  """K, copies per (receiver, fragment) an aggregation reads: aggregation.inbox, by default 4 J;
  for an algorithm whose peers do not come from `recipients` (swift_original's graph) N - 1,
  the most distinct senders, so that nothing overflows unless asked."""
  if cfg.aggregation.inbox is not None:
    return cfg.aggregation.inbox
  return 4 * cfg.recipients if PROPERTIES[cfg.algorithm].uses_recipients else cfg.n_nodes - 1
