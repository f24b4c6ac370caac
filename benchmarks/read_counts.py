"""Read counts instead of UMIs: cellvae's defaults, a per-cell dispersion, and scVI.

Full-length protocols (Smart-seq) count reads, and PCR reads each molecule a variable number of times.
This turns the UMIs of two shared datasets into such reads (each molecule a geometric number of reads,
mean 50) and scores the embeddings by their 15-NN cell-type accuracy and, with batches, by how well
they mix (the share of a cell's 15 neighbours from other batches over that share under perfect
mixing; 1 is perfect):

- ``haber``: mouse gut cells (one batch), as UMIs and with every cell's counts turned into reads;
- ``kang_mixed``: Kang's PBMCs, the ``stim`` batch as reads and ``ctrl`` as UMIs (mixed protocols).

cellvae runs with its defaults, ``dispersion="gene-cell"`` and ``"gene-batch"``; scVI (the ``bench``
extra) with its defaults and the NB likelihood::

    flock /tmp/cellvae-cpu.lock python benchmarks/read_counts.py   # ~8 min on 2 cores

Writes ``results/read_counts.csv``: the rows of each case, method and seed run replace the earlier ones, the
others are kept (``--seeds 1`` adds seed 1; ``--no-scvi`` keeps scVI's rows). ``--mapping`` instead maps a
query of reads onto a reference of UMIs
(``kang_ctrl_5donors_muscat``: donors 1015-1256 as the reference, donor 1488 as the query, as UMIs and
as reads; the reference with ``dispersion="gene"`` and ``"gene-batch"``) and scores the query by the
15-NN vote of reference labels and by the share of its 15 neighbours that are reference cells over
that share under perfect mixing; writes ``results/read_counts_mapping.csv`` (~5 min), merged the same way.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from bench_common import merge_rows, require, run_stamp
from sklearn.neighbors import NearestNeighbors

import cellvae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
READS_PER_MOLECULE = 50


def as_reads(adata: ad.AnnData, cells: np.ndarray, seed: int = 0) -> ad.AnnData:
    """A copy whose counts in ``cells`` are reads: each molecule read Geometric(1/50) times."""
    rng = np.random.default_rng(seed)
    out = adata.copy()
    counts = sp.csr_matrix(out.X, dtype=np.float32)
    row_of_value = np.repeat(np.arange(counts.shape[0]), np.diff(counts.indptr))
    chosen = cells[row_of_value]
    molecules = counts.data[chosen].astype(np.int64)
    # a sum of n geometric draws (support >= 1) is n plus a negative binomial of n successes
    counts.data[chosen] = molecules + rng.negative_binomial(molecules, 1 / READS_PER_MOLECULE)
    out.X = counts
    return out


def scores(embedding: np.ndarray, adata: ad.AnnData) -> dict[str, float]:
    neighbours = NearestNeighbors(n_neighbors=16).fit(embedding).kneighbors(embedding, return_distance=False)[:, 1:]
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    votes = pd.DataFrame(labels[neighbours]).mode(axis=1)[0].to_numpy()
    result = {"celltype_knn_accuracy": round(float(np.mean(votes == labels)), 3)}
    batches = adata.obs["batch"].astype(str).to_numpy()
    if len(set(batches)) > 1:
        share = pd.Series(batches).value_counts(normalize=True)
        other = (batches[neighbours] != batches[:, None]).mean(axis=1)
        result["batch_mixing"] = round(float(other.mean() / (1 - share[batches].to_numpy()).mean()), 3)
    return result


def embed(adata: ad.AnnData, method: str, batch_key: str | None, seed: int) -> np.ndarray:
    if method == "scvi":
        import scvi

        scvi.settings.seed = seed
        data = adata.copy()
        scvi.model.SCVI.setup_anndata(data, batch_key=batch_key)
        model = scvi.model.SCVI(data, n_latent=10, gene_likelihood="nb")
        model.train(enable_progress_bar=False, accelerator="cpu")
        return model.get_latent_representation()
    options = {} if method == "cellvae" else {"dispersion": method.removeprefix("cellvae_")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the read-count warning is what this benchmark is about
        model = cellvae.CellVAE(adata, batch_key=batch_key, **options).fit(random_state=seed, progress=False)
    return model.get_latent()


def mapping_scores(reference: ad.AnnData, query: ad.AnnData, dispersion: str, seed: int) -> dict[str, float]:
    """Map ``query`` onto a model of ``reference``; score label transfer and how the query mixes in."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(reference, batch_key="batch", dispersion=dispersion).fit(random_state=seed, progress=False)
        query_model = model.map_query(query, random_state=seed, progress=False)
    on_reference, on_query = query_model.get_latent(reference), query_model.get_latent()
    neighbours = NearestNeighbors(n_neighbors=15).fit(on_reference).kneighbors(on_query, return_distance=False)
    labels = reference.obs["cell_type"].astype(str).to_numpy()
    votes = pd.DataFrame(labels[neighbours]).mode(axis=1)[0].to_numpy()
    together = np.vstack([on_reference, on_query])
    neighbours = NearestNeighbors(n_neighbors=16).fit(together).kneighbors(on_query, return_distance=False)[:, 1:]
    from_reference = (neighbours < len(on_reference)).mean() / (len(on_reference) / len(together))
    accuracy = np.mean(votes == query.obs["cell_type"].astype(str).to_numpy())
    return {"label_transfer_accuracy": round(float(accuracy), 3), "query_mixing": round(float(from_reference), 3)}


def mapping(seeds: list[int]) -> None:
    kang = ad.read_h5ad(DATA / "kang_ctrl_5donors_muscat.h5ad")
    donors = sorted(kang.obs["batch"].astype(str).unique())
    in_query = (kang.obs["batch"].astype(str) == donors[-1]).to_numpy()
    reference, umis = kang[~in_query].copy(), kang[in_query].copy()
    rows = []
    for query_counts, query in {"umis": umis, "reads": as_reads(umis, np.ones(umis.n_obs, bool))}.items():
        for dispersion in ("gene", "gene-batch"):
            for seed in seeds:
                started = time.perf_counter()
                row = {"query": query_counts, "reference_dispersion": dispersion, "seed": seed}
                row |= mapping_scores(reference, query, dispersion, seed)
                row["seconds"] = round(time.perf_counter() - started, 1)
                print(row, flush=True)
                rows.append(row | run_stamp())
    merge_rows(RESULTS / "read_counts_mapping.csv", pd.DataFrame(rows), keys=["query", "reference_dispersion", "seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--mapping", action="store_true", help="map a query of reads onto a reference of UMIs instead")
    parser.add_argument("--no-scvi", action="store_true", help="skip scVI (needs the bench extra); keeps its rows")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"{DATA} not found: this benchmark reads the shared datasets beside the repository")
    if not (args.mapping or args.no_scvi):
        require({"scvi": "scvi-tools"}, skip_hint="pass --no-scvi to run without scVI")
    torch.set_num_threads(2)
    if args.mapping:
        mapping(args.seeds)
        return
    haber = ad.read_h5ad(DATA / "mouse_intestine_haber_scdesign2.h5ad")
    kang = ad.read_h5ad(DATA / "kang_ifnb_muscat_example.h5ad")
    cases = {
        "haber_umis": (haber, None),
        "haber_reads": (as_reads(haber, np.ones(haber.n_obs, bool)), None),
        "kang_umis": (kang, "batch"),
        "kang_mixed": (as_reads(kang, (kang.obs["batch"] == "stim").to_numpy()), "batch"),
    }
    methods = ["cellvae", "cellvae_gene-cell", "cellvae_gene-batch"] + ([] if args.no_scvi else ["scvi"])
    rows = []
    for case, (adata, batch_key) in cases.items():
        nonzero = sp.csr_matrix(adata.X).data
        for method in methods:
            if method == "cellvae_gene-batch" and batch_key is None:
                continue
            for seed in args.seeds:
                started = time.perf_counter()
                embedding = embed(adata, method, batch_key, seed)
                row = {"case": case, "method": method, "seed": seed, "share_of_ones": round(float(np.mean(nonzero == 1)), 3)}
                row |= scores(embedding, adata) | {"seconds": round(time.perf_counter() - started, 1)}
                print(row, flush=True)
                rows.append(row | run_stamp())
    table = merge_rows(RESULTS / "read_counts.csv", pd.DataFrame(rows), keys=["case", "method", "seed"])
    print(table.groupby(["case", "method"], sort=False).mean(numeric_only=True).round(3).to_string())


if __name__ == "__main__":
    main()
