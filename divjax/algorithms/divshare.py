"""DivShare (Biswas et al., WWW 2025, arXiv 2410.12918), as in the authors' artifact.

Each node, at the end of every round of H local SGD steps (PAPER.md 1.3):
  1. cuts its post-training model x^{t+1/2} into the F fixed fragments (fragments.partition);
  2. flushes its send queue (messages not fully uploaded are dropped);
  3. for each fragment draws J distinct peers uniformly, shuffles the F*J (peer, fragment)
     pairs and enqueues them, served FIFO at its upload rate;
  4. averages, per coordinate, its own value and the newest copy per (sender, fragment)
     received since its previous round end, with uniform weights:
         x[k] <- (x^{t+1/2}[k] + sum_{received f containing k} f[k]) / (1 + c_k).
"""

from __future__ import annotations

import functools

from divjax import sampling
from divjax.algorithms.base import AsyncAlgorithm, Properties, QueuePolicy, uniform_mean

PROPERTIES = Properties(default_fragments=8, uses_fragments=True, uses_recipients=True)


def divshare(*, n_nodes: int, fragments: int, recipients: int, flush: bool = True,
             name: str = "divshare") -> AsyncAlgorithm:
  plan = functools.partial(sampling.fragment_fanout_plan, n=n_nodes, n_fragments=fragments,
                           recipients=recipients)
  return AsyncAlgorithm(name=name, fragments=fragments, messages=fragments * recipients, plan=plan,
                        aggregate=uniform_mean,  # step 4: (x + sum of copies) / (1 + their count)
                        queue=QueuePolicy(flush=flush))


def make(cfg) -> AsyncAlgorithm:
  return divshare(n_nodes=cfg.n_nodes, fragments=cfg.fragments, recipients=cfg.recipients)
