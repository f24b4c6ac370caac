"""The integration benchmark runs on a user's own .h5ad (its own column names, counts in a layer), as documented."""

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import scanpy as sc

import cellvae

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def run_benchmark(monkeypatch, capsys):
    """``python benchmarks/integration.py ARGUMENTS`` run in this process (spared the imports of one of its own):
    gives its return code (that of a ``SystemExit``), stdout and stderr."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # (the script imports bench_common beside it)
    spec = importlib.util.spec_from_file_location("integration_benchmark", BENCHMARKS / "integration.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def run(*arguments) -> SimpleNamespace:
        monkeypatch.setattr(sys, "argv", ["integration.py", *map(str, arguments)])
        capsys.readouterr()
        try:
            script.main()
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
            print(stop.code, file=sys.stderr)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    run.script = script
    return run


def test_integration_benchmark_embeds_and_maps_an_h5ad_of_ones_own(tmp_path, run_benchmark):
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=120, n_batches=3, n_cell_types=3, random_state=4)
    adata.obs = adata.obs.rename(columns={"batch": "sample", "cell_type": "celltype"})
    adata.layers["counts"] = adata.X.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)  # X log-normalised, as in most shared files: the counts are in the layer
    path, cache = tmp_path / "my_atlas.h5ad", tmp_path / "cache"
    adata.write_h5ad(path)
    own = ["--batch-key", "sample", "--labels-key", "celltype", "--results-dir", tmp_path / "results", "--cache", cache]
    common = [*own, "--datasets", path, "--layer", "counts", "--seeds", 0, "--cellvae-max-epochs", 20]

    refused = run_benchmark("embed", *own, "--datasets", path, "--methods", "pca")  # without --layer: X holds no counts
    assert refused.returncode != 0 and "holds no raw counts" in refused.stderr and "--layer" in refused.stderr

    unbatched = adata.copy()  # a second file, with cells of no batch: refused before the first file's embeddings
    unbatched.obs.loc[unbatched.obs_names[:5], "sample"] = np.nan
    unbatched.write_h5ad(tmp_path / "unbatched.h5ad")
    refused = run_benchmark("embed", *common, "--methods", "pca", "--datasets", path, tmp_path / "unbatched.h5ad")
    assert refused.returncode != 0 and "unbatched.h5ad: obs['sample'] has 5 missing values" in refused.stderr
    assert not cache.exists()

    embedded = run_benchmark("embed", *common, "--methods", "pca", "cellvae")
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    with np.load(cache / "my_atlas" / "cellvae_s0.npz") as stored:
        assert stored["embedding"].shape == (400, 10)
    with np.load(cache / "my_atlas" / "pca.npz") as stored:
        assert stored["embedding"].shape[0] == 400
    unchanged = run_benchmark("embed", *common, "--methods", "pca")
    assert unchanged.returncode == 0 and "my_atlas pca: cached, skipped" in unchanged.stdout
    adata[adata.obs["sample"] != "batch0"].copy().write_h5ad(path)  # the file changed: its cached embeddings are not used
    again = run_benchmark("embed", *common, "--methods", "pca")
    assert again.returncode == 0 and "embedding again" in again.stdout and "cached, skipped" not in again.stdout
    script = run_benchmark.script  # what score and kmeans read (they need scib-metrics, the bench extra)
    settings = SimpleNamespace(files={"my_atlas": path}, batch_key="sample", labels_key="celltype", layer="counts")
    assert list(script.cached(cache, "my_atlas", script.data_record(settings, "my_atlas"))) == ["pca"]  # not cellvae_s0
    settings.stage, settings.datasets, settings.cache = "score", ["my_atlas"], cache
    script.check_cached(settings)  # score and kmeans find the PCA of the file as it is
    adata.write_h5ad(path)
    for settings.stage in ("score", "kmeans"):  # the file changed again: nothing cached is of it, refused before any work
        with pytest.raises(SystemExit, match="nothing is cached from its file as it is now"):
            script.check_cached(settings)

    unnamed = run_benchmark("map", *common, "--methods", "cellvae", "--skip-scib")
    assert unnamed.returncode != 0 and "--held-out" in unnamed.stderr and "batch2" in unnamed.stderr

    mapped = run_benchmark("map", *common, "--methods", "cellvae", "--skip-scib", "--held-out", "batch2")
    assert mapped.returncode == 0, mapped.stderr[-3000:]
    table = pd.read_csv(tmp_path / "results" / "integration_mapping_my_atlas.csv", index_col=0)
    assert set(table.index) == {"cellvae_s0", "pca"} and (table["held_out_batch"] == "batch2").all()
    assert table.loc["pca", "n_query_scored"] == (adata.obs["sample"] == "batch2").sum()
    # three simulated cell types with 20 markers each: PCA finds them (1.0); cellvae after 20 epochs 0.97
    assert table.loc["pca", "accuracy"] > 0.9 and table.loc["cellvae_s0", "accuracy"] > 0.6, table
