"""Plots in scanpy's style: each returns the matplotlib Axes, shows the figure unless ``show=False``."""

from __future__ import annotations

import matplotlib.pyplot as plt

from cellvae.model import CellVAE


def history(model: CellVAE, *, ax=None, show: bool | None = None, save: str | None = None):
    """Training curves: distortion and rate per cell, train and validation, against epoch."""
    frame = model.history
    if frame.empty:
        raise ValueError("the model has no training history; call model.fit() first")
    if ax is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    else:
        axes = ax
    for axis, quantity, title in zip(axes, ("distortion", "rate"), ("distortion −E[log p(x|z)]", "rate KL(q‖p)")):
        for split, style in (("train", "-"), ("validation", "--")):
            column = f"{split}_{quantity}"
            if column in frame:
                axis.plot(frame["epoch"], frame[column], style, label=split)
        axis.set_xlabel("epoch")
        axis.set_ylabel("nats per cell")
        axis.set_title(title)
        axis.grid(False)
        axis.legend(frameon=False)
    axes[0].figure.tight_layout()
    _finish(axes[0].figure, show, save)
    return axes


def _finish(figure, show: bool | None, save: str | None) -> None:
    if save:
        figure.savefig(save, dpi=150, bbox_inches="tight")
    if show or (show is None and not save):
        plt.show()
