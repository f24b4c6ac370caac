"""Count likelihoods (negative binomial, zero-inflated NB, Poisson) in pure torch.

Every distribution is parameterised by the log of its mean, which the decoder produces
directly (log-softmax plus log library size), so no ``log(0)`` ever occurs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.special import gammaln

# Counts up to this value take lgamma(x + theta) - lgamma(theta) from a per-gene table (a cumulative
# sum of log(theta + k)); larger counts (a few percent) get lgamma itself.
TABLE_COUNTS = 16
_LOG_FACTORIALS = gammaln(np.arange(4096, dtype=np.float64) + 1.0)


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``log(x!)``, the term of every count likelihood that does not depend on parameters."""
    return torch.lgamma(x + 1.0)


def _minus_log_factorial(
    log_p: torch.Tensor,
    x: torch.Tensor,
    nonzero: tuple[torch.Tensor, torch.Tensor] | None,
    log_factorials: torch.Tensor | None = None,
) -> torch.Tensor:
    """``log_p - log(x!)``; given the positions of the non-zero counts of a 2-D ``x``, ``log(x!)`` (0 at x = 0) is
    subtracted there only, each entry's own (``log_factorials``, when given, holds them: the loader's)."""
    if nonzero is None or x.shape != log_p.shape:
        return log_p - log_factorial(x)
    entries = log_factorial(x[nonzero]) if log_factorials is None else log_factorials.to(log_p.dtype)
    return log_p.index_put(nonzero, -entries, accumulate=True)


# Above this theta, lgamma(x + theta) - lgamma(theta) comes from Stirling's series (error < 1e-10 nats).
STIRLING_THETA = 10.0


def log1p_exp(s: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(s))``. Torch's softplus returns ``s`` itself above ``s = 20``, leaving out
    ``log1p(exp(-s))`` (2e-9 there): below float32's resolution of ``s``, but in float64 an NB
    log-probability then lost ``(x + theta) * theta / mu`` nats (1e-4 at mu / theta = 1e9, x = 1e5).
    Above 40 (``exp(40)`` still fits float32) the term is under float64's resolution too."""
    return F.softplus(s, threshold=40.0)


def _stirling_tail(z: torch.Tensor) -> torch.Tensor:
    """1/(12z) - 1/(360z^3) + 1/(1260z^5): lgamma(z) minus (z - 1/2) log z - z + log(2 pi) / 2, for z >= 10."""
    r = 1.0 / z
    r2 = r * r
    return r * (1.0 / 12.0 - r2 * (1.0 / 360.0 - r2 / 1260.0))


def lgamma_ratio(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta)`` for counts ``x >= 0``, accurate in float32 for any theta.

    The plain difference of two lgamma values near ``theta log theta`` (1.8e6 at theta = e^12) loses the
    result to rounding; Stirling's series gives it as a sum of terms of its own size, exactly 0 at x = 0.
    """
    direct = torch.lgamma(x + theta) - torch.lgamma(theta)
    large = theta.clamp(min=STIRLING_THETA)  # keeps the unused branch finite (and its gradient)
    stirling = (
        (large - 0.5) * torch.log1p(x / large)
        + x * (torch.log(large + x) - 1.0)
        + (_stirling_tail(large + x) - _stirling_tail(large))
    )
    return torch.where(theta > STIRLING_THETA, stirling, direct)


def _digamma_tail(z: torch.Tensor) -> torch.Tensor:
    """-1/(12z^2) + 1/(120z^4) - 1/(252z^6): digamma(z) minus log z - 1/(2z), for z >= 10."""
    r2 = 1.0 / (z * z)
    return -r2 * (1.0 / 12.0 - r2 * (1.0 / 120.0 - r2 / 252.0))


def digamma_difference(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``digamma(x + theta) - digamma(theta)`` for counts ``x >= 0`` (the theta-derivative of
    :func:`lgamma_ratio`), accurate in float32 for any theta.

    The plain difference of two digamma values near ``log theta`` loses its digits when theta is large
    (7% off at theta = e^12); the derivative of the Stirling series keeps them.
    """
    direct = torch.digamma(x + theta) - torch.digamma(theta)
    large = theta.clamp(min=STIRLING_THETA)
    stirling = torch.log1p(x / large) + x / (2.0 * large * (large + x)) + (_digamma_tail(large + x) - _digamma_tail(large))
    return torch.where(theta > STIRLING_THETA, stirling, direct)


@dataclass
class SparseCounts:
    """A minibatch's non-zero counts in row order, prepared once by the loader (on the CPU).

    With them the likelihoods evaluate the terms that vanish at zero counts (``lgamma``,
    ``log x!``) at the non-zero entries only: the negative binomial sums them per cell without a dense
    scatter; ZINB and Poisson scatter ``log x!`` into their cells × genes terms.
    """

    rows: torch.Tensor  # int64, cell of each non-zero entry, non-decreasing
    columns: torch.Tensor  # int64, gene of each entry
    values: torch.Tensor  # float32, the counts
    row_lengths: torch.Tensor  # int64, non-zero entries of each cell
    # float32, log(x!) of each entry: subtracted entry by entry, as each cell's sum (~1e7 for a cell of 1e6
    # counts) would cancel against the lgamma sum's in float32 and lose nats
    log_factorial: torch.Tensor
    table_index: torch.Tensor  # int64, (min(x, TABLE_COUNTS) - 1) * n_genes + gene
    large: torch.Tensor  # int64, positions of the entries above TABLE_COUNTS

    @classmethod
    def from_csr(cls, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_genes: int) -> SparseCounts:
        """From the CSR arrays of a block of cells (without duplicate entries; explicit zeros are dropped)."""
        indptr = np.asarray(indptr, dtype=np.int64)
        if (data == 0).any():
            kept = sp.csr_matrix((data, indices, indptr), shape=(len(indptr) - 1, n_genes))
            kept.eliminate_zeros()
            indptr, indices, data = kept.indptr.astype(np.int64), kept.indices, kept.data
        lengths = np.diff(indptr)
        rows = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        values = np.asarray(data, dtype=np.float32)
        whole = values.astype(np.int64)
        # mode="clip": corrupt non-finite values, which validation rejects, must not index out of the table
        log_factorial = _LOG_FACTORIALS.take(whole, mode="clip")
        beyond = np.flatnonzero(whole >= len(_LOG_FACTORIALS))
        log_factorial[beyond] = gammaln(values[beyond].astype(np.float64) + 1.0)
        columns = np.asarray(indices, dtype=np.int64)
        large = np.flatnonzero(whole > TABLE_COUNTS)
        # (min(x, TABLE_COUNTS) - 1) * n_genes + gene, in place on the int64 copy of the counts
        table_index = np.maximum(np.minimum(whole, TABLE_COUNTS, out=whole), 1, out=whole)
        table_index -= 1
        table_index *= n_genes
        table_index += columns
        return cls(
            rows=torch.from_numpy(rows),
            columns=torch.from_numpy(columns),
            values=torch.from_numpy(values),
            row_lengths=torch.from_numpy(lengths),
            log_factorial=torch.from_numpy(log_factorial.astype(np.float32)),
            table_index=torch.from_numpy(table_index),
            large=torch.from_numpy(large),
        )

    @classmethod
    def from_dense(cls, counts: np.ndarray) -> SparseCounts:
        """From a dense block of cells × genes."""
        counts = np.ascontiguousarray(counts)
        # np.flatnonzero of a boolean mask: ~10x faster than np.nonzero of the float counts (128 x 2,000)
        is_counted = counts != 0
        flat = np.flatnonzero(is_counted)
        lengths = np.count_nonzero(is_counted, axis=1)
        indptr = np.zeros(counts.shape[0] + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        columns = flat - np.repeat(np.arange(counts.shape[0], dtype=np.int64) * counts.shape[1], lengths)
        return cls.from_csr(indptr, columns, counts.ravel()[flat], counts.shape[1])

    def sum_per_cell(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per cell of one value per non-zero entry."""
        return torch.segment_reduce(values, "sum", lengths=self.row_lengths)


class Poisson:
    """Poisson counts with mean ``exp(log_mean)``."""

    def __init__(self, log_mean: torch.Tensor):
        self.log_mean = log_mean

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mean.exp()

    @property
    def variance(self) -> torch.Tensor:
        return self.mean

    def log_prob(
        self, x: torch.Tensor, include_constant: bool = True, nonzero: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Elementwise log-probability; ``nonzero`` as in :meth:`NegativeBinomial.log_prob`."""
        log_p = x * self.log_mean - self.mean
        return _minus_log_factorial(log_p, x, nonzero) if include_constant else log_p

    def log_likelihood(self, x: torch.Tensor, sparse: SparseCounts | None = None) -> torch.Tensor:
        """Log-probability of each cell's counts (summed over genes)."""
        if sparse is None:
            return self.log_prob(x).sum(-1)
        return _minus_log_factorial(x * self.log_mean - self.mean, x, (sparse.rows, sparse.columns), sparse.log_factorial).sum(-1)

    def of_genes(self, columns) -> Poisson:
        """The distribution of these genes (columns) only."""
        return Poisson(self.log_mean[:, columns])

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.poisson(self.mean, generator=generator)


class NegativeBinomial:
    """Negative binomial with mean ``mu = exp(log_mean)`` and inverse dispersion ``theta``.

    ``Var = mu + mu**2 / theta``; as ``theta`` grows it tends to the Poisson.
    """

    def __init__(self, log_mean: torch.Tensor, theta: torch.Tensor):
        self.log_mean = log_mean
        self.theta = theta

    @property
    def mean(self) -> torch.Tensor:
        return self.log_mean.exp()

    @property
    def variance(self) -> torch.Tensor:
        mean = self.mean
        return mean + mean**2 / self.theta

    def log_prob(
        self,
        x: torch.Tensor,
        include_constant: bool = True,
        nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
        include_theta_terms: bool = True,
    ) -> torch.Tensor:
        """Elementwise log-probability of the counts ``x``.

        ``nonzero`` (rows, columns of the non-zero counts of a 2-D ``x``), when given, lets the
        terms that vanish at zero counts be evaluated at those entries only; the result is the same.
        ``include_theta_terms=False`` leaves out ``lgamma(x + theta) - lgamma(theta)``, a constant
        where theta is held fixed (refining q(z|x) under a frozen decoder with a per-gene theta).
        """
        s = self.log_mean - self.theta.log()  # log(mu / theta)
        softplus_s = log1p_exp(s)  # -log(theta / (theta + mu))
        log_p = x * (s - softplus_s) - self.theta * softplus_s
        if not include_theta_terms:
            return _minus_log_factorial(log_p, x, nonzero) if include_constant else log_p
        if nonzero is None or x.shape != log_p.shape:
            log_p = log_p + lgamma_ratio(x, self.theta)
            return log_p - log_factorial(x) if include_constant else log_p
        # lgamma(x + theta) - lgamma(theta) and log(x!) vanish at x = 0, and most counts are zero:
        # evaluating them (and their digamma gradients) at the non-zero counts only saves most of the work.
        rows, columns = nonzero
        counts = x[rows, columns]
        theta = self.theta.expand_as(log_p)[rows, columns]
        sparse_terms = lgamma_ratio(counts, theta)
        if include_constant:
            sparse_terms = sparse_terms - log_factorial(counts)
        return log_p.index_put((rows, columns), sparse_terms, accumulate=True)

    def log_likelihood(self, x: torch.Tensor, sparse: SparseCounts | None = None) -> torch.Tensor:
        """Log-probability of each cell's counts (summed over genes), with analytic gradients.

        Given the loader's ``sparse`` counts, value and gradient take a few passes over the dense
        cells × genes arrays plus work at the non-zero entries only (see ``_NegativeBinomialCells``).
        """
        if sparse is None:
            return self.log_prob(x).sum(-1)
        theta = self.theta if self.theta.dim() == 1 else self.theta.expand_as(self.log_mean).contiguous()
        return _NegativeBinomialCells.apply(self.log_mean, theta, x, sparse)

    def of_genes(self, columns) -> NegativeBinomial:
        """The distribution of these genes (columns) only."""
        return NegativeBinomial(self.log_mean[:, columns], self.theta.expand_as(self.log_mean)[:, columns])

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gamma–Poisson draw; ``generator`` seeds both stages."""
        theta = self.theta.expand_as(self.log_mean)
        rate = _sample_gamma(theta, generator) * self.mean / theta
        return torch.poisson(rate, generator=generator)


class _NegativeBinomialCells(torch.autograd.Function):
    """Per-cell NB log-likelihood with a hand-written backward: few passes, no digamma per count.

    With ``s = log(mu / theta)`` the log-probability of a count ``x`` is
    ``x * s - (theta + x) * softplus(s) + lgamma(x + theta) - lgamma(theta) - log(x!)``;
    the last three terms vanish at ``x = 0``. Their value and theta-derivative,
    ``sum_{k<x} log(theta + k)`` and ``sum_{k<x} 1 / (theta + k)``, come from per-gene tables for
    small counts (a per-gene theta) or from lgamma/digamma at the non-zero entries.
    """

    @staticmethod
    def forward(ctx, log_mean, theta, x, sparse: SparseCounts):
        s = log_mean - theta.log()
        softplus_s = log1p_exp(s)
        per_gene = theta.dim() == 1
        dense = (x * (s - softplus_s)).sum(-1) - (softplus_s @ theta if per_gene else (softplus_s * theta).sum(-1))
        if per_gene:
            offsets = torch.arange(TABLE_COUNTS, dtype=theta.dtype, device=theta.device)[:, None]
            terms = torch.take(torch.log(theta + offsets).cumsum(0), sparse.table_index)
            if len(sparse.large):
                values, th = sparse.values[sparse.large], theta[sparse.columns[sparse.large]]
                terms = terms.index_add(0, sparse.large, lgamma_ratio(values - TABLE_COUNTS, th + TABLE_COUNTS))
        else:
            terms = lgamma_ratio(sparse.values, theta[sparse.rows, sparse.columns])
        ctx.save_for_backward(s, softplus_s, theta, x)
        ctx.sparse = sparse
        return dense + sparse.sum_per_cell(terms - sparse.log_factorial)

    @staticmethod
    def backward(ctx, grad_cells):
        s, softplus_s, theta, x = ctx.saved_tensors
        sparse: SparseCounts = ctx.sparse
        # d/d log_mean = x - (theta + x) * sigmoid(s); d/d theta = -softplus(s) - (d/d log_mean) / theta + digamma terms
        grad_log_mean = (x - (theta + x) * torch.sigmoid(s)) * grad_cells[:, None]
        grad_theta = None
        if ctx.needs_input_grad[1]:
            weights = grad_cells[sparse.rows]
            if theta.dim() == 1:
                grad_theta = -(grad_cells @ softplus_s) - grad_log_mean.sum(0) / theta
                offsets = torch.arange(TABLE_COUNTS, dtype=theta.dtype, device=theta.device)[:, None]
                counts = torch.bincount(sparse.table_index, weights=weights, minlength=TABLE_COUNTS * len(theta))
                grad_theta = grad_theta + (counts.view(TABLE_COUNTS, -1) * (1.0 / (theta + offsets)).cumsum(0)).sum(0)
                if len(sparse.large):
                    columns = sparse.columns[sparse.large]
                    values, th = sparse.values[sparse.large], theta[columns]
                    extra = weights[sparse.large] * digamma_difference(values - TABLE_COUNTS, th + TABLE_COUNTS)
                    grad_theta = grad_theta.index_add(0, columns, extra)
            else:
                grad_theta = -grad_cells[:, None] * softplus_s - grad_log_mean / theta
                th = theta[sparse.rows, sparse.columns]
                extra = weights * digamma_difference(sparse.values, th)
                grad_theta = grad_theta.index_put((sparse.rows, sparse.columns), extra, accumulate=True)
        return grad_log_mean, grad_theta, None, None


class ZeroInflatedNegativeBinomial(NegativeBinomial):
    """NB mixed with a point mass at zero of probability ``sigmoid(zi_logits)``."""

    def __init__(self, log_mean: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor):
        super().__init__(log_mean, theta)
        self.zi_logits = zi_logits

    @property
    def mean(self) -> torch.Tensor:
        return torch.sigmoid(-self.zi_logits) * self.log_mean.exp()

    @property
    def variance(self) -> torch.Tensor:
        keep = torch.sigmoid(-self.zi_logits)
        nb_mean = self.log_mean.exp()
        return keep * (nb_mean + nb_mean**2 / self.theta) + keep * (1 - keep) * nb_mean**2

    def log_prob(
        self,
        x: torch.Tensor,
        include_constant: bool = True,
        nonzero: tuple[torch.Tensor, torch.Tensor] | None = None,
        include_theta_terms: bool = True,
    ) -> torch.Tensor:
        nb = NegativeBinomial(self.log_mean, self.theta)
        # leaving out lgamma(x + theta) - lgamma(theta) leaves out a constant: it is 0 at x = 0 (inside logaddexp below)
        nb_log_p = nb.log_prob(x, include_constant=False, nonzero=nonzero, include_theta_terms=include_theta_terms)
        log_pi = -F.softplus(-self.zi_logits)  # log sigmoid(logits)
        log_one_minus_pi = -F.softplus(self.zi_logits)
        # The constant log(x!) is zero at x = 0, so it can be dropped from both branches.
        zero_case = torch.logaddexp(log_pi, log_one_minus_pi + nb_log_p)
        log_p = torch.where(x < 0.5, zero_case, log_one_minus_pi + nb_log_p)
        return _minus_log_factorial(log_p, x, nonzero) if include_constant else log_p

    def log_likelihood(self, x: torch.Tensor, sparse: SparseCounts | None = None) -> torch.Tensor:
        """Log-probability of each cell's counts (summed over genes)."""
        if sparse is None:
            return self.log_prob(x).sum(-1)
        nonzero = (sparse.rows, sparse.columns)
        log_p = self.log_prob(x, include_constant=False, nonzero=nonzero)
        return _minus_log_factorial(log_p, x, nonzero, sparse.log_factorial).sum(-1)

    def of_genes(self, columns) -> ZeroInflatedNegativeBinomial:
        """The distribution of these genes (columns) only."""
        theta = self.theta.expand_as(self.log_mean)[:, columns]
        return ZeroInflatedNegativeBinomial(self.log_mean[:, columns], theta, self.zi_logits[:, columns])

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        counts = NegativeBinomial(self.log_mean, self.theta).sample(generator)
        uniform = torch.rand(counts.shape, generator=generator, device=counts.device, dtype=self.zi_logits.dtype)
        dropped = uniform < torch.sigmoid(self.zi_logits)
        return torch.where(dropped, torch.zeros_like(counts), counts)


def on_cpu(distribution):
    """The same distribution with its parameters on the CPU: MPS has no Poisson or gamma sampler, so counts are
    drawn there."""
    moved = object.__new__(type(distribution))
    moved.__dict__.update({name: value.cpu() for name, value in vars(distribution).items()})
    return moved


def count_sampler(device: torch.device, random_state: int, generator: torch.Generator):
    """How counts are drawn on ``device``: ``(move, generator)``, ``move`` giving the distribution to sample from. On
    MPS the distributions move to the CPU and draw from a CPU generator seeded with ``random_state``."""
    if device.type == "mps":
        return on_cpu, torch.Generator().manual_seed(random_state)
    return (lambda distribution: distribution), generator


def _sample_gamma(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape, 1) draws; torch's gamma sampler takes no generator, so seed a forked RNG."""
    if generator is None:
        return torch._standard_gamma(shape)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    with seeded(seed):
        return torch._standard_gamma(shape)


# torch's generators are process-wide: two threads in seeded blocks at once drew from each other's stream and
# restored each other's state (the caller's was lost). Re-entrant: train's block holds its seeded passes.
_ONE_SEEDED_BLOCK_AT_A_TIME = threading.RLock()


@contextmanager
def seeded(seed: int | None) -> Iterator[None]:
    """torch's global generators seeded with ``seed`` inside the block (left as they are if None) and
    restored after it: cellvae's seeds never change the caller's draws. Blocks in other threads wait for this one;
    draws of other threads outside such blocks (torch's generators are process-wide) take from its stream meanwhile.

    CUDA's are those of the devices started before the block (``fit`` moves the model to its device
    first). Also a decorator (``@seeded(None)``)."""
    with _ONE_SEEDED_BLOCK_AT_A_TIME:
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        mps = torch.mps.get_rng_state() if torch.backends.mps.is_available() else None
        try:
            with torch.random.fork_rng(devices=cuda, device_type="cuda"):
                if seed is not None:
                    seed_generators(seed)
                yield
        finally:
            if mps is not None:
                torch.mps.set_rng_state(mps)


@contextmanager
def autograd_on() -> Iterator[None]:
    """Autograd records inside, whatever the caller turned off (``torch.no_grad``, ``torch.inference_mode``).

    Also a decorator; as a plain context manager its frames are contextlib's, which warnings skip to
    reach the user's line."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def seed_generators(seed: int) -> None:
    """Seed torch's CPU generator and those of the CUDA devices already started.

    Not ``torch.manual_seed``: it also queues the seed for CUDA devices not yet started, replacing one the
    caller set, which no fork can restore. On Apple MPS it seeds that device's generator too.
    """
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)
    if torch.backends.mps.is_available():
        torch.mps.manual_seed(seed)
