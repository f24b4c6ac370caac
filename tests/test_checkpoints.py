"""Checkpoints: atomic writes, resume after SIGKILL or Ctrl-C ends bit for bit like an uninterrupted run."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch
from conftest import ctrl_c_at_call
from safetensors import safe_open
from safetensors.torch import save_file

import cellvae
import cellvae.train
from cellvae import CellVAE
from cellvae.train import checkpoint_ranks, default_kl_warmup, default_query_epochs, split_cells, train_every_category

CHECKPOINT = "checkpoint.safetensors"
# An epoch takes about 0.2 s; 20 of them leave a signal sent after epoch 2 ample time (3 s) to land
# mid-training.
DATA = {"n_cells": 2000, "n_genes": 100, "n_batches": 2, "random_state": 3}
MODEL = {"n_hidden": 32, "n_latent": 4, "batch_key": "batch"}
FIT = {"max_epochs": 20, "batch_size": 32, "random_state": 7, "progress": False}

TRAINING_SCRIPT = textwrap.dedent(
    """
    import json, signal, sys, warnings
    import torch
    import cellvae
    from cellvae import CellVAE

    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even where this process inherited an ignored
    # SIGINT (a shell starts background jobs so, e.g. `pytest ... &` or a CI runner's `cmd &`).
    signal.signal(signal.SIGINT, signal.default_int_handler)

    data, model, fit, threads, checkpoint_dir, out = json.loads(sys.argv[1])
    torch.set_num_threads(threads)
    adata = cellvae.datasets.simulate(**data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trained = CellVAE(adata, **model).fit(**fit, checkpoint_dir=checkpoint_dir)
    print(json.dumps({"epochs": len(trained.history), "warnings": [str(w.message) for w in caught]}), flush=True)
    trained.save(out)
    resumed = CellVAE(adata, **model).fit(**fit, checkpoint_dir=checkpoint_dir, resume=True)
    resumed.save(out + "_resumed")
    """
)


def simulated():
    return cellvae.datasets.simulate(**DATA)


def checkpoint_epoch(path) -> int:
    """Last completed epoch recorded in a checkpoint (-1 while there is none)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["cellvae_checkpoint"])["epoch"]
    except (OSError, KeyError, ValueError):
        return -1


def start_training(tmp_path) -> subprocess.Popen:
    args = json.dumps([DATA, MODEL, FIT, torch.get_num_threads(), str(tmp_path / "ckpt"), str(tmp_path / "model")])
    return subprocess.Popen(
        [sys.executable, "-c", TRAINING_SCRIPT, args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_for_epoch(process: subprocess.Popen, path, epoch: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while checkpoint_epoch(path) < epoch:
        if process.poll() is not None:
            pytest.fail(f"training subprocess ended before epoch {epoch}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"no checkpoint of epoch {epoch} within {timeout} s")
        time.sleep(0.01)


def assert_same_parameters(a: CellVAE, b: CellVAE) -> None:
    state_a, state_b = a.module.state_dict(), b.module.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), f"parameter {key} differs"


def assert_same_history(a: CellVAE, b: CellVAE) -> None:
    columns = [c for c in a.history.columns if c != "seconds"]
    assert list(a.history.columns) == list(b.history.columns)
    np.testing.assert_array_equal(a.history[columns].to_numpy(), b.history[columns].to_numpy())


@pytest.fixture(scope="module")
def uninterrupted():
    """The reference: the same fit without checkpoints and without interruption."""
    return CellVAE(simulated(), **MODEL).fit(**FIT)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's memory mappings from /proc")
def test_a_resumed_run_keeps_no_view_of_its_checkpoint_file_mapped_while_it_writes_the_next(tmp_path, monkeypatch):
    """Resuming copies what it reads from the checkpoint: tensors read from safetensors map the file, and Windows
    cannot replace a mapped file, which each later checkpoint does (resuming failed there after one epoch)."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=0)
    fit = {"max_epochs": 6, "progress": False, "checkpoint_dir": tmp_path}
    with monkeypatch.context() as patched, pytest.warns(RuntimeWarning, match="training interrupted"):
        ctrl_c_at_call(cellvae.train.AgreedInterrupt, "check", 3, patched)
        CellVAE(adata, n_hidden=8).fit(**fit)
    mapped_at_write, write = [], cellvae.train.write_checkpoint

    def noting_mappings(path, *args):
        mapped_at_write.append(str(path.resolve()) in Path("/proc/self/maps").read_text())
        write(path, *args)

    monkeypatch.setattr(cellvae.train, "write_checkpoint", noting_mappings)
    CellVAE(adata, n_hidden=8).fit(**fit, resume=True)
    assert mapped_at_write and not any(mapped_at_write)


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path, uninterrupted):
    process = start_training(tmp_path)
    wait_for_epoch(process, tmp_path / "ckpt" / CHECKPOINT, 2)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    killed_at = checkpoint_epoch(tmp_path / "ckpt" / CHECKPOINT)
    assert 2 <= killed_at < FIT["max_epochs"] - 1, "the kill must land before training ends"
    assert not (tmp_path / "model").exists()
    with safe_open(str(tmp_path / "ckpt" / CHECKPOINT), framework="pt") as handle:
        saved_history = json.loads(handle.metadata()["cellvae_checkpoint"])["history"]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = CellVAE(simulated(), **MODEL).fit(**FIT, checkpoint_dir=tmp_path / "ckpt", resume=True)
    assert len(resumed.history) == FIT["max_epochs"]
    # The epochs before the kill come from the checkpoint (their timings too), not from retraining.
    assert resumed.history["seconds"].iloc[: killed_at + 1].tolist() == [row["seconds"] for row in saved_history]
    assert_same_parameters(resumed, uninterrupted)
    assert_same_history(resumed, uninterrupted)
    np.testing.assert_array_equal(resumed.get_latent(), uninterrupted.get_latent())


def test_ctrl_c_keeps_a_usable_model_and_resume_matches_uninterrupted_run(tmp_path, uninterrupted):
    process = start_training(tmp_path)
    wait_for_epoch(process, tmp_path / "ckpt" / CHECKPOINT, 2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    assert 3 <= report["epochs"] < FIT["max_epochs"]
    assert any("training interrupted" in w and "keeping the best parameters" in w for w in report["warnings"])
    told = re.search(r"during epoch (\d+) \((\d+) finished; .*from its checkpoint after epoch (\d+)", report["warnings"][-1])
    # epochs numbered as in the history (from 0): the one running when stopped, the last one finished and saved
    assert told and int(told.group(1)) == int(told.group(2)) == report["epochs"]
    # the checkpoint named: the one seen (epoch 2) or a later one; one epoch older where Ctrl-C landed in the moment
    # between the rename that wrote epoch 2's file and training's note of it (seen once on a loaded machine)
    assert 1 <= int(told.group(3)) <= report["epochs"] - 1

    interrupted = CellVAE.load(tmp_path / "model", adata=simulated())
    assert len(interrupted.history) == report["epochs"]
    assert np.isfinite(interrupted.get_latent()).all()

    resumed = CellVAE.load(tmp_path / "model_resumed")
    assert_same_parameters(resumed, uninterrupted)
    assert len(resumed.history) == FIT["max_epochs"]


def test_checkpointing_changes_nothing_and_leaves_no_temporary_files(tmp_path, uninterrupted):
    model = CellVAE(simulated(), **MODEL).fit(**FIT, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert_same_parameters(model, uninterrupted)
    assert sorted(os.listdir(tmp_path)) == [CHECKPOINT]
    assert checkpoint_epoch(tmp_path / CHECKPOINT) == FIT["max_epochs"] - 1  # the last epoch is always saved
    with safe_open(str(tmp_path / CHECKPOINT), framework="pt") as handle:
        meta = json.loads(handle.metadata()["cellvae_checkpoint"])
        keys = set(handle.keys())
    assert len(meta["history"]) == FIT["max_epochs"]
    assert {"rng.torch", "optimizer.0.exp_avg"} <= keys and any(k.startswith("best.") for k in keys)


def test_resuming_a_finished_run_trains_no_further(tmp_path, uninterrupted):
    finished = CellVAE(simulated(), **MODEL).fit(**FIT, checkpoint_dir=tmp_path)
    again = CellVAE(simulated(), **MODEL).fit(**FIT, checkpoint_dir=tmp_path, resume=True)
    # the epochs' timings come from the checkpoint: a run trained again would have timed its own
    assert again.history["seconds"].tolist() == finished.history["seconds"].tolist()
    assert_same_parameters(again, uninterrupted)
    assert_same_history(again, uninterrupted)


def test_resuming_a_finished_run_whose_last_epoch_was_the_best_says_so_on_its_bar(tmp_path, capsys):
    """The bar's note that more epochs may help is read from the history: a resumed finished run trains no epoch."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=2)
    fit = {"max_epochs": 3, "random_state": 0, "progress": True, "checkpoint_dir": tmp_path}
    finished = CellVAE(adata, n_hidden=8).fit(**fit)
    assert finished.history.attrs["best_epoch"] == 2  # still improving
    capsys.readouterr()
    again = CellVAE(adata, n_hidden=8).fit(**fit, resume=True)
    assert again.history["seconds"].tolist() == finished.history["seconds"].tolist()
    assert "best=the last: more epochs may help" in capsys.readouterr().err


def test_resume_after_early_stopping_does_not_restart(tmp_path):
    fit = {**FIT, "max_epochs": 40, "patience": 1}
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = CellVAE(adata, n_hidden=8, kl_warmup=1).fit(**fit, checkpoint_dir=tmp_path)
        assert len(stopped.history) < 40, "patience=1 should stop early"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "no checkpoint ... starting from scratch"
        again = CellVAE(adata, n_hidden=8, kl_warmup=1).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    assert len(again.history) == len(stopped.history)
    assert again.history["seconds"].tolist() == stopped.history["seconds"].tolist()  # not trained again
    assert_same_parameters(again, stopped)


def test_resume_with_other_arguments_or_data_is_refused(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    fit = {"max_epochs": 2, "progress": False}
    CellVAE(adata, n_hidden=8).fit(**fit, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match=r"different run: \['lr'\]"):
        CellVAE(adata, n_hidden=8).fit(**fit, lr=1e-2, checkpoint_dir=tmp_path, resume=True)
    seeded = r"\['cells_and_counts_sha256', 'random_state'\] differ \(checkpoint: \{'random_state': 0\}\); random_state draws"
    with pytest.raises(ValueError, match=seeded):  # the data are the same: the seed drew other validation cells
        CellVAE(adata, n_hidden=8).fit(**fit, random_state=1, checkpoint_dir=tmp_path, resume=True)
    other_model = (
        r"\['model_config_sha256'\] differ; the model's settings that differ: n_hidden: checkpoint 8, this run 16; resume"
    )
    with pytest.raises(ValueError, match=other_model):
        CellVAE(adata, n_hidden=16).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    reordered = r"the model's settings that differ: gene_names: checkpoint 30 entries, sha256 \w+, this run 30 entries, sha256"
    with pytest.raises(ValueError, match=reordered):  # the same genes in another order
        CellVAE(adata[:, ::-1].copy(), n_hidden=8).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"different run: \['cells_and_counts_sha256'\] differ; resume"):  # no "(checkpoint: {})"
        CellVAE(adata[:150].copy(), n_hidden=8).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    other_counts = adata.copy()
    other_counts.X.data += 1  # same cells and genes, other counts
    with pytest.raises(ValueError, match=r"different run: \['cells_and_counts_sha256'\]"):
        CellVAE(other_counts, n_hidden=8).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"different run: \['cells_and_counts_sha256'\]"):
        CellVAE(adata[::-1].copy(), n_hidden=8).fit(**fit, checkpoint_dir=tmp_path, resume=True)
    (tmp_path / CHECKPOINT).unlink()  # a new run: refused while the old run's checkpoint is there (below)
    CellVAE(adata, n_hidden=8, batch_key="batch").fit(**fit, checkpoint_dir=tmp_path)
    other_batches = adata.copy()  # the same counts, half the cells' batch labels swapped
    swapped = other_batches.obs["batch"].to_numpy()[::2]
    other_batches.obs.loc[other_batches.obs_names[::2], "batch"] = np.where(swapped == "batch0", "batch1", "batch0")
    with pytest.raises(ValueError, match=r"different run: \['covariates_sha256'\]"):
        CellVAE(other_batches, n_hidden=8, batch_key="batch").fit(**fit, checkpoint_dir=tmp_path, resume=True)
    adata.write_h5ad(tmp_path / "cells.h5ad")  # the same cells streamed from disk are shuffled otherwise
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    with pytest.raises(ValueError, match=r"different run: \['counts_streamed_from_disk'\]"):
        CellVAE(backed, n_hidden=8, batch_key="batch").fit(**fit, checkpoint_dir=tmp_path, resume=True)


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    blob = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="not a readable cellvae checkpoint.*or name another checkpoint_dir"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    # a checkpoint written by a newer cellvae: the message names both versions
    (tmp_path / CHECKPOINT).unlink()
    CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    with safe_open(tmp_path / CHECKPOINT, "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["cellvae_checkpoint"] = json.dumps(json.loads(meta["cellvae_checkpoint"]) | {"version": 99})
    save_file(tensors, tmp_path / CHECKPOINT, metadata=meta)
    with pytest.raises(
        ValueError,
        match=r"checkpoint version 99; this cellvae reads version 3 \(and 2, without free bits\): .*or name another checkpoint",
    ):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    # bytes changed on disk (a flipped sign bit in the best parameters): refused by the checksum, not resumed from
    flipped = tensors | {"best.decoder.body.linears.0.weight": -tensors["best.decoder.body.linears.0.weight"]}
    meta["cellvae_checkpoint"] = json.dumps(json.loads(meta["cellvae_checkpoint"]) | {"version": 3})
    save_file(flipped, tmp_path / CHECKPOINT, metadata=meta)
    with pytest.raises(ValueError, match="is damaged: its tensors do not match the checksum written with them.*or name another"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    # well-framed files with a damaged part (written before checkpoints had a checksum): told as damaged, never a
    # bare KeyError or TypeError
    fields = json.loads(meta["cellvae_checkpoint"]) | {"version": 2}
    del fields["tensors_sha256"]
    damages = {
        "run missing": ({k: v for k, v in fields.items() if k != "run"}, tensors, r"\['run'\] missing, of the wrong type"),
        "epoch as text": (fields | {"epoch": "1"}, tensors, r"\['epoch'\] missing, of the wrong type or inconsistent"),
        "no torch RNG": (fields, {k: v for k, v in tensors.items() if k != "rng.torch"}, r"\['rng.torch'\] missing"),
        # counts that disagree (a hand-edited epoch of -5 trained 15 epochs for max_epochs=8)
        "epoch below 0": (fields | {"epoch": -5}, tensors, r"\['epoch', 'best_epoch'\] missing, of the wrong type or"),
        "rows not records": (fields | {"history": [1, "x"]}, tensors, r"\['history'\] missing, of the wrong type or"),
        "best after the last": (fields | {"best_epoch": 7}, tensors, r"\['best_epoch'\] missing"),
        "lr as text": (
            fields | {"param_groups": [g | {"lr": "x"} for g in fields["param_groups"]]},
            tensors,
            r"\['param_groups'\] missing",
        ),
        "torch RNG cut": (fields, tensors | {"rng.torch": tensors["rng.torch"][:100]}, "does not fit this model"),
    }
    for damaged_fields, damaged_tensors, message in damages.values():
        save_file(damaged_tensors, tmp_path / CHECKPOINT, metadata={"cellvae_checkpoint": json.dumps(damaged_fields)})
        with pytest.raises(ValueError, match=f"{message}.*or name another checkpoint_dir"):
            CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    save_file(tensors, tmp_path / CHECKPOINT, metadata={"cellvae_checkpoint": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="not a readable cellvae checkpoint"):  # (a bare RecursionError before)
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)


def _as_version_2(path):
    """Rewrite the checkpoint at ``path`` as an earlier cellvae wrote it (version 2, the same fields)."""
    with safe_open(path, "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    meta["cellvae_checkpoint"] = json.dumps(json.loads(meta["cellvae_checkpoint"]) | {"version": 2})
    save_file(tensors, path, metadata=meta)


def test_checkpoint_of_an_earlier_cellvae_resumes_unless_its_validation_loss_ignored_free_bits(tmp_path, monkeypatch):
    """Version 2 checkpoints' validation losses did not floor the KL at free_bits: with free_bits > 0 their best
    epoch would be compared with epochs charged otherwise, so they are refused; without free bits they resume."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    fit = {"max_epochs": 4, "progress": False, "checkpoint_dir": tmp_path}
    whole = CellVAE(adata, n_hidden=8).fit(max_epochs=4, progress=False)
    with monkeypatch.context() as patched, pytest.warns(RuntimeWarning, match="training interrupted"):
        ctrl_c_at_call(cellvae.train.AgreedInterrupt, "check", 5, patched)
        CellVAE(adata, n_hidden=8).fit(**fit)
    _as_version_2(tmp_path / CHECKPOINT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "no checkpoint ... starting from scratch"
        resumed = CellVAE(adata, n_hidden=8).fit(**fit, resume=True)
    assert_same_parameters(resumed, whole)
    (tmp_path / CHECKPOINT).unlink()
    CellVAE(adata, n_hidden=8, free_bits=0.5).fit(**fit)
    _as_version_2(tmp_path / CHECKPOINT)
    with pytest.raises(
        ValueError, match=r"checkpoint version 2.*did not floor .* free_bits=0.5 .*or name another checkpoint_dir"
    ):
        CellVAE(adata, n_hidden=8, free_bits=0.5).fit(**fit, resume=True)


def test_ctrl_c_while_a_new_best_epoch_is_kept_returns_the_previous_best_whole(monkeypatch):
    """Ctrl-C between two tensors of the copy of a newly improved epoch: the model returned is the best
    epoch before it, all of it, not a mixture of the two."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, n_batches=2, random_state=0)
    copy, kept_bests = cellvae.train._copy_state, []

    def ctrl_c_halfway_through_the_third_best(into, state):
        if type(state) is dict:  # from the last good parameters: a new best epoch (state_dict() is an OrderedDict)
            if len(kept_bests) == 2:
                half = list(state)[: len(state) // 2]
                copy(into, {name: state[name] for name in half})
                raise KeyboardInterrupt
            kept_bests.append({name: tensor.clone() for name, tensor in state.items()})
        return copy(into, state)

    monkeypatch.setattr(cellvae.train, "_copy_state", ctrl_c_halfway_through_the_third_best)
    model = CellVAE(adata, batch_key="batch", n_hidden=16, kl_warmup=1)
    with pytest.warns(RuntimeWarning, match="training interrupted"):
        model.fit(max_epochs=8, batch_size=32, progress=False, early_stopping=False)
    returned = model.module.state_dict()
    assert all(torch.equal(returned[name], tensor.cpu()) for name, tensor in kept_bests[-1].items())  # (kept on fit's device)


def test_ctrl_c_before_the_first_checkpoint_says_resume_cannot_continue_and_resume_says_what_it_does(tmp_path, monkeypatch):
    """Ctrl-C at epoch 3 of a run checkpointed every 10 epochs leaves no checkpoint; resume=True on the same
    model then continues from its interrupted weights (not the uninterrupted run), and on a new model starts
    afresh. Each is told."""
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, n_batches=2, random_state=0)
    fit = {"max_epochs": 30, "batch_size": 32, "progress": False, "checkpoint_dir": tmp_path, "checkpoint_every": 10}
    model = CellVAE(adata, batch_key="batch", n_hidden=16)
    with monkeypatch.context() as patched:
        ctrl_c_at_call(cellvae.train.AgreedInterrupt, "check", 5, patched)
        with pytest.warns(
            RuntimeWarning, match=r"interrupted during epoch \d+ .*no checkpoint was written yet \(checkpoint_every=10\)"
        ):
            model.fit(**fit)
    assert model.is_trained and not (tmp_path / CHECKPOINT).exists()
    with pytest.warns(UserWarning, match="continues from the model's trained weights .* not the result of an uninterrupted run"):
        model.fit(**fit, resume=True)
    (tmp_path / CHECKPOINT).unlink()
    with pytest.warns(UserWarning, match="no checkpoint in .*; training from the start"):
        CellVAE(adata, batch_key="batch", n_hidden=16).fit(**fit, resume=True)


def test_checkpoint_arguments_are_checked(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    model = CellVAE(adata, n_hidden=8)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        model.fit(max_epochs=1, progress=False, resume=True)
    with pytest.raises(ValueError, match="checkpoint_every"):
        model.fit(max_epochs=1, progress=False, checkpoint_dir=tmp_path, checkpoint_every=0)
    with pytest.warns(UserWarning, match="no checkpoint"):
        fresh = CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path / "new", resume=True)
    plain = CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False)
    assert_same_parameters(fresh, plain)


@pytest.mark.parametrize("kl_warmup", [0, 40])
def test_fit_keeps_the_best_epoch_not_the_last(tmp_path, kl_warmup):
    """120 cells for 40 epochs at a high learning rate: the validation loss is lowest before the end. The
    validation loss is at the full beta, so an epoch of the KL warm-up can be the best (here all are)."""
    adata = cellvae.datasets.simulate(n_cells=120, n_genes=100, random_state=0)
    model = CellVAE(adata, batch_key="batch", kl_warmup=kl_warmup)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(max_epochs=40, lr=0.03, early_stopping=False, progress=False, checkpoint_dir=tmp_path)
    with safe_open(tmp_path / CHECKPOINT, "pt") as handle:
        best_epoch = json.loads(handle.metadata()["cellvae_checkpoint"])["best_epoch"]
        best = {k.removeprefix("best."): handle.get_tensor(k) for k in handle.keys() if k.startswith("best.")}
        last = {k.removeprefix("model."): handle.get_tensor(k) for k in handle.keys() if k.startswith("model.")}
    losses = model.history["validation_loss"].to_numpy()
    assert best_epoch < len(losses) - 1 and losses[best_epoch] <= losses.min() * (1 + 1e-4)
    kept = model.module.state_dict()
    assert all(torch.equal(kept[name], best[name]) for name in kept)
    assert not all(torch.equal(last[name], best[name]) for name in kept)


def test_without_validation_cells_no_epoch_of_the_kl_warm_up_is_kept_as_the_best(tmp_path):
    """The training loss of an epoch whose steps ran below the full KL weight is lower for it: such an epoch
    (here the warm-up's one epoch, at KL weights 0 to 5) is never the best, nor stops training early."""
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=100, random_state=0)
    model = CellVAE(adata, batch_key="batch", beta=5.0, kl_warmup=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(max_epochs=20, validation_size=0, progress=False)  # trained: a refit warms up again from low loss
        model.fit(max_epochs=20, validation_size=0, patience=3, progress=False, random_state=1, checkpoint_dir=tmp_path)
    with safe_open(tmp_path / CHECKPOINT, "pt") as handle:
        best_epoch = json.loads(handle.metadata()["cellvae_checkpoint"])["best_epoch"]
    assert best_epoch >= 1 and len(model.history) > 4


def test_numpy_integer_arguments_train_and_checkpoint_like_python_integers(tmp_path, uninterrupted):
    as_numpy = {**FIT, "max_epochs": np.int64(FIT["max_epochs"]), "batch_size": np.int32(32), "random_state": np.int64(7)}
    as_numpy |= {"early_stopping": np.bool_(True), "progress": np.bool_(False)}  # the checkpoint's JSON record holds them
    model = CellVAE(simulated(), **MODEL).fit(**as_numpy, checkpoint_dir=tmp_path)
    assert_same_parameters(model, uninterrupted)
    numpy_model = {"n_hidden": np.int64(32), "n_latent": np.int64(4), "dropout": np.float32(0.1), "beta": np.float32(1)}
    typed = CellVAE(simulated(), batch_key="batch", **numpy_model)  # numpy floats too: saved as JSON numbers
    typed.fit(**{**as_numpy, "max_epochs": 2}, lr=np.float32(1e-3), checkpoint_dir=tmp_path / "typed")
    typed.save(tmp_path / "model")
    assert CellVAE.load(tmp_path / "model").config.n_latent == 4


def test_resume_after_early_stopping_between_checkpoints_does_not_restart(tmp_path):
    """checkpoint_every larger than the run: the epoch that stops early is still written, so resume continues."""
    fit = {"max_epochs": 40, "batch_size": 32, "random_state": 7, "progress": False, "patience": 1}
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stopped = cellvae.CellVAE(adata, n_hidden=8, kl_warmup=1).fit(**fit, checkpoint_dir=tmp_path, checkpoint_every=100)
    assert len(stopped.history) < 40
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "no checkpoint ...; training from the start"
        again = cellvae.CellVAE(adata, n_hidden=8, kl_warmup=1).fit(
            **fit, checkpoint_dir=tmp_path, checkpoint_every=100, resume=True
        )
    assert again.history["seconds"].tolist() == stopped.history["seconds"].tolist()


def test_validation_loss_weighs_the_rate_by_beta():
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, random_state=0)
    model = cellvae.CellVAE(adata, n_hidden=16, beta=5.0).fit(max_epochs=2, progress=False)
    h = model.history
    np.testing.assert_allclose(h["validation_loss"], h["validation_distortion"] + 5.0 * h["validation_rate"], rtol=1e-9)


def test_split_cells_keeps_at_least_one_cell_on_each_side_and_is_seeded():
    cells = np.arange(100, 300)
    for size in (1e-4, 0.001, 0.004):  # fewer than half a cell: still one validation cell
        train, validation = split_cells(cells, size, 0)
        assert len(validation) == 1 and len(train) == 199
    train, validation = split_cells(cells, 0.999, 0)
    assert len(train) == 1 and len(validation) == 199  # never all of them
    train, validation = split_cells(cells, 0.0, 0)
    assert len(validation) == 0 and sorted(train) == list(cells)
    train, validation = split_cells(cells, 0.25, 3)
    assert len(validation) == 50 and np.all(np.diff(validation) > 0)
    assert sorted(np.r_[train, validation]) == list(cells)
    assert not np.array_equal(train, np.sort(train))  # shuffled training cells
    again = split_cells(cells, 0.25, 3)
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(validation, again[1])
    assert not np.array_equal(validation, split_cells(cells, 0.25, 4)[1])


def test_train_every_category_moves_only_the_validation_cells_of_categories_without_training_cells():
    cells = np.arange(200)
    batch_of_cell = np.r_[np.zeros(120, int), np.ones(78, int), [2, 2]]  # batch 2: two cells
    for seed in range(40):
        plain = split_cells(cells, 0.1, seed)
        train, validation = train_every_category(*plain, [batch_of_cell])
        assert set(batch_of_cell[train]) == {0, 1, 2} and sorted(np.r_[train, validation]) == list(cells)
        if 2 in batch_of_cell[plain[0]]:  # nothing to move: the plain split
            np.testing.assert_array_equal(train, plain[0])
            np.testing.assert_array_equal(validation, plain[1])
        else:  # only batch 2's validation cells moved to training
            assert set(np.setdiff1d(train, plain[0])) == {198, 199} and len(validation) == 18
            assert np.all(np.diff(validation) > 0)
    # a second key (a categorical covariate) with its own rare value: both keys' rare cells train
    donor_of_cell = np.r_[[5], np.zeros(199, int)]  # donor 5: cell 0 only
    moved = 0
    for seed in range(40):
        plain = split_cells(cells, 0.1, seed)
        train, validation = train_every_category(*plain, [batch_of_cell, donor_of_cell])
        assert set(batch_of_cell[train]) == {0, 1, 2} and set(donor_of_cell[train]) == {0, 5}
        assert sorted(np.r_[train, validation]) == list(cells) and np.all(np.diff(validation) > 0)
        expected = {0} & set(plain[1]) | ({198, 199} if {198, 199} <= set(plain[1]) else set())
        assert set(np.setdiff1d(train, plain[0])) == expected
        moved += 0 in plain[1]
    assert moved  # some seed held cell 0 out


def test_a_validation_split_of_only_rare_category_cells_is_moved_to_training_with_a_warning():
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=30, n_batches=2, random_state=0)
    assert (np.asarray(adata.X.sum(axis=1)).ravel() > 0).all()  # every cell is split
    (held_out,) = split_cells(np.arange(adata.n_obs), 0.001, 0)[1]
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories("solo")
    adata.obs.iloc[held_out, adata.obs.columns.get_loc("batch")] = "solo"
    model = CellVAE(adata, batch_key="batch", n_hidden=8)
    with pytest.warns(UserWarning, match=r"the 1 validation cell drawn by validation_size=0.001 held the only cells"):
        model.fit(max_epochs=2, validation_size=0.001, progress=False)
    assert not any(column.startswith("validation") for column in model.history.columns)


def test_a_new_run_does_not_replace_an_earlier_runs_checkpoints(tmp_path, monkeypatch):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    kept = (tmp_path / CHECKPOINT).read_bytes()
    monkeypatch.setattr(cellvae.model, "train", lambda *a, **k: pytest.fail("trained before refusing"))
    model = CellVAE(adata, n_hidden=16)
    with pytest.raises(FileExistsError, match=r"holds the checkpoints of an earlier run, .* pass resume=True .* delete"):
        model.fit(max_epochs=1, progress=False, checkpoint_dir=tmp_path)
    assert (tmp_path / CHECKPOINT).read_bytes() == kept and not model.is_trained
    (tmp_path / "checkpoint.rank1.safetensors").write_bytes(kept)  # a data-parallel run's files count too
    (tmp_path / CHECKPOINT).unlink()
    with pytest.raises(FileExistsError, match="earlier run"):
        model.fit(max_epochs=1, progress=False, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    CellVAE(adata, n_hidden=8).fit(max_epochs=1, progress=False, checkpoint_dir="~/ck")  # the home's folder, as written
    assert (tmp_path / "home" / "ck" / CHECKPOINT).is_file() and not (tmp_path / "~").exists()
    with pytest.raises(FileExistsError, match="earlier run"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=1, progress=False, checkpoint_dir="~/ck")


def test_a_checkpoint_of_a_short_run_under_the_earlier_default_warm_up_is_told_as_such(tmp_path, monkeypatch):
    """A 2-epoch run's checkpoint written when the default warm-up was one whole epoch: the same arguments now give
    half an epoch, so the run cannot continue bit for bit; told as cellvae's change, not as the user's arguments."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    with monkeypatch.context() as earlier:
        earlier.setattr(cellvae.model, "default_kl_warmup", lambda epochs: 1)
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    told = r"written by an earlier cellvae, whose default KL warm-up for a run of 2 epochs was one whole epoch .*start over"
    with pytest.raises(ValueError, match=told):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    # the user's own changes beside it are named as before (a review: this message hid them)
    with pytest.raises(ValueError, match=r"was written by a different run: \['kl_warmup_epochs', 'max_epochs'\] differ"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=3, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_a_run_stopped_as_diverged_keeps_that_record_when_resumed(tmp_path, monkeypatch):
    """A review: resuming a finished run that had stopped as diverged gave a clean-looking model, with no warning."""
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=200, n_batches=2, random_state=0)
    monkeypatch.setattr(cellvae.model, "DIVERGED_LOSS_RATIO", 0.9)  # epoch 0 passes the bar (see test_reliability)
    runs = []
    for resume in (False, True):
        with pytest.warns(RuntimeWarning, match=r"training diverged at epoch 0 of 50"):
            model = CellVAE(adata, batch_key="batch").fit(max_epochs=50, progress=False, checkpoint_dir=tmp_path, resume=resume)
        runs.append(model)
    assert [m.history.attrs["diverged_epoch"] for m in runs] == [0, 0]
    np.testing.assert_array_equal(runs[0].get_latent(), runs[1].get_latent())


def test_default_kl_warm_up_and_query_epochs():
    """Warm-up: a quarter of training, whole epochs from 4 on, at most 50; query epochs: ~200,000 cell passes, 5 to
    200 epochs."""
    assert [default_kl_warmup(n) for n in (1, 2, 3, 4, 7, 20, 100, 200, 201, 400)] == [0.25, 0.5, 0.75, 1, 1, 5, 25, 50, 50, 50]
    assert [default_query_epochs(n) for n in (1, 1_000, 2_000, 10_000, 20_000, 100_000)] == [200, 200, 100, 20, 10, 5]


def test_a_checkpoint_whose_best_parameters_do_not_fit_the_model_is_refused(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    with safe_open(tmp_path / CHECKPOINT, "pt") as handle:
        meta, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}
    # as written before checkpoints had a checksum (which refuses any change to the tensors first)
    fields = json.loads(meta["cellvae_checkpoint"])
    del fields["tensors_sha256"]
    meta["cellvae_checkpoint"] = json.dumps(fields)
    best = next(k for k in tensors if k.startswith("best.") and tensors[k].ndim == 2)
    save_file(tensors | {best: tensors[best][:, :-1].contiguous()}, tmp_path / CHECKPOINT, metadata=meta)
    with pytest.raises(ValueError, match="(?s)does not fit this model.*or name another checkpoint_dir"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)
    without_best = {k: v for k, v in tensors.items() if not k.startswith("best.")}
    save_file(without_best, tmp_path / CHECKPOINT, metadata=meta)
    with pytest.raises(ValueError, match="(?s)does not fit this model.*or name another checkpoint_dir"):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_the_disk_refuses_is_told_with_its_path_and_training_goes_on(tmp_path, monkeypatch):
    """A full disk at a checkpoint (here from the third on) loses no training: one warning names the file and the
    checkpoint kept, no staging file is left, and resume continues from the kept checkpoint."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    replace, calls = os.replace, []

    def full_disk_from_the_third(source, target):
        calls.append(target)
        if len(calls) > 2:
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(cellvae.train.os, "replace", full_disk_from_the_third)
    fit = {"max_epochs": 5, "early_stopping": False, "progress": False, "checkpoint_dir": tmp_path}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CellVAE(adata, n_hidden=8).fit(**fit)
    told = [str(w.message) for w in caught if "could not write the checkpoint" in str(w.message)]
    assert len(told) == 1 and len(model.history) == 5  # told once, though epochs 2, 3 and 4 each failed
    assert re.search(
        rf"could not write the checkpoint {re.escape(str(tmp_path / CHECKPOINT))} after epoch 2 \(OSError: .*No space left"
        r".*training goes on .* the checkpoint after epoch 1 is kept, and fit\(\.\.\., resume=True\) continues from it",
        told[0],
    )
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT]
    monkeypatch.setattr(cellvae.train.os, "replace", replace)
    resumed = CellVAE(adata, n_hidden=8).fit(**fit, resume=True)
    assert resumed.history["epoch"].tolist() == [0, 1, 2, 3, 4]  # epochs 0-1 read back, 2-4 trained again
    np.testing.assert_array_equal(resumed.get_latent(progress=False), model.get_latent(progress=False))


def test_resuming_with_another_torch_thread_count_is_told(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    with pytest.warns(
        UserWarning,
        match=rf"written by a run on {threads + 1} torch threads and this one has {threads}: .*"
        rf"resume with torch.set_num_threads\({threads + 1}\)",
    ):
        CellVAE(adata, n_hidden=8).fit(max_epochs=2, progress=False, checkpoint_dir=tmp_path, resume=True)


@pytest.mark.parametrize(
    "files, processes",
    [
        (["checkpoint.rank1.safetensors"], 2),  # rank 0 crashed before its first checkpoint
        (["checkpoint.rank0.safetensors", "checkpoint.rank2.safetensors"], 3),
        (["checkpoint.rank0.previous.safetensors", "checkpoint.rank1.previous.safetensors"], 2),  # killed between renames
        (["checkpoint.rank0.safetensors", "checkpoint.rank1.previous.safetensors"], 2),
    ],
)
def test_resuming_the_files_of_a_data_parallel_run_in_one_process_names_how_many_wrote_them(tmp_path, files, processes):
    for name in files:
        (tmp_path / name).write_bytes(b"written by a data-parallel run")
    assert checkpoint_ranks(tmp_path) == (False, processes)
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=30, random_state=1)
    with pytest.raises(ValueError, match=rf"written by at least {processes} processes and this run has 1"):
        CellVAE(adata).fit(max_epochs=1, progress=False, checkpoint_dir=tmp_path, resume=True)


def test_a_checkpoint_folder_inside_a_saved_models_folder_is_refused_and_other_folders_are_not(tmp_path, monkeypatch):
    """Checkpoints in saved/ck made saved/ no model folder: save(saved, overwrite=True) then refused it, saying it was
    not a model's folder. Folders that merely pass through it (saved/../ck) or hold another library's config.json and
    model.safetensors (a Hugging Face save_pretrained) are no saved cellvae model."""
    adata = cellvae.datasets.simulate(n_cells=100, n_genes=20, random_state=0)
    model = CellVAE(adata, n_hidden=8, n_latent=2).fit(max_epochs=1, progress=False)
    model.save(tmp_path / "saved")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint_dir='saved/ck' lies inside the saved model's folder '.*saved'"):
        model.fit(max_epochs=1, checkpoint_dir="saved/ck", progress=False)
    assert not (tmp_path / "saved" / "ck").exists()
    model.fit(max_epochs=1, checkpoint_dir="saved/../ck", progress=False)
    os.symlink(tmp_path / "saved", tmp_path / "link")  # a link to the model's folder is that folder
    with pytest.raises(ValueError, match=r"checkpoint_dir='link' is a saved model's folder"):
        model.fit(max_epochs=1, checkpoint_dir="link", progress=False)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 8}))
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    model.fit(max_epochs=1, checkpoint_dir="hf", progress=False)  # (that folder itself is no cellvae model's either)
    assert (tmp_path / "hf" / "checkpoint.safetensors").is_file()
    model.fit(max_epochs=1, checkpoint_dir="hf/cellvae_checkpoints", progress=False)
    (tmp_path / "saved" / "notes").mkdir()  # a folder the user added: named when an overwrite is refused
    with pytest.raises(ValueError, match=r"is a folder holding other files than a model's \(notes/\), not a saved cellvae"):
        model.save(tmp_path / "saved", overwrite=True)
