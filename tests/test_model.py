"""CellVAE end to end: embedding quality, batches, covariates, outputs, save/load, bad input."""

import argparse
import copy
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from dataclasses import asdict

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
import torch
from conftest import ctrl_c_at_call, knn_accuracy, no_warnings, pca_of, shared_dataset, simulated_module

import cellvae
from cellvae import CellVAE
from cellvae.config import MAX_WEIGHT, Config
from cellvae.distributions import seeded
from cellvae.module import VAE, GeneLinear
from cellvae.train import default_max_epochs, split_cells


def test_the_whole_public_api_loads_without_the_benchmark_extras():
    import subprocess
    import sys

    code = (
        "import sys, cellvae; [getattr(cellvae, name) for name in cellvae.__all__]; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in {'scvi', 'lightning', 'jax', 'scib_metrics'}))"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"


def test_star_imports_of_the_tool_modules_give_only_their_documented_functions():
    """`from cellvae.tl import *` (and tab completion in tools that read __all__) must not hand out helpers."""
    import inspect

    expected = {
        "tl": {"embed", "interpolate", "latent_shift", "rank_genes_groups", "rate_distortion_sweep", "transfer_labels"},
        "pl": {"history", "kl_per_dimension", "rate_distortion"},
        "datasets": {"pbmc68k", "simulate"},
    }
    for name, functions in expected.items():
        module = getattr(cellvae, name)
        namespace = {}
        exec(f"from cellvae.{name} import *", namespace)
        assert set(namespace) - {"__builtins__"} == functions, name
        for function in functions:
            assert inspect.getmodule(getattr(module, function)) is module and getattr(module, function).__doc__
        documented_in_module = {  # (vars, not dir: dir(module) lists __all__ alone, for tab completion)
            n for n, f in vars(module).items() if inspect.isfunction(f) and f.__module__ == module.__name__ and n[0] != "_"
        }
        assert documented_in_module == functions, name
        if name in ("tl", "pl"):
            assert dir(module) == sorted(functions)


def test_every_package_cellvae_imports_is_a_declared_dependency():
    """A module that only arrives through another package (scikit-learn and matplotlib came through scanpy) can vanish."""
    import ast
    import re
    import sys
    import tomllib
    from importlib.metadata import packages_distributions
    from pathlib import Path

    root = Path(cellvae.__file__).parent
    imported = set()
    for source in root.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"cellvae"}
    assert {"torch", "anndata", "sklearn", "matplotlib"} <= third_party

    def normalise(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pyproject = tomllib.loads((root.parent / "pyproject.toml").read_text())
    declared = {normalise(re.split(r"[<>=!~;\[ ]", requirement)[0]) for requirement in pyproject["project"]["dependencies"]}
    distributions = packages_distributions()
    undeclared = {module for module in third_party if not {normalise(d) for d in distributions[module]} & declared}
    assert not undeclared, f"imported by cellvae but not in pyproject's dependencies: {sorted(undeclared)}"


def test_a_type_checker_sees_the_public_api(tmp_path):
    """The package ships py.typed: mypy must see the real signatures (the scvi-tools-name decorator hid them, and
    the __getattr__ that names scvi-tools' methods made every misspelt attribute valid)."""
    from pathlib import Path

    script = tmp_path / "user.py"
    script.write_text(
        "import cellvae\n"
        "from cellvae import CellVAE\n"
        "model = CellVAE(cellvae.datasets.pbmc68k(), n_latent=10)\n"
        "model.fit(random_state=0, max_epoch=3)\n"
        "z = model.get_latent()\n"
        "print(z.shape)\n"
        "means, variances = model.get_latent(return_dist=True)\n"
        "print(means.shape, variances.shape)\n"
        "model.histroy\n"
        "CellVAE.setup_anndata\n"
        "reveal_type(CellVAE.load('folder'))\n"
    )
    root = Path(cellvae.__file__).resolve().parents[1]
    # --no-site-packages: torch, numpy, pandas and scanpy are read as Any (their analysis took 30 s); cellvae from MYPYPATH
    command = [sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent", "--no-incremental"]
    command += ["--no-site-packages"]
    command += ["--cache-dir", os.devnull, str(script)]
    run = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=os.environ | {"MYPYPATH": str(root)})
    found = [line.split(": ", 1)[1] for line in run.stdout.splitlines() if re.match(r"(.*/)?user\.py:\d+: ", line)]
    assert found == [
        'error: Unexpected keyword argument "max_epoch" for "fit" of "CellVAE"; did you mean "max_epochs"?  [call-arg]',
        'note: "fit" defined in "cellvae.model"',
        'error: "CellVAE" has no attribute "histroy"; maybe "history"?  [attr-defined]',
        'error: "type[CellVAE]" has no attribute "setup_anndata"  [attr-defined]',
        'note: Revealed type is "cellvae.model.CellVAE"',
    ], run.stdout + run.stderr


def test_pbmc_embedding_is_as_good_as_pca(pbmc):
    """15-NN cell-type accuracy on the embedding ≥ 0.95 × that on 10 PCs of log-normalised data."""
    adata = pbmc.copy()
    with pytest.raises(TypeError, match="key_added must be a non-empty string"):
        cellvae.tl.embed(adata, key_added=5)
    with pytest.raises(ValueError, match="key_added must not hold '/'"):  # (the .h5ad could not be read back)
        cellvae.tl.embed(adata, key_added="X_cellvae/v2")
    model = cellvae.tl.embed(adata, key_added=None, random_state=0, progress=False)  # None: the default key, as scanpy
    assert adata.obsm["X_cellvae"].shape == (700, 10) and adata.obsm["X_cellvae"].dtype == np.float32
    params = adata.uns["cellvae"]["params"]
    assert params["key_added"] == "X_cellvae"
    # what a rerun needs to give the same embedding: the epoch kept, where it trained and, on the CPU, the threads
    assert params["best_epoch"] == model.history.attrs["best_epoch"] and params["device"] == "cpu"
    assert params["torch_threads"] == torch.get_num_threads()
    labels = pbmc.obs["cell_type"].to_numpy()
    pca_accuracy = knn_accuracy(pca_of(pbmc), labels)
    ours = knn_accuracy(adata.obsm["X_cellvae"], labels)
    assert ours >= 0.95 * pca_accuracy, (ours, pca_accuracy)
    history = model.history
    for column in ("train_distortion", "train_rate", "validation_distortion", "validation_rate", "validation_elbo"):
        assert column in history and np.isfinite(history[column]).all()
    assert history["validation_elbo"].iloc[-1] > history["validation_elbo"].iloc[0]
    sc.pp.neighbors(adata, use_rep="X_cellvae")
    sc.tl.leiden(adata, flavor="igraph", n_iterations=2, directed=False)
    assert adata.obs["leiden"].nunique() > 3


@pytest.mark.slow
def test_fine_mouse_cell_types_separate_as_well_as_with_pca():
    """Haber et al.'s 15 intestinal epithelial types (real counts, 2,160 cells): 15-NN accuracy on the default
    embedding ≥ 0.95 × that on 10 PCs of log-normalised counts (both about 0.54 here: the types form a continuum)."""
    adata = shared_dataset("mouse_intestine_haber_scdesign2.h5ad")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    embedded = adata.copy()
    cellvae.tl.embed(embedded, random_state=0, progress=False)
    ours, pca_accuracy = knn_accuracy(embedded.obsm["X_cellvae"], labels), knn_accuracy(pca_of(adata), labels)
    assert ours >= 0.95 * pca_accuracy, (ours, pca_accuracy)
    assert ours > 2.5 * pd.Series(labels).value_counts(normalize=True).max()  # far above always guessing "Stem" (0.18)


def test_batches_mix_while_cell_types_stay_apart(two_batches):
    model = CellVAE(two_batches, batch_key="batch").fit(max_epochs=150, random_state=0, progress=False)
    latent = model.get_latent()
    batch_accuracy = knn_accuracy(latent, two_batches.obs["batch"].to_numpy())
    type_accuracy = knn_accuracy(latent, two_batches.obs["cell_type"].to_numpy())
    assert batch_accuracy < 0.65, batch_accuracy  # two balanced batches: chance is 0.5
    assert type_accuracy > 0.95, type_accuracy


def test_same_seed_same_result_and_save_load_roundtrip(two_batches, tmp_path):
    small = two_batches[:300].copy()
    first = CellVAE(small, batch_key="batch").fit(max_epochs=3, random_state=7, progress=False)
    second = CellVAE(small, batch_key="batch").fit(max_epochs=3, random_state=7, progress=False)
    other = CellVAE(small, batch_key="batch").fit(max_epochs=3, random_state=8, progress=False)
    np.testing.assert_array_equal(first.get_latent(), second.get_latent())
    assert not np.array_equal(first.get_latent(), other.get_latent())
    first.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "history.json", "model.safetensors"]
    loaded = CellVAE.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.get_latent(small), first.get_latent())
    positional = CellVAE.load(tmp_path / "model", small)  # scvi-tools' load(dir_path, adata)
    assert positional.adata is small
    np.testing.assert_array_equal(positional.get_latent(), first.get_latent())
    with pytest.raises(TypeError, match=r"read the file first: anndata.read_h5ad\('small.h5ad'\)"):
        CellVAE.load(tmp_path / "model", "small.h5ad")
    pd.testing.assert_frame_equal(loaded.history, first.history, check_dtype=False, check_exact=True)
    # the epoch of the kept parameters: the lowest validation loss (a later one must beat it by a 1e-4 share)
    best_loss = first.history["validation_loss"].cummin()
    improved = first.history["validation_loss"] < best_loss.shift(fill_value=np.inf) * (1 - 1e-4)
    assert first.history.attrs["best_epoch"] == first.history["epoch"][improved].iloc[-1]
    assert loaded.history.attrs["best_epoch"] == first.history.attrs["best_epoch"]
    assert loaded.history.attrs["still_improving"] is first.history.attrs["still_improving"]
    # plain pandas and dict types, which anndata can store (it picks its writer by exact type)
    assert type(first.history) is pd.DataFrame and type(first.get_likelihood_parameters(small)) is dict
    stored = ad.AnnData(
        np.zeros((2, 2)), uns={"history": first.history.tail(3), "theta": first.get_likelihood_parameters(small)["theta"][:2]}
    )
    stored.write_h5ad(tmp_path / "stored.h5ad")
    pd.testing.assert_frame_equal(ad.read_h5ad(tmp_path / "stored.h5ad").uns["history"], first.history.tail(3), check_dtype=False)
    assert loaded.is_trained
    assert repr(loaded) == "CellVAE(trained; 300 genes, n_latent=10, likelihood='nb', batch_key='batch' with 2 batches)"
    assert repr(CellVAE(small)) == "CellVAE(untrained; 300 genes, n_latent=10, likelihood='nb', no batch_key)"
    # model.config in a notebook: every field, the genes shortened (all 300 names printed before: 7.6 kB for 765 genes)
    shown = repr(loaded.config)
    assert shown.startswith(f"Config(gene_names=[{', '.join(map(repr, small.var_names[:5]))}, ... (300 in all)], layer=None")
    assert "batch_categories=['batch0', 'batch1']" in shown and "n_latent=10" in shown and len(shown) < 800
    with pytest.raises(FileExistsError, match="overwrite=True"):
        first.save(tmp_path / "model")
    CellVAE(small, batch_key="batch").save(tmp_path / "untrained")
    untrained = CellVAE.load(tmp_path / "untrained", adata=small)
    assert not untrained.is_trained
    with pytest.raises(ValueError, match="needs a trained reference"):
        untrained.map_query(small)
    np.testing.assert_array_equal(untrained.fit(max_epochs=3, random_state=7, progress=False).get_latent(), first.get_latent())


def test_save_and_load_keep_every_setting(two_batches, tmp_path):
    """A loaded model is the saved one in every setting, not only those the outputs above depend on (a
    beta lost on loading would change what further fits, mapping and refinement optimise)."""
    adata = two_batches[:200].copy()
    adata.obs["donor"] = np.where(np.arange(adata.n_obs) % 3 == 0, "d1", "d2")
    adata.obs["percent_mito"] = np.linspace(0.0, 5.0, adata.n_obs)
    settings = dict(
        batch_key="batch",
        categorical_covariate_keys=["donor"],
        continuous_covariate_keys=["percent_mito"],
        n_latent=4,
        n_hidden=24,
        n_layers=2,
        dropout=0.2,
        normalization="layer",
        likelihood="zinb",
        dispersion="gene-batch",
        beta=2.0,
        kl_warmup=3,
        free_bits=0.1,
        batch_mmd=0.5,
        encode_batch=False,
        posterior="full",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. the collapse check of so short a fit
        model = CellVAE(adata, **settings).fit(max_epochs=2, batch_size=64, lr=2e-3, random_state=4, progress=False)
    assert {key: getattr(model.config, key) for key in settings} == settings
    model.save(tmp_path / "model")
    loaded = CellVAE.load(tmp_path / "model")
    assert loaded.config == model.config
    # and how it was trained (fit's settings), which the weights alone do not tell
    assert loaded.train_settings == model.train_settings
    assert (loaded.train_settings.max_epochs, loaded.train_settings.batch_size) == (2, 64)
    assert (loaded.train_settings.lr, loaded.train_settings.random_state, loaded.train_settings.beta) == (2e-3, 4, 2.0)
    CellVAE(adata).save(tmp_path / "untrained")
    assert CellVAE.load(tmp_path / "untrained").train_settings is None
    # the same model saves to the same bytes (file checksums and `cmp` tell a changed model from a re-saved one)
    loaded.save(tmp_path / "again")
    for name in ("config.json", "model.safetensors", "history.json"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "model" / name).read_bytes(), name


def test_default_epochs_follow_the_dataset_size_and_never_exceed_scvis():
    """About 500,000 cell passes (20 to 400 epochs); at atlas scale no more epochs than scVI's default,
    which a floor of 20 epochs would exceed from 400,000 cells on (10M cells: 20 epochs instead of 1)."""
    assert default_max_epochs(7_816) == 64  # the 5-donor Kang data's training cells
    assert [default_max_epochs(n) for n in (5, 2_000, 100_000, 400_000)] == [400, 250, 20, 20]
    assert [default_max_epochs(n) for n in (500_000, 1_000_000, 3_000_000, 10_000_000)] == [16, 8, 3, 1]
    for n in (20_001, 50_000, 400_000, 750_000, 2_500_000, 30_000_000):
        scvi_epochs = max(1, round(400 * 20_000 / n))  # scvi-tools' get_max_epochs_heuristic above 20,000 cells
        assert 1 <= default_max_epochs(n) <= scvi_epochs


def test_progress_bar_counts_cells_and_epochs_and_is_silent_when_asked(two_batches, capsys):
    """Cells, not epochs, move the bar, so a single long epoch of an atlas shows progress too."""
    CellVAE(two_batches).fit(max_epochs=3, random_state=0, progress=False)
    assert capsys.readouterr().err == ""
    model = CellVAE(two_batches).fit(max_epochs=3, random_state=0, progress=True)
    bar = capsys.readouterr().err
    n_train = two_batches.n_obs - round(0.1 * two_batches.n_obs)  # the 10% validation cells are not trained on
    done = f"{3 * n_train / 1000:.2f}k"  # tqdm's unit scale: 3,240 cells read 3.24k
    assert f"{done}/{done}" in bar
    assert "cells/s" in bar and "epoch=3/3" in bar and len(model.history) == 3
    # the last epoch was the best: the bar says more epochs may help (as cellvae fit prints; Python said nothing)
    assert model.history.attrs["best_epoch"] == 2 and re.search(
        r"epoch=3/3, loss=[\d.]+, best=the last: more epochs may help", bar
    )
    assert model.history.attrs["still_improving"]
    stopped = CellVAE(two_batches, kl_warmup=0).fit(max_epochs=200, patience=1, random_state=0, progress=True)
    assert "more epochs may help" not in capsys.readouterr().err and not stopped.history.attrs["still_improving"]


def test_a_last_epoch_lower_by_less_than_counts_as_a_new_best_is_still_improving():
    """The atlas's 30 epochs (seed 0) kept epoch 28: epoch 29's validation loss was lower by 0.104 nats, under the 1e-4
    of the best (0.12) an epoch must gain to count, so neither the bar nor `cellvae fit` said more epochs may help."""
    from cellvae.train import _ran_out_improving

    rows = [{"epoch": e, "validation_loss": v} for e, v in enumerate([1205.0, 1199.29, 1198.74, 1198.25, 1198.14])]
    assert _ran_out_improving(rows, best_epoch=3, has_validation=True)
    assert _ran_out_improving(rows, best_epoch=4, has_validation=True)
    rows[-1]["validation_loss"] = 1198.3  # the last above the lowest: no longer improving
    assert not _ran_out_improving(rows, best_epoch=3, has_validation=True)
    assert not _ran_out_improving(rows[:1], best_epoch=0, has_validation=True)  # one epoch is no trend
    assert not _ran_out_improving(rows, best_epoch=3, has_validation=False)  # training losses: the best epoch decides


def test_bars_after_training_count_cells_in_thousands_and_comparisons_in_whole_numbers():
    """An audit: differential expression's bar read '3.00/7.00 comparisons'."""
    from cellvae.train import progress_bar

    with progress_bar(7, "differential_expression", True, unit=" comparisons") as bar:
        bar.update(3)
        assert " 3/7 " in str(bar)
    with progress_bar(150_000, "generate", True) as bar:
        bar.update(30_000)
        assert " 30.0k/150k " in str(bar)


def test_the_empty_cells_warning_counts_one_cell_in_the_singular_and_names_a_querys_data_as_map_query_does():
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, n_batches=2, random_state=0)
    counts = adata.X.toarray()
    counts[np.flatnonzero(adata.obs["batch"] == "batch1")[0]] = 0  # a query cell
    adata.X = sp.csr_matrix(counts)
    reference, query = (adata[adata.obs["batch"] == b].copy() for b in ("batch0", "batch1"))
    model = CellVAE(reference, batch_key="batch", n_hidden=16).fit(max_epochs=1, progress=False)
    told = r"^1 cell has zero total counts and is left out of training; drop it with sc.pp.filter_cells\(query_adata,"
    with pytest.warns(UserWarning, match=told):
        query_model = model.map_query(query, max_epochs=1, progress=False)
    with pytest.warns(UserWarning, match=told):  # its further fit names the query's data as map_query did
        query_model.fit(max_epochs=1, progress=False)

    """An audit: 'epoch=111/111 ... best=epoch 109' counted epochs from 1 and the best from 0 in one line."""
    from cellvae.train import _more_epochs_note

    rows = [{"epoch": e, "validation_loss": v} for e, v in enumerate([1205.0, 1199.29, 1198.25, 1198.14])]
    assert _more_epochs_note(rows, 2, 4, has_validation=True) == {
        "epoch": "4/4",
        "loss": "1198.1",
        "best": "epoch 3 (model.history's 2), the last lower by under 1e-4: more epochs may help",
    }
    assert _more_epochs_note(rows, 3, 4, has_validation=True)["best"] == "the last: more epochs may help"


def test_jupyters_bar_of_training_stopped_early_ends_full(two_batches, monkeypatch):
    """tqdm.notebook (which tqdm.auto picks in Jupyter) draws against its widget's maximum: a run stopped early
    ended "100%" with the widget a fraction full."""
    from tqdm.notebook import tqdm as notebook_tqdm

    bars = []

    class Recorded(notebook_tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(cellvae.train, "tqdm", Recorded)
    model = CellVAE(two_batches, kl_warmup=0).fit(max_epochs=200, patience=1, random_state=0, progress=True)
    assert len(model.history) < 200  # stopped early
    widget = bars[0].container.children[1]
    assert bars[0].n == bars[0].total == widget.max == widget.value > 0
    assert widget.bar_style == "success"
    # stopped by Ctrl-C, the model kept: full and green too, not red as a failure
    with monkeypatch.context() as patched, pytest.warns(RuntimeWarning, match="training interrupted"):
        ctrl_c_at_call(cellvae.train.AgreedInterrupt, "check", 3, patched)
        CellVAE(two_batches).fit(max_epochs=50, random_state=0, progress=True)
    assert bars[-1].container.children[1].bar_style == "success" and "Ctrl-C" in bars[-1].postfix
    # the later calls' bars, shown after 2 s, make no widgets (tqdm.notebook's, made at once, were left behind)
    import ipywidgets

    made = len(ipywidgets.Widget.widgets)
    for _ in range(3):
        model.get_latent(progress=True)
    assert len(ipywidgets.Widget.widgets) == made


def test_tqdm_disable_environment_variable_silences_every_bar(tmp_path):
    """TQDM_DISABLE=1, tqdm's own switch for pipelines and CI logs (read when tqdm is imported), silences training's
    bar and the later calls' bars; without it they show."""
    script = (
        "import cellvae, cellvae.train\n"
        "cellvae.train.PROGRESS_DELAY_S = 0.0  # a bar from the first moment, as for an atlas\n"
        "adata = cellvae.datasets.simulate(n_cells=300, n_genes=50, n_batches=2, random_state=1)\n"
        "model = cellvae.CellVAE(adata).fit(max_epochs=2, random_state=0, progress=True)\n"
        "model.get_latent(progress=True)\n"
        "model.differential_expression(groupby='cell_type', n_draws=100, progress=True)\n"
    )
    # Jupyter's bar (tqdm.notebook, which tqdm.auto picks there) passes disable=False on, which overrode the variable
    as_in_jupyter = (
        "import tqdm.std\n"
        "class Notebook(tqdm.std.tqdm):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        kwargs['disable'] = bool(kwargs.get('disable', False))\n"
        "        super().__init__(*args, **kwargs)\n"
        "cellvae.train.tqdm = Notebook\n"
    )
    in_jupyter = script.replace("cellvae.train.PROGRESS_DELAY_S", as_in_jupyter + "cellvae.train.PROGRESS_DELAY_S", 1)
    # silenced: tqdm's own bar, then (in the same process) Jupyter's; shown: Jupyter's without the variable
    for disable, shown, code in (("1", False, script + in_jupyter), (None, True, in_jupyter)):
        env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"} | ({"TQDM_DISABLE": disable} if disable else {})
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        bars = [name for name in ("cellvae", "get_latent", "differential_expression") if re.search(rf"{name}: +\d+%", run.stderr)]
        assert bars == (["cellvae", "get_latent", "differential_expression"] if shown else []), run.stderr


def test_bfloat16_training_is_reproducible_and_as_good_as_float32(two_batches):
    """precision="bfloat16" changes the training arithmetic, not the result's quality or the float32 outputs."""
    adata = two_batches[:600].copy()

    def fit(precision, seed=3):
        return CellVAE(adata, batch_key="batch").fit(max_epochs=25, random_state=seed, progress=False, precision=precision)

    full, half, again = fit("float32"), fit("bfloat16"), fit("bfloat16")
    np.testing.assert_array_equal(half.get_latent(), again.get_latent())
    assert not np.array_equal(half.get_latent(), full.get_latent())  # the bfloat16 multiplies did run
    assert half.get_latent().dtype == np.float32
    assert all(getattr(m, "compute_dtype", None) is None for m in half.module.modules())  # evaluation is float32 again
    full_elbo, half_elbo = full.history["validation_elbo"].iloc[-1], half.history["validation_elbo"].iloc[-1]
    assert abs(half_elbo - full_elbo) < 0.01 * abs(full_elbo), (half_elbo, full_elbo)
    labels = adata.obs["cell_type"].to_numpy()
    assert knn_accuracy(half.get_latent(), labels) >= knn_accuracy(full.get_latent(), labels) - 0.03
    with pytest.raises(ValueError, match="precision must be one of"):
        CellVAE(adata).fit(max_epochs=1, precision="float16")


def test_batch_normalization_learns_statistics_survives_a_one_cell_minibatch_and_saves_them(two_batches, tmp_path):
    cells = two_batches[:129].copy()  # no validation split: minibatches of 128 cells and of 1 cell
    model = CellVAE(cells, batch_key="batch", normalization="batch")
    model.fit(max_epochs=4, validation_size=0.0, random_state=2, progress=False)
    assert len(model.history) == 4 and np.isfinite(model.history["train_elbo"]).all()
    statistics = model.module.encoder.body.norms[0].running_mean
    assert statistics.abs().sum() > 0  # running statistics were learned, and are used from now on
    latent = model.get_latent()
    # a cell's code does not depend on the other cells it is encoded with (up to float rounding)
    np.testing.assert_allclose(latent[:5], model.get_latent(cells[:5]), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "model")
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "model").get_latent(cells), latent)
    with pytest.raises(ValueError, match="batch_size >= 2"):
        model.fit(batch_size=1)
    with pytest.raises(ValueError, match=r"validation_size=0.9 leaves 1 of 12 cells to train on; lower validation_size"):
        CellVAE(cells[:12].copy(), normalization="batch").fit(max_epochs=1, validation_size=0.9, progress=False)
    layer_norm = CellVAE(cells, batch_key="batch").fit(max_epochs=4, validation_size=0.0, random_state=2, progress=False)
    assert not np.allclose(layer_norm.get_latent(), latent)


@pytest.mark.parametrize(
    "options",
    [
        {"likelihood": "zinb"},
        {"likelihood": "poisson"},
        {"dispersion": "gene-batch", "batch_key": "batch"},
        {"dispersion": "gene-cell"},
        {"n_layers": 2, "encode_batch": False, "batch_key": "batch"},
        {"posterior": "full"},
        {"normalization": "batch", "batch_key": "batch"},
    ],
)
def test_model_variants_train_and_decode(two_batches, options):
    adata = two_batches[:300].copy()
    model = CellVAE(adata, n_latent=4, **options).fit(max_epochs=3, random_state=0, progress=False)
    assert np.isfinite(model.history["validation_elbo"]).all()
    params = model.get_likelihood_parameters()
    assert params["mean"].shape == adata.shape and (params["mean"] >= 0).all()
    assert ("zero_inflation" in params) == (options.get("likelihood") == "zinb")
    assert ("theta" in params) == (options.get("likelihood") != "poisson")
    if "zero_inflation" in params:  # the mean is the NB's at the cell's library size, less the zero-inflated share
        nb_mean = model.get_normalized_expression(library_size=1.0) * np.asarray(adata.X.sum(1))
        np.testing.assert_allclose(params["mean"], (1 - params["zero_inflation"]) * nb_mean, rtol=1e-3, atol=1e-5)
    if options.get("likelihood") == "poisson":  # posterior-predictive draws: z from q(z|x), so more than Poisson noise
        draws = model.sample_counts(adata[:40], n_samples=400, random_state=0)
        assert draws.var(0, ddof=1).sum() / draws.mean(0).sum() > 1.2
    if "theta" in params:
        theta = params["theta"]
        assert theta.shape == adata.shape and theta.dtype == np.float32 and (theta > 0).all()
        # one dispersion per gene: the same row for every cell, as a read-only view of it (no cells × genes copy)
        shared = options.get("dispersion", "gene") == "gene"
        assert (theta.strides[0] == 0) == shared and theta.flags.writeable != shared
        assert np.array_equal(theta, np.broadcast_to(theta[0], theta.shape)) == shared
    # every likelihood's denoised expression (zinb: without the zero-inflation) sums to the library size
    np.testing.assert_allclose(model.get_normalized_expression(library_size=1e4).sum(1), 1e4, rtol=1e-3)
    np.testing.assert_allclose(  # scaled to the library_size asked for (scvi-tools' scale: 1)
        model.get_normalized_expression(library_size=1.0), model.get_normalized_expression(library_size=1e4) / 1e4, rtol=1e-4
    )
    np.testing.assert_allclose(model.decode(model.get_latent()[:5], library_size=500.0).sum(1), 500.0, rtol=1e-3)
    if options.get("encode_batch") is False:  # the encoder reads no batch: relabelled cells embed alike
        relabelled = adata.copy()
        relabelled.obs["batch"] = relabelled.obs["batch"].cat.rename_categories(lambda name: f"x{name}")
        relabelled.obs["batch"] = relabelled.obs["batch"].cat.rename_categories(
            dict(zip(relabelled.obs["batch"].cat.categories, reversed(adata.obs["batch"].cat.categories)))
        )
        np.testing.assert_array_equal(model.get_latent(relabelled), model.get_latent())


def test_weight_decay_shrinks_the_weights():
    """A test audit: fit ignoring weight_decay passed every test (they check it is validated, recorded, saved)."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, random_state=0)
    norms = []
    for weight_decay in (0.0, 20.0):  # (AdamW decays by lr × weight_decay a step: 2% at lr 1e-3)
        model = CellVAE(adata, n_hidden=16, n_latent=4)
        model.fit(max_epochs=5, weight_decay=weight_decay, random_state=0, progress=False)
        norms.append(sum(float((w**2).sum()) for name, w in model.module.named_parameters() if name.endswith("weight")))
    assert norms[1] < 0.8 * norms[0], norms


def test_outputs_on_new_data_with_reordered_genes(two_batches):
    adata = two_batches[:300].copy()
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=3, random_state=0, progress=False)
    shuffled = adata[:, np.random.default_rng(0).permutation(adata.n_vars)].copy()
    np.testing.assert_allclose(model.get_latent(shuffled), model.get_latent(adata), rtol=1e-5, atol=1e-6)
    expression = model.get_normalized_expression(library_size=1e4)
    assert expression.shape == adata.shape
    np.testing.assert_allclose(expression.sum(1), 1e4, rtol=1e-3)
    corrected = model.get_normalized_expression(transform_batch="batch0")
    assert corrected.shape == adata.shape and not np.allclose(corrected, expression)
    own_and_batch0 = model.get_normalized_expression(transform_batch=["batch0", None])  # None: own batch, as scvi
    np.testing.assert_allclose(own_and_batch0, (corrected + expression) / 2, rtol=1e-5)
    chosen = list(adata.var_names[[7, 2, 40]])
    np.testing.assert_allclose(model.get_normalized_expression(gene_list=chosen), expression[:, [7, 2, 40]], rtol=1e-6)
    with pytest.raises(ValueError, match="does not have"):
        model.get_normalized_expression(gene_list=["no_such_gene"])
    numbered = adata.copy()
    numbered.var_names = [str(i) for i in range(numbered.n_vars)]
    numbered_model = CellVAE(numbered, n_hidden=8)
    with pytest.raises(TypeError, match=r"gene names are numbers as text: pass them so, e.g. gene_list=\['7', '2'\]"):
        numbered_model.get_normalized_expression(gene_list=[7, 2])
    np.testing.assert_array_equal(
        numbered_model.get_normalized_expression(gene_list=["7", "2"]), numbered_model.get_normalized_expression()[:, [7, 2]]
    )
    # per-gene outputs of data holding the model's genes in another order follow its var_names
    order = adata.var_names.get_indexer(shuffled.var_names)
    np.testing.assert_allclose(model.get_normalized_expression(shuffled), expression[:, order], rtol=1e-5)
    parameters, reordered = model.get_likelihood_parameters(), model.get_likelihood_parameters(shuffled)
    np.testing.assert_allclose(reordered["mean"], parameters["mean"][:, order], rtol=1e-5)
    # genes the model lacks (deep ones here) count in no cell's library size: the means are the model's (in its order)
    extra = ad.AnnData(np.full((adata.n_obs, 20), 50.0, np.float32), obs=adata.obs)
    extra.var_names = [f"extra{i}" for i in range(20)]
    wider = ad.concat([shuffled, extra], axis=1, merge="first")
    np.testing.assert_allclose(model.get_likelihood_parameters(wider)["mean"], parameters["mean"], rtol=1e-5)
    np.testing.assert_array_equal(reordered["theta"], parameters["theta"][:, order])
    np.testing.assert_array_equal(model.sample_counts(shuffled, random_state=1), model.sample_counts(random_state=1)[:, order])
    # as many genes but one renamed: the columns stay the model's (genes matched by name), and a warning says so
    renamed = shuffled.copy()
    renamed.var_names = ["renamed", *renamed.var_names[1:]]
    for output in (model.get_normalized_expression, model.get_likelihood_parameters, model.sample_counts):
        with pytest.warns(UserWarning, match=r"not the same ones \(1 of the model's are not in it.*not adata.var_names"):
            output(renamed)
    draws = model.sample_counts(n_samples=2, random_state=0)
    assert draws.shape == (2, *adata.shape) and np.array_equal(draws, np.round(draws))
    np.testing.assert_array_equal(draws, model.sample_counts(n_samples=2, random_state=0))
    listed = model.sample_counts(n_samples=2, gene_list=chosen, random_state=0)  # only these genes are drawn
    assert listed.shape == (2, adata.n_obs, 3) and np.array_equal(listed, np.round(listed))
    np.testing.assert_array_equal(listed, model.sample_counts(n_samples=2, gene_list=chosen, random_state=0))
    # A draw's expected total is the library size, whatever z was drawn (limits: 4 standard errors of the draws) ...
    totals = model.sample_counts(n_samples=20, random_state=0).sum(axis=(1, 2))
    assert abs(totals.mean() - adata.X.sum()) < 4 * totals.std(ddof=1) / np.sqrt(20), (totals.mean(), adata.X.sum())
    # ... and the listed genes' draws are distributed as their draws among all genes.
    listed = model.sample_counts(n_samples=200, gene_list=chosen, random_state=0).sum(axis=1)
    among_all = model.sample_counts(n_samples=50, random_state=1)[:, :, [7, 2, 40]].sum(axis=1)
    standard_error = np.sqrt(listed.var(0, ddof=1) / 200 + among_all.var(0, ddof=1) / 50)
    assert (np.abs(listed.mean(0) - among_all.mean(0)) < 4 * standard_error).all(), (listed.mean(0), among_all.mean(0))
    sampled_latent = model.get_latent(mean=False)
    assert not np.allclose(sampled_latent, model.get_latent())


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_return_dist_gives_the_posterior_means_and_the_variances_of_its_draws(two_batches, posterior):
    """scvi-tools' return_dist=True: q(z|x)'s means and variances, the variances those of get_latent's draws."""
    cells = two_batches[:60].copy()
    model = CellVAE(cells, batch_key="batch", n_latent=4, posterior=posterior).fit(max_epochs=20, progress=False)
    means, variances = model.get_latent(return_dist=True, mean=False)
    np.testing.assert_array_equal(means, model.get_latent())
    assert variances.shape == means.shape and variances.dtype == np.float32 and (variances > 0).all()
    draws = np.stack([model.get_latent(mean=False, random_state=seed) for seed in range(400)])
    np.testing.assert_allclose(draws.mean(0), means, atol=4 * np.sqrt(variances.max() / 400))
    # a sample variance of 400 normal draws has a relative standard error of sqrt(2 / 399) = 7%
    np.testing.assert_allclose(draws.var(0, ddof=1), variances, rtol=0.3)
    assert abs(np.mean(draws.var(0, ddof=1) / variances) - 1) < 0.02
    with pytest.raises(ValueError, match="return_dist gives the encoder's posterior"):
        model.get_latent(return_dist=True, refine_steps=3)


def test_to_device_chooses_where_outputs_run_and_refuses_a_missing_device(two_batches):
    model = CellVAE(two_batches[:100].copy(), batch_key="batch").fit(max_epochs=2, progress=False)
    latent = model.get_latent()
    assert model.to_device("cpu") is model and model.device == torch.device("cpu")
    assert model.to_device(torch.device("cpu")).device.type == "cpu"
    np.testing.assert_array_equal(model.get_latent(), latent)
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"):
        model.to_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' was asked for but torch finds no CUDA GPU"):
            model.to_device("cuda")
        with pytest.raises(ValueError, match="device='cuda:5' was asked for but torch finds no CUDA GPU"):
            model.to_device("cuda:5")
        assert model.to_device("auto").device.type in ("cpu", "mps")
    assert next(model.module.parameters()).device == model.device


def test_the_batch_discrepancy_of_a_small_minibatch_needs_no_cdist_backward_kernel():
    """batch_mmd's distances use matrix multiplies at every minibatch size: for 25 cells or fewer torch's cdist
    otherwise runs a kernel of its own, whose backward MPS lacks (a small last minibatch failed there)."""
    from cellvae.module import batch_discrepancy

    z = torch.randn(14, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss = batch_discrepancy(z, torch.arange(14) % 2, 2)
    nodes, seen = [loss.grad_fn], {}
    while nodes:
        node = nodes.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node.name()
            nodes += [next_node for next_node, _ in node.next_functions]
    assert "CdistBackward0" not in seen.values() and "EuclideanDistBackward0" in seen.values()
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_a_macs_mps_device_is_taken_as_torch_prints_it_and_refused_for_data_parallel_training(monkeypatch):
    """torch prints a Mac's tensors' device as "mps:0", which names its one GPU; gloo's process groups cannot
    reduce mps tensors, so data-parallel training there is refused before any work, with the way out."""
    from cellvae.train import pick_device, setup_distributed

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("mps:0") == pick_device(torch.device("mps", 0)) == torch.device("mps")
    monkeypatch.setattr(cellvae.train.dist, "is_initialized", lambda: True)  # a caller's group of one process: no DDP
    monkeypatch.setattr(cellvae.train.dist, "get_world_size", lambda: 1)
    assert setup_distributed(torch.device("mps")) == torch.device("mps")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(ValueError, match=r"cannot reduce tensors on an Apple GPU \(mps\): pass device='cpu' \(--device cpu\)"):
        setup_distributed(torch.device("mps"))


def test_cuda_device_numbers_are_checked_and_a_process_group_keeps_the_gpu_its_caller_chose(monkeypatch):
    """pick_device refuses GPUs torch does not find and malformed numbers with its own error (not torch's, later);
    setup_distributed takes torchrun's LOCAL_RANK, else the GPU a caller-made group chose (mp.spawn, srun), not cuda:0."""
    from cellvae.train import pick_device, setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device='cuda:5' was asked for but torch finds 2 CUDA GPU\(s\), cuda:0 to cuda:1"):
        pick_device("cuda:5")
    for malformed in ("cuda:x", "cuda:", "cuda:-1", "cuda:01"):
        with pytest.raises(ValueError, match="device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"):
            pick_device(malformed)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # the caller's torch.cuda.set_device(1)
    monkeypatch.setattr(cellvae.train.dist, "is_initialized", lambda: True)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert setup_distributed(torch.device("cuda")) == torch.device("cuda", 1)
    assert setup_distributed(torch.device("cuda", 0)) == torch.device("cuda", 0)  # named: kept
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert setup_distributed(torch.device("cuda")) == torch.device("cuda", 1)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 1)]


def _in_float64_branch() -> bool:
    """Whether the caller is log_likelihood_draws, whose float64 sums run only off MPS (a simulated tensor's device is
    the CPU, so it takes that branch)."""
    frame = sys._getframe(2)
    for _ in range(8):
        if frame is None or frame.f_code.co_name == "log_likelihood_draws":
            return frame is not None
        frame = frame.f_back
    return False


class _AsOnMPS(torch.Tensor):
    """A CPU tensor that fails as an MPS one does: no float64, no numpy() (and no Poisson sampler)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cpu:
            return args[0].as_subclass(torch.Tensor).clone()
        if func is torch.Tensor.numpy:
            raise TypeError("can't convert mps:0 device type tensor to numpy. Use Tensor.cpu() first")
        if func is torch.poisson:
            raise NotImplementedError("The operator 'aten::poisson' is not currently implemented for the MPS device")
        out = super().__torch_function__(func, types, args, kwargs or {})
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, _AsOnMPS) and tensor.dtype == torch.float64 and not _in_float64_branch():
                raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")
        return out


def test_outputs_take_float64_and_draw_counts_only_on_the_cpu_as_mps_needs(two_batches, monkeypatch):
    """MPS has no float64 and no Poisson or gamma sampler: the summaries convert after moving to the CPU (the
    collapse check after fit, kl_per_dimension, marginal_log_likelihood, inference_gaps, refined latents with free
    bits, the observed means of differential_expression had failed), and counts are drawn from CPU copies."""
    adata = two_batches[:200].copy()
    model = CellVAE(adata, n_hidden=16, n_latent=4, free_bits=0.2).fit(max_epochs=2, progress=False)
    minibatch = cellvae.data.CellLoader._minibatch

    def as_on_mps(self, block, cells, with_sparse):  # (the loader gives MPS no sparse counts)
        mb = minibatch(self, block, cells, False)
        on = [t.as_subclass(_AsOnMPS) for t in (mb.counts, mb.covariates, mb.library, mb.batch_index)]
        return cellvae.data.Minibatch(*on, mb.cell_index, None)

    monkeypatch.setattr(cellvae.data.CellLoader, "_minibatch", as_on_mps)
    model.kl_per_dimension(progress=False)

    def failing_check(*args, **kwargs):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    with monkeypatch.context() as failing:  # a check after training that fails (a device's quirk, its memory) only warns
        failing.setattr(cellvae.diagnostics, "posterior_statistics", failing_check)
        with pytest.warns(RuntimeWarning, match=r"the posterior-collapse check after training failed \(TypeError"):
            reference = CellVAE(adata, batch_key="batch", n_hidden=16, n_latent=4).fit(max_epochs=1, progress=False)
        query = adata.copy()
        query.obs["batch"] = "new " + query.obs["batch"].astype(str)
        with pytest.warns(RuntimeWarning, match=r"the posterior-collapse check after training failed \(TypeError"):
            assert reference.map_query(query, max_epochs=1, lr=3e-3, progress=False).is_trained  # (checked above 1e-3)
    model._warn_if_collapsed(model._loader(adata, model.device)[0], np.arange(adata.n_obs), 128, 0, 1e-3)  # after fit
    model.marginal_log_likelihood(n_samples=3, progress=False)
    model.inference_gaps(adata[:4], n_steps=2, n_samples=3, n_elbo_samples=2, progress=False)
    model.get_latent(refine_steps=2, progress=False)
    model.differential_expression(groupby="cell_type", group1="type0", n_draws=100, progress=False)
    for dist in (
        cellvae.distributions.NegativeBinomial(torch.zeros(3, 5).as_subclass(_AsOnMPS), torch.ones(5).as_subclass(_AsOnMPS)),
        cellvae.distributions.Poisson(torch.zeros(3, 5).as_subclass(_AsOnMPS)),
    ):
        with pytest.raises(NotImplementedError, match="poisson"):
            dist.sample(torch.Generator().manual_seed(0))
        placed, generator = cellvae.distributions.count_sampler(torch.device("mps"), 0, None)  # as sample_counts, generate
        assert generator.device.type == "cpu" and placed(dist).sample(generator).shape == (3, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_outputs_run_where_to_device_puts_the_model_and_fit_leaves_it_there(two_batches, tmp_path):
    cells = two_batches[:300].copy()
    model = CellVAE(cells, batch_key="batch").fit(max_epochs=3, progress=False)
    on_cpu = model.get_latent(), model.get_normalized_expression(), model.marginal_log_likelihood(n_samples=10)
    model.to_device("cuda")
    assert next(model.module.parameters()).is_cuda
    on_gpu = model.get_latent(), model.get_normalized_expression(), model.marginal_log_likelihood(n_samples=10)
    np.testing.assert_allclose(on_gpu[0], on_cpu[0], atol=1e-4)
    np.testing.assert_allclose(on_gpu[1], on_cpu[1], rtol=1e-3, atol=1e-3)
    assert np.abs(on_gpu[2] - on_cpu[2]).mean() < 0.05 * np.abs(on_cpu[2]).mean()  # other importance draws
    assert (model.differential_expression(groupby="cell_type", group1="type0")["group1"] == "type0").all()
    model.fit(max_epochs=1, device="cpu", progress=False)  # trains on the CPU, gives the model back on the GPU
    assert model.device.type == "cuda" and next(model.module.parameters()).is_cuda
    model.save(tmp_path / "model")
    loaded = CellVAE.load(tmp_path / "model", adata=cells)
    assert loaded.device.type == "cpu"
    np.testing.assert_allclose(loaded.get_latent(), model.get_latent(), atol=1e-4)
    query = cells[cells.obs["batch"] == cells.obs["batch"].cat.categories[-1]].copy()
    query.obs["batch"] = "new"
    query_model = model.map_query(query, max_epochs=2, device="cpu", progress=False)  # grafted on the GPU
    assert query_model.device.type == "cuda" and next(query_model.module.parameters()).is_cuda
    on_cpu_map = loaded.map_query(query, max_epochs=2, device="cpu", progress=False)
    np.testing.assert_allclose(query_model.get_latent(), on_cpu_map.get_latent(), atol=1e-3)


def test_integer_gene_ids_left_by_an_in_place_pandas_edit_are_the_same_genes(two_batches, tmp_path):
    """`adata.var.set_index("entrez", inplace=True)` leaves integer var_names (anndata's setters would make
    text); the model names genes as text, and finds them in that AnnData, a query and a loaded model's."""
    adata = two_batches[:200].copy()
    expected = CellVAE(adata, batch_key="batch").fit(max_epochs=2, random_state=0, progress=False)
    entrez = adata.copy()
    entrez.var.index = pd.Index(np.arange(1000, 1000 + adata.n_vars))
    model = CellVAE(entrez, batch_key="batch").fit(max_epochs=2, random_state=0, progress=False)
    assert model.config.gene_names[:2] == ["1000", "1001"]
    np.testing.assert_array_equal(model.get_latent(), expected.get_latent())
    np.testing.assert_array_equal(model.get_normalized_expression(), expected.get_normalized_expression())
    model.save(tmp_path / "model")
    np.testing.assert_array_equal(CellVAE.load(tmp_path / "model", adata=entrez).get_latent(), expected.get_latent())
    query = adata.copy()
    query.obs["batch"] = "new"
    query.var.index = entrez.var_names
    mapped = model.map_query(query, max_epochs=1, progress=False)
    assert mapped.get_latent().shape == (adata.n_obs, model.config.n_latent)


def test_new_data_with_repeated_gene_names_or_counts_in_another_place(two_batches):
    adata = two_batches[:300].copy()
    adata.layers["counts"] = adata.X.copy()
    model = CellVAE(adata, layer="counts", batch_key="batch").fit(max_epochs=2, random_state=0, progress=False)
    # Genes the model does not use may repeat (raw 10x files often repeat symbols); its own genes may not.
    extra = sp.csr_matrix(np.ones((adata.n_obs, 2), dtype=np.float32))
    wider = ad.AnnData(obs=adata.obs, var=pd.DataFrame(index=[*adata.var_names, "MT-X", "MT-X"]))
    wider.layers["counts"] = sp.hstack([adata.layers["counts"], extra]).tocsr()
    np.testing.assert_allclose(model.get_latent(wider), model.get_latent(adata), rtol=1e-5, atol=1e-6)
    repeated = wider.copy()
    repeated.var_names = [*adata.var_names, adata.var_names[0], "MT-X"]
    with pytest.raises(ValueError, match=r"repeat genes of the model \(e.g. \['gene0'\]\)"):
        model.get_latent(repeated)
    repeated.obs["batch"] = "new"
    with pytest.raises(ValueError, match=r"query_adata.var_names repeat genes of the model.*query_adata.var_names_make_unique"):
        model.map_query(repeated)
    # New data with its counts in X: the error names the layer the model reads and how to fill it.
    plain = ad.AnnData(adata.layers["counts"].copy(), obs=adata.obs.copy(), var=adata.var.copy())
    with pytest.raises(KeyError, match=r"reads counts from layers\['counts'\].*\(layers: \[\]\).*layers\['counts'\] = adata.X"):
        model.get_latent(plain)
    query = plain.copy()  # and the same for a query to map
    query.obs["batch"] = "new"
    with pytest.raises(KeyError, match=r"which query_adata lacks.*adata.layers\['counts'\] = adata.X"):
        model.map_query(query)
    renamed = plain.copy()  # log-normalised X, the counts in a layer of another name: that layer is named (one
    renamed.layers["ambiguous"] = renamed.X.copy()  # named like counts first)
    renamed.layers["raw"] = renamed.X.copy()
    sc.pp.normalize_total(renamed)
    sc.pp.log1p(renamed)
    with pytest.raises(KeyError, match=r"adata.layers\['raw'\] looks like counts: add them, adata.layers\['counts'\] = adata.l"):
        model.get_latent(renamed)
    plain.layers["counts"] = plain.X
    np.testing.assert_array_equal(model.get_latent(plain), model.get_latent(adata))


def test_counts_normalised_to_one_total_and_rounded_are_told_when_trained_on(two_batches):
    """The rounding advice followed on normalize_total's output gave whole numbers that passed every check: each cell's
    total the same, so the library sizes and the counting noise meant nothing, without a word."""
    adata = two_batches[:300].copy()
    normalised = adata.copy()
    sc.pp.normalize_total(normalised)
    normalised.layers["counts"] = np.rint(normalised.X)
    with pytest.warns(UserWarning, match=r"total counts in adata.layers\['counts'\] barely vary .* look normalised to one total"):
        CellVAE(normalised, batch_key="batch", layer="counts").fit(max_epochs=1, progress=False)
    some_genes = normalised[:, : normalised.n_vars // 3]  # (the README's route to highly variable genes: their totals vary)
    with pytest.warns(UserWarning, match=r"total counts in adata.layers\['counts'\] barely vary"):
        CellVAE(some_genes, batch_key="batch", layer="counts").fit(max_epochs=1, progress=False)
    with no_warnings():  # the raw counts' genes alike: nothing to tell
        CellVAE(adata[:, : adata.n_vars // 3], batch_key="batch").fit(max_epochs=1, progress=False)
    with no_warnings():  # the raw counts: their totals vary
        CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (one batch: nothing to correct for yet)
        reference = CellVAE(adata[adata.obs["batch"] == "batch0"].copy(), batch_key="batch", n_hidden=16)
        reference.fit(max_epochs=1, progress=False)
    query = normalised[normalised.obs["batch"] == "batch1"].copy()
    query.X = query.layers["counts"]
    with pytest.warns(UserWarning, match=r"total counts in query_adata.X barely vary"):
        reference.map_query(query, max_epochs=1, progress=False)


def test_counts_kept_on_disk_are_never_said_to_be_missing(two_batches, tmp_path):
    """Layers and raw of a backed, lazy or Zarr AnnData are not read for advice: the note that no layer nor raw holds
    counts (read them again from their source) was given for scanpy's usual file, counts in raw, read from disk."""
    adata = two_batches[:200].copy()
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    normalised = adata.copy()
    sc.pp.normalize_total(normalised)
    sc.pp.log1p(normalised)
    in_raw = normalised.copy()
    in_raw.raw = adata
    in_layer = normalised.copy()
    in_layer.layers["counts"] = adata.X.copy()
    for name, kept in (("raw", in_raw), ("layer", in_layer)):
        kept.write_h5ad(tmp_path / f"{name}.h5ad")
        kept.write_zarr(tmp_path / f"{name}.zarr")
        readers = {
            "backed": lambda path: ad.read_h5ad(path, backed="r"),
            "lazy": cellvae.read_h5ad_lazy,
            "zarr": lambda path: cellvae.read_zarr_lazy(path.with_suffix(".zarr")),
        }
        for kind, read in readers.items():
            with pytest.raises(ValueError, match="looks normalised") as told:
                model.get_latent(read(tmp_path / f"{name}.h5ad"))
            assert "Here neither" not in str(told.value), (name, kind)
    with pytest.raises(ValueError, match=r"adata\.raw\.X holds whole counts"):  # in memory it is read, and named
        model.get_latent(ad.read_h5ad(tmp_path / "raw.h5ad"))


def test_variable_genes_whose_counts_stayed_in_raw_and_flags_for_numbered_batches_get_the_right_advice(two_batches):
    """A trained model given scanpy's variable genes (log-normalised, all genes' counts in raw) was told to check
    gene identifiers; a True/False batch column was told .astype(int) where the model's batches are 1 and 2."""
    adata = two_batches[:200].copy()
    adata.obs["run"] = np.where(adata.obs["batch"] == adata.obs["batch"].iloc[0], 1, 2)
    model = CellVAE(adata, batch_key="run").fit(max_epochs=1, progress=False)
    variable = adata.copy()
    variable.raw = variable.copy()
    sc.pp.normalize_total(variable)
    sc.pp.log1p(variable)
    variable = variable[:, : adata.n_vars // 2].copy()
    with pytest.raises(ValueError, match=r"adata\.raw holds the model's genes.*give the model adata\.raw\.to_adata\(\)"):
        model.get_latent(variable)
    np.testing.assert_array_equal(model.get_latent(variable.raw.to_adata()), model.get_latent(adata))  # as advised
    flagged = adata.copy()
    flagged.obs["run"] = flagged.obs["run"] == 1
    with pytest.raises(ValueError, match="categories unseen in training") as told:
        model.get_latent(flagged)
    assert "astype(int)" not in str(told.value)  # (0/1 are not the model's 1/2)


def test_an_error_about_normalised_counts_names_the_layer_or_raw_that_holds_the_counts(two_batches):
    """scanpy's workflow keeps the counts in layers['counts'] or adata.raw before normalize_total and log1p:
    the error points there, and its advice works."""
    adata = two_batches[:200].copy()
    in_layer = adata.copy()
    in_layer.layers["spliced"] = in_layer.X.copy()  # counts too, stored first: a layer named for counts is named
    in_layer.layers["counts"] = in_layer.X.copy()
    in_layer.layers["mask"] = in_layer.X > 0  # booleans are not counts
    in_layer.layers["ambient"] = sp.csr_matrix(in_layer.shape, dtype=np.float32)  # stores no value: not counts either
    sc.pp.normalize_total(in_layer)
    sc.pp.log1p(in_layer)
    before = in_layer.copy()
    with pytest.raises(
        ValueError, match=r"looks normalised.*\.\)? adata\.layers\['counts'\] holds whole counts: pass layer='counts'$"
    ):
        CellVAE(in_layer, batch_key="batch")
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] holds whole counts: pass layer='counts'$"):
        cellvae.tl.embed(in_layer, batch_key="batch", max_epochs=1, progress=False)
    assert in_layer.layers.keys() == before.layers.keys() and (in_layer.X != before.X).nnz == 0  # left as it was
    # a model trained on X, given the cells after normalize_total and log1p in place (a common scanpy session): the
    # place found alone (the advice to build the model with layer=... was first, unfit for a trained model)
    trained = CellVAE(adata, batch_key="batch", n_hidden=8).fit(max_epochs=1, progress=False)
    advice = r"looks normalised or log-transformed\. adata\.layers\['counts'\] holds whole counts: give the model ad\.AnnData"
    with pytest.raises(ValueError, match=advice + r"\(X=adata\.layers\['counts'\], obs=adata\.obs, var=adata\.var\)$"):
        trained.get_latent(in_layer)
    trained.get_latent(ad.AnnData(X=in_layer.layers["counts"], obs=in_layer.obs, var=in_layer.var))  # followed
    in_raw = adata.copy()
    in_raw.raw = in_raw.copy()
    sc.pp.normalize_total(in_raw)
    sc.pp.log1p(in_raw)
    advice = r"adata\.raw\.X holds whole counts: adata\.layers\['counts'\] = adata\.raw\[:, adata\.var_names\]\.X, "
    advice += "then pass layer='counts'$"
    with pytest.raises(ValueError, match=advice):
        CellVAE(in_raw, batch_key="batch")
    in_raw.layers["counts"] = in_raw.raw[:, in_raw.var_names].X  # the advice, followed
    CellVAE(in_raw, batch_key="batch", layer="counts")
    del in_raw.layers["counts"]
    renamed = in_raw.copy()  # raw lacks some of adata's genes: raw[:, adata.var_names] would fail
    renamed.var_names = [f"new{i}" for i in range(renamed.n_vars)]
    with pytest.raises(ValueError, match=r"adata\.raw\.X holds whole counts: build an AnnData of them, adata\.raw\.to_adata\(\)"):
        CellVAE(renamed, batch_key="batch")
    CellVAE(renamed.raw.to_adata(), batch_key="batch")  # the advice, followed
    in_x = adata.copy()  # the layer asked for is normalised, X holds the counts
    in_x.layers["normalised"] = in_x.X.copy()
    sc.pp.normalize_total(in_x, layer="normalised")
    with pytest.raises(ValueError, match=r"adata\.X holds whole counts: leave out layer= \(layer=None reads X\)$"):
        CellVAE(in_x, batch_key="batch", layer="normalised")
    CellVAE(in_x, batch_key="batch")  # the advice, followed
    normalised_only = in_layer.copy()
    del normalised_only.layers["counts"], normalised_only.layers["spliced"]
    with pytest.raises(ValueError, match="looks normalised") as refused:
        CellVAE(normalised_only, batch_key="batch")
    assert "] holds whole counts" not in str(refused.value)  # nothing to point to: where counts come from instead
    assert "Here neither a layer (nor adata.raw: there is none) holds whole counts: read the raw counts again" in str(
        refused.value
    )
    assert "layer=..." not in str(refused.value) and "adata.raw" not in str(refused.value).split("Here neither")[0]  # (ruled out)
    assert "raw.to_adata()" not in str(refused.value)  # (it has layers: not an AnnData made from raw)
    # a scanpy user passing adata.raw.to_adata() of log-normalised values is pointed back to the AnnData with its layer
    from_raw = in_layer.copy()
    from_raw.raw = from_raw
    with pytest.raises(ValueError, match=r"give that one, with layer= naming it\.\)$"):
        CellVAE(from_raw.raw.to_adata(), batch_key="batch")
    trained_on_x = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)  # (which takes no layer=)
    with pytest.raises(ValueError, match=r"give the model ad.AnnData\(X=adata.layers\['counts'\], obs=adata.obs, var="):
        trained_on_x.get_latent(from_raw.raw.to_adata())
    normalised_only.raw = normalised_only  # scanpy's habit, after log1p: raw holds no counts either
    with pytest.raises(ValueError, match=r"Here neither adata\.raw nor a layer holds whole counts: read the raw counts"):
        CellVAE(normalised_only, batch_key="batch")
    # a trained model reads where it was trained (here X): the hint says how to give it the counts
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    expected = model.get_latent(adata)
    with pytest.raises(ValueError, match=r"holds whole counts: give the model ad\.AnnData\(X=adata\.layers\['counts'\], obs"):
        model.get_latent(in_layer)
    as_advised = ad.AnnData(X=in_layer.layers["counts"], obs=in_layer.obs, var=in_layer.var)
    np.testing.assert_array_equal(model.get_latent(as_advised), expected)
    with pytest.raises(ValueError, match=r"adata\.raw\.X holds whole counts: give the model adata\.raw\.to_adata\(\)"):
        model.get_latent(in_raw)
    np.testing.assert_array_equal(model.get_latent(in_raw.raw.to_adata()), expected)
    query = in_layer.copy()
    query.obs["batch"] = "new"
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] holds whole counts"):
        model.map_query(query, max_epochs=1, progress=False)
    # a model that reads layers['counts'], given data whose 'counts' layer is normalised and whose X holds the counts
    layered = adata.copy()
    layered.layers["counts"] = layered.X.copy()
    on_layer = CellVAE(layered, batch_key="batch", layer="counts").fit(max_epochs=1, progress=False)
    swapped = layered.copy()
    sc.pp.normalize_total(swapped, layer="counts")
    with pytest.raises(ValueError, match=r"adata\.X holds whole counts: adata\.layers\['counts'\] = adata\.X$"):
        on_layer.get_latent(swapped)
    swapped.layers["counts"] = swapped.X  # the advice, followed
    np.testing.assert_array_equal(on_layer.get_latent(swapped), on_layer.get_latent(layered))


def test_fit_that_checks_a_backed_file_for_a_data_parallel_run_gives_a_new_models_advice(two_batches, tmp_path, monkeypatch):
    """Under torchrun a new model leaves a backed file's values to fit (each process checks its part): an error
    about them advises layer=..., as the model's construction would, not the advice for a trained model."""
    adata = two_batches[:200].copy()
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (unchecked, the normalised values look like read counts)
        model = CellVAE(backed, batch_key="batch")
    monkeypatch.delenv("WORLD_SIZE")  # (fit in one process reads the values as each rank does its part)
    with pytest.raises(ValueError, match=r"adata\.layers\['counts'\] holds whole counts: pass layer='counts'$"):
        model.fit(max_epochs=1, progress=False)
    backed.file.close()


def test_covariates_are_used(two_batches):
    adata = two_batches[:300].copy()
    adata.obs["donor"] = pd.Categorical(np.where(np.arange(300) % 3 == 0, "d1", "d2"))
    adata.obs["percent_mito"] = np.linspace(0, 5, 300)
    model = CellVAE(
        adata, batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["percent_mito"]
    ).fit(max_epochs=2, random_state=0, progress=False)
    assert model.config.n_covariates == 2 + 2 + 1
    changed = adata.copy()
    changed.obs["percent_mito"] = 50.0
    with pytest.warns(UserWarning, match=r"obs\['percent_mito'\] lies far from the values the model was trained with"):
        assert not np.allclose(model.get_normalized_expression(changed), model.get_normalized_expression(adata))
    changed.obs["percent_mito"] = 4.5  # within the training range: no warning
    with no_warnings():
        model.get_latent(changed)
    # a share of the cells in other units (combined sources): the median is fine, those cells are not
    mixed = adata.copy()
    mixed.obs["percent_mito"] = np.where(np.arange(300) % 10 == 0, mixed.obs["percent_mito"] * 100, mixed.obs["percent_mito"])
    with pytest.warns(UserWarning, match=r"obs\['percent_mito'\]: 9\.3% of the cells lie over 10 sd from the values"):
        model.get_latent(mixed)
    # the training cells themselves never are (Chebyshev), however heavy the covariate's tail
    tailed = adata.copy()
    tailed.obs["percent_mito"] = np.where(np.arange(300) < 2, 80.0, tailed.obs["percent_mito"])
    with no_warnings():
        tailed_model = CellVAE(tailed, continuous_covariate_keys=["percent_mito"], n_hidden=16)
    tailed_model.fit(max_epochs=1, progress=False, random_state=0)
    with no_warnings():
        tailed_model.get_latent(tailed)
        tailed_model.decode(np.zeros((0, 10), dtype=np.float32), covariates={"percent_mito": []})  # no cells, no warning
    # a covariate that is the same in every cell cannot be learned from
    constant = adata.copy()
    constant.obs["percent_mito"] = 0.1  # (np.std of its copies is not 0 but 1e-17: not a scale to divide by)
    assert np.std(constant.obs["percent_mito"].to_numpy()) > 0
    with pytest.warns(UserWarning, match=r"obs\['percent_mito'\] is 0\.1 in every cell, so the model cannot learn"):
        constant_model = CellVAE(constant, continuous_covariate_keys=["percent_mito"])
    assert constant_model.layout.continuous_std == [1.0]
    # so is a batch or categorical covariate of one value (e.g. a subset of one sample): told, and trained
    one_sample = two_batches[two_batches.obs["batch"] == "batch1"].copy()
    with pytest.warns(UserWarning, match=r"obs\['batch'\] is 'batch1' in all .* cells, so there is nothing .*batch_key$"):
        one_batch_model = CellVAE(one_sample, batch_key="batch", n_hidden=16)
    assert one_batch_model.config.batch_categories == ["batch1"]
    # a missing value written as text (astype(str) of NaN) is a category: told
    named = two_batches.copy()
    named.obs["batch"] = named.obs["batch"].astype(object).where(named.obs["batch"] == "batch0", np.nan).astype(str)
    with pytest.warns(UserWarning, match=r"obs\['batch'\] has a category 'nan', the text of a missing value"):
        CellVAE(named, batch_key="batch", n_hidden=16)
    # a whole float beside the text of its number (pd.concat of a float column with a text one) names two groups:
    # told (an integer beside its text reads as one group), as an object column and as a categorical one
    mixed = two_batches.copy()
    values = np.array(["1", "2", 2.0, 1] * (mixed.n_obs // 4), dtype=object)
    for column in (pd.Series(values, index=mixed.obs_names, dtype=object), pd.Categorical(values)):
        mixed.obs["sample"] = column
        told = r"obs\['sample'\] holds numbers beside text: 2.0 and '2' name two different groups \(1 such pair\)"
        with pytest.warns(UserWarning, match=told):
            assert sorted(CellVAE(mixed, batch_key="sample", n_hidden=16).config.batch_categories) == ["1", "2", "2.0"]
    mixed.obs["sample"] = pd.Series(np.where(values == 2.0, 2, values), index=mixed.obs_names, dtype=object)
    with no_warnings():
        assert CellVAE(mixed, batch_key="sample", n_hidden=16).config.batch_categories == ["1", "2"]
    # categories of NumPy strings (pd.Categorical(np.array([...])[codes], categories=[...])): names as plain text
    names = np.array(["donor 0/lane", "donor 1"])
    mixed.obs["sample"] = pd.Categorical(names[np.arange(mixed.n_obs) % 2], categories=[*names, "unused"])
    categories = CellVAE(mixed, batch_key="sample", n_hidden=16).config.batch_categories
    assert categories == ["donor 0/lane", "donor 1"] and {type(name) for name in categories} == {str}
    one_sample.obs["plate"] = "p1"
    with pytest.warns(UserWarning, match=r"obs\['plate'\] is 'p1' in all .* sample\?\)$"):
        CellVAE(one_sample, categorical_covariate_keys=["plate"], n_hidden=16)
    # donor IDs of a categorical column, given as continuous: read as numbers, with a warning
    donors = adata.copy()
    donors.obs["donor"] = pd.Categorical(np.where(np.arange(300) % 2 == 0, "101", "107"))
    with pytest.warns(UserWarning, match=r"obs\['donor'\] is a categorical column: its values are read as numbers \(e.g. 101\)"):
        CellVAE(donors, continuous_covariate_keys=["donor"])
    # a column of labels given as continuous, and a gap in a numeric one
    labelled = adata.copy()
    labelled.obs["site"] = np.where(np.arange(300) % 2 == 0, "lung", "gut")
    with pytest.raises(ValueError, match=r"obs\['site'\] holds text, not numbers \(e.g. 'lung', 300 of 300 values\); .*categ"):
        CellVAE(labelled, continuous_covariate_keys=["site"])
    labelled.obs.loc[labelled.obs_names[5], "percent_mito"] = np.nan
    with pytest.raises(ValueError, match=r"obs\['percent_mito'\] has NaN, infinite or non-numeric values \(1 of 300\); fill"):
        CellVAE(labelled, continuous_covariate_keys=["percent_mito"])
    # standardised with the training mean and sd: the covariate's unit does not matter
    in_other_units = adata.copy()
    in_other_units.obs["percent_mito"] *= 1000.0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lies far from the values the model was trained with")
        other = CellVAE(
            in_other_units, batch_key="batch", categorical_covariate_keys=["donor"], continuous_covariate_keys=["percent_mito"]
        ).fit(max_epochs=2, random_state=0, progress=False)
    np.testing.assert_allclose(other.get_latent(), model.get_latent(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"each obs column has one role\) must be unique; duplicated: \['batch'\]"):
        CellVAE(adata, batch_key="batch", categorical_covariate_keys=["batch"])
    adata.obs["score"] = np.random.default_rng(0).normal(size=adata.n_obs)
    with no_warnings(), pytest.raises(ValueError, match=r"duplicated: \['score'\]"):  # refused before its values are looked at
        CellVAE(adata, categorical_covariate_keys=["score"], continuous_covariate_keys=["score"])
    with pytest.raises(TypeError, match=r"each entry of categorical_covariate_keys takes one obs column name"):
        CellVAE(adata, categorical_covariate_keys=[["donor"]])
    # a model saved by an older cellvae, which took a key in two roles, still reads as it was trained
    two_roles = {"categorical_covariate_keys": ["batch"], "categorical_covariate_categories": {"batch": ["0", "1"]}}
    no_continuous = {"continuous_covariate_keys": [], "continuous_covariate_mean": [], "continuous_covariate_std": []}
    assert Config(**asdict(model.config) | two_roles | no_continuous).n_covariates == 2 + 2


def test_counts_from_layer_dense_and_csc(two_batches):
    adata = two_batches[:200].copy()
    adata.layers["counts"] = adata.X.toarray().astype(np.int32)
    adata.X = sp.csc_matrix(adata.X)
    latents = []
    for layer in ("counts", None):
        model = CellVAE(adata, layer=layer).fit(max_epochs=2, random_state=0, progress=False)
        latents.append(model.get_latent())
    assert latents[0].shape == (200, 10)
    # the same counts, dense int32 in a layer or CSC float32 in X, train the same model
    np.testing.assert_allclose(latents[0], latents[1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ bad input


def assert_unchanged(before: ad.AnnData, after: ad.AnnData):
    assert before.obs.equals(after.obs) and before.var.equals(after.var)
    assert list(before.obsm.keys()) == list(after.obsm.keys()) and list(before.uns.keys()) == list(after.uns.keys())
    left = before.X.toarray() if sp.issparse(before.X) else before.X
    right = after.X.toarray() if sp.issparse(after.X) else after.X
    np.testing.assert_array_equal(left, right)


def small(two_batches):
    return two_batches[:100].copy()


@pytest.mark.parametrize(
    "corrupt, error, message",
    [
        (lambda a: a, KeyError, "layer 'counts' not found"),
        (lambda a: a.obs.drop(columns="batch", inplace=True), KeyError, "'batch'"),
        (lambda a: setattr(a, "X", sp.csr_matrix(np.log1p(a.X.toarray()))), ValueError, "log-transformed"),
        (lambda a: setattr(a, "X", a.X.toarray() - 1.0), ValueError, "negative values"),
        (lambda a: a.X.data.__setitem__(0, np.nan), ValueError, "NaN"),
        (lambda a: a.X.data.__setitem__(0, np.inf), ValueError, "infinite"),
        (
            lambda a: a.obs.__setitem__("batch", a.obs["batch"].astype(object).where(a.obs.index != "cell0")),
            ValueError,
            "missing",
        ),
    ],
    ids=["missing-layer", "missing-batch-key", "log-normalised", "negative", "nan", "inf", "nan-batch"],
)
def test_bad_input_raises_clear_error_and_leaves_adata_unchanged(two_batches, corrupt, error, message):
    adata = small(two_batches)
    corrupt(adata)
    before = adata.copy()
    layer = "counts" if message.startswith("layer") else None
    with pytest.raises(error, match=message):
        CellVAE(adata, layer=layer, batch_key="batch")
    assert_unchanged(before, adata)


def test_a_lazy_dask_count_matrix_is_refused_with_the_way_out(two_batches):
    da = pytest.importorskip("dask.array")
    adata = small(two_batches)
    adata.layers["lazy"] = da.from_array(adata.X.toarray(), chunks=(50, adata.n_vars))
    with pytest.raises(TypeError, match=r"adata.layers\['lazy'\] is a dask.*\.compute\(\)"):
        CellVAE(adata, layer="lazy")


def test_too_few_cells_and_zero_count_cells(two_batches):
    with pytest.raises(ValueError, match="at least 10 cells"):
        CellVAE(two_batches[:5].copy()).fit(max_epochs=1, progress=False)
    adata = small(two_batches)
    dense = adata.X.toarray()
    dense[:3] = 0
    adata.X = sp.csr_matrix(dense)
    model = CellVAE(adata)
    with pytest.warns(UserWarning, match="3 cells have zero total counts") as told:
        model.fit(max_epochs=1, progress=False)
    assert "batches" not in str(told[0].message)  # (no batch_key)
    assert model.get_latent().shape == (100, 10)
    batched = adata.copy()
    batched.obs["batch"] = pd.Categorical(np.where(np.arange(100) < 3, "empty", batched.obs["batch"].astype(str)))
    with pytest.warns(UserWarning, match=r"the batches \['empty'\] have no cells with counts, so their parameters stay"):
        CellVAE(batched, batch_key="batch").fit(max_epochs=1, progress=False)
    batched.obs["kit"] = pd.Categorical(np.where(np.arange(100) < 3, "v4", "v2"))  # a covariate's category, too
    told = r"the batches \['empty'\] and the categories of obs\['kit'\] \['v4'\] have no cells with counts, so"
    with pytest.warns(UserWarning, match=told):
        CellVAE(batched, batch_key="batch", categorical_covariate_keys=["kit"]).fit(max_epochs=1, progress=False)
    # cells with counts only outside the genes chosen: filter_cells on adata would keep them; the advice drops them
    dense = adata.X.toarray()
    dense[:4, :50], dense[:4, 50:] = 0, 1
    selected = ad.AnnData(sp.csr_matrix(dense), obs=adata.obs)
    selected.var["chosen"] = np.arange(selected.n_vars) < 50
    told = r"4 cells have no counts in the model's 50 genes \(they may have counts in others\).*a cluster of their own"
    with pytest.warns(UserWarning, match=told):
        chosen = CellVAE(selected[:, :50]).fit(max_epochs=1, progress=False)
    with pytest.warns(UserWarning, match=told):
        cellvae.tl.embed(selected, mask_var="chosen", max_epochs=1, progress=False)
    genes = chosen.config.gene_names
    assert (np.asarray(selected[:, selected.var_names.isin(genes)].X.sum(axis=1)).ravel() > 0).sum() == 96  # as advised
    # a query lacking some of the model's genes and holding others, in a layer: the advice reads that layer
    batched = selected.copy()
    batched.layers["counts"] = batched.X
    batched.obs["batch"] = np.where(np.arange(batched.n_obs) < 50, "a", "b")
    reference = CellVAE(batched[50:, :50], layer="counts", batch_key="batch").fit(max_epochs=1, progress=False)
    query = batched[:50, 10:].copy()  # 40 of the model's genes, 50 others
    query.obs["batch"] = "q"
    with pytest.warns(UserWarning, match=told + r".*query_adata.var_names.isin\(genes\)\]\.layers\['counts'\]\.sum"):
        reference.map_query(query, max_epochs=1, progress=False)
    scores = model.rate_distortion()  # an empty cell's counts have probability 1: distortion 0, not NaN
    assert np.isfinite(scores.to_numpy()).all() and np.allclose(scores["distortion"].iloc[:3], 0.0, atol=1e-5)
    assert np.isfinite(model.marginal_log_likelihood(n_samples=2)).all()


def test_a_batch_of_a_few_cells_trains_even_where_the_validation_split_would_take_them_all(two_batches):
    """Its parameters learn from its cells, not stay as drawn (a one-cell batch fell into validation one fit in ten)."""
    adata = small(two_batches)
    batches = adata.obs["batch"].astype(str).to_numpy()
    batches[-1] = "tiny"
    adata.obs["batch"] = pd.Categorical(batches)
    cells = np.arange(adata.n_obs)
    seed = next(s for s in range(100) if adata.n_obs - 1 not in split_cells(cells, 0.1, s)[0])  # the old split's choice
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a short fit's collapse check)
        model = CellVAE(adata, batch_key="batch", dispersion="gene-batch").fit(max_epochs=3, random_state=seed, progress=False)
    tiny = model.config.batch_categories.index("tiny")
    assert torch.count_nonzero(model.module.decoder.log_theta[tiny]) > 0  # drawn as zeros: it trained


def test_a_categorical_covariate_value_of_one_cell_trains_where_the_validation_split_would_take_it(two_batches):
    """The covariate's weights for that value learn from its cell, not stay as drawn."""
    adata = small(two_batches)
    adata.obs["donor"] = pd.Categorical(["tiny"] + ["d1", "d2"] * 49 + ["d1"])
    cells = np.arange(adata.n_obs)
    seed = next(s for s in range(100) if 0 not in split_cells(cells, 0.1, s)[0])  # the old split's choice
    model = CellVAE(adata, batch_key="batch", categorical_covariate_keys=["donor"])
    donors = model.config.categorical_covariate_categories["donor"]
    column = model.config.n_latent + len(model.config.batch_categories) + donors.index("tiny")
    with seeded(seed):  # the weights fit draws from its random_state
        drawn = VAE(model.config).decoder.body.linears[0].weight[:, column].detach()  # z, then one-hot batch, donor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (a short fit's collapse check)
        model.fit(max_epochs=3, random_state=seed, weight_decay=0.0, progress=False)
    # without a gradient (and without weight decay) it would stay as drawn
    assert not torch.equal(model.module.decoder.body.linears[0].weight[:, column], drawn)


def test_read_counts_of_amplified_molecules_get_a_warning_that_points_to_a_per_cell_dispersion(tmp_path):
    umis = cellvae.datasets.simulate(n_cells=600, n_genes=400, random_state=0)
    with no_warnings():  # UMI counts: no warning
        CellVAE(umis)
    reads = umis.copy()  # each molecule read a geometric number of times (mean 20), as after PCR
    reads.X = reads.X.tocsr()
    reads.X.data = np.random.default_rng(0).negative_binomial(reads.X.data, 1 / 20).astype(np.float32) + reads.X.data
    match = r"adata.X looks like read counts.*only \d\.\d% of its non-zero values are 1.*dispersion='gene-cell'"
    with pytest.warns(UserWarning, match=match):
        CellVAE(reads)
    reads.write_h5ad(tmp_path / "reads.h5ad")  # a backed file is looked at too, and dense counts
    backed = ad.read_h5ad(tmp_path / "reads.h5ad", backed="r")
    with pytest.warns(UserWarning, match=match):
        CellVAE(backed)
    backed.file.close()
    with pytest.warns(UserWarning, match=match):
        CellVAE(ad.AnnData(reads.X.toarray(), obs=reads.obs, var=reads.var))
    with no_warnings():
        CellVAE(reads, dispersion="gene-cell")
    with pytest.warns(UserWarning, match=r"CellVAE\(\.\.\., likelihood='nb', dispersion='gene-cell'\)"):
        CellVAE(reads, likelihood="poisson")  # a Poisson model has no dispersion: the advice names the likelihood too
    with no_warnings():
        CellVAE(reads, likelihood="nb", dispersion="gene-cell")


def test_a_model_that_overfits_deep_read_counts_from_the_start_keeps_its_best_warm_up_epoch():
    """800 real cells, each UMI read a geometric number of times (mean 2,000; ~1e6 reads per cell): the held-out
    loss is lowest early in the KL warm-up (epoch 14 of 50) and rises as training fits its own cells. Before,
    the best epoch was looked for after the warm-up only, so fit kept one worse than the untrained model and
    blamed the learning rate ("training made the model worse ... diverged")."""
    umis = shared_dataset("mouse_intestine_haber_scdesign2.h5ad")
    umis = umis[np.random.default_rng(0).choice(umis.n_obs, 800, replace=False)].copy()
    counts = umis.X.tocsr().astype(np.float64)
    rng = np.random.default_rng(0)
    counts.data = np.array([rng.geometric(1 / 2000, int(k)).sum() for k in counts.data], dtype=np.float64)
    reads = ad.AnnData(counts.astype(np.float32), obs=umis.obs.copy(), var=umis.var.copy())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CellVAE(reads).fit(progress=False, random_state=0)
    messages = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert len(messages) == 1 and "looks like read counts" in messages[0], messages
    losses = model.history["validation_loss"]
    warmup = model.train_settings.kl_warmup_epochs
    assert losses.idxmin() < warmup and losses.iloc[warmup:].min() > 1.2 * losses.min()  # it overfits during the warm-up
    assert len(losses) == warmup + 19  # early stopping waits for the warm-up: its last epoch is the first of patience=20


@pytest.mark.parametrize("storage", ["csr", "csc", "dense", "backed_csr", "backed_csc", "backed_dense"])
def test_reads_in_only_some_batches_get_a_warning_that_names_them_and_points_to_a_dispersion_per_batch(tmp_path, storage):
    """Kang's stimulated cells as reads (each molecule read a geometric number of times, mean 50) beside UMI
    counts of the controls: a quarter of all non-zero values are still 1, so a share taken over the whole
    matrix saw UMIs; per batch, 'stim' holds 1% and 'ctrl' 54% (benchmarks/read_counts.py: batch mixing 0.59
    with one dispersion per gene, 0.71 with one per gene and batch)."""
    kang = shared_dataset("kang_ifnb_muscat_example.h5ad")
    counts = sp.csr_matrix(kang.X, dtype=np.float32)
    stimulated = (kang.obs["batch"] == "stim").to_numpy()[np.repeat(np.arange(kang.n_obs), np.diff(counts.indptr))]
    molecules = counts.data[stimulated].astype(np.int64)
    counts.data[stimulated] = molecules + np.random.default_rng(0).negative_binomial(molecules, 1 / 50)
    assert np.mean(counts.data == 1) > 0.2
    order = np.argsort(kang.obs["batch"].to_numpy(), kind="stable")  # one batch stored after the other
    matrix = counts[order]
    mixed = ad.AnnData(
        {"csc": matrix.tocsc(), "dense": matrix.toarray(), "backed_csc": matrix.tocsc()}.get(storage, matrix),
        obs=kang.obs.iloc[order],
        var=kang.var,
    )
    if storage.startswith("backed"):
        mixed.write_h5ad(tmp_path / "mixed.h5ad")
        mixed = ad.read_h5ad(tmp_path / "mixed.h5ad", backed="r")
    match = (
        r"adata.X looks like read counts, not UMI counts, in 1 of the 2 batches of obs\['batch'\]: only 1\.\d% \('stim'\) "
        r"of their non-zero values are 1.*dispersion='gene-batch'"
    )
    with pytest.warns(UserWarning, match=match) as caught:
        CellVAE(mixed, batch_key="batch")
    assert len(caught) == 1
    with no_warnings():  # the advice taken, or reads left out (one batch left: told that alone)
        CellVAE(mixed, batch_key="batch", dispersion="gene-batch")
        warnings.filterwarnings("ignore", message=r"obs\['batch'\] is 'ctrl' in all 750 cells, so there is nothing")
        CellVAE(mixed[mixed.obs["batch"] == "ctrl"], batch_key="batch")
    with pytest.warns(UserWarning, match=r"adata.X looks like read counts, not UMI counts: only 1\.\d%.*'gene-cell'"):
        CellVAE(mixed[mixed.obs["batch"] == "stim"], batch_key="batch")  # reads in every batch: one dispersion per cell
    if storage.startswith("backed"):
        mixed.file.close()


def test_the_share_of_ones_is_sampled_across_a_csc_matrix_not_from_its_first_genes(monkeypatch, tmp_path):
    from cellvae import data

    umis = cellvae.datasets.simulate(n_cells=600, n_genes=400, random_state=0).X.tocsr()
    by_expression = np.argsort(-np.asarray(umis.sum(axis=0)).ravel())  # highly expressed genes (few 1s) first
    csc = umis[:, by_expression].tocsc()
    overall = np.mean(csc.data == 1)
    monkeypatch.setattr(data, "VALUES_PER_CHECK", 2**12)  # a sample much smaller than the matrix, as in an atlas
    assert np.mean(csc.data[: 2**12] == 1) < overall - 0.2  # the first stored values alone would mislead
    ad.AnnData(csc).write_h5ad(tmp_path / "csc.h5ad")
    backed = ad.read_h5ad(tmp_path / "csc.h5ad", backed="r")
    for matrix in (csc, backed.X):
        (share,), (seen,), _ = data.count_profile(matrix)
        assert abs(share - overall) < 0.05 and seen >= 2**11
    backed.file.close()


@pytest.mark.parametrize("storage", ["csr", "csc", "dense", "backed_csc", "backed_csr"])
def test_many_genes_without_counts_get_a_warning_to_filter_them(two_batches, tmp_path, storage):
    adata = small(two_batches)
    adata = adata[:, np.asarray(adata.X.sum(axis=0)).ravel() > 0].copy()
    padded = sp.hstack([adata.X, sp.csr_matrix((adata.n_obs, 60))]).tocsr()  # 60 genes never detected
    matrix = {"csr": padded, "csc": padded.tocsc(), "dense": padded.toarray()}.get(storage, padded)
    wide = ad.AnnData(matrix, obs=adata.obs, var=pd.DataFrame(index=[*adata.var_names, *[f"pad{i}" for i in range(60)]]))
    if storage.startswith("backed"):
        if storage == "backed_csc":
            wide.X = wide.X.tocsc()
        wide.write_h5ad(tmp_path / "wide.h5ad")
        wide = ad.read_h5ad(tmp_path / "wide.h5ad", backed="r")
    if storage == "backed_csr":  # finding out would read the whole file: no warning
        with no_warnings():
            CellVAE(wide)
    else:
        with pytest.warns(UserWarning, match=rf"60 of the {adata.n_vars + 60} genes have no counts.*filter_genes"):
            CellVAE(wide)
    with no_warnings():
        CellVAE(adata)  # every gene seen


@pytest.mark.parametrize("storage", ["csr", "csc", "dense", "sampled", "sampled_dense"])
def test_genes_one_batch_never_measured_as_an_outer_join_fills_them_get_a_warning(two_batches, storage, monkeypatch):
    first = two_batches[two_batches.obs["batch"] == "batch0"]
    second = two_batches[two_batches.obs["batch"] == "batch1", :200]  # a dataset that measured 200 of the 300 genes
    outer = ad.concat([first, second], join="outer")  # its cells read zero for the other 100
    inner = ad.concat([first, second], join="inner")
    empty = ad.AnnData(sp.csr_matrix(second.shape, dtype=np.float32), obs=second.obs, var=second.var)  # no counts
    with_empty_cells = ad.concat([inner, empty], index_unique="-")
    if storage.startswith("sampled"):  # a large matrix is checked on every few cells, copied a block of them at a time
        monkeypatch.setattr(cellvae.data, "UNMEASURED_CHECK_VALUES", outer.X.nnz // 5)
        monkeypatch.setattr(cellvae.data, "VALUES_PER_PASS", 2_000)
    for adata in (outer, inner, with_empty_cells):
        adata.X = {"csc": adata.X.tocsc(), "dense": adata.X.toarray(), "sampled_dense": adata.X.toarray()}.get(storage, adata.X)
    told = r"in 1 of the 2 batches of obs\['batch'\].*'batch1' lacks \d+ of \d+ \(\d+%\).*join='inner'"
    with pytest.warns(UserWarning, match=told):
        CellVAE(outer, batch_key="batch")
    with no_warnings():
        CellVAE(outer)  # without batches there is nothing to compare
        CellVAE(inner, batch_key="batch")
        CellVAE(with_empty_cells, batch_key="batch")  # cells without counts do not make a batch look as if it lacked genes


def test_a_query_joined_with_join_outer_gets_the_unmeasured_genes_warning_too(two_batches):
    reference = two_batches[two_batches.obs["batch"] == "batch0"].copy()
    model = CellVAE(reference, batch_key="batch").fit(max_epochs=1, progress=False)
    first = two_batches[two_batches.obs["batch"] == "batch1"].copy()
    second = first[:, :250].copy()  # a second query dataset that measured 250 of the 300 genes
    first.obs["batch"], second.obs["batch"] = "query0", "query1"
    told = r"in 1 of the 2 batches of obs\['batch'\], query_adata.X has no count.*'query1' lacks.*join='inner'"
    with pytest.warns(UserWarning, match=told):
        model.map_query(ad.concat([first, second], join="outer", index_unique="-"), max_epochs=1, progress=False)
    with warnings.catch_warnings(record=True) as caught:  # join='inner': the query lacks 50 of the model's genes
        warnings.simplefilter("always")
        model.map_query(ad.concat([first, second], join="inner", index_unique="-"), max_epochs=1, progress=False)
    assert [str(w.message) for w in caught if "join=" in str(w.message)] == []
    assert any("50 of the model's 300 genes are missing" in str(w.message) for w in caught)


def test_cells_without_a_batch_are_refused_with_two_fixes_that_work_as_written(two_batches):
    adata = small(two_batches)
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories("unused")
    adata.obs.loc[adata.obs_names[:7], "batch"] = np.nan  # e.g. donors not recorded for some cells
    with pytest.raises(ValueError, match=r"obs\['batch'\] has 7 missing \(NaN\) values") as told:
        CellVAE(adata, batch_key="batch")
    assert adata.obs["batch"].isna().sum() == 7  # refused before anything changed
    fill = re.search(r"adata\.obs\['batch'\] = \S+", str(told.value))[0]
    drop = re.search(r"adata = adata\[\S+\]\.copy\(\)", str(told.value))[0]
    filled, dropped = adata.copy(), adata.copy()
    exec(fill, {"adata": filled})
    namespace = {"adata": dropped}
    exec(drop, namespace)
    assert CellVAE(filled, batch_key="batch").config.batch_categories == ["batch0", "batch1", "unknown"]
    assert namespace["adata"].n_obs == adata.n_obs - 7
    assert CellVAE(namespace["adata"], batch_key="batch").config.batch_categories == ["batch0", "batch1"]


def test_a_batch_column_with_about_one_value_per_cell_gets_a_warning(two_batches):
    adata = small(two_batches)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(int)  # a QC column passed by mistake
    with pytest.warns(UserWarning, match=r"obs\['total_counts'\] has \d+ categories for 100 cells .*check the key"):
        CellVAE(adata, batch_key="total_counts")
    with no_warnings():
        CellVAE(adata, batch_key="batch")


def test_a_batch_or_category_of_a_few_cells_gets_a_warning_before_training(two_batches):
    """A batch of 3 cells beside hundreds (what is left of a sample after filtering) trains, but its batch parameters
    rest on 3 cells: fit says so before training, naming the batch and its count, and leaves the data as it was."""
    adata = two_batches[:300].copy()
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["late sample", "failed run", "never sequenced"])
    adata.obs.iloc[:7, adata.obs.columns.get_loc("batch")] = "late sample"
    adata.obs.iloc[7:9, adata.obs.columns.get_loc("batch")] = "failed run"  # no counts in any of its cells: not told
    adata.X = sp.csr_matrix(adata.X.multiply(np.arange(300)[:, None] >= 4))  # 4 of its 7 cells without counts
    adata.X = sp.csr_matrix(adata.X.multiply(~np.isin(np.arange(300), [7, 8])[:, None]))
    adata.obs["site"] = pd.Categorical(["a"] * 295 + ["b"] * 5)
    obs_before = adata.obs.copy()
    model = CellVAE(adata, batch_key="batch", categorical_covariate_keys=["site"])
    message = r"batches or categories with under 10 cells with counts \(obs\['batch'\] 'late sample': 3, obs\['site'\] 'b': 5\)"
    with pytest.warns(UserWarning, match=message + r": fit learns each one's parameters from its own cells alone") as told:
        model.fit(max_epochs=1, progress=False)
    assert len([w for w in told if "under 10 cells" in str(w.message)]) == 1 and model.is_trained
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    with no_warnings():  # ten cells or more: no warning
        CellVAE(small(two_batches), batch_key="batch").fit(max_epochs=1, progress=False)


def test_warnings_point_at_the_users_line_through_every_public_function_that_reaches_the_check(two_batches, tmp_path):
    adata = small(two_batches)
    adata.obs["total_counts"] = np.asarray(adata.X.sum(axis=1)).ravel().astype(int)
    with pytest.warns(UserWarning, match="check the key") as direct:
        CellVAE(adata, batch_key="total_counts")
    with pytest.warns(UserWarning, match="check the key") as wrapped:  # tl.embed builds the model, which reads obs
        cellvae.tl.embed(adata, batch_key="total_counts", max_epochs=1, progress=False)
    untrained = CellVAE(adata, batch_key="batch")
    with pytest.warns(UserWarning) as nested:  # a method that calls other methods, warning from several depths
        untrained.differential_expression(groupby="batch", n_draws=100)
    messages = " | ".join(str(record.message) for record in nested)
    assert "not trained" in messages and "share no batch" in messages
    with pytest.warns(UserWarning, match="no checkpoint") as in_training:  # raised in train(), under @seeded
        untrained.fit(max_epochs=1, checkpoint_dir=tmp_path / "empty", resume=True, progress=False)
    assert {record.filename for record in [*direct, *wrapped, *nested, *in_training]} == {__file__}


def test_integer_batch_labels_are_named_as_given(two_batches):
    adata = small(two_batches)
    adata.obs["plate"] = np.where(adata.obs["batch"] == "batch0", 1016, 1256)  # an int64 column
    model = CellVAE(adata, batch_key="plate").fit(max_epochs=1, progress=False)
    assert model.config.batch_categories == ["1016", "1256"]
    as_text = model.get_normalized_expression(transform_batch="1016")
    np.testing.assert_array_equal(model.get_normalized_expression(transform_batch=1016), as_text)
    both = model.get_normalized_expression(transform_batch=["1016", "1256"])
    np.testing.assert_array_equal(model.get_normalized_expression(transform_batch=[np.int64(1016), 1256]), both)
    with pytest.raises(ValueError, match=r"transform_batch \['7'\] not among the model's batches"):
        model.get_normalized_expression(transform_batch=7)
    with pytest.raises(ValueError, match=r"transform_batch is empty; name one batch or more, or pass None for each cell's own"):
        model.get_normalized_expression(transform_batch=[])
    with pytest.raises(ValueError, match=r"batchid1 is empty; .* pass None to decode under all the model's batches"):
        model.differential_expression(groupby="batch", group1="1016", batchid1=[])


def test_new_data_with_missing_genes_or_unknown_batch(two_batches, tmp_path):
    adata = small(two_batches)
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    with pytest.warns(UserWarning, match=r"2 of the model's 300 genes are missing from adata.*gene0"):
        partial = model.get_latent(adata[:, 2:].copy())
    zeroed = adata.copy()
    zeroed.X = sp.csr_matrix(zeroed.X.multiply(np.arange(300) >= 2))
    np.testing.assert_allclose(partial, model.get_latent(zeroed), rtol=1e-6, atol=1e-6)  # missing genes count as zeros
    adata[:, 2:].copy().write_h5ad(tmp_path / "partial.h5ad")
    for stored in ("csr", "dense"):  # the same from a file streamed from disk
        backed = ad.read_h5ad(tmp_path / "partial.h5ad", backed="r")
        if stored == "dense":
            backed.file.close()
            dense = ad.read_h5ad(tmp_path / "partial.h5ad")
            dense.X = dense.X.toarray()
            dense.write_h5ad(tmp_path / "dense.h5ad")
            backed = ad.read_h5ad(tmp_path / "dense.h5ad", backed="r")
        with pytest.warns(UserWarning, match="2 of the model's 300 genes are missing from adata"):
            np.testing.assert_allclose(model.get_latent(backed), partial, rtol=1e-5, atol=1e-6)
        backed.file.close()
    with pytest.raises(ValueError, match=r"only 210 of the model's 300 genes \(70%\) are in adata.var_names") as told:
        model.get_latent(adata[:, 90:].copy())
    # genes named alike, some absent: the generic advice, no Ensembl versions (the present genes are not "found")
    assert "Ensembl version" not in str(told.value) and str(told.value).endswith("(symbols vs Ensembl IDs)")
    with pytest.raises(ValueError, match=r"only 239 of the model's 300 genes \(79.6%\) are in adata.var_names"):
        model.get_latent(adata[:, 61:].copy())  # not rounded up to the 80% needed
    renamed = adata.copy()
    renamed.obs["batch"] = "new-lab"
    with pytest.raises(ValueError, match="map_query"):
        model.get_latent(renamed)
    filtered = adata.copy()
    model = CellVAE(filtered, batch_key="batch")
    filtered._inplace_subset_var(np.arange(300) >= 2)  # as sc.pp.filter_genes(filtered, ...) does after the model is built
    with pytest.raises(ValueError, match=r"2 of the model's 300 genes are not in its AnnData \(e.g. \['gene0', 'gene1'\]\)"):
        model.fit(max_epochs=1, progress=False)  # training must not learn that the missing genes are silent


def test_data_whose_genes_are_named_otherwise_is_told_where_the_models_gene_names_are(two_batches):
    adata = small(two_batches)
    model = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False)
    ensembl = adata.copy()  # an atlas's habit (CELLxGENE): Ensembl IDs as var_names, the symbols in a column
    ensembl.var["feature_name"] = pd.Categorical(ensembl.var_names)
    ensembl.var_names = [f"ENSG{i:011d}" for i in range(ensembl.n_vars)]
    fix = r"query_adata.var\['feature_name'\] holds the model's genes.*var_names = query_adata.var\['feature_name'\]"
    with pytest.raises(ValueError, match=fix):
        model.map_query(ensembl, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"adata.var\['feature_name'\] holds the model's genes"):
        model.get_latent(ensembl)
    reference_ids = adata.copy()
    reference_ids.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    model = CellVAE(reference_ids, batch_key="batch").fit(max_epochs=1, progress=False)
    versioned = reference_ids.copy()  # GENCODE's versioned IDs, the model's without
    versioned.var_names = [f"{name}.{i % 20 + 1}" for i, name in enumerate(reference_ids.var_names)]
    with pytest.raises(ValueError, match=r"Ensembl IDs with a version \(e.g. 'ENSG00000000000.1'\).*str.replace") as told:
        model.get_latent(versioned)
    fixed = versioned.copy()
    fixed.var_names = eval(re.search(r"var_names = (adata.var_names.str.replace\(.*\))$", str(told.value))[1], {"adata": fixed})
    np.testing.assert_array_equal(model.get_latent(fixed), model.get_latent(reference_ids))  # the advice, as written
    partly = reference_ids.copy()  # a few versioned: a warning (not an error) that names the versions
    partly.var_names = [f"{name}.3" if i < 30 else name for i, name in enumerate(reference_ids.var_names)]
    with pytest.warns(UserWarning, match=r"30 of the model's 300 genes are missing.*30 of them are in adata with an Ensembl"):
        model.get_latent(partly)
    model_versioned = versioned.copy()  # the other way round: the model's IDs carry versions, the data's do not
    trained_versioned = CellVAE(model_versioned, batch_key="batch").fit(max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"300 of them are in adata without the model's Ensembl version") as told:
        trained_versioned.get_latent(reference_ids)
    renamed = reference_ids.copy()
    advice = re.search(r"e\.g\. (genes = .*)$", str(told.value))[1]
    exec(advice, {"pd": pd, "model": trained_versioned, "adata": renamed})  # the advice, as written
    np.testing.assert_array_equal(trained_versioned.get_latent(renamed), trained_versioned.get_latent(model_versioned))


def test_loading_a_directory_that_is_not_a_model(tmp_path, two_batches):
    with pytest.raises(ValueError, match="not a saved cellvae model"):
        CellVAE.load(tmp_path)
    model = CellVAE(small(two_batches))
    model.save(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="corrupt"):
        CellVAE.load(tmp_path / "m")


def test_weights_and_metadata_a_save_never_writes_are_refused_or_ignored(tmp_path, two_batches):
    """A model zoo's damaged or hand-made files: NaN weights (with a matching checksum) loaded and gave NaN outputs;
    a best_epoch written as a number, or nested too deep, raised bare Python errors."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    adata = small(two_batches)
    CellVAE(adata).fit(max_epochs=2, progress=False, random_state=0).save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with safe_open(weights, "pt") as handle:
        state, metadata = {k: handle.get_tensor(k) for k in handle.keys()}, json.loads(handle.metadata()["cellvae"])

    def rewrite(tensors, meta):
        meta = meta if isinstance(meta, str) else json.dumps(meta | {"sha256": cellvae.train.tensors_digest(tensors)})
        save_file(tensors, weights, metadata={"cellvae": meta})

    bias = next(name for name in state if name.endswith("bias"))
    rewrite(state | {bias: torch.full_like(state[bias], float("nan"))}, metadata)
    with pytest.raises(ValueError, match=r"holds weights that are NaN or infinite .*so every output would be NaN"):
        CellVAE.load(tmp_path / "m")
    rewrite(state, metadata | {"best_epoch": 1})  # a number, not the text save writes: not kept
    assert "best_epoch" not in CellVAE.load(tmp_path / "m").history.attrs
    rewrite(state, metadata | {"best_epoch": "²"})  # a digit to str.isdigit, not to int()
    assert "best_epoch" not in CellVAE.load(tmp_path / "m").history.attrs
    rewrite(state, metadata | {"best_epoch": "99"})  # no such epoch in the history
    assert "best_epoch" not in CellVAE.load(tmp_path / "m").history.attrs
    rewrite(state, "[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="is corrupt or not a safetensors file"):
        CellVAE.load(tmp_path / "m")
    rewrite(state, metadata)
    # a save killed between its two renames: the folder is gone, the model saved before it set aside
    (tmp_path / ".m.old.x1").mkdir()
    (tmp_path / "m").rename(tmp_path / ".m.old.x1" / "m")
    told = r"save into it was interrupted, and the model saved there before is in .*\.m\.old\.x1/m"
    with pytest.raises(ValueError, match=told):
        CellVAE.load(tmp_path / "m")
    (tmp_path / ".m.old.z9").mkdir()  # two saves killed so: the hint names the model saved last (not by name)
    shutil.copytree(tmp_path / ".m.old.x1" / "m", tmp_path / ".m.old.z9" / "m")
    os.utime(tmp_path / ".m.old.z9" / "m", (1e9, 1e9))
    with pytest.raises(ValueError, match=told):
        CellVAE.load(tmp_path / "m")
    shutil.rmtree(tmp_path / ".m.old.z9")
    (tmp_path / ".m.old.x1" / "m").rename(tmp_path / "m")
    os.rmdir(tmp_path / ".m.old.x1")
    (tmp_path / ".m.abcd_123").mkdir()  # what saves killed before their renames left, kept: told when saving
    (tmp_path / ".m.old.efgh4567" / "m").mkdir(parents=True)
    (tmp_path / ".m.notes").mkdir()  # (not a name save makes)
    (tmp_path / ".m.old.qwertyui").mkdir()  # where a save into a model named "m.old" writes first: not m's
    (tmp_path / ".m.old.qwertyui" / "config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"beside .*m, .m.abcd_123, .m.old.efgh4567 hold what saves into it that were killed"):
        CellVAE.load(tmp_path / "m").save(tmp_path / "m", overwrite=True)
    for name in (".m.abcd_123", ".m.old.efgh4567"):
        shutil.rmtree(tmp_path / name)
    CellVAE(adata).save(tmp_path / "m", overwrite=True, save_anndata=True)
    stored = (tmp_path / "m" / "adata.h5ad").read_bytes()
    (tmp_path / "m" / "adata.h5ad").write_bytes(stored[: len(stored) // 3])  # cut short
    with pytest.raises(ValueError, match=r"adata.h5ad, the AnnData saved with the model, cannot be read .*load_anndata=False"):
        CellVAE.load(tmp_path / "m")
    assert CellVAE.load(tmp_path / "m", load_anndata=False).adata is None


def test_a_model_saved_with_its_anndata_or_loaded_from_it_pickles_and_copies(tmp_path):
    """save(save_anndata=True) and load() remember the folder's AnnData file by weak reference: not picklable as it is."""
    adata = cellvae.datasets.simulate(n_cells=80, n_genes=30, random_state=0)
    model = CellVAE(adata, n_hidden=16)
    model.fit(max_epochs=2, progress=False)
    model.save(tmp_path / "m", save_anndata=True)
    loaded = CellVAE.load(tmp_path / "m")
    for original in (model, loaded):
        for copied in (pickle.loads(pickle.dumps(original)), copy.deepcopy(original)):
            np.testing.assert_array_equal(copied.get_latent(progress=False), original.get_latent(progress=False))
            # the copy holds the folder's data as the original does: saved back there, the data file stays
            copied.save(tmp_path / "m", overwrite=True)
            assert (tmp_path / "m" / "adata.h5ad").is_file()
    # another model's data saved there since is not the first one's: saving the first again removes it, with a word
    other = CellVAE(cellvae.datasets.simulate(n_cells=50, n_genes=30, random_state=1), n_hidden=16)
    other.save(tmp_path / "m", overwrite=True, save_anndata=True)
    with pytest.warns(UserWarning, match=r"the adata.h5ad that .* held, saved with the model this one replaced, was removed"):
        model.save(tmp_path / "m", overwrite=True)
    assert not (tmp_path / "m" / "adata.h5ad").exists()


def test_a_saved_config_names_the_cellvae_that_saved_it(tmp_path):
    """A model loaded from an older cellvae's folder and saved again (or mapped) holds fields that one may not know: the
    file says which cellvae wrote it, so that the older one asks for an upgrade rather than calling the file mistyped."""
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=20, random_state=0)
    CellVAE(adata, n_hidden=8).save(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    (tmp_path / "old" / "config.json").write_text(json.dumps(config | {"cellvae_version": "0.0.1"}))
    CellVAE.load(tmp_path / "old", adata=adata).save(tmp_path / "new")
    assert json.loads((tmp_path / "new" / "config.json").read_text())["cellvae_version"] == cellvae.__version__


def test_an_untrained_model_whose_data_gained_a_batch_is_told_to_be_built_again():
    """Not map_query, which needs a trained reference: the model took its batches when it was built."""
    adata = cellvae.datasets.simulate(n_cells=80, n_genes=20, n_batches=2, random_state=0)
    model = CellVAE(adata, batch_key="batch", n_hidden=8)
    adata.obs["batch"] = adata.obs["batch"].cat.rename_categories({adata.obs["batch"].cat.categories[0]: "renamed"})
    with pytest.raises(ValueError, match=r"categories the model was not built with: \['renamed'\].*build it again"):
        model.fit(max_epochs=1, progress=False)


def test_invalid_hyperparameters_are_rejected(two_batches):
    adata = small(two_batches)
    with pytest.raises(ValueError, match="likelihood"):
        CellVAE(adata, likelihood="gaussian")
    with pytest.raises(ValueError, match="gene-batch"):
        CellVAE(adata, dispersion="gene-batch")
    with pytest.raises(ValueError, match="n_latent"):
        CellVAE(adata, n_latent=0)
    with pytest.raises(ValueError, match=r"normalization must be one of \('layer', 'batch'\)"):
        CellVAE(adata, normalization="group")
    with no_warnings():
        with pytest.raises(ValueError, match="validation_size"):
            CellVAE(adata).fit(validation_size=1.5)


def test_numpy_booleans_are_taken_as_python_booleans(two_batches):
    model = CellVAE(small(two_batches), batch_key="batch", encode_batch=np.bool_(False))
    assert model.config.encode_batch is False


def test_scvi_tools_names_are_answered_with_the_cellvae_names(two_batches, monkeypatch, tmp_path):
    adata = small(two_batches)
    with pytest.raises(AttributeError, match=r"'setup_anndata' \(scvi-tools' setup_anndata; in cellvae: CellVAE\(adata, layer="):
        CellVAE.setup_anndata(adata, batch_key="batch")
    model = CellVAE(adata)
    with pytest.raises(AttributeError, match=r"get_latent_library_size.* observed total counts over the model's genes"):
        model.get_latent_library_size()
    with pytest.raises(AttributeError, match=r"get_feature_correlation_matrix.*np\.corrcoef\(model\.get_normalized_expression"):
        model.get_feature_correlation_matrix()
    with pytest.raises(TypeError, match=r"argument 'gene_likelihood', scvi-tools' name: use likelihood="):
        CellVAE(adata, batch_key="batch", gene_likelihood="zinb")
    with pytest.raises(TypeError, match=r"got an unexpected keyword argument 'n_hiden'$"):  # a typo: Python's own error
        CellVAE(adata, n_hiden=64)
    # advice that depends on the value: scArches' recipe turns BatchNorm off and LayerNorm on
    with pytest.raises(TypeError, match=r"'use_batch_norm', scvi-tools' name: drop it: cellvae's hidden layers use LayerNorm"):
        CellVAE(adata, use_layer_norm="both", use_batch_norm="none")
    with pytest.raises(TypeError, match=r"'use_layer_norm', scvi-tools' name: use normalization='layer' \(the default\)"):
        CellVAE(adata, use_layer_norm="both")
    with pytest.raises(TypeError, match=r"'use_batch_norm', scvi-tools' name: use normalization='batch'"):
        CellVAE(adata, use_batch_norm="both")
    with pytest.raises(TypeError, match=r"'use_layer_norm', scvi-tools' name: drop it: .*normalization='batch' uses BatchNorm"):
        CellVAE(adata, use_layer_norm="none")
    with pytest.raises(TypeError, match=r"'use_batch_norm', scvi-tools' name: cellvae has no BatchNorm in the encoder alone"):
        CellVAE(adata, use_batch_norm="encoder")
    with pytest.raises(TypeError, match=r"'deeply_inject_covariates', scvi-tools' name: drop it: cellvae gives the batch"):
        CellVAE(adata, deeply_inject_covariates=True)
    with pytest.raises(TypeError, match=r"keywords of their own, e.g. n_latent=20, likelihood='zinb', not as model_kwargs"):
        cellvae.tl.embed(adata.copy(), model_kwargs={"gene_likelihood": "nb"})
    with pytest.raises(AttributeError, match=r"scvi-tools' prepare_query_anndata; in cellvae: nothing: map_query and get_latent"):
        CellVAE.prepare_query_anndata(adata, "reference_dir")
    model = CellVAE(adata, batch_key="batch")
    with pytest.raises(TypeError, match=r"'n_epochs_kl_warmup', scvi-tools' name: give the KL warm-up, in epochs, to the model"):
        model.fit(n_epochs_kl_warmup=5)
    with pytest.raises(
        ValueError, match=r"batch_size must be a positive integer \(leave it out for the default; scvi-tools' None\)"
    ):
        model.get_latent(batch_size=None)
    with pytest.raises(ValueError, match=r"n_cells must be a positive integer, got None$"):  # (no default: no advice)
        model.generate(None)
    reads = []
    monkeypatch.setattr(cellvae.model, "train", lambda *args, **kwargs: reads.append(1))
    with pytest.raises(TypeError, match=r"CellVAE.fit\(\) got .* 'train_size', scvi-tools' name: use validation_size="):
        model.fit(train_size=0.9, max_epochs=1, progress=False)
    assert not reads and not model.is_trained  # refused before any work
    monkeypatch.undo()
    model.fit(max_epochs=1, progress=False)
    with pytest.raises(AttributeError, match=r"'get_latent_representation' \(scvi-tools' .*; in cellvae: get_latent"):
        model.get_latent_representation()
    with pytest.raises(TypeError, match=r"'give_mean', scvi-tools' name: use mean="):
        model.get_latent(give_mean=False)
    with pytest.raises(TypeError, match=r"'mc_samples', scvi-tools' name: drop it: cellvae's posterior is normal, so mean=True"):
        model.get_latent(mc_samples=100)
    with pytest.raises(TypeError, match=r"'mode', scvi-tools' name: drop it"):
        model.differential_expression(groupby="cell_type", group1="type0", mode="change")
    averaged = r"'n_samples', scvi-tools' name: drop it: cellvae decodes each cell's posterior mean, where scvi-tools' n_samples"
    with pytest.raises(TypeError, match=averaged + r".*for draws, decode model.get_latent\(adata, mean=False"):
        model.get_normalized_expression(n_samples=25, return_mean=True)
    with pytest.raises(TypeError, match=r"'n_samples_overall', scvi-tools' name: drop it: cellvae returns every cell"):
        model.get_normalized_expression(n_samples_overall=100)
    with pytest.raises(TypeError, match=r"'n_mc_samples', scvi-tools' name: use n_samples="):
        model.marginal_log_likelihood(n_mc_samples=1000)
    with pytest.raises(ValueError, match=r"1 for scvi-tools' scale, got 'latent' \(.*reads each cell's observed library size"):
        model.get_normalized_expression(library_size="latent")
    # the same scvi-tools name gets the advice of the method it is given to
    with pytest.raises(TypeError, match=r"'give_mean', scvi-tools' name: drop it: cellvae decodes each cell's posterior mean"):
        model.get_likelihood_parameters(give_mean=True)
    with pytest.raises(TypeError, match=r"'n_samples', scvi-tools' name: drop it: cellvae decodes each cell's posterior mean"):
        model.get_likelihood_parameters(n_samples=5)
    with pytest.raises(TypeError, match=r"'n_samples', scvi-tools' name: use n_draws="):
        model.differential_expression(groupby="cell_type", group1="type0", n_samples=500)
    with pytest.raises(TypeError, match=r"'pseudocounts', scvi-tools' name: use pseudocount="):
        model.differential_expression(groupby="cell_type", group1="type0", pseudocounts=1e-4)
    with pytest.raises(ValueError, match=r"^group2: group 'Rest' has no cells .*\(for every other cell pass group2=None, as in"):
        model.differential_expression(groupby="cell_type", group1="type0", group2="Rest")
    with pytest.raises(ValueError, match=r"^group1: group 'Rest' has no cells in .*\]$"):  # group1: no group2 advice
        model.differential_expression(groupby="cell_type", group1="Rest")
    with pytest.raises(TypeError, match=r"fit\(\) takes keywords only, got 1 positional; e.g. fit\(max_epochs=...\)"):
        model.fit(1)  # scvi-tools' train(max_epochs) by position
    with pytest.raises(TypeError, match=r"'dir_path', scvi-tools' name: use path="):
        model.save(dir_path="no_such_folder")
    with pytest.raises(TypeError, match=r"'dir_path', scvi-tools' name: use path="):
        CellVAE.load(dir_path="no_such_folder")
    with pytest.raises(AttributeError, match=r"'history_' \(scvi-tools' history_; in cellvae: history\)"):
        model.history_  # noqa: B018
    with pytest.raises(TypeError, match=r"'freeze_dropout', scvi-tools' name: drop it: .*dropout on"):
        model.map_query(model.adata, freeze_dropout=True)
    with pytest.raises(TypeError, match=r"^CellVAE.load\(\) takes path, adata by position .*, got 3 positional"):
        CellVAE.load("no_such_folder", None, True)  # (a classmethod's cls is not counted, as a method's self)
    with pytest.raises(TypeError, match=r"get_latent\(\) takes adata by position and the rest by keyword, got 2 positional"):
        model.get_latent(adata, True)
    with pytest.raises(TypeError, match=r"'check_val_every_n_epoch', scvi-tools' name: drop it: .*after every epoch"):
        model.fit(max_epochs=1, check_val_every_n_epoch=1)
    with pytest.raises(TypeError, match=r"'latent_distribution', scvi-tools' name: drop it: .*normal"):
        CellVAE(adata, latent_distribution="ln")
    model.save(tmp_path / "saved")
    for argument in ("accelerator", "device"):  # scvi-tools' load(dir_path, adata, accelerator=..., device=...)
        with pytest.raises(TypeError, match=rf"'{argument}', scvi-tools' name: drop it: load puts the model on the CPU"):
            CellVAE.load(tmp_path / "saved", adata, **{argument: "cpu"})
    with pytest.raises(TypeError, match=r"'prefix', scvi-tools' name: drop it: a cellvae model folder holds one model"):
        CellVAE.load(tmp_path / "saved", prefix="reference_")
    assert CellVAE.load(tmp_path / "saved", adata).device.type == "cpu"  # as told
    # more of scvi-tools 1.x's spellings, each answered where it is given
    refused = [
        (lambda: model.save(tmp_path / "other", prefix="ref_"), r"'prefix', .*: drop it: a cellvae model folder holds one"),
        (lambda: model.fit(devices=1), r"'devices', .*: use device= for one device"),
        (lambda: model.fit(use_gpu=False), r"'use_gpu', .*: use device= \('cuda', 'auto' or 'cpu'\)"),
        (lambda: model.fit(early_stopping_monitor="elbo_validation"), r"'early_stopping_monitor', .*validation loss"),
        (lambda: model.fit(early_stopping_min_delta=0.0), r"'early_stopping_min_delta', .*: drop it"),
        (lambda: model.fit(datasplitter_kwargs={}), r"'datasplitter_kwargs', .*validation_size="),
        (lambda: model.fit(shuffle_set_split=True), r"'shuffle_set_split', .*random_state="),
        (lambda: model.fit(load_sparse_tensor=True), r"'load_sparse_tensor', .*: drop it"),
        (lambda: CellVAE(adata, use_observed_lib_size=True), r"'use_observed_lib_size', .*observed total counts"),
        (lambda: CellVAE(adata, batch_representation="one-hot"), r"'batch_representation', .*one-hot"),
        (lambda: model.marginal_log_likelihood(return_mean=True), r"'return_mean', .*one value per cell; \.mean\(\)"),
        (lambda: model.rate_distortion(return_mean=True), r"'return_mean', .*one row per cell; \.mean\(\)"),
        (lambda: model.differential_expression(groupby="cell_type", group1="type0", two_sided=True), r"'two_sided', .*"),
        (lambda: model.differential_expression(groupby="cell_type", group1="type0", test_mode="two"), r"'test_mode', .*"),
        (lambda: cellvae.tl.embed(adata.copy(), use_gpu=False), r"^embed\(\) .* 'use_gpu', .*fit_kwargs=\{\.\.\.\}"),
        (lambda: model.map_query(adata, 5), r"map_query\(\) takes .*; e.g. map_query\(max_epochs=\.\.\.\)$"),
        (lambda: model.map_query(adata, datasplitter_kwargs={}), r"'datasplitter_kwargs', .*: drop it: validation_size= is"),
        (lambda: model.map_query(adata, load_sparse_tensor=True), r"'load_sparse_tensor', .*: drop it"),
        (lambda: CellVAE.load(tmp_path / "saved", use_gpu=True), r"'use_gpu', .*: drop it: load puts the model on the CPU"),
        (lambda: CellVAE(adata, use_observed_lib_size=False), r"'use_observed_lib_size', .*: cellvae has no learnt library"),
        (lambda: CellVAE(adata, batch_representation="embedding"), r"'batch_representation', .*no learnt batch embedding"),
        (lambda: CellVAE(adata, use_observed_lib_size=0), r"'use_observed_lib_size', .*: cellvae has no learnt library"),
        (lambda: CellVAE(adata, use_observed_lib_size=np.False_), r"'use_observed_lib_size', .*: cellvae has no learnt"),
        (lambda: CellVAE(adata, use_observed_lib_size=0.0), r"'use_observed_lib_size', .*: cellvae has no learnt"),
        (lambda: CellVAE(adata, use_batch_norm=np.array(False)), r"'use_batch_norm', .*: drop it: cellvae's hidden layers"),
        (
            lambda: CellVAE(adata, use_layer_norm="encoder"),
            r"'use_layer_norm', .*: cellvae has no LayerNorm in the encoder alone",
        ),
        (lambda: CellVAE(adata, use_batch_norm=False), r"'use_batch_norm', .*: drop it: cellvae's hidden layers use LayerNorm"),
        (lambda: model.fit(adata=adata), r"fit\(\) got an unexpected keyword argument 'adata'$"),  # (the AnnData not read)
        (lambda: CellVAE(adata, use_batch_norm=[[1], [1, 2]]), r"'use_batch_norm', scvi-tools' name: use normalization="),
        (lambda: cellvae.tl.embed(adata.copy(), early_stopping_monitor="x"), r"validation loss \(its negative ELBO per cell\)$"),
    ]
    for call, message in refused:
        with pytest.raises(TypeError, match=message):
            call()
    assert not (tmp_path / "other").exists()
    # scArches' and scANVI's spellings
    with pytest.raises(TypeError, match=r"'plan_kwargs', scvi-tools' name: give lr= to map_query itself"):
        model.map_query(adata, plan_kwargs={"weight_decay": 0.0})
    with pytest.raises(TypeError, match=r"'unfrozen', scvi-tools' name: .*train_input_layer=True also trains"):
        model.map_query(adata, unfrozen=True)
    with pytest.raises(TypeError, match=r"'silent', scvi-tools' name: use progress=False"):
        model.get_normalized_expression(silent=True)
    with pytest.raises(TypeError, match=r"'labels_key', scvi-tools' name: cellvae has no scANVI"):
        CellVAE(adata, labels_key="cell_type")
    with pytest.raises(AttributeError, match=r"scvi-tools' predict; in cellvae: cellvae.tl.transfer_labels"):
        model.predict()
    scvi_folder = tmp_path / "scvi_model"
    scvi_folder.mkdir()
    (scvi_folder / "model.pt").write_bytes(b"a pickle that is never opened")
    with pytest.raises(ValueError, match=r"holds an scvi-tools model \(model.pt\), not a cellvae one"):
        CellVAE.load(scvi_folder)
    # no advice naming an option the method lacks: Python's own error
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'labels_key'$"):
        model.get_latent(labels_key="cell_type")
    with pytest.raises(AttributeError, match=r"^'CellVAE' object has no attribute 'nothing_like_this'$"):
        model.nothing_like_this  # noqa: B018
    assert not hasattr(model, "train") and hasattr(model, "fit")
    np.testing.assert_array_equal(copy.deepcopy(model).get_latent(), model.get_latent())


def test_linear_decoder_loadings_are_how_decoded_log_expression_moves_with_z(two_batches, tmp_path):
    adata = two_batches[:400].copy()
    model = CellVAE(adata, batch_key="batch", decoder="linear", likelihood="zinb", dispersion="gene-cell")
    with pytest.raises(ValueError, match=r"get_loadings reads a trained decoder's weights; call model.fit\(\) first"):
        model.get_loadings()
    model.fit(max_epochs=5, random_state=0, progress=False)
    assert "likelihood='zinb', decoder='linear', batch_key='batch'" in repr(model)
    loadings = model.get_loadings()
    assert loadings.shape == (adata.n_vars, 10) and list(loadings.columns) == [f"Z_{i}" for i in range(10)]
    assert list(loadings.index) == list(adata.var_names)
    # moving z moves every gene's log expression by its loadings, plus one shift shared by all genes (the
    # normalisation over genes): the meaning a user reads the loadings with
    z = np.random.default_rng(0).normal(size=(2, 10)).astype(np.float32)
    batch = adata.obs["batch"].cat.categories[1]
    log_expression = np.log(model.decode(z, batch=batch).astype(np.float64))
    moved = log_expression[1] - log_expression[0] - loadings.to_numpy() @ (z[1] - z[0])
    assert np.ptp(moved) < 1e-3 and np.ptp(loadings.to_numpy() @ (z[1] - z[0])) > 0.1
    model.save(tmp_path / "linear")
    assert json.loads((tmp_path / "linear" / "config.json").read_text())["decoder"] == "linear"
    loaded = CellVAE.load(tmp_path / "linear")
    pd.testing.assert_frame_equal(loaded.get_loadings(), loadings)
    np.testing.assert_array_equal(loaded.decode(z, batch=batch), model.decode(z, batch=batch))
    # a decoder with hidden layers has no loadings; its config is written without the field, as before it existed
    default = CellVAE(adata, batch_key="batch").fit(max_epochs=1, random_state=0, progress=False)
    with pytest.raises(
        ValueError,
        match=r"this model's decoder is 'mlp' \(hidden layers\): build the model with CellVAE\(adata, decoder='linear'\)",
    ):
        default.get_loadings()
    default.save(tmp_path / "mlp")
    assert "decoder" not in json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert CellVAE.load(tmp_path / "mlp").config.decoder == "mlp"
    with pytest.raises(ValueError, match=r"decoder must be one of \('mlp', 'linear'\), got 'nonlinear'"):
        CellVAE(adata, decoder="nonlinear")


def test_dropout_of_one_is_refused():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        cellvae.CellVAE(adata, dropout=1.0)


def test_a_fraction_far_from_round_off_is_called_non_integer_not_round_off():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0, sparse=False)
    adata.X[0, 0] = 2.05  # e.g. ambient-corrected counts: a real fraction, not float round-off
    with pytest.raises(ValueError, match=r"adata\.X has non-integer values \(e\.g\. 2\.05"):
        cellvae.CellVAE(adata)


def test_rounding_advice_rounds_the_matrix_that_was_checked_into_a_layer_it_does_not_replace():
    """An audit: estimated counts in layers['counts'] beside log-normalised X were told np.rint(adata.X) into that layer,
    which then passed every check as counts."""
    adata = cellvae.datasets.simulate(n_cells=100, n_genes=30, random_state=0)
    adata.layers["counts"] = adata.X * 1.3  # estimated counts
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with pytest.raises(ValueError) as told:
        CellVAE(adata, layer="counts")
    assert "adata.layers['counts_rounded'] = np.rint(adata.layers['counts'])" in str(told.value)
    assert "np.rint(adata.X)" not in str(told.value) and "e.g. layer='counts'" not in str(told.value)
    from cellvae.cli import in_command_line_terms

    in_shell = in_command_line_terms(str(told.value), argparse.Namespace(input="est.h5ad"))  # one note, not two
    assert in_shell.count("(on the command line:") == 1 and in_shell.endswith("--layer NAME, the layer that holds the counts)")
    estimated = cellvae.datasets.simulate(n_cells=100, n_genes=30, random_state=0)
    estimated.X = estimated.X * 1.3
    rounding = r"If these are estimated .* adata.layers\[.counts.\] = np.rint\(adata.X\) \(dense or sparse\), and build the model"
    with pytest.raises(ValueError, match=r"Here neither a layer .* before normalising\. " + rounding):
        CellVAE(estimated)


def test_log_normalised_values_are_not_told_to_be_rounded_and_rounded_ones_are_warned_about():
    """Rounding is advice for estimated counts only: log1p values rounded would pass every check of whole counts."""
    adata = shared_dataset("kang_ifnb_muscat_example.h5ad")
    counts = adata.X.copy()
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    with pytest.raises(ValueError, match=r"looks normalised or log-transformed.*do not round log-transformed values") as told:
        CellVAE(adata)
    assert "np.rint" not in str(told.value)
    adata.layers["rounded"] = np.rint(adata.X)
    with pytest.warns(UserWarning, match=r"the largest of [\d,]+ non-zero values sampled from adata.layers\['rounded'\] is 7"):
        CellVAE(adata, layer="rounded")
    adata.layers["counts"] = counts  # raw counts, however shallow, have larger ones
    shallow = ad.AnnData(counts.copy(), obs=adata.obs)
    sc.pp.downsample_counts(shallow, counts_per_cell=200, random_state=0)
    binary = ad.AnnData((counts > 0).astype(np.float32), obs=adata.obs)  # 0/1 data (e.g. binarised peaks): no log values
    with no_warnings():
        CellVAE(adata, layer="counts")
        CellVAE(shallow)
        CellVAE(binary)


def test_scaled_counts_between_20_and_thousands_are_called_normalised():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0, sparse=False)
    adata.X = adata.X / adata.X.sum(1, keepdims=True) * 1000.0  # per-mille of each cell's counts: fractions up to ~1000
    assert 20 < adata.X.max() < 1000
    with pytest.raises(ValueError, match=r"looks normalised \(normalize_total, CPM or TPM\)"):
        cellvae.CellVAE(adata)


def test_integer_counts_of_minus_one_are_refused():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0, sparse=False)
    adata.X = adata.X.astype(np.int32)
    adata.X[0, 0] = -1
    with pytest.raises(ValueError, match=r"adata\.X has negative values \(min -1\)"):
        cellvae.CellVAE(adata)


def test_unseen_categories_beside_a_0_or_1_are_not_told_to_become_booleans():
    """A flag covariate trained as True/False, read with "1" beside a truly new category "x": converting to bool
    cannot help, so the advice is the general one, not astype(bool)."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, random_state=0)
    adata.obs["flag"] = np.arange(adata.n_obs) % 2 == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(adata, categorical_covariate_keys=["flag"], n_hidden=16).fit(max_epochs=1, progress=False)
    other = adata.copy()
    other.obs["flag"] = np.where(np.arange(other.n_obs) % 2 == 0, "1", "x")
    with pytest.raises(ValueError, match="unseen in training") as error:
        model.get_latent(other, progress=False)
    assert "astype(bool)" not in str(error.value)


def test_the_compute_dtype_applies_to_every_gene_wide_layer_while_training_and_to_none_in_evaluation():
    vae, counts, covariates, library, batch_index = simulated_module(likelihood="zinb", dispersion="gene-cell")

    z = torch.randn(len(counts), vae.config.n_latent, generator=torch.Generator().manual_seed(0))

    def outputs():
        q = vae.inference(counts, covariates, sample=False)
        p = vae.generative(z, covariates, library, batch_index)
        return {"mean": q["mean"], "log_mean": p.log_mean, "theta": p.theta, "zi_logits": p.zi_logits}

    with torch.no_grad():
        vae.eval()
        reference = outputs()
        vae.set_compute_dtype(torch.bfloat16)
        evaluated = outputs()
        vae.train()
        trained = outputs()
        vae.set_compute_dtype(None)
    assert len([m for m in vae.modules() if isinstance(m, GeneLinear)]) == 4  # input layer and three decoder heads
    for name, value in reference.items():
        assert torch.equal(evaluated[name], value), name  # evaluation always multiplies in float32
        assert trained[name].dtype == torch.float32 and not torch.equal(trained[name], value), name


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_the_decoders_theta_stays_between_e_to_the_minus_12_and_e_to_the_12(dispersion):
    vae, counts, covariates, library, batch_index = simulated_module(dispersion=dispersion)
    with torch.no_grad():
        vae.decoder.log_theta[..., :25] = 30.0
        vae.decoder.log_theta[..., 25:] = -30.0
        theta = vae.generative(torch.zeros(len(counts), vae.config.n_latent), covariates, library, batch_index).theta
    expected = torch.cat([torch.full((25,), np.exp(12.0)), torch.full((25,), np.exp(-12.0))])
    torch.testing.assert_close(theta.expand(len(counts), -1), expected.expand(len(counts), -1))


def test_every_hidden_layer_sees_the_covariates():
    vae, counts, covariates, library, batch_index = simulated_module(n_layers=2)
    vae.eval()
    with torch.no_grad():
        for body, width in ((vae.encoder.body, vae.config.n_genes), (vae.decoder.body, vae.config.n_latent)):
            body.linears[0].weight[:, width:] = 0.0  # the first layer ignores the covariates
            h = torch.randn(len(counts), width, generator=torch.Generator().manual_seed(0))
            other = covariates.flip(-1)
            assert not torch.allclose(body(h, covariates), body(h, other))  # the second layer still sees them


def test_only_batchnorm_that_trains_its_statistics_needs_two_cells():
    vae = simulated_module(normalization="batch")[0]
    assert vae.needs_two_cells
    vae.frozen_statistics = True  # map_query: the reference's running statistics normalise one cell as well as many
    assert not vae.needs_two_cells
    assert not simulated_module(normalization="layer")[0].needs_two_cells


def test_the_encoder_reads_log1p_of_the_counts():
    vae, counts, covariates = simulated_module()[:3]
    vae.eval()
    with torch.no_grad():
        mean, log_variance = vae.encoder(counts, covariates)
        hidden = vae.encoder.body(torch.log1p(counts), covariates)
        torch.testing.assert_close(mean, vae.encoder.mean(hidden))
        torch.testing.assert_close(log_variance, vae.encoder.scale(hidden).clamp(-15.0, 15.0))


def test_the_ends_of_the_documented_ranges_are_accepted():
    adata = cellvae.datasets.simulate(n_cells=50, n_genes=20, n_batches=2, random_state=0)
    config = CellVAE(adata, batch_key="batch", beta=0.0, kl_warmup=0, free_bits=MAX_WEIGHT, batch_mmd=MAX_WEIGHT).config
    assert (config.beta, config.kl_warmup, config.free_bits, config.batch_mmd) == (0.0, 0, MAX_WEIGHT, MAX_WEIGHT)


def test_seen_validation_cells_after_renaming_or_with_repeated_names_are_told_as_they_can_be():
    """A review: cells renamed (none filtered) lost the warning, and repeated names after filtering were overcounted."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=0)
    model = CellVAE(adata, n_hidden=16).fit(max_epochs=1, progress=False, random_state=0)
    seen = np.intersect1d(model.train_indices, model.fit(max_epochs=1, progress=False, random_state=1).validation_indices)
    model.fit(max_epochs=1, progress=False, random_state=0)
    adata.obs_names = "renamed_" + adata.obs_names  # the same cells: matched by position
    with pytest.warns(UserWarning, match=rf"^{len(seen)} of this fit's 30 validation cells were training cells"):
        model.fit(max_epochs=1, progress=False, random_state=1)
    adata.obs_names = [f"c{i % 150}" for i in range(300)]  # repeated names (anndata.concat without index_unique)
    model.fit(max_epochs=1, progress=False, random_state=0)
    adata.obs_names_make_unique()  # anndata's advice: the same cells, matched by position (a review: called filtered)
    with no_warnings():
        model.fit(max_epochs=1, progress=False, random_state=0)
    # cells of another sample added (ad.concat): matched by name, counted exactly
    others = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=1)
    others.obs_names = "other_" + others.obs_names
    model.fit(max_epochs=1, progress=False, random_state=0)
    trained_on = adata.obs_names[model.train_indices]
    model.adata = ad.concat([adata, others])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(max_epochs=1, progress=False, random_state=1)
    overlap = model.adata.obs_names[model.validation_indices].isin(trained_on).sum()
    assert [str(w.message) for w in caught][0].startswith(f"{overlap} of this fit's 60 validation cells were training")
    # half of them replaced by other cells, or renumbered: which cells are the earlier fit's cannot be told (a review:
    # counted by position, silently 0 with the strict bar; another: renumbered cells counted by name, 29 of 30)
    match = r"validation cells may include cells the earlier fit trained on: the cells' names changed since .*new CellVAE$"
    adata.obs_names = [str(i) for i in range(300)]  # (anndata's default names)
    renumbered = adata.copy()
    renumbered.obs_names = [str(i + 1) for i in range(300)]
    for changed in (ad.concat([adata[150:], others[:150]]), renumbered):
        model.adata = adata
        model.fit(max_epochs=1, progress=False, random_state=0)
        model.adata = changed
        with pytest.warns(UserWarning, match=match):
            model.fit(max_epochs=1, progress=False, random_state=0)
    from cellvae.model import _made_unique

    assert _made_unique(pd.Index(["a", "a", "b-1", "b-1"]), pd.Index(["a", "a-1", "b-1", "b-1-1"]))
    assert not _made_unique(pd.Index(["a", "a"]), pd.Index(["a-b-c", "a-zzz"]))  # not anndata's suffixes
    model.adata = adata
    adata.obs_names = [f"c{i % 150}" for i in range(300)]
    model.fit(max_epochs=1, progress=False, random_state=0)
    adata._inplace_subset_obs(np.arange(1, 300))
    with pytest.warns(UserWarning, match=match):
        model.fit(max_epochs=1, progress=False, random_state=0)
    adata.obs_names = [f"cell{i}" for i in range(adata.n_obs)]
    model.fit(max_epochs=1, progress=False, random_state=0)
    adata._inplace_subset_obs(np.arange(1, 299))
    adata.obs_names = "s1_" + adata.obs_names  # filtered, then renamed: no name to match (a review: told none seen)
    with pytest.warns(UserWarning, match=match):
        model.fit(max_epochs=1, progress=False, random_state=1)


def test_the_cells_fit_trained_and_validated_on_are_named_as_in_scvi_tools(two_batches, tmp_path):
    adata = two_batches[:400].copy()
    adata.X[:3] = 0  # empty cells: in neither set
    model = CellVAE(adata, batch_key="batch")
    assert model.train_indices is None and model.validation_indices is None
    model.fit(max_epochs=5, progress=False, random_state=0)
    train, validation = model.train_indices, model.validation_indices
    assert np.all(np.diff(train) > 0) and np.all(np.diff(validation) > 0)
    np.testing.assert_array_equal(np.union1d(train, validation), np.arange(3, 400))
    assert len(validation) == 40 and not np.intersect1d(train, validation).size
    # the held-out cells are those history's validation columns were measured on (the kept epoch's weights)
    kept = model.history.set_index("epoch").loc[model.history.attrs["best_epoch"]]
    measured = model.rate_distortion(adata[validation], n_samples=16, progress=False)["elbo"].mean()
    np.testing.assert_allclose(measured, kept["validation_elbo"], rtol=0.01)
    again = CellVAE(adata, batch_key="batch").fit(max_epochs=1, progress=False, random_state=0)
    np.testing.assert_array_equal(again.validation_indices, validation)  # drawn from random_state
    model.save(tmp_path / "m")
    assert CellVAE.load(tmp_path / "m").validation_indices is None  # not saved
    # a further fit validating on cells the earlier one trained on is told so, with the seed that keeps them apart
    with no_warnings():
        warnings.filterwarnings("ignore", message="3 cells have zero total counts")
        again.fit(max_epochs=1, progress=False, random_state=0)
    with pytest.warns(
        UserWarning,
        match=r"^3\d of this fit's 40 validation cells were training cells of the earlier fit, .*"
        r"random_state=0 and its validation_size \(it held out 10\.\d% of the cells\)$",
    ):
        again.fit(max_epochs=1, progress=False, random_state=1)
    with pytest.warns(UserWarning, match=r"the earlier fit held out no cells \(validation_size=0\), so none are left unseen"):
        again.fit(max_epochs=1, progress=False, validation_size=0.0).fit(max_epochs=1, progress=False)
    # cells filtered in place since (sc.pp.filter_cells): the earlier training cells are matched by name, not position
    again.fit(max_epochs=1, progress=False, random_state=0)
    trained_on = adata.obs_names[again.train_indices]
    adata._inplace_subset_obs(np.arange(3, 400, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        again.fit(max_epochs=1, progress=False, random_state=0)
    overlap = adata.obs_names[again.validation_indices].isin(trained_on).sum()
    told = [str(w.message) for w in caught if "validation cells were training cells" in str(w.message)]
    assert len(told) == 1 and told[0].startswith(f"{overlap} of this fit's {len(again.validation_indices)} validation")
    assert told[0].endswith(
        "the cells have changed since the earlier fit (filtered, reordered, added to or renamed), so its validation "
        "cells cannot be drawn again: to judge on unseen cells only, fit a new CellVAE"
    )
