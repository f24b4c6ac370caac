"""Speed benchmark: cellvae against scvi-tools in the same run, on the same data and CPU threads.

Each part is a separate command (so that every locked run stays under ten minutes) and merges
its numbers into ``benchmarks/results/speed.json``; ``table`` writes ``speed.md`` from it::

    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py throughput
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py ttq-scvi     # repeat until it says "done"
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py ttq-scvi-scores
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py ttq-cellvae
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py latent
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py memory
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py scaling --sizes 10000 100000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py scaling --sizes 1000000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py roofline
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py zarr --sizes 10000 100000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py zarr --sizes 1000000 --in-memory-max 1000000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py ddp --ddp-cells 100000 --epochs 2
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py layouts --sizes 20000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py query --sizes 100000
    flock /tmp/cellvae-cpu.lock python benchmarks/speed.py views --sizes 1000000
    flock /tmp/cellvae-cpu.lock python3.12 benchmarks/speed.py loader   # annbatch needs Python >= 3.12
    python benchmarks/speed.py table

Large simulated files and scVI checkpoints go to ``--work-dir`` (default /tmp/cellvae-speed),
never into the repository. ``scaling`` and ``zarr`` run every ``--sizes`` value; ``layouts``, ``views`` and
``query`` one size, the first. The parts with scVI (throughput, ttq-scvi, ttq-scvi-scores, latent) and
``loader`` need the bench extra (``pip install -e ".[bench]"``). Each section's date, commit, CPU and versions
are recorded under ``provenance`` in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from bench_common import REPO, environment, package_version, require

DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results"
THREADS = 2
ARCH = {"n_hidden": 128, "n_latent": 10, "n_layers": 1}


# ----------------------------------------------------------------------------- helpers


def setup_threads(threads: int = THREADS) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def read(name: str):
    import anndata as ad

    path = DATA / name
    if not path.is_file():
        sys.exit(f"{path} not found: the benchmark needs ../shared/data beside the repository")
    return ad.read_h5ad(path)


def pbmc68k():
    import cellvae

    return cellvae.datasets.pbmc68k()


def merge(section: str, values: dict, out: Path, stamp: bool = True) -> None:
    """Write ``values`` under ``section`` of the results JSON, keeping the other sections, and the date, commit,
    machine and versions of this run under ``provenance[section]`` (the top-level ``machine`` block is older runs');
    ``stamp=False`` keeps the section's provenance (a command that adds to the numbers of an earlier run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[section] = values
    if stamp or section not in results.get("provenance", {}):
        results.setdefault("provenance", {})[section] = environment()
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({section: values, "provenance": results["provenance"][section]}, indent=2))


def holdout_split(n_cells: int, fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n_cells)
    n_test = int(round(fraction * n_cells))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def scvi_model(adata, batch_key: str | None, **kwargs):
    import scvi

    scvi.settings.seed = 0
    scvi.settings.num_threads = THREADS
    scvi.settings.dl_num_workers = 0
    adata = adata.copy()
    scvi.model.SCVI.setup_anndata(adata, batch_key=batch_key)
    return scvi.model.SCVI(adata, **kwargs), adata


def epoch_timer():
    """A Lightning callback recording the wall time of every training epoch of scVI."""
    from lightning.pytorch.callbacks import Callback

    class EpochTimer(Callback):
        def __init__(self):
            self.seconds: list[float] = []
            self.starts: list[float] = []

        def on_train_epoch_start(self, trainer, module):
            self.starts.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, module):
            self.seconds.append(time.perf_counter() - self.starts[-1])

    return EpochTimer()


def neg_elbo_cellvae(model, adata) -> float:
    """Held-out negative ELBO per cell: full NB log-likelihood (with log x!) plus KL, one draw per cell."""
    import torch

    from cellvae.train import evaluate

    loader, cells = model._loader(adata, torch.device("cpu"))
    torch.manual_seed(0)
    out = evaluate(model.module, loader, cells, 1024)
    return out["distortion"] + out["rate"]


# ----------------------------------------------------------------------------- throughput


def cellvae_throughput(adata, batch_key, epochs: int, precision: str = "float32", batch_size: int = 128, device: str = "cpu"):
    """The fitted model and its training cells/s over whole epochs (first dropped), without validation."""
    import cellvae

    model = cellvae.CellVAE(adata, batch_key=batch_key, **ARCH)
    fit = {"validation_size": 0.0, "early_stopping": False, "progress": False, "device": device}
    model.fit(max_epochs=epochs, batch_size=batch_size, precision=precision, **fit)
    return model, adata.n_obs * (epochs - 1) / model.history["seconds"].iloc[1:].sum()


def scvi_throughput(adata, batch_key, epochs: int, batch_size: int = 128, accelerator: str = "cpu") -> tuple[float, float]:
    """scVI's training cells/s inside its epoch hooks (first epoch dropped), and from the second epoch's
    start to the return of ``train()`` (what the hooks leave out)."""
    timer = epoch_timer()
    model, _ = scvi_model(adata, batch_key, **ARCH, gene_likelihood="nb")
    model.train(
        max_epochs=epochs,
        batch_size=batch_size,
        train_size=1.0,
        early_stopping=False,
        callbacks=[timer],
        enable_progress_bar=False,
        check_val_every_n_epoch=None,
        accelerator=accelerator,
    )
    returned = time.perf_counter()
    cells = adata.n_obs * (epochs - 1)
    return cells / sum(timer.seconds[1:]), cells / (returned - timer.starts[1])


def part_throughput(args) -> None:
    """Training cells/s over whole epochs (first epoch dropped), batch 128, same architecture."""
    import scvi  # imported before any timing, as it sets torch up on import

    results = {}
    for name, adata, batch_key in (
        ("pbmc68k_765_genes", pbmc68k(), None),
        ("kang_2511_genes", read("kang_ctrl_5donors_muscat.h5ad"), "batch"),
        # stored with each cell's gene indices unsorted, as files assembled by other tools often are
        ("pbmc_atlas_2431_genes", read("pbmc_atlas_17k.h5ad"), "batch"),
    ):
        epochs = args.epochs if adata.n_obs > 5000 else args.epochs * 8
        # The default, the option (bfloat16 gene-wide matmuls) and scVI, timed in a mirrored order (ABCCBA): this
        # machine's speed drifts within a run, and a fixed order would hand the drift to whichever runs last.
        runs = {"float32": [], "bfloat16": [], "scvi": [], "scvi_until_train_returns": []}
        for program in ("float32", "bfloat16", "scvi", "scvi", "bfloat16", "float32"):
            if program == "scvi":
                inside_hooks, whole_run = scvi_throughput(adata, batch_key, epochs)
                runs["scvi"].append(inside_hooks)
                runs["scvi_until_train_returns"].append(whole_run)
            else:
                runs[program].append(cellvae_throughput(adata, batch_key, epochs, program)[1])
        ours = {precision: float(np.mean(runs[precision])) for precision in ("float32", "bfloat16")}
        theirs = float(np.mean(runs["scvi"]))
        results[name] = {
            "cells": adata.n_obs,
            "genes": adata.n_vars,
            "epochs": epochs,
            "batch_size": 128,
            "order": "float32, bfloat16, scVI, scVI, bfloat16, float32; cells/s are the means of each program's two runs",
            "cellvae_cells_per_s": round(ours["float32"]),
            "scvi_cells_per_s": round(theirs),
            "scvi_cells_per_s_until_train_returns": round(float(np.mean(runs["scvi_until_train_returns"]))),
            "ratio": round(ours["float32"] / theirs, 2),
            "cellvae_bfloat16_cells_per_s": round(ours["bfloat16"]),
            "ratio_bfloat16": round(ours["bfloat16"] / theirs, 2),
            "runs_cells_per_s": {program: [round(value) for value in values] for program, values in runs.items()},
        }
        print(name, results[name], flush=True)
    del scvi
    merge("throughput", results, args.out)


# ----------------------------------------------------------------------------- time to quality


SCVI_TTQ_BATCH_SIZE = 128  # scVI's default, passed explicitly so that the recorded settings say what ran


def scvi_ttq_settings(max_epochs: int, train_cells: int) -> dict:
    """What makes one ttq-scvi run: a checkpoint or a resumed time is reused only under the same settings."""
    return {
        "data": "kang_ctrl_5donors_muscat",
        "train_cells": train_cells,
        "seed": 0,
        "max_epochs": max_epochs,
        "batch_size": SCVI_TTQ_BATCH_SIZE,
        "scvi_tools": package_version("scvi-tools"),
    }


def scvi_ttq_state(work: Path) -> dict:
    state_file = work / "state.json"
    return json.loads(state_file.read_text()) if state_file.is_file() else {}


def part_ttq_scvi(args) -> None:
    """scVI's default run on 90% of the Kang cells, checkpointed so it can run in several commands."""
    import torch

    work = args.work_dir / "scvi_ttq"
    work.mkdir(parents=True, exist_ok=True)
    state_file, ckpt = work / "state.json", work / "last.ckpt"
    adata = read("kang_ctrl_5donors_muscat.h5ad")
    train_cells, test_cells = holdout_split(adata.n_obs)
    model, train_adata = scvi_model(adata[train_cells], "batch")
    default_epochs = int(min(round((20_000 / train_adata.n_obs) * 400), 400))  # scVI's own default for this size
    max_epochs = args.scvi_max_epochs or default_epochs
    settings = scvi_ttq_settings(max_epochs, train_adata.n_obs)
    state = scvi_ttq_state(work)
    if state.get("settings") != settings:
        if state:
            print(f"note: {work} holds a run with other settings ({state.get('settings', 'not recorded')}): starting afresh")
        ckpt.unlink(missing_ok=True)
        state = {"settings": settings, "seconds": 0.0, "epochs_done": 0}
    from lightning.pytorch.callbacks import Callback

    budget = args.chunk_seconds

    class Budget(Callback):
        def __init__(self):
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module):
            trainer.save_checkpoint(str(ckpt))
            state["epochs_done"] = trainer.current_epoch + 1
            if time.perf_counter() - self.start > budget:
                trainer.should_stop = True

    started = time.perf_counter()
    if state["epochs_done"] < max_epochs:
        model.train(
            max_epochs=max_epochs,
            batch_size=SCVI_TTQ_BATCH_SIZE,
            callbacks=[Budget()],
            enable_progress_bar=False,
            accelerator="cpu",
            ckpt_path=str(ckpt) if ckpt.is_file() else None,
        )
        state["seconds"] += time.perf_counter() - started
        state_file.write_text(json.dumps(state))
    if state["epochs_done"] < max_epochs:
        print(f"scVI trained {state['epochs_done']}/{max_epochs} epochs in {state['seconds']:.0f} s; run again to continue")
        return
    if ckpt.is_file():  # the weights of the last epoch, from the checkpoint
        weights = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model.module.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
        model.is_trained_ = True
    model.module.eval()  # as scVI's trainer leaves it; a module built afresh is in training mode (dropout on)
    test = adata[test_cells].copy()
    import scvi

    scvi.model.SCVI.setup_anndata(test, batch_key="batch")
    elbo = -float(model.get_elbo(test))
    merge(
        "time_to_quality_scvi",
        {
            "data": "kang_ctrl_5donors_muscat (90% train, 10% held out, seed 0)",
            "epochs": max_epochs,
            "train_seconds": round(state["seconds"], 1),
            "heldout_neg_elbo_per_cell": round(elbo, 2),
            "default_epochs": max_epochs == default_epochs,
            "scvi_default_epochs": default_epochs,
            "run_settings": settings,
        },
        args.out,
    )
    print("done")


def part_ttq_cellvae(args) -> None:
    """cellvae's default fit on the same 90%, its held-out negative ELBO, and integration scores."""
    import cellvae

    adata = read("kang_ctrl_5donors_muscat.h5ad")
    train_cells, test_cells = holdout_split(adata.n_obs)
    train_adata, test_adata = adata[train_cells].copy(), adata[test_cells].copy()
    runs = []
    for seed in args.seeds:
        started = time.perf_counter()
        model = cellvae.CellVAE(train_adata, batch_key="batch").fit(random_state=seed, progress=False)
        seconds = time.perf_counter() - started
        elbo = neg_elbo_cellvae(model, test_adata)
        runs.append(
            {
                "seed": seed,
                "fit_seconds": round(seconds, 1),
                "epochs": len(model.history),
                "heldout_neg_elbo_per_cell": round(elbo, 2),
                **integration_scores(model.get_latent(train_adata), train_adata),
            }
        )
        print(runs[-1], flush=True)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    summary = {"runs": runs, "settings": "CellVAE(adata, batch_key='batch').fit() with the shipped defaults"}
    scvi_run = results.get("time_to_quality_scvi")
    if scvi_run and scvi_run.get("default_epochs"):
        summary["scvi_comparison"] = f"time_to_quality_scvi, scVI's default {scvi_run['epochs']} epochs"
        summary["speedup_vs_scvi"] = round(scvi_run["train_seconds"] / np.mean([r["fit_seconds"] for r in runs]), 1)
        summary["reaches_scvi_elbo"] = all(r["heldout_neg_elbo_per_cell"] <= scvi_run["heldout_neg_elbo_per_cell"] for r in runs)
    else:
        reason = f"scVI ran {scvi_run['epochs']} epochs, not its default" if scvi_run else "no time_to_quality_scvi entry"
        summary |= {"scvi_comparison": f"missing: {reason}", "speedup_vs_scvi": None, "reaches_scvi_elbo": None}
        print(f"no comparison with scVI ({reason}): run ttq-scvi without --scvi-max-epochs to the end first")
    merge("time_to_quality_cellvae", summary, args.out)


def integration_scores(latent: np.ndarray, adata) -> dict:
    """15-NN cell-type accuracy (5-fold) and batch mixing (neighbour batch entropy / its maximum)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

    labels = adata.obs["cell_type"].astype(str).to_numpy()
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    accuracy = cross_val_score(KNeighborsClassifier(15), latent, labels, cv=folds).mean()
    batches = adata.obs["batch"].astype("category").cat.codes.to_numpy()
    _, neighbours = NearestNeighbors(n_neighbors=16).fit(latent).kneighbors(latent)
    counts = np.stack([(batches[neighbours[:, 1:]] == b).sum(1) for b in np.unique(batches)], axis=1) / 15.0
    entropy = -(counts * np.log(np.where(counts > 0, counts, 1.0))).sum(1).mean() / np.log(len(np.unique(batches)))
    return {"celltype_knn_accuracy": round(float(accuracy), 4), "batch_mixing_entropy": round(float(entropy), 4)}


def part_ttq_scvi_scores(args) -> None:
    """Integration scores of scVI's default run (from its checkpoint), beside cellvae's."""
    import torch

    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entry = results.get("time_to_quality_scvi", {})
    work = args.work_dir / "scvi_ttq"
    state = scvi_ttq_state(work)
    finished = (state.get("settings"), state.get("epochs_done"))
    if "run_settings" not in entry or finished != (entry["run_settings"], entry["epochs"]) or not (work / "last.ckpt").is_file():
        sys.exit(
            f"the checkpoint in {work} (settings {state.get('settings')}, {state.get('epochs_done')} epochs) is not the run "
            f"of time_to_quality_scvi in {args.out} ({entry.get('run_settings')}, {entry.get('epochs')} epochs): "
            "run ttq-scvi to the end first"
        )
    adata = read("kang_ctrl_5donors_muscat.h5ad")
    train_cells, _ = holdout_split(adata.n_obs)
    model, train_adata = scvi_model(adata[train_cells], "batch")
    weights = torch.load(work / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    model.module.load_state_dict({k.removeprefix("module."): v for k, v in weights.items()})
    model.is_trained_ = True
    # A module built afresh is in training mode: its dropout would add noise to every code (session 35: the
    # donor-mixing entropy came out 0.015-0.02 higher so). scVI's trainer and load() leave it in eval mode.
    model.module.eval()
    entry |= integration_scores(model.get_latent_representation(), train_adata)
    merge("time_to_quality_scvi", entry, args.out, stamp=False)  # (the scores of the training run: its provenance)


# ----------------------------------------------------------------------------- inference


def part_latent(args) -> None:
    """get_latent cells/s at 2,000 genes (simulated), cellvae vs scVI's get_latent_representation."""
    import cellvae

    adata = cellvae.datasets.simulate(n_cells=args.latent_cells, n_genes=2000, n_batches=2, random_state=0)
    small = adata[:5000].copy()
    model = cellvae.CellVAE(small, batch_key="batch", **ARCH).fit(max_epochs=2, progress=False)
    model.get_latent(small)
    smodel, sadata = scvi_model(adata, "batch", **ARCH)
    smodel.train(max_epochs=1, train_size=1.0, enable_progress_bar=False, accelerator="cpu", check_val_every_n_epoch=None)
    ours, theirs = [], []
    for _ in range(args.repeats):  # interleaved: this machine's speed drifts between runs
        started = time.perf_counter()
        model.get_latent(adata)
        ours.append(adata.n_obs / (time.perf_counter() - started))
        started = time.perf_counter()
        smodel.get_latent_representation(sadata)
        theirs.append(adata.n_obs / (time.perf_counter() - started))
    merge(
        "get_latent",
        {
            "cells": adata.n_obs,
            "genes": 2000,
            "cellvae_cells_per_s": round(float(np.median(ours))),
            "scvi_cells_per_s": round(float(np.median(theirs))),
            "ratio": round(float(np.median(ours) / np.median(theirs)), 2),
            "batch_sizes": "cellvae 4,096 (get_latent's default), scVI 128 (its default, scvi.settings.batch_size)",
            "repeats": {"cellvae": [round(x) for x in ours], "scvi": [round(x) for x in theirs]},
        },
        args.out,
    )


# ----------------------------------------------------------------------------- memory


def rss_bytes() -> tuple[int, int]:
    """Current and peak resident set size of this process (Linux)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def child_fit(spec: dict) -> dict:
    """Run in a fresh process: open the data, reset the peak RSS, fit, report times and memory."""
    import anndata as ad
    import scipy.sparse as sp

    import cellvae

    setup_threads(spec.get("threads", THREADS))
    if spec["path"] == "kang":
        adata = read("kang_ctrl_5donors_muscat.h5ad")
    elif spec["path"].startswith("shared:"):
        adata = read(spec["path"].removeprefix("shared:"))
    elif spec["path"].endswith(".zarr"):
        adata = cellvae.read_zarr_lazy(spec["path"]) if spec["backed"] else ad.read_zarr(spec["path"])
    else:
        adata = ad.read_h5ad(spec["path"], backed="r" if spec["backed"] else None)
    if spec.get("view"):  # every other gene, cell, or both; in memory, a copy of those unless keep_view
        cells, genes = np.arange(0, adata.n_obs, 2), np.arange(0, adata.n_vars, 2)  # (scipy cannot step-slice all CSR)
        view = {"genes_half": adata[:, genes], "cells_half": adata[cells], "both_half": adata[cells, genes]}[spec["view"]]
        adata = view if spec["backed"] or spec.get("keep_view") else view.copy()
    matrix_bytes = None
    if not spec["backed"] and sp.issparse(adata.X):  # (a backed view's X would be read into memory here)
        matrix_bytes = int(adata.X.data.nbytes + adata.X.indices.nbytes + adata.X.indptr.nbytes)
    import gc

    if spec.get("warm_runtime"):  # start torch's runtime (threads, kernels, allocator) on a tiny fit first
        small = cellvae.datasets.simulate(n_cells=300, n_genes=adata.n_vars, random_state=0)
        cellvae.CellVAE(small, batch_key="batch", **ARCH).fit(max_epochs=1, validation_size=0.1, progress=False)
        del small
    gc.collect()
    before, _ = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    model = cellvae.CellVAE(adata, batch_key="batch", **ARCH)
    # default_fit: fit's own validation split and early stopping (the validation passes add their own peak)
    held_out = {} if spec.get("default_fit") else {"validation_size": 0.0, "early_stopping": False}
    model.fit(max_epochs=spec["epochs"], progress=False, batch_size=spec.get("batch_size", 128), **held_out)
    total = time.perf_counter() - started
    _, peak = rss_bytes()
    epoch = float(model.history["seconds"].iloc[-1])
    return {
        "cells": adata.n_obs,
        "genes": adata.n_vars,
        "backed": spec["backed"],
        "epochs_seconds": [round(float(x), 2) for x in model.history["seconds"]],
        "epoch_seconds": round(epoch, 2),
        "cells_per_s": round(adata.n_obs / epoch),
        "fit_seconds_incl_setup": round(total, 1),
        # building the model, checking the counts and reading library sizes, plus the end-of-fit collapse check
        "seconds_outside_epochs": round(total - float(model.history["seconds"].sum()), 2),
        "rss_before_mb": round(before / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "added_peak_mb": round((peak - before) / 2**20),
        "matrix_mb": None if matrix_bytes is None else round(matrix_bytes / 2**20, 1),
    }


def run_child(spec: dict) -> dict:
    # this checkout's cellvae, not the one pip installed (an editable install of another clone would be measured)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, __file__, "child", json.dumps(spec)], capture_output=True, text=True, check=False, cwd=REPO, env=env
    )
    if out.returncode:
        raise RuntimeError(f"child run {spec} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


PBMC3K = {"path": "shared:pbmc3k.h5ad", "backed": False, "epochs": 2}  # all 16,579 genes: wide minibatches


def part_memory(args) -> None:
    """Peak memory added by training on in-memory sparse data, as a multiple of the matrix size.

    The ``_warm_runtime`` runs fit a 300-cell model before the baseline, so that torch's fixed
    runtime memory is not counted: what remains grows with the data. The ``_default_fit`` runs keep fit's
    10% validation split and early stopping (its validation passes add their own peak); the others leave
    them out."""
    runs = {}
    path = simulated_file(args.work_dir, 100_000)
    kang_warm = {"path": "kang", "backed": False, "epochs": 2, "warm_runtime": True}
    simulated_warm = {"path": str(path), "backed": False, "epochs": 1, "warm_runtime": True}
    for name, spec in (
        ("kang_in_memory", {"path": "kang", "backed": False, "epochs": 2}),
        ("simulated_100k_in_memory", {"path": str(path), "backed": False, "epochs": 1}),
        ("kang_in_memory_warm_runtime", kang_warm),
        ("simulated_100k_in_memory_warm_runtime", simulated_warm),
        ("pbmc3k_16579_genes_in_memory_warm_runtime", {**PBMC3K, "warm_runtime": True}),
        ("kang_in_memory_warm_runtime_default_fit", {**kang_warm, "default_fit": True}),
        ("simulated_100k_in_memory_warm_runtime_default_fit", {**simulated_warm, "default_fit": True}),
    ):
        result = run_child(spec)
        result["added_over_matrix"] = round(result["added_peak_mb"] / result["matrix_mb"], 3)
        runs[name] = result
        print(name, result, flush=True)
    merge("memory", runs, args.out)


# ----------------------------------------------------------------------------- out-of-core scaling


def simulated_file(work_dir: Path, n_cells: int, n_genes: int = 2000, chunk: int = 20_000) -> Path:
    """A CSR .h5ad of simulated NB counts (5 cell types, 2 batches), written once chunk by chunk."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    path = work_dir / f"simulated_{n_cells}x{n_genes}.h5ad"
    if path.is_file():
        return path
    work_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.3, n_genes)
    programmes = np.zeros((5, n_genes))
    for t in range(5):
        programmes[t, rng.choice(n_genes, 40, replace=False)] = rng.uniform(1.0, 3.0, 40)
    batch_shift = rng.normal(0.0, 0.4, (2, n_genes))
    theta = rng.gamma(2.0, 2.0, n_genes) + 0.5
    cell_type = rng.integers(0, 5, n_cells)
    batch = rng.integers(0, 2, n_cells)
    partial = path.with_suffix(".partial")
    obs = pd.DataFrame(
        {"batch": pd.Categorical([f"b{b}" for b in batch]), "cell_type": pd.Categorical([f"t{t}" for t in cell_type])},
        index=[f"c{i}" for i in range(n_cells)],
    )
    shell = ad.AnnData(obs=obs, var=pd.DataFrame(index=[f"g{g}" for g in range(n_genes)]))
    shell.write_h5ad(partial)
    with h5py.File(partial, "a") as f:
        if "X" in f:
            del f["X"]
        group = f.create_group("X")
        group.attrs.update({"encoding-type": "csr_matrix", "encoding-version": "0.1.0", "shape": (n_cells, n_genes)})
        data = group.create_dataset("data", (0,), maxshape=(None,), dtype="float32", chunks=(1 << 18,))
        indices = group.create_dataset("indices", (0,), maxshape=(None,), dtype="int32", chunks=(1 << 18,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for start in range(0, n_cells, chunk):
            stop = min(start + chunk, n_cells)
            log_rate = base + programmes[cell_type[start:stop]] + batch_shift[batch[start:stop]]
            proportions = np.exp(log_rate - log_rate.max(1, keepdims=True))
            proportions /= proportions.sum(1, keepdims=True)
            library = rng.lognormal(np.log(1000.0), 0.4, stop - start)[:, None]
            mean = proportions * library
            block = sp.csr_matrix(rng.poisson(rng.gamma(theta, mean / theta)).astype(np.float32))
            n = data.shape[0]
            data.resize((n + block.nnz,))
            indices.resize((n + block.nnz,))
            data[n:] = block.data
            indices[n:] = block.indices
            indptr.append(block.indptr[1:].astype(np.int64) + n)
        group.create_dataset("indptr", data=np.concatenate(indptr))
    partial.rename(path)
    return path


def part_scaling(args) -> None:
    """Backed .h5ad training: epoch time and peak RSS at each size, plus in-memory at the smaller sizes."""
    results = json.loads(args.out.read_text()).get("scaling", {}) if args.out.is_file() else {}
    for n in args.sizes:
        path = simulated_file(args.work_dir, n)
        runs = {"backed": run_child({"path": str(path), "backed": True, "epochs": 1})}
        if n <= 100_000:
            runs["in_memory"] = run_child({"path": str(path), "backed": False, "epochs": 1})
            runs["backed_over_in_memory_time"] = round(runs["backed"]["epoch_seconds"] / runs["in_memory"]["epoch_seconds"], 2)
        results[str(n)] = runs
        print(n, runs, flush=True)
    merge("scaling", results, args.out)


def layout_file(work_dir: Path, n_cells: int, layout: str, store: str = "h5ad") -> Path:
    """The simulated counts of :func:`simulated_file` with X stored as ``csr``, ``csc`` or ``dense``,
    in an ``h5ad`` file or a ``zarr`` store (anndata's defaults), or as ``dense_row_chunks``: a
    dense Zarr ``X`` chunked by whole rows (``write_zarr(chunks=(256, n_genes))``)."""
    import anndata as ad
    import scipy.sparse as sp

    if layout == "dense_row_chunks":
        out = simulated_file(work_dir, n_cells).with_name(f"simulated_{n_cells}x2000_dense_row_chunks.zarr")
        if not out.exists():
            adata = ad.read_h5ad(layout_file(work_dir, n_cells, "dense"))
            adata.write_zarr(out.with_suffix(".partial"), chunks=(256, adata.n_vars))
            out.with_suffix(".partial").rename(out)
        return out
    path = simulated_file(work_dir, n_cells)
    if layout != "csr":
        out = path.with_name(f"{path.stem}_{layout}.h5ad")
        if not out.is_file():
            adata = ad.read_h5ad(path)
            adata.X = sp.csc_matrix(adata.X) if layout == "csc" else adata.X.toarray()
            adata.write_h5ad(out.with_suffix(".partial"))
            out.with_suffix(".partial").rename(out)
        path = out
    if store == "h5ad":
        return path
    out = path.with_name(f"{path.stem}_{layout}.zarr" if layout == "csr" else f"{path.stem}.zarr")
    if not out.exists():
        ad.read_h5ad(path).write_zarr(out.with_suffix(".partial"))
        out.with_suffix(".partial").rename(out)
    return out


def part_layouts(args) -> None:
    """Backed training from each on-disk layout of X (CSR, CSC, dense; .h5ad and Zarr) against in-memory
    CSR, one size. ``fit_seconds_incl_setup`` adds the model's checks and library sizes, which read the whole file."""
    results = json.loads(args.out.read_text()).get("layouts", {}) if args.out.is_file() else {}
    n = args.sizes[0]
    runs = {"in_memory": run_child({"path": str(layout_file(args.work_dir, n, "csr")), "backed": False, "epochs": 1})}
    for store in ("h5ad", "zarr"):
        for layout in ("csr", "csc", "dense") + (("dense_row_chunks",) if store == "zarr" else ()):
            if args.layouts and f"{store}_{layout}" not in args.layouts:
                continue
            run = run_child({"path": str(layout_file(args.work_dir, n, layout, store)), "backed": True, "epochs": 1})
            run["in_memory_epoch_seconds"] = runs["in_memory"]["epoch_seconds"]  # measured in this command
            run["over_in_memory_time"] = round(run["epoch_seconds"] / runs["in_memory"]["epoch_seconds"], 2)
            runs["backed_" + layout if store == "h5ad" else f"zarr_{layout}"] = run
            print(store, layout, run, flush=True)
    results[str(n)] = {**results.get(str(n), {}), **runs}
    merge("layouts", results, args.out)


def part_views(args) -> None:
    """Training on a view of a backed .h5ad (every other gene, or every other cell) against the same cells
    and genes in memory: cellvae streams the view's rows and columns from the file (anndata would load the view)."""
    results = json.loads(args.out.read_text()).get("views", {}) if args.out.is_file() else {}
    n = args.sizes[0]
    path = str(simulated_file(args.work_dir, n))
    runs = {}
    for view in ("genes_half", "cells_half"):
        backed = run_child({"path": path, "backed": True, "epochs": 1, "view": view})
        in_memory = run_child({"path": path, "backed": False, "epochs": 1, "view": view})
        backed["in_memory_epoch_seconds"] = in_memory["epoch_seconds"]
        backed["over_in_memory_time"] = round(backed["epoch_seconds"] / in_memory["epoch_seconds"], 2)
        runs[view] = {"backed_view": backed, "in_memory": in_memory}
        print(view, runs[view], flush=True)
    # A view of in-memory counts, every other cell and gene, against its copy: cellvae copies the view's genes
    # a block of cells at a time, where anndata's copy of it takes the cells' other genes on the way.
    kept = run_child({"path": path, "backed": False, "epochs": 1, "view": "both_half", "keep_view": True})
    copied = run_child({"path": path, "backed": False, "epochs": 1, "view": "both_half"})
    runs["both_half_in_memory"] = {"view": kept, "copy": copied}
    print("both_half in memory", runs["both_half_in_memory"], flush=True)
    results[str(n)] = runs
    merge("views", results, args.out)


def child_map(spec: dict) -> dict:
    """Run in a fresh process: open the query (backed or in memory), reset the peak RSS, map it onto the saved
    reference for ``epochs`` epochs, embed it; report times and memory."""
    import anndata as ad

    import cellvae

    setup_threads()
    reference = cellvae.CellVAE.load(spec["reference"])
    query = ad.read_h5ad(spec["path"], backed="r" if spec["backed"] else None)
    before, _ = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    query_model = reference.map_query(query, max_epochs=spec["epochs"], validation_size=0.0, progress=False)
    mapped = time.perf_counter()
    latent = query_model.get_latent()
    embedded = time.perf_counter()
    _, peak = rss_bytes()
    return {
        "cells": query.n_obs,
        "backed": spec["backed"],
        "map_query_seconds": round(mapped - started, 2),
        "epoch_seconds": round(float(query_model.history["seconds"].iloc[-1]), 2),
        "get_latent_seconds": round(embedded - mapped, 2),
        "latent_shape": list(latent.shape),
        "rss_before_mb": round(before / 2**20),
        "peak_rss_mb": round(peak / 2**20),
        "added_peak_mb": round((peak - before) / 2**20),
    }


def part_query(args) -> None:
    """map_query of a query on disk (backed .h5ad, streamed) against the same query in memory: the simulated
    file with its batches renamed is the query of a reference trained on 20,000 of its cells."""
    import anndata as ad

    import cellvae

    n = args.sizes[0]
    path = simulated_file(args.work_dir, n)
    query_path = path.with_name(f"{path.stem}_query.h5ad")
    if not query_path.is_file():
        query = ad.read_h5ad(path)
        query.obs["batch"] = ("query_" + query.obs["batch"].astype(str)).astype("category")
        query.write_h5ad(query_path.with_suffix(".partial"))
        query_path.with_suffix(".partial").rename(query_path)
    reference_dir = args.work_dir / "reference_model"
    reference = ad.read_h5ad(path)[:20_000].copy()
    cellvae.CellVAE(reference, batch_key="batch", **ARCH).fit(max_epochs=5, progress=False).save(reference_dir, overwrite=True)
    runs = {}
    for backed in (True, False):
        spec = {"kind": "map", "reference": str(reference_dir), "path": str(query_path), "backed": backed, "epochs": 1}
        runs["backed" if backed else "in_memory"] = run_child(spec)
        print(runs, flush=True)
    runs["backed_over_in_memory_time"] = round(runs["backed"]["map_query_seconds"] / runs["in_memory"]["map_query_seconds"], 2)
    results = json.loads(args.out.read_text()).get("query", {}) if args.out.is_file() else {}
    results[str(n)] = runs
    merge("query", results, args.out)


# ----------------------------------------------------------------------------- Zarr stores


def simulated_zarr(work_dir: Path, n_cells: int, chunk_values: int = 1 << 18) -> Path:
    """The same simulated counts as :func:`simulated_file`, as a Zarr (v3, zstd) store, copied once piecewise."""
    import anndata as ad
    import h5py
    import zarr

    source = simulated_file(work_dir, n_cells)
    path = source.with_suffix(".zarr")
    if path.is_dir():
        return path
    partial = path.with_suffix(".zarr-partial")
    shell = ad.read_h5ad(source, backed="r")
    with ad.settings.override(zarr_write_format=3):
        ad.AnnData(obs=shell.obs, var=shell.var).write_zarr(partial)
    shell.file.close()
    group = zarr.open_group(partial, mode="a")
    if "X" in group:
        del group["X"]
    with h5py.File(source, "r") as f:
        stored = f["X"]
        matrix = group.create_group("X")
        matrix.attrs.update({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in stored.attrs.items()})
        for name in ("data", "indices", "indptr"):
            values = stored[name]
            target = matrix.create_array(name, shape=values.shape, dtype=values.dtype, chunks=(min(chunk_values, len(values)),))
            step = 64 * chunk_values
            for start in range(0, len(values), step):
                target[start : start + step] = values[start : start + step]
    zarr.consolidate_metadata(partial)  # readers trust the consolidated metadata written before X existed
    partial.rename(path)
    return path


def part_zarr(args) -> None:
    """Training from a Zarr store read lazily (cellvae.read_zarr_lazy): epoch time and peak RSS per size,
    against in-memory training of the same counts at the sizes that fit comfortably."""
    results = json.loads(args.out.read_text()).get("zarr", {}) if args.out.is_file() else {}
    for n in args.sizes:
        started = time.perf_counter()
        path = simulated_zarr(args.work_dir, n)
        print(f"{path} ready after {time.perf_counter() - started:.0f} s", flush=True)
        runs = {"zarr": run_child({"path": str(path), "backed": True, "epochs": 1})}
        runs["store_mb"] = round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20)
        if n <= args.in_memory_max:
            runs["in_memory"] = run_child({"path": str(simulated_file(args.work_dir, n)), "backed": False, "epochs": 1})
            runs["zarr_over_in_memory_time"] = round(runs["zarr"]["epoch_seconds"] / runs["in_memory"]["epoch_seconds"], 2)
        results[str(n)] = runs
        print(n, runs, flush=True)
    merge("zarr", results, args.out)


# ----------------------------------------------------------------------------- data parallel


def part_ddp(args) -> None:
    """One process × 2 threads against `torchrun --nproc_per_node=2` × 1 thread (gloo), backed .h5ad."""
    import shutil

    if shutil.which("torchrun") is None:
        sys.exit("torchrun (from torch) is not on PATH")
    n = args.ddp_cells
    path = str(simulated_file(args.work_dir, n))
    runs = {"one_process_2_threads_batch_128": run_child({"path": path, "backed": True, "epochs": args.epochs})}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for per_rank in (64, 128):
        spec = {"path": path, "backed": True, "epochs": args.epochs, "threads": 1, "batch_size": per_rank}
        command = ["torchrun", "--standalone", "--nproc_per_node=2", __file__, "child", json.dumps(spec)]
        out = subprocess.run(command, capture_output=True, text=True, check=False, cwd=REPO, env=env)
        if out.returncode:
            raise RuntimeError(f"torchrun run {spec} failed:\n{out.stderr[-3000:]}")
        ranks = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
        runs[f"two_processes_1_thread_batch_{per_rank}_per_rank"] = {"ranks": ranks}
    for run in runs.values():
        epochs = [r["epochs_seconds"] for r in run.get("ranks", [run])]
        # all ranks wait for each other every step: an epoch lasts as long as the slowest rank's
        seconds = float(np.mean(np.max(np.array(epochs)[:, 1:], axis=0)))  # first epoch dropped (warm-up)
        run["epoch_seconds_after_first"] = round(seconds, 2)
        run["cells_per_s"] = round(n / seconds)
        run["peak_rss_mb_per_process"] = [r["peak_rss_mb"] for r in run.get("ranks", [run])]
        run["seconds_outside_epochs"] = max(r["seconds_outside_epochs"] for r in run.get("ranks", [run]))
    base = runs["one_process_2_threads_batch_128"]["cells_per_s"]
    for run in runs.values():
        run["speedup_vs_one_process"] = round(run["cells_per_s"] / base, 2)
    runs["setup"] = f"{n} simulated cells x 2000 genes, backed CSR .h5ad, {args.epochs} epochs, no validation, CPU, gloo"
    merge("ddp", runs, args.out)


# ----------------------------------------------------------------------------- loader choice


def child_read(spec: dict) -> dict:
    """Run in a fresh process: one shuffled pass over a store by one loader, densified to torch tensors,
    128 cells per batch. Reports cells per second, whether every cell came exactly once, and peak RSS."""
    import anndata as ad
    import scipy.sparse as sp
    import torch
    import zarr

    import cellvae
    from cellvae.data import CellLoader

    setup_threads(THREADS)
    if spec["zarrs"]:  # the Rust codec pipeline annbatch recommends for local stores
        zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    path, reader = spec["store"], spec["reader"]
    adata = ad.read_h5ad(path, backed="r") if path.endswith(".h5ad") else cellvae.read_zarr_lazy(path)
    n = adata.n_obs
    seen = []
    started = time.perf_counter()
    if reader == "cellvae":
        loader = CellLoader(adata.X, np.zeros((n, 0), np.float32), np.ones(n), np.zeros(n, np.int64))
        for minibatch in loader.batches(np.arange(n), 128, shuffle=True, rng=np.random.default_rng(0)):
            seen.append(minibatch.cell_index)
    elif reader == "scdataset":
        from scdataset import BlockShuffling, scDataset

        class Rows:  # scdataset needs len(); h5py needs increasing indices
            def __len__(self):
                return n

            def __getitem__(self, index):
                order = np.argsort(index, kind="stable")
                return adata.X[np.asarray(index)[order]][np.argsort(order)]

        def densify(block):
            return torch.from_numpy(block.toarray() if sp.issparse(block) else np.asarray(block))

        shuffling = BlockShuffling(block_size=256)
        dataset = scDataset(Rows(), shuffling, batch_size=128, fetch_factor=16, batch_transform=densify, seed=0)
        seen = None  # it yields no cell indices: its cells are only counted
        cells_seen = sum(len(counts) for counts in dataset)
    else:
        from annbatch import Loader

        rng = np.random.default_rng(0)
        loader = Loader(batch_size=128, shuffle=True, to="torch", preload_to_gpu=False, return_index=True, rng=rng)
        try:
            loader.add_dataset(adata.X)
        except TypeError as error:  # annbatch reads Zarr and in-memory matrices only
            return {"unsupported": str(error).splitlines()[0]}
        for batch in loader:
            batch["X"].to_dense()
            seen.append(np.asarray(batch["index"]))
    seconds = time.perf_counter() - started
    if seen is not None:
        seen = np.concatenate(seen)
        cells_seen = len(seen)
    return {
        "cells_per_s": round(n / seconds),
        "cells_seen": int(cells_seen),
        # (None where the loader gives no cell indices)
        "every_cell_once": None if seen is None else bool(cells_seen == n and np.array_equal(np.sort(seen), np.arange(n))),
        "peak_rss_mb": round(rss_bytes()[1] / 2**20),
    }


def child_collection(spec: dict) -> dict:
    """Run in a fresh process: annbatch's one-off conversion of a .h5ad into its shuffled, sharded Zarr collection."""
    import zarr
    from annbatch import DatasetCollection

    zarr.config.set({"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"})
    started = time.perf_counter()
    DatasetCollection(spec["collection"]).add_adatas([spec["source"]], rng=np.random.default_rng(0))
    return {"seconds": round(time.perf_counter() - started, 1), "peak_rss_mb": round(rss_bytes()[1] / 2**20)}


def part_loader(args) -> None:
    """One shuffled pass over 100k × 2,000 simulated counts by our CellLoader, scdataset and annbatch, each
    on the stores it reads: the backed CSR .h5ad, its Zarr copy (:func:`simulated_zarr`) and annbatch's
    own shuffled collection made from the .h5ad. Loaders that are not installed are skipped (annbatch
    needs Python >= 3.12; with it, `pip install "annbatch[zarrs]" scdataset`)."""
    import importlib.util
    import shutil

    have = {name: importlib.util.find_spec(name) is not None for name in ("scdataset", "annbatch", "zarrs")}
    h5ad = str(simulated_file(args.work_dir, 100_000))
    stores = {"h5ad": h5ad, "zarr": str(simulated_zarr(args.work_dir, 100_000))}
    runs: dict = {"installed": have}
    if have["annbatch"]:
        collection = args.work_dir / "annbatch_collection_100000.zarr"
        shutil.rmtree(collection, ignore_errors=True)
        runs["annbatch_collection"] = run_child({"kind": "collection", "source": h5ad, "collection": str(collection)})
        stores["annbatch_collection"] = str(collection / "dataset_0")
        store_bytes = sum(f.stat().st_size for f in collection.rglob("*") if f.is_file())
        runs["annbatch_collection"]["store_mb"] = round(store_bytes / 2**20)
    specs = {}
    for store, path in stores.items():
        for reader in ("cellvae", "scdataset", "annbatch"):
            if reader != "cellvae" and not have[reader] or reader == "scdataset" and store != "h5ad":
                continue
            for zarrs in (False, True) if store != "h5ad" and have["zarrs"] else (False,):
                specs[f"{reader}_on_{store}" + ("_zarrs" if zarrs else "")] = {
                    "kind": "read",
                    "reader": reader,
                    "store": path,
                    "zarrs": zarrs,
                }
    passes: dict = {name: [] for name in specs}
    for _ in range(args.repeats):  # interleaved rounds: the shared machine's speed drifts
        for name, spec in specs.items():
            passes[name].append(run_child(spec))
            print(name, passes[name][-1], flush=True)
    for name, results in passes.items():
        runs[name] = (
            results[0]
            if "unsupported" in results[0]
            else {
                "cells_per_s_median": round(float(np.median([r["cells_per_s"] for r in results]))),
                "cells_per_s": [r["cells_per_s"] for r in results],
                "cells_seen": sorted({r["cells_seen"] for r in results}),
                "every_cell_once": None if results[0]["every_cell_once"] is None else all(r["every_cell_once"] for r in results),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            }
        )
    runs["note"] = (
        "one shuffled epoch of 100,000 x 2,000 simulated counts, densified to torch, 128 cells per batch, 2 threads; "
        f"{args.repeats} interleaved passes each, in fresh processes"
    )
    merge("loader", runs, args.out)  # (annbatch needs Python >= 3.12, the other parts run on 3.11: see its provenance)


# ----------------------------------------------------------------------------- roofline


def part_roofline(args) -> None:
    """FLOPs of one training step (batch 128, 2,511 genes) against the measured matmul rate."""
    import torch

    import cellvae
    from cellvae.train import make_optimizer

    setup_threads()
    adata = read("kang_ctrl_5donors_muscat.h5ad")
    model = cellvae.CellVAE(adata, batch_key="batch", **ARCH)
    loader, cells = model._loader(adata, torch.device("cpu"))
    batches = list(loader.batches(cells, 128, shuffle=True, rng=np.random.default_rng(0), with_sparse=True))
    vae = model.module.train()
    optimizer = make_optimizer(vae, 1e-3, 1e-6, torch.device("cpu"))

    def step(mb):
        out = vae(mb.counts, mb.covariates, mb.library, mb.batch_index, sparse=mb.sparse)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()

    for mb in batches[:5]:
        step(mb)
    started = time.perf_counter()
    for mb in batches:
        step(mb)
    step_seconds = (time.perf_counter() - started) / len(batches)
    b, g, h, z, c = 128, adata.n_vars, ARCH["n_hidden"], ARCH["n_latent"], model.config.n_covariates
    forward = 2 * b * ((g + c) * h + h * 2 * z + (z + c) * h + h * g)
    # Backward: weight gradients of every layer plus input gradients of all but the first layer.
    backward = 2 * b * ((g + c) * h + h * 2 * z + (z + c) * h + h * g) + 2 * b * (h * 2 * z + c * 0 + h * z + h * g)
    flops = forward + backward
    rates = {}
    for name, (m, k, n) in {"square_2048": (2048, 2048, 2048), "step_shape_128x2511x128": (b, g, h)}.items():
        x, y = torch.randn(m, k), torch.randn(k, n)
        x @ y
        reps = max(3, int(2e10 / (2 * m * k * n)))
        started = time.perf_counter()
        for _ in range(reps):
            x @ y
        rates[name] = 2 * m * k * n * reps / (time.perf_counter() - started)
    peak = max(rates.values())
    merge(
        "roofline",
        {
            "flops_per_step": flops,
            "step_ms": round(step_seconds * 1e3, 2),
            "achieved_gflops": round(flops / step_seconds / 1e9, 1),
            "matmul_gflops": {k: round(v / 1e9, 1) for k, v in rates.items()},
            "share_of_matmul_peak": round(flops / step_seconds / peak, 3),
        },
        args.out,
    )


# ----------------------------------------------------------------------------- table


def speedup_text(cellvae_run: dict) -> str:
    """The time-to-quality ratio cell, or why there is none (scVI not run with its default epochs)."""
    speedup = cellvae_run.get("speedup_vs_scvi")
    if not speedup:
        return f"no comparison ({cellvae_run.get('scvi_comparison', 'missing')})"
    return f"{speedup}× less time (target ≥ 10×)"


def part_table(args) -> None:
    r = json.loads(args.out.read_text())
    lines = ["| measure | cellvae | scVI | ratio / target |", "|---|---|---|---|"]
    for name, t in r.get("throughput", {}).items():
        lines.append(
            f"| training cells/s, {name} (batch 128, {THREADS} threads) | {t['cellvae_cells_per_s']:,} | "
            f"{t['scvi_cells_per_s']:,} | {t['ratio']}× (target ≥ 5×) |"
        )
        if "ratio_bfloat16" in t:
            lines.append(
                f'| same, `fit(precision="bfloat16")` (option) | {t["cellvae_bfloat16_cells_per_s"]:,} | '
                f"{t['scvi_cells_per_s']:,} | {t['ratio_bfloat16']}× |"
            )
    s, c = r.get("time_to_quality_scvi"), r.get("time_to_quality_cellvae")
    if s and c:
        secs = [x["fit_seconds"] for x in c["runs"]]
        elbos = [x["heldout_neg_elbo_per_cell"] for x in c["runs"]]
        lines.append(
            f"| time to quality, Kang 5 donors (s; held-out −ELBO nats/cell) | {np.mean(secs):.0f} s; "
            f"{min(elbos):.1f}–{max(elbos):.1f} | {s['train_seconds']:.0f} s ({s['epochs']} epochs); "
            f"{s['heldout_neg_elbo_per_cell']:.1f} | {speedup_text(c)} |"
        )
        if "celltype_knn_accuracy" in s:
            acc = [x["celltype_knn_accuracy"] for x in c["runs"]]
            mix = [x["batch_mixing_entropy"] for x in c["runs"]]
            lines.append(
                f"| integration: 15-NN cell-type accuracy; donor mixing entropy | {min(acc):.3f}; {min(mix):.3f} | "
                f"{s['celltype_knn_accuracy']:.3f}; {s['batch_mixing_entropy']:.3f} | higher is better |"
            )
    if "get_latent" in r:
        g = r["get_latent"]
        lines.append(
            f"| get_latent cells/s, {g['genes']} genes (cellvae batch 4,096, scVI its default 128) | "
            f"{g['cellvae_cells_per_s']:,} | {g['scvi_cells_per_s']:,} | "
            f"{g['ratio']}× (target ≥ 50,000 cells/s) |"
        )
    for name, m in r.get("memory", {}).items():
        lines.append(
            f"| peak memory added, {name} (matrix {m['matrix_mb']} MB) | {m['added_peak_mb']} MB = "
            f"{m['added_over_matrix']}× matrix | | target < 1.5× |"
        )
    for part, stored, label in (("scaling", "backed", "backed .h5ad"), ("zarr", "zarr", "Zarr store (read_zarr_lazy)")):
        short = label.split()[0]
        for n, runs in sorted(r.get(part, {}).items(), key=lambda kv: int(kv[0])):
            run = runs[stored]
            extra = ""
            if "in_memory" in runs:
                ratio = runs[f"{stored}_over_in_memory_time"]
                extra = f"; in memory {runs['in_memory']['epoch_seconds']} s ({short}/in-memory time {ratio})"
            row = f"| {label}, {int(n):,} × 2,000: epoch; peak RSS | {run['epoch_seconds']} s; {run['peak_rss_mb']:,} MB{extra} "
            lines.append(row + "| | RSS < 3 GB, ≤ 2× in-memory time |")
    for n, runs in r.get("layouts", {}).items():
        for key, store in (("backed", "backed .h5ad"), ("zarr", "Zarr store")):
            for layout in ("csr", "csc", "dense", "dense_row_chunks"):
                run = runs.get(f"{key}_{layout}")
                if run is None:
                    continue
                stored_as = {
                    "dense": "DENSE (anndata's chunks)" if key == "zarr" else "DENSE",
                    "dense_row_chunks": "DENSE in chunks of 256 whole rows",
                }
                stored_as = stored_as.get(layout, layout.upper())
                in_memory = run.get("in_memory_epoch_seconds", runs["in_memory"]["epoch_seconds"])
                lines.append(
                    f"| {store}, X stored {stored_as}, {int(n):,} × 2,000: epoch (fit incl. setup); peak RSS | "
                    f"{run['epoch_seconds']} s ({run['fit_seconds_incl_setup']} s); {run['peak_rss_mb']:,} MB; "
                    f"in memory {in_memory} s ({run['over_in_memory_time']}×) | | RSS < 3 GB, ≤ 2× in-memory time |"
                )
    for n, runs in r.get("views", {}).items():
        for view, pair in runs.items():
            if view == "both_half_in_memory":
                kept, copied = pair["view"], pair["copy"]
                lines.append(
                    f"| view of in-memory CSR ({int(n):,} × 2,000), every other cell and gene: fit incl. setup; peak RSS "
                    f"added | {kept['fit_seconds_incl_setup']} s; {kept['added_peak_mb']:,} MB ({kept['matrix_mb']} MB "
                    f"view); its .copy() {copied['fit_seconds_incl_setup']} s; {copied['added_peak_mb']:,} MB | | |"
                )
                continue
            run, what = pair["backed_view"], {"genes_half": "every other gene", "cells_half": "every other cell"}[view]
            lines.append(
                f"| view of a backed .h5ad ({int(n):,} × 2,000), {what}: epoch (fit incl. setup); peak RSS | "
                f"{run['epoch_seconds']} s ({run['fit_seconds_incl_setup']} s); {run['peak_rss_mb']:,} MB; the same "
                f"cells and genes in memory {run['in_memory_epoch_seconds']} s ({run['over_in_memory_time']}×) | | "
                "RSS < 3 GB, ≤ 2× in-memory time |"
            )
    for n, runs in r.get("query", {}).items():
        on_disk, in_memory = runs["backed"], runs["in_memory"]
        lines.append(
            f"| map_query of a backed .h5ad query ({int(n):,} × 2,000), one epoch: map_query (epoch); get_latent; peak RSS | "
            f"{on_disk['map_query_seconds']} s ({on_disk['epoch_seconds']} s); {on_disk['get_latent_seconds']} s; "
            f"{on_disk['peak_rss_mb']:,} MB; in memory {in_memory['map_query_seconds']} s ({in_memory['epoch_seconds']} s); "
            f"{in_memory['get_latent_seconds']} s; {in_memory['peak_rss_mb']:,} MB | | |"
        )
    for name, run in r.get("ddp", {}).items():
        if isinstance(run, dict):
            lines.append(
                f"| DDP, {run.get('ranks', [run])[0]['cells']:,} × 2,000 backed, CPU gloo: {name.replace('_', ' ')} | "
                f"{run['cells_per_s']:,} cells/s | | "
                f"{run['speedup_vs_one_process']}× one process (2 cores: no speed-up possible) |"
            )
    if "roofline" in r:
        f = r["roofline"]
        lines.append(
            f"| training step FLOPs vs matmul peak | {f['achieved_gflops']} GFLOP/s of "
            f"{max(f['matmul_gflops'].values())} = {100 * f['share_of_matmul_peak']:.0f}% | | |"
        )
    loader = r.get("loader", {})
    stores = {"zarr": "Zarr copy (zstd)", "annbatch_collection": "annbatch's shuffled collection"}
    for store, label in stores.items():
        for codecs in ("", "_zarrs"):
            ours, theirs = loader.get(f"cellvae_on_{store}{codecs}"), loader.get(f"annbatch_on_{store}{codecs}")
            if ours and theirs:
                mine, peer = ours["cells_per_s_median"], theirs["cells_per_s_median"]
                lines.append(
                    f"| shuffled read, 100,000 × 2,000, {label}{', zarrs codecs' if codecs else ''}: cells/s (median), "
                    f"cellvae's loader vs annbatch's | {mine:,} | annbatch {peer:,} | {mine / peer:.2f}× |"
                )
    if "cellvae_on_h5ad" in loader:
        rate = loader["cellvae_on_h5ad"]["cells_per_s_median"]
        lines.append(f"| shuffled read, 100,000 × 2,000, backed .h5ad: cells/s (median) | {rate:,} | annbatch cannot read it | |")
    table = "\n".join(lines) + "\n"
    args.out.with_suffix(".md").write_text(table)
    print(table)


# ----------------------------------------------------------------------------- main


PARTS = {
    "throughput": part_throughput,
    "ttq-scvi": part_ttq_scvi,
    "ttq-scvi-scores": part_ttq_scvi_scores,
    "ttq-cellvae": part_ttq_cellvae,
    "latent": part_latent,
    "memory": part_memory,
    "scaling": part_scaling,
    "roofline": part_roofline,
    "table": part_table,
    "loader": part_loader,
    "zarr": part_zarr,
    "layouts": part_layouts,
    "views": part_views,
    "query": part_query,
    "ddp": part_ddp,
}


SCVI = {"scvi": "scvi-tools"}
NEEDS = {"throughput": SCVI, "ttq-scvi": SCVI, "ttq-scvi-scores": SCVI, "latent": SCVI}  # the bench extra (loader: its
# part skips a loader that is missing, as annbatch is on Python 3.11)
TIMED_FROM_SECOND_EPOCH = ("throughput", "ddp")  # their cells/s drop the first epoch (warm-up)
ONE_SIZE = ("layouts", "views", "query")  # these run the first --sizes value only


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "child":
        spec = json.loads(sys.argv[2])
        children = {"map": child_map, "read": child_read, "collection": child_collection}
        print(json.dumps(children.get(spec.get("kind"), child_fit)(spec)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=sorted(PARTS))
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/cellvae-speed"))
    parser.add_argument("--epochs", type=int, default=6, help="epochs per throughput run (x8 on the 700-cell set)")
    parser.add_argument("--scvi-max-epochs", type=int, default=None, help="cap scVI's epochs (default: scVI's own)")
    parser.add_argument("--chunk-seconds", type=float, default=480.0, help="scVI training time per ttq-scvi command")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    sizes_help = "simulated cells: scaling and zarr run each (default 10000 100000); layouts, views, query only the first"
    parser.add_argument("--sizes", type=int, nargs="+", help=sizes_help)
    parser.add_argument(
        "--layouts", nargs="+", default=None, help="layouts: only these runs, e.g. h5ad_dense zarr_csr (default: all)"
    )
    parser.add_argument("--latent-cells", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5, help="latent, loader: interleaved timings of each program")
    parser.add_argument("--in-memory-max", type=int, default=100_000, help="zarr: largest size also trained in memory")
    parser.add_argument("--ddp-cells", type=int, default=50_000)
    args = parser.parse_args()
    if args.part in TIMED_FROM_SECOND_EPOCH and args.epochs < 2:
        parser.error(f"{args.part} needs --epochs 2 or more: its cells/s leave out the first epoch (warm-up)")
    if args.part in ONE_SIZE and args.sizes and len(args.sizes) > 1:
        print(f"warning: {args.part} runs one size, the first of --sizes ({args.sizes[0]}); run it again for the others")
    args.sizes = args.sizes or [10_000, 100_000]
    require(NEEDS.get(args.part, {}))
    setup_threads()
    PARTS[args.part](args)
    print(f"peak RSS of this command: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MB")


if __name__ == "__main__":
    main()
