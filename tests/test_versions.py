"""Version vectors (observe.versions): a hand-made schedule, the reference, memory, refusals."""

import numpy as np
import pytest

from divjax import configure, memory, ring, versions
from divjax.config import ConfigError
from conftest import tiny_config
from test_engine_vs_reference import COMM_STRAGGLERS, run_both


def copies(n, depth, m, records):
  """ring.Copies with the given (sender, slot, index, receiver) records due, nothing else."""
  due = np.zeros((n, depth, m), bool)
  dst = np.zeros((n, depth, m), np.int32)
  for s, sl, j, d in records:
    due[s, sl, j], dst[s, sl, j] = True, d
  rows = np.broadcast_to(np.arange(n)[:, None, None], due.shape).astype(np.int32)
  slots = np.broadcast_to(np.arange(depth)[None, :, None], due.shape).astype(np.int32)
  return ring.Copies(due, rows, slots, dst, np.zeros_like(dst), np.zeros_like(dst))


def test_hand_made_four_node_schedule():
  """A line 0 -> 1 -> 2 -> 3, every message consumed at the receiver's next round end; node 3
  never sends. A snapshot carries the vector from before its round's merge (like the
  pre-averaging model it is), so what node 1 learns at round r reaches node 2 at r + 2.

  Round 0: own versions 1, nothing received.
  Round 1: own 2; node 1 gets 0's round-0 vector (0 at 1), node 2 gets 1's, node 3 gets 2's.
  Round 2: own 3; node 2 gets 1's round-1 vector [0, 2, 0, 0]: not yet 0's version.
  Round 3: own 4; node 2 gets 1's round-2 vector [1, 3, 0, 0]: 0's version 1, relayed.
  """
  n, depth = 4, 2
  every = np.ones(n, bool)
  line = lambda sl: copies(n, depth, 1, [(0, sl, 0, 1), (1, sl, 0, 2), (2, sl, 0, 3)])
  schedule = [copies(n, depth, 1, []), line(0), line(1), line(0)]   # round r reads slot (r - 1) % 2

  def run(relay):
    v = versions.init(n, depth)
    seen = []
    for r, c in enumerate(schedule):
      v = versions.round_end(v, every, np.full(n, r, np.int32), np.full(n, r % depth, np.int32), (c,),
                             relay=relay)
      seen.append(np.asarray(v.known).copy())
    return seen

  relay = run(True)
  np.testing.assert_array_equal(relay[0], np.eye(n, dtype=int))
  np.testing.assert_array_equal(relay[1], [[2, 0, 0, 0], [1, 2, 0, 0], [0, 1, 2, 0], [0, 0, 1, 2]])
  np.testing.assert_array_equal(relay[2], [[3, 0, 0, 0], [2, 3, 0, 0], [0, 2, 3, 0], [0, 0, 2, 3]])
  np.testing.assert_array_equal(relay[3], [[4, 0, 0, 0], [3, 4, 0, 0], [1, 3, 4, 0], [0, 1, 3, 4]])
  # ages 4 - known[i, j] over the 12 ordered pairs: rows 4+4+4, 1+4+4, 3+1+4, 4+3+1
  assert versions.staleness(relay[3]) == (pytest.approx(37 / 12), 4)

  # direct: only the sender's own version travels, so node 2 never hears of node 0
  direct = run(False)[3]
  np.testing.assert_array_equal(direct, [[4, 0, 0, 0], [3, 4, 0, 0], [0, 3, 4, 0], [0, 0, 3, 4]])


def test_nodes_not_ending_a_round_keep_their_vector():
  n, depth = 3, 2
  v = versions.init(n, depth)
  ends = np.array([True, False, True])
  v = versions.round_end(v, ends, np.zeros(n, np.int32), np.zeros(n, np.int32), (copies(n, depth, 1, []),))
  np.testing.assert_array_equal(np.diagonal(v.known), [1, 0, 1])
  np.testing.assert_array_equal(v.sent[0, 1], [0, 0, 0])


@pytest.mark.parametrize("algorithm, mode", [("divshare", "relay"),
                                             pytest.param("divshare", "direct", marks=pytest.mark.slow),
                                             pytest.param("adpsgd", "relay", marks=pytest.mark.slow)])
def test_engine_versions_agree_with_reference(algorithm, mode):
  extra = ["fragments=1", "recipients=2"] if algorithm == "adpsgd" else []
  cfg = tiny_config(f"algorithm={algorithm}", f"observe.versions={mode}", *extra, *COMM_STRAGGLERS)
  state, _, ref = run_both(cfg)
  known = np.asarray(state.versions.known)
  np.testing.assert_array_equal(known, ref["versions"])
  assert known.max() > 1 and (known < np.diagonal(known)[None, :]).any()   # not trivial


def test_memory_counts_the_version_vectors():
  off = memory.precheck(tiny_config())
  on = memory.precheck(tiny_config("observe.versions=relay"))
  assert on["parts"]["versions"] > 0 and off["parts"]["versions"] == 0
  assert on["estimate_bytes"] > off["estimate_bytes"]


def test_synchronous_algorithms_refuse_the_observer():
  with pytest.raises(ConfigError, match="observe.versions"):
    configure.load(None, ["algorithm=el_local", "observe.versions=relay"])
