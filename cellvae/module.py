"""The variational autoencoder as a torch module: inference q(z|x), generative p(x|z), loss.

Counts enter as ``log1p(x)``; the encoder gives a Gaussian q(z|x) (diagonal or full
covariance), the decoder turns z and the covariates into gene proportions that, scaled by each
cell's observed library size, are the mean of a count likelihood.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from cellvae.config import Config
from cellvae.distributions import (
    NegativeBinomial,
    Poisson,
    ZeroInflatedNegativeBinomial,
    autograd_on,
    lgamma_ratio,
    log_factorial,
)

Likelihood = NegativeBinomial | ZeroInflatedNegativeBinomial | Poisson  # what the decoder returns: p(x|z)
# Every weight is made float32 whatever torch's default dtype (a caller may have set float64); named in each layer,
# not set as the default while building, which would change the default of the caller's other threads meanwhile.
FLOAT32 = {"dtype": torch.float32}


class GeneLinear(nn.Linear):
    """A linear layer with all genes on one side: the encoder's input layer or a decoder output.

    These hold the model's large matrix multiplies. While training with ``compute_dtype`` set
    (``fit(precision="bfloat16")``) they multiply in that dtype and return float32; the weights,
    their gradients and the optimizer stay float32, and evaluation always runs in float32.
    """

    compute_dtype: torch.dtype | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype
        if dtype is None or not self.training:
            return super().forward(x)
        return F.linear(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype)).float()


class CovariateMLP(nn.Module):
    """Hidden layers (Linear → LayerNorm or BatchNorm → ReLU → Dropout) that see the covariates at every layer."""

    def __init__(
        self,
        n_input: int,
        n_covariates: int,
        n_hidden: int,
        n_layers: int,
        dropout: float,
        normalization: str = "layer",
        wide_input: bool = False,
    ):
        super().__init__()
        self.linears = nn.ModuleList()
        self.norms = nn.ModuleList()
        width = n_input
        for layer in range(n_layers):
            linear = GeneLinear if wide_input and layer == 0 else nn.Linear
            self.linears.append(linear(width + n_covariates, n_hidden, **FLOAT32))
            if normalization == "layer":  # each cell's hidden units normalised on their own
                self.norms.append(nn.LayerNorm(n_hidden, **FLOAT32))
            else:  # each hidden unit normalised over the minibatch while training, by running statistics after
                self.norms.append(nn.BatchNorm1d(n_hidden, momentum=0.01, eps=1e-3, **FLOAT32))
            width = n_hidden
        self.dropout = nn.Dropout(dropout)
        self.n_covariates = n_covariates

    def forward(self, h: torch.Tensor, covariates: torch.Tensor) -> torch.Tensor:
        for linear, norm in zip(self.linears, self.norms):
            if self.n_covariates:
                h = torch.cat([h, covariates], dim=-1)
            h = self.dropout(torch.relu(norm(linear(h))))
        return h


class Encoder(nn.Module):
    """log1p(counts) [+ covariates] → mean and scale of q(z|x)."""

    def __init__(self, config: Config):
        super().__init__()
        n_cov = config.n_covariates if config.encode_batch else 0
        self.use_covariates = n_cov > 0
        self.body = CovariateMLP(
            config.n_genes, n_cov, config.n_hidden, config.n_layers, config.dropout, config.normalization, wide_input=True
        )
        self.mean = nn.Linear(config.n_hidden, config.n_latent, **FLOAT32)
        self.full = config.posterior == "full"
        n_scale = config.n_latent * (config.n_latent + 1) // 2 if self.full else config.n_latent
        self.scale = nn.Linear(config.n_hidden, n_scale, **FLOAT32)
        # Non-persistent buffer: it moves with the model (an index on the CPU would stall a CUDA graph).
        tril = torch.tril_indices(config.n_latent, config.n_latent) if self.full else None
        self.register_buffer("tril", tril, persistent=False)

    def forward(self, counts: torch.Tensor, covariates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and either log-variances (diagonal) or a Cholesky factor (full)."""
        h = self.body(torch.log1p(counts), covariates)  # (a body built without covariates ignores them)
        mean = self.mean(h)
        raw = self.scale(h).clamp(-15.0, 15.0)
        if not self.full:
            return mean, raw
        n = mean.shape[-1]
        factor = mean.new_zeros(mean.shape[0], n, n)
        factor[:, self.tril[0], self.tril[1]] = raw
        diagonal = torch.diagonal(factor, dim1=-2, dim2=-1)
        factor = factor - torch.diag_embed(diagonal) + torch.diag_embed(torch.exp(0.5 * diagonal))
        return mean, factor


class Decoder(nn.Module):
    """z + covariates → log mean, inverse dispersion and zero-inflation of the count likelihood: through hidden
    layers (``decoder="mlp"``), or straight from z and the covariates (``decoder="linear"``, an LDVAE: each gene's
    log mean is then linear in z, up to the normalisation over genes)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.linear = config.decoder == "linear"
        if self.linear:
            self.body = None
            width = config.n_latent + config.n_covariates
        else:
            self.body = CovariateMLP(
                config.n_latent, config.n_covariates, config.n_hidden, config.n_layers, config.dropout, config.normalization
            )
            width = config.n_hidden
        self.proportions = GeneLinear(width, config.n_genes, **FLOAT32)
        if config.likelihood != "poisson":
            if config.dispersion == "gene":
                self.log_theta = nn.Parameter(torch.zeros(config.n_genes, **FLOAT32))
            elif config.dispersion == "gene-batch":
                self.log_theta = nn.Parameter(torch.zeros(config.n_batches, config.n_genes, **FLOAT32))
            else:
                self.theta_head = GeneLinear(width, config.n_genes, **FLOAT32)
        if config.likelihood == "zinb":
            self.dropout_head = GeneLinear(width, config.n_genes, **FLOAT32)

    def covariate_linears(self) -> list[nn.Linear]:
        """The layers whose input ends with the covariates: the hidden layers, or a linear decoder's heads."""
        if not self.linear:
            return list(self.body.linears)
        heads = [self.proportions, getattr(self, "theta_head", None), getattr(self, "dropout_head", None)]
        return [head for head in heads if head is not None]

    def forward(self, z: torch.Tensor, covariates: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor) -> Likelihood:
        if not self.linear:
            h = self.body(z, covariates)
        else:
            h = torch.cat([z, covariates], dim=-1) if self.config.n_covariates else z
        # An empty cell's library of 0 becomes 1e-30: its mean is then ~0 and log p(x = 0) ~0, not 0 · log 0 = NaN.
        log_mean = torch.log_softmax(self.proportions(h), dim=-1) + torch.log(library.clamp(min=1e-30))
        if self.config.likelihood == "poisson":
            return Poisson(log_mean)
        if self.config.dispersion == "gene":
            log_theta = self.log_theta
        elif self.config.dispersion == "gene-batch":
            # Each cell's row, picked so that its gradient sums in a fixed order. On the CPU by index_select, not
            # log_theta[batch_index] (indexing's backward added the rows in an order that varied between runs on more
            # than one thread); elsewhere as a one-hot product (index_select's backward adds with atomics on a GPU).
            if batch_index.device.type == "cpu":
                log_theta = self.log_theta.index_select(0, batch_index)
            else:
                log_theta = F.one_hot(batch_index.long(), self.log_theta.shape[0]).to(self.log_theta.dtype) @ self.log_theta
        else:
            log_theta = self.theta_head(h)
        theta = torch.exp(log_theta.clamp(-12.0, 12.0))
        if self.config.likelihood == "zinb":
            return ZeroInflatedNegativeBinomial(log_mean, theta, self.dropout_head(h))
        return NegativeBinomial(log_mean, theta)


class VAE(nn.Module):
    """Encoder, decoder and the negative ELBO ``distortion + beta * rate``, with float32 weights."""

    @autograd_on()  # trainable weights (not inference tensors), even when built inside the caller's inference_mode
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # While True (map_query), BatchNorm layers keep the reference's running statistics.
        self.frozen_statistics = False

    def train(self, mode: bool = True) -> VAE:
        """As :meth:`torch.nn.Module.train`; BatchNorm layers stay in evaluation mode while ``frozen_statistics``."""
        super().train(mode)
        if self.frozen_statistics:
            for module in self.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.eval()
        return self

    @contextmanager
    def evaluating(self) -> Iterator[None]:
        """Evaluation mode (no dropout, BatchNorm's running statistics), the mode before restored afterwards."""
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            self.train(was_training)

    @property
    def needs_two_cells(self) -> bool:
        """Whether a training minibatch needs at least two cells (BatchNorm normalises over the minibatch)."""
        return self.config.normalization == "batch" and not self.frozen_statistics

    def set_compute_dtype(self, dtype: torch.dtype | None) -> None:
        """Multiply in ``dtype`` in the gene-wide layers while training (None: float32)."""
        for module in self.modules():
            if isinstance(module, GeneLinear):
                module.compute_dtype = dtype

    def inference(self, counts: torch.Tensor, covariates: torch.Tensor, sample: bool = True) -> dict[str, torch.Tensor]:
        """q(z|x): its mean, scale parameters and (when ``sample``) a reparameterised draw z."""
        mean, scale = self.encoder(counts, covariates)
        z = self.sample_posterior(mean, scale) if sample else mean
        return {"mean": mean, "scale": scale, "z": z}

    def sample_posterior(self, mean: torch.Tensor, scale: torch.Tensor, n_samples: int | None = None) -> torch.Tensor:
        """Reparameterised draws from q(z|x); shape ``[n_samples,] cells × n_latent``."""
        shape = mean.shape if n_samples is None else (n_samples, *mean.shape)
        return self.reparameterise(mean, scale, torch.randn(shape, device=mean.device, dtype=mean.dtype))

    def reparameterise(self, mean: torch.Tensor, scale: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """z = mean + L·noise for standard-normal ``noise`` of shape ``[samples,] cells × n_latent``."""
        if self.config.posterior == "full":
            return mean + torch.einsum("cij,...cj->...ci", scale, noise)
        return mean + torch.exp(0.5 * scale) * noise

    def posterior_variances(self, scale: torch.Tensor) -> torch.Tensor:
        """The variance of each latent dimension under q(z|x), from :meth:`inference`'s ``scale``
        (log variances, or for ``posterior="full"`` the Cholesky factor L of the covariance L·Lᵀ)."""
        if self.config.posterior == "full":
            return (scale**2).sum(-1)
        return scale.exp()

    def generative(
        self, z: torch.Tensor, covariates: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor
    ) -> Likelihood:
        """p(x|z): the count distribution of each cell and gene."""
        return self.decoder(z, covariates, library, batch_index)

    def log_likelihood_draws(self, z, counts, covariates, library, batch_index, constants: bool = True) -> torch.Tensor:
        """log p(x|z), the full likelihood with log x!, of each draw of ``z`` (samples × cells × n_latent): samples × cells.

        ``constants=False`` leaves out the terms that do not depend on z (log x!, and lgamma(x + theta) -
        lgamma(theta) unless theta is decoded from z), for objectives whose gradients or differences alone count.
        """
        n_samples = z.shape[0]
        repeat = (n_samples, 1)
        likelihood = self.generative(
            z.reshape(-1, z.shape[-1]), covariates.repeat(repeat), library.repeat(repeat), batch_index.repeat(n_samples)
        )
        is_nb = isinstance(likelihood, NegativeBinomial)  # and ZINB
        theta_from_z = is_nb and self.config.dispersion == "gene-cell"
        # lgamma and log x! only at the non-zero counts, found once (and repeated for the draws where needed)
        rows, columns = torch.nonzero(counts, as_tuple=True)

        def every_draw() -> tuple[torch.Tensor, torch.Tensor]:
            draw_offsets = torch.arange(n_samples, device=rows.device)[:, None] * counts.shape[0]
            return (rows + draw_offsets).reshape(-1), columns.repeat(n_samples)

        nonzero = every_draw() if theta_from_z else None  # (built once, used again for the constants below)
        options = {"include_constant": False, "nonzero": nonzero}
        if is_nb:
            options["include_theta_terms"] = theta_from_z
        log_p = likelihood.log_prob(counts.repeat(repeat), **options)
        if not constants:
            return log_p.sum(-1).reshape(n_samples, -1)
        # The terms free of z are the same in every draw: evaluated once per non-zero count (most of the work where
        # draws are many, as in IWAE). With theta free of z, each cell's sum of them is added to each draw's sum of
        # the rest, both in float64: where theta is large they are each of order 1e5-1e6 nats in a deep cell and
        # nearly cancel. Poisson's log x!, a theta decoded from z's, and any on MPS (no float64) are added count by
        # count, where they meet the terms they nearly cancel.
        values = counts[rows, columns]
        terms = -log_factorial(values)
        if is_nb and not theta_from_z:
            terms = terms + lgamma_ratio(values, likelihood.theta.expand_as(likelihood.log_mean)[rows, columns])
            if log_p.device.type != "mps":
                per_cell = torch.zeros(counts.shape[0], dtype=torch.float64, device=log_p.device)
                per_cell = per_cell.index_add(0, rows, terms.double())
                return (log_p.sum(-1, dtype=torch.float64).reshape(n_samples, -1) + per_cell).to(log_p.dtype)
        nonzero = every_draw() if nonzero is None else nonzero
        return log_p.index_put(nonzero, terms.repeat(n_samples), accumulate=True).sum(-1).reshape(n_samples, -1)

    def log_posterior_density(self, noise, scale) -> torch.Tensor:
        """log q(z|x) of ``z = reparameterise(mean, scale, noise)``, summed over latent dimensions: the standard normal
        density of ``noise`` over the determinant of the map from noise to z. Exact however ill-conditioned a full
        posterior's factor L is (solving L⁻¹(z − mean) in float32 was off by up to 3.6e5 nats at cond(L) ≈ 1e10)."""
        log_noise = -0.5 * (noise**2).sum(-1) - 0.5 * noise.shape[-1] * math.log(2.0 * math.pi)
        if self.config.posterior == "full":
            return log_noise - torch.log(torch.diagonal(scale, dim1=-2, dim2=-1)).sum(-1)
        return log_noise - 0.5 * scale.sum(-1)

    def kl_per_dimension(self, mean, scale) -> torch.Tensor:
        """KL of each latent dimension's marginal q(z_d|x) from N(0, 1), cells × n_latent.

        For the full posterior the joint KL exceeds the sum of these by the total correlation,
        which :meth:`kl_divergence` adds.
        """
        variance = self.posterior_variances(scale)
        return 0.5 * (variance + mean**2 - 1.0 - torch.log(variance))

    def kl_divergence(self, mean, scale) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) of each cell (the rate)."""
        if self.config.posterior == "diagonal":
            return self.kl_per_dimension(mean, scale).sum(-1)
        log_det = 2.0 * torch.log(torch.diagonal(scale, dim1=-2, dim2=-1)).sum(-1)
        variance = self.posterior_variances(scale)
        return 0.5 * (variance.sum(-1) + (mean**2).sum(-1) - mean.shape[-1] - log_det)

    def forward(
        self, counts, covariates, library, batch_index, kl_weight: float | torch.Tensor = 1.0, sparse=None
    ) -> dict[str, torch.Tensor]:
        """Loss of one minibatch plus its per-cell distortion and rate (nats per cell).

        ``sparse`` (the loader's ``Minibatch.sparse``) only speeds up the likelihood. ``kl_weight`` may be
        a 0-d tensor (a CUDA graph then reads its current value at each replay).
        """
        q = self.inference(counts, covariates)
        likelihood = self.generative(q["z"], covariates, library, batch_index)
        distortion = -likelihood.log_likelihood(counts, sparse)
        per_dim = self.kl_per_dimension(q["mean"], q["scale"])
        diagonal = self.config.posterior == "diagonal"
        rate = per_dim.sum(-1) if diagonal else self.kl_divergence(q["mean"], q["scale"])
        penalised = rate
        if self.config.free_bits > 0:
            # Free bits: each dimension's batch-mean KL is floored, so small ones cost nothing to use.
            floor = per_dim.mean(0).clamp(min=self.config.free_bits).sum()
            penalised = rate - per_dim.sum(-1) + floor
        loss = (distortion + kl_weight * penalised).mean()
        if self.training and self.config.batch_mmd > 0:
            loss = loss + self.config.batch_mmd * batch_discrepancy(q["z"], batch_index, self.config.n_batches)
        return {"loss": loss, "distortion": distortion, "rate": rate, "kl_per_dimension": per_dim}


# Widths of the Gaussian kernels of the batch discrepancy, in units of the latent space (prior: N(0, I)).
MMD_BANDWIDTHS = (1.0, 2.0, 4.0, 8.0)


def batch_discrepancy(z: torch.Tensor, batch_index: torch.Tensor, n_batches: int) -> torch.Tensor:
    """Squared maximum mean discrepancy between each batch's codes ``z`` and the other batches' codes
    (a sum of Gaussian kernels of widths ``MMD_BANDWIDTHS``), summed over the batches that share the
    minibatch with cells of other batches; 0 when the minibatch holds one batch only.

    The biased estimate: it includes each code's kernel with itself, a constant that adds
    ``len(MMD_BANDWIDTHS) * (1 / n_b + 1 / n_other)`` for each batch b (its cells, and the other batches')
    and no gradient."""
    # (by matrix multiplies at every size: for 25 cells or fewer cdist's own kernel, whose backward MPS lacks)
    squared = torch.cdist(z, z, compute_mode="use_mm_for_euclid_dist").pow(2)
    kernel = sum(torch.exp(squared / (-2.0 * width**2)) for width in MMD_BANDWIDTHS)
    inside = F.one_hot(batch_index.long().reshape(-1), n_batches).to(z.dtype)  # cells × batches
    outside = 1.0 - inside
    n_inside, n_outside = inside.sum(0), outside.sum(0)
    within = (inside * (kernel @ inside)).sum(0) / n_inside.clamp(min=1) ** 2
    others = (outside * (kernel @ outside)).sum(0) / n_outside.clamp(min=1) ** 2
    between = (inside * (kernel @ outside)).sum(0) / (n_inside * n_outside).clamp(min=1)
    present = (n_inside > 0) & (n_outside > 0)
    return ((within + others - 2.0 * between) * present).sum()


def importance_log_weights(
    vae: VAE, counts, covariates, library, batch_index, n_samples: int, posterior: tuple | None = None
) -> torch.Tensor:
    """log p(x, z_k) − log q(z_k|x) for K draws, shape K × cells (IWAE weights).

    q is the encoder's posterior, or the given ``posterior`` (mean, scale) of each cell (e.g. a refined one).
    """
    if posterior is None:
        q = vae.inference(counts, covariates, sample=False)
        posterior = (q["mean"], q["scale"])
    mean, scale = posterior
    noise = torch.randn((n_samples, *mean.shape), device=mean.device, dtype=mean.dtype)
    z = vae.reparameterise(mean, scale, noise)
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_q = vae.log_posterior_density(noise, scale)
    return vae.log_likelihood_draws(z, counts, covariates, library, batch_index) + log_prior - log_q


def iwae_bound(log_weights: torch.Tensor) -> torch.Tensor:
    """log mean_k exp(w_k) of each cell: the importance-weighted lower bound on log p(x)."""
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])
