"""From AnnData to validated counts, covariates and minibatches.

This is the only module that reads AnnData internals. It validates at the boundary (so the
rest of the package can trust its inputs) and never writes to the user's AnnData.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import re
import sys
import threading
import warnings
import weakref
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass
from itertools import pairwise

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from cellvae.distributions import SparseCounts

MIN_CELLS = 10
# Largest count accepted in one entry (and library size): far above any read or UMI count, below where float32 and
# int64 arithmetic (likelihood, log x!) would overflow. Counts are computed in float32, which holds whole numbers
# exactly up to 2**24 only: an entry above that is rounded (to 1e-7 of itself) and its cell's log-likelihood loses
# precision (README.md, Reliability).
MAX_COUNT = 1e12
# Stored values of a backed matrix read and checked at once: bounds the temporary arrays (~64 MB of float32).
VALUES_PER_CHECK = 2**24
# Stored values of an in-memory matrix checked or summed at once: its temporaries (~4 MB) stay well below the
# matrix itself, whose size the memory a fit adds is measured against (benchmarks/README.md).
VALUES_PER_PASS = 2**20
# Column indices looked up at once to count a view's values per cell: blocks that stay in cache (2**18 took 0.42 s
# over 150M values, 2**20 0.51 s).
VALUES_PER_CHECK_OF_COLUMNS = 2**18
# Rows of a backed matrix read at once when checking it or summing its rows.
ROWS_PER_READ = 10_000
# Rows densified at once; bounds the memory of one read to CHUNK_BYTES.
CHUNK_BYTES = 128 * 2**20
# Contiguous rows read from a backed file as one block; blocks are shuffled, then rows within a buffer.
BACKED_BLOCK_ROWS = 256
# Threads reading the slices of a Zarr array that one shuffled buffer needs, at once (reads 1.2-2x faster than one).
ZARR_READ_THREADS = 4
# Stored values per read buffer of a backed CSC matrix (256 MB as CSR), where every buffer reads the whole file.
BACKED_CSC_BUFFER_VALUES = 2**25
# An in-memory count matrix that is not CSR, copied into CSR by every loader, is warned about from this many values.
CONVERTED_WARNING_VALUES = 10_000_000
# A layer of a backed AnnData (which anndata reads into memory) is warned about from this many stored values.
IN_MEMORY_LAYER_WARNING_VALUES = 10_000_000
# A dense store chunked by more rows than a block is read whole storage chunks at a time; a read
# buffer then holds this many chunks, so that minibatches mix parts of the file, within CHUNKED_BUFFER_BYTES.
CHUNKS_PER_BUFFER = 4
CHUNKED_BUFFER_BYTES = 4 * CHUNK_BYTES
# Counts densified per minibatch, at most, by passes that only evaluate the model (encoding,
# validation, diagnostics): 8 MB of float32, so that many genes do not blow up their memory
# (835 cells at 2,511 genes; up to a few thousand genes as fast as larger batches, or faster).
EVALUATION_VALUES = 2**21


PACKAGE_DIRECTORY = os.path.dirname(os.path.abspath(__file__)) + os.sep
CONTEXTLIB_FILE = os.path.abspath(contextlib.__file__)  # @contextmanager decorators sit between cellvae's frames


def launched_processes() -> int:
    """How many processes torchrun launched for this run: its ``WORLD_SIZE`` (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE") or 1)


def process_rank() -> int:
    """This process's rank in a data-parallel run: torch.distributed's, else torchrun's ``RANK`` where
    ``WORLD_SIZE`` says there are several processes (0 alone)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    if launched_processes() > 1:
        return int(os.environ.get("RANK") or 0)
    return 0


def warn_user(message: str, category: type[Warning] = UserWarning, every_rank: bool = False) -> None:
    """Warn, attributing the warning to the first caller outside cellvae (the user's line).

    A fixed ``stacklevel`` points inside the package when the same check is reached through
    another public function (``tl.embed`` builds a ``CellVAE``, which reads the data). In a
    data-parallel run only rank 0 warns (the ranks run the same checks), unless ``every_rank`` (of one rank's own state).
    """
    if process_rank() > 0 and not every_rank:
        return
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None:
        filename = os.path.abspath(frame.f_code.co_filename)
        if not (filename.startswith(PACKAGE_DIRECTORY) or filename == CONTEXTLIB_FILE):
            break
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def layer_names(adata: ad.AnnData) -> list[str]:
    """The names of ``adata``'s layers, for messages (anndata 0.13 also lists X there, as ``layers[None]``)."""
    return [name for name in adata.layers.keys() if name is not None]


def gene_names(adata: ad.AnnData) -> pd.Index:
    """``adata.var_names`` as text, as the model names its genes (anndata's setters make text, but an in-place
    pandas edit such as ``adata.var.set_index("entrez", inplace=True)`` can leave integers)."""
    names = adata.var_names
    return names if pd.api.types.is_string_dtype(names) else names.astype(str)


def check_one_name(value, name: str, of: str = "obs column") -> None:
    """Refuse a list (or another collection) where one ``of`` name is expected, before pandas or anndata
    fail on it with "unhashable type" (``categorical_covariate_keys`` takes lists, ``batch_key`` does not)."""
    if isinstance(value, (list, tuple, set, dict, np.ndarray, pd.Index, pd.Series)):
        raise TypeError(f"{name} takes one {of} name (a string), got {value!r}")


def check_ordered(value, name: str, takes: str, fix: str = "pass a list, e.g. sorted(...)") -> None:
    """Refuse a set, dict view, generator or map where ``takes`` (one name or a list of them) is expected: numpy takes
    them for one value, so they were looked up as one name, their repr (and a set's order would vary from run to run)."""
    if isinstance(value, Iterable) and not isinstance(value, (str, bytes, np.ndarray)) and np.ndim(value) == 0:
        raise TypeError(f"{name} takes {takes}, got a {type(value).__name__} ({value!r:.80}): {fix}")


def is_whole(value) -> bool:
    """Whether ``value`` is an integer, Python's or NumPy's (not a bool, nor a float such as 128.0)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def native(value):
    """A numpy scalar as the Python number it holds; anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def check_positive_int(value, name: str) -> None:
    """Refuse what is not a whole number of at least 1 (a bool, a float like 128.0)."""
    if not is_whole(value) or value < 1:
        default = " (leave it out for the default; scvi-tools' None)" if value is None and name == "batch_size" else ""
        raise ValueError(f"{name} must be a positive integer{default}, got {value!r}")


def check_positive(value, name: str) -> None:
    """Refuse what is not a positive, finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive, finite number, got {value!r}")


def check_threshold(threshold) -> None:
    """Refuse a ``threshold`` that is not a non-negative, finite number."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number)) or not 0 <= threshold < np.inf:
        raise ValueError(f"threshold must be a non-negative finite number, got {threshold!r}")


def check_flag(value, name: str) -> bool:
    """``value`` as a Python bool (NumPy's too, which JSON records cannot hold); anything else is refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_seed(random_state) -> int:
    """``random_state`` as a Python integer (torch's generators refuse numpy's)."""
    if not is_whole(random_state):
        not_taken = " (scanpy also takes None or a RandomState; cellvae's results are reproducible by seed)"
        raise TypeError(
            f"random_state must be an integer seed, e.g. 0, got {random_state!r:.60}"
            + (not_taken if random_state is None or isinstance(random_state, np.random.RandomState | np.random.Generator) else "")
        )
    if not 0 <= random_state < 2**32:  # what scanpy's and scikit-learn's seeds (numpy's RandomState) take
        raise ValueError(f"random_state must be a non-negative integer below 2**32, got {random_state}")
    return int(random_state)


def check_is_anndata(adata, name: str = "adata") -> None:
    """Refuse anything but an AnnData where one is expected (e.g. the path of a file, not yet read), before an
    attribute error deep inside."""
    if isinstance(adata, ad.AnnData):
        return
    if not isinstance(adata, (str, os.PathLike)):
        raise TypeError(f"{name} must be an AnnData, got {type(adata).__name__}")
    path = str(adata)
    read = f"cellvae.read_zarr_lazy({path!r})" if path.rstrip("/").endswith(".zarr") else f"anndata.read_h5ad({path!r})"
    raise TypeError(f"{name} must be an AnnData, got the path {path!r}; read the file first: {read}")


def check_nonempty_anndata(adata, name: str = "adata") -> None:
    """Refuse anything but an AnnData with cells and genes, whose obs is a pandas DataFrame."""
    check_is_anndata(adata, name)
    if not isinstance(adata.obs, pd.DataFrame):  # e.g. anndata.experimental.read_lazy's xarray obs
        raise TypeError(
            f"adata.obs is a {type(adata.obs).__name__}, not a pandas DataFrame (a lazily read AnnData?); read the file "
            "with anndata.read_h5ad(path, backed='r'), cellvae.read_h5ad_lazy(path) or cellvae.read_zarr_lazy(path), or call "
            "adata.to_memory()"
        )
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ValueError(f"{name} is empty ({adata.n_obs} cells × {adata.n_vars} genes)")


def count_matrix(adata: ad.AnnData, layer: str | None):
    """The count matrix ``adata.X`` or ``adata.layers[layer]``, as stored (never copied).

    For a view of a backed AnnData (``adata[cells, genes]`` of ``read_h5ad(path, backed="r")`` or
    of :func:`read_zarr_lazy`) a :class:`BackedView`: its cells and genes are then read from the
    file as needed, where anndata would read all of them into memory on every access to ``X``. A view
    of in-memory counts is copied, as anndata copies it (see :func:`_copied_csr_view`).
    """
    check_one_name(layer, "layer", of="layer")
    viewed = _viewed_counts(adata, layer)
    if viewed is not None and is_backed_matrix(viewed[0]):
        return BackedView(*viewed)
    if viewed is not None and layer is not None and adata.isbacked:  # (the viewed AnnData's layer: warned about once)
        _warn_about_an_in_memory_layer_of_a_backed_anndata(adata, layer, viewed[0])
    copied = None if viewed is None else _copied_csr_view(*viewed)
    if copied is not None:
        return copied
    if layer is None:
        matrix = stored_x(adata)  # (once: every access to a view's X copies it)
        if matrix is None:
            names = layer_names(adata)
            layers = f": adata.layers holds {names}" if names else ""
            raise ValueError(
                "adata.X is empty (None); the raw counts must be in adata.X, or in a layer named when the model is "
                f"built (CellVAE(adata, layer=...)){layers}; a trained model reads the layer it was trained on"
            )
    elif layer not in adata.layers:
        hint = "; the counts in adata.X are read with layer=None" if layer == "X" else ""
        raise KeyError(f"layer {layer!r} not found in adata.layers; available: {layer_names(adata)}{hint}")
    else:
        matrix = adata.layers[layer]
        if adata.isbacked and viewed is None:  # (a view's layer is a new copy each time: its parent's was told above)
            _warn_about_an_in_memory_layer_of_a_backed_anndata(adata, layer, matrix)
    if _in_a_closed_file(matrix):  # (h5py's own error names no file nor fix)
        raise ValueError(
            f"the count matrix {counts_location(layer)} is read from an .h5ad file that has been closed (e.g. by "
            "adata.file.close() of the backed AnnData it came from, as a query model's copy of a backed query reads "
            "it): open the file again, anndata.read_h5ad(path, backed='r'), and pass that AnnData (adata=...)"
        )
    if not _is_readable(matrix):
        kind = f"{type(matrix).__module__}.{type(matrix).__name__}"
        raise TypeError(
            f"the count matrix {counts_location(layer)} is a {kind}; cellvae reads numpy arrays, scipy sparse matrices and "
            "backed or Zarr matrices (anndata.read_h5ad(path, backed='r'), cellvae.read_zarr_lazy(path)); for a dask "
            "array, call .compute() or write the AnnData to .h5ad and open it backed"
        )
    return matrix


class BackedView:
    """The cells ``rows`` and genes ``columns`` of a backed matrix (h5py, anndata's backed sparse
    datasets, Zarr), as a view of a backed AnnData selects them. Row ``i`` of the view is row
    ``rows[i]`` of ``matrix``; nothing is read until the counts are checked, summed or streamed."""

    def __init__(self, matrix, rows: np.ndarray, columns: np.ndarray):
        self.matrix, self.rows, self.columns = matrix, rows, columns
        self.shape = (len(rows), len(columns))
        self.dtype = matrix.dtype


def _in_a_closed_file(matrix) -> bool:
    """Whether ``matrix`` (an h5py dataset, anndata's backed sparse dataset over an h5py group) lies in a closed file."""
    node = getattr(matrix, "group", matrix)  # (anndata's backed sparse datasets keep their h5py group there)
    return isinstance(node, (h5py.Dataset, h5py.Group)) and not node.id.valid


def stored_x(adata: ad.AnnData):
    """``adata.X``, or None where it holds nothing, also for a backed AnnData whose file has no ``X`` (there
    anndata's ``X`` raises h5py's KeyError; it reopens a closed file, so the file is not asked first)."""
    try:
        return adata.X
    except KeyError:
        return None


def view_positions(adata: ad.AnnData) -> tuple[ad.AnnData, np.ndarray, np.ndarray] | None:
    """Where ``adata`` is a view: the AnnData it views and the view's rows and columns of it, else None.
    (anndata keeps them in private attributes; where they are missing, None.)"""
    parent, cells, genes = (getattr(adata, name, None) for name in ("_adata_ref", "_oidx", "_vidx"))
    if not adata.is_view or parent is None or cells is None or genes is None:
        return None
    changed = ValueError(
        "the AnnData this view was made of has changed since (its cells or genes filtered, reordered or renamed in "
        "place, e.g. by sc.pp.filter_cells(adata)), so the view no longer picks the cells and genes it did; make the "
        "view again from the AnnData as it is now (a model built on the old view: pass adata=... to its methods)"
    )
    try:
        rows = np.atleast_1d(np.arange(parent.n_obs, dtype=np.int64)[cells])
        columns = np.atleast_1d(np.arange(parent.n_vars, dtype=np.int64)[genes])
    except IndexError:  # (a mask of the former length)
        raise changed from None
    # a view keeps the names of its cells and genes as they were when it was made
    if not (parent.obs_names[rows].equals(adata.obs_names) and parent.var_names[columns].equals(adata.var_names)):
        raise changed
    return parent, rows, columns


def fresh_view(adata: ad.AnnData) -> ad.AnnData | None:
    """Where ``adata`` is a view: a view made now of the same cells and genes of the AnnData it views (whose
    ``obs`` reads that AnnData's columns as they are now), indexed as ``adata`` was, so that anndata copies a
    view of all cells as one (indexing every cell by position copies the whole matrix first); else None."""
    if view_positions(adata) is None:  # (which also refuses a view of an AnnData changed since)
        return None
    return adata._adata_ref[adata._oidx, adata._vidx]


def viewed_anndata(adata: ad.AnnData) -> ad.AnnData | None:
    """The AnnData that ``adata`` views, else None (anndata keeps it in a private attribute; where it is missing, None)."""
    return getattr(adata, "_adata_ref", None) if adata.is_view else None


def _viewed_counts(adata: ad.AnnData, layer: str | None) -> tuple[object, np.ndarray, np.ndarray] | None:
    """Where ``adata`` is a view: the viewed AnnData's count matrix and the view's rows and columns of it,
    else None (then anndata's own reading of the view applies)."""
    viewed = view_positions(adata)
    if viewed is None:
        return None
    parent, rows, columns = viewed
    if layer is None:
        matrix = stored_x(parent)
    else:
        matrix = parent.layers[layer] if layer in parent.layers else None
    if matrix is None or not _is_readable(matrix):
        return None
    return matrix, rows, columns


def totals_over_all_genes(adata: ad.AnnData, layer: str | None) -> np.ndarray | None:
    """Where ``adata`` is a view of some of the genes of in-memory counts (``adata[:, hvg]``): each of its cells'
    total counts over all the viewed AnnData's genes; else None."""
    viewed = _viewed_counts(adata, layer)
    if viewed is None or not isinstance(viewed[0], IN_MEMORY_MATRICES) or len(viewed[2]) == viewed[0].shape[1]:
        return None
    matrix, rows, _ = viewed
    return np.asarray(matrix.sum(axis=1), dtype=np.float64).ravel()[rows]  # (sums each row, copies none)


def copied_view_counts(adata: ad.AnnData, layer: str | None) -> sp.csr_matrix | sp.csr_array | None:
    """``adata.X`` or ``adata.layers[layer]`` of a view of in-memory CSR counts, copied as :func:`count_matrix`
    copies them (:func:`_copied_csr_view`) into the class they are stored as (a ``csr_array`` stays one, as in
    anndata's copy); None where anndata's own copy is no worse (or ``adata`` is no such view)."""
    viewed = _viewed_counts(adata, layer)
    copied = None if viewed is None or is_backed_matrix(viewed[0]) else _copied_csr_view(*viewed)
    return sp.csr_array(copied) if copied is not None and isinstance(viewed[0], sp.sparray) else copied


def make_view_own_data(adata: ad.AnnData) -> None:
    """Make an in-memory view its own AnnData just before results are written into it, as anndata would,
    but without its ImplicitModificationWarning (which under ``-W error`` would throw the work away). A call
    that fails earlier leaves the view a view.

    Its CSR matrices (X, layers) are copied as the model copies a view's counts: anndata's copy of a view of
    some cells first converts the column indices of every cell to int64 where indptr is int64 (a view of 1,000
    of 203,340 cells: 2.1 s and 0.83 GB, for a result written into 1,000 cells)."""
    if not adata.is_view:
        return
    names = layer_names(adata)
    copied = {layer: copied_view_counts(adata, layer) for layer in [None, *names]}
    layers = {name: adata.layers[name].copy() if copied[name] is None else copied[name] for name in names}
    x = copied[None] if copied[None] is not None else None if adata.X is None else adata.X.copy()
    own = ad.AnnData(
        X=x,
        obs=adata.obs.copy(),
        var=adata.var.copy(),
        uns=deepcopy(dict(adata.uns)),
        obsm={key: value.copy() for key, value in adata.obsm.items()},
        varm={key: value.copy() for key, value in adata.varm.items()},
        obsp={key: value.copy() for key, value in adata.obsp.items()},
        varp={key: value.copy() for key, value in adata.varp.items()},
        layers=layers,
        raw=None if adata.raw is None else adata.raw.copy(),
    )
    adata._init_as_actual(own)  # (as anndata turns a view into its own data when one writes into it)


def _copied_csr_view(matrix, rows: np.ndarray, columns: np.ndarray) -> sp.csr_matrix | None:
    """The ``rows`` and ``columns`` of a view of some cells and some genes, copied from the viewed AnnData's
    ``matrix`` where it is an in-memory CSR matrix, else None.

    anndata copies such a view's cells with all their genes before it picks the genes: a view of 90% of
    100,000 cells and 2,000 of 20,000 genes took 11 times its own size on the way. Here each cell's values
    among the view's genes are counted first (a pass over the column indices), and the view is then copied
    a block of cells at a time into arrays of that size, scipy picking each block's genes; so nothing but
    the copy and one block is held (a view of only genes, anndata copies as well as this; a view of only cells is
    copied a row at a time, as anndata does where indptr and indices share a type).
    """
    if not sp.issparse(matrix) or matrix.format != "csr":
        return None
    all_genes = len(columns) == matrix.shape[1] and np.array_equal(columns, np.arange(matrix.shape[1]))
    if all_genes and not np.array_equal(rows, np.arange(matrix.shape[0])):
        # A view of some cells: just their rows. anndata's copy (scipy's row indexing) first converts the
        # column indices of every cell to the type of indptr where the two differ (int32 indices with int64
        # indptr, as many .h5ad files hold): 8 bytes per stored value of the whole matrix for a view of 1,000 of
        # 100,000 cells (+390 MB, 0.6 s), where the rows alone need a thousandth of that.
        return sp.csr_matrix(_gather_csr_rows(matrix, rows))
    if len(rows) == matrix.shape[0] or len(columns) == matrix.shape[1] or len(np.unique(columns)) < len(columns):
        return None  # (a gene viewed twice, as well, is left to anndata)
    kept_per_row = _values_in_columns(matrix, columns, rows)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(kept_per_row, out=indptr[1:])
    index_type = np.int32 if indptr[-1] <= np.iinfo(np.int32).max else np.int64
    values = np.empty(indptr[-1], dtype=matrix.dtype)
    indices = np.empty(indptr[-1], dtype=index_type)
    block_rows = max(1, int(VALUES_PER_PASS * max(matrix.shape[0], 1) / max(matrix.nnz, 1)))
    for start in range(0, len(rows), block_rows):
        block = sp.csr_matrix(_gather_csr_rows(matrix, rows[start : start + block_rows])[:, columns])
        first = indptr[start]
        values[first : first + block.nnz] = block.data
        indices[first : first + block.nnz] = block.indices
    return sp.csr_matrix((values, indices, indptr.astype(index_type)), shape=(len(rows), len(columns)))


def _values_in_columns(matrix: sp.csr_matrix, columns: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """How many stored values each of ``rows`` of the CSR ``matrix`` holds in ``columns``, a block of rows at a
    time, reading only those rows' column indices (a view of a few cells costs what they hold, not the matrix)."""
    wanted = np.zeros(matrix.shape[1], dtype=np.uint8)
    wanted[columns] = 1
    starts = matrix.indptr[rows].astype(np.int64)
    lengths = matrix.indptr[rows + 1].astype(np.int64) - starts
    counts = np.zeros(len(rows), dtype=np.int64)
    block_rows = max(1, int(VALUES_PER_CHECK_OF_COLUMNS * max(matrix.shape[0], 1) / max(matrix.nnz, 1)))
    for start in range(0, len(rows), block_rows):
        block_starts, block_lengths = starts[start : start + block_rows], lengths[start : start + block_rows]
        offsets = np.zeros(len(block_lengths) + 1, dtype=np.int64)
        np.cumsum(block_lengths, out=offsets[1:])
        taken = np.repeat(block_starts - offsets[:-1], block_lengths) + np.arange(offsets[-1])
        filled = np.flatnonzero(block_lengths)  # (reduceat sums a row per start: empty rows have none)
        if len(filled):
            counts[start + filled] = np.add.reduceat(wanted[matrix.indices[taken]], offsets[filled], dtype=np.int64)
    return counts


IN_MEMORY_MATRICES = (np.ndarray, sp.spmatrix, sp.sparray)


def _is_readable(matrix) -> bool:
    """In memory (numpy, scipy sparse) or backed (h5py, anndata's sparse datasets, Zarr arrays)."""
    if isinstance(matrix, (*IN_MEMORY_MATRICES, h5py.Dataset, ad.abc.CSRDataset, ad.abc.CSCDataset)):
        return True
    return type(matrix).__module__.split(".")[0] == "zarr"


def counts_location(layer: str | None) -> str:
    """Where the counts are read: ``adata.X`` or ``adata.layers[...]`` (for messages)."""
    return "adata.X" if layer is None else f"adata.layers[{layer!r}]"


# Stored values looked at to tell whether another layer (or adata.raw) holds raw counts, for an error's hint.
VALUES_PER_HINT = 100_000
HINT_ROWS = 256  # rows of a matrix on disk read to tell whether it holds counts


def looks_like_counts(matrix) -> bool:
    """Whether the first stored values of a matrix (of one on disk, those of its first rows) are whole,
    non-negative and not all zero."""
    if matrix is not None and not isinstance(matrix, IN_MEMORY_MATRICES):  # (a lazy layer, a backed X)
        try:
            matrix = matrix[: min(HINT_ROWS, matrix.shape[0])]
            matrix = matrix.compute() if hasattr(matrix, "compute") else matrix
        except Exception:  # (a store that cannot be read here: no hint, the error stays as it is)
            return False
    if not isinstance(matrix, IN_MEMORY_MATRICES) or 0 in matrix.shape:
        return False
    values = np.asarray(next(_stored_values(matrix), np.zeros(0))[:VALUES_PER_HINT])  # (none: sparse, all zeros)
    if not np.issubdtype(values.dtype, np.number) or values.dtype.kind == "c":  # (a boolean mask is not counts)
        return False
    with np.errstate(invalid="ignore"):
        return bool(
            values.size
            and np.isfinite(values).all()
            and (values >= 0).all()
            and (values == np.round(values)).all()
            and values.any()
        )


NO_COUNTS_ELSEWHERE = "Here neither"  # begins the advice where no layer nor raw holds counts
# begin the advice to round (the end of the error), left out where whole counts lie elsewhere
ROUNDING_ADVICE = "If these are estimated or ambient-corrected counts"
ROUND_OFF_ADVICE = "To use these"
GENERAL_ADVICE = "cellvae (?:models|needs) raw counts: build the model with layer="


@contextmanager
def hint_where_counts_are(adata: ad.AnnData, layer: str | None, trained: bool) -> Iterator[None]:
    """Inside: an error about the values of the counts (``adata.X`` or ``layers[layer]``) also names ``X`` (where
    a layer was read), another layer, or ``adata.raw``, whose values look like raw counts (after
    ``sc.pp.normalize_total`` and ``sc.pp.log1p`` they often sit in ``layers['counts']``)."""
    where = counts_location(layer)
    try:
        yield
    except ValueError as error:
        if not str(error).startswith((where, "query " + where)):
            raise
        # whole counts elsewhere: rounding these is no fix (and its layer could be where those counts are), and the
        # general advice (build the model with layer=..., a trained model reads ...) gives way to the place found
        told = _ended(re.split(f"{ROUNDING_ADVICE}|{ROUND_OFF_ADVICE}|{GENERAL_ADVICE}", str(error))[0].rstrip())
        if layer is not None and looks_like_counts(stored_x(adata)):
            fix = f"adata.layers[{layer!r}] = adata.X" if trained else "leave out layer= (layer=None reads X)"
            raise ValueError(f"{told} adata.X holds whole counts: {fix}") from None
        layers = layers_holding_counts(adata, layer)
        if layers:
            name = layers[0]
            if not trained:
                fix = f"pass layer={name!r}"
            elif layer is None:  # a trained model reads where it was trained
                fix = f"give the model ad.AnnData(X=adata.layers[{name!r}], obs=adata.obs, var=adata.var)"
            else:
                fix = f"put them where the model reads them, adata.layers[{layer!r}] = adata.layers[{name!r}]"
            raise ValueError(f"{told} adata.layers[{name!r}] holds whole counts: {fix}") from None
        raw = getattr(adata, "raw", None)
        if raw is not None and looks_like_counts(raw.X):
            if trained and layer is None:
                fix = "give the model adata.raw.to_adata() (genes are matched by name)"
            elif not adata.var_names.isin(raw.var_names).all():  # raw[:, adata.var_names] would fail
                fix = "build an AnnData of them, adata.raw.to_adata(), and use that (it holds raw's genes, not adata's)"
            else:
                target = layer or "counts"
                fix = f"adata.layers[{target!r}] = adata.raw[:, adata.var_names].X" + (
                    "" if trained else f", then pass layer={target!r}"
                )
            raise ValueError(f"{told} adata.raw.X holds whole counts: {fix}") from None
        # the general advice names places: where every other place was read (in memory) and none holds counts, say so
        places = [adata.layers[name] for name in layer_names(adata) if name != layer]
        places += [stored_x(adata)] if layer is not None else []
        places += [raw.X] if raw is not None else []
        all_read = all(place is None or isinstance(place, IN_MEMORY_MATRICES) for place in places)
        if "layer=..." in str(error) and all_read:  # (in place of the general advice, which names layers and raw)
            elsewhere = "adata.raw nor a layer" if raw is not None else "a layer (nor adata.raw: there is none)"
            rounding = re.search(rf"(?:{ROUNDING_ADVICE}|\(Its largest value).*", str(error))
            raise ValueError(
                f"{told} {NO_COUNTS_ELSEWHERE} {elsewhere} holds whole counts: read the raw counts again from their source "
                "(e.g. scanpy.read_10x_h5 of the Cell Ranger output) and keep a copy of them in a layer "
                "(adata.layers['counts']) before normalising."
                + (f" {rounding[0]}" if rounding else "")
                + (
                    " (An AnnData made by adata.raw.to_adata() holds adata.raw's values, often log-normalised, and no "
                    "layers: where the AnnData it came from keeps counts in a layer, give "
                    + (  # (a trained model reads where it was trained: here X)
                        "the model ad.AnnData(X=adata.layers['counts'], obs=adata.obs, var=adata.var) of that one "
                        "(its counts layer's name for 'counts').)"
                        if trained
                        else "that one, with layer= naming it.)"
                    )
                    if raw is None and not layer_names(adata)
                    else ""
                )
            ) from None
        if trained and ROUND_OFF_ADVICE in str(error):  # (a trained model takes no layer=: round where it reads)
            read = stored_x(adata) if layer is None else adata.layers[layer]
            first = (
                "on a copy, adata = adata.copy(), to keep the values as they were"
                if isinstance(read, IN_MEMORY_MATRICES) and not adata.isbacked
                else "in memory: first adata = adata.to_memory(), as counts on disk cannot be rounded in place"
            )
            raise ValueError(
                f"{told} {ROUND_OFF_ADVICE}, round them where the model reads them, {where} = np.rint({where}) ({first})"
            ) from None
        raise


def layers_holding_counts(adata: ad.AnnData, but: str | None = None) -> list[str]:
    """The layers (other than ``but``; of one on disk, its first rows read) whose values look like counts, those
    named like counts first ('counts' and 'raw_counts' before 'spliced' or 'ambiguous')."""
    layers = [name for name in layer_names(adata) if name != but and looks_like_counts(adata.layers[name])]
    return sorted(layers, key=lambda name: ("count" not in name.lower(), "raw" not in name.lower()))


def _ended(sentence: str) -> str:
    """``sentence`` with a full stop at its end, where it has none."""
    return sentence if sentence.endswith((".", ".)")) else sentence + "."


def is_backed_matrix(matrix) -> bool:
    return not isinstance(matrix, IN_MEMORY_MATRICES)


def validate_counts(matrix, where: str, read_values: bool = True) -> None:
    """Raise a clear error unless ``matrix`` holds finite, non-negative integer counts.

    ``read_values=False`` checks only the dtype and shape (the values are checked later, as read).
    """
    if not read_values:
        _check_count_matrix(matrix, where)
        return
    if is_backed_matrix(matrix):  # read block by block, each block checked (its row sums go unused)
        library_sizes(matrix, check_as=where)
        return
    _check_count_matrix(matrix, where)
    for values in _stored_values(matrix):
        _check_count_values(values, where)


def count_profile(matrix, batch_codes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, float]:
    """The share of 1s among the non-zero counts of each batch, how many non-zero values each share is
    taken from, and the largest value, in a sample of about ``VALUES_PER_CHECK`` stored values.

    UMI counts hold many 1s (a fifth to two thirds of the non-zero values); read counts of amplified
    molecules (full-length protocols such as Smart-seq) hold few. ``batch_codes`` gives each cell's batch
    (0, 1, ...); without it all cells are one batch. A sparse matrix is sampled in 64 slices spread over its
    stored values (the first ones of a CSC matrix would be only its first genes), a dense one in 64 blocks
    of rows, so a batch whose cells are stored together is sampled if it holds a 64th of the values.
    """
    codes = np.zeros(matrix.shape[0], dtype=np.int64) if batch_codes is None else np.asarray(batch_codes, np.int64)
    n_batches = int(codes.max(initial=0)) + 1
    if isinstance(matrix, BackedView):  # sampled from the whole file; the cells outside the view are left out
        codes_in_file = np.full(matrix.matrix.shape[0], -1, dtype=np.int64)
        codes_in_file[matrix.rows] = codes
        matrix, codes = matrix.matrix, codes_in_file
    ones, non_zero, largest = np.zeros(n_batches), np.zeros(n_batches), 0.0
    for values, rows in _sampled_values(matrix):
        bins = codes[rows] + 1  # bin 0: cells outside the view
        ones += np.bincount(bins, weights=values == 1, minlength=n_batches + 1)[1:]
        non_zero += np.bincount(bins, weights=values != 0, minlength=n_batches + 1)[1:]
        largest = max(largest, float(values[bins > 0].max(initial=0)))
    return ones / np.maximum(non_zero, 1), non_zero.astype(np.int64), largest


def _sampled_values(matrix, slices: int = 64) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Slices of stored values that do not overlap and hold at most ``VALUES_PER_CHECK`` values together (all
    of a small matrix, in consecutive slices), each with the row of every value. A slice holds at most a
    ``slices``-th of ``VALUES_PER_CHECK`` values: the rows of one as large as the check (int64, one per value)
    took 90 MB more than training on a 28 MB matrix."""
    if is_backed_matrix(matrix) and getattr(matrix, "format", None) in ("csr", "csc"):
        kind, arrays = matrix.format, matrix.group  # the store's data, indices and indptr arrays
    elif sp.issparse(matrix):
        matrix = matrix if matrix.format in ("csr", "csc", "coo") else sp.csr_matrix(matrix)
        kind = matrix.format
        arrays = {"data": matrix.data, "indices": matrix.row if kind == "coo" else matrix.indices}
        arrays["indptr"] = matrix.indptr if kind == "csr" else None
    else:  # dense: blocks of whole rows
        n_rows, n_genes = matrix.shape
        rows_per_slice = max(1, VALUES_PER_CHECK // slices // max(n_genes, 1))
        if n_rows * n_genes <= VALUES_PER_CHECK:  # all of it
            starts = np.arange(0, n_rows, rows_per_slice)
        else:
            rows_per_slice = max(1, min(rows_per_slice, n_rows // slices))
            starts = np.unique(np.linspace(0, n_rows - rows_per_slice, slices).astype(np.int64))
        for start in starts:
            stop = min(start + rows_per_slice, n_rows)
            values = np.asarray(matrix[start:stop]).ravel()
            yield values, np.repeat(np.arange(start, stop), n_genes)
        return
    stored = arrays["data"]
    row_pointers = np.asarray(arrays["indptr"][:]) if kind == "csr" else None
    piece = VALUES_PER_CHECK // slices
    if stored.shape[0] <= VALUES_PER_CHECK:  # all of it
        starts = np.arange(0, stored.shape[0], piece)
    else:
        starts = np.unique(np.linspace(0, stored.shape[0] - piece, slices).astype(np.int64))
    for start in starts:
        values = np.asarray(stored[start : start + piece])
        if kind == "csr":  # the rows the slice runs through, each repeated as often as it has values in the slice
            first, last = np.searchsorted(row_pointers, [start, start + len(values) - 1], side="right") - 1
            in_slice = np.diff(np.clip(row_pointers[first : last + 2], start, start + len(values)))
            rows = np.repeat(np.arange(first, last + 1), in_slice)
        else:  # CSC: the row indices; COO: the rows
            rows = np.asarray(arrays["indices"][start : start + piece])
        yield values, rows.astype(np.int64, copy=False)


def genes_without_counts(matrix) -> int | None:
    """How many genes (columns) hold no count in any cell; ``None`` where finding out would take a pass
    over a backed file (row-wise or dense storage). Stored zeros count as counts (scipy's matrices rarely
    hold them)."""
    if isinstance(matrix, BackedView):
        return None
    if isinstance(matrix, np.ndarray):
        seen = np.zeros(matrix.shape[1], dtype=bool)
        rows = max(1, VALUES_PER_CHECK // matrix.shape[1])
        for start in range(0, matrix.shape[0], rows):
            seen |= (matrix[start : start + rows] != 0).any(axis=0)
        return int((~seen).sum())
    if _is_csc(matrix):
        indptr = matrix.indptr if not is_backed_matrix(matrix) else matrix.group["indptr"][:]
        return int((np.diff(indptr) == 0).sum())
    if is_backed_matrix(matrix) or not hasattr(matrix, "indices"):
        return None
    seen = np.zeros(matrix.shape[1], dtype=bool)
    for start in range(0, len(matrix.indices), VALUES_PER_CHECK):
        seen[matrix.indices[start : start + VALUES_PER_CHECK]] = True
    return int((~seen).sum())


def genes_unmeasured_by_batch(matrix, batch_codes: np.ndarray, n_batches: int) -> tuple[np.ndarray, np.ndarray] | None:
    """For each batch: how many genes have no count in any of its cells although the other batches detect them
    in so many cells that its own cells, at that rate, would have shown them in ``UNMEASURED_EXPECTED_CELLS``
    cells or more; and how many genes the other batches detect that often. None for counts on disk (a pass over
    the file), for one batch and for more batches than ``UNMEASURED_CHECK_VALUES / genes``.

    Genes that one dataset did not measure read as zeros in all its cells once ``anndata.concat(...,
    join='outer')`` fills them in: in the shared datasets no batch lacks more than 0.1% of those genes; joined so
    with pbmc3k's 16,579 genes, the atlas's pbmc4k cells lack 77% of them."""
    if not isinstance(matrix, IN_MEMORY_MATRICES) or not 2 <= n_batches <= UNMEASURED_CHECK_VALUES // matrix.shape[1]:
        return None  # (a flag per batch and gene: at most 32 MB)
    stored = matrix.nnz if sp.issparse(matrix) else matrix.size
    sample = None  # every cell
    if stored > UNMEASURED_CHECK_VALUES:  # every few cells (each batch in proportion): the same rates, in bounded time
        sample = np.arange(0, matrix.shape[0], -(-stored // UNMEASURED_CHECK_VALUES))
        batch_codes = batch_codes[sample]
    n_genes = matrix.shape[1]
    seen = np.zeros(n_batches * n_genes, dtype=bool)  # (batch, gene): a count in some cell of the batch
    cells_detecting = np.zeros(n_genes, dtype=np.int64)  # cells with a count of each gene
    cells_with_counts = np.zeros(len(batch_codes), dtype=bool)
    for first, block in _blocks_of_rows(matrix, sample):
        for rows, genes in _nonzero_positions(block):
            rows = rows + first
            seen[batch_codes[rows] * n_genes + genes] = True
            cells_detecting += np.bincount(genes, minlength=n_genes)
            cells_with_counts[rows] = True
    seen = seen.reshape(n_batches, n_genes)
    cells = np.bincount(batch_codes[cells_with_counts], minlength=n_batches)
    unmeasured, expected = np.zeros(n_batches, dtype=np.int64), np.zeros(n_batches, dtype=np.int64)
    for batch in np.flatnonzero((cells > 0) & (cells < cells.sum())):
        # (for a gene the batch never shows, every detecting cell is another batch's: the other batches' rate)
        often = cells[batch] * cells_detecting / (cells.sum() - cells[batch]) >= UNMEASURED_EXPECTED_CELLS
        expected[batch] = int(often.sum())
        unmeasured[batch] = int((often & ~seen[batch]).sum())
    return unmeasured, expected


# Cells of a batch that would show a gene, at the other batches' detection rate, beyond which never seeing it
# means it was not measured there (by chance: about e**-10 for independent cells).
UNMEASURED_EXPECTED_CELLS = 10
# Stored values read at most by that check (about 0.4 s); a larger matrix is checked on a subset of its cells.
UNMEASURED_CHECK_VALUES = 2**25


# Counts look like reads of amplified molecules, not UMIs, where fewer than this share of the non-zero values
# are 1 (UMI data hold 20-70%), judged per batch once that many non-zero values are sampled from it.
READ_SHARE_OF_ONES = 0.1
READ_CHECK_VALUES = 10_000
# ... and like rounded log-normalised values where none of that many sampled non-zero values exceeds this (the
# six shared datasets' largest counts: 419-2,973; 23-173 thinned to 200 counts per cell; 28-88 in their less
# expressed half of the genes; 6-8 in np.rint of their normalize_total + log1p values)
LOG_LARGEST_COUNT, LOG_CHECK_VALUES = 10, 100_000
# Share of the genes the other batches detect often (genes_unmeasured_by_batch) that a batch may lack before
# a warning: the shared datasets' batches lack at most 0.1% (a batch thinned 10x, 6.3%; one cell type against the
# rest, 1.1%), pbmc4k outer-joined with pbmc3k's 16,579 genes 77%.
UNMEASURED_SHARE = 0.1


def warn_about_counts(matrix, where: str, likelihood: str, dispersion: str, obs: pd.DataFrame, layout: CovariateLayout) -> None:
    """Warn about training counts that are valid but poorly served as they are: many genes without any
    count (they cost time and tell nothing), and reads of amplified molecules rather than UMIs, which one
    dispersion per gene fits poorly (``benchmarks/read_counts.py``: simulated reads of mouse gut cells,
    15-NN cell-type accuracy 0.37 with it, as scVI's, and 0.53 with one per gene and cell; Kang's stimulated
    cells as reads beside UMIs of the controls, batch mixing 0.59 with it and 0.71 with one per gene and batch).

    The advice says how to judge it: by the clusters and batch mixing, not the validation ELBO, which a
    dispersion per cell improves even where it mixes batches less (measured on deep UMI counts of
    CellBench's 1,000 most expressed genes, 5.7% ones, mixing 0.80 with a dispersion per gene, 0.53 per cell)."""
    n_genes = matrix.shape[1]
    empty_genes = genes_without_counts(matrix)
    if empty_genes is not None and empty_genes >= 0.1 * n_genes:
        warn_user(
            f"{empty_genes:,} of the {n_genes:,} genes have no counts in any cell: they cost training time (about "
            "in proportion to the genes) and tell the model nothing; drop them first, e.g. "
            "sc.pp.filter_genes(adata, min_cells=1)",
            UserWarning,
        )
    batch_names = layout.batch_categories or ["all cells"]
    codes = None
    if layout.batch_key:
        codes = as_text(obs[layout.batch_key]).set_categories(batch_names).codes
        warn_about_unmeasured_genes(matrix, where, codes, batch_names, layout.batch_key)
    share, non_zero, largest = count_profile(matrix, codes)
    if non_zero.sum() >= LOG_CHECK_VALUES and 1 < largest <= LOG_LARGEST_COUNT:  # (0/1 data are no log values)
        warn_user(
            f"the largest of {non_zero.sum():,} non-zero values sampled from {where} is {largest:g}: raw counts of so "
            "many values almost always exceed 10 somewhere (mitochondrial, ribosomal and marker genes), so these look "
            "like rounded log-normalised values (np.rint of log1p data), which are not counts; give the model the raw "
            "counts (a layer, or an AnnData rebuilt from adata.raw). If they are raw counts of lowly expressed genes, "
            "ignore this",
            UserWarning,
        )
        return
    if dispersion == "gene-cell":
        return
    judged = non_zero >= READ_CHECK_VALUES  # batches with too few values sampled are not judged
    reads = judged & (share < READ_SHARE_OF_ONES)
    if not reads.any():
        return
    poisson = "likelihood='nb', " if likelihood == "poisson" else ""  # a Poisson model has no dispersion to choose
    if reads.sum() < judged.sum():  # UMIs in some batches, reads in others
        if dispersion == "gene-batch":
            return
        read_batches = np.flatnonzero(reads)
        shown = ", ".join(f"{share[b]:.1%} ({batch_names[b]!r})" for b in read_batches[:5])
        warn_user(
            f"{where} looks like read counts, not UMI counts, in {len(read_batches)} of the {len(batch_names)} batches of "
            f"obs[{layout.batch_key!r}]: only {shown}{', ...' if len(read_batches) > 5 else ''} of their non-zero values are 1, "
            "where UMI counts hold 20-70%, as the other batches do. One dispersion per gene fits reads and UMIs poorly "
            f"together: try CellVAE(..., {poisson}dispersion='gene-batch'), which gives each batch its own, and compare the "
            "batch mixing and clusters (if these batches hold deep UMI counts, ignore this)",
            UserWarning,
        )
        return
    overall = (share * non_zero)[judged].sum() / non_zero[judged].sum()
    warn_user(
        f"{where} looks like read counts, not UMI counts: only {overall:.1%} of its non-zero values are 1 (UMI "
        "data hold 20-70%, very deep cells or a panel of highly expressed genes fewer: if these are UMIs, ignore this). "
        f"A dispersion per gene fits amplified reads poorly: try CellVAE(..., {poisson}dispersion='gene-cell') and compare "
        "the clusters and batch mixing, not model.history['validation_elbo'] (a dispersion per cell always fits better). "
        "Keep a model with one per gene for differential_expression: with one per cell it calls far fewer genes",
        UserWarning,
    )


def warn_about_unmeasured_genes(matrix, where: str, codes: np.ndarray, batch_names: list[str], batch_key: str) -> None:
    """Warn where a batch lacks many genes the other batches detect in so many cells that it must not have measured
    them: zeros filled in by ``anndata.concat(..., join='outer')``. The model reads them as silence in that batch and
    keeps the batches apart (pbmc3k's 16,579 genes joined so with the atlas's pbmc4k on its 2,431, 25 epochs: 0% of
    each cell's 15 nearest neighbours from the other batch, 15% on the 2,431 shared genes)."""
    found = genes_unmeasured_by_batch(matrix, codes.astype(np.int64), len(batch_names))
    if found is None:
        return
    unmeasured, expected = found
    lacking = np.flatnonzero(unmeasured >= np.maximum(UNMEASURED_SHARE * expected, 1))
    if not len(lacking):
        return
    shown = ", ".join(
        f"{batch_names[b]!r} lacks {unmeasured[b]:,} of {expected[b]:,} ({unmeasured[b] / expected[b]:.0%})" for b in lacking[:5]
    )
    warn_user(
        f"in {len(lacking)} of the {len(batch_names)} batches of obs[{batch_key!r}], {where} has no "
        "count in any cell for many genes that the other batches detect in too many cells for that to be chance: "
        f"{shown}{', ...' if len(lacking) > 5 else ''} of those genes. They were most likely not measured there "
        "(anndata.concat(..., join='outer') fills the genes one dataset lacks with zeros), and the model would read "
        "their absence as biology and keep the batches apart: train on the genes every batch measured, e.g. concat "
        "with join='inner'",
        UserWarning,
    )


def _blocks_of_rows(matrix, rows: np.ndarray | None) -> Iterator[tuple[int, object]]:
    """(position among ``rows`` of the block's first row, block): the ``rows`` of an in-memory matrix copied about
    ``VALUES_PER_PASS`` values at a time (a copy of all of them at once took 200 MB whatever the matrix's size);
    ``None``: the whole matrix, uncopied, as one block."""
    if rows is None:
        yield 0, matrix
        return
    source = as_row_readable(matrix) if sp.issparse(matrix) else matrix
    per_row = (source.nnz if sp.issparse(source) else source.shape[1]) / max(source.shape[0], 1)
    step = max(1, int(VALUES_PER_PASS // max(per_row, 1)))
    for start in range(0, len(rows), step):
        chosen = rows[start : start + step]
        yield start, _gather_csr_rows(source, chosen) if sp.issparse(source) else source[chosen]


def _nonzero_positions(matrix) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The row and column of the non-zero values of an in-memory matrix, about ``VALUES_PER_PASS`` at a time."""
    if isinstance(matrix, np.ndarray):
        rows_per_block = max(1, VALUES_PER_PASS // max(matrix.shape[1], 1))
        for start in range(0, matrix.shape[0], rows_per_block):
            rows, genes = np.nonzero(matrix[start : start + rows_per_block])
            yield rows + start, genes
        return
    if matrix.format not in ("csr", "csc"):
        matrix = sp.csr_matrix(matrix)
    indptr = matrix.indptr.astype(np.int64, copy=False)
    major = len(indptr) - 1
    step = max(1, int(major * VALUES_PER_PASS // max(matrix.nnz, 1)))
    for start in range(0, major, step):
        stop = min(start + step, major)
        lo, hi = indptr[start], indptr[stop]
        outer = np.repeat(np.arange(start, stop, dtype=np.int64), np.diff(indptr[start : stop + 1]))
        inner = matrix.indices[lo:hi]
        nonzero = matrix.data[lo:hi] != 0
        if not nonzero.all():  # (explicitly stored zeros)
            outer, inner = outer[nonzero], inner[nonzero]
        yield (outer, inner) if matrix.format == "csr" else (inner, outer)


def _check_count_matrix(matrix, where: str) -> None:
    if isinstance(matrix, BackedView):
        _check_count_matrix(matrix.matrix, where)
    dtype = np.dtype(matrix.dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(dtype, np.complexfloating):
        raise TypeError(f"{where} has dtype {dtype}; cellvae needs numeric raw counts")
    if dtype == np.float16 and getattr(matrix, "format", None) in ("csr", "csc") and is_backed_matrix(matrix):
        raise TypeError(
            f"{where} is stored as sparse float16, which scipy cannot read (nor anndata into memory); write the file "
            "again with the counts as integers or float32"
        )
    if 0 in matrix.shape:
        raise ValueError(f"{where} is empty (shape {matrix.shape}); cellvae needs at least one cell and one gene")


def _stored_values(matrix) -> Iterator[np.ndarray]:
    """The stored values of an in-memory matrix, in pieces (so checks need little memory)."""
    if isinstance(matrix, np.ndarray):
        values = matrix.ravel()
    else:
        values = matrix.data if hasattr(matrix, "data") else matrix.tocsr().data
    yield from (values[s : s + VALUES_PER_PASS] for s in range(0, len(values), VALUES_PER_PASS))


def _check_count_values(values: np.ndarray, where: str) -> None:
    if values.dtype == np.bool_ or np.issubdtype(values.dtype, np.integer):
        if values.size and values.min() < 0:
            wrapped = (
                f" (an {values.dtype} matrix holds at most {np.iinfo(values.dtype).max}: larger counts wrap round to "
                "negative values; store the counts as int32 or float32)"
                if values.dtype.itemsize <= 2 and np.issubdtype(values.dtype, np.signedinteger)
                else ""
            )
            raise ValueError(f"{where} has negative values (min {values.min()}); cellvae needs raw counts >= 0{wrapped}")
        _check_largest_count(values, where)
        return
    if values.dtype == np.float16 and np.isinf(values).any():
        raise ValueError(
            f"{where} holds infinite values in a float16 matrix, which holds at most 65,504 (and whole numbers "
            "exactly only up to 2,048): larger counts become infinite; store the counts as float32 or int32"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(
            f"{where} contains NaN or infinite values; remove or fix those cells first (NaN for genes "
            "that one dataset lacks come from anndata.concat(..., join='outer') on dense matrices: pass fill_value=0, "
            "or join='inner')"
        )
    if values.size and values.min() < 0:
        raise ValueError(
            f"{where} has negative values (min {values.min():.3g}); it looks scaled or centred. "
            "cellvae needs raw counts: build the model with layer=... naming them (a trained model reads them "
            "where it was trained, X or that layer: give it counts kept elsewhere as an AnnData of their own, e.g. "
            "ad.AnnData(X=adata.layers['counts'], obs=adata.obs, var=adata.var))"
        )
    _check_largest_count(values, where)
    fractional = values != np.round(values)
    if fractional.any():
        example = values[fractional][0]
        source, target = _rounded_into(where)
        if np.abs(values - np.round(values)).max() < 1e-3:  # counts that went through float arithmetic
            raise ValueError(
                f"{where} holds counts with round-off (e.g. {example!s}: its values are within 0.001 of whole numbers); cellvae "
                f"needs whole counts. {ROUND_OFF_ADVICE}, round them into a layer first, adata.layers[{target!r}] = "
                f"np.rint({source}), and build the model with layer={target!r}"
            )
        # log1p of normalised counts stays below ~15; larger fractional values are scaled or estimated counts
        looks = "normalised or log-transformed"
        if values[fractional].max() > 20:
            looks = "normalised (normalize_total, CPM or TPM) or like estimated counts (salmon, kallisto, RSEM)"
        # rounding is advice for estimated counts only: values that all stay small are log-transformed (raw counts
        # of as many values exceed 20 somewhere), and rounded they would pass for counts
        rounding = (
            f"{ROUNDING_ADVICE} (e.g. from salmon, kallisto, RSEM, alevin, SoupX or "
            "decontX; not TPM, CPM or sc.pp.normalize_total's output, which are not counts), round them "
            f"into a layer first: adata.layers[{target!r}] = np.rint({source}) (dense or sparse), and build the model with "
            f"layer={target!r}."
            if values.max() > 20
            else f"(Its largest value is {values.max():.3g}: do not round log-transformed values, they are not counts.)"
        )
        example_layer = "e.g. layer='counts'; " if target == "counts" else ""
        raise ValueError(
            f"{where} has non-integer values (e.g. {example!s}); it looks {looks}. "
            f"cellvae models raw counts: build the model with layer=... naming them ({example_layer}a "
            "trained model reads them where it was trained, X or that layer: give it counts kept elsewhere as an "
            "AnnData of their own, e.g. ad.AnnData(X=adata.layers['counts'], obs=adata.obs, var=adata.var)), or "
            f"rebuild an AnnData from adata.raw. {rounding}"
        )


def _rounded_into(where: str) -> tuple[str, str]:
    """The matrix an error about ``where`` (``adata.X``, ``adata.layers['counts']``, ...) names, and a layer to round
    it into: ``'counts'``, unless that is the matrix itself (the rounded values would replace it)."""
    found = re.search(r"\w*adata(?:\.X\b|\.layers\[[^\]]*\])", where)
    source = found[0] if found else "adata.X"
    return source, "counts_rounded" if source in ("adata.layers['counts']", 'adata.layers["counts"]') else "counts"


def _check_largest_count(values: np.ndarray, where: str) -> None:
    dtype = values.dtype
    can_exceed = np.iinfo(dtype).max > MAX_COUNT if np.issubdtype(dtype, np.integer) else dtype.itemsize > 2
    if can_exceed and values.size and values.max() > MAX_COUNT:
        raise ValueError(
            f"{where} has a value of {values.max():.3g}, above the {MAX_COUNT:.0e} cellvae accepts as a count in one "
            "cell and gene; raw counts are far smaller: check that these are counts, not an overflowed or scaled matrix"
        )


def library_sizes(
    matrix, columns: np.ndarray | None = None, check_as: str | None = None, rows: range | None = None
) -> np.ndarray:
    """Total counts of each cell over the genes ``columns`` (default: all), as float64.

    With ``check_as`` the values are first validated as counts (errors name ``check_as``); a
    backed matrix is then read once, each block checked and summed, instead of twice.
    ``rows`` (backed matrices only) reads, checks and sums just that range of cells.
    """
    if isinstance(matrix, BackedView):
        if check_as is not None:
            _check_count_matrix(matrix, check_as)
        cells = matrix.rows if rows is None else matrix.rows[rows.start : rows.stop]
        with _reading_from_disk(cells, check_as or "the counts"), _rounding_in_memory():
            return _view_library_sizes(matrix, cells, columns, check_as)
    if is_backed_matrix(matrix):
        if check_as is not None:
            _check_count_matrix(matrix, check_as)
        rows = range(matrix.shape[0]) if rows is None else rows
        with _reading_from_disk(rows, check_as or "the counts"), _rounding_in_memory():
            if _is_csc(matrix):
                return _csc_library_sizes(matrix, columns, check_as, rows)
            return _backed_library_sizes(matrix, columns, check_as, rows)
    if rows is not None:
        raise ValueError("library_sizes(rows=...) reads part of a backed matrix; an in-memory one is summed whole")
    if check_as is not None:
        validate_counts(matrix, check_as)
    if columns is not None or not (sp.issparse(matrix) and matrix.format == "csr"):
        return _row_sums(matrix, columns)
    # CSR in chunks of rows holding about VALUES_PER_PASS values: scipy's sum(dtype=float64), and reduceat
    # over all rows at once, copy all stored values as float64
    totals = np.empty(matrix.shape[0], dtype=np.float64)
    indptr = matrix.indptr
    step = max(1, min(ROWS_PER_READ, int(matrix.shape[0] * VALUES_PER_PASS // max(matrix.nnz, 1))))
    for s in range(0, matrix.shape[0], step):
        e = min(s + step, matrix.shape[0])
        nonempty = indptr[s + 1 : e + 1] > indptr[s:e]
        totals[s:e] = 0.0
        if nonempty.any():
            values = matrix.data[indptr[s] : indptr[e]]
            totals[s:e][nonempty] = np.add.reduceat(values, indptr[s:e][nonempty] - indptr[s], dtype=np.float64)
    return totals


@contextmanager
def _reading_from_disk(rows: range | np.ndarray, where: str) -> Iterator[None]:
    """Name the cells being read when h5py or Zarr fail (their errors name neither file nor cells)."""
    try:
        yield
    except OSError as error:
        first, last = (int(np.min(rows)), int(np.max(rows))) if len(rows) else (0, -1)
        raise OSError(
            f"reading cells {first}–{last} of {where} from disk failed ({error}); the file may be damaged or truncated"
        ) from error


@contextmanager
def _rounding_in_memory() -> Iterator[None]:
    """Inside: advice to round counts read from disk says how (``np.rint`` cannot read a backed matrix)."""
    try:
        yield
    except ValueError as error:
        if "np.rint(" not in str(error):
            raise
        raise ValueError(
            f"{str(error).rstrip('.')}. These counts are read from disk (a backed AnnData), which np.rint cannot read: "
            "round them in memory, adata = adata.to_memory() first (or read the file without backed=, round, and write it again)"
        ) from None


def _backed_library_sizes(matrix, columns: np.ndarray | None, check_as: str | None, rows: range) -> np.ndarray:
    """Row sums of a backed CSR or dense matrix, read in whole storage chunks."""
    totals = [np.zeros(0)]
    step = _rows_per_read(matrix)
    for start in range(rows.start, rows.stop, step):
        block = matrix[start : min(start + step, rows.stop)]
        if check_as is not None:
            _check_count_values(block.data if sp.issparse(block) else np.asarray(block).ravel(), check_as)
        totals.append(_row_sums(block, columns))
    return np.concatenate(totals)


def _view_library_sizes(view: BackedView, cells: np.ndarray, columns: np.ndarray | None, check_as: str | None) -> np.ndarray:
    """Row sums of the file's rows ``cells`` over the view's genes ``columns`` (default: all of them). The
    file is read once, a block of rows (CSR, dense) or a band of columns (CSC) at a time, and only the
    view's cells and genes are checked and summed."""
    unique, inverse = np.unique(cells, return_inverse=True)
    summed = np.zeros(len(view.columns), dtype=bool)
    summed[slice(None) if columns is None else columns] = True
    totals = np.zeros(len(unique), dtype=np.float64)
    matrix = view.matrix
    if _is_csc(matrix):
        indptr = np.asarray(matrix.group["indptr"][:], dtype=np.int64)
        for start, stop, indices, values in _csc_band_arrays(matrix, indptr):
            in_band = (view.columns >= start) & (view.columns < stop)
            if in_band.any():
                column_ptr = indptr[start : stop + 1] - indptr[start]
                band = sp.csc_matrix((values, indices, column_ptr), shape=(matrix.shape[0], stop - start))
                band = band[:, view.columns[in_band] - start][unique]
                if check_as is not None:
                    _check_count_values(band.data, check_as)
                totals += _row_sums(band, None if columns is None else np.flatnonzero(summed[in_band]))
        return totals[inverse]
    step = _rows_per_read(matrix)
    bounds = np.searchsorted(unique, np.arange(0, matrix.shape[0] + step, step))
    for window, (first, last) in enumerate(pairwise(bounds)):
        if first == last:  # no cell of the view in these rows
            continue
        start = window * step
        if last - first < step // 64:  # a few of the view's cells: read them alone (their runs, or a fancy index)
            block = _read_sorted_rows(matrix, unique[first:last])
        else:
            block = matrix[start : min(start + step, matrix.shape[0])][unique[first:last] - start]
        block = select_genes(block, view.columns)
        if check_as is not None:
            _check_count_values(block.data if sp.issparse(block) else np.asarray(block).ravel(), check_as)
        totals[first:last] = _row_sums(block, columns)
    return totals[inverse]


def _rows_per_read(matrix) -> int:
    """Rows of a backed CSR or dense matrix read at once when checking or summing it: about ``ROWS_PER_READ``,
    in whole storage chunks (a partial one is decompressed whole anyway)."""
    row_chunk = _row_chunk(matrix)
    return -(-ROWS_PER_READ // row_chunk) * row_chunk if row_chunk <= ROWS_PER_READ else ROWS_PER_READ


def _is_csc(matrix) -> bool:
    return getattr(matrix, "format", None) == "csc"


def _row_chunk(matrix) -> int:
    """Rows per storage chunk of a backed dense array (Zarr, chunked HDF5); 1 for sparse or unchunked
    storage. Reading any row of a chunk decompresses all of it."""
    chunks = getattr(matrix, "chunks", None)
    if getattr(matrix, "format", None) in ("csr", "csc") or not chunks:
        return 1
    return int(chunks[0])


def _csr_value_chunk(matrix) -> int | None:
    """Stored values per storage chunk of a backed CSR matrix (Zarr, compressed HDF5); None for other
    matrices and unchunked storage. Reading any value of a chunk decompresses all of it."""
    if getattr(matrix, "format", None) != "csr" or not hasattr(matrix, "group"):
        return None
    chunks = getattr(matrix.group["data"], "chunks", None)
    return int(chunks[0]) if chunks else None


def _n_stored(matrix) -> int:
    """The number of values a backed sparse matrix stores."""
    return int(matrix.group["data"].shape[0])


def _csc_bands(matrix) -> list[tuple[int, int]]:
    """Column ranges of a backed CSC matrix holding about ``VALUES_PER_CHECK`` stored values each."""
    n_genes = matrix.shape[1]
    stored = _n_stored(matrix)
    width = max(1, n_genes * VALUES_PER_CHECK // max(stored, 1))
    return [(start, min(start + width, n_genes)) for start in range(0, n_genes, width)]


def _csc_library_sizes(matrix, columns: np.ndarray | None, check_as: str | None, rows: range) -> np.ndarray:
    """Row sums of a backed CSC matrix in one pass over bands of columns (anndata would load the
    whole matrix into memory for every block of rows)."""
    totals = np.zeros(len(rows), dtype=np.float64)
    indptr = np.asarray(matrix.group["indptr"][:], dtype=np.int64)
    for start, stop, indices, values in _csc_band_arrays(matrix, indptr):
        column_ptr = indptr[start : stop + 1] - indptr[start]
        band = sp.csc_matrix((values, indices, column_ptr), shape=(matrix.shape[0], stop - start))[rows.start : rows.stop]
        if check_as is not None:
            _check_count_values(band.data, check_as)
        totals += _row_sums(band, None if columns is None else columns[(columns >= start) & (columns < stop)] - start)
    return totals


def _csc_layout(matrix) -> tuple[np.ndarray, bool]:
    """A backed CSC matrix's column pointers, and whether the row indices in every column are in
    increasing order (scipy keeps them so; checked with one pass over ``indices``)."""
    indptr = np.asarray(matrix.group["indptr"][:], dtype=np.int64)
    for start, stop, indices, _ in _csc_band_arrays(matrix, indptr, with_values=False):
        steps = np.diff(indices)
        column_starts = indptr[start + 1 : stop] - indptr[start] - 1  # the step into a column's first row may go down
        steps[column_starts[(column_starts >= 0) & (column_starts < len(steps))]] = 0
        if np.any(steps < 0):
            return indptr, False
    return indptr, True


def _read_csc_rows(matrix, rows: np.ndarray, indptr: np.ndarray, sorted_rows: bool) -> tuple[sp.csr_matrix, np.ndarray]:
    """A CSR block of rows read from a backed CSC matrix, and the position in it of each of ``rows``
    (``block[positions]`` are the rows asked for), like :func:`_read_csr_rows`.

    Every call reads the whole file, a band of columns at a time, so memory stays bounded (anndata
    would load the matrix whole). Where each column's row indices increase (``sorted_rows``, from
    :func:`_csc_layout`), the stored values of the runs of consecutive rows asked for are found by
    binary search in each column, so only those are gathered; otherwise every row index is looked up.
    """
    unique, positions = np.unique(rows, return_inverse=True)
    n_rows, n_genes = matrix.shape
    if len(unique) == 0:
        return sp.csr_matrix((0, n_genes), dtype=matrix.dtype), positions
    position = np.full(n_rows, -1, dtype=np.int64 if n_rows >= 2**31 else np.int32)
    position[unique] = np.arange(len(unique))
    run_starts = np.flatnonzero(np.diff(unique, prepend=-2) != 1)
    run_stops = np.append(run_starts[1:], len(unique))
    # each run's first row and the row after its last, as searched for in every column
    bounds = np.column_stack([unique[run_starts], unique[run_stops - 1] + 1]).ravel()
    bounds = bounds.astype(matrix.group["indices"].dtype)
    values, block_rows, column_lengths = [], [], []
    for start, stop, indices, band_values in _csc_band_arrays(matrix, indptr):
        column_ptr = indptr[start : stop + 1] - indptr[start]
        if sorted_rows:
            cuts = np.concatenate([np.searchsorted(indices[a:b], bounds) + a for a, b in pairwise(column_ptr.tolist())])
            firsts, lengths = cuts[0::2], cuts[1::2] - cuts[0::2]
            kept = np.repeat(firsts - (np.cumsum(lengths) - lengths), lengths) + np.arange(lengths.sum())
        else:
            kept = np.flatnonzero(position[indices] >= 0)
        values.append(band_values[kept])
        block_rows.append(position[indices[kept]])
        column_lengths.append(np.diff(np.searchsorted(kept, column_ptr)))
    column_ptr = np.concatenate([[0], np.cumsum(np.concatenate(column_lengths))])
    values = np.concatenate(values)
    block_rows = np.concatenate(block_rows)
    return sp.csc_matrix((values, block_rows, column_ptr), shape=(len(unique), n_genes)).tocsr(), positions


def _csc_band_arrays(matrix, indptr: np.ndarray, with_values: bool = True) -> Iterator[tuple]:
    """Each band of columns of a backed CSC matrix (:func:`_csc_bands`): its first column, the column after
    its last, its row indices and (``with_values``) its stored values, else None. They are read straight
    from the store's arrays into two buffers reused from band to band (fresh memory for every read costs
    as much as the read), so each band's arrays are overwritten by the next one."""
    group = matrix.group
    bands = _csc_bands(matrix)
    largest = max(int(indptr[stop] - indptr[start]) for start, stop in bands)
    indices_buffer = np.empty(largest, dtype=group["indices"].dtype)
    data_buffer = np.empty(largest, dtype=group["data"].dtype) if with_values else None
    for start, stop in bands:
        lo, hi = int(indptr[start]), int(indptr[stop])
        indices = _read_range(group["indices"], lo, hi, indices_buffer)
        yield start, stop, indices, _read_range(group["data"], lo, hi, data_buffer) if with_values else None


def _read_range(array, lo: int, hi: int, buffer: np.ndarray) -> np.ndarray:
    """``array[lo:hi]`` of a store's 1-d array; an HDF5 dataset is read into ``buffer``."""
    if isinstance(array, h5py.Dataset) and hi > lo:
        out = buffer[: hi - lo]
        array.read_direct(out, np.s_[lo:hi], np.s_[0 : hi - lo])
        return out
    return np.asarray(array[lo:hi])


def _row_sums(matrix, columns: np.ndarray | None) -> np.ndarray:
    """Row sums (float64) over ``columns`` of an in-memory matrix, copying at most a block of rows."""
    if columns is None or (sp.issparse(matrix) and matrix.format == "csc"):  # CSC: columns are cheap to pick
        picked = matrix if columns is None else matrix[:, columns]
        return np.asarray(picked.sum(axis=1, dtype=np.float64)).ravel()
    matrix = as_row_readable(matrix)  # COO and other formats cannot be sliced by rows
    selected = np.zeros(matrix.shape[1], dtype=np.float64)
    selected[columns] = 1.0
    # (a product with a float64 vector converts the stored values to float64: do it a block at a time)
    stored = matrix.nnz if sp.issparse(matrix) else matrix.size
    rows = max(1, int(matrix.shape[0] * VALUES_PER_CHECK // max(stored, 1)))
    return np.concatenate([np.asarray(matrix[s : s + rows] @ selected).ravel() for s in range(0, matrix.shape[0], rows)])


def as_row_readable(matrix):
    """A matrix whose rows can be gathered quickly: CSR stays, CSC/COO become CSR (one copy). Row
    pointers of a wider integer type than the column indices (int64 and int32, as h5py often reads
    them) are copied to the narrower one where they fit, so that scipy's row indexing applies: the
    new matrix shares the counts and column indices with the given one."""
    if sp.issparse(matrix) and matrix.format != "csr":
        return sp.csr_matrix(matrix)
    if sp.issparse(matrix) and matrix.indptr.dtype.itemsize > matrix.indices.dtype.itemsize:
        if matrix.nnz <= np.iinfo(matrix.indices.dtype).max:
            indptr = matrix.indptr.astype(matrix.indices.dtype)
            return sp.csr_matrix((matrix.data, matrix.indices, indptr), shape=matrix.shape, copy=False)
    return matrix


def read_zarr_lazy(store) -> ad.AnnData:
    """Open an AnnData Zarr store with ``X``, ``layers`` and ``raw.X`` left on disk (out of core).

    The count matrices stay in the store (sparse ones as anndata's ``CSRDataset``/``CSCDataset``,
    dense ones as ``zarr.Array``) and are read a block of rows at a time during training and
    inference, like a backed ``.h5ad``; ``obs``, ``var``, ``obsm``, ``uns`` and the rest are read
    into memory. The store must stay in place while the AnnData is used.

    CSR is the fastest layout to stream. A CSR ``X`` is read in blocks of the rows whose values share a
    storage chunk, and a dense ``X`` a whole storage chunk of rows at a time, several chunks per read
    buffer, so anndata's default chunks (thousands of rows) stream well; chunks of more than 512 MB are
    slow and warned about: then write ``adata.write_zarr(path, chunks=(256, adata.n_vars))``.

    Parameters
    ----------
    store
        Path of a ``.zarr`` store written by :meth:`anndata.AnnData.write_zarr` (or an open ``zarr.Group``).

    Returns
    -------
    An AnnData that trains and embeds like an in-memory one, with memory independent of the cell count.
    """
    import zarr

    if not isinstance(store, (zarr.Group, str, os.PathLike)):
        raise TypeError(f"read_zarr_lazy takes the path of a .zarr store, got {store!r}")
    if not isinstance(store, zarr.Group) and not os.path.isdir(store):
        hint = "; for an .h5ad file use cellvae.read_h5ad_lazy(path), which streams it alike" if os.path.isfile(store) else ""
        raise FileNotFoundError(f"{os.fspath(store)!r} is not a Zarr store (a folder written by AnnData.write_zarr){hint}")
    try:
        group = store if isinstance(store, zarr.Group) else zarr.open_group(store, mode="r")
    except (FileNotFoundError, KeyError, ValueError) as error:  # zarr's GroupNotFoundError: a folder of something else
        raise FileNotFoundError(
            f"{os.fspath(store)!r} is a folder but not a Zarr store (written by AnnData.write_zarr): {error}"
        ) from error
    encoding = group.attrs.get("encoding-type")
    if encoding == "annbatch-preshuffled":  # annbatch's DatasetCollection: a folder of AnnData stores
        datasets = sorted(group.group_keys(), key=lambda name: (len(name), name))  # dataset_2 before dataset_10
        if not datasets:
            raise ValueError(f"{store} is an annbatch collection with no AnnData stores in it, not an AnnData store")
        first = f"{os.fspath(store).rstrip('/')}/{datasets[0]}" if isinstance(store, (str, os.PathLike)) else None
        example = f"cellvae.read_zarr_lazy({first!r})" if first else f"cellvae.read_zarr_lazy(group[{datasets[0]!r}])"
        raise ValueError(
            f"{store} is an annbatch collection of {len(datasets)} AnnData store{'s' * (len(datasets) != 1)}, not one store: "
            f"open one of them ({', '.join(datasets[:3])}{', ...' if len(datasets) > 3 else ''}), {example}"
        )
    if encoding not in (None, "anndata"):
        raise ValueError(f"{store} holds Zarr encoding {encoding!r}, not an AnnData store (written by AnnData.write_zarr)")
    adata = read_lazily(group)
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"{store} is a Zarr group but not an AnnData store (written by AnnData.write_zarr)")
    return adata


def read_h5ad_lazy(path) -> ad.AnnData:
    """Open an ``.h5ad`` file with ``X``, ``layers`` and ``raw.X`` left on disk (out of core).

    ``anndata.read_h5ad(path, backed="r")`` leaves only ``X`` on disk and reads every layer into memory; this
    streams counts kept in a layer (``CellVAE(adata, layer="counts")``, as in files whose ``X`` holds normalised
    values) as a backed ``X`` is streamed. ``obs``, ``var``, ``obsm``, ``uns`` and the rest are read into memory. The
    file is opened read-only and must stay in place while the AnnData is used; it stays open while the AnnData or a
    model made from it exists (it closes once both are deleted), so write results to another file, not over this one.
    ``adata.to_memory()`` or ``adata[cells].copy()`` read the matrices into memory; ``adata.copy()`` fails on them.

    Parameters
    ----------
    path
        Path of an ``.h5ad`` file.

    Returns
    -------
    An AnnData that trains and embeds like an in-memory one, with memory independent of the cell count.
    """
    import h5py

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"read_h5ad_lazy takes the path of an .h5ad file, got {path!r}")
    if not os.path.isfile(path):
        hint = "; for a .zarr store use cellvae.read_zarr_lazy(path)" if os.path.isdir(path) else ""
        raise FileNotFoundError(f"{os.fspath(path)!r} is not an .h5ad file{hint}")
    try:
        adata = read_lazily(h5py.File(path, "r"))  # (open while the AnnData's matrices are: they read from it)
    except OSError as error:
        raise OSError(f"{os.fspath(path)!r} is not a readable .h5ad file ({error})") from error
    if not isinstance(adata, ad.AnnData):
        raise ValueError(f"{os.fspath(path)!r} is an HDF5 file but not an AnnData (written by AnnData.write_h5ad)")
    return adata


# Each in-memory layer of a backed AnnData is warned about once: weak references by id (matrices are not hashable).
_LAYERS_WARNED_ABOUT: dict[int, weakref.ref] = {}


def _warn_about_an_in_memory_layer_of_a_backed_anndata(adata: ad.AnnData, layer: str, matrix) -> None:
    """Warn, once per matrix, where the counts are a large layer of an AnnData opened backed, which anndata read
    into memory."""
    warned = _LAYERS_WARNED_ABOUT.get(id(matrix))
    if is_backed_matrix(matrix) or (warned is not None and warned() is matrix):
        return
    stored = matrix.nnz if sp.issparse(matrix) else int(np.prod(np.shape(matrix)))
    if stored >= IN_MEMORY_LAYER_WARNING_VALUES:
        _LAYERS_WARNED_ABOUT[id(matrix)] = weakref.ref(matrix)  # (a dead reference matches no later matrix)
        size = (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) if sp.issparse(matrix) else matrix.nbytes
        path = os.fspath(adata.filename)
        warn_user(
            f"the AnnData is opened backed, but anndata's backed mode reads every layer into memory, so its layers[{layer!r}] "
            f"is not streamed from disk (it holds {size / 1e9:.2g} GB, and the other layers take memory too); open the file "
            f"with cellvae.read_h5ad_lazy({path!r}) to leave its layers on disk",
            UserWarning,
        )


def read_lazily(group):
    """The AnnData in an open Zarr group or h5py file, its ``X``, ``layers`` and ``raw.X`` left in the store
    (anndata's backed mode keeps only ``X`` of an ``.h5ad`` on disk)."""

    def lazy(read, name: str, elem, iospec):
        if name == "/X" or name == "/raw/X" or (name.startswith("/layers/") and name.count("/") == 2):
            if iospec.encoding_type in ("csr_matrix", "csc_matrix"):
                return ad.io.sparse_dataset(elem)
            if iospec.encoding_type == "array":
                return elem
        return read(elem)

    return ad.experimental.read_dispatched(group, lazy)


# ----------------------------------------------------------------------------- covariates


MISSING_AS_TEXT = ("nan", "NaN", "None", "<NA>", "NaT")  # what astype(str) writes for missing values


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
    check_one_name(batch_key, "batch_key")
    keys = ([batch_key] if batch_key else []) + categorical_keys + continuous_keys
    missing = [k for k in keys if k not in obs.columns]
    if missing:
        arguments = {
            "batch_key": [batch_key],
            "categorical_covariate_keys": categorical_keys,
            "continuous_covariate_keys": continuous_keys,
        }
        lacking = {argument: [key for key in named if key in missing] for argument, named in arguments.items()}
        given = ", ".join(f"{argument}: {keys}" for argument, keys in lacking.items() if keys)
        raise KeyError(f"obs columns {missing} not found in adata.obs ({given}); available: {list(obs.columns)}")
    categories = {key: category_names(obs[key], key) for key in ([batch_key] if batch_key else []) + categorical_keys}
    for key, names in categories.items():
        if len(names) >= 10 and len(obs) < 5 * len(names):
            warn_user(
                f"obs[{key!r}] has {len(names):,} categories for {len(obs):,} cells ({len(obs) / len(names):.1f} cells "
                "each): batches and categorical covariates are samples, donors, lanes or protocols that many cells "
                "share; a column with about one value per cell (an ID, a QC number) cannot be corrected for: check the key",
                UserWarning,
            )
    for key, names in categories.items():
        warn_of_missing_as_text(key, names)
        warn_of_numbers_beside_text(obs[key], key)
        if len(names) == 1 and len(obs) > 1:
            warn_user(
                f"obs[{key!r}] is {names[0]!r} in all {len(obs):,} cells, so there is nothing to correct for: the model "
                "learns what it would without it. Leave it out or check the column (a subset of one sample?)"
                + ("; a reference that map_query will extend with new batches keeps its batch_key" if key == batch_key else ""),
                UserWarning,
            )
    means, stds = [], []
    for key in continuous_keys:
        values = continuous_values(obs, key)
        with np.errstate(over="ignore"):
            mean, std = float(values.mean()), float(values.std())
        if not (math.isfinite(mean) and math.isfinite(std)):
            raise ValueError(
                f"continuous covariate obs[{key!r}] has values too large to scale (up to {np.abs(values).max():.3g}); "
                "put them on a smaller scale first, e.g. np.log1p or a change of units"
            )
        if isinstance(obs[key].dtype, pd.CategoricalDtype):  # numbers as labels (donor IDs such as "101")
            warn_user(
                f"continuous covariate obs[{key!r}] is a categorical column: its values are read as numbers (e.g. "
                f"{values[0]:g}); if they are labels (IDs of donors, plates or samples), the column belongs in "
                "categorical_covariate_keys",
                UserWarning,
            )
        constant = len(values) > 0 and values.min() == values.max()  # (np.std of 1,000 copies of 0.1 is 1.4e-17)
        if constant and len(obs) > 1:
            warn_user(
                f"continuous covariate obs[{key!r}] is {mean:.6g} in every cell, so the model cannot learn what it "
                "does: leave it out of continuous_covariate_keys, or check the column",
                UserWarning,
            )
        means.append(mean)
        stds.append(1.0 if constant else std)
    return CovariateLayout(
        batch_key=batch_key,
        batch_categories=categories.get(batch_key, []) if batch_key else [],
        categorical_keys=list(categorical_keys),
        categorical_categories={k: categories[k] for k in categorical_keys},
        continuous_keys=list(continuous_keys),
        continuous_mean=means,
        continuous_std=stds,
    )


def warn_of_missing_as_text(key: str, names: list[str], name: str = "adata") -> None:
    """Warn where a batch or covariate category of ``name``'s ``obs[key]`` reads as a missing value written as text."""
    missing = [category for category in names if category in MISSING_AS_TEXT]
    if missing:
        warn_user(
            f"{name}.obs[{key!r}] has a category {missing[0]!r}, the text of a missing value (.astype(str) writes NaN "
            "as 'nan', None as 'None'): those cells are corrected for as one group of their own; if they have no value, "
            "give them a name that says so or leave them out",
            UserWarning,
        )


def warn_of_numbers_beside_text(column: pd.Series, key: str) -> None:
    """Warn where a column of mixed values holds a whole float beside the text of that number (2.0 beside "2", as
    ``pd.concat`` of a column read as floats with one read as text gives): their names differ ("2.0", "2"), so they
    are two batches or categories, while an integer beside its text (1 and "1") reads as one."""
    values = column.cat.categories if isinstance(column.dtype, pd.CategoricalDtype) else pd.unique(column.dropna())
    texts = {value for value in values if isinstance(value, str)}
    whole = [v for v in values if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer()]
    clashes = [value for value in whole if str(int(value)) in texts]
    if clashes:
        number = clashes[0]
        warn_user(
            f"obs[{key!r}] holds numbers beside text: {float(number)!r} and {str(int(number))!r} name two different "
            f"groups ({len(clashes)} such pair{'s' * (len(clashes) > 1)}); if they are the same, make the column one "
            f"type first, e.g. adata.obs[{key!r}] = [str(int(v)) if isinstance(v, float) and v.is_integer() else str(v) "
            f"for v in adata.obs[{key!r}]]",
            UserWarning,
        )


def category_names(column: pd.Series, key: str, name: str = "adata") -> list[str]:
    """A categorical obs column's categories as text: a pandas categorical's order (unused ones dropped),
    otherwise sorted; NaN values are refused (the fix named for the AnnData the user calls ``name``)."""
    _check_no_missing(column, key, name=name)
    text = as_text(column)
    present = set(text.categories[np.unique(text.codes)])
    if isinstance(column.dtype, pd.CategoricalDtype):  # (each category's text as astype(str) writes it, as in present)
        # (str(): NumPy's strings among the categories of an object Index stay np.str_ after astype(str))
        return list(dict.fromkeys(str(name) for name in _category_text(column.cat.categories) if name in present))
    return sorted(str(name) for name in present)


def as_text(column: pd.Series) -> pd.Categorical:
    """An obs column's values as text (those of ``column.astype(str)``), as a categorical: each distinct
    value is converted once, not each cell's (a million cells: 0.2 s as one string per cell).

    Columns whose equal values can read differently (0 and 0.0 or True and 1 in one object column) are converted
    cell by cell; a float column's -0.0 reads as 0.0 (pandas' categories hold them as one value)."""
    kinds = ("string", "integer", "boolean", "empty")
    if pd.api.types.is_float_dtype(column.dtype):
        column = column + 0.0  # (as _category_text)
    if not isinstance(column.dtype, pd.CategoricalDtype) and pd.api.types.infer_dtype(column, skipna=True) not in kinds:
        if column.dtype == object:  # (a float32 or date column keeps the text astype(str) gives it)
            column = pd.Series(_unsigned_zeros(column), dtype=object)
        return pd.Categorical(column.astype(str))
    categorical = pd.Categorical(column)
    names = _category_text(categorical.categories)
    if not names.is_unique:  # categories that read alike (1 and "1"): converted one by one
        return pd.Categorical(pd.Series(_unsigned_zeros(column), dtype=object).astype(str))
    return pd.Categorical.from_codes(categorical.codes, categories=names)


def cell_texts(column: pd.Series) -> np.ndarray:
    """Each cell's value of an obs column as the model names batches and categories (:func:`as_text`), as an object
    array of str (missing values as 'nan')."""
    return pd.Series(as_text(column), index=column.index).astype(str).to_numpy()


def _unsigned_zeros(values) -> list:
    """The values, each float's -0.0 as 0.0 (the same number, which pandas holds as one category)."""
    return [value + 0.0 if isinstance(value, (float, np.floating)) else value for value in values]


def _category_text(categories: pd.Index) -> pd.Index:
    """Categories as ``astype(str)`` writes them, a float's -0.0 as 0.0 (the same value, one name)."""
    if pd.api.types.is_float_dtype(categories.dtype):
        categories = categories + 0.0  # -0.0 + 0.0 is 0.0
    elif categories.dtype == object:  # (floats among other values)
        categories = pd.Index(_unsigned_zeros(categories), dtype=object)
    return categories.astype(str)


def _check_no_missing(
    column: pd.Series, key: str, source: str = "obs", name: str = "adata", categories: list[str] | None = None
) -> None:
    """Refuse missing values, with a fix: one value of their own, or one of the ``categories`` of a model whose
    categories are set."""
    if column.isna().any():
        fill = (  # (a trained model's: a made-up value would put cells of unknown origin in some batch)
            f"with the model's category each belongs to, where known (e.g. {categories[0]!r})"
            if categories
            else f"({name}.obs[{key!r}] = {name}.obs[{key!r}].astype(object).fillna('unknown').astype(str) makes them one "
            "value of their own)"
        )
        fix = (
            f"{fill} or drop those cells ({name} = {name}[{name}.obs[{key!r}].notna()].copy(); of an AnnData opened backed "
            "leave out .copy(): the view streams from disk)"
            if source == "obs"
            else ""
        )
        where = source if source != "obs" or name == "adata" else f"{name}.obs"
        raise ValueError(f"{where}[{key!r}] has {int(column.isna().sum())} missing (NaN) values; fill them {fix}".rstrip())


def continuous_values(obs: pd.DataFrame, key: str, source: str = "obs") -> np.ndarray:
    """A continuous covariate's values as float64; text, NaN and infinite values are refused, named as ``source[key]``."""
    column = obs[key]
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(values)):
        text = column[column.notna().to_numpy() & np.isnan(values)]  # values that are not numbers at all
        if len(text) > 0.5 * int(column.notna().sum()):  # mostly text: a column of labels
            advice = (
                "pass numbers: the model learnt it as a continuous covariate"
                if source == "covariates"
                else "a column of labels belongs in categorical_covariate_keys"
            )
            raise ValueError(
                f"continuous covariate {source}[{key!r}] holds text, not numbers (e.g. {str(text.iloc[0])!r}, "
                f"{len(text):,} of {len(column):,} values); {advice}"
            )
        fix = "fill or drop them" if source == "obs" else "pass finite numbers"
        bad = int((~np.isfinite(values)).sum())
        example = f", e.g. {str(text.iloc[0])!r}" if len(text) else ""
        raise ValueError(
            f"continuous covariate {source}[{key!r}] has NaN, infinite or non-numeric values ({bad:,} of {len(values):,}"
            f"{example}); {fix}"
        )
    return values


class Covariates:
    """Each cell's covariates held compactly: a category code per cell and categorical key (a one-hot
    row as wide as the batches would take 4 GB at 1M cells × 1,000 batches) and the scaled continuous
    values. Indexing rows gives the model's input for them: one-hot blocks, then the continuous
    values, float32 (rows × width). ``batch_codes``: each cell's batch (all zeros without a batch key)."""

    def __init__(self, codes: list[np.ndarray], widths: list[int], continuous: np.ndarray, batch_codes: np.ndarray):
        self.codes, self.widths, self.continuous, self.batch_codes = codes, widths, continuous, batch_codes
        self.shape = (len(continuous), sum(widths) + continuous.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):  # one cell: its row, as a 2-D array would give
            return self[[rows]][0]
        continuous = self.continuous[rows]
        dense = np.zeros((len(continuous), self.shape[1]), dtype=np.float32)
        cells, offset = np.arange(len(continuous)), 0
        for codes, width in zip(self.codes, self.widths):
            dense[cells, offset + codes[rows]] = 1.0
            offset += width
        dense[:, offset:] = continuous
        return dense


# A continuous covariate whose median cell lies this many training standard deviations from the training mean
# is likely in other units (percent_mito x10 lowered 15-NN label transfer on pbmc3k from 0.89 to 0.81).
FAR_COVARIATE_SDS = 5.0
# ... or where more than FAR_SHARE of the cells lie beyond FAR_SHARE_SDS (never all the training cells together)
FAR_SHARE, FAR_SHARE_SDS = 0.01, 10.0
# Values this many sd away are refused: no units differ so much, and from about 1e22 the outputs are NaN.
MAX_COVARIATE_SDS = 1e6


def covariate_matrix(obs: pd.DataFrame, layout: CovariateLayout, source: str = "obs", trained: bool = True) -> Covariates:
    """One-hot batch and categorical covariates and scaled continuous ones (cells × width, see
    :class:`Covariates`); errors name the values as ``source[key]`` (``"covariates"``: decode's argument) and,
    for a model not ``trained`` yet, say to build it again."""
    codes_per_key, widths, continuous = [], [], []
    for key, categories in categorical_items(layout):
        if key not in obs.columns:
            raise KeyError(
                f"obs column {key!r} (used by the model) not found in adata.obs; add it, e.g. "
                f"adata.obs[{key!r}] = adata.obs['your_column'] (a model from map_query(batch_key=...) keeps the "
                "reference's batch_key)"
                if key == layout.batch_key
                else f"obs column {key!r} (used by the model) not found in adata.obs"
            )
        column = obs[key]
        _check_no_missing(column, key, source, categories=categories)
        values = as_text(column)
        if "-0.0" in categories and "0.0" in values.categories:  # (a model saved before -0.0 was read as 0.0)
            values = values.rename_categories({"0.0": "-0.0"})
        codes = values.set_categories(categories).codes
        if (codes < 0).any():
            unknown = sorted(set(np.asarray(values)[codes < 0]))
            if key == layout.batch_key:
                advice = "Map new batches with model.map_query(...)"
            elif layout.batch_key:
                advice = (
                    "A categorical covariate keeps the categories it was trained with; map cells of new ones with "
                    "model.map_query(...)"
                )
            else:  # map_query extends a reference trained with batch_key
                advice = (
                    "A categorical covariate keeps the categories it was trained with, and this model (without "
                    "batch_key) cannot map new ones: train a model on data that holds them"
                )
            if not trained:  # its categories were fixed when it was built: nothing to map yet
                advice = "This model is not trained yet: build it again on the data as it is now, CellVAE(adata, ...)"
            if source == "covariates":  # decode's argument, not a column of cells that map_query could add
                advice = "Pass one of the known categories (a model from map_query knows its query's too)"
            else:
                advice = (
                    numbers_written_otherwise(unknown, categories, key) or names_in_other_case(unknown, categories, key) or advice
                )
            seen = "unseen in training" if trained else "the model was not built with"
            raise ValueError(f"{source}[{key!r}] has categories {seen}: {unknown[:5]}; known: {categories[:10]}. {advice}")
        codes_per_key.append(codes.astype(np.int32))
        widths.append(len(categories))
    for key, mean, std in zip(layout.continuous_keys, layout.continuous_mean, layout.continuous_std):
        if key not in obs.columns:
            raise KeyError(f"obs column {key!r} (used by the model) not found in adata.obs")
        values = continuous_values(obs, key, source)
        scaled = (values - mean) / std
        beyond = ~(np.abs(scaled) <= MAX_COVARIATE_SDS)
        if beyond.any():  # the network's sums overflow from about 1e22: NaN outputs
            farthest = float(values[np.argmax(np.abs(scaled))])
            raise ValueError(
                f"continuous covariate {source}[{key!r}] has {int(beyond.sum()):,} value{'s' * int(beyond.sum() > 1)} too far "
                f"from those the model was trained with (e.g. {farthest:.3g}, over {MAX_COVARIATE_SDS:.0e} sd from their "
                f"mean {mean:.3g}, sd {std:.3g}): check their units"
            )
        far = float(np.median(np.abs(scaled))) if len(scaled) else 0.0
        # some cells far off: more than 1% beyond 10 sd, which all the training cells together cannot be (Chebyshev:
        # at most 1%), though a part of them can (a cluster of the rare cells far out)
        outlying = np.abs(scaled) > FAR_SHARE_SDS
        outlying_share = float(outlying.mean()) if len(outlying) else 0.0
        trained_with = f"the values the model was trained with (mean {mean:.3g}, sd {std:.3g})"
        if far > FAR_COVARIATE_SDS:  # the training cells' own values lie within about 1 sd of their mean
            warn_user(
                f"{source}[{key!r}] lies far from {trained_with}: the median cell here is {far:.0f} sd away "
                f"({float(np.median(values)):.3g}), where the model can only extrapolate; check its units (a percentage "
                "where the model saw fractions, counts where it saw logs)",
                UserWarning,
            )
        elif outlying_share > FAR_SHARE:
            warn_user(
                f"{source}[{key!r}]: {outlying_share:.1%} of the cells lie over {FAR_SHARE_SDS:.0f} sd from {trained_with}, "
                f"e.g. {float(values[outlying][0]):.3g}, where the model can only extrapolate; check their units (cells "
                "from sources that record it differently, e.g. percentages beside fractions), unless these are the "
                "rare cells far out that the model was trained with",
                UserWarning,
            )
        continuous.append(scaled.astype(np.float32))
    values = np.stack(continuous, axis=1) if continuous else np.zeros((len(obs), 0), dtype=np.float32)
    batch = codes_per_key[0].astype(np.int64) if layout.batch_key else np.zeros(len(obs), dtype=np.int64)
    return Covariates(codes_per_key, widths, values, batch)


def numbers_written_otherwise(new: list[str], known: list[str], key: str, name: str = "adata") -> str | None:
    """The way out when new category names are known numbers written another way: floats for the model's
    integers (1016.0 for 1016) or integers for its floats (1016 for 1016.0), IDs with other leading zeros than
    the model's (1 or 001 for 01, 01 for 1), even one of them beside truly new names, or a flag's 0/1 for its
    True/False (and back) where all the new names are such; else None. Where some names (new or the model's) are
    no numbers, the conversion named replaces just those written otherwise (one of the whole column would fail)."""
    known_names = set(known)
    column = f"{name}.obs[{key!r}]"
    beside_words = any(not value.removesuffix(".0").removeprefix("-").isdigit() for value in [*new, *known])

    def conversion(whole_column: str, meant: dict[str, str]) -> str:
        if not beside_words:
            return f"{column} = {column}{whole_column}"
        return f"{column} = {column}.astype(str).replace({meant!r})"

    integers = {value: value[:-2] for value in new if value.endswith(".0") and value[:-2].removeprefix("-").isdigit()}
    known_integers = {value: meant for value, meant in integers.items() if meant in known_names}
    if known_integers:
        given, meant = next(iter(known_integers.items()))
        return (
            f"{column} holds floats ({given}) where the model's categories are integers "
            f"({meant}): convert it first, {conversion('.astype(int)', known_integers)}"
        )
    known_floats = {value: f"{value}.0" for value in new if value.removeprefix("-").isdigit() and f"{value}.0" in known_names}
    if known_floats:
        given, meant = next(iter(known_floats.items()))
        return (
            f"{column} holds integers ({given}) where the model's categories are floats "
            f"({meant}): convert it first, {conversion('.astype(float)', known_floats)}"
        )
    # IDs that lost their leading zeros (01 read as a number by pandas.read_csv), gained some or others
    by_number = {int(value): value for value in known if value.isdecimal()}
    numbers = {value: value.removesuffix(".0") for value in new if value.removesuffix(".0").isdecimal()}
    padded_otherwise = {value: by_number[int(number)] for value, number in numbers.items() if int(number) in by_number}
    padded_otherwise = {value: meant for value, meant in padded_otherwise.items() if meant != numbers[value]}
    if padded_otherwise:
        value, meant = next(iter(padded_otherwise.items()))
        given = numbers[value]
        whole_column = ".astype(int)" + (f".astype(str).str.zfill({len(meant)})" if meant.startswith("0") else "")
        lost = " (read as numbers, e.g. by pandas.read_csv)" if not given.startswith("0") else ""
        return (
            f"{column} holds {given!r} where the model's category is {meant!r}: the same ID with other "
            f"leading zeros{lost}? Convert it first, {conversion(whole_column, padded_otherwise)}; if they "
            "are new batches or categories, give them names that no category of the model has"
        )
    # booleans written as 0/1 (or 0.0/1.0), or 0/1 written as booleans
    flags = {"0": "False", "1": "True", "0.0": "False", "1.0": "True", "False": "0", "True": "1"}
    retyped = [value for value in new if flags.get(value) in known_names]
    if retyped and set(new) <= set(flags) and known_names <= set(flags):  # (1/2 are no flags: .astype(int) gives 0/1)
        to_bool = retyped[0] not in ("False", "True")
        written, meant = ("0/1", "True/False") if to_bool else ("True/False", "0/1")
        return (
            f"{name}.obs[{key!r}] holds {written} where the model's categories are {meant}: convert it first, "
            f"{name}.obs[{key!r}] = {name}.obs[{key!r}].astype({'bool' if to_bool else 'int'})"
        )
    return None


def new_numbers_typed_otherwise(new: list[str], known: list[str], key: str, name: str = "adata") -> str | None:
    """Where new categories (of a query mapped as new ones) are whole numbers written as floats (1018.0) and every one
    of the model's an integer (1016), or the other way round, the conversion to the model's type; else None. Kept so,
    a column holding the reference's cells and the query's together (``anndata.concat``) would name one set of them
    as the model does not, whichever type it has."""
    column = f"{name}.obs[{key!r}]"
    whole_floats = [value for value in new if value.endswith(".0") and value[:-2].removeprefix("-").isdigit()]
    integers = [value for value in new if value.removeprefix("-").isdigit()]
    model_integers = all(value.removeprefix("-").isdigit() for value in known)
    model_whole_floats = all(value.endswith(".0") and value[:-2].removeprefix("-").isdigit() for value in known)
    for given, model_type, meant, conversion in (
        (whole_floats, model_integers, "integers", ".astype(int)"),
        (integers, model_whole_floats, "floats", ".astype(float)"),
    ):
        if new and known and len(given) == len(new) and model_type:
            return (
                f"{column} holds {given[0]} where the model's categories are {meant} ({known[0]}): mapped so, the query's "
                f"cells and the reference's could not be read together (one column of both names one of them otherwise); "
                f"give the query's column the reference's type first, {column} = {column}{conversion}"
            )
    return None


def names_in_other_case(new: list[str], known: list[str], key: str, name: str = "adata") -> str | None:
    """Where new category names are the model's in other case or with spaces around them ('10X v3 ' for '10x v3',
    'TRUE' for 'True'; one model name each, or it is not told which), the conversion to the model's; else None."""
    folded: dict[str, list[str]] = {}
    for value in known:
        folded.setdefault(value.strip().casefold(), []).append(value)
    alike = {value: folded[f][0] for value in new if len(folded.get(f := value.strip().casefold(), [])) == 1}
    if not alike:
        return None
    value, meant = next(iter(alike.items()))
    column = f"{name}.obs[{key!r}]"
    return (
        f"{column} holds {value!r} where the model's category is {meant!r}: the same name in other case or with spaces "
        f"around it? Convert it first, {column} = {column}.astype(str).replace({alike!r})"
    )


def categorical_items(layout: CovariateLayout) -> list[tuple[str, list[str]]]:
    """Each categorical key (the batch key first) with its categories, in the order of the cells' category codes."""
    items = [(layout.batch_key, layout.batch_categories)] if layout.batch_key else []
    return items + [(k, layout.categorical_categories[k]) for k in layout.categorical_keys]


# ----------------------------------------------------------------------------- cells


def cell_positions(adata: ad.AnnData, cells, name: str) -> np.ndarray:
    """Integer positions of the cells named by an obs name, a list of names, positions (or a slice of them), a
    boolean mask, or a text that is no obs name: a condition on ``adata.obs`` (as scvi-tools reads its ``idx1``),
    e.g. ``"cell_type == 'B cells'"``."""
    if isinstance(cells, str) and cells not in adata.obs_names:
        return _cells_meeting(adata, cells, name)
    if isinstance(cells, str):
        cells = [cells]
    if isinstance(cells, slice):
        cells = np.arange(adata.n_obs)[cells]
    if isinstance(cells, (ad.AnnData, pd.DataFrame)):  # e.g. adata[mask] or adata.obs[mask]: its names are the cells
        kind, names = ("an AnnData", "obs_names") if isinstance(cells, ad.AnnData) else ("a DataFrame", "index")
        raise TypeError(
            f"{name} takes cells (obs names, positions or a boolean mask), got {kind}; pass its cells' names, {name}.{names}"
        )
    if isinstance(cells, (set, frozenset, dict)):
        kind = type(cells).__name__
        raise TypeError(f"{name} takes a list or array of cells (obs names, positions or a boolean mask), got a {kind}")
    if isinstance(cells, (pd.Series, pd.Index, pd.api.extensions.ExtensionArray)) and pd.isna(cells).any():
        raise ValueError(f"{name} has missing values (NA); fill them, e.g. {name}.fillna(False) for a mask")
    # (True/False of object dtype, as an object column's comparison gives, are a mask too, not cell names)
    holds_booleans = isinstance(cells, pd.Series) and pd.api.types.infer_dtype(cells, skipna=False) == "boolean"
    is_mask = isinstance(cells, pd.Series) and (pd.api.types.is_bool_dtype(cells.dtype) or holds_booleans)
    if is_mask and not isinstance(cells.index, pd.RangeIndex) and not cells.index.equals(adata.obs_names):
        # e.g. a mask of another AnnData of the same cells in another order: by position it would pick other cells
        raise ValueError(
            f"{name} is a boolean Series whose index is not adata.obs_names (in their order): it would select cells "
            f"by position; pass a mask of this AnnData (adata.obs[...] == ...) or {name}.reindex(adata.obs_names)"
        )
    values = np.asarray(cells)
    if values.size == 0:  # np.asarray([]) is float
        raise ValueError(f"{name} selects no cells")
    if values.dtype == object and pd.api.types.infer_dtype(values.ravel(), skipna=False) == "boolean":
        values = values.astype(bool)
    if values.dtype.kind == "f":
        raise TypeError(f"{name} holds floats; give cell positions as integers, e.g. np.asarray({name}, dtype=int)")
    if values.dtype == bool:
        if values.shape != (adata.n_obs,):
            raise ValueError(f"{name} as a boolean mask must have length adata.n_obs ({adata.n_obs}), got {values.shape}")
        positions = np.flatnonzero(values)
    elif np.issubdtype(values.dtype, np.integer):
        positions = values.ravel()
        if adata.n_obs > 2 and positions.shape == (adata.n_obs,) and np.isin(positions, (0, 1)).all():
            raise ValueError(
                f"{name} holds a 0 or 1 for every cell: as positions it would pick cells 0 and 1 only; for a mask pass "
                f"booleans, e.g. np.asarray({name}, dtype=bool)"
            )
        if pd.api.types.is_integer_dtype(adata.obs_names.dtype):  # names and positions alike: said which is read
            warn_user(
                f"adata.obs_names are integers, and the integers of {name} are read as positions (as scvi-tools reads "
                f"them), not as names; to pick cells by name pass a boolean mask, adata.obs_names.isin(...)",
                UserWarning,
            )
        if positions.size and (positions.min() < -adata.n_obs or positions.max() >= adata.n_obs):
            raise ValueError(
                f"{name} has positions outside 0..{adata.n_obs - 1} (or -{adata.n_obs}..-1, counted from the end as in NumPy)"
            )
        positions = positions % adata.n_obs
    else:
        if not adata.obs_names.is_unique:
            raise ValueError(
                f"{name} names cells, but adata.obs_names are not unique; call adata.obs_names_make_unique() "
                "or select the cells by position or boolean mask"
            )
        indexer = adata.obs_names.get_indexer(values.astype(str).ravel())
        if (indexer < 0).any():
            missing = values.astype(str).ravel()[indexer < 0][:5].tolist()
            raise KeyError(f"{name} names cells not in adata.obs_names, e.g. {missing}")
        positions = indexer
    if positions.size == 0:
        raise ValueError(f"{name} selects no cells")
    return positions


def _cells_meeting(adata: ad.AnnData, condition: str, name: str) -> np.ndarray:
    """Positions of the cells for which ``condition`` on ``adata.obs`` holds (pandas' ``DataFrame.eval``)."""
    try:
        mask = adata.obs.eval(condition)
    except Exception as error:
        raise KeyError(
            f"{name}={condition!r} is neither an obs name nor a condition on adata.obs that pandas can evaluate "
            f"({type(error).__name__}: {error}); e.g. {name}=\"cell_type == 'B cells'\""
        ) from None
    if not isinstance(mask, pd.Series) or not pd.api.types.is_bool_dtype(mask.dtype):  # nullable "boolean" too
        raise ValueError(f"{name}={condition!r} as a condition on adata.obs must give True/False per cell")
    if mask.isna().any():
        raise ValueError(
            f"{name}={condition!r} is undecided (NA) for {int(mask.isna().sum())} cells: the columns it reads have "
            "missing values; fill them or add a condition on them"
        )
    if not mask.any():  # e.g. donor == 101 where the donors are text ("101")
        raise ValueError(
            f"{name}={condition!r} holds for no cell of adata.obs; check the values it compares with and their type (a "
            "column of text compares with text in quotes, \"donor == '101'\"; adata.obs[column].unique() lists them)"
        )
    return cell_positions(adata, mask.to_numpy(dtype=bool), name)


# ----------------------------------------------------------------------------- genes


def gene_positions(var_names: pd.Index, gene_names, name: str = "adata") -> np.ndarray:
    """The column of each of ``gene_names`` in ``var_names`` (those of the AnnData called ``name`` in
    messages), -1 where it is missing. A name repeated in ``var_names`` is refused only when it is one of
    ``gene_names`` (which column would be the gene?)."""
    repeated = var_names.duplicated(keep=False)
    ambiguous = pd.Index(gene_names).intersection(var_names[repeated])
    if len(ambiguous):
        raise ValueError(
            f"{name}.var_names repeat genes of the model (e.g. {ambiguous[:5].tolist()}); call "
            f"{name}.var_names_make_unique() or keep one column per gene"
        )
    columns = pd.Series(np.arange(len(var_names)), index=var_names)[~repeated]
    return columns.reindex(gene_names).fillna(-1).to_numpy(dtype=np.int64)


def select_genes(block, columns: np.ndarray):
    """The columns ``columns`` of a block of rows, in that order; a column of -1 (a model gene the data
    lacks) reads as zero counts."""
    present = columns >= 0
    if present.all():
        return block[:, columns]
    if sp.issparse(block):  # a 0/1 selection matrix reorders the columns and leaves the missing ones empty
        block = _summable(sp.csr_matrix(block))  # the product sums repeated entries: in float32, not a narrow type
        ones = np.ones(int(present.sum()), dtype=block.dtype)
        selection = sp.csr_matrix((ones, (columns[present], np.flatnonzero(present))), shape=(block.shape[1], len(columns)))
        return block @ selection
    block = np.asarray(block)
    selected = np.zeros((block.shape[0], len(columns)), dtype=block.dtype)
    selected[:, present] = block[:, columns[present]]
    return selected


# ----------------------------------------------------------------------------- minibatches


@dataclass
class Minibatch:
    counts: torch.Tensor  # cells × genes, float32, dense
    covariates: torch.Tensor  # cells × covariate width
    library: torch.Tensor  # cells × 1 total counts
    batch_index: torch.Tensor  # cells, int64 batch code
    cell_index: np.ndarray  # positions of these cells in the AnnData
    # The non-zero counts, read off the sparse matrix on the CPU; let the likelihood skip its
    # lgamma terms at zeros without scanning the dense batch. None on accelerators.
    sparse: SparseCounts | None = None


class CellLoader:
    """Minibatches of densified count rows.

    In-memory matrices are gathered in a fully random order; backed (on-disk) matrices are
    read in contiguous blocks whose order is shuffled, then shuffled again inside a buffer of
    blocks, so a pass reads each row exactly once with large sequential reads and the memory
    held is up to three buffers (the one cut into minibatches, one read ahead and waiting, one that the background
    thread has read and waits to hand over), whatever the size of the file. A backed CSC matrix is read a band of
    columns at a time (a pass over the file per buffer of 2**25 stored values; CSR streams faster). On a
    GPU, an in-memory matrix that fits is copied to the device once and minibatches are gathered there.
    """

    def __init__(
        self,
        matrix,
        covariates: Covariates | np.ndarray,
        library: np.ndarray,
        batch_index: np.ndarray,
        gene_columns: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ):
        # A view of a backed AnnData: cell i is the file's row file_rows[i]; its genes pick the file's columns.
        self.file_rows: np.ndarray | None = None
        if isinstance(matrix, BackedView):
            if gene_columns is None:
                gene_columns = matrix.columns
            else:  # a model gene the view lacks (-1) stays -1
                gene_columns = np.where(gene_columns >= 0, matrix.columns[np.maximum(gene_columns, 0)], -1)
            matrix, self.file_rows = matrix.matrix, matrix.rows
        self.backed = is_backed_matrix(matrix)
        # Backed CSC cannot be re-written cheaply; it is read as stored, a band of columns at a time.
        self.matrix = matrix if self.backed else as_row_readable(matrix)
        if not self.backed and sp.issparse(matrix) and matrix.format != "csr" and matrix.nnz > CONVERTED_WARNING_VALUES:
            warn_user(
                f"the counts are a {matrix.format.upper()} matrix in memory: each call (training, get_latent, ...) "
                f"first copies them into a CSR one ({matrix.nnz * (matrix.data.itemsize + 4) / 1e9:.1f} GB more, and "
                "the time of the copy); convert them once, e.g. adata.X = adata.X.tocsr() (for counts in a layer, "
                "convert that layer)",
                UserWarning,
            )
        if self.backed and _is_csc(matrix) and _n_stored(matrix) > 4 * BACKED_CSC_BUFFER_VALUES:
            warn_user(
                f"the backed count matrix ({matrix.shape[0]:,} cells) is stored column-major (CSC): every "
                f"buffer of cells reads the whole file, about {_n_stored(matrix) / BACKED_CSC_BUFFER_VALUES:.0f} "
                "times per epoch. Store it as CSR for fast streaming (this reads it into memory once), e.g. "
                "adata = adata.to_memory(); adata.X = scipy.sparse.csr_matrix(adata.X); adata.write_h5ad(path) "
                "(for counts in a layer, convert that layer)",
                UserWarning,
            )
        self.covariates = covariates
        self.library = library.astype(np.float32)
        self.batch_index = batch_index
        self.gene_columns = gene_columns
        self.device = torch.device(device)
        self._on_device = None
        self._csr_indptr: np.ndarray | None = None  # a backed CSR matrix's row pointers, read once when needed
        self._csc_columns: tuple[np.ndarray, bool] | None = None  # a backed CSC matrix's pointers; rows sorted?
        if self.backed and 4 * self.n_genes * _row_chunk(matrix) > CHUNKED_BUFFER_BYTES:
            warn_user(
                f"the backed count matrix is stored in chunks of {_row_chunk(matrix):,} rows, more than a read "
                "buffer holds: every buffer decompresses whole chunks for a few of their rows, which is slow. "
                "Store it in chunks of whole rows, e.g. adata.write_zarr(path, chunks=(256, adata.n_vars))",
                UserWarning,
            )

    @property
    def n_genes(self) -> int:
        return self.matrix.shape[1] if self.gene_columns is None else len(self.gene_columns)

    def batches(
        self,
        cells: np.ndarray,
        batch_size: int,
        shuffle: bool = False,
        rng: np.random.Generator | None = None,
        with_sparse: bool = False,
    ) -> Iterator[Minibatch]:
        """Yield minibatches covering ``cells`` exactly once, in random order when ``shuffle``.

        The order is drawn from ``rng`` before the first minibatch, so it depends only on the
        generator's state; a backed file's next buffer is read in a thread while this one is used.
        ``with_sparse`` attaches the non-zero counts (``Minibatch.sparse``, CPU only) that the
        likelihood's fast path uses; encoding alone does not need them.
        """
        cells = np.asarray(cells, dtype=np.int64)
        check_positive_int(batch_size, "batch_size")
        if shuffle and rng is None:
            raise ValueError("shuffle=True needs rng=np.random.default_rng(seed)")
        if isinstance(self._on_device, tuple):  # counts a training made resident on the GPU (see resident)
            return self._device_batches(cells, batch_size, shuffle, rng)
        chunk_rows, block_rows, read_ahead = self._read_plan(batch_size)
        chunks = list(self._chunks(cells, chunk_rows, block_rows, shuffle, rng))
        return self._read_batches(chunks, batch_size, with_sparse, read_ahead)

    def _buffer_cells(self, batch_size: int) -> int:
        """Cells whose dense float32 counts fill ``CHUNK_BYTES``, in whole minibatches (at least one)."""
        return max(batch_size, CHUNK_BYTES // (4 * max(self.n_genes, 1)) // batch_size * batch_size)

    def _read_plan(self, batch_size: int) -> tuple[int, int, bool]:
        """How an epoch reads the counts: cells per buffer (a whole number of minibatches), rows per block
        (the unit that a backed file's shuffle keeps together) and whether a thread reads the next buffer ahead."""
        chunk_rows = self._buffer_cells(batch_size)
        if not self.backed:  # gathered a minibatch at a time: no copy of many rows, and as fast
            chunk_rows = batch_size
        if self.backed and _is_csc(self.matrix):  # each buffer is a pass over the whole file: fewer, larger ones
            csc_rows = BACKED_CSC_BUFFER_VALUES * self.matrix.shape[0] // max(_n_stored(self.matrix), 1)
            chunk_rows = max(chunk_rows, csc_rows // batch_size * batch_size)
        block_rows = BACKED_BLOCK_ROWS
        row_chunk = self._rows_per_storage_chunk() if self.backed else 1
        if row_chunk > BACKED_BLOCK_ROWS:
            # Storage chunked by more rows than a block (anndata's Zarr defaults: thousands of rows for
            # dense X, a thousand or so for CSR at 2,000 genes): one block per storage chunk, so each chunk
            # is decompressed about once per epoch, not once per block, and up to CHUNKS_PER_BUFFER chunks per buffer.
            n_chunks = min(CHUNKS_PER_BUFFER, CHUNKED_BUFFER_BYTES // (4 * self.n_genes * row_chunk))
            if n_chunks >= 1:
                block_rows = row_chunk
                chunk_rows = max(chunk_rows, -(-n_chunks * row_chunk // batch_size) * batch_size)
        # Backed: a thread reads the next buffer while this one is cut into minibatches (the reads
        # themselves run outside the GIL; minibatches are cut here, as numpy's many small operations in
        # a thread would hold the GIL against the training loop). Buffers above CHUNK_BYTES (CSC, dense
        # stores in large chunks) are read when needed, so that only one of them is held.
        read_ahead = self.backed and chunk_rows * 4 * max(self.n_genes, 1) <= CHUNK_BYTES
        return chunk_rows, block_rows, read_ahead

    def evaluation_batch_size(self, batch_size: int) -> int:
        """``batch_size``, or fewer cells where genes are many: passes that only evaluate the model
        densify at most ``EVALUATION_VALUES`` counts per minibatch, which bounds their memory."""
        check_positive_int(batch_size, "batch_size")
        return int(max(1, min(batch_size, EVALUATION_VALUES // max(self.n_genes, 1))))

    def _read_batches(
        self, chunks: list[np.ndarray], batch_size: int, with_sparse: bool, read_ahead: bool
    ) -> Iterator[Minibatch]:
        """Minibatches of exactly ``batch_size`` cells but the last: the cells left at the end of one chunk
        open the next one. So an epoch has ``ceil(cells / batch_size)`` steps however the chunks fall
        (data-parallel ranks must all take the same number). With ``read_ahead`` a thread reads the
        next chunk while this one is cut."""
        blocks = self._read_buffers(chunks, read_ahead)
        with contextlib.closing(blocks):  # the reading thread stops when this generator is closed, not when it is collected
            left_block, left_cells = None, None
            for chunk, block in blocks:
                start = 0
                if left_cells is not None:  # filled up from the head of this chunk (not joined to all of it: one buffer held)
                    start = min(batch_size - len(left_cells), len(chunk))
                    parts = [left_block, block[:start].take()]
                    joined = sp.vstack(parts, format="csr") if sp.issparse(parts[1]) else np.concatenate(parts)
                    cells = np.concatenate([left_cells, chunk[:start]])
                    left_block, left_cells = None, None
                    if len(cells) < batch_size:  # this chunk was too short to fill it: carry on
                        left_block, left_cells = joined, cells
                        continue
                    yield self._minibatch(joined, cells, with_sparse)
                whole = start + (len(chunk) - start) // batch_size * batch_size
                for first in range(start, whole, batch_size):
                    rows = slice(first, first + batch_size)
                    yield self._minibatch(block[rows].take(), chunk[rows], with_sparse)
                if whole < len(chunk):  # copied out now: the next chunk's buffer replaces this one
                    left_block, left_cells = block[whole:].take(), chunk[whole:]
                del block  # before the next buffer is read, where nothing reads ahead
            if left_cells is not None:
                yield self._minibatch(left_block, left_cells, with_sparse)

    def _read_buffers(self, chunks, read_ahead: bool) -> Iterator[tuple[np.ndarray, _Rows]]:
        """Each chunk of cells with its rows read, the next chunk read by a thread meanwhile where ``read_ahead``;
        close the iterator to stop that thread."""
        blocks = ((chunk, self._read_rows(chunk)) for chunk in chunks)
        return _prefetch(blocks, depth=1) if read_ahead else blocks

    def _chunks(self, cells, chunk_rows, block_rows, shuffle, rng) -> Iterator[np.ndarray]:
        if not shuffle:
            yield from (cells[s : s + chunk_rows] for s in range(0, len(cells), chunk_rows))
            return
        if not self.backed:
            order = cells[rng.permutation(len(cells))]
            yield from (order[s : s + chunk_rows] for s in range(0, len(order), chunk_rows))
            return
        sorted_cells = cells[np.argsort(self._file_rows(cells), kind="stable")]  # in file order
        if block_rows > BACKED_BLOCK_ROWS:  # a block is the cells of one storage chunk
            chunk_of_cell = self._storage_chunk(self._file_rows(sorted_cells), block_rows)
            blocks = np.split(sorted_cells, np.flatnonzero(np.diff(chunk_of_cell)) + 1)
        else:
            blocks = [sorted_cells[s : s + block_rows] for s in range(0, len(sorted_cells), block_rows)]
        block_order = rng.permutation(len(blocks))
        blocks_per_chunk = max(1, chunk_rows // block_rows)
        for s in range(0, len(blocks), blocks_per_chunk):
            chunk = np.concatenate([blocks[b] for b in block_order[s : s + blocks_per_chunk]])
            yield chunk[rng.permutation(len(chunk))]

    def _rows_per_storage_chunk(self) -> int:
        """Rows per storage chunk of the backed matrix (CSR: on average, as its values are chunked); 1 if unchunked."""
        value_chunk = _csr_value_chunk(self.matrix)
        if value_chunk is None:
            return _row_chunk(self.matrix)
        return max(1, round(value_chunk * self.matrix.shape[0] / max(_n_stored(self.matrix), 1)))

    def _storage_chunk(self, rows: np.ndarray, row_chunk: int) -> np.ndarray:
        """The storage chunk of each of the file's ``rows`` (of a CSR row: the chunk where its values begin)."""
        value_chunk = _csr_value_chunk(self.matrix)
        return rows // row_chunk if value_chunk is None else self._backed_csr_indptr()[rows] // value_chunk

    def _backed_csr_indptr(self) -> np.ndarray:
        """A backed CSR matrix's row pointers, read once: 8 bytes a cell, and a read fewer per run of rows."""
        if self._csr_indptr is None:
            self._csr_indptr = np.asarray(self.matrix.group["indptr"][:], dtype=np.int64)
        return self._csr_indptr

    def _file_rows(self, cells: np.ndarray) -> np.ndarray:
        """The rows of the matrix (of the file, for a view) that hold ``cells``."""
        return cells if self.file_rows is None else self.file_rows[cells]

    def _read_rows(self, rows: np.ndarray) -> _Rows:
        """The given rows, in the given order, read from disk where backed; copied out a minibatch at a time."""
        if not self.backed:
            return _Rows(self.matrix, rows, self.gene_columns)
        rows = self._file_rows(rows)
        with _reading_from_disk(rows, "the counts"):
            if _is_csc(self.matrix):
                if self._csc_columns is None:  # a pass over the row indices, once
                    self._csc_columns = _csc_layout(self.matrix)
                return _Rows(*_read_csc_rows(self.matrix, rows, *self._csc_columns), self.gene_columns)
            if getattr(self.matrix, "format", None) == "csr" and hasattr(self.matrix, "group"):
                return _Rows(*_read_csr_rows(self.matrix, rows, self._backed_csr_indptr()), self.gene_columns)
            # h5py needs increasing indices: read sorted; minibatches take the rows in the requested order
            unique, positions = np.unique(rows, return_inverse=True)
            return _Rows(np.asarray(_read_sorted_rows(self.matrix, unique)), positions, self.gene_columns)

    def _minibatch(self, block, cells: np.ndarray, with_sparse: bool) -> Minibatch:
        to = self.device
        sparse = None
        if sp.issparse(block):
            block = _summable(block)
            dense = block.toarray()  # sums any repeated entries of a cell and gene
            if with_sparse and to.type == "cpu":
                # Only repeated entries need scipy's canonical form (sorting every minibatch of a matrix
                # whose column indices are unsorted cost ~20% of an epoch): where the indices are unsorted,
                # fewer non-zero counts in the dense block than non-zero stored values means some were
                # repeated (counts are >= 0). Counted on boolean masks, ~3x faster than on the floats.
                if not block.has_canonical_format and np.count_nonzero(dense != 0) != np.count_nonzero(block.data != 0):
                    block.sum_duplicates()
                sparse = SparseCounts.from_csr(block.indptr, block.indices, block.data, block.shape[1])
        else:
            dense = block
            if with_sparse and to.type == "cpu":
                sparse = SparseCounts.from_dense(np.asarray(block))
        counts = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
        non_blocking = to.type == "cuda"
        return Minibatch(
            counts=counts.to(to, non_blocking=non_blocking),
            covariates=torch.from_numpy(self.covariates[cells]).to(to, non_blocking=non_blocking),
            library=torch.from_numpy(self.library[cells, None]).to(to, non_blocking=non_blocking),
            batch_index=torch.from_numpy(self.batch_index[cells]).to(to, non_blocking=non_blocking),
            cell_index=cells,
            sparse=sparse,
        )

    # -------------------------------------------------------------- GPU: data resident on the device

    def resident(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every cell's dense counts, covariates, library size and batch code on the GPU, where they fit; else None.

        Training asks for them (it reads every cell each epoch); ``batches`` then gathers its minibatches from them.
        Other calls read each cell once and stream only the cells they ask for, leaving the GPU's memory free.
        """
        if self.device.type == "cuda" and self._fits_on_device():
            return self._on_device
        return None

    def release_device(self) -> None:
        """Let go of the counts held on the GPU (they are copied again where needed)."""
        self._on_device = None

    def shuffled_rows(self, cells: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[torch.Tensor]:
        """Positions of ``cells`` on the loader's device, ``batch_size`` at a time, in the order that
        ``batches(cells, batch_size, shuffle=True, rng=rng)`` gives on a GPU (one draw from ``rng``)."""
        return list(self._device_order(np.asarray(cells, dtype=np.int64), True, rng)[1].split(batch_size))

    def _fits_on_device(self) -> bool:
        """Whether the in-memory counts, densified, and the one-hot covariates take at most a quarter of the free GPU memory."""
        if self.backed:
            return False
        if self._on_device is None:
            with torch.inference_mode(False):  # normal tensors, also when first asked for inside the caller's inference_mode
                self._on_device = self._resident_tensors(max_bytes=_device_memory_left(self.device) // 4) or False
        return self._on_device is not False

    def _resident_tensors(
        self, max_bytes: int | None = None, dtype: torch.dtype = torch.int16
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Every cell's dense counts, covariates, library size and batch code, on the loader's device
        (None where the dense counts and one-hot covariates would take more than ``max_bytes``).

        The counts are stored as int16 where every one is a whole number up to 32,767 (the same values
        in half the memory of float32, so twice the cells fit on a GPU), else as float32; minibatches
        are cast to float32 after the gather. They are densified and copied ``CHUNK_BYTES`` at a time,
        so the host never holds the dense matrix (1M cells × 2,000 genes would be 8 GB of float32).
        """
        n_cells, width = self.matrix.shape[0], self.covariates.shape[1]
        if max_bytes is not None and n_cells * (self.n_genes * dtype.itemsize + 4 * width) > max_bytes:
            return None
        counts = torch.empty((n_cells, self.n_genes), dtype=dtype, device=self.device)
        chunk_rows = max(1, CHUNK_BYTES // (4 * max(self.n_genes, 1)))
        for start in range(0, n_cells, chunk_rows):
            rows = self._read_rows(np.arange(start, min(start + chunk_rows, n_cells))).take()
            dense = _summable(rows).toarray() if sp.issparse(rows) else np.asarray(rows, dtype=np.float32)
            if dtype == torch.int16 and not _fits_int16(dense):
                del counts  # (rare: huge counts, or NaN in a test) start again in float32
                return self._resident_tensors(max_bytes, torch.float32)
            counts[start : start + dense.shape[0]] = torch.from_numpy(np.ascontiguousarray(dense)).to(dtype)
        # one-hot covariates (as wide as the batches and categories), likewise a chunk at a time
        covariates = torch.empty((n_cells, width), dtype=torch.float32, device=self.device)
        chunk_rows = max(1, CHUNK_BYTES // (4 * max(width, 1)))
        for start in range(0, n_cells, chunk_rows):
            covariates[start : start + chunk_rows] = torch.from_numpy(self.covariates[start : start + chunk_rows])
        return (
            counts,
            covariates,
            torch.from_numpy(self.library[:, None]).to(self.device),
            torch.from_numpy(self.batch_index).to(self.device),
        )

    def _device_batches(self, cells, batch_size, shuffle, rng) -> Iterator[Minibatch]:
        counts, covariates, library, batch_index = self._on_device
        order, index = self._device_order(cells, shuffle, rng)
        for start in range(0, len(order), batch_size):
            rows = index[start : start + batch_size]
            cells_here = order[start : start + batch_size]
            yield Minibatch(counts[rows].float(), covariates[rows], library[rows], batch_index[rows], cells_here)

    def _device_order(self, cells: np.ndarray, shuffle: bool, rng) -> tuple[np.ndarray, torch.Tensor]:
        """The cells in the order of an epoch (one draw from ``rng`` when ``shuffle``), also on the device."""
        order = cells[rng.permutation(len(cells))] if shuffle else cells
        return order, torch.from_numpy(order).to(self.device)

    def device_buffer(self, batch_size: int, n_cells: int) -> DeviceBuffer | None:
        """On a GPU that does not hold every cell's counts (a backed file, or more cells than fit), device
        tensors that each epoch of ``n_cells`` cells refills a buffer at a time (:class:`DeviceBuffer`); else None."""
        if self.device.type != "cuda" or self._fits_on_device():
            return None
        if DeviceBuffer.bytes_for(self, batch_size, n_cells) > _device_memory_left(self.device) // 4:
            return None  # (a very wide matrix, or a nearly full GPU) minibatch by minibatch
        return DeviceBuffer(self, batch_size, n_cells)


def _device_memory_left(device: torch.device) -> int:
    """Bytes this process may still allocate on a CUDA device: free memory and torch's cache of it, within the
    share that ``torch.cuda.set_per_process_memory_fraction`` allows it (less what torch's tensors hold)."""
    index = torch.cuda.current_device() if device.index is None else device.index  # ("cuda" of device="auto": no index)
    free, total = torch.cuda.mem_get_info(index)
    # torch's cache (reserved, not allocated: e.g. an earlier fit's freed tensors) is free to this process too
    cached = torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index)
    share = getattr(torch.cuda, "get_per_process_memory_fraction", None)  # (recent torch; else the whole device)
    allowed = int((1.0 if share is None else share(index)) * total) - torch.cuda.memory_allocated(index)
    return max(0, min(free + cached, allowed))


class DeviceBuffer:
    """Fixed device tensors that hold a buffer of cells at a time, for counts that do not all fit on the GPU.

    Training steps replayed from CUDA graphs read fixed tensors (``tensors``, laid out as
    :meth:`CellLoader.resident` gives them), so :meth:`epoch` refills these in place. The cells come in the
    order of :meth:`CellLoader.batches`: a backed file in its shuffled blocks and read buffers (the next one
    read ahead by a thread), in-memory counts in a random order, gathered a device buffer at a time. Their rows
    go to the device as compressed rows, are densified there and fill the device buffer, which then yields its
    minibatches as positions in it. It holds a whole number of minibatches, so every minibatch is full but the
    epoch's last. ``cells`` names the cell at each position.
    """

    def __init__(self, loader: CellLoader, batch_size: int, n_cells: int):
        self.loader, self.batch_size = loader, batch_size
        self.rows = self.rows_for(loader, batch_size, n_cells)
        device = loader.device
        self.counts = torch.zeros((self.rows, loader.n_genes), dtype=torch.float32, device=device)
        self.covariates = torch.zeros((self.rows, loader.covariates.shape[1]), dtype=torch.float32, device=device)
        self.library = torch.zeros((self.rows, 1), dtype=torch.float32, device=device)
        self.batch_index = torch.from_numpy(np.zeros(self.rows, dtype=loader.batch_index.dtype)).to(device)
        self.positions = torch.arange(self.rows, device=device)
        self.cells = np.full(self.rows, -1, dtype=np.int64)

    @staticmethod
    def rows_for(loader: CellLoader, batch_size: int, n_cells: int) -> int:
        """Cells per buffer: ``CHUNK_BYTES`` of dense float32 counts in whole minibatches, at most the epoch's cells."""
        return min(loader._buffer_cells(batch_size), -(-max(n_cells, 1) // batch_size) * batch_size)

    @staticmethod
    def bytes_for(loader: CellLoader, batch_size: int, n_cells: int) -> int:
        """Device memory a buffer takes at most: its tensors, and a refill's compressed rows where every count is
        stored (4-byte values, their 8-byte rows and 4- and 8-byte columns: 24 bytes each)."""
        rows = DeviceBuffer.rows_for(loader, batch_size, n_cells)
        return rows * (loader.n_genes * (4 + 24) + loader.covariates.shape[1] * 4 + 4 + 8 + 8)

    @property
    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Counts, covariates, library sizes and batch codes of the buffered cells."""
        return self.counts, self.covariates, self.library, self.batch_index

    def epoch(self, cells: np.ndarray, rng: np.random.Generator) -> Iterator[torch.Tensor]:
        """The positions in the buffer of each shuffled minibatch of ``cells``, each buffer filled before its minibatches."""
        cells = np.asarray(cells, dtype=np.int64)
        chunk_rows, block_rows, read_ahead = self.loader._read_plan(self.batch_size)
        if not self.loader.backed:  # in-memory counts: gathered a device buffer at a time (one refill, not one a minibatch)
            chunk_rows = self.rows
        blocks = self.loader._read_buffers(self.loader._chunks(cells, chunk_rows, block_rows, True, rng), read_ahead)
        filled = 0
        with contextlib.closing(blocks):  # the reading thread stops however the epoch ends
            for chunk, read in blocks:
                block = read.take()  # while the device trains on the minibatches already yielded
                del read  # (the read buffer) before the next one is read, where nothing reads ahead
                start = 0
                while start < len(chunk):  # the read buffer's cells fill the device buffer, in pieces where it is full
                    n = min(self.rows - filled, len(chunk) - start)
                    piece = block if n == len(chunk) else block[start : start + n]  # (a whole read buffer: no copy)
                    self._fill(filled, chunk[start : start + n], piece)
                    filled, start = filled + n, start + n
                    if filled == self.rows:
                        yield from self.positions[: self.rows].split(self.batch_size)
                        filled = 0
                del block
            if filled:
                yield from self.positions[:filled].split(self.batch_size)

    def _fill(self, offset: int, cells: np.ndarray, block) -> None:
        """Put the counts ``block`` of ``cells`` (CSR or dense, the model's genes) and their covariates,
        library sizes and batch codes at the buffer's positions from ``offset``. The copies run on the
        device's stream after the steps queued before them, which so still read the previous buffer."""
        n, device = len(cells), self.counts.device
        counts = self.counts[offset : offset + n]
        if sp.issparse(block):
            block = _summable(block)
            if not block.has_canonical_format:  # a cell's gene stored twice: its sum, as scipy's toarray gives
                block.sum_duplicates()
            lengths = torch.from_numpy(np.diff(block.indptr).astype(np.int64)).to(device)
            row_of_value = torch.repeat_interleave(self.positions[:n], lengths, output_size=block.nnz)
            columns = torch.from_numpy(block.indices).to(device).long()
            counts.zero_()
            counts.index_put_((row_of_value, columns), torch.from_numpy(block.data).to(device))
        else:
            counts.copy_(torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)))
        self.covariates[offset : offset + n].copy_(torch.from_numpy(np.asarray(self.loader.covariates[cells], dtype=np.float32)))
        self.library[offset : offset + n, 0].copy_(torch.from_numpy(self.loader.library[cells]))
        self.batch_index[offset : offset + n].copy_(torch.from_numpy(self.loader.batch_index[cells]))
        self.cells[offset : offset + n] = cells


def _summable(block: sp.csr_matrix) -> sp.csr_matrix:
    """A sparse block of counts in float32, where repeated entries of one cell and gene (scipy's meaning:
    their sum) are summed by ``toarray`` or ``sum_duplicates``; in a narrow stored type (int16, uint8) the
    sum could overflow."""
    return block if block.dtype == np.float32 else block.astype(np.float32, copy=False)


def _fits_int16(counts: np.ndarray) -> bool:
    """Whether every count is a whole number in 0..32,767 (int16 holds it exactly)."""
    return bool(np.all((counts >= 0) & (counts <= np.iinfo(np.int16).max) & (counts == np.round(counts))))


def _gather_csr_rows(matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows of a CSR matrix, copying only those rows: scipy's row indexing where ``indptr`` and
    ``indices`` have the same integer type (3x faster than the gather below), which it otherwise
    unifies by copying all the column indices."""
    if matrix.indptr.dtype == matrix.indices.dtype:
        return matrix[rows]
    starts, ends = matrix.indptr[rows], matrix.indptr[rows + 1]
    lengths = (ends - starts).astype(np.int64)
    indptr = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    take = np.repeat(starts.astype(np.int64) - indptr[:-1], lengths) + np.arange(indptr[-1])
    return sp.csr_matrix((matrix.data[take], matrix.indices[take], indptr), shape=(len(rows), matrix.shape[1]))


def _read_csr_rows(matrix, rows: np.ndarray, indptr: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """A CSR block read from a backed CSR matrix (anndata's backed sparse dataset) and the position
    in it of each of ``rows``: ``block[positions]`` are the rows asked for, in their order.

    Runs of nearby rows are read whole, straight from the store's ``indices`` and ``data`` arrays at
    the places ``indptr`` (the matrix's row pointers, in memory) gives (slicing through anndata costs
    milliseconds per slice), and not copied into the requested order: minibatches take their rows.
    Rows scattered too widely for runs are read by anndata's fancy index.
    """
    unique = np.unique(rows)
    if len(unique) == 0:
        return sp.csr_matrix((0, matrix.shape[1]), dtype=matrix.dtype), np.zeros(0, dtype=np.int64)
    runs = _runs(unique)
    if runs is None:
        return sp.csr_matrix(matrix[unique]), np.searchsorted(unique, rows)
    first, last = unique[runs[0]], unique[runs[1] - 1] + 1  # each run reads the rows first..last-1
    row_runs = list(zip(first.tolist(), last.tolist()))
    bounds = [(int(indptr[lo]), int(indptr[hi])) for lo, hi in row_runs]  # where each run's values lie
    data = _read_slices(matrix.group["data"], bounds)
    indices = _read_slices(matrix.group["indices"], bounds)
    run_lengths = np.concatenate([np.diff(indptr[lo : hi + 1]) for lo, hi in row_runs])
    stacked_indptr = np.zeros(len(run_lengths) + 1, dtype=np.int64)
    np.cumsum(run_lengths, out=stacked_indptr[1:])
    stacked = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), stacked_indptr), shape=(len(run_lengths), matrix.shape[1])
    )
    run_offsets = np.concatenate([[0], np.cumsum(last - first)[:-1]])  # each run's first row in ``stacked``
    run = np.searchsorted(first, rows, side="right") - 1
    return stacked, run_offsets[run] + rows - first[run]


def _read_slices(array, bounds: list[tuple[int, int]]):
    """``array[lo:hi]`` of a stored array for each ``(lo, hi)`` (rows of a matrix, values of a 1-d array).
    A Zarr array's slices are read by a few threads at once (one read decodes only its own chunks: a
    shuffled buffer is dozens of single-chunk reads); an HDF5 dataset's one after another (h5py reads
    one at a time anyway)."""

    def read(bound: tuple[int, int]):
        part = array[bound[0] : bound[1]]
        return part if sp.issparse(part) else np.asarray(part)

    if isinstance(array, h5py.Dataset) or len(bounds) < 2:
        return [read(bound) for bound in bounds]
    # the threads end with the read; after a failure or Ctrl-C, map cancels the slices not yet begun
    with ThreadPoolExecutor(ZARR_READ_THREADS) as pool:
        return list(pool.map(read, bounds))


class _Rows:
    """Rows ``positions`` of an in-memory matrix ``source`` (the counts, or a block read from disk),
    restricted to ``gene_columns``; sliced without copying, copied out by :meth:`take`."""

    def __init__(self, source, positions: np.ndarray, gene_columns: np.ndarray | None):
        self.source, self.positions, self.gene_columns = source, positions, gene_columns

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, part: slice) -> _Rows:
        return _Rows(self.source, self.positions[part], self.gene_columns)

    def take(self):
        """The rows as a CSR matrix (its column indices in the source's order, which need not be
        sorted), or as a dense array where the source is dense."""
        if sp.issparse(self.source):
            block = _gather_csr_rows(self.source, self.positions)
        else:
            block = np.asarray(self.source[self.positions])
        if self.gene_columns is not None:
            block = select_genes(block, self.gene_columns)
        return sp.csr_matrix(block) if sp.issparse(block) else np.asarray(block)


def _runs(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Increasing ``rows`` split into runs of nearby rows (gaps of up to 16 rows are read through): the
    index in ``rows`` of each run's first row, and of the row after its last. None where the runs would
    read over twice the rows, or be too many reads: one fancy index is faster then."""
    if rows[-1] + 1 - rows[0] <= 2 * len(rows):  # nearly contiguous: one run
        return np.array([0]), np.array([len(rows)])
    starts = np.concatenate([[0], np.flatnonzero(np.diff(rows) > 16) + 1])
    stops = np.append(starts[1:], len(rows))
    if (rows[stops - 1] + 1 - rows[starts]).sum() > 2 * len(rows) or len(starts) > len(rows) // 32:
        return None
    return starts, stops


def _read_sorted_rows(matrix, rows: np.ndarray):
    """Increasing rows of a backed matrix, read as a few slices where that reads at most twice the rows.

    Fancy row indexing of backed stores is slower than slices (on Zarr, anndata builds an index
    per stored value); the shuffled blocks of a training pass are runs of nearby rows, read one
    slice per run. Widely scattered rows are read by one fancy index. (CSC: :func:`_read_csc_rows`.)
    """
    runs = _runs(rows)
    if runs is None:
        return matrix[rows]
    slices = _read_slices(matrix, [(int(rows[a]), int(rows[b - 1]) + 1) for a, b in zip(*runs)])
    parts = [part[rows[a:b] - rows[a]] for part, (a, b) in zip(slices, zip(*runs))]
    if len(parts) == 1:
        return parts[0]
    return sp.vstack(parts, format="csr") if sp.issparse(parts[0]) else np.concatenate(parts)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def _prefetch(items: Iterator, depth: int) -> Iterator:
    """Run the iterator ``items`` in a background thread, at most ``depth`` items ahead."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as error:  # handed to the consumer, which re-raises it
            put(_Failure(error))

    thread = threading.Thread(target=produce, name="cellvae-loader", daemon=True)
    thread.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
