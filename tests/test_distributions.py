"""The count likelihoods agree with scipy.stats on random parameters."""

import numpy as np
import pytest
import scipy.sparse
import scipy.special
import scipy.stats as st
import torch

from cellvae.distributions import (
    TABLE_COUNTS,
    NegativeBinomial,
    Poisson,
    SparseCounts,
    ZeroInflatedNegativeBinomial,
    digamma_difference,
    lgamma_ratio,
)


@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    mean = rng.gamma(1.0, 5.0, size=(50, 20)) + 1e-3
    theta = rng.gamma(2.0, 2.0, size=(1, 20)) + 0.05
    pi = rng.uniform(0.0, 0.9, size=(50, 20))
    x = rng.poisson(mean * rng.gamma(2.0, 0.5, size=mean.shape)).astype(np.float64)
    x[0, 0] = 0.0
    return x, mean, theta, pi


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_negative_binomial_matches_scipy(params):
    x, mean, theta, _ = params
    ours = NegativeBinomial(t(np.log(mean)), t(theta)).log_prob(t(x)).numpy()
    p = theta / (theta + mean)
    np.testing.assert_allclose(ours, st.nbinom.logpmf(x, theta, p), rtol=1e-9, atol=1e-9)


def test_negative_binomial_matches_scipy_where_the_mean_dwarfs_theta():
    """mu / theta up to 1e9 (torch's softplus drops log1p(exp(-s)) above s = 20, 1e-4 nats here): float64
    log_prob stays exact. (The training path's per-cell sums keep float32 constants, whose rounding is larger.)"""
    mean = np.array([[1e6, 1e6, 3e4, 1e5, 50.0]])
    theta = np.array([1e-3, 1e-3, 1e-5, 2e-4, 1e-2])
    x = np.array([[1e5, 0.0, 7.0, 2e4, 30.0]])
    expected = st.nbinom.logpmf(x, theta, theta / (theta + mean))
    ours = NegativeBinomial(t(np.log(mean)), t(theta)).log_prob(t(x)).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-9)


def test_zero_inflated_negative_binomial_matches_scipy(params):
    x, mean, theta, pi = params
    logits = np.log(pi) - np.log1p(-pi)
    ours = ZeroInflatedNegativeBinomial(t(np.log(mean)), t(theta), t(logits)).log_prob(t(x)).numpy()
    nb = st.nbinom.pmf(x, theta, theta / (theta + mean))
    expected = np.log(np.where(x == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    np.testing.assert_allclose(ours, expected, rtol=1e-8, atol=1e-8)


def test_poisson_matches_scipy(params):
    x, mean, _, _ = params
    ours = Poisson(t(np.log(mean))).log_prob(t(x)).numpy()
    np.testing.assert_allclose(ours, st.poisson.logpmf(x, mean), rtol=1e-9, atol=1e-9)


def test_constant_term_is_log_factorial(params):
    x, mean, theta, _ = params
    nb = NegativeBinomial(t(np.log(mean)), t(theta))
    difference = (nb.log_prob(t(x), include_constant=False) - nb.log_prob(t(x))).numpy()
    np.testing.assert_allclose(difference, scipy.special.gammaln(x + 1), rtol=1e-12)


@pytest.mark.parametrize("kind", ["nb", "zinb", "poisson"])
def test_samples_have_the_stated_mean_and_variance(kind):
    log_mean = torch.full((40_000, 3), np.log(6.0), dtype=torch.float64)
    theta = torch.tensor([0.5, 2.0, 20.0], dtype=torch.float64)
    dist = {
        "nb": lambda: NegativeBinomial(log_mean, theta),
        "zinb": lambda: ZeroInflatedNegativeBinomial(log_mean, theta, torch.full_like(log_mean, -1.0)),
        "poisson": lambda: Poisson(log_mean),
    }[kind]()
    draws = dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(draws, draws.round()) and (draws >= 0).all()
    np.testing.assert_allclose(draws.mean(0).numpy(), dist.mean[0].numpy(), rtol=0.05)
    np.testing.assert_allclose(draws.var(0).numpy(), dist.variance[0].numpy(), rtol=0.12)
    again = dist.sample(torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)
    # some genes alone (sample_counts(gene_list=...) draws only those): their own means and variances
    some = dist.of_genes([2, 0])
    assert type(some) is type(dist)
    torch.testing.assert_close(some.mean, dist.mean[:, [2, 0]])
    torch.testing.assert_close(some.variance, dist.variance[:, [2, 0]])
    draws = some.sample(torch.Generator().manual_seed(1))
    assert draws.shape == (40_000, 2) and torch.equal(draws, draws.round())
    np.testing.assert_allclose(draws.mean(0).numpy(), dist.mean[0, [2, 0]].numpy(), rtol=0.05)
    np.testing.assert_allclose(draws.var(0).numpy(), dist.variance[0, [2, 0]].numpy(), rtol=0.12)


@pytest.mark.parametrize("layout", ["C", "F"])
def test_nonzero_counts_of_a_dense_block_are_those_of_its_csr_form(layout):
    """Dense blocks (dense or backed-dense AnnData) give the likelihood the same entries as CSR ones,
    whatever the array's memory order, with empty cells and counts above the table."""
    rng = np.random.default_rng(3)
    x = rng.negative_binomial(0.5, 0.1, size=(40, 57)).astype(np.float64) * (rng.random((40, 57)) < 0.3)
    x[[0, 7, 39]] = 0.0
    x[3, 5] = TABLE_COUNTS + 40
    csr = scipy.sparse.csr_matrix(x)
    expected = SparseCounts.from_csr(csr.indptr, csr.indices, csr.data, x.shape[1])
    got = SparseCounts.from_dense(np.asarray(x, order=layout))
    for field in ("rows", "columns", "values", "row_lengths", "log_factorial", "table_index", "large"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field


@pytest.mark.parametrize("theta_shape", ["per gene", "per cell"])
def test_per_cell_likelihood_from_sparse_counts_matches_scipy_and_autograd(params, theta_shape):
    """The fast training path (non-zero entries only, hand-written backward) gives scipy's values and autograd's gradients."""
    x, mean, theta, pi = params
    x[5] = 0.0  # a cell without counts
    assert (x > TABLE_COUNTS).any() and ((x > 0) & (x <= TABLE_COUNTS)).any()  # both the table and the lgamma branch
    rng = np.random.default_rng(1)
    theta = theta[0] if theta_shape == "per gene" else theta * rng.uniform(0.2, 5.0, size=x.shape)
    sparse = SparseCounts.from_dense(x)
    expected = st.nbinom.logpmf(x, theta, theta / (theta + mean)).sum(1)
    log_mean, log_theta = t(np.log(mean)).requires_grad_(), t(np.log(theta)).requires_grad_()
    weights = t(rng.uniform(0.5, 2.0, size=len(x)))
    ours = NegativeBinomial(log_mean, log_theta.exp()).log_likelihood(t(x), sparse)
    np.testing.assert_allclose(ours.detach().numpy(), expected, rtol=1e-6)
    grads = torch.autograd.grad((ours * weights).sum(), [log_mean, log_theta])
    reference = NegativeBinomial(log_mean, log_theta.exp()).log_prob(t(x)).sum(-1)
    expected_grads = torch.autograd.grad((reference * weights).sum(), [log_mean, log_theta])
    for got, want in zip(grads, expected_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-8)
    zinb = ZeroInflatedNegativeBinomial(t(np.log(mean)), t(theta), t(scipy.special.logit(pi)))
    np.testing.assert_allclose(zinb.log_likelihood(t(x), sparse).numpy(), zinb.log_prob(t(x)).sum(-1).numpy(), rtol=1e-6)
    poisson = Poisson(t(np.log(mean)))
    np.testing.assert_allclose(poisson.log_likelihood(t(x), sparse).numpy(), st.poisson.logpmf(x, mean).sum(1), rtol=1e-6)


@pytest.mark.parametrize("theta_value", [1e4, np.exp(12.0)])  # np.exp(12) is the decoder's largest theta
def test_float32_likelihood_stays_exact_when_theta_is_large(theta_value):
    """In float32, lgamma(x + theta) - lgamma(theta) taken as a plain difference of two values near
    theta log theta lost up to 18 nats per cell (2,000 genes at theta = e^12); every path now agrees with
    scipy's float64 value to a fraction of a nat per cell."""
    rng = np.random.default_rng(0)
    mean = rng.dirichlet(np.full(2000, 0.3), 50) * 3000
    theta = np.full(2000, theta_value)
    x = st.nbinom.rvs(theta, theta / (theta + mean), random_state=1).astype(np.float32)
    expected = st.nbinom.logpmf(x, theta, theta / (theta + mean)).sum(1)
    nb = NegativeBinomial(torch.tensor(np.log(mean), dtype=torch.float32), torch.tensor(theta, dtype=torch.float32))
    for path in (nb.log_prob(torch.tensor(x)).sum(-1), nb.log_likelihood(torch.tensor(x), SparseCounts.from_dense(x))):
        assert np.abs(path.double().numpy() - expected).max() < 0.2
    never_zero = ZeroInflatedNegativeBinomial(nb.log_mean, nb.theta, torch.full_like(nb.log_mean, -30.0))
    assert np.abs(never_zero.log_prob(torch.tensor(x)).sum(-1).double().numpy() - expected).max() < 0.2


@pytest.mark.parametrize(
    "ours, special",
    [(lgamma_ratio, scipy.special.gammaln), (digamma_difference, scipy.special.digamma)],
    ids=["lgamma_ratio", "digamma_difference"],
)
def test_gamma_function_differences_match_scipy_on_both_sides_of_the_switch_to_stirling(ours, special):
    """f(x + theta) - f(theta) for f = lgamma and its derivative digamma."""
    x = np.concatenate([np.arange(0.0, 40.0), [100.0, 5000.0]])
    for theta in (1e-3, 0.7, 9.99, 10.01, 57.0, 1e6):
        got = ours(t(x), t(np.full_like(x, theta))).numpy()
        np.testing.assert_allclose(got, special(x + theta) - special(theta), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("theta_shape", ["per gene", "per cell"])
def test_float32_theta_gradient_keeps_its_sign_when_theta_is_large(theta_shape):
    """The fused backward's digamma(x + theta) - digamma(theta) lost its digits in float32 at large theta
    (the summed gradient of a third of the genes had the wrong sign); it now agrees with a float64 reference
    as closely as float32 autograd does."""
    rng = np.random.default_rng(0)
    n_cells, n_genes = 128, 300
    mean = rng.gamma(2.0, 10.0, size=(n_cells, n_genes))  # counts above the table's 16 as well
    log_theta = np.tile(rng.uniform(6.0, 12.0, size=n_genes), (n_cells, 1) if theta_shape == "per cell" else 1)
    x = rng.poisson(mean).astype(np.float32)
    sparse = SparseCounts.from_dense(x)
    grads = {}
    for dtype in (torch.float32, torch.float64):
        log_theta_t = torch.tensor(log_theta, dtype=dtype, requires_grad=True)
        nb = NegativeBinomial(torch.tensor(np.log(mean), dtype=dtype), log_theta_t.exp())
        path = nb.log_likelihood(torch.tensor(x, dtype=dtype), sparse if dtype == torch.float32 else None)
        (grads[dtype],) = torch.autograd.grad(path.sum(), [log_theta_t])
    got, want = grads[torch.float32].double().numpy(), grads[torch.float64].numpy()
    # float32 keeps ~1e-3 of the largest gene's gradient here (plain float32 autograd: the same); the
    # digamma difference was off by up to 8x that largest gradient
    assert np.abs(got - want).max() < 5e-3 * np.abs(want).max()


def decoder_inputs(likelihood: str, dispersion: str = "gene", seed: int = 0):
    """A float64 VAE for simulated counts (40 cells × 60 genes, 2 batches) and the inputs of its decoder."""
    import cellvae

    adata = cellvae.datasets.simulate(n_cells=40, n_genes=60, n_batches=2, random_state=seed)
    vae = cellvae.CellVAE(adata, batch_key="batch", likelihood=likelihood, dispersion=dispersion).module.double()
    counts = torch.from_numpy(adata.X.toarray()).double()
    covariates = torch.zeros(len(counts), vae.config.n_covariates, dtype=torch.float64)
    covariates[:, 0] = 1.0
    return vae, counts, covariates, counts.sum(1, keepdim=True), torch.zeros(len(counts), dtype=torch.long)


@pytest.mark.parametrize(
    "likelihood, dispersion", [("nb", "gene"), ("nb", "gene-batch"), ("nb", "gene-cell"), ("zinb", "gene"), ("poisson", "gene")]
)
def test_likelihood_of_many_draws_evaluates_the_count_terms_at_non_zero_counts_only_and_stays_exact(likelihood, dispersion):
    """The path of the IWAE bound and the per-cell refinement (draws × cells), whose terms free of z are evaluated once
    per non-zero count, against every term evaluated at every count of every draw."""
    vae, counts, covariates, library, batch_index = decoder_inputs(likelihood, dispersion)
    if hasattr(vae.decoder, "log_theta"):  # away from theta = 1, where lgamma(x + 1) - lgamma(1) = log x!
        torch.nn.init.normal_(vae.decoder.log_theta, std=1.5, generator=torch.Generator().manual_seed(0))
    counts[3] = 0.0  # a cell without counts
    assert (counts > TABLE_COUNTS).any()
    z = torch.randn(7, len(counts), vae.config.n_latent, dtype=torch.float64, requires_grad=True)
    ours = vae.log_likelihood_draws(z, counts, covariates, library, batch_index)
    assert ours.shape == (7, len(counts))
    dist = vae.generative(z.reshape(-1, z.shape[-1]), covariates.repeat(7, 1), library.repeat(7, 1), batch_index.repeat(7))
    every_count = dist.log_prob(counts.repeat(7, 1)).sum(-1).reshape(7, -1)
    np.testing.assert_allclose(ours.detach().numpy(), every_count.detach().numpy(), rtol=1e-10)
    (gradient,) = torch.autograd.grad(ours.sum(), z)
    (expected,) = torch.autograd.grad(every_count.sum(), z)
    np.testing.assert_allclose(gradient.numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(
    "likelihood, dispersion", [("nb", "gene"), ("nb", "gene-batch"), ("nb", "gene-cell"), ("zinb", "gene"), ("poisson", "gene")]
)
def test_draws_without_constants_differ_from_the_full_likelihood_by_a_term_free_of_z(likelihood, dispersion):
    """What per-cell refinement optimises: the same gradients in z, and differences between draws, as the full likelihood."""
    vae, counts, covariates, library, batch_index = decoder_inputs(likelihood, dispersion, seed=1)
    if hasattr(vae.decoder, "log_theta"):  # away from its start at theta = 1, where lgamma(x + 1) - lgamma(1) = log x!
        torch.nn.init.normal_(vae.decoder.log_theta, std=1.5, generator=torch.Generator().manual_seed(0))
    z = torch.randn(5, len(counts), vae.config.n_latent, dtype=torch.float64, requires_grad=True)
    full = vae.log_likelihood_draws(z, counts, covariates, library, batch_index)
    partial = vae.log_likelihood_draws(z, counts, covariates, library, batch_index, constants=False)
    left_out = (full - partial).detach().numpy()
    np.testing.assert_allclose(left_out, np.broadcast_to(left_out[:1], left_out.shape), rtol=1e-10, atol=1e-8)
    assert np.abs(left_out).max() > 10.0  # log x! and the theta terms were left out: not 0 for cells with counts
    (gradient,) = torch.autograd.grad(partial.sum(), z)
    (expected,) = torch.autograd.grad(full.sum(), z)
    np.testing.assert_allclose(gradient.numpy(), expected.numpy(), rtol=1e-8, atol=1e-10)


def test_zeros_stored_in_a_csr_block_are_no_counts_and_add_nothing_to_the_likelihood():
    """A CSR matrix may store zeros (left by ``adata.X.data[...] = 0``): the likelihood's non-zero terms skip them."""
    rng = np.random.default_rng(4)
    x = rng.negative_binomial(1.0, 0.2, size=(30, 40)).astype(np.float64)
    stored = scipy.sparse.csr_matrix(x)
    stored.data[::3] = 0.0
    x = stored.toarray()
    canonical = scipy.sparse.csr_matrix(x)
    got = SparseCounts.from_csr(stored.indptr, stored.indices, stored.data, x.shape[1])
    expected = SparseCounts.from_csr(canonical.indptr, canonical.indices, canonical.data, x.shape[1])
    for field in ("rows", "columns", "values", "row_lengths", "log_factorial", "table_index", "large"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    mean, theta = rng.gamma(2.0, 2.0, size=x.shape), rng.gamma(2.0, 1.0, size=x.shape[1])
    ours = NegativeBinomial(t(np.log(mean)), t(theta)).log_likelihood(t(x), got).numpy()
    np.testing.assert_allclose(ours, st.nbinom.logpmf(x, theta, theta / (theta + mean)).sum(1), rtol=1e-6)


@pytest.mark.parametrize("count", [4095, 4096, 4097, 70_000])
def test_log_factorials_of_large_counts_are_exact(count):
    x = np.zeros((3, 5))
    x[1, 2] = count
    x[2, [0, 4]] = [1.0, 3.0]
    sparse = SparseCounts.from_dense(x)
    np.testing.assert_allclose(sparse.log_factorial.numpy(), scipy.special.gammaln(x[x != 0] + 1), rtol=1e-6)  # row order
    np.testing.assert_allclose(sparse.sum_per_cell(sparse.log_factorial).numpy(), scipy.special.gammaln(x + 1).sum(1), rtol=1e-6)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_per_cell_log_likelihood_of_a_deep_cell_keeps_its_nats(likelihood):
    """A cell of a million counts in float32, as the model runs: log(x!) and lgamma sums near 1e7 must not cancel
    (6 nats here, 19 at 1e7 counts)."""

    def t(values):
        return torch.tensor(values, dtype=torch.float32)

    rng = np.random.default_rng(0)
    mean = 1e6 * rng.dirichlet(np.full(2000, 0.3))
    theta = np.full(2000, 0.5)
    if likelihood == "poisson":
        x = rng.poisson(mean)[None].astype(np.float64)
        expected = st.poisson.logpmf(x, mean).sum()
        distribution = Poisson(t(np.log(mean))[None])
    else:
        x = rng.negative_binomial(theta, theta / (theta + mean))[None].astype(np.float64)
        expected = st.nbinom.logpmf(x, theta, theta / (theta + mean)).sum()
        distribution = NegativeBinomial(t(np.log(mean))[None], t(theta))
        if likelihood == "zinb":  # no zero inflation to speak of: the NB's value
            distribution = ZeroInflatedNegativeBinomial(distribution.log_mean, distribution.theta, torch.full((1, 2000), -30.0))
    assert x.sum() > 9e5
    got = distribution.log_likelihood(t(x), SparseCounts.from_dense(x.astype(np.float32))).item()
    assert abs(got - expected) < 0.1, got - expected  # summed per cell in float32 before: 6.0, 0.5, 0.38 nats off


@pytest.mark.parametrize(
    "likelihood, dispersion", [("nb", "gene"), ("zinb", "gene-batch"), ("nb", "gene-cell"), ("poisson", "gene")]
)
def test_likelihood_of_many_draws_keeps_the_nats_of_deep_cells_in_float32(likelihood, dispersion):
    """IWAE's path in float32, as the model runs it, against the same model in float64: cells of 100,000 counts and a
    large theta, whose lgamma terms and the rest are each near 1e6 nats and nearly cancel (1.5 nats off at 1e6
    counts, 0.4 at 1e5, where each cell's sum of the terms free of z was added in float32)."""
    import cellvae

    adata = cellvae.datasets.simulate(n_cells=6, n_genes=2000, n_batches=2, random_state=3)
    vae = cellvae.CellVAE(adata, batch_key="batch", likelihood=likelihood, dispersion=dispersion, dropout=0.0).module.eval()
    if hasattr(vae.decoder, "log_theta"):
        torch.nn.init.uniform_(vae.decoder.log_theta, 8.0, 12.0, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    covariates = torch.nn.functional.one_hot(torch.arange(6) % 2, 2).float()
    batch_index, library = torch.arange(6) % 2, torch.full((6, 1), 1e5)
    z = torch.randn(6, vae.config.n_latent, generator=generator)
    with torch.no_grad():
        counts = vae.generative(z, covariates, library, batch_index).sample(generator)
        draws = z + 0.1 * torch.randn(20, 6, vae.config.n_latent, generator=generator)
        got = vae.log_likelihood_draws(draws, counts, covariates, library, batch_index).double()
        vae.double()
        expected = vae.log_likelihood_draws(draws.double(), counts.double(), covariates.double(), library.double(), batch_index)
    assert counts.sum(1).min() > 3e4
    assert (got - expected).abs().max() < 0.1, (got - expected).abs().max()


def test_float32_gradients_stay_finite_for_a_tiny_theta():
    """The Stirling branch, unused below theta = 10, must not turn the gradient into NaN (1/theta^5 overflows float32)."""
    x = torch.tensor([[0.0, 1.0, 5.0, 40.0]])
    for log_theta_value in (-12.0, -30.0, -60.0):
        for sparse in (None, SparseCounts.from_dense(x.numpy())):
            log_theta = torch.full((4,), log_theta_value, requires_grad=True)
            value = NegativeBinomial(torch.zeros(1, 4), log_theta.exp()).log_likelihood(x, sparse).sum()
            (gradient,) = torch.autograd.grad(value, log_theta)
            assert torch.isfinite(value) and torch.isfinite(gradient).all(), (log_theta_value, sparse is None)


@pytest.mark.parametrize("likelihood, dispersion", [("nb", "gene"), ("nb", "gene-cell"), ("zinb", "gene"), ("poisson", "gene")])
def test_draws_without_constants_leave_out_log_factorials_and_a_fixed_thetas_gamma_terms(likelihood, dispersion):
    """The terms left out are exactly log x! and, where theta does not depend on z, lgamma(x + theta) - lgamma(theta)."""
    vae, counts, covariates, library, batch_index = decoder_inputs(likelihood, dispersion, seed=1)
    if hasattr(vae.decoder, "log_theta"):
        torch.nn.init.normal_(vae.decoder.log_theta, std=1.5, generator=torch.Generator().manual_seed(0))
    z = torch.randn(3, len(counts), vae.config.n_latent, dtype=torch.float64)
    with torch.no_grad():
        left_out = vae.log_likelihood_draws(z, counts, covariates, library, batch_index) - vae.log_likelihood_draws(
            z, counts, covariates, library, batch_index, constants=False
        )
    x = counts.numpy()
    expected = -scipy.special.gammaln(x + 1)
    if likelihood != "poisson" and dispersion != "gene-cell":
        theta = vae.decoder.log_theta.detach().exp().clamp(np.exp(-12.0), np.exp(12.0)).numpy()
        expected = expected + scipy.special.gammaln(x + theta) - scipy.special.gammaln(theta)
    np.testing.assert_allclose(left_out.numpy(), np.broadcast_to(expected.sum(1), left_out.shape), rtol=1e-9, atol=1e-8)
