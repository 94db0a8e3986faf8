"""OUT/training_curves.png from the metrics records: losses, discriminator accuracies, generator accuracy."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from electra_ds.files import replacing

log = logging.getLogger(__name__)


def _series(records: list[dict[str, Any]], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], r[key]) for r in records if r.get("split") == split and r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_training_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path | None:
    """Three panels against the step (train lines, eval markers): the losses (total = MLM + disc_weight x disc),
    the discriminator's accuracy on replaced and on original tokens, the generator's accuracy. None when there is
    nothing to plot yet, or without matplotlib (a warning: the curves are a view of metrics.jsonl, not a result)."""
    if not any(r.get("split") == "train" for r in records):
        return None
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install matplotlib): no %s; metrics.jsonl has the numbers", path)
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_disc, ax_gen) = plt.subplots(1, 3, figsize=(16, 4.5))
    panels = [(ax_loss, [("loss", "total"), ("mlm_loss", "MLM"), ("disc_loss", "discriminator")], "loss"),
              (ax_disc, [("disc_acc_replaced", "replaced tokens"), ("disc_acc_original", "original tokens")],
               "discriminator accuracy"),
              (ax_gen, [("gen_acc", "generator")], "generator accuracy (masked slots)")]
    for ax, keys, label in panels:
        for key, name in keys:
            steps, values = _series(records, "train", key)
            (line,) = ax.plot(steps, values, label=f"{name} (train)")
            steps, values = _series(records, "eval", key)
            if steps:
                ax.plot(steps, values, "o--", color=line.get_color(), label=f"{name} (eval)")
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_loss.set_yscale("log")
    for ax in (ax_disc, ax_gen):
        ax.set_ylim(-0.02, 1.02)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
    return path


__all__ = ["plot_training_curves"]
