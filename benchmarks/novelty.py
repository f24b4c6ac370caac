"""A cell type the reference lacks: does ``tl.transfer_labels`` flag it?

B cells are left out of a reference; the query (a held-out batch) keeps them. The reference is trained
with cellvae's defaults, the query mapped with ``map_query``, labels moved with ``tl.transfer_labels``.
For the query's B cells (novel) and its other cells (seen) it reports how well the vote's uncertainty and
the novelty score separate them (AUROC) and the share of each called ``"Unknown"`` at novelty thresholds:

- ``atlas``: pbmc_atlas_17k without the stimulated Kang cells, its Kang control cells cut to 3,000; query pbmc4k;
- ``kang``: the 5-donor Kang data; query donor 1016.

Query cells without a label (the atlas's 20 ``unknown`` pbmc4k cells) are in neither group.

    flock /tmp/cellvae-cpu.lock python benchmarks/novelty.py --seeds 0 1 2   # ~3 min per seed on 2 cores

Writes one row per dataset and seed to ``results/novelty.csv`` (replacing the rows of the datasets and seeds
re-run, keeping the others) and prints the mean and sd over seeds.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from bench_common import merge_rows, run_stamp
from sklearn.metrics import roc_auc_score

import cellvae

ROOT = Path(__file__).resolve().parents[1]
UNLABELLED = {"unknown", "Unknown", "nan"}
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def atlas() -> tuple[ad.AnnData, ad.AnnData, str]:
    adata = ad.read_h5ad(DATA / "pbmc_atlas_17k.h5ad")
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata = adata[adata.obs["batch"] != "kang_stim"].copy()
    kang = np.flatnonzero(adata.obs["batch"] == "kang_ctrl")
    dropped = np.random.default_rng(0).choice(kang, len(kang) - 3000, replace=False)
    adata = adata[~np.isin(np.arange(adata.n_obs), dropped)].copy()
    is_query = (adata.obs["batch"] == "pbmc4k").to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy(), "B"


def kang() -> tuple[ad.AnnData, ad.AnnData, str]:
    adata = ad.read_h5ad(DATA / "kang_ctrl_5donors_muscat.h5ad")
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    is_query = (adata.obs["batch"] == "1016").to_numpy()
    return adata[~is_query].copy(), adata[is_query].copy(), "B cells"


def novelty_scores(reference: ad.AnnData, query: ad.AnnData, left_out: str, seed: int) -> dict:
    """Train on the reference, map the query and score how its left-out cell type is flagged."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(reference, batch_key="batch").fit(random_state=seed, progress=False)
        query_model = model.map_query(query, random_state=seed, progress=False)
    reference.obsm["X_cellvae"] = model.get_latent()
    query.obsm["X_cellvae"] = query_model.get_latent(query)
    labels = reference.obs["cell_type"].astype(str)
    reference.obs["label"] = labels.where(~labels.isin(UNLABELLED))  # the atlas's unlabelled cells do not vote
    truth = query.obs["cell_type"].astype(str)
    labelled = ~truth.isin(UNLABELLED).to_numpy()
    novel, seen = labelled & (truth == left_out).to_numpy(), labelled & (truth != left_out).to_numpy()
    row = {"seed": seed, "left_out": left_out, "novel_cells": int(novel.sum()), "seen_cells": int(seen.sum())}
    cellvae.tl.transfer_labels(reference, query, "label", unknown_threshold=0.5)
    row["auroc_uncertainty"] = round(roc_auc_score(novel[labelled], query.obs["label_uncertainty"][labelled]), 3)
    row["auroc_novelty"] = round(roc_auc_score(novel[labelled], query.obs["label_novelty"][labelled]), 3)
    called = (query.obs["label_predicted"].astype(str) == "Unknown").to_numpy()
    row["unknown_by_uncertainty_0.5_novel"] = round(float(called[novel].mean()), 3)
    row["unknown_by_uncertainty_0.5_seen"] = round(float(called[seen].mean()), 3)
    for threshold in (0.9, 0.95, 0.99):
        cellvae.tl.transfer_labels(reference, query, "label", novelty_threshold=threshold)
        called = (query.obs["label_predicted"].astype(str) == "Unknown").to_numpy()
        row[f"unknown_by_novelty_{threshold}_novel"] = round(float(called[novel].mean()), 3)
        row[f"unknown_by_novelty_{threshold}_seen"] = round(float(called[seen].mean()), 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared datasets beside the repository")
    torch.set_num_threads(2)
    rows = []
    for name, split in (("atlas", atlas), ("kang", kang)):
        reference, query, left_out = split()
        reference = reference[reference.obs["cell_type"].astype(str) != left_out].copy()
        for seed in args.seeds:
            row = {"data": name, **novelty_scores(reference, query, left_out, seed)}
            print(row, flush=True)
            rows.append(row | run_stamp())
    table = merge_rows(RESULTS / "novelty.csv", pd.DataFrame(rows), keys=["data", "seed"])
    scores = table.drop(columns=["seed", "left_out", "date", "commit"]).groupby("data")
    print(pd.concat({"mean": scores.mean(), "sd": scores.std()}, axis=1).round(3).T.to_string())


if __name__ == "__main__":
    main()
