"""Registry of algorithms: name -> make(cfg) -> Protocol."""

from divjax.algorithms import adpsgd, adpsgd_pairwise, divshare, dpsgd, el, fedavg, swift, swift_original
from divjax.algorithms.base import Protocol

REGISTRY = {
    "divshare": divshare.make,
    "swift": swift.make,
    "adpsgd": adpsgd.make,
    "adpsgd_pairwise": adpsgd_pairwise.make,
    "swift_original": swift_original.make,
    "dpsgd": dpsgd.make,
    "el": el.make,
    "fedavg": fedavg.make,
}

# Algorithms whose mixing matrix is doubly stochastic every round (the network mean is kept).
DOUBLY_STOCHASTIC = {"dpsgd", "adpsgd_pairwise"}

# Algorithms that mix over the `topology` graph; those in FIXED_TOPOLOGY need a fixed one.
NEEDS_TOPOLOGY = {"dpsgd", "adpsgd_pairwise", "swift_original"}
FIXED_TOPOLOGY = {"adpsgd_pairwise", "swift_original"}

# `fragments` when the config leaves it out.
DEFAULT_FRAGMENTS = {"divshare": 8}


def make(cfg) -> Protocol:
  return REGISTRY[cfg.algorithm](cfg)
