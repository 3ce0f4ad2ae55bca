"""Accuracy and loss against simulated time, from a run's metrics records."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_run(records: list[dict], path: str | Path, title: str = "", kind: str = "classification",
             baseline: Optional[dict] = None) -> None:
  """Writes `figure(...)` to `path`."""
  fig = figure(records, title, kind, baseline)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def figure(records: list[dict], title: str = "", kind: str = "classification",
           baseline: Optional[dict] = None):
  """Two panels: accuracy and loss. For a regression task (MovieLens) the loss is the test RMSE,
  drawn on a linear axis with the trivial predictor's RMSE (`baseline["loss"]`) as the bar."""
  regression = kind == "regression"
  t = [r["time_s"] for r in records]
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8))
  per_node = all(r["acc_mean"] is not None for r in records)  # not with eval.nodes = 0
  if per_node:
    ax_acc.plot(t, [r["acc_mean"] for r in records], label="mean over nodes")
    ax_acc.fill_between(t, [r["acc_min"] for r in records], [r["acc_max"] for r in records],
                        alpha=0.25, label="min-max over nodes")
  if all(r.get("acc_avg_model") is not None for r in records):
    ax_acc.plot(t, [r["acc_avg_model"] for r in records], "--", label="average model")
  ax_acc.set(xlabel="simulated time (s)",
             ylabel="exact rating rate (rounded prediction)" if regression else "test accuracy")
  ax_acc.legend(loc="lower right", fontsize=8)
  if per_node:
    ax_loss.plot(t, [r["loss_mean"] for r in records], label="mean over nodes")
  if regression:
    ax_loss.set(xlabel="simulated time (s)", ylabel="test RMSE")
    if baseline:  # tasks.Task.baseline: {"predictor": ..., "loss": its RMSE, ...}
      ax_loss.axhline(baseline["loss"], color="grey", ls=":", label=f"{baseline['predictor']} predictor")
    ax_loss.legend(loc="upper right", fontsize=8)
  else:
    ax_loss.set(xlabel="simulated time (s)", ylabel="test loss")
    ax_loss.set_yscale("log")
  fig.suptitle(title)
  fig.tight_layout()
  return fig
