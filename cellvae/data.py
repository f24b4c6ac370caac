"""From AnnData to validated counts, covariates and minibatches.

This is the only module that reads AnnData internals. It validates at the boundary (so the
rest of the package can trust its inputs) and never writes to the user's AnnData.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

MIN_CELLS = 10
# Rows densified at once; bounds the memory of one read to CHUNK_BYTES.
CHUNK_BYTES = 128 * 2**20
# Contiguous rows read from a backed file as one block; blocks are shuffled, then rows within a buffer.
BACKED_BLOCK_ROWS = 256


def count_matrix(adata: ad.AnnData, layer: str | None):
    """The count matrix ``adata.X`` or ``adata.layers[layer]``, as stored (never copied)."""
    if layer is None:
        if adata.X is None:
            raise ValueError("adata.X is empty; pass layer=... naming the layer that holds raw counts")
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not found in adata.layers; available: {list(adata.layers.keys())}")
    return adata.layers[layer]


def is_backed_matrix(matrix) -> bool:
    return not isinstance(matrix, (np.ndarray, sp.spmatrix, sp.sparray))


def validate_counts(matrix, where: str) -> None:
    """Raise a clear error unless ``matrix`` holds finite, non-negative integer counts."""
    dtype = np.dtype(matrix.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} has dtype {dtype}; cellvae needs numeric raw counts")
    if 0 in matrix.shape:
        raise ValueError(f"{where} is empty (shape {matrix.shape}); cellvae needs at least one cell and one gene")
    for values in _stored_values(matrix):
        _check_count_values(values, where)


def _stored_values(matrix) -> Iterator[np.ndarray]:
    """The stored values of a matrix, in chunks of rows (so backed files are read piecewise)."""
    if isinstance(matrix, np.ndarray):
        yield matrix.ravel()
    elif sp.issparse(matrix):
        yield matrix.data if hasattr(matrix, "data") else matrix.tocsr().data
    else:
        for start in range(0, matrix.shape[0], 10_000):
            block = matrix[start : start + 10_000]
            yield block.data if sp.issparse(block) else np.asarray(block).ravel()


def _check_count_values(values: np.ndarray, where: str) -> None:
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.integer):
        if values.size and values.min() < 0:
            raise ValueError(f"{where} has negative values (min {values.min()}); cellvae needs raw counts >= 0")
        return
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{where} contains NaN or infinite values; remove or fix those cells before training")
    if values.size and values.min() < 0:
        raise ValueError(
            f"{where} has negative values (min {values.min():.3g}); it looks scaled or centred. "
            "cellvae needs raw counts: pass layer=... naming the raw counts, or use adata.raw"
        )
    fractional = values != np.round(values)
    if fractional.any():
        example = values[fractional][0]
        raise ValueError(
            f"{where} has non-integer values (e.g. {example:.4g}); it looks normalised or log-transformed. "
            "cellvae models raw counts: pass layer=... naming the raw counts (e.g. layer='counts'), "
            "or rebuild an AnnData from adata.raw"
        )


def library_sizes(matrix) -> np.ndarray:
    """Total counts of each cell, as float64, read in row chunks for backed matrices."""
    if isinstance(matrix, np.ndarray) or sp.issparse(matrix):
        return np.asarray(matrix.sum(axis=1, dtype=np.float64)).ravel()
    totals = [np.asarray(matrix[s : s + 10_000].sum(axis=1, dtype=np.float64)).ravel() for s in range(0, matrix.shape[0], 10_000)]
    return np.concatenate(totals)


def as_row_readable(matrix):
    """A matrix whose rows can be gathered quickly: CSR stays, CSC/COO become CSR (one copy)."""
    if sp.issparse(matrix) and matrix.format != "csr":
        return sp.csr_matrix(matrix)
    return matrix


# ----------------------------------------------------------------------------- covariates


@dataclass
class CovariateLayout:
    """Which obs columns feed the model and how each is encoded."""

    batch_key: str | None
    batch_categories: list[str]
    categorical_keys: list[str]
    categorical_categories: dict[str, list[str]]
    continuous_keys: list[str]
    continuous_mean: list[float]
    continuous_std: list[float]


def learn_covariate_layout(
    obs: pd.DataFrame,
    batch_key: str | None,
    categorical_keys: list[str],
    continuous_keys: list[str],
) -> CovariateLayout:
    """Read category orders and continuous scaling from the training data's ``obs``."""
    keys = ([batch_key] if batch_key else []) + categorical_keys + continuous_keys
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        raise KeyError(f"obs columns {missing} not found in adata.obs; available: {list(obs.columns)}")
    categories = {key: _categories(obs[key], key) for key in ([batch_key] if batch_key else []) + categorical_keys}
    means, stds = [], []
    for key in continuous_keys:
        values = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"continuous covariate obs[{key!r}] has NaN, infinite or non-numeric values; fill or drop them")
        means.append(float(values.mean()))
        stds.append(float(values.std()) or 1.0)
    return CovariateLayout(
        batch_key=batch_key,
        batch_categories=categories.get(batch_key, []) if batch_key else [],
        categorical_keys=list(categorical_keys),
        categorical_categories={k: categories[k] for k in categorical_keys},
        continuous_keys=list(continuous_keys),
        continuous_mean=means,
        continuous_std=stds,
    )


def _categories(column: pd.Series, key: str) -> list[str]:
    if column.isna().any():
        raise ValueError(
            f"obs[{key!r}] has {int(column.isna().sum())} missing (NaN) values; fill them "
            f"(e.g. adata.obs[{key!r}] = adata.obs[{key!r}].astype(str)) or drop those cells"
        )
    if isinstance(column.dtype, pd.CategoricalDtype):
        present = set(column.astype(str))
        return [str(c) for c in column.cat.categories if str(c) in present]
    return sorted(set(column.astype(str)))


def covariate_matrix(obs: pd.DataFrame, layout: CovariateLayout) -> np.ndarray:
    """One-hot batch and categorical covariates and scaled continuous ones, float32 (cells × width)."""
    blocks = []
    for key, categories in _categorical_items(layout):
        if key not in obs.columns:
            raise KeyError(f"obs column {key!r} (used by the model) not found in adata.obs")
        column = obs[key]
        if column.isna().any():
            raise ValueError(f"obs[{key!r}] has {int(column.isna().sum())} missing (NaN) values; fill them or drop those cells")
        values = column.astype(str).to_numpy()
        codes = pd.Categorical(values, categories=categories).codes
        if (codes < 0).any():
            unknown = sorted(set(values[codes < 0]))
            raise ValueError(
                f"obs[{key!r}] has categories unseen in training: {unknown[:5]}; known: {categories[:10]}. "
                "Map new batches with model.map_query(...)"
            )
        blocks.append(np.eye(len(categories), dtype=np.float32)[codes])
    for key, mean, std in zip(layout.continuous_keys, layout.continuous_mean, layout.continuous_std):
        if key not in obs.columns:
            raise KeyError(f"obs column {key!r} (used by the model) not found in adata.obs")
        values = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"continuous covariate obs[{key!r}] has NaN, infinite or non-numeric values")
        blocks.append(((values - mean) / std).astype(np.float32)[:, None])
    if not blocks:
        return np.zeros((len(obs), 0), dtype=np.float32)
    return np.concatenate(blocks, axis=1)


def _categorical_items(layout: CovariateLayout) -> list[tuple[str, list[str]]]:
    items = [(layout.batch_key, layout.batch_categories)] if layout.batch_key else []
    return items + [(k, layout.categorical_categories[k]) for k in layout.categorical_keys]


def batch_codes(obs: pd.DataFrame, layout: CovariateLayout) -> np.ndarray:
    """Integer batch code of each cell (all zeros without a batch key)."""
    if not layout.batch_key:
        return np.zeros(len(obs), dtype=np.int64)
    values = obs[layout.batch_key].astype(str).to_numpy()
    return pd.Categorical(values, categories=layout.batch_categories).codes.astype(np.int64)


# ----------------------------------------------------------------------------- genes


def gene_order(var_names: pd.Index, gene_names: list[str]) -> np.ndarray | None:
    """Column indices that put ``var_names`` in the model's gene order (None if already so)."""
    if list(var_names) == list(gene_names):
        return None
    if not var_names.is_unique:
        dup = var_names[var_names.duplicated()].unique()[:5].tolist()
        raise ValueError(f"adata.var_names are not unique (e.g. {dup}); call adata.var_names_make_unique()")
    missing = pd.Index(gene_names).difference(var_names)
    if len(missing):
        raise ValueError(
            f"{len(missing)} of the model's {len(gene_names)} genes are missing from adata.var_names "
            f"(e.g. {missing[:5].tolist()}); subset or reindex the AnnData to the model's genes"
        )
    return var_names.get_indexer(gene_names)


# ----------------------------------------------------------------------------- minibatches


@dataclass
class Minibatch:
    counts: torch.Tensor  # cells × genes, float32, dense
    covariates: torch.Tensor  # cells × covariate width
    library: torch.Tensor  # cells × 1 total counts
    batch_index: torch.Tensor  # cells, int64 batch code
    cell_index: np.ndarray  # positions of these cells in the AnnData


class CellLoader:
    """Minibatches of densified count rows, read chunk by chunk.

    In-memory matrices are gathered in a fully random order; backed (on-disk) matrices are
    read in contiguous blocks whose order is shuffled, then shuffled again inside a buffer, so
    a pass reads each row once with large sequential reads.
    """

    def __init__(
        self,
        matrix,
        covariates: np.ndarray,
        library: np.ndarray,
        batch_index: np.ndarray,
        gene_columns: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ):
        self.matrix = as_row_readable(matrix)
        self.backed = is_backed_matrix(self.matrix)
        self.covariates = covariates
        self.library = library.astype(np.float32)
        self.batch_index = batch_index
        self.gene_columns = gene_columns
        self.device = torch.device(device)

    def batches(
        self, cells: np.ndarray, batch_size: int, shuffle: bool = False, rng: np.random.Generator | None = None
    ) -> Iterator[Minibatch]:
        """Yield minibatches covering ``cells`` once, in random order when ``shuffle``."""
        cells = np.asarray(cells, dtype=np.int64)
        n_genes = self.matrix.shape[1] if self.gene_columns is None else len(self.gene_columns)
        chunk_rows = max(batch_size, (CHUNK_BYTES // (4 * max(n_genes, 1))) // batch_size * batch_size)
        for chunk in self._chunks(cells, chunk_rows, shuffle, rng):
            dense = self._read_rows(chunk)
            for start in range(0, len(chunk), batch_size):
                rows = slice(start, start + batch_size)
                yield self._minibatch(dense[rows], chunk[rows])

    def _chunks(self, cells, chunk_rows, shuffle, rng) -> Iterator[np.ndarray]:
        if not shuffle:
            yield from (cells[s : s + chunk_rows] for s in range(0, len(cells), chunk_rows))
            return
        if not self.backed:
            order = cells[rng.permutation(len(cells))]
            yield from (order[s : s + chunk_rows] for s in range(0, len(order), chunk_rows))
            return
        sorted_cells = np.sort(cells)
        blocks = [sorted_cells[s : s + BACKED_BLOCK_ROWS] for s in range(0, len(sorted_cells), BACKED_BLOCK_ROWS)]
        block_order = rng.permutation(len(blocks))
        blocks_per_chunk = max(1, chunk_rows // BACKED_BLOCK_ROWS)
        for s in range(0, len(blocks), blocks_per_chunk):
            chunk = np.concatenate([blocks[b] for b in block_order[s : s + blocks_per_chunk]])
            yield chunk[rng.permutation(len(chunk))]

    def _read_rows(self, rows: np.ndarray) -> torch.Tensor:
        """Dense float32 tensor of the given rows (in the given order)."""
        if self.backed:
            # h5py needs increasing indices: read sorted, then restore the requested order.
            order = np.argsort(rows, kind="stable")
            sorted_rows = rows[order]
            lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
            if hi - lo <= 2 * len(rows):  # nearly contiguous: one slice read is fastest
                block = self.matrix[lo:hi]
                block = block[sorted_rows - lo]
            else:
                block = self.matrix[sorted_rows]
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            block = block[inverse]
        else:
            block = self.matrix[rows]
        if self.gene_columns is not None:
            block = block[:, self.gene_columns]
        dense = block.toarray() if sp.issparse(block) else np.asarray(block)
        return torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))

    def _minibatch(self, counts: torch.Tensor, cells: np.ndarray) -> Minibatch:
        to = self.device
        non_blocking = to.type == "cuda"
        return Minibatch(
            counts=counts.to(to, non_blocking=non_blocking),
            covariates=torch.from_numpy(self.covariates[cells]).to(to, non_blocking=non_blocking),
            library=torch.from_numpy(self.library[cells, None]).to(to, non_blocking=non_blocking),
            batch_index=torch.from_numpy(self.batch_index[cells]).to(to, non_blocking=non_blocking),
            cell_index=cells,
        )
