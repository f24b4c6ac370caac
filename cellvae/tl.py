"""Scanpy-style tools that write only their documented keys. ``embed``, ``transfer_labels``,
``rank_genes_groups`` and ``rate_distortion_sweep`` take an AnnData first; ``interpolate`` and
``latent_shift``, which decode new cells, take the trained model first.

``embed`` returns the trained model; ``transfer_labels`` and ``rank_genes_groups`` write into the
AnnData and return None (or, with ``copy=True``, write into a copy and return it);
``rate_distortion_sweep`` returns a DataFrame; ``interpolate`` and ``latent_shift`` return new AnnData
objects of decoded cells.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellvae import diagnostics
from cellvae.data import (
    MIN_CELLS,
    MISSING_AS_TEXT,
    as_text,
    cell_positions,
    cell_texts,
    check_flag,
    check_is_anndata,
    check_one_name,
    check_ordered,
    check_positive_int,
    check_seed,
    continuous_values,
    gene_names,
    is_backed_matrix,
    is_whole,
    make_view_own_data,
    stored_x,
    view_positions,
    viewed_anndata,
    warn_user,
)
from cellvae.differential import group_name, shrunk_fold_changes_told_as
from cellvae.model import (
    SCVI_TOOLS_ARGUMENTS,
    CellVAE,
    advise_on_foreign_arguments,
    check_model,
    checked_library_sizes,
    key_list,
)
from cellvae.train import DEFAULT_LR, bars_labelled, pick_device, refuse_earlier_checkpoints, setup_distributed

__all__ = ["embed", "interpolate", "latent_shift", "rank_genes_groups", "rate_distortion_sweep", "transfer_labels"]


def __dir__() -> list[str]:
    """The public functions only, for tab completion (as ``sc.tl``'s), not the modules and helpers this one uses."""
    return sorted(__all__)


FIT_OPTIONS = frozenset(inspect.signature(CellVAE.fit).parameters) - {"self"}  # what embed's fit_kwargs may hold
MODEL_OPTIONS = frozenset(inspect.signature(CellVAE.__init__).parameters) - {"self"}
OWN_FIT_OPTIONS = ("max_epochs", "random_state", "progress")  # the tools' own arguments, passed on to fit


def _check_model_kwargs(model_kwargs: dict, tool: str) -> None:
    """Refuse fit's options among a tool's CellVAE arguments, saying to pass them in ``fit_kwargs``, and a dict of
    them as scvi-tools users give one (``model_kwargs={...}``)."""
    if "model_kwargs" in model_kwargs:
        raise TypeError(
            "pass the model's settings as keywords of their own, e.g. n_latent=20, likelihood='zinb', "
            "not as model_kwargs={...} (fit's go in fit_kwargs={...})"
        )
    fit_names = FIT_OPTIONS | {"fit"}
    for name in sorted(model_kwargs.keys() - MODEL_OPTIONS):  # scvi-tools' names of fit options (train_size, ...)
        found = [(needs, advice) for needs, advice in SCVI_TOOLS_ARGUMENTS.get(name, []) if needs in fit_names]
        if found:
            needs, advice = found[0]
            # where the cellvae name goes: the tool's own argument, fit_kwargs, or (kl_warmup, "drop it") as the advice says
            where = ""
            passed = not advice.startswith("drop it")  # (else nothing to pass anywhere)
            if passed and needs in OWN_FIT_OPTIONS:
                where = f" (pass {needs}= to {tool} itself)"
            elif passed and needs in FIT_OPTIONS:
                where = " (CellVAE.fit's options go in fit_kwargs={...}; the model's, such as kl_warmup, are the tool's own)"
            raise TypeError(
                f"{tool}() got an unexpected keyword argument {name!r}, scvi-tools' name for an option of training: "
                f"{advice}{where}"
            )
    misplaced = sorted(set(model_kwargs) & FIT_OPTIONS)
    if misplaced:
        example = ", ".join(f"{name!r}: ..." for name in misplaced)
        raise TypeError(f"{misplaced} are options of CellVAE.fit; pass them as fit_kwargs={{{example}}}")


def _check_fit_kwargs(fit_kwargs: dict | None) -> None:
    """Refuse ``fit_kwargs`` that repeat a tool's own arguments, naming the argument to use instead."""
    if fit_kwargs is not None and not isinstance(fit_kwargs, Mapping):  # before training, not after it at fit(**...)
        raise TypeError(
            f"fit_kwargs takes a dict of CellVAE.fit arguments, e.g. fit_kwargs={{'lr': 1e-3}}, got {fit_kwargs!r:.80}"
        )
    repeated = [name for name in OWN_FIT_OPTIONS if name in (fit_kwargs or {})]
    if repeated:
        raise TypeError(f"pass {repeated} as the function's own arguments (e.g. {repeated[0]}=...), not in fit_kwargs")


# obsm keys scanpy's tools write (a prefix where it ends in "_"), with their uns records: embed refuses such a key
# where the record is there, as it would then describe the embedding written over the tool's
SCANPY_EMBEDDINGS = {
    "X_pca": ("sc.pp.pca", "pca"),
    "X_umap": ("sc.tl.umap", "umap"),
    "X_tsne": ("sc.tl.tsne", "tsne"),
    "X_diffmap": ("sc.tl.diffmap", "diffmap_evals"),
    "X_draw_graph_": ("sc.tl.draw_graph", "draw_graph"),
}


def _where_trained(model: CellVAE) -> dict:
    """The device ``model`` trained on and, on a CPU, torch's thread count: with the seed, what makes its training
    bitwise reproducible (for the record of an embedding)."""
    record = {"device": str(model.device)}
    if model.device.type == "cpu":
        record["torch_threads"] = torch.get_num_threads()
    return record


class TrainingDivergedError(RuntimeError):
    """Training diverged and :meth:`~cellvae.CellVAE.fit` undid it: a tool has no trained model to go on with."""


def _diverged_advice(fit_kwargs: dict | None) -> str:
    """What to do where fit's training diverged and was undone (fit's RuntimeWarning gives the losses)."""
    lr = (fit_kwargs or {}).get("lr", DEFAULT_LR)
    smaller = DEFAULT_LR if lr > DEFAULT_LR else lr / 10
    return (
        "training diverged and was undone (the warning above gives the losses), most likely from too large a learning "
        f"rate (lr={lr:g}): run it again with a smaller one, e.g. fit_kwargs={{'lr': {smaller:g}}}"
    )


def _check_embed(adata: ad.AnnData, key_added: str | None, model_kwargs: dict, fit_kwargs: dict | None) -> tuple[str, str]:
    """:func:`embed`'s checks of its arguments and of the keys it will write, before any work (also run by every
    data-parallel rank of ``cellvae fit``, where only rank 0 embeds); returns ``key_added`` and the ``uns`` key."""
    check_is_anndata(adata)
    _check_fit_kwargs(fit_kwargs)
    key_added = _key(key_added, "X_cellvae")
    _check_model_kwargs(model_kwargs, "embed")
    if "copy" in model_kwargs or "inplace" in model_kwargs:
        raise TypeError(
            "tl.embed writes into adata in place and returns the model; to keep adata as it is, pass adata.copy() "
            "(of an AnnData whose counts are on disk: adata.to_memory())"
        )
    uns_key = _uns_key(key_added)
    _check_record_is_its_own(adata, key_added, uns_key)
    _writable(adata, "adata")
    return key_added, uns_key


def _part(adata: ad.AnnData, cells, genes=slice(None)) -> ad.AnnData:
    """``adata[cells, genes]``, also where ``adata`` is a view of a backed AnnData, which anndata cannot view
    again: then a view of the AnnData it views."""
    viewed = view_positions(adata) if adata.isbacked else None
    if viewed is not None:
        parent, rows, columns = viewed
        return parent[rows[cells], columns[genes]]
    return adata[cells, genes]


def _genes_to_train(adata: ad.AnnData, mask_var: str | np.ndarray | None) -> ad.AnnData:
    """``adata`` (a view of it) restricted to the genes ``mask_var`` marks: a boolean var column or mask."""
    mask = _gene_mask(adata, mask_var)
    return adata if mask is None else adata[:, mask]


def _gene_mask(adata: ad.AnnData, mask_var: str | np.ndarray | None) -> np.ndarray | None:
    """The boolean mask of the genes ``mask_var`` marks (checked); None where it marks them all or is None."""
    if mask_var is None:
        return None
    if isinstance(mask_var, str):
        if mask_var not in adata.var.columns:
            raise KeyError(
                f"mask_var {mask_var!r} is not a column of adata.var (available: {list(adata.var.columns)[:10]}); mark "
                "the genes first, on the counts, e.g. sc.pp.highly_variable_genes(adata, n_top_genes=2000, "
                "flavor='seurat_v3', batch_key='batch', layer='counts') (your batch column, if any, and the layer holding "
                "the counts: leave out layer= where X holds them; this flavor needs pip install scikit-misc, "
                "and its fit can fail with many small batches: sc.pp.filter_genes(adata, min_cells=10) first)"
            )
        column = adata.var[mask_var]
        where = f"adata.var[{mask_var!r}]"
        # booleans with missing values (a nullable column, or an object one from an outer anndata.concat)
        if column.isna().any() and pd.api.types.infer_dtype(column, skipna=True) == "boolean":
            raise ValueError(
                f"{where} has {int(column.isna().sum())} missing value(s); mark every gene True or False, e.g. "
                f"adata.var[{mask_var!r}] = adata.var[{mask_var!r}].fillna(False).astype(bool)"
            )
        if not pd.api.types.is_bool_dtype(column.dtype):
            raise TypeError(f"{where} must be a boolean column (True for the genes to train on), got dtype {column.dtype}")
        mask = column.to_numpy(dtype=bool)
    else:
        if isinstance(mask_var, pd.Series) and not mask_var.index.equals(adata.var_names):
            raise ValueError(
                "mask_var is a Series whose index is not adata.var_names (in their order): it would mark genes by "
                "position; pass adata.var[column] or mask_var.reindex(adata.var_names)"
            )
        mask, where = np.asarray(mask_var), "mask_var"
        if mask.dtype != np.bool_ or mask.shape != (adata.n_vars,):
            raise TypeError(
                f"mask_var must be a var column name or a boolean mask of the {adata.n_vars:,} genes, got "
                f"{mask.dtype} of shape {mask.shape}"
            )
    if not mask.any():
        raise ValueError(f"{where} marks no genes; mark the genes to train on (True)")
    return None if mask.all() else mask


def _uns_key(key_added: str) -> str:
    """The ``uns`` key of an embedding's record: ``"cellvae"`` for the default ``"X_cellvae"``, else ``key_added``."""
    return "cellvae" if key_added == "X_cellvae" else key_added


def _stale_graph_message(adata: ad.AnnData, key_added: str) -> str | None:
    """What to recompute where ``adata`` holds an ``obsm[key_added]`` about to be replaced and a neighbours graph made
    from it or a UMAP (``tl.embed`` warns; ``cellvae embed`` and ``cellvae fit`` print it); None otherwise."""
    if key_added not in adata.obsm:
        return None
    # scanpy's graphs: uns["neighbors"], or another uns key (sc.pp.neighbors(..., key_added=...)), whose records
    # name what each was made from (no use_rep: X_pca or X)
    graphs = {
        name: entry.get("params")
        for name, entry in adata.uns.items()
        if isinstance(entry, Mapping) and (name == "neighbors" or "connectivities_key" in entry)
    }
    from_it = [name for name, params in graphs.items() if isinstance(params, Mapping) and params.get("use_rep") == key_added]
    recorded = any(isinstance(params, Mapping) for params in graphs.values())
    if not from_it and (recorded or "X_umap" not in adata.obsm):  # (no record: a UMAP may have come from it)
        return None
    others = [name for name in from_it if name != "neighbors"]  # (scanpy's default graph needs no key_added)
    named = "" if "neighbors" in from_it or not others else f", key_added={others[0]!r}"
    recompute = f"e.g. sc.pp.neighbors(adata, use_rep={key_added!r}{named})"
    if not from_it:
        return (
            f"the UMAP adata holds (its graph has no record of what it was made from) may have been made from an earlier "
            f"obsm[{key_added!r}]; if so, recompute the graph and UMAP from the new one, {recompute}"
        )
    graph = "neighbours graph" if len(from_it) == 1 else "neighbours graphs"
    return (
        f"the {graph} adata holds, and the UMAP or clusters computed from {'it' if len(from_it) == 1 else 'them'}, "
        f"were made from an earlier obsm[{key_added!r}]; recompute them from the new one, {recompute}"
    )


def _stale_unless_same(stale: str | None, replaced, new: np.ndarray) -> str | None:
    """``stale`` (:func:`_stale_graph_message`'s word), or None where the new embedding is the one it replaces: the
    same model and seed again (a notebook's cell re-run) leave the graph made from it as true as it was."""
    return stale if stale and not np.array_equal(replaced, new) else None


def _check_record_is_its_own(adata: ad.AnnData, key_added: str, uns_key: str) -> None:
    """Refuse a ``key_added`` whose ``uns`` record is not embed's to write (another tool's, or not a mapping) or
    describes another embedding still in ``obsm`` (``"cellvae"`` and the default ``"X_cellvae"`` share
    ``adata.uns["cellvae"]``; scanpy's ``X_pca`` and ``uns["pca"]``, ...); also run by ``cellvae embed`` and
    ``cellvae map``."""
    record = adata.uns.get(uns_key, {})
    if not isinstance(record, Mapping):
        raise TypeError(
            f"adata.uns[{uns_key!r}] holds a {type(adata.uns[uns_key]).__name__}; embed writes its settings into "
            f"adata.uns[{uns_key!r}]['params']: move that entry, or choose another key_added"
        )
    if "params" in record and not isinstance(record["params"], Mapping):  # e.g. a note of the user's: not embed's
        raise TypeError(
            f"adata.uns[{uns_key!r}]['params'] holds a {type(record['params']).__name__}; embed writes its settings "
            f"there: move that entry, or choose another key_added"
        )
    if isinstance(record.get("params"), Mapping) and "epochs_trained" not in record["params"]:
        if "connectivities_key" in record and uns_key != "neighbors":  # sc.pp.neighbors(..., key_added=uns_key)
            raise ValueError(
                f"adata.uns[{uns_key!r}] holds a neighbours graph's record, which sc.pp.neighbors(..., "
                f"key_added={uns_key!r}) wrote there in place of embed's; embed would replace it with its own settings: "
                f"name the graph otherwise (e.g. sc.pp.neighbors(..., key_added='{uns_key}_neighbors')), delete "
                f"adata.uns[{uns_key!r}] if the graph is no longer needed, or choose another key_added here"
            )
        raise ValueError(  # e.g. key_added="neighbors": scanpy's later steps read that record
            f"adata.uns[{uns_key!r}]['params'] is another tool's record (e.g. scanpy's), which embed would replace with "
            "its own settings: choose another key_added"
        )
    for key, (tool, tool_record) in SCANPY_EMBEDDINGS.items():
        if not (key_added == key or key.endswith("_") and key_added.startswith(key)):
            continue
        if tool_record in adata.uns:
            raise ValueError(
                f"key_added={key_added!r} is where scanpy's {tool} wrote its embedding, whose record "
                f"adata.uns[{tool_record!r}] "
                "would then describe another one; choose another key_added, e.g. 'X_cellvae', and pass it to scanpy as "
                "use_rep"
            )
        warn_user(
            f"key_added={key_added!r} is where scanpy's {tool} writes its embedding: a later {tool} replaces "
            f"cellvae's there, and adata.uns[{uns_key!r}] would then describe it; choose another key_added, e.g. "
            "'X_cellvae', and pass it to scanpy as use_rep"
        )
    params = record.get("params")
    recorded = params.get("key_added") if isinstance(params, Mapping) else None
    if isinstance(recorded, str) and recorded != key_added and recorded in adata.obsm:
        raise ValueError(
            f"adata.uns[{uns_key!r}]['params'] records the embedding obsm[{recorded!r}], which an embedding written "
            f"to obsm[{key_added!r}] would leave without its record: choose another key_added"
        )


def embed(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    mask_var: str | np.ndarray | None = None,
    key_added: str | None = "X_cellvae",
    random_state: int = 0,
    max_epochs: int | None = None,
    progress: bool = True,
    fit_kwargs: dict | None = None,
    **model_kwargs,
) -> CellVAE:
    """Train a :class:`~cellvae.CellVAE` and store its latent embedding.

    Parameters
    ----------
    adata
        Raw counts in ``X`` or ``layers[layer]``.
    layer, batch_key
        As in :class:`~cellvae.CellVAE`.
    mask_var
        Train on these genes only: a boolean ``var`` column (e.g. ``"highly_variable"``, from
        ``sc.pp.highly_variable_genes(adata, flavor="seurat_v3", batch_key=...)``) or a boolean mask; ``None``:
        every gene. With batches, about 2,000 variable genes integrate better than all genes; with one batch,
        all genes cluster better (README). The model returned reads its genes from ``adata`` by name.
    key_added
        ``obsm`` key for the embedding (use it as ``sc.pp.neighbors(adata, use_rep=key_added)``; ``None``:
        ``"X_cellvae"``). Replacing an embedding from which adata's neighbours graph (or its UMAP) was made warns
        that they are stale.
    random_state
        Seed of the split, initialisation and minibatch order.
    max_epochs
        Epochs; ``None`` picks them from the dataset size.
    progress
        Show a progress bar.
    fit_kwargs
        Further :meth:`~cellvae.CellVAE.fit` arguments (``batch_size``, ``lr``, ``device``, ...).
    **model_kwargs
        Further :class:`~cellvae.CellVAE` arguments (``n_latent``, ``likelihood``, ...).

    Returns
    -------
    The trained model, on the device it trained on (``fit_kwargs["device"]``, by default a GPU where there is one),
    where it embedded the cells and runs its outputs (:meth:`~cellvae.CellVAE.to_device` moves it). Writes
    ``adata.obsm[key_added]`` and its settings in ``adata.uns["cellvae"]["params"]``
    (for another ``key_added``, in ``adata.uns[key_added]["params"]``, as scanpy keys ``pca`` and ``neighbors``:
    each embedding keeps its own record): the arguments given, ``max_epochs`` (the number picked where None), the
    epochs trained and the epoch kept (``best_epoch``; ``still_improving``, present where the epochs ran out while
    training still improved: more ``max_epochs`` may help), the device it trained on
    and, on a CPU, ``torch_threads`` (bitwise reproducibility needs the same count). Training that diverged (undone by
    :meth:`~cellvae.CellVAE.fit`, with a warning) raises a ``RuntimeError`` and writes nothing.
    """
    key_added, _ = _check_embed(adata, key_added, model_kwargs, fit_kwargs)
    random_state = check_seed(random_state)  # before the counts are read and checked
    genes = _genes_to_train(adata, mask_var)
    model_kwargs = {"layer": layer, "batch_key": batch_key, **model_kwargs}
    model = _trained_model(genes, model_kwargs, max_epochs, random_state, progress, fit_kwargs)
    _store_embedding(adata, genes, model, key_added, random_state, mask_var, progress, model_kwargs, fit_kwargs)
    return model


def _trained_model(
    genes: ad.AnnData, model_kwargs: dict, max_epochs: int | None, random_state: int, progress: bool, fit_kwargs: dict | None
) -> CellVAE:
    """:func:`embed`'s model, trained on ``genes`` (``cellvae fit`` saves it before the cells are embedded)."""
    model = CellVAE(genes, **model_kwargs)
    model.fit(max_epochs=max_epochs, random_state=random_state, progress=progress, **(fit_kwargs or {}))
    if not model.is_trained:  # training diverged and fit gave the model back untrained: nothing to embed with
        raise TrainingDivergedError(f"tl.embed: {_diverged_advice(fit_kwargs)}; nothing was written into adata")
    return model


def _store_embedding(
    adata: ad.AnnData,
    genes: ad.AnnData,
    model: CellVAE,
    key_added: str,
    random_state: int,
    mask_var,
    progress: bool,
    model_kwargs: dict,
    fit_kwargs: dict | None,
) -> None:
    """Embed ``adata``'s cells with :func:`embed`'s trained ``model``; write ``obsm[key_added]`` and the record."""
    uns_key = _uns_key(key_added)
    model_kwargs = dict(model_kwargs)
    layer, batch_key = model_kwargs.pop("layer", None), model_kwargs.pop("batch_key", None)
    # embedded on the device it trained on (under torchrun, this process's own GPU, chosen by fit)
    model.to_device(setup_distributed(pick_device((fit_kwargs or {}).get("device", "auto"))))
    latent = model.get_latent(progress=progress)
    params = {
        "cellvae_version": model.config.cellvae_version,
        "key_added": key_added,
        "layer": layer,
        "batch_key": batch_key,
        "random_state": random_state,
        "epochs_trained": int(len(model.history)),
    }
    # the epochs asked for (resolved where None): with early stopping they set the warm-up and the horizon, so
    # rerunning with max_epochs=epochs_trained would give another model (no settings: a diverged fit was undone)
    if model.train_settings is not None:
        params["max_epochs"] = int(model.train_settings.max_epochs)
    if mask_var is not None:  # (a mask given as an array is not stored: the model's genes are in its config)
        params["mask_var"] = mask_var if isinstance(mask_var, str) else f"{model.config.n_genes} genes"
    if model.history.attrs.get("interrupted"):  # Ctrl-C ended training early
        params["interrupted"] = True
    if model.history.attrs.get("processes", 1) > 1:  # data-parallel: each step's minibatch was processes × batch_size
        params["processes"] = int(model.history.attrs["processes"])
    params |= _kept_epoch_record(model.history)
    for key, value in {**model_kwargs, **(fit_kwargs or {})}.items():  # what .h5ad can store: numbers, text, lists of text
        value = value.item() if isinstance(value, np.generic) else value
        value = value.tolist() if isinstance(value, (np.ndarray, pd.Index)) else value  # keys as an array or Index
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            value = list(value)
        if isinstance(value, (int, float, str, bool, list)):
            params[key] = value
    params |= _where_trained(model)  # the device itself (not "auto")
    # (before the earlier embedding is replaced)
    stale = _stale_unless_same(_stale_graph_message(adata, key_added), adata.obsm.get(key_added), latent)
    make_view_own_data(adata)
    adata.uns[uns_key] = {**adata.uns.get(uns_key, {}), "params": params}
    adata.obsm[key_added] = latent
    if stale:
        warn_user(stale, UserWarning)
    if genes is not adata:  # trained on a view of the marked genes: from now on the model reads them from adata itself
        model.adata = adata  # (by name), so that what is added to it later, e.g. Leiden clusters, is there too


# ----------------------------------------------------------------------------- label transfer


def transfer_labels(
    ref_adata: ad.AnnData,
    query_adata: ad.AnnData,
    labels_key: str | None = None,
    *,
    use_rep: str = "X_cellvae",
    k: int = 15,
    unknown_threshold: float | None = None,
    unlabeled_category: str | None = None,
    novelty_threshold: float | None = None,
    n_jobs: int | None = None,
    soft: bool = False,
    copy: bool = False,
    label_key: str | None = None,
) -> ad.AnnData | None:
    """Predict query labels by a distance-weighted vote of the ``k`` nearest reference cells.

    Each neighbour's vote weighs ``exp(-(d / d_k)^2)``, with ``d_k`` the query cell's distance
    to its k-th neighbour, so closer reference cells count more whatever the embedding's scale.
    Where ``k`` or more reference cells lie exactly at a query cell's point, all of them vote, alike. Other
    reference cells tied at exactly the k-th distance (duplicated cells, a coarsely rounded embedding) are picked by
    their order in ``ref_adata``, as scikit-learn's neighbour search picks them.
    A query cell that is itself a labelled reference cell (the same obs name and embedding: e.g. one AnnData
    passed as both, as scANVI's ``predict`` labels its own cells) does not vote for itself, so its prediction,
    uncertainty and novelty are those of a cell the reference had not seen.
    The vote cannot tell that a cell lies far from every reference cell (a cell type the reference
    lacks is often voted into its nearest type with confidence); the novelty score can.

    Parameters
    ----------
    ref_adata
        Reference cells with labels in ``obs[labels_key]`` (cells with a missing label do not vote)
        and an embedding in ``obsm[use_rep]``.
    query_adata
        Query cells embedded in the same space (e.g. by a model from :meth:`~cellvae.CellVAE.map_query`).
    labels_key
        ``obs`` column of the reference labels (required: its default of None only lets the deprecated
        ``label_key`` be given instead).
    use_rep
        ``obsm`` key of the shared embedding.
    k
        Number of reference neighbours that vote.
    unknown_threshold
        If given, cells whose uncertainty exceeds it are labelled ``"Unknown"`` (with labels that are
        not strings, e.g. integer cluster ids, all predicted labels are then written as strings, so
        that the column stays writable to ``.h5ad``).
    unlabeled_category
        The label that marks unlabelled reference cells (e.g. ``"unknown"``, as scANVI's
        ``unlabeled_category``); those cells do not vote, like cells with a missing label.
    novelty_threshold
        If given, cells whose novelty exceeds it are labelled ``"Unknown"`` too (e.g. 0.95; strings
        as with ``unknown_threshold``).
    n_jobs
        Parallel jobs of the nearest-neighbour search (scikit-learn's ``n_jobs``; ``-1``: every core), which takes
        nearly all of the time for large sets; ``None``: scanpy's ``sc.settings.n_jobs``. The results do not depend on it.
    soft
        Also write each cell's weighted vote share of every reference label (as scANVI's ``predict(soft=True)``
        gives per-label probabilities): a table of cells × labels in float32, which for an atlas's hundreds of labels
        takes cells × labels × 4 bytes. As a DataFrame: ``pd.DataFrame(query_adata.obsm[key],
        index=query_adata.obs_names, columns=query_adata.uns[key]["labels"])`` with ``key = f"{labels_key}_vote_shares"``.
    copy
        Write the results into a copy of ``query_adata`` and return it (as scanpy's ``copy=True``),
        leaving ``query_adata`` as it is.
    label_key
        Deprecated name of ``labels_key`` (cellvae 0.1.0), still accepted with a ``FutureWarning``.

    Returns
    -------
    None (with ``copy=True`` the copy). Writes into ``query_adata``, and changes nothing else:

    - ``obs[f"{labels_key}_predicted"]``: categorical, holding the reference's label values (numbers stay numbers),
      its categories the labels some cell received; a tied vote goes to the label that sorts first.
    - ``obs[f"{labels_key}_uncertainty"]``: 1 − the winning label's weighted vote share, in [0, 1).
    - ``obs[f"{labels_key}_novelty"]``: the share of labelled reference cells (at most 10,000 of them, drawn with a
      fixed seed whatever their order) that lie closer to their own ``k`` nearest labelled reference cells, on average,
      than this cell lies to its ``k``; in [0, 1], near 1 for cells unlike the reference; NaN where the reference has a
      single labelled cell (so ``k=1``), which no distance can be compared with.
    - with ``soft=True``, ``obsm[f"{labels_key}_vote_shares"]``: cells × reference labels, float32; each row sums to 1
      and its largest share is 1 − the uncertainty; and ``uns[f"{labels_key}_vote_shares"]["labels"]``: the labels'
      text, in the columns' order (an array, not a DataFrame named by them, because anndata cannot write a label
      holding ``/`` as a column name). Without ``soft``, the shares an earlier ``soft=True`` run wrote there are
      removed (they would not match the new predictions).
    """
    from sklearn.neighbors import NearestNeighbors

    labels_key = _labels_key(labels_key, label_key)
    check_is_anndata(ref_adata, "ref_adata")
    check_is_anndata(query_adata, "query_adata")
    copy = check_flag(copy, "copy")
    soft = check_flag(soft, "soft")
    _writable(query_adata, "query_adata", copy)
    check_one_name(labels_key, "labels_key")
    if soft and "/" in labels_key:  # obsm and uns keys named by it: anndata would write them as nested groups
        raise ValueError(
            f"soft=True writes obsm[{labels_key + '_vote_shares'!r}], which an .h5ad cannot hold ('/' nests groups, so the "
            f"file could not be read back): rename the column, e.g. ref_adata.obs[{labels_key.replace('/', '_')!r}] = "
            f"ref_adata.obs[{labels_key!r}], and pass that labels_key"
        )
    check_one_name(use_rep, "use_rep", "obsm key")
    check_one_name(unlabeled_category, "unlabeled_category", "label")
    for name, threshold in (("unknown_threshold", unknown_threshold), ("novelty_threshold", novelty_threshold)):
        is_number = isinstance(threshold, (int, float, np.number)) and not isinstance(threshold, (bool, np.bool_))
        if threshold is not None and not (is_number and 0.0 <= threshold <= 1.0):
            raise ValueError(f"{name} must be a number in [0, 1] or None, got {threshold!r}")
    labelled = _voting_cells(ref_adata, labels_key, k, unlabeled_category, novelty_threshold)
    if query_adata.n_obs == 0:
        raise ValueError(f"query_adata has no cells (0 × {query_adata.n_vars} genes): there is nothing to label")
    k = int(k)
    n_jobs = _n_jobs(n_jobs)
    reference, query = _shared_embedding(ref_adata, query_adata, use_rep)
    labels = ref_adata.obs[labels_key]
    # the reference's own label values (numbers stay numbers; a categorical keeps its order)
    codes, names = pd.factorize(labels[labelled], sort=True)
    names = np.asarray(names, dtype=object)
    if soft and len(set(map(str, names))) < len(names):  # the table's columns are named by text (uns)
        raise ValueError(
            f"ref_adata.obs[{labels_key!r}] holds labels of different types with the same text (e.g. 1 and '1'), "
            "which soft=True cannot name apart; convert the column to one type first, e.g. .astype(str)"
        )
    # a query cell that is itself a voter (ref_adata and query_adata one AnnData, as scANVI's predict) votes not for itself
    own_voter = _own_voter(ref_adata, query_adata, labelled, reference, query)
    leave_out = bool((own_voter >= 0).any())
    if leave_out and labelled.sum() == 1:
        raise ValueError(
            "the one labelled reference cell is itself a query cell, and a cell does not vote for itself: label more "
            "reference cells"
        )
    if leave_out and k >= labelled.sum():
        raise ValueError(
            f"k={k} leaves no voter to spare: query cells that are labelled reference cells do not vote for themselves, "
            f"so k must be below the {int(labelled.sum())} labelled reference cells; lower k"
        )
    voters = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(reference[labelled])
    distances, neighbours = voters.kneighbors(query, n_neighbors=k + int(leave_out))
    if leave_out:
        distances, neighbours = _without_own_voter(distances, neighbours, own_voter)
    bandwidth = np.maximum(distances[:, -1:], 1e-12)
    weights = np.exp(-((distances / bandwidth) ** 2))
    winner, winning_weight = _weighted_vote(codes[neighbours], weights)
    uncertainty = 1.0 - winning_weight / weights.sum(axis=1)
    # k or more voters exactly where a query cell is (e.g. cells without counts, one point per batch): which k of
    # them kneighbors returned depended on their order, so all of them vote, alike
    tied = _exactly_at_their_voters(query, reference[labelled], neighbours, distances)
    points, point_of = np.unique(query[tied], axis=0, return_inverse=True)
    tied_counts = _labels_at_points(reference[labelled], codes, points, len(names))[point_of.ravel()]
    own_tied = own_voter[tied]
    tied_counts[np.flatnonzero(own_tied >= 0), codes[own_tied[own_tied >= 0]]] -= 1  # (its own vote left out)
    tied_shares = tied_counts / tied_counts.sum(axis=1, keepdims=True)
    winner[tied], uncertainty[tied] = tied_shares.argmax(axis=1), 1.0 - tied_shares.max(axis=1)
    predicted = names[winner].astype(object)
    novelty = _novelty(voters, reference[labelled], distances, k)
    categories = list(names)
    if unknown_threshold is not None or novelty_threshold is not None:
        # cells voted "Unknown" would be told from those over a threshold by nothing (or by the case of a letter)
        clashing = [str(name) for name in names if str(name).casefold() == "unknown"]
        for label in clashing:  # ('Unknown' and 'unknown' both: each told)
            shared = "so the two share one label" if label == "Unknown" else "so the two differ in case alone"
            warn_user(
                f"ref_adata.obs[{labels_key!r}] has a label {label!r}, and query cells over unknown_threshold "
                f"or novelty_threshold are labelled 'Unknown', {shared}; pass unlabeled_category={label!r} if "
                "those reference cells are unlabelled, or rename that label",
                UserWarning,
            )
        if not all(isinstance(name, str) for name in categories):  # one type per column, or h5ad cannot store it
            predicted, categories = predicted.astype(str).astype(object), [str(name) for name in categories]
        unknown = np.zeros(len(query), dtype=bool)
        if unknown_threshold is not None:
            unknown |= uncertainty > unknown_threshold
        if novelty_threshold is not None:
            unknown |= novelty > novelty_threshold
        predicted[unknown] = "Unknown"
        categories = categories + (["Unknown"] if "Unknown" not in categories else [])
    query_adata = query_adata.copy() if copy else query_adata
    make_view_own_data(query_adata)
    # only the labels some cell received: scanpy's legends and rank_genes_groups of the column need no empty ones
    # an ordered reference column (e.g. stages) stays ordered, unless "Unknown" joined its labels
    ordered = isinstance(labels.dtype, pd.CategoricalDtype) and labels.cat.ordered and categories == list(names)
    query_adata.obs[f"{labels_key}_predicted"] = pd.Categorical(
        predicted, categories=categories, ordered=ordered
    ).remove_unused_categories()
    query_adata.obs[f"{labels_key}_uncertainty"] = uncertainty
    query_adata.obs[f"{labels_key}_novelty"] = novelty
    shares_key = f"{labels_key}_vote_shares"
    if soft:
        shares = _vote_shares(codes[neighbours], weights, len(names))
        shares[tied] = tied_shares
        query_adata.obsm[shares_key] = shares
        query_adata.uns[shares_key] = {"labels": np.array([str(name) for name in names], dtype=object)}
    elif shares_key in query_adata.obsm:  # an earlier soft=True run's shares: they no longer match these predictions
        earlier = query_adata.uns.get(shares_key)
        if isinstance(earlier, Mapping) and "labels" in earlier:
            del query_adata.obsm[shares_key], query_adata.uns[shares_key]
    return query_adata if copy else None


def _shared_embedding(ref_adata: ad.AnnData, query_adata: ad.AnnData, use_rep: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference's and the query's ``obsm[use_rep]`` as dense arrays; clear errors where either lacks it (naming
    a key both hold alike), where their widths differ or where they hold NaN or infinite values."""
    for name, adata in (("ref_adata", ref_adata), ("query_adata", query_adata)):
        if use_rep not in adata.obsm:
            shared = [
                key
                for key in ref_adata.obsm
                if key in query_adata.obsm
                and _same_width(ref_adata, query_adata, key)
                and key not in SCANPY_EMBEDDINGS  # (X_pca of each alone: no shared space; X_pca_harmony is one)
                and not key.startswith("X_draw_graph_")
            ]
            either = f"pass use_rep={shared[0]!r} if both hold the same model's embedding there, or " if shared else ""
            raise KeyError(
                f"use_rep {use_rep!r} not found in {name}.obsm (available: {list(adata.obsm.keys())}); "
                f"{either}embed both with the same model first, e.g. query_model.get_latent(...)"
            )
    reference, query = (_dense(adata.obsm[use_rep]) for adata in (ref_adata, query_adata))
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"obsm[{use_rep!r}] has {reference.shape[1]} dimensions in ref_adata but {query.shape[1]} in query_adata; "
            "both must come from the same model"
        )
    for name, values in (("ref_adata", reference), ("query_adata", query)):
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).any(axis=1).sum())
            raise ValueError(f"{name}.obsm[{use_rep!r}] has NaN or infinite values in {bad:,} cells; embed them again")
    return reference, query


def _voting_cells(
    ref_adata: ad.AnnData, labels_key: str, k, unlabeled_category: str | None, novelty_threshold: float | None
) -> np.ndarray:
    """The reference cells that vote in :func:`transfer_labels` (those with a label), after its checks of the labels
    and of ``k`` against them; also run by ``cellvae map`` before it trains."""
    if labels_key not in ref_adata.obs.columns:
        raise KeyError(f"labels_key {labels_key!r} not found in ref_adata.obs; available: {list(ref_adata.obs.columns)}")
    labels = ref_adata.obs[labels_key]
    labelled = labels.notna().to_numpy()  # read-only under pandas 3 (copy-on-write): combined, not changed in place
    if unlabeled_category is not None:
        unlabelled = labels.isin([unlabeled_category]).to_numpy(dtype=bool)  # (!= gives NA on nullable columns)
        if not unlabelled.any():  # as text: cellvae map's --unlabeled-category -1 for a column of numbers
            unlabelled = (labels.notna() & (labels.astype(str) == str(unlabeled_category))).to_numpy(dtype=bool)
        if not unlabelled.any():  # a misspelt name would let the unlabelled cells vote, silently
            names = pd.unique(labels.dropna().astype(str))
            alike = [name for name in names if name.casefold() == str(unlabeled_category).casefold()]
            warn_user(
                f"unlabeled_category {unlabeled_category!r} is no label of ref_adata.obs[{labels_key!r}], so it leaves "
                "no cell out of the vote; "
                + (f"did you mean {alike[0]!r}?" if alike else f"its labels are e.g. {sorted(names)[:8]}"),
                UserWarning,
            )
        labelled = labelled & ~unlabelled
    # missing labels written as text (.astype(str) of NaN, a file's empty cells) would vote as a label of their own
    texts = labels[labelled].astype(str)
    missing = sorted(set(texts[texts.isin(MISSING_AS_TEXT) | (texts.str.strip() == "")]))
    if missing:
        counts = ", ".join(f"{int((texts == label).sum())} {label!r}" for label in missing)
        # (prose, not a line of code: cellvae map words ref_adata as its --reference file)
        how = (
            f"the column's .cat.remove_categories({missing})"
            if isinstance(labels.dtype, pd.CategoricalDtype)
            else f"the column's .replace({{{', '.join(f'{label!r}: np.nan' for label in missing)}}})"
        )
        offer = len(missing) == 1 and unlabeled_category is None  # (it takes one label: not in place of the user's)
        warn_user(
            f"ref_adata.obs[{labels_key!r}] labels cells with the text of a missing value ({counts}; .astype(str) writes "
            f"NaN as 'nan'): they vote as a label of their own, which query cells can be given; if they are unlabelled, "
            f"make them missing values in ref_adata.obs[{labels_key!r}] (e.g. with {how})"
            + (f", or pass unlabeled_category={missing[0]!r}" if offer else ""),
            UserWarning,
        )
    check_positive_int(k, "k")
    if not labelled.any():
        skipped = "missing" + (f" or {unlabeled_category!r}" if unlabeled_category is not None else "")
        raise ValueError(f"ref_adata.obs[{labels_key!r}] has no labelled cells (every label is {skipped})")
    if k > labelled.sum():
        raise ValueError(f"k={k} is larger than the {int(labelled.sum())} labelled reference cells; lower k")
    if novelty_threshold is not None and labelled.sum() < 2:
        raise ValueError(
            "novelty_threshold needs at least 2 labelled reference cells (novelty compares the query's distances with "
            "the reference cells' distances to one another); ref_adata has 1: pass novelty_threshold=None"
        )
    return labelled


def _labels_key(labels_key, label_key) -> str:
    """``labels_key``, or the value given under its deprecated name ``label_key`` (with a warning)."""
    if label_key is None:
        if labels_key is None:
            raise TypeError("transfer_labels() needs labels_key, the ref_adata.obs column of the labels")
        return labels_key
    if labels_key is not None:
        raise TypeError("transfer_labels() got both labels_key and its deprecated name label_key; pass only labels_key")
    warn_user("transfer_labels(label_key=...) is deprecated; pass labels_key=... (the same value)", FutureWarning)
    return label_key


def _n_jobs(n_jobs) -> int:
    """``n_jobs`` as scikit-learn takes it: a whole number other than 0 (``None``: scanpy's setting)."""
    if n_jobs is None:
        import scanpy as sc

        n_jobs = sc.settings.n_jobs
    is_integer = is_whole(n_jobs)
    if not is_integer or n_jobs == 0:
        raise ValueError(f"n_jobs must be a whole number of jobs (e.g. 2, or -1 for every core) or None, got {n_jobs!r}")
    return int(n_jobs)


def _weighted_vote(labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The label with the largest summed weight in each row of ``labels`` (cells × neighbours, integer codes;
    a tie goes to the smallest code) and that summed weight.

    Built without a cells × labels table, which for a large query and an atlas's hundreds of labels (or a
    column of nearly unique values) would not fit in memory: cells × neighbours² comparisons instead."""
    label_weight = np.empty_like(weights)
    for j in range(labels.shape[1]):  # the summed weight of the label of each cell's j-th neighbour
        label_weight[:, j] = np.where(labels == labels[:, j : j + 1], weights, 0.0).sum(axis=1)
    best = label_weight.max(axis=1)
    winner = np.where(label_weight == best[:, None], labels, np.iinfo(labels.dtype).max).min(axis=1)
    return winner, best


def _vote_shares(labels: np.ndarray, weights: np.ndarray, n_labels: int) -> np.ndarray:
    """Each cell's share of the summed weight that went to each label (cells × labels; ``labels`` as in
    :func:`_weighted_vote`)."""
    rows = np.repeat(np.arange(len(labels)), labels.shape[1])
    each_share = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32).ravel()
    shares = sp.csr_matrix((each_share, (rows, labels.ravel())), shape=(len(labels), n_labels))  # sums repeats
    return shares.toarray()  # the one dense table


def _exactly_at_their_voters(query: np.ndarray, reference: np.ndarray, neighbours: np.ndarray, distances) -> np.ndarray:
    """Which query cells have all their nearest reference cells exactly at their own point, compared by coordinates
    (above 15 dimensions scikit-learn's brute-force search gives identical points a distance of about 1e-7)."""
    near = np.flatnonzero(distances[:, -1] <= 1e-6 * (1.0 + np.abs(query).max(axis=1)))
    same = (reference[neighbours[near]] == query[near, None, :]).all(axis=(1, 2))
    tied = np.zeros(len(query), dtype=bool)
    tied[near[same]] = True
    return tied


def _dense(values) -> np.ndarray:
    """An obsm value (array, sparse matrix or DataFrame) as a float64 array."""
    return np.asarray(values.toarray() if sp.issparse(values) else values, dtype=np.float64)


def _same_width(ref_adata: ad.AnnData, query_adata: ad.AnnData, key: str) -> bool:
    """Whether ``obsm[key]`` of both AnnDatas is a table of as many columns (an embedding they may share)."""
    widths = {np.shape(adata.obsm[key])[1:] for adata in (ref_adata, query_adata)}
    return len(widths) == 1 and len(widths.pop()) == 1


def _labels_at_points(reference: np.ndarray, codes: np.ndarray, points: np.ndarray, n_labels: int) -> np.ndarray:
    """How many of the ``reference`` cells (with label ``codes``) that lie exactly at each of ``points`` hold each
    label (points × labels)."""
    counts = np.zeros((len(points), n_labels))
    candidates = np.flatnonzero(np.isin(reference[:, 0], points[:, 0]))  # (one coordinate first: a cheap pass)
    for row, point in enumerate(points):
        members = candidates[(reference[candidates] == point).all(axis=1)]
        counts[row] = np.bincount(codes[members], minlength=n_labels)
    return counts


def _own_voter(
    ref_adata: ad.AnnData, query_adata: ad.AnnData, labelled: np.ndarray, reference: np.ndarray, query: np.ndarray
) -> np.ndarray:
    """Per query cell, its row among the voting reference cells where it is one of them (the same obs name and
    embedding), else -1. Where the two hold the same obs names in the same order (one AnnData, or a copy), cells are
    matched by position; otherwise by name, or where names repeat by name and embedding together."""
    own = np.full(len(query), -1, dtype=np.int64)
    voter_row = np.cumsum(labelled) - 1  # each reference cell's row among the voters
    if ref_adata.obs_names.equals(query_adata.obs_names):
        same = labelled & (reference == query).all(axis=1)
        own[same] = voter_row[same]
        return own
    if not (ref_adata.obs_names.is_unique and query_adata.obs_names.is_unique):  # a name and an embedding: one cell
        voters = pd.DataFrame({"name": ref_adata.obs_names[labelled], "row": np.arange(labelled.sum())})
        voters["point"] = [(row + 0.0).tobytes() for row in reference[labelled]]  # (+ 0.0: -0.0 reads as 0.0, as ==)
        cells = pd.DataFrame({"name": query_adata.obs_names, "point": [(row + 0.0).tobytes() for row in query]})
        matched = cells.reset_index().merge(voters.drop_duplicates(["name", "point"]), on=["name", "point"])
        own[matched["index"].to_numpy()] = matched["row"].to_numpy()
        return own
    found = ref_adata.obs_names[labelled].get_indexer(query_adata.obs_names)
    cells = np.flatnonzero(found >= 0)
    same = (reference[labelled][found[cells]] == query[cells]).all(axis=1)
    own[cells[same]] = found[cells[same]]
    return own


def _without_own_voter(distances: np.ndarray, neighbours: np.ndarray, own_voter: np.ndarray) -> tuple[np.ndarray, ...]:
    """The ``k + 1`` nearest voters of each query cell less one: the cell itself where it is among them, else the
    farthest (the cell's twins at its point may have come first)."""
    dropped = neighbours == own_voter[:, None]
    dropped[~dropped.any(axis=1), -1] = True
    kept = ~dropped
    shape = (len(neighbours), neighbours.shape[1] - 1)
    return distances[kept].reshape(shape), neighbours[kept].reshape(shape)


def _novelty(voters, reference: np.ndarray, query_distances: np.ndarray, k: int) -> np.ndarray:
    """Share of reference cells (at most 10,000, drawn with a fixed seed) whose mean distance to their own
    nearest reference cells is strictly below each query cell's to its nearest: a tie is not closer. Both sides
    average over as many neighbours: ``k``, or one fewer than the reference cells (NaN for a one-cell reference).
    The draw is made from the cells sorted by their coordinates, so that it does not depend on their order."""
    n = min(k, len(reference) - 1)
    if n < 1:
        return np.full(len(query_distances), np.nan)
    if len(reference) > 10_000:
        in_order = reference[np.lexsort(reference.T[::-1])]
        reference = in_order[np.random.default_rng(0).choice(len(reference), 10_000, replace=False)]
    own = voters.kneighbors(reference, n_neighbors=n + 1)[0][:, 1:].mean(axis=1)
    return np.searchsorted(np.sort(own), query_distances[:, :n].mean(axis=1), side="left") / len(own)


# ----------------------------------------------------------------------------- differential expression


# scanpy's arguments of sc.tl.rank_genes_groups that cellvae's has not: the advice its error gives
SCANPY_ARGUMENTS = {
    "use_raw": [(None, "drop it: the model reads the raw counts it was trained on (X or its layer), not adata.raw")],
    "layer": [
        (None, "drop it: the model reads its counts where it was trained on them (model.config.layer), in X or that layer")
    ],
    "rankby_abs": [(None, "drop it: sort sc.get.rank_genes_groups_df(adata, group) by the absolute scores instead")],
    "corr_method": [(None, "drop it: pvals_adj is the posterior expected false discovery rate, with nothing to correct")],
    "tie_correct": [(None, "drop it: a setting of scanpy's Wilcoxon test; the model's posterior ranks the genes here")],
    "mask_var": [(None, "drop it: the model's genes are ranked (those of its own mask_var, where it was trained on some)")],
}


@functools.partial(advise_on_foreign_arguments, arguments=SCANPY_ARGUMENTS, whose="scanpy's")
def rank_genes_groups(
    adata: ad.AnnData,
    groupby: str,
    *,
    model: CellVAE,
    groups: str | list[str] = "all",
    reference: str = "rest",
    delta: float = 0.25,
    batch_correction: bool = True,
    n_draws: int = 1000,
    max_cells: int = 2000,
    random_state: int = 0,
    pts: bool = False,
    n_genes: int | None = None,
    key_added: str | None = "rank_genes_groups",
    copy: bool = False,
    progress: bool = True,
    method: None = None,
) -> ad.AnnData | None:
    """Rank genes for each group by the model's differential expression, in scanpy's format.

    Runs :meth:`~cellvae.CellVAE.differential_expression` for each group against ``reference`` and stores
    the result where :func:`scanpy.tl.rank_genes_groups` does, so that ``sc.get.rank_genes_groups_df``,
    ``sc.pl.rank_genes_groups`` and ``sc.pl.rank_genes_groups_dotplot`` read it.

    Parameters
    ----------
    adata
        Cells with raw counts as the model reads them (genes matched as in
        :meth:`~cellvae.CellVAE.get_latent`).
    groupby
        Categorical ``obs`` column of group labels (e.g. ``"leiden"``), as scanpy's plots need.
    model
        A trained model.
    groups
        ``"all"`` or a list of the groups to rank genes for.
    reference
        ``"rest"`` (each group against all other labelled cells) or one group.
    delta, batch_correction, n_draws, max_cells, random_state
        As in :meth:`~cellvae.CellVAE.differential_expression`.
    pts
        Also store each gene's share of cells with a non-zero count, as scanpy's ``pts=True`` does (a
        table with a column per group: anndata 0.13 cannot write it to ``.h5ad`` where a group name holds
        a ``/``).
    n_genes
        Keep each group's ``n_genes`` top-ranked genes, as scanpy's ``n_genes`` does (``None``: all of the
        model's genes; scanpy's default keeps 100). ``pts`` still covers every gene. For a model trained on some
        of the genes (``mask_var``), scanpy plots that read every gene's values
        (``sc.pl.rank_genes_groups_dotplot(..., values_to_plot="logfoldchanges")``) ask for a result of all of
        ``adata``'s genes: give them ``adata[:, model.config.gene_names].copy()``.
    key_added
        ``uns`` key of the result (``None``: ``"rank_genes_groups"``).
    copy
        Write the result into a copy of ``adata`` and return it (as scanpy's ``copy=True``), leaving
        ``adata`` as it is.
    progress
        Show a progress bar (where the work lasts over 2 seconds).
    method
        Scanpy's choice of test, which has no meaning here: the model's posterior ranks the genes. Any value
        but ``None`` (e.g. ``"wilcoxon"``) is refused with the advice to call :func:`scanpy.tl.rank_genes_groups`.

    Returns
    -------
    None (with ``copy=True`` the copy). Writes ``adata.uns[key_added]``
    with ``names`` (each group's genes, up-regulated first: ordered by
    ``scores``, then by the log2 fold change), ``scores`` (P(lfc > delta) − P(lfc < −delta), in [−1, 1]; a
    group's top genes often all score 1, so ``sc.pl.rank_genes_groups``' score panels are flat there: plot with
    ``sc.pl.rank_genes_groups_dotplot(..., values_to_plot="logfoldchanges")`` or ``_matrixplot`` instead),
    ``logfoldchanges`` (posterior mean log2 fold change, shrunk), ``pvals`` (the local false discovery rate 1
    − P(|lfc| > delta)), ``pvals_adj`` (the posterior expected false discovery rate of calling this gene and
    all genes with a higher P(|lfc| > delta), a property of the list, not of the gene alone; both are
    Bayesian, not frequentist p-values, and at least 1 / (n_draws + 1), the resolution of the draws;
    ``sc.get.rank_genes_groups_df(..., pval_cutoff=0.05)`` keeps the genes whose expected FDR is below 5%;
    ``is_de`` of ``differential_expression`` also calls a list at exactly 5%) and ``params``; with
    ``pts=True`` also, as scanpy, ``pts`` (each group's share of cells with a non-zero count; with a ``reference``
    group, its column too) and, against ``"rest"``, ``pts_rest`` (the share among the rest of the labelled cells: cells with no
    label in ``groupby`` are left out, where scanpy's ``pts_rest`` counts them). Genes of
    the model missing from ``adata`` are left out.
    """
    check_is_anndata(adata)
    if method is not None:
        raise ValueError(
            f"method={method!r}: cellvae.tl.rank_genes_groups ranks genes by the model's posterior and takes no "
            f"method; for scanpy's {method!r} test call scanpy.tl.rank_genes_groups(adata, {groupby!r}, method={method!r}) "
            "on normalised, log-transformed counts"
        )
    copy = check_flag(copy, "copy")
    _writable(adata, "adata", copy)
    check_model(model)
    check_one_name(groupby, "groupby")
    pts = check_flag(pts, "pts")
    progress = check_flag(progress, "progress")
    key_added = _key(key_added, "rank_genes_groups")
    previous = adata.uns.get(key_added)
    if previous is not None and not (isinstance(previous, Mapping) and ({"names", "params"} <= set(previous) or not previous)):
        raise ValueError(  # e.g. key_added="neighbors": scanpy's later steps read that record
            f"adata.uns[{key_added!r}] holds another tool's entry, not a rank_genes_groups result, which this would "
            "replace: choose another key_added"
        )
    if n_genes is not None:
        check_positive_int(n_genes, "n_genes")
    if groupby not in adata.obs.columns:
        raise KeyError(f"groupby {groupby!r} not found in adata.obs; available: {list(adata.obs.columns)}")
    column = adata.obs[groupby]
    if not isinstance(column.dtype, pd.CategoricalDtype):  # scanpy's plots of the result need one
        raise ValueError(
            f"obs[{groupby!r}] is not categorical, which scanpy's rank_genes_groups plots need; convert it first: "
            f"adata.obs[{groupby!r}] = adata.obs[{groupby!r}].astype('category')"
        )
    counts = column.value_counts(sort=False)
    unused = [str(c) for c in counts.index[counts.to_numpy() == 0]]
    if unused and isinstance(groups, str) and groups == "all":  # named groups: scanpy shows only those
        raise ValueError(
            f"obs[{groupby!r}] has categories without cells {unused[:5]}, which scanpy's plots of the result cannot "
            f"show; drop them first: adata.obs[{groupby!r}] = adata.obs[{groupby!r}].cat.remove_unused_categories()"
        )
    groups, group1, reference, scanpy_name = _groups_to_compare(column, groupby, groups, reference)
    with shrunk_fold_changes_told_as(
        "their logfoldchanges can miss large changes",
        f"for such a group's expression1 and expression2 (not shrunk) call model.differential_expression(adata, "
        f"groupby={groupby!r}, group1=...)",
    ):
        try:
            result = model.differential_expression(
                adata,
                groupby=groupby,
                group1=group1,
                group2=None if reference == "rest" else reference,
                delta=delta,
                batch_correction=batch_correction,
                n_draws=n_draws,
                max_cells=max_cells,
                random_state=random_state,
                progress=progress,
            )
        except ValueError as error:  # a group without cells, named by this function's arguments
            told = re.sub(r"^group1: ", "groups: ", re.sub(r"^group2: ", "reference: ", str(error)))
            if told == str(error):
                raise
            raise ValueError(told) from None
    in_data = result.index.isin(gene_names(adata))  # genes the data lack (read as zeros) are left out
    result = result if in_data.all() else result[in_data]  # (a copy of the whole table only where some are)
    # Stored as float32 (as scanpy does) before sorting, so that rounding does not order genes of equal score.
    result["score"] = (result["proba_up"] - result["proba_down"]).astype(np.float32)
    floor = 1.0 / (n_draws + 1)  # the resolution of n_draws draws: no probability is exactly 0 (log10 plots)
    result["pvals"] = result["proba_not_de"].clip(lower=floor)
    result["pvals_adj"] = result["expected_fdr"].clip(lower=floor)
    fields = {"names": "gene", "scores": "score", "logfoldchanges": "lfc_mean", "pvals": "pvals", "pvals_adj": "pvals_adj"}
    dtypes = {"names": str, "scores": np.float32, "logfoldchanges": np.float32, "pvals": np.float64, "pvals_adj": np.float64}
    ranked: dict[str, list[np.ndarray]] = {field: [] for field in fields}
    shares, shares_rest = {}, {}
    for group, frame in result.groupby("group1", sort=False):
        frame = frame.reset_index().sort_values(["score", "lfc_mean"], ascending=False, kind="stable")
        for field, source in fields.items():
            ranked[field].append(frame[source].to_numpy()[:n_genes].astype(dtypes[field]))
        shares[scanpy_name.get(group, group)] = frame.set_index("gene")["fraction_nonzero1"]
        shares_rest[scanpy_name.get(group, group)] = frame.set_index("gene")["fraction_nonzero2"]
    compared = list(shares)
    measured = set(result.index)
    genes = [g for g in model.config.gene_names if g in measured]
    ranking = {
        "params": {
            "groupby": groupby,
            "reference": scanpy_name.get(reference, reference),
            "method": "cellvae",
            "use_raw": False,
            "layer": model.config.layer,
            "corr_method": "posterior expected FDR",
            "delta": float(delta),
            "batch_correction": bool(batch_correction),
            "n_draws": int(n_draws),
            "max_cells": int(max_cells),
            "random_state": random_state,
            "pts": bool(pts),
        },
        **{field: np.rec.fromarrays(arrays, names=compared) for field, arrays in ranked.items()},
    }
    if pts and reference == "rest":
        ranking |= {"pts": pd.DataFrame(shares).loc[genes], "pts_rest": pd.DataFrame(shares_rest).loc[genes]}
    elif pts:  # as scanpy: the reference group is a column of pts (every comparison's second group), and no rest
        named = scanpy_name.get(reference, reference)
        shares[named] = next(iter(shares_rest.values()))
        # scanpy's order: the categories', or the groups as given with the reference added last unless among them
        order = [str(c) for c in column.cat.categories] if groups == "all" else [scanpy_name.get(g, g) for g in groups]
        order = [name for name in order if name in shares] + ([] if named in order else [named])
        ranking |= {"pts": pd.DataFrame(shares).loc[genes, order]}
    adata = adata.copy() if copy else adata
    make_view_own_data(adata)
    adata.uns[key_added] = ranking
    return adata if copy else None


def _groups_to_compare(column: pd.Series, groupby: str, groups, reference) -> tuple[list | str, list | None, object, dict]:
    """rank_genes_groups' ``groups`` and ``reference`` of the categorical ``column`` (obs[groupby]) as
    differential_expression names them: ``groups`` checked ('all' or a list), the first groups of its comparisons
    (None for every group), the reference ('rest' or a group) and each group's name in scanpy's result."""
    # scanpy names a group str(category) (1.0 is "1.0"); differential_expression reads whole numbers as "1"
    scanpy_name = {group_name(category): str(category) for category in column.cat.categories}
    own_name = {name: own for own, name in scanpy_name.items()}

    def as_own(group):  # a group as differential_expression names it: "1.0", 1.0 and 1 are one group, "1"
        if str(group) in own_name:
            return own_name[str(group)]
        try:
            number = float(group) if isinstance(group, str) else group
        except ValueError:
            return group
        return group_name(number) if group_name(number) in scanpy_name else group

    if reference is None or (str(reference) != "rest" and as_own(reference) not in scanpy_name):
        rest = " (for all other cells pass reference='rest')" if reference is None or str(reference).lower() == "rest" else ""
        raise ValueError(
            f"reference takes 'rest' or one group of obs[{groupby!r}], as scanpy's; got {reference!r}{rest}; its groups "
            f"are {list(scanpy_name.values())[:20]}"
        )
    reference = as_own(reference)
    if groups is None:  # (differential_expression's group1=None means every group: here that is groups='all')
        raise TypeError(f"groups takes 'all' or a list of groups of obs[{groupby!r}]; for every group pass groups='all'")
    check_ordered(groups, "groups", "'all' or a list of groups (in the order the result lists them)")
    if isinstance(groups, str) and groups != "all":
        groups = [groups]
    groups = groups if isinstance(groups, str) else [as_own(g) for g in groups]
    repeated = [] if isinstance(groups, str) else sorted({str(g) for g in groups if groups.count(g) > 1})
    if repeated:  # (each would be a second column of pts, which anndata cannot write)
        raise ValueError(f"groups names {[scanpy_name.get(g, g) for g in repeated]} more than once; name each group once")
    # (a group named "rest" is compared with the rest, as scanpy compares it)
    group1 = None if isinstance(groups, str) else [g for g in groups if reference == "rest" or str(g) != str(reference)]
    if groups == []:
        raise ValueError("groups=[] names no group; name the groups to compare, or leave groups='all' for every group")
    if group1 == []:
        raise ValueError(f"groups={groups!r} holds only the reference {reference!r}; name other groups to compare with it")
    return groups, group1, reference, scanpy_name


# ----------------------------------------------------------------------------- rate–distortion and latent arithmetic


TRAIN_EVALUATION_CELLS = 2000  # training cells on which rate_distortion_sweep also reports the terms
SILHOUETTE_CELLS = 10_000  # held-out cells beyond which the sweep's label silhouette is taken on a sample of this many


def rate_distortion_sweep(
    adata: ad.AnnData,
    betas: Sequence[float] = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    mask_var: str | np.ndarray | None = None,
    labels_key: str | None = None,
    held_out: float = 0.1,
    warm_start: bool = False,
    n_samples: int = 1,
    max_epochs: int | None = None,
    random_state: int = 0,
    progress: bool = False,
    fit_kwargs: dict | None = None,
    **model_kwargs,
) -> pd.DataFrame:
    """Train one model per ``beta`` and measure rate, distortion and ELBO on held-out cells.

    Beta = 1 trains on the ELBO itself, so its ELBO should be near the best of the sweep, but not
    always the best: a neighbouring beta can win by a nat or two per cell on the training cells
    (``train_elbo``; training is finite, with dropout and a KL warm-up), and a beta above 1 can win
    on held-out cells when the model overfits: compare the two columns.

    Parameters
    ----------
    adata
        Raw counts in ``X`` or ``layers[layer]``; only read, never modified.
    betas
        KL weights, trained in the given order.
    layer, batch_key
        As in :class:`~cellvae.CellVAE`.
    mask_var
        As in :func:`embed`: train and measure on the genes a boolean ``var`` column (or mask) marks.
    labels_key
        ``obs`` column of cell labels; when given, the held-out latent space is scored against it (NaN, with a
        warning before training, where the labelled held-out cells hold one label, or as many labels as cells).
    held_out
        Fraction of cells (drawn with ``random_state``) kept out of all training and used for every figure;
        drawn cells whose batch or covariate category would be left with no training cell are trained on.
    warm_start
        ``False`` (default) trains each beta from a fresh initialisation, so the points differ only
        in beta. ``True`` trains one model through the betas in turn, each fit starting from the
        previous beta's weights with no KL warm-up (unless ``kl_warmup`` is passed): later betas then
        have had more training in total, so give each enough epochs to converge (early stopping)
        or the curve mixes the effect of beta with that of training time.
    n_samples
        Posterior draws of z per cell in the distortion (:meth:`~cellvae.CellVAE.rate_distortion`): more
        draws make the held-out means steadier (their Monte Carlo part; the ``*_se`` columns hold both parts).
    max_epochs, random_state, progress, fit_kwargs
        As in :func:`embed` (but no progress bar by default); ``max_epochs`` applies to each beta. Each beta is a
        run of its own: a ``checkpoint_dir`` in ``fit_kwargs`` holds a folder per beta (``beta_0.5``, ...), and
        ``resume=True`` continues each (a sweep cut short runs again to its end, the betas finished unchanged).
    **model_kwargs
        Further :class:`~cellvae.CellVAE` arguments (``n_latent``, ``free_bits``, ...).

    Returns
    -------
    One row per beta: ``beta``, held-out means per cell of ``rate``, ``distortion``, ``elbo`` and
    ``loss`` = distortion + beta·rate (the trained objective, less the penalties of ``free_bits`` and
    ``batch_mmd`` where they are set); ``elbo_se``, the standard error of the mean ELBO (the held-out
    cells' sd / √n: mostly how much cells differ, so other held-out cells would move every row's ELBO
    together); ``elbo_to_best``, the mean difference per cell from the ELBO of the best row (0 there), with
    its standard error ``elbo_to_best_se`` (paired over the same cells: whether a row is worse for these
    trained models; training with another seed moves the rows by more, e.g. a 0.34 nats sd over 4 seeds against
    standard errors of 0.14–0.18 on 2,500 Kang cells, so rerun with other ``random_state`` values, which draw other
    held-out cells too, before reading a small difference; the standard errors and ``active_units`` are NaN with
    one held-out cell, with a warning before training);
    ``train_rate``, ``train_distortion`` and ``train_elbo``, the same on (up to 2,000) of the cells each fit
    trained on (not its validation cells);
    ``active_units`` (dimensions whose posterior means' variance over held-out cells exceeds 0.01, as
    :meth:`~cellvae.CellVAE.active_units`) and ``informative_units`` (dimensions carrying at least 0.1
    nats per held-out cell: a dimension can vary a little across cells yet carry almost nothing, as under
    a large beta), ``epochs``; with ``labels_key`` also ``label_silhouette`` (silhouette of the labels in the latent space,
    rescaled to [0, 1]; on a sample of 10,000 held-out cells where there are more) and
    ``label_nmi`` (NMI of k-means with one cluster per label), both of the posterior means, whatever their
    spread: where ``informative_units`` is 0 (a collapsed posterior) the means still differ a little by label,
    far inside the posteriors' width, and the scores stay high though the latent carries almost nothing, so
    read them only with ``informative_units`` above 0; ``random_state``, the seed that drew the held-out
    cells (with the index, it tells sweeps stacked with ``pd.concat`` apart in :func:`cellvae.pl.rate_distortion`). Ctrl-C stops
    the whole sweep: the betas finished so far are returned, with a warning (where none finished,
    ``KeyboardInterrupt`` is raised). A warning about the data or the settings, which every beta's fit would give
    again, is told once per sweep; one about a beta's training (a non-finite loss, collapse) each time.
    """
    check_is_anndata(adata)
    if "beta" in model_kwargs:
        raise ValueError("pass the KL weights as betas=(...), not beta=...")
    _check_model_kwargs(model_kwargs, "rate_distortion_sweep")
    betas = _checked_betas(betas)
    if not (isinstance(held_out, (int, float, np.number)) and 0.0 < held_out < 1.0):
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out!r}")
    random_state = check_seed(random_state)
    _check_fit_kwargs(fit_kwargs)
    if isinstance((fit_kwargs or {}).get("checkpoint_dir"), (str, os.PathLike)):  # told before the first beta trains:
        folders = [_beta_fit_kwargs(fit_kwargs, beta)["checkpoint_dir"] for beta in betas]
        shared = [folder.name for folder in folders if folders.count(folder) > 1]
        if shared:  # betas given twice
            raise ValueError(
                f"betas={betas} repeat a beta (checkpoint folder {shared[0]}), and each beta is a run of its own: give each "
                "beta once (a warm_start path that comes back to a beta trains without checkpoint_dir: each beta's "
                "checkpoints go into a folder named by it)"
            )
        for folder in folders if not (fit_kwargs or {}).get("resume") else []:  # an earlier sweep's checkpoints
            refuse_earlier_checkpoints(folder, 1)
    warm_start = check_flag(warm_start, "warm_start")
    repeated = sorted({beta for beta in betas if betas.count(beta) > 1})
    if repeated and not warm_start:  # (each beta trains from the same seed: a repeat is the same model again)
        raise ValueError(
            f"betas={betas} repeat {repeated}: each beta trains a model from the same seed, so a repeat would train the "
            "same model again; give each beta once (with warm_start=True, which starts each beta from the one before, a "
            "path may come back to a beta, without checkpoint_dir)"
        )
    progress = check_flag(progress, "progress")
    check_positive_int(n_samples, "n_samples")
    check_one_name(labels_key, "labels_key")
    if labels_key is not None and labels_key not in adata.obs.columns:
        raise KeyError(f"labels_key {labels_key!r} not found in adata.obs; available: {list(adata.obs.columns)}")
    gene_mask = _gene_mask(adata, mask_var)
    genes = slice(None) if gene_mask is None else np.flatnonzero(gene_mask)
    for key in key_list(model_kwargs.get("continuous_covariate_keys")):  # the held-out cells' too, before training
        if key in adata.obs.columns:
            continuous_values(adata.obs, key)
    held = _held_out_cells(adata, held_out, random_state, [batch_key, *key_list(model_kwargs.get("categorical_covariate_keys"))])
    if (~held).sum() < MIN_CELLS:  # (before fit finds it, told in its terms: a model of the training part)
        raise ValueError(
            f"rate_distortion_sweep trains on at least {MIN_CELLS} cells besides those it holds out: held_out="
            f"{held_out:g} of adata's {adata.n_obs} cells leaves {int((~held).sum())}; lower held_out or give more cells"
        )
    if not held.any():
        raise ValueError("no held-out cell shares a batch or covariate category with the training cells; raise held_out")
    test, fit_data = _part(adata, held, genes), _part(adata, ~held, genes)
    trained = np.flatnonzero(~held)  # the cells fit_data holds, in adata
    if test.n_obs == 1:  # told before training, not found as NaN (or 0 active units, which reads as collapse) after it
        warn_user(
            f"one cell is held out (held_out={held_out:g} of {adata.n_obs} cells), so active_units and the standard "
            "errors will be NaN: a dimension's activity is the variance of its posterior means across held-out cells; "
            "raise held_out",
            UserWarning,
        )
    if labels_key is not None and not _scorable(test.obs[labels_key]):  # told before training, not found as NaN after it
        known = test.obs[labels_key].dropna().astype(str)
        warn_user(
            f"label_silhouette and label_nmi will be NaN: the {len(known):,} labelled held-out cells hold "
            f"{known.nunique():,} labels of obs[{labels_key!r}], and the scores need 2 to one fewer than the cells; "
            "raise held_out, or check the column (labels are cell types or clusters that many cells share)",
            UserWarning,
        )
    rows, elbos, model, warned = [], [], None, set()
    for beta in betas:
        with _each_warning_told_once(warned):  # (every beta's fit of the same cells gives the same data warnings)
            if warm_start and model is not None:
                warmup = model_kwargs.get("kl_warmup", 0)
                model.config = replace(model.config, beta=beta, kl_warmup=warmup)
            else:
                model = CellVAE(fit_data, layer=layer, batch_key=batch_key, beta=beta, **model_kwargs)
            history_before = model.history
            try:
                with bars_labelled(f"beta={beta:g}"):  # (each beta's bars say which they are)
                    own_fit_kwargs = _beta_fit_kwargs(fit_kwargs, beta)
                    model.fit(max_epochs=max_epochs, random_state=random_state, progress=progress, **own_fit_kwargs)
                    if model.history.attrs.get("interrupted"):  # (fit took Ctrl-C as its own stop)
                        raise KeyboardInterrupt
                    if model.history is history_before:  # fit undid training that diverged: the model is as before
                        warn_user(f"beta={beta:g} left out of the sweep: {_diverged_advice(fit_kwargs)}", RuntimeWarning)
                        continue
                    row, per_cell_elbo = _sweep_row(model, beta, test, adata, trained, genes, n_samples, random_state, progress)
                    if labels_key is not None:
                        row |= _label_scores(model.get_latent(test, progress=progress), test.obs[labels_key], random_state)
            except KeyboardInterrupt as interrupt:  # the sweep stops (not one Ctrl-C per beta), the betas finished kept
                if not rows:
                    told = f"Ctrl-C stopped the sweep at beta={beta:g}, before any beta finished: nothing to return"
                    raise KeyboardInterrupt(told) from interrupt
                finished = ", ".join(f"{row['beta']:g}" for row in rows)
                warn_user(f"Ctrl-C stopped the sweep at beta={beta:g}: returning the betas finished ({finished})", RuntimeWarning)
                break
            rows.append(row)
            elbos.append(per_cell_elbo)
    if not rows:
        raise TrainingDivergedError(f"rate_distortion_sweep: no beta trained; {_diverged_advice(fit_kwargs)}")
    frame = pd.DataFrame(rows)
    elbos = np.stack(elbos)
    n_cells = elbos.shape[1]
    # per cell, paired with the best row's (NaN throughout where no row has a finite ELBO)
    to_best = elbos - elbos[frame["elbo"].idxmax()] if frame["elbo"].notna().any() else np.full_like(elbos, np.nan)
    position = frame.columns.get_loc("elbo_se") + 1
    frame.insert(position, "elbo_to_best", to_best.mean(axis=1))
    spread = to_best.std(axis=1, ddof=1) if n_cells > 1 else np.full(len(frame), np.nan)  # one held-out cell: no se
    frame.insert(position + 1, "elbo_to_best_se", spread / np.sqrt(n_cells))
    frame["random_state"] = random_state  # (which cells were held out: stacked sweeps are told apart by it)
    return frame


def _checked_betas(betas) -> tuple[float, ...]:
    """The sweep's KL weights as a tuple of floats (a generator read once); clear errors for anything else."""
    if isinstance(betas, (int, float, np.number)):
        raise TypeError(f"betas takes a sequence of KL weights, e.g. betas=({betas},), got the number {betas!r}")
    if not isinstance(betas, (str, bytes)):  # a generator or map is read once, here
        try:
            betas = tuple(betas)
        except TypeError:
            raise TypeError(f"betas takes a sequence of KL weights, e.g. betas=(0.5, 1.0, 2.0), got {betas!r}") from None
    if isinstance(betas, (str, bytes)) or not all(
        isinstance(b, (int, float, np.number)) and not isinstance(b, bool) for b in betas
    ):
        raise TypeError(f"betas takes numbers, e.g. betas=(0.5, 1.0, 2.0), got {betas!r}")
    betas = tuple(float(b) for b in betas)
    if not betas or min(betas) < 0 or not np.isfinite(betas).all():
        raise ValueError(f"betas must be a non-empty sequence of non-negative finite numbers, got {betas}")
    return betas


def _held_out_cells(adata: ad.AnnData, held_out: float, random_state: int, category_keys: list[str | None]) -> np.ndarray:
    """Which cells the sweep holds out (a seeded share ``held_out`` of them), leaving in training those whose batch or
    covariate category (the obs columns ``category_keys``) no training cell shares: the models could not embed them."""
    order = np.random.default_rng(random_state).permutation(adata.n_obs)
    held = np.zeros(adata.n_obs, dtype=bool)
    held[order[: max(1, int(round(held_out * adata.n_obs)))]] = True
    for key in category_keys:
        if key is not None and key in adata.obs.columns:
            codes = as_text(adata.obs[key]).codes  # (the model's categories: -0.0 is 0.0)
            held &= np.isin(codes, np.unique(codes[~held]))
    return held


@contextmanager
def _each_warning_told_once(told: set[str]) -> Iterator[None]:
    """Inside the block, show a plain ``UserWarning`` (cellvae's checks of the data and settings) only where ``told``
    lacks its text, then add it there; others (of training going wrong, of collapse) are shown each time. (Python's
    record of warnings shown once per line is reset by every ``catch_warnings`` block, cellvae's too.) Filters still
    decide first: under ``-W error`` a warning raises where it is given, and ``-W always`` repeats none of these."""
    with warnings.catch_warnings():  # (gives the caller's showwarning back)
        show = warnings.showwarning

        def show_once(message, category, filename, lineno, file=None, line=None) -> None:
            if category is UserWarning:
                if str(message) in told:
                    return
                told.add(str(message))
            show(message, category, filename, lineno, file, line)

        warnings.showwarning = show_once
        yield


def _beta_fit_kwargs(fit_kwargs: dict | None, beta: float) -> dict:
    """``fit_kwargs`` for one beta of a sweep, whose ``checkpoint_dir`` (a path) becomes a folder of that beta's."""
    kwargs = dict(fit_kwargs or {})
    if isinstance(kwargs.get("checkpoint_dir"), (str, os.PathLike)):
        kwargs["checkpoint_dir"] = Path(kwargs["checkpoint_dir"]).expanduser() / f"beta_{float(beta)!r}"  # (all its digits)
    return kwargs


def _sweep_row(
    model: CellVAE,
    beta: float,
    test: ad.AnnData,
    adata: ad.AnnData,
    trained: np.ndarray,
    genes,
    n_samples: int,
    random_state: int,
    progress: bool,
) -> tuple[dict, np.ndarray]:
    """:func:`rate_distortion_sweep`'s row of a trained model (its label scores aside) and its held-out cells' ELBOs."""
    # a sample of the cells fit trained on (not its validation cells; all of fit_data's where a diverged fit kept none)
    fitted = np.arange(len(trained)) if model.train_indices is None else model.train_indices
    sample = np.random.default_rng(random_state).permutation(fitted)[:TRAIN_EVALUATION_CELLS]
    training_sample = _part(adata, trained[np.sort(sample)], genes)
    per_cell = model.rate_distortion(test, n_samples=n_samples, random_state=random_state, progress=progress)
    terms = per_cell.mean()
    trained_on = model.rate_distortion(training_sample, n_samples=n_samples, random_state=random_state, progress=progress)
    trained_on = trained_on.mean()
    kl, activity = model._posterior_statistics(test, 4096, progress, "active_units")
    row = {
        "beta": beta,
        "rate": terms["rate"],
        "distortion": terms["distortion"],
        "elbo": terms["elbo"],
        "loss": terms["distortion"] + beta * terms["rate"],
        "elbo_se": per_cell["elbo"].std() / np.sqrt(len(per_cell)),
        "train_rate": trained_on["rate"],
        "train_distortion": trained_on["distortion"],
        "train_elbo": trained_on["elbo"],
        # (with one held-out cell the variance of its means is 0: no dimension's activity can be measured)
        "active_units": int((activity > diagnostics.ACTIVITY_THRESHOLD).sum()) if test.n_obs > 1 else np.nan,
        "informative_units": int((kl >= diagnostics.COLLAPSED_KL).sum()),
        "epochs": len(model.history),
    }
    return row, per_cell["elbo"].to_numpy()


def _scorable(labels: pd.Series) -> bool:
    """Whether the labelled cells hold 2 to one fewer than their number of labels, as the silhouette needs."""
    known = labels.dropna().astype(str)
    return 2 <= known.nunique() < len(known)


def _label_scores(latent: np.ndarray, labels: pd.Series, random_state: int) -> dict[str, float]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score, silhouette_score

    if not _scorable(labels):
        return {"label_silhouette": float("nan"), "label_nmi": float("nan")}
    known = labels.notna().to_numpy()  # unlabelled cells are not a class of their own
    latent, labels = latent[known], labels[known].astype(str).to_numpy()
    n_labels = len(set(labels))
    clusters = KMeans(n_clusters=n_labels, n_init=10, random_state=random_state).fit_predict(latent)
    # The silhouette takes all pairwise distances: on a sample of cells beyond SILHOUETTE_CELLS
    sample = SILHOUETTE_CELLS if len(labels) > SILHOUETTE_CELLS else None
    silhouette = silhouette_score(latent, labels, sample_size=sample, random_state=random_state)
    return {
        "label_silhouette": float((silhouette + 1.0) / 2.0),
        "label_nmi": float(normalized_mutual_info_score(labels, clusters)),
    }


def interpolate(
    model: CellVAE,
    cells_a,
    cells_b,
    n_steps: int = 10,
    *,
    adata: ad.AnnData | None = None,
    batch: str | None = None,
    covariates: dict | None = None,
    library_size: float | np.ndarray = 1e4,
    progress: bool = True,
) -> ad.AnnData:
    """Decode a straight path in latent space between two cells (or the mean codes of two groups).

    Parameters
    ----------
    model
        A trained model.
    cells_a, cells_b
        The endpoints: an obs name, a list of obs names, integer positions, a boolean mask of
        ``adata`` or a condition on its ``obs`` (``"cell_type == 'B cells'"``, as ``idx1`` of
        :meth:`~cellvae.CellVAE.differential_expression`); a group's endpoint is the mean of its posterior means.
    n_steps
        Points on the path, endpoints included.
    adata
        Cells to pick from; ``None`` uses the model's AnnData.
    batch, covariates, library_size
        As in :meth:`~cellvae.CellVAE.decode`, but ``batch=None`` decodes as the endpoint cells' batch where they
        all have one, and averages over the model's batches where they have several; a covariate not given is taken
        from the endpoint cells: the category they all share (an error where they hold several), a continuous
        covariate's mean over each endpoint's cells, from a's to b's along the path (so two cells of one batch and
        category decode at the ends as they do in ``get_normalized_expression``).
    progress
        Show a progress bar while the endpoints are encoded (where that lasts over 2 seconds).

    Returns
    -------
    AnnData of ``n_steps`` points: ``X`` the decoded expression, ``obs["t"]`` from 0 (a) to 1 (b),
    ``obsm["z"]`` the latent codes, and in ``uns["interpolate"]`` the decoding's settings: ``"batch"``, the batch
    decoded as, or one per point (absent where averaged), ``"covariates"`` (where the model has any: each one's
    value, or values per point) and ``"library_size"``.
    """
    if not is_whole(n_steps) or n_steps < 2:
        raise ValueError(f"n_steps must be an integer of at least 2, got {n_steps!r}")
    n_steps = int(n_steps)
    check_model(model)
    if adata is None and model.adata is None:
        raise ValueError("the model was loaded without an AnnData; pass adata=... holding cells_a and cells_b")
    adata = model._own_adata() if adata is None else adata
    check_is_anndata(adata)
    progress = check_flag(progress, "progress")
    positions_a, positions_b = cell_positions(adata, cells_a, "cells_a"), cell_positions(adata, cells_b, "cells_b")
    t = np.linspace(0.0, 1.0, n_steps, dtype=np.float32)
    covariates = _endpoint_covariates(model, adata, positions_a, positions_b, t, covariates)
    model._check_decoding(n_steps, batch, covariates, library_size)
    key = model.config.batch_key
    if batch is None and key and key in adata.obs.columns:  # endpoints of one batch: decoded as it, as they are
        shared = pd.unique(cell_texts(adata.obs[key].iloc[np.r_[positions_a, positions_b]]))
        batch = shared[0] if len(shared) == 1 and shared[0] in model.config.batch_categories else None
    z_a = model.get_latent(_part(adata, positions_a), progress=progress).mean(0)
    z_b = model.get_latent(_part(adata, positions_b), progress=progress).mean(0)
    z = (1.0 - t)[:, None] * z_a + t[:, None] * z_b
    expression = model.decode(z, batch=batch, covariates=covariates, library_size=library_size)
    path = ad.AnnData(
        X=expression,
        obs=pd.DataFrame({"t": t}, index=[f"step{i}" for i in range(n_steps)]),
        var=pd.DataFrame(index=list(model.config.gene_names)),
    )
    path.obsm["z"] = z
    record = {}
    if batch is not None:  # as the model names it (batch=1 of a model whose batches are "0" and "1": "1")
        names = model._batch_names(batch, n_steps)
        record["batch"] = _as_record(names[0] if len(set(names)) == 1 else names)
    if covariates:
        record["covariates"] = {key: _as_record(value) for key, value in covariates.items()}
    path.uns["interpolate"] = record | {"library_size": _as_record(np.asarray(library_size, dtype=np.float64))}
    return path


def _endpoint_covariates(
    model: CellVAE, adata: ad.AnnData, cells_a: np.ndarray, cells_b: np.ndarray, t: np.ndarray, covariates: dict | None
) -> dict | None:
    """The covariates a path at points ``t`` (0 at a, 1 at b) is decoded with: those given, and each other covariate
    of the model as the endpoint cells hold it, the category they all share or a continuous covariate's mean over
    ``cells_a`` and over ``cells_b``, from one to the other along the path."""
    c = model.config
    cells = np.r_[cells_a, cells_b]
    filled = dict(covariates or {})
    for key in c.categorical_covariate_keys + c.continuous_covariate_keys:
        missing = int(adata.obs[key].iloc[cells].isna().sum()) if key not in filled and key in adata.obs.columns else 0
        if missing:
            raise ValueError(
                f"the endpoint cells lack {missing} value{'s' * (missing > 1)} of the covariate obs[{key!r}] (NaN), which "
                "the encoder needs to embed them: fill them in adata.obs, or choose endpoint cells that have them"
            )
    for key in c.categorical_covariate_keys:
        if key not in filled and key in adata.obs.columns:
            values = pd.unique(cell_texts(adata.obs[key].iloc[cells]))
            if len(values) > 1:
                raise ValueError(
                    f"the endpoint cells hold several values of the covariate obs[{key!r}] ({list(values[:3])}): pass "
                    f"the one to decode the path as, covariates={{{key!r}: ...}}"
                )
            filled[key] = values[0]
    for key in c.continuous_covariate_keys:
        if key not in filled and key in adata.obs.columns:
            at_a, at_b = (float(pd.to_numeric(adata.obs[key].iloc[ends], errors="coerce").mean()) for ends in (cells_a, cells_b))
            filled[key] = at_a if at_a == at_b else (1.0 - t) * at_a + t * at_b
    return filled or None


def _as_record(value):
    """A covariate value (or values) as ``uns`` stores it in an ``.h5ad``: a number or text, or an array of them."""
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        array = array.astype(str)
    return array.item() if array.ndim == 0 else array


def latent_shift(
    model: CellVAE,
    adata: ad.AnnData,
    *,
    groupby: str,
    source: str,
    target: str,
    apply_to,
    reference=None,
    stratify: str | None = None,
    batch: str | None = None,
    library_size: float = 1e4,
    progress: bool = True,
) -> ad.AnnData:
    """Predict how cells would look in another group by latent arithmetic (as scGen does).

    The shift is the mean latent code of ``target`` cells minus that of ``source`` cells among
    the ``reference`` cells; it is added to the codes of the ``apply_to`` cells, which are decoded.

    Parameters
    ----------
    model
        A trained model.
    adata
        The cells; only read, never modified.
    groupby
        ``obs`` column holding the groups, e.g. a condition.
    source, target
        The two groups of ``groupby`` (e.g. ``"ctrl"`` and ``"stim"``).
    apply_to
        Cells to shift: an obs name, a list of obs names, integer positions, a boolean mask or a condition
        on ``obs`` (``"condition == 'ctrl'"``, as ``idx1`` of :meth:`~cellvae.CellVAE.differential_expression`).
    reference
        Cells the shift is computed from (same forms); ``None`` uses every cell not in ``apply_to``.
        To predict a held-out cell type, leave that cell type out of the reference.
    stratify
        ``obs`` column (e.g. cell type): the shift is averaged over its categories that have both
        groups in the reference, so composition differences between the groups do not leak in. Cells
        without a value (NaN) belong to no category and give no shift.
    batch
        Decode as this batch of the model; ``None`` keeps each cell's own covariates, except when
        ``groupby`` is the model's batch key or one of its categorical covariates: then the groups
        are an input of the decoder (the latent space was trained to leave them out, so the decoder's
        ``target`` input, learnt from the reference's target cells, carries most of the difference and the
        shift little), a warning says so, and cells are decoded as ``target``. Such a prediction can be as
        good: on Kang's held-out stimulated CD14+ monocytes, CD4 T and B cells it was as good or better (monocytes,
        R² over all genes 0.88 against 0.85–0.87 without the covariate). A model without ``groupby`` as a
        covariate puts the difference in the shift itself. The same holds where the reference's source and target
        cells share no batch (or category of a covariate) of the model, e.g. a condition column that repeats the
        batches, or samples each of one condition: a warning says so, and the cells are decoded as the target cells'
        batch (category) where they all have one.
    library_size
        Total counts of the decoded expression.
    progress
        Show a progress bar while the cells are encoded (where that lasts over 2 seconds).

    Returns
    -------
    AnnData of the ``apply_to`` cells: ``X`` the predicted expression (float32, at
    ``library_size``), their ``obs``, the shifted codes in ``obsm["z"]``, and ``uns["latent_shift"]``:
    ``groupby``, ``source``, ``target``, ``stratify``, the shift vector ``delta`` (the mean of the strata's shifts where
    stratified), ``n_strata``, ``n_reference_cells`` (with a stratify value), ``decoded_batch`` and
    ``decoded_covariates`` (those the cells were decoded with in place of their own; None: their own) and
    ``library_size`` (``"one per cell"`` where an array was given).
    """
    check_model(model)
    check_is_anndata(adata)
    progress = check_flag(progress, "progress")
    check_one_name(groupby, "groupby")
    check_one_name(stratify, "stratify")
    for argument, key in [("groupby", groupby)] + ([("stratify", stratify)] if stratify else []):
        if key not in adata.obs.columns:
            raise KeyError(f"{argument} {key!r} not found in adata.obs; available: {list(adata.obs.columns)}")
    groups = cell_texts(adata.obs[groupby])
    # group names as strings, like the column's (1 is "1"; -0.0 is "0.0", as the model names categories); a float
    # column's 1.0 is also found as 1 or "1", as in differential_expression
    values = pd.unique(adata.obs[groupby].dropna())
    named = {group_name(value): text for value, text in zip(values, cell_texts(pd.Series(values)))}
    source, target = (str(g) if str(g) in set(groups) else named.get(group_name(g), str(g)) for g in (source, target))
    if source == target:
        raise ValueError(f"source and target are the same group ({source!r}): the shift between them is zero")
    for name, value in (("source", source), ("target", target)):
        if value not in set(groups):
            raise ValueError(f"{name} {value!r} is not a group of obs[{groupby!r}]; groups: {sorted(set(groups))[:10]}")
    shifted = cell_positions(adata, apply_to, "apply_to")
    repeated = int((np.unique(shifted, return_counts=True)[1] > 1).sum())
    if repeated:  # the result has a row per cell: one cell twice is two rows of one name
        raise ValueError(f"apply_to lists {repeated} cell{'s' if repeated > 1 else ''} more than once; give each cell once")
    already = int((groups[shifted] == target).sum())
    if already:
        warn_user(
            f"{already} of the {len(shifted)} apply_to cells are {target!r} cells already: the shift takes them past it",
            UserWarning,
        )
    if reference is None:
        in_reference = np.ones(adata.n_obs, dtype=bool)
        in_reference[shifted] = False
    else:
        in_reference = np.zeros(adata.n_obs, dtype=bool)
        in_reference[cell_positions(adata, reference, "reference")] = True
    c = model.config
    checked_library_sizes(library_size, len(shifted))
    if batch is not None:
        model._batch_names(batch, len(shifted))
    strata = cell_texts(adata.obs[stratify]) if stratify else np.zeros(adata.n_obs, dtype=str)
    labelled = adata.obs[stratify].notna().to_numpy() if stratify else np.ones(adata.n_obs, dtype=bool)
    if stratify and not (in_reference & labelled).any():
        raise ValueError(f"obs[{stratify!r}] (stratify) has no value in the reference cells: fill it in, or leave stratify out")
    usable = [  # the strata of reference cells that hold both groups, found before the cells are encoded
        here  # (cells without a label, a mix of strata, are none: left out)
        for here in (in_reference & labelled & (strata == stratum) for stratum in np.unique(strata[in_reference & labelled]))
        if (here & (groups == source)).any() and (here & (groups == target)).any()
    ]
    if not usable:
        where = f"no {stratify} holds" if stratify else "they do not hold"
        every_cell = [s for s in np.unique(strata[labelled]) if {source, target} <= set(groups[labelled & (strata == s)])]
        left_out = (  # said only where leaving out the apply_to cells is why
            f" (the apply_to cells, {len(shifted)}, are left out of the reference where reference=None: pass "
            "reference=... to name the cells whose groups give the shift)"
            if reference is None and every_cell
            else ""
        )
        raise ValueError(f"the reference cells cannot give the shift: {where} both {source!r} and {target!r} cells{left_out}")
    latent = model.get_latent(adata, progress=progress)
    deltas = [latent[here & (groups == target)].mean(0) - latent[here & (groups == source)].mean(0) for here in usable]
    delta = np.mean(deltas, axis=0).astype(np.float32)
    z = latent[shifted] + delta
    obs = adata.obs.iloc[shifted]
    batches = batch if batch is not None or not c.batch_key else cell_texts(obs[c.batch_key])
    covariates = {k: obs[k].to_numpy() for k in c.categorical_covariate_keys + c.continuous_covariate_keys}
    decoded_covariates = {}  # those not each cell's own
    if groupby == c.batch_key or groupby in c.categorical_covariate_keys:
        decoded_as = batch if groupby == c.batch_key and batch is not None else target
        warn_user(
            f"obs[{groupby!r}] is an input of the model's decoder ({'batch_key' if groupby == c.batch_key else 'a covariate'}),"
            " so the latent space was trained to leave these groups out: the decoder's input carries most of their "
            f"difference and the shift little; the cells are decoded as {decoded_as!r}. For a shift that carries the "
            f"difference itself (to study it, or apply it elsewhere), train a model without {groupby!r} as a covariate",
            UserWarning,
        )
        if groupby == c.batch_key and batch is None:
            batches = target
        elif groupby != c.batch_key:
            covariates[groupby] = np.full(len(obs), target, dtype=object)
            decoded_covariates[groupby] = target
    for key, values in _inputs_separating(model, adata.obs, groupby, groups, in_reference, source, target).items():
        is_batch = key == c.batch_key
        if is_batch and batch is not None:
            decoded = f"the cells are decoded as batch {batch!r}"
        elif len(values) == 1:
            decoded = f"the cells are decoded as the target cells' {values[0]!r}"
            if is_batch:
                batches = values[0]
            else:
                covariates[key] = np.full(len(obs), values[0], dtype=object)
                decoded_covariates[key] = values[0]
        else:  # which of the target's values would the cells take?
            choose = f"pass batch=... (the target cells' are {values[:3]})" if is_batch else f"the target cells hold {values[:3]}"
            decoded = f"the cells keep their own values of it, so the prediction understates the difference: {choose}"
        warn_user(
            f"the reference's {source!r} and {target!r} cells of obs[{groupby!r}] share no value of obs[{key!r}], an input "
            f"of the model's decoder ({'batch_key' if is_batch else 'a covariate'}), so the latent space was trained to "
            f"leave their difference out: the decoder's input carries most of it and the shift little; {decoded}. For a "
            f"shift that carries the difference itself, train a model without {key!r} as a covariate",
            UserWarning,
        )
    expression = model.decode(z, batch=batches, covariates=covariates, library_size=library_size)
    predicted = ad.AnnData(X=expression, obs=obs.copy(), var=pd.DataFrame(index=list(c.gene_names)))
    predicted.obsm["z"] = z
    predicted.uns["latent_shift"] = {
        "groupby": groupby,
        "source": source,
        "target": target,
        "stratify": stratify,
        "delta": delta,
        "n_strata": len(deltas),
        "n_reference_cells": int((in_reference & labelled).sum()),
        "decoded_batch": _one_name(model, batch, batches, len(shifted)),  # None: each cell's own batch
        "decoded_covariates": decoded_covariates,
        "library_size": float(library_size) if np.ndim(library_size) == 0 else "one per cell",
    }
    return predicted


def _kept_epoch_record(history: pd.DataFrame) -> dict:
    """The record's entries of the epoch whose weights embed the cells (``best_epoch``) and, where the epochs ran out
    while training improved, ``still_improving`` (as tl.embed, cellvae fit and cellvae embed record them)."""
    record = {}
    if "best_epoch" in history.attrs:
        record["best_epoch"] = int(history.attrs["best_epoch"])
    if history.attrs.get("still_improving"):  # more epochs may help
        record["still_improving"] = True
    return record


def _one_name(model: CellVAE, batch, batches, n: int) -> str | None:
    """The batch every shifted cell was decoded as, as the model names it (``batch=107`` is "107"); None where the
    cells were decoded each as its own batch, or as several named in ``batch=``."""
    if batch is None:
        return batches if isinstance(batches, str) else None
    names = np.unique(model._batch_names(batch, n))
    return str(names[0]) if len(names) == 1 else None


def _inputs_separating(
    model: CellVAE, obs: pd.DataFrame, groupby: str, groups: np.ndarray, in_reference: np.ndarray, source: str, target: str
) -> dict[str, list[str]]:
    """The model's batch key and categorical covariates (other than ``groupby``) of which the reference's ``source`` and
    ``target`` cells share no value (e.g. a condition column that repeats the batches), each with the target
    cells' values: there the decoder's input, not the latent space, tells the groups apart."""
    c = model.config
    separating = {}
    for key in [c.batch_key] * bool(c.batch_key) + c.categorical_covariate_keys:
        if key != groupby and key in obs.columns:
            values = cell_texts(obs[key])
            of_target = set(values[in_reference & (groups == target)].tolist())
            if not set(values[in_reference & (groups == source)].tolist()) & of_target:
                separating[key] = sorted(of_target)
    return separating


def _key(key_added, default: str) -> str:
    """``key_added``, with ``None`` read as the default (as scanpy does)."""
    if key_added is None:
        return default
    if not isinstance(key_added, str) or not key_added:
        raise TypeError(f"key_added must be a non-empty string (or None for {default!r}), got {key_added!r}")
    if "/" in key_added:  # anndata would write it as nested groups: the .h5ad could not be read back
        raise ValueError(f"key_added must not hold '/' (an .h5ad written with it could not be read back), got {key_added!r}")
    return key_added


def _writable(adata: ad.AnnData, name: str, copy: bool = False) -> None:
    """Refuse, before any work, a view of a backed AnnData (anndata cannot write into one, nor copy it) or of
    one whose counts are on disk (:func:`cellvae.read_h5ad_lazy`, :func:`cellvae.read_zarr_lazy`): writing results
    would make the view its own AnnData with all its counts read into memory, after the work; and ``copy=True`` of
    a backed AnnData, which anndata copies only into a new file."""
    matrices = [] if adata.is_view or not copy else [stored_x(adata), *adata.layers.values()]  # (a view's X is a copy)
    if matrices and adata.raw is not None:
        matrices.append(adata.raw.X)
    if copy and not adata.is_view and (adata.isbacked or any(is_backed_matrix(m) for m in matrices if m is not None)):
        raise ValueError(
            f"copy=True cannot copy {name}, whose counts are on disk (backed, cellvae.read_h5ad_lazy or read_zarr_lazy): "
            f"anndata copies those only into a new file; pass copy=False (the results go into {name}'s obs, obsm and uns in "
            f"memory) or {name}.to_memory()"
        )
    if adata.is_view and adata.isbacked:
        raise ValueError(
            f"{name} is a view of a backed AnnData, into which anndata cannot write results; pass "
            f"{name}.to_memory() (in memory) or {name}.copy(filename='subset.h5ad') (a new backed file)"
        )
    parent = viewed_anndata(adata)
    if parent is not None and any(is_backed_matrix(m) for m in [stored_x(parent), *parent.layers.values()] if m is not None):
        raise ValueError(
            f"{name} is a view of an AnnData whose counts are on disk (cellvae.read_h5ad_lazy or read_zarr_lazy); writing "
            f"results into it would read all its counts into memory: pass {name}.to_memory(), or write the subset as a "
            f"file of its own ({name}.write_h5ad('subset.h5ad')) and open that with cellvae.read_h5ad_lazy "
            "(CellVAE(view).fit() and get_latent(view) stream a view without writing into it)"
        )
