"""The GPU check: what only a CUDA machine can show about cellvae, in one command of a few minutes.

This machine has no GPU; a session that is lent one runs this script there once (its device time is
short, so everything is prepared here). How to run it, wheels included, and session 13's results on an
H200: benchmarks/README.md, "GPU".

    python benchmarks/gpu_check.py --data DIR_WITH_KANG_H5AD --out DIR

Each part writes its numbers into ``DIR/gpu_check.json`` as soon as it ends; a part that fails records
its error and the others still run:

- ``tests``: the tests that skip without CUDA (device-resident minibatches, the out-of-memory message,
  CUDA-graph training against step by step, NaN recovery with graphs, a backed file trained through the
  device buffer with graphs).
- ``throughput``: training cells/s over whole epochs (first dropped) with the speed benchmark's
  architecture, at batch 128 and 1,024, float32 and bfloat16 (``--precisions``), on pbmc68k, the Kang
  data and simulated ``--cells`` × 2,000 counts; whether the counts were resident on the GPU; peak GPU memory; scVI on the
  same data and batch size when scvi-tools imports; ``get_latent`` cells/s after each fit (``fit`` hands
  the model back on the CPU, so this is the machine's CPU encoding).
- ``time_to_quality``: cellvae's default ``fit`` on 90% of the Kang cells and its held-out negative ELBO
  per cell (the CPU runs reach 1,241.9–1,242.5 nats in 46–52 s; scVI's default run 1,258.5 in 983 s).
- ``determinism``: two fits with the same seed; how far apart their embeddings are.
- ``step_overhead``: a profile of a batch-128 ``fit`` on the Kang data, and cells/s of a plain loop with
  and without host syncs and of the step replayed from a CUDA graph.
- ``streaming``: the path for counts that do not stay on the GPU. The simulated ``--cells`` × 2,000 counts
  trained from the backed ``.h5ad`` through a device buffer (read on the CPU a buffer at a time, refilled
  in place on the GPU, CUDA graphs; since session 57), the same file minibatch by minibatch (the way before
  session 57: each minibatch copied to the GPU and trained step by step) and the same counts in memory
  (resident, as int16 where they fit, CUDA graphs), at batch 128 and 1,024, float32.
- ``suite``: the whole test suite on the GPU (``device="auto"`` picks it wherever a test leaves the device
  open), in ``--suite-workers`` pytest-xdist processes of one thread each, stopped after ``--suite-seconds``
  (the notebooks and the README's commands are left out: they need Jupyter and a fresh install). Session 55
  found four faults of the CUDA path this way.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed  # noqa: E402  (the CPU benchmark's data, splits and scVI set-up)

GPU_TESTS = [
    "tests/test_loader.py::test_gpu_keeps_fitting_data_on_the_device_for_training_only",
    "tests/test_reliability.py::test_gpu_out_of_memory_suggests_a_smaller_batch_size",
    "tests/test_loader.py::test_gpu_training_replays_cuda_graphs_and_trains_like_step_by_step",
    "tests/test_loader.py::test_gpu_training_on_a_backed_file_replays_cuda_graphs_over_a_device_buffer",
    "tests/test_reliability.py::test_nan_batch_restores_parameters_and_lowers_the_learning_rate[cuda-graphs]",
    "tests/test_atlas.py::test_held_out_batch_is_mapped_and_labels_transfer[cuda]",
    "tests/test_ddp.py::test_two_processes_on_gpus_train_one_model_as_good_as_one_process",
    "tests/test_model.py::test_gpu_outputs_run_where_to_device_puts_the_model_and_fit_leaves_it_there",
]
KANG = "kang_ctrl_5donors_muscat.h5ad"


def part_environment(args) -> dict:
    import torch

    found = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if args.device == "cuda":
        found["gpu"] = torch.cuda.get_device_name(0)
        found["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return found


def part_tests(args) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *GPU_TESTS],
        cwd=speed.REPO,
        capture_output=True,
        text=True,
    )
    print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
    summary = done.stdout.strip().splitlines()[-1:]
    if done.returncode in (4, 5):  # (pytest: a usage error, such as a test id that names no test; no test collected)
        told = (done.stderr.strip() or done.stdout.strip())[-500:]  # ("ERROR: not found: <id>" is on stderr)
        raise RuntimeError(f"pytest ran none of the GPU tests (exit code {done.returncode}): {told}")
    ran = summary and any(word in summary[0] for word in ("passed", "failed", "error"))  # (errors: told as they are)
    if args.device == "cuda" and summary and "skipped" in summary[0] and not ran:
        raise RuntimeError(f"every GPU test skipped on the GPU (is CUDA visible to pytest?): {done.stdout.strip()[-1500:]}")
    return {"exit_code": done.returncode, "summary": summary}


def cellvae_row(adata, batch_key, batch_size: int, precision: str, epochs: int, device: str) -> dict:
    import torch

    from cellvae.data import DeviceBuffer

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, cells_per_s = speed.cellvae_throughput(adata, batch_key, epochs, precision, batch_size, device)
    started = time.perf_counter()
    model.get_latent(adata)
    row = {
        "cells_per_s": round(cells_per_s),
        "final_train_loss": round(float(model.history["train_loss"].iloc[-1]), 2),
        "get_latent_cells_per_s": round(adata.n_obs / (time.perf_counter() - started)),
    }
    if device == "cuda":
        row["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
        loader = model._loader(adata, torch.device(device))[0]
        row["resident_on_gpu"] = bool(loader._fits_on_device())
        if row["resident_on_gpu"]:
            row["resident_dtype"] = str(loader.resident()[0].dtype)
        else:  # cells that do not stay on the GPU train through a buffer of them refilled in place, where one fits
            free, _ = torch.cuda.mem_get_info(loader.device)
            fits = DeviceBuffer.bytes_for(loader, batch_size, adata.n_obs) <= free // 4
            row["device_buffer_rows"] = DeviceBuffer.rows_for(loader, batch_size, adata.n_obs) if fits else None
    return row


def part_throughput(args) -> dict:
    import anndata as ad

    datasets = [("pbmc68k_765_genes", speed.pbmc68k(), None, 6 * 8)]
    if (args.data / KANG).is_file():
        datasets.append(("kang_2511_genes", ad.read_h5ad(args.data / KANG), "batch", 6))
    simulated = speed.simulated_file(args.work_dir, args.cells)
    datasets.append((f"simulated_{args.cells}x2000", ad.read_h5ad(simulated), "batch", 4))
    try:
        import scvi  # noqa: F401

        with_scvi = not args.skip_scvi
    except Exception as error:  # missing, or broken against the image's own packages
        traceback.print_exc()
        print(f"scVI is left out: {type(error).__name__}: {error}", flush=True)
        with_scvi = False
    results = {}
    for name, adata, batch_key, epochs in datasets:
        for batch_size in (128, 1024):
            row = {"cells": adata.n_obs, "genes": adata.n_vars, "epochs": epochs, "batch_size": batch_size}
            for precision in args.precisions:
                row[f"cellvae_{precision}"] = cellvae_row(adata, batch_key, batch_size, precision, epochs, args.device)
            if with_scvi:
                accelerator = "gpu" if args.device == "cuda" else "cpu"
                row["scvi"] = {"cells_per_s": round(speed.scvi_throughput(adata, batch_key, epochs, batch_size, accelerator)[0])}
                row["ratio_float32"] = round(row["cellvae_float32"]["cells_per_s"] / row["scvi"]["cells_per_s"], 2)
            results[f"{name}_batch{batch_size}"] = row
            print(name, row, flush=True)
    return results


def part_time_to_quality(args) -> dict:
    import anndata as ad

    import cellvae

    if not (args.data / KANG).is_file():
        return {"skipped": f"{args.data / KANG} not found"}
    adata = ad.read_h5ad(args.data / KANG)
    train_cells, test_cells = speed.holdout_split(adata.n_obs)
    train_adata, test_adata = adata[train_cells].copy(), adata[test_cells].copy()
    runs = []
    for seed in (0, 1):
        started = time.perf_counter()
        model = cellvae.CellVAE(train_adata, batch_key="batch").fit(random_state=seed, progress=False, device=args.device)
        seconds = time.perf_counter() - started
        runs.append(
            {
                "seed": seed,
                "fit_seconds": round(seconds, 1),
                "epochs": len(model.history),
                "heldout_neg_elbo_per_cell": round(speed.neg_elbo_cellvae(model, test_adata), 2),
            }
        )
        print(runs[-1], flush=True)
    return {"runs": runs}


def part_determinism(args) -> dict:
    import cellvae

    adata = speed.pbmc68k()
    latents = [
        cellvae.CellVAE(adata).fit(max_epochs=30, random_state=0, progress=False, device=args.device).get_latent()
        for _ in range(2)
    ]
    scale = float(np.abs(latents[0]).mean())
    return {
        "bitwise_identical": bool(np.array_equal(*latents)),
        "max_abs_difference_over_mean_abs": float(np.abs(latents[0] - latents[1]).max() / scale),
    }


def part_step_overhead(args) -> dict:
    """Where a small-batch GPU step's time goes, on the Kang data: the library's ``fit`` loop under the
    profiler, then the same step without host syncs, and the whole step (gather, forward, backward,
    fused AdamW) captured once as a CUDA graph and replayed, with ``train.ResidentSteps`` at a KL weight
    of 1. (Session 13's run 2 measured the last two with a stand-alone prototype of the same steps,
    before the library had them.)"""
    import anndata as ad
    import torch

    import cellvae

    if not (args.data / KANG).is_file():
        return {"skipped": f"{args.data / KANG} not found"}
    adata = ad.read_h5ad(args.data / KANG)
    device = torch.device(args.device)
    results = {}
    model = cellvae.CellVAE(adata, batch_key="batch", **speed.ARCH)
    fit = {"validation_size": 0.0, "early_stopping": False, "progress": False, "device": args.device}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        model.fit(max_epochs=2, batch_size=128, **fit)
    steps = 2 * -(-adata.n_obs // 128)
    averages = profiler.key_averages()
    calls = {e.key: e.count for e in averages}
    device_us = sum(e.self_device_time_total for e in averages if e.device_type == torch.autograd.DeviceType.CUDA)
    results["profile_fit_batch128"] = {
        "steps": steps,
        "wall_ms_per_step_profiled": round(1000 * float(model.history["seconds"].sum()) / steps, 3),
        "kernel_ms_per_step": round(device_us / 1000 / steps, 3),
        "per_step_calls": {
            name: round(calls.get(name, 0) / steps, 2)
            for name in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cudaMemcpyAsync", "cudaStreamSynchronize", "aten::item")
        },
    }
    table = averages.table(sort_by="self_cpu_time_total", row_limit=25)
    print(table, flush=True)
    results["profile_fit_batch128"]["top_ops_by_self_cpu"] = table.splitlines()
    for batch_size in (128, 1024):
        model = cellvae.CellVAE(adata, batch_key="batch", **speed.ARCH)
        loader, cells = model._loader(adata, device)
        vae = model.module.to(device).train()
        row = {
            "eager_with_host_syncs": eager_cells_per_s(vae, loader, cells, batch_size),
            "eager_without_host_syncs": resident_cells_per_s(vae, loader, cells, batch_size, graphs=False),
        }
        if device.type == "cuda":
            row["cuda_graph_per_step"] = resident_cells_per_s(vae, loader, cells, batch_size, graphs=True)
        results[f"kang_batch{batch_size}"] = row
        print(batch_size, row, flush=True)
    return results


def eager_cells_per_s(vae, loader, cells, batch_size: int, epochs: int = 4) -> dict:
    """Cells/s of full minibatches over whole epochs (first dropped) of a plain loop that reads the loss,
    distortion and rate to the host each step, as ``train`` does step by step."""
    import torch

    from cellvae.train import make_optimizer

    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    optimizer = make_optimizer(vae, 1e-3, 1e-6, loader.device)
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(epochs):
        sync()
        started = time.perf_counter()
        for mb in loader.batches(cells, batch_size, shuffle=True, rng=rng):
            if len(mb.cell_index) < batch_size:
                continue
            out = vae(mb.counts, mb.covariates, mb.library, mb.batch_index, kl_weight=1.0)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            float(out["loss"].detach()), float(out["distortion"].detach().sum()), float(out["rate"].detach().sum())
            optimizer.step()
        sync()
        seconds.append(time.perf_counter() - started)
    cells_per_epoch = len(cells) // batch_size * batch_size
    cells_per_s = cells_per_epoch * (epochs - 1) / sum(seconds[1:])
    return {"cells_per_s": round(cells_per_s), "final_loss": round(float(out["loss"].detach()), 2)}


def resident_cells_per_s(vae, loader, cells, batch_size: int, graphs: bool, epochs: int = 4) -> dict:
    """The same with the library's ``train.ResidentSteps`` (counts resident, sums kept on the device, no
    host syncs), its steps replayed from CUDA graphs or, without ``graphs``, launched one by one."""
    import torch

    from cellvae.train import ResidentSteps, make_optimizer

    resident = loader._on_device or loader._resident_tensors()
    steps = ResidentSteps(vae, resident, make_optimizer(vae, 1e-3, 1e-6, loader.device))
    if not graphs:
        steps.graphs = None
    sync = torch.cuda.synchronize if loader.device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    seconds = []
    for _ in range(epochs):
        sync()
        started = time.perf_counter()
        for rows in loader.shuffled_rows(cells, batch_size, rng):
            if len(rows) == batch_size:
                steps.step(rows, 1.0)
        loss_sum, _, _, seen, _ = steps.collect()  # reads the sums: waits for the GPU
        seconds.append(time.perf_counter() - started)
    cells_per_s = len(cells) // batch_size * batch_size * (epochs - 1) / sum(seconds[1:])
    return {"cells_per_s": round(cells_per_s), "final_epoch_loss": round(loss_sum / max(seen, 1), 2)}


def part_streaming(args) -> dict:
    import anndata as ad

    from cellvae.data import CellLoader

    simulated = speed.simulated_file(args.work_dir, args.cells)
    results = {}
    device_buffer = CellLoader.device_buffer
    for storage in ("backed", "backed_minibatches", "in_memory"):
        adata = ad.read_h5ad(simulated, backed=None if storage == "in_memory" else "r")
        if storage == "backed_minibatches":
            CellLoader.device_buffer = lambda self, batch_size, n_cells: None
        try:
            for batch_size in (128, 1024):
                row = cellvae_row(adata, "batch", batch_size, "float32", 3, args.device)
                results[f"{storage}_batch{batch_size}"] = row
                print(storage, batch_size, row, flush=True)
        finally:
            CellLoader.device_buffer = device_buffer
            if storage != "in_memory":
                adata.file.close()
    return results


def part_suite(args) -> dict:
    # SIGINT first, for pytest's summary; a test's fit takes a Ctrl-C as "stop training", so KILL 20 s later
    command = ["timeout", "-s", "INT", "-k", "20", str(args.suite_seconds), sys.executable, "-m", "pytest", "tests", "-v"]
    command += ["-rfE", "-p", "no:cacheprovider", "--tb=short", f"--junitxml={args.out / 'suite.xml'}"]
    command += ["--ignore", "tests/test_tutorials.py", "--ignore", "tests/test_readme.py"]
    if importlib.util.find_spec("xdist") is not None:  # (the GPU image has pytest-xdist; without it, one process)
        command += ["-n", str(args.suite_workers)]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    done = subprocess.run(command, cwd=speed.REPO, capture_output=True, text=True, env=env)
    (args.out / "suite.log").write_text(done.stdout + done.stderr)
    print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
    # -v names every test as it ends: the failures are known even where the run was killed before its summary
    test, outcome = r"(tests/\S+?(?:\[[^\]]*\])?)", r"(PASSED|FAILED|ERROR|SKIPPED)"
    outcomes = re.findall(rf"\b{outcome} {test}(?=\s|$)", done.stdout)  # pytest-xdist: "[gw3] [ 12%] PASSED tests/..."
    outcomes += [found[::-1] for found in re.findall(rf"^{test} {outcome}\b", done.stdout, re.MULTILINE)]  # one process
    failed = sorted({test for outcome, test in outcomes if outcome in ("FAILED", "ERROR")})
    ended = {test for _, test in outcomes}
    stopped = done.returncode in (124, 137, -9)  # INT, then KILL (timeout's process group)
    return {"exit_code": done.returncode, "stopped_at_the_time_limit": stopped, "tests_ended": len(ended), "failed": failed}


PARTS = {
    "environment": part_environment,
    "tests": part_tests,
    "throughput": part_throughput,
    "time_to_quality": part_time_to_quality,
    "determinism": part_determinism,
    "step_overhead": part_step_overhead,
    "streaming": part_streaming,
    "suite": part_suite,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--parts", nargs="+", choices=list(PARTS), help="default: all of them (on --device cpu all but suite: the test suite)"
    )
    parser.add_argument("--data", type=Path, default=speed.DATA, help="folder holding the Kang .h5ad (default: ../shared/data)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/cellvae-gpu-check"),
        help="folder for this run's gpu_check.json (not benchmarks/results, whose gpu_check.json holds the runs so far)",
    )
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/cellvae-gpu"))
    parser.add_argument("--cells", type=int, default=200_000, help="cells of the simulated data set")
    parser.add_argument("--skip-scvi", action="store_true")
    parser.add_argument("--precisions", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script itself")
    parser.add_argument("--suite-seconds", type=int, default=240, help="time limit of the suite part")
    parser.add_argument("--suite-workers", type=int, default=12, help="pytest-xdist processes of the suite part")
    args = parser.parse_args()
    if args.parts is None:
        args.parts = [part for part in PARTS if part != "suite" or args.device == "cuda"]
    out = args.out / "gpu_check.json"
    if out.exists() and any(key.startswith("run") for key in json.loads(out.read_text())):
        sys.exit(f"{out} holds earlier runs (run1, ...): give --out another folder and add this run to it by hand")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA GPU: run this on a GPU machine (or --device cpu for a dry run of the script)")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name in args.parts:
        started = time.perf_counter()
        try:
            results[name] = PARTS[name](args)
        except Exception as error:  # one broken part must not cost the others' device time
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        results[name + "_seconds"] = round(time.perf_counter() - started, 1)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps({name: results[name]}), flush=True)


if __name__ == "__main__":
    main()
