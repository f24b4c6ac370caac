"""Count likelihoods (negative binomial, zero-inflated NB, Poisson) in pure torch.

Every distribution is parameterised by the log of its mean, which the decoder produces
directly (log-softmax plus log library size), so no ``log(0)`` ever occurs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def log_factorial(x: torch.Tensor) -> torch.Tensor:
    """``log(x!)``, the term of every count likelihood that does not depend on parameters."""
    return torch.lgamma(x + 1.0)


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
        log_p = x * self.log_mean - self.mean
        return log_p - log_factorial(x) if include_constant else log_p

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
        self, x: torch.Tensor, include_constant: bool = True, nonzero: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Elementwise log-probability of the counts ``x``.

        ``nonzero`` (rows, columns of the non-zero counts of a 2-D ``x``), when given, lets the
        terms that vanish at zero counts be evaluated at those entries only; the result is the same.
        """
        log_theta = self.theta.log()
        log_theta_plus_mean = torch.logaddexp(log_theta, self.log_mean)
        log_p = self.theta * (log_theta - log_theta_plus_mean) + x * (self.log_mean - log_theta_plus_mean)
        if nonzero is None or x.shape != log_p.shape:
            log_p = log_p + torch.lgamma(x + self.theta) - torch.lgamma(self.theta)
            return log_p - log_factorial(x) if include_constant else log_p
        # lgamma(x + theta) - lgamma(theta) and log(x!) vanish at x = 0, and most counts are zero:
        # evaluating them (and their digamma gradients) at the non-zero counts only saves most of the work.
        rows, columns = nonzero
        counts = x[rows, columns]
        theta = self.theta.expand_as(log_p)[rows, columns]
        # lgamma(theta) over the stored theta (one per gene), then gathered: no digamma per count.
        sparse_terms = torch.lgamma(counts + theta) - torch.lgamma(self.theta).expand_as(log_p)[rows, columns]
        if include_constant:
            sparse_terms = sparse_terms - log_factorial(counts)
        return log_p.index_put((rows, columns), sparse_terms, accumulate=True)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gamma–Poisson draw; ``generator`` seeds both stages."""
        theta = self.theta.expand_as(self.log_mean)
        rate = _sample_gamma(theta, generator) * self.mean / theta
        return torch.poisson(rate, generator=generator)


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
        self, x: torch.Tensor, include_constant: bool = True, nonzero: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        nb = NegativeBinomial(self.log_mean, self.theta)
        nb_log_p = nb.log_prob(x, include_constant=False, nonzero=nonzero)
        log_pi = -F.softplus(-self.zi_logits)  # log sigmoid(logits)
        log_one_minus_pi = -F.softplus(self.zi_logits)
        # The constant log(x!) is zero at x = 0, so it can be dropped from both branches.
        zero_case = torch.logaddexp(log_pi, log_one_minus_pi + nb_log_p)
        log_p = torch.where(x < 0.5, zero_case, log_one_minus_pi + nb_log_p)
        return log_p - log_factorial(x) if include_constant else log_p

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        counts = NegativeBinomial(self.log_mean, self.theta).sample(generator)
        dropped = torch.rand(counts.shape, generator=generator, device=counts.device) < torch.sigmoid(self.zi_logits)
        return torch.where(dropped, torch.zeros_like(counts), counts)


def _sample_gamma(shape: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(shape, 1) draws; torch's gamma sampler takes no generator, so seed a forked RNG."""
    if generator is None:
        return torch._standard_gamma(shape)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    devices = [shape.device] if shape.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return torch._standard_gamma(shape)
