"""Scanpy-style tools: take an AnnData first, write documented keys, return the trained model."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd

from cellvae.model import CellVAE


def embed(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    batch_key: str | None = None,
    key_added: str = "X_cellvae",
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
    key_added
        ``obsm`` key for the embedding (use it as ``sc.pp.neighbors(adata, use_rep=key_added)``).
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
    The trained model. Writes ``adata.obsm[key_added]`` and ``adata.uns["cellvae"]["params"]``.
    """
    model = CellVAE(adata, layer=layer, batch_key=batch_key, **model_kwargs)
    model.fit(max_epochs=max_epochs, random_state=random_state, progress=progress, **(fit_kwargs or {}))
    latent = model.get_latent()
    adata.obsm[key_added] = latent
    params = {
        "key_added": key_added,
        "layer": layer,
        "batch_key": batch_key,
        "random_state": random_state,
        "epochs_trained": int(len(model.history)),
        **{k: v for k, v in {**model_kwargs, **(fit_kwargs or {})}.items() if isinstance(v, (int, float, str, bool))},
    }
    adata.uns.setdefault("cellvae", {})["params"] = params
    return model


# ----------------------------------------------------------------------------- label transfer


def transfer_labels(
    ref_adata: ad.AnnData,
    query_adata: ad.AnnData,
    label_key: str,
    *,
    use_rep: str = "X_cellvae",
    k: int = 15,
    unknown_threshold: float | None = None,
) -> None:
    """Predict query labels by a distance-weighted vote of the ``k`` nearest reference cells.

    Each neighbour's vote weighs ``exp(-(d / d_k)^2)``, with ``d_k`` the query cell's distance
    to its k-th neighbour, so closer reference cells count more whatever the embedding's scale.

    Parameters
    ----------
    ref_adata
        Reference cells with labels in ``obs[label_key]`` (cells with a missing label do not vote)
        and an embedding in ``obsm[use_rep]``.
    query_adata
        Query cells embedded in the same space (e.g. by a model from :meth:`~cellvae.CellVAE.map_query`).
    label_key
        ``obs`` column of the reference labels.
    use_rep
        ``obsm`` key of the shared embedding.
    k
        Number of reference neighbours that vote.
    unknown_threshold
        If given, cells whose uncertainty exceeds it are labelled ``"Unknown"``.

    Writes ``query_adata.obs[f"{label_key}_predicted"]`` (categorical) and
    ``query_adata.obs[f"{label_key}_uncertainty"]`` (1 − the winning label's weighted vote share,
    in [0, 1)); nothing else is changed.
    """
    from sklearn.neighbors import NearestNeighbors

    if label_key not in ref_adata.obs.columns:
        raise KeyError(f"label_key {label_key!r} not found in ref_adata.obs; available: {list(ref_adata.obs.columns)}")
    for name, adata in (("ref_adata", ref_adata), ("query_adata", query_adata)):
        if use_rep not in adata.obsm:
            raise KeyError(
                f"use_rep {use_rep!r} not found in {name}.obsm (available: {list(adata.obsm.keys())}); "
                "embed both with the same model first, e.g. query_model.get_latent(...)"
            )
    reference = np.asarray(ref_adata.obsm[use_rep], dtype=np.float64)
    query = np.asarray(query_adata.obsm[use_rep], dtype=np.float64)
    if reference.shape[1] != query.shape[1]:
        raise ValueError(
            f"obsm[{use_rep!r}] has {reference.shape[1]} dimensions in ref_adata but {query.shape[1]} in query_adata; "
            "both must come from the same model"
        )
    if not (np.isfinite(reference).all() and np.isfinite(query).all()):
        raise ValueError(f"obsm[{use_rep!r}] contains NaN or infinite values")
    if unknown_threshold is not None and not 0.0 <= unknown_threshold <= 1.0:
        raise ValueError(f"unknown_threshold must be in [0, 1] or None, got {unknown_threshold!r}")
    labels = ref_adata.obs[label_key]
    labelled = labels.notna().to_numpy()
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > labelled.sum():
        raise ValueError(f"k={k} is larger than the {int(labelled.sum())} labelled reference cells; lower k")
    names, codes = np.unique(labels[labelled].astype(str).to_numpy(), return_inverse=True)
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(reference[labelled]).kneighbors(query)
    bandwidth = np.maximum(distances[:, -1:], 1e-12)
    weights = np.exp(-((distances / bandwidth) ** 2))
    votes = np.zeros((len(query), len(names)))
    np.add.at(votes, (np.repeat(np.arange(len(query)), k), codes[neighbours].ravel()), weights.ravel())
    share = votes / votes.sum(axis=1, keepdims=True)
    predicted = names[share.argmax(axis=1)].astype(object)
    uncertainty = 1.0 - share.max(axis=1)
    categories = list(names)
    if unknown_threshold is not None:
        predicted[uncertainty > unknown_threshold] = "Unknown"
        categories = categories + (["Unknown"] if "Unknown" not in categories else [])
    query_adata.obs[f"{label_key}_predicted"] = pd.Categorical(predicted, categories=categories)
    query_adata.obs[f"{label_key}_uncertainty"] = uncertainty
