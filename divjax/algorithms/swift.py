"""Swift as the DivShare paper ran it (artifact `node/Swift.py`, PAPER.md 2.3).

Line for line the DivShare node without the flush: the same J random recipients per
fragment, the same shuffled FIFO queue and uniform per-coordinate averaging of own model +
newest copy per (sender, fragment), but the send queue is never emptied, so on slow links
the backlog (and the staleness of what arrives) grows round after round. One fragment (the
full model) by default. This is not SWIFT of Bornstein et al. (ICLR 2023).
"""

from __future__ import annotations

from divjax.algorithms import divshare
from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy

PROPERTIES = Properties(default_fragments=1, uses_fragments=True, uses_recipients=True)


def swift(*, n_nodes: int, fragments: int, recipients: int) -> AsyncAlgorithm:
  """DivShare with another queue policy: nothing is ever flushed."""
  return divshare.divshare(n_nodes=n_nodes, fragments=fragments, recipients=recipients)._replace(
      name="swift", queue=QueuePolicy(flush=False))


def make(cfg) -> AsyncAlgorithm:
  return swift(n_nodes=cfg.n_nodes, fragments=cfg.fragments, recipients=cfg.recipients)
