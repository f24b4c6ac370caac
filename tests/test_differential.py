"""Differential expression: markers found, nothing found between halves of one population, batch
effects removed, scanpy's rank_genes_groups format, and interferon genes on real stimulated cells."""

import copy
import json
import warnings

import anndata as ad
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import ctrl_c_at_call, no_warnings, shared_dataset
from safetensors import safe_open
from safetensors.torch import save_file

import cellvae
from cellvae import CellVAE, differential

matplotlib.use("Agg")


@pytest.fixture(scope="module")
def simulated():
    return cellvae.datasets.simulate(n_cells=2000, n_genes=300, n_batches=2, n_cell_types=5, random_state=1, batch_effect=0.8)


@pytest.fixture(scope="module")
def model(simulated):
    return CellVAE(simulated, batch_key="batch").fit(max_epochs=80, progress=False)


def _observed_log2_fold_change(adata, in_group: np.ndarray) -> np.ndarray:
    counts = adata.X.toarray()
    normalized = counts / counts.sum(1, keepdims=True) * 1e4
    return np.log2(normalized[in_group].mean(0) + 0.05) - np.log2(normalized[~in_group].mean(0) + 0.05)


def test_markers_of_a_type_rank_first_and_fold_changes_match_the_counts(simulated, model):
    result = model.differential_expression(groupby="cell_type", group1="type0")
    assert list(result.index.unique()) == list(result.index) and set(result.index) == set(simulated.var_names)
    assert (result["group1"] == "type0").all() and (result["group2"] == "rest").all()
    assert (result["comparison"] == "type0 vs rest").all()  # scvi-tools' column
    observed = _observed_log2_fold_change(simulated, (simulated.obs["cell_type"] == "type0").to_numpy())
    assert np.corrcoef(result.loc[simulated.var_names, "lfc_mean"], observed)[0, 1] > 0.95
    top_observed = set(simulated.var_names[np.argsort(-observed)[:20]])
    top_called = set(result[result["lfc_mean"] > 0].index[:20])
    assert len(top_observed & top_called) >= 16
    assert result.loc[list(top_called), "is_de"].all()
    # Ordered by proba_de; the expected FDR grows down the list and decides the calls.
    assert np.all(np.diff(result["proba_de"].to_numpy()) <= 0)
    assert np.all(np.diff(result["expected_fdr"].to_numpy()) >= -1e-12)
    np.testing.assert_array_equal(result["is_de"], result["expected_fdr"] <= 0.05)
    np.testing.assert_allclose(result["proba_de"], result["proba_up"] + result["proba_down"])
    assert ((result["lfc_low"] <= result["lfc_median"]) & (result["lfc_median"] <= result["lfc_high"])).all()


def test_the_expected_fdr_is_the_mean_local_fdr_of_the_list_and_exact_at_the_target():
    """A list whose expected FDR is exactly the target is called: probabilities of n/1,000 draws give
    means such as 1/20 exactly, not a hair above."""
    for proba_de in ([0.95], [0.96, 0.94], [1.0, 1.0, 0.85], [1.0, 0.9]):
        assert differential.expected_fdr(np.array(proba_de)).max() == 0.05
    target = 1 - 3 / 7  # more decimals than the rounding keeps: compared at 12 decimals too
    assert differential.expected_fdr(np.array([3 / 7])).max() <= round(target, 12)
    fdr = differential.expected_fdr(np.array([0.5, 0.99, 0.9, 0.9, 0.2]))
    np.testing.assert_allclose(fdr, [(0.01 + 0.2 + 0.5) / 4, 0.01, 0.07, 0.07, (0.01 + 0.2 + 0.5 + 0.8) / 5])


@pytest.mark.parametrize("settings", [{"likelihood": "zinb"}, {"likelihood": "poisson"}, {"posterior": "full"}])
def test_markers_are_found_with_every_likelihood_and_posterior(simulated, settings):
    other = CellVAE(simulated, batch_key="batch", **settings).fit(max_epochs=40, progress=False)
    result = other.differential_expression(groupby="cell_type", group1="type0", n_draws=300)
    observed = _observed_log2_fold_change(simulated, (simulated.obs["cell_type"] == "type0").to_numpy())
    top_observed = set(simulated.var_names[np.argsort(-observed)[:20]])
    assert len(top_observed & set(result[result["lfc_mean"] > 0].index[:20])) >= 14
    assert np.isfinite(result.drop(columns=["group1", "group2", "comparison"]).to_numpy(dtype=float)).all()


def test_the_prior_learnt_from_all_genes_shrinks_poorly_measured_ones_towards_no_change():
    # 450 unchanged genes measured poorly (standard error 0.6) and 50 changed by 2 (error 0.3), as draws.
    rng = np.random.default_rng(0)
    truth = np.r_[np.zeros(450), np.full(50, 2.0)]
    error = np.r_[np.full(450, 0.6), np.full(50, 0.3)]
    draws = torch.from_numpy(truth + error * rng.standard_normal(500) + error * rng.standard_normal((1000, 500)))
    fitted = torch.ones(500, dtype=torch.bool)
    fitted[-1] = False
    shrunk = differential.shrink(draws, fitted, np.random.default_rng(1)).numpy()
    beyond = np.abs(shrunk) > 0.25
    assert (np.abs(draws.numpy()[:, :450]) > 0.25).mean() > 0.6  # without the prior most look changed
    assert beyond[:, :450].mean() < 0.3 and beyond[:, 450:-1].mean() > 0.95
    assert np.abs(shrunk[:, :450].mean(0)).mean() < 0.5 * np.abs(draws.numpy()[:, :450].mean(0)).mean()
    np.testing.assert_array_equal(shrunk[:, -1], draws.numpy()[:, -1])  # a gene outside the fit keeps its draws
    again = differential.shrink(draws, fitted, np.random.default_rng(1)).numpy()
    np.testing.assert_array_equal(shrunk, again)
    # A gene with non-finite draws (log2 of 0) keeps them and takes no part; the others are shrunk as before.
    broken = draws.clone()
    broken[:5, 0] = -np.inf
    with_broken = differential.shrink(broken, fitted, np.random.default_rng(1)).numpy()
    np.testing.assert_array_equal(with_broken[:, 0], broken[:, 0].numpy())
    assert (np.abs(with_broken[:, 1:450]) > 0.25).mean() < 0.3
    # Too few genes to learn a prior from: the draws are left as they are.
    few = draws[:, : differential.MIN_SHRINKAGE_GENES - 1]
    np.testing.assert_array_equal(differential.shrink(few, fitted[: few.shape[1]], np.random.default_rng(1)), few)


def test_comparing_groups_with_a_model_stopped_far_too_early_is_warned_about(tmp_path, monkeypatch):
    """A model trained a few epochs, still improving, muted every difference (pbmc3k, B vs NK after 3 epochs: no gene
    called) and said nothing. Told after fit and after save/load (whatever AnnData it is loaded with); not for a model
    trained further or to its end. A query model decodes with its reference's decoder: mapped onto a brief reference it is
    told of the reference's training, after mapping, a further fit of the mapping, and save/load."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=2, n_cell_types=3, random_state=0)
    brief = CellVAE(adata, batch_key="batch").fit(max_epochs=2, progress=False)
    assert brief.history.attrs["still_improving"]
    told = r"this model's training stopped after 2 epochs, under a quarter of the 400 that fit gives its 300 cells by"
    compare = {"groupby": "cell_type", "group1": "type0", "n_draws": 100, "progress": False}
    with pytest.warns(UserWarning, match=told + r" default, with its loss still falling: .* train it further"):
        brief.differential_expression(**compare)
    brief.save(tmp_path / "brief")
    (tmp_path / "brief" / "history.json").unlink()  # (the numbers come with the weights)
    for loaded_with in (adata, adata[:50].copy()):  # its own AnnData, or a few of its cells
        with pytest.warns(UserWarning, match=told):
            loaded = CellVAE.load(tmp_path / "brief", adata=loaded_with)
            cellvae.tl.rank_genes_groups(loaded_with.copy(), "cell_type", model=loaded)

    def quiet(*models: CellVAE) -> bool:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for model in models:
                model.differential_expression(**compare)
        return not [w for w in caught if "training stopped" in str(w.message)]

    query = adata[adata.obs["batch"] == "batch1"].copy()
    query.obs["batch"] = "new"
    query_model = brief.map_query(query, max_epochs=2, progress=False)
    mapped_told = r"the training of the reference model this query model was mapped onto stopped after 2 epochs"
    mapped_told += r".* train the reference further \(reference_model.fit\(\)\) and map the query again"
    with pytest.warns(UserWarning, match=mapped_told):
        query_model.differential_expression(**compare)
    query_model.save(tmp_path / "query")
    query_model.fit(max_epochs=1, progress=False)  # (the mapping trained further: the decoder is still the reference's)
    for mapped in (query_model, CellVAE.load(tmp_path / "query", adata=query_model.adata)):
        with pytest.warns(UserWarning, match=mapped_told):
            mapped.differential_expression(**compare)
    weights = tmp_path / "brief" / "model.safetensors"  # an entry edited by hand into other values: left out
    with safe_open(str(weights), framework="pt") as handle:
        entries = json.loads(handle.metadata()["cellvae"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    entries["brief_training"]["cells"] = "300"
    save_file(tensors, weights, metadata={"cellvae": json.dumps(entries, sort_keys=True)})
    assert quiet(CellVAE.load(tmp_path / "brief", adata=adata))
    brief.fit(max_epochs=2, progress=False)  # trained further: 4 epochs in all, not judged as a first fit
    assert quiet(brief, CellVAE(adata, batch_key="batch").fit(max_epochs=100, patience=2, progress=False))
    # stopped by Ctrl-C at its best epoch so far: told as such
    with monkeypatch.context() as patched, pytest.warns(RuntimeWarning, match="training interrupted"):
        ctrl_c_at_call(cellvae.train.AgreedInterrupt, "check", 4, patched)
        interrupted = CellVAE(adata, batch_key="batch").fit(max_epochs=50, progress=False)
    assert interrupted.history.attrs["interrupted"] and len(interrupted.history) >= 1
    with pytest.warns(UserWarning, match=r"this model's training stopped by Ctrl-C after \d+ epochs?, under a quarter"):
        interrupted.differential_expression(**compare)


def test_random_halves_of_one_type_differ_in_no_gene(simulated, model):
    halves = simulated.copy()
    rng = np.random.default_rng(0)
    half = np.where(rng.random(halves.n_obs) < 0.5, "A", "B")
    halves.obs["half"] = np.where(halves.obs["cell_type"] == "type1", half, "other")
    result = model.differential_expression(halves, groupby="half", group1="A", group2="B")
    assert result["is_de"].sum() == 0 and result["proba_de"].max() < 0.95


def test_a_few_cells_against_their_own_type_differ_in_no_gene(simulated, model):
    few = simulated.copy()
    type1 = np.flatnonzero(few.obs["cell_type"] == "type1")
    labels = np.full(few.n_obs, "other", dtype=object)
    labels[type1] = "B"
    labels[np.random.default_rng(1).choice(type1, 3, replace=False)] = "A"
    few.obs["few"] = labels
    with pytest.warns(UserWarning, match="fewer than 5 cells"):
        result = model.differential_expression(few, groupby="few", group1="A", group2="B")
    assert result["is_de"].sum() <= 3


def test_the_rest_of_the_cells_is_named_as_such_not_as_a_group_of_the_column(simulated, model):
    """An audit: one group against the rest, where the rest was one cell, was told as "groups ['rest', 'y'] of obs['ct']"
    though obs['ct'] has no group 'rest'; a group whose cells are all empty is told with the way out."""
    adata = simulated[:300].copy()
    adata.obs["ct"] = pd.Categorical(["x"] * 298 + ["y", "z"])
    told = r"groups 'y', the rest \(all but 'x'\) of obs\['ct'\] have fewer than 5 cells with counts.*expected_counts < 1"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.rank_genes_groups(adata, "ct", model=model, groups=["x", "y"], n_draws=100)
    counts = adata.X.toarray()
    counts[298:] = 0
    adata.X = sp.csr_matrix(counts)
    with pytest.raises(ValueError, match=r"^the rest \(all but 'x'\) of obs\['ct'\] has no cell with a non-zero count$"):
        model.differential_expression(adata, groupby="ct", group1="x", n_draws=100)
    with pytest.raises(ValueError, match=r"group 'y' of obs\['ct'\] has no cell .*\(leave it out of the groups compared"):
        model.differential_expression(adata, groupby="ct", group1="y", group2="x", n_draws=100)


def test_groups_of_fewer_than_ten_cells_are_told_their_fold_changes_are_shrunk(simulated, model):
    """An audit: 5 against 5 cells of two types shrank 16-fold changes to lfc_mean ~0.1, their intervals missing them."""
    labels = np.full(simulated.n_obs, "other", dtype=object)
    rng = np.random.default_rng(0)
    for name, cell_type, n in (("A", "type0", 7), ("B", "type1", 12)):
        labels[rng.choice(np.flatnonzero(simulated.obs["cell_type"] == cell_type), n, replace=False)] = name
    small = simulated.copy()
    small.obs["small"] = labels
    shrunk = r"groups 'A' of obs\['small'\] have fewer than 10 cells with counts: their fold changes are shrunk"
    calls = r"\. A gene such a group holds about a count or less of \(expected_counts < 1 .*\(0.6-1.5% at 12 cells\)$"
    with pytest.warns(UserWarning, match=shrunk + r".*compare expression1 with expression2 \(not shrunk\).*" + calls):
        result = model.differential_expression(small, groupby="small", group1="A", group2="B", n_draws=100)
    assert np.isfinite(result["expression1"]).all()
    with no_warnings():  # 12 cells against the rest: no word
        model.differential_expression(small, groupby="small", group1="B", n_draws=100)
    small.obs["small"] = pd.Categorical(labels)  # in scanpy's fields: logfoldchanges, and where the rest is
    told = r"groups 'A' .* shrunk strongly towards no change, so their logfoldchanges can miss large changes .*"
    told += r"expression2 \(not shrunk\) call model.differential_expression\(adata, groupby='small', group1=...\)" + calls
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.rank_genes_groups(small, "small", model=model, groups=["A"], n_draws=100, progress=False)
    with pytest.warns(UserWarning, match=r"max_cells=8 draws each group's mean expression from fewer than 10 cells: their"):
        model.differential_expression(small, groupby="small", group1="B", n_draws=100, max_cells=8)


def test_a_comparison_gives_the_same_result_alone_or_among_others(model):
    alone = model.differential_expression(groupby="cell_type", group1="type3", n_draws=200)
    among = model.differential_expression(groupby="cell_type", n_draws=200)
    pd.testing.assert_frame_equal(alone, among[among["group1"] == "type3"])
    twice = model.differential_expression(groupby="cell_type", group1=["type3", "type3"], n_draws=200)
    pd.testing.assert_frame_equal(twice, alone)


def test_genes_missing_from_the_data_are_not_called(simulated, model):
    partial = simulated[:, 30:].copy()
    with pytest.warns(UserWarning, match="missing"):
        result = model.differential_expression(partial, groupby="cell_type", group1="type0", n_draws=200)
    missing = result.loc[simulated.var_names[:30]]
    assert missing["proba_de"].isna().all() and not missing["is_de"].any()
    assert result.iloc[-30:].index.isin(simulated.var_names[:30]).all()  # ranked last
    with pytest.warns(UserWarning, match="missing"):
        cellvae.tl.rank_genes_groups(partial, "cell_type", model=model, n_draws=200)
    ranked = sc.get.rank_genes_groups_df(partial, "type0")
    assert set(ranked["names"]) == set(partial.var_names) and ranked["pvals_adj"].min() > 0
    sc.pl.rank_genes_groups_dotplot(partial, n_genes=2, show=False, dendrogram=False)


def test_number_labels_name_groups_as_integers(simulated, model, tmp_path):
    numbered = simulated.copy()
    numbered.obs["cluster"] = numbered.obs["cell_type"].cat.codes.astype(float)
    result = model.differential_expression(numbered, groupby="cluster", group1=1, group2=2.0, n_draws=100)
    assert (result["group1"] == "1").all() and (result["group2"] == "2").all()
    numbered.obs["cluster"] = numbered.obs["cluster"].astype("category")  # categories 0.0, 1.0, ...
    categorical = model.differential_expression(numbered, groupby="cluster", group1=1.0, group2=2, n_draws=100)
    pd.testing.assert_frame_equal(categorical, result)
    # the groups as the column prints them ("1.0", as scanpy and rank_genes_groups name them) are those groups too
    as_printed = model.differential_expression(numbered, groupby="cluster", group1=["1.0"], group2="2.0", n_draws=100)
    pd.testing.assert_frame_equal(as_printed, result)
    # rank_genes_groups names the groups as scanpy does ("1.0") whichever way they are given, and the file writes
    for groups, reference in (([0, 2], "1.0"), (["0.0", 2.0], 1)):
        cellvae.tl.rank_genes_groups(
            numbered, "cluster", model=model, groups=groups, reference=reference, pts=True, n_draws=100, progress=False
        )
        record = numbered.uns["rank_genes_groups"]
        assert record["names"].dtype.names == ("0.0", "2.0") and record["params"]["reference"] == "1.0"
        assert list(record["pts"].columns) == ["0.0", "2.0", "1.0"]
        numbered.write_h5ad(tmp_path / "ranked.h5ad")
    whole = numbered.copy()  # categories 0, 1, ...: "1.0" is group 1 there too (as differential_expression reads it)
    whole.obs["cluster"] = pd.Categorical(whole.obs["cluster"].astype(int))
    ranked = {"model": model, "pts": True, "n_draws": 100, "progress": False}
    cellvae.tl.rank_genes_groups(whole, "cluster", groups=["1.0", "3"], reference="2.0", **ranked)
    assert list(whole.uns["rank_genes_groups"]["pts"].columns) == ["1", "3", "2"]
    with pytest.raises(ValueError, match=r"groups names \['1.0'\] more than once; name each group once"):
        cellvae.tl.rank_genes_groups(numbered, "cluster", groups=[1, "1.0", 2], reference=3, **ranked)


def test_doses_and_columns_of_numbers_and_text_compare_as_their_categorical_twins(simulated, model):
    """A float column of doses (0, 0.5, 1) and an object column where text went into a number column
    (pandas makes one from `obs.loc[mask, "cluster"] = "lowQ"`) give what the same categories give."""
    codes = simulated.obs["cell_type"].cat.codes.to_numpy()
    columns = simulated.copy()
    columns.obs["dose"] = np.array([0.0, 0.5, 1.0, 2.0, 0.25])[codes]
    columns.obs["cluster"] = pd.Series(codes, index=columns.obs_names, dtype=object).where(codes != 4, "lowQ")
    twin = simulated.copy()
    twin.obs["dose"] = pd.Categorical(np.array(["0", "0.5", "1", "2", "0.25"])[codes])
    twin.obs["cluster"] = pd.Categorical(np.array(["0", "1", "2", "3", "lowQ"])[codes])
    for groupby, group1, group2, names in (("dose", 1.0, 0.5, ("1", "0.5")), ("cluster", "lowQ", 1, ("lowQ", "1"))):
        every = model.differential_expression(columns, groupby=groupby, n_draws=100)
        assert sorted(every["group1"].unique()) == sorted(twin.obs[groupby].cat.categories)
        result = model.differential_expression(columns, groupby=groupby, group1=group1, group2=group2, n_draws=100)
        expected = model.differential_expression(twin, groupby=groupby, group1=names[0], group2=names[1], n_draws=100)
        pd.testing.assert_frame_equal(result, expected)


def test_a_model_built_on_a_view_reads_the_clusters_added_to_the_viewed_anndata_since(simulated, tmp_path):
    """The README's route, CellVAE(adata[:, hvg]): a view's obs is fixed when it is made, so clusters added to
    adata after training (leiden on the embedding) were missing, or, where a column was replaced, the old ones."""
    adata = simulated.copy()
    adata.obs["leiden"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2, "0", "1"))  # an earlier clustering
    model = CellVAE(adata[:, : adata.n_vars // 2], n_hidden=16, n_latent=4).fit(max_epochs=1, progress=False)
    adata.obs["leiden"] = pd.Categorical(adata.obs["cell_type"].astype(str))  # replaced by the embedding's clusters
    adata.obs["new"] = adata.obs["leiden"]
    for groupby in ("leiden", "new"):
        found = model.differential_expression(groupby=groupby, group1="type0", n_draws=100)
        given = model.differential_expression(adata[:, : adata.n_vars // 2], groupby=groupby, group1="type0", n_draws=100)
        pd.testing.assert_frame_equal(found, given)
    path = cellvae.tl.interpolate(model, "new == 'type0'", "new == 'type1'", 2, progress=False)
    assert path.n_obs == 2
    copied = copy.deepcopy(model)  # a copy reads the viewed AnnData as it is now too (was the view's obs, without "new")
    pd.testing.assert_frame_equal(copied.differential_expression(groupby="new", group1="type0", n_draws=100), found)
    model.save(tmp_path / "model", save_anndata=True)  # the AnnData as the model reads it now
    assert "new" in CellVAE.load(tmp_path / "model").adata.obs.columns
    # its cells filtered in place since: the view would pick other cells (a slice) or fail in anndata (a mask)
    for as_mask in (False, True):
        parent = simulated.copy()
        view = parent[np.arange(parent.n_obs) < 150, :20] if as_mask else parent[:150, :20]
        model = CellVAE(view, n_hidden=16, n_latent=4).fit(max_epochs=1, progress=False)
        totals = np.asarray(parent.X.sum(axis=1)).ravel()
        sc.pp.filter_cells(parent, min_counts=float(np.quantile(totals, 0.2)))
        changed = r"the AnnData this view was made of has changed since .* pass adata=\.\.\. to its methods"
        with pytest.raises(ValueError, match=changed):
            model.get_latent(progress=False)
        with pytest.raises(ValueError, match=changed):
            model.differential_expression(groupby="cell_type", group1="type0", n_draws=100)
        with pytest.raises(ValueError, match=changed + r"\); to copy this model, save it"):  # (were scipy's IndexError)
            copy.deepcopy(model)
        with pytest.raises(ValueError, match=changed + r"\); or save the model without save_anndata=True$"):  # (once with
            model.save(tmp_path / f"stale{as_mask}", save_anndata=True)  # advice of unwritable obs); nothing written
        assert not (tmp_path / f"stale{as_mask}").exists()


def test_a_group_named_rest_is_not_mistaken_for_all_other_cells(simulated, model):
    named = simulated.copy()
    named.obs["with_rest"] = named.obs["cell_type"].cat.rename_categories({"type4": "rest"})
    result = model.differential_expression(named, groupby="with_rest", group1="type0", n_draws=100)
    assert (result["group2"] == "<rest>").all()
    against_group = model.differential_expression(named, groupby="with_rest", group1="type0", group2="rest", n_draws=100)
    assert (against_group["group2"] == "rest").all()


def test_batch_correction_removes_differences_between_batches_of_one_type(simulated, model):
    split = simulated.copy()
    split.obs["type2_batch"] = np.where(split.obs["cell_type"] == "type2", split.obs["batch"].astype(str), "other")
    with pytest.warns(UserWarning, match="share no batch"):
        corrected = model.differential_expression(split, groupby="type2_batch", group1="batch0", group2="batch1")
    # without correction too (scvi-tools' default): the batch effects it calls are told of
    told = r"share no batch .*with batch_correction=False the batch effects are counted as differences"
    with pytest.warns(UserWarning, match=told):
        uncorrected = model.differential_expression(
            split, groupby="type2_batch", group1="batch0", group2="batch1", batch_correction=False
        )
    n_genes = simulated.n_vars
    assert corrected["is_de"].sum() <= 0.02 * n_genes
    assert uncorrected["is_de"].sum() >= 0.5 * n_genes


def test_batchid1_and_batchid2_decode_each_group_under_the_batches_named_as_in_scvi_tools(simulated, model):
    """The same type's cells of two batches: decoded under one batch they show no difference; decoded each
    under its own batch they show the batch effect, as batch_correction=False does."""
    split = simulated.copy()
    split.obs["type2_batch"] = np.where(split.obs["cell_type"] == "type2", split.obs["batch"].astype(str), "other")
    groups = {"groupby": "type2_batch", "group1": "batch0", "group2": "batch1", "n_draws": 300}
    with pytest.warns(UserWarning, match="share no batch"):
        same = model.differential_expression(split, batchid1="batch1", batchid2=["batch1"], **groups)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # batches chosen apart: their effects are meant to count, no warning
        apart = model.differential_expression(split, batchid1=["batch0"], batchid2="batch1", **groups)
    with pytest.warns(UserWarning, match="share no batch"):
        uncorrected = model.differential_expression(split, batch_correction=False, **groups)
    n_genes = simulated.n_vars
    assert same["is_de"].sum() <= 0.02 * n_genes
    assert apart["is_de"].sum() >= 0.5 * n_genes
    assert np.corrcoef(apart.loc[split.var_names, "lfc_mean"], uncorrected.loc[split.var_names, "lfc_mean"])[0, 1] > 0.9
    for wrong, message in (
        ({"batchid1": "batch7"}, r"batchid1 \['batch7'\] not among the model's batches \['batch0', 'batch1'\]"),
        ({"batchid2": ["batch0", None]}, "batchid2 holds None"),
        ({"batchid1": "batch0", "batch_correction": False}, "needs batch_correction=True"),
    ):
        with pytest.raises(ValueError, match=message):
            model.differential_expression(split, **groups, **wrong)
    with pytest.raises(ValueError, match="batchid1 needs a model trained with batch_key"):
        CellVAE(simulated).differential_expression(split, batchid1="batch0", **groups)


def test_every_group_against_the_rest_with_observed_columns_and_seeds(simulated, model):
    before = simulated.copy()
    result = model.differential_expression(groupby="cell_type", n_draws=200)
    assert list(result["group1"].unique()) == [f"type{t}" for t in range(5)] and len(result) == 5 * simulated.n_vars
    counts = simulated.X.toarray()
    in_type3 = (simulated.obs["cell_type"] == "type3").to_numpy()
    type3 = result[result["group1"] == "type3"].loc[simulated.var_names]
    np.testing.assert_allclose(type3["fraction_nonzero1"], (counts[in_type3] > 0).mean(0))
    np.testing.assert_allclose(type3["fraction_nonzero2"], (counts[~in_type3] > 0).mean(0))
    normalized = counts / counts.sum(1, keepdims=True) * 1e4
    np.testing.assert_allclose(type3["raw_normalized_mean1"], normalized[in_type3].mean(0), rtol=1e-5)
    np.testing.assert_allclose(type3["raw_normalized_mean2"], normalized[~in_type3].mean(0), rtol=1e-5)
    emptied = simulated.copy()  # cells without counts: no share of counts to average (each gene's mean fell alike)
    emptied.X = sp.csr_matrix(np.where(in_type3[:, None] & (np.cumsum(in_type3) <= 10)[:, None], 0, counts))
    some_empty = model.differential_expression(emptied, groupby="cell_type", group1="type3", n_draws=100)
    with_counts = in_type3 & (np.cumsum(in_type3) > 10)
    np.testing.assert_allclose(
        some_empty.loc[simulated.var_names, "raw_normalized_mean1"], normalized[with_counts].mean(0), rtol=1e-5
    )
    np.testing.assert_allclose(some_empty["raw_normalized_mean1"].sum(), 1e4, rtol=1e-5)
    again = model.differential_expression(groupby="cell_type", n_draws=200)
    pd.testing.assert_frame_equal(result, again)
    other_seed = model.differential_expression(groupby="cell_type", n_draws=200, random_state=1)
    by_gene = [frame.reset_index().set_index(["group1", "gene"]).sort_index() for frame in (result, other_seed)]
    lfc = [frame["lfc_mean"] for frame in by_gene]
    assert not np.allclose(*lfc) and np.allclose(*lfc, atol=0.5)
    calls = [set(frame.index[frame["is_de"]]) for frame in by_gene]
    assert len(calls[0] & calls[1]) >= 0.9 * len(calls[0] | calls[1])
    # Only the model's own reads: the AnnData is untouched.
    assert simulated.obs.equals(before.obs) and (simulated.X != before.X).nnz == 0 and simulated.uns.keys() == before.uns.keys()


def test_ties_order_by_fold_change_and_each_groups_expression_and_scanpys_columns_are_as_documented(simulated, model):
    """Genes of equal proba_de (and equal score in rank_genes_groups) are ordered by the size of their fold
    change, whatever its sign; expression1/2 are each group's batch-averaged decoded expression; pvals and
    pvals_adj are the local and the expected false discovery rate."""
    result = model.differential_expression(groupby="cell_type", group1="type0", n_draws=200)
    proba, size = result["proba_de"].to_numpy(), result["lfc_mean"].abs().to_numpy()
    assert np.all(np.diff(proba) <= 0) and np.all(np.diff(size)[np.diff(proba) == 0] <= 0)
    assert any((result["lfc_mean"][proba == p] > 0).any() and (result["lfc_mean"][proba == p] < 0).any() for p in set(proba))
    decoded = model.get_normalized_expression(transform_batch=["batch0", "batch1"])  # as batch_correction=True
    in_group = (simulated.obs["cell_type"] == "type0").to_numpy()
    order = simulated.var_names.get_indexer(result.index)
    for column, cells in (("expression1", in_group), ("expression2", ~in_group)):
        assert np.median(np.abs(np.log(result[column].to_numpy() / decoded[cells].mean(0)[order]))) < 0.25
    strong = result["lfc_mean"].abs() > 1
    assert strong.sum() > 10
    assert (np.sign(np.log(result["expression1"] / result["expression2"])[strong]) == np.sign(result["lfc_mean"][strong])).all()
    adata = simulated.copy()
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, n_draws=200, progress=False)
    ranked = sc.get.rank_genes_groups_df(adata, "type0").set_index("names")
    np.testing.assert_allclose(ranked.loc[result.index, "pvals_adj"], result["expected_fdr"].clip(lower=1 / 201), rtol=1e-6)
    np.testing.assert_allclose(ranked.loc[result.index, "pvals"], result["proba_not_de"].clip(lower=1 / 201), rtol=1e-6)
    tied = 0
    for group in adata.obs["cell_type"].cat.categories:
        scores, lfc = (sc.get.rank_genes_groups_df(adata, group)[k].to_numpy() for k in ("scores", "logfoldchanges"))
        same = np.diff(scores) == 0
        assert np.all(np.diff(scores) <= 0) and np.all(np.diff(lfc)[same] <= 0)  # descending, as scanpy's
        tied += int((same & (np.diff(lfc) != 0)).sum())
    assert tied > 0


def test_delta_fdr_target_pseudocount_and_max_cells_change_the_result_as_documented(simulated, model):
    def run(**settings):
        result = model.differential_expression(groupby="cell_type", group1="type0", n_draws=300, **settings)
        return result.loc[simulated.var_names]

    base = run()
    # delta: the same draws, a higher bar: P(|lfc| > delta) falls gene by gene, fewer genes are called
    wide = run(delta=1.0)
    assert (wide["proba_de"] <= base["proba_de"] + 1e-9).all() and (wide["proba_de"] < base["proba_de"]).any()
    assert 0 < wide["is_de"].sum() < base["is_de"].sum()
    # fdr_target: a looser target extends the called list (it is the top of the same ranking)
    loose = run(fdr_target=0.25)
    np.testing.assert_array_equal(loose["proba_de"], base["proba_de"])
    assert set(base.index[base["is_de"]]) < set(loose.index[loose["is_de"]])
    # pseudocount (added to proportions summing to 1): a large one pulls every fold change towards 0
    flat = run(pseudocount=1e-2)
    assert np.abs(flat["lfc_mean"]).mean() < 0.5 * np.abs(base["lfc_mean"]).mean()
    assert np.abs(flat["lfc_mean"]).max() < np.abs(base["lfc_mean"]).max()
    # max_cells: groups of ~400 and ~1,600 cells drawn down to 100 each; the observed columns still use every cell
    sampled = run(max_cells=100)
    observed = ["fraction_nonzero1", "fraction_nonzero2", "raw_normalized_mean1", "raw_normalized_mean2"]
    pd.testing.assert_frame_equal(sampled[observed], base[observed])
    assert not np.allclose(sampled["lfc_mean"], base["lfc_mean"])
    assert np.corrcoef(sampled["lfc_mean"], base["lfc_mean"])[0, 1] > 0.85  # 0.955 here: the same genes differ
    pd.testing.assert_frame_equal(sampled, run(max_cells=100))  # the subset is drawn from random_state


def test_cells_without_a_label_take_no_part(simulated, model):
    partly = simulated.copy()
    labels = partly.obs["cell_type"].astype(object)
    labels[partly.obs["batch"] == "batch1"] = np.nan
    partly.obs["some_types"] = labels
    result = model.differential_expression(partly, groupby="some_types", group1="type0", n_draws=100)
    counts = simulated.X.toarray()
    rest = ((partly.obs["batch"] == "batch0") & (partly.obs["cell_type"] != "type0")).to_numpy()
    np.testing.assert_allclose(result.loc[simulated.var_names, "fraction_nonzero2"], (counts[rest] > 0).mean(0))


def test_a_group_holding_every_labelled_cell_is_refused_with_advice_both_entry_points_take(simulated, model):
    one_group = simulated.copy()
    one_group.obs["sample"] = pd.Categorical(["s1"] * one_group.n_obs)
    message = r"no cells outside group 's1' to compare with: it holds every labelled cell of .*; group by a column of"
    with pytest.raises(ValueError, match=message):
        model.differential_expression(one_group, groupby="sample", group1="s1", n_draws=100)
    with pytest.raises(ValueError, match=message):  # (it took no group2= it was told to pass)
        cellvae.tl.rank_genes_groups(one_group, "sample", model=model, n_draws=100)
    assert "rank_genes_groups" not in one_group.uns


def test_sets_of_cells_are_compared_as_scvi_tools_idx1_idx2(simulated, model):
    types = simulated.obs["cell_type"].to_numpy()
    by_group = model.differential_expression(groupby="cell_type", group1="type0", group2="type1", n_draws=300)
    first, second = types == "type0", np.flatnonzero(types == "type1")  # a mask, positions, and obs names
    for idx2 in (second, simulated.obs_names[second]):
        by_cells = model.differential_expression(idx1=first, idx2=idx2, n_draws=300)
        assert (by_cells["group1"] == "idx1").all() and (by_cells["group2"] == "idx2").all()
        genes = simulated.var_names
        assert np.corrcoef(by_cells.loc[genes, "lfc_mean"], by_group.loc[genes, "lfc_mean"])[0, 1] > 0.98
        np.testing.assert_allclose(by_cells.loc[genes, "fraction_nonzero2"], by_group.loc[genes, "fraction_nonzero2"])
    against_rest = model.differential_expression(idx1=first, n_draws=300)
    assert (against_rest["group2"] == "rest").all()
    counts = simulated.X.toarray()
    np.testing.assert_allclose(against_rest.loc[simulated.var_names, "fraction_nonzero2"], (counts[~first] > 0).mean(0))
    with pytest.raises(ValueError, match="share 1 cells"):
        model.differential_expression(idx1=[0, 1], idx2=[1, 2])
    with pytest.raises(ValueError, match="idx1 holds every cell.*pass idx2"):
        model.differential_expression(idx1=np.ones(simulated.n_obs, dtype=bool))
    with pytest.raises(TypeError, match="idx1 holds floats"):
        model.differential_expression(idx1=[0.0, 1.0])
    for zeros_and_ones in (first.astype(int), pd.Series(first, index=simulated.obs_names).astype(int)):  # not positions
        with pytest.raises(ValueError, match=r"idx1 holds a 0 or 1 for every cell: .* np.asarray\(idx1, dtype=bool\)"):
            model.differential_expression(idx1=zeros_and_ones)
    for empty in ([], np.array([], dtype=int)):
        with pytest.raises(ValueError, match="idx1 selects no cells"):
            model.differential_expression(idx1=empty)
    # a condition on obs, as scvi-tools reads a text idx1/idx2
    by_condition = model.differential_expression(idx1="cell_type == 'type0'", idx2="cell_type == 'type1'", n_draws=300)
    pd.testing.assert_frame_equal(by_condition, model.differential_expression(idx1=first, idx2=second, n_draws=300))
    with pytest.raises(KeyError, match="neither an obs name nor a condition on adata.obs"):
        model.differential_expression(idx1="no_such_cell")
    with pytest.raises(ValueError, match="must give True/False per cell"):
        model.differential_expression(idx1="cell_type")
    nullable = simulated.copy()  # anndata reads nullable integers as Int64: conditions on them give "boolean"
    nullable.obs["type_number"] = pd.array(nullable.obs["cell_type"].cat.codes, dtype="Int64")
    on_nullable = model.differential_expression(nullable, idx1="type_number == 0", idx2="type_number == 1", n_draws=300)
    pd.testing.assert_frame_equal(on_nullable, by_condition)
    nullable.obs.loc[nullable.obs_names[0], "type_number"] = pd.NA
    with pytest.raises(ValueError, match="undecided \\(NA\\) for 1 cells"):
        model.differential_expression(nullable, idx1="type_number == 0")
    with pytest.raises(TypeError, match="got a set"):
        model.differential_expression(idx1={0, 1})
    # True/False of object dtype (a comparison on an object column gives them) are a mask, not cell names
    as_objects = model.differential_expression(idx1=pd.Series(first, index=simulated.obs_names).astype(object), n_draws=300)
    pd.testing.assert_frame_equal(as_objects, model.differential_expression(idx1=first, n_draws=300))
    pd.testing.assert_frame_equal(model.differential_expression(idx1=first.astype(object), n_draws=300), as_objects)
    with pytest.raises(ValueError, match="idx1 has missing values"):
        model.differential_expression(idx1=pd.Series(first).astype("boolean").where(np.arange(len(first)) > 0))
    with pytest.raises(ValueError, match="not both"):
        model.differential_expression(groupby="cell_type", idx1=first)
    with pytest.raises(ValueError, match="idx2 needs idx1"):
        model.differential_expression(idx2=second)
    with pytest.raises(ValueError, match="pass groupby"):
        model.differential_expression()


def test_bad_arguments_are_refused_before_any_work(simulated, model, monkeypatch):
    with pytest.raises(KeyError, match="not found in adata.obs"):
        model.differential_expression(groupby="no_such_column")
    with pytest.raises(ValueError, match="has no cells"):
        model.differential_expression(groupby="cell_type", group1="type9")
    with pytest.raises(ValueError, match="same group"):
        model.differential_expression(groupby="cell_type", group1="type0", group2="type0")
    for group2 in (None, "type1"):  # it said the column had no labelled cells, or that the reference was asked for
        with pytest.raises(ValueError, match=r"^group1 names no group \(it is empty\); name one or more groups of obs"):
            model.differential_expression(groupby="cell_type", group1=[], group2=group2)
    # sets, dict views, generators: numpy takes them for one value, looked up as a group named by their repr
    for unordered in ({"type0"}, dict.fromkeys(["type0"]).keys(), (g for g in ["type0"])):
        with pytest.raises(TypeError, match=r"^group1 takes a group or a list of groups, got a \w+ \(.*\): pass a list"):
            model.differential_expression(groupby="cell_type", group1=unordered)
    with pytest.raises(TypeError, match=r"^group2 takes one group \(or None for all other cells\), got a set .*: name one"):
        model.differential_expression(groupby="cell_type", group1="type0", group2={"type1"})
    with pytest.raises(TypeError, match=r"^batchid1 takes a batch or a list of batches, got a set"):
        model.differential_expression(groupby="cell_type", group1="type0", batchid1={"batch0"})
    with pytest.raises(TypeError, match=r"^groups takes 'all' or a list of groups \(in the order the result lists them\)"):
        cellvae.tl.rank_genes_groups(simulated.copy(), "cell_type", model=model, groups={"type0", "type1"})
    # a list holding the reference too leaves it out, as group1=None does (an audit: the whole call was refused)
    listed = model.differential_expression(groupby="cell_type", group1=["type0", "type1"], group2="type1", n_draws=100)
    alone = model.differential_expression(groupby="cell_type", group1="type0", group2="type1", n_draws=100)
    pd.testing.assert_frame_equal(listed, alone)
    with pytest.raises(ValueError, match="delta"):
        model.differential_expression(groupby="cell_type", delta=0)
    with pytest.raises(ValueError, match=r"got None \(scvi-tools picks one then\): give it, e.g. 0.25"):
        model.differential_expression(groupby="cell_type", delta=None)
    importance = ("importance_weighting", "importance_weighting_kwargs")
    for scvi_tools_argument in ("all_stats", "weights", "filter_outlier_cells", *importance):
        with pytest.raises(TypeError, match=rf"{scvi_tools_argument}', scvi-tools' name: drop it"):
            model.differential_expression(groupby="cell_type", **{scvi_tools_argument: True})
    with pytest.warns(UserWarning, match=r"max_cells=3 draws each group's mean expression from fewer than 5 cells"):
        model.differential_expression(groupby="cell_type", group1="type0", max_cells=3, n_draws=100)
    for too_few in (0, 10):
        with pytest.raises(ValueError, match="n_draws"):
            model.differential_expression(groupby="cell_type", n_draws=too_few)
    with pytest.raises(ValueError, match="fdr_target"):
        model.differential_expression(groupby="cell_type", fdr_target=1.5)
    with pytest.raises(ValueError, match="pseudocount must be a positive number"):
        model.differential_expression(groupby="cell_type", pseudocount=0)
    one_group = simulated.copy()
    one_group.obs["all"] = "x"
    with pytest.raises(ValueError, match="no cells outside"):
        model.differential_expression(one_group, groupby="all")
    with pytest.warns(UserWarning, match="share no batch"):
        model.differential_expression(groupby="batch", group1="batch0", n_draws=100)
    # a measurement (or cell IDs) given as groupby: 2,000 comparisons of one cell each, refused
    measured = simulated.copy()
    measured.obs["mito"] = np.random.default_rng(0).random(measured.n_obs).astype(np.float32)
    measured.obs["cell_id"] = pd.Categorical(measured.obs_names)
    decoded = []
    monkeypatch.setattr(differential, "group_mean_draws", lambda *args, **kwargs: decoded.append(1))
    with pytest.raises(ValueError, match=r"obs\['mito'\] has 2000 groups among 2000 labelled cells.*bin it first"):
        model.differential_expression(measured, groupby="mito")
    with pytest.raises(ValueError, match=r"obs\['cell_id'\] has 2000 groups"):
        cellvae.tl.rank_genes_groups(measured, "cell_id", model=model)
    assert not decoded


def test_rank_genes_groups_writes_scanpys_format(pbmc, tmp_path):
    adata = pbmc.copy()
    model = CellVAE(adata).fit(max_epochs=60, progress=False)
    keys = (set(adata.uns), set(adata.obs), set(adata.obsm))
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=model)
    assert (set(adata.uns) - {"rank_genes_groups"}, set(adata.obs), set(adata.obsm)) == keys
    result = adata.uns["rank_genes_groups"]
    assert result["params"]["groupby"] == "cell_type" and result["params"]["method"] == "cellvae"
    groups = list(result["names"].dtype.names)
    assert groups == list(adata.obs["cell_type"].cat.categories)
    b_cells = sc.get.rank_genes_groups_df(adata, "CD19+ B")
    assert len(b_cells) == adata.n_vars and np.all(np.diff(b_cells["scores"].to_numpy()) <= 0)
    assert {"CD79A", "MS4A1"} <= set(b_cells["names"][:15])
    assert {"GNLY", "NKG7"} <= set(sc.get.rank_genes_groups_df(adata, "CD56+ NK")["names"][:15])
    called = sc.get.rank_genes_groups_df(adata, "CD19+ B", pval_cutoff=0.05)
    assert 0 < len(called) < adata.n_vars and (called["pvals_adj"] < 0.05).all()
    assert "pts" not in result and "pct_nz_group" not in b_cells  # scanpy's default: pts=False
    sc.pl.rank_genes_groups(adata, n_genes=5, show=False)
    sc.pl.rank_genes_groups_dotplot(adata, n_genes=2, show=False, dendrogram=False)
    adata.write_h5ad(tmp_path / "ranked.h5ad")  # group names such as 'CD4+/CD25 T Reg' included
    read = ad.read_h5ad(tmp_path / "ranked.h5ad")
    pd.testing.assert_frame_equal(sc.get.rank_genes_groups_df(read, "CD19+ B"), b_cells)
    # A reference group and a subset of groups, as in scanpy, with the shares of cells that express each gene.
    cellvae.tl.rank_genes_groups(
        adata, "cell_type", model=model, groups=["CD19+ B"], reference="CD56+ NK", pts=True, key_added="b_vs_nk"
    )
    assert list(adata.uns["b_vs_nk"]["names"].dtype.names) == ["CD19+ B"]
    b_vs_nk = sc.get.rank_genes_groups_df(adata, "CD19+ B", key="b_vs_nk").set_index("names")
    is_b, is_nk = (adata.obs["cell_type"] == name for name in ("CD19+ B", "CD56+ NK"))
    cd79a = adata[:, "CD79A"].X.toarray().ravel() > 0
    assert b_vs_nk.loc["CD79A", "pct_nz_group"] == pytest.approx(cd79a[is_b].mean())
    # as scanpy's: the reference group is a column of pts, and there is no pts_rest (nor pct_nz_reference)
    assert list(adata.uns["b_vs_nk"]["pts"].columns) == ["CD19+ B", "CD56+ NK"] and "pts_rest" not in adata.uns["b_vs_nk"]
    assert adata.uns["b_vs_nk"]["pts"].loc["CD79A", "CD56+ NK"] == pytest.approx(cd79a[is_nk].mean())
    assert "pct_nz_reference" not in b_vs_nk
    # every group against one: pts in the categories' order, the reference's column among them
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, reference="CD56+ NK", pts=True, key_added="vs_nk")
    pts = adata.uns["vs_nk"]["pts"]
    assert list(pts.columns) == list(adata.obs["cell_type"].cat.categories) and "pts_rest" not in adata.uns["vs_nk"]
    np.testing.assert_allclose(pts.loc["CD79A"], [cd79a[adata.obs["cell_type"] == c].mean() for c in pts.columns])
    # groups as given, the reference among them where named there (scanpy's order)
    cellvae.tl.rank_genes_groups(
        adata, "cell_type", model=model, groups=["CD56+ NK", "CD19+ B"], reference="CD56+ NK", pts=True, key_added="given"
    )
    assert list(adata.uns["given"]["pts"].columns) == ["CD56+ NK", "CD19+ B"]


def test_rank_genes_groups_refuses_columns_scanpys_plots_cannot_show(simulated, model):
    adata = simulated.copy()
    adata.obs["as_text"] = adata.obs["cell_type"].astype(str)
    with pytest.raises(ValueError, match="astype\\('category'\\)"):
        cellvae.tl.rank_genes_groups(adata, "as_text", model=model)
    with pytest.raises(ValueError, match=r"takes no method.*scanpy.tl.rank_genes_groups\(adata, .cell_type., method=.wilcoxon."):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, method="wilcoxon")
    # scanpy's other arguments, passed out of habit: what to do instead (Python's bare error before)
    for name, value, advice in (
        ("use_raw", False, "the model reads the raw counts it was trained on"),
        ("layer", "counts", "where it was trained on them"),
        ("rankby_abs", True, "by the absolute scores"),
        ("corr_method", "bonferroni", "posterior expected false discovery rate"),
        ("tie_correct", True, "scanpy's Wilcoxon test"),
    ):
        with pytest.raises(TypeError, match=rf"rank_genes_groups\(\) got .* {name!r}, scanpy's name: drop it: .*{advice}"):
            cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, **{name: value})
    with pytest.raises(TypeError, match=r"takes adata, groupby by position .* got 3 positional; e.g. rank_genes_groups\(model="):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model)
    adata.obs["with_unused"] = adata.obs["cell_type"].cat.add_categories(["empty"])
    with pytest.raises(ValueError, match="remove_unused_categories"):
        cellvae.tl.rank_genes_groups(adata, "with_unused", model=model)
    named = adata.obs["with_unused"].cat.categories[:2].tolist()  # named groups: scanpy shows only those
    cellvae.tl.rank_genes_groups(adata, "with_unused", model=model, groups=named[:1], reference=named[1], key_added="named")
    assert list(adata.uns["named"]["names"].dtype.names) == named[:1]
    del adata.uns["named"]
    adata.obs["number"] = adata.obs["cell_type"].cat.codes.astype(float).astype("category")  # categories 0.0, 1.0, ...
    cellvae.tl.rank_genes_groups(adata, "number", model=model, groups=["1.0", "2.0"], reference="0.0", key_added=None)
    assert list(adata.uns["rank_genes_groups"]["names"].dtype.names) == ["1.0", "2.0"]  # as scanpy names them
    assert adata.uns["rank_genes_groups"]["params"]["reference"] == "0.0"
    assert len(sc.get.rank_genes_groups_df(adata, "1.0")) == adata.n_vars
    del adata.uns["rank_genes_groups"]
    with pytest.raises(TypeError, match="key_added must be a non-empty string"):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, key_added=5)
    with pytest.raises(ValueError, match="key_added must not hold '/'"):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, key_added="rgg/cellvae")
    with pytest.raises(ValueError, match="only the reference"):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, groups=["type1"], reference="type1")
    with pytest.raises(ValueError, match=r"groups=\[\] names no group"):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, groups=[])
    with pytest.raises(ValueError, match=r"^groups: group 'type9' has no cells in obs\['cell_type'\]"):  # (its own argument)
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, groups=["type9"])
    # reference=None (scvi-tools' group2=None) ran against the rest but recorded None, and with pts the AnnData could
    # not be written; 'Rest' was told to pass group2=None, an argument of another function
    for reference, hint in ((None, " \\(for all other cells pass reference='rest'\\)"), ("Rest", " \\(for all"), ("type9", "")):
        told = rf"reference takes 'rest' or one group of obs\['cell_type'\], as scanpy's; got {reference!r}{hint}"
        with pytest.raises(ValueError, match=told + r".*; its groups are \['type0', "):
            cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, reference=reference, pts=True)
    with pytest.raises(TypeError, match=r"groups takes 'all' or a list of groups of obs\['cell_type'\]; for every group pass"):
        cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, groups=None)
    adata.obs["named_rest"] = adata.obs["cell_type"].cat.rename_categories({"type0": "rest"})  # a group called "rest"
    cellvae.tl.rank_genes_groups(adata, "named_rest", model=model, groups=["rest", "type1"], key_added="with_rest")
    assert list(adata.uns["with_rest"]["names"].dtype.names) == ["rest", "type1"]  # (it was left out, silently)
    del adata.uns["with_rest"]
    cellvae.tl.rank_genes_groups(adata, "number", model=model, groups=["2"], reference="1", key_added="by_own_name")
    assert adata.uns["by_own_name"]["params"]["reference"] == "1.0"  # (differential_expression's name of 1.0 is "1")
    del adata.uns["by_own_name"]
    assert "rank_genes_groups" not in adata.uns
    # another tool's entry is not replaced (a rank_genes_groups result is: scanpy's or an earlier run's)
    adata.uns["neighbors"] = {"params": {"method": "umap"}, "connectivities_key": "connectivities"}
    adata.uns["cell_type_colors"] = np.array(["#1f77b4", "#ff7f0e"])
    for taken in ("neighbors", "cell_type_colors"):
        with pytest.raises(ValueError, match=rf"adata.uns\['{taken}'\] holds another tool's entry"):
            cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, key_added=taken)
    assert adata.uns["neighbors"]["connectivities_key"] == "connectivities" and len(adata.uns["cell_type_colors"]) == 2


@pytest.mark.slow
def test_interferon_genes_lead_in_stimulated_monocytes():
    kang = shared_dataset("kang_ifnb_muscat_example.h5ad")
    model = CellVAE(kang, batch_key="donor").fit(max_epochs=100, progress=False)
    kang.obs["condition"] = kang.obs["batch"].astype(str).where(kang.obs["cell_type"] == "CD14+ Monocytes", "other")
    result = model.differential_expression(kang, groupby="condition", group1="stim", group2="ctrl")
    interferon = ["ISG15", "IFI6", "IFIT1", "IFIT3", "MX1", "ISG20", "IFITM3", "LY6E", "RSAD2", "OAS1"]
    up = result[result["lfc_mean"] > 0].index[:30]
    assert len(set(interferon) & set(up)) >= 7
    assert (result.loc[interferon, "lfc_mean"] > 1).sum() >= 8 and result.loc[interferon, "is_de"].all()
    # ten cells against ten: the interferon genes change ~100-fold, and are called (none were, while the
    # prior's pseudo-cells pulled each group's mean towards the other's)
    rng = np.random.default_rng(0)
    monocytes = (kang.obs["cell_type"] == "CD14+ Monocytes").to_numpy()
    stim, ctrl = (
        rng.choice(np.flatnonzero(monocytes & (kang.obs["batch"] == b).to_numpy()), 10, replace=False) for b in ("stim", "ctrl")
    )
    ten = model.differential_expression(kang, idx1=stim, idx2=ctrl, progress=False)
    assert ten.loc[interferon, "is_de"].sum() >= 8 and ten.loc[interferon, "lfc_mean"].median() > 3


def test_default_pseudocount_is_a_hundredth_of_a_count_in_a_cell_of_median_depth(simulated, model):
    depth = float(np.median(np.asarray(simulated.X.sum(1)).ravel()))
    kwargs = {"groupby": "cell_type", "group1": "type0", "n_draws": 100, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = model.differential_expression(**kwargs)
        explicit = model.differential_expression(**kwargs, pseudocount=0.01 / depth)
    pd.testing.assert_frame_equal(default, explicit)


def test_groups_that_share_a_batch_are_not_warned_about_sharing_none(simulated, model):
    """type0's cells of batch0 against the rest (cells of both batches): they share batch0, so no warning."""
    adata = simulated.copy()
    adata.obs["group"] = np.where((adata.obs["cell_type"] == "type0") & (adata.obs["batch"] == "batch0"), "a", "b")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.differential_expression(adata, groupby="group", group1="a", n_draws=100, progress=False)
    assert not [w for w in caught if "share no batch" in str(w.message)]


def test_fewer_counts_in_the_same_cells_make_fold_changes_less_certain():
    """The counting noise of a group's mean: the same comparison on counts thinned to 3% has wider fold change
    posteriors ("a difference is found with more certainty the more cells and counts support it"), most of all
    for genes of few counts; a highly expressed gene's spread is mostly its overdispersion across cells, which
    thinning keeps. (Over training seeds 0-5: the median spread grew 1.66-1.78x, 1.9-2.2x in the quarter of genes
    with the fewest counts, 1.1-1.2x in the quarter with the most. After 30 epochs the model had not yet told the
    two types apart in 5 of 6 seeds, and the spreads were those of shrinkage towards no change.)"""
    adata = cellvae.datasets.simulate(
        n_cells=600, n_genes=100, n_batches=1, n_cell_types=2, random_state=0, mean_library_size=3000.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(adata, n_hidden=32).fit(max_epochs=150, progress=False)
        thin = adata.copy()
        thin.X = sp.csr_matrix(np.random.default_rng(0).binomial(adata.X.toarray().astype(np.int64), 0.03).astype(np.float32))
        full, thinned = (
            model.differential_expression(a, groupby="cell_type", group1="type0", group2="type1", n_draws=200, progress=False)
            for a in (adata, thin)
        )
    assert (full["lfc_mean"].abs() > 1.0).sum() >= 20  # the model tells the types apart (40 marker genes)
    growth = thinned["lfc_std"].reindex(full.index) / full["lfc_std"]
    mean_counts = pd.Series(np.asarray(adata.X.mean(axis=0)).ravel(), index=adata.var_names).reindex(full.index)
    fewest, most = growth[mean_counts <= mean_counts.quantile(0.25)], growth[mean_counts >= mean_counts.quantile(0.75)]
    assert growth.median() > 1.4, growth.describe()
    assert fewest.median() > 1.6 and fewest.median() > most.median() + 0.4, (fewest.median(), most.median())


def test_rank_genes_groups_returns_none_in_place_and_records_the_settings_it_ran_with(simulated, model):
    adata = simulated.copy()
    settings = {"delta": 0.5, "batch_correction": False, "n_draws": 150, "max_cells": 100, "random_state": 3}
    assert cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, progress=False, **settings) is None
    params = adata.uns["rank_genes_groups"]["params"]
    assert {key: params[key] for key in settings} == settings
    assert (params["reference"], params["pts"], params["layer"], params["use_raw"]) == ("rest", False, None, False)
    # and it ran with them (an audit: delta and batch_correction could be dropped while the record kept them): each
    # group's scores and log fold changes are those of differential_expression with the same settings
    table = model.differential_expression(adata, groupby="cell_type", progress=False, **settings)
    unlabelled = adata.copy()  # pts_rest: the share among the rest of the labelled cells (scanpy's counts all)
    unlabelled.obs.loc[unlabelled.obs_names[::10], "cell_type"] = np.nan
    cellvae.tl.rank_genes_groups(unlabelled, "cell_type", model=model, progress=False, pts=True, key_added="pts", **settings)
    counts, labelled = adata.X.toarray() > 0, unlabelled.obs["cell_type"].notna().to_numpy()
    for group in adata.obs["cell_type"].cat.categories:
        ranked = sc.get.rank_genes_groups_df(adata, group).set_index("names")
        expected = table[table["group1"] == group].loc[ranked.index]
        np.testing.assert_array_equal(ranked["scores"], (expected["proba_up"] - expected["proba_down"]).astype(np.float32))
        np.testing.assert_array_equal(ranked["logfoldchanges"], expected["lfc_mean"].astype(np.float32))
        # pts: the share of the group's cells with a count of each gene; pts_rest: that of the other labelled cells
        shares = sc.get.rank_genes_groups_df(unlabelled, group, key="pts").set_index("names").loc[adata.var_names]
        in_group = (unlabelled.obs["cell_type"] == group).to_numpy()
        np.testing.assert_allclose(shares["pct_nz_group"], counts[in_group].mean(0), rtol=1e-6)
        np.testing.assert_allclose(shares["pct_nz_reference"], counts[~in_group & labelled].mean(0), rtol=1e-6)


def test_rank_genes_groups_keeps_each_groups_top_n_genes_as_scanpys_n_genes(simulated, model):
    adata = simulated.copy()
    settings = {"n_draws": 150, "max_cells": 100, "progress": False}
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, **settings)
    cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, n_genes=7, pts=True, key_added="top", **settings)
    for group in adata.obs["cell_type"].cat.categories:
        every = sc.get.rank_genes_groups_df(adata, group)
        top = sc.get.rank_genes_groups_df(adata, group, key="top")
        assert len(every) == adata.n_vars and len(top) == 7
        ranked = ["names", "scores", "logfoldchanges"]
        pd.testing.assert_frame_equal(top[ranked], every[ranked][:7])
        assert top["pct_nz_group"].notna().all()
    for wrong in (0, 2.5, True):
        with pytest.raises(ValueError, match="n_genes must be a positive integer"):
            cellvae.tl.rank_genes_groups(adata, "cell_type", model=model, n_genes=wrong, **settings)


def test_compare_summarises_the_draws_of_the_log2_fold_change_as_documented():
    """Without shrinkage (no measured genes to learn a prior from), each column is the documented summary of the
    draws of log2((predictive1 + c) / (predictive2 + c)); expression1/2 are the denoised draws' means per 10,000."""
    rng = np.random.default_rng(0)
    n_draws, n_genes, pseudocount = 1000, 4, 1e-6
    lfc_truth = torch.from_numpy(rng.normal([2.0, -1.0, 0.1, 0.0], [0.5, 0.8, 0.3, 1.5], (n_draws, n_genes)).astype(np.float32))
    predictive2 = torch.full((n_draws, n_genes), 1e-3)
    predictive1 = predictive2 * 2.0**lfc_truth
    denoised1, denoised2 = torch.full((n_draws, n_genes), 2e-3), torch.full((n_draws, n_genes), 1e-3)
    result = differential.compare(
        (denoised1, predictive1), (denoised2, predictive2), 0.25, pseudocount, np.zeros(n_genes, dtype=bool), rng
    )
    lfc = (torch.log2(predictive1 + pseudocount) - torch.log2(predictive2 + pseudocount)).numpy().astype(np.float64)
    np.testing.assert_allclose(result["lfc_mean"], lfc.mean(0), rtol=1e-5)
    np.testing.assert_allclose(result["lfc_std"], lfc.std(0), rtol=1e-4)
    np.testing.assert_allclose(
        result[["lfc_low", "lfc_median", "lfc_high"]], np.percentile(lfc, [2.5, 50, 97.5], axis=0).T, rtol=1e-5
    )
    up, down = (lfc > 0.25).mean(0), (lfc < -0.25).mean(0)
    np.testing.assert_allclose(result["proba_up"], up)
    np.testing.assert_allclose(result["proba_down"], down)
    np.testing.assert_allclose(result["proba_not_de"], 1.0 - up - down)
    assert result["proba_up"][0] > 0.99 and result["proba_down"][1] > 0.75  # a gene up, a gene down
    n_de = (up + down) * n_draws
    np.testing.assert_allclose(result["bayes_factor"], np.log((n_de + 0.5) / (n_draws - n_de + 0.5)))
    assert result["bayes_factor"][0] > 5 and result["bayes_factor"][2] < 0  # the log odds of proba_de
    np.testing.assert_allclose(result["expression1"], 20.0, rtol=1e-5)  # the denoised draws, per 10,000
    np.testing.assert_allclose(result["expression2"], 10.0, rtol=1e-5)


def _cells(model, simulated, rows, log_variance=-30.0):
    """Cells at their q(z|x) means with a posterior spread of ``log_variance``, each decoded with its own batch."""
    latent = torch.from_numpy(model.get_latent(simulated[rows]))
    codes = simulated.obs["batch"].cat.codes.to_numpy()[rows]
    library = np.asarray(simulated.X[rows].sum(1), dtype=np.float32).ravel()
    return differential.Cells(
        latent, torch.full_like(latent, log_variance), np.eye(2, dtype=np.float32)[codes], codes, library, 2, None
    )


def test_each_repeat_decodes_another_latent_draw_and_a_zero_inflated_mean_keeps_its_zeros(simulated, model):
    rows = np.arange(10)
    with torch.no_grad():
        expression, mean, variance = _cells(model, simulated, rows, 0.0).decode(model.module, rows, 4, np.random.default_rng(0))
        assert expression.shape == mean.shape == variance.shape == (4, 10, simulated.n_vars)
        assert (expression[0] - expression[1]).abs().amax(1).min() > 0  # every cell: two draws of z, two expressions
        torch.testing.assert_close(expression.sum(2), torch.ones(4, 10))  # normalised: sums to 1 per cell
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zinb = CellVAE(simulated, batch_key="batch", likelihood="zinb", n_hidden=32).fit(max_epochs=5, progress=False)
        expression, mean, _ = _cells(zinb, simulated, rows).decode(zinb.module, rows, 1, np.random.default_rng(0))
    assert (mean < expression).all()  # the point mass at zero lowers the mean the fold change compares


def test_the_weights_of_a_groups_cells_and_its_pseudo_cells_sum_to_one_in_every_draw(simulated, model):
    one_cell = np.zeros(3, dtype=int)  # a cell three times: every draw of the mean is that cell's expression
    cells = _cells(model, simulated, one_cell)
    with torch.no_grad():
        expression = cells.decode(model.module, np.arange(1), 1, np.random.default_rng(0))[0][0, 0]
        denoised, predictive = differential.group_mean_draws(model.module, cells, cells, 200, np.random.default_rng(0), 1024)
    assert denoised.shape == predictive.shape == (200, simulated.n_vars)
    torch.testing.assert_close(denoised, expression.expand_as(denoised), rtol=1e-4, atol=0)
    assert (predictive >= 0).all() and not torch.equal(predictive, denoised)  # plus the counting noise


def test_each_draw_weighs_the_groups_cells_by_a_flat_dirichlet(simulated, model, monkeypatch):
    """The Bayesian bootstrap: a group of two cells of fixed expression a and b draws means w a + (1 - w) b with
    w ~ Dirichlet(1, 1), uniform on (0, 1) (a test audit: equal weights, no spread at all, passed every test)."""
    monkeypatch.setattr(differential, "PRIOR_CELLS", 0)  # the group's own cells alone
    cells = _cells(model, simulated, np.array([0, 1]))  # (no posterior spread: each cell decodes to one expression)
    with torch.no_grad():
        denoised, _ = differential.group_mean_draws(model.module, cells, cells, 4000, np.random.default_rng(0), 1024)
    draws = denoised.double().numpy()
    gene = int(np.argmax(draws.max(0) - draws.min(0)))
    share = (draws[:, gene] - draws[:, gene].min()) / (draws[:, gene].max() - draws[:, gene].min())
    assert abs(share.mean() - 0.5) < 0.02 and abs(share.var() - 1 / 12) < 0.006  # U(0, 1): mean 1/2, variance 1/12
    other = int(np.argsort(draws.max(0) - draws.min(0))[-2])  # every gene moves with the same weight
    assert abs(np.corrcoef(draws[:, gene], draws[:, other])[0, 1]) > 0.999


def test_the_counting_noise_keeps_the_mean_and_variance_and_never_draws_a_well_measured_mean_near_zero():
    """A Gaussian clipped at 0 gave PPBP in pbmc3k's 14 platelets (lfc 9) a few draws of 0, hence proba_down > 0
    and rank 26 among the platelets' markers; a Gamma with the same mean and variance is positive and skewed."""
    mean = torch.tensor([2e-3, 1e-4, 0.0, 5e-4]).expand(400_000, 4)
    variance = torch.tensor([(0.4 * 2e-3) ** 2, (3 * 1e-4) ** 2, 0.0, 0.0]).expand(400_000, 4)
    draws = differential.with_counting_noise(mean, variance, np.random.default_rng(0))
    assert draws.shape == mean.shape and draws.dtype == torch.float32 and (draws >= 0).all()
    as64 = draws.double()
    torch.testing.assert_close(as64[:, :2].mean(0), mean[0, :2].double(), rtol=0.01, atol=0)
    torch.testing.assert_close(as64[:, :2].var(0), variance[0, :2].double(), rtol=0.05, atol=0)
    assert (draws[:, 0] < 0.1 * 2e-3).double().mean() < 1e-3  # 2.25 sd below the mean: 1.2% of a Gaussian's draws
    assert draws[:, 1].median() < 0.2 * 1e-4  # few counts: mostly near 0, as a Poisson total
    assert (draws[:, 2] == 0).all() and (draws[:, 3] == 5e-4).all()  # no variance: the mean itself
    edges = differential.with_counting_noise(  # a shape past float32's range: the mean; a NaN variance: NaN
        torch.tensor([[1.0, 1e-3, 1e-3]]), torch.tensor([[1e-40, float("nan"), float("inf")]]), np.random.default_rng(0)
    )
    assert edges[0, 0] == 1.0 and edges[0, 1:].isnan().all()


def test_comparing_in_blocks_of_genes_and_draws_gives_the_same_numbers(monkeypatch):
    """compare and the counting noise work a block at a time to bound their memory (16,579 genes × 1,000 draws: 750 MB
    at the peak before, 430 MB after); the blocks' size changes no number, as each block draws the same random numbers."""
    generator = np.random.default_rng(3)
    means = [torch.from_numpy(generator.gamma(2.0, 1e-3, size=(200, 37)).astype(np.float32)) for _ in range(4)]
    measured = np.ones(37, dtype=bool)

    def frame() -> pd.DataFrame:
        rng = np.random.default_rng(0)
        draws = [(m, differential.with_counting_noise(m, m * 1e-3, rng)) for m in means[:2]]
        return differential.compare(draws[0], draws[1], 0.25, 1e-4, measured, rng)

    whole = frame()
    monkeypatch.setattr(differential, "GENES_PER_CHUNK", 5)  # blocks of 5 genes (37 = 7 × 5 + 2)
    monkeypatch.setattr(differential, "NOISE_VALUES_PER_BLOCK", 3 * 37 + 10)  # of 3 draws
    blocked = frame()
    pd.testing.assert_frame_equal(whole, blocked, check_exact=True)
    assert whole["proba_de"].between(0, 1).all() and whole["lfc_std"].gt(0).all()


def test_pseudo_cells_widen_a_small_group_without_moving_its_mean(simulated, model, monkeypatch):
    """Two cells of type0 with 4 pseudo-cells drawn from both groups (these 2 and 10 of type1): each pseudo-cell is
    scaled by the pair's own mean over the pool's, so the mean of the draws stays the pair's (genes of type1 stay
    as low as the pair has them), while the spread of the draws grows over that of the pair alone."""
    types = simulated.obs["cell_type"].to_numpy()
    a, b = np.flatnonzero(types == "type0")[:2], np.flatnonzero(types == "type1")[:10]
    group, pool = _cells(model, simulated, a), _cells(model, simulated, np.r_[a, b])
    with torch.no_grad():
        decoded = pool.decode(model.module, np.arange(12), 1, np.random.default_rng(0))[0][0].double()
        denoised, _ = differential.group_mean_draws(model.module, group, pool, 4000, np.random.default_rng(0), 1024)
        monkeypatch.setattr(differential, "PRIOR_CELLS", 0)
        alone, _ = differential.group_mean_draws(model.module, group, pool, 4000, np.random.default_rng(0), 1024)
    pair, others = decoded[:2].mean(0), decoded[2:].mean(0)
    torch.testing.assert_close(denoised.double().mean(0), pair, rtol=0.05, atol=0)
    of_type1 = others > 4 * pair
    assert of_type1.sum() >= 10  # (the old prior moved these to 4/9 of the pair's + 5/9 of type1's level)
    spread, spread_alone = (draws.double().std(0) / draws.double().mean(0) for draws in (denoised, alone))
    assert (spread > 1.5 * spread_alone).float().mean() > 0.9


def test_strong_changes_between_groups_of_twenty_cells_are_called(simulated, model):
    """A group's pseudo-cells once came from both groups, so 20 cells of one type against 20 of another had every
    marker pulled towards the other group's level and shrunk to no change (0 of 12 interferon genes called in
    20 vs 20 monocytes of the Kang data); they now keep each group's own level."""
    whole = model.differential_expression(groupby="cell_type", group1="type0", group2="type1", n_draws=200)
    rng = np.random.default_rng(0)
    types = simulated.obs["cell_type"].to_numpy()
    twenty = simulated.copy()
    labels = np.full(twenty.n_obs, "other", dtype=object)
    labels[rng.choice(np.flatnonzero(types == "type0"), 20, replace=False)] = "A"
    labels[rng.choice(np.flatnonzero(types == "type1"), 20, replace=False)] = "B"
    twenty.obs["twenty"] = labels
    small = model.differential_expression(twenty, groupby="twenty", group1="A", group2="B", n_draws=200)
    strong = whole.index[whole["is_de"] & (whole["lfc_mean"].abs() > 2)]
    assert len(strong) >= 20
    assert small.loc[strong, "is_de"].mean() > 0.5  # (none with the old prior; 0.71 with no pseudo-cells at all)
    assert (np.sign(small.loc[strong, "lfc_mean"]) == np.sign(whole.loc[strong, "lfc_mean"])).all()
    assert np.median(small.loc[strong, "lfc_mean"] / whole.loc[strong, "lfc_mean"]) > 0.5  # (old prior: 0.1)
    # three cells: less certain than the whole type, still on the side of the change
    labels[labels == "A"] = "other"
    labels[rng.choice(np.flatnonzero(types == "type0"), 3, replace=False)] = "A"
    twenty.obs["twenty"] = labels
    with pytest.warns(UserWarning, match="fewer than 5 cells"):
        three = model.differential_expression(twenty, groupby="twenty", group1="A", group2="B", n_draws=200)
    width = three["lfc_high"] - three["lfc_low"]
    assert (width.loc[strong] > (whole["lfc_high"] - whole["lfc_low"]).loc[strong]).mean() > 0.9
    assert (np.sign(three.loc[strong, "lfc_mean"]) == np.sign(whole.loc[strong, "lfc_mean"])).mean() > 0.9


def test_shrinkage_keeps_a_point_mass_at_no_change_and_the_normal_posterior_of_changed_genes():
    """Unchanged genes take the point mass at 0 in many draws (exactly 0). Genes whose changes are drawn from
    N(0, 0.25²) and measured with error 0.25 get the normal-normal posterior: means shrunk by c = 1/2 and spread
    0.25·√c (not 0.25·c). A prior is learnt from as few as MIN_SHRINKAGE_GENES genes."""
    rng = np.random.default_rng(0)
    n = 400
    truth = np.r_[np.zeros(n), 0.25 * rng.standard_normal(n)]
    draws = torch.from_numpy(truth + 0.25 * rng.standard_normal(2 * n) + 0.25 * rng.standard_normal((2000, 2 * n)))
    fitted = torch.ones(n, dtype=torch.bool)
    unchanged = differential.shrink(draws[:, :n], fitted, np.random.default_rng(1)).numpy()
    assert (unchanged == 0).mean() > 0.2
    changed = differential.shrink(draws[:, n:], fitted, np.random.default_rng(1)).numpy()
    slope = np.polyfit(draws[:, n:].numpy().mean(0), changed.mean(0), 1)[0]
    assert 0.4 < slope < 0.6
    assert 0.15 < np.median(changed.std(0)) < 0.2
    fewest = differential.MIN_SHRINKAGE_GENES
    few = draws[:, :fewest]
    assert not torch.equal(differential.shrink(few, fitted[:fewest], np.random.default_rng(1)), few)


def test_cells_without_a_label_in_a_categorical_column_take_no_part(simulated, model):
    partly = simulated.copy()
    partly.obs["some_types"] = partly.obs["cell_type"].where(partly.obs["batch"] == "batch0")  # NaN in batch1
    assert partly.obs["some_types"].dtype == "category"
    result = model.differential_expression(partly, groupby="some_types", group1="type0", n_draws=100)
    counts = simulated.X.toarray()
    rest = ((partly.obs["batch"] == "batch0") & (partly.obs["cell_type"] != "type0")).to_numpy()
    np.testing.assert_allclose(result.loc[simulated.var_names, "fraction_nonzero2"], (counts[rest] > 0).mean(0))


def test_groups_of_a_column_of_numbers_come_in_order_of_value(simulated, model):
    doses = simulated.copy()
    doses.obs["dose"] = np.array([2.0, 0.5, 0.0, 1.0, 0.25])[doses.obs["cell_type"].cat.codes.to_numpy()]
    every = model.differential_expression(doses, groupby="dose", n_draws=100)
    assert list(every["group1"].unique()) == ["0", "0.25", "0.5", "1", "2"]


def test_every_group_is_compared_with_group2_when_group1_is_none(simulated, model):
    result = model.differential_expression(groupby="cell_type", group2="type0", n_draws=100)
    assert list(result["group1"].unique()) == ["type1", "type2", "type3", "type4"] and (result["group2"] == "type0").all()
    alone = model.differential_expression(groupby="cell_type", group1="type2", group2="type0", n_draws=100)
    assert alone.equals(result[result["group1"] == "type2"])


def test_an_obs_name_given_as_text_is_that_cell_not_a_condition(simulated, model):
    name = simulated.obs_names[0]
    with pytest.warns(UserWarning, match="fewer than 5 cells"):
        by_name = model.differential_expression(idx1=name, n_draws=100)
    with pytest.warns(UserWarning, match="fewer than 5 cells"):
        by_list = model.differential_expression(idx1=[name], n_draws=100)
    assert by_name.equals(by_list)


def test_a_group_of_exactly_max_cells_is_used_whole(simulated, model):
    types = simulated.obs["cell_type"]
    largest = int(max((types == "type0").sum(), (types == "type1").sum()))
    kwargs = {"groupby": "cell_type", "group1": "type0", "group2": "type1", "n_draws": 100}
    whole = model.differential_expression(**kwargs, max_cells=largest)
    pd.testing.assert_frame_equal(whole, model.differential_expression(**kwargs))
    assert not model.differential_expression(**kwargs, max_cells=largest - 1).equals(whole)


def test_subsample_draws_distinct_cells_in_order():
    cells = np.arange(0, 2000, 2)
    picked = differential.subsample(cells, 500, np.random.default_rng(0))
    assert len(np.unique(picked)) == 500 and np.all(np.diff(picked) > 0) and np.isin(picked, cells).all()


def test_a_cell_without_counts_takes_no_part_in_the_normalized_means_nor_the_draws(simulated, model):
    adata = simulated.copy()
    counts = adata.X.toarray()
    empty = np.flatnonzero(adata.obs["cell_type"] == "type0")[0]
    counts[empty] = 0
    adata.X = sp.csr_matrix(counts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = model.differential_expression(adata, groupby="cell_type", group1="type0", n_draws=100)
    in_type0 = (adata.obs["cell_type"] == "type0").to_numpy()
    normalized = counts / np.maximum(counts.sum(1, keepdims=True), 1) * 1e4
    with_counts = in_type0 & (counts.sum(1) > 0)  # (fraction_nonzero counts it, as a cell without a count)
    np.testing.assert_allclose(result.loc[adata.var_names, "raw_normalized_mean1"], normalized[with_counts].mean(0), rtol=1e-5)
    np.testing.assert_allclose(result.loc[adata.var_names, "fraction_nonzero1"], (counts[in_type0] > 0).mean(0))
    # nor in the draws: the decoded columns are those of the comparison without it
    unlabelled = adata.copy()
    unlabelled.obs["cell_type"] = unlabelled.obs["cell_type"].astype(object)
    unlabelled.obs.loc[unlabelled.obs_names[empty], "cell_type"] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        without = model.differential_expression(unlabelled, groupby="cell_type", group1="type0", n_draws=100)
    decoded = ["lfc_mean", "lfc_std", "proba_de", "expression1", "expression2"]
    pd.testing.assert_frame_equal(result[decoded], without[decoded])


def test_a_mask_of_the_same_cells_in_another_order_is_refused_not_read_by_position():
    """A boolean Series of one AnnData given for another holding the same cells in another order (sorted by type):
    read by position it picked cells of every type; refused, and its reindexed form selects the right cells."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = CellVAE(adata, n_hidden=16, n_latent=4).fit(max_epochs=2, progress=False)
    by_type = adata[adata.obs.sort_values("cell_type").index].copy()
    mask = adata.obs["cell_type"] == "type0"
    with pytest.raises(ValueError, match=r"idx1 is a boolean Series whose index is not adata.obs_names.*reindex"):
        small.differential_expression(by_type, idx1=mask, n_draws=100, progress=False)
    with pytest.raises(ValueError, match="apply_to is a boolean Series whose index is not adata.obs_names"):
        cellvae.tl.latent_shift(small, by_type, groupby="cell_type", source="type1", target="type2", apply_to=mask)
    aligned = mask.reindex(by_type.obs_names)
    pd.testing.assert_frame_equal(
        small.differential_expression(by_type, idx1=aligned, n_draws=100, progress=False),
        small.differential_expression(by_type, idx1="cell_type == 'type0'", n_draws=100, progress=False),
    )


def test_idx1_and_idx2_compare_as_a_column_that_labels_only_their_cells(simulated, model):
    """Cells in neither set take no part (e.g. in the default pseudocount's median depth), as unlabelled cells."""
    types = simulated.obs["cell_type"].to_numpy()
    first, second = types == "type0", types == "type1"
    labelled = simulated.copy()
    labelled.obs["sets"] = pd.Series(np.where(first, "idx1", np.where(second, "idx2", None)), index=labelled.obs_names)
    by_column = model.differential_expression(labelled, groupby="sets", group1="idx1", group2="idx2", n_draws=100)
    pd.testing.assert_frame_equal(model.differential_expression(idx1=first, idx2=second, n_draws=100), by_column)


def test_each_comparison_draws_from_a_stream_of_its_own_two_groups():
    """The seed follows random_state and both groups' names (not their positions), so comparisons that share a
    group still draw independently, and the same comparison draws the same in any run."""
    seeds = {tuple(differential.comparison_seed(0, "a", other, False)) for other in ("b", "c", "rest")}
    assert len(seeds) == 3
    assert differential.comparison_seed(0, "a", "b", False) == differential.comparison_seed(0, "a", "b", False)
    assert differential.comparison_seed(0, "a", "b", False) != differential.comparison_seed(0, "b", "a", False)
    assert differential.comparison_seed(0, "a", "b", False) != differential.comparison_seed(1, "a", "b", False)
    assert differential.comparison_seed(0, "a", "rest", True) != differential.comparison_seed(0, "a", "rest", False)


def test_expected_counts_are_the_smaller_groups_counts_at_the_higher_level(simulated, model):
    """A small group's call of a gene it holds about a count or less of rests on the decoding alone: the column says
    how many counts the smaller group would hold of each gene at the higher of the two groups' decoded levels."""
    in_group = np.zeros(simulated.n_obs, dtype=bool)
    in_group[np.flatnonzero(simulated.obs["cell_type"] == "type0")[:8]] = True
    with pytest.warns(UserWarning, match="expected_counts < 1"):
        result = model.differential_expression(simulated, idx1=in_group, n_draws=100, progress=False)
    group_counts = float(simulated.X[in_group].sum())  # the smaller group: its cells' total counts
    expected = group_counts * np.maximum(result["expression1"], result["expression2"]) / 1e4
    np.testing.assert_allclose(result["expected_counts"], expected, rtol=1e-5)
    assert (result["expected_counts"] < 1).any() and (result["expected_counts"] > 10).any()  # sparse genes and others
    # with zero-inflation, the likelihood's mean: below the negative binomial's level (expression1/2) the table shows
    zinb = CellVAE(simulated, batch_key="batch", likelihood="zinb").fit(max_epochs=3, progress=False)
    with pytest.warns(UserWarning, match="expected_counts < 1"):
        result = zinb.differential_expression(simulated, idx1=in_group, n_draws=100, progress=False)
    at_nb_level = group_counts * np.maximum(result["expression1"], result["expression2"]) / 1e4
    assert np.median(result["expected_counts"] / at_nb_level) < 0.95
