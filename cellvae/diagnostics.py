"""What a trained VAE does with its latent space: rate and distortion, posterior collapse, log p(x), inference gaps.

Pure functions over a :class:`~cellvae.module.VAE` and a :class:`~cellvae.data.CellLoader`;
:class:`~cellvae.CellVAE` exposes each one as a method. All quantities are in nats per cell.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from cellvae.data import CellLoader, Minibatch
from cellvae.distributions import autograd_on, seeded
from cellvae.module import VAE, importance_log_weights, iwae_bound
from cellvae.train import DEFAULT_LR, with_progress

ACTIVITY_THRESHOLD = 0.01
COLLAPSED_KL = 0.1  # nats per cell: an inactive dimension with less KL than this has the prior as posterior
REFINE_DRAWS = 4  # draws of z per refinement step in inference_gaps: steadier steps, a better q*
CHECK_DRAWS = 32  # common draws on which each cell's refined q must beat the encoder's to be kept
# Elements (draws × cells × genes) of the arrays of one refinement chunk: keeps its memory to a few hundred MiB.
CHUNK_ELEMENTS = 2**25
# ... and of one importance-sampling chunk, smaller: its many element-wise passes run 2x faster on arrays of
# 16 MiB, near a CPU's cache, than on arrays of 128 MiB (1,000 draws of 200 cells: 4.8 vs 11.0 s).
SCORE_ELEMENTS = 2**22


class PosteriorCollapseWarning(UserWarning):
    """Most latent dimensions of a trained model carry no information about the cell.

    ``fit`` warns when more than half of the dimensions are collapsed (their posterior means' variance
    across cells at most 0.01 and a KL under 0.1 nats per cell) or all dimensions together carry under
    0.5 nats per cell. A dimension that varies a little yet carries almost nothing is not counted as collapsed
    by the first rule: ``kl_per_dimension`` shows each one's KL.
    """


@contextmanager
def evaluation(vae: VAE, random_state: int) -> Iterator[None]:
    """Dropout off and torch's global generators seeded, both restored afterwards."""
    with vae.evaluating(), seeded(random_state):
        yield


def rate_distortion(
    vae: VAE, loader: CellLoader, cells: np.ndarray, *, n_samples: int = 1, batch_size: int = 1024, progress: bool = False
) -> dict:
    """Per-cell rate KL(q(z|x) || p(z)) and distortion −E_q[log p(x|z)] (``n_samples`` draws of z)."""
    rate, distortion = np.empty(len(cells)), np.empty(len(cells))
    per_pass = max(1, loader.evaluation_batch_size(batch_size) // n_samples)  # the draws multiply the memory
    with torch.no_grad():
        for rows, mb in with_progress(loader.batches(cells, per_pass), len(cells), "rate_distortion", progress):
            q = vae.inference(mb.counts, mb.covariates, sample=False)
            z = vae.sample_posterior(q["mean"], q["scale"], n_samples)
            log_lik = vae.log_likelihood_draws(z, mb.counts, mb.covariates, mb.library, mb.batch_index)
            distortion[rows] = -log_lik.mean(0).cpu().numpy()
            rate[rows] = vae.kl_divergence(q["mean"], q["scale"]).cpu().numpy()
    return {"rate": rate, "distortion": distortion}


def posterior_statistics(
    vae: VAE, loader: CellLoader, cells: np.ndarray, *, batch_size: int = 4096, progress: bool = False, desc: str = ""
) -> tuple[np.ndarray, np.ndarray]:
    """Two statistics of each latent dimension, from one pass over ``cells``: the mean over cells of its
    KL(q(z_d|x) || N(0, 1)), and its activity, the variance across cells of its posterior mean,
    Cov_x(E_q[z_d]) (Burda et al., 2016). Each of length n_latent. ``progress``: a progress bar named ``desc`` (after 2 s)."""
    total = torch.zeros(vae.config.n_latent, dtype=torch.float64)
    # the posterior means' variance, merged minibatch by minibatch (Chan et al.): memory does not grow with the cells
    seen, mean, squares = 0, torch.zeros_like(total), torch.zeros_like(total)
    with torch.no_grad():
        batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
        for _, mb in with_progress(batches, len(cells), desc, progress):
            q = vae.inference(mb.counts, mb.covariates, sample=False)
            # (on the CPU before float64, which MPS lacks)
            total += vae.kl_per_dimension(q["mean"], q["scale"]).sum(0).cpu().double()
            codes = q["mean"].cpu().double()
            n, batch_mean = len(codes), codes.mean(0)
            delta = batch_mean - mean
            mean += delta * n / (seen + n)
            squares += ((codes - batch_mean) ** 2).sum(0) + delta**2 * seen * n / (seen + n)
            seen += n
    return (total / max(len(cells), 1)).numpy(), (squares / max(seen, 1)).numpy()


def collapse_message(
    kl: np.ndarray,
    activity: np.ndarray,
    threshold: float = ACTIVITY_THRESHOLD,
    *,
    lr: float = DEFAULT_LR,
    n_layers: int = 1,
    normalization: str = "layer",
) -> str | None:
    """The posterior-collapse warning text when most dimensions are collapsed or the total KL is near zero, else None.

    A collapsed dimension is inactive (its posterior means' variance across cells is at most ``threshold``) and
    its KL is near zero: its posterior is the prior. An inactive dimension with a large KL is not collapsed:
    narrow posteriors place the cells at a scale finer than the threshold (seen on deep read counts).
    Training at an ``lr`` above fit's default collapses posteriors too; the text then names it first. So do deep
    networks (``n_layers`` of 3 or more) with LayerNorm: on pbmc68k, 5 layers kept 1–4 of 10 dimensions active
    (kNN cell-type accuracy 0.68–0.75), 1 layer all 10 (0.81), 5 layers with BatchNorm 0.79–0.80.
    """
    collapsed = (activity <= threshold) & (kl < COLLAPSED_KL)
    n_used, n_latent = len(activity) - int(collapsed.sum()), len(activity)
    if 2 * n_used >= n_latent and kl.sum() >= 0.5:
        return None
    if 2 * n_used < n_latent:
        found = (
            f"posterior collapse: {n_used} of {n_latent} latent dimensions tell cells apart and their KLs sum to "
            f"{kl.sum():.3g} nats per cell"
        )
    else:  # the dimensions vary across cells, but all together carry almost no information about them
        found = (
            f"posterior collapse: the latent space carries {kl.sum():.3g} nats per cell (its KLs summed), too little to "
            f"tell cells apart, though {n_used} of {n_latent} dimensions vary across cells"
        )
    remedies = (
        "lower beta, lengthen KL warm-up (kl_warmup=...), or use free bits (free_bits=...); "
        "after very few epochs, train longer first"
    )
    if n_layers >= 3 and normalization == "layer":
        remedies = f"use fewer layers, or normalization='batch' (n_layers={n_layers} with LayerNorm collapses); else {remedies}"
    if lr > DEFAULT_LR:  # free bits then silence the warning, but the latent space stays worse than at the default lr
        remedies = f"train with a smaller learning rate first (lr={lr:g} is above the default {DEFAULT_LR:g}); else {remedies}"
    return f"{found}; {remedies}"


def marginal_log_likelihood(
    vae: VAE, loader: CellLoader, cells: np.ndarray, *, n_samples: int = 100, batch_size: int = 1024, progress: bool = False
) -> np.ndarray:
    """Importance-weighted (IWAE) estimate of log p(x) of each cell with ``n_samples`` encoder draws; K=1 is the ELBO."""
    n_genes = vae.config.n_genes
    chunk = max(1, min(batch_size, SCORE_ELEMENTS // (n_samples * n_genes)))
    out = np.empty(len(cells))
    with torch.no_grad():
        for rows, mb in with_progress(loader.batches(cells, chunk), len(cells), "marginal_log_likelihood", progress):
            log_w = importance_log_weights(vae, mb.counts, mb.covariates, mb.library, mb.batch_index, n_samples)
            out[rows] = iwae_bound(log_w).cpu().double().numpy()
    return out


# ----------------------------------------------------------------------------- per-cell refinement


def _to_free(vae: VAE, scale: torch.Tensor) -> torch.Tensor:
    """Unconstrained form of a posterior scale: log-variances stay, a Cholesky factor gets a log diagonal."""
    if vae.config.posterior == "diagonal":
        return scale.clone()
    diagonal = torch.diagonal(scale, dim1=-2, dim2=-1)
    return torch.tril(scale, -1) + torch.diag_embed(torch.log(diagonal))


def _from_free(vae: VAE, free: torch.Tensor) -> torch.Tensor:
    if vae.config.posterior == "diagonal":
        return free
    return torch.tril(free, -1) + torch.diag_embed(torch.exp(torch.diagonal(free, dim1=-2, dim2=-1)))


def _objective(
    vae: VAE, mb: Minibatch, mean, scale, noise, beta: float, constants: bool = True, free_dims: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(x|z_s) − beta·KL per noise draw s and cell, samples × cells; its mean over draws is the ELBO at beta = 1.
    ``constants=False`` leaves out the likelihood's terms that do not depend on z (for gradients and differences);
    ``free_dims`` (a mask of latent dimensions) leaves their KL out, as free bits do in training below the floor."""
    z = vae.reparameterise(mean, scale, noise)
    log_lik = vae.log_likelihood_draws(z, mb.counts, mb.covariates, mb.library, mb.batch_index, constants)
    penalised = vae.kl_divergence(mean, scale)
    if free_dims is not None:
        penalised = penalised - (vae.kl_per_dimension(mean, scale) * free_dims).sum(-1)
    return log_lik - beta * penalised


@autograd_on()
def refine_posterior(
    vae: VAE,
    mb: Minibatch,
    mean: torch.Tensor,
    scale: torch.Tensor,
    *,
    n_steps: int,
    lr: float = 0.01,
    beta: float = 1.0,
    n_samples: int = 1,
    n_check_samples: int = CHECK_DRAWS,
    free_dims: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Improve each cell's own Gaussian q(z|x) by Adam steps on its objective, the decoder frozen.

    Starts from ``(mean, scale)`` (the encoder's output). Each cell's parameters get only the
    gradient of its own term, so cells are refined independently. Stochastic steps can overshoot,
    so at the end each cell keeps the refined q only where it scores higher than the start on
    ``n_check_samples`` common draws. ``free_dims`` (a 0/1 mask of latent dimensions, from :func:`free_dimensions`)
    leaves out their KL, as training's free bits do below the floor (else refinement pulls them back towards
    the prior). Returns the refined ``(mean, scale)``, detached.
    """
    start_mean, start_scale = mean.detach(), scale.detach()
    free_mean = start_mean.clone().requires_grad_(True)
    free_scale = _to_free(vae, start_scale).requires_grad_(True)
    optimizer = torch.optim.Adam([free_mean, free_scale], lr=lr)
    for step in range(n_steps):
        # cosine decay to a tenth of lr: large steps first, then small ones that settle despite the noise
        optimizer.param_groups[0]["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / n_steps)))
        noise = torch.randn((n_samples, *start_mean.shape), device=mean.device, dtype=mean.dtype)
        objective = _objective(vae, mb, free_mean, _from_free(vae, free_scale), noise, beta, False, free_dims)
        loss = -objective.mean(0).sum()
        grads = torch.autograd.grad(loss, [free_mean, free_scale])
        free_mean.grad, free_scale.grad = grads
        optimizer.step()
    with torch.no_grad():
        refined_mean, refined_scale = free_mean.detach(), _from_free(vae, free_scale.detach())
        noise = torch.randn((n_check_samples, *start_mean.shape), device=mean.device, dtype=mean.dtype)
        # a few draws at a time: all of them at once made draws × cells × genes arrays of GBs, which took
        # longer than the steps (3,000 cells × 2,431 genes: 13 s and 1.9 GB, against 1–3 s for 1–20 steps)
        draws = max(1, SCORE_ELEMENTS // (len(start_mean) * vae.config.n_genes))
        gain = torch.zeros(len(start_mean), device=mean.device, dtype=mean.dtype)
        for first in range(0, n_check_samples, draws):
            part = noise[first : first + draws]
            refined = _objective(vae, mb, refined_mean, refined_scale, part, beta, False, free_dims)
            gain += (refined - _objective(vae, mb, start_mean, start_scale, part, beta, False, free_dims)).sum(0)
        better = gain > 0
        keep = better.view(-1, *([1] * (start_scale.dim() - 1)))
        return torch.where(better[:, None], refined_mean, start_mean), torch.where(keep, refined_scale, start_scale)


def refined_latent(
    vae: VAE,
    loader: CellLoader,
    cells: np.ndarray,
    *,
    n_steps: int,
    lr: float = 0.01,
    beta: float = 1.0,
    free_bits: float = 0.0,
    batch_size: int = 1024,
    progress: bool = False,
) -> np.ndarray:
    """Posterior means after :func:`refine_posterior` (semi-amortized inference), cells × n_latent; with
    ``free_bits``, the dimensions whose mean KL over all ``cells`` is below it refine free of KL."""
    free_dims = free_dimensions(vae, loader, cells, free_bits, batch_size) if free_bits > 0 else None
    out = np.empty((len(cells), vae.config.n_latent), dtype=np.float32)
    batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
    for rows, mb in with_progress(batches, len(cells), "get_latent (refining)", progress):
        with torch.no_grad():
            q = vae.inference(mb.counts, mb.covariates, sample=False)
        mean, _ = refine_posterior(vae, mb, q["mean"], q["scale"], n_steps=n_steps, lr=lr, beta=beta, free_dims=free_dims)
        out[rows] = mean.float().cpu().numpy()
    return out


def free_dimensions(vae: VAE, loader: CellLoader, cells: np.ndarray, free_bits: float, batch_size: int) -> torch.Tensor:
    """0/1 mask of the latent dimensions whose KL, averaged over the encoder's posteriors of ``cells``, is below
    ``free_bits``: those training's free bits leave unpenalised."""
    kl = None
    with torch.no_grad():
        for mb in loader.batches(cells, loader.evaluation_batch_size(batch_size)):
            q = vae.inference(mb.counts, mb.covariates, sample=False)
            part = vae.kl_per_dimension(q["mean"], q["scale"]).cpu().double().sum(0)  # (float64 on the CPU: not on MPS)
            kl = part if kl is None else kl + part
    return (kl / len(cells) < free_bits).to(device=loader.device, dtype=torch.float32)


def inference_gaps(
    vae: VAE,
    loader: CellLoader,
    cells: np.ndarray,
    *,
    n_steps: int = 500,
    lr: float = 0.01,
    n_samples: int = 1000,
    n_elbo_samples: int = 64,
    batch_size: int = 512,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Per-cell ELBOs of the encoder's q and of the refined per-cell q*, and an IWAE estimate of log p(x).

    Following Cremer, Li & Duvenaud (2018): amortization gap = ELBO(q*) − ELBO(q_encoder),
    approximation gap = log p(x) − ELBO(q*). Both ELBOs use the same ``n_elbo_samples`` draws of
    noise; log p(x) is the IWAE bound with ``n_samples`` draws from q* (a tighter proposal than
    the encoder's), which is ≥ ELBO(q*) in expectation and ≤ log p(x), so the approximation gap is
    a lower bound in expectation. The refinement takes ``REFINE_DRAWS`` draws per step with a
    decaying learning rate (500 steps reach within ~2% of the gap found with 1,000). ``amortization_gap_se``
    is the Monte-Carlo standard error of each cell's amortization gap given the refined q* (it leaves
    out the randomness of the refinement itself); ``approximation_gap_se`` that of the approximation gap
    (the IWAE estimate's by the delta method, with the refined ELBO's, from independent draws); NaN
    where one draw cannot give one.
    """
    n_genes = vae.config.n_genes
    # Refined together, as many cells as the check's draws allow (a refinement step costs about the same for
    # a few cells as for hundreds); scored in smaller parts, as many as the importance samples allow.
    refined_cells = max(1, min(batch_size, CHUNK_ELEMENTS // (max(REFINE_DRAWS, CHECK_DRAWS) * n_genes)))
    scored_cells = max(1, min(batch_size, SCORE_ELEMENTS // (max(n_samples, n_elbo_samples) * n_genes)))
    names = ("elbo_encoder", "elbo_refined", "log_px", "amortization_gap_se", "approximation_gap_se")
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for _, cells_refined in with_progress(loader.batches(cells, refined_cells), len(cells), "inference_gaps", progress):
        with torch.no_grad():
            q_refined = vae.inference(cells_refined.counts, cells_refined.covariates, sample=False)
        mean_refined, scale_refined = refine_posterior(
            vae, cells_refined, q_refined["mean"], q_refined["scale"], n_steps=n_steps, lr=lr, n_samples=REFINE_DRAWS
        )
        for start in range(0, len(mean_refined), scored_cells):
            part = slice(start, start + scored_cells)
            mb = _some_cells(cells_refined, part)
            q = {"mean": q_refined["mean"][part], "scale": q_refined["scale"][part]}
            mean, scale = mean_refined[part], scale_refined[part]
            _score_gaps(vae, mb, q, mean, scale, n_samples, n_elbo_samples, parts)
    out = {k: np.concatenate(v) for k, v in parts.items()}
    out["amortization_gap"] = out["elbo_refined"] - out["elbo_encoder"]
    out["approximation_gap"] = out["log_px"] - out["elbo_refined"]
    return {
        k: out[k]
        for k in (
            "elbo_encoder",
            "elbo_refined",
            "log_px",
            "amortization_gap",
            "amortization_gap_se",
            "approximation_gap",
            "approximation_gap_se",
        )
    }


def _some_cells(mb: Minibatch, part: slice) -> Minibatch:
    """The cells ``part`` of a minibatch (without its sparse counts, which only speed up training)."""
    return Minibatch(mb.counts[part], mb.covariates[part], mb.library[part], mb.batch_index[part], mb.cell_index[part])


@torch.no_grad()
def _score_gaps(vae: VAE, mb: Minibatch, q: dict, mean, scale, n_samples: int, n_elbo_samples: int, parts: dict) -> None:
    """Append to ``parts`` the ELBOs of the encoder's q and of the refined ``(mean, scale)`` of the cells of
    ``mb``, on the same draws, the IWAE bound from the refined q, and their standard errors (see :func:`inference_gaps`)."""
    noise = torch.randn((n_elbo_samples, *mean.shape), device=mean.device, dtype=mean.dtype)
    encoder = _objective(vae, mb, q["mean"], q["scale"], noise, 1.0).cpu().double()  # (float64 on the CPU: not on MPS)
    refined = _objective(vae, mb, mean, scale, noise, 1.0).cpu().double()
    parts["elbo_encoder"].append(encoder.mean(0).cpu().numpy())
    parts["elbo_refined"].append(refined.mean(0).cpu().numpy())
    unknown = torch.full_like(encoder[0], math.nan)  # one draw gives no standard error
    standard_error = (refined - encoder).std(0) / n_elbo_samples**0.5 if n_elbo_samples > 1 else unknown
    parts["amortization_gap_se"].append(standard_error.cpu().numpy())
    log_w = importance_log_weights(vae, mb.counts, mb.covariates, mb.library, mb.batch_index, n_samples, (mean, scale))
    log_w = log_w.cpu().double()
    parts["log_px"].append(iwae_bound(log_w).cpu().numpy())
    weights = torch.exp(log_w - log_w.max(0).values)  # SE of log mean(w) ≈ SE of mean(w) / mean(w)
    iwae_se = weights.std(0) / n_samples**0.5 / weights.mean(0) if n_samples > 1 else unknown
    elbo_se = refined.std(0) / n_elbo_samples**0.5 if n_elbo_samples > 1 else unknown
    parts["approximation_gap_se"].append(torch.sqrt(iwae_se**2 + elbo_se**2).cpu().numpy())
