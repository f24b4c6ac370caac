"""The training loop: AdamW, KL warm-up, validation, early stopping, history, fault recovery.

One plain loop, used by :meth:`cellvae.CellVAE.fit`. It works on any
:class:`~cellvae.data.CellLoader`, so in-memory and backed data train the same way.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cellvae.data import CellLoader
from cellvae.module import VAE

MAX_NONFINITE_RETRIES = 5


@dataclass
class TrainSettings:
    """How to train; every field has a user-facing twin in :meth:`cellvae.CellVAE.fit`."""

    max_epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    kl_warmup_epochs: int
    beta: float
    early_stopping: bool
    patience: int
    random_state: int
    progress: bool


def default_max_epochs(n_cells: int) -> int:
    """Epochs for a dataset size: about 1.5 million cell passes, between 20 and 400 epochs."""
    return int(np.clip(round(1.5e6 / max(n_cells, 1)), 20, 400))


def default_kl_warmup(max_epochs: int) -> int:
    """Linear KL warm-up over a quarter of training, at most 50 epochs."""
    return int(min(50, max(1, max_epochs // 4)))


def pick_device(device: str) -> torch.device:
    """Resolve ``"auto"`` to cuda, then mps, then cpu; check that an explicit device exists."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch finds no CUDA GPU; use device='auto' or 'cpu'")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device='mps' was asked for but MPS is not available; use device='auto' or 'cpu'")
    return torch.device(device)


def make_optimizer(vae: VAE, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with the fused kernel where torch has one (CPU and CUDA), else the foreach one."""
    params = [p for p in vae.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type in ("cpu", "cuda"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)


def evaluate(vae: VAE, loader: CellLoader, cells: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mean distortion and rate per cell over ``cells`` (one posterior draw each, no dropout)."""
    was_training = vae.training
    vae.eval()
    totals = {"distortion": 0.0, "rate": 0.0}
    with torch.no_grad():
        for mb in loader.batches(cells, batch_size):
            out = vae(mb.counts, mb.covariates, mb.library, mb.batch_index)
            totals["distortion"] += float(out["distortion"].sum())
            totals["rate"] += float(out["rate"].sum())
    vae.train(was_training)
    return {k: v / max(len(cells), 1) for k, v in totals.items()}


def train(
    vae: VAE,
    loader: CellLoader,
    train_cells: np.ndarray,
    validation_cells: np.ndarray,
    settings: TrainSettings,
) -> pd.DataFrame:
    """Fit ``vae`` in place and return the per-epoch history.

    Non-finite losses or gradients roll the parameters back to the last good epoch and halve
    the learning rate; Ctrl-C stops early and keeps the best parameters so far.
    """
    torch.manual_seed(settings.random_state)
    rng = np.random.default_rng(settings.random_state)
    optimizer = make_optimizer(vae, settings.lr, settings.weight_decay, loader.device)
    steps_per_epoch = max(1, math.ceil(len(train_cells) / settings.batch_size))
    warmup_steps = settings.kl_warmup_epochs * steps_per_epoch
    has_validation = len(validation_cells) > 0
    best = {"loss": math.inf, "state": copy.deepcopy(vae.state_dict()), "epoch": -1}
    last_good = copy.deepcopy(vae.state_dict())
    rows: list[dict] = []
    step, retries, epochs_without_improvement = 0, 0, 0
    bar = tqdm(range(settings.max_epochs), desc="cellvae", unit="epoch", disable=not settings.progress)
    vae.train()
    try:
        for epoch in bar:
            started = time.perf_counter()
            sums = {"loss": 0.0, "distortion": 0.0, "rate": 0.0}
            seen = 0
            for mb in loader.batches(train_cells, settings.batch_size, shuffle=True, rng=rng):
                kl_weight = settings.beta * (min(1.0, step / warmup_steps) if warmup_steps else 1.0)
                out = vae(mb.counts, mb.covariates, mb.library, mb.batch_index, kl_weight=kl_weight)
                optimizer.zero_grad(set_to_none=True)
                out["loss"].backward()
                if not _all_finite(out["loss"], vae):
                    retries += 1
                    if retries > MAX_NONFINITE_RETRIES:
                        raise FloatingPointError(
                            f"training produced non-finite losses or gradients {retries} times; "
                            "check the counts for extreme values or lower lr"
                        )
                    vae.load_state_dict(last_good)
                    optimizer = make_optimizer(vae, optimizer.param_groups[0]["lr"] / 2, settings.weight_decay, loader.device)
                    warnings.warn(
                        f"non-finite loss or gradient at epoch {epoch}; restored the last good parameters "
                        f"and lowered lr to {optimizer.param_groups[0]['lr']:.2e}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    continue
                optimizer.step()
                step += 1
                n = len(mb.cell_index)
                seen += n
                sums["loss"] += float(out["loss"].detach()) * n
                sums["distortion"] += float(out["distortion"].detach().sum())
                sums["rate"] += float(out["rate"].detach().sum())
            last_good = copy.deepcopy(vae.state_dict())
            row = {"epoch": epoch, "kl_weight": kl_weight, "lr": optimizer.param_groups[0]["lr"]}
            row |= {f"train_{k}": v / max(seen, 1) for k, v in sums.items()}
            row["train_elbo"] = -(row["train_distortion"] + row["train_rate"])
            if has_validation:
                val = evaluate(vae, loader, validation_cells, max(settings.batch_size, 1024))
                row["validation_distortion"], row["validation_rate"] = val["distortion"], val["rate"]
                row["validation_loss"] = val["distortion"] + settings.beta * val["rate"]
                row["validation_elbo"] = -(val["distortion"] + val["rate"])
            row["seconds"] = time.perf_counter() - started
            rows.append(row)
            monitored = row["validation_loss"] if has_validation else row["train_loss"]
            bar.set_postfix(loss=f"{monitored:.1f}", refresh=False)
            warmed_up = step >= warmup_steps
            improved = not math.isfinite(best["loss"]) or monitored < best["loss"] - 1e-4 * abs(best["loss"])
            if not warmed_up or improved:
                best = {"loss": monitored if warmed_up else math.inf, "state": last_good, "epoch": epoch}
                epochs_without_improvement = 0
            else:
                epochs_without_improvement += 1
                if settings.early_stopping and epochs_without_improvement >= settings.patience:
                    break
    except KeyboardInterrupt:
        warnings.warn(
            f"training interrupted at epoch {len(rows)}; keeping the best parameters so far (epoch {best['epoch']})",
            RuntimeWarning,
            stacklevel=2,
        )
    finally:
        bar.close()
    if best["epoch"] >= 0:
        vae.load_state_dict(best["state"])
    vae.eval()
    return pd.DataFrame(rows)


def _all_finite(loss: torch.Tensor, vae: VAE) -> bool:
    """Whether the loss and the total gradient norm (one foreach kernel) are finite."""
    if not torch.isfinite(loss):
        return False
    params = [p for p in vae.parameters() if p.grad is not None]
    return bool(torch.isfinite(torch.nn.utils.clip_grad_norm_(params, math.inf))) if params else True
