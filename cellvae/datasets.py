"""The bundled real example (PBMC counts restored from scanpy's file) and a count simulator."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["pbmc68k", "simulate"]


def pbmc68k() -> ad.AnnData:
    """700 PBMCs × 765 genes with exact raw counts, restored from the file scanpy ships.

    scanpy's ``pbmc68k_reduced`` keeps ``raw.X = log1p(counts / n_counts * 1e4)`` (rounded to
    three decimals) and each cell's total ``obs["n_counts"]`` over all genes of the original
    data, so ``counts = expm1(raw.X) * n_counts / 1e4`` rounds to the exact integers. Row sums
    are smaller than ``n_counts`` because only 765 genes were kept. ``obs["cell_type"]`` is
    scanpy's ``bulk_labels`` (sorted-population labels of Zheng et al. 2017).
    """
    import scanpy as sc

    source = sc.datasets.pbmc68k_reduced()
    log_normalised = source.raw.X
    log_normalised = log_normalised.toarray() if sp.issparse(log_normalised) else np.asarray(log_normalised)
    totals = source.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    counts = np.rint(np.expm1(log_normalised.astype(np.float64)) * totals / 1e4)
    obs = pd.DataFrame(
        {
            "cell_type": source.obs["bulk_labels"].astype("category"),
            "n_counts": source.obs["n_counts"].to_numpy(),
            "percent_mito": source.obs["percent_mito"].to_numpy(),
            "phase": source.obs["phase"].astype("category"),
        },
        index=source.obs_names.copy(),
    )
    var = pd.DataFrame(index=source.raw.var_names.copy())
    adata = ad.AnnData(X=sp.csr_matrix(counts.astype(np.float32)), obs=obs, var=var)
    adata.uns["source"] = "scanpy.datasets.pbmc68k_reduced (10x Genomics, Zheng et al. 2017); counts restored"
    return adata


def simulate(
    n_cells: int = 2000,
    n_genes: int = 500,
    n_batches: int = 2,
    n_cell_types: int = 5,
    random_state: int = 0,
    *,
    batch_effect: float = 0.5,
    markers_per_type: int = 20,
    mean_library_size: float = 1500.0,
    sparse: bool = True,
    seed: int | None = None,
) -> ad.AnnData:
    """Negative-binomial counts with cell-type programmes and multiplicative batch effects.

    Parameters
    ----------
    n_cells, n_genes, n_batches, n_cell_types
        Size of the matrix; cells are assigned to batches and types uniformly at random.
    random_state
        Seed of everything drawn; equal seeds give equal data.
    batch_effect
        Each batch multiplies every gene by a log-normal factor with this sd on the log scale (and
        shifts library sizes by a log-normal factor with sd 0.3).
    markers_per_type
        Genes each cell type up-regulates (by a factor e^1 to e^3); at most ``n_genes`` (every gene).
    mean_library_size
        Median total counts per cell before the batch's depth factor (log-normal, sd 0.35).
    sparse
        Store the counts as CSR (else dense).
    seed
        The former name of ``random_state`` (deprecated).

    Returns
    -------
    AnnData with float32 integer counts in ``X``, ``obs["batch"]`` and ``obs["cell_type"]``
    (categorical), and ``uns["source"]``.
    """
    if seed is not None:
        if random_state not in (0, seed):  # both given: which one the caller meant is unknown
            raise ValueError(f"simulate got seed={seed!r} and random_state={random_state!r}; pass random_state alone")
        warnings.warn("simulate(seed=...) is deprecated: use random_state=...", FutureWarning, stacklevel=2)
        random_state = seed
    sizes = {"n_cells": n_cells, "n_genes": n_genes, "n_batches": n_batches, "n_cell_types": n_cell_types}
    for name, value in {**sizes, "markers_per_type": markers_per_type}.items():
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):  # 1e4 is a float: numpy's error is bare
            whole = isinstance(value, float) and value.is_integer()
            raise TypeError(f"{name} must be a whole number, got {value!r}" + (f"; write {name}={int(value)}" if whole else ""))
    named = "random_state" if seed is None else "seed"  # (the name the caller used)
    if not isinstance(random_state, (int, np.integer)) or isinstance(random_state, bool):
        raise TypeError(  # (None would draw new data each call: the source recorded could not replay it)
            f"{named} must be an integer seed, e.g. 0, got {random_state!r:.60}; equal seeds give equal data"
        )
    if not 0 <= random_state < 2**32:
        raise ValueError(f"{named} must be a non-negative integer below 2**32, got {random_state}")
    for name, value in {"mean_library_size": mean_library_size, "batch_effect": batch_effect}.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"{name} must be a number, got {value!r:.60}")
    if not isinstance(sparse, (bool, np.bool_)):
        raise TypeError(f"sparse must be True (a CSR matrix) or False (a dense array), got {sparse!r:.60}")
    if min(n_cells, n_genes, n_batches, n_cell_types) < 1:
        raise ValueError("n_cells, n_genes, n_batches and n_cell_types must all be at least 1")
    if not (np.isfinite(mean_library_size) and 0 < mean_library_size <= 1e7):  # (counts stay exact in float32)
        raise ValueError(f"mean_library_size must be a positive number of counts up to 1e7, got {mean_library_size!r}")
    if not (np.isfinite(batch_effect) and batch_effect >= 0) or markers_per_type < 0:
        raise ValueError(
            f"batch_effect must be a finite number >= 0 and markers_per_type a count >= 0, got {batch_effect!r} and "
            f"{markers_per_type!r}"
        )
    rng = np.random.default_rng(random_state)
    base = rng.normal(0.0, 1.6, n_genes)
    type_programme = np.zeros((n_cell_types, n_genes))
    for t in range(n_cell_types):
        markers = rng.choice(n_genes, size=min(markers_per_type, n_genes), replace=False)
        type_programme[t, markers] = rng.uniform(1.0, 3.0, len(markers))
    batch_programme = rng.normal(0.0, batch_effect, (n_batches, n_genes))
    cell_type = rng.integers(0, n_cell_types, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    # Continuous within-type variation along a few random directions.
    within = rng.normal(0.0, 1.0, (n_cells, 3)) @ rng.normal(0.0, 0.4, (3, n_genes))
    log_rates = base + type_programme[cell_type] + batch_programme[batch] + within
    proportions = np.exp(log_rates - log_rates.max(axis=1, keepdims=True))
    proportions /= proportions.sum(axis=1, keepdims=True)
    batch_depth = np.exp(rng.normal(0.0, 0.3, n_batches))
    library = rng.lognormal(np.log(mean_library_size), 0.35, n_cells) * batch_depth[batch]
    theta = rng.gamma(2.0, 2.0, n_genes) + 0.5
    mean = proportions * library[:, None]
    counts = rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32)
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical([f"batch{b}" for b in batch], categories=[f"batch{b}" for b in range(n_batches)]),
            "cell_type": pd.Categorical([f"type{t}" for t in cell_type], categories=[f"type{t}" for t in range(n_cell_types)]),
        },
        index=[f"cell{i}" for i in range(n_cells)],
    )
    obs = obs.apply(lambda column: column.cat.remove_unused_categories())  # (few cells may not draw every one)
    var = pd.DataFrame(index=[f"gene{g}" for g in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(counts) if sparse else counts, obs=obs, var=var)
    adata.uns["source"] = f"cellvae.datasets.simulate(random_state={random_state})"
    return adata
