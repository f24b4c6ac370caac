"""Differential expression between two groups of cells, read off the trained model.

A group's mean expression is uncertain for three reasons: which cells were measured (a finite sample of
the population), where each cell lies in the latent space (its posterior q(z|x)), and the counting noise
of its counts (few counts say little about a gene). Each draw of a group's mean expression weights its
cells by a Bayesian bootstrap (Dirichlet(1, ..., 1) weights, Rubin 1981), decodes each cell at a draw of
its latent code, and adds the likelihood's counting noise for a mean over those cells; a few pseudo-cells
drawn from both groups together act as a prior (a Dirichlet process centred on the pooled cells) that keeps
groups of a few cells from looking certain. Two groups' draws give the posterior of the log2 fold change
of their means, from which the probability that it exceeds a threshold ``delta`` follows (the "change"
hypothesis of Boyeau et al. 2019, here for the groups' means rather than for random pairs of cells:
scVI's pairs are so variable that it calls few genes).

Those draws alone would treat every fold change as equally likely beforehand, so a gene measured too
poorly to say much (a wide posterior) would still look likely to exceed ``delta``. A prior on the log
fold changes, learnt from all genes of the comparison, shrinks such genes towards no change: adaptive
shrinkage (Stephens 2017), a point mass at 0 and zero-centred normals whose weights are fitted by
maximum likelihood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from cellvae.module import VAE

POSTERIOR_DRAWS_PER_CELL = 4  # latent draws decoded per cell; draw r of a mean takes each cell's draw r mod 4
PRIOR_CELLS = 4  # pseudo-cells drawn from both groups together: a prior that tames groups of a few cells
PER_10K = 1e4  # expression is reported per 10,000 counts, as scanpy's normalize_total
PRIOR_WIDTH_STEP = math.sqrt(2.0)  # ratio of successive widths of the prior's normal components (as ashr's grid)
MIN_SHRINKAGE_GENES = 50  # fewer measured genes are too few to learn the prior of fold changes from
GENES_PER_CHUNK = 1024  # genes shrunk at once (bounded memory for many genes and draws)


@dataclass
class Cells:
    """What decoding a set of cells needs: q(z|x)'s parameters (on the model's device), covariates,
    batch codes and library sizes.

    With ``correct_batches`` each decoded row instead gets one of the model's ``n_batches``, each cell's
    draws taking the batches in turn from a random start, so both groups of a comparison are decoded
    under the same uniform mixture of batches and batch effects cancel in their ratio.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    covariates: np.ndarray
    batch_codes: np.ndarray
    library: np.ndarray
    n_batches: int
    correct_batches: bool

    def __len__(self) -> int:
        return len(self.library)

    def decode(self, vae: VAE, rows: np.ndarray, repeats: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """Each of ``rows`` decoded at ``repeats`` latent draws: the decoded expression, the likelihood's
        mean and its variance, all divided by the library size (normalised), each repeats × rows × genes."""
        device = self.mean.device
        noise = torch.from_numpy(rng.standard_normal((repeats, len(rows), self.mean.shape[1])).astype(np.float32))
        z = vae.reparameterise(self.mean[rows], self.scale[rows], noise.to(device)).reshape(repeats * len(rows), -1)
        covariates = np.tile(self.covariates[rows], (repeats, 1))
        codes = np.tile(self.batch_codes[rows], repeats).astype(np.int64)
        if self.correct_batches and self.n_batches > 1:
            start = rng.integers(self.n_batches, size=len(rows))
            codes = ((start[None, :] + np.arange(repeats)[:, None]) % self.n_batches).ravel()
            covariates[:, : self.n_batches] = 0.0  # the batch one-hot leads the covariates
            covariates[np.arange(len(codes)), codes] = 1.0
        library = torch.from_numpy(np.tile(self.library[rows], repeats)[:, None]).to(device)
        likelihood = vae.generative(z, torch.from_numpy(covariates).to(device), library, torch.from_numpy(codes).to(device))
        shape = (repeats, len(rows), -1)
        expression = (likelihood.log_mean.float().exp() / library).reshape(shape)
        mean = (likelihood.mean.float() / library).reshape(shape) if hasattr(likelihood, "zi_logits") else expression
        return expression, mean, (likelihood.variance.float() / library**2).reshape(shape)


def group_mean_draws(
    vae: VAE, group: Cells, pool: Cells, n_draws: int, rng: np.random.Generator, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``n_draws`` × n_genes sets of draws of a group's mean normalised expression (per cell, summing to 1).

    Each draw weights the group's cells, and ``PRIOR_CELLS`` cells drawn afresh from ``pool`` (both
    groups of the comparison), by Dirichlet(1, ..., 1) weights; draw r decodes every cell at its latent
    draw r mod ``POSTERIOR_DRAWS_PER_CELL`` (one product per latent draw, not one per cell and draw).
    The first set averages the decoded expression (denoised). The second is the mean that counts drawn
    from the likelihood would have: it adds the counting noise of a mean over the same cells (Gaussian, the
    sum of many cells; clipped at 0), which limits what a group can show about a gene with few counts.
    Dirichlet(1, ..., 1) weights have E[sum of squares] = 2 / (n + 1), twice the 1 / n of equal weights,
    so half the weighted variance matches the counting variance of the group's observed mean.
    """
    device = group.mean.device
    weights = rng.gamma(1.0, size=(n_draws, len(group) + PRIOR_CELLS))
    weights = torch.from_numpy((weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)).to(device)
    denoised = torch.zeros((n_draws, vae.config.n_genes), dtype=torch.float32, device=device)
    predictive = torch.zeros_like(denoised)
    noise_variance = torch.zeros_like(denoised)
    zero_inflated = False  # else the likelihood's mean is the decoded expression: no second product needed
    step = max(1, batch_size // POSTERIOR_DRAWS_PER_CELL)
    for start in range(0, len(group), step):
        rows = np.arange(start, min(start + step, len(group)))
        expression, mean, variance = group.decode(vae, rows, POSTERIOR_DRAWS_PER_CELL, rng)
        zero_inflated = mean is not expression
        for draw in range(POSTERIOR_DRAWS_PER_CELL):  # draws of the mean take the cells' latent draws in turn
            block = slice(draw, None, POSTERIOR_DRAWS_PER_CELL)
            picked = weights[block, start : start + len(rows)]
            denoised[block] += picked @ expression[draw]
            if zero_inflated:
                predictive[block] += picked @ mean[draw]
            noise_variance[block] += picked**2 @ variance[draw]
    prior_rows = rng.integers(len(pool), size=n_draws * PRIOR_CELLS)
    for start in range(0, len(prior_rows), batch_size):
        rows = np.arange(start, min(start + batch_size, len(prior_rows)))
        expression, mean, variance = (part[0] for part in pool.decode(vae, prior_rows[rows], 1, rng))
        draws = torch.from_numpy(rows // PRIOR_CELLS).to(device)
        prior = weights[draws, len(group) + torch.from_numpy(rows % PRIOR_CELLS).to(device)][:, None]
        denoised.index_add_(0, draws, prior * expression)
        if zero_inflated:
            predictive.index_add_(0, draws, prior * mean)
        noise_variance.index_add_(0, draws, prior**2 * variance)
    if not zero_inflated:
        predictive = denoised
    counting_noise = torch.from_numpy(rng.standard_normal(tuple(denoised.shape)).astype(np.float32)).to(device)
    return denoised, (predictive + (0.5 * noise_variance).sqrt() * counting_noise).clamp(min=0.0)


def compare(
    group1: tuple[torch.Tensor, torch.Tensor],
    group2: tuple[torch.Tensor, torch.Tensor],
    delta: float,
    pseudocount: float,
    measured: np.ndarray,
    rng: np.random.Generator,
) -> pd.DataFrame:
    """Per-gene summary of the log2 fold change between two groups' (denoised, predictive) mean-expression
    draws, shrunk by a prior learnt from the ``measured`` genes (:func:`shrink`).

    Columns: ``lfc_mean``, ``lfc_median``, ``lfc_std``, ``lfc_low`` and ``lfc_high`` (the central 95%
    interval), ``proba_up`` = P(lfc > delta), ``proba_down`` = P(lfc < −delta), ``proba_de`` (their
    sum), ``proba_not_de``, ``bayes_factor`` (log odds of ``proba_de``, from counts smoothed by 1/2),
    and ``expression1``/``expression2`` (posterior mean expression per 10,000 counts, not shrunk).
    """
    (denoised1, draws1), (denoised2, draws2) = group1, group2
    # On the CPU: the draws are read there next, and some devices (Apple's MPS) have no float64.
    lfc = (torch.log2(draws1 + pseudocount) - torch.log2(draws2 + pseudocount)).cpu()
    lfc = shrink(lfc, torch.from_numpy(measured), rng).numpy()
    n_draws = lfc.shape[0]
    n_up = (lfc > delta).sum(axis=0)
    n_down = (lfc < -delta).sum(axis=0)
    n_de = n_up + n_down
    low, median, high = np.percentile(lfc, [2.5, 50.0, 97.5], axis=0)
    return pd.DataFrame(
        {
            "lfc_mean": lfc.mean(axis=0, dtype=np.float64),
            "lfc_median": median,
            "lfc_std": lfc.std(axis=0, dtype=np.float64),
            "lfc_low": low,
            "lfc_high": high,
            "proba_up": n_up / n_draws,
            "proba_down": n_down / n_draws,
            "proba_de": n_de / n_draws,
            "proba_not_de": 1.0 - n_de / n_draws,
            "bayes_factor": np.log((n_de + 0.5) / (n_draws - n_de + 0.5)),
            "expression1": denoised1.mean(0).cpu().numpy() * PER_10K,
            "expression2": denoised2.mean(0).cpu().numpy() * PER_10K,
        }
    )


def shrink(lfc: torch.Tensor, fitted: torch.Tensor, rng: np.random.Generator, max_iterations: int = 1000) -> torch.Tensor:
    """Draws (draws × genes, CPU) of each gene's log fold change under a prior learnt from the ``fitted`` genes.

    Adaptive shrinkage (Stephens 2017): each gene's draws give its estimate and standard error (their mean
    and spread); the prior is a point mass at 0 plus zero-centred normals, their widths a grid from a tenth
    of the smallest standard error to twice the largest estimate beyond its error (√(estimate² − error²),
    as in ashr), each ``PRIOR_WIDTH_STEP`` times the last, and its weights maximise the likelihood of all
    fitted genes' estimates (EM). A gene's posterior then mixes the components: a draw takes a component
    by its posterior weight and is shrunk towards 0 as the normal-normal posterior of that component is
    (mean × c, variance × c for c = width² / (width² + error²)), keeping the shape of the gene's own draws.
    Genes outside ``fitted``, with non-finite draws, or all genes when fewer than ``MIN_SHRINKAGE_GENES``
    are fitted (too few to learn a prior from) keep their draws.
    """
    n_draws, n_genes = lfc.shape
    error, centre = (part.double() for part in torch.std_mean(lfc, dim=0))
    fitted = fitted & torch.isfinite(centre) & torch.isfinite(error)
    error = error.clamp(min=1e-6)
    estimates, errors = centre[fitted], error[fitted]
    if len(estimates) < MIN_SHRINKAGE_GENES:
        return lfc
    narrowest = max(float(errors.min()) / 10.0, 1e-4)
    widest = max(2.0 * float((estimates**2 - errors**2).clamp(min=0.0).max().sqrt()), 2.0 * narrowest)
    n_widths = math.ceil(math.log(widest / narrowest) / math.log(PRIOR_WIDTH_STEP)) + 1
    grid = narrowest * PRIOR_WIDTH_STEP ** torch.arange(n_widths, dtype=torch.float64)
    variances = torch.cat([grid.new_zeros(1), grid]) ** 2  # the point mass first

    def likelihood(estimate: torch.Tensor, error: torch.Tensor) -> torch.Tensor:  # genes × components
        total = variances + error[:, None] ** 2
        return torch.exp(-0.5 * estimate[:, None] ** 2 / total) / total.sqrt()  # the normal's constant cancels

    fitted_likelihood = likelihood(estimates, errors)
    mixture = torch.full_like(variances, 1.0 / len(variances))
    for _ in range(max_iterations):
        responsibility = fitted_likelihood * mixture
        responsibility /= responsibility.sum(1, keepdim=True).clamp(min=1e-300)
        updated = responsibility.mean(0)
        converged = float((updated - mixture).abs().max()) < 1e-8
        mixture = updated
        if converged:
            break
    posterior = likelihood(centre, error) * mixture
    cumulative = (posterior / posterior.sum(1, keepdim=True).clamp(min=1e-300)).cumsum(1)
    shrinkage = variances / (variances + error[:, None] ** 2)  # genes × components
    shrunk = lfc.clone()
    for start in range(0, n_genes, GENES_PER_CHUNK):  # in chunks of genes, so memory stays bounded
        genes = slice(start, min(start + GENES_PER_CHUNK, n_genes))
        uniform = torch.from_numpy(rng.random((genes.stop - start, n_draws)))
        # Each draw's component, by the gene's posterior weights (inverse CDF of uniform draws).
        component = torch.searchsorted(cumulative[genes].contiguous(), uniform).clamp(max=len(variances) - 1)
        factor = torch.gather(shrinkage[genes], 1, component).T  # draws × genes
        noise = torch.from_numpy(rng.standard_normal((n_draws, genes.stop - start)))
        moved = factor * lfc[:, genes].double() + (factor * (1.0 - factor)).sqrt() * error[genes] * noise
        shrunk[:, genes] = torch.where(fitted[genes], moved, lfc[:, genes].double()).to(lfc.dtype)
    return shrunk


def expected_fdr(proba_de: np.ndarray) -> np.ndarray:
    """Posterior expected false discovery rate of calling each gene and every gene ranked above it.

    Genes are ranked by ``proba_de``; the expected share of false calls among the top k is the mean of
    their ``1 − proba_de`` (a Bayesian q-value, Newton et al. 2004). Genes of equal ``proba_de`` are
    called together, so they share the value of the list that ends with the last of them.
    """
    descending = -np.asarray(proba_de, dtype=np.float64)
    order = np.argsort(descending, kind="stable")
    ranked = descending[order]
    running = np.cumsum(1.0 + ranked) / np.arange(1, len(ranked) + 1)
    fdr = np.empty(len(ranked))
    fdr[order] = running[np.searchsorted(ranked, ranked, side="right") - 1]
    return fdr
