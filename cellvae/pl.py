"""Plots in scanpy's style: each shows its figure, or with ``show=False`` returns its matplotlib Axes (as scanpy's do).

Every function takes ``ax`` (draw into these Axes instead of a new figure), ``show`` (``None``: show
unless, where scanpy is imported, ``sc.settings.autoshow`` is False) and ``save``, which takes scanpy's
forms: ``True`` (or ``""``; ``None`` as ``sc.settings.autosave`` where scanpy is imported), or a text suffix
that starts with ``_`` or ``.`` (``"_kang.png"``, ``".pdf"``), writes ``<figdir>/<function name><suffix>``
(scanpy's ``sc.settings.figdir``, ``./figures`` without scanpy, made on saving; the format from the suffix, else
scanpy's ``sc.settings.file_format_figs``, ``pdf``; scanpy's ``sc.settings.plot_suffix`` before the format); any
other text, and any ``Path``, is a file path, written as given (``.png`` added where it has no suffix of letters:
``"umap_beta0.5"`` is written as ``umap_beta0.5.png``).
Figures are saved at matplotlib's ``savefig.dpi`` (``sc.set_figure_params(dpi_save=...)`` sets it), 150
where it is left at ``"figure"``. As in scanpy, a figure the function made and saved is then closed (after
showing it), so saving in a loop does not pile up figures. Drawing into a grid of your own Axes, pass ``show=False``
to each call (the first call would otherwise show the grid with one panel drawn, as scanpy's plots would).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.collections import LineCollection
from matplotlib.ticker import MaxNLocator

from cellvae import diagnostics
from cellvae.data import check_threshold, warn_user
from cellvae.model import CellVAE, check_model

MAX_LABELLED_DIMENSIONS = 40  # kl_per_dimension names each bar's dimension up to this many

__all__ = ["history", "kl_per_dimension", "rate_distortion"]


def __dir__() -> list[str]:
    """The public functions only, for tab completion (as ``sc.tl``'s), not the modules and helpers this one uses."""
    return sorted(__all__)


def history(
    model: CellVAE,
    *,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
) -> list[Axes] | None:
    """Training curves: distortion and rate per cell, train and validation, against epoch.

    A dotted line marks the epoch whose parameters the model keeps (``model.history.attrs["best_epoch"]``).

    Parameters
    ----------
    model
        A trained :class:`~cellvae.CellVAE`.
    ax
        Two Axes (distortion, rate), or one Axes that then shows the distortion on its left scale and
        the rate on a right one; ``None`` draws a new figure with two panels.
    show, save
        As described in :mod:`cellvae.pl`.

    Returns
    -------
    A list of the two Axes (distortion, rate), where the figure is not shown (``show=False``, or scanpy's
    ``autoshow`` off); else None, as scanpy's plots.
    """
    check_model(model)
    target = _save_target(save, "history")
    frame = model.history
    if frame.empty:
        if frame.attrs.get("history_unread"):  # (load found the folder's history.json missing or unreadable)
            reason = "it was loaded from a folder without a readable history.json; fit it again to plot one"
        elif model.config.reference_categories:
            reason = "map_query had nothing to train (every batch and covariate category of the query is the reference's)"
        else:
            reason = "call model.fit() first"
        raise ValueError(f"the model has no training history: {reason}")
    one_axes = isinstance(ax, Axes)
    if ax is None:
        width, height = _panel_size()
        _, axes = plt.subplots(1, 2, figsize=(2 * width, height))
        axes = list(axes)
    elif one_axes:
        axes = [ax, _right_scale(ax)]
    else:
        axes = _two_axes(ax)
    quantities = (("distortion", "distortion −E[log p(x|z)]", "C0"), ("rate", "rate KL(q‖p)", "C1"))
    for axis, (quantity, title, colour) in zip(axes, quantities):
        for split, style in (("train", "-"), ("validation", "--")):
            column = f"{split}_{quantity}"
            if column not in frame:
                continue
            finite = np.isfinite(frame[column].to_numpy(dtype=float))
            if not finite.any():  # (a legend entry for a line not drawn)
                warn_user(f"pl.history leaves out history[{column!r}]: it holds no finite value", UserWarning)
                continue
            label = f"{split} {quantity}" if one_axes else split
            # a point with no finite neighbour (a one-epoch history) draws no line: marked instead
            alone = finite & ~np.r_[False, finite[:-1]] & ~np.r_[finite[1:], False]
            marks = {"marker": "o", "markevery": alone.tolist()} if alone.any() else {}
            axis.plot(frame["epoch"], frame[column], style, label=label, **marks, **({"color": colour} if one_axes else {}))
        if "best_epoch" in frame.attrs and (axis is axes[-1] or not one_axes):  # once (last) where both share an Axes
            kept = frame.attrs["best_epoch"]
            axis.axvline(kept, color="0.6", linestyle=":", linewidth=1, label=f"kept (epoch {kept})")
        axis.set_xlabel("epoch")
        # epochs are whole numbers (min_n_ticks=1: around one epoch alone it fell back to fractional ticks)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.set_ylabel(f"{quantity}, nats per cell" if one_axes else "nats per cell")
        axis.grid(False)
        if not one_axes:
            axis.set_title(title)
            axis.legend(frameon=False)
    if one_axes:
        if len(frame) == 1:  # each scale's two values would land at the same two heights: the rate's kept apart
            axes[1].margins(y=1.0)
        _legend_clear_of_curves(axes)
    shown = _finish(axes[0].figure, show, target, made=ax is None)
    return None if shown else axes


# ----------------------------------------------------------------------------- rate–distortion and posterior collapse


def rate_distortion(
    frame: pd.DataFrame,
    *,
    groupby: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
) -> Axes | None:
    """The rate–distortion curve of :func:`cellvae.tl.rate_distortion_sweep`: rate on x, distortion on y, points labelled by beta.

    The ringed point has the best ELBO (the least distortion + rate); the dashed line of slope −1
    through it is where distortion + rate (the negative ELBO) equals its value there: points above it
    have a worse ELBO. A sweep's figures are means over its held-out cells (the title says so). With
    ``groupby`` each group's best is ringed (sweeps with another ``random_state`` hold out other cells);
    without it, stacked sweeps' best is looked for among the betas of every sweep (a beta of fewer sweeps
    has its mean over other held-out cells), which the legend says.

    Parameters
    ----------
    frame
        The DataFrame returned by :func:`cellvae.tl.rate_distortion_sweep` (columns ``beta``, ``rate``,
        ``distortion``), or several stacked (``pd.concat``): told apart by their ``random_state`` column and
        their repeated index labels (frames stacked with ``ignore_index=True`` and one seed read as one sweep).
    groupby
        A column of ``frame`` that tells stacked sweeps apart (e.g. a ``"seed"`` column): one line per
        value. Without it, a beta that appears more than once (stacked sweeps) is drawn at the mean of its
        rows, which are shown as small points.
    ax, show, save
        As described in :mod:`cellvae.pl`.

    Returns
    -------
    The Axes, where the figure is not shown (``show=False``, or scanpy's ``autoshow`` off); else None.
    """
    target = _save_target(save, "rate_distortion")
    if not isinstance(frame, pd.DataFrame):  # e.g. the model, as pl.history and pl.kl_per_dimension take
        raise TypeError(
            f"pl.rate_distortion plots a sweep over beta: pass the DataFrame returned by "
            f"cellvae.tl.rate_distortion_sweep(adata, betas=...), got {type(frame).__name__}"
        )
    missing = [c for c in ("beta", "rate", "distortion") if c not in frame]
    if missing:
        raise KeyError(f"columns {missing} not found; pass the DataFrame returned by cellvae.tl.rate_distortion_sweep")
    if groupby is not None and not isinstance(groupby, str):
        raise TypeError(f"groupby takes one column name, e.g. groupby='seed', got {groupby!r}")
    if groupby is not None and groupby not in frame:
        raise KeyError(f"groupby={groupby!r} is not a column of the frame; its columns: {list(frame.columns)}")
    held_out = "train_elbo" in frame  # a sweep's own frame: rate and distortion on held-out cells
    groups = frame[groupby].to_numpy() if groupby is not None else np.zeros(len(frame))
    # which sweep each row is of: its seed (which drew the held-out cells) and the how-manieth time its index label
    # comes with that seed (pd.concat keeps each sweep's 0, 1, ...: sweeps of one seed but other settings)
    sweeps = frame["random_state"].to_numpy() if "random_state" in frame else None
    try:
        frame = frame[["beta", "rate", "distortion"]].astype(float)
    except (TypeError, ValueError) as error:
        raise TypeError(f"beta, rate and distortion must be numbers ({error})") from error
    finite = np.isfinite(frame.to_numpy()).all(axis=1)
    if not finite.all():
        left_out = ", ".join(f"{beta:g}" for beta in frame["beta"][~finite])
        warn_user(
            f"pl.rate_distortion leaves out {int((~finite).sum())} row(s) whose beta, rate or distortion is not finite "
            f"(beta {left_out}): their training diverged or was not measured",
            UserWarning,
        )
    # positions from here; the index labels kept as a column: stacked sweeps repeat them, once per sweep
    frame = frame.assign(group=groups, label=frame.index.to_numpy(), sweep=sweeps)[finite].reset_index(drop=True)
    if frame.empty:
        raise ValueError("no row of the sweep has a finite beta, rate and distortion to plot")
    made = ax is None
    if ax is None:
        _, ax = plt.subplots(figsize=_panel_size())
    else:
        _check_one_axes(ax)
    curves = frame.groupby(["group", "beta"], sort=False, dropna=False)[["rate", "distortion"]].mean().reset_index()
    repeated = len(curves) < len(frame)
    if repeated:  # each row of a repeated beta, under the curve of their means
        ax.plot(frame["rate"], frame["distortion"], ".", color="grey", alpha=0.5, label="each row")
    for number, (group, curve) in enumerate(curves.groupby("group", sort=False, dropna=False)):
        curve = curve.sort_values("rate")
        label = f"{groupby}={group}" if groupby is not None else ("mean per β" if repeated else None)
        ax.plot(curve["rate"], curve["distortion"], "o-", color=f"C{number}", label=label)
        middle = (frame["rate"].min() + frame["rate"].max()) / 2
        for _, row in curve.iterrows():
            position = (row["rate"], row["distortion"])
            # labels in the right half to the left of their point, so that the rightmost stays inside the Axes
            left = row["rate"] > middle
            ax.annotate(
                f"β={row['beta']:g}",
                position,
                textcoords="offset points",
                xytext=(-8 if left else 8, 6),  # (clear of the best point's ring)
                ha="right" if left else "left",
                fontsize="small",
            )
    by_group = zip(curves.groupby("group", sort=False, dropna=False), frame.groupby("group", sort=False, dropna=False))
    for number, ((group, curve), (_, rows)) in enumerate(by_group):
        # each group's own best, among the betas of every sweep stacked in it: a beta of fewer sweeps is a mean over
        # other held-out cells, not comparable
        seed = rows["sweep"].astype(object).where(rows["sweep"].notna(), "no seed")
        occurrence = rows.groupby([seed, rows["label"]], sort=False, dropna=False).cumcount()
        sweep = pd.Series(list(zip(seed, occurrence)), index=rows.index)
        sweeps_per_beta = sweep.groupby(rows["beta"]).nunique()
        in_all = sweeps_per_beta.index[sweeps_per_beta == sweep.nunique()]
        candidates = curve[curve["beta"].isin(in_all)] if len(in_all) else curve
        best = candidates.loc[(candidates["rate"] + candidates["distortion"]).idxmin()]
        among = ""
        if len(in_all) < len(sweeps_per_beta):
            among = f" of the {len(in_all)} β in every sweep" if len(in_all) else ", though no β is in every sweep"
        edge = "black" if groupby is None else f"C{number}"
        label = (
            f"best ELBO{among} (β={best['beta']:g})"
            if groupby is None
            else f"best ELBO of {groupby}={group} (β={best['beta']:g})"
        )
        ax.plot(best["rate"], best["distortion"], "o", ms=12, mfc="none", mec=edge, label=label)
        if len(curves) > 1:  # (one point: no line to draw)
            equal = "equal ELBO" if number == 0 else "_equal ELBO"
            colour = "grey" if groupby is None else edge
            line = _equal_elbo_line(best["rate"] + best["distortion"], curves["rate"], ls="--", colors=colour, lw=1, label=equal)
            ax.add_collection(line, autolim=False)
    ax.margins(0.1)  # room for the labels beside the outermost points
    ax.set_xlabel("rate KL(q‖p) (nats per cell)")
    ax.set_ylabel("distortion −E[log p(x|z)] (nats per cell)")
    if held_out:
        ax.set_title("means over held-out cells", fontsize="medium")
    ax.legend(frameon=False, fontsize="small")
    ax.grid(False)
    shown = _finish(ax.figure, show, target, made=made)
    return None if shown else ax


def kl_per_dimension(
    model: CellVAE,
    adata: ad.AnnData | None = None,
    *,
    threshold: float = diagnostics.ACTIVITY_THRESHOLD,
    batch_size: int = 4096,
    progress: bool = True,
    ax: Axes | None = None,
    show: bool | None = None,
    save: bool | str | os.PathLike | None = None,
) -> Axes | None:
    """Mean KL of each latent dimension, largest first; inactive dimensions in grey.

    The title counts the active dimensions and those carrying at least 0.1 nats per cell (the dotted
    line): under a large beta a dimension can still vary a little across cells yet carry almost nothing.

    Parameters
    ----------
    model
        A trained :class:`~cellvae.CellVAE`.
    adata
        Cells to average over; ``None`` uses the model's own AnnData.
    threshold
        A dimension is inactive when the variance over cells of its posterior mean, Cov_x(E_q[z_d]),
        is at most this.
    batch_size, progress
        Cells per forward pass of the one pass over the cells; show a progress bar (where it lasts over 2 seconds).
    ax, show, save
        As described in :mod:`cellvae.pl`.

    Returns
    -------
    The Axes, where the figure is not shown (``show=False``, or scanpy's ``autoshow`` off); else None.
    """
    check_model(model)
    target = _save_target(save, "kl_per_dimension")
    check_threshold(threshold)
    if ax is not None:
        _check_one_axes(ax)
    if adata is not None and getattr(adata, "n_obs", 2) < 2:  # (what adata is, _posterior_statistics checks)
        raise ValueError(
            f"kl_per_dimension colours the dimensions active across cells (as active_units): give 2 or more, got {adata.n_obs}"
        )
    kl, activity = model._posterior_statistics(adata, batch_size, progress, "kl_per_dimension")  # as active_units
    order = np.argsort(-kl)
    made = ax is None
    if ax is None:  # a bar per dimension, up to a page's width
        width, height = _panel_size()
        wide = min(12.0, max(0.75 * width, (0.3 * len(kl) + 1.5) * width / 4.0))  # (0.3 inch a bar at scanpy's 4 inches)
        _, ax = plt.subplots(figsize=(wide, 0.75 * height))
    colors = np.where(activity[order] > threshold, "tab:blue", "lightgrey")
    ax.bar(np.arange(len(kl)), kl[order], color=colors)
    if len(kl) <= MAX_LABELLED_DIMENSIONS:
        ax.set_xticks(np.arange(len(kl)), [str(d) for d in order], fontsize="small")
        ax.set_xlabel("latent dimension")
    else:  # too many to read: ranks only
        ax.set_xlabel("latent dimensions, largest KL first")
    ax.set_ylabel("KL (nats per cell)")
    ax.axhline(diagnostics.COLLAPSED_KL, color="grey", lw=0.8, ls=":")
    n_active, n_informative = int((activity > threshold).sum()), int((kl >= diagnostics.COLLAPSED_KL).sum())
    ax.set_title(f"{n_active} of {len(kl)} active, {n_informative} ≥ {diagnostics.COLLAPSED_KL:g} nats", fontsize="medium")
    ax.grid(False)
    shown = _finish(ax.figure, show, target, made=made)
    return None if shown else ax


def _equal_elbo_line(total: float, rates: pd.Series, **style) -> LineCollection:
    """The line rate + distortion = ``total``, far beyond the rates on both sides and densely over positive rates on a
    log scale too (a user may set one). A collection added without ``autolim``: the Axes' limits follow the points, also
    after ``relim`` (matplotlib's axline takes no slope on a log scale, and before 3.10 ``relim`` counts every Line2D)."""
    low, high = float(rates.min()), float(rates.max())
    span = max(high - low, abs(low), abs(high), 1.0)
    linear = np.linspace(low - 100 * span, high + 100 * span, 401)
    x = np.unique(np.r_[linear, np.geomspace(span * 1e-9, max(high, span) * 1e3, 401)])
    return LineCollection([np.column_stack([x, total - x])], **style)


def _panel_size() -> tuple[float, float]:
    """The size of one panel, as scanpy's plots take it: matplotlib's ``figure.figsize`` (``sc.set_figure_params(figsize=...)``
    sets it)."""
    width, height = plt.rcParams["figure.figsize"]
    return float(width), float(height)


def _legend_clear_of_curves(axes: list[Axes]) -> None:
    """The legend of one Axes holding two scales (``axes``: it and its right-hand twin, which is drawn over it), at the
    place where it covers the fewest curve points and crossings of either scale: matplotlib's ``loc="best"`` sees only
    the curves of the Axes that holds the legend, and the other scale's ran through it. The user's own Axes keeps its
    size and layout (the legend stays inside it)."""
    lines = [line for axis in axes for line in axis.get_lines()]
    labels = [line.get_label() for line in lines]
    style = {"framealpha": 0.8, "edgecolor": "none", "fontsize": "small"}
    figure = _root_figure(axes[0].figure)
    # measured with a renderer of the figure's own size and dpi, whatever its backend (the PDF and SVG backends' own
    # renderers print the figure at 72 dpi and leave it there)
    width, height = figure.get_size_inches() * figure.dpi
    renderer, costs = RendererAgg(int(width), int(height), figure.dpi), {}
    for axis in axes:  # (the limits are settled lazily: now, before the curves' places are read)
        axis.get_xlim(), axis.get_ylim()
    paths = [line.get_transform().transform_path(line.get_path()) for line in lines]
    for place in ("upper right", "upper left", "lower left", "lower right", "center right", "center left", "upper center"):
        box = axes[1].legend(lines, labels, loc=place, **style).get_window_extent(renderer)
        costs[place] = sum(int(box.count_contains(path.vertices)) + path.intersects_bbox(box, filled=False) for path in paths)
    axes[1].legend(lines, labels, loc=min(costs, key=costs.get), **style)


def _root_figure(figure):
    """The Figure that draws ``figure`` (itself, or the figure a subfigure lies in, at any depth)."""
    while not hasattr(figure, "savefig"):
        figure = figure.figure
    return figure


def _check_one_axes(ax) -> None:
    if not isinstance(ax, Axes):
        raise TypeError(f"ax takes one matplotlib Axes (e.g. from plt.subplots()), got {type(ax).__name__} {ax!r:.60}")


def _right_scale(ax: Axes) -> Axes:
    """A right-hand scale on ``ax``: the one an earlier call made, else a new twin (not a twin of the user's own); the
    Axes current in the figure stays so (a following ``plt.ylabel`` is not drawn on a hidden twin)."""
    made = [other for other in ax.get_shared_x_axes().get_siblings(ax) if getattr(other, "_cellvae_scale_of", None) is ax]
    if made:
        return made[0]
    figure = ax.figure
    current = figure.gca()
    twin = ax.twinx()
    twin._cellvae_scale_of = ax
    figure.sca(current)
    return twin


def _two_axes(ax) -> list[Axes]:
    """``ax`` of :func:`history` given as two Axes (a list, tuple or array of them), checked."""
    axes = list(np.ravel(np.asarray(ax, dtype=object))) if isinstance(ax, (list, tuple, np.ndarray)) else None
    if axes is None or len(axes) != 2 or not all(isinstance(axis, Axes) for axis in axes):
        got = f"{len(axes)} items" if axes is not None and len(axes) != 2 else f"{type(ax).__name__} {ax!r:.60}"
        raise TypeError(f"ax takes one matplotlib Axes or two (distortion, rate), e.g. plt.subplots(1, 2)[1]; got {got}")
    if axes[0] is axes[1]:  # distortion (hundreds of nats) and rate (a few) on one scale
        raise ValueError("ax names the same Axes twice; give two Axes, or that one alone (the rate then gets a right scale)")
    return axes


def _save_target(save, name: str) -> Path | None:
    """The file ``save`` names for the plot ``name`` (see :mod:`cellvae.pl`), checked before any drawing."""
    settings = getattr(sys.modules.get("scanpy"), "settings", None)  # scanpy's, where it is imported
    if save is None and getattr(settings, "autosave", False) is True:  # as scanpy's plots: sc.settings.autosave
        save = True
    if save is None or save is False:
        return None
    if not (save is True or isinstance(save, (str, os.PathLike))):
        raise TypeError(f"save must be True, a suffix such as '_kang.png' or a file path such as 'figure.png', got {save!r}")
    kinds = FigureCanvasBase.get_supported_filetypes()
    text = "" if save is True else os.fspath(save)
    suffix_only = isinstance(save, str) and text.startswith(("_", ".")) and text not in (".", "..") and "/" not in text
    if save is True or text == "" or (suffix_only and os.sep not in text):  # scanpy's forms ("" as True)
        stem, dot, kind = text.rpartition(".")
        if not dot or kind.lower() not in kinds:  # "_kang", "_v1.2": scanpy's format
            stem, kind = text, str(getattr(settings, "file_format_figs", "pdf")).lstrip(".")
        suffix = "." + kind
        stem += str(getattr(settings, "plot_suffix", "") or "")  # sc.settings.plot_suffix, as scanpy appends it
        folder = Path(getattr(settings, "figdir", "figures")).expanduser()  # (made on saving)
        blocked = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
        if blocked is not None:
            raise NotADirectoryError(f"the figure folder {folder} (sc.settings.figdir) cannot be made: {blocked} is a file")
        return folder / f"{name}{stem}{suffix}"
    text = os.path.expanduser(text)  # ("~/figures/x.png", as the shell would read it)
    if text.endswith(("/", os.sep)) or Path(text).name in ("", ".", ".."):
        raise ValueError(f"save={text!r} names a folder; give a file name such as {str(Path(text) / 'figure.png')!r}")
    if not Path(text).resolve().parent.is_dir():
        raise FileNotFoundError(f"the folder of save={text!r} does not exist; create it first")
    suffix = Path(text).suffix.lstrip(".").lower()
    if not suffix.isalpha():  # a dot inside the name ("umap_beta0.5", "run.v2"): no format
        suffix = ""
    if suffix and suffix not in kinds:
        raise ValueError(f"save={text!r}: matplotlib cannot write .{suffix} files; use one of {sorted(kinds)}")
    return Path(text) if suffix else Path(text + ".png")


def _finish(figure, show: bool | None, target: Path | None, made: bool) -> bool:
    """Lay out, save (``target``) and show the figure as scanpy does; return whether it was shown."""
    if made and figure.get_layout_engine() is None:  # a caller's figure (ax given) or rcParams' layout: kept
        figure.tight_layout()
    if target is not None:
        figure = _root_figure(figure)  # (an Axes of a subfigure: the whole figure is saved)
        dpi = plt.rcParams["savefig.dpi"]
        try:
            target.parent.mkdir(parents=True, exist_ok=True)  # scanpy's figdir
            figure.savefig(target, dpi=150 if dpi == "figure" else dpi, bbox_inches="tight")
        except BaseException:
            if made:  # a figure of its own that could not be written is not left open
                plt.close(figure)
            raise
    if show is None:  # as scanpy's plots: its settings.autoshow=False (scripts, pipelines) shows nothing
        scanpy = sys.modules.get("scanpy")
        show = scanpy is None or bool(getattr(getattr(scanpy, "settings", None), "autoshow", True))
    if show:
        plt.show()
    if target is not None and made:
        plt.close(figure)
    return bool(show)
