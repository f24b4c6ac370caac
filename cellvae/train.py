"""The training loop: AdamW, KL warm-up, validation, early stopping, history, fault recovery.

One plain loop, used by :meth:`cellvae.CellVAE.fit`. It works on any
:class:`~cellvae.data.CellLoader`, so in-memory and backed data train the same way; counts
on one GPU (resident there, or a buffer of them at a time) train in steps replayed from CUDA graphs
(:class:`ResidentSteps`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch.nn.parallel import DistributedDataParallel
from tqdm import TqdmWarning

from cellvae.data import (
    BACKED_BLOCK_ROWS,
    CellLoader,
    Covariates,
    Minibatch,
    is_backed_matrix,
    launched_processes,
    library_sizes,
    warn_user,
)
from cellvae.distributions import autograd_on, seed_generators, seeded
from cellvae.module import VAE

with warnings.catch_warnings():  # a notebook without ipywidgets gets the text progress bar, without a warning
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm
from tqdm.std import tqdm as text_tqdm

MAX_NONFINITE_RETRIES = 5
# Work after training (embedding, sampling, diagnostics) shows its bar only once it has lasted this long.
PROGRESS_DELAY_S = 2.0
# Counts densified per validation minibatch (at least a training minibatch): each 2**21 of them (835 cells
# at 2,511 genes) took ~40 MB more at the peak of a default fit on the 28 MB Kang matrix than 2**19 do
VALIDATION_VALUES = 2**19
# In a process group, the ranks agree on a Ctrl-C every this many minibatches and at each epoch's end.
INTERRUPT_CHECK_STEPS = 16
# BatchNorm's running statistics stay per rank between epochs (average_statistics); torch 2.13 renamed the option.
# (forward_sync_buffers=False still broadcasts rank 0's buffers when DDP starts: the same on every rank anyway.)
NO_BUFFER_SYNC_IN_FORWARD = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


@dataclass
class TrainSettings:
    """How to train: the arguments of :meth:`cellvae.CellVAE.fit`, with ``beta`` and ``kl_warmup_epochs``
    from the model's :class:`~cellvae.config.Config`."""

    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    kl_warmup_epochs: float  # (whole epochs unless training is shorter than 4: see default_kl_warmup)
    beta: float
    early_stopping: bool
    patience: int
    random_state: int
    progress: bool = field(default=True, compare=False)  # (not saved with the model: it changes nothing trained)
    precision: str = "float32"  # dtype of the gene-wide matrix multiplies while training (see PRECISIONS)


# scVI's default training above 20,000 cells is this many cell passes: its epoch heuristic gives
# round(400 × 20,000 / n_cells) epochs, at least 1. cellvae's default never trains more epochs than that.
SCVI_CELL_PASSES = 8_000_000
# Training precisions: the dtype the gene-wide layers multiply in (weights and optimizer stay float32).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}


def default_max_epochs(n_cells: int) -> int:
    """Epochs for a dataset size: about 500,000 cell passes, between 20 and 400 epochs, and never
    more epochs than scVI's default, ``SCVI_CELL_PASSES / n_cells`` rounded (so from 400,000 cells on: 8 at
    1M cells, 1 from about 5.33M cells, where 8,000,000 / cells rounds to 1).

    ``n_cells`` counts every cell given to fit, its validation share too. On the 5-donor Kang data
    (7,816 of its 8,684 cells, the rest held out for the comparison: 64 epochs) this reaches a lower held-out
    negative ELBO than scVI's default 400 epochs (benchmarks/README.md); more epochs gain < 2 nats.
    The floor of 20 epochs alone would train an atlas of 10M cells for 200M cell passes, 20 times
    scVI's default (one epoch) at that size.
    """
    n_cells = max(n_cells, 1)
    epochs = int(np.clip(round(5e5 / n_cells), 20, 400))
    return min(epochs, max(1, round(SCVI_CELL_PASSES / n_cells)))


def default_query_epochs(n_cells: int) -> int:
    """Epochs for training a query model (:meth:`cellvae.CellVAE.map_query`): about 200,000 cell passes,
    between 5 and 200 epochs; only the query's few new parameters train, which a large query's first epochs settle
    (a 100,000-cell query: within 0.13 nats per cell of its best validation ELBO after 3 epochs)."""
    return int(np.clip(round(2e5 / max(n_cells, 1)), 5, 200))


def split_cells(cells: np.ndarray, validation_size: float, random_state: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split into (shuffled training cells, sorted validation cells); at least one of each when asked."""
    shuffled = cells[np.random.default_rng(random_state).permutation(len(cells))]
    n_validation = int(round(validation_size * len(shuffled))) if validation_size > 0 else 0
    n_validation = min(max(n_validation, 1 if validation_size > 0 else 0), len(shuffled) - 1)
    return shuffled[n_validation:], np.sort(shuffled[:n_validation])


def train_every_category(training: np.ndarray, validation: np.ndarray, codes: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The split with the validation cells of categories that have no training cell (a batch or a categorical
    covariate's value held by a few cells) moved to training, so that no category's parameters are left as
    drawn; ``codes``: each cell's category code, one array per batch key or categorical covariate."""
    for code in codes:
        untrained = ~np.isin(code[validation], code[training])
        if untrained.any():
            training, validation = np.concatenate([training, validation[untrained]]), validation[~untrained]
    return training, validation


DEFAULT_LR = 1e-3  # of fit and map_query; the posterior-collapse warning names a larger one as a cause


def default_kl_warmup(max_epochs: int) -> float:
    """Linear KL warm-up over a quarter of training, at most 50 epochs: whole epochs from 4 epochs on, else a
    quarter of the steps (an atlas trains 1-3 epochs: a whole epoch of warm-up would be all or most of training)."""
    return int(min(50, max_epochs // 4)) if max_epochs >= 4 else max_epochs / 4


_bar_label: ContextVar[str] = ContextVar("bar_label", default="")


@contextmanager
def bars_labelled(label: str) -> Iterator[None]:
    """Put ``label`` before the description of every progress bar made inside the block (a sweep's beta)."""
    token = _bar_label.set(f"{label} ")
    try:
        yield
    finally:
        _bar_label.reset(token)


def progress_bar(total: int, desc: str, show: bool, unit: str = " cells", iterable: Iterable | None = None) -> text_tqdm:
    """The bar of work after training (over ``iterable``, if given): none unless ``show``, none on data-parallel
    ranks but 0 (as training's), and none for calls shorter than ``PROGRESS_DELAY_S``; it goes when the work ends.
    Cells are counted in k and M; other units (a few comparisons) in whole numbers. A text bar, in Jupyter too:
    Jupyter's widget bar (tqdm.notebook) builds its widgets at once, whatever the delay, and leaves them behind
    (ten a call, never shown for short calls), in the kernel and in the saved notebook."""
    scaled = unit == " cells"
    options = {"desc": _bar_label.get() + desc, "unit": unit, "unit_scale": scaled, "delay": PROGRESS_DELAY_S, "leave": False}
    return text_tqdm(iterable, total=total, **_quiet_if(not show or rank_and_world()[0] > 0), **options)


def _end_bar_here(bar: tqdm) -> None:
    """Make the bar of training that stopped early end full, at the work done. (Jupyter's bar, tqdm.notebook, draws
    against its widget's own maximum, which a new ``total`` leaves as it was: the bar ended "100%" but mostly empty.)"""
    bar.total = bar.n
    if hasattr(bar, "container"):
        bar.container.children[1].max = bar.n
        bar.refresh()


def _quiet_if(quiet: bool) -> dict:
    """tqdm's ``disable`` where the bar must stay quiet, or where the environment variable ``TQDM_DISABLE`` is set
    (tqdm's own switch, as tqdm reads it: any value); otherwise left unset. (Jupyter's bar, tqdm.notebook, passes an
    explicit ``disable=False`` that overrides the variable: it is read here too.)"""
    return {"disable": True} if quiet or os.environ.get("TQDM_DISABLE") else {}


def with_progress(batches: Iterator[Minibatch], total: int, desc: str, show: bool) -> Iterator[tuple[slice, Minibatch]]:
    """``batches`` (minibatches of :class:`~cellvae.data.CellLoader`, in the order of the cells asked for), each with
    the rows its cells take in a per-cell output, counting them on a :func:`progress_bar`.

    Outputs are written into arrays made before the pass: small per-minibatch results kept in a list until the end
    took the holes the freed minibatch temporaries left, so the heap grew with the cells (get_latent of 203,340
    cells: 0.46-0.79 GB above the process's baseline for an 8 MB result; written in place, 0.03-0.05 GB)."""
    start = 0
    # closed however the pass ends: a backed file's reading thread stops even while a traceback holds the caller's frame
    with progress_bar(total, desc, show) as bar, closing(batches):
        for mb in batches:
            rows = slice(start, start + len(mb.cell_index))
            yield rows, mb
            start = rows.stop
            bar.update(len(mb.cell_index))


def pick_device(device: str | torch.device) -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; check that an explicit device exists."""
    if isinstance(device, torch.device):  # torch.device("cuda", 1) as its text, "cuda:1"
        device = device.type if device.type in ("cpu", "mps") else str(device)
    if device == "mps:0":  # (how torch prints a Mac's tensors' device: the one GPU there is)
        device = "mps"
    if not isinstance(device, str):
        raise TypeError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or a torch.device, got {device!r}")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    index = device.removeprefix("cuda:")
    numbered = device.startswith("cuda:") and index.isdecimal() and index == str(int(index))  # (not "cuda:01", "cuda:x")
    if device not in ("cpu", "cuda", "mps") and not numbered:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was asked for but torch finds no CUDA GPU; use device='auto' or 'cpu'")
    if device.startswith("cuda:") and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"device={device!r} was asked for but torch finds {torch.cuda.device_count()} CUDA GPU(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}; use one of those, or device='cuda'"
        )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for but MPS is not available; use device='auto' or 'cpu'")
    return torch.device(device)


def make_optimizer(vae: VAE, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one (CPU and CUDA), else the foreach one.

    On CUDA it is capturable (its step count stays on the GPU), so that a CUDA graph can hold its step.
    """
    params = [p for p in vae.parameters() if p.requires_grad]
    fused = device.type in ("cpu", "cuda")
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused, capturable=device.type == "cuda")
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def evaluate(vae: VAE, loader: CellLoader, cells: np.ndarray, batch_size: int) -> dict:
    """Mean distortion and rate per cell over ``cells`` (one posterior draw each, no dropout), and each latent
    dimension's mean KL (``kl_per_dimension``, which :func:`penalised_rate` floors as training does)."""
    totals = {"distortion": 0.0, "rate": 0.0}
    per_dimension = torch.zeros(vae.config.n_latent, dtype=torch.float64)
    batches = loader.batches(cells, loader.evaluation_batch_size(batch_size), with_sparse=True)
    with vae.evaluating(), torch.no_grad(), closing(batches):
        for mb in batches:
            out = vae(mb.counts, mb.covariates, mb.library, mb.batch_index, sparse=mb.sparse)
            totals["distortion"] += float(out["distortion"].sum())
            totals["rate"] += float(out["rate"].sum())
            per_dimension += out["kl_per_dimension"].sum(0).cpu().double()  # (MPS has no float64)
    means = {k: v / max(len(cells), 1) for k, v in totals.items()}
    return means | {"kl_per_dimension": per_dimension.numpy() / max(len(cells), 1)}


def penalised_rate(terms: dict, free_bits: float) -> float:
    """:func:`evaluate`'s rate as training charges it: with free bits, each dimension's mean KL floored at
    ``free_bits`` (the floor, not the KL below it), so that the best epoch and the divergence check score the
    objective training minimises."""
    if free_bits <= 0:
        return terms["rate"]
    kl = terms["kl_per_dimension"]
    return terms["rate"] + float(np.maximum(kl, free_bits).sum() - kl.sum())


class AgreedInterrupt:
    """Ctrl-C that every rank of a process group acts on at the same minibatch.

    A rank that stopped alone at its own Ctrl-C would leave the others waiting in a collective (a terminal
    or ``srun`` signals each process at a slightly different moment). While training in a process group,
    Ctrl-C only sets a flag; :meth:`check` all-reduces it at points that every rank reaches in the same
    order and raises ``KeyboardInterrupt`` on all of them. A second Ctrl-C stops this rank at once. With one
    process (or outside the main thread, where Python cannot handle signals) Ctrl-C raises as usual.
    As a context manager it listens inside the ``with`` block.
    """

    def __init__(self, world: int):
        self.shared = world > 1
        self.requested = False
        self.previous = None

    def __enter__(self) -> AgreedInterrupt:
        self.listen()
        return self

    def __exit__(self, *exception) -> None:
        self.restore()

    def listen(self) -> None:
        """Take over Ctrl-C (only from Python's default handler: a caller's own handler is left alone)."""
        in_main_thread = threading.current_thread() is threading.main_thread()
        if self.shared and in_main_thread and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.previous = signal.signal(signal.SIGINT, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self.previous)  # a second Ctrl-C raises here and now

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` on every rank if Ctrl-C reached any of them (a collective: all ranks call it)."""
        if self.shared and all_reduce_max([float(self.requested)])[0]:
            raise KeyboardInterrupt

    def restore(self) -> None:
        """Give Ctrl-C back to the handler it had before :meth:`listen`."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None


@autograd_on()
@seeded(None)  # train seeds torch with its random_state; the caller's generator state is restored after
def train(
    vae: VAE,
    loader: CellLoader,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    settings: TrainSettings,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    data_parallel: bool = True,
    interrupts: AgreedInterrupt | None = None,
    trained_before: bool = False,
    diverged_above: float = math.inf,
) -> pd.DataFrame:
    """Fit ``vae`` in place and return the per-epoch history.

    Non-finite losses or gradients roll the parameters back to the last good epoch and halve
    the learning rate; Ctrl-C stops early and keeps the best parameters so far (Ctrl-C before the first
    epoch ends is raised: there is nothing to keep). With
    ``checkpoint_dir`` the full training state is written atomically every ``checkpoint_every``
    epochs; ``resume`` continues from it and ends with the same parameters as an uninterrupted run.
    ``history.attrs["interrupted"]`` says whether Ctrl-C ended the run. In a process group every rank
    calls it and trains its own shard of the cells (DDP), unless ``data_parallel=False``; ``interrupts``
    is the caller's :class:`AgreedInterrupt` where it listened before (while preparing the data), and
    Ctrl-C is given back to its previous handler when training ends. ``trained_before``: ``vae`` holds
    trained weights (a ``resume`` that finds no checkpoint says it continues from them). An epoch whose loss
    (validation, else training) is above ``diverged_above`` nats per cell stops training there, as diverged:
    ``history.attrs["diverged_epoch"]`` names it (waiting for early stopping would spend the run on it).
    """
    has_validation = len(validation_cells) > 0
    rank, world = rank_and_world() if data_parallel else (0, 1)
    if world > 1:  # data parallel: this process trains and validates on its own shard of the cells
        checkpoints = {"checkpoints": checkpoint_dir is not None, "resume": resume, "checkpoint_every": checkpoint_every}
        _check_same_run_on_every_rank(describe_run(vae, loader, train_cells, validation_cells, settings) | checkpoints)
        train_cells, validation_cells = shard(train_cells, rank, world, pad=True), shard(validation_cells, rank, world)
        if checkpoint_dir is not None and not resume:
            refuse_earlier_checkpoints(checkpoint_dir, world)
    seed_generators(settings.random_state + rank)
    rng = np.random.default_rng(settings.random_state if world == 1 else [settings.random_state, rank])
    optimizer = make_optimizer(vae, settings.lr, settings.weight_decay, loader.device)
    # a last minibatch of one cell is skipped where BatchNorm needs two, so it is not a step of the warm-up
    full, leftover = divmod(len(train_cells), settings.batch_size)
    steps_per_epoch = max(1, full + int(leftover > (1 if vae.needs_two_cells else 0)))
    warmup_steps = round(settings.kl_warmup_epochs * steps_per_epoch)
    best = {"loss": math.inf, "state": _snapshot(vae), "epoch": -1}
    # A new best epoch is copied here and then swapped in, so that Ctrl-C during the copy keeps the old one whole.
    spare = _snapshot(vae)
    last_good = _snapshot(vae)
    rows: list[dict] = []
    step, retries, epochs_without_improvement = 0, 0, 0
    start_epoch, stop, interrupted, last_checkpoint, still_improving = 0, False, False, None, False
    checkpoint_failed = False  # a checkpoint could not be written (told once)
    diverged_epoch = None
    checkpoint = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_FILE
    if checkpoint is not None and world > 1:  # each rank keeps its own random-number state
        checkpoint = checkpoint.with_name(f"{checkpoint.stem}.rank{rank}{checkpoint.suffix}")
    run = None if checkpoint is None else describe_run(vae, loader, train_cells, validation_cells, settings)
    loop = None if checkpoint is None or not resume else _resumed(checkpoint, run, vae, optimizer, rng, world, trained_before)
    if loop is not None:
        best, rows, step, retries = loop["best"], loop["history"], loop["step"], loop["retries"]
        diverged_epoch = loop["diverged_epoch"]
        epochs_without_improvement, start_epoch, stop = loop["epochs_without_improvement"], loop["epoch"] + 1, loop["stopped"]
        last_checkpoint = start_epoch
        last_good = _snapshot(vae)
    epochs = range(settings.max_epochs if stop else start_epoch, settings.max_epochs)
    quiet = not settings.progress or rank > 0
    # The bar counts cells (all ranks step through equal shards), so a long epoch of an atlas shows progress too.
    cells_per_epoch = len(train_cells) * world
    bar = tqdm(
        desc=_bar_label.get() + "cellvae",
        unit=" cells",
        unit_scale=True,
        **_quiet_if(quiet),
        initial=epochs.start * cells_per_epoch,
        total=settings.max_epochs * cells_per_epoch,
    )
    # DDP averages the gradients of all ranks during backward (and starts them from rank 0's weights);
    # BatchNorm's running statistics are averaged over the ranks once per epoch (average_statistics).
    forward = DistributedDataParallel(vae, **NO_BUFFER_SYNC_IN_FORWARD) if world > 1 else vae
    # On one GPU the counts stay resident there or, where they do not all fit (a backed file, a large atlas), a
    # buffer of them is refilled in place; either way steps are replayed from CUDA graphs (see ResidentSteps).
    # (Data-parallel ranks gather their minibatches from resident counts too, but step by step: no graphs.)
    resident = loader.resident()
    buffer = loader.device_buffer(settings.batch_size, len(train_cells)) if world == 1 and resident is None else None
    on_device = buffer.tensors if buffer is not None else resident
    steps = ResidentSteps(vae, on_device, optimizer) if on_device is not None and world == 1 else None

    def kl_weight_at(step: int) -> float:
        return settings.beta * (min(1.0, step / warmup_steps) if warmup_steps else 1.0)

    vae.train()
    vae.set_compute_dtype(PRECISIONS[settings.precision])
    interrupts = interrupts or AgreedInterrupt(world)
    try:
        interrupts.listen()
        interrupts.check()  # Ctrl-C while the ranks prepared
        for epoch in epochs:
            started = time.perf_counter()
            at_full_weight = step >= warmup_steps  # the whole epoch trains at the full KL weight
            sums = {"loss": 0.0, "distortion": 0.0, "rate": 0.0}
            seen = 0
            if steps is not None:  # counts on one GPU
                if buffer is None:
                    epoch_rows = (rows for rows in loader.shuffled_rows(train_cells, settings.batch_size, rng))
                else:  # the buffer's read-ahead thread is joined however the epoch ends
                    epoch_rows = buffer.epoch(train_cells, rng)
                with closing(epoch_rows):
                    for positions in epoch_rows:
                        bar.update(len(positions))
                        if len(positions) == 1 and vae.needs_two_cells:
                            continue
                        kl_weight = kl_weight_at(step)
                        steps.step(positions, kl_weight)
                        step += 1
                *totals, seen, failed = steps.collect()
                sums = dict(zip(sums, totals))
                if failed:  # found at the end of the epoch: back to the last good parameters, as below
                    optimizer, retries = _recover(vae, last_good, optimizer, settings, loader, retries, epoch)
                    steps = ResidentSteps(vae, on_device, optimizer)
            else:
                batches = loader.batches(train_cells, settings.batch_size, shuffle=True, rng=rng, with_sparse=True)
                with closing(batches):  # its prefetch thread is joined however the epoch ends (an error, Ctrl-C)
                    for position, mb in enumerate(batches):
                        if position and position % INTERRUPT_CHECK_STEPS == 0:  # every rank has as many minibatches
                            interrupts.check()
                        bar.update(len(mb.cell_index) * world)
                        if len(mb.cell_index) == 1 and vae.needs_two_cells:  # a last minibatch of one cell: BatchNorm cannot
                            continue
                        kl_weight = kl_weight_at(step)
                        out = forward(mb.counts, mb.covariates, mb.library, mb.batch_index, kl_weight=kl_weight, sparse=mb.sparse)
                        optimizer.zero_grad(set_to_none=True)
                        out["loss"].backward()
                        loss = float(out["loss"].detach())
                        # One process checks its loss (a non-finite gradient breaks the parameters, which shows
                        # in the next loss or the end-of-epoch check); several ranks check the all-reduced
                        # gradients, so that all of them take the same decision.
                        if not (math.isfinite(loss) if world == 1 else _gradients_finite(vae)):
                            optimizer, retries = _recover(vae, last_good, optimizer, settings, loader, retries, epoch)
                            continue
                        optimizer.step()
                        step += 1
                        n = len(mb.cell_index)
                        seen += n
                        sums["loss"] += loss * n
                        sums["distortion"] += float(out["distortion"].detach().sum())
                        sums["rate"] += float(out["rate"].detach().sum())
            if world > 1 and not vae.frozen_statistics:  # a query model keeps the reference's statistics
                average_statistics(vae, world)
            if _parameters_finite(vae):
                _copy_state(last_good, vae.state_dict())
            else:
                optimizer, retries = _recover(vae, last_good, optimizer, settings, loader, retries, epoch)
                if steps is not None:  # its graphs step the optimizer they were built with
                    steps = ResidentSteps(vae, on_device, optimizer)
            if world > 1:
                *totals, seen = all_reduce_sums([*sums.values(), seen])
                sums = dict(zip(sums, totals))
            row = {"epoch": epoch, "kl_weight": kl_weight, "lr": optimizer.param_groups[0]["lr"]}
            row |= {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
            row["train_elbo"] = -(row["train_distortion"] + row["train_rate"])
            if has_validation:
                val = _validation_terms(vae, loader, validation_cells, settings.batch_size, world)
                row["validation_distortion"], row["validation_rate"] = val["distortion"], val["rate"]
                row["validation_loss"] = val["distortion"] + settings.beta * penalised_rate(val, vae.config.free_bits)
                row["validation_elbo"] = -(val["distortion"] + val["rate"])
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            monitored = row["validation_loss"] if has_validation else row["train_loss"]
            bar.set_postfix(epoch=f"{epoch + 1}/{settings.max_epochs}", loss=f"{monitored:.1f}", refresh=False)
            warmed_up = step >= warmup_steps
            # The validation loss is at the full beta, so a warm-up epoch can be the best (a model that overfits from
            # the start is not given back worse than it was then); the training loss is weighted by the warm-up's
            # smaller KL weight, so without validation cells the best is looked for among epochs after the warm-up.
            comparable = has_validation or at_full_weight
            improved = not math.isfinite(best["loss"]) or monitored < best["loss"] - 1e-4 * abs(best["loss"])
            if not comparable or improved:
                state = _copy_state(spare, last_good)
                best, spare = {"loss": monitored if comparable else math.inf, "state": state, "epoch": epoch}, best["state"]
                epochs_without_improvement = 0
            elif warmed_up:  # early stopping waits for the warm-up to end
                epochs_without_improvement += 1
                stop = settings.early_stopping and epochs_without_improvement >= settings.patience
            if not monitored <= diverged_above:  # (every rank: the losses are all-reduced)
                stop, diverged_epoch = True, epoch
            if checkpoint is not None and (stop or (epoch + 1) % checkpoint_every == 0 or epoch + 1 == settings.max_epochs):
                # world: resuming with another number of processes is refused (agreed_checkpoint)
                loop = {"epoch": epoch, "step": step, "retries": retries, "stopped": stop, "history": rows, "world": world}
                loop |= {"epochs_without_improvement": epochs_without_improvement, "best": best, "diverged_epoch": diverged_epoch}
                if _checkpoint_written(checkpoint, run, vae, optimizer, rng, loop, last_checkpoint, warned=checkpoint_failed):
                    last_checkpoint = epoch + 1
                else:
                    checkpoint_failed = True
            if stop:
                _end_bar_here(bar)
                break
            interrupts.check()
        still_improving = not stop and _ran_out_improving(rows, best["epoch"], has_validation)
        if still_improving:  # (read from the rows: a resumed finished run trains none)
            bar.set_postfix(ordered_dict=_more_epochs_note(rows, best["epoch"], settings.max_epochs, has_validation))
    except KeyboardInterrupt:
        if not rows:  # no epoch finished: nothing of this run to keep (the caller puts the model back)
            raise
        kept = f"the best parameters so far (epoch {best['epoch']})" if best["epoch"] >= 0 else "the partly trained parameters"
        resumable = ""
        if checkpoint is not None and last_checkpoint is None:
            resumable = f"; no checkpoint was written yet (checkpoint_every={checkpoint_every}), so resume=True cannot continue"
        elif checkpoint is not None:
            # (epochs numbered as in model.history, from 0)
            resumable = f"; fit(..., resume=True) continues the run from its checkpoint after epoch {last_checkpoint - 1}"
        warn_user(
            f"training interrupted during epoch {len(rows)} ({len(rows)} finished; model.history numbers epochs from 0); "
            f"keeping {kept}{resumable}",
            RuntimeWarning,
        )
        _end_bar_here(bar)  # (a bar stopped short reads as failed in Jupyter: red)
        bar.set_postfix_str("stopped by Ctrl-C")
        interrupted = True
    finally:
        interrupts.restore()
        bar.close()
        vae.set_compute_dtype(None)
    if best["epoch"] >= 0:
        vae.load_state_dict(best["state"])
    vae.eval()
    history = pd.DataFrame(rows)
    history.attrs["interrupted"] = interrupted
    history.attrs["still_improving"] = still_improving
    if diverged_epoch is not None:
        history.attrs["diverged_epoch"] = diverged_epoch
    if best["epoch"] >= 0:
        history.attrs["best_epoch"] = best["epoch"]
    return history


def _resumed(
    checkpoint: Path,
    run: dict,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    world: int,
    trained_before: bool,
) -> dict | None:
    """The training state of the run to resume, read into ``vae``, ``optimizer`` and ``rng`` from ``checkpoint``
    (this rank's file, agreed by every rank); None, with a warning, where no checkpoint was written yet."""
    single, ranks = checkpoint_ranks(checkpoint.parent)
    if world > 1:  # each node may see only its own ranks' files
        single, ranks = (int(v) for v in all_reduce_max([single, ranks]))
    # Fewer ranks' files than processes is not refused here (a crash can come before some rank's first
    # checkpoint); agreed_checkpoint refuses files that fewer processes wrote.
    if (world == 1 and ranks and not single) or (world > 1 and single and not ranks) or ranks > world:
        writers = "one process" if single and not ranks else f"at least {ranks} processes"
        raise ValueError(
            f"the checkpoints in {checkpoint.parent} were written by {writers} and this run has {world}: resume with "
            "as many (torchrun --nproc_per_node=N), or delete them to start over"
        )
    source = checkpoint if world == 1 else agreed_checkpoint(checkpoint)
    if source is not None and source.exists():
        return read_checkpoint(source, run, vae, optimizer, rng, world)
    if trained_before:  # e.g. Ctrl-C before the first checkpoint: the model keeps its best epoch so far
        warn_user(
            f"no checkpoint in {checkpoint.parent}: this fit continues from the model's trained weights with a new "
            "KL warm-up, which is not the result of an uninterrupted run; for that, fit a new CellVAE with the "
            "same arguments",
            UserWarning,
        )
    else:
        warn_user(f"no checkpoint in {checkpoint.parent}; training from the start", UserWarning)
    return None


def _checkpoint_written(
    checkpoint: Path,
    run: dict,
    vae: VAE,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    loop: dict,
    last_checkpoint: int | None,
    warned: bool,
) -> bool:
    """Write the checkpoint; where the file system refuses it (a full disk, a quota) one process warns (unless
    ``warned``) and trains on, as the checkpoint written before is still whole. Data-parallel ranks raise instead:
    their checkpoints must stay within an epoch of each other."""
    try:
        write_checkpoint(checkpoint, run, vae, optimizer, rng, loop)
        return True
    except OSError as error:
        failed = f"could not write the checkpoint {checkpoint} after epoch {loop['epoch']} ({type(error).__name__}: {error})"
        if loop["world"] > 1:
            stops = f"{failed}; the run stops, as its processes' checkpoints must agree"
            raise (OSError(stops) if error.errno is None else OSError(error.errno, stops)) from error
        if not warned:
            kept = (
                "no checkpoint was written yet"
                if last_checkpoint is None
                else f"the checkpoint after epoch {last_checkpoint - 1} is kept, and fit(..., resume=True) continues from it"
            )
            warn_user(f"{failed}; training goes on and tries again at the next checkpoint; {kept}", RuntimeWarning)
        return False


def _validation_terms(vae: VAE, loader: CellLoader, cells: np.ndarray, batch_size: int, world: int) -> dict:
    """Mean distortion, rate and KL per latent dimension of the validation ``cells`` (nats per cell), in minibatches of
    at least ``batch_size`` cells; over the cells of every rank where ``world`` > 1 (so all stop early alike)."""
    terms = evaluate(vae, loader, cells, max(batch_size, VALIDATION_VALUES // loader.n_genes))
    if world == 1:
        return terms
    n, per_dimension = len(cells), list(terms["kl_per_dimension"])
    distortion, rate, *per_dimension, n = all_reduce_sums(
        [terms["distortion"] * n, terms["rate"] * n, *(kl * n for kl in per_dimension), n]
    )
    return {"distortion": distortion / n, "rate": rate / n, "kl_per_dimension": np.array(per_dimension) / n}


def _more_epochs_note(rows: list[dict], best_epoch: int, max_epochs: int, has_validation: bool) -> dict[str, str]:
    """The training bar's closing note where the epochs ran out while training improved (in this order: keywords
    would be sorted). The bar counts epochs from 1, model.history numbers them from 0: the best is given in both."""
    last = rows[-1]["validation_loss" if has_validation else "train_loss"]
    kept = (
        "the last"
        if best_epoch == rows[-1]["epoch"]
        else f"epoch {best_epoch + 1} (model.history's {best_epoch}), the last lower by under 1e-4"
    )
    return {"epoch": f"{len(rows)}/{max_epochs}", "loss": f"{last:.1f}", "best": f"{kept}: more epochs may help"}


def _ran_out_improving(rows: list[dict], best_epoch: int, has_validation: bool) -> bool:
    """Whether the epochs ran out while training still improved: the last of several epochs was the best, or its
    validation loss is the lowest of all by less than the 1e-4 (relative) an epoch must gain to count as the best."""
    if len(rows) < 2:  # (one epoch is no trend)
        return False
    if best_epoch == rows[-1]["epoch"]:
        return True
    losses = [row["validation_loss"] for row in rows] if has_validation else []
    return bool(losses) and all(loss > losses[-1] for loss in losses[:-1])


class ResidentSteps:
    """Training steps on counts resident on the device (all cells, or a :class:`~cellvae.data.DeviceBuffer`
    refilled in place): gather, forward, backward and AdamW, with the minibatch's loss, distortion and rate
    summed on the device and read once an epoch.

    On a GPU each step is captured once per minibatch size as a CUDA graph and then replayed. A step
    at batch 128 is ~150 small kernels; launched one by one from Python they leave the GPU idle most of
    the time (an H200 trained 28,000 cells/s so, 206,000 replayed). The first step of each size runs
    as usual (on a side stream, as capture requires) and also warms up the optimizer's state.
    Summing on the device means a non-finite step shows at the epoch's end, not at once.
    """

    def __init__(self, vae: VAE, resident: tuple, optimizer: torch.optim.Optimizer):
        self.vae, self.optimizer = vae, optimizer
        self.counts, self.covariates, self.library, self.batch_index = resident
        device = self.counts.device
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = {} if device.type == "cuda" else None
        self.kl_weight = torch.zeros((), device=device, dtype=torch.float32)
        # Over the finite steps: loss × cells, distortion, rate, cells; then the count of non-finite steps.
        self.totals = torch.zeros(5, dtype=torch.float64, device=device)

    def step(self, rows: torch.Tensor, kl_weight: float) -> None:
        """One optimizer step on the cells at ``rows`` of the resident tensors."""
        self.kl_weight.fill_(kl_weight)
        if self.graphs is None:
            self.optimizer.zero_grad(set_to_none=True)
            self._step(rows)
        elif len(rows) in self.graphs:
            graph, static_rows = self.graphs[len(rows)]
            static_rows.copy_(rows)
            graph.replay()
        else:
            captured = self._run_and_capture(rows)
            if captured is not None:
                self.graphs[len(rows)] = captured

    def collect(self) -> list[float]:
        """The sums since the last call (see ``totals``), read to the host; they start again from zero."""
        values = self.totals.tolist()
        self.totals.zero_()
        return values

    def _step(self, rows: torch.Tensor) -> None:
        out = self.vae(
            self.counts[rows].float(), self.covariates[rows], self.library[rows], self.batch_index[rows], kl_weight=self.kl_weight
        )
        out["loss"].backward()
        self.optimizer.step()
        loss = out["loss"].detach()
        n_cells = torch.full_like(loss, len(rows))
        sums = torch.stack([loss * n_cells, out["distortion"].detach().sum(), out["rate"].detach().sum(), n_cells])
        finite = torch.isfinite(loss)
        self.totals += torch.cat([torch.where(finite, sums, 0.0), (~finite).to(loss.dtype)[None]]).double()

    def _run_and_capture(self, rows: torch.Tensor) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        static_rows = rows.clone()
        side = torch.cuda.Stream(rows.device)
        side.wait_stream(torch.cuda.current_stream(rows.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            self._step(static_rows)  # this minibatch's step, run as usual
        torch.cuda.current_stream(rows.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)  # the graph's backward writes gradients of its own
        try:
            # on the side stream, so on the minibatch's GPU (a capture stream of its own would be the current GPU's)
            with torch.cuda.graph(graph, stream=side):  # recorded, not run
                self._step(static_rows)
        except torch.OutOfMemoryError:  # (a RuntimeError too) fit tells how to need less memory
            raise
        except RuntimeError as error:  # an operation that cannot be captured: go on step by step
            warn_user(f"training without CUDA graphs (slower at small batches): {error}", RuntimeWarning)
            self.graphs = None
            return None
        return graph, static_rows


def _snapshot(vae: VAE) -> dict:
    """A copy of the parameters and buffers; later epochs refill it with :func:`_copy_state`."""
    return {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}


def _copy_state(into: dict, state: dict) -> dict:
    """Copy every tensor of ``state`` into the same-named tensor of ``into``; return ``into``."""
    with torch.no_grad():
        for name, tensor in state.items():
            into[name].copy_(tensor)
    return into


def _gradients_finite(vae: VAE) -> bool:
    """Whether the total gradient norm (one foreach kernel) is finite."""
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(grads))) if grads else True


def _parameters_finite(vae: VAE) -> bool:
    """Whether every parameter is finite (one foreach norm)."""
    return bool(torch.isfinite(torch.nn.utils.get_total_norm(list(vae.parameters()))))


def _recover(
    vae: VAE,
    last_good: dict,
    optimizer: torch.optim.Optimizer,
    settings: TrainSettings,
    loader: CellLoader,
    retries: int,
    epoch: int,
) -> tuple[torch.optim.Optimizer, int]:
    """Restore the last good parameters and halve the learning rate; raise after too many tries."""
    retries += 1
    if retries > MAX_NONFINITE_RETRIES:
        raise FloatingPointError(
            f"training produced non-finite losses or gradients {retries} times; check the counts for extreme values or lower lr"
        )
    vae.load_state_dict(last_good)
    optimizer = make_optimizer(vae, optimizer.param_groups[0]["lr"] / 2, settings.weight_decay, loader.device)
    warn_user(
        f"non-finite loss or gradient at epoch {epoch}; restored the last good parameters "
        f"and lowered lr to {optimizer.param_groups[0]['lr']:.2e}",
        RuntimeWarning,
    )
    return optimizer, retries


# ----------------------------------------------------------------------------- checkpoints

CHECKPOINT_FILE = "checkpoint.safetensors"
# 2: the run's identity includes each cell's batch and covariates; 3: the validation loss (best_loss, history) charges
# each dimension's KL floored at free_bits, as training does (version 2 is read where free_bits is 0: the same loss)
CHECKPOINT_VERSION = 3


def describe_run(
    vae: VAE, loader: CellLoader, train_cells: np.ndarray, validation_cells: np.ndarray, settings: TrainSettings
) -> dict:
    """What a checkpoint must share with a run to continue it bit for bit (model, settings, cells, device)."""
    config = {k: v for k, v in asdict(vae.config).items() if k != "cellvae_version"}
    for name, default in (("reference_categories", {}), ("train_input_layer", False)):  # added in 0.1: older
        if config[name] == default:  # checkpoints, of models that are not query models, still resume
            del config[name]
    cells = hashlib.sha256(np.ascontiguousarray(train_cells, dtype=np.int64).tobytes())
    cells.update(np.ascontiguousarray(validation_cells, dtype=np.int64).tobytes())
    # every cell's library size stands for the counts: other data, or the same cells reordered, differ
    cells.update(np.ascontiguousarray(loader.library, dtype=np.float32).tobytes())
    run = {k: v for k, v in asdict(settings).items() if k != "progress"}
    run["model_config_sha256"] = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    run["cells_and_counts_sha256"] = cells.hexdigest()
    run["covariates_sha256"] = _covariates_digest(loader.covariates)  # the same counts with other batches differ
    run["counts_streamed_from_disk"] = loader.backed  # shuffled by blocks, not as one permutation of the cells
    run["device"] = loader.device.type
    return run


def _covariates_digest(covariates: Covariates | np.ndarray) -> str:
    """SHA-256 of every cell's batch and covariates: their category codes and scaled values (or the matrix given)."""
    digest = hashlib.sha256()
    parts = [*covariates.codes, covariates.continuous] if isinstance(covariates, Covariates) else [covariates]
    for part in parts:
        digest.update(np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def tensors_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the tensors' names, dtypes, shapes and bytes, in name order (saved models and checkpoints carry it)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_checkpoint(
    path: Path, run: dict, vae: VAE, optimizer: torch.optim.Optimizer, rng: np.random.Generator, loop: dict
) -> None:
    """Write parameters, optimizer, RNG and loop state as one safetensors file (temp file, fsync, rename)."""
    tensors = {f"model.{k}": v for k, v in vae.state_dict().items()}
    tensors |= {f"best.{k}": v for k, v in loop["best"]["state"].items()}
    optimizer_state = optimizer.state_dict()
    for index, values in optimizer_state["state"].items():
        tensors |= {f"optimizer.{index}.{name}": torch.as_tensor(value) for name, value in values.items()}
    tensors["rng.torch"] = torch.get_rng_state()
    device = next(vae.parameters()).device
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    if device.type == "mps":  # (dropout and the posterior draws use the device's generator)
        tensors["rng.mps"] = torch.mps.get_rng_state()
    meta = {k: v for k, v in loop.items() if k != "best"}
    meta |= {"best_loss": loop["best"]["loss"], "best_epoch": loop["best"]["epoch"], "run": run}
    meta |= {"version": CHECKPOINT_VERSION, "numpy_rng": rng.bit_generator.state, "param_groups": optimizer_state["param_groups"]}
    meta["model_config_fields"] = _config_fields(vae.config)  # (read only to name what differs: run holds their hash)
    meta["torch_threads"] = torch.get_num_threads()  # (resuming with another count is not bitwise the same run)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta["tensors_sha256"] = tensors_digest(tensors)  # read_checkpoint checks it: damaged bytes are refused, not resumed
    blob = safetensors_bytes(tensors, metadata={"cellvae_checkpoint": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(staging, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        if loop["world"] > 1 and path.exists():
            os.replace(path, previous_checkpoint(path))  # see agreed_checkpoint
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def _config_fields(config) -> dict[str, str]:
    """Each field of a model's config as short text (a long one, such as the gene names, as its length and hash):
    what a checkpoint keeps to name the fields of another run's model that differ."""
    fields = {}
    for name, value in asdict(config).items():
        text = json.dumps(value, sort_keys=True)
        if len(text) > 80:
            text = f"{len(value)} entries, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]}"
        fields[name] = text
    fields.pop("cellvae_version", None)
    return fields


# What read_checkpoint takes from a checkpoint's metadata, with its type (a damaged file is refused, not half read).
CHECKPOINT_FIELDS = {
    "run": dict,
    "epoch": int,
    "step": int,
    "retries": int,
    "stopped": bool,
    "history": list,
    "epochs_without_improvement": int,
    "best_loss": (int, float),
    "best_epoch": int,
    "numpy_rng": dict,
    "param_groups": list,
}


def read_checkpoint(
    path: Path, run: dict, vae: VAE, optimizer: torch.optim.Optimizer, rng: np.random.Generator, world: int = 1
) -> dict:
    """Restore ``vae``, ``optimizer``, ``rng`` and the torch RNG from ``path`` (a checkpoint of one of
    ``world`` processes); return the loop state."""
    files = path if world == 1 else f"the checkpoint.rank*.safetensors files in {path.parent}"
    advice = f"delete {files} (or name another checkpoint_dir) to start over"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads((handle.metadata() or {})["cellvae_checkpoint"])
            # copies, not views of the file mapped into memory: Windows cannot replace a mapped file, which the next
            # checkpoint does while the best parameters and the optimizer's moments are kept
            tensors = {k: handle.get_tensor(k).clone() for k in handle.keys()}
    except (SafetensorError, OSError, KeyError, ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not a readable cellvae checkpoint ({error}); {advice}") from error
    written_digest = meta.get("tensors_sha256") if isinstance(meta, dict) else None  # (earlier checkpoints have none)
    if written_digest is not None and written_digest != tensors_digest(tensors):
        raise ValueError(f"{path} is damaged: its tensors do not match the checksum written with them; {advice}")
    found = meta.get("version") if isinstance(meta, dict) else None
    if found == 2 and vae.config.free_bits > 0:
        raise ValueError(
            f"{path} was written by an earlier cellvae (checkpoint version 2), whose validation loss did not floor "
            f"each dimension's KL at free_bits={vae.config.free_bits:g} as training does: its best epoch cannot be "
            f"compared with the epochs still to come; {advice}"
        )
    if found not in (2, CHECKPOINT_VERSION):
        raise ValueError(
            f"{path} has checkpoint version {found!r}; this cellvae reads version {CHECKPOINT_VERSION} (and 2, without "
            f"free bits): {advice}"
        )
    damaged = [k for k, kind in CHECKPOINT_FIELDS.items() if not isinstance(meta.get(k), kind)]
    if not damaged:  # the loop's counts agree (a hand-edited epoch of -5 trained 15 epochs for max_epochs=8)
        epoch, history = meta["epoch"], meta["history"]
        damaged += ["epoch"] if epoch < 0 or len(history) != epoch + 1 else []
        damaged += ["history"] if not all(isinstance(row, dict) for row in history) else []
        damaged += ["best_epoch"] if not -1 <= meta["best_epoch"] <= epoch else []
        groups = meta["param_groups"]
        numeric = all(isinstance(g, dict) and isinstance(g.get("lr"), (int, float)) and g["lr"] > 0 for g in groups)
        damaged += ["param_groups"] if not numeric else []
    if damaged or "rng.torch" not in tensors:
        raise ValueError(f"{path} is damaged: {damaged or ['rng.torch']} missing, of the wrong type or inconsistent; {advice}")
    differ = sorted(k for k in set(run) | set(meta["run"]) if run.get(k) != meta["run"].get(k))
    if differ:
        was = {k: meta["run"].get(k) for k in differ if not k.endswith("sha256")}
        seeded = (  # (the hash covers the training cells, which the seed draws)
            "; random_state draws the validation cells, so the training cells' hash differs with it alone"
            if "random_state" in differ and "cells_and_counts_sha256" in differ
            else ""
        )
        written = meta.get("model_config_fields")
        model = ""
        if "model_config_sha256" in differ and isinstance(written, dict):  # (earlier checkpoints hold only the hash)
            now = _config_fields(vae.config)
            changed = [k for k in sorted(set(now) | set(written)) if now.get(k) != written.get(k)]
            told = "; ".join(f"{k}: checkpoint {written.get(k, 'none')}, this run {now.get(k, 'none')}" for k in changed[:4])
            model = f"; the model's settings that differ: {told}" if changed else ""
        if differ == ["kl_warmup_epochs"] and meta["run"].get("kl_warmup_epochs") == 1 and run["kl_warmup_epochs"] < 1:
            raise ValueError(  # (the same arguments: cellvae's default changed)
                f"{path} was written by an earlier cellvae, whose default KL warm-up for a run of "
                f"{run['max_epochs']} epochs was one whole epoch (now a quarter of the run's steps), so it cannot be "
                f"continued bit for bit: {advice}"
            )
        raise ValueError(
            f"{path} was written by a different run: {differ} differ{f' (checkpoint: {was})' if was else ''}{model}"
            f"{seeded}; resume with the same data, model and fit arguments, or {advice}"
        )
    try:
        best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        vae.load_state_dict(best_state)  # checks that the best parameters fit the model too
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        optimizer_state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(optimizer_state)
        rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(tensors["rng.torch"])
        if "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], next(vae.parameters()).device)
        if "rng.mps" in tensors:
            torch.mps.set_rng_state(tensors["rng.mps"])
    except (RuntimeError, KeyError, ValueError, TypeError) as error:
        raise ValueError(f"{path} does not fit this model ({error}); {advice}") from error
    threads = meta.get("torch_threads")  # (earlier checkpoints: not recorded)
    if next(vae.parameters()).device.type == "cpu" and isinstance(threads, int) and threads != torch.get_num_threads():
        warn_user(
            f"{path} was written by a run on {threads} torch threads and this one has {torch.get_num_threads()}: "
            "training goes on, but sums in another order, so the model will not be bitwise the one an uninterrupted "
            f"run gives; for that, resume with torch.set_num_threads({threads}) (or OMP_NUM_THREADS={threads})",
            UserWarning,
        )
    best = {"loss": meta["best_loss"], "state": best_state, "epoch": meta["best_epoch"]}
    diverged = meta.get("diverged_epoch")  # (None: not stopped as diverged, or written before it was kept)
    loop = {k: meta[k] for k in ("epoch", "step", "retries", "stopped", "history", "epochs_without_improvement")}
    return loop | {"best": best, "diverged_epoch": diverged if isinstance(diverged, int) else None}


def previous_checkpoint(path: Path) -> Path:
    """Where a rank of a data-parallel run keeps its checkpoint before the last one."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def agreed_checkpoint(path: Path) -> Path | None:
    """This rank's checkpoint of the newest epoch that every rank has (None: some rank has none).

    A crash between the ranks' writes leaves some ranks one checkpoint ahead (collectives keep
    them within one epoch of each other); those resume from their previous file, so that all
    ranks continue from the same epoch instead of waiting forever on each other.
    """
    epochs, writers = {}, set()
    for candidate in (previous_checkpoint(path), path):
        try:
            with safe_open(str(candidate), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["cellvae_checkpoint"])
            epochs[int(meta["epoch"])] = candidate
            writers.add(int(meta.get("world", 0)))  # 0: written before the number was recorded
        except (SafetensorError, OSError, KeyError, ValueError, TypeError, RecursionError):
            continue
    world = rank_and_world()[1]
    # A rank without a file may have crashed before its first write, or the run had fewer processes (then
    # starting over would silently throw the others' progress away): refused on every rank.
    other = int(all_reduce_max([float(max(writers - {0, world}, default=0))])[0])
    if other:
        raise ValueError(
            f"the checkpoints in {path.parent} were written by {other} processes and this run has {world}: resume "
            f"with as many (torchrun --nproc_per_node={other}), or delete them to start over"
        )
    agreed = int(-all_reduce_max([-max(epochs, default=-1)])[0])
    # every rank raises (rather than one raising while the others wait for it)
    if agreed >= 0 and all_reduce_max([float(agreed not in epochs)])[0]:
        raise ValueError(
            f"the ranks' checkpoints next to {path} are from different epochs (this rank has {sorted(epochs)}, "
            f"some rank only epoch {agreed}); delete them (or name another checkpoint_dir) to start over"
        )
    return epochs.get(agreed)


# ----------------------------------------------------------------------------- data parallel (DDP)


def setup_distributed(device: torch.device) -> torch.device:
    """Join the process group when launched by ``torchrun``; return this process's device.

    ``torchrun --nproc_per_node=N`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``; the group uses
    nccl on CUDA and gloo on CPU, and each process the GPU ``cuda:LOCAL_RANK`` (another ``cuda:N`` asked for is
    replaced, with a warning: ``CUDA_VISIBLE_DEVICES`` chooses torchrun's GPUs). A group the caller initialised
    already is used as it is, on the GPU the caller chose (``device="cuda:N"``, or ``torch.cuda.set_device``).
    One process alone (no torchrun) is left untouched.
    """
    launched = launched_processes() > 1
    grouped = launched or (dist.is_available() and dist.is_initialized())
    # (a group of several processes: DistributedDataParallel would refuse mps once the data is read)
    if device.type == "mps" and (launched or (grouped and dist.get_world_size() > 1)):
        raise ValueError(
            "data-parallel training runs on CUDA GPUs (nccl) or on CPUs (gloo), whose process groups cannot reduce "
            "tensors on an Apple GPU (mps): pass device='cpu' (--device cpu), or train in one process on mps"
        )
    if device.type == "cuda" and grouped:
        if "LOCAL_RANK" in os.environ:  # torchrun's: this process's GPU on its node
            local, gpus = int(os.environ["LOCAL_RANK"]), torch.cuda.device_count()
            if local >= gpus:  # (torch's "invalid device ordinal" otherwise, from set_device)
                raise ValueError(
                    f"this process is torchrun's local rank {local}, which trains on cuda:{local}, but torch finds "
                    f"{gpus} CUDA GPU(s) on this node: start at most {gpus} processes per node "
                    f"(torchrun --nproc_per_node={gpus}), or train on the CPU (device='cpu')"
                )
            if device.index is not None and device.index != local:  # (told by the rank it concerns)
                warn_user(
                    f"device cuda:{device.index} was asked for, but under torchrun each process trains on the GPU of "
                    f"its local rank: this one (local rank {local}) on cuda:{local}; to choose the GPUs torchrun's "
                    "processes use, set CUDA_VISIBLE_DEVICES (e.g. CUDA_VISIBLE_DEVICES=2,3 torchrun --nproc_per_node=2 "
                    "...) and pass device='cuda' (or f'cuda:{LOCAL_RANK}')",
                    UserWarning,
                    every_rank=True,
                )
            device = torch.device("cuda", local)
        else:  # a group the caller made (mp.spawn, srun): the GPU it chose, cuda:N or torch.cuda.set_device's
            device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        torch.cuda.set_device(device)
    if launched and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0 and 1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard(cells: np.ndarray, rank: int, world: int, pad: bool = False) -> np.ndarray:
    """This rank's part of the cells: runs of at most 256 consecutive sorted cells dealt out in turn.

    Each rank reads contiguous runs of a backed file, and every region of the file reaches every
    rank: in a file sorted by batch each rank sees every batch, so its minibatches mix batches
    (as ``batch_mmd`` and BatchNorm need). The runs are of equal size (±1 cell). With ``pad`` every
    part gets the same length (short parts repeat their own cells), so all ranks take the same
    number of steps, as the gradient all-reduce requires.
    """
    ordered = np.sort(np.asarray(cells, dtype=np.int64))
    n_rounds = max(1, math.ceil(len(ordered) / (world * BACKED_BLOCK_ROWS)))
    runs = np.array_split(ordered, world * n_rounds)
    part = np.concatenate(runs[rank::world])
    longest = max(sum(len(run) for run in runs[r::world]) for r in range(world))
    if pad and len(part) < longest:
        part = np.resize(part if len(part) else ordered, longest)
    return part


def average_statistics(vae: VAE, world: int) -> None:
    """Average BatchNorm's running means and variances over the ranks, so that all hold one model."""
    statistics = [
        buffer
        for module in vae.modules()
        if isinstance(module, torch.nn.BatchNorm1d)
        for buffer in (module.running_mean, module.running_var)
    ]
    if statistics:
        flat = torch.cat([b.reshape(-1) for b in statistics])
        dist.all_reduce(flat)
        for buffer, values in zip(statistics, flat.div_(world).split([b.numel() for b in statistics])):
            buffer.copy_(values.view_as(buffer))


def refuse_earlier_checkpoints(checkpoint_dir: str | os.PathLike, world: int) -> None:
    """Raise, on every rank, where ``checkpoint_dir`` holds an earlier run's checkpoints, which a run that does not
    resume would replace after its first epoch."""
    earlier = any(checkpoint_ranks(Path(checkpoint_dir)))  # (none in a folder not made yet)
    if world > 1:
        earlier = bool(all_reduce_max([float(earlier)])[0])
    if earlier:
        raise FileExistsError(
            f"checkpoint_dir={str(checkpoint_dir)!r} holds the checkpoints of an earlier run, which this fit would "
            "replace; pass resume=True to continue that run (with the settings it was started with), or delete its "
            "checkpoint*.safetensors files (or name another folder) to start afresh (with other settings, e.g. more epochs)"
        )


def checkpoint_ranks(folder: Path) -> tuple[bool, int]:
    """Whether ``folder`` holds a one-process checkpoint, and the highest rank + 1 of the ranks' files (0: none)."""
    ranks = [
        int(match.group(1))
        for path in folder.glob("checkpoint.rank*.safetensors")
        if (match := re.fullmatch(r"checkpoint\.rank(\d+)(\.previous)?\.safetensors", path.name))
    ]
    return (folder / CHECKPOINT_FILE).exists(), max(ranks, default=-1) + 1


def library_sizes_across_ranks(
    matrix, columns: np.ndarray | None, check_as: str, cell_names: pd.Index | None = None
) -> np.ndarray:
    """Checked library sizes of all cells; in a data-parallel run each rank reads only its part of a backed matrix.

    Rank ``r`` of ``N`` checks and sums the ``r``-th contiguous ``1/N`` of the cells, then the ranks
    add up their parts. If any rank finds invalid counts, every rank raises (that rank with the
    details), so none waits forever for the others. In-memory matrices (every rank holds all of
    them) and single processes are checked and summed whole; ranks that disagree on which it is
    all raise, as do ranks given other cells (``cell_names``, the AnnData's obs_names, differ: e.g. each process
    its own part of a backed file, whose library sizes would otherwise be summed across the parts unnoticed).
    """
    rank, world = rank_and_world()
    if world == 1:
        return library_sizes(matrix, columns, check_as=check_as)
    backed = float(is_backed_matrix(matrix))
    some_backed, negated_all_backed = all_reduce_max([backed, -backed])
    if some_backed != -negated_all_backed:
        raise ValueError(
            f"some processes of this data-parallel run read {check_as} from disk (a backed or Zarr AnnData) and others "
            "from memory: every process must call fit on the same AnnData, opened the same way"
        )
    if not backed:  # (every rank sums all of them: the run's fingerprint compares them)
        return library_sizes(matrix, columns, check_as=check_as)
    if cell_names is not None and not _same_on_every_rank("\0".join(map(str, cell_names))):
        raise ValueError(
            "the processes of this data-parallel run were given different cells (their AnnData objects' obs_names "
            "differ): every process must call fit on the same AnnData (all of its cells, not its own part), and each "
            "then reads and trains its own part"
        )
    bounds = np.linspace(0, matrix.shape[0], world + 1).astype(np.int64)
    rows = range(int(bounds[rank]), int(bounds[rank + 1]))
    problem: Exception | None = None
    try:
        part = library_sizes(matrix, columns, check_as=check_as, rows=rows)
    except (TypeError, ValueError) as error:
        problem, part = error, np.zeros(len(rows))
    failed, most_cells, negated_fewest_cells = all_reduce_max([float(problem is not None), matrix.shape[0], -matrix.shape[0]])
    if most_cells != -negated_fewest_cells:
        raise ValueError(
            f"the processes of this data-parallel run read AnnData objects of different sizes ({-negated_fewest_cells:.0f} "
            f"to {most_cells:.0f} cells): every process must call fit on the same AnnData, and each then reads its own part"
        )
    if failed:
        if problem is not None:
            raise problem
        raise ValueError(f"{check_as} has invalid counts in the cells another process read; its error says which")
    totals = torch.zeros(matrix.shape[0], dtype=torch.float64, device=_collective_device())
    totals[rows.start : rows.stop] = torch.from_numpy(part).to(totals.device)
    dist.all_reduce(totals)
    return totals.cpu().numpy()


def _same_on_every_rank(identity: str) -> bool:
    """Whether every rank of the process group holds the same ``identity`` (compared by a 48-bit digest, which float64
    carries exactly)."""
    fingerprint = float(int(hashlib.sha256(identity.encode()).hexdigest()[:12], 16))
    largest, negated_smallest = all_reduce_max([fingerprint, -fingerprint])
    return largest == -negated_smallest


def _check_same_run_on_every_rank(run: dict) -> None:
    """Every rank raises if the ranks were given different data or settings (their collectives would
    otherwise not match: a hang, or a crash in gloo/nccl)."""
    if not _same_on_every_rank(json.dumps(run, sort_keys=True)):
        raise ValueError(
            "the processes of this data-parallel run were given different data or settings (the AnnData, the model's "
            "options or fit's arguments, e.g. random_state differs between ranks): every process must call fit with the "
            "same arguments on the same AnnData, and each then trains its own part of the cells"
        )


def all_reduce_sums(values: list[float]) -> list[float]:
    """Sums over all ranks of a few numbers (float64)."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: list[float]) -> list[float]:
    """Maxima over all ranks of a few numbers (float64)."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _all_reduce(values: list[float], op) -> list[float]:
    totals = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(totals, op=op)
    return totals.tolist()


def _collective_device() -> torch.device:
    """Where tensors for collectives live: the rank's GPU under nccl, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
