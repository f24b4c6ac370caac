"""Differential expression between two groups of cells, read off the trained model.

A group's mean expression is uncertain for three reasons: which cells were measured (a finite sample of
the population), where each cell lies in the latent space (its posterior q(z|x)), and the counting noise
of its counts (few counts say little about a gene). Each draw of a group's mean expression weights its
cells by a Bayesian bootstrap (Dirichlet(1, ..., 1) weights, Rubin 1981), decodes each cell at a draw of
its latent code, and adds the likelihood's counting noise for a mean over those cells; a few pseudo-cells
drawn from both groups together, each scaled gene by gene by the group's own mean over the pool's, bring the
variation between cells that a group of a few cells cannot show, so that such a group does not look certain,
without pulling its mean towards the other group's (pseudo-cells taken as they are hid a 100-fold change
between 20 and 20 cells). Two groups' draws give the posterior of the log2 fold change of their means,
from which the probability that it exceeds a threshold ``delta`` follows (the "change" hypothesis of
Boyeau et al. 2019, here for the groups' means rather than for random pairs of cells: scVI's pairs are so
variable that it calls few genes).

Those draws alone would treat every fold change as equally likely beforehand, so a gene measured too
poorly to say much (a wide posterior) would still look likely to exceed ``delta``. A prior on the log
fold changes, learnt from all genes of the comparison, shrinks such genes towards no change: adaptive
shrinkage (Stephens 2017), a point mass at 0 and zero-centred normals whose weights are fitted by
maximum likelihood.
"""

from __future__ import annotations

import contextvars
import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import torch

from cellvae.data import CellLoader, cell_positions, check_ordered, warn_user
from cellvae.module import VAE
from cellvae.train import progress_bar

POSTERIOR_DRAWS_PER_CELL = 4  # latent draws decoded per cell; draw r of a mean takes each cell's draw r mod 4
PRIOR_CELLS = 4  # pseudo-cells from both groups, scaled to the group's mean: the spread a group of a few cells lacks
POOL_MEAN_CELLS = 1000  # pool cells decoded for the mean that scales the pseudo-cells
PER_10K = 1e4  # expression is reported per 10,000 counts, as scanpy's normalize_total
PRIOR_WIDTH_STEP = math.sqrt(2.0)  # ratio of successive widths of the prior's normal components (as ashr's grid)
# Groups of fewer cells with counts get fold changes shrunk strongly (a simulation, 31 genes of |lfc| > 2: lfc_mean
# at a median 0.12 of the decoded ratio at 5 cells, 0.33-0.44 at 8-10, 0.88 at 20), which a warning tells
SHRUNK_GROUP_CELLS = 10
MIN_SHRINKAGE_GENES = 50  # fewer measured genes are too few to learn the prior of fold changes from
GENES_PER_CHUNK = 1024  # genes compared and shrunk at once (bounded memory for many genes and draws)
NOISE_VALUES_PER_BLOCK = 1 << 21  # draws × genes given counting noise at once (likewise)
MIN_DE_DRAWS = 100  # fewer draws give too coarse probabilities
REST = "rest"  # group2 of a comparison with all other labelled cells


@dataclass
class Cells:
    """What decoding a set of cells needs: q(z|x)'s parameters (on the model's device), covariates,
    batch codes and library sizes.

    Where ``batches`` (codes among the model's ``n_batches``) is given, each decoded row instead gets one of
    them, each cell's draws taking them in turn from a random start: both groups of a comparison decoded under
    the same uniform mixture of batches have their batch effects cancel in their ratio. ``None``: each cell's
    own batch.
    """

    mean: torch.Tensor
    scale: torch.Tensor
    covariates: np.ndarray
    batch_codes: np.ndarray
    library: np.ndarray
    n_batches: int
    batches: np.ndarray | None

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
        if self.batches is not None:
            start = rng.integers(len(self.batches), size=len(rows))
            codes = self.batches[(start[None, :] + np.arange(repeats)[:, None]) % len(self.batches)].ravel()
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
    groups of the comparison), by Dirichlet(1, ..., 1) weights. Each pseudo-cell is scaled, gene by gene, by the
    group's own mean in that draw over the pool's mean (decoded over up to ``POOL_MEAN_CELLS`` of its cells), so
    it adds how the pool's cells vary about their mean and leaves the group's mean where its cells put it.
    Draw r decodes every cell at its latent draw r mod ``POSTERIOR_DRAWS_PER_CELL`` (one product per latent
    draw, not one per cell and draw).
    The first set averages the decoded expression (denoised). The second is the mean that counts drawn
    from the likelihood would have: it adds the counting noise of a mean over the same cells, which limits
    what a group can show about a gene with few counts. The noise is a Gamma with the mean and variance of
    that mean (non-negative and, like a Poisson total, skewed when the group has few counts of the gene).
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
    if not zero_inflated:
        predictive = denoised
    if PRIOR_CELLS:
        # Scaled pseudo-cells (pseudo-cells as they are pulled a group of 20 cells halfway to the other group's mean,
        # hiding 100-fold changes): each adds the pool's variation between cells, relative to the pool's mean.
        own_share = weights[:, : len(group)].sum(1, keepdim=True)
        scale_denoised = denoised / own_share  # the group's own mean in each draw
        scale_predictive = predictive / own_share if zero_inflated else scale_denoised
        pool_expression, pool_mean = _pool_means(vae, pool, rng, batch_size)
        scale_denoised.div_(pool_expression).nan_to_num_(nan=0.0, posinf=0.0)  # (a gene the pool lacks: none added)
        if zero_inflated:
            scale_predictive.div_(pool_mean).nan_to_num_(nan=0.0, posinf=0.0)
        prior_rows = rng.integers(len(pool), size=n_draws * PRIOR_CELLS)
        for start in range(0, len(prior_rows), batch_size):
            rows = np.arange(start, min(start + batch_size, len(prior_rows)))
            expression, mean, variance = (part[0] for part in pool.decode(vae, prior_rows[rows], 1, rng))
            draws = torch.from_numpy(rows // PRIOR_CELLS).to(device)
            prior = weights[draws, len(group) + torch.from_numpy(rows % PRIOR_CELLS).to(device)][:, None]
            denoised.index_add_(0, draws, prior * scale_denoised[draws] * expression)
            if zero_inflated:
                predictive.index_add_(0, draws, prior * scale_predictive[draws] * mean)
            noise_variance.index_add_(0, draws, prior**2 * scale_predictive[draws] ** 2 * variance)
        del scale_denoised, scale_predictive
    return denoised, with_counting_noise(predictive, 0.5 * noise_variance, rng)


def _pool_means(vae: VAE, pool: Cells, rng: np.random.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's mean decoded expression and likelihood mean (n_genes each), over up to ``POOL_MEAN_CELLS`` of its
    cells, each decoded once as the pseudo-cells are."""
    cells = subsample(np.arange(len(pool)), POOL_MEAN_CELLS, rng)
    expression_sum = torch.zeros(vae.config.n_genes, dtype=torch.float32, device=pool.mean.device)
    mean_sum = torch.zeros_like(expression_sum)
    for start in range(0, len(cells), batch_size):
        expression, mean, _ = (part[0] for part in pool.decode(vae, cells[start : start + batch_size], 1, rng))
        expression_sum += expression.sum(0)
        mean_sum += mean.sum(0)
    return expression_sum / len(cells), mean_sum / len(cells)


def with_counting_noise(mean: torch.Tensor, variance: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One Gamma draw per entry with this ``mean`` and ``variance``: non-negative; the mean itself where either
    is 0, NaN where the variance is not finite."""
    all_means, all_variances = mean.float().cpu().numpy(), variance.float().cpu().numpy()
    all_draws = all_means.copy()
    # A block of rows at a time (the same random numbers in the same order), so the temporaries stay small
    rows = max(1, NOISE_VALUES_PER_BLOCK // max(1, all_means.shape[1]))
    for start in range(0, len(all_means), rows):
        mean32, variance32 = all_means[start : start + rows], all_variances[start : start + rows]
        draws = all_draws[start : start + rows]
        finite = np.isfinite(variance32)
        drawn = (mean32 > 0) & (variance32 > 0) & finite
        with np.errstate(over="ignore"):
            shape = mean32[drawn] / variance32[drawn] * mean32[drawn]
        # a Gamma of shape 1e12 or more spreads by less than float32 resolves (sd / mean = 1e-6): its mean
        drawn[drawn] = shape < 1e12
        shape = shape[shape < 1e12]
        # float32 draws take a third of float64's time: 30 million (1,000 draws × 30,000 genes) in under 2 s
        draws[drawn] = rng.standard_gamma(shape, dtype=np.float32) * (variance32[drawn] / mean32[drawn])
        draws[~finite] = np.nan
    return torch.from_numpy(all_draws).to(mean.device)


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
    n_draws, n_genes = draws1.shape
    chunks = [slice(start, min(start + GENES_PER_CHUNK, n_genes)) for start in range(0, n_genes, GENES_PER_CHUNK)]
    # On the CPU: the draws are read there next, and some devices (Apple's MPS) have no float64. A chunk of genes at a
    # time here and below, so the temporaries stay small beside the draws (16,579 genes × 1,000 draws: 66 MB each).
    lfc = torch.empty((n_draws, n_genes), dtype=draws1.dtype)
    for genes in chunks:
        lfc[:, genes] = (torch.log2(draws1[:, genes] + pseudocount) - torch.log2(draws2[:, genes] + pseudocount)).cpu()
    lfc = shrink(lfc, torch.from_numpy(measured), rng).numpy()
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("mean", "std", "low", "median", "high", "up", "down")}
    for genes in chunks:
        part = lfc[:, genes]
        parts["mean"].append(part.mean(axis=0, dtype=np.float64))
        parts["std"].append(part.std(axis=0, dtype=np.float64))
        for name, values in zip(("low", "median", "high"), np.percentile(part, [2.5, 50.0, 97.5], axis=0)):
            parts[name].append(values)
        parts["up"].append((part > delta).sum(axis=0))
        parts["down"].append((part < -delta).sum(axis=0))
    mean, std, low, median, high, n_up, n_down = (np.concatenate(values) for values in parts.values())
    n_de = n_up + n_down
    return pd.DataFrame(
        {
            "lfc_mean": mean,
            "lfc_median": median,
            "lfc_std": std,
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
    # rounded: float sums of 1 - p land a hair off exact values (1 - 0.95 gives 0.050000000000000044), which
    # would drop a list whose expected FDR is exactly the target
    running = np.round(np.cumsum(1.0 + ranked) / np.arange(1, len(ranked) + 1), 12)
    fdr = np.empty(len(ranked))
    fdr[order] = running[np.searchsorted(ranked, ranked, side="right") - 1]
    return fdr


# ----------------------------------------------------------------------------- the groups to compare, read from the AnnData


def group_labels(adata: ad.AnnData, groupby) -> tuple[pd.Series, list[str]]:
    """``obs[groupby]`` as text labels by cell position (NaN where a cell has none; whole numbers stored
    as floats read as integers, 1.0 as "1"), and the groups present: in category order for a categorical
    column, else sorted by value (numbers mixed with text: by label)."""
    if not isinstance(groupby, str) or groupby not in adata.obs.columns:
        raise KeyError(f"groupby {groupby!r} not found in adata.obs; available: {list(adata.obs.columns)}")
    column = adata.obs[groupby].reset_index(drop=True)
    if isinstance(column.dtype, pd.CategoricalDtype):
        labels = column.map(group_name).astype(object).where(column.notna())
        present = set(labels.dropna())
        return labels, [group_name(c) for c in column.cat.categories if group_name(c) in present]
    values = pd.unique(column.dropna())
    try:
        values = sorted(values)
    except TypeError:  # an object column of numbers and text (pandas makes one when text goes into a number column)
        values = sorted(values, key=group_name)
    name_of = {value: group_name(value) for value in values}
    return column.map(name_of).astype(object), list(dict.fromkeys(name_of.values()))


def cell_set_labels(adata: ad.AnnData, idx1, idx2) -> tuple[pd.Series, list[str]]:
    """Labels by cell position for a comparison of two sets of cells: ``"idx1"``, ``"idx2"`` (or, without
    ``idx2``, ``"other"`` for every other cell) and the groups present."""
    labels = np.full(adata.n_obs, "other" if idx2 is None else None, dtype=object)
    first = cell_positions(adata, idx1, "idx1")
    if idx2 is not None:
        second = cell_positions(adata, idx2, "idx2")
        shared = np.intersect1d(first, second)
        if len(shared):
            example = adata.obs_names[shared[0]]
            raise ValueError(f"idx1 and idx2 share {len(shared)} cells (e.g. {example!r}); give two disjoint sets")
        labels[second] = "idx2"
    labels[first] = "idx1"
    labels = pd.Series(labels)
    return labels, [name for name in ("idx1", "idx2", "other") if (labels == name).any()]


def group_name(group) -> str:
    """A group as its label: whole numbers as integers (1.0 and 1 are "1")."""
    group = group.item() if isinstance(group, np.generic) else group
    if isinstance(group, float) and group.is_integer():
        return str(int(group))
    return str(group)


# Comparing every group of a column with more groups than this, most of them of one or two cells, is refused.
MANY_GROUPS = 20


def comparisons(labels: pd.Series, names: list[str], source: str, group1, group2) -> list[tuple]:
    """(name1, name2, cells1, cells2) of each comparison, cells as sorted positions; against the rest,
    ``cells2`` is None (:func:`second_group` lists them when needed: kept for every group, the rest
    lists of an atlas would take gigabytes)."""
    codes, groups = pd.factorize(labels)  # compared as integers: string comparisons per group were slow on atlases
    code_of = {name: code for code, name in enumerate(groups)}

    def cells_of(name: str, argument: str) -> np.ndarray:
        if name not in names:
            is_rest = name == second and name.lower() == "rest"
            rest = " (for every other cell pass group2=None, as in scvi-tools)" if is_rest else ""
            raise ValueError(f"{argument}: group {name!r} has no cells in {source}; its groups are {names[:20]}{rest}")
        return np.flatnonzero(codes == code_of[name])

    def asked(group) -> str:
        """A group named by the user: its label, or that of the whole number it writes ("1.0", as a float column
        prints its 1.0, for the group labelled "1")."""
        name = group_name(group)
        if name not in names and isinstance(group, str):
            try:
                number = float(group)
            except ValueError:
                return name
            if number.is_integer() and group_name(number) in names:
                return group_name(number)
        return name

    if group2 is not None and np.ndim(group2) != 0:
        raise TypeError(f"group2 takes one group (or None for all other cells), got {group2!r}")
    second = None if group2 is None else asked(group2)
    check_ordered(group1, "group1", "a group or a list of groups")
    check_ordered(group2, "group2", "one group (or None for all other cells)", "name one group")
    if group1 is not None and np.ndim(group1) != 0 and len(group1) == 0:
        raise ValueError(f"group1 names no group (it is empty); name one or more groups of {source}, or None for each in turn")
    if group1 is None:
        firsts = [g for g in names if g != second]
    elif np.ndim(group1) == 0:
        firsts = [asked(group1)]
    else:  # a list holding the reference too: it is left out, as group1=None leaves it (and scanpy's groups=)
        firsts = list(dict.fromkeys(asked(g) for g in group1))
        firsts = [g for g in firsts if g != second] if len(firsts) > 1 else firsts
    if not firsts:
        raise ValueError(
            f"nothing to compare: the only group{'' if group1 is None else ' asked for'} is the reference {second!r}"
            if second is not None
            else f"nothing to compare: {source} has no labelled cells"
        )
    n_labelled = int(labels.notna().sum())
    if group1 is None and len(firsts) > MANY_GROUPS and len(firsts) > n_labelled / 2:
        raise ValueError(
            f"{source} has {len(names)} groups among {n_labelled} labelled cells, most of one or two cells: it looks "
            f"like a measurement or cell IDs, not groups, and each group would be compared in turn; bin it first "
            f"(e.g. pd.cut(adata.obs[...], 5)) or name the groups to compare (group1=...; groups=[...] in tl.rank_genes_groups)"
        )
    comparisons = []
    for name in firsts:
        cells1 = cells_of(name, "group1")
        if second is None:
            cells2, name2 = None, REST if REST not in names else f"<{REST}>"
            if len(cells1) == n_labelled:
                raise ValueError(
                    "idx1 holds every cell, so there is no other cell to compare with; pass idx2=..."
                    if source == "idx1/idx2"
                    else f"no cells outside group {name!r} to compare with: it holds every labelled cell of {source}; "
                    "group by a column of several groups, or label other cells"
                )
        else:
            if second == name:
                raise ValueError(f"group1 and group2 are the same group {name!r}")
            cells2, name2 = cells_of(second, "group2"), second
        comparisons.append((name, name2, cells1, cells2))
    return comparisons


def second_group(labelled: np.ndarray, cells1: np.ndarray, cells2: np.ndarray | None) -> np.ndarray:
    """``cells2``, or for a comparison against the rest every other labelled cell (``labelled``: a mask)."""
    if cells2 is not None:
        return cells2
    rest = labelled.copy()
    rest[cells1] = False
    return np.flatnonzero(rest)


def comparison_seed(random_state: int, name1: str, name2: str, one_vs_rest: bool) -> list[int]:
    """The seed of one comparison's draws: ``random_state`` and its two groups' names (not their positions
    among the groups present, so that other groups do not change it)."""
    return [random_state, zlib.crc32(name1.encode()), zlib.crc32(name2.encode()), int(one_vs_rest)]


# How the warning about small groups names the shrunk fold changes and what to compare instead: in the columns of
# differential_expression's table, or in those of the caller's result (tl.rank_genes_groups: scanpy's fields)
_SHRUNK_FOLD_CHANGES_TOLD_AS: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "cellvae_shrunk_fold_changes_told_as",
    default=(
        "lfc_mean and its interval (lfc_low, lfc_high) can miss large changes",
        "compare expression1 with expression2 (not shrunk), or raw_normalized_mean1 with raw_normalized_mean2",
    ),
)


@contextmanager
def shrunk_fold_changes_told_as(missed: str, compare: str) -> Iterator[None]:
    """Within it, the warning about small groups' fold changes names the caller's outputs: what can miss large
    changes (``missed``), and what to look at instead (``compare``)."""
    token = _SHRUNK_FOLD_CHANGES_TOLD_AS.set((missed, compare))
    try:
        yield
    finally:
        _SHRUNK_FOLD_CHANGES_TOLD_AS.reset(token)


# Told to groups of fewer than SHRUNK_GROUP_CELLS cells: calls of genes their counts cannot tell (measured on
# random groups of 6-12 cells of Haber's gut types against the other types, benchmarks/README.md "One-off measurements")
SPARSE_CALLS = (
    "A gene such a group holds about a count or less of (expected_counts < 1 in differential_expression's table) is called "
    "on the model's decoding alone: right for most (other types' markers it lacks), but in random groups of 6-8 cells "
    "of one gut-cell type 4-8% of the calls were errors, nearly all such down-calls (0.6-1.5% at 12 cells)"
)


def warn_about_group_sizes(few: list[str], small: list[str], max_cells: int, source: str) -> None:
    """Warn where the groups ``few`` (under 5 cells with counts) or ``small`` (under ``SHRUNK_GROUP_CELLS``), or
    ``max_cells`` itself, leave a group's mean expression to rest on too few cells; ``source``: where the groups
    are (e.g. ``obs['cell_type']``)."""
    if max_cells < 5:
        warn_user(
            f"max_cells={max_cells} draws each group's mean expression from fewer than 5 cells: its spread then rests "
            "mostly on the prior, so only large changes can be called, and those not reliably; use max_cells=5 or more. "
            f"{SPARSE_CALLS}",
            UserWarning,
        )
        return
    if few:
        warn_user(
            f"groups {', '.join(few[:5])} of {source} have fewer than 5 cells with counts: the spread of their mean "
            "expression rests mostly on the prior (pseudo-cells drawn from both groups), so only large changes can be "
            f"called, and those not reliably. {SPARSE_CALLS}",
            UserWarning,
        )
    if small:
        fewer = f"fewer than {SHRUNK_GROUP_CELLS} cells"
        where = f"groups {', '.join(small[:5])} of {source} have {fewer} with counts"
        if max_cells < SHRUNK_GROUP_CELLS:
            where = f"max_cells={max_cells} draws each group's mean expression from {fewer}"
        warn_shrunk_groups(where)


def warn_shrunk_groups(where: str) -> None:
    """Warn that groups of fewer than ``SHRUNK_GROUP_CELLS`` cells (``where`` names them) get their fold changes
    shrunk strongly towards no change."""
    missed, compare = _SHRUNK_FOLD_CHANGES_TOLD_AS.get()
    warn_user(
        f"{where}: their fold changes are shrunk strongly towards no change, so {missed} (simulated groups of 5 cells: "
        f"fold changes a third or less of the decoded ratio); {compare}. {SPARSE_CALLS}",
        UserWarning,
    )


def warn_groups_share_no_batch(separate: list[str], batch_key: str, batch_correction: bool) -> None:
    """Warn about the comparisons (``"a vs b"``) whose two groups share no batch."""
    removed = (
        "what their batches' effects absorbed of their difference (e.g. a condition whose samples are the batches) "
        "is removed, while what the model did not separate from it can still be called (strong batch effects leak "
        "into a few genes' fold changes)"
    )
    counted = "the batch effects are counted as differences (each cell decoded in its own batch)"
    if batch_correction:
        told = f"with batch_correction=True {removed}; batch_correction=False would count the batch effects as differences"
    else:
        told = f"with batch_correction=False {counted}; batch_correction=True would remove them, but with them {removed}"
    warn_user(
        f"{', '.join(separate[:3])}{' ...' if len(separate) > 3 else ''}: the two groups share no batch of "
        f"obs[{batch_key!r}], so {told}. Neither is reliable here. "
        "Best: train with a batch key whose batches hold cells of both groups (e.g. donors, not samples)",
        UserWarning,
    )


def subsample(cells: np.ndarray, max_cells: int, rng: np.random.Generator) -> np.ndarray:
    return cells if len(cells) <= max_cells else np.sort(rng.choice(cells, max_cells, replace=False))


def observed_by_group(loader: CellLoader, labels: pd.Series, batch_size: int, progress: bool):
    """A function of a set of labelled cells giving its observed share of cells with a non-zero count
    and mean counts per 10,000 (over its cells with counts: a cell without any has no share of its counts to give,
    and counted as zeros it would lower every gene alike), per gene, from one pass over the labelled cells (those
    a comparison needs: label the others missing), on a progress bar."""
    codes, groups = pd.factorize(labels, use_na_sentinel=True)
    labelled = np.flatnonzero(codes >= 0)
    nonzero = torch.zeros((len(groups), loader.n_genes), dtype=torch.float64)
    normalized = torch.zeros_like(nonzero)
    with_counts = torch.zeros(len(groups), dtype=torch.float64)
    bar = progress_bar(len(labelled), "differential_expression (observed counts)", progress)
    with torch.no_grad(), bar:
        for mb in loader.batches(labelled, loader.evaluation_batch_size(batch_size)):
            bar.update(len(mb.cell_index))
            counts, library = mb.counts.cpu().double(), mb.library.cpu().double()  # (float64 on the CPU: MPS has none)
            group_codes = torch.from_numpy(codes[mb.cell_index])
            nonzero.index_add_(0, group_codes, (counts > 0).double())
            normalized.index_add_(0, group_codes, counts / library.clamp(min=1.0) * PER_10K)
            with_counts.index_add_(0, group_codes, (library[:, 0] > 0).double())  # (library: cells × 1)
    nonzero, normalized, with_counts = nonzero.numpy(), normalized.numpy(), with_counts.numpy()
    sizes = np.bincount(codes[labelled], minlength=len(groups))

    def summary(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        members = np.bincount(codes[cells], minlength=len(groups)) > 0  # cells are whole groups
        return nonzero[members].sum(0) / sizes[members].sum(), normalized[members].sum(0) / max(with_counts[members].sum(), 1)

    return summary
