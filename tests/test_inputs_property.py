"""Property-based tests: any AnnData either works or gives a documented ValueError/KeyError/TypeError.

Hypothesis draws shapes, dtypes, storage (dense, CSR/CSC matrices and arrays, backed h5ad),
empty rows and columns, broken values, batch columns of every kind, duplicated names and
views. Valid data must train and embed; invalid data must be refused with a documented error,
before any work, and the AnnData must never change.
"""

import re
import tempfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellvae
from cellvae import CellVAE

DOCUMENTED = (ValueError, KeyError, TypeError)
DTYPES = ["int16", "int32", "int64", "uint16", "float16", "float32", "float64", "bool"]
STORAGES = ["dense", "csr_matrix", "csc_matrix", "csr_array", "csc_array", "backed"]
BATCH_KINDS = ["none", "categorical", "categorical_unused", "str", "int", "bool", "float_nan", "mixed_object", "missing"]
DEFECT_VALUES = {"negative": -3, "fractional": 2.5, "nan": np.nan, "inf": np.inf, "huge": 1e13}
DEFECTS = ["none", *DEFECT_VALUES]
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
TINY_MODEL = {"n_hidden": 4, "n_latent": 2}


@st.composite
def cases(draw):
    n_obs = draw(st.integers(1, 30))
    n_vars = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(DTYPES))
    high = 2 if dtype == "bool" else 60
    counts = np.asarray(draw(st.lists(st.integers(0, high - 1), min_size=n_obs * n_vars, max_size=n_obs * n_vars)))
    counts = counts.reshape(n_obs, n_vars)
    if draw(st.booleans()):
        counts[draw(st.integers(0, n_obs - 1))] = 0  # an empty cell
    if draw(st.booleans()):
        counts[:, draw(st.integers(0, n_vars - 1))] = 0  # a gene never seen
    defect = draw(st.sampled_from(DEFECTS))
    if np.dtype(dtype).kind != "f" and defect in ("fractional", "nan", "inf"):
        defect = "none"
    if dtype.startswith("uint") or dtype == "bool":
        defect = "none" if defect == "negative" else defect
    if defect == "huge" and dtype not in ("int64", "float32", "float64"):  # a count no smaller dtype can hold
        defect = "none"
    storage = draw(st.sampled_from(STORAGES))
    if dtype == "float16" and storage not in ("dense", "backed"):
        storage = "dense"  # scipy.sparse has no float16
    batch = draw(st.sampled_from(BATCH_KINDS))
    if batch == "mixed_object" and storage == "backed":
        batch = "str"  # anndata cannot write a column of mixed types to .h5ad
    return {
        "counts": counts,
        "dtype": dtype,
        "storage": storage,
        "defect": defect,
        "defect_at": (draw(st.integers(0, n_obs - 1)), draw(st.integers(0, n_vars - 1))),
        "batch": batch,
        "duplicate_obs": draw(st.booleans()),
        "duplicate_var": n_vars > 1 and draw(st.integers(0, 4)) == 0,
        "in_layer": draw(st.booleans()),
        "view": n_obs > 2 and draw(st.booleans()),
    }


def batch_column(kind: str, n: int) -> pd.Series | None:
    labels = np.arange(n) % 3
    if kind == "categorical":
        return pd.Series(pd.Categorical([f"b{i}" for i in labels]))
    if kind == "categorical_unused":
        return pd.Series(pd.Categorical([f"b{i}" for i in labels], categories=["b0", "b1", "b2", "never"]))
    if kind == "str":
        return pd.Series([f"b{i}" for i in labels], dtype=object)
    if kind == "int":
        return pd.Series(labels)
    if kind == "bool":
        return pd.Series(labels == 0)
    if kind == "float_nan":
        return pd.Series(np.where(labels == 0, np.nan, labels.astype(float)))
    if kind == "mixed_object":
        return pd.Series([i if i % 2 else f"b{i}" for i in labels], dtype=object)
    return None


def build(case, folder: Path) -> tuple[ad.AnnData, dict]:
    """The AnnData of a case, and the CellVAE arguments that point at its counts and batches."""
    values = case["counts"].astype(np.float64)
    row, column = case["defect_at"]
    values[row, column] = values[row, column] if case["defect"] == "none" else DEFECT_VALUES[case["defect"]]
    matrix = values.astype(case["dtype"])
    storage = case["storage"]
    if storage in ("csr_matrix", "csc_matrix", "csr_array", "csc_array"):
        matrix = getattr(sp, storage)(matrix)
    elif storage == "backed":
        sparse = case["counts"].sum() % 2 and case["dtype"] != "float16"
        matrix = sp.csr_matrix(matrix) if sparse else matrix  # backed sparse and dense
    n_obs, n_vars = values.shape
    obs_names = [f"c{i % 3 if case['duplicate_obs'] else i}" for i in range(n_obs)]
    var_names = [f"g{0 if case['duplicate_var'] and i < 2 else i}" for i in range(n_vars)]
    obs = pd.DataFrame(index=obs_names)
    column = batch_column(case["batch"], n_obs)
    if column is not None:
        obs["batch"] = column.to_numpy() if not isinstance(column.dtype, pd.CategoricalDtype) else column.array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about non-unique names
        if case["in_layer"]:
            adata = ad.AnnData(X=np.zeros(values.shape, np.float32), obs=obs, var=pd.DataFrame(index=var_names))
            adata.layers["counts"] = matrix
        else:
            adata = ad.AnnData(X=matrix, obs=obs, var=pd.DataFrame(index=var_names))
        if storage == "backed":
            adata.write_h5ad(folder / "cells.h5ad")
            adata = ad.read_h5ad(folder / "cells.h5ad", backed="r")
        if case["view"]:
            adata = adata[np.arange(n_obs) != 1]
    arguments = {"layer": "counts" if case["in_layer"] else None, "batch_key": None if case["batch"] == "none" else "batch"}
    return adata, arguments


# What the error must say for each reason to refuse a case (a regular expression).
REFUSALS = {
    "negative": "has negative values",
    "fractional": "has non-integer values",
    "nan": "contains NaN or infinite values",
    "inf": "contains NaN or infinite values",
    "huge": r"above the 1e\+12 cellvae accepts",
    "duplicate genes": "var_names are not unique",
    "missing batch": r"obs\['batch'\] has \d+ missing \(NaN\) values",
    "no batch column": r"obs columns \['batch'\] not found in adata.obs",
    "too few cells": "training needs at least 10 cells with counts",
}


def expected_errors(case) -> list[str]:
    """Every reason why cellvae must refuse this case (keys of ``REFUSALS``; empty if it must work).

    Where several apply, any one of them may be the one reported."""
    defect_left_out = case["view"] and case["defect_at"][0] == 1  # the view drops the cell at row 1
    reasons = [case["defect"]] if case["defect"] != "none" and not defect_left_out else []
    if case["duplicate_var"]:
        reasons.append("duplicate genes")
    if case["batch"] == "float_nan":
        reasons.append("missing batch")
    if case["batch"] == "missing":
        reasons.append("no batch column")
    counts = case["counts"][np.arange(case["counts"].shape[0]) != 1] if case["view"] else case["counts"]
    if (counts.sum(axis=1) > 0).sum() < 10:
        reasons.append("too few cells")
    return reasons


def assert_says_why(error: Exception, reasons: list[str]) -> None:
    """The error names one of the reasons the input must be refused for."""
    message = str(error)
    assert any(re.search(REFUSALS[reason], message) for reason in reasons), f"{reasons} refused with {error!r}"


def frozen(adata: ad.AnnData) -> dict:
    """What a user can see of an AnnData, to compare before and after."""

    def dense(matrix):
        return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)

    matrix = adata.layers["counts"] if "counts" in adata.layers else adata.X
    if not isinstance(matrix, (np.ndarray, sp.spmatrix, sp.sparray)):
        matrix = matrix[:]  # backed: read the stored values
    return {
        "matrix": dense(matrix).copy(),
        "dtype": matrix.dtype,
        "type": type(matrix),
        "obs": adata.obs.copy(),
        "var": adata.var.copy(),
        "obsm": set(adata.obsm.keys()),
        "uns": set(adata.uns.keys()),
        "is_view": adata.is_view,
    }


def assert_same(before: dict, after: dict) -> None:
    np.testing.assert_array_equal(before["matrix"], after["matrix"])
    assert (before["dtype"], before["type"], before["is_view"]) == (after["dtype"], after["type"], after["is_view"])
    pd.testing.assert_frame_equal(before["obs"], after["obs"])
    pd.testing.assert_frame_equal(before["var"], after["var"])
    assert (before["obsm"], before["uns"]) == (after["obsm"], after["uns"])


@FUZZ
@given(case=cases())
def test_any_anndata_trains_or_is_refused_with_a_documented_error(case):
    with tempfile.TemporaryDirectory() as folder:
        adata, arguments = build(case, Path(folder))
        before = frozen(adata)
        reasons = expected_errors(case)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = CellVAE(adata, **arguments, **TINY_MODEL).fit(max_epochs=1, batch_size=8, progress=False)
                latent = model.get_latent()
                expression = model.get_normalized_expression()
        except DOCUMENTED as error:
            assert reasons, f"valid data was refused: {error!r}"
            assert_says_why(error, reasons)
        else:
            assert not reasons, f"data with {reasons} was accepted"
            assert latent.shape == (adata.n_obs, 2) and np.isfinite(latent).all()
            assert expression.shape == (adata.n_obs, adata.n_vars) and np.isfinite(expression).all()
        assert_same(before, frozen(adata))
        if case["storage"] == "backed":
            adata.file.close()


@pytest.fixture(scope="module")
def reference():
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=12, n_batches=3, random_state=4)
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(adata, batch_key="batch", **TINY_MODEL).fit(max_epochs=2, progress=False)
    return model, adata


QUERY_CHANGES = [
    "none",
    "shuffled_genes",
    "extra_genes",
    "missing_gene",
    "unseen_batch",
    "no_batch_column",
    "nan_batch",
    "int_batch",
    "categorical_batch",
    "view",
    "duplicate_obs",
    "duplicate_var",
    "float64",
    "int32_dense",
    "csc",
    "zero_cells",
]


# What the error must say for each change that may make a query unusable (a regular expression).
QUERY_REFUSALS = {
    "missing_gene": r"of the model's \d+ genes .* are in",
    "unseen_batch": "has categories unseen in training",
    "int_batch": "has categories unseen in training",
    "no_batch_column": r"obs column 'batch' \(used by the model\) not found",
    "nan_batch": r"missing \(NaN\) values",
    "duplicate_var": "var_names are not unique",
}


@st.composite
def queries(draw):
    return {
        "changes": draw(st.lists(st.sampled_from(QUERY_CHANGES), min_size=1, max_size=3, unique=True)),
        "seed": draw(st.integers(0, 9)),
    }


def make_query(base: ad.AnnData, changes: list[str], seed: int) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    query = base[rng.permutation(base.n_obs)[: rng.integers(1, 40)]].copy()
    for change in changes:
        if change == "shuffled_genes":
            query = query[:, rng.permutation(query.n_vars)].copy()
        elif change == "extra_genes":  # not ad.concat: it refuses repeated cell names
            ones = np.ones((query.n_obs, 2), np.float32)
            matrix = sp.hstack([query.X, ones], format="csr") if sp.issparse(query.X) else np.hstack([query.X, ones])
            query = ad.AnnData(X=matrix, obs=query.obs, var=pd.DataFrame(index=[*query.var_names, "extra1", "extra2"]))
        elif change == "missing_gene":
            query = query[:, 1:].copy()
        elif change == "unseen_batch" and "batch" in query.obs:
            query.obs["batch"] = "new_batch"
        elif change == "no_batch_column" and "batch" in query.obs:
            query.obs = query.obs.drop(columns="batch")
        elif change == "nan_batch" and "batch" in query.obs:
            query.obs["batch"] = query.obs["batch"].where(np.arange(query.n_obs) > 0)
        elif change == "int_batch" and "batch" in query.obs:
            query.obs["batch"] = 7
        elif change == "categorical_batch" and "batch" in query.obs:
            query.obs["batch"] = query.obs["batch"].astype("category")
        elif change == "view" and query.n_obs > 1:
            query = query[1:]
        elif change == "duplicate_obs":
            query.obs_names = ["same"] * query.n_obs
        elif change == "duplicate_var" and query.n_vars > 1:
            query.var_names = ["dup"] * 2 + list(query.var_names[2:])
        elif change == "float64":
            query.X = query.X.astype(np.float64)
        elif change == "int32_dense":
            query.X = np.asarray(query.X.toarray() if sp.issparse(query.X) else query.X).astype(np.int32)
        elif change == "csc":
            query.X = sp.csc_matrix(query.X)
        elif change == "zero_cells":
            query.X = query.X * 0
    return query


@FUZZ
@given(spec=queries())
def test_any_query_embeds_or_is_refused_with_a_documented_error(reference, spec):
    model, base = reference
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        query = make_query(base, spec["changes"], spec["seed"])
    before = frozen(query)
    try:
        latent = model.get_latent(query)
        expression = model.get_normalized_expression(query, transform_batch="batch0")
        samples = model.sample_counts(query)
    except DOCUMENTED as error:
        reasons = [change for change in spec["changes"] if change in QUERY_REFUSALS]
        assert reasons, f"valid query refused: {error!r}"
        assert any(re.search(QUERY_REFUSALS[reason], str(error)) for reason in reasons), f"{reasons} refused with {error!r}"
    else:
        assert latent.shape == (query.n_obs, 2) and np.isfinite(latent).all()
        assert expression.shape == (query.n_obs, model.config.n_genes) and np.isfinite(expression).all()
        assert samples.shape == (query.n_obs, model.config.n_genes) and np.isfinite(samples).all()
    assert_same(before, frozen(query))


def test_reordered_genes_give_the_same_embedding(reference):
    model, base = reference
    shuffled = base[:, np.random.default_rng(0).permutation(base.n_vars)].copy()
    np.testing.assert_allclose(model.get_latent(shuffled), model.get_latent(base), rtol=1e-5, atol=1e-6)


def test_anndata_itself_refuses_coo_storage():
    """COO cannot reach cellvae: AnnData only stores CSR/CSC sparse matrices."""
    with pytest.raises(ValueError, match="CSR and CSC"):
        ad.AnnData(X=sp.coo_matrix(np.ones((3, 2))))


def test_nan_from_an_outer_concat_of_dense_datasets_is_explained():
    """anndata.concat(join="outer") fills the genes one dense dataset lacks with NaN: the error says how to avoid it."""
    first = cellvae.datasets.simulate(n_cells=30, n_genes=20, random_state=0)
    second = cellvae.datasets.simulate(n_cells=30, n_genes=25, random_state=1)
    first.X, second.X = first.X.toarray(), second.X.toarray()
    merged = ad.concat([first, second], join="outer", index_unique="-")
    with pytest.raises(ValueError, match=r"contains NaN.*join='outer'.*fill_value=0"):
        CellVAE(merged)
    filled = ad.concat([first, second], join="outer", index_unique="-", fill_value=0)
    assert CellVAE(filled).config.n_genes == 25


@FUZZ
@given(
    values=st.lists(
        st.one_of(st.integers(-3, 1016), st.floats(allow_nan=False, width=32), st.booleans(), st.text(max_size=3)),
        max_size=40,
    ),
    categorical=st.booleans(),
)
def test_obs_columns_are_read_as_the_text_astype_str_gives(values, categorical):
    """Batch and covariate names are each value's text (an integer column's 1016 is "1016"; a float's -0.0 is "0.0");
    cellvae converts each distinct value once, and a column whose distinct values read alike (1 and "1") cell by cell."""
    column = pd.Series(values, dtype="category" if categorical else object)
    expected = column.astype(str).replace("-0.0", "0.0")  # -0.0 is 0.0, as pandas holds them (no text here is "-0.0")
    assert list(np.asarray(cellvae.data.as_text(column))) == list(expected)


@pytest.mark.parametrize("categorical", [True, False])
@pytest.mark.parametrize("kind", ["datetime", "float32"])
def test_a_categorical_batch_column_whose_categories_print_otherwise_keeps_its_batches(kind, categorical):
    """A categorical's categories are named as astype(str) writes them (a date "2020-01-01", not str()'s
    "2020-01-01 00:00:00"; a float32 0.1, not 0.10000000149011612): before, such a column gave no batches. The
    column as it is (not categorical) is named alike (a change for -0.0 named float32 0.1 by its float64 digits)."""
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=30, random_state=0)
    values = pd.to_datetime(["2020-01-01", "2020-01-02"]) if kind == "datetime" else np.array([0.1, 0.2], np.float32)
    values = values[(adata.obs["batch"] == "batch1").to_numpy().astype(int)]
    adata.obs["day"] = pd.Categorical(values) if categorical else values
    model = CellVAE(adata, batch_key="day", **TINY_MODEL)
    assert model.config.batch_categories == (["2020-01-01", "2020-01-02"] if kind == "datetime" else ["0.1", "0.2"])
    model.fit(max_epochs=1, progress=False)
    assert np.isfinite(model.get_latent()).all()
    assert model.generate(4, random_state=0, progress=False).n_obs == 4  # (it names each template cell's batch)
    later = np.flatnonzero(np.asarray(values) == values.max())[:2]  # two cells of the later day (or larger dose)
    path = cellvae.tl.interpolate(model, [later[0]], [later[1]], 2, progress=False)
    assert path.uns["interpolate"]["batch"] == model.config.batch_categories[1]  # decoded as their batch, not a mix


@pytest.mark.parametrize("storage", ["csr", "dense"])
@pytest.mark.parametrize("values_per_check", [2**24, 8192])
def test_the_share_of_ones_reads_all_of_a_small_matrix(storage, values_per_check, monkeypatch):
    """All of a matrix no larger than the check is read, a 64th of the check at a time: in one slice, the row
    of each value (int64) took 90 MB more than training on the 28 MB Kang matrix."""
    monkeypatch.setattr(cellvae.data, "VALUES_PER_CHECK", values_per_check)
    counts = cellvae.datasets.simulate(n_cells=97, n_genes=61, random_state=1).X.toarray()
    codes = np.arange(97) % 5
    matrix = sp.csr_matrix(counts) if storage == "csr" else counts
    share, non_zero, largest = cellvae.data.count_profile(matrix, codes)
    expected = [np.count_nonzero(counts[codes == b]) for b in range(5)]
    np.testing.assert_array_equal(non_zero, expected)
    np.testing.assert_allclose(share, [(counts[codes == b] == 1).sum() / expected[b] for b in range(5)])
    assert largest == counts.max()
    slices = [len(values) for values, _ in cellvae.data._sampled_values(matrix)]
    assert max(slices) <= max(values_per_check // 64, counts.shape[1]) and sum(slices) == (
        counts.size if storage == "dense" else np.count_nonzero(counts)
    )
