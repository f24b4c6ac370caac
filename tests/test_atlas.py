"""Atlas building: batch integration, reference mapping (map_query) and label transfer."""

import argparse
import gc
import pickle
import re
import warnings
import weakref
from copy import deepcopy

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from conftest import no_warnings, pca_of, shared_dataset, simulated_module
from sklearn.model_selection import KFold, cross_val_score
from sklearn.neighbors import KNeighborsClassifier

import cellvae
from cellvae import CellVAE
from cellvae.cli import in_command_line_terms
from cellvae.data import names_in_other_case
from cellvae.module import batch_discrepancy
from cellvae.train import default_max_epochs, default_query_epochs


def knn_accuracy(representation: np.ndarray, labels) -> float:
    """Cross-validated accuracy of a 15-NN classifier: near chance for batches means they mix."""
    folds = KFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(15), representation, np.asarray(labels).astype(str), cv=folds).mean())


@pytest.fixture(scope="module")
def three_batches():
    return cellvae.datasets.simulate(n_cells=1500, n_genes=300, n_batches=3, n_cell_types=4, random_state=3, batch_effect=0.8)


@pytest.fixture(scope="module")
def integrated(three_batches):
    return CellVAE(three_batches, batch_key="batch").fit(max_epochs=200, progress=False)


@pytest.fixture(scope="module")
def reference_and_query(three_batches):
    """A reference model trained on batch0 and batch1; batch2 held out as the query."""
    is_query = (three_batches.obs["batch"] == "batch2").to_numpy()
    reference, query = three_batches[~is_query].copy(), three_batches[is_query].copy()
    model = CellVAE(reference, batch_key="batch").fit(max_epochs=200, progress=False)
    return model, reference, query


# ----------------------------------------------------------------------------- integration


def test_integration_mixes_batches_and_keeps_cell_types(three_batches, integrated):
    latent = integrated.get_latent()
    pca = pca_of(three_batches)
    batches, types = three_batches.obs["batch"], three_batches.obs["cell_type"]
    assert knn_accuracy(pca, batches) > 0.8  # the simulated batch effect is strong
    assert knn_accuracy(latent, batches) < 0.5  # chance is 1/3
    assert knn_accuracy(latent, types) > 0.95


def batch_share_of_latent_variance(latent: np.ndarray, obs: pd.DataFrame) -> float:
    """Share of the latent variance within each cell type that the batch explains (between-batch means)."""
    explained = total = 0.0
    for _, cells in obs.groupby("cell_type", observed=True).indices.items():
        codes = latent[cells] - latent[cells].mean(0)
        batch = obs["batch"].to_numpy()[cells]
        means = pd.DataFrame(codes).groupby(batch).transform("mean").to_numpy()
        explained += float((means**2).sum())
        total += float((codes**2).sum())
    return explained / total


def test_batch_discrepancy_is_zero_for_one_batch_and_grows_with_a_shift():
    from cellvae.module import batch_discrepancy

    generator = torch.Generator().manual_seed(0)
    z = torch.randn(300, 10, generator=generator)
    batches = torch.arange(300) % 3
    same = batch_discrepancy(z, batches, 3)
    shifted = z.clone()
    shifted[batches == 1, 0] += 3.0
    # the biased estimate: the same distribution gives the kernels' self-similarity / batch size (no gradient)
    assert 0 < same < 0.2 and batch_discrepancy(shifted, batches, 3) > same + 0.5
    assert batch_discrepancy(shifted, torch.zeros(300, dtype=torch.long), 3) == 0  # one batch: nothing to compare
    shifted.requires_grad_(True)
    batch_discrepancy(shifted, batches, 3).backward()
    assert torch.isfinite(shifted.grad).all()
    assert shifted.grad[batches == 1, 0].mean() > 0  # a descent step moves the shifted batch back


def test_batch_mmd_lowers_the_batch_share_of_the_latent_and_keeps_cell_types(three_batches, integrated, tmp_path):
    """100 epochs, seed 0 (CPU, seeds 0–3: a share of 0.021–0.030 without the penalty, 0.0042–0.0072 with it;
    the ratio is 0.17–0.34)."""
    assert integrated.config.batch_mmd == 0.0  # the default: off

    def fit(batch_mmd: float) -> CellVAE:
        return CellVAE(three_batches, batch_key="batch", batch_mmd=batch_mmd).fit(max_epochs=100, progress=False, random_state=0)

    def share(model: CellVAE) -> float:
        return batch_share_of_latent_variance(model.get_latent(), three_batches.obs)

    plain, penalised = fit(0.0), fit(10.0)
    assert share(penalised) < 0.5 * share(plain)
    latent = penalised.get_latent()
    assert knn_accuracy(latent, three_batches.obs["cell_type"]) > 0.95
    penalised.save(tmp_path / "model")
    loaded = CellVAE.load(tmp_path / "model")
    assert loaded.config.batch_mmd == 10.0
    np.testing.assert_array_equal(loaded.get_latent(three_batches), latent)
    with pytest.raises(ValueError, match="batch_mmd must be a non-negative finite number"):
        CellVAE(three_batches, batch_key="batch", batch_mmd=-1.0)
    with pytest.raises(ValueError, match="batch_mmd > 0 .* needs a batch_key"):  # no batches to penalise
        CellVAE(three_batches, batch_mmd=10.0)


def test_transform_batch_removes_the_batch_from_expression(three_batches, integrated):
    cells = (three_batches.obs["cell_type"] == "type0").to_numpy()
    from_0 = cells & (three_batches.obs["batch"] == "batch0").to_numpy()
    from_1 = cells & (three_batches.obs["batch"] == "batch1").to_numpy()
    observed = integrated.get_normalized_expression()
    corrected = integrated.get_normalized_expression(transform_batch="batch0")

    def gap(expression):
        return np.abs(np.log1p(expression[from_0].mean(0)) - np.log1p(expression[from_1].mean(0))).mean()

    assert gap(corrected) < 0.5 * gap(observed)
    averaged = integrated.get_normalized_expression(transform_batch=["batch0", "batch1"])
    as_1 = integrated.get_normalized_expression(transform_batch="batch1")
    np.testing.assert_allclose(averaged, (corrected + as_1) / 2, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not among the model's batches"):
        integrated.get_normalized_expression(transform_batch="batch9")


# ----------------------------------------------------------------------------- reference mapping

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=NEEDS_CUDA)])
def test_held_out_batch_is_mapped_and_labels_transfer(reference_and_query, device):
    model, reference, query = reference_and_query
    frozen = {k: v.clone() for k, v in model.module.state_dict().items()}
    query_model = model.map_query(query, progress=False, device=device)
    assert query_model.config.batch_categories == ["batch0", "batch1", "batch2"]
    # Reference weights are untouched, in the reference model and inside the grown layers of the query model.
    mapped = query_model.module.state_dict()
    for name, old in frozen.items():
        assert torch.equal(model.module.state_dict()[name], old)
        new = mapped[name]
        if new.shape == old.shape:
            assert torch.equal(new, old), name
        else:
            start = new.shape[1] - query_model.config.n_covariates + 2
            assert torch.equal(new[:, :start], old[:, :start]) and torch.equal(new[:, start + 1 :], old[:, start:]), name
            assert new[:, start].abs().sum() > 0  # the new batch column was trained
    np.testing.assert_array_equal(query_model.get_latent(reference), model.get_latent(reference))
    reference.obsm["X_cellvae"] = query_model.get_latent(reference)
    query.obsm["X_cellvae"] = query_model.get_latent()
    cellvae.tl.transfer_labels(reference, query, "cell_type")
    accuracy = (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.95
    # The query lands among the reference cells instead of beside them.
    joint = np.vstack([reference.obsm["X_cellvae"], query.obsm["X_cellvae"]])
    assert knn_accuracy(joint, np.r_[np.zeros(reference.n_obs), np.ones(query.n_obs)]) < 0.8


def test_a_new_batch_of_a_few_cells_is_mapped_with_a_warning(reference_and_query):
    """A query of 1-9 cells (a small sample) maps: its batch's parameters learn from those cells alone, which the
    warning says. The cells still land among their own type's reference cells."""
    model, reference, query = reference_and_query
    reference = reference.copy()
    reference.obsm["X_cellvae"] = model.get_latent(reference)
    for n_cells in (1, 4):
        few = query[:n_cells].copy()
        with pytest.warns(UserWarning, match=rf"under 10 cells with counts \(obs\['batch'\] 'batch2': {n_cells}\): map_query"):
            query_model = model.map_query(few, progress=False, random_state=0)
        few.obsm["X_cellvae"] = query_model.get_latent(few)
        cellvae.tl.transfer_labels(reference, few, "cell_type")
        assert (few.obs["cell_type_predicted"].astype(str) == few.obs["cell_type"].astype(str)).all()
    small = model.map_query(query[:4].copy(), progress=False, random_state=0)  # (its warning told above)
    small.fit(max_epochs=2, progress=False)  # trained further on its 4 cells, as map_query trained it
    named = query[:12].copy()
    named.obs["batch"] = "nan"  # astype(str) of missing values
    with pytest.warns(UserWarning, match=r"query_adata.obs\['batch'\] has a category 'nan', the text of a missing value"):
        model.map_query(named, progress=False, max_epochs=1)
    empty = query[:3].copy()
    empty.X = sp.csr_matrix(empty.shape, dtype=np.float32)
    with pytest.raises(ValueError, match=r"query_adata has no cells with counts"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (the empty cells' own warning)
        model.map_query(empty, progress=False)


def test_batch_normalized_reference_keeps_its_statistics_when_mapping(reference_and_query):
    reference, query = (adata.copy() for adata in reference_and_query[1:])
    model = CellVAE(reference, batch_key="batch", normalization="batch").fit(max_epochs=60, progress=False)
    statistics = {k: v.clone() for k, v in model.module.state_dict().items() if "running" in k}
    query_model = model.map_query(query, progress=False)
    for name, value in statistics.items():  # the query's minibatches did not move the reference's statistics
        assert torch.equal(query_model.module.state_dict()[name], value), name
    np.testing.assert_array_equal(query_model.get_latent(reference), model.get_latent(reference))
    reference.obsm["X_bn"], query.obsm["X_bn"] = query_model.get_latent(reference), query_model.get_latent()
    cellvae.tl.transfer_labels(reference, query, "cell_type", use_rep="X_bn")
    assert (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean() > 0.95


def test_a_linear_decoder_maps_a_query_through_its_new_batch_columns_and_keeps_the_reference_loadings(reference_and_query):
    reference, query = (adata.copy() for adata in reference_and_query[1:])
    model = CellVAE(reference, batch_key="batch", decoder="linear").fit(max_epochs=100, random_state=0, progress=False)
    loadings = model.get_loadings()
    query_model = model.map_query(query, max_epochs=30, progress=False)
    # the decoder's weights on z are the reference's; only the new batch's column of the linear decoder trained
    pd.testing.assert_frame_equal(query_model.get_loadings(), loadings)
    weight = query_model.module.decoder.proportions.weight.detach()
    assert weight.shape[1] == model.config.n_latent + 3  # z, then one column per batch (two known, one new)
    torch.testing.assert_close(weight[:, :-1], model.module.decoder.proportions.weight.detach(), rtol=0, atol=0)
    assert weight[:, -1].abs().max() > 0  # (it starts at zero)
    np.testing.assert_array_equal(query_model.get_latent(reference), model.get_latent(reference))
    reference.obsm["X_linear"], query.obsm["X_linear"] = query_model.get_latent(reference), query_model.get_latent()
    cellvae.tl.transfer_labels(reference, query, "cell_type", use_rep="X_linear")
    assert (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean() > 0.95


def test_mapped_model_saves_and_loads(reference_and_query, tmp_path):
    model, _, query = reference_and_query
    query_model = model.map_query(query, max_epochs=5, progress=False)
    query_model.save(tmp_path / "mapped")
    loaded = CellVAE.load(tmp_path / "mapped")
    assert loaded.config.batch_categories == query_model.config.batch_categories
    n_query = query.obs["batch"].nunique()
    assert f"{len(loaded.config.batch_categories)} batches, {n_query} of them the query's (a map_query model)" in repr(loaded)
    assert "query" not in repr(model)
    np.testing.assert_array_equal(loaded.get_latent(query), query_model.get_latent())


def test_query_genes_are_aligned_by_name(reference_and_query, tmp_path):
    model, _, query = reference_and_query
    rng = np.random.default_rng(0)
    shuffled = query[:, rng.permutation(query.n_vars)].copy()
    extra = ad.AnnData(sp.csr_matrix(np.ones((query.n_obs, 7), dtype=np.float32)), obs=query.obs)
    extra.var_names = [f"extra{i}" for i in range(7)]
    with_extra = ad.concat([shuffled, extra], axis=1, merge="first")
    expected = model.map_query(query, max_epochs=3, progress=False).get_latent()
    with no_warnings():  # extra genes and a new order are handled silently
        aligned = model.map_query(with_extra, max_epochs=3, progress=False)
    np.testing.assert_allclose(aligned.get_latent(), expected, rtol=1e-5, atol=1e-5)
    # a query with genes of its own: outputs without adata= come in the model's order, as those with adata=query
    # (they came in the query's order there, and in the model's for the same query passed as adata=)
    assert aligned.adata.var_names.tolist() == model.config.gene_names
    np.testing.assert_array_equal(aligned.get_normalized_expression(), aligned.get_normalized_expression(with_extra))
    # a query of just the model's genes keeps its order: outputs without adata= come in that order, as the query's
    # own columns (they came in the reference's order, and stored in the query's layers they sat under other genes)
    for just_the_genes in (shuffled[:, :], shuffled.copy()):  # (a view is copied, the query itself not)
        mapped = model.map_query(just_the_genes, max_epochs=1, progress=False)
        assert mapped.adata.var_names.tolist() == shuffled.var_names.tolist()
        np.testing.assert_array_equal(mapped.get_normalized_expression(), mapped.get_normalized_expression(shuffled))
    # lacking some of the model's genes, the rest in another order (query[:, query.var_names.isin(genes)]): each
    # column keeps its gene's name (the query's matrix was held under names in the model's order)
    lacking_some = shuffled[:, 5:].copy()
    counts = lacking_some.X.toarray()
    for form in (sp.csr_matrix, np.asarray):
        lacking_some.X = form(counts)
        with pytest.warns(UserWarning, match="5 of the model's 300 genes are missing"):
            mapped = model.map_query(lacking_some, max_epochs=1, progress=False)
        held = mapped.adata[:, lacking_some.var_names].X
        np.testing.assert_array_equal(held.toarray() if sp.issparse(held) else held, counts)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # (the genes missing, told again)
            np.testing.assert_array_equal(mapped.get_latent(), mapped.get_latent(lacking_some))
    permuted = model.map_query(shuffled, max_epochs=3, progress=False)
    assert np.shares_memory(permuted.adata.X.data, shuffled.X.data)  # all the model's genes, none other: not copied
    np.testing.assert_allclose(permuted.get_latent(), expected, rtol=1e-5, atol=1e-5)
    own = permuted.get_normalized_expression()
    np.testing.assert_allclose(own, permuted.get_normalized_expression(shuffled), rtol=1e-6)
    positions = pd.Index(model.config.gene_names).get_indexer(shuffled.var_names)
    np.testing.assert_allclose(own, permuted.get_normalized_expression(query)[:, positions], rtol=1e-6)
    # its obs is a copy made when mapping: groups added to the query since are read with adata=query, as told
    shuffled.obs["cluster"] = np.where(np.arange(shuffled.n_obs) % 2 == 0, "a", "b")
    with pytest.raises(KeyError, match=r"a model from map_query reads its copy of the query.*pass adata=query"):
        permuted.differential_expression(groupby="cluster", n_draws=100, progress=False)
    permuted.differential_expression(shuffled, groupby="cluster", n_draws=100, progress=False)
    permuted.save(tmp_path / "query_model", save_anndata=True)
    reloaded = CellVAE.load(tmp_path / "query_model", shuffled)  # the user's query itself: no word of a copy
    with pytest.raises(KeyError) as told:
        reloaded.differential_expression(groupby="no_such_column", n_draws=100, progress=False)
    assert "map_query" not in str(told.value)
    # a query lacking some model genes, with as many genes of its own: outputs come in the model's order, with a word
    partial = ad.concat([shuffled[:, 10:], extra[:, :7], extra[:, :3]], axis=1, merge="first")
    partial.var_names_make_unique()
    assert partial.n_vars == model.config.n_genes
    with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing"):
        lacking = model.map_query(partial, max_epochs=1, progress=False)
    with no_warnings():  # told once, by map_query: not again for each use of its copy of the query
        lacking.get_latent(progress=False)
    with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing"):  # the user's query: told
        lacking.get_latent(partial, progress=False)
    with pytest.warns(UserWarning, match=r"the query lacked 10 of the model's 300 genes, so the output's columns are the model"):
        assert lacking.get_normalized_expression(progress=False).shape == (partial.n_obs, 300)
    with pytest.warns(UserWarning, match=r"lacked 10 .* select its columns by name with model.config.gene_names"):
        lacking.get_likelihood_parameters(progress=False)  # (it takes no gene_list)
    for copied in (pickle.loads(pickle.dumps(lacking)), deepcopy(lacking)):  # (a weak reference is not picklable)
        with pytest.warns(UserWarning, match=r"the query lacked 10 of the model's 300 genes"):
            copied.get_normalized_expression(progress=False)
    copy = weakref.ref(lacking.adata)
    lacking.adata = None  # the model lets its copy of the query go: nothing else holds it
    gc.collect()
    assert copy() is None
    # on disk: the file's own genes are kept, the reference's it lacks counted as such (not offset by its extra genes)
    partial.write_h5ad(tmp_path / "partial.h5ad")
    on_disk = ad.read_h5ad(tmp_path / "partial.h5ad", backed="r")
    with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing"):
        streamed = model.map_query(on_disk, max_epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"the query lacked 10 of the model's 300 genes"):
        streamed.get_normalized_expression(progress=False)
    with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing"):
        view = model.map_query(on_disk[:100], max_epochs=1, progress=False)  # a view of counts on disk: the user's own
    with no_warnings():  # told once, by map_query, as for its copy of a query
        view.get_latent(progress=False)
    with pytest.warns(UserWarning, match=r"the query lacked 10 of the model's 300 genes"):  # (its own genes are others)
        view.get_normalized_expression(progress=False)
    with pytest.raises(KeyError) as told:
        view.differential_expression(groupby="no_such_column", n_draws=100, progress=False)
    assert "map_query" not in str(told.value)


def test_a_query_in_the_reference_gene_order_is_mapped_without_copying_its_counts(reference_and_query):
    """A copy of an in-memory atlas query doubled its memory (203,340 cells: +829 MB that stayed with the model)."""
    model, _, query = reference_and_query
    before = query.copy()
    as_csc = query.copy()
    as_csc.X = sp.csc_matrix(as_csc.X)  # another layout is still read into an aligned copy
    query_model = model.map_query(query, max_epochs=3, progress=False)
    assert np.shares_memory(query_model.adata.X.data, query.X.data)
    copied = model.map_query(as_csc, max_epochs=3, progress=False)
    assert not np.shares_memory(copied.adata.X.data, as_csc.X.data)
    np.testing.assert_array_equal(query_model.get_latent(), copied.get_latent())
    assert (query.X != before.X).nnz == 0 and query.obs.equals(before.obs) and query.var.equals(before.var)
    # the reference's genes first, in order, then genes of the query's own: those are left out, so an aligned copy
    extra = ad.AnnData(sp.csr_matrix(np.ones((query.n_obs, 5), dtype=np.float32)), obs=query.obs)
    extra.var_names = [f"extra{i}" for i in range(5)]
    with_extra = ad.concat([query, extra], axis=1, merge="first")
    mapped = model.map_query(with_extra, max_epochs=3, progress=False)
    assert mapped.adata.shape == query.shape and not np.shares_memory(mapped.adata.X.data, with_extra.X.data)
    np.testing.assert_array_equal(mapped.get_latent(), query_model.get_latent())


def test_missing_query_genes_warn_or_fail(reference_and_query):
    model, _, query = reference_and_query
    partial = query[:, 30:].copy()
    with pytest.warns(UserWarning, match="30 of the model's 300 genes are missing from query_adata") as at_mapping:
        mapped = model.map_query(partial, max_epochs=2, progress=False)
    with pytest.warns(UserWarning, match="30 of the model's 300 genes are missing from adata") as at_embedding:
        embedded = mapped.get_latent(partial)  # the user's query, as in the README: zero-filled the same way
    np.testing.assert_array_equal(embedded, mapped.get_latent())
    # both give the share of the reference's typical cell (the query model's new batch left out), not two numbers
    shares = [
        re.search(r"the model gives them ([\d.]+)% of a typical cell's counts", str(w.message))[1]
        for told in (at_mapping, at_embedding)
        for w in told
        if "are missing" in str(w.message)
    ]
    assert len(shares) == 2 and shares[0] == shares[1], shares
    before = query.copy()
    with pytest.raises(ValueError, match=r"only 150 of the model's 300 genes \(50%\).*missing e\.g\. \['gene"):
        model.map_query(query[:, 150:].copy(), progress=False)
    assert query.obs.equals(before.obs) and (query.X != before.X).nnz == 0
    # the warning says how much of a typical cell's counts the missing genes hold, and warns of a shift where it is much
    counts = np.asarray(query.X.sum(0)).ravel()
    reference_batches = model.config.batch_categories  # a typical cell of the reference's batches
    centre = np.zeros((len(reference_batches), mapped.config.n_latent), dtype=np.float32)
    expected = mapped.decode(centre, batch=reference_batches, library_size=1.0).mean(0)
    for label, dropped in (("most expressed", np.argsort(-counts)[:30]), ("least expressed", np.argsort(counts)[:30])):
        keep = np.setdiff1d(np.arange(query.n_vars), dropped)
        with pytest.warns(UserWarning, match=r"30 of the model's 300 genes are missing") as caught:
            mapped.get_latent(query[:, keep].copy())
        told = next(str(w.message) for w in caught if "are missing" in str(w.message))
        share = expected[np.isin(np.arange(300), dropped)].sum()
        assert f"the model gives them {share:.1%} of a typical cell's counts" in told, (label, told)
        assert ("may shift" in told) == (share >= 0.1), (label, share)
    assert expected[np.argsort(-counts)[:30]].sum() >= 0.1 > expected[np.argsort(counts)[:30]].sum()


def test_a_model_with_covariates_says_how_much_of_a_typical_cells_counts_missing_genes_hold():
    """Models with covariates gave no share (nor the shift warning): 70% of the counts missing went untold."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=2, random_state=2)
    adata.obs["site"] = np.where(np.arange(300) % 3 == 0, "lung", "gut")
    adata.obs["depth"] = np.log1p(np.asarray(adata.X.sum(1)).ravel())
    model = cellvae.CellVAE(adata, batch_key="batch", categorical_covariate_keys=["site"], continuous_covariate_keys=["depth"])
    model.fit(max_epochs=3, progress=False, random_state=0)
    top = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:10]
    with pytest.warns(UserWarning, match=r"10 of the model's 60 genes are missing") as caught:
        model.get_latent(adata[:, np.setdiff1d(np.arange(60), top)].copy())
    told = next(str(w.message) for w in caught if "are missing" in str(w.message))
    # about the share at the latent centre over every batch and site, the depth at its mean
    mean_depth = float(adata.obs["depth"].mean())
    z = np.zeros((2, 10), dtype=np.float32)
    decoded = model.decode(z, covariates={"site": ["gut", "lung"], "depth": mean_depth}, library_size=1.0)  # both batches
    share = decoded[:, top].sum(1).mean()
    given = float(re.search(r"the model gives them ([\d.]+)% of a typical cell's counts", told)[1]) / 100
    assert abs(given - share) < 0.02 and share >= 0.1 and "may shift" in told


def test_genes_named_in_another_case_are_told_and_the_advice_works(reference_and_query):
    """Lower-cased gene names matched none of the model's and were told to check identifiers; some upper-cased ones
    (C12orf10 as C12ORF10) were zero-filled with no word of their case."""
    model, reference, query = reference_and_query
    lower = query.copy()
    lower.var_names = lower.var_names.str.upper()  # the simulator's genes: gene0, gene1, ...
    with pytest.raises(ValueError, match=r"300 of them are in query_adata in another case \(e.g. 'gene0' as 'GENE0'\)"):
        model.map_query(lower, progress=False)
    fixed = reference.copy()
    fixed.var_names = fixed.var_names.str.upper()
    lookup = {g.casefold(): g for g in model.config.gene_names}  # the advice, as told
    fixed.var_names = fixed.var_names.map(lambda g: lookup.get(g.casefold(), g))
    np.testing.assert_array_equal(model.get_latent(fixed), model.get_latent(reference))
    some = reference.copy()
    some.var_names = [name.upper() if i < 10 else name for i, name in enumerate(some.var_names)]
    with pytest.warns(UserWarning, match=r"10 of the model's 300 genes are missing.*10 of them are in adata in another case"):
        model.get_latent(some)
    with pytest.raises(ValueError) as told:
        model.get_latent(lower)
    namespace = argparse.Namespace(input="q.h5ad", model_dir="ref_model")  # on the command line: the model is a folder
    assert "cellvae.CellVAE.load('ref_model', load_anndata=False).config.gene_names" in in_command_line_terms(
        str(told.value), namespace
    )


def test_label_transfer_refuses_an_empty_query_and_warns_of_a_reference_label_named_unknown(reference_and_query):
    model, reference, query = reference_and_query
    reference = reference.copy()
    reference.obsm["X_cellvae"] = model.get_latent(reference)
    embedded = reference[::10].copy()  # cells of the reference's batches, embedded as they are
    embedded.obsm["X_cellvae"] = model.get_latent(embedded)
    with pytest.raises(ValueError, match=r"query_adata has no cells \(0 × 300 genes\): there is nothing to label"):
        cellvae.tl.transfer_labels(reference, embedded[:0].copy(), "cell_type")
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.rename_categories({"type0": "Unknown"})
    told = r"has a label 'Unknown', and query cells over unknown_threshold .* are labelled 'Unknown', so the two share one"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.transfer_labels(reference, embedded, "cell_type", unknown_threshold=0.5)
    with no_warnings():  # the reference's 'Unknown' cells left out of the vote, as advised; or no threshold
        cellvae.tl.transfer_labels(reference, embedded, "cell_type", unknown_threshold=0.5, unlabeled_category="Unknown")
        cellvae.tl.transfer_labels(reference, embedded, "cell_type")
    # the atlas's unlabelled cells are 'unknown': beside 'Unknown' they made two labels differing in case, untold
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.rename_categories({"Unknown": "unknown"})
    told = r"has a label 'unknown', .* so the two differ in case alone; pass unlabeled_category='unknown' if"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.transfer_labels(reference, embedded, "cell_type", novelty_threshold=0.95)
    reference.obs["cell_type"] = reference.obs["cell_type"].cat.rename_categories({"type1": "Unknown"})
    with warnings.catch_warnings(record=True) as caught:  # both: each told (following one advice left the other)
        warnings.simplefilter("always")
        cellvae.tl.transfer_labels(reference, embedded, "cell_type", novelty_threshold=0.95)
    told = sorted(str(w.message).split("has a label ")[1][:9] for w in caught if "has a label" in str(w.message))
    assert told == ["'Unknown'", "'unknown'"]


def test_a_model_without_batches_says_how_much_of_a_typical_cells_counts_missing_genes_hold():
    """A model with neither batches nor covariates decoded no rows: the share read "nan%" and the shift went untold."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=1, random_state=3)
    model = cellvae.CellVAE(adata).fit(max_epochs=3, progress=False, random_state=0)
    top = np.argsort(-np.asarray(adata.X.sum(0)).ravel())[:10]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.get_latent(adata[:, np.setdiff1d(np.arange(60), top)].copy())
    told = [str(w.message) for w in caught]
    assert not [m for m in told if "empty slice" in m or "invalid value" in m], told
    missing = next(m for m in told if "are missing" in m)
    share = model.decode(np.zeros((1, 10), dtype=np.float32), library_size=1.0)[0, top].sum()
    given = float(re.search(r"the model gives them ([\d.]+)% of a typical cell's counts", missing)[1]) / 100
    assert abs(given - share) < 0.001 and share >= 0.1 and "may shift" in missing


def test_a_query_model_keeps_the_genes_its_query_lacks_as_missing_in_memory_and_on_disk(reference_and_query, tmp_path):
    """Genes the query never measured got statistics (and were called) by query_model.differential_expression() of an
    in-memory query, and query_model.fit() refused a query on disk that map_query had mapped."""
    model, _, query = reference_and_query
    partial = query[:, 10:].copy()
    partial.write_h5ad(tmp_path / "query.h5ad")
    missing = model.config.gene_names[:10]
    for kind, given in (("memory", partial), ("disk", ad.read_h5ad(tmp_path / "query.h5ad", backed="r"))):
        with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing from query_adata"):
            mapped = model.map_query(given, max_epochs=2, progress=False)
        with pytest.warns(UserWarning, match="10 of the model's 300 genes are missing from adata"):
            mapped.fit(max_epochs=2, progress=False)  # trains the mapping further, as the README shows
            own = mapped.differential_expression(groupby="cell_type", group1="type0", n_draws=100, progress=False)
            told = mapped.differential_expression(partial, groupby="cell_type", group1="type0", n_draws=100, progress=False)
        for frame in (own, told):
            assert frame.loc[missing, "lfc_mean"].isna().all() and not frame.loc[missing, "is_de"].any(), kind
            assert frame.loc[missing, "fraction_nonzero1"].isna().all(), kind
        pd.testing.assert_frame_equal(own, told)


def test_a_query_on_disk_is_streamed_and_maps_like_the_same_query_in_memory(reference_and_query, tmp_path):
    model, reference, query = reference_and_query
    partial = query[:, 10:].copy()  # 10 reference genes missing: told once, not by every loader over the file
    partial.obs["sample"] = "new_" + partial.obs["batch"].astype(str)
    partial.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        on_disk = model.map_query(backed, max_epochs=30, progress=False)
    told = [str(w.message) for w in caught if "genes are missing" in str(w.message)]
    assert len(told) == 1 and "10 of the model's 300 genes are missing from query_adata" in told[0]
    assert on_disk.adata.X is not None and not isinstance(on_disk.adata.X, (np.ndarray, sp.spmatrix))  # left on disk
    with pytest.warns(UserWarning, match="missing from adata"):
        latent = on_disk.get_latent()
        np.testing.assert_allclose(latent, on_disk.get_latent(partial), rtol=1e-4, atol=1e-5)
    mapped_in_memory = model.map_query(partial, max_epochs=30, progress=False)
    in_memory = mapped_in_memory.get_latent()
    with pytest.warns(UserWarning, match="the likelihood scores count them as observed zeros"):  # (map_query told not this)
        mapped_in_memory.marginal_log_likelihood(n_samples=2, progress=False)
    classifier = KNeighborsClassifier(15).fit(model.get_latent(reference), reference.obs["cell_type"])
    for mapped in (latent, in_memory):
        assert (classifier.predict(mapped) == query.obs["cell_type"].to_numpy()).mean() > 0.95
    view = backed[:100]  # a view of the file: streamed as it is, its batches read from the reference's key
    with pytest.warns(UserWarning, match="missing from query_adata"):
        mapped_view = model.map_query(view, max_epochs=2, progress=False)
    assert mapped_view.adata is view and mapped_view.config.batch_categories == on_disk.config.batch_categories
    with pytest.raises(ValueError, match=r"view of an AnnData whose counts are on disk.*obs\['batch'\].*to_memory\(\)"):
        model.map_query(view, batch_key="sample", progress=False)  # its batches elsewhere: refused before any work


def test_query_batch_already_in_reference_is_that_batch(reference_and_query):
    model, reference, _ = reference_and_query
    known = reference[reference.obs["batch"] == "batch1"].copy()
    with pytest.warns(UserWarning, match=r"query batches \['batch1'\] already exist in the reference") as caught:
        query_model = model.map_query(known, progress=False)
    assert query_model.config.batch_categories == model.config.batch_categories
    np.testing.assert_array_equal(query_model.get_latent(), model.get_latent(known))
    # the advice, run as written, maps them as a new batch
    message = next(str(w.message) for w in caught if "already exist" in str(w.message))
    advice = re.search(r"e\.g\. (query_adata\.obs\[.*)$", message)[1]
    query_adata = known.copy()
    exec(advice)
    with no_warnings():  # no longer said to be a reference batch
        renamed = model.map_query(query_adata, max_epochs=2, progress=False)
    assert renamed.config.batch_categories == [*model.config.batch_categories, "query batch1"]
    # new batches come in the column's category order (as the reference's did), not in the order of the cells
    two_new = query_adata.copy()
    two_new.obs["batch"] = pd.Categorical(np.where(np.arange(two_new.n_obs) < 20, "z first cells", "a later cells"))
    two_new.obs["batch"] = two_new.obs["batch"].cat.reorder_categories(["z first cells", "a later cells"])
    ordered = model.map_query(two_new, max_epochs=1, progress=False)
    assert ordered.config.batch_categories == [*model.config.batch_categories, "z first cells", "a later cells"]
    two_new.obs["batch"] = two_new.obs["batch"].astype(str)  # text: sorted
    as_text = model.map_query(two_new, max_epochs=1, progress=False)
    assert as_text.config.batch_categories[-2:] == ["a later cells", "z first cells"]
    told = in_command_line_terms(message, argparse.Namespace(input="q.h5ad"))  # cellvae map's option does it
    assert "Pass --batch-prefix 'query ' to map them as new batches" in told and "in Python" not in told


def test_query_batch_problems_raise_clear_errors(reference_and_query):
    model, _, query = reference_and_query
    broken = query.copy()
    broken.obs["batch"] = broken.obs["batch"].astype(object)
    broken.obs.iloc[:3, broken.obs.columns.get_loc("batch")] = np.nan
    observed = broken.obs.copy()
    with pytest.raises(ValueError, match=r"3 missing \(NaN\) batch values"):
        model.map_query(broken, progress=False)
    # the trained model's batches are set: filled with a value of their own, the cells would be of an unknown batch
    with pytest.raises(
        ValueError, match=r"fill them with the model's category each belongs to, where known \(e.g. 'batch0'\) or drop those"
    ):
        model.get_latent(broken)
    pd.testing.assert_frame_equal(broken.obs, observed)
    with pytest.raises(KeyError, match="batch column 'donor' not found"):
        model.map_query(query, batch_key="donor", progress=False)
    renamed = query.copy()
    renamed.obs["donor"] = renamed.obs["batch"]
    query_model = model.map_query(renamed, batch_key="donor", max_epochs=2, progress=False)
    assert query_model.config.batch_categories[-1] == "batch2"
    unbatched = CellVAE(query).fit(max_epochs=2, progress=False)
    with pytest.raises(ValueError, match="trained without batch_key"):
        unbatched.map_query(query)


def test_train_input_layer_trains_the_first_encoder_layer(reference_and_query):
    model, reference, query = reference_and_query
    query_model = model.map_query(query, train_input_layer=True, max_epochs=3, progress=False)
    old = model.module.encoder.body.linears[0].weight
    new = query_model.module.encoder.body.linears[0].weight
    assert not torch.equal(new[:, : model.config.n_genes], old[:, : model.config.n_genes])
    assert torch.equal(query_model.module.decoder.proportions.weight, model.module.decoder.proportions.weight)
    # unlike the frozen map, reference cells embed differently now (the docstring says: re-embed them)
    assert not np.allclose(query_model.get_latent(reference), model.get_latent(reference), atol=1e-3)


# ----------------------------------------------------------------------------- label transfer


def test_transfer_labels_writes_only_its_keys_and_flags_unknowns(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0]])
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": np.repeat(["A", "B"], 50)}, index=[f"r{i}" for i in range(100)]))
    reference.obsm["X_cellvae"] = np.repeat(centres, 50, axis=0) + rng.normal(0, 0.5, (100, 2))
    query = ad.AnnData(obs=pd.DataFrame(index=["q0", "q1", "q2"]))
    query.obsm["X_cellvae"] = np.array([[0.2, 0.1], [9.8, -0.2], [5.0, 0.0]])
    reference_obs = reference.obs.copy()
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=10, unknown_threshold=0.3)
    assert list(query.obs.columns) == ["cell_type_predicted", "cell_type_uncertainty", "cell_type_novelty"]
    assert query.obs["cell_type_predicted"].astype(str).tolist()[:2] == ["A", "B"]
    assert query.obs["cell_type_uncertainty"].iloc[:2].max() < 0.05
    # the cell between the two types lies farther from its neighbours than any reference cell from theirs
    assert query.obs["cell_type_novelty"].iloc[:2].max() < 0.5 and query.obs["cell_type_novelty"].iloc[2] == 1.0
    pd.testing.assert_frame_equal(reference.obs, reference_obs)
    with pytest.raises(KeyError, match="use_rep 'X_pca' not found in ref_adata.obsm"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", use_rep="X_pca")
    with pytest.raises(KeyError, match="labels_key 'tissue' not found"):
        cellvae.tl.transfer_labels(reference, query, "tissue")
    reference.obs["cluster"] = np.repeat([7, 3], 50)  # numeric labels come back as the same numbers
    cellvae.tl.transfer_labels(reference, query, "cluster", k=10)
    assert query.obs["cluster_predicted"].tolist()[:2] == [7, 3]
    assert list(query.obs["cluster_predicted"].cat.categories) == [3, 7]
    # with "Unknown" among them they become strings: one type per column, so the AnnData stays writable
    cellvae.tl.transfer_labels(reference, query, "cluster", k=10, unknown_threshold=0.3)
    assert query.obs["cluster_predicted"].tolist() == ["7", "3", "Unknown"]
    query.write_h5ad(tmp_path / "query.h5ad")
    # placeholder labels of unlabelled reference cells do not vote
    reference.obs["partly"] = np.where(np.arange(100) % 2 == 0, "unknown", reference.obs["cell_type"])
    cellvae.tl.transfer_labels(reference, query, "partly", k=10, unlabeled_category="unknown")
    assert query.obs["partly_predicted"].astype(str).tolist()[:2] == ["A", "B"]
    # missing labels written as text (.astype(str) of NaN, a file's empty cells) vote as a label: told, with the fix
    reference.obs["as_text"] = pd.Series(np.where(np.arange(100) % 2 == 0, None, reference.obs["cell_type"])).astype(str).values
    reference.obs.loc[reference.obs_names[:4], "as_text"] = ""
    told = (
        r"obs\['as_text'\] labels cells with the text of a missing value \(4 '', 48 'None'; .* they vote as a label of "
        r"their own, .*missing values in ref_adata.obs\['as_text'\] \(e.g. with the column's "
        r"\.replace\(\{'': np.nan, 'None': np.nan\}\)\)$"
    )
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.transfer_labels(reference, query.copy(), "as_text", k=10)
    reference.obs["one_kind"] = reference.obs["as_text"].replace({"": "nan", "None": "nan"})
    with pytest.warns(UserWarning, match=r"\(52 'nan'; .*replace\(\{'nan': np.nan\}\)\), or pass unlabeled_category='nan'$"):
        cellvae.tl.transfer_labels(reference, query.copy(), "one_kind", k=10)
    # a categorical column (as anndata stores text): its categories removed; no unlabeled_category offered in place of
    # the user's own (it takes one label)
    reference.obs["one_kind"] = reference.obs["one_kind"].where(np.arange(100) != 1, "unlabelled").astype("category")
    told = r"\(51 'nan'; .*with the column's \.cat\.remove_categories\(\['nan'\]\)\)$"
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.transfer_labels(reference, query.copy(), "one_kind", k=10, unlabeled_category="unlabelled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        made_missing = reference.obs["as_text"].replace({"": np.nan, "None": np.nan})
        cellvae.tl.transfer_labels(reference[:, :].copy(), query.copy(), "cell_type", k=10)  # real labels: quiet
        reference.obs["as_text"] = made_missing
        cellvae.tl.transfer_labels(reference, query.copy(), "as_text", k=10)
    # a misspelt placeholder leaves no cell out: told, with the label it likely meant
    with pytest.warns(UserWarning, match=r"unlabeled_category 'Unknown' is no label of .*did you mean 'unknown'\?"):
        cellvae.tl.transfer_labels(reference, query.copy(), "partly", k=10, unlabeled_category="Unknown")
    with pytest.warns(UserWarning, match=r"'unassigned' is no label .*its labels are e.g. \['A', 'B', 'unknown'\]"):
        cellvae.tl.transfer_labels(reference, query.copy(), "partly", k=10, unlabeled_category="unassigned")
    # a column of numbers, its placeholder given as text (as cellvae map's --unlabeled-category -1 gives it)
    reference.obs["numbered"] = np.where(np.arange(100) % 2 == 0, -1, reference.obs["cluster"].astype(int))
    numbered = query.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cellvae.tl.transfer_labels(reference, numbered, "numbered", k=10, unlabeled_category="-1")
    assert -1 not in set(numbered.obs["numbered_predicted"].astype(int))
    assert list(query.obs["partly_predicted"].cat.categories) == ["A", "B"]
    # pandas' nullable text column, with missing labels (NA) and placeholders both left out of the vote
    partly = reference.obs["partly"].astype("string").where(np.arange(100) % 4 != 1, pd.NA)
    reference.obs["nullable"] = partly
    cellvae.tl.transfer_labels(reference, query, "nullable", k=10, unlabeled_category="unknown")
    assert query.obs["nullable_predicted"].astype(str).tolist()[:2] == ["A", "B"]
    # k as large as the labelled cells: both sides average over as many neighbours, so a query cell on top of a
    # reference cell is no more novel than the reference cells are
    tiny = ad.AnnData(obs=pd.DataFrame({"cell_type": ["A", "A", "B"]}, index=["t0", "t1", "t2"]))
    tiny.obsm["X_cellvae"] = np.array([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    on_top = ad.AnnData(obs=pd.DataFrame(index=["o0", "o1", "o2"]), obsm={"X_cellvae": tiny.obsm["X_cellvae"].copy()})
    cellvae.tl.transfer_labels(tiny, on_top, "cell_type", k=3)
    assert (on_top.obs["cell_type_novelty"] == 0.0).all()
    # one labelled reference cell: its novelty is undefined, so a threshold on it is refused before any work
    tiny.obs["one"] = ["A", None, None]
    cellvae.tl.transfer_labels(tiny, on_top, "one", k=1)
    assert on_top.obs["one_predicted"].astype(str).tolist() == ["A"] * 3 and on_top.obs["one_novelty"].isna().all()
    with pytest.raises(ValueError, match="novelty_threshold needs at least 2 labelled reference cells"):
        cellvae.tl.transfer_labels(tiny, on_top, "one", k=1, novelty_threshold=0.95)
    reference.obs["none"] = "unknown"
    with pytest.raises(ValueError, match="has no labelled cells"):
        cellvae.tl.transfer_labels(reference, query, "none", unlabeled_category="unknown")


def test_transfer_labels_weighs_votes_by_distance_and_gives_ties_to_the_first_label():
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": ["A", "A", "B", "B", "C"]}, index=[f"r{i}" for i in range(5)]))
    reference.obsm["X_cellvae"] = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [50.0, 0.0]])
    query = ad.AnnData(obs=pd.DataFrame(index=["near_A", "halfway"]))
    query.obsm["X_cellvae"] = np.array([[0.0, 0.0], [2.5, 0.0]])
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=4)
    # near_A's neighbours lie at 1, 2 (A) and 3, 4 (B); each votes exp(-(d / 4)^2)
    a, b = np.exp(-1 / 16) + np.exp(-4 / 16), np.exp(-9 / 16) + np.exp(-16 / 16)
    # halfway has A and B at 0.5 and 1.5 each: a tie, which goes to the label that sorts first
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["A", "A"]
    np.testing.assert_allclose(query.obs["cell_type_uncertainty"], [1 - a / (a + b), 0.5], rtol=1e-12)
    # a column of nearly unique values: each query cell on top of a reference cell gets that cell's value
    rng = np.random.default_rng(0)
    many = ad.AnnData(obs=pd.DataFrame({"score": rng.normal(size=5000)}, index=[f"m{i}" for i in range(5000)]))
    many.obsm["X_cellvae"] = rng.normal(size=(5000, 10))
    on_top = ad.AnnData(obs=pd.DataFrame(index=[f"o{i}" for i in range(5000)]), obsm={"X_cellvae": many.obsm["X_cellvae"].copy()})
    cellvae.tl.transfer_labels(many, on_top, "score")
    np.testing.assert_array_equal(on_top.obs["score_predicted"].to_numpy(dtype=float), many.obs["score"].to_numpy())
    # an ordered label column (e.g. stages) keeps its order and orderedness, but not once "Unknown" joins it
    reference.obs["stage"] = pd.Categorical(["late", "late", "early", "early", "mid"], ["early", "mid", "late"], ordered=True)
    cellvae.tl.transfer_labels(reference, query, "stage", k=4)
    predicted = query.obs["stage_predicted"]
    assert predicted.cat.ordered and list(predicted.cat.categories) == ["early", "late"]  # those received, in order
    cellvae.tl.transfer_labels(reference, query, "stage", k=4, unknown_threshold=0.3)
    assert not query.obs["stage_predicted"].cat.ordered


def test_transfer_labels_votes_with_the_k_nearest_labelled_cells_it_is_given():
    """An audit: k could be ignored for references of more than 16 labelled cells, unseen. The vote of each query cell
    is computed here by brute force: its k nearest reference cells, each weighing exp(-(d / d_k)^2)."""
    rng = np.random.default_rng(1)
    labels = rng.choice(["A", "B", "C"], size=300)
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": labels}, index=[f"r{i}" for i in range(300)]))
    reference.obsm["X_cellvae"] = rng.normal(size=(300, 3))
    query = ad.AnnData(obs=pd.DataFrame(index=[f"q{i}" for i in range(80)]), obsm={"X_cellvae": rng.normal(size=(80, 3))})
    distances = np.linalg.norm(query.obsm["X_cellvae"][:, None] - reference.obsm["X_cellvae"][None], axis=2)
    for k in (1, 7, 40):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=k)
        nearest = np.argsort(distances, axis=1)[:, :k]
        near = np.take_along_axis(distances, nearest, axis=1)
        weights = np.exp(-((near / near[:, -1:]) ** 2))
        votes = np.stack([(weights * (labels[nearest] == label)).sum(1) for label in ["A", "B", "C"]], axis=1)
        expected = np.array(["A", "B", "C"])[votes.argmax(1)]
        assert query.obs["cell_type_predicted"].astype(str).tolist() == expected.tolist(), k
        np.testing.assert_allclose(query.obs["cell_type_uncertainty"], 1 - votes.max(1) / votes.sum(1), rtol=1e-9, atol=1e-12)


def test_a_query_cell_that_is_a_labelled_reference_cell_does_not_vote_for_itself():
    """One AnnData as reference and query (as scANVI's predict labels its own cells): each labelled cell gets what it
    would as a query of the reference without it, so its novelty is on the scale of cells the reference has not seen."""
    rng = np.random.default_rng(0)
    points = np.concatenate([rng.normal(0.0, 1.0, (150, 5)), rng.normal(1.5, 1.0, (150, 5))])
    points[:30] = 8.0  # 30 cells at one point far from the rest (20 A, 10 B): all of them vote, the cell itself not
    labels = np.array(["A"] * 20 + ["B"] * 10 + ["A"] * 120 + ["B"] * 150, dtype=object)
    labels[rng.choice(np.arange(30, 300), 60, replace=False)] = "unknown"
    names = [f"c{i}" for i in range(300)]
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": labels}, index=names), obsm={"X_cellvae": points})
    options = {"labels_key": "cell_type", "unlabeled_category": "unknown", "soft": True, "copy": True}
    together = cellvae.tl.transfer_labels(adata, adata, **options)
    columns = ["cell_type_predicted", "cell_type_uncertainty", "cell_type_novelty"]
    for cell in [0, 25, *np.flatnonzero(labels[30:] != "unknown")[::12] + 30]:
        alone = cellvae.tl.transfer_labels(adata[np.arange(300) != cell].copy(), adata[[cell]].copy(), **options)
        assert together.obs["cell_type_predicted"].iloc[cell] == alone.obs["cell_type_predicted"].iloc[0]
        np.testing.assert_allclose(together.obs["cell_type_uncertainty"].iloc[cell], alone.obs["cell_type_uncertainty"].iloc[0])
        np.testing.assert_allclose(together.obsm["cell_type_vote_shares"][cell], alone.obsm["cell_type_vote_shares"][0])
    np.testing.assert_allclose(together.obsm["cell_type_vote_shares"][[0, 25]], [[19 / 29, 10 / 29], [20 / 29, 9 / 29]])
    # cells seen by the reference score as unseen ones do (a cell voting for itself had a neighbour at distance 0)
    seen = labels[30:] != "unknown"
    assert 0.35 < np.median(together.obs["cell_type_novelty"].to_numpy()[30:][seen]) < 0.65
    # unlabelled cells cast no vote: named otherwise, or their AnnData another object, the same results
    renamed = adata.copy()
    renamed.obs_names = [f"query{i}" for i in range(300)]
    apart = cellvae.tl.transfer_labels(adata, renamed, **options)
    unlabelled = labels == "unknown"
    pd.testing.assert_frame_equal(
        together.obs.loc[unlabelled, columns].reset_index(drop=True), apart.obs.loc[unlabelled, columns].reset_index(drop=True)
    )
    assert (
        apart.obs["cell_type_novelty"].to_numpy()[~unlabelled] <= together.obs["cell_type_novelty"].to_numpy()[~unlabelled]
    ).mean() > 0.9
    same_object = adata.copy()
    cellvae.tl.transfer_labels(same_object, same_object, **{**options, "copy": False})
    pd.testing.assert_frame_equal(same_object.obs[columns], together.obs[columns])
    with pytest.raises(ValueError, match=r"k=240 leaves no voter to spare: .* below the 240 labelled reference cells"):
        cellvae.tl.transfer_labels(adata, adata, "cell_type", k=240, unlabeled_category="unknown")
    # repeated obs names (10x barcodes of samples concatenated): the same names in the same order match by position
    repeated = adata.copy()
    repeated.obs_names = [f"c{i % 150}" for i in range(300)]
    by_position = cellvae.tl.transfer_labels(repeated, repeated.copy(), **options)
    np.testing.assert_array_equal(by_position.obs[columns].to_numpy(), together.obs[columns].to_numpy())
    partly = repeated[:200].copy()  # names repeat, and not in the same order: each cell is its name and embedding
    partly_labelled = cellvae.tl.transfer_labels(repeated, partly, **options)
    np.testing.assert_array_equal(partly_labelled.obs[columns].to_numpy(), together.obs[columns].to_numpy()[:200])
    zeroed = repeated.copy()
    zeroed.obsm["X_cellvae"][:, 0] = 0.0
    signed = zeroed[:200].copy()
    signed.obsm["X_cellvae"][:, 0] = -0.0  # the same cells: -0.0 is 0.0, as == reads it
    np.testing.assert_array_equal(
        cellvae.tl.transfer_labels(zeroed, signed, **options).obs[columns].to_numpy(),
        cellvae.tl.transfer_labels(zeroed, zeroed[:200].copy(), **options).obs[columns].to_numpy(),
    )
    other_sample = repeated[:150].copy()  # the same barcodes in another sample: other cells, which vote
    other_sample.obsm["X_cellvae"] = other_sample.obsm["X_cellvae"] + 0.01
    unseen = cellvae.tl.transfer_labels(repeated, other_sample, **options)
    other_sample.obs_names = [f"other{i}" for i in range(150)]  # as named apart: the same results
    np.testing.assert_array_equal(
        unseen.obs[columns].to_numpy(), cellvae.tl.transfer_labels(repeated, other_sample, **options).obs[columns].to_numpy()
    )
    one = adata.copy()
    one.obs["cell_type"] = ["A"] + [None] * 299
    with pytest.raises(ValueError, match=r"the one labelled reference cell is itself a query cell, .*: label more reference"):
        cellvae.tl.transfer_labels(one, one, "cell_type", k=1)


def test_reference_cells_tied_at_a_query_cells_point_all_vote_whatever_their_order():
    """30 reference cells at one point (20 A, then 10 B; e.g. cells without counts) and k=15: the first 15 voted A,
    uncertainty 0; reversed, B would have."""
    rng = np.random.default_rng(0)
    points = rng.normal(size=(100, 5))
    points[:30] = 0.0
    labels = ["A"] * 20 + ["B"] * 10 + list(rng.choice(["A", "B", "C"], size=70))
    query = ad.AnnData(obs=pd.DataFrame(index=["at_the_point"]), obsm={"X_cellvae": np.zeros((1, 5))})
    results = []
    for order in (np.arange(100), np.arange(100)[::-1]):
        reference = ad.AnnData(obs=pd.DataFrame({"cell_type": np.array(labels)[order]}, index=[f"r{i}" for i in order]))
        reference.obsm["X_cellvae"] = points[order]
        results.append(cellvae.tl.transfer_labels(reference, query, "cell_type", k=15, soft=True, copy=True))
    for result in results:
        assert result.obs["cell_type_predicted"].iloc[0] == "A"
        np.testing.assert_allclose(result.obs["cell_type_uncertainty"].iloc[0], 1 / 3, rtol=1e-6)
        np.testing.assert_allclose(result.obsm["cell_type_vote_shares"][0], [2 / 3, 1 / 3, 0.0], rtol=1e-6)
    # above 15 dimensions scikit-learn's brute-force search gives identical points a distance of about 1e-7
    points = (rng.normal(size=(100, 30)) * 2).astype(np.float32)
    reference = ad.AnnData(
        obs=pd.DataFrame({"cell_type": np.tile(["A"] * 20 + ["B"] * 10, 100)}, index=[f"r{i}" for i in range(3000)])
    )
    reference.obsm["X_cellvae"] = np.repeat(points, 30, axis=0)
    query = ad.AnnData(obs=pd.DataFrame(index=[f"q{i}" for i in range(100)]), obsm={"X_cellvae": points})
    for order in (np.arange(3000), rng.permutation(3000)):
        result = cellvae.tl.transfer_labels(reference[order], query, "cell_type", k=15, copy=True)
        np.testing.assert_allclose(result.obs["cell_type_uncertainty"], 1 / 3, rtol=1e-6)


def test_transfer_labels_soft_gives_each_labels_vote_share_as_scanvis_soft_predictions(tmp_path):
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": ["A", "A", "B", "B", "C"]}, index=[f"r{i}" for i in range(5)]))
    reference.obsm["X_cellvae"] = np.array([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0], [50.0, 0.0]])
    query = ad.AnnData(obs=pd.DataFrame(index=["near_A", "halfway"]))
    query.obsm["X_cellvae"] = np.array([[0.0, 0.0], [2.5, 0.0]])
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=4, soft=True)
    shares = query.obsm["cell_type_vote_shares"]
    a, b = np.exp(-1 / 16) + np.exp(-4 / 16), np.exp(-9 / 16) + np.exp(-16 / 16)  # as in the test above
    assert list(query.uns["cell_type_vote_shares"]["labels"]) == ["A", "B", "C"] and shares.dtype == np.float32
    np.testing.assert_allclose(shares, [[a / (a + b), b / (a + b), 0.0], [0.5, 0.5, 0.0]], rtol=1e-6)
    np.testing.assert_allclose(shares.max(axis=1), 1 - query.obs["cell_type_uncertainty"], rtol=1e-6)
    assert list(query.obs["cell_type_predicted"].cat.categories) == ["A"]  # only labels some cell received
    # labels holding "/" (anndata cannot write them as column names) are saved and read back, in h5ad and Zarr
    reference.obs["cell_type"] = ["CD4+/CD25 T Reg"] * 2 + ["B/plasma"] * 2 + ["C"]
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=4, soft=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "Forward slashes")  # anndata 0.12's FutureWarning on keys with "/" (0.13: an error)
        query.write_h5ad(tmp_path / "query.h5ad")
        query.write_zarr(tmp_path / "query.zarr")
    for read in (ad.read_h5ad(tmp_path / "query.h5ad"), ad.read_zarr(tmp_path / "query.zarr")):
        np.testing.assert_array_equal(read.obsm["cell_type_vote_shares"], query.obsm["cell_type_vote_shares"])
        assert list(read.uns["cell_type_vote_shares"]["labels"]) == ["B/plasma", "C", "CD4+/CD25 T Reg"]
    reference.obs["cell/type"] = reference.obs["cell_type"]  # a column named with "/": its obsm key could not be read back
    with pytest.raises(ValueError, match=r"rename the column, e.g. ref_adata.obs\['cell_type'\] = ref_adata.obs\['cell/type'\]"):
        cellvae.tl.transfer_labels(reference, query, "cell/type", k=4, soft=True)
    assert "cell/type_predicted" not in query.obs
    # numeric labels are named by their text; 1 and "1" together cannot be told apart
    reference.obs["cluster"] = [7, 7, 3, 3, 12]
    cellvae.tl.transfer_labels(reference, query, "cluster", k=4, soft=True)
    assert list(query.uns["cluster_vote_shares"]["labels"]) == ["3", "7", "12"]
    assert query.obs["cluster_predicted"].tolist() == [7, 3]  # the tie goes to the label that sorts first
    cellvae.tl.transfer_labels(reference, query, "cluster", k=2)  # again without soft: the stale shares are removed
    assert "cluster_vote_shares" not in query.obsm and "cluster_vote_shares" not in query.uns
    assert "cell_type_vote_shares" in query.obsm  # (another labels_key's are not this run's)
    reference.obs["mixed"] = pd.Series([1, 1, "1", "1", "C"], index=reference.obs_names, dtype=object)
    before = query.copy()
    with pytest.raises(ValueError, match="same text.*astype\\(str\\)"):
        cellvae.tl.transfer_labels(reference, query, "mixed", k=4, soft=True)
    assert list(query.obs.columns) == list(before.obs.columns) and list(query.obsm) == list(before.obsm)
    del query.obsm["cell_type_vote_shares"], query.uns["cell_type_vote_shares"]
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=4)  # soft=False writes no table
    assert "cell_type_vote_shares" not in query.obsm and "cell_type_vote_shares" not in query.uns


def labelled_reference(labels, positions) -> ad.AnnData:
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": labels}, index=[f"r{i}" for i in range(len(labels))]))
    reference.obsm["X_cellvae"] = np.asarray(positions, dtype=float)
    return reference


def query_at(positions) -> ad.AnnData:
    positions = np.asarray(positions, dtype=float)
    return ad.AnnData(obs=pd.DataFrame(index=[f"q{i}" for i in range(len(positions))]), obsm={"X_cellvae": positions})


def test_an_embedding_under_another_key_in_both_anndatas_is_named_in_the_missing_key_error():
    reference = labelled_reference(["A", "B"], [[-1.0, 0.0], [1.0, 0.0]])
    query = query_at([[0.0, 0.0]])
    for adata in (reference, query):  # as scvi-tools stores it
        adata.obsm["X_scVI"] = adata.obsm.pop("X_cellvae")
    query.obsm["X_pca"] = np.zeros((1, 5))  # in one of them only, or of another width: not offered
    reference.obsm["X_umap"], query.obsm["X_umap"] = np.zeros((2, 2)), np.zeros((1, 3))
    with pytest.raises(KeyError, match=r"not found in ref_adata.obsm .*; pass use_rep='X_scVI' if both hold the same"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=2)
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=2, use_rep="X_scVI")  # as told
    assert "cell_type_predicted" in query.obs
    reference.obsm["X_pca"] = np.zeros((2, 5))  # scanpy's keys, PCA of each alone, are not offered
    del reference.obsm["X_scVI"]
    with pytest.raises(KeyError, match=r"not found in ref_adata.obsm \(available: \['X_umap', 'X_pca'\]\); embed both with"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=2)
    reference.obsm["X_pca_harmony"], query.obsm["X_pca_harmony"] = np.zeros((2, 4)), np.zeros((1, 4))  # an integrated space
    with pytest.raises(KeyError, match=r"; pass use_rep='X_pca_harmony' if both"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=2)
    del reference.obsm["X_pca_harmony"], query.obsm["X_pca_harmony"]
    # an embedding stored sparse (or as a DataFrame) is read as its values
    reference.obsm["X_sparse"] = sp.csr_matrix([[-1.0, 0.0], [1.0, 0.0]])
    query.obsm["X_sparse"] = pd.DataFrame([[0.9, 0.0]], index=query.obs_names)
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=1, use_rep="X_sparse")
    assert query.obs["cell_type_predicted"].iloc[0] == "B"


def test_transfer_labels_into_a_view_of_a_few_cells_copies_those_cells_not_every_cells_column_indices():
    """Writing results into a view makes it an AnnData of its own. Where indptr is int64 and the column indices
    int32 (as in many .h5ad files), anndata's copy of a view of some cells converted the column indices of the whole
    matrix to int64 first (a view of 1,000 of 203,340 cells: 2.1 s, +0.83 GB); the view's own rows are copied instead."""
    import tracemalloc

    atlas = cellvae.datasets.simulate(n_cells=3000, n_genes=2000, random_state=5)
    atlas.X = sp.csr_matrix(atlas.X, dtype=np.float32)
    atlas.X.indptr = atlas.X.indptr.astype(np.int64)  # set after construction: scipy's constructor would unify them
    atlas.layers["counts"] = atlas.X.copy()
    atlas.layers["counts"].indptr = atlas.layers["counts"].indptr.astype(np.int64)
    atlas.layers["dense"] = atlas.X.toarray()
    atlas.obsm["X_cellvae"] = np.random.default_rng(0).normal(size=(atlas.n_obs, 2))
    reference = labelled_reference(["A", "B"], [[-1.0, 0.0], [1.0, 0.0]])
    view = atlas[:30]
    cellvae.tl.transfer_labels(reference, query_at([[0.0, 0.0]]), "cell_type", k=1, n_jobs=1)  # (imports, not traced)
    tracemalloc.start()
    cellvae.tl.transfer_labels(reference, view, "cell_type", k=1, n_jobs=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not view.is_view and view.obs["cell_type_predicted"].notna().all()
    for matrix, expected in ((view.X, atlas.X[:30]), (view.layers["counts"], atlas.X[:30])):
        assert sp.issparse(matrix) and matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix.toarray(), expected.toarray())
    np.testing.assert_array_equal(view.layers["dense"], atlas.layers["dense"][:30])
    assert peak < atlas.X.indices.nbytes / 4  # anndata's copy: twice the int32 indices of every cell, for each matrix


def test_transfer_labels_takes_labels_key_as_rate_distortion_sweep_does_and_its_old_name_with_a_warning():
    reference = labelled_reference(["A", "A", "B", "B"], [[0.0, 0.0], [0.1, 0.0], [5.0, 0.0], [5.1, 0.0]])
    query = query_at([[0.05, 0.0], [5.05, 0.0]])
    cellvae.tl.transfer_labels(reference, query, labels_key="cell_type", k=2)
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["A", "B"]
    by_old_name = query.copy()
    with pytest.warns(FutureWarning, match=r"label_key=\.\.\.\) is deprecated; pass labels_key") as caught:
        cellvae.tl.transfer_labels(reference, by_old_name, label_key="cell_type", k=2)
    assert caught[0].filename == __file__  # attributed to the caller's line
    pd.testing.assert_frame_equal(by_old_name.obs, query.obs)
    with pytest.raises(TypeError, match="needs labels_key"):
        cellvae.tl.transfer_labels(reference, query)
    with pytest.raises(TypeError, match="both labels_key and its deprecated name label_key"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", label_key="cell_type")


def test_unknown_threshold_flags_only_cells_whose_uncertainty_exceeds_it():
    """A cell whose uncertainty equals the threshold keeps its label ("exceeds", as documented)."""
    reference = labelled_reference(["A", "B"], [[-1.0, 0.0], [1.0, 0.0]])
    query = query_at([[0.0, 0.0]])  # one A and one B at the same distance: uncertainty exactly 0.5
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=2, unknown_threshold=0.5)
    assert query.obs["cell_type_uncertainty"].iloc[0] == 0.5
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["A"]  # the tie goes to the first label
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=2, unknown_threshold=0.49)
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["Unknown"]


def test_both_thresholds_flag_the_cells_that_either_one_flags():
    """With unknown_threshold and novelty_threshold, a cell uncertain but not novel is still Unknown."""
    positions = np.random.default_rng(0).normal(0.0, 1.0, (50, 2))
    # an A and a B cell at each position: a cell inside the cloud gets an even vote (uncertainty 0.5), yet is not novel
    reference = labelled_reference(["A"] * 50 + ["B"] * 50, np.concatenate([positions, positions]))
    query = query_at([[0.0, 0.0]])
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=10, unknown_threshold=0.3, novelty_threshold=0.99)
    assert query.obs["cell_type_uncertainty"].iloc[0] > 0.3 and query.obs["cell_type_novelty"].iloc[0] <= 0.99
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["Unknown"]


def test_k_larger_than_the_labelled_reference_cells_is_refused_with_the_labelled_count():
    labels = ["A", "B", "A", "B", "A"] + ["unknown"] * 5
    reference = labelled_reference(labels, np.arange(20, dtype=float).reshape(10, 2))
    query = query_at([[0.0, 0.0]])
    with pytest.raises(ValueError, match="k=8 is larger than the 5 labelled reference cells; lower k"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=8, unlabeled_category="unknown")
    assert list(query.obs.columns) == []


@pytest.mark.parametrize("name, value", [("unknown_threshold", 1.5), ("novelty_threshold", -0.1), ("novelty_threshold", 2)])
def test_thresholds_outside_zero_to_one_are_refused(name, value):
    reference = labelled_reference(["A", "B"], [[-1.0, 0.0], [1.0, 0.0]])
    query = query_at([[0.0, 0.0]])
    with pytest.raises(ValueError, match=rf"{name} must be a number in \[0, 1\] or None"):
        cellvae.tl.transfer_labels(reference, query, "cell_type", k=2, **{name: value})


def test_transfer_labels_searches_neighbours_in_parallel_with_the_same_results():
    """n_jobs (None: scanpy's sc.settings.n_jobs) parallelises the neighbour search; labels, uncertainty and
    novelty are the same with any number of jobs."""
    import scanpy as sc

    rng = np.random.default_rng(3)
    reference = labelled_reference(rng.choice(["A", "B", "C"], 3_000), rng.normal(size=(3_000, 10)))
    positions = rng.normal(size=(500, 10))
    results = []
    for n_jobs in (None, 1, 2, -1):
        query = query_at(positions)
        cellvae.tl.transfer_labels(reference, query, "cell_type", n_jobs=n_jobs)
        results.append(query.obs)
    for obs in results[1:]:
        pd.testing.assert_frame_equal(obs, results[0])
    for bad in (0, 1.5, True, "all"):
        with pytest.raises(ValueError, match=rf"n_jobs must be a whole number of jobs .* got {bad!r}"):
            cellvae.tl.transfer_labels(reference, query, "cell_type", n_jobs=bad)
    before, sc.settings.n_jobs = sc.settings.n_jobs, 0  # None reads scanpy's setting
    try:
        with pytest.raises(ValueError, match="n_jobs must be .* got 0"):
            cellvae.tl.transfer_labels(reference, query, "cell_type")
    finally:
        sc.settings.n_jobs = before


def test_novelty_is_the_share_of_reference_cells_closer_to_their_k_neighbours_than_the_query_cell():
    """Brute-force check of the documented novelty: mean distance to the k nearest labelled reference cells
    (a reference cell's own neighbours exclude itself), compared on both sides with the same k."""
    reference_x = np.array([0.0, 1.1, 3.3, 6.7, 10.2, 15.9])
    query_x = np.array([0.4, 2.2, 8.3, 30.0])  # no ties with the reference cells' mean distances
    k = 2
    reference = labelled_reference(["A", "A", "B", "B", "A", "B"], np.c_[reference_x, np.zeros(6)])
    query = query_at(np.c_[query_x, np.zeros(4)])
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=k)
    gaps = np.abs(reference_x[:, None] - reference_x[None, :])
    own = np.sort(gaps, axis=1)[:, 1 : k + 1].mean(axis=1)  # column 0 is the cell itself
    mine = np.sort(np.abs(query_x[:, None] - reference_x[None, :]), axis=1)[:, :k].mean(axis=1)
    assert (own[None, :] != mine[:, None]).all()  # no ties, where "closer" could be read as < or <=
    expected = (own[None, :] < mine[:, None]).mean(axis=1)
    np.testing.assert_allclose(query.obs["cell_type_novelty"].to_numpy(), expected, rtol=0, atol=1e-12)


def test_a_query_cell_placed_exactly_as_the_reference_cells_is_not_novel():
    reference = labelled_reference(["A"] * 20, np.zeros((20, 2)))  # e.g. cells with identical counts, hence identical codes
    query = query_at([[0.0, 0.0]])
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=5, novelty_threshold=0.95)
    assert query.obs["cell_type_novelty"].iloc[0] == 0.0  # no reference cell is closer to its neighbours than this one
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["A"]  # (was "Unknown": ties counted as closer)


# ----------------------------------------------------------------------------- real data: CellBench


@pytest.mark.slow
def test_cellbench_platforms_integrate_and_transfer_labels():
    """Two platforms (CEL-seq2, Drop-seq), three cell lines with demuxlet ground truth."""
    adata = shared_dataset("cellbench_3cl.h5ad")
    top = np.argsort(-np.asarray(adata.X.sum(axis=0)).ravel())[:2000]
    adata = adata[:, np.sort(top)].copy()
    model = CellVAE(adata, batch_key="batch").fit(progress=False)  # default epochs, as a user would run it
    latent = model.get_latent()
    assert knn_accuracy(latent, adata.obs["cell_type"]) > 0.95
    assert knn_accuracy(pca_of(adata), adata.obs["batch"]) > 0.95  # unintegrated, the platforms separate
    assert knn_accuracy(latent, adata.obs["batch"]) < 0.72  # chance is 0.53

    is_query = (adata.obs["batch"] == "Drop-seq").to_numpy()
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    # a quarter of the default epochs: enough for the reference of the mapping (keeps the suite short)
    reference_model = CellVAE(reference, batch_key="batch").fit(max_epochs=100, progress=False)
    query_model = reference_model.map_query(query, progress=False)
    reference.obsm["X_cellvae"] = query_model.get_latent(reference)
    query.obsm["X_cellvae"] = query_model.get_latent()
    cellvae.tl.transfer_labels(reference, query, "cell_type")
    accuracy = (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean()
    assert accuracy >= 0.95
    # A cell line the reference has no label for: the vote gives its query cells another line's label,
    # often with confidence; the novelty score flags them.
    lines = reference.obs["cell_type"].astype(str)
    missing = sorted(lines.unique())[0]
    reference.obs["known_lines"] = np.where(lines == missing, "unknown", lines)
    cellvae.tl.transfer_labels(reference, query, "known_lines", unlabeled_category="unknown", novelty_threshold=0.95)
    novel = (query.obs["cell_type"].astype(str) == missing).to_numpy()
    novelty, called = query.obs["known_lines_novelty"].to_numpy(), query.obs["known_lines_predicted"].astype(str)
    assert np.median(novelty[novel]) > 0.95 and np.median(novelty[~novel]) < 0.8, (novelty[novel], novelty[~novel])
    assert (called[novel] == "Unknown").mean() > 0.8 and (called[~novel] == "Unknown").mean() < 0.2
    cellvae.tl.transfer_labels(reference, query, "known_lines", unlabeled_category="unknown")  # the vote alone
    assert (query.obs["known_lines_predicted"].astype(str)[novel] == "Unknown").mean() == 0.0


def test_a_query_mapped_from_another_batch_column_says_which_column_to_add(reference_and_query):
    model, _, query = reference_and_query
    renamed = query.copy()
    renamed.obs["sample"] = renamed.obs.pop("batch")
    mapped = model.map_query(renamed, batch_key="sample", max_epochs=1, progress=False)
    with pytest.raises(KeyError, match=r"adata.obs\['batch'\] = adata.obs\['your_column'\]"):
        mapped.get_latent(renamed)
    renamed.obs["batch"] = renamed.obs["sample"]
    np.testing.assert_allclose(mapped.get_latent(renamed), mapped.get_latent(), rtol=1e-5, atol=1e-6)
    # a query whose reference-named column holds other values: map_query says which column get_latent reads
    renamed.obs["batch"] = "batch0"  # a reference batch
    with pytest.warns(UserWarning, match=r"reads batches from obs\['batch'\].*query_model.get_latent\(\)") as told:
        model.map_query(renamed, batch_key="sample", max_epochs=1, progress=False)
    # cellvae map's output is embedded as mapped: what needs a word is a later cellvae embed of it (no Python edit)
    in_shell = in_command_line_terms(str(told[0].message), argparse.Namespace(input="q.h5ad", batch_key="sample"))
    assert (
        in_shell.endswith(
            "a later cellvae embed of this file with the query model (saved by --query-model-dir) would read those: "
            "pass it --batch-key sample"
        )
        and "Python" not in in_shell
    )


def test_mapping_onto_a_dispersion_per_batch_keeps_the_references_rows_and_starts_new_ones_at_their_mean():
    """An audit: no test mapped a query onto a "gene-batch" model, so the reference batches' dispersions could train
    in mapping, or a new batch's start at 0 (theta 1) instead of the reference batches' mean."""
    cells = cellvae.datasets.simulate(n_cells=900, n_genes=80, n_batches=3, n_cell_types=3, random_state=4)
    is_query = (cells.obs["batch"] == "batch2").to_numpy()
    reference = CellVAE(cells[~is_query].copy(), batch_key="batch", dispersion="gene-batch")
    reference.fit(max_epochs=30, progress=False, random_state=0)
    before = reference.module.decoder.log_theta.detach().clone()
    # with cells of a reference batch too, whose row the query's gradients reach (frozen all the same)
    also_reference = is_query | (np.arange(cells.n_obs) < 60) & (cells.obs["batch"] == "batch0").to_numpy()
    with pytest.warns(UserWarning, match="batch0"):
        query = reference.map_query(cells[also_reference].copy(), max_epochs=1, progress=False, random_state=0)
    after = query.module.decoder.log_theta.detach()
    assert after.shape == (3, 80)
    torch.testing.assert_close(after[:2], before, rtol=0, atol=0)  # the reference's rows, frozen
    start = before.mean(0)
    assert start.abs().max() > 0.05  # (so that a start at 0 would be told apart: 0.10-0.11 for seeds 0-5)
    assert (after[2] - start).abs().max() < 0.02  # one epoch (2 steps) from the mean of the reference's rows
    assert not torch.equal(after[2], start)  # and trained


def test_fit_on_a_query_model_trains_the_mapping_further_and_keeps_the_reference_frozen(reference_and_query, tmp_path):
    model, reference, query = reference_and_query
    query_model = model.map_query(query, max_epochs=3, progress=False)
    reference_latent, query_latent = model.get_latent(reference), query_model.get_latent()
    frozen = query_model.module.decoder.proportions.weight.clone()
    query_model.fit(max_epochs=3, progress=False)  # as scVI's query_model.train(): only the query's parameters move
    assert len(query_model.history) == 3 and query_model.train_settings.weight_decay == 0.0
    np.testing.assert_array_equal(query_model.get_latent(reference), reference_latent)
    assert torch.equal(query_model.module.decoder.proportions.weight, frozen)
    assert not np.allclose(query_model.get_latent(), query_latent, atol=1e-4)
    query_model.save(tmp_path / "mapped")  # the frozen layout is part of the saved model
    loaded = CellVAE.load(tmp_path / "mapped", adata=query_model.adata)
    assert loaded.config.reference_categories == {"batch": 2}
    loaded.fit(progress=False)  # its default epochs are map_query's, not those of a new model
    assert loaded.train_settings.max_epochs == default_query_epochs(query.n_obs) < default_max_epochs(query.n_obs)
    np.testing.assert_array_equal(loaded.get_latent(reference), reference_latent)
    before = {k: v.clone() for k, v in loaded.module.state_dict().items()}
    with pytest.raises(ValueError, match="would shrink the reference's frozen weights"):
        loaded.fit(weight_decay=1e-4, progress=False)
    assert all(torch.equal(v, before[k]) for k, v in loaded.module.state_dict().items())
    with pytest.warns(UserWarning, match="already exist in the reference"):
        # told at once (the next step of the README, query_model.fit, refused with nothing to train)
        with pytest.warns(UserWarning, match=r"map_query trained nothing: .*reference_model.get_latent\(query_adata\)") as told:
            known = model.map_query(reference[reference.obs["batch"] == "batch1"].copy(), progress=False)
    nothing_trained = next(str(w.message) for w in told if "trained nothing" in str(w.message))
    assert "--layer" not in in_command_line_terms(nothing_trained, argparse.Namespace(input="q.h5ad"))  # (train_input_layer=)
    with pytest.raises(ValueError, match="nothing to train"):
        known.fit(progress=False)
    with pytest.raises(ValueError, match="no training history: map_query had nothing to train"):
        cellvae.pl.history(known, show=False)
    (tmp_path / "mapped" / "history.json").unlink()  # a query model that trained, loaded without its history
    with pytest.raises(ValueError, match="no training history: it was loaded from a folder without a readable history"):
        cellvae.pl.history(CellVAE.load(tmp_path / "mapped"), show=False)


def test_map_query_adds_new_categories_of_a_categorical_covariate(three_batches):
    adata = three_batches.copy()
    adata.obs["kit"] = np.where(np.arange(adata.n_obs) % 2 == 0, "v2", "v3")
    is_query = (adata.obs["batch"] == "batch2").to_numpy()
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    query.obs["kit"] = np.where(np.arange(query.n_obs) % 2 == 0, "v3", "v4")  # one known kit, one new
    model = CellVAE(reference, batch_key="batch", categorical_covariate_keys=["kit"]).fit(max_epochs=60, progress=False)
    query_model = model.map_query(query, progress=False)
    assert query_model.config.categorical_covariate_categories == {"kit": ["v2", "v3", "v4"]}
    assert query_model.config.reference_categories == {"batch": 2, "kit": 2}
    np.testing.assert_allclose(query_model.get_latent(reference), model.get_latent(reference), atol=1e-5)
    decoder = query_model.module.decoder.body.linears[0]
    kit_columns = decoder.in_features - query_model.config.n_covariates + 3 + np.arange(3)  # after the 3 batch columns
    old = model.module.decoder.body.linears[0].weight[:, -2:]
    assert torch.equal(decoder.weight[:, kit_columns[:2]], old) and decoder.weight[:, kit_columns[2]].abs().sum() > 0
    reference.obsm["X_cellvae"], query.obsm["X_cellvae"] = query_model.get_latent(reference), query_model.get_latent()
    cellvae.tl.transfer_labels(reference, query, "cell_type")
    assert (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean() > 0.95
    as_floats = query.copy()  # kits named by numbers, read back as floats: not new kits
    model_by_number = CellVAE(reference.copy(), batch_key="batch", categorical_covariate_keys=["kit"])
    model_by_number.adata.obs["kit"] = np.where(model_by_number.adata.obs["kit"] == "v2", 2, 3)
    model_by_number = CellVAE(model_by_number.adata, batch_key="batch", categorical_covariate_keys=["kit"]).fit(
        max_epochs=1, progress=False
    )
    as_floats.obs["kit"] = 2.0
    with pytest.raises(ValueError, match=r"query_adata.obs\['kit'\] = query_adata.obs\['kit'\].astype\(int\)"):
        model_by_number.map_query(as_floats, progress=False)
    unknown_kit = query.copy()
    unknown_kit.obs["kit"] = unknown_kit.obs["kit"].where(np.arange(query.n_obs) > 0)
    missing_kit = r"query_adata.obs\['kit'\] has 1 missing \(NaN\) values; .*\(query_adata = query_adata\["
    with pytest.raises(ValueError, match=missing_kit):
        model.map_query(unknown_kit, progress=False)
    without_kit = query.copy()
    del without_kit.obs["kit"]
    with pytest.raises(KeyError, match=r"obs columns \['kit'\] \(covariates of the reference\) not found in query_adata.obs"):
        model.map_query(without_kit)
    # without batch_key there is nothing to map onto: neither error sends the user to the other
    kit_only = CellVAE(reference, categorical_covariate_keys=["kit"]).fit(max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"this model \(without batch_key\) cannot map new ones: train a model"):
        kit_only.get_latent(query)
    with pytest.raises(ValueError, match=r"categories of \['kit'\] it was not trained with need such a model"):
        kit_only.map_query(query)


def test_map_query_trains_a_new_covariate_category_held_by_one_cell(small_reference):
    """The one cell of a new kit is never left to validation only, which would keep the kit's columns at zero."""
    model, query = small_reference
    reference = model.adata.copy()
    reference.obs["kit"] = np.where(np.arange(reference.n_obs) % 2 == 0, "v2", "v3")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(reference, batch_key="batch", categorical_covariate_keys=["kit"], n_hidden=16).fit(
            max_epochs=1, progress=False
        )
    query = query.copy()
    query.obs["kit"] = ["v4"] + ["v2"] * (query.n_obs - 1)
    for seed in range(6):  # (the old split left the v4 cell to validation in some of them)
        query_model = model.map_query(query, max_epochs=1, validation_size=0.5, random_state=seed, progress=False)
        decoder = query_model.module.decoder.body.linears[0]
        v4_column = decoder.in_features - query_model.config.n_covariates + 3 + 2  # 3 batch columns, then v2, v3, v4
        assert decoder.weight[:, v4_column].abs().sum() > 0, f"seed {seed}: the new kit's column was not trained"


def test_a_batch_column_of_the_other_number_type_is_told_to_take_the_models(reference_and_query):
    model, reference, _ = reference_and_query
    plates = reference.copy()
    plates.obs["plate"] = np.where(plates.obs["batch"] == "batch0", 1016, 1256)
    by_plate = CellVAE(plates, batch_key="plate").fit(max_epochs=1, progress=False)
    plates.obs["plate"] = plates.obs["plate"].astype(float)  # e.g. read back from a CSV with missing values
    match = r"holds floats \(1[02][15]6.0\) where the model's categories are integers \(1[02][15]6\).*astype\(int\)"
    with pytest.raises(ValueError, match=match):
        by_plate.get_latent(plates)
    with pytest.raises(ValueError, match=match):  # map_query would have made 1016.0 a new batch beside 1016
        by_plate.map_query(plates, progress=False)
    with_a_new_plate = plates.copy()  # beside a truly new plate too
    with_a_new_plate.obs["plate"] = np.where(plates.obs["plate"] == 1016, 1016.0, 1244.0)
    with pytest.raises(ValueError, match=r"holds floats \(1016.0\) where the model's categories are integers"):
        by_plate.map_query(with_a_new_plate, progress=False)
    # new plates alone, as floats: mapped so, no column could hold the reference's plates and these (read apart)
    new_plates = plates.copy()
    new_plates.obs["plate"] = np.where(plates.obs["plate"] == 1016, 1300.0, 1301.0)
    typed = r"holds 130[01].0 where the model's categories are integers \(1016\): .* = query_adata.obs\['plate'\].astype\(int\)$"
    with pytest.raises(ValueError, match=typed):
        by_plate.map_query(new_plates, progress=False)
    kits = reference.copy()  # names that merely end in ".0" are no numbers: new batches, mapped
    kits.obs["kit"] = np.where(kits.obs["batch"] == "batch0", "kit-v2", "kit-v3")
    by_kit = CellVAE(kits, batch_key="kit").fit(max_epochs=1, progress=False)
    kits.obs["kit"] = np.where(kits.obs["batch"] == "batch0", "kit-v3.0", "kit-v4.0")
    mapped = by_kit.map_query(kits, max_epochs=1, progress=False)
    assert sorted(mapped.config.batch_categories) == ["kit-v2", "kit-v3", "kit-v3.0", "kit-v4.0"]
    by_float_plate = CellVAE(plates, batch_key="plate").fit(max_epochs=1, progress=False)  # and the other way round
    plates.obs["plate"] = plates.obs["plate"].astype(int)
    match = r"holds integers \(1[02][15]6\) where the model's categories are floats \(1[02][15]6.0\).*astype\(float\)"
    with pytest.raises(ValueError, match=match):
        by_float_plate.get_latent(plates)
    with pytest.raises(ValueError, match=match):
        by_float_plate.map_query(plates, progress=False)
    new_plates.obs["plate"] = new_plates.obs["plate"].astype(int)
    with pytest.raises(ValueError, match=r"holds 130[01] where the model's categories are floats \(1016.0\): .*astype\(float\)$"):
        by_float_plate.map_query(new_plates, progress=False)


def test_donor_ids_that_lost_or_gained_leading_zeros_are_told_to_take_the_models(reference_and_query):
    """'01' read back as the number 1 (pandas.read_csv) would become a new batch beside '01' in map_query."""
    model, reference, _ = reference_and_query
    donors = reference.copy()
    donors.obs["donor"] = np.where(donors.obs["batch"] == "batch0", "01", "02")
    by_donor = CellVAE(donors, batch_key="donor").fit(max_epochs=1, progress=False)
    as_read = donors.copy()
    as_read.obs["donor"] = np.where(donors.obs["batch"] == "batch0", 1, 2)
    match = r"holds '[12]' where the model's category is '0[12]': the same ID with other leading zeros .*str.zfill\(2\)"
    with pytest.raises(ValueError, match=match):
        by_donor.get_latent(as_read)
    with pytest.raises(ValueError, match=match):
        by_donor.map_query(as_read, progress=False)
    fixed = as_read.copy()
    fixed.obs["donor"] = fixed.obs["donor"].astype(int).astype(str).str.zfill(2)  # the fix it names works
    np.testing.assert_array_equal(by_donor.get_latent(fixed), by_donor.get_latent(donors))
    by_number = CellVAE(as_read, batch_key="donor").fit(max_epochs=1, progress=False)  # and the other way round
    with pytest.raises(ValueError, match=r"holds '0[12]' where the model's category is '[12]': .*astype\(int\); if they"):
        by_number.map_query(donors, progress=False)
    other_padding = donors.copy()  # 001 for the model's 01
    other_padding.obs["donor"] = "001"
    with pytest.raises(ValueError, match=r"holds '001' where the model's category is '01'.*zfill\(2\); if they are new"):
        by_donor.map_query(other_padding, progress=False)
    beside_a_name = as_read.copy()  # 1 beside a new donor named in words: the conversion it names works there too
    beside_a_name.obs["donor"] = np.where(donors.obs["batch"] == "batch0", "1", "donor X")
    with pytest.raises(ValueError, match=r"holds '1' where the model's category is '01'") as told:
        by_donor.map_query(beside_a_name, progress=False)
    query_adata = beside_a_name.copy()
    exec(re.search(r"Convert it first, (.*); if they", str(told.value))[1])  # query_adata.obs['donor'] = ...
    assert sorted(query_adata.obs["donor"].unique()) == ["01", "donor X"]
    assert by_donor.map_query(query_adata, max_epochs=1, progress=False).config.batch_categories == ["01", "02", "donor X"]
    truly_new = donors.copy()  # 03 beside a model's 1 and 2: a new donor, mapped
    truly_new.obs["donor"] = "03"
    assert by_number.map_query(truly_new, max_epochs=1, progress=False).config.batch_categories == ["1", "2", "03"]


def test_a_flag_covariate_written_as_0_and_1_in_the_query_is_told_to_take_the_models_booleans(reference_and_query):
    """A True/False covariate given as 0/1 in the query would become two new categories in map_query,
    losing the reference's effect of the flag."""
    _, reference, query = reference_and_query
    flagged = reference.copy()
    flagged.obs["doublet"] = np.arange(flagged.n_obs) % 3 == 0
    model = CellVAE(flagged, batch_key="batch", categorical_covariate_keys=["doublet"]).fit(max_epochs=1, progress=False)
    numbered = query.copy()
    numbered.obs["doublet"] = (np.arange(numbered.n_obs) % 3 == 0).astype(int)
    match = r"obs\['doublet'\] holds 0/1 where the model's categories are True/False.*astype\(bool\)"
    with pytest.raises(ValueError, match=match):
        model.map_query(numbered, progress=False)
    own_cells = flagged.copy()
    own_cells.obs["doublet"] = own_cells.obs["doublet"].astype(int)
    with pytest.raises(ValueError, match=match.replace("obs", "adata.obs", 1)):
        model.get_latent(own_cells)
    numbered.obs["doublet"] = numbered.obs["doublet"].astype(bool)  # the advice taken: mapped onto the flag's categories
    assert model.map_query(numbered, max_epochs=1, progress=False).config.categorical_covariate_categories["doublet"] == [
        "False",
        "True",
    ]


def test_a_query_category_in_other_case_or_with_spaces_around_is_told_to_take_the_models(reference_and_query):
    """'10X v3 ' or 'TRUE' in the query, the reference's '10x v3' and 'True': map_query made them new categories,
    trained from the query alone, without a word."""
    _, reference, query = reference_and_query
    labelled = reference.copy()
    labelled.obs["chem"] = np.where(np.arange(labelled.n_obs) % 2, "10x v2", "10x v3")
    labelled.obs["flag"] = np.arange(labelled.n_obs) % 3 == 0
    model = CellVAE(labelled, batch_key="batch", categorical_covariate_keys=["chem", "flag"]).fit(max_epochs=1, progress=False)
    query_adata = query.copy()
    query_adata.obs["chem"] = np.where(np.arange(query_adata.n_obs) % 2, "10X v2", "10x v3 ")
    query_adata.obs["flag"] = np.where(np.arange(query_adata.n_obs) % 3 == 0, "TRUE", "FALSE")
    in_known_batches = query_adata.copy()
    in_known_batches.obs["batch"] = "batch0"
    with pytest.raises(ValueError, match=r"the same name in other case or with spaces around it\? Convert it first"):
        model.get_latent(in_known_batches)  # (its advice led to map_query, which mapped them as new)
    match = r"holds '(10X v2|FALSE)' where the model's category is '(10x v2|False)': the same name in other case"
    with pytest.warns(UserWarning, match=match + r".*map_query adds it as a new batch or category") as told:
        mapped = model.map_query(query_adata, max_epochs=1, progress=False)  # (new names may be meant: mapped, and told)
    assert mapped.config.categorical_covariate_categories["chem"] == ["10x v2", "10x v3", "10X v2", "10x v3 "]
    for warning in [w for w in told if "other case" in str(w.message)]:  # the conversions they name work
        exec(re.search(r"Convert it first, (.*?); map_query adds", str(warning.message))[1])  # query_adata.obs[...] = ...
    with no_warnings():
        mapped = model.map_query(query_adata, max_epochs=1, progress=False)
    assert mapped.config.categorical_covariate_categories == {"chem": ["10x v2", "10x v3"], "flag": ["False", "True"]}
    assert names_in_other_case(["A "], ["A", "a"], "chem") is None  # which of the model's 'A' and 'a'? not told


def test_a_new_query_category_without_cells_with_counts_is_named_as_untrained(reference_and_query):
    """A new category whose every cell has zero counts trains nothing; it was told only as cells without counts."""
    _, reference, query = reference_and_query
    labelled = reference.copy()
    labelled.obs["kit"] = "v2"
    labelled.obs.loc[labelled.obs_names[::2], "kit"] = "v3"
    model = CellVAE(labelled, batch_key="batch", categorical_covariate_keys=["kit"]).fit(max_epochs=1, progress=False)
    query_adata = query.copy()
    query_adata.obs["kit"] = "v2"
    query_adata.obs.iloc[:5, query_adata.obs.columns.get_loc("kit")] = "v4"
    query_adata.X = sp.csr_matrix(sp.diags((np.arange(query_adata.n_obs) >= 5).astype(np.float32)) @ query_adata.X)
    match = r"5 cells have zero total counts .*; the categories of obs\['kit'\] \['v4'\] have no cells with counts, so"
    with pytest.warns(UserWarning, match=match):
        model.map_query(query_adata, max_epochs=1, progress=False)


def test_novelty_compares_with_labelled_reference_cells_only():
    """Unlabelled reference cells (a cluster far from the labelled ones) take no part in the novelty score:
    a query cell farther from the labelled cells than any of them is from its neighbours has novelty 1."""
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.normal(0.0, 0.5, (50, 2)), rng.normal(0.0, 0.5, (50, 2)) + [100.0, 0.0]])
    labels = ["A"] * 50 + ["unknown"] * 50
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": labels}, index=[f"r{i}" for i in range(100)]))
    reference.obsm["X_cellvae"] = positions
    query = ad.AnnData(obs=pd.DataFrame(index=["far", "inside"]), obsm={"X_cellvae": np.array([[20.0, 0.0], [0.0, 0.0]])})
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=5, unlabeled_category="unknown", novelty_threshold=0.95)
    assert query.obs["cell_type_novelty"].iloc[0] == 1.0
    assert query.obs["cell_type_predicted"].astype(str).tolist() == ["Unknown", "A"]


def test_novelty_of_a_large_reference_does_not_depend_on_the_order_of_its_cells():
    """Above 10,000 labelled reference cells novelty compares with a fixed-seed sample of them: the same cells
    whatever their order (a concatenated atlas in another order of its batches gives the same scores)."""
    rng = np.random.default_rng(1)
    positions = rng.normal(0.0, 1.0, (12_000, 3)) * rng.uniform(0.2, 3.0, (12_000, 1))  # uneven density
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": ["A"] * 12_000}, index=[f"r{i}" for i in range(12_000)]))
    reference.obsm["X_cellvae"] = positions
    shuffled = reference[rng.permutation(12_000)].copy()
    queries = [ad.AnnData(obs=pd.DataFrame(index=[f"q{i}" for i in range(300)]), obsm={"X_cellvae": rng.normal(0, 2, (300, 3))})]
    queries.append(queries[0].copy())
    for voters, query in zip((reference, shuffled), queries):
        cellvae.tl.transfer_labels(voters, query, "cell_type", k=10, n_jobs=1)
    novelty = [query.obs["cell_type_novelty"].to_numpy() for query in queries]
    assert 0.05 < novelty[0].mean() < 0.95 and np.array_equal(novelty[0], novelty[1])


def test_novelty_averages_over_k_neighbours_not_only_the_nearest():
    """A query cell beside a lone outlier of the reference, far from all other reference cells: its nearest
    neighbour is close but its k nearest lie far on average, so it is novel."""
    rng = np.random.default_rng(0)
    positions = np.concatenate([rng.normal(0.0, 0.5, (50, 2)), [[50.0, 0.0]]])
    reference = ad.AnnData(obs=pd.DataFrame({"cell_type": ["A"] * 51}, index=[f"r{i}" for i in range(51)]))
    reference.obsm["X_cellvae"] = positions
    query = ad.AnnData(obs=pd.DataFrame(index=["q"]), obsm={"X_cellvae": np.array([[50.1, 0.0]])})
    cellvae.tl.transfer_labels(reference, query, "cell_type", k=5)
    assert query.obs["cell_type_novelty"].iloc[0] > 0.95


@pytest.fixture(scope="module")
def small_reference():
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=60, n_batches=3, n_cell_types=3, random_state=4)
    is_query = (adata.obs["batch"] == "batch2").to_numpy()
    reference, query = adata[~is_query].copy(), adata[is_query].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(reference, batch_key="batch", n_hidden=16, beta=5.0).fit(max_epochs=3, progress=False)
    return model, query


def test_a_mapping_that_makes_the_query_worse_is_undone_with_a_warning():
    """Too large an lr (as fit's check catches) left a collapsed query embedding with no word; the mapping is
    now compared with the untrained one, as fit compares a model with its start."""
    adata = cellvae.datasets.simulate(n_cells=900, n_genes=200, n_batches=3, n_cell_types=3, random_state=4)
    is_query = (adata.obs["batch"] == "batch2").to_numpy()
    query = adata[is_query].copy()
    model = cellvae.CellVAE(adata[~is_query].copy(), batch_key="batch", n_hidden=32)
    model.fit(max_epochs=20, progress=False, random_state=0)
    with pytest.warns(
        RuntimeWarning, match=r"mapping made the query model worse: .*lr=1000\).*map_query\(query_adata, lr=0\.001\)"
    ):
        failed = model.map_query(query, max_epochs=3, lr=1000.0, progress=False, random_state=0)
    fine = model.map_query(query, max_epochs=3, progress=False, random_state=0)
    unmapped = failed.get_latent()
    assert np.isfinite(unmapped).all() and unmapped.std(0).mean() > 0.5 * fine.get_latent().std(0).mean()
    # no record of a mapping it does not hold; the one that worked has its own
    assert failed.history.empty and failed.train_settings is None and failed.train_indices is None
    counted = int((np.asarray(query.X.sum(1)).ravel() > 0).sum())  # (cells without counts are mapped by neither)
    assert len(fine.history) and fine.train_settings.lr == 1e-3
    assert len(fine.train_indices) + len(fine.validation_indices) == counted
    np.testing.assert_array_equal(failed.get_latent(model.adata), fine.get_latent(model.adata))  # reference intact


def test_map_query_trains_with_the_references_beta(small_reference):
    model, query = small_reference
    query_model = model.map_query(query, max_epochs=2, progress=False)
    h = query_model.history
    np.testing.assert_allclose(h["validation_loss"], h["validation_distortion"] + 5.0 * h["validation_rate"], rtol=1e-9)
    assert (h["kl_weight"] == 5.0).all()  # the weight the steps trained with (no warm-up in mapping)


def test_map_query_validation_size_zero_holds_out_no_cells(small_reference):
    model, query = small_reference
    query_model = model.map_query(query, max_epochs=2, validation_size=0.0, progress=False)
    assert "validation_loss" not in query_model.history.columns


def test_map_query_patience_stops_one_epoch_after_the_best(small_reference):
    """patience=1: mapping stops at the first epoch that does not improve on the best so far."""
    model, query = small_reference
    query_model = model.map_query(query, max_epochs=200, patience=1, lr=0.05, progress=False)
    losses = query_model.history["validation_loss"].to_numpy()
    assert len(losses) < 200
    best = np.inf
    for epoch, loss in enumerate(losses):
        improved = loss < best - 1e-4 * abs(best) if np.isfinite(best) else True
        if improved:
            best = loss
        else:
            assert epoch == len(losses) - 1, (epoch, losses)  # the first epoch without improvement is the last


def test_query_cells_without_counts_take_no_part_in_mapping(small_reference):
    """Empty cells appended to the query change nothing: mapping trains and validates on cells with counts only."""
    model, query = small_reference
    empty = ad.AnnData(
        X=sp.csr_matrix((20, query.n_vars), dtype=np.float32), obs=query.obs.iloc[:20].copy(), var=query.var.copy()
    )
    empty.obs_names = [f"empty{i}" for i in range(20)]
    padded = ad.concat([query, empty])
    plain = model.map_query(query, max_epochs=2, progress=False)
    with pytest.warns(UserWarning, match=r"20 cells have zero total counts and are left out of training; drop them"):
        with_empty = model.map_query(padded, max_epochs=2, progress=False)
    np.testing.assert_array_equal(with_empty.get_latent(query), plain.get_latent(query))
    empty.obs["batch"] = "empty"  # a new batch with no counts at all: its parameters cannot be trained, as fit tells too
    with pytest.warns(UserWarning, match=r"the batches \['empty'\] have no cells with counts, so their parameters stay at zero"):
        model.map_query(ad.concat([query, empty]), max_epochs=2, progress=False)


def test_map_query_trains_at_the_learning_rate_asked_for(small_reference):
    model, query = small_reference
    query_model = model.map_query(query, max_epochs=2, lr=0.02, progress=False)
    assert query_model.history["lr"].tolist() == [0.02, 0.02]
    assert not np.allclose(query_model.get_latent(), model.map_query(query, max_epochs=2, progress=False).get_latent(query))


def test_refinement_optimises_the_objective_at_the_models_beta(small_reference):
    """get_latent(refine_steps=...) maximises E_q[log p(x|z)] - beta KL with the model's beta (5 here): the same
    weights refined at beta=1 land elsewhere."""
    import copy

    model, query = small_reference
    at_one = copy.deepcopy(model)
    at_one.config.beta = 1.0
    refined = model.get_latent(refine_steps=5, progress=False)
    assert not np.allclose(refined, at_one.get_latent(refine_steps=5, progress=False), atol=1e-4)
    loader, cells = model._loader(model.adata, model.device)  # refinement itself, at beta 5 and at twice that
    with cellvae.diagnostics.evaluation(model.module, 0):
        at_five = cellvae.diagnostics.refined_latent(model.module, loader, cells, n_steps=5, beta=5.0)
    with cellvae.diagnostics.evaluation(model.module, 0):
        at_ten = cellvae.diagnostics.refined_latent(model.module, loader, cells, n_steps=5, beta=10.0)
    np.testing.assert_allclose(refined, at_five, rtol=1e-5, atol=1e-6)
    assert not np.allclose(refined, at_ten, atol=1e-4)


def test_rate_distortion_averages_the_distortion_over_n_samples(small_reference):
    """More posterior draws per cell: a per-cell distortion that varies less from seed to seed."""
    model, _ = small_reference
    spread = []
    for n_samples in (1, 20):
        runs = [model.rate_distortion(n_samples=n_samples, random_state=s, progress=False)["distortion"] for s in range(3)]
        spread.append(float(np.std(np.stack(runs), axis=0).mean()))
    assert spread[1] < 0.5 * spread[0], spread


def test_the_batch_discrepancy_weighs_on_the_training_loss_only():
    vae, counts, covariates, library, batch_index = simulated_module(batch_mmd=10.0)
    for training in (True, False):
        vae.train(training)
        torch.manual_seed(0)
        out = vae(counts, covariates, library, batch_index)
        elbo_loss = (out["distortion"] + out["rate"]).mean()
        if training:
            torch.manual_seed(0)
            z = vae.inference(counts, covariates)["z"]
            torch.testing.assert_close(out["loss"], elbo_loss + 10.0 * batch_discrepancy(z, batch_index, 2))
        else:
            torch.testing.assert_close(out["loss"], elbo_loss)


def test_batch_discrepancy_is_the_biased_squared_mmd_of_each_batch_against_the_others():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(30, 4, generator=generator, dtype=torch.float64) * 3.0
    batches = torch.tensor([0] * 5 + [1] * 10 + [2] * 15)
    z[batches == 1] += 2.0

    def kernel_mean(a, b):
        squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return sum(torch.exp(-squared / (2.0 * width**2)) for width in (1.0, 2.0, 4.0, 8.0)).mean()

    expected = 0.0
    for batch in range(3):
        inside, outside = z[batches == batch], z[batches != batch]
        expected += kernel_mean(inside, inside) + kernel_mean(outside, outside) - 2.0 * kernel_mean(inside, outside)
    torch.testing.assert_close(batch_discrepancy(z, batches, 4), expected)  # batch 3 has no cells: no term
