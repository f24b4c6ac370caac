"""The code in README.md runs as printed (with a tenth of its training): a user who copies it gets what the README says."""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from conftest import with_fewer_epochs

import cellvae
from cellvae.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, re.S)


def block_with(language: str, text: str) -> str:
    """The README's one ``language`` block that contains ``text``."""
    found = [block for block in code_blocks(language) if text in block]
    assert len(found) == 1, f"expected one ```{language} block of README.md with {text!r}, found {len(found)}"
    return found[0]


# (the tenth of the training leaves the differential-expression warning of an undertrained model, which is right)
@pytest.mark.filterwarnings("ignore:this model's training stopped after 20 epochs")
def test_quick_start_and_marker_genes_run_on_the_bundled_example(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the quick start saves its model to pbmc_model/ in the working directory
    namespace: dict = {}
    exec(with_fewer_epochs(block_with("python", "cellvae.datasets.pbmc68k()")), namespace)
    adata, model = namespace["adata"], namespace["model"]
    assert adata.obsm["X_cellvae"].shape == (700, 10) and adata.obsm["X_cellvae"].dtype == np.float32
    assert adata.uns["cellvae"]["params"]["batch_key"] is None
    assert {"leiden"} <= set(adata.obs) and {"X_umap"} <= set(adata.obsm)
    assert sorted(p.name for p in (tmp_path / "pbmc_model").iterdir()) == ["config.json", "history.json", "model.safetensors"]
    np.testing.assert_array_equal(model.get_latent(), adata.obsm["X_cellvae"])  # the reloaded model, same embedding

    exec(block_with("python", "model.differential_expression("), namespace)
    plt.close("all")
    de = namespace["de"]  # the last comparison: two Leiden clusters
    assert isinstance(de, pd.DataFrame) and len(de) == adata.n_vars and de["is_de"].any()
    markers = adata.uns["rank_genes_groups"]
    assert set(markers["names"].dtype.names) == set(adata.obs["leiden"].cat.categories)
    assert len(namespace["sc"].get.rank_genes_groups_df(adata, "3", pval_cutoff=0.05)) > 0


def test_reference_mapping_runs_on_a_held_out_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    simulated = cellvae.datasets.simulate(n_cells=900, n_genes=300, n_batches=3, n_cell_types=4, random_state=0)
    is_query = (simulated.obs["batch"] == "batch2").to_numpy()
    namespace = {"cellvae": cellvae, "reference": simulated[~is_query].copy(), "query": simulated[is_query].copy()}
    exec(with_fewer_epochs(block_with("python", "ref.map_query(query")), namespace)
    query = namespace["query"]
    assert query.obsm["X_cellvae"].shape == (is_query.sum(), 10)
    assert {"cell_type_predicted", "cell_type_uncertainty", "cell_type_novelty"} <= set(query.obs)
    # simulated cell types are well separated: the mapped query is labelled right
    assert (query.obs["cell_type_predicted"].astype(str) == query.obs["cell_type"].astype(str)).mean() > 0.9
    assert namespace["expression"].shape == ((~is_query).sum(), 300)


def test_every_command_line_the_readme_shows_parses():
    lines = [line for block in code_blocks("bash") for line in block.splitlines() if line.startswith("cellvae ")]
    assert {line.split()[1] for line in lines} >= {"demo", "fit", "embed", "map", "--help"}
    for line in lines:
        if line in ("cellvae --help", "cellvae --version"):
            continue
        # optional parts are shown in [brackets] and numbers as N (epochs) and S (seed)
        words = [{"N": "5", "S": "0"}.get(w, w) for w in shlex.split(line.replace("[", " ").replace("]", " "))]
        build_parser().parse_args(words[1:])  # an unknown option or a missing one exits with argparse's error


def test_the_readme_test_command_is_what_ci_runs():
    command = block_with("bash", "python -m pytest").strip()
    assert command in (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()


def test_the_gpu_checks_tests_part_names_tests_that_exist(request):
    """benchmarks/gpu_check.py's ``tests`` part runs tests by id on a lent GPU: a renamed test would leave it none."""
    root = Path(__file__).resolve().parents[1]
    listed = re.search(r"GPU_TESTS = \[(.*?)\]\n", (root / "benchmarks" / "gpu_check.py").read_text(), re.S)[1]
    ids = re.findall(r'"(tests/[^"]+)"', listed)
    assert len(ids) == 8
    # Tests this run collected exist (the whole suite's run: no second collection, which takes 20 s); others are
    # looked for by collecting them alone.
    here = [item.nodeid for item in request.session.items]
    if all(any(name == test or name.startswith(test + "[") for name in here) for test in ids):
        return
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    found = collected.stdout.split()
    for test in ids:  # (an id without [parameters] runs each of them)
        assert any(name == test or name.startswith(test + "[") for name in found), (test, collected.stdout)
