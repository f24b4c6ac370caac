"""Single-batch clustering quality: cellvae vs scVI vs PCA on the one-batch datasets of ../shared/data.

Each embedding is scored against the published cell-type labels with scib-metrics' bio-conservation
functions: KMeans NMI/ARI (one start, as scib), Leiden NMI/ARI (scib's resolution search on a
15-NN graph) and the label silhouette. cellvae runs with its defaults on all genes and on the 2,000
most variable genes; scVI (its defaults: 400 epochs on these sizes) on the 2,000 most variable genes,
its usual input; PCA is 50 components of the log-normalised variable genes (the scanpy workflow)::

    flock /tmp/cellvae-cpu.lock python benchmarks/single_batch.py   # ~15 min on 2 cores

Writes ``results/single_batch.csv`` (one row per embedding; the rows of each dataset, method and seed re-run
replace the earlier ones, the others are kept) and prints the mean per method.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import torch
from bench_common import merge_rows, require, run_stamp

import cellvae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ["pbmc3k", "mouse_intestine_haber_scdesign2"]
N_TOP_GENES = 2000
N_LATENT = 10


def bio_scores(embedding: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """scib-metrics' label-based scores of one embedding."""
    from scib_metrics import nmi_ari_cluster_labels_kmeans, nmi_ari_cluster_labels_leiden, silhouette_label
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    embedding = np.ascontiguousarray(embedding, dtype=np.float32)
    kmeans = nmi_ari_cluster_labels_kmeans(embedding, labels)
    distances, indices = NearestNeighbors(n_neighbors=15).fit(embedding).kneighbors(embedding)
    graph = NeighborsResults(indices=indices, distances=distances)
    leiden = nmi_ari_cluster_labels_leiden(graph, labels, optimize_resolution=True)
    scores = {
        "kmeans_nmi": kmeans["nmi"],
        "kmeans_ari": kmeans["ari"],
        "leiden_nmi": leiden["nmi"],
        "leiden_ari": leiden["ari"],
        "silhouette_label": silhouette_label(embedding, labels),
    }
    return {name: round(float(value), 4) for name, value in scores.items()}


def variable_genes(adata: ad.AnnData) -> tuple[ad.AnnData, np.ndarray]:
    """Log-normalised copy with the 2,000 most variable genes marked, and that mask."""
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.highly_variable_genes(norm, n_top_genes=min(N_TOP_GENES, adata.n_vars))
    return norm, norm.var["highly_variable"].to_numpy()


def run_dataset(name: str, seeds: list[int], with_scvi: bool) -> list[dict]:
    adata = ad.read_h5ad(DATA / f"{name}.h5ad")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    norm, variable = variable_genes(adata)
    rows = []

    def record(method: str, seed: int, genes: int, seconds: float, embedding: np.ndarray) -> None:
        row = {"dataset": name, "method": method, "seed": seed, "genes": genes, "seconds": round(seconds, 1)}
        rows.append(row | bio_scores(embedding, labels) | run_stamp())
        print(rows[-1], flush=True)

    started = time.perf_counter()
    sc.pp.pca(norm, n_comps=50, mask_var="highly_variable", random_state=0)
    record("pca", 0, int(variable.sum()), time.perf_counter() - started, norm.obsm["X_pca"])
    inputs = {"cellvae_all_genes": adata, "cellvae_hvg": adata[:, variable].copy()}
    for method, counts in inputs.items():
        if method == "cellvae_hvg" and counts.n_vars == adata.n_vars:
            continue
        for seed in seeds:
            copy = counts.copy()
            started = time.perf_counter()
            cellvae.tl.embed(copy, n_latent=N_LATENT, random_state=seed, progress=False)
            record(method, seed, copy.n_vars, time.perf_counter() - started, copy.obsm["X_cellvae"])
    if with_scvi:
        import scvi

        for seed in seeds:
            copy = adata[:, variable].copy()
            scvi.settings.seed = seed
            started = time.perf_counter()
            scvi.model.SCVI.setup_anndata(copy)
            model = scvi.model.SCVI(copy, n_latent=N_LATENT)
            model.train(accelerator="cpu", enable_progress_bar=False)
            record("scvi_hvg", seed, copy.n_vars, time.perf_counter() - started, model.get_latent_representation())
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=DATASETS, choices=DATASETS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI (the slowest part)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: the benchmark needs ../shared/data beside the repository")
    require({"scib_metrics": "scib-metrics"})
    if not args.no_scvi:
        require({"scvi": "scvi-tools"}, skip_hint="pass --no-scvi to run without scVI")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    rows = [row for name in args.datasets for row in run_dataset(name, args.seeds, not args.no_scvi)]
    # (--no-scvi keeps scVI's rows, --datasets the other datasets', --seeds the other seeds')
    table = merge_rows(RESULTS / "single_batch.csv", pd.DataFrame(rows), keys=["dataset", "method", "seed"])
    scores = ["kmeans_nmi", "kmeans_ari", "leiden_nmi", "leiden_ari", "silhouette_label", "seconds"]
    summary = table.groupby(["dataset", "method"])[scores].agg(
        lambda x: f"{x.mean():.3f} ± {x.std():.3f}" if len(x) > 1 else f"{x.iloc[0]:.3f}"
    )
    print(summary.to_string())


if __name__ == "__main__":
    main()
