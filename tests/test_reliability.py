"""Reliability: numerical faults, determinism, safe model files, the user's AnnData left untouched, extreme inputs."""

import copy
import errno
import gc
import importlib
import inspect
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import warnings
import weakref
from pathlib import Path

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import ctrl_c_at_call, no_warnings, simulated_module
from safetensors.torch import save_file

import cellvae
from cellvae import CellVAE
from cellvae.config import FORMAT_VERSION, Config
from cellvae.data import CellLoader
from cellvae.module import VAE
from cellvae.train import MAX_NONFINITE_RETRIES, TrainSettings, train

TINY = {"n_hidden": 16, "n_latent": 4}
QUICK = {"max_epochs": 3, "progress": False}


def quiet_fit(model: CellVAE, **kwargs) -> CellVAE:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(**{**QUICK, **kwargs})


@pytest.fixture(scope="module")
def messy():
    """A realistic user AnnData: log-normalised X, raw counts in a layer, covariates, obsm, uns, var annotations."""
    adata = cellvae.datasets.simulate(n_cells=240, n_genes=40, n_batches=2, n_cell_types=3, random_state=5)
    adata.layers["counts"] = adata.X.copy()
    normalised = adata.X.multiply(1e4 / adata.X.sum(axis=1)).tocsr()
    normalised.data = np.log1p(normalised.data)
    adata.X = normalised.astype(np.float32)
    rng = np.random.default_rng(0)
    adata.obs["donor"] = rng.choice(["d1", "d2", "d3"], adata.n_obs)
    adata.obs["percent_mito"] = rng.uniform(0, 10, adata.n_obs)
    adata.obs["condition"] = pd.Categorical(rng.choice(["ctrl", "stim"], adata.n_obs))
    adata.var["highly_variable"] = rng.random(adata.n_vars) > 0.5
    adata.obsm["X_pca"] = rng.normal(size=(adata.n_obs, 5)).astype(np.float32)
    adata.uns["log1p"] = {"base": None}
    adata.uns["colors"] = np.array(["red", "blue"])
    return adata


MODEL_ARGS = {
    "layer": "counts",
    "batch_key": "batch",
    "categorical_covariate_keys": ["donor"],
    "continuous_covariate_keys": ["percent_mito"],
    **TINY,
}


@pytest.fixture(scope="module")
def trained(messy):
    return quiet_fit(CellVAE(messy.copy(), **MODEL_ARGS))


# ----------------------------------------------------------------------------- the user's AnnData is never modified


def assert_same_matrix(before, after, where: str) -> None:
    assert type(before) is type(after), f"{where} changed type"
    assert before.dtype == after.dtype, f"{where} changed dtype"
    assert before.shape == after.shape, f"{where} changed shape"
    if sp.issparse(before):
        for part in ("data", "indices", "indptr"):
            np.testing.assert_array_equal(getattr(before, part), getattr(after, part), err_msg=f"{where}.{part} changed")
    else:
        np.testing.assert_array_equal(before, after, err_msg=f"{where} changed")


def assert_same_uns(before, after, where: str) -> None:
    if isinstance(before, dict):
        assert isinstance(after, dict) and before.keys() == after.keys(), f"{where} keys changed"
        for key in before:
            assert_same_uns(before[key], after[key], f"{where}[{key!r}]")
    elif isinstance(before, np.ndarray):
        np.testing.assert_array_equal(before, after, err_msg=f"{where} changed")
    else:
        assert before == after or (before is None and after is None), f"{where} changed"


def assert_unchanged(before: ad.AnnData, after: ad.AnnData, obsm=(), uns=(), obs=()) -> None:
    """Everything but the documented keys ``obsm``, ``uns``, ``obs`` is identical, dtypes included."""
    assert_same_matrix(before.X, after.X, "X")
    assert before.layers.keys() == after.layers.keys()
    for key in before.layers:
        assert_same_matrix(before.layers[key], after.layers[key], f"layers[{key!r}]")
    added_obs = set(after.obs.columns) - set(before.obs.columns)
    assert added_obs <= set(obs), f"obs columns {added_obs - set(obs)} were added"
    pd.testing.assert_frame_equal(before.obs, after.obs[before.obs.columns], check_exact=True)
    pd.testing.assert_frame_equal(before.var, after.var, check_exact=True)
    assert set(after.obsm.keys()) - set(before.obsm.keys()) <= set(obsm)
    for key in before.obsm:
        assert_same_matrix(before.obsm[key], after.obsm[key], f"obsm[{key!r}]")
    assert set(after.uns.keys()) - set(before.uns.keys()) <= set(uns)
    assert_same_uns(
        {k: v for k, v in before.uns.items() if k not in uns}, {k: v for k, v in after.uns.items() if k not in uns}, "uns"
    )
    assert list(before.obs_names) == list(after.obs_names) and list(before.var_names) == list(after.var_names)


def _save_and_load(model, adata, tmp_path):
    model.save(tmp_path / "m")
    CellVAE.load(tmp_path / "m", adata=adata).get_latent()


CALLS = {
    "CellVAE": lambda m, a, tmp: CellVAE(a, **MODEL_ARGS),
    "fit": lambda m, a, tmp: quiet_fit(CellVAE(a, **MODEL_ARGS), max_epochs=1),
    "fit_with_checkpoints": lambda m, a, tmp: quiet_fit(CellVAE(a, **MODEL_ARGS), max_epochs=1, checkpoint_dir=tmp),
    "get_latent": lambda m, a, tmp: m.get_latent(a),
    "get_latent_sampled": lambda m, a, tmp: m.get_latent(a, mean=False),
    "get_normalized_expression": lambda m, a, tmp: m.get_normalized_expression(a, transform_batch=["batch0", "batch1"]),
    "get_likelihood_parameters": lambda m, a, tmp: m.get_likelihood_parameters(a),
    "sample_counts": lambda m, a, tmp: m.sample_counts(a, n_samples=2),
    "save_load": _save_and_load,
    "rate_distortion": lambda m, a, tmp: m.rate_distortion(a),
    "kl_per_dimension": lambda m, a, tmp: m.kl_per_dimension(a),
    "active_units": lambda m, a, tmp: m.active_units(a),
    "marginal_log_likelihood": lambda m, a, tmp: m.marginal_log_likelihood(a, n_samples=3),
    "inference_gaps": lambda m, a, tmp: m.inference_gaps(a[:20], n_steps=2, n_samples=3, n_elbo_samples=2),
    "get_latent_refined": lambda m, a, tmp: m.get_latent(a, refine_steps=2),
    "map_query": lambda m, a, tmp: quiet_fit_query(m, a),
    "differential_expression": lambda m, a, tmp: m.differential_expression(a, groupby="cell_type", n_draws=100),
    "rate_distortion_sweep": lambda m, a, tmp: cellvae.tl.rate_distortion_sweep(
        a, (1.0, 2.0), layer="counts", batch_key="batch", labels_key="cell_type", max_epochs=1, **TINY
    ),
    "interpolate": lambda m, a, tmp: cellvae.tl.interpolate(
        m, [0, 1], [2, 3], 3, adata=a, batch="batch0", covariates={"donor": "d1", "percent_mito": 5.0}
    ),
    "latent_shift": lambda m, a, tmp: cellvae.tl.latent_shift(
        m, a, groupby="condition", source="ctrl", target="stim", apply_to=list(range(5))
    ),
}


def quiet_fit_query(model, adata):
    query = adata.copy()  # only the query copy's batches are renamed; `adata` itself stays the reference data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.map_query(query, max_epochs=1, progress=False)


@pytest.mark.parametrize("name", list(CALLS))
def test_public_functions_leave_the_anndata_unchanged(name, messy, trained, tmp_path):
    adata = messy.copy()
    before = adata.copy()
    CALLS[name](trained, adata, tmp_path)
    assert_unchanged(before, adata)


def test_embed_writes_only_its_documented_keys(messy, trained):
    adata = messy.copy()
    before = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cellvae.tl.embed(adata, layer="counts", batch_key="batch", key_added="X_mine", max_epochs=1, progress=False, **TINY)
    assert_unchanged(before, adata, obsm=["X_mine"], uns=["X_mine"])
    assert adata.obsm["X_mine"].shape == (adata.n_obs, TINY["n_latent"])
    # A second embedding under the default key keeps its own record; the first one's stays.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cellvae.tl.embed(adata, layer="counts", max_epochs=1, progress=False, **TINY)
    assert adata.uns["X_mine"]["params"]["batch_key"] == "batch" and adata.uns["cellvae"]["params"]["batch_key"] is None
    # On a view (e.g. the variable genes, adata[:, adata.var.highly_variable]) both keys land, as in scanpy;
    # the view becomes its own AnnData when the results are written (not with anndata's warning, which under
    # -W error would throw the trained model away), keeping the parent's other uns entries, and the parent is
    # left alone. A call refused for bad input leaves the view a view (no copy of the data for an error).
    parent = messy.copy()
    parent.uns["cellvae"] = {"note": "kept"}
    untouched = parent.copy()
    view = parent[:, 1:]
    with pytest.raises(KeyError, match="no_such_column"):
        cellvae.tl.embed(view, layer="counts", batch_key="no_such_column", max_epochs=1, progress=False, **TINY)
    with pytest.raises(KeyError, match="no_such_column"):
        cellvae.tl.rank_genes_groups(view, "no_such_column", model=trained)
    with pytest.raises(KeyError, match="no_such_column"):
        cellvae.tl.transfer_labels(parent, view, "no_such_column")
    assert view.is_view
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", ad.ImplicitModificationWarning)
        cellvae.tl.embed(view, layer="counts", max_epochs=1, progress=False, **TINY)
    assert not view.is_view and view.obsm["X_cellvae"].shape == (parent.n_obs, TINY["n_latent"])
    assert view.uns["cellvae"]["note"] == "kept" and view.uns["cellvae"]["params"]["layer"] == "counts"
    assert_unchanged(untouched, parent)


def test_a_view_of_csr_array_counts_made_its_own_keeps_csr_arrays_as_anndatas_copy_does(messy):
    parent = messy.copy()
    parent.X, parent.layers["counts"] = sp.csr_array(parent.layers["counts"]), sp.csr_array(parent.layers["counts"])
    for view in (parent[::2], parent[::2, 1:]):
        expected = view.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cellvae.tl.embed(view, max_epochs=1, progress=False, **TINY)
        for name, matrix in (("X", view.X), ("counts", view.layers["counts"])):
            stored = expected.X if name == "X" else expected.layers[name]
            assert type(matrix) is type(stored) is sp.csr_array, name
            assert (matrix != stored).nnz == 0, name


def test_embed_trains_on_the_genes_mask_var_marks_and_writes_the_embedding_of_every_cell(messy, monkeypatch):
    """mask_var (a boolean var column such as scanpy's highly_variable, or a mask): the model of those genes,
    the embedding in the full AnnData, as CellVAE on adata[:, mask] gives it; bad masks refused before training."""
    adata = messy.copy()
    marked = np.zeros(adata.n_vars, dtype=bool)
    marked[::2] = True
    adata.var["highly_variable"] = marked
    before = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.tl.embed(adata, layer="counts", mask_var="highly_variable", max_epochs=2, progress=False, **TINY)
        by_hand = CellVAE(adata[:, marked], layer="counts", **TINY).fit(max_epochs=2, progress=False)
    assert model.config.gene_names == list(adata.var_names[marked])
    np.testing.assert_array_equal(adata.obsm["X_cellvae"], by_hand.get_latent())
    assert adata.uns["cellvae"]["params"]["mask_var"] == "highly_variable"
    assert_unchanged(before, adata, obsm=["X_cellvae"], uns=["cellvae"])
    # the model reads adata itself (its genes by name), with the columns added after training, as without mask_var
    adata.obs["leiden"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "0", "1"))
    assert model.adata is adata
    np.testing.assert_array_equal(model.get_latent(), adata.obsm["X_cellvae"])
    table = model.differential_expression(groupby="leiden", group1="0", n_draws=100)
    assert sorted(table.index) == sorted(adata.var_names[marked])
    del adata.obs["leiden"]
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    adata.var["score"], adata.var["maybe"] = np.linspace(0, 1, adata.n_vars), pd.array([True, None] * 20, dtype="boolean")
    adata.var["concatenated"] = np.array([True, np.nan] * 20, dtype=object)
    refusals = [
        ("no_such_column", KeyError, r"mask_var 'no_such_column' is not a column of adata.var .*highly_variable_genes"),
        ("score", TypeError, r"adata.var\['score'\] must be a boolean column .* got dtype float64"),
        ("maybe", ValueError, r"adata.var\['maybe'\] has 20 missing value\(s\); .*\.fillna\(False\)\.astype\(bool\)"),
        ("concatenated", ValueError, r"adata.var\['concatenated'\] has 20 missing value\(s\)"),  # object, from an outer concat
        (np.zeros(adata.n_vars, dtype=bool), ValueError, "mask_var marks no genes"),
        (np.ones(3, dtype=bool), TypeError, "a boolean mask of the 40 genes, got bool of shape \\(3,\\)"),
        (np.arange(adata.n_vars), TypeError, "a boolean mask of the 40 genes, got int64"),
        (adata.var["highly_variable"][::-1], ValueError, "index is not adata.var_names .* by position"),
    ]
    for mask_var, error, message in refusals:
        with pytest.raises(error, match=message):
            cellvae.tl.embed(adata, layer="counts", key_added="X_other", mask_var=mask_var, **TINY)
    assert "X_other" not in adata.obsm and "X_other" not in adata.uns


def test_rank_genes_groups_writes_only_its_documented_key(messy, trained):
    adata = messy.copy()
    before = adata.copy()
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=trained, n_draws=100, key_added="de_cellvae")
    assert_unchanged(before, adata, uns=["de_cellvae"])
    assert list(adata.uns["de_cellvae"]["names"].dtype.names) == ["type0", "type1", "type2"]


def test_embed_refuses_a_view_of_a_backed_anndata_before_training(tmp_path, monkeypatch):
    cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=0).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"view of a backed AnnData.*to_memory\(\)"):
        cellvae.tl.embed(backed[:200], progress=False)
    query = backed[200:]
    with pytest.raises(ValueError, match="query_adata is a view of a backed AnnData"):
        cellvae.tl.transfer_labels(backed, query, "cell_type")
    # copy=True of a backed AnnData (anndata copies it only into a file): refused before the work, as scanpy fails at once
    monkeypatch.setattr(CellVAE, "differential_expression", lambda *a, **k: pytest.fail("ranked before refusing"))
    model = CellVAE(backed)
    with pytest.raises(ValueError, match=r"copy=True cannot copy adata, whose counts are on disk.*copy=False"):
        cellvae.tl.rank_genes_groups(backed, "cell_type", model=model, copy=True)
    backed.obsm["X_cellvae"] = np.zeros((backed.n_obs, 2))
    with pytest.raises(ValueError, match=r"copy=True cannot copy query_adata, whose counts are on disk"):
        cellvae.tl.transfer_labels(backed, backed, "cell_type", copy=True)
    backed.to_memory().write_zarr(tmp_path / "cells.zarr")
    lazy = cellvae.read_zarr_lazy(tmp_path / "cells.zarr")
    lazy.obsm["X_cellvae"] = np.zeros((lazy.n_obs, 2))
    with pytest.raises(ValueError, match=r"copy=True cannot copy query_adata, whose counts are on disk"):
        cellvae.tl.transfer_labels(lazy, lazy, "cell_type", copy=True)
    backed.file.close()


def test_embed_points_fit_options_to_fit_kwargs_before_training(messy, monkeypatch):
    adata = messy.copy()
    before = adata.copy()
    importlib.import_module("cellvae.tl")  # before fit is patched: tl reads fit's options from its signature on import
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(TypeError, match=r"\['batch_size', 'lr'\] are options of CellVAE.fit; pass them as fit_kwargs="):
        cellvae.tl.embed(adata, layer="counts", lr=1e-3, batch_size=64)
    with pytest.raises(TypeError, match=r"in place.*adata.copy\(\)"):
        cellvae.tl.embed(adata, layer="counts", copy=True)
    # scvi-tools' names of training options, given as the model's: the cellvae name, and where fit's options go
    with pytest.raises(TypeError, match=r"embed\(\) got .* 'train_size', scvi-tools' name .*validation_size=.*fit_kwargs"):
        cellvae.tl.embed(adata, layer="counts", train_size=0.9)
    with pytest.raises(
        TypeError,
        match=r"rate_distortion_sweep\(\) got .* 'n_epochs_kl_warmup', .*kl_warmup=\.\.\. \(.*tl.rate_distortion_sweep\)$",
    ):
        cellvae.tl.rate_distortion_sweep(adata, layer="counts", n_epochs_kl_warmup=5)  # (a model argument: no fit_kwargs)
    with pytest.raises(TypeError, match=r"'enable_progress_bar', .*: use progress= \(pass progress= to embed itself\)$"):
        cellvae.tl.embed(adata, layer="counts", enable_progress_bar=False)  # (fit_kwargs refuses progress)
    for tool in (cellvae.tl.embed, cellvae.tl.rate_distortion_sweep):  # Python's "argument after ** must be a mapping"
        with pytest.raises(TypeError, match=r"fit_kwargs takes a dict of CellVAE.fit arguments.*got \[\('lr', 0.001\)\]"):
            tool(adata, layer="counts", fit_kwargs=[("lr", 1e-3)])
    assert_unchanged(before, adata)


def test_embed_refuses_an_uns_entry_it_cannot_write_its_settings_into_before_training(messy, monkeypatch):
    adata = messy.copy()
    adata.uns["cellvae"], adata.uns["X_mine"] = "a note", np.arange(3)
    before = adata.copy()
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(TypeError, match=r"adata.uns\['cellvae'\] holds a str; .*choose another key_added"):
        cellvae.tl.embed(adata, layer="counts")
    with pytest.raises(TypeError, match=r"adata.uns\['X_mine'\] holds a ndarray"):
        cellvae.tl.embed(adata, layer="counts", key_added="X_mine")
    assert_unchanged(before, adata)


def test_embed_refuses_a_key_added_whose_uns_record_is_another_embeddings(messy, monkeypatch):
    """key_added="cellvae" and the default "X_cellvae" both keep their record in uns["cellvae"]."""
    adata = messy.copy()
    adata.obsm["X_cellvae"] = np.zeros((adata.n_obs, 2), dtype=np.float32)
    adata.uns["cellvae"] = {"params": {"key_added": "X_cellvae", "epochs_trained": 3}}
    before = adata.copy()
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before refusing"))
    with pytest.raises(ValueError, match=r"records the embedding obsm\['X_cellvae'\].*choose another key_added"):
        cellvae.tl.embed(adata, layer="counts", key_added="cellvae")
    assert_unchanged(before, adata)
    del adata.obsm["X_cellvae"]  # that embedding is gone: its record may be replaced

    def reached(*args, **kwargs):
        raise RuntimeError("reached training")

    monkeypatch.setattr(CellVAE, "fit", reached)
    with pytest.raises(RuntimeError, match="reached training"):
        cellvae.tl.embed(adata, layer="counts", key_added="cellvae")


def test_embed_warns_before_training_that_scanpys_own_embedding_keys_are_replaced_by_its_tools(messy, monkeypatch):
    """key_added="X_umap" on an AnnData without a UMAP was taken silently; sc.tl.umap then wrote over the latent."""
    adata = messy.copy()

    def reached(*args, **kwargs):
        raise RuntimeError("reached training")

    monkeypatch.setattr(CellVAE, "fit", reached)
    for key, tool in [("X_umap", "sc.tl.umap"), ("X_pca", "sc.pp.pca"), ("X_draw_graph_fa", "sc.tl.draw_graph")]:
        with pytest.warns(UserWarning, match=rf"key_added='{key}' is where scanpy's {tool} writes its embedding: a later "):
            with pytest.raises(RuntimeError, match="reached training"):
                cellvae.tl.embed(adata, layer="counts", key_added=key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="reached training"):
            cellvae.tl.embed(adata, layer="counts", key_added="X_umap_cellvae")


def test_embed_records_its_settings_in_uns_and_they_survive_h5ad(messy, tmp_path):
    adata = messy.copy()
    settings = {"categorical_covariate_keys": ["donor"], "beta": np.float32(0.5), "n_latent": np.int64(4)}
    settings["continuous_covariate_keys"] = adata.obs.columns[adata.obs.columns == "percent_mito"]  # a pandas Index
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cellvae.tl.embed(
            adata, layer="counts", batch_key="batch", max_epochs=1, random_state=7, progress=False, n_hidden=16, **settings
        )
    params = adata.uns["cellvae"]["params"]
    assert params["random_state"] == 7
    assert params["categorical_covariate_keys"] == ["donor"] and params["beta"] == 0.5 and params["n_latent"] == 4
    # and it ran with them: the embedding is that of CellVAE(...).fit(...) with the same settings and seed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(messy.copy(), layer="counts", batch_key="batch", n_hidden=16, **settings)
        expected = model.fit(max_epochs=1, random_state=7, progress=False).get_latent(progress=False)
    np.testing.assert_array_equal(adata.obsm["X_cellvae"], expected)
    assert params["continuous_covariate_keys"] == ["percent_mito"]
    adata.write_h5ad(tmp_path / "embedded.h5ad")
    stored = ad.read_h5ad(tmp_path / "embedded.h5ad").uns["cellvae"]["params"]
    assert list(stored["categorical_covariate_keys"]) == ["donor"] and stored["epochs_trained"] == 1


def test_embeds_record_holds_the_epochs_asked_for_so_an_early_stopped_fit_can_be_rerun():
    """max_epochs was not recorded: with early stopping, rerunning with max_epochs=epochs_trained gave another model
    (a shorter warm-up and horizon)."""
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=40, random_state=5)
    cellvae.tl.embed(adata, max_epochs=40, progress=False, n_hidden=16, fit_kwargs={"patience": 1})
    params = adata.uns["cellvae"]["params"]
    assert params["max_epochs"] == 40 and params["epochs_trained"] < 40  # it stopped early
    again = cellvae.datasets.simulate(n_cells=400, n_genes=40, random_state=5)
    cellvae.tl.embed(again, max_epochs=params["max_epochs"], progress=False, n_hidden=16, fit_kwargs={"patience": 1})
    np.testing.assert_array_equal(again.obsm["X_cellvae"], adata.obsm["X_cellvae"])
    small = cellvae.datasets.simulate(n_cells=60, n_genes=20, random_state=5)
    cellvae.tl.embed(small, progress=False, n_hidden=8)  # max_epochs=None: the number picked is recorded
    assert small.uns["cellvae"]["params"]["max_epochs"] == cellvae.train.default_max_epochs(48)  # its training cells


def test_embed_again_says_the_graph_made_from_the_earlier_embedding_is_stale():
    """Re-running a notebook's embed cell after neighbours, Leiden and UMAP: the CLI told it, tl.embed did not."""
    import scanpy as sc

    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    embed = {"max_epochs": 2, "progress": False, "n_hidden": 8}
    with no_warnings():  # no graph yet
        cellvae.tl.embed(adata, **embed)
        cellvae.tl.embed(adata, **embed)
    sc.pp.neighbors(adata, use_rep="X_cellvae")
    with no_warnings():  # the cell re-run as it was: the same embedding, the graph stays true
        cellvae.tl.embed(adata, **embed)
    told = r"^the neighbours graph adata holds, .* were made from an earlier obsm\['X_cellvae'\]; recompute them .*'X_cellvae'"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.embed(adata, random_state=1, **embed)
    with no_warnings():  # an embedding under another key leaves that graph as it was
        cellvae.tl.embed(adata, key_added="X_other", **embed)
    sc.pp.neighbors(adata, use_rep="X_other")
    sc.tl.umap(adata)
    with no_warnings():  # the graph (and its UMAP) came from another representation: nothing stale
        cellvae.tl.embed(adata, **embed)
    sc.pp.neighbors(adata, use_rep="X_cellvae", key_added="cv")  # a graph of its own name, made from it
    told = r"made from an earlier obsm\['X_cellvae'\].*sc.pp.neighbors\(adata, use_rep='X_cellvae', key_added='cv'\)"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.embed(adata, random_state=3, **embed)
    sc.pp.neighbors(adata, use_rep="X_cellvae", key_added="cv")
    sc.pp.neighbors(adata, use_rep="X_cellvae")  # both graphs from it: scanpy's default named, with no key_added
    with pytest.warns(UserWarning, match=r"^the neighbours graphs .* e.g. sc.pp.neighbors\(adata, use_rep='X_cellvae'\)$"):
        cellvae.tl.embed(adata, random_state=4, **embed)
    for graph in ("neighbors", "cv"):  # a UMAP whose graph has no record: it may have come from the embedding
        del adata.uns[graph]
    with pytest.warns(UserWarning, match=r"^the UMAP adata holds \(its graph has no record .*\) may have been made from"):
        cellvae.tl.embed(adata, random_state=2, **embed)


def test_transfer_labels_writes_only_its_documented_keys(messy, trained):
    reference, query = messy[:150].copy(), messy[150:].copy()
    reference.obsm["X_cellvae"] = trained.get_latent(reference)
    query.obsm["X_cellvae"] = trained.get_latent(query)
    reference_before, query_before = reference.copy(), query.copy()
    cellvae.tl.transfer_labels(reference, query, "cell_type")
    assert_unchanged(reference_before, reference)
    added = set(query.obs.columns) - set(query_before.obs.columns)
    assert added and all(c.startswith("cell_type_") for c in added)
    assert_unchanged(query_before, query, obs=added)
    query = query_before.copy()
    cellvae.tl.transfer_labels(reference, query, "cell_type", soft=True)
    assert_unchanged(query_before, query, obs=added, obsm={"cell_type_vote_shares"}, uns={"cell_type_vote_shares"})
    assert set(query.obsm) - set(query_before.obsm) == {"cell_type_vote_shares"}
    assert set(query.uns) - set(query_before.uns) == {"cell_type_vote_shares"}


def test_backed_file_is_not_written(messy, trained, tmp_path):
    path = tmp_path / "cells.h5ad"
    messy.write_h5ad(path)
    stamp = (path.stat().st_mtime_ns, path.read_bytes())
    backed = ad.read_h5ad(path, backed="r")
    latent = trained.get_latent(backed)
    np.testing.assert_array_equal(latent, trained.get_latent(messy))
    quiet_fit(CellVAE(backed, **MODEL_ARGS), max_epochs=1)
    backed.file.close()
    assert (path.stat().st_mtime_ns, path.read_bytes()) == stamp


# ----------------------------------------------------------------------------- numerical faults


def nan_batch_loader(n_cells: int = 120, n_genes: int = 20) -> tuple[VAE, CellLoader]:
    """A loader whose cell 0 is a corrupt row of NaN counts (validation would reject it; we bypass it on purpose)."""
    counts = cellvae.datasets.simulate(n_cells=n_cells, n_genes=n_genes, random_state=1, sparse=False).X.astype(np.float32)
    counts[0] = np.nan
    library = np.nansum(counts, axis=1)
    library[0] = np.nan
    loader = CellLoader(counts, np.zeros((n_cells, 0), np.float32), library, np.zeros(n_cells, np.int64))
    torch.manual_seed(0)
    return VAE(Config(gene_names=[f"g{i}" for i in range(n_genes)], n_hidden=8, n_latent=2)), loader


def settings(max_epochs: int) -> TrainSettings:
    return TrainSettings(
        max_epochs=max_epochs, batch_size=16, lr=1e-2, weight_decay=0.0, kl_warmup_epochs=1, beta=1.0,
        early_stopping=False, patience=10, random_state=0, progress=False,
    )  # fmt: skip


def resident(loader: CellLoader, monkeypatch) -> CellLoader:
    """Let ``loader`` train as on a GPU that holds all counts (ResidentSteps: steps summed on the
    device, a non-finite one found at the end of its epoch)."""
    tensors = loader._resident_tensors()
    monkeypatch.setattr(loader, "resident", lambda: tensors)
    return loader


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize(
    "on_device", [False, True, pytest.param("cuda", marks=NEEDS_CUDA)], ids=["step-by-step", "resident", "cuda-graphs"]
)
def test_nan_batch_restores_parameters_and_lowers_the_learning_rate(on_device, monkeypatch):
    vae, loader = nan_batch_loader()
    if on_device == "cuda":  # counts resident on the GPU, steps replayed from CUDA graphs (captured again after each recovery)
        loader = CellLoader(loader.matrix, loader.covariates, loader.library, loader.batch_index, device="cuda")
        vae.to("cuda")
    elif on_device:
        loader = resident(loader, monkeypatch)
    with pytest.warns(RuntimeWarning, match="non-finite loss or gradient") as caught:
        history = train(vae, loader, np.arange(120), np.arange(0), settings(3))
    assert sum("non-finite" in str(w.message) for w in caught) == 3  # the NaN row is met once per epoch
    assert len(history) == 3
    np.testing.assert_allclose(history["lr"], [5e-3, 2.5e-3, 1.25e-3])
    assert all(torch.isfinite(p).all() for p in vae.parameters())
    assert np.isfinite(history["train_loss"]).all()


@pytest.mark.parametrize("on_device", [False, True], ids=["step-by-step", "resident"])
def test_repeated_nan_batches_end_with_a_clear_error(on_device, monkeypatch):
    vae, loader = nan_batch_loader()
    if on_device:
        loader = resident(loader, monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match=f"non-finite losses or gradients {MAX_NONFINITE_RETRIES + 1} times"):
            train(vae, loader, np.arange(120), np.arange(0), settings(20))


def test_a_trained_model_whose_further_training_fails_is_given_back_unchanged(messy):
    model = quiet_fit(CellVAE(messy.copy(), **MODEL_ARGS))
    before = model.get_latent()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FloatingPointError, match="non-finite losses or gradients"):
            model.fit(max_epochs=20, lr=1e30, early_stopping=False, progress=False)
    assert not model.module.training  # dropout off: embeddings stay deterministic
    np.testing.assert_array_equal(model.get_latent(), before)


def test_counts_missing_from_x_are_explained(messy, tmp_path):
    empty_x = r"adata.X is empty .*built \(CellVAE\(adata, layer=\.\.\.\)\)"
    adata = messy.copy()
    adata.X = None
    with pytest.raises(ValueError, match=empty_x + r": adata.layers holds \['counts'\]"):
        CellVAE(adata)
    # a backed file without X (where anndata's X raises h5py's KeyError), whole and as views
    adata.layers["lognormalised"] = messy.X
    adata.write_h5ad(tmp_path / "no_x.h5ad")
    backed = ad.read_h5ad(tmp_path / "no_x.h5ad", backed="r")
    for cells in (backed, backed[:100], backed[:, :30]):
        with pytest.raises(ValueError, match=empty_x):
            CellVAE(cells)
    with pytest.raises(ValueError, match=r"adata.layers\['counts'\] holds whole counts: pass layer='counts'"):
        CellVAE(backed, layer="lognormalised")  # (the hint looks for counts in X too)
    on_x = quiet_fit(CellVAE(ad.AnnData(X=messy.layers["counts"], var=messy.var[[]]), n_hidden=8), max_epochs=1)
    with pytest.raises(ValueError, match="adata.X is empty .*a trained model reads the layer it was trained on"):
        on_x.get_latent(backed)
    assert CellVAE(backed, layer="counts").config.layer == "counts"
    # a backed file with X whose file was closed: anndata opens it again to read X, and so does cellvae
    in_memory = ad.AnnData(X=messy.layers["counts"], var=messy.var[[]])
    in_memory.write_h5ad(tmp_path / "with_x.h5ad")
    closed = ad.read_h5ad(tmp_path / "with_x.h5ad", backed="r")
    closed.file.close()
    np.testing.assert_allclose(on_x.get_latent(closed), on_x.get_latent(in_memory), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to run out of its memory")
def test_gpu_out_of_memory_suggests_a_smaller_batch_size():
    adata = cellvae.datasets.simulate(n_cells=4000, n_genes=2000, random_state=0)
    torch.cuda.set_per_process_memory_fraction(0.002)
    try:
        with pytest.raises(torch.OutOfMemoryError, match=r"smaller batch_size \(e.g. fit\(batch_size=2000\)\)"):
            CellVAE(adata, n_hidden=1024).fit(max_epochs=1, batch_size=4000, device="cuda", progress=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_out_of_memory_in_training_frees_what_training_held_and_keeps_the_model(monkeypatch):
    """An out-of-memory error mid-training (here raised by the optimizer's third step) is told with a smaller
    batch_size, the model is as before, and the error (kept by an except block or Jupyter) no longer holds the
    optimizer and the copies training made: a retry finds that memory free. Likewise in map_query."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=0)
    model = CellVAE(adata, n_hidden=16, batch_key="batch")
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    optimizers, original_step = [], torch.optim.AdamW.step

    def step_then_run_out(self, *args, **kwargs):
        optimizers.append(weakref.ref(self))
        if len(optimizers) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_run_out)
    with pytest.raises(torch.OutOfMemoryError, match=r"pass a smaller batch_size \(e.g. fit\(batch_size=32\)\)") as caught:
        model.fit(max_epochs=2, batch_size=64, progress=False)
    gc.collect()
    assert caught.value.__cause__ is not None and optimizers[-1]() is None  # the error keeps no optimizer alive
    assert not model.is_trained
    for name, tensor in model.module.state_dict().items():
        torch.testing.assert_close(tensor, before[name])
    monkeypatch.setattr(torch.optim.AdamW, "step", original_step)
    assert model.fit(max_epochs=1, batch_size=64, progress=False).is_trained  # the retry trains
    # map_query likewise
    query = adata.copy()
    query.obs["batch"] = "new"
    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_run_out)
    optimizers.clear()
    with pytest.raises(
        torch.OutOfMemoryError, match=r"e\.g\. map_query\(query_adata, batch_size=32\)\)$"
    ) as caught:  # (on the CPU)
        model.map_query(query, max_epochs=2, batch_size=64, progress=False)
    gc.collect()
    assert optimizers[-1]() is None
    # an Apple GPU's out-of-memory error is a plain RuntimeError: told and freed alike
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: (_ for _ in ()).throw(RuntimeError(
        "MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB, max allowed: 9.07 GB)")))  # fmt: skip
    with pytest.raises(torch.OutOfMemoryError, match=r"smaller batch_size \(e\.g\. fit\(batch_size=32\)\)"):
        model.fit(max_epochs=1, batch_size=64, progress=False)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_bitwise_identical_models_and_embeddings(messy):
    first = quiet_fit(CellVAE(messy, **MODEL_ARGS), random_state=3, device="cpu")  # (a GPU draws other random numbers)
    torch.manual_seed(12345)  # the global torch seed must not matter
    np.random.seed(54321)
    second = quiet_fit(CellVAE(messy, **MODEL_ARGS), random_state=3, device=torch.device("cpu"))  # as scvi-tools users write
    for key, value in first.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key]), key
    np.testing.assert_array_equal(first.get_latent(), second.get_latent())
    pd.testing.assert_frame_equal(first.history.drop(columns="seconds"), second.history.drop(columns="seconds"))


def test_a_dispersion_per_gene_and_batch_trains_reproducibly():
    """The batch's row of the dispersion is picked so that its gradient sums in a fixed order (indexing's
    backward summed the rows of a 128-cell minibatch in an order that varied run to run on 2 CPU threads
    from ~500 genes on, so that no two fits were identical)."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=600, n_batches=3, random_state=2)
    first, second = (
        quiet_fit(CellVAE(adata, batch_key="batch", dispersion="gene-batch", n_hidden=32), max_epochs=3, random_state=1)
        for _ in range(2)
    )
    for key, value in first.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key]), key
    pd.testing.assert_frame_equal(first.history.drop(columns="seconds"), second.history.drop(columns="seconds"))


def test_a_float64_default_dtype_set_by_the_user_changes_no_result(messy, trained, tmp_path, monkeypatch):
    """Users of GPyTorch or BoTorch set torch's default dtype to float64: cellvae's weights stay float32,
    so models train, save, load and generate exactly as under the float32 default. cellvae never sets the default
    itself (a switch to float32 and back, while building, changed it for the caller's other threads meanwhile)."""
    trained.save(tmp_path / "model")
    expected = quiet_fit(CellVAE(messy, **MODEL_ARGS), random_state=3)
    zinb = quiet_fit(CellVAE(messy, **MODEL_ARGS, likelihood="zinb"), max_epochs=2)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    switches, set_default_dtype = [], torch.set_default_dtype
    monkeypatch.setattr(torch, "set_default_dtype", lambda dtype: switches.append(dtype) or set_default_dtype(dtype))
    try:
        model = quiet_fit(CellVAE(messy, **MODEL_ARGS), random_state=3)
        loaded = CellVAE.load(tmp_path / "model", adata=messy)  # a float32 file read as what it is
        latent, generated = model.get_latent(), model.generate(20, random_state=1).X.toarray()
        loaded_latent = loaded.get_latent()
        zinb_draws = zinb.sample_counts(random_state=2)  # zero inflation draws uniforms: float32 ones, as always
        still_float64 = torch.get_default_dtype() == torch.float64
    finally:
        set_default_dtype(previous)
    assert still_float64 and switches == []
    np.testing.assert_array_equal(latent, expected.get_latent())
    np.testing.assert_array_equal(generated, expected.generate(20, random_state=1).X.toarray())
    np.testing.assert_array_equal(loaded_latent, trained.get_latent(messy))
    np.testing.assert_array_equal(zinb_draws, zinb.sample_counts(random_state=2))


@pytest.mark.parametrize("gradients_off", [torch.no_grad, torch.inference_mode])
def test_training_and_refinement_work_where_the_caller_turned_gradients_off(messy, gradients_off):
    """Notebooks often run inference under torch.no_grad() or inference_mode(); a model built and trained
    there is the one trained outside, and the caller's mode is as it was afterwards."""
    expected = quiet_fit(CellVAE(messy, **MODEL_ARGS), max_epochs=2, random_state=3)
    cells = messy[:20]
    with gradients_off():
        model = quiet_fit(CellVAE(messy, **MODEL_ARGS), max_epochs=2, random_state=3)
        refined = model.get_latent(cells, refine_steps=2)
        gaps = model.inference_gaps(cells[:3], n_steps=2, n_samples=3)
        still_off = not torch.is_grad_enabled()
    assert still_off
    np.testing.assert_array_equal(model.get_latent(messy), expected.get_latent(messy))
    np.testing.assert_array_equal(refined, expected.get_latent(cells, refine_steps=2))
    pd.testing.assert_frame_equal(gaps, expected.inference_gaps(cells[:3], n_steps=2, n_samples=3))
    # trained further, inside and outside the mode (on a GPU the weights went there and back each time)
    with gradients_off():
        inside = quiet_fit(model, max_epochs=1).history["train_loss"]
    outside = quiet_fit(model, max_epochs=1).history["train_loss"]
    assert np.isfinite(inside).all() and np.isfinite(outside).all()


def test_numpy_integer_seeds_work_wherever_a_seed_is_taken(trained, messy):
    """A seed from numpy (np.int64, e.g. out of a parameter grid) gives what the same Python integer gives."""
    cells = messy[:30]
    for call in (
        lambda seed: trained.get_latent(cells, mean=False, random_state=seed),
        lambda seed: trained.get_latent(cells, refine_steps=2, random_state=seed),
        lambda seed: trained.sample_counts(cells, random_state=seed),
        lambda seed: trained.generate(5, random_state=seed).X.toarray(),
        lambda seed: trained.marginal_log_likelihood(cells, n_samples=3, random_state=seed),
        lambda seed: trained.rate_distortion(cells, random_state=seed)["distortion"],
        lambda seed: trained.inference_gaps(cells[:3], n_steps=2, n_samples=3, random_state=seed).to_numpy(),
        lambda seed: trained.differential_expression(cells, groupby="cell_type", n_draws=100, random_state=seed).to_numpy(),
    ):
        np.testing.assert_array_equal(call(np.int64(4)), call(4))


def test_seeded_calls_leave_the_callers_torch_generators_alone(messy):
    """fit, sampling and generation seed torch from their random_state and then put back what the caller
    had: the CPU generator's state, and the seed torch.manual_seed queued for CUDA devices not yet started."""

    def queued_cuda_seeds() -> list[int]:  # torch keeps a not-yet-started CUDA device's seed as a queued call
        calls = [call for call in torch.cuda._lazy_seed_tracker.get_calls() if call]
        return [inspect.getclosurevars(callback).nonlocals.get("seed") for callback, _ in calls]

    torch.manual_seed(42)
    cpu_state, cuda_seeds = torch.get_rng_state(), queued_cuda_seeds()
    model = quiet_fit(CellVAE(messy, **MODEL_ARGS), max_epochs=2, random_state=7)
    model.get_latent(mean=False, random_state=3)
    model.sample_counts(random_state=4)
    model.generate(5, random_state=5)
    assert torch.equal(torch.get_rng_state(), cpu_state)
    if not torch.cuda.is_initialized():
        assert queued_cuda_seeds() == cuda_seeds


def test_repeated_inference_is_identical(trained, messy):
    np.testing.assert_array_equal(trained.get_latent(messy), trained.get_latent(messy))
    np.testing.assert_array_equal(trained.get_latent(messy, mean=False), trained.get_latent(messy, mean=False))
    np.testing.assert_array_equal(trained.get_normalized_expression(messy), trained.get_normalized_expression(messy))
    np.testing.assert_array_equal(trained.sample_counts(messy, random_state=4), trained.sample_counts(messy, random_state=4))
    # batch size only splits the work
    np.testing.assert_allclose(trained.get_latent(messy, batch_size=7), trained.get_latent(messy), rtol=1e-5, atol=1e-6)


def test_outputs_do_not_depend_on_the_modules_training_mode(trained, messy):
    """A user who put ``model.module.train()`` (to fine-tune it their way) gets the same outputs, without
    dropout, and the module stays in the mode they chose."""
    cells = messy[:40]
    outputs = {
        "latent": lambda: trained.get_latent(cells),
        "latent draw": lambda: trained.get_latent(cells, mean=False, random_state=2),
        "expression": lambda: trained.get_normalized_expression(cells),
        "parameters": lambda: trained.get_likelihood_parameters(cells)["mean"],
        "counts": lambda: trained.sample_counts(cells, random_state=3),
        "generated": lambda: trained.generate(10, random_state=4).X.toarray(),
    }
    expected = {name: output() for name, output in outputs.items()}
    trained.module.train()
    try:
        for name, output in outputs.items():
            np.testing.assert_array_equal(output(), expected[name], err_msg=name)
            assert trained.module.training, name
    finally:
        trained.module.eval()


def test_different_seeds_give_different_results(trained, messy):
    other = quiet_fit(CellVAE(messy, **MODEL_ARGS), random_state=1)
    assert not np.array_equal(other.get_latent(messy), trained.get_latent(messy))
    assert not np.array_equal(
        trained.get_latent(messy, mean=False, random_state=0), trained.get_latent(messy, mean=False, random_state=1)
    )
    assert not np.array_equal(trained.sample_counts(messy, random_state=0), trained.sample_counts(messy, random_state=1))
    # (a test audit: a seed ignored by these three passed every test; users add cells, and take the Monte Carlo error
    # of log p(x), over seeds)
    generated = [trained.generate(20, random_state=seed, progress=False) for seed in (0, 1)]
    assert not np.array_equal(generated[0].obsm["z"], generated[1].obsm["z"])
    cells = messy[:40]
    scores = [trained.marginal_log_likelihood(cells, n_samples=5, random_state=seed, progress=False) for seed in (0, 1)]
    assert not np.array_equal(scores[0], scores[1])
    gaps = [trained.inference_gaps(cells, n_samples=5, n_steps=5, random_state=seed, progress=False) for seed in (0, 1)]
    assert not np.array_equal(gaps[0]["log_px"], gaps[1]["log_px"])


def test_training_and_inference_do_not_disturb_the_global_random_state(trained, messy):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    trained.get_latent(messy, mean=False)
    trained.sample_counts(messy)
    trained.rate_distortion(messy)
    model = CellVAE(messy, **MODEL_ARGS)
    quiet_fit(model, random_state=5, max_epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_seeded_calls_from_several_threads_give_their_own_draws_and_restore_the_callers_state(trained, messy):
    """Two threads drawing at once (a thread pool over cell sets, a notebook's background thread) each get
    what the call gives alone, and the caller's torch generator is as it was: torch's generator is
    process-wide, so two seeded calls at once drew from each other's stream and restored each other's state."""
    import threading

    cells = messy[:120]
    calls = {
        "latent draw": lambda: trained.get_latent(cells, mean=False, random_state=1, batch_size=1, progress=False),
        "sampled counts": lambda: trained.sample_counts(cells, random_state=2, batch_size=1, progress=False),
    }
    expected = {name: call() for name, call in calls.items()}
    torch.manual_seed(0)
    state = torch.get_rng_state()
    start, differing = threading.Barrier(2), []

    def work(name: str) -> None:
        start.wait()
        for _ in range(4):
            if not np.array_equal(calls[name](), expected[name]):
                differing.append(name)

    threads = [threading.Thread(target=work, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert differing == []
    assert torch.equal(torch.get_rng_state(), state)


# ----------------------------------------------------------------------------- model files


class _MarkerPayload:
    """Unpickling this creates a marker file: proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def malicious_pickle(marker: Path) -> bytes:
    payload = pickle.dumps(_MarkerPayload(marker))
    control = marker.with_name(marker.name + ".control")
    pickle.loads(pickle.dumps(_MarkerPayload(control)))  # the payload really does run when unpickled
    assert control.exists()
    control.unlink()
    return payload


@pytest.fixture()
def saved(trained, tmp_path) -> Path:
    trained.save(tmp_path / "model")
    return tmp_path / "model"


def test_save_makes_its_files_durable_through_handles_open_for_writing(trained, tmp_path, monkeypatch):
    """On Windows os.fsync (FlushFileBuffers) fails on a handle opened read-only: every save failed there and
    deleted what it had written. Emulated here: fsync refuses read-only descriptors."""
    import fcntl

    fsync = os.fsync

    def fsync_as_on_windows(descriptor: int) -> None:
        if fcntl.fcntl(descriptor, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(9, "Bad file descriptor")
        fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync_as_on_windows)
    trained.save(tmp_path / "model", save_anndata=True)
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "model", adata=trained.adata).get_latent(), trained.get_latent())
    # saved again into its folder, whose adata.h5ad (linked in) the user made read-only: fsync'd read-only (as root
    # may write any file, a non-root user's refusal is emulated)
    monkeypatch.setattr(os, "fsync", fsync)
    (tmp_path / "model" / "adata.h5ad").chmod(0o444)
    opened = os.open

    def open_as_a_user(path, flags, *args):
        if flags & os.O_ACCMODE != os.O_RDONLY and not os.stat(path).st_mode & 0o200:
            raise PermissionError(13, "Permission denied", str(path))
        return opened(path, flags, *args)

    monkeypatch.setattr(os, "open", open_as_a_user)
    CellVAE.load(tmp_path / "model").save(tmp_path / "model", overwrite=True)
    assert CellVAE.load(tmp_path / "model").adata.n_obs == trained.adata.n_obs


def test_pickles_beside_a_model_are_never_executed(saved, tmp_path, messy):
    marker = tmp_path / "pwned"
    for name in ("model.pt", "model.pkl", "model.ckpt", "pytorch_model.bin", "params.pt", "optimizer.pt"):
        (saved / name).write_bytes(malicious_pickle(marker))
    model = CellVAE.load(saved, adata=messy)
    assert np.isfinite(model.get_latent()).all()
    assert not marker.exists()


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "history.json"])
def test_a_pickle_in_place_of_a_model_file_is_refused_unexecuted(saved, tmp_path, victim):
    marker = tmp_path / "pwned"
    (saved / victim).write_bytes(malicious_pickle(marker))
    if victim == "history.json":  # (only the history: the model loads without it)
        with pytest.warns(UserWarning, match=r"history\.json is not a readable training history"):
            assert CellVAE.load(saved).history.empty
    else:
        with pytest.raises(ValueError, match=victim.replace(".", r"\.")):
            CellVAE.load(saved)
    assert not marker.exists()


def test_a_torch_save_file_is_refused(saved, trained):
    torch.save(trained.module.state_dict(), saved / "model.safetensors")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        CellVAE.load(saved)


@pytest.mark.parametrize("keep", [0, 7, 100, 0.5, 0.99])
def test_truncated_weights_are_refused(saved, keep):
    blob = (saved / "model.safetensors").read_bytes()
    size = int(len(blob) * keep) if isinstance(keep, float) else keep
    (saved / "model.safetensors").write_bytes(blob[:size])
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        CellVAE.load(saved)


def test_weights_damaged_in_place_are_refused(saved):
    """A file of the right length whose last bytes were zeroed (a disk or copy fault) parses, but fails the checksum."""
    blob = bytearray((saved / "model.safetensors").read_bytes())
    blob[-64:] = bytes(64)
    (saved / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupt: its tensors do not match the checksum"):
        CellVAE.load(saved)


def test_truncated_config_is_refused(saved):
    text = (saved / "config.json").read_text()
    (saved / "config.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match="not a readable cellvae config.json"):
        CellVAE.load(saved)


@pytest.mark.parametrize(
    "field, value", [("n_latent", 5), ("n_hidden", 10**12), ("n_layers", 3), ("n_layers", 10**6), ("likelihood", "zinb")]
)
def test_weights_that_disagree_with_the_config_are_refused(saved, field, value):
    config = json.loads((saved / "config.json").read_text())
    config[field] = value
    (saved / "config.json").write_text(json.dumps(config))
    started = time.perf_counter()
    with pytest.raises(ValueError, match="does not match its config.json"):
        CellVAE.load(saved)
    assert time.perf_counter() - started < 5  # shapes are checked without allocating the hostile model


def test_weights_with_a_missing_or_extra_tensor_are_refused(saved, trained):
    state = {k: v.contiguous() for k, v in trained.module.state_dict().items()}
    state["decoder.extra"] = torch.zeros(3)
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match="decoder.extra"):
        CellVAE.load(saved)
    del state["decoder.extra"], state["decoder.log_theta"]
    save_file(state, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match="decoder.log_theta"):
        CellVAE.load(saved)


def test_weights_copied_from_another_models_folder_are_refused(saved, trained, tmp_path):
    """Same shapes, other genes or batches: they loaded silently, each gene decoded with another gene's weights."""
    other = trained.adata.copy()
    other.var_names = [f"other{i}" for i in range(other.n_vars)]
    CellVAE(other, **MODEL_ARGS).save(tmp_path / "other")
    shutil.copy(saved / "model.safetensors", tmp_path / "other" / "model.safetensors")
    with pytest.raises(ValueError, match="was not saved with this config.json: the genes, batches or covariates"):
        CellVAE.load(tmp_path / "other")
    config = json.loads((saved / "config.json").read_text())
    for change in ({"batch_categories": config["batch_categories"][::-1]}, {"gene_names": config["gene_names"][::-1]}):
        (saved / "config.json").write_text(json.dumps(config | change))
        with pytest.raises(ValueError, match="was not saved with this config.json"):
            CellVAE.load(saved)
    renamed = {"layer": "raw_counts", "batch_key": config["batch_key"] and "sample"}  # obs/layer names: free to rename
    (saved / "config.json").write_text(json.dumps(config | renamed))
    assert CellVAE.load(saved).config.layer == "raw_counts"


def test_weights_without_cellvaes_metadata_or_trained_with_another_beta_load_with_a_warning(saved, trained, tmp_path):
    """Another model's weights written again by safetensors' save_file (which drops the metadata holding the checksum
    and layout) loaded silently under this config.json's genes; weights of a model with another beta (same genes,
    batches and shapes) loaded under a config.json that described them wrongly."""
    from safetensors.torch import load_file

    other = trained.adata.copy()
    other.var_names = [f"other{i}" for i in range(other.n_vars)]
    CellVAE(other, **MODEL_ARGS).save(tmp_path / "other")
    save_file(load_file(saved / "model.safetensors"), tmp_path / "other" / "model.safetensors")
    with pytest.warns(UserWarning, match=r"model.safetensors holds none of the metadata CellVAE.save writes .*cannot be checked"):
        CellVAE.load(tmp_path / "other")
    with no_warnings():  # the model's own files
        CellVAE.load(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (one epoch: collapsed)
        CellVAE(trained.adata, **(MODEL_ARGS | {"beta": 5.0})).fit(max_epochs=1, progress=False).save(tmp_path / "beta5")
    shutil.copy(tmp_path / "beta5" / "model.safetensors", saved / "model.safetensors")
    with pytest.warns(UserWarning, match=r"was trained with beta=5, but config.json says beta=1: were the weights copied"):
        loaded = CellVAE.load(saved)
    assert loaded.config.beta == 1.0 and loaded.train_settings.beta == 5.0


def test_weights_of_the_wrong_shape_are_refused_before_any_tensor_is_read(saved, trained, monkeypatch):
    """A file whose header promises other shapes (e.g. a huge tensor) is refused from its header alone."""
    state = {k: v.contiguous() for k, v in trained.module.state_dict().items()}
    state["decoder.log_theta"] = torch.zeros(100_000)
    save_file(state, str(saved / "model.safetensors"))
    opened = cellvae.model.safe_open
    tensors_read = []

    class Spy:  # safe_open as it is, counting the tensors read
        def __init__(self, *args, **kwargs):
            self.handle = opened(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exception):
            return self.handle.__exit__(*exception)

        def get_tensor(self, name):
            tensors_read.append(name)
            return self.inner.get_tensor(name)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    monkeypatch.setattr(cellvae.model, "safe_open", Spy)
    told = r"its config.json \(tensors differing: 1; decoder.log_theta: \[100000\] F32, config.json's model has \[40\] F32\)"
    with pytest.raises(ValueError, match=told):
        CellVAE.load(saved)
    assert tensors_read == []
    trained.save(saved, overwrite=True)
    assert CellVAE.load(saved).is_trained and len(tensors_read) == len(state)  # the spy passes a good file on


@pytest.mark.parametrize(
    "change",
    [
        {"format_version": FORMAT_VERSION + 1},
        {"format_version": "1"},
        {"format_version": None},
        {"format_version": 0},
        {"format_version": True},
        {"gene_names": 5},
        {"gene_names": "ACTB"},
        {"gene_names": [1, 2, 3]},
        {"gene_names": ["ACTB", "ACTB"]},
        {"gene_names": []},
        {"batch_categories": ["a", "a"]},
        {"categorical_covariate_keys": ["donor", "site"]},
        {"categorical_covariate_categories": []},
        {"continuous_covariate_mean": [0.0, 1.0]},
        {"continuous_covariate_std": ["wide"]},
        {"categorical_covariate_categories": {"donor": []}},
        {"layer": 3},
        {"encode_batch": "yes"},
        {"n_latent": "4"},
        {"dropout": "high"},
        {"likelihood": "gaussian"},
        {"unknown_field": 1},
    ],
)
def test_invalid_or_newer_configs_are_refused(saved, change):
    config = json.loads((saved / "config.json").read_text())
    config.update(change)
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json|format version|must be"):
        CellVAE.load(saved)


def test_newer_format_version_asks_to_upgrade(saved):
    config = json.loads((saved / "config.json").read_text())
    config["format_version"] = FORMAT_VERSION + 1
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"format version {FORMAT_VERSION + 1}.*upgrade cellvae"):
        CellVAE.load(saved)


def test_things_that_are_not_a_model_are_refused(tmp_path, saved):
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    (tmp_path / "a_file").write_text("{}")
    for path in (tmp_path / "empty", tmp_path / "other", tmp_path / "a_file", saved / "config.json"):
        with pytest.raises(ValueError, match="is not a saved cellvae model"):
            CellVAE.load(path)
    with pytest.raises(FileNotFoundError, match=r"missing does not exist: give the folder a model was saved in"):
        CellVAE.load(tmp_path / "missing")


def test_an_unreadable_config_is_refused_and_an_unreadable_history_left_out_with_a_warning(saved, messy):
    config = (saved / "config.json").read_text()
    (saved / "config.json").write_text("[" * 100_000)  # deeper than Python's json parser recurses
    with pytest.raises(ValueError, match="not a readable cellvae config.json"):
        CellVAE.load(saved)
    (saved / "config.json").write_text(config)
    latent = CellVAE.load(saved).get_latent(messy)
    for junk in ("[" * 100_000, "[1, 2, 3]", "[[1, 2], [3]]", '{"epoch": 1}', "7", "{oops"):  # no per-epoch records
        (saved / "history.json").write_text(junk)
        with pytest.warns(UserWarning, match="not a readable training history .* loaded without it"):
            loaded = CellVAE.load(saved)  # the weights are whole
        assert loaded.history.empty and loaded.is_trained
        np.testing.assert_array_equal(loaded.get_latent(messy), latent)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int32])
def test_weights_of_another_dtype_are_refused(saved, trained, dtype):
    """save writes float32 weights: a file of others is not a cellvae model (loading it would cast them)."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in trained.module.state_dict().items()}
    save_file({k: v.contiguous() for k, v in state.items()}, str(saved / "model.safetensors"))
    with pytest.raises(ValueError, match=r"tensors differing: \d+; \S+: \[\d+(, \d+)?\] (F16|F64|I32), config.json's model has"):
        CellVAE.load(saved)


@pytest.mark.parametrize("cast", ["double", "half"])
def test_a_model_cast_to_another_float_type_saves_float32_weights_that_load(trained, tmp_path, cast):
    model = copy.deepcopy(trained)
    getattr(model.module, cast)()
    model.save(tmp_path / "cast")
    loaded = CellVAE.load(tmp_path / "cast")
    assert all(v.dtype == torch.float32 for v in loaded.module.state_dict().values() if v.is_floating_point())
    expected = {
        k: v.to(getattr(torch, {"double": "float64", "half": "float16"}[cast])).float()
        for k, v in trained.module.state_dict().items()
    }
    for name, value in loaded.module.state_dict().items():
        torch.testing.assert_close(value, expected[name] if value.is_floating_point() else value, rtol=0, atol=0)


@pytest.mark.parametrize("cast", ["double", "half"])
def test_a_model_cast_to_another_float_type_is_told_to_cast_back_before_any_output(trained, cast):
    """torch's own error ("mat1 and mat2 must have the same dtype") named no way back; .float() is one."""
    model = copy.deepcopy(trained)
    getattr(model.module, cast)()
    dtype = {"double": "float64", "half": "float16"}[cast]
    told = rf"model.module's parameters are {dtype} \(cast, e.g. by .double\(\) or .half\(\)\).*model.module.float\(\)"
    query = model.adata[:40].copy()
    query.obs["batch"] = "new"  # (the reference's weights were grafted into a float32 query model: torch's error)
    mapping = lambda: model.map_query(query, max_epochs=1, progress=False)  # noqa: E731
    for output in (model.get_latent, model.get_normalized_expression, lambda: model.generate(5), model.fit, mapping):
        with pytest.raises(TypeError, match=told):
            output()
    model.module.float()  # (the half cast rounded the weights)
    np.testing.assert_allclose(model.get_latent(), trained.get_latent(), atol=1e-6 if cast == "double" else 1e-2)


@pytest.mark.parametrize("field", ["layer", "batch_key", "n_hidden", "gene_names", "cellvae_version"])
def test_a_config_without_a_field_save_always_writes_is_refused(saved, field):
    """A default in its place would, e.g., read counts from X instead of the layer the model was trained on."""
    config = json.loads((saved / "config.json").read_text())
    del config[field]
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"lacks config fields that save writes into every config.json, \['{field}'\]"):
        CellVAE.load(saved)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan"), float("inf")])
def test_continuous_covariate_scales_that_would_break_the_embedding_are_refused(tmp_path, std):
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0)
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(axis=1)).ravel())
    CellVAE(adata, continuous_covariate_keys=["depth"]).save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    config["continuous_covariate_std"] = [std]  # 0 or NaN: every embedding NaN; -1 or inf: the covariate flipped or lost
    (tmp_path / "model" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="continuous_covariate_std must hold finite positive numbers"):
        CellVAE.load(tmp_path / "model")


def test_continuous_covariate_values_too_large_for_the_model_are_refused_where_cells_are_embedded_or_decoded():
    """1e22 and beyond (float32 reaches 3.4e38) made every embedding and expression value NaN, told only by warnings."""
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=20, random_state=0)
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(axis=1)).ravel())
    model = CellVAE(adata, continuous_covariate_keys=["depth"], n_hidden=8, n_latent=2).fit(max_epochs=1, progress=False)
    huge = adata.copy()
    huge.obs["depth"] = 1e22  # (NaN outputs from about here; 1e40 is beyond float32)
    told = r"continuous covariate (obs|covariates)\[.depth.\] has \d+ values? too far from those the model was trained with"
    far = adata.copy()  # one cell far off is named, by its own value
    far.obs["depth"] = far.obs["depth"].to_numpy() + np.where(np.arange(far.n_obs) == 7, -1e15, 0.0)
    with pytest.raises(ValueError, match=r"has 1 value too far from those the model was trained with \(e.g. -1e\+15, over"):
        model.get_latent(far)
    for call in (
        lambda: model.get_latent(huge),
        lambda: model.get_normalized_expression(huge),
        lambda: model.decode(np.zeros((2, 2)), covariates={"depth": 1e40}),
        lambda: model.decode(np.zeros((2, 2)), covariates={"depth": 1e22}),
    ):
        with pytest.raises(ValueError, match=told):
            call()


def test_minus_zero_and_zero_are_one_category_as_pandas_holds_them():
    """A float column's -0.0 was written '-0.0': a category of its own beside 0.0 in training, and a new one in
    map_query (pd.Categorical([0.0, -0.0]) has the one category 0.0)."""
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=20, n_batches=2, random_state=0)
    adata.obs["dose"] = np.where(np.arange(adata.n_obs) % 3 == 0, 1.0, np.where(np.arange(adata.n_obs) % 2, -0.0, 0.0))
    model = CellVAE(adata, batch_key="batch", categorical_covariate_keys=["dose"])
    assert model.config.categorical_covariate_categories["dose"] == ["0.0", "1.0"]
    as_categories = adata.copy()
    as_categories.obs["dose"] = pd.Categorical(as_categories.obs["dose"])
    assert CellVAE(as_categories, batch_key="batch", categorical_covariate_keys=["dose"]).config == model.config
    written = adata.copy()  # a model whose category is '-0.0' (saved before -0.0 was read as 0.0): still reads its cells
    written.obs["dose"] = np.where(adata.obs["dose"] == 1.0, "1.0", "-0.0")
    old = CellVAE(written, batch_key="batch", categorical_covariate_keys=["dose"], n_hidden=8, n_latent=2)
    assert old.config.categorical_covariate_categories["dose"] == ["-0.0", "1.0"]
    old.fit(max_epochs=1, progress=False)
    np.testing.assert_array_equal(old.get_latent(adata), old.get_latent(written))


def test_a_folder_whose_subfolder_has_a_model_files_name_is_not_overwritten(trained, tmp_path):
    folder = tmp_path / "thesis"
    (folder / "config.json").mkdir(parents=True)  # a folder, not a model's file
    (folder / "config.json" / "chapter1.tex").write_text("the user's work")
    with pytest.raises(ValueError, match="overwrite=True replaces only a folder written by CellVAE.save"):
        trained.save(folder, overwrite=True)
    assert (folder / "config.json" / "chapter1.tex").read_text() == "the user's work"


def test_a_model_saved_under_the_home_folder_loads_by_the_same_path(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    trained.save("~/models/pbmc")
    assert (tmp_path / "models" / "pbmc" / "config.json").is_file()
    assert CellVAE.load("~/models/pbmc").config == trained.config


@pytest.mark.parametrize("name", ["dropout", "beta", "free_bits", "batch_mmd"])
def test_a_weight_of_the_wrong_type_is_named(messy, name):
    with pytest.raises(ValueError, match=f"{name} must be a number, got '0.1'"):
        CellVAE(messy, **{name: "0.1"})


def test_save_takes_an_empty_folder_made_ahead_but_not_a_link_to_one(trained, tmp_path):
    """A folder made first (mkdir, then save) was refused as existing: overwrite=True was needed to fill it. It is
    filled, not replaced (review 47: its permissions were lost, a private folder made world-readable)."""
    (tmp_path / "made").mkdir()
    (tmp_path / "made").chmod(0o700)
    (tmp_path / "made" / ".DS_Store").write_bytes(b"")  # (macOS's Finder leaves one in folders it shows)
    folder = (tmp_path / "made").stat()
    trained.save(tmp_path / "made")
    assert sorted(os.listdir(tmp_path / "made")) == [".DS_Store", "config.json", "history.json", "model.safetensors"]
    assert (tmp_path / "made").stat().st_ino == folder.st_ino and (tmp_path / "made").stat().st_mode == folder.st_mode
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "made", adata=trained.adata).get_latent(), trained.get_latent())
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty", target_is_directory=True)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(tmp_path / "link")
    assert os.listdir(tmp_path / "empty") == []


def test_save_writes_into_the_working_directory_and_mount_points_in_place(trained, messy, tmp_path, monkeypatch):
    """Review 47: a model folder that is the working directory was replaced by renames (the shell left in a deleted
    folder, later writes failing), and a mount point (docker -v) could not be renamed: training lost at the end."""
    (tmp_path / "here").mkdir()
    monkeypatch.chdir(tmp_path / "here")
    trained.save(tmp_path / "here", save_anndata=True)
    loaded = CellVAE.load(tmp_path / "here")  # (its adata.h5ad, read backed from this folder)
    loaded.save(tmp_path / "here", overwrite=True)  # saved back: its adata.h5ad is kept
    assert os.getcwd() == str(tmp_path / "here") and Path("notes.txt").write_text("still here")
    assert sorted(os.listdir()) == ["adata.h5ad", "config.json", "history.json", "model.safetensors", "notes.txt"]
    Path("notes.txt").unlink()
    with pytest.warns(UserWarning, match="adata.h5ad that .* held, saved with the model this one replaced, was removed"):
        CellVAE(messy, **MODEL_ARGS).save(tmp_path / "here", overwrite=True)  # another model: the adata.h5ad goes
    assert sorted(os.listdir()) == ["config.json", "history.json", "model.safetensors"]
    monkeypatch.chdir(tmp_path)
    saved = tmp_path / "mounted"
    trained.save(saved)
    inode = saved.stat().st_ino
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == saved)  # as a mount point, renamed at no price
    CellVAE(messy, **MODEL_ARGS).save(saved, overwrite=True)  # (an untrained model over the trained one)
    assert saved.stat().st_ino == inode and not CellVAE.load(saved, adata=messy).is_trained
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [] and not list(saved.glob(".*"))
    # review 48: a bind mount, which os.path.ismount does not tell, refuses the rename (EBUSY): filled in place
    monkeypatch.undo()
    replace = os.replace

    def busy(source, target):
        if Path(source) == saved:
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        replace(source, target)

    monkeypatch.setattr(os, "replace", busy)
    trained.save(saved, overwrite=True)
    assert saved.stat().st_ino == inode and CellVAE.load(saved, adata=messy).is_trained
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [] and not list(saved.glob(".*"))
    # review 49: its files were copied over the old ones, so a full disk left neither model: now copied in first
    copy2 = shutil.copy2

    def disk_full(source, target, **kwargs):
        if Path(source).name == "model.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return copy2(source, target, **kwargs)

    monkeypatch.setattr(shutil, "copy2", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        CellVAE(messy, **MODEL_ARGS).save(saved, overwrite=True)
    assert CellVAE.load(saved, adata=messy).is_trained  # the old model, whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [] and not list(saved.glob(".*"))
    # review 50: a model loaded from the folder, saved back: its adata.h5ad (read backed) is kept, not copied twice
    monkeypatch.setattr(shutil, "copy2", copy2)
    trained.save(saved, overwrite=True, save_anndata=True)
    monkeypatch.setattr(shutil, "copy2", lambda *a, **k: pytest.fail("copied") if "adata" in str(a[0]) else copy2(*a, **k))
    link = os.link

    def across_mounts(source, target):  # (review 52: the data was copied out to the parent first, then thrown away)
        if Path(source).parent == saved and Path(target).parent.parent != saved:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
        link(source, target)

    monkeypatch.setattr(os, "link", across_mounts)
    loaded = CellVAE.load(saved)
    data_inode = (saved / "adata.h5ad").stat().st_ino
    loaded.save(saved, overwrite=True)
    assert (saved / "adata.h5ad").stat().st_ino == data_inode and saved.stat().st_ino == inode
    np.testing.assert_array_equal(CellVAE.load(saved).get_latent(), trained.get_latent(messy))
    del loaded
    monkeypatch.undo()
    # reviews 53-54: adata.h5ad alone mounted (docker -v data.h5ad:/models/m/adata.h5ad) links nowhere and cannot be
    # replaced (the model was left without config.json) nor moved aside with its folder (a stray folder): left as it is
    mounted_data = saved / "adata.h5ad"
    data_inode = mounted_data.stat().st_ino

    def file_mounted_link(source, target):
        if Path(source) == mounted_data:
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
        link(source, target)

    def file_mounted_replace(source, target):
        if Path(target) == mounted_data:
            raise OSError(errno.EBUSY, "Device or resource busy", str(source))
        replace(source, target)

    loaded = CellVAE.load(saved)
    monkeypatch.setattr(os, "link", file_mounted_link)
    monkeypatch.setattr(os, "replace", file_mounted_replace)
    loaded.save(saved, overwrite=True)
    assert mounted_data.stat().st_ino == data_inode and saved.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [] and not list(saved.glob(".*"))
    np.testing.assert_array_equal(CellVAE.load(saved).get_latent(), trained.get_latent(messy))
    # review 55: saves that would replace or remove the mounted file are refused before any change (the old model
    # was left without config.json, or moved aside with the mount in it)
    model_files = {file.name: file.read_bytes() for file in saved.iterdir()}
    for other, keywords in ((loaded, {"save_anndata": True}), (CellVAE(messy, **MODEL_ARGS), {})):
        verb = "replace" if keywords else "remove"
        with pytest.raises(OSError, match=rf"adata.h5ad is mounted on its own .* this save cannot {verb} it: save the model"):
            other.save(saved, overwrite=True, **keywords)
        assert {file.name: file.read_bytes() for file in saved.iterdir()} == model_files
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # stopped midway in place: the hint says what works with a file that cannot be moved, and the model saves again
    monkeypatch.setattr(os, "replace", lambda source, target: ctrl_c() if "history" in str(source) else replace(source, target))
    with pytest.raises(KeyboardInterrupt):
        loaded.save(saved, overwrite=True)
    assert sorted(os.listdir(saved)) == ["adata.h5ad", "history.json", "model.safetensors"]
    monkeypatch.setattr(os, "replace", file_mounted_replace)
    with pytest.raises(
        ValueError,
        match=r"if so, delete all but its adata.h5ad, which is mounted, and save into it again the model loaded from it",
    ):
        CellVAE.load(saved)
    (saved / "history.json").unlink()
    (saved / "model.safetensors").unlink()
    loaded.save(saved, overwrite=True)  # (a folder holding only this model's own data)
    np.testing.assert_array_equal(CellVAE.load(saved).get_latent(), trained.get_latent(messy))
    del loaded
    monkeypatch.undo()
    # a folder whose parent cannot be written (a mount in a read-only one) is written into
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, mode: Path(where) != tmp_path and access(where, mode))
    CellVAE(messy, **MODEL_ARGS).save(saved, overwrite=True)
    assert saved.stat().st_ino == inode and not CellVAE.load(saved, adata=messy).is_trained
    monkeypatch.undo()
    # stopped between its files: no mix of two models (new weights, old config), but no config.json, which load refuses
    monkeypatch.setattr(os.path, "ismount", lambda path: Path(path) == saved)
    replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda source, target: replace(source, target) if "history" not in str(source) else ctrl_c()
    )
    with pytest.raises(KeyboardInterrupt):
        CellVAE(messy, **MODEL_ARGS).save(saved, overwrite=True)
    assert sorted(os.listdir(saved)) == ["history.json", "model.safetensors"]  # (the new weights, the old history)
    hint = r"\(as a save into the folder itself that was stopped midway leaves it: if so, empty it and save the model into "
    hint += r"it again, or train it anew\)"
    with pytest.raises(
        ValueError,
        match=r"mounted is not a saved cellvae model: it needs config.json and model.safetensors \(written by CellVAE.save\) "
        + hint,
    ):
        CellVAE.load(saved, adata=messy)
    monkeypatch.setattr(os, "replace", replace)
    stopped = r"holding history.json, model.safetensors but no config.json "
    with pytest.raises(ValueError, match=stopped + hint + ".*or empty or remove it yourself"):
        trained.save(saved, overwrite=True)  # (review 51: replacing it would replace a user's folder holding such weights)
    for file in saved.iterdir():
        file.unlink()
    trained.save(saved)
    assert CellVAE.load(saved, adata=messy).is_trained
    (tmp_path / "results").mkdir()  # the user's data alone: no model's, and not told as a stopped save's
    (tmp_path / "results" / "adata.h5ad").write_text("the user's data")
    with pytest.raises(ValueError, match=r"results exists and is a folder holding adata.h5ad but no config.json or model.safe"):
        trained.save(tmp_path / "results", overwrite=True)
    messy.write_h5ad(tmp_path / "data.h5ad")  # (review 56: a model reading the user's data backed made it a model folder)
    shutil.copy(tmp_path / "data.h5ad", tmp_path / "results" / "adata.h5ad")
    backed = CellVAE(ad.read_h5ad(tmp_path / "results" / "adata.h5ad", backed="r"), **MODEL_ARGS)
    with pytest.raises(ValueError, match=r"results exists and is a folder holding adata.h5ad but no config.json or model.safe"):
        backed.save(tmp_path / "results", overwrite=True)
    del backed
    (tmp_path / "results" / "adata.h5ad").write_text("the user's data")
    shutil.copy(saved / "model.safetensors", tmp_path / "results")  # (review 51: beside cellvae's weights it was replaced)
    keep = r"if so, move its adata.h5ad out, empty the folder, save the model into it again and move adata.h5ad back, or train"
    with pytest.raises(ValueError, match=r"holding adata.h5ad, model.safetensors but no config.json \(as a save into.*" + keep):
        trained.save(tmp_path / "results", overwrite=True)
    assert (tmp_path / "results" / "adata.h5ad").read_text() == "the user's data"
    shutil.move(tmp_path / "results" / "adata.h5ad", tmp_path / "adata.h5ad")  # the advice, followed (review 53)
    for file in (tmp_path / "results").iterdir():
        file.unlink()
    trained.save(tmp_path / "results")
    shutil.move(tmp_path / "adata.h5ad", tmp_path / "results" / "adata.h5ad")
    assert CellVAE.load(tmp_path / "results", adata=messy).is_trained
    # a save killed inside the folder leaves its staging folder there: told as such when saving again
    (saved / ".mounted.abcd1234").mkdir()
    with pytest.raises(ValueError, match=r"holding what a save into it that was killed left \(.mounted.abcd1234/: remove that\)"):
        trained.save(saved, overwrite=True)


def ctrl_c():
    raise KeyboardInterrupt


def test_save_refuses_to_overwrite_unless_asked(trained, saved):
    with pytest.raises(FileExistsError, match="overwrite=True"):
        trained.save(saved)
    trained.save(saved, overwrite=True)
    assert sorted(os.listdir(saved)) == ["config.json", "history.json", "model.safetensors"]
    assert [p.name for p in saved.parent.iterdir() if p.name.startswith(".")] == []


def test_save_overwrites_only_a_model_folder(trained, tmp_path, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    (results / "analysis.h5ad").write_text("the user's work")
    notes = tmp_path / "notes.txt"
    notes.write_text("notes")
    trained.save(tmp_path / "model_folder")
    (tmp_path / "link").symlink_to(tmp_path / "model_folder", target_is_directory=True)
    what_they_are = {results: "a folder holding other files", notes: "a file", tmp_path / "link": "a symbolic link"}
    for path, what in what_they_are.items():
        with pytest.raises(ValueError, match=f"exists and is {what}.*, not a saved cellvae model folder"):
            trained.save(path, overwrite=True)
    assert (results / "analysis.h5ad").read_text() == "the user's work" and notes.read_text() == "notes"
    # files of a model's names that CellVAE.save did not write: another library's model, the user's notes
    other_library, own_notes = tmp_path / "bert", tmp_path / "notes"
    other_library.mkdir(), own_notes.mkdir()
    (other_library / "config.json").write_text('{"architectures": ["BertModel"]}')
    save_file({"w": torch.ones(3)}, other_library / "model.safetensors")
    (own_notes / "config.json").write_text('{"gene_names": ["a"], "n_latent": 2, "likelihood": "nb"}')
    told = {
        other_library: r"a folder whose files \(config.json, model.safetensors\) are not a cellvae model's \(\S+ is another's\)",
        own_notes: r"a folder holding config.json but no model.safetensors",
    }
    for folder, what in told.items():
        before = {entry.name: entry.read_bytes() for entry in folder.iterdir()}
        with pytest.raises(ValueError, match=rf"exists and is {what}, not a saved cellvae model folder"):
            trained.save(folder, overwrite=True)
        assert {entry.name: entry.read_bytes() for entry in folder.iterdir()} == before
    (tmp_path / "empty").mkdir()
    trained.save(tmp_path / "empty", overwrite=True)  # an empty folder (e.g. made for it) takes the model
    assert CellVAE.load(tmp_path / "empty").config == trained.config
    for folder in (other_library, own_notes, tmp_path / "empty"):
        shutil.rmtree(folder)
    monkeypatch.chdir(results)
    for path in (".", "..", ""):
        with pytest.raises(ValueError, match="needs a folder name"):
            trained.save(path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["link", "model_folder", "notes.txt", "results"]


def test_save_anndata_refuses_an_anndata_whose_genes_were_renamed_before_writing_it(tmp_path):
    """An audit: var_names changed after fitting (e.g. to other gene IDs) were written, and load failed later, in words
    that named neither the folder's file nor load_anndata=False."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    model = CellVAE(adata, n_hidden=16).fit(max_epochs=1, progress=False)
    adata.var_names = ["x" + name for name in adata.var_names]
    with pytest.raises(ValueError, match=r"only 0 of the model's 50 genes are in its var_names now .*renamed or removed"):
        model.save(tmp_path / "model", save_anndata=True)
    assert not (tmp_path / "model").exists()
    model.save(tmp_path / "model")  # (without its data) and a folder whose saved AnnData no longer fits it
    adata.write_h5ad(tmp_path / "model" / "adata.h5ad")
    with pytest.raises(
        ValueError, match=r"adata.h5ad, the AnnData saved with the model, does not fit it: only 0 of .*load_anndata"
    ):
        CellVAE.load(tmp_path / "model")
    assert CellVAE.load(tmp_path / "model", load_anndata=False).adata is None
    batches = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    CellVAE(batches, batch_key="batch", n_hidden=16).save(tmp_path / "batches")
    del batches.obs["batch"]
    batches.write_h5ad(tmp_path / "batches" / "adata.h5ad")
    with pytest.raises(ValueError, match=r"does not fit it: obs column 'batch' .*found.*\. Load the model without it") as told:
        CellVAE.load(tmp_path / "batches")
    assert '"' not in str(told.value)  # (a KeyError's text quoted again)


def test_copies_of_a_model_built_on_a_view_are_whole_and_of_a_backed_one_refused_with_the_way_out(tmp_path):
    """copy.deepcopy of a model on adata[:, genes] (anndata deep-copies a view with its parent's shape) gave a model
    whose outputs said the data had been filtered; a backed model failed in h5py's words."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=60, random_state=0)
    model = CellVAE(adata[:, :40], n_hidden=16).fit(max_epochs=1, progress=False)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.adata.shape == (200, 40)
        np.testing.assert_array_equal(copied.get_latent(), model.get_latent())
    assert model.adata.is_view  # the original keeps its view
    copied = CellVAE(adata.copy(), n_hidden=16)
    copied.adata.X = None  # no counts left where the model reads them: still copied (a review: the check raised)
    assert copy.deepcopy(copied).adata.X is None
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = CellVAE(ad.read_h5ad(tmp_path / "cells.h5ad", backed="r"), n_hidden=16)
    for copy_it in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match=r"reads its counts from disk \(.*cells.h5ad, backed\).*CellVAE.load\(path, adata"):
            copy_it(backed)


def test_save_anndata_writes_the_data_that_load_then_uses_and_leaves_the_users_anndata_as_it_was(trained, tmp_path):
    """scvi-tools' ``save(save_anndata=True)``: ``load(path)`` gives the model back with its data."""
    obs_before, uns_keys = trained.adata.obs.copy(), sorted(trained.adata.uns)
    donor = obs_before["donor"].dtype  # strings (object; str under pandas 3): anndata's writer makes them categorical in place
    assert pd.api.types.is_string_dtype(donor) and not isinstance(donor, pd.CategoricalDtype)
    trained.save(tmp_path / "model", save_anndata=True)
    assert sorted(os.listdir(tmp_path / "model")) == ["adata.h5ad", "config.json", "history.json", "model.safetensors"]
    pd.testing.assert_frame_equal(trained.adata.obs, obs_before)
    assert sorted(trained.adata.uns) == uns_keys
    loaded = CellVAE.load(tmp_path / "model")
    assert loaded.adata is not None and loaded.adata.shape == trained.adata.shape
    np.testing.assert_array_equal(loaded.adata.layers["counts"].toarray(), trained.adata.layers["counts"].toarray())
    np.testing.assert_allclose(loaded.get_latent(), trained.get_latent(), atol=1e-6)
    given = trained.adata[:50].copy()  # data given to load is the model's, not the folder's
    assert CellVAE.load(tmp_path / "model", adata=given).adata is given
    # loaded from the folder, trained further, saved back without save_anndata: the folder keeps its data,
    # also where the model reads its counts from that very file
    backed = CellVAE.load(tmp_path / "model", adata=ad.read_h5ad(tmp_path / "model" / "adata.h5ad", backed="r"))
    expected = backed.get_latent()
    backed.save(tmp_path / "model", overwrite=True)
    assert sorted(os.listdir(tmp_path / "model")) == ["adata.h5ad", "config.json", "history.json", "model.safetensors"]
    np.testing.assert_array_equal(backed.get_latent(), expected)
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "model").get_latent(), expected)
    backed.adata.file.close()
    in_memory = CellVAE.load(tmp_path / "model")  # read into memory from the folder: also kept
    in_memory.save(tmp_path / "model", overwrite=True)
    assert "adata.h5ad" in os.listdir(tmp_path / "model")
    # loaded without its data, or with data given to load: the folder's data may be the only copy, kept too
    for loaded in (CellVAE.load(tmp_path / "model", load_anndata=False), CellVAE.load(tmp_path / "model", adata=trained.adata)):
        with no_warnings():
            loaded.save(tmp_path / "model", overwrite=True)
        assert "adata.h5ad" in os.listdir(tmp_path / "model")
    # loaded from one folder, saved to another, then back: the first folder's data are still its own
    loaded = CellVAE.load(tmp_path / "model", load_anndata=False)
    loaded.save(tmp_path / "elsewhere")
    loaded.save(tmp_path / "model", overwrite=True)
    assert "adata.h5ad" in os.listdir(tmp_path / "model")
    # another model saved over the folder: the data there are not its own, removed with the model, as a warning says
    other = CellVAE(trained.adata[:100].copy(), **MODEL_ARGS)
    with pytest.warns(UserWarning, match="adata.h5ad that .* held, saved with the model this one replaced, was removed"):
        other.save(tmp_path / "model", overwrite=True)
    assert "adata.h5ad" not in os.listdir(tmp_path / "model")
    # a folder this model was saved to, where another model then saved its data: that file is not this model's
    other.save(tmp_path / "elsewhere", overwrite=True, save_anndata=True)
    with pytest.warns(UserWarning, match="saved with the model this one replaced, was removed"):
        loaded.save(tmp_path / "elsewhere", overwrite=True)
    assert "adata.h5ad" not in os.listdir(tmp_path / "elsewhere")
    # a folder holding only an adata.h5ad is the user's data, never replaced as if it were a model
    (tmp_path / "data").mkdir()
    trained.adata.write_h5ad(tmp_path / "data" / "adata.h5ad")
    with pytest.raises(ValueError, match="not a saved cellvae model folder"):
        trained.save(tmp_path / "data", overwrite=True)
    assert os.listdir(tmp_path / "data") == ["adata.h5ad"]


def test_save_anndata_writes_pandas_string_columns_and_names_what_anndata_cannot_store(saved, trained, tmp_path):
    """Files of anndata 0.13 with pandas 3 hold pandas string columns, which anndata 0.12 writes only when allowed."""
    adata = trained.adata.copy()
    adata.obs["donor"] = adata.obs["donor"].astype("string")
    model = CellVAE.load(saved, adata=adata)
    model.save(tmp_path / "strings", save_anndata=True)
    assert CellVAE.load(tmp_path / "strings").adata.obs["donor"].tolist() == adata.obs["donor"].tolist()
    adata.uns["clusters_per_resolution"] = {0: 10, 1: 20}  # keys anndata cannot write
    with pytest.raises(ValueError, match=r"could not write the model's AnnData as adata.h5ad.*save without save_anndata"):
        model.save(tmp_path / "unwritable", save_anndata=True)
    assert not [name for name in os.listdir(tmp_path) if "unwritable" in name] and adata.uns["clusters_per_resolution"] == {
        0: 10,
        1: 20,
    }


def test_save_anndata_without_data_in_memory_is_refused_before_anything_is_written(trained, saved, tmp_path):
    without_data = CellVAE.load(saved)
    with pytest.raises(ValueError, match=r"has none.*CellVAE.load\(path, adata=adata\)"):
        without_data.save(tmp_path / "again", save_anndata=True)
    trained.adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = CellVAE.load(saved, adata=ad.read_h5ad(tmp_path / "cells.h5ad", backed="r"))
    advice = r"read from disk in .*cells.h5ad.*save without save_anndata.*with obs\['batch'\] holding each cell's batch"
    advice += r".*Results written into the AnnData .* are in memory only.*adata.write_h5ad\('with_results.h5ad'\)"
    with pytest.raises(ValueError, match=advice):
        backed.save(tmp_path / "again", save_anndata=True)
    # a view of the file: loading the whole file again would give outputs for other cells
    backed.adata = backed.adata[:40, 5:]
    with pytest.raises(ValueError, match=r"file read again and viewed as now \(.* a view of 40 cells and \d+ genes"):
        backed.save(tmp_path / "again", save_anndata=True)
    assert sorted(os.listdir(tmp_path)) == ["cells.h5ad", "model"]


def test_ctrl_c_before_the_first_epoch_ends_leaves_the_model_as_it_was(messy, monkeypatch):
    model = CellVAE(messy.copy(), **MODEL_ARGS)
    with monkeypatch.context() as patch:
        ctrl_c_at_call(cellvae.train, "evaluate", 1, patch)  # the first epoch's validation
        with pytest.raises(KeyboardInterrupt):
            quiet_fit(model)
    assert not model.is_trained and model.history.empty and model.train_settings is None
    trained = quiet_fit(model)  # trains as a new model would
    weights = {k: v.clone() for k, v in trained.module.state_dict().items()}
    history, settings = trained.history.copy(), trained.train_settings
    with monkeypatch.context() as patch:
        ctrl_c_at_call(cellvae.train, "evaluate", 1, patch)
        with pytest.raises(KeyboardInterrupt):
            quiet_fit(trained, lr=5e-3)
    assert trained.is_trained and trained.train_settings == settings
    pd.testing.assert_frame_equal(trained.history, history)
    for name, value in trained.module.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)


def test_ctrl_c_after_training_keeps_the_trained_model(messy, monkeypatch):
    """Ctrl-C during fit's checks after training (they only warn) skips them: the model is trained, with this run's settings."""
    model = quiet_fit(CellVAE(messy.copy(), **MODEL_ARGS))
    with monkeypatch.context() as patch:
        ctrl_c_at_call(CellVAE, "_mean_loss", 2, patch)  # the divergence probe after training
        with pytest.warns(RuntimeWarning, match="checks after training were skipped"):
            assert model.fit(max_epochs=3, lr=5e-3, progress=False) is model
    assert model.is_trained and model.train_settings.lr == 5e-3 and model.device.type == "cpu"
    assert len(model.history) == QUICK["max_epochs"]


def test_a_model_saved_after_ctrl_c_is_marked_and_load_says_so(messy, tmp_path, monkeypatch):
    with monkeypatch.context() as patch:
        ctrl_c_at_call(cellvae.train, "evaluate", 2, patch)  # in the second epoch
        with pytest.warns(RuntimeWarning, match="training interrupted"):
            model = CellVAE(messy.copy(), **MODEL_ARGS).fit(max_epochs=5, progress=False)
    assert len(model.history) == 1 and model.history.attrs["interrupted"]
    model.save(tmp_path / "model")
    with pytest.warns(UserWarning, match="saved after Ctrl-C stopped its training at epoch 1"):
        loaded = CellVAE.load(tmp_path / "model")
    assert loaded.is_trained and loaded.history.attrs["interrupted"]
    quiet_fit(model).save(tmp_path / "finished")  # trained further, to the end of its epochs
    with no_warnings():  # a model whose training ran to its end loads without a word
        assert not CellVAE.load(tmp_path / "finished").history.attrs.get("interrupted")


def test_a_backed_file_closed_during_fit_is_named_in_the_error(tmp_path, monkeypatch):
    cellvae.datasets.simulate(n_cells=300, n_genes=30, random_state=0).write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    evaluate = cellvae.train.evaluate

    def closing_then_evaluating(*args, **kwargs):  # as if the user closed it from another thread
        backed.file.close()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(cellvae.train, "evaluate", closing_then_evaluating)
    with pytest.raises(ValueError, match="cells.h5ad was closed while fit was reading it; keep it open"):
        quiet_fit(CellVAE(backed, **TINY))


def test_a_query_model_whose_backed_query_was_closed_says_to_open_it_again(tmp_path):
    """A query model's copy of a backed query reads the file's matrix, which anndata does not reopen: h5py's error."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=30, n_batches=3, random_state=0)
    last = adata.obs["batch"] == adata.obs["batch"].cat.categories[-1]
    adata[last.to_numpy()].copy().write_h5ad(tmp_path / "query.h5ad")
    reference = quiet_fit(CellVAE(adata[~last.to_numpy()].copy(), batch_key="batch", **TINY))
    query = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    query_model = reference.map_query(query, max_epochs=1, progress=False)
    query.file.close()
    with pytest.raises(ValueError, match=r"from an .h5ad file that has been closed .* anndata.read_h5ad\(path, backed='r'\)"):
        query_model.get_latent(progress=False)
    reopened = query_model.get_latent(ad.read_h5ad(tmp_path / "query.h5ad", backed="r"), progress=False)
    np.testing.assert_array_equal(reopened, query_model.get_latent(ad.read_h5ad(tmp_path / "query.h5ad"), progress=False))


def test_ctrl_c_between_the_renames_of_save_puts_the_old_model_back(trained, tmp_path, monkeypatch):
    trained.save(tmp_path / "model")
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    changed = CellVAE.load(tmp_path / "model")
    with torch.no_grad():
        next(changed.module.parameters()).add_(1.0)
    with monkeypatch.context() as patch:
        ctrl_c_at_call(os, "replace", 2, patch)  # the old model moved aside, the new one not yet in place
        with pytest.raises(KeyboardInterrupt):
            changed.save(tmp_path / "model", overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert os.listdir(tmp_path) == ["model"]  # no staging or set-aside folder left


SAVE_LOOP = textwrap.dedent(
    """
    import sys, torch
    import cellvae
    from cellvae import CellVAE
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=300, random_state=0)
    model = CellVAE(adata, n_hidden=256, n_latent=8)
    model.save(sys.argv[1], overwrite=True)
    print("saved", flush=True)
    while True:
        with torch.no_grad():
            for p in model.module.parameters():
                p.add_(1.0)
        model.save(sys.argv[1], overwrite=True)
    """
)


def test_killing_a_save_never_leaves_a_half_written_model(tmp_path):
    """Kill a process that keeps re-saving a model; whatever is at the path is always a complete model."""
    target = tmp_path / "model"
    for delay in (0.3, 0.55, 0.8):
        process = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(target)], stdout=subprocess.PIPE, text=True)
        assert process.stdout.readline().strip() == "saved"
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        if target.exists():
            model = CellVAE.load(target)
            weights = torch.cat([p.detach().flatten() for p in model.module.parameters()])
            assert np.isfinite(weights.numpy()).all()
        else:  # killed between the two renames: the previous model is set aside intact
            olds = list(tmp_path.glob(".model.old.*/model"))
            assert olds and CellVAE.load(olds[0])


# ----------------------------------------------------------------------------- extreme inputs


def test_very_large_counts_train_to_finite_results():
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=30, random_state=2, sparse=False)
    counts = adata.X.astype(np.float64)
    counts[0, 0] = 1e6  # one huge entry
    counts[1] = np.round(counts[1] / counts[1].sum() * 1e7)  # a very deep cell: 10^7 counts in total
    counts[1, 5] += 1e7 - counts[1].sum()
    adata.X = counts
    assert adata.X[1].sum() == 1e7
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the NaN guard must not fire
        warnings.simplefilter("ignore", UserWarning)
        model = CellVAE(adata, **TINY).fit(max_epochs=3, progress=False)
    assert np.isfinite(model.history.drop(columns="seconds").to_numpy()).all()
    assert np.isfinite(model.get_latent()).all()
    assert np.isfinite(model.get_normalized_expression()).all()
    assert np.isfinite(model.get_likelihood_parameters()["mean"]).all()
    assert np.isfinite(model.sample_counts()).all()


def test_one_gene_trains_and_embeds():
    adata = cellvae.datasets.simulate(n_cells=80, n_genes=1, random_state=0)
    model = quiet_fit(CellVAE(adata, **TINY))
    assert model.get_latent().shape == (80, 4) and np.isfinite(model.get_latent()).all()
    np.testing.assert_allclose(model.get_normalized_expression(), 1e4, rtol=1e-5)


def test_one_cell_is_refused_for_training_but_embeds(trained, messy):
    one = messy[:1].copy()
    with pytest.raises(ValueError, match="at least 10 cells"):
        CellVAE(one, **MODEL_ARGS).fit(max_epochs=1, progress=False)
    latent = trained.get_latent(one)
    np.testing.assert_allclose(latent, trained.get_latent(messy)[:1], rtol=1e-5, atol=1e-6)
    assert trained.sample_counts(one).shape == (1, messy.n_vars)


# ----------------------------------------------------------------------------- a model saved by version 1 loads forever

MODEL_V1 = Path(__file__).parent / "data" / "model_v1"


def test_model_saved_by_format_version_1_still_loads_and_gives_the_same_output():
    """tests/data/model_v1 was saved once by cellvae 0.1 (format 1) and must never be regenerated."""
    config = json.loads((MODEL_V1 / "config.json").read_text())
    assert config["format_version"] == 1
    model = CellVAE.load(MODEL_V1)
    assert model.config.gene_names == [f"gene{i}" for i in range(20)] and model.config.batch_key == "batch"
    assert len(model.history) == 5
    table = pd.read_csv(MODEL_V1.parent / "model_v1_input.csv", index_col=0)
    cells = ad.AnnData(
        X=sp.csr_matrix(table.drop(columns="batch").to_numpy(dtype=np.float32)),
        obs=pd.DataFrame({"batch": table["batch"].to_numpy()}, index=table.index.astype(str)),
        var=pd.DataFrame(index=table.columns.drop("batch")),
    )
    latent = pd.read_csv(MODEL_V1.parent / "model_v1_latent.csv", index_col=0).to_numpy()
    expression = pd.read_csv(MODEL_V1.parent / "model_v1_expression.csv", index_col=0).to_numpy()
    np.testing.assert_allclose(model.get_latent(cells), latent, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.get_normalized_expression(cells), expression, rtol=1e-4, atol=1e-3)
    more_cells = ad.concat([cells] * 2, index_unique="-")  # it can be trained further on cells of its batches
    refitted = quiet_fit(CellVAE.load(MODEL_V1, adata=more_cells), max_epochs=1)
    assert np.isfinite(refitted.get_latent()).all()


def test_weights_files_with_their_metadata_entries_one_by_one_still_load(messy, trained, tmp_path):
    """Files saved before the metadata became one JSON entry hold "trained", "interrupted" and "sha256" as
    entries of their own: they load as before, and their checksum is still checked."""
    from safetensors import safe_open

    CellVAE(messy, **MODEL_ARGS).save(tmp_path / "untrained")
    trained.save(tmp_path / "trained")
    for name in ("untrained", "trained"):
        weights = tmp_path / name / "model.safetensors"
        with safe_open(str(weights), framework="pt") as handle:
            entries = json.loads(handle.metadata()["cellvae"])
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        for newer in ("train_settings", "brief_training"):  # (newer than that format: such files have none)
            entries.pop(newer, None)
        save_file(tensors, weights, metadata=entries)
    assert not CellVAE.load(tmp_path / "untrained", adata=messy).is_trained
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "trained").get_latent(messy), trained.get_latent(messy))
    save_file(tensors, weights, metadata=entries | {"sha256": "0" * 64})
    with pytest.raises(ValueError, match="do not match the checksum"):
        CellVAE.load(tmp_path / "trained")
    for damaged in ("{not json", "[1, 2]"):
        save_file(tensors, weights, metadata={"cellvae": damaged})
        with pytest.raises(ValueError, match="is corrupt or not a safetensors file"):
            CellVAE.load(tmp_path / "trained")


def test_a_model_saves_to_the_same_bytes_whether_or_not_its_progress_bar_showed(tmp_path):
    """Pipelines that cache by file contents rerun nothing for --quiet: the bar changes nothing trained."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    for progress in (True, False):
        CellVAE(adata, n_hidden=16).fit(max_epochs=2, random_state=0, progress=progress).save(tmp_path / str(progress))
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "True" / name).read_bytes() == (tmp_path / "False" / name).read_bytes()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "False" / "model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()["cellvae"])["train_settings"]["progress"] is True  # (older cellvae needs it)


def test_saved_train_settings_are_restored_and_damaged_ones_refused(trained, tmp_path):
    """save stores fit's settings with the weights; load gives them back and refuses settings that fit never wrote."""
    from safetensors import safe_open

    trained.save(tmp_path / "model")
    assert CellVAE.load(tmp_path / "model").train_settings == trained.train_settings
    weights = tmp_path / "model" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        entries = json.loads(handle.metadata()["cellvae"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    assert entries["train_settings"]["max_epochs"] == trained.train_settings.max_epochs
    good = entries["train_settings"]
    damaged = [
        [1, 2],
        {key: value for key, value in good.items() if key != "lr"},
        good | {"unknown_setting": 1},
        good | {"max_epochs": "many"},
        good | {"max_epochs": True},
        good | {"early_stopping": 1},
        good | {"precision": 16},
        good | {"precision": "float16"},  # not one fit takes
    ]
    for settings in damaged:
        save_file(tensors, weights, metadata={"cellvae": json.dumps(entries | {"train_settings": settings})})
        with pytest.raises(ValueError, match="is corrupt: its train_settings metadata"):
            CellVAE.load(tmp_path / "model")
    without_precision = {key: value for key, value in good.items() if key != "precision"}  # it has a default
    save_file(tensors, weights, metadata={"cellvae": json.dumps(entries | {"train_settings": without_precision})})
    assert CellVAE.load(tmp_path / "model").train_settings.precision == "float32"


def test_a_model_whose_older_config_holds_true_for_beta_and_kl_warmup_saves_settings_that_load(messy, tmp_path):
    """Older cellvae accepted True (1) for beta and kl_warmup, and such configs still load: fit's settings of that
    model hold 1.0 and 1, not the bools that load would refuse as damaged settings."""
    quiet_fit(CellVAE(messy.copy(), **MODEL_ARGS)).save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps(config | {"beta": True, "kl_warmup": True}))
    model = quiet_fit(CellVAE.load(tmp_path / "old", adata=messy.copy()))
    assert (model.train_settings.beta, model.train_settings.kl_warmup_epochs) == (1.0, 1)
    model.save(tmp_path / "new")
    assert CellVAE.load(tmp_path / "new").train_settings == model.train_settings


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_saved_model_gets_the_usual_file_permissions(trained, tmp_path, umask, monkeypatch):
    """Not the owner-only modes of temporary files: colleagues can read a model saved in a shared folder,
    as the umask allows; save never sets the umask (process-wide: another thread's files would get its mode)."""
    before = os.umask(umask)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(os, "umask", lambda mask: pytest.fail("save set the process's umask"))
            trained.save(tmp_path / "model")
    finally:
        os.umask(before)
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o777 & ~umask
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "history.json", "model.safetensors"]
    for file in (tmp_path / "model").iterdir():
        assert file.stat().st_mode & 0o666 == 0o666 & ~umask, file.name


# ----------------------------------------------------------------------------- bad arguments


def _with_scanpy_neighbors(adata: ad.AnnData, key_added: str = "neighbors") -> ad.AnnData:
    with_graph = adata.copy()
    connectivities = "connectivities" if key_added == "neighbors" else f"{key_added}_connectivities"
    with_graph.uns[key_added] = {"connectivities_key": connectivities, "params": {"n_neighbors": 15, "method": "umap"}}
    return with_graph


def _with_record(adata: ad.AnnData, key: str) -> ad.AnnData:
    recorded = adata.copy()
    recorded.uns[key] = {"params": {}}  # e.g. sc.pp.pca's, beside its obsm["X_pca"]
    return recorded


def _counts_replaced_by_x(adata: ad.AnnData) -> ad.AnnData:
    replaced = adata.copy()
    replaced.layers["counts"] = replaced.X.copy()  # log-normalised: refused as counts
    return replaced


def _in_new_batches(adata: ad.AnnData) -> ad.AnnData:
    query = adata.copy()
    query.obs["batch"] = "new_" + query.obs["batch"].astype(str)
    return query


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, patience=0), "patience must be"),
        (
            lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, random_state=None),
            r"random_state must be an integer seed, e.g. 0, got None \(scanpy also takes None or a RandomState",
        ),
        (lambda m, a: cellvae.tl.embed(a.copy(), random_state=np.random.RandomState(0)), "scanpy also takes None"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, random_state=-1), "random_state must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, device=3), "device must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, device="gpu"), "device must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, device=torch.device("meta")), "device must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=0), "max_epochs must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(batch_size=0), "batch_size must be"),
        (lambda m, a: m.get_latent(a, batch_size=0), "batch_size must be"),
        (lambda m, a: m.get_latent(a, batch_size=-5), "batch_size must be"),
        (lambda m, a: m.get_latent(a, random_state=None), "random_state must be"),
        (lambda m, a: m.get_normalized_expression(a, batch_size=0), "batch_size must be"),
        (lambda m, a: m.get_normalized_expression(a, library_size=-1.0), "library_size must be"),
        (lambda m, a: m.get_normalized_expression(a, library_size=float("nan")), "library_size must be"),
        (lambda m, a: m.get_normalized_expression(a, transform_batch="no such batch"), "transform_batch .* not among"),
        (lambda m, a: m.get_likelihood_parameters(a, batch_size=0), "batch_size must be"),
        (lambda m, a: m.sample_counts(a, n_samples=0), "n_samples must be"),
        (lambda m, a: m.sample_counts(a, random_state=None), "random_state must be"),
        (lambda m, a: m.sample_counts(a, batch_size=0), "batch_size must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, validation_size=1.5), "validation_size must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, lr=0.0), "lr must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, weight_decay="1e-6"), "weight_decay must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, weight_decay=float("nan")), "weight_decay must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, weight_decay=-1.0), "weight_decay must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, early_stopping="no"), "early_stopping must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, progress=None), "progress must be"),
        (lambda m, a: m.map_query(a, progress="quiet"), "progress must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, checkpoint_dir=__file__), "is a file, not a folder"),
        (lambda m, a: CellVAE(a, categorical_covariate_keys="batch"), "categorical_covariate_keys takes a list"),
        (lambda m, a: m.map_query(a, batch_size=0), "batch_size must be"),
        (lambda m, a: m.map_query(a, validation_size=1.5), "validation_size must be"),
        (lambda m, a: m.map_query(a, lr=0.0), "lr must be"),
        (lambda m, a: m.map_query(a, patience=0), "patience must be"),
        (lambda m, a: m.map_query(a, random_state=None), "random_state must be"),
        # told before the query's counts are read (these are not counts)
        (lambda m, a: m.map_query(_counts_replaced_by_x(a), device="gpu"), "device must be"),
        (lambda m, a: m.map_query(_counts_replaced_by_x(a), train_input_layer="yes"), "train_input_layer must be"),
        (lambda m, a: m.rate_distortion(a, n_samples=0), "n_samples must be"),
        (lambda m, a: m.rate_distortion(a, random_state=None), "random_state must be"),
        (lambda m, a: m.marginal_log_likelihood(a, random_state=None), "random_state must be"),
        (lambda m, a: m.inference_gaps(a[:5], n_steps=1, lr=-1.0), "lr must be"),
        (lambda m, a: m.inference_gaps(a[:5], n_steps=1, random_state=None), "random_state must be"),
        (
            lambda m, a: m.decode(
                np.zeros((2, m.config.n_latent)),
                covariates={"donor": a.obs["donor"].iloc[0], "percent_mito": 0.05},
                library_size=-1.0,
            ),
            "library_size must be",
        ),
        (
            lambda m, a: m.decode(
                np.zeros((2, m.config.n_latent)),
                covariates={"donor": a.obs["donor"].iloc[0], "percent_mito": 0.05},
                library_size=[1e4, float("nan")],
            ),
            "library_size must be",
        ),
        (lambda m, a: m.generate(5, library_size=-5.0), "library_size must be"),
        (lambda m, a: m.generate(5, random_state=None), "random_state must be"),
        (lambda m, a: m.generate(5, batch_size=0), "batch_size must be"),
        (lambda m, a: m.decode(np.zeros((2, m.config.n_latent)), batch_size=0), "batch_size must be"),
        (lambda m, a: m.marginal_log_likelihood(a, batch_size=0), "batch_size must be"),
        (lambda m, a: m.active_units(a, threshold=-1.0), "threshold must be"),
        (lambda m, a: m.active_units(a, threshold=float("nan")), "threshold must be"),
        (lambda m, a: m.get_latent(a, random_state=-1), "random_state must be"),
        (lambda m, a: m.get_latent(a, random_state=2**70), "random_state must be"),
        # scanpy and scikit-learn (the CLI's UMAP, the sweep's KMeans) take seeds below 2**32: told before training
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, random_state=2**32), "below 2\\*\\*32"),
        (lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas=(1.0,), layer="counts", random_state=2**32), "below 2"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "beta": float("inf")}), "beta must be"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "beta": 1e40}), "beta must be"),  # finite, but overflows float32 in the loss
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "beta": True}), "beta must be"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "free_bits": 1e300}), "free_bits must be"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "batch_mmd": 1e300}), "batch_mmd must be"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "kl_warmup": True}), "kl_warmup must be"),
        (
            lambda m, a: CellVAE(a, **{**MODEL_ARGS, "likelihood": "poisson", "dispersion": "gene-batch"}),
            "dispersion='gene-batch' would be ignored",
        ),  # would be ignored
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, lr=float("inf")), "lr must be"),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, lr=True), "lr must be"),
        (lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas=1.0, layer="counts"), "betas takes a sequence"),
        (lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas=(1.0,), layer="counts", random_state=-1), "random_state must be"),
        (
            lambda m, a: cellvae.tl.embed(a.copy(), layer="counts", fit_kwargs={"max_epochs": 1}),
            "pass \\['max_epochs'\\] as the function's own arguments",
        ),
        (
            lambda m, a: cellvae.tl.latent_shift(m, a, groupby="batch", source="b0", target="b0", apply_to=[0]),
            "source and target are the same group",
        ),
        # a list where one name is expected (categorical_covariate_keys takes lists; these do not)
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "batch_key": ["batch"]}), r"batch_key takes one obs column name"),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "layer": ["counts"]}), r"layer takes one layer name"),
        (lambda m, a: m.map_query(a, batch_key=["batch"]), r"batch_key takes one obs column name"),
        (lambda m, a: cellvae.tl.transfer_labels(a, a.copy(), ["cell_type"]), r"labels_key takes one obs column name"),
        (
            lambda m, a: cellvae.tl.latent_shift(m, a, groupby=["batch"], source="b0", target="b1", apply_to=[0]),
            "groupby takes one",
        ),
        # flags given as text (from a config file, say) are refused, not read as True
        (lambda m, a: m.save(__file__, overwrite="False"), "overwrite must be True or False"),
        (lambda m, a: m.get_latent(a, mean="False"), "mean must be True or False"),
        (
            lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, checkpoint_dir=os.path.join(__file__, "ck"), resume="False"),
            "resume must be",
        ),
        (lambda m, a: cellvae.tl.rank_genes_groups(a.copy(), "batch", model=m, pts="False"), "pts must be True or False"),
        (lambda m, a: cellvae.tl.transfer_labels(a, a.copy(), "batch", use_rep="counts", soft=1), "soft must be True or False"),
        (lambda m, a: m.save(None), "save needs a folder path"),
        (lambda m, a: CellVAE.load(None), "load needs the folder a model was saved in, e.g. 'my_model/', got None"),
        (
            lambda m, a: CellVAE(a, **MODEL_ARGS).fit(
                max_epochs=1, checkpoint_dir=os.path.join(__file__, "ck"), checkpoint_every=True
            ),
            "checkpoint_every must be a positive number of epochs, got True",
        ),
        (lambda m, a: m.get_normalized_expression(a, library_size=True), "library_size must be"),
        (lambda m, a: m.get_normalized_expression(a, gene_list=a.var["highly_variable"]), r"adata.var_names\[mask\]"),
        (lambda m, a: m.get_normalized_expression(a, gene_list=[0, 1]), r"adata.var_names\[mask\]"),
        (lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas="10", layer="counts"), "betas takes numbers"),
        (lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas=(1.0,), layer="counts", held_out=None), "held_out must be"),
        (
            lambda m, a: cellvae.tl.rate_distortion_sweep(a, betas=(1.0,), layer="counts", validation_size=0.2),
            r"\['validation_size'\] are options of CellVAE.fit; pass them as fit_kwargs",
        ),
        (
            lambda m, a: cellvae.tl.embed(_with_scanpy_neighbors(a), layer="counts", key_added="neighbors"),
            r"adata.uns\['neighbors'\]\['params'\] is another tool's record",
        ),
        (  # a graph named after the embedding's record (a second run of a pipeline)
            lambda m, a: cellvae.tl.embed(_with_scanpy_neighbors(a, key_added="cellvae"), layer="counts"),
            r"uns\['cellvae'\] holds a neighbours graph's record, which sc.pp.neighbors\(..., key_added='cellvae'\) wrote",
        ),
        (lambda m, a: cellvae.tl.embed(_with_record(a, "pca"), key_added="X_pca"), r"sc.pp.pca wrote .*uns\['pca'\]"),
        (lambda m, a: cellvae.tl.embed(_with_record(a, "draw_graph"), key_added="X_draw_graph_fa"), "sc.tl.draw_graph wrote"),
        (lambda m, a: cellvae.tl.embed(_with_record(a, "umap"), key_added="X_umap_vae", n_hidden=0), "n_hidden must be"),
        (lambda m, a: cellvae.tl.transfer_labels(a, a.copy(), "cell_type", unknown_threshold="0.5"), "must be a number in"),
        # a saved model's path or None where a tool takes the model
        (lambda m, a: cellvae.tl.rank_genes_groups(a.copy(), "batch", model=None), "model must be a CellVAE, got NoneType"),
        (lambda m, a: cellvae.tl.interpolate("my_model/", [0], [1]), "model must be a CellVAE, got str"),
        (lambda m, a: cellvae.tl.interpolate(Path("my_model"), [0], [1]), r"got \w+Path 'my_model'; train one"),
        (lambda m, a: cellvae.pl.history("my_model/", show=False), "CellVAE.load"),
        (lambda m, a: cellvae.pl.kl_per_dimension(None, show=False), "model must be a CellVAE"),
        (  # a sweep's frame where the model goes: told in one line, not with the frame's repr
            lambda m, a: cellvae.pl.history(pd.DataFrame({"beta": [1.0], "rate": [2.0]}), show=False),
            r"^model must be a CellVAE, got DataFrame; train one",
        ),
        # told before training, not as a bare OSError after the first epoch; and not training on 2 cells
        (
            lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, checkpoint_dir=os.path.join(__file__, "ck")),
            "cannot hold the checkpoints .*Not a directory",
        ),
        (lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, checkpoint_dir=123), "checkpoint_dir takes a folder path"),
        (lambda m, a: m.decode("abc"), "z takes latent codes as numbers"),
        (lambda m, a: m.decode(None), r"z takes latent codes as numbers, n × \d+ \(e.g. model.get_latent\(\)\), got None"),
        (
            lambda m, a: CellVAE(a, **MODEL_ARGS).fit(max_epochs=1, validation_size=0.99),
            r"validation_size=0.99 leaves 2 of 240 cells to train on",
        ),
        (lambda m, a: CellVAE(a, **{**MODEL_ARGS, "dropout": False}), r"dropout must be a number in \[0, 1\), got False"),
        (lambda m, a: cellvae.datasets.simulate(n_cells=10, mean_library_size=0), "mean_library_size must be a positive"),
        (lambda m, a: cellvae.datasets.simulate(n_cells=10, batch_effect=float("nan")), "batch_effect must be a finite"),
        (  # map_query takes fit's training arguments, and refuses the same
            lambda m, a: m.map_query(_in_new_batches(a), max_epochs=1, validation_size=0.99),
            r"validation_size=0.99 leaves 2 of 240 cells to train on",
        ),
    ],
)
def test_bad_arguments_give_a_documented_error(call, message, trained, messy):
    with pytest.raises((ValueError, TypeError), match=message):  # the message names what is wrong
        call(trained, messy)


def test_training_settings_that_undo_training_are_told():
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=200, n_batches=1, random_state=0)
    with warnings.catch_warnings(record=True) as diverged:
        warnings.simplefilter("always")
        model = CellVAE(adata, n_hidden=64).fit(max_epochs=10, lr=1.0, progress=False)
    assert [str(w.message)[:29] for w in diverged] == ["training made the model worse"]  # and no collapse warning
    message = str(diverged[0].message)
    assert "lr=1)" in message and "as it was before this fit (untrained): fit it again with a smaller one" in message
    assert message.endswith("model.fit(lr=0.001), the default") and diverged[0].category is RuntimeWarning
    assert not model.is_trained and model.history.empty  # undone: following the advice on this model works
    # the tools refuse to go on with an undone fit: tl.embed wrote an untrained model's embedding over the earlier one
    embedded = adata.copy()
    embedded.obsm["X_cellvae"] = np.ones((adata.n_obs, 10), dtype=np.float32)
    before = embedded.copy()
    advice = r"training diverged and was undone .*\(lr=1\): run it again with a smaller one, e.g. fit_kwargs=\{'lr': 0.001\}"
    with pytest.warns(RuntimeWarning, match="training made the model worse"):
        with pytest.raises(RuntimeError, match=rf"tl.embed: {advice}; nothing was written into adata"):
            cellvae.tl.embed(embedded, max_epochs=10, progress=False, n_hidden=64, fit_kwargs={"lr": 1.0})
    assert_unchanged(before, embedded)
    with warnings.catch_warnings(record=True) as told:  # each beta left out is named (no rows of untrained models)
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=rf"rate_distortion_sweep: no beta trained; {advice}"):
            cellvae.tl.rate_distortion_sweep(adata, betas=(1, 2), max_epochs=10, progress=False, fit_kwargs={"lr": 1.0})
    assert [str(w.message)[:32] for w in told if "left out" in str(w.message)] == [
        "beta=1 left out of the sweep: tr",
        "beta=2 left out of the sweep: tr",
    ]
    assert not any("not trained" in str(w.message) for w in told)
    untrained = CellVAE(adata, n_hidden=64)
    before = {k: v.clone() for k, v in untrained.module.state_dict().items()}
    with pytest.warns(RuntimeWarning, match="training made the model worse"):
        untrained.fit(max_epochs=10, lr=1.0, progress=False, random_state=1)
    assert all(torch.equal(v, before[k]) for k, v in untrained.module.state_dict().items())  # its own, not fit's draw
    with no_warnings():  # the default lr improves the loss: nothing to tell
        model.fit(max_epochs=10, progress=False)
    fresh = CellVAE(adata, n_hidden=64).fit(max_epochs=10, progress=False)
    np.testing.assert_array_equal(model.get_latent(), fresh.get_latent())  # as if the diverged run had not been
    trained = {k: v.clone() for k, v in model.module.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"lr=1000\). The model is given back as it was before this fit: .*lr=0.001"):
        model.fit(max_epochs=3, lr=1000.0, progress=False)  # a trained model keeps its weights and history
    assert model.is_trained and len(model.history) == 10
    assert all(torch.equal(v, trained[k]) for k, v in model.module.state_dict().items())
    with pytest.warns(UserWarning, match=r"kl_warmup=100 epochs is longer than the 5 epochs .* about 0.05 × beta"):
        CellVAE(adata, kl_warmup=100).fit(max_epochs=5, progress=False)
    with pytest.warns(UserWarning, match=r"batch_mmd has no effect: obs\['batch'\] holds a single batch"):
        CellVAE(adata, batch_key="batch", batch_mmd=10.0)
    adata.obs["depth"] = np.linspace(1e299, 1e300, adata.n_obs)  # its variance overflows float64
    with pytest.raises(ValueError, match=r"obs\['depth'\] has values too large to scale.*np.log1p"):
        CellVAE(adata, continuous_covariate_keys=["depth"])


def test_a_further_fit_that_ends_worse_than_the_model_it_continued_from_gives_that_model_back():
    """A trained model fitted further with too large a learning rate ended 4% worse on its held-out cells and was kept
    silently (only a loss 5% above the start counted as diverged, a bar set for training from random weights)."""
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=300, n_batches=2, random_state=0)
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=60, progress=False)
    latent, history, settings = model.get_latent(), model.history, model.train_settings
    message = (
        r"against 4\d\d\.\d when fit began, so this further fit did not improve on the trained model it continued from "
        r"\(lr=0.02 may be too large .*\)\. The model is given back as it was before this fit: .*model.fit\(lr=0.001\)"
    )
    with pytest.warns(RuntimeWarning, match=message):
        model.fit(max_epochs=5, lr=2e-2, progress=False)
    np.testing.assert_array_equal(model.get_latent(), latent)
    assert model.history is history and model.train_settings is settings
    with no_warnings():  # at the default lr it trains further: kept
        model.fit(max_epochs=10, progress=False)
    assert len(model.history) == 10 and model.history["validation_loss"].min() < history["validation_loss"].min()
    # judged on cells the earlier fit trained on (another random_state), which favour the model it began from, a
    # further fit is held to the first fit's bar (a review: such fits, better on unseen cells, were undone)
    other = CellVAE(adata, batch_key="batch").fit(max_epochs=60, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        other.fit(max_epochs=10, random_state=1, progress=False)
    assert [str(w.message)[:48] for w in caught] == ["55 of this fit's 60 validation cells were traini"]
    assert len(other.history) == 10


def test_a_first_fit_that_learns_nothing_is_kept_with_a_warning_and_a_query_fit_repeats_no_collapse_warning():
    """lr=1e-6 left the loss where the random weights had it (254.25 to 254.24 nats per cell), without a word, as
    did a first fit that ended 4.8% worse (under the 5% bar for undoing one)."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=2, random_state=1)
    message = (
        r"training did not lower the loss by more than its noise \(0.2%\): on 30 held-out cells it is 254\.\d+ nats per "
        r"cell, against 254\.\d+ with the random weights .* It is kept \(trained\); lr=1e-06 is likely too small: fit it "
        r"with lr=0.001$"
    )
    with pytest.warns(RuntimeWarning, match=message):
        model = CellVAE(adata, batch_key="batch", n_latent=4, n_hidden=16).fit(max_epochs=2, lr=1e-6, progress=False)
    assert model.is_trained
    # a query model's latent space is its reference's, whose fit told of its collapse: the query's fit does not repeat it
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=80, n_batches=3, random_state=1)
    reference = adata[adata.obs["batch"] != "batch2"].copy()
    query = adata[adata.obs["batch"] == "batch2"].copy()
    with pytest.warns(cellvae.diagnostics.PosteriorCollapseWarning):
        model = CellVAE(reference, batch_key="batch", n_latent=4, n_hidden=16, encode_batch=False)
        model.fit(max_epochs=2, progress=False)
    query_model = model.map_query(query, max_epochs=2, progress=False)
    with no_warnings():
        query_model.fit(max_epochs=2, progress=False)


def test_training_that_diverges_stops_at_the_first_epoch_far_above_the_loss_it_began_with(monkeypatch):
    """lr=10: the held-out loss was 2,804 nats per cell before training and 11 million after the first epoch, yet
    training ran on until early stopping (71 epochs on 1,000 atlas cells, most of a run at atlas scale)."""
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=200, n_batches=2, random_state=0)
    evaluated, evaluate = [], cellvae.train.evaluate
    monkeypatch.setattr(cellvae.train, "evaluate", lambda *args, **kw: evaluated.append(1) or evaluate(*args, **kw))
    message = r"so training diverged \(stopped after epoch 0 of 100, numbered from 0\), most likely .* \(lr=10\)"
    with pytest.warns(RuntimeWarning, match=message):
        model = CellVAE(adata, batch_key="batch").fit(max_epochs=100, lr=10.0, progress=False)
    assert not model.is_trained and len(evaluated) == 1  # one epoch's validation, then undone
    # a run whose best epoch is sound is kept, and told where it stopped (here a bar of 0.9 times the start's loss)
    monkeypatch.setattr(cellvae.model, "DIVERGED_LOSS_RATIO", 0.9)
    message = (
        r"training diverged at epoch 0 of 100 \(numbered from 0\), .*lr=0.001\): its loss, \d+\.\d nats per cell, was "
        r"over 0.9 times the \d+\.\d when fit began, so training stopped there\. The model keeps its best epoch, "
        r"epoch 0; a smaller lr may train a better one, e.g. fit\(lr=0.0001\)$"
    )
    with pytest.warns(RuntimeWarning, match=message):
        model = CellVAE(adata, batch_key="batch").fit(max_epochs=100, progress=False)
    assert model.is_trained and len(model.history) == 1 and model.history.attrs["diverged_epoch"] == 0


def test_the_default_kl_warm_up_of_a_run_of_under_four_epochs_is_a_quarter_of_its_steps():
    """A whole epoch of warm-up made a 1-epoch run (the default from ~5.3M cells) train with the KL at its full weight
    for its last step only, and half of a 2-epoch run."""
    adata = cellvae.datasets.simulate(n_cells=1000, n_genes=100, random_state=0)
    for epochs, weights in ((1, [1.0]), (2, [1.0, 1.0]), (4, [8 / 9, 1.0, 1.0, 1.0])):
        model = CellVAE(adata).fit(max_epochs=epochs, batch_size=100, progress=False)  # 9 steps per epoch
        assert model.train_settings.kl_warmup_epochs == (epochs / 4 if epochs < 4 else 1)
        np.testing.assert_allclose(model.history["kl_weight"], weights)  # the epoch's last step's weight
    model = CellVAE(adata).fit(max_epochs=8, batch_size=100, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"][:2], [8 / 18, 17 / 18])  # two whole epochs from 8 on


def test_the_steps_of_the_kl_warm_up_train_at_its_weight_not_at_full_beta():
    """A test audit: steps trained at full beta while history["kl_weight"] showed the ramp passed every test. Trained
    with the KL almost off (a warm-up 100 times the run), the latent space carries far more than at full weight."""
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=60, random_state=0)
    rates = []
    for kl_warmup in (0, 300):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a warm-up longer than the run, told so
            model = CellVAE(adata, n_hidden=16, n_latent=4, kl_warmup=kl_warmup)
            model.fit(max_epochs=3, random_state=0, progress=False)
        rates.append(float(model.rate_distortion(progress=False)["rate"].mean()))
    assert rates[1] > 1.2 * rates[0], rates  # (1.42 here; the same model, 1.0, where the steps ignore the warm-up)


def test_a_skipped_one_cell_minibatch_is_not_a_step_of_the_kl_warm_up():
    adata = cellvae.datasets.simulate(n_cells=361, n_genes=100, random_state=0)  # 361 = 360 + a last minibatch of one cell
    model = CellVAE(adata, normalization="batch", kl_warmup=1)
    model.fit(max_epochs=3, batch_size=360, validation_size=0, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"], [0.0, 1.0, 1.0])  # warmed up after one epoch, as asked
    # the warm-up counts minibatches: over 2 epochs of 4 here, 1/8 more KL weight each (history: an epoch's last)
    model = CellVAE(adata, kl_warmup=2).fit(max_epochs=3, batch_size=100, validation_size=0, progress=False)
    np.testing.assert_allclose(model.history["kl_weight"], [3 / 8, 7 / 8, 1.0])


def test_a_model_saved_with_settings_older_cellvae_accepted_still_loads(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    model = CellVAE(adata, batch_key="batch", likelihood="poisson").fit(max_epochs=2, progress=False)
    model.save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    config |= {"dispersion": "gene-batch", "beta": 1e7}  # refused for new models, accepted (and harmless) before
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = CellVAE.load(tmp_path / "old", adata=adata)
    np.testing.assert_array_equal(loaded.get_latent(), model.get_latent())
    with pytest.raises(ValueError, match="a Poisson likelihood has no dispersion"):
        CellVAE(adata, batch_key="batch", likelihood="poisson", dispersion="gene-batch")


def test_a_model_trained_on_x_after_scanpys_normalisation_names_the_way_to_its_counts(messy):
    """Trained on counts in X, then X normalised as scanpy's tutorials do: the error shows how to hand the
    trained model its counts from a layer, and that way gives the embedding of the counts."""
    counts = ad.AnnData(X=messy.layers["counts"].copy(), obs=messy.obs[["batch"]].copy(), var=messy.var[[]].copy())
    model = quiet_fit(CellVAE(counts, batch_key="batch", n_latent=3, n_hidden=16))
    expected = model.get_latent()
    adata = messy.copy()  # log-normalised X, the counts in layers["counts"]
    with pytest.raises(ValueError, match=re.escape("ad.AnnData(X=adata.layers['counts'], obs=adata.obs, var=adata.var)")):
        model.get_latent(adata)
    given = ad.AnnData(X=adata.layers["counts"], obs=adata.obs, var=adata.var)
    np.testing.assert_array_equal(model.get_latent(given), expected)


def test_keys_given_as_a_pandas_index_or_the_wrong_place_are_read_or_told(messy, trained):
    adata = messy.copy()
    as_index = CellVAE(adata, **{**MODEL_ARGS, "categorical_covariate_keys": adata.obs.columns[adata.obs.columns == "donor"]})
    as_array = CellVAE(adata, **{**MODEL_ARGS, "continuous_covariate_keys": np.array(["percent_mito"])})
    assert as_index.config.categorical_covariate_keys == ["donor"] and type(as_index.config.categorical_covariate_keys[0]) is str
    assert as_array.config.continuous_covariate_keys == ["percent_mito"]
    with pytest.raises(KeyError, match=r"layer 'X' not found .* the counts in adata.X are read with layer=None"):
        CellVAE(adata, layer="X")
    # a query without one of the reference's covariates is told before its counts are read (these are not counts)
    query = _counts_replaced_by_x(adata)
    del query.obs["donor"]
    with pytest.raises(KeyError, match=r"obs columns \['donor'\] \(covariates of the reference\) not found in query_adata"):
        trained.map_query(query)


def test_latent_shift_finds_the_groups_of_a_float_column_as_differential_expression_does(messy, trained):
    adata = messy.copy()
    adata.obs["dose"] = np.where(adata.obs["condition"] == "ctrl", 1.0, 2.0)  # written as floats: "1.0" and "2.0"
    by_number = cellvae.tl.latent_shift(trained, adata, groupby="dose", source=1, target=2, apply_to=[0, 1])
    by_name = cellvae.tl.latent_shift(trained, adata, groupby="dose", source="1.0", target="2.0", apply_to=[0, 1])
    np.testing.assert_array_equal(by_number.X, by_name.X)
    with pytest.raises(ValueError, match=r"source '3' is not a group of obs\['dose'\]; groups: \['1.0', '2.0'\]"):
        cellvae.tl.latent_shift(trained, adata, groupby="dose", source=3, target=2, apply_to=[0])
    signed_batches = adata.copy()  # a batch column of -0.0 and 0.0: one batch, which interpolate decodes its cells as
    signed_batches.obs["plate"] = np.where(np.arange(adata.n_obs) % 2, -0.0, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (one batch)
        by_plate = CellVAE(signed_batches, batch_key="plate", layer="counts", n_hidden=8, n_latent=2)
        by_plate.fit(max_epochs=1, progress=False)
    assert by_plate.config.batch_categories == ["0.0"]
    assert (
        cellvae.tl.interpolate(by_plate, [1], [3], 2, adata=signed_batches, progress=False).uns["interpolate"]["batch"] == "0.0"
    )
    for number in (0, -0.0):  # recorded as the model names the batch, as batch=None records it
        path = cellvae.tl.interpolate(by_plate, [1], [3], 2, adata=signed_batches, batch=number, progress=False)
        assert path.uns["interpolate"]["batch"] == "0.0"
    signed = adata.copy()  # -log10 of a dose of 1 is -0.0: one group with the cells at 0.0, as pandas holds them
    signed.obs["dose"] = np.where(adata.obs["condition"] == "ctrl", np.where(np.arange(adata.n_obs) % 2, -0.0, 0.0), 2.0)
    shifted = cellvae.tl.latent_shift(trained, signed, groupby="dose", source=0, target=2, apply_to=[0, 1])
    assert shifted.uns["latent_shift"]["source"] == "0.0"
    np.testing.assert_array_equal(
        shifted.X, cellvae.tl.latent_shift(trained, adata, groupby="dose", source=1, target=2, apply_to=[0, 1]).X
    )


def test_copy_true_returns_the_results_in_a_copy_and_leaves_the_anndata_as_it_was(messy, trained):
    adata = messy.copy()
    before = {"obs": adata.obs.copy(), "uns": set(adata.uns)}
    ranked = cellvae.tl.rank_genes_groups(adata, "condition", model=trained, n_draws=100, copy=True)
    labelled = cellvae.tl.transfer_labels(adata, adata, "cell_type", use_rep="X_pca", copy=True)
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert set(adata.uns) == before["uns"]
    assert set(ranked.uns["rank_genes_groups"]["names"].dtype.names) == {"ctrl", "stim"}
    assert {"cell_type_predicted", "cell_type_uncertainty", "cell_type_novelty"} <= set(labelled.obs)
    # the same results as written in place
    assert cellvae.tl.transfer_labels(adata, adata, "cell_type", use_rep="X_pca") is None
    pd.testing.assert_series_equal(adata.obs["cell_type_predicted"], labelled.obs["cell_type_predicted"])
    with pytest.raises(TypeError, match="copy must be True or False"):
        cellvae.tl.rank_genes_groups(adata, "condition", model=trained, copy="yes")


# each public function that reads an AnnData, given the path of a file instead (the AnnData is passed as `a`)
TAKES_AN_ANNDATA = {
    "CellVAE": (lambda m, a: CellVAE(a), "adata"),
    "get_latent": (lambda m, a: m.get_latent(a), "adata"),
    "get_normalized_expression": (lambda m, a: m.get_normalized_expression(a), "adata"),
    "get_likelihood_parameters": (lambda m, a: m.get_likelihood_parameters(a), "adata"),
    "sample_counts": (lambda m, a: m.sample_counts(a), "adata"),
    "differential_expression": (lambda m, a: m.differential_expression(a, groupby="cell_type"), "adata"),
    "rate_distortion": (lambda m, a: m.rate_distortion(a), "adata"),
    "map_query": (lambda m, a: m.map_query(a), "query_adata"),
    "tl.embed": (lambda m, a: cellvae.tl.embed(a), "adata"),
    "tl.rate_distortion_sweep": (lambda m, a: cellvae.tl.rate_distortion_sweep(a), "adata"),
    "tl.rank_genes_groups": (lambda m, a: cellvae.tl.rank_genes_groups(a, "cell_type", model=m), "adata"),
    "tl.transfer_labels ref": (lambda m, a: cellvae.tl.transfer_labels(a, m.adata, "cell_type"), "ref_adata"),
    "tl.transfer_labels query": (lambda m, a: cellvae.tl.transfer_labels(m.adata, a, "cell_type"), "query_adata"),
    "tl.latent_shift": (
        lambda m, a: cellvae.tl.latent_shift(m, a, groupby="condition", source="ctrl", target="stim", apply_to=[0]),
        "adata",
    ),
    "tl.interpolate": (lambda m, a: cellvae.tl.interpolate(m, 0, 1, adata=a), "adata"),
}


@pytest.mark.parametrize("name", list(TAKES_AN_ANNDATA))
def test_a_file_path_in_place_of_an_anndata_is_told_to_be_read_first(name, trained):
    """Every function taking an AnnData says so, and how to read the file, where it is given a path (half of them
    raised Python's "'str' object has no attribute 'uns'" from deep inside)."""
    call, argument = TAKES_AN_ANNDATA[name]
    message = rf"{argument} must be an AnnData, got the path 'pbmc.h5ad'; read the file first: anndata.read_h5ad\('pbmc.h5ad'\)"
    with pytest.raises(TypeError, match=message):
        call(trained, "pbmc.h5ad")
    with pytest.raises(TypeError, match=rf"{argument} must be an AnnData, got the path .*cellvae.read_zarr_lazy"):
        call(trained, Path("atlas.zarr"))


def test_every_argument_naming_cells_takes_the_forms_differential_expressions_idx1_takes(messy, trained):
    """interpolate's cells_a/cells_b and latent_shift's apply_to/reference read a condition on obs as idx1 does (they
    took it for a cell name), a slice as positions (read as a name too); a subset AnnData or obs table is refused
    with the advice to pass its names (numpy's "setting an array element with a sequence", or a KeyError naming
    its obs values as cells)."""
    adata = messy.copy()
    ctrl = (adata.obs["condition"] == "ctrl").to_numpy()
    forms = [np.flatnonzero(ctrl), adata.obs_names[ctrl], adata.obs["condition"] == "ctrl", "condition == 'ctrl'"]
    decoding = {"batch": "batch0", "covariates": {"donor": "d1", "percent_mito": 5.0}}
    calls = {
        "cells_a": lambda cells: cellvae.tl.interpolate(trained, cells, "condition == 'stim'", 3, adata=adata, **decoding).X,
        "apply_to": lambda cells: (
            cellvae.tl.latent_shift(trained, adata, groupby="cell_type", source="type0", target="type1", apply_to=cells).X
        ),
        "reference": lambda cells: (
            cellvae.tl.latent_shift(
                trained, adata, groupby="cell_type", source="type0", target="type1", apply_to=[0, 1], reference=cells
            ).X
        ),
    }
    for name, call in calls.items():
        expected = call(ctrl)
        for cells in forms:
            np.testing.assert_array_equal(call(cells), expected, err_msg=f"{name}={cells!r:.40}")
        np.testing.assert_array_equal(call(slice(10, 20)), call(np.arange(10, 20)))
        with pytest.raises(TypeError, match=rf"{name} takes cells .*got an AnnData; pass its cells' names, {name}.obs_names"):
            call(adata[ctrl])
        with pytest.raises(TypeError, match=rf"{name} takes cells .*got a DataFrame; pass its cells' names, {name}.index"):
            call(adata.obs[ctrl])
        with pytest.raises(KeyError, match=rf"{name}=.*no_such_cell.* is neither an obs name nor a condition"):
            call("no_such_cell")
    with pytest.raises(TypeError, match="idx1 takes cells .*got an AnnData"):
        trained.differential_expression(adata, idx1=adata[ctrl], n_draws=100)


def test_transfer_labels_refuses_a_list_where_it_takes_one_obsm_key_or_label(messy):
    """use_rep=["X_pca"] and unlabeled_category=["unknown"] raised pandas' bare "unhashable type: 'list'"."""
    with pytest.raises(TypeError, match=r"use_rep takes one obsm key name \(a string\), got \['X_pca'\]"):
        cellvae.tl.transfer_labels(messy, messy.copy(), "cell_type", use_rep=["X_pca"])
    with pytest.raises(TypeError, match=r"unlabeled_category takes one label name \(a string\), got \['type0'\]"):
        cellvae.tl.transfer_labels(messy, messy.copy(), "cell_type", use_rep="X_pca", unlabeled_category=["type0"])


def test_differential_expression_reads_group2_rest_as_rank_genes_groups_reads_reference_rest(messy, trained):
    """group2="rest" (scanpy's and tl.rank_genes_groups' reference="rest") compares with all other cells, as
    group2=None does (it was refused: "group 'rest' has no cells"); a group called "rest" is still that group."""
    against_none = trained.differential_expression(messy, groupby="cell_type", group1="type0", n_draws=100)
    against_rest = trained.differential_expression(messy, groupby="cell_type", group1="type0", group2="rest", n_draws=100)
    pd.testing.assert_frame_equal(against_rest, against_none)
    assert (against_rest["group2"] == "rest").all()


def test_a_latent_space_as_large_as_the_genes_gets_a_warning():
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=8, random_state=0)
    with pytest.warns(UserWarning, match=r"n_latent=10 is not below the 8 genes.*lower n_latent"):
        CellVAE(adata)
    with no_warnings():
        CellVAE(adata, n_latent=4)


# ----------------------------------------------------------------------------- progress of work after training


def test_long_work_after_training_shows_a_progress_bar_and_progress_false_or_a_quick_call_none(
    trained, messy, monkeypatch, capsys
):
    """A bar appears only once a call has lasted PROGRESS_DELAY_S (here made 0, as for an atlas); never with progress=False."""
    cells = messy[:60].copy()
    calls = {
        "get_latent": lambda progress: trained.get_latent(cells, progress=progress),
        "get_latent (refining)": lambda progress: trained.get_latent(cells, refine_steps=1, progress=progress),
        "get_normalized_expression": lambda progress: trained.get_normalized_expression(cells, progress=progress),
        "get_likelihood_parameters": lambda progress: trained.get_likelihood_parameters(cells, progress=progress),
        "sample_counts": lambda progress: trained.sample_counts(cells, progress=progress),
        "rate_distortion": lambda progress: trained.rate_distortion(cells, progress=progress),
        "kl_per_dimension": lambda progress: trained.kl_per_dimension(cells, progress=progress),
        "active_units": lambda progress: trained.active_units(cells, progress=progress),
        "kl_per_dimension (plot)": lambda progress: plt.close(
            cellvae.pl.kl_per_dimension(trained, cells, batch_size=7, progress=progress, show=False).figure
        ),
        "marginal_log_likelihood": lambda progress: trained.marginal_log_likelihood(cells, n_samples=2, progress=progress),
        "inference_gaps": lambda progress: trained.inference_gaps(
            cells[:4], n_steps=2, n_samples=2, n_elbo_samples=2, progress=progress
        ),
        "generate": lambda progress: trained.generate(30, progress=progress),
        "differential_expression": lambda progress: trained.differential_expression(
            cells, groupby="cell_type", n_draws=100, progress=progress
        ),
    }
    for call in calls.values():  # quick calls print nothing
        call(True)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(cellvae.train, "PROGRESS_DELAY_S", 0.0)
    for name, call in calls.items():
        call(True)
        assert f"\r{name.removesuffix(' (plot)')}: " in capsys.readouterr().err, name  # the bar (cleared once the work ends)
        call(False)
        assert capsys.readouterr().err == "", name
    with pytest.raises(TypeError, match="progress must be True or False"):
        trained.sample_counts(cells, progress="quiet")
    copy = cellvae.tl.rank_genes_groups(cells, "cell_type", model=trained, n_draws=100, copy=True)
    assert "\rdifferential_expression: " in capsys.readouterr().err and "rank_genes_groups" in copy.uns
    source, target = cells.obs["cell_type"].dropna().unique()[:2]
    latent_arithmetic = {  # they encode the cells with get_latent, whose bar they show
        "interpolate": lambda progress: cellvae.tl.interpolate(
            trained, 0, 1, adata=cells, batch="batch0", covariates={"donor": "d1", "percent_mito": 5.0}, progress=progress
        ),
        "latent_shift": lambda progress: cellvae.tl.latent_shift(
            trained, cells, groupby="cell_type", source=source, target=target, apply_to=[0, 1], progress=progress
        ),
    }
    for name, call in latent_arithmetic.items():
        call(True)
        assert "\rget_latent: " in capsys.readouterr().err, name
        call(False)
        assert capsys.readouterr().err == "", name


def test_embed_records_fits_settings_from_fit_kwargs_in_uns(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=150, n_genes=30, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cellvae.tl.embed(
            adata, max_epochs=1, progress=False, n_hidden=8, n_latent=3,
            fit_kwargs={"batch_size": 64, "lr": 2e-3, "validation_size": 0.2, "device": "cpu"},
        )  # fmt: skip
    params = adata.uns["cellvae"]["params"]
    assert (params["batch_size"], params["lr"], params["validation_size"], params["device"]) == (64, 2e-3, 0.2, "cpu")
    assert (params["n_hidden"], params["n_latent"], params["epochs_trained"]) == (8, 3, 1)
    adata.write_h5ad(tmp_path / "embedded.h5ad")
    assert ad.read_h5ad(tmp_path / "embedded.h5ad").uns["cellvae"]["params"]["batch_size"] == 64


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_extreme_encoder_scales_keep_the_posterior_and_the_rate_finite(posterior):
    vae, counts, covariates = simulated_module(posterior=posterior)[:3]
    for bias in (100.0, -100.0):  # e.g. after too large a learning rate
        with torch.no_grad():
            vae.encoder.scale.bias.fill_(bias)
            mean, scale = vae.encoder(counts, covariates)
            assert torch.isfinite(scale).all() and torch.isfinite(vae.kl_divergence(mean, scale)).all(), bias
            noise = torch.randn(3, *mean.shape)
            assert torch.isfinite(vae.reparameterise(mean, scale, noise)).all(), bias
            assert torch.isfinite(vae.log_posterior_density(noise, scale)).all(), bias


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_a_cell_without_counts_has_a_finite_loss_and_no_distortion(likelihood):
    vae, counts, covariates, _, batch_index = simulated_module(likelihood=likelihood)
    counts[:3] = 0.0
    torch.manual_seed(0)
    out = vae(counts, covariates, counts.sum(1, keepdim=True), batch_index)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["distortion"]).all()
    np.testing.assert_allclose(out["distortion"][:3].detach().numpy(), 0.0, atol=1e-6)


@pytest.mark.parametrize("reference", [{"batch": 0}, {"batch": 3}, {"donor": 1}, {"batch": True}, {"batch": 1.0}])
def test_reference_categories_that_do_not_fit_the_models_categories_are_refused(tmp_path, reference):
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, n_batches=2, random_state=0)
    CellVAE(adata, batch_key="batch").save(tmp_path / "model")
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    for value, works in ((reference, False), ({"batch": 2}, True)):
        config["reference_categories"] = value
        (tmp_path / "model" / "config.json").write_text(json.dumps(config))
        if works:
            assert CellVAE.load(tmp_path / "model").config.reference_categories == {"batch": 2}
        else:
            with pytest.raises(ValueError, match=r"reference_categories must map batch/categorical covariate keys \['batch'\]"):
                CellVAE.load(tmp_path / "model")


def test_a_config_whose_data_layout_no_model_can_have_is_refused():
    genes = {"gene_names": ["g0", "g1"]}
    in_order = Config(**genes, categorical_covariate_keys=["a", "b"], categorical_covariate_categories={"a": ["x"], "b": ["y"]})
    assert in_order.categories == [("a", ["x"]), ("b", ["y"])] and in_order.n_covariates == 2
    with pytest.raises(ValueError, match="to its categories, in that order"):
        Config(**genes, categorical_covariate_keys=["a", "b"], categorical_covariate_categories={"b": ["y"], "a": ["x"]})
    with pytest.raises(ValueError, match="gene_names is empty"):
        Config()
    with pytest.raises(ValueError, match="categorical covariate 'a' has no categories"):
        Config(**genes, categorical_covariate_keys=["a"], categorical_covariate_categories={"a": []})
    with pytest.raises(ValueError, match="train_input_layer must be True or False, got 'yes'"):
        Config(**genes, train_input_layer="yes")


def test_every_field_of_a_config_survives_its_json_round_trip_and_unknown_fields_are_named(tmp_path, monkeypatch):
    config = Config(
        gene_names=["g0", "g1", "g2"],
        layer="counts",
        batch_key="batch",
        batch_categories=["b0", "b1", "b2"],
        categorical_covariate_keys=["donor"],
        categorical_covariate_categories={"donor": ["d0", "d1"]},
        continuous_covariate_keys=["percent_mito"],
        continuous_covariate_mean=[2.5],
        continuous_covariate_std=[1.5],
        n_latent=4,
        n_hidden=16,
        n_layers=2,
        dropout=0.2,
        normalization="batch",
        likelihood="zinb",
        dispersion="gene-batch",
        encode_batch=False,
        posterior="full",
        beta=2.0,
        kl_warmup=3,
        free_bits=0.1,
        batch_mmd=0.5,
        reference_categories={"batch": 2, "donor": 1},
        train_input_layer=True,
        cellvae_version="1.2.3",
    )
    config.to_json(tmp_path / "config.json")
    assert Config.from_json(tmp_path / "config.json") == config
    with_extra = json.loads((tmp_path / "config.json").read_text()) | {"unknown_field": 1}
    (tmp_path / "config.json").write_text(json.dumps(with_extra))
    newer = r"does not know, \['unknown_field'\]: it was saved by cellvae 1.2.3, newer than this one .*; upgrade cellvae"
    with pytest.raises(ValueError, match=newer):
        Config.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text(json.dumps(with_extra | {"cellvae_version": cellvae.__version__}))
    with pytest.raises(ValueError, match=r"does not know, \['unknown_field'\]: mistyped, or saved by a newer build"):
        Config.from_json(tmp_path / "config.json")  # (the same version: no "newer" said)
    monkeypatch.setattr(cellvae.config, "CELLVAE_VERSION", "0.0.0+local")  # a source tree run uninstalled
    (tmp_path / "config.json").write_text(json.dumps(with_extra | {"cellvae_version": "0.1.0"}))
    with pytest.raises(ValueError, match=r"mistyped, or saved by a newer build"):
        Config.from_json(tmp_path / "config.json")
    # the fields added to format 1 later are left out at their defaults: such a model loads in a cellvae without them
    plain = Config(gene_names=["g1", "g2"])
    plain.to_json(tmp_path / "plain.json")
    saved = json.loads((tmp_path / "plain.json").read_text())
    assert not {"normalization", "batch_mmd", "reference_categories", "train_input_layer"} & set(saved)
    assert Config.from_json(tmp_path / "plain.json") == plain and saved["n_latent"] == 10


def test_settings_that_silently_give_nonsense_are_refused_or_told():
    """n_hidden=1 or 2 under LayerNorm embedded every cell alike without a word; library sizes beyond the counts
    cellvae accepts drew negative counts (torch's sampler overflows); batch_mmd with one-cell minibatches did nothing;
    integers picking cells of an AnnData named by integers were read as positions without a word."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, n_batches=2, random_state=0)
    for n_hidden in (1, 2):
        with pytest.raises(ValueError, match=rf"n_hidden={n_hidden} with normalization='layer': LayerNorm over"):
            CellVAE(adata, n_hidden=n_hidden)
    CellVAE(adata, n_hidden=2, normalization="batch")  # BatchNorm keeps the cells apart
    model = CellVAE(adata, batch_key="batch", n_hidden=8).fit(max_epochs=1, progress=False)
    for call in (
        lambda: model.generate(3, library_size=1e20, progress=False),
        lambda: model.decode(np.zeros((2, 10), dtype=np.float32), library_size=1e39),
        lambda: model.get_normalized_expression(library_size=1e39, progress=False),
    ):
        with pytest.raises(ValueError, match=r"library_size must be .*up to 1e\+12|at most 1e\+12 counts"):
            call()
    assert model.generate(3, library_size=1e12, progress=False, random_state=0).X.min() >= 0
    deep = adata.copy()  # a cell's total may exceed the largest single count: generate copies it without complaint
    dense = deep.X.toarray()
    dense[0, :20] = 1e11
    deep.X = sp.csr_matrix(dense)
    deep_model = CellVAE(deep, batch_key="batch", n_hidden=8).fit(max_epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the deep cell's counts are warned about as reads)
        generated = deep_model.generate(400, random_state=0, progress=False)
    assert generated.obs["library_size"].max() == 1e12
    with pytest.warns(UserWarning, match="batch_mmd has no effect with batch_size=1"):
        CellVAE(adata, batch_key="batch", batch_mmd=1.0, n_hidden=8).fit(max_epochs=1, batch_size=1, progress=False)
    numbered = adata.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata's own warning about integer names
        numbered.obs_names = pd.Index(np.arange(1000, 1200, dtype=np.int64))
    on_numbers = CellVAE(numbered, n_hidden=8).fit(max_epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"obs_names are integers, and the integers of idx1 are read as positions"):
        on_numbers.differential_expression(idx1=np.arange(50), n_draws=100, progress=False)


def test_the_advice_for_missing_batch_values_leaves_an_anndata_that_can_be_written(tmp_path):
    """Followed on a numeric column, the advice mixed floats and text in one column, which anndata cannot write."""
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=20, n_batches=3, random_state=0)
    plates = adata.obs["batch"].cat.codes.astype(float).to_numpy()
    plates[:3] = np.nan
    adata.obs["plate"] = plates
    with pytest.raises(ValueError, match="missing") as told:
        CellVAE(adata, batch_key="plate")
    advice = re.search(r"\((adata\.obs\['plate'\] = .*?) makes them one value of their own\)", str(told.value)).group(1)
    exec(advice, {"adata": adata})  # as the user would run it
    assert CellVAE(adata, batch_key="plate").config.batch_categories == ["0.0", "1.0", "2.0", "unknown"]
    adata.write_h5ad(tmp_path / "filled.h5ad")
    assert ad.read_h5ad(tmp_path / "filled.h5ad").obs["plate"].tolist() == adata.obs["plate"].tolist()


def test_obs_columns_the_data_lacks_are_named_with_the_argument_that_gave_them():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0)
    told = r"obs columns \['Batch', 'Donor'\] not found in adata.obs \(batch_key: \['Batch'\], categorical_covariate_keys: "
    with pytest.raises(KeyError, match=told + r"\['Donor'\]\); available: \['batch', 'cell_type'\]"):
        CellVAE(adata, batch_key="Batch", categorical_covariate_keys=["Donor"])
    with pytest.raises(KeyError, match=r"\(continuous_covariate_keys: \['score'\]\)"):
        CellVAE(adata, batch_key="batch", continuous_covariate_keys=["score"])


def test_a_model_loaded_without_its_anndata_says_to_pass_one(trained, saved, messy):
    """Found untested by a coverage audit: what a model loaded with load_anndata=False cannot do without cells."""
    bare = CellVAE.load(saved, load_anndata=False)
    with pytest.raises(ValueError, match=r"loaded without an AnnData; pass one with CellVAE.load\(path, adata=...\)"):
        bare.fit(**QUICK)
    with pytest.raises(ValueError, match=r"loaded without an AnnData; pass adata=... explicitly"):
        bare.get_latent()
    with pytest.raises(ValueError, match=r"loaded without an AnnData; pass adata=... holding cells_a and cells_b"):
        cellvae.tl.interpolate(bare, messy.obs_names[0], messy.obs_names[1])
    np.testing.assert_array_equal(bare.get_latent(messy), trained.get_latent(messy))  # (given the cells, it embeds them)


def test_decode_refuses_latent_codes_and_covariates_it_cannot_decode(trained):
    z = np.zeros((3, TINY["n_latent"]), dtype=np.float32)
    given = {"batch": "batch0", "covariates": {"donor": "d1", "percent_mito": 1.0}}
    assert trained.decode(z, **given).shape == (3, 40)
    broken = z.copy()
    broken[0, 0] = np.nan
    with pytest.raises(ValueError, match="z contains NaN or infinite values"):
        trained.decode(broken, **given)
    with pytest.raises(ValueError, match=r"covariates\['donor'\] has categories unseen in training: \['d9'\]; known: \['d1', "):
        trained.decode(z, batch="batch0", covariates={"donor": "d9", "percent_mito": 1.0})
    with pytest.raises(ValueError, match=r"this model needs covariates \['donor', 'percent_mito'\]; pass covariates="):
        trained.decode(z, batch="batch0")
    with pytest.raises(ValueError, match=r"library_size must be one value or one per row \(3\), got shape \(2,\)"):
        trained.decode(z, **given, library_size=[1e4, 2e4])
    with pytest.raises(ValueError, match=r"batch='1' is not a batch of this model; its batches are \['batch0', 'batch1'\]"):
        trained.decode(z, batch=1, covariates=given["covariates"])


def test_transfer_labels_refuses_embeddings_of_other_models_or_with_nan_rows(trained, messy):
    reference, query = messy.copy(), messy.copy()
    reference.obsm["X_cellvae"] = query.obsm["X_cellvae"] = trained.get_latent(messy)
    query.obsm["X_cellvae"] = query.obsm["X_cellvae"][:, :3]
    with pytest.raises(ValueError, match=r"obsm\['X_cellvae'\] has 4 dimensions in ref_adata but 3 in query_adata; both must"):
        cellvae.tl.transfer_labels(reference, query, labels_key="cell_type")
    query.obsm["X_cellvae"] = reference.obsm["X_cellvae"].copy()
    query.obsm["X_cellvae"][[0, 5], 1] = np.nan
    with pytest.raises(ValueError, match=r"query_adata.obsm\['X_cellvae'\] has NaN or infinite values in 2 cells; embed them"):
        cellvae.tl.transfer_labels(reference, query, labels_key="cell_type")
    assert "cell_type_predicted" not in query.obs  # (refused before writing)


def test_rate_distortion_sweep_points_beta_to_betas(messy):
    with pytest.raises(ValueError, match=r"pass the KL weights as betas=\(...\), not beta=..."):
        cellvae.tl.rate_distortion_sweep(messy, beta=1)
