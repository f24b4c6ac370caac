"""Differential expression: cellvae vs scVI (its "change" mode) vs scanpy's Wilcoxon test, on real cells.

On the Kang interferon-beta data (``kang_ifnb_muscat_example.h5ad``: control and stimulated PBMCs of
several donors), both models are trained with the donor as the batch (their default epochs), then:

- **signal**: stimulated vs control CD14+ monocytes. The known interferon-stimulated genes (a fixed list
  of classic ISGs, those measured) should lead the up-regulated genes: the number of them among the
  top 30 and the area under the ROC curve of the ranking (ISGs vs all other genes).
- **null**: CD14+ monocytes split at random into two halves (5 splits). No gene differs between the
  halves' populations, so every gene called differentially expressed (at each method's 5% FDR) is a
  false call.
- the time of each call.

On simulated counts (``cellvae.datasets.simulate``: 100,000 cells of 6 types in 3 batches, 500 genes), both
models are trained on 600, 1,500 and 6,000 cells drawn from that population, and each type is compared with the rest.
A gene truly differs when the population's mean expression (counts per 10,000) differs by more than
``delta`` = 0.25 in log2 (pseudocount 0.01 counts at the median depth); the share of false genes among
those called at each method's 5% FDR (the realised FDR) and the share of true genes called (power) follow.

::

    flock /tmp/cellvae-cpu.lock python benchmarks/differential.py   # ~9 min on 2 cores (~1 min with --no-scvi)

Writes ``results/differential.csv`` (one row per method and test, with the seed, date and commit) and prints
it; the rows of a method and test re-run replace the earlier ones, the others are kept (``--no-scvi`` keeps
scVI's rows).
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
from sklearn.metrics import roc_auc_score

import cellvae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "kang_ifnb_muscat_example.h5ad"
RESULTS = ROOT / "benchmarks" / "results"
CELL_TYPE = "CD14+ Monocytes"
INTERFERON_GENES = [  # classic interferon-stimulated genes (type I interferon response)
    "ISG15", "IFI6", "IFIT1", "IFIT2", "IFIT3", "IFI44", "IFI44L", "MX1", "MX2", "OAS1", "OAS2", "OAS3", "OASL",
    "RSAD2", "ISG20", "IFITM1", "IFITM3", "LY6E", "HERC5", "XAF1", "IFI27", "CXCL10", "CMPK2", "EPSTI1",
    "SAMD9L", "PLSCR1", "STAT1", "IRF7", "BST2", "TNFSF10", "GBP1", "DDX58", "IFIH1", "PARP9", "DDX60",
    "USP18", "SP110", "LGALS3BP", "EIF2AK2", "TRIM22", "APOBEC3A",
]  # fmt: skip
N_SPLITS = 5
SAMPLE_SIZES = [600, 1500, 6000]  # cells sampled from the simulated population (~100, 250, 1,000 per type)
TOP = 30


def signal_scores(up_ranking: list[str], genes: pd.Index) -> dict[str, float]:
    """How well a ranking of genes (most up-regulated first) puts the interferon genes first."""
    interferon = set(INTERFERON_GENES) & set(genes)
    is_interferon = np.array([g in interferon for g in up_ranking])
    scores = np.linspace(1.0, 0.0, len(up_ranking))
    return {
        "isg_measured": len(interferon),
        f"isg_in_top{TOP}": int(is_interferon[:TOP].sum()),
        "isg_auroc": round(float(roc_auc_score(is_interferon, scores)), 4),
    }


def up_ranking(result: pd.DataFrame) -> list[str]:
    """Genes of a Bayesian DE table, most surely up-regulated first: the up-regulated ones by ``proba_de``
    (ties by ``lfc_mean``), then the down-regulated ones in reverse (the same rule for cellvae and scVI)."""
    ordered = result.sort_values(["proba_de", "lfc_mean"], ascending=False)
    up = ordered["lfc_mean"] > 0
    return ordered[up].index.tolist() + ordered[~up].index[::-1].tolist()


def with_groups(adata: ad.AnnData, labels: np.ndarray) -> ad.AnnData:
    """A copy whose obs["compare"] holds ``labels`` on the chosen cell type and "other" elsewhere."""
    copy = adata.copy()
    copy.obs["compare"] = np.where(copy.obs["cell_type"] == CELL_TYPE, labels, "other")
    return copy


def halves(adata: ad.AnnData, seed: int) -> np.ndarray:
    return np.where(np.random.default_rng(seed).random(adata.n_obs) < 0.5, "A", "B")


def kang_rows(method: str, compare, adata: ad.AnnData) -> list[dict]:
    """The signal and null tests of one method; ``compare(labels, group1, group2)`` returns the number of
    genes it calls, the genes most up-regulated first, and its seconds."""
    n_called, ranking, seconds = compare(adata.obs["batch"].astype(str).to_numpy(), "stim", "ctrl")
    rows = [
        {"method": method, "test": "signal", "seconds": round(seconds, 2), "n_de": n_called,
         **signal_scores(ranking, adata.var_names)}
    ]  # fmt: skip
    for split in range(N_SPLITS):
        n_called, _, seconds = compare(halves(adata, split), "A", "B")
        rows.append({"method": method, "test": f"null_split{split}", "seconds": round(seconds, 2), "n_de": n_called})
    return rows


def run_cellvae(adata: ad.AnnData, seed: int) -> list[dict]:
    started = time.perf_counter()
    model = cellvae.CellVAE(adata, batch_key="donor").fit(random_state=seed, progress=False)
    rows = [{"method": "cellvae", "test": "train", "seconds": round(time.perf_counter() - started, 2)}]

    def compare(labels, group1, group2):
        grouped = with_groups(adata, labels)
        started = time.perf_counter()
        result = model.differential_expression(grouped, groupby="compare", group1=group1, group2=group2)
        return int(result["is_de"].sum()), up_ranking(result), time.perf_counter() - started

    return rows + kang_rows("cellvae", compare, adata)


def run_scvi(adata: ad.AnnData, seed: int) -> list[dict]:
    import scvi

    scvi.settings.seed = seed
    copy = adata.copy()
    started = time.perf_counter()
    scvi.model.SCVI.setup_anndata(copy, batch_key="donor")
    model = scvi.model.SCVI(copy)
    model.train(enable_progress_bar=False)
    rows = [{"method": "scvi", "test": "train", "seconds": round(time.perf_counter() - started, 2)}]

    def compare(labels, group1, group2):
        copy.obs["compare"] = with_groups(adata, labels).obs["compare"].to_numpy()
        started = time.perf_counter()
        result = model.differential_expression(copy, groupby="compare", group1=group1, group2=group2, mode="change", delta=0.25)
        return int(result["is_de_fdr_0.05"].sum()), up_ranking(result), time.perf_counter() - started

    return rows + kang_rows("scvi", compare, adata)


def run_wilcoxon(adata: ad.AnnData) -> list[dict]:
    norm = adata.copy()
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)

    def compare(labels, group1, group2):
        grouped = with_groups(norm, labels)
        started = time.perf_counter()
        sc.tl.rank_genes_groups(grouped, "compare", groups=[group1], reference=group2, method="wilcoxon")
        result = sc.get.rank_genes_groups_df(grouped, group1)
        return int((result["pvals_adj"] < 0.05).sum()), result["names"].tolist(), time.perf_counter() - started

    return kang_rows("wilcoxon", compare, adata)


def run_calibration(seed: int, with_scvi: bool, n_cells: int) -> list[dict]:
    """Realised FDR and power of one-vs-rest calls on ``n_cells`` sampled from a simulated population."""
    population = cellvae.datasets.simulate(
        n_cells=100_000, n_genes=500, n_batches=3, n_cell_types=6, random_state=3, batch_effect=0.5
    )
    counts = population.X.tocsr()
    depth = np.asarray(counts.sum(1)).ravel()
    normalized = counts.multiply(1e4 / depth[:, None]).tocsr()
    pseudocount = 0.01 / np.median(depth) * 1e4
    types = population.obs["cell_type"].to_numpy()
    truth = {}
    for name in np.unique(types):
        inside = types == name
        means = [np.asarray(normalized[rows].mean(0)).ravel() for rows in (inside, ~inside)]
        truth[name] = pd.Series(
            np.abs(np.log2(means[0] + pseudocount) - np.log2(means[1] + pseudocount)) > 0.25, index=population.var_names
        )
    sample = population[np.random.default_rng(seed).choice(population.n_obs, n_cells, replace=False)].copy()

    def scores(method: str, seconds: float, called: dict[str, pd.Index]) -> dict:
        false = sum(int((~truth[t][genes]).sum()) for t, genes in called.items())
        found = sum(int(truth[t][genes].sum()) for t, genes in called.items())
        n_called = sum(len(genes) for genes in called.values())
        n_true = sum(int(genes.sum()) for genes in truth.values())
        return {
            "method": method,
            "test": f"simulated_calibration_{n_cells}_cells",
            "seconds": round(seconds, 2),
            "n_de": n_called,
            "realised_fdr": round(false / max(n_called, 1), 4),
            "power": round(found / n_true, 4),
        }

    model = cellvae.CellVAE(sample, batch_key="batch").fit(random_state=seed, progress=False)
    started = time.perf_counter()
    result = model.differential_expression(groupby="cell_type")
    called = {t: frame.index[frame["is_de"]] for t, frame in result.groupby("group1")}
    rows = [scores("cellvae", time.perf_counter() - started, called)]
    if with_scvi:
        import scvi

        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(sample, batch_key="batch")
        reference = scvi.model.SCVI(sample)
        reference.train(enable_progress_bar=False)
        started = time.perf_counter()
        result = reference.differential_expression(groupby="cell_type", mode="change", delta=0.25)
        called = {t: frame.index[frame["is_de_fdr_0.05"]] for t, frame in result.groupby("group1")}
        rows.append(scores("scvi", time.perf_counter() - started, called))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI (needs the bench extra)")
    args = parser.parse_args()
    if not DATA.is_file():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared Kang data beside the repository")
    if not args.no_scvi:
        require({"scvi": "scvi-tools"}, skip_hint="pass --no-scvi to run without scVI")
    torch.set_num_threads(2)
    warnings.simplefilter("ignore")
    adata = ad.read_h5ad(DATA)
    rows = run_cellvae(adata, args.seed) + run_wilcoxon(adata) + ([] if args.no_scvi else run_scvi(adata, args.seed))
    for n_cells in SAMPLE_SIZES:
        rows += run_calibration(args.seed, not args.no_scvi, n_cells)
    new_rows = pd.DataFrame(rows).assign(seed=args.seed, **run_stamp())
    frame = merge_rows(RESULTS / "differential.csv", new_rows, keys=["method", "test"])
    print(frame.to_string(index=False))
    null = frame[frame["test"].str.startswith("null")].groupby("method")["n_de"].agg(["mean", "max"])
    print("\nfalse calls between random halves (mean, max over splits):\n" + null.to_string())


if __name__ == "__main__":
    main()
