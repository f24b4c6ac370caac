"""Scanpy-style tools: take an AnnData first, write documented keys, return the trained model."""

from __future__ import annotations

import anndata as ad

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
