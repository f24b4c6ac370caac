"""Integration and reference-mapping benchmark: cellvae vs scVI vs PCA vs Harmony, scored by scib-metrics.

Work is split into stages so that each stage can run within a time budget; embeddings and
timings are cached (``--cache``) between stages:

    python benchmarks/integration.py embed   --datasets cellbench_3cl --seeds 0 1 2
    python benchmarks/integration.py score   --datasets cellbench_3cl
    python benchmarks/integration.py kmeans  --datasets cellbench_3cl
    python benchmarks/integration.py map     --datasets cellbench_3cl --seeds 0
    python benchmarks/integration.py summary

``embed`` trains cellvae and scVI (``--seeds``) and computes PCA and Harmony on the same genes of a
dataset (all of them, or its 2,000 most variable where it has more; ``--all-genes --tag _allgenes``: cellvae on
all of them, to compare); ``score`` runs
``scib_metrics.benchmark.Benchmarker`` on every cached embedding and writes
``results/integration_<dataset>.csv`` (with ``--append``, keeping its rows of embeddings not in the cache);
``kmeans`` re-clusters every cached embedding with 10 KMeans starts to show how much of scib's one-start
KMeans ARI/NMI is chance; ``map`` holds out one batch,
trains on the rest, maps the held-out batch (cellvae ``map_query``; scVI ``load_query_data``; scANVI
from the scVI reference, ``--methods scanvi``; PCA fitted on the reference), transfers ``cell_type`` with
the same distance-weighted kNN (k=15; scANVI also by its own classifier) and writes
``results/integration_mapping_<dataset>.csv``; ``summary`` writes ``results/integration_summary.md``.
Cells labelled ``unknown`` are embedded but neither scored nor used as votes or truth.

Your own data: ``--datasets`` also takes paths of ``.h5ad`` files holding raw counts (in ``X``, or the layer
``--layer`` names) with a batch column (``--batch-key``, default ``batch``) and a cell-type column
(``--labels-key``, default ``cell_type``); ``map`` needs ``--held-out BATCH``, and their results a
``--results-dir`` of their own (every file is checked before any work):

    python benchmarks/integration.py embed --datasets atlas.h5ad --batch-key sample --labels-key celltype \
        --results-dir my_results
    python benchmarks/integration.py score --datasets atlas.h5ad --batch-key sample --labels-key celltype \
        --results-dir my_results
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scanpy as sc
import scipy.sparse as sp
import torch
from bench_common import require, run_stamp

import cellvae

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = {  # file stem -> held-out query batch for reference mapping
    "cellbench_3cl": "Drop-seq",
    "kang_ifnb_muscat_example": "stim",
    "kang_ctrl_5donors_muscat": "1016",
    "pbmc_atlas_17k": "pbmc4k",
}
N_LATENT = 10
# Datasets with more genes than this are cut to their most variable genes (seurat_v3 on counts, per batch).
N_TOP_GENES = 2000
N_PCS = 50
UNLABELLED = {"unknown", "Unknown", "nan"}


# ----------------------------------------------------------------------------- data and embeddings


def dataset_files(specs: list[str]) -> dict[str, Path]:
    """Each ``--datasets`` entry's name (a shared dataset's, or a file's stem) and its file."""
    files = {}
    for spec in specs:
        if spec not in DATASETS and not spec.endswith(".h5ad"):
            raise SystemExit(f"--datasets {spec!r}: give one of {list(DATASETS)} or the path of an .h5ad file")
        path = DATA / f"{spec}.h5ad" if spec in DATASETS else Path(spec).expanduser()
        if not path.is_file():
            where = "; the shared data folder must sit beside the repository" if spec in DATASETS else ""
            raise SystemExit(f"--datasets {spec}: no such file {path}{where}")
        name, shared = path.stem, path.resolve() == (DATA / path.name).resolve()
        if name in files:
            twice = files[name].resolve() == path.resolve()
            told = f"{name!r} is given twice" if twice else f"two files are named {name!r}; rename one"
            raise SystemExit(f"--datasets {spec}: {told}")
        if name in DATASETS and not shared:  # (its cache and results would be the shared dataset's)
            raise SystemExit(f"--datasets {spec}: {name!r} is the name of a shared dataset; rename the file")
        if name.startswith("mapping_"):  # (score's results would be named as map's of another dataset)
            raise SystemExit(f"--datasets {spec}: a name beginning with 'mapping_' would mix up the results; rename the file")
        files[name] = path
    return files


def keys_of(args, dataset: str) -> dict:
    """Where a dataset's batches, labels and counts are: fixed for the shared files, the options for one's own."""
    if dataset in DATASETS:
        return {"batch_key": "batch", "labels_key": "cell_type", "layer": None}
    return {
        "batch_key": args.batch_key or "batch",
        "labels_key": args.labels_key or "cell_type",
        "layer": None if args.layer in (None, "X") else args.layer,
    }


def held_out_batch(args, dataset: str) -> str | None:
    """The batch ``map`` holds out as the query: a shared dataset's own, ``--held-out`` for one's own file."""
    return DATASETS[dataset] if dataset in DATASETS else args.held_out


def data_record(args, dataset: str) -> dict | None:
    """What an embedding of one's own file was made from (None for a shared dataset): a cached embedding is used
    only where it matches, so that an edited file, another file of that name or another batch column is embedded anew."""
    if dataset in DATASETS:
        return None
    path, keys = args.files[dataset], keys_of(args, dataset)
    found = path.stat()
    return {"file": str(path.resolve()), "size": found.st_size, "modified": found.st_mtime_ns} | {
        key: keys[key] for key in ("batch_key", "layer")
    }


OWN_FILE_OPTIONS = ("batch_key", "labels_key", "layer", "held_out")  # (the shared datasets' are fixed)
RAW_HINT = "counts in raw.X, as CELLxGENE files keep them: write adata.raw.to_adata() to a file of its own and give that"


def check_files(args) -> None:
    """Refuse, before any work, a file whose columns, counts, batches or held-out batch will not do."""
    for dataset, path in args.files.items():
        keys = keys_of(args, dataset)
        try:
            source = ad.read_h5ad(path)
        except Exception as error:  # (not HDF5, truncated, or HDF5 but no AnnData, as a 10x .h5)
            raise SystemExit(f"{path}: not a readable .h5ad file ({error})") from error
        for key, option in ((keys["batch_key"], "--batch-key"), (keys["labels_key"], "--labels-key")):
            if key not in source.obs:
                raise SystemExit(f"{path}: obs has no column {key!r} (pass {option}); it has {list(source.obs.columns)}")
        check_counts(source, path, keys["layer"])
        batches = source.obs[keys["batch_key"]]
        if batches.isna().any():
            raise SystemExit(
                f"{path}: obs[{keys['batch_key']!r}] has {int(batches.isna().sum())} missing values (NaN); give those "
                "cells a batch, or drop them, in a copy of the file"
            )
        labelled = ~source.obs[keys["labels_key"]].astype(str).isin(UNLABELLED).to_numpy()  # (arrays: obs names may repeat)
        if not labelled.any():
            raise SystemExit(f"{path}: no cell is labelled in obs[{keys['labels_key']!r}]: nothing to score")
        if args.stage != "map":
            continue
        names, held_out = batches.astype(str).to_numpy(), held_out_batch(args, dataset)
        if held_out not in set(names):
            found = "" if held_out is None else f"batch {held_out!r} is not in obs[{keys['batch_key']!r}]; "
            raise SystemExit(f"{path}: {found}pass --held-out with the batch to map as the query, one of {sorted(set(names))}")
        if (names == held_out).all():
            raise SystemExit(f"{path}: --held-out {held_out} is every cell's batch; a reference needs another")
        for part, cells in (("the held-out batch", names == held_out), ("the reference", names != held_out)):
            if not labelled[cells].any():
                raise SystemExit(f"{path}: {part} has no cells labelled in obs[{keys['labels_key']!r}]: nothing to score")


def check_counts(source: ad.AnnData, path: Path, layer: str | None) -> None:
    """Refuse a file without raw counts (non-negative whole numbers) where ``layer`` says they are."""
    if layer is not None and layer not in source.layers:
        raise SystemExit(f"{path}: no layer {layer!r}; its layers are {list(source.layers)} ({RAW_HINT})")
    matrix = source.X if layer is None else source.layers[layer]
    if matrix is None:
        raise SystemExit(f"{path}: X is empty; name the layer of the counts with --layer (its layers: {list(source.layers)})")
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size and (values.min() < 0 or not np.array_equal(values, np.round(values))):
        where = "X" if layer is None else f"layers[{layer!r}]"
        raise SystemExit(
            f"{path}: {where} holds no raw counts (negative or fractional values); name their layer with --layer ({RAW_HINT})"
        )


# Variable genes are chosen per batch (seurat_v3) where every batch has this many cells: its loess fit fails on small
# ones (an error from a few hundred cells of 16,000 genes down, a crash of the process at one cell).
MIN_CELLS_PER_BATCH_FOR_GENES = 100


def load(args, name: str, all_genes: bool = False) -> ad.AnnData:
    """The dataset's raw counts with its batches as ``obs["batch"]`` and cell types as ``obs["cell_type"]``, cut to
    its N_TOP_GENES most variable genes unless ``all_genes`` (the file checked by ``check_files``)."""
    path, keys = args.files[name], keys_of(args, name)
    source = ad.read_h5ad(path)
    counts = sp.csr_matrix(source.X if keys["layer"] is None else source.layers[keys["layer"]], dtype=np.float32)
    obs = pd.DataFrame(
        {
            "batch": source.obs[keys["batch_key"]].astype(str).astype("category"),
            "cell_type": source.obs[keys["labels_key"]].astype(str).astype("category"),
        },
        index=source.obs_names,
    )
    adata = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=source.var_names))
    if N_TOP_GENES and adata.n_vars > N_TOP_GENES and not all_genes:
        smallest = adata.obs["batch"].value_counts().min()
        per_batch = smallest >= MIN_CELLS_PER_BATCH_FOR_GENES
        if not per_batch:
            print(f"{name}: a batch has {smallest} cells, so the variable genes are chosen over all cells at once")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                sc.pp.highly_variable_genes(
                    adata, n_top_genes=N_TOP_GENES, flavor="seurat_v3", batch_key="batch" if per_batch else None
                )
            except ValueError as error:  # (seurat_v3's loess fit fails on a small batch)
                print(f"{name}: variable genes per batch failed ({error}); choosing them over all cells at once")
                sc.pp.highly_variable_genes(adata, n_top_genes=N_TOP_GENES, flavor="seurat_v3")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    return adata


def n_genes(path: Path) -> int:
    """The genes of a dataset, read from its file's var alone."""
    return ad.read_h5ad(path, backed="r").n_vars


def log_normalised(adata: ad.AnnData) -> ad.AnnData:
    out = ad.AnnData(adata.X.copy(), obs=adata.obs[["batch", "cell_type"]].copy(), var=pd.DataFrame(index=adata.var_names))
    sc.pp.normalize_total(out, target_sum=1e4)
    sc.pp.log1p(out)
    return out


def embed_pca(adata: ad.AnnData, seed: int) -> np.ndarray:
    norm = log_normalised(adata)
    sc.pp.pca(norm, n_comps=min(N_PCS, adata.n_obs - 1, adata.n_vars - 1), random_state=seed)
    return norm.obsm["X_pca"]


def embed_harmony(pca: np.ndarray, obs: pd.DataFrame, seed: int) -> np.ndarray:
    import harmonypy

    result = harmonypy.run_harmony(pca, obs[["batch"]], ["batch"], random_state=seed, verbose=False)
    corrected = np.asarray(result.Z_corr)
    return corrected.T if corrected.shape[0] != pca.shape[0] else corrected


def train_cellvae(adata: ad.AnnData, seed: int, max_epochs: int | None, model_kwargs: dict) -> cellvae.CellVAE:
    model = cellvae.CellVAE(adata, batch_key="batch", **{"n_latent": N_LATENT, **model_kwargs})
    return model.fit(max_epochs=max_epochs, random_state=seed, progress=False, device="cpu")


def train_scvi(adata: ad.AnnData, seed: int, max_epochs: int | None, likelihood: str):
    import scvi

    scvi.settings.seed = seed
    scvi.model.SCVI.setup_anndata(adata, batch_key="batch")
    model = scvi.model.SCVI(adata, n_latent=N_LATENT, gene_likelihood=likelihood)
    model.train(max_epochs=max_epochs, accelerator="cpu", enable_progress_bar=False)
    return model


def scvi_epochs(model) -> int:
    return int(len(model.history["elbo_train"]))


# ----------------------------------------------------------------------------- cache


def cache_path(cache: Path, dataset: str, key: str) -> Path:
    return cache / dataset / f"{key}.npz"


def save_embedding(cache: Path, dataset: str, key: str, embedding: np.ndarray, info: dict) -> None:
    path = cache_path(cache, dataset, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, embedding=np.asarray(embedding, dtype=np.float32), info=json.dumps(info))
    print(f"{dataset} {key}: {info}", flush=True)


def method_of(key: str) -> str:
    """The method of a cached embedding's name: ``cellvae_bn_s2`` -> ``cellvae_bn``; ``harmony`` stays."""
    return key.rsplit("_s", 1)[0] if "_s" in key else key


def cached_request(cache: Path, dataset: str, key: str) -> dict | None:
    """The settings a cached embedding was made with (None: not cached; {} if it predates this record)."""
    path = cache_path(cache, dataset, key)
    if not path.is_file():
        return None
    with np.load(path) as stored:
        return json.loads(str(stored["info"])).get("request", {})


def embedding_request(method: str, args, dataset: str) -> dict:
    """The options of ``embed`` that change ``method``'s embedding: a cached one is reused only if they match."""
    request = {} if dataset in DATASETS else {"data": data_record(args, dataset)}
    if method == "cellvae":
        request |= {"max_epochs": args.cellvae_max_epochs, "all_genes": args.all_genes, "model_kwargs": args.cellvae_kwargs}
    if method in ("scvi", "scvi_nb"):
        request |= {"max_epochs": args.scvi_max_epochs}
    return request


def cached(cache: Path, dataset: str, data: dict | None, quiet: bool = False) -> dict[str, tuple[np.ndarray, dict]]:
    """The cached embeddings of ``dataset`` made from ``data`` (see ``data_record``); others are named and left out."""
    out = {}
    for path in sorted((cache / dataset).glob("*.npz")):
        with np.load(path) as stored:
            info = json.loads(str(stored["info"]))
            made_from = info.get("request", {}).get("data")
            if made_from != data:
                if not quiet:
                    print(f"{dataset} {path.stem}: cached from other data ({made_from}), left out", flush=True)
                continue
            out[path.stem] = (stored["embedding"], info)
    return out


# ----------------------------------------------------------------------------- stages


def stage_embed(args) -> None:
    if args.all_genes and (set(args.methods) != {"cellvae"} or not args.tag):
        raise SystemExit("--all-genes is for cellvae variants: pass --methods cellvae --tag _allgenes")
    for dataset in args.datasets:
        adata = load(args, dataset, args.all_genes)
        for method in args.methods:
            seeds = args.seeds if method in ("cellvae", "scvi", "scvi_nb") else [0]
            for seed in seeds:
                key = f"{method}{args.tag}_s{seed}" if method in ("cellvae", "scvi", "scvi_nb") else method
                request, earlier = embedding_request(method, args, dataset), cached_request(args.cache, dataset, key)
                if earlier == request and not args.overwrite:
                    print(f"{dataset} {key}: cached, skipped", flush=True)
                    continue
                if earlier is not None and earlier != request:
                    print(f"{dataset} {key}: cached with {earlier or 'unrecorded settings'}, not {request}: embedding again")
                started = time.perf_counter()
                if method == "cellvae":
                    model = train_cellvae(adata, seed, args.cellvae_max_epochs, args.cellvae_kwargs)
                    seconds = time.perf_counter() - started
                    embedding = model.get_latent()
                    info = {"epochs": len(model.history), "max_epochs": args.cellvae_max_epochs, **args.cellvae_kwargs}
                    if args.all_genes:
                        info["genes"] = adata.n_vars
                elif method in ("scvi", "scvi_nb"):
                    model = train_scvi(adata.copy(), seed, args.scvi_max_epochs, "nb" if method == "scvi_nb" else "zinb")
                    seconds = time.perf_counter() - started
                    embedding = model.get_latent_representation()
                    info = {"epochs": scvi_epochs(model), "max_epochs": args.scvi_max_epochs}
                elif method == "pca":
                    embedding = embed_pca(adata, 0)
                    seconds = time.perf_counter() - started
                    info = {}
                elif method == "harmony":
                    pca = embed_pca(adata, 0)
                    started = time.perf_counter()
                    embedding = embed_harmony(pca, adata.obs, 0)
                    seconds = time.perf_counter() - started
                    info = {"note": "seconds exclude the PCA"}
                else:
                    raise SystemExit(f"unknown method {method!r}")
                info = {"seconds": round(seconds, 2), "seed": seed, **info, "request": request}
                save_embedding(args.cache, dataset, key, embedding, info)


def scib_scores(adata: ad.AnnData, embeddings: dict[str, np.ndarray], n_jobs: int) -> pd.DataFrame:
    """scib-metrics totals of each embedding, on labelled cells only (PCA is the unintegrated baseline)."""
    from scib_metrics.benchmark import Benchmarker

    keep = ~adata.obs["cell_type"].astype(str).isin(UNLABELLED).to_numpy()
    scored = ad.AnnData(obs=adata.obs.loc[keep, ["batch", "cell_type"]].copy())
    scored.obs["cell_type"] = scored.obs["cell_type"].astype(str).astype("category")
    for key, embedding in embeddings.items():
        scored.obsm[key] = np.ascontiguousarray(embedding[keep], dtype=np.float32)
    bench = Benchmarker(
        scored,
        batch_key="batch",
        label_key="cell_type",  # (scib-metrics names it label_key; cellvae, labels_key)
        embedding_obsm_keys=list(embeddings),
        pre_integrated_embedding_obsm_key="pca",
        n_jobs=n_jobs,
        progress_bar=False,
    )
    bench.benchmark()
    table = bench.get_results(min_max_scale=False)
    table = table.drop(index="Metric Type", errors="ignore").apply(pd.to_numeric)
    return table


def check_cached(args) -> None:
    """Refuse, before any dataset is scored, a dataset with no cached embedding made from its data as it is now, or
    (``score``) no cached PCA, scib's unintegrated baseline."""
    for dataset in args.datasets:
        stored = cached(args.cache, dataset, data_record(args, dataset), quiet=True)
        if not stored:
            raise SystemExit(f"{dataset}: nothing is cached from its file as it is now; run the embed stage first")
        if args.stage == "score" and "pca" not in stored:
            raise SystemExit(f"{dataset}: run the embed stage with the pca method first (scib's unintegrated baseline)")


def stage_score(args) -> None:
    check_cached(args)
    for dataset in args.datasets:
        adata = load(args, dataset)
        stored = cached(args.cache, dataset, data_record(args, dataset))
        started = time.perf_counter()
        table = scib_scores(adata, {k: e for k, (e, _) in stored.items()}, args.n_jobs)
        table.insert(0, "method", [method_of(k) for k in table.index])
        table.insert(1, "seed", [stored[k][1].get("seed", 0) for k in table.index])
        table["train_seconds"] = [stored[k][1]["seconds"] for k in table.index]
        table["epochs"] = [stored[k][1].get("epochs", np.nan) for k in table.index]
        table["settings"] = [
            json.dumps({x: y for x, y in stored[k][1].items() if x not in ("seconds", "seed", "request")}) for k in table.index
        ]
        table.index.name = "embedding"
        args.results_dir.mkdir(parents=True, exist_ok=True)
        out = args.results_dir / f"integration_{dataset}.csv"
        table = table.assign(**run_stamp())  # (date and commit of the scores; rows kept by --append keep theirs)
        if out.is_file() and args.append:  # (not the rows of embeddings cached now, scored anew or left out as stale)
            previous = pd.read_csv(out, index_col=0)
            in_cache = {path.stem for path in (args.cache / dataset).glob("*.npz")}
            table = pd.concat([previous[~previous.index.isin(set(table.index) | in_cache)], table])
        table.to_csv(out)
        print(f"{dataset}: scored {len(stored)} embeddings in {time.perf_counter() - started:.0f} s", flush=True)
        print(table[["method", "seed", "Bio conservation", "Batch correction", "Total", "train_seconds"]], flush=True)


def stage_kmeans(args) -> None:
    """How much of each KMeans ARI/NMI is the luck of one initialisation.

    scib-metrics clusters with one k-means++ start (fixed seed); this stage re-clusters every cached
    embedding with scikit-learn's KMeans, 10 starts keeping the lowest inertia, and with 10 single
    starts, and writes ``results/kmeans_inits_<dataset>.csv``.
    """
    from scib_metrics.utils import KMeans as ScibKMeans
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    check_cached(args)
    for dataset in args.datasets:
        adata = load(args, dataset)
        labels = adata.obs["cell_type"].astype(str).to_numpy()
        keep = ~np.isin(labels, list(UNLABELLED))
        labels = labels[keep]
        k = len(np.unique(labels))
        rows = []
        for key, (embedding, info) in cached(args.cache, dataset, data_record(args, dataset)).items():
            x = np.ascontiguousarray(embedding[keep], dtype=np.float32)
            scib = ScibKMeans(k)
            scib.fit(x)
            best = KMeans(k, n_init=10, random_state=0).fit_predict(x)
            singles = [KMeans(k, n_init=1, random_state=r).fit_predict(x) for r in range(10)]
            rows.append(
                {
                    "embedding": key,
                    "method": method_of(key),
                    "seed": info.get("seed", 0),
                    "ari_scib_one_start": adjusted_rand_score(labels, np.asarray(scib.labels_)),
                    "nmi_scib_one_start": normalized_mutual_info_score(labels, np.asarray(scib.labels_)),
                    "ari_best_of_10": adjusted_rand_score(labels, best),
                    "nmi_best_of_10": normalized_mutual_info_score(labels, best),
                    "ari_single_starts_mean": float(np.mean([adjusted_rand_score(labels, s) for s in singles])),
                    "ari_single_starts_min": float(np.min([adjusted_rand_score(labels, s) for s in singles])),
                }
            )
        table = pd.DataFrame(rows).set_index("embedding")
        args.results_dir.mkdir(parents=True, exist_ok=True)
        table.assign(**run_stamp()).to_csv(args.results_dir / f"kmeans_inits_{dataset}.csv")
        print(dataset, table.round(3).to_string(), sep="\n", flush=True)


def label_transfer_scores(ref: ad.AnnData, query: ad.AnnData, ref_rep: np.ndarray, query_rep: np.ndarray) -> dict:
    reference = ad.AnnData(obs=ref.obs[["cell_type"]].copy())
    reference.obs["cell_type"] = reference.obs["cell_type"].astype(str).where(~reference.obs["cell_type"].isin(UNLABELLED))
    reference.obsm["rep"] = ref_rep
    target = ad.AnnData(obs=pd.DataFrame(index=query.obs_names))
    target.obsm["rep"] = query_rep
    cellvae.tl.transfer_labels(reference, target, "cell_type", use_rep="rep", k=15)
    return prediction_scores(query, target.obs["cell_type_predicted"])


def prediction_scores(query: ad.AnnData, predicted) -> dict:
    """Accuracy and macro-F1 of predicted labels against the query's labelled cells."""
    from sklearn.metrics import accuracy_score, f1_score

    truth = query.obs["cell_type"].astype(str).to_numpy()
    predicted = np.asarray(predicted).astype(str)
    labelled = ~np.isin(truth, list(UNLABELLED))
    return {
        "accuracy": accuracy_score(truth[labelled], predicted[labelled]),
        "macro_f1": f1_score(truth[labelled], predicted[labelled], average="macro"),
        "n_query_scored": int(labelled.sum()),
    }


def map_scanvi(scvi_reference, ref_scvi: ad.AnnData, query: ad.AnnData, seed: int, query_epochs: int):
    """scANVI built from the scVI reference (its defaults, the reference's labels), the query mapped by
    ``load_query_data`` with its labels hidden, and labels transferred two ways: scANVI's own classifier
    (``predict``, how its users transfer labels) and the same kNN vote as the other methods on its latent.

    Returns the two result rows and the reference and query embeddings.
    """
    import scvi

    scvi.settings.seed = seed
    labels = ref_scvi.obs["cell_type"].astype(str)
    ref_scvi.obs["scanvi_label"] = labels.where(~labels.isin(UNLABELLED), "Unknown")
    started = time.perf_counter()
    reference = scvi.model.SCANVI.from_scvi_model(scvi_reference, "Unknown", labels_key="scanvi_label")
    reference.train(accelerator="cpu", enable_progress_bar=False)
    train_seconds = time.perf_counter() - started
    started = time.perf_counter()
    query_scanvi = query.copy()
    query_scanvi.obs["scanvi_label"] = "Unknown"
    scvi.model.SCANVI.prepare_query_anndata(query_scanvi, reference)
    query_model = scvi.model.SCANVI.load_query_data(query_scanvi, reference)
    query_model.train(max_epochs=query_epochs, plan_kwargs={"weight_decay": 0.0}, accelerator="cpu", enable_progress_bar=False)
    map_seconds = time.perf_counter() - started
    ref_rep, query_rep = query_model.get_latent_representation(ref_scvi), query_model.get_latent_representation()
    common = {"seed": seed, "ref_train_seconds": train_seconds, "map_seconds": map_seconds, "query_epochs": query_epochs}
    rows = [
        {
            "embedding": f"scanvi_s{seed}",
            "method": "scanvi_classifier",
            **common,
            **prediction_scores(query, query_model.predict()),
        },
        {
            "embedding": f"scanvi_knn_s{seed}",
            "method": "scanvi_knn",
            **common,
            **label_transfer_scores(ref_scvi, query, ref_rep, query_rep),
        },
    ]
    return rows, (ref_rep, query_rep)


def stage_map(args) -> None:
    for dataset in args.datasets:
        adata = load(args, dataset)
        held_out = held_out_batch(args, dataset)  # (checked by check_files)
        is_query = (adata.obs["batch"] == held_out).to_numpy()
        ref, query = adata[~is_query].copy(), adata[is_query].copy()
        for key in ("batch", "cell_type"):
            ref.obs[key] = ref.obs[key].cat.remove_unused_categories()
            query.obs[key] = query.obs[key].cat.remove_unused_categories()
        if args.cellvae_kwargs.get("batch_mmd") and ref.obs["batch"].nunique() < 2:
            print(f"{dataset}: skipped, batch_mmd has no effect on a reference of one batch ({held_out} held out)")
            continue
        rows, embeddings = [], {}
        order = np.concatenate([np.flatnonzero(~is_query), np.flatnonzero(is_query)])
        combined = adata[order].copy()
        for seed in args.seeds:
            if "cellvae" in args.methods:
                started = time.perf_counter()
                model = train_cellvae(ref, seed, args.cellvae_max_epochs, args.cellvae_kwargs)
                train_seconds = time.perf_counter() - started
                started = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    query_model = model.map_query(query, random_state=seed, progress=False, device="cpu", **args.map_kwargs)
                map_seconds = time.perf_counter() - started
                ref_rep, query_rep = query_model.get_latent(ref), query_model.get_latent()
                embeddings[f"cellvae{args.tag}_s{seed}"] = np.vstack([ref_rep, query_rep])
                rows.append(
                    {
                        "embedding": f"cellvae{args.tag}_s{seed}",
                        "method": f"cellvae{args.tag}",
                        "seed": seed,
                        "ref_train_seconds": train_seconds,
                        "map_seconds": map_seconds,
                        "query_epochs": len(query_model.history),
                        **label_transfer_scores(ref, query, ref_rep, query_rep),
                    }
                )
            if {"scvi", "scanvi"} & set(args.methods):  # one scVI reference serves both
                import scvi

                started = time.perf_counter()
                ref_scvi = ref.copy()
                model = train_scvi(ref_scvi, seed, args.scvi_max_epochs, "zinb")
                scvi_seconds = time.perf_counter() - started
            if "scvi" in args.methods:
                started = time.perf_counter()
                query_scvi = query.copy()
                scvi.model.SCVI.prepare_query_anndata(query_scvi, model)
                query_model = scvi.model.SCVI.load_query_data(query_scvi, model)
                query_model.train(
                    max_epochs=args.scvi_query_epochs,
                    plan_kwargs={"weight_decay": 0.0},
                    accelerator="cpu",
                    enable_progress_bar=False,
                )
                map_seconds = time.perf_counter() - started
                ref_rep = query_model.get_latent_representation(ref_scvi)
                query_rep = query_model.get_latent_representation()
                embeddings[f"scvi_s{seed}"] = np.vstack([ref_rep, query_rep])
                rows.append(
                    {
                        "embedding": f"scvi_s{seed}",
                        "method": "scvi",
                        "seed": seed,
                        "ref_train_seconds": scvi_seconds,
                        "map_seconds": map_seconds,
                        "query_epochs": scvi_epochs(query_model),
                        **label_transfer_scores(ref, query, ref_rep, query_rep),
                    }
                )
            if "scanvi" in args.methods:  # after scVI's map, which it leaves as it was
                scanvi_rows, scanvi_reps = map_scanvi(model, ref_scvi, query, seed, args.scvi_query_epochs)
                for row in scanvi_rows:
                    row["ref_train_seconds"] += scvi_seconds
                rows += scanvi_rows
                embeddings[f"scanvi_s{seed}"] = np.vstack(scanvi_reps)
        started = time.perf_counter()
        ref_norm, query_norm = log_normalised(ref), log_normalised(query)
        sc.pp.pca(ref_norm, n_comps=min(N_PCS, ref.n_obs - 1, ref.n_vars - 1), random_state=0)
        loadings = ref_norm.varm["PCs"]
        mean = np.asarray(ref_norm.X.mean(axis=0)).ravel()
        query_pca = np.asarray(query_norm.X @ loadings) - mean @ loadings
        ref_pca = np.asarray(ref_norm.X @ loadings) - mean @ loadings
        embeddings["pca"] = np.vstack([ref_pca, query_pca])
        rows.append(
            {
                "embedding": "pca",
                "method": "pca",
                "seed": 0,
                "ref_train_seconds": time.perf_counter() - started,
                "map_seconds": 0.0,
                **label_transfer_scores(ref, query, ref_pca, query_pca),
            }
        )
        table = pd.DataFrame(rows).set_index("embedding")
        if not args.skip_scib:
            scores = scib_scores(combined, embeddings, args.n_jobs)
            table = table.join(scores[["Bio conservation", "Batch correction", "Total"]])
        table.insert(0, "held_out_batch", held_out)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        out = args.results_dir / f"integration_mapping_{dataset}{args.tag}.csv"
        table = table.assign(**run_stamp())  # (date and commit of the scores; rows kept by --append keep theirs)
        if out.is_file() and args.append:
            previous = pd.read_csv(out, index_col=0)
            table = pd.concat([previous[~previous.index.isin(table.index)], table])
        table.to_csv(out)
        print(table.round(3).to_string(), flush=True)


def mean_sd(values: pd.Series, digits: int = 3) -> str:
    values = values.dropna()
    if len(values) == 0:
        return "–"
    if len(values) == 1:
        return f"{values.iloc[0]:.{digits}f} (n=1)"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f} (n={len(values)})"


def kmeans_section(results: Path) -> list[str]:
    """Summary rows of the ``kmeans`` stage, with the scib total recomputed from the best-of-10 clustering."""
    lines = [
        "",
        "## KMeans starts (`kmeans` stage): how much of the KMeans ARI/NMI is one start's luck",
        "",
        "scib-metrics clusters each embedding once (k-means++, one start, seed 0). Re-clustered with scikit-learn:",
        "the best of 10 starts by inertia, and the mean of 10 single starts. The last column recomputes the scib",
        "total with the best-of-10 NMI and ARI in place of scib's (bio = mean of its 5 metrics, total = 0.6 bio +",
        "0.4 batch); it is a sensitivity check, not the benchmark's score.",
        "",
        "| dataset | method | seeds | ARI, scib's one start | ARI, best of 10 | ARI, mean of 10 single starts | "
        "total (scib) | total with best-of-10 KMeans |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(results.glob("kmeans_inits_*.csv")):
        dataset = path.stem.removeprefix("kmeans_inits_")
        scores = results / f"integration_{dataset}.csv"
        if not scores.is_file():
            continue
        table = pd.read_csv(path, index_col=0).join(pd.read_csv(scores, index_col=0)[["KMeans NMI", "KMeans ARI", "Total"]])
        gain = (table["nmi_best_of_10"] - table["KMeans NMI"] + table["ari_best_of_10"] - table["KMeans ARI"]) / 5
        table["total_best_of_10"] = table["Total"] + 0.6 * gain
        for method, group in table.groupby("method", sort=False):
            lines.append(
                f"| {dataset} | {method} | {len(group)} | {mean_sd(group['ari_scib_one_start'])} | "
                f"{mean_sd(group['ari_best_of_10'])} | {mean_sd(group['ari_single_starts_mean'])} | "
                f"{mean_sd(group['Total'])} | {mean_sd(group['total_best_of_10'])} |"
            )
    return lines


def stage_summary(args) -> None:
    lines = ["# Integration benchmark (generated by `benchmarks/integration.py summary`)", ""]
    notes = args.results_dir / "integration_settings.md"
    if notes.is_file():
        lines += [notes.read_text().strip(), ""]
    lines += [
        "## scib-metrics (Benchmarker, not min-max scaled; labelled cells only)",
        "",
        "| dataset | method | seeds | bio conservation | batch correction | total | train seconds | epochs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(args.results_dir.glob("integration_*.csv")):
        if path.name.startswith("integration_mapping_"):
            continue
        dataset = path.stem.removeprefix("integration_")
        table = pd.read_csv(path)
        for method, group in table.groupby("method", sort=False):
            lines.append(
                f"| {dataset} | {method} | {len(group)} | {mean_sd(group['Bio conservation'])} | "
                f"{mean_sd(group['Batch correction'])} | {mean_sd(group['Total'])} | {mean_sd(group['train_seconds'], 1)} | "
                f"{mean_sd(group['epochs'], 0)} |"
            )
    lines += kmeans_section(args.results_dir)
    lines += [
        "",
        "## Reference mapping (held-out batch as query; kNN label transfer, k=15, distance-weighted)",
        "",
        "| dataset | held-out batch | method | seeds | accuracy | macro-F1 | scib total (ref+query) | ref train s | map s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(args.results_dir.glob("integration_mapping_*.csv")):
        dataset = path.stem.removeprefix("integration_mapping_")
        table = pd.read_csv(path)
        for method, group in table.groupby("method", sort=False):
            total = mean_sd(group["Total"]) if "Total" in group else "–"
            lines.append(
                f"| {dataset} | {group['held_out_batch'].iloc[0]} | {method} | {len(group)} | {mean_sd(group['accuracy'])} | "
                f"{mean_sd(group['macro_f1'])} | {total} | {mean_sd(group['ref_train_seconds'], 1)} | "
                f"{mean_sd(group['map_seconds'], 1)} |"
            )
    (args.results_dir / "integration_summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def needed_packages(args) -> dict[str, str]:
    """The optional packages (import name -> package) the chosen stage and methods need."""
    needed = {}
    every_gene = args.stage == "embed" and args.all_genes  # (the other stages load each dataset's variable genes)
    if args.stage != "summary" and not every_gene and any(n_genes(path) > N_TOP_GENES for path in args.files.values()):
        needed["skmisc"] = "scikit-misc"  # (the variable genes: seurat_v3)
    if args.stage in ("embed", "map") and {"scvi", "scvi_nb", "scanvi"} & set(args.methods):
        needed["scvi"] = "scvi-tools"
    if args.stage == "embed" and "harmony" in args.methods:
        needed["harmonypy"] = "harmonypy"
    if args.stage in ("score", "kmeans") or (args.stage == "map" and not args.skip_scib):
        needed["scib_metrics"] = "scib-metrics"
    return needed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage", choices=["embed", "score", "kmeans", "map", "summary"])
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), help=f"of {list(DATASETS)} (default: all), or .h5ad files of your own"
    )
    parser.add_argument("--batch-key", default=None, help="the batch column of your own files' obs (default: batch)")
    parser.add_argument("--labels-key", default=None, help="the cell-type column of your own files' obs (default: cell_type)")
    parser.add_argument("--layer", default=None, help="the layer of your own files' raw counts (default: X)")
    parser.add_argument("--held-out", default=None, help="map: the batch of your own files to map as the query")
    parser.add_argument(
        "--results-dir", type=Path, default=None, help="where the CSVs and the summary go (default: benchmarks/results)"
    )
    parser.add_argument("--methods", nargs="+", default=["pca", "harmony", "cellvae", "scvi"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--cellvae-max-epochs", type=int, default=None, help="default: cellvae's own choice")
    parser.add_argument("--all-genes", action="store_true", help="embed: cellvae on every gene, not the variable ones")
    parser.add_argument("--cellvae-kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"encode_batch\": false}'")
    parser.add_argument("--map-kwargs", type=json.loads, default={}, help="map: JSON options of CellVAE.map_query")
    parser.add_argument("--tag", default="", help="suffix of cellvae embedding names (for variants)")
    parser.add_argument("--scvi-max-epochs", type=int, default=None, help="default: scVI's own choice")
    parser.add_argument("--scvi-query-epochs", type=int, default=200)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/cellvae-integration-cache"))
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--append", action="store_true", help="score, map: keep the CSV's rows of other embeddings")
    parser.add_argument("--skip-scib", action="store_true", help="map: skip the scib scores of reference+query")
    parser.add_argument("--n-jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    skip_hints = {"embed": "leave out the --methods that need them", "map": "leave out scvi and scanvi, and pass --skip-scib"}
    args.files = dataset_files(args.datasets) if args.stage != "summary" else {}
    args.datasets = list(args.files)
    own = [name for name in args.files if name not in DATASETS]
    if own and args.results_dir is None:
        raise SystemExit(f"pass --results-dir DIR for the results of {own} (benchmarks/results holds the repository's own)")
    args.results_dir = args.results_dir or RESULTS
    given = [f"--{name.replace('_', '-')}" for name in OWN_FILE_OPTIONS if vars(args)[name] is not None]
    if args.files and not own and given:
        raise SystemExit(f"{', '.join(given)}: for .h5ad files of your own; the shared datasets' are fixed")
    check_files(args)
    needed = needed_packages(args)
    hint = skip_hints.get(args.stage, "")
    others = [module for module in needed if module != "skmisc" and importlib.util.find_spec(module) is None]
    if "skmisc" in needed and importlib.util.find_spec("skmisc") is None:  # (whatever the methods)
        install = (
            f"pip install scikit-misc (it picks the {N_TOP_GENES:,} most variable genes of files with more genes, whatever "
            "the methods)"
        )
        if not others:
            hint = install
        elif hint:  # (the stage's way round the others)
            hint = f"{install} and {hint}"
        else:  # (the others come with the bench extra alone)
            hint = ""
    require(needed, skip_hint=hint)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    stages = {"embed": stage_embed, "score": stage_score, "kmeans": stage_kmeans, "map": stage_map, "summary": stage_summary}
    stages[args.stage](args)


if __name__ == "__main__":
    main()
