"""Is differential expression's false discovery rate calibrated? Realised FDR and power over seeds.

Each seed simulates a new population (``cellvae.datasets.simulate(random_state=seed)``: new genes, cell-type
programmes and batch effects), samples cells from it, trains cellvae with its defaults and calls genes at the
default 5% FDR. The truth is the simulator's own: each group's population mean of the cells' expression
proportions (what the decoder's normalised expression estimates), averaged over the within-type variation
(Monte Carlo, fresh draws) and the batches (uniform, as the cells' batches are drawn and as
``batch_correction=True`` decodes), and for "rest" over the other types (uniform, as they are drawn). A gene is
truly changed when |log2(mean1 + pseudocount) − log2(mean2 + pseudocount)| > ``delta``, with the method's own
pseudocount (0.01 counts at the sample's median depth): the null the method tests, ``|lfc| ≤ delta``.
Two other truths are reported beside it: the sampled cells' own mean proportions (no cell-sampling error:
what the counts could show at best), and the simulator's rates before each cell's proportions are
normalised to sum to 1 (the cell-type programmes alone): where a type's markers take a large share of its
counts, every other gene's share drops, which that truth does not count as a change and the method does.

Settings (each with its own fit): ``batch`` (2,000 cells, 5 types, 2 batches, batch effect 0.5: the
simulator's defaults, ~400 cells per type), ``nobatch`` (the same with one batch and no batch effect),
``small`` (600 cells, ~120 per type) and ``large`` (6,000 cells, ~1,200 per type). On each fit: each type
against the rest at ``delta`` 0.25 (the default) and 0.5, and pairwise (every other type against type0).

    flock /tmp/cellvae-cpu.lock python benchmarks/differential_calibration.py --seeds 0 1 2 --settings batch

Writes one row per setting, seed and comparison kind to ``results/differential_calibration.csv`` (``--append``:
adds to its rows, for a study run in parts; a setting, seed and kind run again replaces its earlier row) and prints
the mean and sd over seeds; ``--genes DIR`` also writes each run's per-gene table (with the truths) there. ~40 s
per setting and seed on 2 cores.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from bench_common import merge_rows, run_stamp

import cellvae

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
N_GENES = 500
N_TYPES = 5
SETTINGS = {  # name: (cells sampled, batches, batch effect)
    "batch": (2000, 2, 0.5),
    "nobatch": (2000, 1, 0.0),
    "small": (600, 2, 0.5),
    "large": (6000, 2, 0.5),
}
WITHIN_DRAWS = 20_000  # Monte Carlo draws of the within-type variation per type and batch


def simulator_parameters(n_cells: int, n_batches: int, batch_effect: float, seed: int) -> dict:
    """The hidden parameters of ``cellvae.datasets.simulate`` with these arguments, re-drawn in its order."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0.0, 1.6, N_GENES)
    programme = np.zeros((N_TYPES, N_GENES))
    for t in range(N_TYPES):
        markers = rng.choice(N_GENES, size=20, replace=False)
        programme[t, markers] = rng.uniform(1.0, 3.0, len(markers))
    batch_programme = rng.normal(0.0, batch_effect, (n_batches, N_GENES))
    cell_type = rng.integers(0, N_TYPES, n_cells)
    batch = rng.integers(0, n_batches, n_cells)
    within = rng.normal(0.0, 1.0, (n_cells, 3))
    loadings = rng.normal(0.0, 0.4, (3, N_GENES))
    return {"base": base, "programme": programme, "batch_programme": batch_programme, "cell_type": cell_type,
            "batch": batch, "within": within, "loadings": loadings}  # fmt: skip


def softmax(log_rates: np.ndarray) -> np.ndarray:
    proportions = np.exp(log_rates - log_rates.max(axis=1, keepdims=True))
    return proportions / proportions.sum(axis=1, keepdims=True)


def population_means(parameters: dict, seed: int) -> np.ndarray:
    """types × genes: each type's population mean expression proportions (batches uniform)."""
    rng = np.random.default_rng([seed, 7])
    n_batches = len(parameters["batch_programme"])
    means = np.zeros((N_TYPES, N_GENES))
    for t in range(N_TYPES):
        for b in range(n_batches):
            within = rng.normal(0.0, 1.0, (WITHIN_DRAWS, 3)) @ parameters["loadings"]
            log_rates = parameters["base"] + parameters["programme"][t] + parameters["batch_programme"][b] + within
            means[t] += softmax(log_rates).mean(0) / n_batches
    return means


def sample_means(parameters: dict) -> np.ndarray:
    """types × genes: the mean expression proportions of the sampled cells of each type (no counting noise)."""
    log_rates = (
        parameters["base"] + parameters["programme"][parameters["cell_type"]]
        + parameters["batch_programme"][parameters["batch"]] + parameters["within"] @ parameters["loadings"]
    )  # fmt: skip
    proportions = softmax(log_rates)
    return np.stack([proportions[parameters["cell_type"] == t].mean(0) for t in range(N_TYPES)])


def true_lfc(means: np.ndarray, group1: str, group2: str, pseudocount: float, sizes: np.ndarray | None) -> np.ndarray:
    """log2 fold change of two groups' means; "rest": the other types weighted by ``sizes`` (None: equally)."""
    first = int(group1.removeprefix("type"))
    if group2 == "rest":
        weights = np.ones(N_TYPES) if sizes is None else sizes.astype(float)
        weights[first] = 0.0
        second = weights @ means / weights.sum()
    else:
        second = means[int(group2.removeprefix("type"))]
    return np.log2(means[first] + pseudocount) - np.log2(second + pseudocount)


def unnormalised_lfc(programme: np.ndarray, group1: str, group2: str) -> np.ndarray:
    """log2 fold change of the simulator's rates before normalisation: the type programmes (the genes' base,
    batch and within-type factors are the same in every type and cancel); "rest": the other types equally."""
    rates = np.exp(programme)
    first = int(group1.removeprefix("type"))
    second = np.delete(rates, first, 0).mean(0) if group2 == "rest" else rates[int(group2.removeprefix("type"))]
    return np.log2(rates[first]) - np.log2(second)


def scores(genes: pd.DataFrame, delta: float) -> dict:
    """Realised FDR (under each truth), the mean expected FDR of the calls, power, and the sign errors: the share of
    the calls of truly changed genes whose ``lfc_mean`` has the other sign (a change called in the wrong direction)."""
    called = genes["is_de"].to_numpy(dtype=bool)

    def false_share(column: str) -> float:
        return round(float((called & (np.abs(genes[column].to_numpy()) <= delta)).sum() / max(called.sum(), 1)), 4)

    changed = np.abs(genes["true_lfc"].to_numpy()) > delta
    found = called & changed
    wrong_way = found & (np.sign(genes["lfc_mean"].to_numpy()) != np.sign(genes["true_lfc"].to_numpy()))
    return {
        "n_called": int(called.sum()),
        "n_changed": int(changed.sum()),
        "realised_fdr": false_share("true_lfc"),
        "expected_fdr": round(float(genes.loc[called, "proba_not_de"].mean()) if called.any() else 0.0, 4),
        "power": round(float((called & changed).sum() / max(changed.sum(), 1)), 4),
        "realised_fdr_sample_truth": false_share("sample_lfc"),
        "realised_fdr_unnormalised_truth": false_share("unnormalised_lfc"),
        "sign_errors": round(float(wrong_way.sum() / max(found.sum(), 1)), 4),
    }


def run(setting: str, seed: int, genes_dir: Path | None) -> list[dict]:
    n_cells, n_batches, batch_effect = SETTINGS[setting]
    adata = cellvae.datasets.simulate(
        n_cells=n_cells, n_genes=N_GENES, n_batches=n_batches, n_cell_types=N_TYPES, random_state=seed, batch_effect=batch_effect
    )
    parameters = simulator_parameters(n_cells, n_batches, batch_effect, seed)
    if not (adata.obs["cell_type"].cat.codes.to_numpy() == parameters["cell_type"]).all():
        raise RuntimeError("the simulator's parameters are no longer re-drawn in its order: update simulator_parameters")
    population, sampled = population_means(parameters, seed), sample_means(parameters)
    sizes = np.bincount(parameters["cell_type"], minlength=N_TYPES)
    depth = np.asarray(adata.X.sum(1)).ravel()
    pseudocount = 0.01 / np.median(depth[depth > 0])  # the method's default, in proportions
    counts_per_cell = np.asarray(adata.X.mean(0)).ravel()
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cellvae.CellVAE(adata, batch_key="batch" if n_batches > 1 else None).fit(random_state=seed, progress=False)
    fit_seconds = time.perf_counter() - started
    kinds = {"ovr": {"delta": 0.25}, "ovr_delta0.5": {"delta": 0.5}, "pairwise": {"group2": "type0"}}
    rows = []
    for kind, arguments in kinds.items():
        delta = arguments.get("delta", 0.25)
        result = model.differential_expression(groupby="cell_type", progress=False, **arguments)
        frames = []
        for (group1, group2), frame in result.groupby(["group1", "group2"], sort=False):
            frame = frame.loc[adata.var_names].copy()
            frame["true_lfc"] = true_lfc(population, group1, group2, pseudocount, None)
            frame["sample_lfc"] = true_lfc(sampled, group1, group2, pseudocount, sizes)
            frame["unnormalised_lfc"] = unnormalised_lfc(parameters["programme"], group1, group2)
            frame["counts_per_cell"] = counts_per_cell
            frames.append(frame)
        genes = pd.concat(frames)
        if genes_dir is not None:
            genes_dir.mkdir(parents=True, exist_ok=True)
            genes.to_csv(genes_dir / f"{setting}_{kind}_seed{seed}.csv.gz")
        rows.append(
            {"setting": setting, "seed": seed, "kind": kind, "delta": delta, "n_cells": n_cells,
             "fit_seconds": round(fit_seconds, 1), **scores(genes, delta)}
        )  # fmt: skip
    return rows


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd over seeds of each setting and comparison kind (the rows' realised FDR is one draw each)."""
    columns = ["realised_fdr", "expected_fdr", "power", "realised_fdr_sample_truth", "realised_fdr_unnormalised_truth"]
    columns += ["sign_errors"] * ("sign_errors" in frame)  # (rows written before session 71 have none)
    grouped = frame.groupby(["setting", "kind"], sort=False)[columns]
    table = grouped.agg(["mean", "std"]).round(4)
    table.insert(0, "seeds", grouped.size())
    if "sign_errors" in frame:  # (their mean is over the seeds that have them)
        counted = frame.groupby(["setting", "kind"], sort=False)["sign_errors"].count()  # (grouped holds its columns)
        table.insert(1, "seeds_measuring_sign_errors", counted)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--genes", type=Path, help="a folder for each run's per-gene table")
    parser.add_argument("--out", type=Path, default=RESULTS / "differential_calibration.csv")
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if not args.append:
        args.out.unlink(missing_ok=True)
    for setting in args.settings:
        for seed in args.seeds:
            frame = pd.DataFrame(run(setting, seed, args.genes)).assign(**run_stamp())
            print(frame.to_string(index=False), flush=True)
            # the whole file is rewritten: columns added since earlier rows (sign_errors, date, commit) stay empty there
            table = merge_rows(args.out, frame, keys=["setting", "seed", "kind"])
    print(summary(table).to_string())


if __name__ == "__main__":
    main()
