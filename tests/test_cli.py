"""The `cellvae` command line: demo, fit, embed and map write what they promise."""

import argparse
import ast
import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import h5py
import matplotlib
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
import zarr

import cellvae
import cellvae.model  # before any test patches cellvae.train: model.py binds its names on import
import cellvae.train
from cellvae.cli import _write as write_output
from cellvae.cli import build_parser, in_command_line_terms, main
from cellvae.data import layer_names


def fit_args(tmp_path, n_cells: int, n_genes: int) -> list[str]:
    """`cellvae fit` of simulated counts written to tmp_path/in.h5ad, writing out.h5ad and model/ beside it."""
    cellvae.datasets.simulate(n_cells=n_cells, n_genes=n_genes, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    return ["fit", str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]


def test_fit_says_it_replaced_the_inputs_graph_umap_and_clusters(tmp_path, capsys):
    """A scanpy user's file holds a PCA graph, UMAP and Leiden clusters: the output's are the embedding's, and fit says
    so (it printed only what it wrote)."""
    args = fit_args(tmp_path, 150, 30)
    assert main([*args, "--epochs", "1", "--quiet"]) == 0
    assert "replacing" not in capsys.readouterr().out  # (a file without them: nothing replaced)
    shutil.copy(tmp_path / "out.h5ad", tmp_path / "in.h5ad")
    assert main([*args, "--epochs", "1", "--quiet", "--overwrite"]) == 0
    told = capsys.readouterr().out
    assert told.endswith("UMAP, leiden; replacing the input's neighbours graph, UMAP, leiden clusters)\n")
    assert main([*args, "--epochs", "1", "--quiet", "--overwrite", "--embedding-only"]) == 0
    assert "replacing" not in capsys.readouterr().out


def test_help_lists_the_commands_without_loading_torch():
    result = subprocess.run([sys.executable, "-m", "cellvae.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("demo", "fit", "embed", "map"):
        assert command in result.stdout
    # the package loads its parts on first use: help and argument errors do not wait for torch and scanpy
    code = "import sys, cellvae, cellvae.cli; cellvae.cli.build_parser(); print(sorted({'torch', 'scanpy'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert callable(cellvae.CellVAE) and callable(cellvae.tl.embed) and "CellVAE" in dir(cellvae)
    assert {"importlib", "TYPE_CHECKING", "annotations"}.isdisjoint(dir(cellvae))  # (completion offers no imports)


def test_demo_writes_embedding_and_plots(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), "--epochs", "5", "--seed", "3", "--quiet"]) == 0
    adata = ad.read_h5ad(out / "pbmc68k.h5ad")
    assert adata.obsm["X_cellvae"].shape == (700, 10)
    assert adata.uns["cellvae"]["params"]["random_state"] == 3 and adata.uns["cellvae"]["params"]["epochs_trained"] <= 5
    assert {"X_umap"} <= set(adata.obsm) and "leiden" in adata.obs
    for png in ("umap_cell_type.png", "training_history.png"):
        assert (out / png).stat().st_size > 10_000
    assert str(out / "umap_cell_type.png") in capsys.readouterr().out
    assert matplotlib.pyplot.get_fignums() == []  # from Python (a notebook), no figure left open to be shown


def test_demo_refuses_an_out_dir_it_cannot_use_before_training(tmp_path, monkeypatch):
    monkeypatch.setattr(cellvae.tl, "embed", lambda *a, **k: pytest.fail("trained before refusing"))
    (tmp_path / "file").write_text("notes")
    with pytest.raises(SystemExit, match=r"--out-dir .*file/demo cannot be made: .*file is a file"):
        main(["demo", "--out-dir", str(tmp_path / "file" / "demo")])
    (tmp_path / "mine" / "model").mkdir(parents=True)
    (tmp_path / "mine" / "model" / "notes.txt").write_text("notes")
    (tmp_path / "mine" / "pbmc68k.h5ad").write_text("precious")
    not_a_model = r"mine/model is a folder holding other files than a model's \(notes.txt\), not a saved cellvae model"
    with pytest.raises(SystemExit, match=not_a_model + ".*another --out-dir"):
        main(["demo", "--out-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "pbmc68k.h5ad").read_text() == "precious"
    (tmp_path / "filed").mkdir()
    (tmp_path / "filed" / "model").write_text("notes")
    with pytest.raises(SystemExit, match=r"filed/model is a file, where the demo saves its model"):
        main(["demo", "--out-dir", str(tmp_path / "filed")])


def test_fit_then_embed(tmp_path):
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    data.layers["counts"] = data.X.copy()
    data.write_h5ad(tmp_path / "in.h5ad")
    args = ["fit", str(tmp_path / "in.h5ad"), "--layer", "counts", "--batch-key", "batch"]
    args += [
        "--out",
        str(tmp_path / "out.h5ad"),
        "--model-dir",
        str(tmp_path / "model"),
        "--epochs",
        "3",
        "--seed",
        "1",
        "--quiet",
    ]
    matplotlib.use("svg")  # main() called from Python (a notebook, say) keeps the caller's backend
    try:
        assert main(args) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use("Agg")
    fitted = ad.read_h5ad(tmp_path / "out.h5ad")
    assert fitted.obsm["X_cellvae"].shape == (300, 10) and "X_umap" in fitted.obsm and "leiden" in fitted.obs
    # the clusters are those of the README's pipeline on the same embedding (Leiden before UMAP, which edits the graph)
    notebook = ad.AnnData(obs=fitted.obs[[]], obsm={"X_cellvae": fitted.obsm["X_cellvae"]})
    sc.pp.neighbors(notebook, use_rep="X_cellvae", random_state=1)
    sc.tl.leiden(notebook, random_state=1, flavor="igraph", n_iterations=2, directed=False)
    assert (notebook.obs["leiden"].to_numpy() == fitted.obs["leiden"].to_numpy()).all()
    sc.tl.umap(notebook, random_state=1)  # and so is the UMAP, with the --seed given
    np.testing.assert_allclose(fitted.obsm["X_umap"], notebook.obsm["X_umap"], rtol=1e-5, atol=1e-5)
    assert (
        main(["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e.h5ad")]) == 0
    )
    embedded = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(embedded.obsm["X_cellvae"], fitted.obsm["X_cellvae"], rtol=1e-5, atol=1e-6)
    assert embedded.uns["cellvae"]["params"]["layer"] == "counts"
    # --layer naming values that are no counts: the advice is the option's, not a fix in Python
    normalised = data.copy()
    sc.pp.normalize_total(normalised)
    sc.pp.log1p(normalised)
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    embed_x = ["embed", str(tmp_path / "normalised.h5ad"), "--model-dir", str(tmp_path / "model"), "--layer", "X"]
    told = r"adata.X has non-integer values .*, so --layer X gives no counts: leave out --layer: the model reads its"
    with pytest.raises(SystemExit, match=told + r" counts from adata.layers\['counts'\], which holds whole counts$"):
        main([*embed_x, "--out", str(tmp_path / "n.h5ad")])
    normalised.layers["estimated"] = normalised.layers["counts"] * 1.37  # e.g. salmon's: rounding is the advice
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    embed_estimated = [*embed_x[:-1], "estimated", "--out", str(tmp_path / "n.h5ad")]
    with pytest.raises(SystemExit, match=r"so --layer estimated gives no counts: leave out --layer: .* whole counts$"):
        main(embed_estimated)  # the model's own counts are there: no rounding of estimates
    del normalised.layers["counts"]
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    rounding = r"which this file lacks\)\. If these are estimated .* adata.layers\['rounded'\] = "
    rounding += r"np.rint\(adata.layers\['estimated'\]\), write the file and pass --layer rounded$"
    with pytest.raises(SystemExit, match=rounding):
        main(embed_estimated)
    # counts with round-off in the layer --layer names: rounded in the file, then read from that layer again
    normalised.layers["estimated"] = data.layers["counts"].multiply(1.37).multiply(1 / 1.37).tocsr()
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    with pytest.raises(SystemExit) as refused:
        main(embed_estimated)
    assert "adata.layers['estimated'] = np.rint(adata.layers['estimated'])\n" in str(refused.value)
    assert str(refused.value).endswith("then run cellvae on FIXED.h5ad with --layer estimated again)")
    # a training AnnData saved in the model's folder (save_anndata=True) is not read to embed other cells
    (tmp_path / "model" / "adata.h5ad").write_text("an atlas, or a damaged file: embed needs only the weights")
    embed_again = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e2.h5ad")]
    assert main(embed_again) == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "e2.h5ad").obsm["X_cellvae"], embedded.obsm["X_cellvae"])
    assert cellvae.CellVAE.load(tmp_path / "model", load_anndata=False).adata is None
    # --backed streams the model's layer from disk and writes the same embedding and the input's data
    backed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--backed"]
    assert main([*backed, "--out", str(tmp_path / "b.h5ad")]) == 0
    streamed = ad.read_h5ad(tmp_path / "b.h5ad")
    np.testing.assert_array_equal(streamed.obsm["X_cellvae"], embedded.obsm["X_cellvae"])
    assert (streamed.layers["counts"] != data.layers["counts"]).nnz == 0
    with pytest.raises(SystemExit, match="--out is the input file"):
        main([*backed, "--out", str(tmp_path / "in.h5ad")])
    # a file with the counts in X only: refused with the way out, then read with --layer X (in memory or streamed)
    ad.AnnData(X=data.layers["counts"], obs=data.obs, var=data.var).write_h5ad(tmp_path / "x.h5ad")
    in_x = ["embed", str(tmp_path / "x.h5ad"), "--model-dir", str(tmp_path / "model")]
    with pytest.raises(SystemExit, match=r"no layers\['counts'\].*--layer X \(layers here: \[\]\)"):
        main([*in_x, "--out", str(tmp_path / "x_out.h5ad")])
    assert not (tmp_path / "x_out.h5ad").exists()
    for streamed in ([], ["--backed"]):
        assert main([*in_x, *streamed, "--layer", "X", "--out", str(tmp_path / "x_out.h5ad"), "--overwrite"]) == 0
        from_x = ad.read_h5ad(tmp_path / "x_out.h5ad")
        np.testing.assert_array_equal(from_x.obsm["X_cellvae"], embedded.obsm["X_cellvae"])
        assert layer_names(from_x) == [] and list(from_x.obs.columns) == list(data.obs.columns)
        assert from_x.uns["cellvae"]["params"]["layer"] is None  # read from X (as tl.embed records it), not the model's layer
    # log-normalised values in X, read with --layer X: the error names X, not the layer the model was trained on
    logged = ad.AnnData(X=data.layers["counts"].astype(np.float32), obs=data.obs, var=data.var)
    logged.X.data = np.log1p(logged.X.data)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    logged_args = ["embed", str(tmp_path / "logged.h5ad"), "--model-dir", str(tmp_path / "model"), "--layer", "X"]
    with pytest.raises(SystemExit, match=r"error: adata.X has non-integer values"):
        main([*logged_args, "--out", str(tmp_path / "logged_out.h5ad")])
    # an --out inside the model folder would replace the model's own files
    model_file = tmp_path / "model" / "config.json"
    before = model_file.read_bytes()
    with pytest.raises(SystemExit, match="--out must not be --model-dir or inside it"):
        main(
            ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(model_file), "--overwrite"]
        )
    assert model_file.read_bytes() == before


def test_a_seed_out_of_range_is_refused_by_the_parser_before_the_input_is_read(tmp_path, capsys):
    for command in (["demo"], ["fit", "missing.h5ad", "--out", "o.h5ad", "--model-dir", "m"]):
        with pytest.raises(SystemExit) as stopped:
            main([*command, "--seed", "-1"])
        assert stopped.value.code == 2 and "--seed: must be a whole number from 0 to 4294967295" in capsys.readouterr().err


def test_an_apple_gpus_out_of_memory_error_is_one_line_in_the_shell(tmp_path, monkeypatch):
    """On MPS running out of memory is a plain RuntimeError: told in one line as CUDA's is, not as a traceback."""
    data = cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0)
    data.write_h5ad(tmp_path / "in.h5ad")
    cellvae.CellVAE(data).save(tmp_path / "model")
    monkeypatch.setattr(cellvae.CellVAE, "get_latent", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(
        "MPS backend out of memory (MPS allocated: 8.00 GB, other allocations: 1.00 GB, max allowed: 9.07 GB)")))  # fmt: skip
    embed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.h5ad")]
    with pytest.raises(SystemExit, match=r"^error: MPS backend out of memory"):
        main(embed)
    monkeypatch.setattr(cellvae.CellVAE, "get_latent", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):  # any other RuntimeError keeps its traceback
        main(embed)


def test_python_advice_in_warnings_and_errors_names_the_command_line_options():

    told = in_command_line_terms(
        "reads: try CellVAE(..., dispersion='gene-cell') and compare; Map new batches with model.map_query(...)"
    )
    assert "(on the command line: --dispersion gene-cell sets dispersion='gene-cell')" in told
    assert "(on the command line: cellvae map NEW.h5ad --model-dir MODEL --out OUT.h5ad maps new batches" in told
    assert in_command_line_terms("use device='auto' or 'cpu'") == "use --device auto or --device cpu"
    assert in_command_line_terms("adata.layers['counts'] holds whole counts: pass layer='counts'").startswith(
        "adata.layers['counts'] holds whole counts: pass --layer counts"
    )
    assert "pass --layer 'raw counts'" in in_command_line_terms("pass layer='raw counts'")  # quoted for the shell
    # out of memory: the options that need less of it (no --n-hidden on the command line), not map_query's note
    mapping = "ran out of memory training with batch_size=64; pass a smaller batch_size (e.g. map_query(query_adata, "
    assert in_command_line_terms(mapping + "batch_size=32)), or device='cpu'").endswith(
        "batch_size=64; pass a smaller --batch-size (e.g. --batch-size 32) or --device cpu"
    )
    fitting = (
        "ran out of memory training with batch_size=64; pass a smaller batch_size (e.g. fit(batch_size=32)), a smaller n_hidden"
    )
    assert in_command_line_terms(fitting).endswith("pass a smaller --batch-size (e.g. --batch-size 32)")
    # cellvae's key_added is --key-added; scanpy's, in a call to scanpy, stays as it is
    graph = "sc.pp.neighbors(..., key_added='cellvae') wrote it; key_added='X_umap' is taken: choose another key_added"
    assert in_command_line_terms(graph).startswith(
        "sc.pp.neighbors(..., key_added='cellvae') wrote it; --key-added X_umap is taken: choose another --key-added"
    )
    assert in_command_line_terms("adata.X holds whole counts: leave out layer= (layer=None reads X)").startswith(
        "adata.X holds whole counts: leave out --layer (or pass --layer X)"
    )
    assert in_command_line_terms("adata.X holds whole counts: adata.layers['counts'] = adata.X").startswith(
        "adata.X holds whole counts: pass --layer X"
    )
    for fix in (  # a trained model's: embed --layer puts them where the model reads them
        "give the model ad.AnnData(X=adata.layers['counts'], obs=adata.obs, var=adata.var)",
        "put them where the model reads them, adata.layers['umis'] = adata.layers['counts']",
    ):
        told = in_command_line_terms(f"adata.layers['counts'] holds whole counts: {fix}")
        assert told == "adata.layers['counts'] holds whole counts: pass --layer counts"
    assert in_command_line_terms(
        "checkpoint_dir='ck' holds the checkpoints of an earlier run, which this fit would replace; pass resume=True to "
        "continue that run (with the settings it was started with), or delete its checkpoint*.safetensors files (or name "
        "another folder) to start afresh (with other settings, e.g. more epochs)"
    ) == (
        "--checkpoint-dir 'ck' holds the checkpoints of an earlier run, which this fit would replace; pass --resume to "
        "continue that run (with the settings it was started with), or delete its checkpoint*.safetensors files (or name "
        "another folder) to start afresh (with other settings, e.g. more epochs)"
    )
    assert in_command_line_terms("layer 'counts' not found in adata.layers; available: []").endswith(
        "(on the command line: --layer NAME names another of the layers; leave out --layer (or pass --layer X) to read adata.X)"
    )
    assert in_command_line_terms("it needs config.json (written by CellVAE.save)").endswith(
        "(written by cellvae fit or CellVAE.save)"
    )


def test_advice_that_only_python_can_follow_says_to_fix_the_file_in_python_first(tmp_path):
    """Where no option does what the advice's Python does (make names unique, drop missing batch values, strip Ensembl
    versions, copy adata.raw into a layer), the command line says so, and how; not where an option does it."""

    in_python = "(on the command line: no cellvae option does this; fix the file in Python first"
    for message in (
        "adata.var_names are not unique (e.g. ['a']); call adata.var_names_make_unique() first",
        "drop the versions first, adata.var_names = adata.var_names.str.replace(r'\\.\\d+$', '', regex=True)",
        "query_adata.obs['batch'] has 3 missing (NaN) batch values; fill them with a batch name or drop those cells",
        "adata.raw.X holds whole counts: adata.layers['counts'] = adata.raw[:, adata.var_names].X, then pass layer='counts'",
    ):
        assert in_python in in_command_line_terms(message), message
    for message in (
        "adata.layers['counts'] holds whole counts: pass layer='counts'",
        "adata.X holds whole counts: adata.layers['counts'] = adata.X",
        "Check that the data and the model use the same gene identifiers (symbols vs Ensembl IDs)",
        "training diverged: fit it again with a smaller one, e.g. model.fit(lr=0.001), the default",
    ):
        assert in_python not in in_command_line_terms(message), message
    interrupted = (
        "stopped its training at epoch 3; train it further with model.fit(...) (or fit again with checkpoints and resume=True)"
    )
    assert in_command_line_terms(interrupted).endswith(
        "train it further with cellvae fit (its --resume continues a run from its --checkpoint-dir)"
    )
    # as a user meets it: fit of a file with missing batch values
    data = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=0)
    data.obs["batch"] = data.obs["batch"].astype(object)
    data.obs.iloc[:3, data.obs.columns.get_loc("batch")] = np.nan
    data.write_h5ad(tmp_path / "in.h5ad")
    command = ["fit", str(tmp_path / "in.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "o.h5ad")]
    with pytest.raises(SystemExit, match=r"missing \(NaN\) values.*\n\(on the command line: no cellvae option does this") as told:
        main([*command, "--model-dir", str(tmp_path / "model")])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.h5ad"]
    # the fix reads the user's own file, under the name the advice uses (query_adata for map's query)
    assert f"adata = anndata.read_h5ad({str(tmp_path / 'in.h5ad')!r}), the change above, adata.write_h5ad(" in str(told.value)
    on_query = in_command_line_terms(
        "query_adata.var_names are not unique; call query_adata.var_names_make_unique()", argparse.Namespace(input="q.zarr")
    )
    assert "first, query_adata = anndata.read_zarr('q.zarr'), the change above, query_adata.write_h5ad(" in on_query
    repeated = "adata.var_names are not unique; call adata.var_names_make_unique()"
    on_reference = in_command_line_terms(f"--reference ref.h5ad: {repeated}", argparse.Namespace(input="q.h5ad"))
    assert "adata = anndata.read_h5ad('ref.h5ad')" in on_reference


def test_repeated_gene_names_are_told_by_cellvaes_error_alone_not_first_by_anndatas_warning(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0)
    adata.var_names = ["g0", "g0", *(f"g{i}" for i in range(2, 20))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata.write_h5ad(tmp_path / "repeated.h5ad")
    command = ["fit", str(tmp_path / "repeated.h5ad"), "--out", str(tmp_path / "o.h5ad"), "--model-dir", str(tmp_path / "m")]
    repeated = r"var_names are not unique \(e.g. \['g0'\]\)"
    with warnings.catch_warnings(record=True) as caught, pytest.raises(SystemExit, match=repeated):
        warnings.simplefilter("always")
        main(command)
    assert not [w for w in caught if "Variable names are not unique" in str(w.message)]


def test_inputs_of_other_formats_are_told_how_to_convert_them_and_a_zarr_out_is_refused(tmp_path):
    """A 10x .h5, a .csv or a 10x folder as the input: the error gives scanpy's one-line conversion to .h5ad; an
    --out ending in .zarr (an .h5ad file under that name would not open as a Zarr store) is refused before any work."""
    with h5py.File(tmp_path / "filtered.h5", "w") as file:
        file.create_group("matrix")["data"] = [1]
    (tmp_path / "counts.csv").write_text("a,b\n1,2\n")
    (tmp_path / "filtered_feature_bc_matrix").mkdir()
    for given, reader in (
        ("filtered.h5", "read_10x_h5"),
        ("counts.csv", "read_csv"),
        ("filtered_feature_bc_matrix", "read_10x_mtx"),
    ):
        command = ["fit", str(tmp_path / given), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.h5ad")]
        with pytest.raises(SystemExit, match=f"could not read .*convert it with scanpy first, python -c .*sc.{reader}"):
            main(command)
    data = cellvae.datasets.simulate(n_cells=30, n_genes=10, random_state=0)
    data.write_h5ad(tmp_path / "in.h5ad")
    for command in (["embed", "--model-dir", str(tmp_path / "none")], ["fit", "--model-dir", str(tmp_path / "model")]):
        with pytest.raises(SystemExit, match=r"cellvae writes .h5ad files \(it reads .zarr stores only\)"):
            main([*command, str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "out.zarr")])
        with pytest.raises(SystemExit, match=r"--out .*out.txt: cellvae writes .h5ad files"):  # (HDF5 under .txt)
            main([*command, str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "out.txt")])
    assert not (tmp_path / "out.zarr").exists() and not (tmp_path / "model").exists() and not (tmp_path / "out.txt").exists()


def test_fit_names_the_option_of_an_obs_column_the_input_lacks(tmp_path):
    command = fit_args(tmp_path, 30, 10)
    for option, keys in (("--batch-key", ["donor"]), ("--categorical-covariate-keys", ["batch", "sex"])):
        message = rf"in.h5ad has no obs columns \['{keys[-1]}'\] \({option}\); obs columns there: \['batch', 'cell_type'\]"
        with pytest.raises(SystemExit, match=message):
            main([*command, option, *keys])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["in.h5ad"]


@pytest.mark.parametrize(
    "given, meant",
    [
        (["fit", "in.h5ad", "--out", "o.h5ad", "--model-dir", "m", "--batch_key", "batch"], "--batch_key -> --batch-key"),
        (["fit", "in.h5ad", "--out", "o.h5ad", "--model-dir", "m", "--max-epochs", "5"], "--max-epochs -> --epochs"),
        (["fit", "in.h5ad", "-o", "o.h5ad", "--model-dir", "m"], "-o -> --out"),
        (["embed", "in.h5ad", "--out", "o.h5ad", "--model-dir", "m", "--var_names=gene"], "--var_names -> --var-names"),
        (["map", "q.h5ad", "--out", "o.h5ad", "--model-dir", "m", "--label-key", "cell_type"], "--label-key -> --labels-key"),
        (["--batch_key", "batch"], "name the command first, then its options: cellvae COMMAND [options]"),
        (["--batch-key", "batch", "fit", "in.h5ad"], "(commands: demo, fit, embed, map; cellvae COMMAND --help)"),
    ],
)
def test_options_spelled_as_in_python_or_scvi_tools_are_told_their_cellvae_spelling(given, meant, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(given)
    assert stopped.value.code == 2 and meant in capsys.readouterr().err


def test_paths_versions_devices_and_records_as_a_pipeline_needs_them(tmp_path, capsys, monkeypatch):
    """~ in any path is the home's; folders nothing can be written in are refused before training; the version is
    printed and recorded; fit records its model folder; embed takes --device; python -m cellvae runs the CLI."""
    version = subprocess.run([sys.executable, "-m", "cellvae", "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"cellvae {cellvae.__version__}"
    args = fit_args(tmp_path, 150, 30)
    monkeypatch.setenv("HOME", str(tmp_path))
    home_args = ["fit", "~/in.h5ad", "--out", "~/home.h5ad", "--model-dir", "~/home_model"]
    assert main([*home_args, "--epochs", "1", "--quiet", "--embedding-only"]) == 0
    written = ad.read_h5ad(tmp_path / "home.h5ad").uns["cellvae"]["params"]
    assert written["model_dir"] == str(tmp_path / "home_model") and written["cellvae_version"] == cellvae.__version__
    embed = ["embed", "~/in.h5ad", "--model-dir", "~/home_model", "--out", "~/embedded.h5ad", "--device", "cpu"]
    assert main(embed) == 0
    embedded = ad.read_h5ad(tmp_path / "embedded.h5ad")
    np.testing.assert_array_equal(embedded.obsm["X_cellvae"], ad.read_h5ad(tmp_path / "home.h5ad").obsm["X_cellvae"])
    assert embedded.uns["cellvae"]["params"]["cellvae_version"] == cellvae.__version__
    monkeypatch.chdir(tmp_path)  # a relative path is recorded absolute: it names the folder from anywhere
    assert main(["embed", "in.h5ad", "--model-dir", "home_model", "--out", "relative.h5ad", "--quiet"]) == 0
    recorded = ad.read_h5ad(tmp_path / "relative.h5ad").uns["cellvae"]["params"]["model_dir"]
    assert Path(recorded).is_absolute() and Path(recorded).resolve() == (tmp_path / "home_model").resolve()
    relative = ["fit", "in.h5ad", "--out", "fit.h5ad", "--model-dir", "m", "--checkpoint-dir", "ck", "--epochs", "1"]
    assert main([*relative, "--quiet", "--embedding-only"]) == 0
    params = ad.read_h5ad(tmp_path / "fit.h5ad").uns["cellvae"]["params"]
    for key, name in (("model_dir", "m"), ("checkpoint_dir", "ck")):
        assert Path(params[key]).is_absolute() and Path(params[key]).resolve() == (tmp_path / name).resolve()
    with pytest.raises(SystemExit, match=r"needs a batch_key; pass --batch-key KEY or use --dispersion gene"):
        main([*args, "--dispersion", "gene-batch", "--quiet"])
    if os.path.isdir("/proc/self"):  # (Linux) a folder nobody can make files in, not even root
        monkeypatch.setattr(cellvae.tl, "embed", lambda *a, **k: pytest.fail("trained before refusing"))
        with pytest.raises(SystemExit, match=r"--model-dir /proc/m cannot be written: nothing can be written in /proc"):
            main([*args[:4], "--model-dir", "/proc/m", "--quiet"])
        with pytest.raises(SystemExit, match=r"--out /proc/o.h5ad cannot be written: nothing can be written in /proc"):
            main([*args[:2], "--out", "/proc/o.h5ad", *args[4:], "--quiet"])


def test_embed_replaces_an_earlier_fits_record_and_says_its_graph_is_stale(tmp_path, capsys):
    """The output of `cellvae fit` embedded by another model: uns["cellvae"] describes that model, and the
    neighbours and UMAP made from the earlier embedding are told to be recomputed."""
    assert main([*fit_args(tmp_path, 150, 30), "--epochs", "2", "--batch-key", "batch"]) == 0
    other = cellvae.CellVAE(ad.read_h5ad(tmp_path / "in.h5ad"), n_hidden=8).fit(max_epochs=3, progress=False)
    other.save(tmp_path / "other")
    capsys.readouterr()
    command = ["embed", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "other"), "--out", str(tmp_path / "e.h5ad")]
    assert main(command) == 0
    assert "were made from an earlier obsm['X_cellvae']; recompute them" in capsys.readouterr().err
    params = ad.read_h5ad(tmp_path / "e.h5ad").uns["cellvae"]["params"]
    assert params["epochs_trained"] == params["max_epochs"] == 3 and params["batch_key"] is None
    assert params["model_dir"] == str(tmp_path / "other")
    # a file whose UMAP was made otherwise (scanpy's PCA) and that held no embedding of this key: nothing to tell
    scanpy_made = ad.read_h5ad(tmp_path / "in.h5ad")
    scanpy_made.obsm["X_umap"] = np.zeros((scanpy_made.n_obs, 2), dtype=np.float32)
    scanpy_made.write_h5ad(tmp_path / "umap.h5ad")
    command = ["embed", str(tmp_path / "umap.h5ad"), "--model-dir", str(tmp_path / "other"), "--out", str(tmp_path / "u.h5ad")]
    assert main(command) == 0
    assert "recompute them" not in capsys.readouterr().err
    # --key-added cellvae shares uns["cellvae"] with the default X_cellvae, still in the file: refused, nothing written
    command = ["embed", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "other"), "--out", str(tmp_path / "k.h5ad")]
    with pytest.raises(SystemExit, match=r"records the embedding obsm\['X_cellvae'\]"):
        main([*command, "--key-added", "cellvae"])
    assert not (tmp_path / "k.h5ad").exists()


def test_fit_of_an_atlas_sized_file_goes_through_scanpys_approximate_neighbours(tmp_path):
    # Above 4,096 cells scanpy finds neighbours with pynndescent (whose 0.7.0 broke sc.pp.neighbors).
    args = fit_args(tmp_path, n_cells=5000, n_genes=50)
    assert main([*args, "--batch-key", "batch", "--epochs", "1", "--quiet"]) == 0
    fitted = ad.read_h5ad(tmp_path / "out.h5ad")
    assert fitted.obsp["connectivities"].shape == (5000, 5000) and fitted.obsm["X_umap"].shape == (5000, 2)


def test_fit_keeps_the_model_and_embedding_when_scanpys_steps_fail(tmp_path, monkeypatch):
    def failing_neighbours(*args, **kwargs):
        raise RuntimeError("no neighbours today")

    monkeypatch.setattr(sc.pp, "neighbors", failing_neighbours)
    args = fit_args(tmp_path, n_cells=300, n_genes=50)
    with pytest.raises(SystemExit, match="neighbours/UMAP/Leiden failed .*no neighbours today.*the model is saved"):
        main([*args, "--epochs", "2", "--quiet"])
    assert ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_cellvae"].shape == (300, 10)
    assert cellvae.CellVAE.load(tmp_path / "model").is_trained


def test_fit_whose_training_diverged_writes_nothing_and_says_so_in_one_line(tmp_path, monkeypatch):
    """The command line has no --lr: a run that diverges at the default one (here made 1,000 times larger) ends in an
    error naming the Python way, not in a traceback, and leaves no output or model behind."""
    monkeypatch.setitem(cellvae.CellVAE.fit.__wrapped__.__kwdefaults__, "lr", 1.0)
    args = fit_args(tmp_path, n_cells=400, n_genes=200)
    with pytest.warns(RuntimeWarning, match="training made the model worse"):
        with pytest.raises(SystemExit, match=r"error: tl.embed: training diverged .*the command line has no --lr: train in Py"):
            main([*args, "--epochs", "10", "--quiet"])
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "model").exists()


def test_fit_backed_streams_the_h5ad_and_leaves_it_unchanged(tmp_path):
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    source = tmp_path / "in.h5ad"
    data.write_h5ad(source)
    before = source.read_bytes()
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    assert main(["fit", str(source), "--backed", "--batch-key", "batch", "--epochs", "3", "--quiet", *outputs]) == 0
    fitted = ad.read_h5ad(tmp_path / "out.h5ad")
    assert fitted.obsm["X_cellvae"].shape == (300, 10) and np.isfinite(fitted.obsm["X_cellvae"]).all()
    assert (fitted.X != data.X).nnz == 0  # the counts are copied to the output as they were
    assert fitted.uns["cellvae"]["params"]["backed"] and source.read_bytes() == before
    with pytest.raises(SystemExit, match="--out is the input file"):
        main(["fit", str(source), "--backed", "--out", str(source), "--model-dir", str(tmp_path / "m2")])
    # another name of the same file (a hard link here; Data.h5ad for data.h5ad on macOS's and Windows' file systems)
    os.link(source, tmp_path / "same.h5ad")
    with pytest.raises(SystemExit, match="--out is the input file"):
        main(["fit", str(source), "--out", str(tmp_path / "same.h5ad"), "--overwrite", "--model-dir", str(tmp_path / "m2")])
    data.write_zarr(tmp_path / "in.zarr")
    with pytest.raises(SystemExit, match="a .zarr store is always streamed"):
        main(["fit", str(tmp_path / "in.zarr"), "--backed", "--out", str(tmp_path / "z.h5ad"), "--model-dir", "m3"])
    zarr_fit = ["fit", str(tmp_path / "in.zarr"), "--epochs", "1", "--quiet", "--embedding-only"]
    assert main([*zarr_fit, "--out", str(tmp_path / "z.h5ad"), "--model-dir", str(tmp_path / "m3")]) == 0
    assert ad.read_h5ad(tmp_path / "z.h5ad").uns["cellvae"]["params"]["backed"]  # (a store is streamed: recorded)


def test_warnings_from_the_shell_read_as_one_line_each(tmp_path):
    data = cellvae.datasets.simulate(n_cells=200, n_genes=40, random_state=0)
    data.X.data[: data.X.indptr[3]] = 0  # three cells without counts: fit warns
    data.X.eliminate_zeros()
    data.write_h5ad(tmp_path / "in.h5ad")
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    options = ["--epochs", "1", "--quiet", "--embedding-only"]  # the warning comes from training, not the graph
    command = [sys.executable, "-m", "cellvae.cli", "fit", str(tmp_path / "in.h5ad"), *options, *outputs]
    run = subprocess.run(command, capture_output=True, text=True, check=True, env=dict(os.environ, MPLBACKEND="Agg"))
    lines = run.stderr.splitlines()
    assert any(line.startswith("UserWarning: 3 cells have zero total counts") for line in lines), run.stderr
    assert "(on the command line: this run goes on; fix the file in Python first" in run.stderr  # (a warning: no failure)
    assert "runpy" not in run.stderr and "warn_user(" not in run.stderr
    assert run.stdout.startswith("trained 1 epoch; saved the model in ")  # (not "1 epochs")
    # a warning that mapping and then embedding the query would each give is told once
    data.obs["score"] = np.random.default_rng(0).normal(size=data.n_obs)
    data.write_h5ad(tmp_path / "in.h5ad")
    fit = [*command[:-4], "--out", str(tmp_path / "ref.h5ad"), "--model-dir", str(tmp_path / "ref")]
    assert main([*fit[3:], "--batch-key", "batch", "--continuous-covariate-keys", "score"]) == 0  # (the reference: in process)
    query = data[:60].copy()
    query.obs["batch"], query.obs["score"] = "new", np.where(np.arange(60) % 5 == 0, 100.0, 0.0)
    query.write_h5ad(tmp_path / "query.h5ad")
    mapping = [*command[:3], "map", str(tmp_path / "query.h5ad"), "--model-dir", str(tmp_path / "ref")]
    mapping += ["--out", str(tmp_path / "q.h5ad"), "--epochs", "1", "--quiet"]
    run = subprocess.run(mapping, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("of the cells lie over 10 sd from the values the model was trained with") == 1, run.stderr


def test_embedding_only_writes_the_embedding_without_graph_umap_or_clusters(tmp_path, capsys):
    args = fit_args(tmp_path, n_cells=300, n_genes=60)
    # X_umap is free for the embedding when fit computes no UMAP
    assert main([*args, "--embedding-only", "--key-added", "X_umap", "--epochs", "2", "--quiet"]) == 0
    fitted = ad.read_h5ad(tmp_path / "out.h5ad")
    model = cellvae.CellVAE.load(tmp_path / "model", adata=ad.read_h5ad(tmp_path / "in.h5ad"))
    np.testing.assert_allclose(fitted.obsm["X_umap"], model.get_latent(), atol=1e-6)
    assert list(fitted.obsm) == ["X_umap"] and not fitted.obsp and "leiden" not in fitted.obs
    assert not {"neighbors", "leiden", "umap"} & set(fitted.uns)
    assert "UMAP" not in capsys.readouterr().out
    with pytest.raises(SystemExit, match="X_umap would be overwritten"):  # without the option it would be
        main([*args, "--key-added", "X_umap", "--overwrite", "--epochs", "1", "--quiet"])


def test_fit_embedding_only_says_the_inputs_graph_from_an_earlier_embedding_is_stale(tmp_path, capsys):
    """`cellvae fit --embedding-only` of an earlier fit's output keeps that file's neighbours and UMAP, made from the
    obsm["X_cellvae"] it replaces: told to recompute them, as `cellvae embed` tells."""
    assert main([*fit_args(tmp_path, 150, 30), "--epochs", "1", "--quiet"]) == 0
    refit = ["fit", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "again"), "--out", str(tmp_path / "again.h5ad")]
    capsys.readouterr()
    assert main([*refit, "--embedding-only", "--epochs", "1", "--quiet", "--seed", "1"]) == 0
    assert "were made from an earlier obsm['X_cellvae']; recompute them" in capsys.readouterr().err
    # with the graph computed again, or without an earlier embedding of the key, there is nothing stale to tell
    assert main([*refit, "--overwrite", "--epochs", "1", "--quiet", "--seed", "1"]) == 0
    assert "recompute them" not in capsys.readouterr().err
    assert main([*refit, "--overwrite", "--embedding-only", "--key-added", "X_new", "--epochs", "1", "--quiet"]) == 0
    assert "recompute them" not in capsys.readouterr().err


def test_a_file_written_by_newer_anndata_with_pandas_strings_is_written_back(tmp_path):
    """anndata 0.13 with pandas 3 (what Python 3.12 and later install) stores strings as pandas string arrays;
    anndata 0.12 reads them but writes them only when allowed, which would fail a fit after training."""
    data = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    data.obs_names = pd.Index(pd.array(data.obs_names, dtype="string"))
    data.obs["donor"] = pd.array(np.where(np.arange(200) % 2, "d1", "d2"), dtype="string")
    with ad.settings.override(allow_write_nullable_strings=True):
        data.write_h5ad(tmp_path / "in.h5ad")
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    assert main(["fit", str(tmp_path / "in.h5ad"), *outputs, "--embedding-only", "--epochs", "1", "--quiet"]) == 0
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obs_names.tolist() == data.obs_names.tolist() and written.obsm["X_cellvae"].shape == (200, 10)
    assert written.obs["donor"].astype(str).tolist() == data.obs["donor"].astype(str).tolist()


def test_fit_layer_x_reads_adata_x_as_embed_does(tmp_path):
    """--layer X (the default the help names) trains on adata.X instead of looking for a layer called X."""
    cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    assert main(["fit", str(tmp_path / "in.h5ad"), "--layer", "X", *outputs, "--embedding-only", "--epochs", "1", "--quiet"]) == 0
    assert cellvae.CellVAE.load(tmp_path / "model").config.layer is None
    assert ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_cellvae"].shape == (200, 10)


def test_fit_mask_var_trains_on_the_marked_genes_and_embeds_every_cell(tmp_path):
    data = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    data.var["highly_variable"] = np.arange(50) < 30
    data.write_h5ad(tmp_path / "in.h5ad")
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model"), "--embedding-only", "--quiet"]
    assert main(["fit", str(tmp_path / "in.h5ad"), "--mask-var", "highly_variable", *outputs, "--epochs", "1"]) == 0
    assert cellvae.CellVAE.load(tmp_path / "model").config.gene_names == list(data.var_names[:30])
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.shape == (200, 50) and written.obsm["X_cellvae"].shape == (200, 10)
    assert written.uns["cellvae"]["params"]["mask_var"] == "highly_variable"
    other = ["--out", str(tmp_path / "other.h5ad"), "--model-dir", str(tmp_path / "other"), "--quiet"]
    with pytest.raises(SystemExit, match="error: --mask-var 'hvg' is not a column of adata.var"):
        main(["fit", str(tmp_path / "in.h5ad"), "--mask-var", "hvg", *other])
    assert not (tmp_path / "other.h5ad").exists() and not (tmp_path / "other").exists()


def test_out_copies_a_backed_or_zarr_inputs_counts_a_block_at_a_time(tmp_path, monkeypatch):
    """Writing --out for an input left on disk (--backed .h5ad, .zarr) copies its count matrices (X, layers,
    raw) in blocks: anndata would read each stored array whole, which fails after training on a file larger
    than memory. The copy is exact."""
    import tracemalloc

    from cellvae import cli

    data = cellvae.datasets.simulate(n_cells=4000, n_genes=200, random_state=0)
    data.layers["counts"] = data.X.copy()
    data.raw = data.copy()
    data.write_h5ad(tmp_path / "in.h5ad")
    data.write_zarr(tmp_path / "in.zarr")
    dense = ad.AnnData(X=data.X.toarray(), obs=data.obs, var=data.var)
    dense.write_h5ad(tmp_path / "dense.h5ad")
    monkeypatch.setattr(cli, "COPY_BLOCK", 10_000)
    stored = data.X.data.nbytes  # one of the arrays anndata would have read whole (Zarr reads whole storage chunks)
    opened = {
        "backed": ad.read_h5ad(tmp_path / "in.h5ad", backed="r"),
        "zarr": cellvae.read_zarr_lazy(tmp_path / "in.zarr"),
        "dense": ad.read_h5ad(tmp_path / "dense.h5ad", backed="r"),
    }
    for kind, adata in opened.items():
        adata.obsm["X_new"] = np.arange(adata.n_obs * 2, dtype=np.float32).reshape(-1, 2)
        tracemalloc.start()
        cli._write(adata, str(tmp_path / f"{kind}_out.h5ad"))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < stored / 2, f"{kind}: {peak:,} bytes traced while writing, against {stored:,} in X's values"
        written = ad.read_h5ad(tmp_path / f"{kind}_out.h5ad")
        np.testing.assert_array_equal(written.obsm["X_new"], adata.obsm["X_new"])
        assert written.obs.equals(data.obs) and written.var_names.equals(data.var_names)
        if kind == "dense":  # an input without raw gets none (not a "raw" that breaks reading the file backed)
            np.testing.assert_array_equal(written.X, dense.X)
            assert written.raw is None and ad.read_h5ad(tmp_path / f"{kind}_out.h5ad", backed="r").raw is None
            continue
        for matrix in (written.X, written.layers["counts"], written.raw.X):
            assert matrix.format == "csr" and matrix.dtype == data.X.dtype and (matrix != data.X).nnz == 0
        with h5py.File(tmp_path / f"{kind}_out.h5ad", "r") as file:  # resizable, as anndata writes them
            assert all(file[f"X/{name}"].maxshape == (None,) for name in ("data", "indices", "indptr"))


def test_compression_compresses_the_arrays_of_out_written_from_memory_or_copied_from_disk(tmp_path, capsys):
    """--compression gzip/lzf reaches every array of --out, the counts copied in blocks from a backed input too; the
    counts read back unchanged, and without the option the file is uncompressed, as anndata writes it."""
    args = fit_args(tmp_path, 300, 40)
    fitted = [*args, "--epochs", "1", "--quiet", "--embedding-only"]
    assert main([*fitted, "--compression", "gzip"]) == 0
    embed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--quiet"]
    assert main([*embed, "--out", str(tmp_path / "lzf.h5ad"), "--backed", "--compression", "lzf"]) == 0
    assert main([*embed, "--out", str(tmp_path / "plain.h5ad"), "--backed"]) == 0
    counts = ad.read_h5ad(tmp_path / "in.h5ad").X
    for name, compression in (("out.h5ad", "gzip"), ("lzf.h5ad", "lzf"), ("plain.h5ad", None)):
        with h5py.File(tmp_path / name, "r") as file:
            for array in ("X/data", "X/indices", "X/indptr", "obsm/X_cellvae"):
                assert file[array].compression == compression, (name, array, file[array].compression)
        assert (ad.read_h5ad(tmp_path / name).X != counts).nnz == 0
    with pytest.raises(SystemExit):
        main([*fitted, "--compression", "zstd", "--overwrite"])
    assert "invalid choice: 'zstd' (choose from gzip, lzf)" in capsys.readouterr().err.replace("'gzip', 'lzf'", "gzip, lzf")


def test_fit_precision_option_reaches_the_model(tmp_path):
    """--precision bfloat16 trains exactly as fit(precision="bfloat16") with the same seed; bad values are refused."""
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    data.write_h5ad(tmp_path / "in.h5ad")
    common = ["--batch-key", "batch", "--epochs", "3", "--seed", "1", "--quiet"]
    out, model_dir = str(tmp_path / "out.h5ad"), str(tmp_path / "model")
    common += ["--out", out, "--model-dir", model_dir]
    assert main(["fit", str(tmp_path / "in.h5ad"), "--precision", "bfloat16", *common]) == 0
    expected = cellvae.CellVAE(data, batch_key="batch").fit(max_epochs=3, random_state=1, progress=False, precision="bfloat16")
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_cellvae"], expected.get_latent())
    with pytest.raises(SystemExit) as stopped:
        main(["fit", str(tmp_path / "in.h5ad"), "--precision", "float16", *common])
    assert stopped.value.code == 2  # argparse's usage error, before any work


def test_fit_model_options_reach_the_model(tmp_path):
    """--likelihood, --n-latent and the covariate keys build the model CellVAE(likelihood=..., ...) builds."""
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    rng = np.random.default_rng(0)
    data.obs["donor"] = rng.choice(["d1", "d2", "d3"], data.n_obs)
    data.obs["percent_mito"] = rng.uniform(0.0, 10.0, data.n_obs)
    data.obs["log_total"] = np.log1p(np.asarray(data.X.sum(1)).ravel())
    data.write_h5ad(tmp_path / "in.h5ad")
    out, model_dir = tmp_path / "out.h5ad", tmp_path / "model"
    options = "--batch-key batch --likelihood zinb --n-latent 4 --epochs 2 --seed 1 --quiet".split()
    options += "--categorical-covariate-keys donor --continuous-covariate-keys percent_mito log_total".split()
    assert main(["fit", str(tmp_path / "in.h5ad"), "--out", str(out), "--model-dir", str(model_dir), *options]) == 0
    saved = cellvae.CellVAE.load(model_dir)
    assert (saved.config.likelihood, saved.config.n_latent) == ("zinb", 4)
    assert saved.config.categorical_covariate_keys == ["donor"]
    assert saved.config.continuous_covariate_keys == ["percent_mito", "log_total"]
    covariates = {"categorical_covariate_keys": ["donor"], "continuous_covariate_keys": ["percent_mito", "log_total"]}
    expected = cellvae.CellVAE(data, batch_key="batch", likelihood="zinb", n_latent=4, **covariates)
    expected.fit(max_epochs=2, random_state=1, progress=False)
    np.testing.assert_array_equal(ad.read_h5ad(out).obsm["X_cellvae"], expected.get_latent())


def test_map_names_the_new_categories_of_a_covariate_it_mapped(tmp_path, capsys):
    """The summary listed new batches only: a query's new donor, trained as well, went unmentioned."""
    data = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=3, random_state=0)
    data.obs["donor"] = np.where(data.obs["batch"] == "batch2", "d9", np.where(np.arange(300) % 2 == 0, "d1", "d2"))
    is_query = (data.obs["batch"] == "batch2").to_numpy()
    data[~is_query].copy().write_h5ad(tmp_path / "reference.h5ad")
    data[is_query].copy().write_h5ad(tmp_path / "query.h5ad")
    fit = ["fit", str(tmp_path / "reference.h5ad"), "--batch-key", "batch", "--categorical-covariate-keys", "donor"]
    assert main([*fit, "--out", str(tmp_path / "r.h5ad"), "--model-dir", str(tmp_path / "m"), "--epochs", "2", "--quiet"]) == 0
    capsys.readouterr()
    query = ["map", str(tmp_path / "query.h5ad"), "--model-dir", str(tmp_path / "m"), "--out", str(tmp_path / "q.h5ad")]
    assert main([*query, "--epochs", "2", "--quiet"]) == 0
    assert "(new batches: ['batch2'], new donor: ['d9'])" in capsys.readouterr().out


def test_an_input_taken_as_a_covariate_key_is_told_to_come_first(tmp_path, capsys):
    """A key option takes every word up to the next option, so the input after it reads as a key."""
    source = str(tmp_path / "in.h5ad")
    swallowed = ["fit", "--categorical-covariate-keys", "donor", source, "--out", str(tmp_path / "o.h5ad"), "--quiet"]
    with pytest.raises(SystemExit) as stopped:
        main(swallowed)
    assert stopped.value.code == 2
    assert f"took '{source}' as a key (it takes every word up to the next option); put the input first" in capsys.readouterr().err
    (tmp_path / "donor").mkdir()  # a folder named as the key: not an input
    for keys in (["donor"], [str(tmp_path / "donor")]):
        with pytest.raises(SystemExit):
            main(["fit", "--categorical-covariate-keys", *keys, "--out", str(tmp_path / "o.h5ad")])  # no input at all
        assert "as a key" not in capsys.readouterr().err


def test_bad_input_stops_with_a_message_before_any_work(tmp_path, capsys):
    """Errors in the data or the options end in one 'error: ...' line (no traceback), before training starts."""
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    source = str(tmp_path / "in.h5ad")
    data.write_h5ad(source)
    model_dir, out = str(tmp_path / "model"), str(tmp_path / "out.h5ad")
    common = ["--out", out, "--model-dir", model_dir, "--epochs", "1", "--quiet"]
    with pytest.raises(SystemExit, match=r"error: .*layer 'nope'"):
        main(["fit", source, "--layer", "nope", *common])
    with pytest.raises(SystemExit, match=r"error: .*obs.*'nope'"):
        main(["fit", source, "--batch-key", "nope", *common])
    with pytest.raises(SystemExit):
        main(["fit", source, "--out", out, "--model-dir", model_dir, "--epochs", "0"])
    assert "--epochs: must be a positive integer, got '0'" in capsys.readouterr().err
    blocked = str(tmp_path / "in.h5ad" / "out.h5ad")  # a folder that cannot be made (a file is in the way)
    with pytest.raises(SystemExit, match=r"--out .*in.h5ad/out.h5ad cannot be written: .*in.h5ad is a file, not a folder"):
        main(["fit", source, "--out", blocked, "--model-dir", model_dir, "--epochs", "1", "--quiet"])
    assert not (tmp_path / "model").exists()  # nothing was trained or saved
    # a folder that does not exist yet is made, as --model-dir's is (it was refused, after a check of its own)
    main(["fit", source, "--out", str(tmp_path / "new" / "folder" / "out.h5ad"), "--model-dir", model_dir, "--epochs", "1"])
    assert (tmp_path / "new" / "folder" / "out.h5ad").is_file()
    shutil.rmtree(model_dir)
    # through a link to a folder not made yet: the folder the check looked at is made (mkdir on the link itself failed,
    # after the training); '..' leaves no empty folder behind
    (tmp_path / "link").symlink_to(tmp_path / "target" / "deep")
    main(["fit", source, "--out", str(tmp_path / "link" / "out.h5ad"), "--model-dir", model_dir, "--epochs", "1"])
    assert (tmp_path / "target" / "deep" / "out.h5ad").is_file()
    shutil.rmtree(model_dir)
    main(["fit", source, "--out", str(tmp_path / "a" / "b" / ".." / "c" / "out.h5ad"), "--model-dir", model_dir, "--epochs", "1"])
    assert (tmp_path / "a" / "c" / "out.h5ad").is_file() and not (tmp_path / "a" / "b").exists()
    shutil.rmtree(model_dir)
    with pytest.raises(SystemExit, match=r"error: .*none does not exist: give the folder a model was saved in"):
        main(["embed", source, "--model-dir", str(tmp_path / "none"), "--out", out])
    with pytest.raises(SystemExit, match="error: --out .* is a folder"):
        main(["fit", source, "--out", str(tmp_path), "--model-dir", model_dir, "--epochs", "1", "--quiet"])
    (tmp_path / "empty.h5ad").write_bytes(b"")
    with pytest.raises(SystemExit, match="error: "):  # h5py's own message, without a traceback
        main(["fit", str(tmp_path / "empty.h5ad"), *common])
    zarr.open_group(tmp_path / "group.zarr", mode="w")
    with pytest.raises(SystemExit, match="error: .*group.zarr is a Zarr group but not an AnnData store"):
        main(["fit", str(tmp_path / "group.zarr"), *common])
    assert not (tmp_path / "model").exists()


def test_backed_with_a_layer_streams_the_layer_from_disk(tmp_path, monkeypatch):
    """anndata's backed mode keeps only X on disk; --backed --layer still streams the layer's counts."""
    data = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    data.layers["counts"] = data.X.copy()
    data.X = data.X * 0.5  # not counts: training must read the layer
    data.write_h5ad(tmp_path / "in.h5ad")
    streamed = []
    original = cellvae.data.CellLoader.__init__

    def record(self, matrix, *args, **kwargs):
        streamed.append(cellvae.data.is_backed_matrix(matrix))
        original(self, matrix, *args, **kwargs)

    monkeypatch.setattr(cellvae.data.CellLoader, "__init__", record)
    out, model_dir = str(tmp_path / "out.h5ad"), str(tmp_path / "model")
    args = ["fit", str(tmp_path / "in.h5ad"), "--backed", "--layer", "counts", "--out", out, "--model-dir", model_dir]
    assert main([*args, "--epochs", "2", "--seed", "1", "--quiet"]) == 0
    assert streamed and all(streamed)
    written = ad.read_h5ad(out)  # the input's X and layer, and the embedding
    assert written.obsm["X_cellvae"].shape == (200, 10) and np.isfinite(written.obsm["X_cellvae"]).all()
    assert (written.layers["counts"] != data.layers["counts"]).nnz == 0 and (written.X != data.X).nnz == 0


def test_outputs_are_replaced_only_when_asked_and_never_mixed_with_an_old_file(tmp_path):
    data = cellvae.datasets.simulate(n_cells=300, n_genes=100, random_state=0)
    source, out, model_dir = tmp_path / "in.h5ad", tmp_path / "out.h5ad", tmp_path / "model"
    data.write_h5ad(source)
    old = cellvae.datasets.simulate(n_cells=50, n_genes=20, random_state=1)
    old.raw = old  # parts of an old file that anndata would keep when writing a backed AnnData over it
    old.write_h5ad(out)
    args = ["fit", str(source), "--backed", "--out", str(out), "--model-dir", str(model_dir), "--epochs", "2", "--quiet"]
    with pytest.raises(SystemExit, match="--out .* exists; pass --overwrite"):
        main(args)
    assert not model_dir.exists()
    assert main([*args, "--overwrite"]) == 0
    written = ad.read_h5ad(out)
    assert written.shape == (300, 100) and written.raw is None and written.obsm["X_cellvae"].shape == (300, 10)
    assert [p.name for p in tmp_path.iterdir() if "partial" in p.name] == []
    embed = ["embed", str(source), "--model-dir", str(model_dir), "--out", str(out)]
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(embed)
    assert main([*embed, "--overwrite", "--key-added", "X_again"]) == 0
    assert "X_again" in ad.read_h5ad(out).obsm


@pytest.mark.parametrize(
    "options, message",
    [
        (["--key-added", ""], "--key-added must be a non-empty obsm key"),
        (["--key-added", "a/b"], "--key-added must be a non-empty obsm key"),
        (["--key-added", "X_umap"], "X_umap would be overwritten by what fit's neighbours, Leiden and UMAP write"),
        (["--key-added", "neighbors"], "neighbors would be overwritten"),  # its uns record would be scanpy's
        (["--key-added", "leiden"], "leiden would be overwritten"),
        (["--key-added", "umap"], "umap would be overwritten"),
        (["--model-dir", "."], "--model-dir needs a folder name"),
        (["--model-dir", "{tmp}/in.h5ad/model"], "is a file"),
        (["--model-dir", "{tmp}/other", "--overwrite"], "not a saved cellvae model"),
        (["--model-dir", "{tmp}/bert"], r"bert is a folder whose files \(config.json, model.safetensors\) are not"),
        (["--checkpoint-dir", "{tmp}/new_model"], "--checkpoint-dir and --model-dir must be separate"),
        (["--checkpoint-dir", "{tmp}/new_model/checkpoints"], "--checkpoint-dir and --model-dir must be separate"),
        (["--out", "{tmp}/new_model/out.h5ad"], "--out must not be --model-dir or inside it"),
        (["--checkpoint-dir", "{tmp}/out.h5ad"], "--out must not be --checkpoint-dir or inside it"),
        (["--checkpoint-dir", "{tmp}/saved"], r"--checkpoint-dir '.*saved' is a saved model's folder; checkpoints"),
        (["--out", "{tmp}/in.h5ad/out.h5ad"], r"--out .*in.h5ad/out.h5ad cannot be written: .*in.h5ad is a file"),
        (["--checkpoint-dir", "{tmp}/other", "--out", "{tmp}/other/checkpoint.safetensors"], "--out must not be --checkpoint"),
        (["--batch-key", ""], "batch_key is the empty string"),  # an unset shell variable: not "no batches"
    ],
)
def test_options_that_would_fail_after_training_are_refused_before_it(tmp_path, options, message, monkeypatch):
    cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    (tmp_path / "new_model").mkdir()  # for the --out case: an output folder inside the model folder
    (tmp_path / "saved").mkdir()  # another model's folder: its checkpoints would keep --overwrite from replacing it
    (tmp_path / "saved" / "config.json").write_text('{"gene_names": [], "n_latent": 2, "likelihood": "nb"}')
    (tmp_path / "saved" / "model.safetensors").write_bytes(b"")
    (tmp_path / "bert").mkdir()  # another library's model, in files of a cellvae model's names
    (tmp_path / "bert" / "config.json").write_text('{"architectures": ["BertModel"]}')
    (tmp_path / "bert" / "model.safetensors").write_bytes(b"weights")
    monkeypatch.setattr(cellvae.CellVAE, "fit", lambda *a, **k: pytest.fail("training started"))
    command = ["fit", str(tmp_path / "in.h5ad"), "--out", f"{tmp_path}/out.h5ad", "--model-dir", f"{tmp_path}/new_model"]
    command += ["--overwrite", "--epochs", "1"]  # later options win; --overwrite lets new_model/ be replaced
    command += [option.format(tmp=tmp_path) for option in options]
    with pytest.raises(SystemExit, match=message):
        main(command)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "bert" / "model.safetensors").read_bytes() == b"weights"


def test_out_may_lie_in_the_checkpoint_folder_which_takes_only_checkpoint_files(tmp_path, monkeypatch):
    """--checkpoint-dir . beside --out was refused as if checkpoints replaced the folder's files."""
    cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    monkeypatch.setattr(cellvae.CellVAE, "fit", lambda *a, **k: pytest.fail("training started"))
    (tmp_path / "work").mkdir()
    command = ["fit", str(tmp_path / "in.h5ad"), "--out", f"{tmp_path}/work/out.h5ad", "--model-dir", f"{tmp_path}/model"]
    with pytest.raises(pytest.fail.Exception, match="training started"):  # every check passed
        main([*command, "--epochs", "1", "--checkpoint-dir", str(tmp_path / "work")])
    normalised = ad.read_h5ad(tmp_path / "in.h5ad")
    normalised.X = normalised.X * 0.5
    normalised.write_h5ad(tmp_path / "halved.h5ad")
    command[1] = str(tmp_path / "halved.h5ad")
    with pytest.raises(SystemExit, match="non-integer values"):  # refused: no checkpoint folder made
        main([*command, "--checkpoint-dir", str(tmp_path / "new_ck")])
    assert not (tmp_path / "new_ck").exists()


def _ctrl_c_in_the_second_epoch(monkeypatch) -> None:
    """Ctrl-C, as the training loop receives it, while the second epoch is validated."""
    evaluate = cellvae.train.evaluate
    calls = []

    def interrupted_in_the_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(cellvae.train, "evaluate", interrupted_in_the_second_epoch)


def test_an_interrupted_fit_keeps_its_model_and_embedding_and_does_not_report_success(tmp_path, monkeypatch):
    _ctrl_c_in_the_second_epoch(monkeypatch)
    args = fit_args(tmp_path, n_cells=300, n_genes=50)
    with pytest.warns(RuntimeWarning, match="training interrupted") as caught:
        assert main([*args, "--epochs", "5", "--quiet"]) == 130
    told = in_command_line_terms(str(next(w.message for w in caught if "interrupted" in str(w.message))))
    assert "during epoch 1 (1 finished; epochs numbered from 0)" in told  # (as the shell shows it: no model.history there)
    with pytest.warns(UserWarning, match="saved after Ctrl-C stopped its training at epoch 1"):
        assert len(cellvae.CellVAE.load(tmp_path / "model").history) == 1
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.uns["cellvae"]["params"]["interrupted"]
    assert written.obsm["X_cellvae"].shape == (300, 10) and "X_umap" not in written.obsm


def test_ctrl_c_in_the_first_epoch_leaves_an_earlier_model_and_output_in_place(tmp_path, monkeypatch, capsys):
    args = fit_args(tmp_path, n_cells=300, n_genes=50)
    assert main([*args, "--epochs", "2", "--quiet"]) == 0
    before = {path: path.read_bytes() for path in [tmp_path / "out.h5ad", *(tmp_path / "model").iterdir()]}

    def ctrl_c(*args, **kwargs):  # the first epoch's validation: no epoch finished
        raise KeyboardInterrupt

    monkeypatch.setattr(cellvae.train, "evaluate", ctrl_c)
    assert main([*args, "--epochs", "2", "--seed", "1", "--overwrite", "--quiet"]) == 130
    assert capsys.readouterr().err.strip().endswith("interrupted")
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "model", "out.h5ad"]


def test_ctrl_c_or_a_full_disk_after_training_keeps_the_model_and_says_what_was_written(tmp_path, monkeypatch, capsys):
    args = [*fit_args(tmp_path, n_cells=300, n_genes=50), "--epochs", "2", "--quiet"]

    def ctrl_c(*args, **kwargs):  # during UMAP, after the neighbour graph and Leiden were added
        raise KeyboardInterrupt

    monkeypatch.setattr(sc.tl, "umap", ctrl_c)
    assert main(args) == 130
    assert "interrupted: neighbours/UMAP/Leiden stopped" in capsys.readouterr().err
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obsm["X_cellvae"].shape == (300, 10) and list(written.obsm) == ["X_cellvae"]
    assert not written.obsp and "leiden" not in written.obs and set(written.uns) == {"cellvae", "source"}  # no graph
    monkeypatch.undo()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    weights, output = (tmp_path / "model" / "model.safetensors").read_bytes(), (tmp_path / "out.h5ad").read_bytes()
    monkeypatch.setattr(ad.AnnData, "write_h5ad", disk_full)
    told = (
        r"could not write .*out.h5ad \(the file there is from an earlier run\); the model is saved in .*"
        r"\(No space left on device\)$"
    )
    with pytest.raises(SystemExit, match=told):
        main([*args, "--overwrite", "--seed", "1"])
    assert (tmp_path / "model" / "model.safetensors").read_bytes() != weights  # the new model is saved
    assert (tmp_path / "out.h5ad").read_bytes() == output  # the earlier run's output, as the message says
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "model", "out.h5ad"]


def test_a_model_the_disk_refuses_is_told_with_its_folder_and_the_embedding_is_still_written(tmp_path, monkeypatch, capsys):
    """A full disk (or quota) under --model-dir lost the whole run, with a message naming no path."""

    def disk_full(self):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cellvae.CellVAE, "_weights_file", disk_full)
    args = [*fit_args(tmp_path, n_cells=300, n_genes=50), "--epochs", "2", "--quiet", "--embedding-only"]
    told = (
        r"^error: \[Errno 28\] could not save the model in .*model: No space left on device; nothing there changed "
        r"\(wrote .*out.h5ad with obsm\['X_cellvae'\]\); free space there, or name another --model-dir, and fit again$"
    )
    with pytest.raises(SystemExit, match=told):
        main(args)
    assert "trained 2 epochs" in capsys.readouterr().err
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obsm["X_cellvae"].shape == (300, 10) and written.uns["cellvae"]["params"]["model_dir"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad", "out.h5ad"]  # no model folder, nothing half made


def test_sigterm_from_a_scheduler_stops_fit_as_ctrl_c_does(tmp_path):
    """SLURM and PBS stop a job at its time limit with SIGTERM: fit keeps the best epoch so far, saves the model, writes
    --out and exits with status 143 (it died at once, leaving nothing)."""
    args = fit_args(tmp_path, n_cells=2000, n_genes=100)
    command = [sys.executable, "-m", "cellvae", *args, "--epochs", "400", "--checkpoint-dir", str(tmp_path / "ck"), "--quiet"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "ck" / "checkpoint.safetensors").exists():  # (an epoch has ended)
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr[-2000:]
    assert "interrupted: wrote" in stderr and "saved the model in" in stdout
    with pytest.warns(UserWarning, match="saved after Ctrl-C stopped its training"):
        assert 1 <= len(cellvae.CellVAE.load(tmp_path / "model", load_anndata=False).history) < 400
    assert ad.read_h5ad(tmp_path / "out.h5ad").obsm["X_cellvae"].shape == (2000, 10)


def test_ctrl_c_during_the_graph_leaves_an_earlier_analysis_of_the_input_as_it_was(tmp_path, monkeypatch, capsys):
    """An input analysed before (its own graph, clusters and UMAP) keeps all of it when Ctrl-C stops the
    graph steps: not a new graph and new clusters beside the old UMAP."""
    args = [*fit_args(tmp_path, n_cells=300, n_genes=50), "--epochs", "2", "--quiet"]
    analysed = ad.read_h5ad(tmp_path / "in.h5ad")
    analysed.obsm["X_pca"] = np.random.default_rng(0).normal(size=(300, 5))
    sc.pp.neighbors(analysed, use_rep="X_pca")
    sc.tl.leiden(analysed, flavor="igraph", n_iterations=2, directed=False, resolution=3.0)
    sc.tl.umap(analysed)
    analysed.write_h5ad(tmp_path / "in.h5ad")

    def ctrl_c(*args, **kwargs):  # during UMAP, after cellvae's graph and clusters were found
        raise KeyboardInterrupt

    monkeypatch.setattr(sc.tl, "umap", ctrl_c)
    assert main(args) == 130
    assert "interrupted: neighbours/UMAP/Leiden stopped" in capsys.readouterr().err
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.obsm["X_cellvae"].shape == (300, 10)
    pd.testing.assert_series_equal(written.obs["leiden"], analysed.obs["leiden"])
    for key in ("distances", "connectivities"):
        assert (written.obsp[key] != analysed.obsp[key]).nnz == 0
    np.testing.assert_array_equal(written.obsm["X_umap"], analysed.obsm["X_umap"])
    assert written.uns["neighbors"]["params"]["use_rep"] == "X_pca"
    monkeypatch.undo()
    assert main([*args, "--overwrite"]) == 0  # uninterrupted, cellvae's graph, clusters and UMAP replace them
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    assert written.uns["neighbors"]["params"]["use_rep"] == "X_cellvae"
    assert not np.array_equal(written.obsm["X_umap"], analysed.obsm["X_umap"])
    assert written.obs["leiden"].nunique() < analysed.obs["leiden"].nunique()


def test_counts_in_a_layer_are_named_with_the_layer_option_when_x_is_normalised(tmp_path):
    assert main(fit_args(tmp_path, n_cells=200, n_genes=40) + ["--epochs", "1", "--quiet", "--embedding-only"]) == 0
    normalised = ad.read_h5ad(tmp_path / "in.h5ad")
    normalised.layers["counts"] = normalised.X.copy()
    sc.pp.normalize_total(normalised)
    sc.pp.log1p(normalised)
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    embed = ["embed", str(tmp_path / "normalised.h5ad"), "--model-dir", str(tmp_path / "model")]
    embed += ["--out", str(tmp_path / "embedded.h5ad")]
    # the place found, alone: the general advice (build a model with layer=...) gave way to it
    told = r"^error: adata.X has non-integer values \(.*\); it looks normalised .*\. adata.layers\['counts'\] holds whole"
    with pytest.raises(SystemExit, match=told + r" counts: pass --layer counts$"):
        main(embed)
    assert main([*embed, "--layer", "counts"]) == 0


def test_a_file_read_by_another_genes_column_is_told_which_layer_holds_its_counts(tmp_path):
    """With --var-names the model reads an AnnData of the counts alone: the error could not name the layer that holds
    counts and told to fix the file in Python beside --layer; it names the layer, and says nothing of raw where it
    could not look (a backed file's raw is not read)."""
    assert main(fit_args(tmp_path, n_cells=200, n_genes=40) + ["--epochs", "1", "--quiet", "--embedding-only"]) == 0
    ids = ad.read_h5ad(tmp_path / "in.h5ad")
    ids.var["feature_name"] = ids.var_names
    ids.var_names = [f"ENSG{i:011d}" for i in range(ids.n_vars)]
    ids.layers["counts"] = ids.X.copy()
    sc.pp.normalize_total(ids)
    ids.write_h5ad(tmp_path / "ids.h5ad")
    embed = ["embed", str(tmp_path / "ids.h5ad"), "--model-dir", str(tmp_path / "model"), "--var-names", "feature_name"]
    embed += ["--out", str(tmp_path / "embedded.h5ad"), "--quiet"]
    for backed in ([], ["--backed"]):
        with pytest.raises(SystemExit) as told:
            main([*embed, *backed])
        assert "adata.layers['counts'] holds whole counts: pass --layer counts" in str(told.value), backed
        assert "fix the file in Python" not in str(told.value) and "Here neither" not in str(told.value), backed
    assert main([*embed, "--layer", "counts", "--backed"]) == 0  # as advised
    recorded = ad.read_h5ad(tmp_path / "embedded.h5ad").uns["cellvae"]["params"]
    assert recorded["var_names"] == "feature_name" and recorded["backed"] and recorded["layer"] == "counts"
    del ids.layers["counts"]
    ids.raw = ad.read_h5ad(tmp_path / "in.h5ad")  # counts in raw, which a backed read leaves on disk
    ids.write_h5ad(tmp_path / "raw.h5ad")
    embed[1] = str(tmp_path / "raw.h5ad")
    embed[embed.index("--out") + 1] = str(tmp_path / "from_raw.h5ad")
    for backed in ([], ["--backed"]):  # raw, named by the file's var_names, is not read under --var-names
        with pytest.raises(SystemExit) as told:
            main([*embed, *backed])
        assert "non-integer values" in str(told.value) and "Here neither" not in str(told.value), backed
    # a model trained on a layer, a file whose X holds the counts: X is named, not "read them again"
    on_layer = ad.read_h5ad(tmp_path / "in.h5ad")
    on_layer.layers["counts"] = on_layer.X.copy()
    cellvae.CellVAE(on_layer, layer="counts").fit(max_epochs=1, progress=False).save(tmp_path / "layer_model")
    swapped = ad.read_h5ad(tmp_path / "ids.h5ad")
    swapped.X, swapped.layers["counts"] = swapped.layers["counts"], swapped.X
    swapped.write_h5ad(tmp_path / "swapped.h5ad")
    command = ["embed", str(tmp_path / "swapped.h5ad"), "--model-dir", str(tmp_path / "layer_model"), "--quiet"]
    command += ["--out", str(tmp_path / "s.h5ad"), "--var-names", "feature_name"]
    with pytest.raises(SystemExit) as told:
        main(command)
    assert "adata.X holds whole counts: pass --layer X" in str(told.value) and "Here neither" not in str(told.value)


def test_a_backed_file_without_x_is_told_to_name_its_counts_layer(tmp_path):
    """anndata's backed X raises h5py's KeyError where the file has no X: the same advice as in memory."""
    assert main(fit_args(tmp_path, n_cells=200, n_genes=40) + ["--epochs", "1", "--quiet", "--embedding-only"]) == 0
    counts = ad.read_h5ad(tmp_path / "in.h5ad")
    ad.AnnData(obs=counts.obs, var=counts.var, layers={"counts": counts.X}).write_h5ad(tmp_path / "layer_only.h5ad")
    embed = ["embed", str(tmp_path / "layer_only.h5ad"), "--model-dir", str(tmp_path / "model"), "--backed"]
    embed += ["--out", str(tmp_path / "embedded.h5ad"), "--quiet"]
    fit = ["fit", str(tmp_path / "layer_only.h5ad"), "--backed", "--out", str(tmp_path / "fitted.h5ad")]
    fit += ["--model-dir", str(tmp_path / "other"), "--epochs", "1", "--quiet", "--embedding-only"]
    for command in (embed, fit):
        with pytest.raises(SystemExit, match=r"adata.X is empty .*, or in a layer named by --layer: adata.layers holds"):
            main(command)
    assert main([*embed, "--layer", "counts"]) == 0
    expected = cellvae.CellVAE.load(tmp_path / "model", load_anndata=False).get_latent(counts, progress=False)
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "embedded.h5ad").obsm["X_cellvae"], expected)
    assert main([*fit, "--layer", "counts"]) == 0


def test_training_that_fails_ends_in_an_error_line(tmp_path, monkeypatch):
    def diverging(*args, **kwargs):
        raise FloatingPointError("training produced non-finite losses or gradients 6 times; lower lr")

    monkeypatch.setattr(cellvae.CellVAE, "fit", diverging)
    args = fit_args(tmp_path, n_cells=100, n_genes=20)
    with pytest.raises(SystemExit, match="error: training produced non-finite"):
        main(args)
    assert not (tmp_path / "out.h5ad").exists() and not (tmp_path / "model").exists()  # nothing half-written
    with h5py.File(tmp_path / "plain.h5", "w") as handle:  # HDF5, but not an AnnData
        handle["values"] = np.arange(3)
    with pytest.raises(SystemExit, match="error: could not read .*plain.h5 as an AnnData"):
        main(["fit", str(tmp_path / "plain.h5"), "--backed", "--layer", "counts", *args[2:]])


def test_fit_dispersion_and_batch_size_options_reach_the_model(tmp_path):
    cellvae.datasets.simulate(n_cells=200, n_genes=60, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    args = ["fit", str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    args += "--batch-key batch --dispersion gene-batch --batch-size 32 --epochs 1 --quiet --embedding-only".split()
    assert main(args) == 0
    saved = cellvae.CellVAE.load(tmp_path / "model")
    assert saved.config.dispersion == "gene-batch" and saved.train_settings.batch_size == 32
    assert ad.read_h5ad(tmp_path / "out.h5ad").uns["cellvae"]["params"]["batch_size"] == 32


def test_quiet_leaves_out_the_progress_bars_that_fit_embed_and_map_show_otherwise(tmp_path, capsys, monkeypatch):
    """An audit: --quiet given to fit was not checked to reach training's and embedding's bars."""
    monkeypatch.setattr(cellvae.train, "PROGRESS_DELAY_S", 0.0)  # a bar from the first moment, as for an atlas
    cellvae.datasets.simulate(n_cells=200, n_genes=60, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    fit = ["fit", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--epochs", "2", "--embedding-only"]
    fit += ["--batch-key", "batch"]
    embed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e.h5ad")]
    more = cellvae.datasets.simulate(n_cells=100, n_genes=60, random_state=1)
    more.obs["batch"] = "new"
    more.write_h5ad(tmp_path / "new.h5ad")
    mapping = ["map", str(tmp_path / "new.h5ad"), "--model-dir", str(tmp_path / "model"), "--epochs", "2"]
    for quiet in (False, True):
        flag = ["--quiet"] if quiet else []
        runs = [
            ("cellvae", [*fit, "--out", str(tmp_path / f"fit{quiet}.h5ad"), "--overwrite", *flag]),
            ("get_latent", [*embed, "--overwrite", *flag]),
            ("cellvae", [*mapping, "--out", str(tmp_path / f"map{quiet}.h5ad"), *flag]),
        ]
        for bar, command in runs:
            assert main(command) == 0
            shown = capsys.readouterr().err
            assert ("%|" in shown and bar in shown) != quiet, (command, shown[-500:])


def test_a_seed_of_2_to_the_32_is_refused_and_the_largest_seed_accepted(capsys):
    parser = build_parser()
    assert parser.parse_args(["demo", "--seed", "4294967295"]).seed == 4294967295
    with pytest.raises(SystemExit) as stopped:
        main(["demo", "--seed", "4294967296"])
    assert stopped.value.code == 2 and "--seed: must be a whole number from 0 to 4294967295" in capsys.readouterr().err


def test_a_write_that_fails_half_way_leaves_no_partial_file(tmp_path, monkeypatch):
    adata = cellvae.datasets.simulate(n_cells=20, n_genes=10, random_state=0)

    def fails_half_way(self, path, *args, **kwargs):
        with open(path, "wb") as file:  # some bytes written, then the disk fills up
            file.write(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fails_half_way)
    with pytest.raises(OSError, match="No space left"):
        write_output(adata, str(tmp_path / "out.h5ad"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "command",
    [["demo"], *([name, "in.h5ad", "--model-dir", "model", "--out", "out.h5ad"] for name in ("embed", "map"))],
)
def test_commands_that_run_in_one_process_are_refused_under_torchrun(tmp_path, monkeypatch, command):
    """Under torchrun every process ran them and wrote the same outputs: one then failed on "--out exists"."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=f"error: cellvae {command[0]} runs in one process: run it without torchrun"):
        main(command)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def fitted_model(tmp_path):
    cellvae.datasets.simulate(n_cells=150, n_genes=30, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    outputs = ["--out", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model")]
    assert main(["fit", str(tmp_path / "in.h5ad"), *outputs, "--epochs", "1", "--quiet", "--embedding-only"]) == 0
    return tmp_path


def test_embed_under_scanpys_umap_key_warns_with_the_option_that_avoids_it(fitted_model):
    """The warning was followed by a note to fix the file in Python, which needs no change."""
    tmp_path = fitted_model
    embed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.h5ad")]
    run = subprocess.run(
        [sys.executable, "-m", "cellvae", *embed, "--key-added", "X_umap", "--quiet"], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    told = run.stderr
    assert "--key-added X_umap is where scanpy's sc.tl.umap writes its embedding" in told and "choose another --key-added" in told
    assert "in Python" not in told


def test_an_empty_x_is_told_in_the_command_lines_terms(fitted_model):
    """The advice named CellVAE(adata, layer=...) and "a trained model reads the layer it was trained on" first."""
    tmp_path = fitted_model
    adata = ad.read_h5ad(tmp_path / "in.h5ad")
    adata.layers["counts"], adata.X = adata.X, None
    adata.write_h5ad(tmp_path / "layered.h5ad")
    told = r"adata.X is empty \(None\); the raw counts must be in adata.X, or in a layer named by --layer: adata.layers holds"
    fit = ["fit", str(tmp_path / "layered.h5ad"), "--out", str(tmp_path / "o.h5ad"), "--model-dir", str(tmp_path / "new")]
    with pytest.raises(SystemExit, match=rf"{told} \['counts'\]$"):
        main([*fit, "--epochs", "1"])
    embed = ["embed", str(tmp_path / "layered.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "o.h5ad")]
    with pytest.raises(SystemExit, match=rf"{told} \['counts'\]; without --layer, the counts are read where the model read"):
        main(embed)
    assert main([*embed, "--layer", "counts", "--quiet"]) == 0


def test_embed_refuses_another_tools_uns_record_and_keeps_the_other_entries_of_its_own(fitted_model, capsys):
    """As tl.embed: a record that is another tool's is refused before any work; one of the user's notes gets params."""
    tmp_path = fitted_model
    adata = ad.read_h5ad(tmp_path / "out.h5ad")
    adata.uns["X_mine"] = {"params": {"method": "another tool"}}
    adata.uns["X_notes"] = {"note": "my own notes"}
    adata.uns["cellvae"]["note"] = "kept"
    adata.write_h5ad(tmp_path / "annotated.h5ad")
    embed = ["embed", str(tmp_path / "annotated.h5ad"), "--model-dir", str(tmp_path / "model"), "--out"]
    with pytest.raises(SystemExit, match=r"adata.uns\['X_mine'\]\['params'\] is another tool's record .* another --key-added"):
        main([*embed, str(tmp_path / "X_mine.h5ad"), "--key-added", "X_mine"])
    assert not (tmp_path / "X_mine.h5ad").exists()
    adata.uns["X_note"] = {"params": "my own note"}  # not a mapping: the user's, refused too
    adata.write_h5ad(tmp_path / "noted.h5ad")
    with pytest.raises(SystemExit, match=r"adata.uns\['X_note'\]\['params'\] holds a str; .* another --key-added"):
        main(["embed", str(tmp_path / "noted.h5ad"), *embed[2:], str(tmp_path / "X_note.h5ad"), "--key-added", "X_note"])
    for key in ("X_notes", "X_cellvae"):
        assert main([*embed, str(tmp_path / f"{key}.h5ad"), "--key-added", key]) == 0
    notes = ad.read_h5ad(tmp_path / "X_notes.h5ad").uns["X_notes"]
    assert notes["note"] == "my own notes" and notes["params"]["key_added"] == "X_notes"
    record = ad.read_h5ad(tmp_path / "X_cellvae.h5ad").uns["cellvae"]
    assert record["note"] == "kept" and record["params"]["model_dir"] == str(tmp_path / "model")


def test_embed_says_a_neighbour_graph_made_from_the_replaced_embedding_is_stale(fitted_model, capsys):
    """--embedding-only output, then sc.pp.neighbors (no UMAP): embedding it again with another model still tells to
    recompute the graph; with the same model, whose embedding is the same again, there is nothing stale to tell."""
    tmp_path = fitted_model
    adata = ad.read_h5ad(tmp_path / "out.h5ad")
    sc.pp.neighbors(adata, use_rep="X_cellvae")
    assert "X_umap" not in adata.obsm
    adata.write_h5ad(tmp_path / "graph.h5ad")
    capsys.readouterr()
    command = ["embed", str(tmp_path / "graph.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e.h5ad")]
    assert main(command) == 0
    assert "recompute" not in capsys.readouterr().err  # the same model: the same embedding, the graph still true
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_cellvae"], adata.obsm["X_cellvae"])
    adata.obsm["X_cellvae"] = adata.obsm["X_cellvae"] + 1.0  # an earlier embedding of another model, and its graph
    sc.pp.neighbors(adata, use_rep="X_cellvae")
    adata.write_h5ad(tmp_path / "graph.h5ad")
    assert main([*command, "--overwrite"]) == 0
    assert "were made from an earlier obsm['X_cellvae']; recompute them" in capsys.readouterr().err


def test_embed_and_map_read_gene_names_from_the_var_column_var_names_names(fitted_model, capsys):
    """CELLxGENE-style files: Ensembl IDs as var_names, the model's symbols in var['feature_name']."""
    tmp_path = fitted_model
    adata = ad.read_h5ad(tmp_path / "in.h5ad")
    symbols = list(adata.var_names)
    renamed = adata[:, ::-1].copy()  # the columns in another order, one symbol repeated on an extra gene
    renamed = ad.concat([renamed, renamed[:, :1]], axis=1, merge="first")
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    renamed.var["feature_name"] = [*symbols[::-1], symbols[-1]]
    renamed.obs = adata.obs.copy()
    renamed.write_h5ad(tmp_path / "ensembl.h5ad")
    model = ["--model-dir", str(tmp_path / "model")]
    with pytest.raises(SystemExit, match=r"var\['feature_name'\] holds the model's genes: pass --var-names feature_name"):
        main(["embed", str(tmp_path / "ensembl.h5ad"), *model, "--out", str(tmp_path / "e.h5ad")])
    with pytest.raises(SystemExit, match=r"has no var\['symbol'\] \(--var-names\); var columns there: \['feature_name'\]"):
        main(["embed", str(tmp_path / "ensembl.h5ad"), *model, "--out", str(tmp_path / "e.h5ad"), "--var-names", "symbol"])
    assert not (tmp_path / "e.h5ad").exists()
    assert (
        main(["embed", str(tmp_path / "ensembl.h5ad"), *model, "--out", str(tmp_path / "e.h5ad"), "--var-names", "feature_name"])
        == 0
    )
    assert main(["embed", str(tmp_path / "in.h5ad"), *model, "--out", str(tmp_path / "plain.h5ad")]) == 0
    embedded = ad.read_h5ad(tmp_path / "e.h5ad")
    np.testing.assert_allclose(embedded.obsm["X_cellvae"], ad.read_h5ad(tmp_path / "plain.h5ad").obsm["X_cellvae"], atol=1e-6)
    assert list(embedded.var_names) == list(renamed.var_names)  # the file's own names are kept
    # map reads them alike: a model with batches, a query whose batch is new
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.write_h5ad(tmp_path / "batched.h5ad")
    fit = ["fit", str(tmp_path / "batched.h5ad"), "--batch-key", "batch", "--out", str(tmp_path / "f.h5ad")]
    assert main([*fit, "--model-dir", str(tmp_path / "ref"), "--epochs", "1", "--quiet", "--embedding-only"]) == 0
    for path in ("ensembl.h5ad", "batched.h5ad"):
        query = ad.read_h5ad(tmp_path / path)
        query.obs["batch"] = "new"
        query.write_h5ad(tmp_path / f"query_{path}")
    mapping = ["--model-dir", str(tmp_path / "ref"), "--epochs", "2", "--quiet"]
    renamed_query = [str(tmp_path / "query_ensembl.h5ad"), "--var-names", "feature_name"]
    assert main(["map", *renamed_query, *mapping, "--out", str(tmp_path / "m1.h5ad"), "--seed", "4", "--batch-size", "64"]) == 0
    recorded = ad.read_h5ad(tmp_path / "m1.h5ad").uns["cellvae"]["params"]  # what reproduces the mapping
    assert recorded["var_names"] == "feature_name" and recorded["mapping_random_state"] == 4
    assert recorded["mapping_batch_size"] == 64 and "backed" not in recorded
    # where it trained: with the seed, what bitwise reproducibility needs
    assert recorded["mapping_device"] == "cpu" and recorded["mapping_torch_threads"] == torch.get_num_threads()
    assert (
        main(
            [
                "map",
                str(tmp_path / "query_batched.h5ad"),
                *mapping,
                "--out",
                str(tmp_path / "m2.h5ad"),
                "--seed",
                "4",
                "--batch-size",
                "64",
            ]
        )
        == 0
    )
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "m1.h5ad").obsm["X_cellvae"], ad.read_h5ad(tmp_path / "m2.h5ad").obsm["X_cellvae"], atol=1e-5
    )


# ----------------------------------------------------------------------------- cellvae map


def test_names_the_console_cannot_encode_are_escaped_not_an_error_after_training(tmp_path):
    """A redirected stdout in a code page without a path's characters (Windows' ANSI code page): the summary lines
    escape them, and --out is written (an encoding error after the model was saved lost it)."""
    cellvae.datasets.simulate(n_cells=150, n_genes=30, random_state=0).write_h5ad(tmp_path / "in.h5ad")
    out, model = tmp_path / "out β.h5ad", tmp_path / "model β"
    command = [sys.executable, "-m", "cellvae", "fit", str(tmp_path / "in.h5ad"), "--out", str(out), "--model-dir", str(model)]
    env = dict(os.environ, PYTHONIOENCODING="cp1252", MPLBACKEND="Agg")
    run = subprocess.run([*command, "--epochs", "1", "--quiet", "--embedding-only"], env=env, capture_output=True, check=False)
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert out.exists() and (model / "config.json").exists() and b"model \\u03b2" in run.stdout


@pytest.fixture(scope="module")
def reference_folder(tmp_path_factory):
    """A reference model trained on batch0 and batch1 of simulated cells of 4 types, saved in model/, with its
    cells in ref.h5ad and the held-out batch2 in query.h5ad."""
    folder = tmp_path_factory.mktemp("mapping")
    data = cellvae.datasets.simulate(n_cells=800, n_genes=100, n_batches=3, n_cell_types=4, random_state=3, batch_effect=0.8)
    is_query = (data.obs["batch"] == "batch2").to_numpy()
    data[~is_query].copy().write_h5ad(folder / "ref.h5ad")
    data[is_query].copy().write_h5ad(folder / "query.h5ad")
    cellvae.CellVAE(data[~is_query].copy(), batch_key="batch").fit(max_epochs=40, progress=False).save(folder / "model")
    return folder


def test_map_refuses_options_that_would_lose_the_embedding_and_names_the_reference_as_the_command_line_does(
    reference_folder, tmp_path
):
    """--soft with --key-added cell_type_vote_shares wrote the vote shares over the embedding (exit 0); a reference
    whose labels are all missing was told as ref_adata.obs[...], a name the command line never showed."""
    ref, model = reference_folder, reference_folder / "model"
    command = ["map", str(ref / "query.h5ad"), "--model-dir", str(model), "--out", str(tmp_path / "out.h5ad"), "--quiet"]
    labels = ["--reference", str(ref / "ref.h5ad"), "--labels-key", "cell_type", "--epochs", "1"]
    with pytest.raises(SystemExit, match=r"--soft writes obsm\['cell_type_vote_shares'\], the --key-added given"):
        main([*command, *labels, "--soft", "--key-added", "cell_type_vote_shares"])
    unlabelled = ad.read_h5ad(ref / "ref.h5ad")
    unlabelled.obs["cell_type"] = np.nan
    unlabelled.write_h5ad(tmp_path / "unlabelled.h5ad")
    labels[1] = str(tmp_path / "unlabelled.h5ad")
    told = f"--reference {tmp_path / 'unlabelled.h5ad'}: --labels-key cell_type has no labelled cells"
    with pytest.raises(SystemExit, match=re.escape(told)):
        main([*command, *labels])
    assert not (tmp_path / "out.h5ad").exists()
    # a warning about the reference's cells names that file (it was told of the input, to be fixed in Python there)
    lacking = ad.read_h5ad(ref / "ref.h5ad")[:, 5:].copy()
    lacking.write_h5ad(tmp_path / "lacking.h5ad")
    labels[1] = str(tmp_path / "lacking.h5ad")
    about = re.escape(f"--reference {tmp_path / 'lacking.h5ad'}: 5 of the model's 100 genes are missing")
    with pytest.warns(UserWarning, match=about):  # (shown from the shell as "UserWarning: --reference ...: ...")
        assert main([*command, *labels, "--overwrite"]) == 0
    with warnings.catch_warnings(record=True) as shown:  # a filter on the message still applies to it
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=r"\d+ of the model's \d+ genes are missing")
        assert main([*command, *labels, "--overwrite"]) == 0
    assert not [w for w in shown if "genes are missing" in str(w.message)]
    lacking.obs["batch"] = lacking.obs["batch"].astype(str)
    lacking.obs.iloc[:3, lacking.obs.columns.get_loc("batch")] = "batchX"  # then an error about the same file
    lacking.write_h5ad(tmp_path / "lacking.h5ad")
    with pytest.warns(UserWarning, match=about):  # told before the error, not lost
        with pytest.raises(SystemExit, match=r"--reference .*lacking.h5ad: obs\['batch'\] has categories unseen"):
            main([*command, *labels, "--overwrite"])


def test_an_out_inside_the_model_folder_is_told_first_and_advice_names_options(tmp_path):
    """--out inside a --model-dir not yet made was told to create its folder, then to pass --overwrite, and only then
    that it may not lie there; advice with no option (beta, free bits; gene identifiers) says what the command line
    has."""
    command = fit_args(tmp_path, n_cells=100, n_genes=20)
    command[command.index("--out") + 1] = str(tmp_path / "model" / "out.h5ad")
    with pytest.raises(SystemExit, match="--out must not be --model-dir or inside it"):
        main(command)
    collapse = cellvae.diagnostics.collapse_message(np.array([0.001, 0.002]), np.array([1e-6, 1e-6]), lr=1e-3)
    assert "fit has no option for beta, kl_warmup or free_bits: train in Python" in in_command_line_terms(collapse)
    identifiers = "Check that the data and the model use the same gene identifiers (symbols vs Ensembl IDs)"
    assert "--var-names COLUMN names the genes by a var column" in in_command_line_terms(identifiers)
    unknown = "pass unlabeled_category='Unknown' if those reference cells are unlabelled, or rename that label"
    assert in_command_line_terms(unknown).startswith("pass --unlabeled-category Unknown if those")
    label = (
        "ref_adata.obs['lab'] has a label 'Unknown', the label of query cells over unknown_threshold or novelty_threshold "
        "too; unlabeled_category 'foo' is no label"
    )
    assert in_command_line_terms(label) == (
        "the --reference file's obs['lab'] has a label 'Unknown', the label of query cells over --unknown-threshold or "
        "--novelty-threshold too; --unlabeled-category foo is no label"
    )
    # the --reference file is read by its var_names where the model reads counts: its fixes are made in that file
    by_column = (
        "--reference ref.h5ad: only 0 of the model's 40 genes (0%) are in adata.var_names (at least 80% needed); missing "
        "e.g. ['gene0']. adata.var['orig'] holds the model's genes: name the genes by it first, adata.var_names = "
        "adata.var['orig'].astype(str) (then adata.var_names_make_unique() if some repeat)"
    )
    told = in_command_line_terms(by_column, argparse.Namespace(input="q.h5ad", model_dir="m"))
    assert "--var-names" not in told and "fix the file in Python first, adata = anndata.read_h5ad('ref.h5ad')" in told
    assert told.endswith("adata.write_h5ad('FIXED.h5ad'), then pass --reference FIXED.h5ad)")
    assert in_command_line_terms("novelty_threshold needs at least 2 labelled").startswith("--novelty-threshold needs")
    assert in_command_line_terms("unlabeled_category 'a\nb'") == "unlabeled_category 'a\nb'"  # no repr on one line
    quoted = """unlabeled_category "it's" is no label; ref_adata has 1: pass novelty_threshold=None"""
    assert in_command_line_terms(quoted) == (
        "--unlabeled-category 'it'\"'\"'s' is no label; the --reference file has 1: leave out --novelty-threshold"
    )


def folder_bytes(folder) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_map_embeds_the_query_in_the_references_space_and_transfers_its_labels(reference_folder, tmp_path, capsys):
    ref, model, out, query_model = reference_folder, reference_folder / "model", tmp_path / "out.h5ad", tmp_path / "qmodel"
    before = folder_bytes(model)
    command = [
        "map",
        str(ref / "query.h5ad"),
        "--model-dir",
        str(model),
        "--out",
        str(out),
        "--query-model-dir",
        str(query_model),
    ]
    command += ["--reference", str(ref / "ref.h5ad"), "--labels-key", "cell_type", "--epochs", "20", "--quiet"]
    assert main(command) == 0
    assert "new batches: ['batch2']" in capsys.readouterr().out
    mapped, query = ad.read_h5ad(out), ad.read_h5ad(ref / "query.h5ad")
    assert mapped.obsm["X_cellvae"].shape == (query.n_obs, 10) and np.isfinite(mapped.obsm["X_cellvae"]).all()
    assert (mapped.obs_names == query.obs_names).all() and (mapped.X != query.X).nnz == 0  # the query, as it was, plus
    accuracy = (mapped.obs["cell_type_predicted"].astype(str) == mapped.obs["cell_type"].astype(str)).mean()
    assert accuracy > 0.9
    assert mapped.obs["cell_type_uncertainty"].between(0, 1).all() and mapped.obs["cell_type_novelty"].between(0, 1).all()
    params = mapped.uns["cellvae"]["params"]
    assert params["model_dir"] == str(model) and params["query_model_dir"] == str(query_model)
    assert params["labels_key"] == "cell_type" and 1 <= params["mapping_epochs"] <= params["mapping_max_epochs"] == 20
    assert params["epochs_trained"] == params["max_epochs"] == 40
    assert params["k"] == 15 and not {"unknown_threshold", "novelty_threshold", "soft"} & set(params)  # the vote's settings
    assert folder_bytes(model) == before  # the reference model is only read
    # the saved query model embeds the query as written, and the reference as the reference model does (frozen)
    saved = cellvae.CellVAE.load(query_model)
    assert saved.config.batch_categories == ["batch0", "batch1", "batch2"]
    again = ["embed", str(ref / "query.h5ad"), "--model-dir", str(query_model), "--out", str(tmp_path / "again.h5ad")]
    assert main(again) == 0
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "again.h5ad").obsm["X_cellvae"], mapped.obsm["X_cellvae"], atol=1e-5)
    reference = ad.read_h5ad(ref / "ref.h5ad")
    np.testing.assert_array_equal(saved.get_latent(reference), cellvae.CellVAE.load(model).get_latent(reference))
    # Unknown where the vote is unsure: with a threshold of 0, every cell whose neighbours disagree at all
    command[command.index("--out") + 1] = str(tmp_path / "unsure.h5ad")
    assert main([*command, "--unknown-threshold", "0", "--soft", "--overwrite"]) == 0
    unsure = ad.read_h5ad(tmp_path / "unsure.h5ad")
    expected = np.where(mapped.obs["cell_type_uncertainty"] > 0, "Unknown", mapped.obs["cell_type_predicted"].astype(str))
    np.testing.assert_array_equal(unsure.obs["cell_type_predicted"].astype(str), expected)
    assert unsure.uns["cellvae"]["params"]["unknown_threshold"] == 0 and unsure.uns["cellvae"]["params"]["soft"]
    shares = unsure.obsm["cell_type_vote_shares"]  # --soft: each label's share of the vote, as transfer_labels(soft=True)
    labels = unsure.uns["cell_type_vote_shares"]["labels"]
    assert list(labels) == sorted(reference.obs["cell_type"].astype(str).unique()) and shares.shape[1] == len(labels)
    np.testing.assert_allclose(shares.max(axis=1), 1 - unsure.obs["cell_type_uncertainty"], rtol=1e-5)
    assert "cell_type_vote_shares" not in mapped.obsm  # only when asked


def test_map_without_labels_reads_the_query_batches_and_counts_where_it_is_told(reference_folder, tmp_path):
    """Only the model is needed to embed; the query's batches under another obs column and its counts in a layer
    are named with --batch-key and --layer; --train-input-layer embeds the reference anew for the vote."""
    ref = reference_folder
    query = ad.read_h5ad(ref / "query.h5ad")
    query.obs = query.obs.rename(columns={"batch": "donor"})
    query.layers["umis"] = query.X.copy()
    query.X = query.X * 0.5  # not counts
    query.write_h5ad(tmp_path / "query.h5ad")
    command = ["map", str(tmp_path / "query.h5ad"), "--model-dir", str(ref / "model"), "--out", str(tmp_path / "out.h5ad")]
    command += ["--batch-key", "donor", "--layer", "umis", "--epochs", "3", "--quiet"]
    assert main(command) == 0
    mapped = ad.read_h5ad(tmp_path / "out.h5ad")
    assert mapped.obsm["X_cellvae"].shape == (query.n_obs, 10)
    assert not [column for column in mapped.obs.columns if column.endswith("_predicted")]
    params = mapped.uns["cellvae"]["params"]
    assert params["layer"] == "umis" and params["query_batch_key"] == "donor" and "query_model_dir" not in params
    labels = ["--reference", str(ref / "ref.h5ad"), "--labels-key", "cell_type", "--train-input-layer", "--key-added", "X_ft"]
    assert main([*command, *labels, "--overwrite"]) == 0
    mapped = ad.read_h5ad(tmp_path / "out.h5ad")
    assert mapped.obsm["X_ft"].shape == (query.n_obs, 10) and mapped.uns["X_ft"]["params"]["train_input_layer"]
    assert mapped.obs["cell_type_predicted"].notna().all()
    # a .zarr query (always streamed) with --backed for the .h5ad reference
    query.write_zarr(tmp_path / "query.zarr")
    streamed = ["map", str(tmp_path / "query.zarr"), *command[2:], *labels[:4], "--backed", "--out", str(tmp_path / "z.h5ad")]
    assert main(streamed) == 0
    assert ad.read_h5ad(tmp_path / "z.h5ad").obs["cell_type_predicted"].notna().all()
    with pytest.raises(SystemExit, match="--backed is for .h5ad files; a .zarr store is always streamed"):
        main(["map", str(tmp_path / "query.zarr"), *command[2:], "--backed", "--out", str(tmp_path / "z2.h5ad")])


def test_an_input_inside_the_model_folder_that_overwrite_replaces_is_refused_not_removed(reference_folder, tmp_path):
    """A model's adata.h5ad (save_anndata=True) given as the input of a fit or map that replaces that folder would be
    removed with it: refused before any work, the file kept."""
    cells = ad.read_h5ad(reference_folder / "ref.h5ad")
    cellvae.CellVAE.load(reference_folder / "model", adata=cells).save(tmp_path / "held", save_anndata=True)
    held = tmp_path / "held" / "adata.h5ad"
    fit = ["fit", str(held), "--model-dir", str(tmp_path / "held"), "--out", str(tmp_path / "o.h5ad"), "--overwrite"]
    mapping = ["map", str(held), "--model-dir", str(reference_folder / "model"), "--out", str(tmp_path / "o.h5ad")]
    mapping += ["--query-model-dir", str(tmp_path / "held"), "--overwrite"]
    for command in (fit, mapping):
        with pytest.raises(SystemExit, match=r"the input .*adata.h5ad lies in --(query-)?model-dir .*which --overwrite replaces"):
            main([*command, "--epochs", "1", "--quiet"])
        assert held.exists() and not (tmp_path / "o.h5ad").exists()


def test_ctrl_c_while_the_cells_are_embedded_keeps_the_trained_model(reference_folder, tmp_path, monkeypatch, capsys):
    """fit and map saved their model only after embedding every cell (a pass over the whole file of a backed atlas):
    Ctrl-C there lost the training (exit 130, no model)."""
    embedded = cellvae.CellVAE.get_latent

    def ctrl_c(*args, **kwargs):  # as the embedding pass receives Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(cellvae.CellVAE, "get_latent", ctrl_c)
    assert main([*fit_args(tmp_path, 300, 30), "--epochs", "2", "--quiet"]) == 130
    assert f"saved the model in {tmp_path / 'model'}" in capsys.readouterr().out
    assert len(cellvae.CellVAE.load(tmp_path / "model").history) == 2 and not (tmp_path / "out.h5ad").exists()
    query, reference = reference_folder / "query.h5ad", reference_folder / "model"
    command = ["map", str(query), "--model-dir", str(reference), "--out", str(tmp_path / "mapped.h5ad")]
    assert main([*command, "--query-model-dir", str(tmp_path / "query_model"), "--epochs", "2", "--quiet"]) == 130
    assert f"mapped in 2 epochs; saved the query model in {tmp_path / 'query_model'}" in capsys.readouterr().out
    monkeypatch.setattr(cellvae.CellVAE, "get_latent", embedded)
    query_model = cellvae.CellVAE.load(tmp_path / "query_model")
    assert len(query_model.history) == 2 and "batch2" in query_model.config.batch_categories
    assert not (tmp_path / "mapped.h5ad").exists()


def told_steps(message: str) -> dict[str, list[str]]:
    """The batches each step of an embed refusal names: with the prefix, as they are, to map."""
    steps = {}
    for step, pattern in {
        "with_it": r"embed the cells of (\[[^]]*\]) with --batch-prefix",
        "as_is": r"embed the cells of (\[[^]]*\]) \(the model's batches as they are\)",
        "new": r"map the cells of (\[[^]]*\]), new to the model",
    }.items():
        found = re.findall(pattern, message)
        assert len(found) <= 1, message
        if found:
            steps[step] = ast.literal_eval(found[0])
    return steps


def test_embed_tells_each_batch_of_a_mapped_query_its_step_whatever_the_prefix(reference_folder, tmp_path):
    """Reviews and audits: a mapped query's batches embedded with a mistyped --batch-prefix, or without it, were told
    they were unseen (map them again); a mistyped prefix beside reference or new batches was told only the prefix (then
    refused again); lists were cut at 5 batches without a word. Every subset of a reference batch (batch1), a query
    batch named like a reference one (batch0, mapped as query_batch0), another query batch (batch2) and a new batch
    (batch3), under every prefix, either embeds or names each batch's step."""
    cells = ad.read_h5ad(reference_folder / "query.h5ad")
    cells.obs["batch"] = np.where(np.arange(cells.n_obs) < 30, "batch0", "batch2")
    query = str(tmp_path / "query.h5ad")
    cells.write_h5ad(query)
    mapping = ["map", query, "--model-dir", str(reference_folder / "model"), "--out", str(tmp_path / "mapped.h5ad")]
    assert (
        main([*mapping, "--batch-prefix", "query_", "--query-model-dir", str(tmp_path / "qm"), "--epochs", "1", "--quiet"]) == 0
    )
    reference = ad.read_h5ad(reference_folder / "ref.h5ad")
    new = cells[:10].copy()
    new.obs["batch"] = "batch3"
    mixed = ad.concat([cells, reference[reference.obs["batch"] == "batch1"][:5], new])
    mixed.obs_names_make_unique()
    embed = ["--model-dir", str(tmp_path / "qm"), "--out", str(tmp_path / "e.h5ad"), "--quiet", "--overwrite"]
    classes = {"batch0": "with_it", "batch2": "with_it", "batch1": "as_is", "batch3": "new"}
    for size in range(1, 5):
        for batches in itertools.combinations(["batch0", "batch1", "batch2", "batch3"], size):
            part = mixed[mixed.obs["batch"].isin(batches)].copy()
            part.write_h5ad(tmp_path / "part.h5ad")
            expected = {c: sorted(b for b in batches if classes[b] == c) for c in ("with_it", "as_is", "new")}
            expected = {c: names for c, names in expected.items() if names}
            for prefix in (None, "query_", "qry_", "query"):
                command = ["embed", str(tmp_path / "part.h5ad"), *embed] + (["--batch-prefix", prefix] if prefix else [])
                works = set(batches) <= (
                    {"batch0", "batch1"} if prefix is None else {"batch0", "batch2"} if prefix == "query_" else set()
                )
                case = f"{batches} with --batch-prefix {prefix}"
                if works:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)  # (batch0 beside batch1, without a prefix: warned of)
                        assert main(command) == 0, case
                    continue
                with pytest.raises(SystemExit) as refused:
                    main(command)
                message = str(refused.value)
                if prefix is None and "batch0" not in batches and "batch2" not in batches:  # nothing mapped: unseen, map
                    assert "unseen in training" in message and "map_query" in message, (case, message)
                elif set(batches) == {"batch1"}:
                    assert "holds the model's batches as they are (['batch1']): leave out --batch-prefix" in message, case
                elif set(batches) == {"batch3"}:
                    assert f"['batch3'] new to the model, with or without --batch-prefix {prefix!r}: map them" in message, case
                elif set(expected) == {"with_it"}:  # one step: the model's prefix
                    first = "If these are the mapped query's cells: " if prefix is None else f"not {prefix!r}: "
                    assert first + "pass --batch-prefix query_" in message, (case, message)
                else:
                    assert told_steps(message) == expected, (case, message)
                    assert message.count("in separate runs, ") == 1, (case, message)
                if "batch0" in batches:
                    note = "(['batch0'] also names a reference batch: embed the reference's cells of it without --batch-prefix)"
                    assert note in message, (case, message)
    # without the prefix, a query batch named like a reference one beside a reference batch is warned of
    part = mixed[mixed.obs["batch"].isin(["batch0", "batch1"])].copy()
    part.write_h5ad(tmp_path / "part.h5ad")
    beside = r"batches \['batch0'\] are embedded .* pass --batch-prefix 'query_' for them, in a run of their own \(those of "
    with pytest.warns(UserWarning, match=beside + r"\['batch1'\] without it\); if they are the reference's, ignore this"):
        assert main(["embed", str(tmp_path / "part.h5ad"), *embed[:2], "--out", str(tmp_path / "p.h5ad"), "--quiet"]) == 0
    assert main(["embed", query, *embed, "--batch-prefix", "query_"]) == 0


def test_embed_with_a_batch_prefix_tells_numbers_written_otherwise(tmp_path):
    """An audit: floats (2.0) for a mapped query's numbered batch (query_2) were told as a new batch to map."""
    cells = cellvae.datasets.simulate(n_cells=300, n_genes=30, n_batches=3, random_state=0)
    cells.obs["batch"] = cells.obs["batch"].cat.codes.astype(int)  # batches numbered 0, 1, 2
    cells[cells.obs["batch"] < 2].copy().write_h5ad(tmp_path / "ref.h5ad")
    query = cells[cells.obs["batch"] == 2].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    model, query_model = str(tmp_path / "model"), str(tmp_path / "query_model")
    fit = [
        "fit",
        str(tmp_path / "ref.h5ad"),
        "--batch-key",
        "batch",
        "--out",
        str(tmp_path / "ref_out.h5ad"),
        "--model-dir",
        model,
    ]
    assert main([*fit, "--epochs", "1", "--quiet", "--embedding-only"]) == 0
    mapping = ["map", str(tmp_path / "query.h5ad"), "--model-dir", model, "--out", str(tmp_path / "mapped.h5ad")]
    assert main([*mapping, "--batch-prefix", "query_", "--query-model-dir", query_model, "--epochs", "1", "--quiet"]) == 0
    query.obs["batch"] = query.obs["batch"].astype(float)
    query.write_h5ad(tmp_path / "floats.h5ad")
    embed = ["embed", str(tmp_path / "floats.h5ad"), "--model-dir", query_model, "--out", str(tmp_path / "e.h5ad"), "--quiet"]
    for prefix in (["--batch-prefix", "query_"], [], ["--batch-prefix", "qry_"]):  # (review 47: without it, or mistyped,
        # told as new batches to map)
        with pytest.raises(SystemExit, match=r"holds floats \(2.0\) where the model's categories are integers \(2\): convert"):
            main([*embed, *prefix])
    both = ad.concat([query, ad.read_h5ad(tmp_path / "ref.h5ad")[:20]])  # a reference batch's cells beside, as floats too
    both.obs["batch"] = both.obs["batch"].astype(float)
    both.write_h5ad(tmp_path / "both.h5ad")
    with pytest.raises(SystemExit, match=r"convert it first, adata.obs\['batch'\] = adata.obs\['batch'\].astype\(int\)"):
        main(["embed", str(tmp_path / "both.h5ad"), *embed[2:]])
    query.obs["batch"] = query.obs["batch"].astype(int)
    query.write_h5ad(tmp_path / "floats.h5ad")  # (converted, as told)
    assert main([*embed, "--batch-prefix", "query_"]) == 0
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "e.h5ad").obsm["X_cellvae"], ad.read_h5ad(tmp_path / "mapped.h5ad").obsm["X_cellvae"], atol=1e-5
    )


@pytest.mark.parametrize(
    "option, value, told",
    [
        ("--epochs", "abc", "--epochs: must be a positive integer, got 'abc'"),
        ("--batch-size", "1.5", "--batch-size: must be a positive integer, got '1.5'"),
        ("--seed", "abc", "--seed: must be a whole number from 0 to 4294967295, got 'abc'"),
        ("--seed", "4294967296", "--seed: must be a whole number from 0 to 4294967295, got '4294967296'"),
        ("--unknown-threshold", "abc", "--unknown-threshold: must be a number from 0 to 1, got 'abc'"),
        ("--novelty-threshold", "1.5", "--novelty-threshold: must be a number from 0 to 1, got '1.5'"),
    ],
)
def test_option_values_of_the_wrong_kind_are_told_by_argparse(option, value, told, capsys):
    """Found untested by a coverage audit: numbers that are not numbers, out of range."""
    command = "fit" if option in ("--epochs", "--batch-size", "--seed") else "map"
    with pytest.raises(SystemExit) as exit:
        main([command, "in.h5ad", "--model-dir", "m", "--out", "o.h5ad", option, value])
    assert exit.value.code == 2 and told in capsys.readouterr().err


def test_resume_without_checkpoints_and_a_prefix_for_a_model_without_batches_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="--resume needs the --checkpoint-dir of the run to continue"):
        main([*fit_args(tmp_path, 100, 20), "--resume"])
    assert main([*fit_args(tmp_path, 100, 20), "--epochs", "1", "--quiet", "--embedding-only"]) == 0  # (no --batch-key)
    embed = ["embed", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e.h5ad")]
    with pytest.raises(SystemExit, match=r"the model in .*model reads no batches; leave out --batch-prefix"):
        main([*embed, "--batch-prefix", "query_"])
    assert not (tmp_path / "e.h5ad").exists()


def test_the_number_a_mapped_batch_name_ends_in_keeps_its_sign():
    """Review 48: query_-1 was read as 1 (the minus taken for the separator)."""
    from cellvae.cli import _number_after_a_prefix

    names = ["query_-1", "query_2", "query-2", "query_donor_1", "query_2.5", "batch0", "query_x"]
    assert [_number_after_a_prefix(name, None) for name in names] == ["-1", "2", "2", "1", "2.5", "batch0", "query_x"]
    assert _number_after_a_prefix("qry_-1", "qry_") == "-1" and _number_after_a_prefix("query_x", "query_") == "x"


def test_batch_lists_in_messages_say_how_many_there_are_where_cut():
    from cellvae.cli import _listed

    assert _listed(["a", "b"]) == "['a', 'b']"
    cut = _listed([f"donor{i}" for i in range(12)])
    assert cut.startswith("['donor0', 'donor1', ") and cut.endswith(", 'donor9', ... (12 in all)]") and "donor10" not in cut


def test_fit_says_when_the_last_epoch_was_the_best(tmp_path, capsys):
    """Training still improving at its last epoch is told, with the advice of more --epochs; the record keeps it."""
    command = [*fit_args(tmp_path, 300, 30), "--quiet", "--embedding-only"]
    assert main([*command, "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    params = ad.read_h5ad(tmp_path / "out.h5ad").uns["cellvae"]["params"]
    assert params["best_epoch"] == 2 and params["device"] == "cpu" and params["still_improving"]
    assert "trained 3 epochs (still improving at the last epoch: more --epochs than 3 may give a better model)" in out
    embed = ["embed", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "e.h5ad")]
    assert main(embed) == 0
    again = ad.read_h5ad(tmp_path / "e.h5ad").uns["cellvae"]["params"]  # the loaded model's record says so too
    assert again["best_epoch"] == 2 and again["still_improving"]
    assert main([*command, "--epochs", "1", "--overwrite"]) == 0
    assert "still improving" not in capsys.readouterr().out  # (one epoch is no trend)
    assert "still_improving" not in ad.read_h5ad(tmp_path / "out.h5ad").uns["cellvae"]["params"]


def test_fit_and_map_save_into_empty_model_folders_made_ahead(tmp_path):
    """mkdir model/ before cellvae fit --model-dir model/ was refused: "exists; pass --overwrite"."""
    (tmp_path / "model").mkdir()
    (tmp_path / "query_model").mkdir()
    assert main([*fit_args(tmp_path, 150, 30), "--batch-key", "batch", "--epochs", "1", "--quiet", "--embedding-only"]) == 0
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "history.json", "model.safetensors"]
    command = ["map", str(tmp_path / "in.h5ad"), "--model-dir", str(tmp_path / "model"), "--out", str(tmp_path / "q.h5ad")]
    command += ["--batch-prefix", "query_", "--query-model-dir", str(tmp_path / "query_model"), "--epochs", "1", "--quiet"]
    assert main(command) == 0
    assert sorted(os.listdir(tmp_path / "query_model")) == ["config.json", "history.json", "model.safetensors"]


def test_a_read_only_model_folder_is_refused_before_training(tmp_path, monkeypatch):
    """Review 49: a read-only model folder (in a writable parent) trained, then failed to be moved aside (as root here,
    os.access stands in for a user's chmod 555)."""
    command = [*fit_args(tmp_path, 150, 30), "--epochs", "1", "--quiet", "--embedding-only"]
    assert main(command) == 0
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, mode: Path(where) != tmp_path / "model" and access(where, mode))
    monkeypatch.setattr(cellvae.CellVAE, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"model cannot be replaced: the folder is read-only, .* \(chmod u\+w\), or choose"):
        main([*command, "--overwrite"])


def test_a_model_folder_whose_adata_is_mounted_on_its_own_is_refused_before_training(tmp_path, monkeypatch):
    """Review 56: saving a new model over a folder whose adata.h5ad is mounted alone (docker -v FILE:...) is refused by
    save, which cellvae fit reached only after training (the link refused across devices stands in for the mount)."""
    command = [*fit_args(tmp_path, 150, 30), "--epochs", "1", "--quiet", "--embedding-only"]
    assert main(command) == 0
    shutil.copy(tmp_path / "in.h5ad", tmp_path / "model" / "adata.h5ad")
    link = os.link

    def across_devices(source, target):
        if Path(source) == tmp_path / "model" / "adata.h5ad":
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))
        link(source, target)

    monkeypatch.setattr(os, "link", across_devices)
    monkeypatch.setattr(cellvae.CellVAE, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    with pytest.raises(SystemExit, match=r"model/adata.h5ad is mounted on its own .* choose another --model-dir, or unmount"):
        main([*command, "--overwrite"])
    assert sorted(os.listdir(tmp_path / "model")) == ["adata.h5ad", "config.json", "history.json", "model.safetensors"]


def test_a_model_dir_that_is_a_symbolic_link_is_refused_before_training(tmp_path, monkeypatch):
    command = fit_args(tmp_path, 150, 30)
    trained = []
    monkeypatch.setattr(cellvae.CellVAE, "fit", lambda *args, **kwargs: trained.append(1))
    (tmp_path / "nowhere_link").symlink_to(tmp_path / "nowhere")  # a link to nothing
    (tmp_path / "unwritable_link").symlink_to("/proc/nowhere/model")  # (told as a link, not as where it points)
    (tmp_path / "saved").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "saved", target_is_directory=True)
    for link in ("nowhere_link", "link", "unwritable_link"):
        command[command.index("--model-dir") + 1] = str(tmp_path / link)
        for overwrite in ([], ["--overwrite"]):  # (--overwrite would not help: no advice to pass it)
            with pytest.raises(SystemExit, match=r"is a symbolic link, not a model folder.*the folder the link points to"):
                main([*command, *overwrite])
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "model").symlink_to(tmp_path / "nowhere")
    with pytest.raises(SystemExit, match=r"demo/model is a symbolic link, where the demo saves its model"):
        main(["demo", "--out-dir", str(tmp_path / "demo"), "--epochs", "1", "--quiet"])
    assert not trained and sorted(os.listdir(tmp_path / "demo")) == ["model"]


def test_map_batch_prefix_maps_query_batches_named_like_reference_ones_as_new(reference_folder, tmp_path, capsys):
    """A query batch named like a reference batch is that batch (frozen) with a warning that names --batch-prefix;
    with it the query's batches are new ones, under the new names in --out and the query model."""
    query = ad.read_h5ad(reference_folder / "query.h5ad")
    query.obs["batch"] = pd.Categorical(["batch0"] * query.n_obs)
    query.write_h5ad(tmp_path / "query.h5ad")
    command = ["map", str(tmp_path / "query.h5ad"), "--model-dir", str(reference_folder / "model"), "--epochs", "2", "--quiet"]
    with pytest.warns(UserWarning, match="already exist in the reference") as told:
        assert main([*command, "--out", str(tmp_path / "frozen.h5ad")]) == 0
    assert "new batches: []" in capsys.readouterr().out
    nothing = next(str(w.message) for w in told if "trained nothing" in str(w.message))
    assert "embed it with cellvae embed and the reference model, or pass --batch-prefix" in in_command_line_terms(nothing)
    advice = in_command_line_terms(str(told[0].message))  # as the shell shows it
    assert "Pass --batch-prefix 'query ' to map them as new batches" in advice and "Python" not in advice
    prefixed_already = in_command_line_terms(str(told[0].message), argparse.Namespace(batch_prefix="query "))
    assert "Pass another --batch-prefix than 'query ' (e.g. 'query_2 ')" in prefixed_already
    prefixed = [*command, "--out", str(tmp_path / "out.h5ad"), "--query-model-dir", str(tmp_path / "qmodel")]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*prefixed, "--batch-prefix", "query "]) == 0
    assert "new batches: ['query batch0']" in capsys.readouterr().out
    mapped = ad.read_h5ad(tmp_path / "out.h5ad")
    assert list(mapped.obs["batch"].cat.categories) == ["query batch0"]
    assert mapped.uns["cellvae"]["params"]["batch_prefix"] == "query "
    assert cellvae.CellVAE.load(tmp_path / "qmodel").config.batch_categories == ["batch0", "batch1", "query batch0"]
    assert not np.allclose(mapped.obsm["X_cellvae"], ad.read_h5ad(tmp_path / "frozen.h5ad").obsm["X_cellvae"], atol=1e-3)
    again = ["embed", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "qmodel"), "--out", str(tmp_path / "again.h5ad")]
    assert main([*again, "--quiet"]) == 0  # the output's batch names are the query model's
    np.testing.assert_allclose(ad.read_h5ad(tmp_path / "again.h5ad").obsm["X_cellvae"], mapped.obsm["X_cellvae"], atol=1e-5)
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "query.h5ad").obs["batch"], "batch0")  # the input as it was
    # more cells of those batches, under their own names: embed puts the same prefix before them
    more = ["embed", str(tmp_path / "query.h5ad"), "--model-dir", str(tmp_path / "qmodel"), "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*more, "--out", str(tmp_path / "more.h5ad"), "--batch-prefix", "query "]) == 0
    # the prefix forgotten: the cells would be embedded as the reference's batch0, which the warning says
    forgot = r"batches \['batch0'\] are embedded with the reference's parameters .*pass --batch-prefix 'query '; if they"
    with pytest.warns(UserWarning, match=forgot):
        assert main([*more, "--out", str(tmp_path / "forgot.h5ad")]) == 0
    # no warning where no prefix was used: numbered batches ("10" over "0"), or cells that are not the reference's
    from dataclasses import replace

    from cellvae.cli import _warn_if_a_batch_prefix_seems_meant

    config = cellvae.CellVAE.load(tmp_path / "qmodel").config
    numbered = replace(config, batch_categories=["0", "1", "10", "11"], reference_categories={"batch": 2})
    arguments = argparse.Namespace(input="ref.h5ad")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _warn_if_a_batch_prefix_seems_meant(pd.Series(["0", "1"]), numbered, arguments)
        _warn_if_a_batch_prefix_seems_meant(pd.Series(["query batch0"]), config, arguments)
    with pytest.raises(SystemExit, match=r"out.h5ad's obs\['batch'\] holds the model's batches as they are .*leave out --batch"):
        main(["embed", str(tmp_path / "out.h5ad"), "--model-dir", str(tmp_path / "qmodel"), "--out", str(tmp_path / "twice.h5ad"),
              "--batch-prefix", "query "])  # fmt: skip
    # a mistyped prefix: the message names the model's (leaving --batch-prefix out would embed them as the reference's)
    mistyped = r"mapped query batches with --batch-prefix 'query ' before them \('query batch0', .*\), not 'query_': "
    mistyped += "pass --batch-prefix 'query '"
    with pytest.raises(SystemExit, match=mistyped):
        main([*more, "--out", str(tmp_path / "typo.h5ad"), "--batch-prefix", "query_"])
    embedded = ad.read_h5ad(tmp_path / "more.h5ad")
    np.testing.assert_allclose(embedded.obsm["X_cellvae"], mapped.obsm["X_cellvae"], atol=1e-5)
    assert list(embedded.obs["batch"].cat.categories) == ["query batch0"]
    assert embedded.uns["cellvae"]["params"]["batch_prefix"] == "query "


@pytest.mark.parametrize(
    "edits, message",
    [
        ({"--out": "{ref}/model/out.h5ad"}, "--out must not be --model-dir or inside it"),
        ({"--out": "{ref}/ref.h5ad"}, "--out is the --reference file"),
        ({"--out": "{tmp}/exists.h5ad"}, "exists; pass --overwrite"),
        ({"--query-model-dir": "{ref}/model", "--overwrite": True}, "--model-dir and --query-model-dir must be separate"),
        ({"--query-model-dir": "{ref}/model/query"}, "--model-dir and --query-model-dir must be separate"),
        ({"--query-model-dir": "{tmp}/taken"}, r"model directory .* exists; pass --overwrite"),
        ({"--query-model-dir": "{tmp}"}, r"--out must not be --query-model-dir or inside it"),
        ({"--reference": None}, "--labels-key needs --reference"),
        ({"--labels-key": None}, "--reference needs --labels-key"),
        ({"--reference": None, "--labels-key": None, "--novelty-threshold": "0.9"}, "is an option of the label transfer"),
        ({"--reference": None, "--labels-key": None, "--soft": True}, "--soft is an option of the label transfer"),
        ({"--batch-key": "donor"}, r"has no obs\['donor'\] \(--batch-key\)"),
        ({"--labels-key": "tissue"}, r"--reference .*ref.h5ad has no obs\['tissue'\] \(--labels-key\)"),
        ({"--k": "10000"}, r"--k 10000 is larger than the \d+ labelled reference cells; lower --k"),
        ({"--layer": "counts"}, r"query.h5ad has no layers\['counts'\]; name the counts' place with --layer"),
        ({"--model-dir": "{ref}/unbatched"}, "trained without --batch-key, so it has no batches to add the query's to"),
        ({"--model-dir": "{tmp}/none"}, "none does not exist: give the folder a model was saved in"),
        ({"input": "{tmp}/missing.h5ad"}, "input .*missing.h5ad does not exist"),
        ({"input": "{tmp}/unbatched.h5ad"}, "the reference model's batch key; name the query's batch column with --batch-key"),
        ({"input": "{tmp}/few_genes.h5ad"}, r"only 50 of the model's 100 genes \(50%\) are in query_adata"),
        ({"input": "{tmp}/nan_batch.h5ad"}, r"missing \(NaN\) batch values.*\n\(on the command line: no cellvae option"),
        ({"input": "{tmp}/repeated_genes.h5ad"}, r"var_names_make_unique\(\).*\n\(on the command line: no cellvae option"),
        ({"--reference": "{tmp}/unbatched.h5ad"}, r"--reference .*unbatched.h5ad: obs column 'batch' \(used by the model\)"),
        ({"--reference": "{tmp}/missing.h5ad"}, r"^error: --reference .*missing.h5ad does not exist"),
        ({"--reference": "{ref}/query.h5ad"}, r"unseen in training: \['batch2'\].*--reference holds cells of the model's own"),
    ],
)
def test_map_refuses_bad_input_before_any_work(reference_folder, tmp_path, monkeypatch, edits, message):
    """Each error ends in one 'error: ...' line before mapping trains, with nothing written (edits: the input or
    an option given another value, None to leave it out, True for a flag)."""
    ref = reference_folder
    if not (ref / "unbatched").exists():
        model = cellvae.CellVAE(ad.read_h5ad(ref / "ref.h5ad")).fit(max_epochs=1, progress=False)
        model.save(ref / "unbatched")
    query = ad.read_h5ad(ref / "query.h5ad")
    query[:, :50].copy().write_h5ad(tmp_path / "few_genes.h5ad")
    edited = query.copy()
    edited.obs["batch"] = edited.obs["batch"].astype(object)
    edited.obs.iloc[:3, edited.obs.columns.get_loc("batch")] = np.nan
    edited.write_h5ad(tmp_path / "nan_batch.h5ad")
    edited = query.copy()
    edited.var_names = [edited.var_names[0], *edited.var_names[:-1]]
    edited.write_h5ad(tmp_path / "repeated_genes.h5ad")
    del query.obs["batch"]
    query.write_h5ad(tmp_path / "unbatched.h5ad")
    (tmp_path / "exists.h5ad").write_text("an earlier result")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("a folder in use (an empty one would be used)")
    before = {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()}
    model_before = folder_bytes(ref / "model")
    monkeypatch.setattr(cellvae.model, "train", lambda *a, **k: pytest.fail("training started"))
    command = ["map", str(ref / "query.h5ad"), "--model-dir", str(ref / "model"), "--out", str(tmp_path / "out.h5ad")]
    command += ["--reference", str(ref / "ref.h5ad"), "--labels-key", "cell_type", "--epochs", "1", "--quiet"]
    for option, value in edits.items():
        value = value.format(tmp=tmp_path, ref=ref) if isinstance(value, str) else value
        if option == "input":
            command[1] = value
        elif value is None:
            del command[command.index(option) : command.index(option) + 2]
        elif value is True:
            command.append(option)
        elif option in command:
            command[command.index(option) + 1] = value
        else:
            command += [option, value]
    with pytest.raises(SystemExit, match=message):
        main(command)
    assert {path.name: path.stat().st_mtime_ns for path in tmp_path.iterdir()} == before  # nothing written
    assert folder_bytes(ref / "model") == model_before


def test_embed_reads_the_batches_from_the_column_batch_key_names(reference_folder, tmp_path):
    """A file whose batch column is named otherwise than in training (sample, not batch): --batch-key names it. The
    embedding is that of the same cells under the model's column, and the file written keeps the input's obs."""
    model_dir = str(reference_folder / "model")
    renamed = ad.read_h5ad(reference_folder / "ref.h5ad")
    renamed.obs = renamed.obs.rename(columns={"batch": "sample"})
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    embed = ["embed", "--model-dir", model_dir, "--out"]
    assert main([*embed, str(tmp_path / "expected.h5ad"), str(reference_folder / "ref.h5ad")]) == 0
    assert main([*embed, str(tmp_path / "out.h5ad"), str(tmp_path / "renamed.h5ad"), "--batch-key", "sample"]) == 0
    written = ad.read_h5ad(tmp_path / "out.h5ad")
    np.testing.assert_array_equal(written.obsm["X_cellvae"], ad.read_h5ad(tmp_path / "expected.h5ad").obsm["X_cellvae"])
    assert list(written.obs.columns) == list(renamed.obs.columns)  # no batch column added
    assert written.uns["cellvae"]["params"]["input_batch_key"] == "sample"
    # an output whose record names the column its batches were read from, which also has the model's column with
    # other values (a reference batch's name): embedding it again reads the recorded column only when told
    written.obs["batch"] = "batch1"
    written.write_h5ad(tmp_path / "recorded.h5ad")
    recorded = r"recorded.h5ad records \(in uns\['cellvae'\]\['params'\]\) that its cells' batches were read from obs\['sample'\]"
    with pytest.raises(SystemExit, match=recorded + r".*pass --batch-key sample to read them as before, or --batch-key batch"):
        main([*embed, str(tmp_path / "o.h5ad"), str(tmp_path / "recorded.h5ad")])
    assert main([*embed, str(tmp_path / "again.h5ad"), str(tmp_path / "recorded.h5ad"), "--batch-key", "sample"]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "again.h5ad").obsm["X_cellvae"], written.obsm["X_cellvae"])
    query = ad.read_h5ad(reference_folder / "query.h5ad")  # map's record alike: its batches read from --batch-key sample
    query.obs["sample"], query.obs["batch"] = query.obs["batch"], "batch0"
    query.write_h5ad(tmp_path / "query.h5ad")
    mapping = ["map", str(tmp_path / "query.h5ad"), "--model-dir", model_dir, "--batch-key", "sample", "--epochs", "1"]
    with pytest.warns(UserWarning, match="which this query also has with other values"):
        mapped = [*mapping, "--out", str(tmp_path / "mapped.h5ad"), "--query-model-dir", str(tmp_path / "qm"), "--quiet"]
        assert main(mapped) == 0
    again = ["embed", str(tmp_path / "mapped.h5ad"), "--model-dir", str(tmp_path / "qm"), "--out", str(tmp_path / "re.h5ad")]
    with pytest.raises(SystemExit, match=r"read from obs\['sample'\].*pass --batch-key sample to read them as before, or"):
        main(again)
    with pytest.raises(SystemExit, match=r"records \(in uns\['cellvae'\]\['params'\]\) that its cells' batches were read"):
        main([*again, "--key-added", "X_again"])  # any record of the file, not only the one of the key written
    by_sample = ["fit", str(tmp_path / "renamed.h5ad"), "--batch-key", "sample", "--epochs", "1", "--embedding-only", "--quiet"]
    assert main([*by_sample, "--out", str(tmp_path / "s.h5ad"), "--model-dir", str(tmp_path / "sample_model")]) == 0
    # a model of another batch key: map's record says nothing of its column (the file's batches are new to it)
    with pytest.raises(SystemExit, match=r"obs\['sample'\] has categories unseen in training"):
        main(
            [
                "embed",
                str(tmp_path / "mapped.h5ad"),
                "--model-dir",
                str(tmp_path / "sample_model"),
                "--out",
                str(tmp_path / "x.h5ad"),
            ]
        )
    with pytest.raises(SystemExit, match=r"read from obs\['sample'\].*pass --batch-key sample to read them as before, or"):
        main(["map", str(tmp_path / "mapped.h5ad"), "--model-dir", model_dir, "--out", str(tmp_path / "remapped.h5ad")])
    (tmp_path / "link").symlink_to(tmp_path / "qm")  # the query model by another path: not told to use it
    with pytest.raises(SystemExit, match=r"pass --batch-key sample to read them as before, or"):
        main(["embed", str(tmp_path / "mapped.h5ad"), "--model-dir", str(tmp_path / "link"), "--out", str(tmp_path / "re.h5ad")])
    with pytest.raises(SystemExit, match=r"pass --batch-key sample to read them as before with the query model that mapped"):
        main(["embed", str(tmp_path / "mapped.h5ad"), "--model-dir", model_dir, "--out", str(tmp_path / "r.h5ad")])
    mapped = ad.read_h5ad(tmp_path / "mapped.h5ad")  # without the model's column, the missing column is told
    del mapped.obs["batch"]
    mapped.write_h5ad(tmp_path / "no_batch.h5ad")
    with pytest.raises(SystemExit, match=r"no_batch.h5ad has no obs\['batch'\] \(the model's batch key"):
        main(["embed", str(tmp_path / "no_batch.h5ad"), *again[2:]])
    assert main([*again, "--batch-key", "sample", "--quiet"]) == 0
    np.testing.assert_allclose(
        ad.read_h5ad(tmp_path / "re.h5ad").obsm["X_cellvae"], ad.read_h5ad(tmp_path / "mapped.h5ad").obsm["X_cellvae"], atol=1e-5
    )
    # refused before any work: the model's column missing, a column that is not there, batches the model lacks
    missing = r"renamed.h5ad has no obs\['batch'\] \(the model's batch key; name the cells' batch column with --batch-key\)"
    with pytest.raises(SystemExit, match=missing):
        main([*embed, str(tmp_path / "o.h5ad"), str(tmp_path / "renamed.h5ad")])
    with pytest.raises(SystemExit, match=r"renamed.h5ad has no obs\['donor'\] \(--batch-key\); obs columns there: \['sample'"):
        main([*embed, str(tmp_path / "o.h5ad"), str(tmp_path / "renamed.h5ad"), "--batch-key", "donor"])
    renamed.obs["sample"] = "batch2"
    renamed.write_h5ad(tmp_path / "new_batch.h5ad")
    new_batches = r"obs\['sample'\] has categories unseen in training: \['batch2'\](.|\n)*cellvae map NEW.h5ad --model-dir MODEL"
    with pytest.raises(SystemExit, match=new_batches):  # named by the file's column, not the model's
        main([*embed, str(tmp_path / "o.h5ad"), str(tmp_path / "new_batch.h5ad"), "--batch-key", "sample"])
    cellvae.CellVAE(ad.read_h5ad(reference_folder / "ref.h5ad")).fit(max_epochs=1, progress=False).save(tmp_path / "plain")
    with pytest.raises(SystemExit, match="trained without --batch-key, so it reads no batches; leave out --batch-key"):
        main(["embed", str(tmp_path / "renamed.h5ad"), "--model-dir", str(tmp_path / "plain"), "--out", str(tmp_path / "o.h5ad"),
              "--batch-key", "sample"])  # fmt: skip
    assert not (tmp_path / "o.h5ad").exists()


def test_embed_refuses_to_write_over_scanpys_umap_while_its_record_is_there(reference_folder, tmp_path):
    with_umap = ad.read_h5ad(reference_folder / "ref.h5ad")
    with_umap.obsm["X_umap"], with_umap.uns["umap"] = np.zeros((with_umap.n_obs, 2)), {"params": {"a": 1.0}}
    with_umap.write_h5ad(tmp_path / "umap.h5ad")
    embed = ["embed", str(tmp_path / "umap.h5ad"), "--model-dir", str(reference_folder / "model"), "--out"]
    with pytest.raises(SystemExit, match=r"--key-added X_umap is where scanpy's sc.tl.umap wrote its embedding"):
        main([*embed, str(tmp_path / "o.h5ad"), "--key-added", "X_umap"])
    assert not (tmp_path / "o.h5ad").exists()
    assert main([*embed, str(tmp_path / "o.h5ad"), "--key-added", "X_umap_cellvae", "--quiet"]) == 0  # a name of its own


def test_map_warns_once_about_model_genes_missing_from_the_query(reference_folder, tmp_path):
    query = ad.read_h5ad(reference_folder / "query.h5ad")[:, 5:].copy()
    query.write_h5ad(tmp_path / "query.h5ad")
    command = ["map", str(tmp_path / "query.h5ad"), "--model-dir", str(reference_folder / "model")]
    with pytest.warns(UserWarning) as warned:
        assert main([*command, "--out", str(tmp_path / "out.h5ad"), "--epochs", "1", "--quiet"]) == 0
    missing = [str(warning.message) for warning in warned if "genes are missing" in str(warning.message)]
    assert len(missing) == 1 and missing[0].startswith("5 of the model's 100 genes are missing from query_adata")


def test_the_shells_warning_about_missing_genes_names_the_file_they_are_missing_from():
    """An audit: `cellvae map q.h5ad` warned that genes were 'missing from query_adata', a name the shell has not."""
    args = argparse.Namespace(command="map", input="q.h5ad", reference="ref.h5ad")
    for name in ("adata", "query_adata"):
        told = in_command_line_terms(f"5 of the model's 100 genes are missing from {name} (e.g. ['g1']); they are", args)
        assert told.startswith("5 of the model's 100 genes are missing from the input, q.h5ad (e.g. ['g1'])")
    told = in_command_line_terms("--reference ref.h5ad: 5 of the model's 100 genes are missing from adata (e.g.", args)
    assert told == "--reference ref.h5ad: 5 of the model's 100 genes are missing from that file (e.g."


def test_gene_name_errors_name_the_var_names_column(reference_folder, tmp_path):
    """With --var-names, an error about the genes' names names that column (its fix acts on it), not var_names."""
    query = ad.read_h5ad(reference_folder / "query.h5ad")
    query.var["symbol"] = [f"{name}.2" for name in query.var_names]  # not the model's names
    query.var_names = [f"feature{i}" for i in range(query.n_vars)]
    query.write_h5ad(tmp_path / "query.h5ad")
    for command in ("map", "embed"):
        given = [command, str(tmp_path / "query.h5ad"), "--model-dir", str(reference_folder / "model"), "--var-names", "symbol"]
        with pytest.raises(SystemExit, match=r"only 0 of the model's 100 genes \(0%\) are in (query_)?adata.var\['symbol'\]"):
            main([*given, "--out", str(tmp_path / "out.h5ad")])


def test_map_thresholds_outside_0_to_1_are_refused_by_the_parser(capsys):
    for option in ("--unknown-threshold", "--novelty-threshold"):
        with pytest.raises(SystemExit) as stopped:
            main(["map", "q.h5ad", "--model-dir", "m", "--out", "o.h5ad", option, "1.5"])
        assert stopped.value.code == 2 and f"{option}: must be a number from 0 to 1, got '1.5'" in capsys.readouterr().err


def test_a_large_latent_space_and_a_checkpoint_of_other_settings_are_told_by_their_options(tmp_path):
    """A CLI code reading: both named the Python parameter (n_latent=160, n_latent: checkpoint 10) in the shell."""
    adata = cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0)
    with pytest.warns(UserWarning) as caught:
        cellvae.CellVAE(adata, n_latent=30)
    told = in_command_line_terms(str(caught[0].message))
    assert told.startswith("--n-latent 30 is not below the 20 genes") and told.endswith("lower --n-latent (the default is 10)")
    cellvae.CellVAE(adata, n_latent=4).fit(max_epochs=1, checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(ValueError) as other:
        cellvae.CellVAE(adata, n_latent=5).fit(max_epochs=1, checkpoint_dir=tmp_path / "ck", resume=True, progress=False)
    assert "settings that differ: --n-latent: checkpoint 4, this run 5" in in_command_line_terms(str(other.value))


def test_messages_on_the_command_line_name_options_and_no_command_is_an_error(tmp_path, capsys):
    """A CLI audit: `cellvae` alone printed its help to stdout and exited 1 (a pipeline read the help as its result);
    the Poisson refusal, a checkpoint of another seed or epoch count, and a checkpoint folder in a model's folder
    named Python arguments; map's --out inside the model it reads was refused as if it replaced files there."""
    assert main([]) == 2
    told = capsys.readouterr()
    assert told.out == "" and "usage:" in told.err and "name a command" in told.err
    adata = cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0)
    with pytest.raises(ValueError) as poisson:
        cellvae.CellVAE(adata, likelihood="poisson", dispersion="gene-cell")
    in_shell = in_command_line_terms(str(poisson.value), argparse.Namespace(input="in.h5ad"))
    assert (
        "so --dispersion gene-cell would be ignored; leave out --dispersion (or pass --dispersion gene), or pass --likelihood nb"
        in in_shell
    )
    assert "likelihood='nb'" not in in_shell and "--dispersion gene-cell sets" not in in_shell
    model = cellvae.CellVAE(adata, n_hidden=8, n_latent=2)
    model.fit(max_epochs=2, checkpoint_dir=tmp_path / "ck", progress=False)
    with pytest.raises(ValueError) as seeded:
        cellvae.CellVAE(adata, n_hidden=8, n_latent=2).fit(
            max_epochs=3, random_state=1, checkpoint_dir=tmp_path / "ck", resume=True
        )
    in_shell = in_command_line_terms(str(seeded.value), argparse.Namespace(input="in.h5ad"))
    assert "--seed draws the validation cells" in in_shell
    assert "pass --epochs and --seed as the run that wrote the checkpoint did (its values above)" in in_shell
    adata.write_h5ad(tmp_path / "counts.h5ad")  # a checkpoint of counts streamed from the file, resumed in memory
    streamed = cellvae.CellVAE(ad.read_h5ad(tmp_path / "counts.h5ad", backed="r"), n_hidden=8, n_latent=2)
    streamed.fit(max_epochs=1, checkpoint_dir=tmp_path / "streamed", progress=False)
    with pytest.raises(ValueError) as in_memory:
        cellvae.CellVAE(adata, n_hidden=8, n_latent=2).fit(
            max_epochs=1, checkpoint_dir=tmp_path / "streamed", resume=True, progress=False
        )
    in_shell = in_command_line_terms(str(in_memory.value), argparse.Namespace(input="in.h5ad"))
    assert "(on the command line: pass --backed, as the run that wrote the checkpoint did)" in in_shell
    model.save(tmp_path / "model")
    with pytest.raises(ValueError) as nested:
        model.fit(max_epochs=1, checkpoint_dir=tmp_path / "model" / "ck", progress=False)
    assert "a later run with --overwrite" in in_command_line_terms(str(nested.value), argparse.Namespace(input="in.h5ad"))
    adata.write_h5ad(tmp_path / "query.h5ad")
    with pytest.raises(SystemExit, match=r"inside it \(it is the model's folder, .*: adata.h5ad there is the data CellVAE.load"):
        main(
            [
                "embed",
                str(tmp_path / "query.h5ad"),
                "--model-dir",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "model" / "adata.h5ad"),
            ]
        )
    with pytest.raises(SystemExit, match=r"--out must not be --model-dir or inside it \(it is the model's folder, which holds"):
        main(
            [
                "map",
                str(tmp_path / "query.h5ad"),
                "--model-dir",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path / "model" / "q.h5ad"),
            ]
        )


def test_map_runs_the_mapping_and_the_vote_its_options_name_as_python_does(reference_folder, tmp_path):
    """An audit: --train-input-layer, --k, --novelty-threshold, --unknown-threshold, --unlabeled-category, --seed and
    --batch-size could be dropped unseen (the record copies the options, not what ran). The command's outputs equal
    map_query and transfer_labels called with the same settings."""
    reference = ad.read_h5ad(reference_folder / "ref.h5ad")
    reference.obs["cell_type"] = reference.obs["cell_type"].astype(str)
    reference.obs.iloc[:40, reference.obs.columns.get_loc("cell_type")] = "unassigned"  # (cells with no label)
    reference.write_h5ad(tmp_path / "ref.h5ad")
    query = reference_folder / "query.h5ad"
    command = ["map", str(query), "--model-dir", str(reference_folder / "model"), "--out", str(tmp_path / "out.h5ad")]
    command += ["--reference", str(tmp_path / "ref.h5ad"), "--labels-key", "cell_type", "--unlabeled-category", "unassigned"]
    command += "--train-input-layer --k 30 --unknown-threshold 0.05 --novelty-threshold 0.97 --soft".split()
    command += "--seed 4 --epochs 3 --batch-size 64 --quiet".split()
    assert main(command) == 0
    out = ad.read_h5ad(tmp_path / "out.h5ad")

    model = cellvae.CellVAE.load(reference_folder / "model", load_anndata=False)
    expected = ad.read_h5ad(query)
    query_model = model.map_query(expected, train_input_layer=True, max_epochs=3, batch_size=64, random_state=4, progress=False)
    expected.obsm["X_cellvae"] = query_model.get_latent(progress=False)
    np.testing.assert_array_equal(out.obsm["X_cellvae"], expected.obsm["X_cellvae"])
    voters = ad.AnnData(obs=reference.obs[["cell_type"]], obsm={"X_cellvae": query_model.get_latent(reference, progress=False)})
    cellvae.tl.transfer_labels(
        voters, expected, "cell_type", use_rep="X_cellvae", k=30, unknown_threshold=0.05,
        unlabeled_category="unassigned", novelty_threshold=0.97, soft=True,
    )  # fmt: skip
    for column in ("cell_type_predicted", "cell_type_uncertainty", "cell_type_novelty"):
        np.testing.assert_array_equal(out.obs[column].astype(str), expected.obs[column].astype(str), err_msg=column)
    np.testing.assert_array_equal(out.obsm["cell_type_vote_shares"], expected.obsm["cell_type_vote_shares"])
    assert "unassigned" not in list(out.uns["cell_type_vote_shares"]["labels"])
    unknown = (out.obs["cell_type_predicted"] == "Unknown").mean()
    assert 0 < unknown < 1, unknown  # (the thresholds decide some cells)
    recorded = out.uns["cellvae"]["params"]
    assert recorded["reference"] == os.path.abspath(tmp_path / "ref.h5ad") and recorded["mapping_random_state"] == 4


def test_a_mapping_interrupted_in_training_keeps_its_embedding_and_does_not_report_success(
    reference_folder, tmp_path, monkeypatch, capsys
):
    """An audit: an interrupted mapping could exit 0, as a success."""
    _ctrl_c_in_the_second_epoch(monkeypatch)
    query, out = reference_folder / "query.h5ad", tmp_path / "mapped.h5ad"
    command = ["map", str(query), "--model-dir", str(reference_folder / "model"), "--out", str(out), "--epochs", "5"]
    with pytest.warns(RuntimeWarning, match="training interrupted"):
        assert main([*command, "--quiet"]) == 130
    assert "interrupted: mapped" in capsys.readouterr().err
    mapped = ad.read_h5ad(out)
    assert mapped.obsm["X_cellvae"].shape == (mapped.n_obs, 10) and mapped.uns["cellvae"]["params"]["interrupted"]
