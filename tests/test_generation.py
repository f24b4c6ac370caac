"""Generation from the prior, decoding, interpolation and latent arithmetic (the scGen-style stimulation prediction)."""

import re
import unittest.mock
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import no_warnings, shared_dataset

import cellvae
from cellvae import CellVAE

KANG = "kang_ifnb_muscat_example.h5ad"  # obs["batch"] = ctrl / stim (interferon-beta), obs["cell_type"]


@pytest.fixture(scope="module")
def kang():
    return shared_dataset(KANG)


@pytest.fixture(scope="module")
def model(kang):
    """Condition as the batch covariate, so generated cells carry obs['batch']."""
    return CellVAE(kang, batch_key="batch", n_latent=10).fit(max_epochs=60, progress=False)


def _dense(matrix) -> np.ndarray:
    return matrix.toarray() if sp.issparse(matrix) else np.asarray(matrix)


def test_generated_cells_look_like_the_training_data(kang, model):
    generated = model.generate(1500, random_state=0)
    assert generated.n_obs == 1500 and list(generated.var_names) == list(kang.var_names)
    counts = _dense(generated.X)
    assert sp.issparse(generated.X) and (counts >= 0).all() and np.array_equal(counts, np.round(counts))
    assert set(generated.obs["batch"]) <= {"ctrl", "stim"} and generated.obsm["z"].shape == (1500, 10)
    real = _dense(kang.X)
    # Library sizes and per-gene means close to the real cells'.
    assert abs(counts.sum(1).mean() / real.sum(1).mean() - 1) < 0.1
    real_means, generated_means = real.mean(0), counts.mean(0)
    assert np.corrcoef(np.log1p(real_means), np.log1p(generated_means))[0, 1] > 0.95
    expressed = real_means > 0.1
    assert np.median(np.abs(np.log(generated_means[expressed] / real_means[expressed]))) < 0.25
    # Seeded: the same draws again.
    again = model.generate(1500, random_state=0)
    assert (generated.X != again.X).nnz == 0


def test_generate_with_fixed_batch_and_library_size(model):
    generated = model.generate(50, batch="stim", library_size=2000.0, random_state=1)
    assert (generated.obs["batch"] == "stim").all()
    np.testing.assert_allclose(generated.obs["library_size"], 2000.0)
    assert abs(_dense(generated.X).sum(1).mean() / 2000.0 - 1) < 0.15
    with pytest.raises(ValueError, match="batch"):
        model.generate(5, batch="no_such_batch")


def test_generated_cells_take_the_library_size_of_the_cell_they_copy_and_the_batch_asked_for():
    """Without library_size each generated cell takes a model cell's library size (and batch): cells of a batch
    sequenced three times deeper come out deeper; with batch= the cells are of that batch, at that batch's sizes."""
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=50, n_batches=2, random_state=1)
    deep = (adata.obs["batch"] == "batch1").to_numpy()
    adata.X = sp.csr_matrix(adata.X.multiply(np.where(deep, 3.0, 1.0)[:, None]))
    model = CellVAE(adata, batch_key="batch", n_latent=4, n_hidden=16).fit(max_epochs=1, random_state=0, progress=False)
    generated = model.generate(300, random_state=0)
    library, in_deep = generated.obs["library_size"].to_numpy(), (generated.obs["batch"] == "batch1").to_numpy()
    assert library[in_deep].mean() / library[~in_deep].mean() > 2
    as_batch1 = model.generate(60, batch="batch1", random_state=0)
    assert (as_batch1.obs["batch"] == "batch1").all()
    depths = np.asarray(adata.X.sum(1)).ravel()
    assert set(as_batch1.obs["library_size"]) <= set(depths[deep])  # copied from cells of batch1, not of all batches
    mixed = model.generate(100, batch=np.repeat(["batch0", "batch1"], 50), random_state=0)
    assert set(mixed.obs["library_size"][:50]) <= set(depths[~deep]) and set(mixed.obs["library_size"][50:]) <= set(depths[deep])
    explicit = model.generate(60, batch="batch1", library_size=as_batch1.obs["library_size"].to_numpy(), random_state=0)
    assert (explicit.X != as_batch1.X).nnz == 0
    model.adata = adata[~deep].copy()  # e.g. loaded with another AnnData: no cell of batch1 to copy
    with pytest.warns(
        UserWarning, match=r"holds no cell with counts of batch='batch1', so the cells generated with those values copy"
    ):
        elsewhere = model.generate(20, batch="batch1", random_state=0)
    assert set(elsewhere.obs["library_size"]) <= set(depths[~deep])


def test_generated_cells_of_a_cell_type_covariate_take_that_types_library_sizes():
    """With the cell type a categorical covariate, cells generated as one type copy the depths of that type's cells
    in the batch asked for (a type sequenced deeper comes out deeper), not of the whole batch."""
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=50, n_batches=2, random_state=1)
    deep = (adata.obs["cell_type"] == adata.obs["cell_type"].cat.categories[0]).to_numpy()
    adata.X = sp.csr_matrix(adata.X.multiply(np.where(deep, 4.0, 1.0)[:, None]))
    model = CellVAE(adata, batch_key="batch", categorical_covariate_keys=["cell_type"], n_latent=4, n_hidden=16)
    model.fit(max_epochs=1, random_state=0, progress=False)
    depths = np.asarray(adata.X.sum(1)).ravel()
    deep_type = adata.obs["cell_type"].cat.categories[0]
    in_batch0 = (adata.obs["batch"] == "batch0").to_numpy()
    generated = model.generate(50, batch="batch0", covariates={"cell_type": deep_type}, random_state=0)
    assert set(generated.obs["library_size"]) <= set(depths[deep & in_batch0])
    assert (generated.obs["cell_type"] == deep_type).all()
    # categoricals in the model's order, as in its AnnData, also when copied from its cells
    copied = model.generate(20, random_state=0)
    for key in ("batch", "cell_type"):
        for cells in (generated, copied):
            assert list(cells.obs[key].cat.categories) == list(adata.obs[key].cat.categories)
    model.adata = adata[~(deep & in_batch0)].copy()  # no cell of that type in batch0 to copy
    with pytest.warns(
        UserWarning, match=rf"holds no cell with counts of batch='batch0', cell_type='{deep_type}', so the cells generated"
    ):
        model.generate(10, batch="batch0", covariates={"cell_type": deep_type}, random_state=0)
    with warnings.catch_warnings():  # an unknown value: refused before any cell is matched to it (no warning first)
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="unseen in training"):
            model.generate(10, covariates={"cell_type": "bogus"}, random_state=0)


def test_generated_counts_stay_a_valid_csr_matrix_when_deeper_cells_come_later(model):
    """Rows are written chunk by chunk into buffers sized from the density so far; deeper cells at the end
    (more non-zeros per cell than the first chunks promised) must grow them without losing a count."""
    library = np.geomspace(200.0, 50_000.0, 700)
    generated = model.generate(700, batch="stim", library_size=library, random_state=2, batch_size=50)
    counts = generated.X
    assert sp.isspmatrix_csr(counts) and counts.has_canonical_format and (counts.data > 0).all()
    dense = counts.toarray()
    assert np.count_nonzero(dense) == counts.nnz and np.array_equal(dense, np.round(dense))
    totals = dense.sum(1)
    for cells in (slice(0, 100), slice(600, 700)):  # the first chunks and the deepest, after the buffers grew
        assert abs(totals[cells].sum() / library[cells].sum() - 1) < 0.1
    again = model.generate(700, batch="stim", library_size=library, random_state=2, batch_size=50).X
    assert (again != counts).nnz == 0


def test_a_batch_for_a_model_without_batches_is_refused(kang):
    unbatched = CellVAE(kang[:300].copy(), n_latent=4).fit(max_epochs=1, progress=False)
    for call in (
        lambda: unbatched.generate(5, batch="stim", library_size=1000.0),
        lambda: unbatched.decode(np.zeros((2, 4)), batch="stim"),
    ):
        with pytest.raises(ValueError, match="trained without batch_key, so it has no batches"):
            call()


def test_loaded_model_needs_explicit_inputs_to_generate(model, tmp_path):
    model.save(tmp_path / "m")
    loaded = CellVAE.load(tmp_path / "m")
    with pytest.raises(
        ValueError, match=r"cannot copy batches, covariates and library sizes from it; pass batch=\.\.\. and library_size=\.\.\.$"
    ):
        loaded.generate(10)
    with pytest.raises(ValueError, match=r"from it; pass library_size=\.\.\.$"):  # only what is missing
        loaded.generate(10, batch="ctrl")
    generated = loaded.generate(10, batch="ctrl", library_size=1000.0, random_state=3)
    expected = model.generate(10, batch="ctrl", library_size=1000.0, random_state=3)
    assert generated.n_obs == 10
    np.testing.assert_array_equal(generated.X.toarray(), expected.X.toarray())  # the loaded model generates as the trained one


def test_decode_matches_normalized_expression(kang, model):
    cells = kang[:100]
    z = model.get_latent(cells)
    decoded = model.decode(z, batch="ctrl", library_size=1e4)
    expected = model.get_normalized_expression(cells, transform_batch="ctrl", library_size=1e4)
    np.testing.assert_allclose(decoded, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(decoded.sum(1), 1e4, rtol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        model.decode(np.zeros((3, 4)))
    for huge in (1e30, 1e39):  # (decoded to NaN from about 1e22; 1e39 overflowed float32 with a warning first)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            with pytest.raises(
                ValueError, match=rf"z holds codes as large as {re.escape(f'{huge:.3g}')}; .*beyond 1e\+06 cannot be decoded"
            ):
                model.decode(np.full((1, z.shape[1]), huge), batch="ctrl")
    np.testing.assert_allclose(model.decode(z.astype(np.float64), batch="ctrl", library_size=1e4), decoded)


def test_decode_of_a_gene_list_gives_those_columns_in_its_order(kang, model):
    z = model.get_latent(kang[:20])
    genes = [model.config.gene_names[i] for i in (7, 2, 30)]
    decoded = model.decode(z, library_size=1e4)  # averaged over both batches
    each = [model.decode(z, batch=batch, library_size=1e4) for batch in model.config.batch_categories]
    np.testing.assert_allclose(decoded, np.mean(each, axis=0), rtol=1e-5)
    assert np.abs(each[0] - each[1]).max() > 1.0  # (so that one batch's decoding would be told apart)
    np.testing.assert_allclose(model.decode(z, library_size=1e4, gene_list=genes), decoded[:, [7, 2, 30]], rtol=1e-6)
    with pytest.raises(ValueError, match="gene_list names genes the model does not have: .'no-such-gene'."):
        model.decode(z, gene_list=["no-such-gene"])
    with pytest.raises(TypeError, match=r"gene_list takes a list of gene names, e.g. gene_list=\['CD3E'\]"):
        model.decode(z, gene_list="CD3E")


def test_interpolation_endpoints_are_the_decoded_endpoints(kang, model):
    a, b = kang.obs_names[0], kang.obs_names[1]
    path = cellvae.tl.interpolate(model, a, b, 5, batch="ctrl")
    assert path.shape == (5, kang.n_vars) and list(path.obs["t"]) == [0.0, 0.25, 0.5, 0.75, 1.0]
    ends = model.decode(model.get_latent(kang[[0, 1]]), batch="ctrl")
    np.testing.assert_allclose(path.X[[0, -1]], ends, rtol=1e-4, atol=1e-6)
    codes = model.get_latent(kang[[0, 1]])  # the path between them is a straight line, in steps of equal length
    np.testing.assert_allclose(path.obsm["z"], [(1 - t) * codes[0] + t * codes[1] for t in path.obs["t"]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(path.X[2], model.decode(path.obsm["z"][[2]], batch="ctrl")[0], rtol=1e-4, atol=1e-6)
    monocytes = (kang.obs["cell_type"] == "CD14+ Monocytes").to_numpy()
    groups = cellvae.tl.interpolate(model, monocytes, ~monocytes, 3, batch="ctrl")
    np.testing.assert_allclose(groups.obsm["z"][0], model.get_latent(kang[monocytes]).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(groups.obsm["z"][-1], model.get_latent(kang[~monocytes]).mean(0), rtol=1e-5, atol=1e-6)
    duplicated = kang[:20].copy()
    duplicated.obs_names = ["cell"] * 20
    with pytest.raises(ValueError, match="obs_names are not unique; call adata.obs_names_make_unique"):
        cellvae.tl.interpolate(model, "cell", "cell", 3, adata=duplicated, batch="ctrl")
    by_position = cellvae.tl.interpolate(model, [0], [1], 3, adata=duplicated, batch="ctrl")
    np.testing.assert_allclose(by_position.X[[0, -1]], ends, rtol=1e-4, atol=1e-6)
    # batch=None: endpoints of one batch decode as that batch, as the cells themselves do; of two, averaged
    stim, ctrl = (np.flatnonzero((kang.obs["batch"] == name).to_numpy())[:2] for name in ("stim", "ctrl"))
    own = cellvae.tl.interpolate(model, stim[:1], stim[1:], 3)
    assert own.uns["interpolate"] == {"batch": "stim", "library_size": 1e4}
    np.testing.assert_allclose(own.X[[0, -1]], model.get_normalized_expression(kang[stim]), rtol=1e-4, atol=1e-6)
    across = cellvae.tl.interpolate(model, stim[:1], ctrl[:1], 3)
    assert across.uns["interpolate"] == {"library_size": 1e4}
    averaged = model.decode(model.get_latent(kang[[stim[0], ctrl[0]]]))
    np.testing.assert_allclose(across.X[[0, -1]], averaged, rtol=1e-4, atol=1e-6)


def _mean_log_expression(matrix) -> np.ndarray:
    counts = _dense(matrix)
    return np.log1p((counts / counts.sum(1, keepdims=True) * 1e4).mean(0))


@pytest.mark.slow
def test_latent_shift_predicts_a_held_out_stimulation_response(kang):
    """Hold out the stimulated CD4 T cells, predict them from control CD4 T cells plus the stim − ctrl latent vector."""
    held_out = "CD4 T cells"
    is_type = (kang.obs["cell_type"] == held_out).to_numpy()
    is_stim = (kang.obs["batch"] == "stim").to_numpy()
    training = kang[~(is_type & is_stim)].copy()
    obs_before = training.obs.copy()
    model = CellVAE(training, n_latent=10).fit(max_epochs=100, progress=False)
    controls = ((training.obs["cell_type"] == held_out) & (training.obs["batch"] == "ctrl")).to_numpy()
    predicted = cellvae.tl.latent_shift(
        model,
        training,
        groupby="batch",
        source="ctrl",
        target="stim",
        apply_to=controls,
        reference=(training.obs["cell_type"] != held_out).to_numpy(),
        stratify="cell_type",
    )
    assert predicted.n_obs == controls.sum() and predicted.uns["latent_shift"]["n_strata"] == 4
    record = predicted.uns["latent_shift"]
    assert record["n_reference_cells"] == int((training.obs["cell_type"] != held_out).sum())
    assert record["library_size"] == 1e4 and record["decoded_batch"] is None
    # without reference=, the shift is taken from every cell not in apply_to
    unreferenced = cellvae.tl.latent_shift(model, training, groupby="batch", source="ctrl", target="stim", apply_to=controls)
    latent, is_stim_in_training = model.get_latent(training), (training.obs["batch"] == "stim").to_numpy()
    expected = latent[~controls & is_stim_in_training].mean(0) - latent[~controls & ~is_stim_in_training].mean(0)
    np.testing.assert_allclose(unreferenced.uns["latent_shift"]["delta"], expected, rtol=1e-4, atol=1e-5)
    assert unreferenced.uns["latent_shift"]["n_reference_cells"] == training.n_obs - controls.sum()
    observed_stim = _mean_log_expression(kang[is_type & is_stim].X)
    observed_ctrl = _mean_log_expression(kang[is_type & ~is_stim].X)
    prediction = np.log1p(_dense(predicted.X).mean(0))

    def r2(x):
        return np.corrcoef(x, observed_stim)[0, 1] ** 2

    changed = np.argsort(-np.abs(observed_stim - observed_ctrl))[:100]
    assert r2(prediction) > r2(observed_ctrl) + 0.05  # all genes: measured 0.945 vs 0.828
    assert np.corrcoef(prediction[changed], observed_stim[changed])[0, 1] ** 2 > 0.5  # the 100 most changed genes
    assert training.obs.equals(obs_before)
    with pytest.raises(ValueError, match="source"):
        cellvae.tl.latent_shift(model, training, groupby="batch", source="none", target="stim", apply_to=controls)
    numbered = training.copy()
    numbered.obs["condition"] = (numbered.obs["batch"] == "stim").astype(int)  # 0 control, 1 stimulated
    by_number = cellvae.tl.latent_shift(
        model, numbered, groupby="condition", source=0, target=1, apply_to=controls,
        reference=(training.obs["cell_type"] != held_out).to_numpy(), stratify="cell_type",
    )  # fmt: skip
    np.testing.assert_allclose(_dense(by_number.X), _dense(predicted.X), rtol=1e-5, atol=1e-4)
    with pytest.raises(KeyError, match="apply_to"):
        cellvae.tl.latent_shift(model, training, groupby="batch", source="ctrl", target="stim", apply_to=["not_a_cell"])
    only_held_out_type = (training.obs["cell_type"] == held_out).to_numpy()  # its stimulated cells were held out
    with pytest.raises(ValueError, match="cannot give the shift: no cell_type holds both 'ctrl' and 'stim' cells"):
        # refused from obs alone, before any cell is encoded
        with unittest.mock.patch.object(CellVAE, "get_latent", side_effect=AssertionError("encoded first")):
            cellvae.tl.latent_shift(
                model, training, groupby="batch", source="ctrl", target="stim", apply_to=controls,
                reference=only_held_out_type, stratify="cell_type",
            )  # fmt: skip
    # groups that are the model's batch key live in the decoder, not in z: a warning, decoded as the target
    batched = CellVAE(training, batch_key="batch", n_latent=10).fit(max_epochs=5, progress=False)
    with pytest.warns(UserWarning, match=r"obs\['batch'\] is an input of the model's decoder"):
        as_target = cellvae.tl.latent_shift(batched, training, groupby="batch", source="ctrl", target="stim", apply_to=controls)
    assert as_target.uns["latent_shift"]["decoded_batch"] == "stim"
    with pytest.warns(UserWarning, match="the cells are decoded as 'ctrl'"):  # the batch asked for, not the target
        as_asked = cellvae.tl.latent_shift(
            batched, training, groupby="batch", source="ctrl", target="stim", apply_to=controls, batch="ctrl"
        )
    assert as_asked.uns["latent_shift"]["decoded_batch"] == "ctrl"
    # one name per cell, the same for all, is recorded as that batch (it was recorded as None: each cell's own)
    mixed = np.resize(["ctrl", "stim"], controls.sum())
    for names, recorded in ((np.full(controls.sum(), "ctrl"), "ctrl"), (mixed, None)):
        with pytest.warns(UserWarning, match="the cells are decoded as"):
            by_name = cellvae.tl.latent_shift(
                batched, training, groupby="batch", source="ctrl", target="stim", apply_to=controls, batch=names
            )
        assert by_name.uns["latent_shift"]["decoded_batch"] == recorded
        if recorded is not None:
            np.testing.assert_array_equal(by_name.X, as_asked.X)


def test_bad_decoding_arguments_are_refused_before_the_cells_are_encoded(kang, model, monkeypatch, tmp_path):
    encoded = []
    get_latent = CellVAE.get_latent
    monkeypatch.setattr(CellVAE, "get_latent", lambda self, *a, **k: encoded.append(1) or get_latent(self, *a, **k))
    shift = {"groupby": "cell_type", "source": "B cells", "target": "CD4 T cells", "apply_to": [0, 1]}
    unknown_batch = "batch='nope' is not a batch of this model; its batches are"
    for call, message in (
        (lambda: cellvae.tl.latent_shift(model, kang, **shift, library_size=-1.0), "library_size must be positive"),
        (lambda: cellvae.tl.latent_shift(model, kang, **shift, batch="nope"), unknown_batch),
        (lambda: cellvae.tl.interpolate(model, [0], [1], 3, library_size=0.0), "library_size must be positive"),
        (lambda: cellvae.tl.interpolate(model, [0], [1], 3, batch="nope"), unknown_batch),
        (lambda: model.decode(np.zeros((2, 10)), batch=["ctrl", "nope"]), unknown_batch),
    ):
        with pytest.raises(ValueError, match=message):
            call()
    assert not encoded
    # generate checks the batch before it reads the model's AnnData (here it has none) for library sizes
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=unknown_batch):
        CellVAE.load(tmp_path / "m").generate(5, batch="nope")


def test_covariates_given_to_decode_and_generate_set_the_decoded_cells(tmp_path):
    """A categorical covariate (the simulated batches, which scale every gene) and a continuous one:
    the values passed decide the decoded expression and are what generated cells carry in obs."""
    adata = cellvae.datasets.simulate(n_cells=1500, n_genes=200, n_batches=2, random_state=5, batch_effect=0.8)
    adata.obs["score"] = np.random.default_rng(0).normal(size=adata.n_obs)
    model = CellVAE(adata, categorical_covariate_keys=["batch"], continuous_covariate_keys=["score"], n_latent=5)
    model.fit(max_epochs=30, random_state=0, progress=False)
    z = model.get_latent()[:50]
    in_0 = model.decode(z, covariates={"batch": "batch0", "score": 0.0})
    in_1 = model.decode(z, covariates={"batch": "batch1", "score": 0.0})
    # decoded batch1/batch0 ratios follow the simulated batch effect seen in the counts
    counts = adata.X.toarray()
    normalized = counts / counts.sum(1, keepdims=True)
    batch1 = (adata.obs["batch"] == "batch1").to_numpy()
    observed = np.log(normalized[batch1].mean(0) + 1e-6) - np.log(normalized[~batch1].mean(0) + 1e-6)
    decoded = np.log(in_1.mean(0)) - np.log(in_0.mean(0))
    assert np.corrcoef(observed, decoded)[0, 1] > 0.8, np.corrcoef(observed, decoded)[0, 1]
    # one value per code: each row decodes as with its own value alone
    mixed = model.decode(z, covariates={"batch": np.where(np.arange(50) % 2, "batch1", "batch0"), "score": 0.0})
    np.testing.assert_allclose(mixed[::2], in_0[::2], rtol=1e-5)
    np.testing.assert_allclose(mixed[1::2], in_1[1::2], rtol=1e-5)
    generated = model.generate(20, covariates={"batch": "batch1", "score": 0.5}, random_state=0)
    assert (generated.obs["batch"].astype(str) == "batch1").all() and np.allclose(generated.obs["score"], 0.5)
    other = model.generate(20, covariates={"batch": "batch0", "score": 0.5}, random_state=0)
    np.testing.assert_array_equal(other.obsm["z"], generated.obsm["z"])  # the same draws of z ...
    assert (other.X != generated.X).nnz > 0  # ... decoded under another covariate value
    # interpolate records the covariates it decoded under, in a form an .h5ad keeps
    steps = {"batch": ["batch0", "batch1", "batch1"], "score": 0.5}
    path = cellvae.tl.interpolate(model, [0], [1], 3, covariates=steps, library_size=[1e3, 2e3, 3e3], progress=False)
    np.testing.assert_allclose(path.X.sum(1), [1e3, 2e3, 3e3], rtol=1e-3)
    path.write_h5ad(tmp_path / "path.h5ad")
    record = ad.read_h5ad(tmp_path / "path.h5ad").uns["interpolate"]
    assert list(record["covariates"]["batch"]) == steps["batch"] and record["covariates"]["score"] == 0.5
    np.testing.assert_array_equal(record["library_size"], [1e3, 2e3, 3e3])
    # covariates not given are the endpoint cells': the category they share, a continuous one's mean
    first, second = np.flatnonzero((adata.obs["batch"] == "batch1").to_numpy())[:2]
    path = cellvae.tl.interpolate(model, [first], [second], 3, progress=False)
    scores = adata.obs["score"].iloc[[first, second]].to_numpy()  # from a's to b's along the path (their mean at both ends
    assert path.uns["interpolate"]["covariates"]["batch"] == "batch1"  # decoded the ends off the cells' own expression)
    np.testing.assert_allclose(path.uns["interpolate"]["covariates"]["score"], [scores[0], scores.mean(), scores[1]], rtol=1e-6)
    np.testing.assert_allclose(path.X[[0, -1]], model.get_normalized_expression(adata[[first, second]]), rtol=1e-4)
    groups = cellvae.tl.interpolate(model, [first, second], [second], 2, progress=False)  # a group's end: its cells' mean
    np.testing.assert_allclose(groups.uns["interpolate"]["covariates"]["score"], [scores.mean(), scores[1]], rtol=1e-6)
    itself = cellvae.tl.interpolate(model, [first], [first], 2, progress=False)  # as the cell decodes in the model
    np.testing.assert_allclose(itself.X[0], model.get_normalized_expression(adata[[first]])[0], rtol=1e-4)
    across = np.flatnonzero((adata.obs["batch"] == "batch0").to_numpy())[0]
    with pytest.raises(ValueError, match=r"the endpoint cells hold several values of the covariate obs\['batch'\]"):
        cellvae.tl.interpolate(model, [first], [across], 3, progress=False)
    gaps = adata[[first, second]].copy()
    gaps.obs["score"] = [np.nan, 0.5]
    with pytest.raises(ValueError, match=r"lack 1 value of the covariate obs\[.score.\] \(NaN\), which the encoder needs"):
        cellvae.tl.interpolate(model, [0], [1], 3, adata=gaps, progress=False)
    assert cellvae.tl.interpolate(model, [first], [across], 3, covariates={"batch": "batch0"}, progress=False).n_obs == 3


def test_bad_covariates_given_to_decode_are_named_as_the_argument_not_as_obs():
    """decode's and generate's covariates= come from the caller, not from an AnnData: errors name covariates[...]."""
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=30, n_batches=2, random_state=2)
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 2, "d1", "d2")
    adata.obs["score"] = np.linspace(0.0, 1.0, adata.n_obs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(
            adata, batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["score"], n_hidden=16
        )
        model.fit(max_epochs=1, progress=False)
    z = np.zeros((3, model.config.n_latent))
    for call in (lambda c: model.decode(z, covariates=c), lambda c: model.generate(3, covariates=c, progress=False)):
        with pytest.raises(ValueError, match=r"^covariates\['donor'\] has categories unseen in training: \['d3'\]"):
            call({"donor": "d3", "score": 0.5})
        with pytest.raises(ValueError, match=r"^covariates\['donor'\] has 3 missing \(NaN\) values; fill them$"):
            call({"donor": None, "score": 0.5})
        for bad in (float("nan"), np.inf):
            with pytest.raises(ValueError, match=r"covariates\['score'\] has NaN, infinite or non-numeric .*; pass finite"):
                call({"donor": "d1", "score": bad})
        with pytest.raises(ValueError, match=r"covariates\['score'\] holds text, not numbers .*; pass numbers: the model learnt"):
            call({"donor": "d1", "score": "high"})
        with pytest.warns(UserWarning, match=r"^covariates\['score'\] lies far from the values the model was trained") as told:
            call({"donor": "d1", "score": 100.0})
        far = [w for w in told if "lies far" in str(w.message)]  # (pytest.warns records other libraries' warnings too)
        assert len(far) == 1, [str(w.message)[:200] for w in told]  # decoded as each of the 2 batches, told once
        # the covariates' names alone (dict() raised "dictionary update sequence element #0 has length 5")
        with pytest.raises(TypeError, match=r"covariates takes \{obs column: value or one value per cell\}.*got list"):
            call(["donor", "score"])
    generated = model.generate(3, covariates=pd.DataFrame({"donor": ["d1"] * 3, "score": 0.5}), progress=False)
    assert (generated.obs["donor"] == "d1").all()  # a table of one row per cell is still read by its columns


def test_a_category_of_a_numeric_covariate_is_found_by_its_number_as_a_batch_is():
    """covariates={'donor': 101.0} for integer donors was refused with advice to convert adata.obs (which decode
    does not read), while batch=101.0 was found as '101'; an unknown category's advice led to map_query."""
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=30, n_batches=2, random_state=0)
    adata.obs["donor"] = np.where(adata.obs["batch"] == "batch0", 101, 102)
    model = CellVAE(adata, categorical_covariate_keys=["donor"], n_hidden=16, n_latent=4).fit(max_epochs=1, progress=False)
    z = model.get_latent()[:5]
    np.testing.assert_array_equal(model.decode(z, covariates={"donor": 101.0}), model.decode(z, covariates={"donor": "101"}))
    np.testing.assert_array_equal(
        model.decode(z, covariates={"donor": [101, 102.0, "102", np.int64(101), 101]}),
        model.decode(z, covariates={"donor": ["101", "102", "102", "101", "101"]}),
    )
    generated = model.generate(4, covariates={"donor": 102.0}, random_state=0, progress=False)
    assert (generated.obs["donor"] == 102).all()
    unseen = r"categories unseen in training: \['103'\]; known: \['101', '102'\]. Pass one of"
    with pytest.raises(ValueError, match=unseen) as told:
        model.decode(z, covariates={"donor": 103})
    assert "adata.obs" not in str(told.value)
    with pytest.raises(ValueError, match=r"idx1=.donor == .101.. holds for no cell of adata.obs; check the values it compares"):
        model.differential_expression(idx1="donor == '101'")  # the donors are numbers here


def test_a_covariate_named_library_size_keeps_its_column_in_generated_cells():
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=50, random_state=1)
    adata.obs["library_size"] = np.log1p(np.asarray(adata.X.sum(1)).ravel())  # a user's covariate of that name
    model = CellVAE(adata, continuous_covariate_keys=["library_size"], n_hidden=16).fit(max_epochs=1, progress=False)
    generated = model.generate(5, covariates={"library_size": 7.0}, library_size=1000, random_state=0)
    assert np.allclose(generated.obs["library_size"], 7.0)  # the covariate the cells were decoded with
    assert np.allclose(generated.obs["generated_library_size"], 1000)


def test_generate_reads_a_viewed_anndata_as_it_is_now_as_the_other_methods_do():
    """A model on a view whose parent's covariate was relabelled since: get_latent refused the new labels (unseen),
    generate copied the old ones silently."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, random_state=0)
    adata.obs["kit"] = pd.Categorical(np.where(np.arange(300) % 2 == 0, "k1", "k2"))
    model = CellVAE(adata[:, :50], categorical_covariate_keys=["kit"], n_hidden=16, n_latent=4)
    model.fit(max_epochs=1, progress=False)
    assert set(model.generate(20, random_state=0, progress=False).obs["kit"]) <= {"k1", "k2"}
    adata.obs["kit"] = adata.obs["kit"].cat.rename_categories({"k1": "K1", "k2": "K2"})
    for method in (model.get_latent, lambda **kwargs: model.generate(20, random_state=0, **kwargs)):
        with pytest.raises(ValueError, match=r"obs\['kit'\] has categories unseen in training: \['K1', 'K2'\]"):
            method(progress=False)


def test_generated_cells_carry_batch_and_covariate_values_as_the_anndata_holds_them(tmp_path):
    """Donor numbers came back as text ('1015'): concatenated with the real cells each donor was two, and the
    result could not be written."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, n_batches=3, random_state=4)
    adata.obs["donor"] = adata.obs["batch"].cat.codes.to_numpy().astype(np.int64) + 1015
    adata.obs["site"] = pd.Categorical(np.where(np.arange(300) % 2 == 0, 7, 9))  # categorical of numbers
    adata.obs["kind"] = np.where(np.arange(300) % 3 == 0, "a", "b")  # text stays text, as a categorical
    model = CellVAE(adata, batch_key="donor", categorical_covariate_keys=["site", "kind"], n_hidden=16)
    model.fit(max_epochs=1, progress=False, random_state=0)
    generated = model.generate(60, random_state=0, progress=False)
    assert generated.obs["donor"].dtype == np.int64 and set(generated.obs["donor"]) <= {1015, 1016, 1017}
    assert list(generated.obs["site"].cat.categories) == [7, 9]
    assert list(generated.obs["kind"].cat.categories) == ["a", "b"]
    both = ad.concat({"real": adata, "generated": generated}, label="source")
    assert both.obs["donor"].nunique() == 3 and both.obs["site"].nunique() == 2
    both.write_h5ad(tmp_path / "both.h5ad")
    # a query model's AnnData holds only the query's donors: the reference's come back as numbers too
    query = cellvae.datasets.simulate(n_cells=60, n_genes=40, n_batches=1, random_state=5)
    query.obs["donor"] = np.int64(2000)
    query.obs["site"] = pd.Categorical(np.where(np.arange(60) % 2 == 0, 7, 9))
    query.obs["kind"] = "a"
    mapped = model.map_query(query, max_epochs=1, progress=False)
    from_query = mapped.generate(200, random_state=0, progress=False)
    assert from_query.obs["donor"].dtype == np.int64 and set(from_query.obs["donor"]) <= {1015, 1016, 1017, 2000}
    ad.concat([adata, query, from_query]).write_h5ad(tmp_path / "with_query.h5ad")
    # asked for by name, or by a model without its AnnData: the names asked for (text where none is held)
    assert set(model.generate(5, batch=1016, random_state=0, progress=False).obs["donor"]) == {1016}
    model.save(tmp_path / "model")
    loaded = CellVAE.load(tmp_path / "model")
    alone = loaded.generate(5, batch="1016", covariates={"site": 7, "kind": "a"}, library_size=500.0, progress=False)
    assert list(alone.obs["donor"].astype(str)) == ["1016"] * 5


# ----------------------------------------------------------------------------- a small simulated model: interpolate, latent_shift


@pytest.fixture(scope="module")
def cells():
    adata = cellvae.datasets.simulate(n_cells=240, n_genes=40, n_batches=1, n_cell_types=3, random_state=7)
    adata.obs["condition"] = pd.Categorical(np.where(np.arange(adata.n_obs) % 2 == 0, "ctrl", "stim"))
    return adata


@pytest.fixture(scope="module")
def small_model(cells):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CellVAE(cells, n_hidden=16, n_latent=4).fit(max_epochs=2, progress=False)


def test_interpolate_needs_two_steps_and_names_the_models_genes(cells, small_model):
    with pytest.raises(ValueError, match="n_steps must be an integer of at least 2, got 1"):
        cellvae.tl.interpolate(small_model, [0], [1], 1)
    path = cellvae.tl.interpolate(small_model, [0], [1], 3)
    assert list(path.var_names) == list(cells.var_names)
    assert list(path.obs_names) == ["step0", "step1", "step2"]


def test_latent_shift_averages_the_shift_over_the_strata(cells, small_model):
    """stratify: the shift is the mean, over the strata, of each stratum's target − source mean code."""
    apply_to = (cells.obs["condition"] == "ctrl").to_numpy() & (cells.obs["cell_type"] == "type0").to_numpy()
    reference = ~apply_to
    shifted = cellvae.tl.latent_shift(
        small_model, cells, groupby="condition", source="ctrl", target="stim", apply_to=apply_to, reference=reference,
        stratify="cell_type",
    )  # fmt: skip
    with pytest.raises(KeyError, match=r"stratify 'x' not found in adata.obs; available: "):  # (named by argument)
        cellvae.tl.latent_shift(
            small_model, cells, groupby="condition", source="ctrl", target="stim", apply_to=apply_to, stratify="x"
        )
    latent = small_model.get_latent(cells)
    stim = (cells.obs["condition"] == "stim").to_numpy()
    deltas = []
    for stratum in ("type1", "type2"):  # type0's controls are the cells shifted: that stratum holds no 'ctrl' reference
        here = reference & (cells.obs["cell_type"] == stratum).to_numpy()
        deltas.append(latent[here & stim].mean(0) - latent[here & ~stim].mean(0))
    record = shifted.uns["latent_shift"]
    assert record["n_strata"] == 2
    np.testing.assert_allclose(record["delta"], np.mean(deltas, axis=0), rtol=1e-5, atol=1e-6)
    unlabelled = cells.copy()  # cells without a type are a mix of types, no stratum of their own: left out
    unlabelled.obs["cell_type"] = unlabelled.obs["cell_type"].astype(object)
    unlabelled.obs.loc[unlabelled.obs_names[1::3], "cell_type"] = np.nan
    unlabelled.obs.loc[unlabelled.obs_names[2::3], "cell_type"] = "nan"  # (a label that reads as a missing one's text)
    some = cellvae.tl.latent_shift(
        small_model, unlabelled, groupby="condition", source="ctrl", target="stim", apply_to=apply_to, reference=reference,
        stratify="cell_type",
    )  # fmt: skip
    labelled = unlabelled.obs["cell_type"].notna().to_numpy()
    deltas_of_labelled = []
    for stratum in ("nan", "type1", "type2"):
        here = labelled & reference & (unlabelled.obs["cell_type"] == stratum).to_numpy()
        deltas_of_labelled.append(latent[here & stim].mean(0) - latent[here & ~stim].mean(0))
    assert some.uns["latent_shift"]["n_strata"] == 3
    assert some.uns["latent_shift"]["n_reference_cells"] == (labelled & reference).sum()
    np.testing.assert_allclose(some.uns["latent_shift"]["delta"], np.mean(deltas_of_labelled, axis=0), rtol=1e-5, atol=1e-6)
    unlabelled.obs["cell_type"] = np.nan
    with pytest.raises(ValueError, match=r"obs\['cell_type'\] \(stratify\) has no value in the reference cells"):
        cellvae.tl.latent_shift(
            small_model, unlabelled, groupby="condition", source="ctrl", target="stim", apply_to=apply_to, stratify="cell_type"
        )
    np.testing.assert_allclose(shifted.obsm["z"], latent[apply_to] + record["delta"], rtol=1e-5, atol=1e-6)
    shift = {"groupby": "condition", "source": "ctrl", "target": "stim", "reference": reference, "stratify": "cell_type"}
    first = np.flatnonzero(apply_to)[:3]
    twice = np.r_[first, first]  # one row per cell: a cell twice is refused
    with pytest.raises(ValueError, match="apply_to lists 3 cells more than once; give each cell once"):
        cellvae.tl.latent_shift(small_model, cells, apply_to=twice, **shift)
    with pytest.raises(ValueError, match="apply_to lists 1 cell more than once"):
        cellvae.tl.latent_shift(small_model, cells, apply_to=np.r_[first[[0, 0, 0]], first[1:]], **shift)
    stim_cells = np.flatnonzero(stim)[:2]
    with pytest.warns(UserWarning, match=r"2 of the 5 apply_to cells are 'stim' cells already: the shift takes them past it"):
        cellvae.tl.latent_shift(small_model, cells, apply_to=np.r_[np.flatnonzero(apply_to)[:3], stim_cells], **shift)
    # every 'stim' cell shifted, none left to give the shift: the message says why (reference=None leaves them out)
    with pytest.raises(ValueError, match=r"do not hold both 'ctrl' and 'stim' cells \(the apply_to cells, 120, are left out"):
        cellvae.tl.latent_shift(small_model, cells, groupby="condition", source="ctrl", target="stim", apply_to=stim)
    split = cells.copy()  # no stratum holds both groups, whatever the reference: nothing said of apply_to
    split.obs["site"] = np.where(stim, "s1", "s2")
    with pytest.raises(ValueError, match=r"no site holds both 'ctrl' and 'stim' cells$"):
        cellvae.tl.latent_shift(
            small_model, split, groupby="condition", source="ctrl", target="stim", apply_to=split.obs_names[:3], stratify="site"
        )


def test_latent_shift_over_a_categorical_covariate_decodes_the_cells_as_the_target(cells):
    """groupby that is a categorical covariate of the model: a warning, and the cells decoded with the target's category."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(cells, categorical_covariate_keys=["condition"], n_hidden=16, n_latent=4).fit(
            max_epochs=2, progress=False
        )
    controls = (cells.obs["condition"] == "ctrl").to_numpy() & (cells.obs["cell_type"] == "type0").to_numpy()
    with pytest.warns(UserWarning, match=r"obs\['condition'\] is an input of the model's decoder .*decoded as 'stim'"):
        shifted = cellvae.tl.latent_shift(model, cells, groupby="condition", source="ctrl", target="stim", apply_to=controls)
    assert shifted.uns["latent_shift"]["decoded_covariates"] == {"condition": "stim"}
    as_stim = model.decode(shifted.obsm["z"], covariates={"condition": "stim"})
    as_ctrl = model.decode(shifted.obsm["z"], covariates={"condition": "ctrl"})
    np.testing.assert_allclose(shifted.X, as_stim, rtol=1e-5, atol=1e-6)
    assert not np.allclose(shifted.X, as_ctrl, rtol=1e-5, atol=1e-6)


def test_latent_shift_over_a_column_that_repeats_the_batches_decodes_the_cells_as_the_target_batch(cells):
    """groupby a column whose groups are the model's batches under another name (group_id beside batch): the cells
    were decoded in their source batch without a word, as if the batch input carried no difference."""
    adata = cells.copy()
    adata.obs["group_id"] = adata.obs["condition"].astype(str)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(adata, batch_key="condition", n_hidden=16, n_latent=4).fit(max_epochs=2, progress=False)
    controls = (adata.obs["condition"] == "ctrl").to_numpy() & (adata.obs["cell_type"] == "type0").to_numpy()
    shift = {"source": "ctrl", "target": "stim", "apply_to": controls}
    with pytest.warns(UserWarning, match=r"is an input of the model's decoder \(batch_key\).*decoded as 'stim'"):
        by_batch = cellvae.tl.latent_shift(model, adata, groupby="condition", **shift)
    told = r"'ctrl' and 'stim' cells of obs\['group_id'\] share no value of obs\['condition'\], an input of the model's decoder"
    with pytest.warns(UserWarning, match=told + r" .*decoded as the target cells' 'stim'"):
        by_group = cellvae.tl.latent_shift(model, adata, groupby="group_id", **shift)
    np.testing.assert_array_equal(by_group.X, by_batch.X)
    assert by_group.uns["latent_shift"]["decoded_batch"] == "stim"
    with pytest.warns(UserWarning, match=told + r" .*decoded as batch 'ctrl'"):  # the batch asked for is kept
        kept = cellvae.tl.latent_shift(model, adata, groupby="group_id", batch="ctrl", **shift)
    assert kept.uns["latent_shift"]["decoded_batch"] == "ctrl"
    with no_warnings():  # groups that share the batches: nothing to tell
        cellvae.tl.latent_shift(model, adata, groupby="cell_type", source="type0", target="type1", apply_to=controls)


def test_a_batch_of_a_numeric_column_is_found_by_its_number_as_differential_expression_finds_groups():
    """A float batch column's batches are named "1.0" and "2.0": batch=1 was refused by decode, generate and
    transform_batch, while latent_shift and differential_expression found 1 as 1.0."""
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=30, n_batches=2, random_state=0)
    adata.obs["run"] = np.where(adata.obs["batch"] == "batch0", 1.0, 2.0)
    model = CellVAE(adata, batch_key="run", n_hidden=16, n_latent=4).fit(max_epochs=1, progress=False)
    assert model.config.batch_categories == ["1.0", "2.0"]
    z = model.get_latent()[:5]
    np.testing.assert_array_equal(model.decode(z, batch=1), model.decode(z, batch="1.0"))
    np.testing.assert_array_equal(
        model.decode(z, batch=[1, 2.0, "2", 1, 1]), model.decode(z, batch=["1.0", "2.0", "2.0", "1.0", "1.0"])
    )
    generated = model.generate(4, batch=2, random_state=0)
    assert (generated.obs["run"] == 2.0).all()
    np.testing.assert_array_equal(
        model.get_normalized_expression(transform_batch=1), model.get_normalized_expression(transform_batch="1.0")
    )
    with pytest.raises(ValueError, match=r"batch='3' is not a batch of this model; its batches are \['1.0', '2.0'\]"):
        model.decode(z, batch=3)
