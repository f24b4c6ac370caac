"""A cell type the reference lacks: does ``tl.transfer_labels`` flag it?

B cells are left out of a reference; the query (a held-out batch) keeps them. The reference is trained
with cellvae's defaults, the query mapped with ``map_query``, labels moved with ``tl.transfer_labels``.
For the query's B cells (novel) and its other cells (seen) it reports how well the vote's uncertainty and
the novelty score separate them (AUROC) and the share of each called ``"Unknown"`` at novelty thresholds:

- ``atlas``: pbmc_atlas_17k without the stimulated Kang cells, its Kang control cells cut to 3,000; query pbmc4k;
- ``kang``: the 5-donor Kang data; query donor 1016.

    flock /tmp/cellvae-cpu.lock python benchmarks/novelty.py   # ~3 min on 2 cores

Writes ``results/novelty.csv``.
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_auc_score

import cellvae

ROOT = Path(__file__).resolve().parents[1]
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


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()  # --help says what it does, runs nothing
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared datasets beside the repository")
    torch.set_num_threads(2)
    rows = []
    for name, split in (("atlas", atlas), ("kang", kang)):
        reference, query, left_out = split()
        reference = reference[reference.obs["cell_type"].astype(str) != left_out].copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cellvae.CellVAE(reference, batch_key="batch").fit(random_state=0, progress=False)
            query_model = model.map_query(query, random_state=0, progress=False)
        reference.obsm["X_cellvae"] = model.get_latent()
        query.obsm["X_cellvae"] = query_model.get_latent(query)
        labels = reference.obs["cell_type"].astype(str)
        reference.obs["label"] = labels.where(labels != "unknown")  # the atlas's unlabelled cells do not vote
        novel = (query.obs["cell_type"].astype(str) == left_out).to_numpy()
        row = {"data": name, "left_out": left_out, "novel_cells": int(novel.sum()), "seen_cells": int((~novel).sum())}
        cellvae.tl.transfer_labels(reference, query, "label", unknown_threshold=0.5)
        row["auroc_uncertainty"] = round(roc_auc_score(novel, query.obs["label_uncertainty"]), 3)
        row["auroc_novelty"] = round(roc_auc_score(novel, query.obs["label_novelty"]), 3)
        called = query.obs["label_predicted"].astype(str) == "Unknown"
        row["unknown_by_uncertainty_0.5_novel"] = round(float(called[novel].mean()), 3)
        row["unknown_by_uncertainty_0.5_seen"] = round(float(called[~novel].mean()), 3)
        for threshold in (0.9, 0.95, 0.99):
            cellvae.tl.transfer_labels(reference, query, "label", novelty_threshold=threshold)
            called = query.obs["label_predicted"].astype(str) == "Unknown"
            row[f"unknown_by_novelty_{threshold}_novel"] = round(float(called[novel].mean()), 3)
            row[f"unknown_by_novelty_{threshold}_seen"] = round(float(called[~novel].mean()), 3)
        print(row, flush=True)
        rows.append(row)
    RESULTS.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(RESULTS / "novelty.csv", index=False)
    print(pd.DataFrame(rows).set_index("data").T.to_string())


if __name__ == "__main__":
    main()
