"""Rate and distortion, the beta knob, posterior collapse, log p(x) and the inference gaps, on real PBMC counts."""

import copy
import functools
import warnings
from pathlib import Path

import anndata as ad
import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch
from conftest import shared_dataset, simulated_module
from matplotlib.backends.backend_pdf import FigureCanvasPdf
from PIL import Image

import cellvae
from cellvae import CellVAE
from cellvae.diagnostics import PosteriorCollapseWarning
from cellvae.module import iwae_bound

KANG = "kang_ifnb_muscat_example.h5ad"  # 1,556 PBMCs × 1,267 genes, control and interferon-stimulated


@pytest.fixture(scope="module")
def kang():
    return shared_dataset(KANG)


@pytest.fixture(scope="module")
def trained(kang):
    """A beta = 1 model and the warnings its fit raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = CellVAE(kang, n_latent=10).fit(max_epochs=60, progress=False)
    return model, [w for w in caught if issubclass(w.category, PosteriorCollapseWarning)]


def test_rate_distortion_per_cell_and_consistent_with_the_elbo(kang, trained):
    model, _ = trained
    frame = model.rate_distortion(kang)
    assert list(frame.index) == list(kang.obs_names)
    assert (frame["rate"] > 0).all() and (frame["distortion"] > 0).all()
    np.testing.assert_allclose(frame["elbo"], -(frame["rate"] + frame["distortion"]))
    # each cell's rate is the KL of its own posterior N(mean, variance) from the prior N(0, I) (an audit: the mean
    # rate in every row went unseen)
    means, variances = (v.astype(np.float64) for v in model.get_latent(kang, return_dist=True, progress=False))
    kl = 0.5 * (variances + means**2 - 1.0 - np.log(variances)).sum(1)
    np.testing.assert_allclose(frame["rate"], kl, rtol=1e-4, atol=1e-4)
    # The IWAE bound with one sample is the ELBO: a second, independent estimator of the same number.
    iwae_1 = model.marginal_log_likelihood(kang, n_samples=1, random_state=1)
    assert abs(iwae_1.mean() - frame["elbo"].mean()) < 1.0
    # Same seed, same numbers.
    np.testing.assert_array_equal(frame["distortion"], model.rate_distortion(kang)["distortion"])


def test_scoring_cells_with_zero_counts_warns_that_they_skew_the_mean(kang, trained):
    model, _ = trained
    cells = kang[:12].copy()
    counts = cells.X.tolil()
    counts[:3] = 0
    cells.X = counts.tocsr()
    for score in (
        lambda: model.rate_distortion(cells, progress=False),
        lambda: model.marginal_log_likelihood(cells, n_samples=2, progress=False),
        lambda: model.inference_gaps(cells, n_steps=2, n_samples=2, n_elbo_samples=2, progress=False),
    ):
        with pytest.warns(UserWarning, match=r"3 of the 12 cells have zero total counts.*filter_cells"):
            score()
    # the empty cells' ELBO is minus their rate alone, far above a cell with counts
    with pytest.warns(UserWarning, match="zero total counts"):
        frame = model.rate_distortion(cells, progress=False)
    np.testing.assert_allclose(frame["elbo"][:3], -frame["rate"][:3], rtol=1e-6)
    assert (frame["elbo"][:3] > 100 + frame["elbo"][3:].max()).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.rate_distortion(kang[:12], progress=False)


def test_kl_per_dimension_sums_to_the_rate(kang, trained):
    model, _ = trained
    kl = model.kl_per_dimension(kang)
    assert kl.shape == (10,) and (kl >= 0).all()
    assert kl.sum() == pytest.approx(model.rate_distortion(kang)["rate"].mean(), rel=1e-4)
    # the history's validation rate is this KL per cell too (of the validation cells, at the last epoch)
    assert 0.7 < model.history["validation_rate"].iloc[-1] / kl.sum() < 1.4


def test_beta_one_on_real_data_keeps_most_units_active_without_warning(kang, trained, tmp_path, monkeypatch):
    model, collapse_warnings = trained
    assert model.active_units(kang) >= 8
    with pytest.raises(ValueError, match=r"active_units measures how posterior means vary across cells: give 2 or more, got 1"):
        model.active_units(kang[:1])  # (it gave 0: a variance over one cell)
    assert collapse_warnings == []
    # active: the posterior mean's variance over cells exceeds the threshold, whichever threshold
    variance = np.sort(model.get_latent(kang).astype(np.float64).var(0))
    for threshold in (variance[:-1] + variance[1:]) / 2:
        assert model.active_units(kang, threshold=threshold) == int((variance > threshold).sum())
    ax = cellvae.pl.kl_per_dimension(model, show=False)
    informative = int((model.kl_per_dimension() >= 0.1).sum())
    assert len(ax.patches) == 10 and ax.get_title() == f"{model.active_units()} of 10 active, {informative} ≥ 0.1 nats"
    heights = np.array([bar.get_height() for bar in ax.patches])
    dimensions = [int(tick.get_text()) for tick in ax.get_xticklabels()]
    assert np.all(np.diff(heights) <= 0)  # largest first, each bar the KL of the dimension its tick names
    np.testing.assert_allclose(heights, model.kl_per_dimension()[dimensions], rtol=1e-6)
    plt.close(ax.figure)
    figure, panels = plt.subplots(1, 3, layout="constrained")  # drawn into the caller's figure: its layout stays
    cellvae.pl.kl_per_dimension(model, ax=panels[0], show=False)
    cellvae.pl.history(model, ax=panels[1:], show=False)
    assert figure.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    plt.close(figure)
    distortion, rate = cellvae.pl.history(model, show=False)  # two panels, train and validation curves
    np.testing.assert_array_equal(rate.get_lines()[0].get_ydata(), model.history["train_rate"])
    for panel, quantity in ((distortion, "distortion"), (rate, "rate")):
        lines = {line.get_label(): line.get_ydata() for line in panel.get_lines()}
        for split in ("train", "validation"):
            np.testing.assert_array_equal(lines[split], model.history[f"{split}_{quantity}"])
    kept = model.history.attrs["best_epoch"]  # the epoch whose parameters the model holds, dotted in each panel
    assert kept in set(model.history["epoch"])
    for panel in (distortion, rate):
        marked = [list(line.get_xdata()) for line in panel.get_lines() if line.get_label() == f"kept (epoch {kept})"]
        assert marked == [[kept] * 2]
    assert [len(a.get_lines()) for a in (distortion, rate)] == [3, 3]
    plt.close(distortion.figure)
    _, one = plt.subplots()
    distortion, rate = cellvae.pl.history(model, ax=one, show=False)  # one Axes: the rate on a right-hand scale
    assert distortion is one and rate.get_shared_x_axes().joined(rate, one)
    # the legend on the right scale (drawn over both), inside the user's Axes, clear of both scales' curves (on the
    # left scale, matplotlib's "best" place let the rate curves run through it)
    one.figure.canvas.draw()
    box = rate.get_legend().get_window_extent()
    assert one.get_legend() is None and one.get_window_extent().contains(box.x0, box.y0)
    assert one.get_window_extent().contains(box.x1, box.y1)
    curves = [line.get_transform().transform_path(line.get_path()) for axis in (one, rate) for line in axis.get_lines()]
    assert sum(box.count_contains(curve.vertices) for curve in curves[:4]) <= 2
    plt.close(one.figure)
    # the same on a figure of the PDF backend (its renderer printed the figure at 72 dpi, and left it there)
    bare = matplotlib.figure.Figure(dpi=100)
    FigureCanvasPdf(bare)
    mine = bare.add_subplot()
    distortion, rate = cellvae.pl.history(model, ax=mine, show=False)
    assert bare.dpi == 100
    bare.savefig(tmp_path / "bare.pdf")
    box = rate.get_legend().get_window_extent()
    curves = [line.get_transform().transform_path(line.get_path()) for axis in (mine, rate) for line in axis.get_lines()]
    assert sum(box.count_contains(curve.vertices) for curve in curves[:4]) <= 2
    assert [t.get_text() for t in rate.get_legend().get_texts()] == [
        "train distortion",
        "validation distortion",
        "train rate",
        "validation rate",
        f"kept (epoch {kept})",
    ]
    plt.close(one.figure)
    with pytest.raises(TypeError, match=r"ax takes one matplotlib Axes or two \(distortion, rate\).*got 3 items"):
        cellvae.pl.history(model, ax=plt.subplots(1, 3)[1], show=False)
    figure = tmp_path / "history.png"  # save= writes the path as given
    open_figures = len(plt.get_fignums())
    shown_axes = cellvae.pl.history(model, save=figure)
    assert shown_axes is None and figure.read_bytes()[:4] == b"\x89PNG"  # shown: None, as scanpy's plots give
    assert len(plt.get_fignums()) == open_figures  # saved (and shown: a no-op under Agg), then closed, as scanpy does
    shown = []
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: shown.append(1))
    autoshow = sc.settings.autoshow
    try:
        sc.settings.autoshow = False  # scanpy's setting for scripts: its plots and ours show nothing, give the Axes
        plt.close(cellvae.pl.kl_per_dimension(model).figure)
        sc.settings.autoshow = True
        assert cellvae.pl.kl_per_dimension(model) is None
        plt.close("all")
    finally:
        sc.settings.autoshow = autoshow
    assert shown == [1]
    open_figures = len(plt.get_fignums())
    cellvae.pl.kl_per_dimension(model, show=True, save=tmp_path / "shown.png")  # shown, then closed, as scanpy does
    assert shown == [1, 1] and len(plt.get_fignums()) == open_figures and (tmp_path / "shown.png").is_file()
    whole = plt.figure()
    left, _ = whole.subfigures(1, 2)  # an axes in a subfigure: saving writes the whole figure
    cellvae.pl.kl_per_dimension(model, ax=left.subplots(), save=tmp_path / "in_subfigure.png")
    assert (tmp_path / "in_subfigure.png").read_bytes()[:4] == b"\x89PNG"
    plt.close(whole)
    # scanpy's forms of save: True or a suffix, under sc.settings.figdir, at savefig.dpi (sc.set_figure_params' dpi_save)
    settings = sc.settings.figdir, sc.settings.file_format_figs, plt.rcParams["savefig.dpi"]
    saving = sc.settings.autosave, sc.settings.plot_suffix
    try:
        sc.settings.figdir, sc.settings.file_format_figs, plt.rcParams["savefig.dpi"] = tmp_path / "figures", "png", 300
        with pytest.raises(ValueError, match="no training history: call model.fit"):
            cellvae.pl.history(CellVAE(model.adata), save=True)
        model.save(tmp_path / "model")
        (tmp_path / "model" / "history.json").unlink()
        with pytest.raises(ValueError, match="no training history: it was loaded from a folder without a readable history"):
            cellvae.pl.history(CellVAE.load(tmp_path / "model"), save=True)
        assert not (tmp_path / "figures").exists()  # made on saving, not by a call that fails
        cellvae.pl.history(model, save=".pdf")
        cellvae.pl.history(model, save="_kang.png")
        cellvae.pl.kl_per_dimension(model, save=True)
        cellvae.pl.kl_per_dimension(model, save="_v1")
        sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [9.0, 5.0], "distortion": [100.0, 104.0]})
        cellvae.pl.rate_distortion(sweep, save="")  # scanpy's "" is True
        monkeypatch.chdir(tmp_path)
        cellvae.pl.rate_distortion(sweep, save=Path("_draft.png"))  # a Path is a path, not a suffix
        # scanpy's autosave (save=None) and plot_suffix, as its own plots take them
        sc.settings.autosave, sc.settings.plot_suffix = True, "_run2"
        cellvae.pl.rate_distortion(sweep, show=False)
        cellvae.pl.rate_distortion(sweep, save="_s.svg", show=False)
        assert cellvae.pl.rate_distortion(sweep, save=False, show=False) is not None  # False: not saved
    finally:
        sc.settings.figdir, sc.settings.file_format_figs, plt.rcParams["savefig.dpi"] = settings
        sc.settings.autosave, sc.settings.plot_suffix = saving
    written = sorted(path.name for path in (tmp_path / "figures").iterdir())
    assert written == [
        "history.pdf",
        "history_kang.png",
        "kl_per_dimension.png",
        "kl_per_dimension_v1.png",
        "rate_distortion.png",
        "rate_distortion_run2.png",
        "rate_distortion_s_run2.svg",
    ]
    plt.close("all")
    assert (tmp_path / "_draft.png").is_file()
    assert round(Image.open(tmp_path / "figures" / "history_kang.png").info["dpi"][0]) == 300
    cellvae.pl.history(model, save=tmp_path / "default_dpi.png")  # matplotlib's "figure": 150
    assert round(Image.open(tmp_path / "default_dpi.png").info["dpi"][0]) == 150
    with pytest.raises(TypeError, match="save must be True, a suffix such as '_kang.png' or a file path"):
        cellvae.pl.kl_per_dimension(model, save=1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cellvae.pl.kl_per_dimension(model, save=tmp_path / "no_such_folder" / "kl.png")
    open_figures = len(plt.get_fignums())
    with pytest.raises(ValueError, match="cannot write .xyz files"):  # refused before drawing: no figure left open
        cellvae.pl.kl_per_dimension(model, save=tmp_path / "kl.xyz")
    sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [np.nan, np.nan], "distortion": [100.0, 90.0]})
    with pytest.raises(ValueError, match="no row of the sweep has a finite"):
        cellvae.pl.rate_distortion(sweep, show=False)
    with pytest.raises(ValueError, match="no row of the sweep has a finite"):
        cellvae.pl.rate_distortion(sweep.iloc[:0], show=False)
    with pytest.raises(TypeError, match="must be numbers"):
        cellvae.pl.rate_distortion(sweep.assign(beta=["low", "high"]), show=False)
    assert len(plt.get_fignums()) == open_figures
    ax = cellvae.pl.rate_distortion(sweep.assign(rate=[np.nan, 3.0]), show=False)  # the finite rows are drawn
    assert [t.get_text() for t in ax.texts] == ["β=1"]
    with pytest.raises(ValueError, match="threshold must be"):
        cellvae.pl.kl_per_dimension(model, threshold=float("nan"), show=False)
    plt.close("all")


def test_large_beta_collapses_the_posterior_and_free_bits_prevent_it(kang):
    with pytest.warns(PosteriorCollapseWarning, match=r"posterior collapse: \d+ of 10 latent dimensions"):
        collapsed = CellVAE(kang, n_latent=10, beta=100.0).fit(max_epochs=40, progress=False)
    assert collapsed.active_units() <= 3
    assert collapsed.kl_per_dimension().sum() < 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", PosteriorCollapseWarning)
        floored = CellVAE(kang, n_latent=10, beta=100.0, free_bits=0.5).fit(max_epochs=40, progress=False)
    assert floored.active_units() >= 8 > collapsed.active_units()


def test_free_bits_are_charged_in_the_validation_loss_as_in_training(pbmc):
    """The best epoch and the divergence check score the objective training minimises: the KL that free bits leave
    free was charged at the full beta, so a fit at beta=30 with free bits was undone as "worse than untrained"."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # (the "training made the model worse" warning)
        model = CellVAE(pbmc, beta=30.0, free_bits=2.0).fit(max_epochs=60, progress=False)
    history = model.history
    assert model.is_trained and history.attrs["best_epoch"] == history["validation_loss"].idxmin() > 30
    floor = model.config.n_latent * model.config.free_bits  # each dimension charged at least free_bits nats
    charged = (history["validation_loss"] - history["validation_distortion"]) / model.config.beta
    assert (charged >= np.maximum(floor, history["validation_rate"]) - 1e-4).all()


def test_narrow_posteriors_at_a_small_scale_are_not_called_collapse():
    """Measured on 96 cells of deep read counts: every dimension's posterior means varied by 0.003–0.007 across
    cells (below the activity threshold of 0.01) while the KLs summed to 65 nats per cell, and fit warned of
    posterior collapse, advising a lower beta or free bits, which are for a KL near zero."""
    from cellvae.diagnostics import collapse_message

    small_scale = np.full(10, 0.004)
    assert collapse_message(np.full(10, 6.5), small_scale) is None
    message = collapse_message(np.full(10, 0.002), small_scale)  # the prior's posterior: collapsed
    assert message.startswith("posterior collapse: 0 of 10 latent dimensions tell cells apart and their KLs sum to 0.02")
    mixed = collapse_message(np.r_[np.full(4, 3.0), np.full(6, 0.001)], np.r_[np.full(2, 0.5), np.full(8, 0.004)])
    assert mixed.startswith("posterior collapse: 4 of 10")  # two active, two narrow; six collapsed
    assert collapse_message(np.r_[np.full(5, 3.0), np.full(5, 0.001)], small_scale) is None
    little = collapse_message(np.full(4, 0.12), np.full(4, 0.5))  # every dimension varies, but they carry 0.48 nats
    assert little.startswith("posterior collapse: the latent space carries 0.48 nats per cell (its KLs summed), too little")
    assert "though 4 of 4 dimensions vary across cells" in little
    remedies = "; lower beta, lengthen KL warm-up (kl_warmup=...), or use free bits (free_bits=...); after very few epochs"
    assert message.endswith(f"{remedies}, train longer first")  # at the default learning rate
    deep = collapse_message(np.full(10, 0.002), small_scale, n_layers=5)  # deep LayerNorm networks collapse
    assert "; use fewer layers, or normalization='batch' (n_layers=5 with LayerNorm collapses); else lower beta" in deep
    assert collapse_message(np.full(10, 0.002), small_scale, n_layers=5, normalization="batch") == message


def test_a_collapse_after_too_large_a_learning_rate_names_the_learning_rate_first():
    """Haber's intestine cells at lr=0.1: the posterior collapses (15-NN accuracy 0.04 against 0.52 at lr=0.01), and free
    bits, the warning's advice before, silenced it while the accuracy stayed at 0.37."""
    haber = shared_dataset("mouse_intestine_haber_scdesign2.h5ad")
    match = (
        r"posterior collapse: .*; train with a smaller learning rate first \(lr=0.1 is above the default 0.001\); else lower beta"
    )
    with pytest.warns(PosteriorCollapseWarning, match=match):
        CellVAE(haber).fit(max_epochs=40, lr=0.1, progress=False)


def test_the_sweeps_training_columns_come_from_the_cells_each_fit_trained_on(monkeypatch):
    """train_* were measured on all cells outside the held-out ones, fit's own validation cells among them (225 of
    2,000), which thinned the gap between training and held-out cells that they are there to show."""
    adata = cellvae.datasets.simulate(n_cells=500, n_genes=60, n_batches=1, n_cell_types=3, random_state=0)
    measured = []
    original = CellVAE.rate_distortion

    def recorded(model, cells, **kwargs):  # the real method, noting which cells it scored
        measured.append((model, cells.obs_names.copy()))
        return original(model, cells, **kwargs)

    monkeypatch.setattr(CellVAE, "rate_distortion", recorded)
    cellvae.tl.rate_distortion_sweep(adata, betas=(1.0,), max_epochs=2, n_hidden=16, random_state=0)
    (model, held_out), (same, scored) = measured
    assert same is model
    trained = model.adata.obs_names[model.train_indices]
    assert sorted(scored) == sorted(trained) and not set(scored) & set(held_out)
    assert not set(scored) & set(model.adata.obs_names[model.validation_indices])


@pytest.mark.slow
def test_rate_falls_and_distortion_rises_with_beta(kang):
    betas = (0.25, 0.5, 1.0, 2.0, 4.0)
    # 30 epochs (tutorial 03 runs this sweep with 60); seeds 0-2 give rate drops of 13.9-14.5 nats, distortion
    # rises of 15.6-20.8, steps of rate <= -2.6 and of distortion >= 0.87, beta = 1 within 0.93 of the best.
    frame = cellvae.tl.rate_distortion_sweep(kang, betas, labels_key="cell_type", max_epochs=30, n_latent=10)
    assert list(frame["beta"]) == list(betas)
    rate, distortion, elbo = frame["rate"].to_numpy(), frame["distortion"].to_numpy(), frame["elbo"].to_numpy()
    # Held-out rate falls and distortion rises (each step may wobble by Monte-Carlo and training noise).
    assert np.all(np.diff(rate) < 0.5) and rate[0] - rate[-1] > 5.0
    assert np.all(np.diff(distortion) > -1.0) and distortion[-1] - distortion[0] > 5.0
    # beta = 1 trains on the ELBO itself, so its ELBO is near the best of the sweep, on training and held-out
    # cells (finite training, dropout and overfitting let a neighbouring beta win by a nat or two).
    train_elbo = frame["train_elbo"].to_numpy()
    assert train_elbo[betas.index(1.0)] >= train_elbo.max() - 2.0
    assert elbo[betas.index(1.0)] >= elbo.max() - 2.0
    np.testing.assert_allclose(frame["train_elbo"], -(frame["train_rate"] + frame["train_distortion"]), rtol=1e-9)
    assert frame["active_units"].between(0, 10).all()
    assert frame["label_silhouette"].between(0, 1).all() and frame["label_nmi"].between(0, 1).all()
    ax = cellvae.pl.rate_distortion(frame, show=False)
    assert sorted(t.get_text() for t in ax.texts) == sorted(f"β={b:g}" for b in betas)
    assert ax.get_title() == "means over held-out cells"
    plt.close(ax.figure)
    # Two sweeps stacked (their index labels repeat): the curve joins each beta's mean, and the equal-ELBO line
    # passes through the best of those means.
    stacked = pd.concat([frame, frame.assign(rate=frame["rate"] + 1.0)])
    ax = cellvae.pl.rate_distortion(stacked, show=False)
    (line,) = ax.collections
    best = (frame["rate"] + frame["distortion"]).min() + 0.5
    assert line.get_label() == "equal ELBO" and "equal ELBO" in [t.get_text() for t in ax.get_legend().get_texts()]
    np.testing.assert_allclose(line.get_segments()[0].sum(axis=1), best)
    # the line leaves the limits to the points: the curve fills the height (it sat in a quarter of it), also after the
    # user adds points of their own and asks for the limits again (matplotlib < 3.10 counted any Line2D in relim)
    span = stacked.groupby("beta")["distortion"].mean()
    for _ in range(2):
        low, high = ax.get_ylim()
        assert low >= span.min() - 0.1 * (span.max() - span.min()) and high <= span.max() + 0.1 * (span.max() - span.min())
        ax.plot(frame["rate"].mean(), span.mean(), "x")
        ax.relim(), ax.autoscale_view()
    plt.close(ax.figure)
    # the standard errors of the held-out means, and the dimensions that carry information
    assert (frame["elbo_se"] > 1).all()  # the cells' spread: other held-out cells would move every row together
    best = frame["elbo"].idxmax()
    np.testing.assert_allclose(frame["elbo_to_best"], frame["elbo"] - frame.loc[best, "elbo"], atol=1e-6)
    assert frame.loc[best, "elbo_to_best_se"] == 0 and (frame["elbo_to_best_se"].drop(best) > 0).all()
    assert (frame["elbo_to_best_se"] < frame["elbo_se"] / 3).all()  # paired over the same cells: far surer
    assert (frame["informative_units"] <= 10).all() and frame["informative_units"].iloc[0] >= 5


def test_iwae_bound_rises_with_samples_above_the_elbo(kang, trained):
    model, _ = trained
    cells = kang[:200]
    bounds = [model.marginal_log_likelihood(cells, n_samples=k).mean() for k in (1, 10, 100)]
    assert bounds[0] < bounds[1] < bounds[2]
    assert bounds[2] - bounds[0] < 20.0  # a gap of a few nats per cell, not a broken estimator


def test_log_px_estimate_matches_numerical_integration_over_a_one_dimensional_latent():
    """With one latent dimension log p(x) = log ∫ p(x|z) p(z) dz can be summed on a grid: the importance-
    weighted estimate must reach it from below (it is the log of a mean weight, not of a sum)."""
    torch.testing.assert_close(iwae_bound(torch.tensor([[1.0, 2.0], [3.0, 2.0]]).log()), torch.tensor([2.0, 2.0]).log())
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=40, random_state=0)
    model = CellVAE(adata, n_latent=1).fit(max_epochs=20, progress=False)
    estimate = model.marginal_log_likelihood(adata[:50], n_samples=2000, progress=False)
    loader, cells = model._loader(adata[:50], torch.device("cpu"))
    minibatch = next(iter(loader.batches(cells, len(cells))))
    grid = torch.linspace(-8.0, 8.0, 4001)
    with torch.no_grad():
        log_likelihood = model.module.log_likelihood_draws(
            grid[:, None, None].expand(-1, len(cells), 1).contiguous(),
            minibatch.counts,
            minibatch.covariates,
            minibatch.library,
            minibatch.batch_index,
        )
    log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(grid)[:, None]
    exact = (torch.logsumexp(log_likelihood + log_prior, dim=0) + torch.log(grid[1] - grid[0])).double().numpy()
    assert estimate.mean() <= exact.mean() + 0.05  # a lower bound, up to its Monte-Carlo error
    assert np.abs(estimate - exact).mean() < 0.5


def test_inference_gaps_are_non_negative_and_refinement_never_hurts(kang, trained):
    model, _ = trained
    gaps = model.inference_gaps(kang[:150], n_steps=100, n_samples=50)
    assert {"elbo_encoder", "elbo_refined", "log_px", "amortization_gap", "approximation_gap"} <= set(gaps.columns)
    # Per cell, up to the Monte-Carlo error of the ELBO estimates.
    assert (gaps["amortization_gap"] > -4 * gaps["amortization_gap_se"] - 1e-3).all()
    assert gaps["approximation_gap"].min() > -1.0
    assert gaps["amortization_gap"].mean() > 0.1 and gaps["approximation_gap"].mean() > 0.1
    # the gaps are the differences the docstring names
    np.testing.assert_allclose(gaps["approximation_gap"], gaps["log_px"] - gaps["elbo_refined"])
    np.testing.assert_allclose(gaps["amortization_gap"], gaps["elbo_refined"] - gaps["elbo_encoder"])
    # the default refinement has converged: twice the steps find little more of the amortization gap
    default = model.inference_gaps(kang[:40], n_samples=20)["amortization_gap"].mean()
    longer = model.inference_gaps(kang[:40], n_steps=1000, n_samples=20)["amortization_gap"].mean()
    assert default > 0.95 * longer
    refined = model.get_latent(kang[:150], refine_steps=50)
    plain = model.get_latent(kang[:150])
    assert refined.shape == plain.shape and refined.dtype == np.float32
    assert 0 < np.abs(refined - plain).mean() < 1.0


def test_refinement_keeps_the_encoders_posterior_where_refining_scores_worse(kang, trained):
    """Steps too large to help most cells: each keeps the encoder's q where the refined one scores lower on common
    draws, so the q returned is never much worse than the start (a test audit: dropping that rule passed every test)."""
    from cellvae.diagnostics import _objective, evaluation, refine_posterior

    model, _ = trained
    loader, cells = model._loader(kang[:200], model.device)
    mb = next(iter(loader.batches(cells, 200)))
    with evaluation(model.module, 0):
        with torch.no_grad():
            q = model.module.inference(mb.counts, mb.covariates, sample=False)
        mean, scale = refine_posterior(model.module, mb, q["mean"], q["scale"], n_steps=10, lr=3.0)
        kept = (mean == q["mean"]).all(1)
        assert kept.any(), "no cell kept the encoder's posterior at lr=3"
        with torch.no_grad():
            noise = torch.randn((200, *mean.shape))
            start = _objective(model.module, mb, q["mean"], q["scale"], noise, 1.0, False).mean(0)
            returned = _objective(model.module, mb, mean, scale, noise, 1.0, False).mean(0)
    assert (returned > start - 5.0).all()  # (the draws that chose differ from these: a few nats of noise at most)
    assert (scale[kept] == q["scale"][kept]).all()  # the whole q kept, its scale too


def test_refinement_keeps_free_bits_free(kang):
    """A model trained with free bits pays no KL for dimensions below the floor; refinement that charged it
    pulled them towards the prior (the spread of the means fell from 2.85 to 0.59 in 200 steps at beta 64)."""
    cells = kang[:600, :800].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # posterior collapse at beta 64, which free bits hold off
        model = CellVAE(cells, n_latent=10, beta=64.0, free_bits=0.5).fit(max_epochs=15, progress=False, random_state=0)
    plain = model.get_latent(cells[:200])
    refined = model.get_latent(cells[:200], refine_steps=100, progress=False)
    assert refined.var(0).sum() > 0.8 * plain.var(0).sum()
    assert not np.allclose(refined, plain, atol=1e-3)
    with pytest.raises(ValueError, match=r"refine_steps must be a non-negative integer, got True"):
        model.get_latent(cells[:5], refine_steps=True)


def test_full_covariance_posterior_gaps(kang):
    model = CellVAE(kang, n_latent=6, posterior="full").fit(max_epochs=30, progress=False)
    gaps = model.inference_gaps(kang[:100], n_steps=100, n_samples=30)
    assert np.isfinite(gaps.to_numpy()).all()
    assert (gaps["amortization_gap"] > -4 * gaps["amortization_gap_se"] - 1e-3).all()
    assert gaps["amortization_gap"].mean() > 0.1 and gaps["approximation_gap"].mean() > 0
    # single cells' approximation gaps fall below 0 by Monte-Carlo noise, which their standard errors cover
    assert (gaps["approximation_gap_se"] > 0).all()
    assert (gaps["approximation_gap"] > -4 * gaps["approximation_gap_se"] - 1e-3).all()
    one_draw = model.inference_gaps(kang[:5], n_steps=5, n_samples=1, n_elbo_samples=1)
    assert one_draw[["amortization_gap_se", "approximation_gap_se"]].isna().all().all()  # unknown, not 0
    assert np.isfinite(one_draw[["amortization_gap", "approximation_gap"]].to_numpy()).all()


def test_bad_arguments_are_refused_before_work(kang, trained):
    model, _ = trained
    with pytest.raises(ValueError, match="refine_steps"):
        model.get_latent(kang, mean=False, refine_steps=5)
    with pytest.raises(ValueError, match="n_samples"):
        model.marginal_log_likelihood(kang, n_samples=0)
    with pytest.raises(ValueError, match="betas"):
        cellvae.tl.rate_distortion_sweep(kang, betas=(-1.0,))
    with pytest.raises(KeyError, match="labels_key"):
        cellvae.tl.rate_distortion_sweep(kang, labels_key="no_such_column")


def test_sweep_trains_on_a_rare_batch_and_scores_nan_where_labels_cannot_be_scored():
    """A batch whose only cell was drawn for the held-out set is trained on instead (the models could not
    embed it); label scores that need 2 to n - 1 classes are NaN, not an error after training."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    rare = int(np.random.default_rng(0).permutation(adata.n_obs)[0])  # the first cell the sweep holds out
    adata.obs["batch"] = adata.obs["batch"].astype(str)
    adata.obs.iloc[rare, adata.obs.columns.get_loc("batch")] = "rare"
    adata.obs["unique"] = [f"cell{i}" for i in range(adata.n_obs)]  # as many labels as cells
    told = r"label_silhouette and label_nmi will be NaN: the 19 labelled held-out cells hold 19 labels of obs\['unique'\]"
    with pytest.warns(UserWarning, match=told):
        frame = cellvae.tl.rate_distortion_sweep(
            adata, betas=(1.0,), batch_key="batch", labels_key="unique", max_epochs=2, n_hidden=16, n_latent=4
        )
    assert np.isfinite(frame[["rate", "distortion", "elbo"]].to_numpy()).all()
    assert frame[["label_silhouette", "label_nmi"]].isna().all(axis=None)
    adata.obs["few"] = pd.Series(np.where(np.arange(200) < 10, "A", None), index=adata.obs_names)  # 10 labelled cells
    with pytest.warns(UserWarning, match=r"the \d labelled held-out cells hold [01] labels of obs\['few'\]"):
        frame = cellvae.tl.rate_distortion_sweep(adata, betas=(1.0,), labels_key="few", max_epochs=1, n_hidden=16, n_latent=4)
    assert frame[["label_silhouette", "label_nmi"]].isna().all(axis=None)


def test_a_sweep_tells_each_data_warning_once_not_once_per_beta():
    """Every beta's fit of the same cells warned of the same small batch again (each beta: the same text)."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    adata.obs["batch"] = adata.obs["batch"].cat.add_categories(["late"])
    adata.obs.iloc[:4, adata.obs.columns.get_loc("batch")] = "late"
    sweep = functools.partial(
        cellvae.tl.rate_distortion_sweep, adata, betas=(0.5, 2.0), batch_key="batch", max_epochs=1, n_hidden=16, n_latent=4
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        shown_by = warnings.showwarning
        frame = sweep(progress=False)
        assert warnings.showwarning is shown_by  # the caller's, given back
    small = [str(w.message) for w in caught if "under 10 cells with counts" in str(w.message)]
    assert len(small) == 1 and "obs['batch'] 'late'" in small[0] and len(frame) == 2
    with warnings.catch_warnings(record=True) as caught:  # a beta's training going wrong is told for each beta,
        warnings.simplefilter("always")  # though its text is the same for both
        sweep(progress=False, max_epochs=2, fit_kwargs={"lr": 1e30})
    non_finite = [str(w.message) for w in caught if "non-finite loss" in str(w.message)]
    assert len(non_finite) == 4 and len(set(non_finite)) == 2, non_finite
    with warnings.catch_warnings(), pytest.raises(UserWarning, match="under 10 cells with counts"):
        warnings.simplefilter("error")  # -W error: raised where it is given, before training
        sweep(progress=False)


def test_sweep_of_too_few_cells_is_refused_as_such_before_training(monkeypatch):
    """An empty AnnData was told that no held-out cell shared a batch, one cell that adata is empty."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=1, random_state=0)
    monkeypatch.setattr(CellVAE, "fit", lambda *args, **kwargs: pytest.fail("trained"))
    for n, held_out, left in ((0, 0.1, 0), (1, 0.1, 0), (8, 0.1, 7), (10, 0.1, 9), (11, 0.99, 0), (100, 0.95, 5)):
        told = rf"at least 10 cells besides those it holds out: held_out={held_out:g} of adata's {n} cells leaves {left};"
        with pytest.raises(ValueError, match=told):
            cellvae.tl.rate_distortion_sweep(adata[:n].copy(), betas=(1.0,), held_out=held_out)


def test_sweep_refuses_a_held_out_cells_bad_covariate_before_training_and_takes_keys_as_any_collection(monkeypatch):
    """A NaN continuous covariate in a held-out cell was refused after the first beta trained, counted among the
    held-out cells; categorical_covariate_keys as a NumPy array (CellVAE takes one) raised an ambiguous truth value."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    adata.obs["score"] = np.linspace(0.0, 1.0, adata.n_obs)
    adata.obs["kit"] = np.where(np.arange(adata.n_obs) % 2, "v2", "v3")
    held = int(np.random.default_rng(0).permutation(adata.n_obs)[0])  # the first cell the sweep holds out
    adata.obs.iloc[held, adata.obs.columns.get_loc("score")] = np.nan
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before the covariate was checked"))
    with pytest.raises(ValueError, match=r"obs\['score'\] has NaN, infinite or non-numeric values \(1 of 200\)"):
        cellvae.tl.rate_distortion_sweep(adata, betas=(1.0, 2.0), continuous_covariate_keys=["score"], max_epochs=1)
    monkeypatch.undo()
    adata.obs["score"] = adata.obs["score"].fillna(0.5)
    for keys in (np.array(["kit"]), pd.Index(["kit"])):
        frame = cellvae.tl.rate_distortion_sweep(
            adata, betas=(1.0,), categorical_covariate_keys=keys, max_epochs=1, n_hidden=16, n_latent=4, progress=False
        )
        assert np.isfinite(frame["elbo"]).all()


def test_a_sweeps_checkpoints_go_into_a_folder_per_beta_and_resume_continues_each(tmp_path, monkeypatch):
    """One checkpoint_dir for every beta: the second beta found the first's checkpoints and failed after it trained
    (and resume=True then found another model's)."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=2, random_state=0)
    sweep = {"betas": (0.5, 1.0), "batch_key": "batch", "max_epochs": 2, "n_hidden": 16, "n_latent": 4, "progress": False}
    frame = cellvae.tl.rate_distortion_sweep(adata, **sweep, fit_kwargs={"checkpoint_dir": tmp_path})
    assert sorted(path.name for path in tmp_path.iterdir()) == ["beta_0.5", "beta_1.0"]
    resumed = cellvae.tl.rate_distortion_sweep(adata, **sweep, fit_kwargs={"checkpoint_dir": tmp_path, "resume": True})
    pd.testing.assert_frame_equal(resumed, frame)  # (each beta's run had finished: nothing trained again)
    monkeypatch.setattr(CellVAE, "fit", lambda *a, **k: pytest.fail("trained before the earlier checkpoints were told"))
    with pytest.raises(FileExistsError, match=r"beta_0.5' holds the checkpoints of an earlier run"):
        cellvae.tl.rate_distortion_sweep(adata, **sweep, fit_kwargs={"checkpoint_dir": tmp_path})
    with pytest.raises(ValueError, match=r"repeat a beta \(checkpoint folder beta_1.0\), .*: give each beta once"):
        cellvae.tl.rate_distortion_sweep(adata, **sweep | {"betas": (1.0, 1.0)}, fit_kwargs={"checkpoint_dir": tmp_path / "new"})
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match=r"betas=\(1.0, 0.5, 1.0\) repeat \[1.0\]: .* would train the same model again"):
        cellvae.tl.rate_distortion_sweep(adata, **sweep | {"betas": (1.0, 0.5, 1.0)})  # (no checkpoints: told all the same)


def test_ctrl_c_stops_the_whole_sweep_and_returns_the_betas_finished(monkeypatch):
    """Ctrl-C (Jupyter's "interrupt kernel") turned one beta's fit into a warning and the sweep trained the next ones."""
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    evaluate, calls = cellvae.train.evaluate, []

    def ctrl_c_in_the_second_epoch_of_beta_one(vae, *args, **kwargs):
        calls.append(vae.config.beta)
        if calls.count(1.0) == 2:
            raise KeyboardInterrupt
        return evaluate(vae, *args, **kwargs)

    monkeypatch.setattr(cellvae.train, "evaluate", ctrl_c_in_the_second_epoch_of_beta_one)
    sweep = {"max_epochs": 3, "n_hidden": 16, "n_latent": 4}
    told = r"Ctrl-C stopped the sweep at beta=1: returning the betas finished \(0.5\)"
    with pytest.warns(RuntimeWarning, match=told):
        frame = cellvae.tl.rate_distortion_sweep(adata, betas=(0.5, 1.0, 2.0), **sweep)
    assert frame["beta"].tolist() == [0.5] and 2.0 not in calls and np.isfinite(frame["elbo"]).all()
    calls.clear()
    # during the first beta: nothing to return, which the interrupt says (fit had said it keeps its parameters)
    with pytest.raises(KeyboardInterrupt, match=r"at beta=1, before any beta finished: nothing to return"):
        with pytest.warns(RuntimeWarning, match="training interrupted"):
            cellvae.tl.rate_distortion_sweep(adata, betas=(1.0, 2.0), **sweep)
    calls.clear()
    scored, rate_distortion = [], CellVAE.rate_distortion

    def ctrl_c_scoring_the_second_beta(model, *args, **kwargs):  # after its fit, while it is evaluated
        scored.append(1)
        if len(scored) == 3:
            raise KeyboardInterrupt
        return rate_distortion(model, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(CellVAE, "rate_distortion", ctrl_c_scoring_the_second_beta)
        with pytest.warns(RuntimeWarning, match=r"at beta=1: returning the betas finished \(0.5\)"):
            assert cellvae.tl.rate_distortion_sweep(adata, betas=(0.5, 1.0, 2.0), **sweep)["beta"].tolist() == [0.5]
    calls.clear()
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():  # nothing finished: nothing to return
        warnings.simplefilter("ignore", RuntimeWarning)
        cellvae.tl.rate_distortion_sweep(adata, betas=(1.0, 2.0), **sweep)
    assert 2.0 not in calls


def test_each_betas_progress_bars_name_it_and_later_bars_do_not(capsys):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=50, random_state=0)
    cellvae.tl.rate_distortion_sweep(adata, betas=(0.5, 2.0), max_epochs=2, n_hidden=16, n_latent=4, progress=True)
    shown = capsys.readouterr().err
    assert "beta=0.5 cellvae:" in shown and "beta=2 cellvae:" in shown
    CellVAE(adata).fit(max_epochs=1)
    shown = capsys.readouterr().err
    assert "cellvae:" in shown and "beta=" not in shown


def test_sweep_warm_start_carries_the_weights_on_and_held_out_sets_the_test_cells():
    adata = cellvae.datasets.simulate(n_cells=600, n_genes=100, n_batches=2, random_state=3)
    settings = {"betas": (1.0, 4.0), "batch_key": "batch", "max_epochs": 3, "n_hidden": 32, "n_latent": 4}
    cold = cellvae.tl.rate_distortion_sweep(adata, **settings)
    from_a_generator = cellvae.tl.rate_distortion_sweep(adata, **(settings | {"betas": (b for b in settings["betas"])}))
    pd.testing.assert_frame_equal(from_a_generator, cold)  # any iterable of betas, read once
    warm = cellvae.tl.rate_distortion_sweep(adata, warm_start=True, **settings)
    relative = ["elbo_to_best", "elbo_to_best_se"]  # to the best row of each sweep
    pd.testing.assert_series_equal(warm.drop(columns=relative).iloc[0], cold.drop(columns=relative).iloc[0])  # fresh either way
    np.testing.assert_allclose(cold["loss"], cold["distortion"] + cold["beta"] * cold["rate"])  # what each trained
    # the second beta starts from the first one's trained weights: 3 + 3 epochs reconstruct better than 3
    # (here 342 against 358 nats per cell)
    assert warm.loc[1, "distortion"] < cold.loc[1, "distortion"] - 5
    assert (warm["epochs"] == 3).all()
    half = cellvae.tl.rate_distortion_sweep(adata, held_out=0.5, **settings)
    assert np.isfinite(half[["rate", "distortion", "elbo"]].to_numpy()).all()
    assert not np.allclose(half["distortion"], cold["distortion"])  # other cells trained on and scored


@pytest.mark.filterwarnings("ignore::cellvae.diagnostics.PosteriorCollapseWarning")  # 1-2 epochs
def test_a_beta_without_a_finite_elbo_leaves_the_others_compared_with_the_best(monkeypatch):
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=40, random_state=0)
    rate_distortion = CellVAE.rate_distortion

    def diverged_at_beta_2(self, *args, **kwargs):
        frame = rate_distortion(self, *args, **kwargs)
        return frame.assign(elbo=np.nan) if self.config.beta == 2.0 else frame

    monkeypatch.setattr(CellVAE, "rate_distortion", diverged_at_beta_2)
    frame = cellvae.tl.rate_distortion_sweep(adata, betas=(1.0, 2.0, 4.0), max_epochs=2, n_hidden=16, n_latent=4)
    assert frame["elbo_to_best"].isna().tolist() == [False, True, False]
    assert frame["elbo_to_best"].max() == 0 and np.isfinite(frame.loc[[0, 2], "elbo_to_best_se"]).all()
    told = r"one cell is held out \(held_out=0.005 of 200 cells\), so active_units and the standard errors will be NaN"
    with pytest.warns(UserWarning, match=told):
        one = cellvae.tl.rate_distortion_sweep(adata, betas=(1.0,), held_out=0.005, max_epochs=1, n_hidden=16, n_latent=4)
    # one held-out cell: no standard error, and no activity (a variance across cells; it read 0, like collapse)
    assert one[["elbo_se", "elbo_to_best_se", "active_units"]].isna().all(axis=None)


def test_sweep_streams_a_backed_file_and_comes_close_to_the_in_memory_sweep(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=400, n_genes=50, n_batches=3, random_state=2)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    settings = {"betas": (1.0,), "batch_key": "batch", "max_epochs": 2, "n_hidden": 16, "n_latent": 4, "progress": False}
    on_disk = cellvae.tl.rate_distortion_sweep(backed, **settings)
    in_memory = cellvae.tl.rate_distortion_sweep(adata, **settings)
    # the same split and settings; the models train on views of the file, streamed in shuffled blocks of
    # nearby cells rather than in one shuffled order, so they differ a little
    counts = ["active_units", "informative_units"]  # whole dimensions: one near a threshold may fall either side
    pd.testing.assert_frame_equal(on_disk.drop(columns=counts), in_memory.drop(columns=counts), rtol=0.05)
    assert (on_disk[counts] - in_memory[counts]).abs().max(axis=None) <= 1


def test_sweep_with_mask_var_trains_on_the_marked_genes_as_a_copy_of_them_would(tmp_path):
    adata = cellvae.datasets.simulate(n_cells=300, n_genes=60, n_batches=2, random_state=1)
    adata.var["highly_variable"] = np.arange(adata.n_vars) % 3 > 0  # 40 of the 60 genes
    adata.write_h5ad(tmp_path / "cells.h5ad")
    settings = {"betas": (1.0,), "batch_key": "batch", "max_epochs": 2, "n_hidden": 16, "n_latent": 4, "progress": False}
    subset = adata[:, adata.var["highly_variable"]].copy()
    expected = cellvae.tl.rate_distortion_sweep(subset, **settings)
    before = adata.copy()
    pd.testing.assert_frame_equal(cellvae.tl.rate_distortion_sweep(adata, mask_var="highly_variable", **settings), expected)
    assert adata.n_vars == 60 and (adata.X != before.X).nnz == 0  # only read
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    on_disk = cellvae.tl.rate_distortion_sweep(backed, mask_var=adata.var["highly_variable"].to_numpy(), **settings)
    # streamed in shuffled blocks: close, not equal (the rate, 0.4 nats per cell after 2 epochs, within 10%; all 60
    # genes: a distortion of 250 nats per cell, not 149)
    pd.testing.assert_frame_equal(on_disk, expected, rtol=0.1)
    with pytest.raises(KeyError, match="mask_var 'hvg' is not a column of adata.var"):
        cellvae.tl.rate_distortion_sweep(adata, mask_var="hvg", **settings)


def test_the_latent_activity_merged_minibatch_by_minibatch_is_the_variance_of_the_embedding():
    """posterior_statistics streams the posterior means (its memory does not grow with the cells)."""
    adata = cellvae.datasets.simulate(n_cells=700, n_genes=60, random_state=0)
    model = CellVAE(adata).fit(max_epochs=2, progress=False)
    loader, cells = model._loader(adata, model.device)
    _, activity = cellvae.diagnostics.posterior_statistics(model.module, loader, cells, batch_size=64)
    np.testing.assert_allclose(activity, model.get_latent().astype(np.float64).var(0), rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------- small simulated data: the sweep, the plots

SWEEP = {"betas": (1.0,), "max_epochs": 2, "n_hidden": 16, "n_latent": 4}


@pytest.fixture(scope="module")
def cells():
    return cellvae.datasets.simulate(n_cells=200, n_genes=50, n_batches=1, n_cell_types=3, random_state=0)


def _held_out(adata, held_out: float = 0.1, random_state: int = 0) -> np.ndarray:
    """The cells the sweep holds out (no batch or covariate here to move any back)."""
    held = np.zeros(adata.n_obs, dtype=bool)
    held[np.random.default_rng(random_state).permutation(adata.n_obs)[: max(1, int(round(held_out * adata.n_obs)))]] = True
    return held


# ----------------------------------------------------------------------------- rate_distortion_sweep's label scores


def test_sweep_scores_the_labels_of_the_held_out_cells_only(cells):
    """The held-out cells all carry one label (the training cells two): one class, which cannot be scored."""
    adata = cells.copy()
    held = _held_out(adata)
    adata.obs["label"] = np.where(held | (np.arange(adata.n_obs) % 2 == 0), "A", "B")
    frame = cellvae.tl.rate_distortion_sweep(adata, labels_key="label", **SWEEP)
    assert frame[["label_silhouette", "label_nmi"]].isna().all(axis=None)


def test_sweep_leaves_unlabelled_cells_out_of_the_label_scores(cells):
    """Cells without a label are not a class of their own: one label and missing ones cannot be scored."""
    adata = cells.copy()
    held = np.flatnonzero(_held_out(adata))
    label = pd.Series(pd.NA, index=adata.obs_names, dtype="object")
    label.iloc[held[: len(held) // 2]] = "A"  # half the held-out cells labelled, all alike; the rest missing
    adata.obs["label"] = label
    frame = cellvae.tl.rate_distortion_sweep(adata, labels_key="label", **SWEEP)
    assert frame[["label_silhouette", "label_nmi"]].isna().all(axis=None)


def test_sweep_label_silhouette_is_rescaled_to_zero_to_one_with_chance_at_one_half(cells):
    """Labels drawn at random have a silhouette near 0, which the sweep reports as about 0.5."""
    adata = cells.copy()
    adata.obs["random"] = np.random.default_rng(1).choice(["A", "B"], adata.n_obs)
    frame = cellvae.tl.rate_distortion_sweep(adata, labels_key="random", **SWEEP)
    assert 0.4 < frame.loc[0, "label_silhouette"] < 0.6
    assert 0.0 <= frame.loc[0, "label_nmi"] <= 1.0


def test_sweep_warm_start_trains_later_betas_without_kl_warm_up_unless_asked(cells, monkeypatch):
    warmups = []
    fit = CellVAE.fit

    def recording(self, *args, **kwargs):
        warmups.append(self.config.kl_warmup)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(CellVAE, "fit", recording)
    settings = {**SWEEP, "betas": (1.0, 2.0, 4.0)}
    cellvae.tl.rate_distortion_sweep(cells, warm_start=True, **settings)
    assert warmups == [None, 0, 0]  # the first fit has the default warm-up, the later ones none
    warmups.clear()
    cellvae.tl.rate_distortion_sweep(cells, warm_start=True, kl_warmup=1, **settings)
    assert warmups == [1, 1, 1]


def test_sweep_counts_active_and_informative_units_on_the_held_out_cells(cells, monkeypatch):
    measured = []
    posterior_statistics = CellVAE._posterior_statistics

    def recording(self, adata, *args, **kwargs):
        measured.append(adata.n_obs)
        statistics = posterior_statistics(self, adata, *args, **kwargs)
        measured.append(statistics)
        return statistics

    monkeypatch.setattr(CellVAE, "_posterior_statistics", recording)
    frame = cellvae.tl.rate_distortion_sweep(cells, **SWEEP)
    assert measured[0] == int(_held_out(cells).sum()) and len(measured) == 2
    kl, activity = measured[1]
    assert frame.loc[0, "active_units"] == (activity > 0.01).sum() and frame.loc[0, "informative_units"] == (kl >= 0.1).sum()


# ----------------------------------------------------------------------------- plots


@pytest.fixture(scope="module")
def small_model(cells):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CellVAE(cells, n_hidden=16, n_latent=6).fit(max_epochs=3, progress=False)


def test_likelihood_scores_of_cells_missing_model_genes_say_they_score_observed_zeros(cells, small_model):
    """Genes zero-filled in scoring count as observed zeros (log p(x) moves by several nats): the scores' warning says
    so, the embedding's does not (there it only shifts the embedding)."""
    lacking = cells[:40, 5:].copy()
    scores = [
        lambda: small_model.rate_distortion(lacking, progress=False),
        lambda: small_model.marginal_log_likelihood(lacking, n_samples=2, progress=False),
        lambda: small_model.inference_gaps(lacking[:3], n_steps=2, n_samples=2, n_elbo_samples=2, progress=False),
    ]
    for score in scores:
        with pytest.warns(UserWarning, match=r"5 of the model's 50 genes are missing.*count them as observed zeros"):
            score()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        small_model.get_latent(lacking)
    told = [str(w.message) for w in caught if "genes are missing" in str(w.message)]
    assert len(told) == 1 and "observed zeros" not in told[0]


def test_history_panels_are_titled_and_labelled(small_model):
    distortion, rate = cellvae.pl.history(small_model, show=False)
    assert distortion.get_title() == "distortion −E[log p(x|z)]" and rate.get_title() == "rate KL(q‖p)"
    for panel in (distortion, rate):
        assert panel.get_xlabel() == "epoch" and panel.get_ylabel() == "nats per cell"
    plt.close(distortion.figure)
    _, one = plt.subplots()
    left, right = cellvae.pl.history(small_model, ax=one, show=False)
    assert left.get_xlabel() == "epoch"
    assert (left.get_ylabel(), right.get_ylabel()) == ("distortion, nats per cell", "rate, nats per cell")
    plt.close(one.figure)


def test_a_one_epoch_history_is_drawn_as_points(cells):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellVAE(cells, n_hidden=8, n_latent=3).fit(max_epochs=1, progress=False)
    for one_axes in (False, True):
        axes = cellvae.pl.history(model, ax=plt.subplots()[1] if one_axes else None, show=False)
        lines = [line for axis in axes for line in axis.get_lines() if line.get_label() != "kept (epoch 0)"]
        assert len(lines) == 4 and all(line.get_marker() == "o" for line in lines)  # a lone point draws no line
        low, high = axes[0].get_xlim()  # whole epochs: the locator drew ticks at ±0.01, ±0.02, ...
        assert [tick for tick in axes[0].get_xticks() if low <= tick <= high] == [0]
        # on one Axes the four points lie at four heights (each scale put its two at the same two: two points hidden)
        axes[0].figure.canvas.draw()
        heights = [axis.transData.transform((0, line.get_ydata()[0]))[1] for axis in axes for line in axis.get_lines()[:2]]
        assert not one_axes or min(np.diff(sorted(heights))) > 5, heights
        plt.close(axes[0].figure)
    longer = CellVAE(cells, n_hidden=8, n_latent=3).fit(max_epochs=4, progress=False)
    _, shared = plt.subplots(1, 2)
    for first, second in ((model, longer), (longer, model)):  # overlaid on the same Axes, either order
        for axis in shared:
            axis.clear()
        cellvae.pl.history(first, ax=shared, show=False)
        cellvae.pl.history(second, ax=shared, show=False)
        assert shared[0].get_xlim()[0] < 0 and shared[0].get_xlim()[1] > 3  # every epoch of the longer run in view
    plt.close(shared[0].figure)


def test_history_marks_only_points_with_no_finite_neighbour(small_model):
    model = copy.copy(small_model)
    model.history = small_model.history.copy()
    model.history.loc[1, "train_rate"] = np.nan  # epochs 0 and 2 of 3 stand alone
    distortion, rate = cellvae.pl.history(model, show=False)
    lines = {line.get_label(): line for line in rate.get_lines()}
    assert lines["train"].get_marker() == "o" and list(lines["train"].get_markevery()) == [True, False, True]
    assert lines["validation"].get_marker() in ("None", None, "")
    plt.close(distortion.figure)


def test_plots_tell_what_they_leave_out_and_refuse_one_axes_given_twice(small_model):
    """Rows and columns without finite values were left out silently (a legend entry with no line, for history)."""
    sweep = pd.DataFrame({"beta": [0.5, 1.0, 2.0, 4.0], "rate": [9.0, 5.0, np.inf, 1.0], "distortion": [100, 104, 108, np.nan]})
    with pytest.warns(UserWarning, match=r"leaves out 2 row\(s\) whose beta, rate or distortion is not finite \(beta 2, 4\)"):
        ax = cellvae.pl.rate_distortion(sweep, show=False)
    assert sorted(t.get_text() for t in ax.texts) == ["β=0.5", "β=1"]
    plt.close(ax.figure)
    model = copy.copy(small_model)
    model.history = small_model.history.copy()
    model.history["validation_rate"] = np.nan
    with pytest.warns(UserWarning, match=r"leaves out history\['validation_rate'\]: it holds no finite value"):
        distortion, rate = cellvae.pl.history(model, ax=plt.subplots()[1], show=False)
    assert "validation rate" not in [t.get_text() for t in rate.get_legend().get_texts()]
    plt.close(distortion.figure)
    _, one = plt.subplots()
    with pytest.raises(ValueError, match="ax names the same Axes twice; give two Axes, or that one alone"):
        cellvae.pl.history(small_model, ax=(one, one), show=False)
    assert not one.get_lines()
    plt.close(one.figure)


def test_a_figure_folder_that_cannot_be_made_is_told_before_drawing_and_a_layout_engine_is_kept(tmp_path, monkeypatch):
    sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [9.0, 5.0], "distortion": [100.0, 104.0]})
    (tmp_path / "a_file").write_text("")
    figdir, sc.settings.figdir = sc.settings.figdir, tmp_path / "a_file" / "figures"
    open_figures = plt.get_fignums()
    try:
        with pytest.raises(NotADirectoryError, match=r"folder .*a_file/figures \(sc.settings.figdir\) cannot be made"):
            cellvae.pl.rate_distortion(sweep, save=True)
    finally:
        sc.settings.figdir = figdir
    assert plt.get_fignums() == open_figures
    monkeypatch.setenv("HOME", str(tmp_path))
    cellvae.pl.rate_distortion(sweep, save="~/rd.png", show=False)  # "~" is the home folder, as the shell reads it
    assert (tmp_path / "rd.png").is_file()
    with matplotlib.rc_context({"figure.constrained_layout.use": True}), warnings.catch_warnings():
        warnings.simplefilter("error")  # "The figure layout has changed to tight"
        ax = cellvae.pl.rate_distortion(sweep, show=False)
    assert ax.figure.get_layout_engine().__class__.__name__ == "ConstrainedLayoutEngine"
    plt.close(ax.figure)


def test_save_naming_a_folder_is_refused_before_drawing(tmp_path):
    sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [9.0, 5.0], "distortion": [100.0, 104.0]})
    (tmp_path / "figures").mkdir()
    open_figures = plt.get_fignums()
    for folder in (f"{tmp_path / 'figures'}/", f"{tmp_path / 'no_such_folder'}/", "."):
        with pytest.raises(ValueError, match="names a folder; give a file name"):
            cellvae.pl.rate_distortion(sweep, save=folder)
    assert list((tmp_path / "figures").iterdir()) == []  # not a hidden figures/.png
    assert plt.get_fignums() == open_figures


def test_a_figure_that_cannot_be_written_is_closed(tmp_path, monkeypatch):
    sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [9.0, 5.0], "distortion": [100.0, 104.0]})
    open_figures = plt.get_fignums()

    def refuse(*args, **kwargs):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", refuse)
    with pytest.raises(PermissionError):
        cellvae.pl.rate_distortion(sweep, save=tmp_path / "rd.png")
    assert plt.get_fignums() == open_figures
    figure, ax = plt.subplots()  # the caller's own figure stays open
    with pytest.raises(PermissionError):
        cellvae.pl.rate_distortion(sweep, ax=ax, save=tmp_path / "rd.png")
    assert plt.fignum_exists(figure.number)
    plt.close(figure)


def test_saving_into_the_callers_axes_leaves_the_callers_figure_open(small_model, tmp_path):
    figure, ax = plt.subplots()
    cellvae.pl.kl_per_dimension(small_model, ax=ax, save=tmp_path / "kl.png")
    assert (tmp_path / "kl.png").read_bytes()[:4] == b"\x89PNG"
    assert plt.fignum_exists(figure.number)  # the caller may still draw into it
    figure2, axes = plt.subplots(1, 2)
    cellvae.pl.history(small_model, ax=axes, save=tmp_path / "history.png")
    assert plt.fignum_exists(figure2.number)
    plt.close("all")


def test_plots_refuse_what_is_no_axes_and_save_names_with_a_dot_get_png(small_model, tmp_path):
    """ax="foo" was counted as 3 Axes, a 2 × 2 array or a Figure failed inside matplotlib; "hist_beta0.5" was
    refused as a .5 file."""
    sweep = pd.DataFrame({"beta": [0.5, 1.0], "rate": [9.0, 5.0], "distortion": [100.0, 104.0]})
    figure, grid = plt.subplots(2, 2)
    open_figures = plt.get_fignums()
    for wrong in ("foo", grid, [None, None], figure):
        with pytest.raises(TypeError, match="ax takes one matplotlib Axes or two"):
            cellvae.pl.history(small_model, ax=wrong, show=False)
    for wrong in (list(grid[0]), figure, "foo"):
        with pytest.raises(TypeError, match=r"ax takes one matplotlib Axes \(e.g. from plt.subplots\(\)\), got"):
            cellvae.pl.kl_per_dimension(small_model, ax=wrong, show=False)
        with pytest.raises(TypeError, match=r"ax takes one matplotlib Axes \(e.g. from plt.subplots\(\)\), got"):
            cellvae.pl.rate_distortion(sweep, ax=wrong, show=False)
    assert plt.get_fignums() == open_figures  # refused before drawing
    distortion, _ = cellvae.pl.history(small_model, ax=grid[0], show=False)  # a row of an array of Axes: two Axes
    assert distortion is grid[0, 0]
    assert all(float(tick).is_integer() for tick in distortion.get_xticks())  # epochs: whole numbers
    plt.close(figure)
    cellvae.pl.rate_distortion(sweep, save=tmp_path / "rd_beta0.5", show=False)
    cellvae.pl.rate_distortion(sweep, save=str(tmp_path / "run.v2"), show=False)
    assert (tmp_path / "rd_beta0.5.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "run.v2.png").exists()
    with pytest.raises(ValueError, match=r"matplotlib cannot write \.pnng files"):  # a misspelt format is still told
        cellvae.pl.rate_distortion(sweep, save=tmp_path / "rd.pnng", show=False)
    plt.close("all")


def test_kl_per_dimension_of_one_cell_is_refused_as_active_units_is(small_model, cells):
    with pytest.raises(ValueError, match=r"kl_per_dimension colours the dimensions active across cells .*got 1"):
        cellvae.pl.kl_per_dimension(small_model, cells[:1].copy(), show=False)


def test_history_on_one_axes_leaves_the_current_axes_and_reuses_its_right_scale(small_model):
    figure, (ax, other) = plt.subplots(1, 2)
    plt.sca(other)
    axes = cellvae.pl.history(small_model, ax=ax, show=False)
    assert plt.gca() is other  # a following plt.ylabel lands where the user left it, not on the hidden twin
    again = cellvae.pl.history(small_model, ax=ax, show=False)
    assert again[1] is axes[1] and len(figure.axes) == 3  # drawn again: one right scale, not a pile of them
    plt.close(figure)
    figure, ax = plt.subplots()
    mine = ax.twinx()  # the user's own right scale is left to them
    assert cellvae.pl.history(small_model, ax=ax, show=False)[1] is not mine and not mine.get_lines()
    plt.close(figure)


def test_kl_per_dimension_of_many_dimensions_fits_a_page():
    adata = cellvae.datasets.simulate(n_cells=200, n_genes=80, random_state=0)
    model = cellvae.CellVAE(adata, n_latent=60, n_hidden=16).fit(max_epochs=1, progress=False)
    ax = cellvae.pl.kl_per_dimension(model, show=False, progress=False)
    assert ax.figure.get_size_inches()[0] <= 12 and len(ax.patches) == 60
    plt.close(ax.figure)
    with plt.rc_context({"figure.figsize": (3.0, 3.0)}):  # sc.set_figure_params(figsize=...) sets it: as scanpy's plots
        small = cellvae.CellVAE(adata, n_latent=4, n_hidden=16).fit(max_epochs=1, progress=False)
        assert tuple(cellvae.pl.kl_per_dimension(small, show=False, progress=False).figure.get_size_inches()) == (2.25, 2.25)
        assert tuple(cellvae.pl.history(small, show=False)[0].figure.get_size_inches()) == (6.0, 3.0)
    assert len(ax.get_xticks()) < 60  # matplotlib's own ticks, not 60 names
    assert ax.get_xlabel() == "latent dimensions, largest KL first"
    plt.close(ax.figure)


def test_kl_per_dimension_greys_out_the_inactive_dimension_each_bar_names(small_model):
    activity = small_model.get_latent().astype(np.float64).var(0)
    threshold = float(np.median(activity))  # about half the dimensions inactive
    ax = cellvae.pl.kl_per_dimension(small_model, threshold=threshold, show=False)
    dimensions = [int(tick.get_text()) for tick in ax.get_xticklabels()]
    grey = matplotlib.colors.to_rgba("lightgrey")
    inactive = [bar.get_facecolor() == grey for bar in ax.patches]
    assert inactive == [bool(activity[d] <= threshold) for d in dimensions]
    assert 0 < sum(inactive) < len(inactive)
    # each bar is as high as its dimension's KL, largest first
    heights = np.array([bar.get_height() for bar in ax.patches])
    np.testing.assert_allclose(heights, small_model.kl_per_dimension()[dimensions], rtol=1e-5)
    assert (np.diff(heights) <= 0).all()
    informative = int((small_model.kl_per_dimension() >= 0.1).sum())
    assert ax.get_title() == f"{int((activity > threshold).sum())} of 6 active, {informative} ≥ 0.1 nats"
    plt.close(ax.figure)


def test_rate_distortion_draws_the_curve_in_order_of_rate_with_labelled_axes():
    sweep = pd.DataFrame({"beta": [4.0, 0.5, 1.0], "rate": [2.0, 9.0, 5.0], "distortion": [120.0, 100.0, 104.0]})
    ax = cellvae.pl.rate_distortion(sweep, show=False)
    curve = ax.get_lines()[0]
    np.testing.assert_array_equal(curve.get_xdata(), [2.0, 5.0, 9.0])
    np.testing.assert_array_equal(curve.get_ydata(), [120.0, 104.0, 100.0])
    assert ax.get_xlabel().startswith("rate") and ax.get_ylabel().startswith("distortion")
    # every beta's label lies inside the Axes (the smallest beta's, at the largest rate, ran off its right edge)
    ax.figure.canvas.draw()
    inside = ax.get_window_extent()
    for text in ax.texts:
        box = text.get_window_extent()
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, text.get_text()
    plt.close(ax.figure)
    # negative rates (a KL estimate's noise around 0): drawn as any others
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for rates in ([-0.3, -0.001], [-5.0, -3.0]):
            negative = pd.DataFrame({"beta": [1, 2], "rate": rates, "distortion": [300.0, 305.0]})
            ax = cellvae.pl.rate_distortion(negative, show=False)
            plt.close(ax.figure)
    # on log scales, set before or after (matplotlib's axline takes no slope there, or draws it in log space)
    for before in (True, False):
        _, ax = plt.subplots()
        if before:
            ax.set_xscale("log"), ax.set_yscale("log")
        cellvae.pl.rate_distortion(sweep, ax=ax, show=False)
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.figure.canvas.draw()
        (line,) = ax.collections
        drawn = line.get_transform().transform_path(line.get_paths()[0])  # the points drawn, back in data units
        x, y = ax.transData.inverted().transform(drawn.vertices).T
        visible = (x > ax.get_xlim()[0]) & (x < ax.get_xlim()[1]) & (y > ax.get_ylim()[0]) & (y < ax.get_ylim()[1])
        assert visible.sum() > 10
        np.testing.assert_allclose((x + y)[visible], 109.0, rtol=1e-6)  # the best: beta 0.5, 9 + 100
        plt.close(ax.figure)


def test_stacked_sweeps_are_drawn_one_line_per_group_or_as_each_betas_mean_and_the_best_elbo_is_ringed():
    """Two seeds' sweeps stacked: sorted by rate as one line they zigzagged between the seeds' points."""
    one = pd.DataFrame({"beta": [0.5, 1.0, 4.0], "rate": [9.0, 5.0, 2.0], "distortion": [100.0, 103.0, 120.0]})
    stacked = pd.concat([one.assign(seed=0), one.assign(seed=1, rate=one["rate"] + 3.0, distortion=one["distortion"] - 2.0)])
    ax = cellvae.pl.rate_distortion(stacked, groupby="seed", show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["seed=0"].get_xdata(), [2.0, 5.0, 9.0])
    np.testing.assert_array_equal(lines["seed=1"].get_xdata(), [5.0, 8.0, 12.0])
    ring = lines["best ELBO of seed=0 (β=1)"]  # seed 0's beta 1: 5 + 103 = 108, the least distortion + rate
    assert (ring.get_xdata()[0], ring.get_ydata()[0]) == (5.0, 103.0)
    ring = lines["best ELBO of seed=1 (β=1)"]  # each group's own: seed 1 held out other cells (8 + 101 = 109)
    assert (ring.get_xdata()[0], ring.get_ydata()[0]) == (8.0, 101.0)
    assert sorted(t.get_text() for t in ax.texts) == sorted(["β=0.5", "β=1", "β=4"] * 2)
    assert ax.get_title() == ""  # not a sweep's own frame: nothing says the cells were held out
    plt.close(ax.figure)
    ax = cellvae.pl.rate_distortion(stacked, show=False)  # no groupby: each beta at the mean of its rows
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_array_equal(lines["mean per β"].get_xdata(), [3.5, 6.5, 10.5])
    np.testing.assert_array_equal(lines["mean per β"].get_ydata(), [119.0, 102.0, 99.0])
    assert len(lines["each row"].get_xdata()) == 6 and len(ax.texts) == 3
    plt.close(ax.figure)
    # a beta of one sweep only is a mean over that sweep's held-out cells: the best is looked for among the others
    # (two real sweeps: beta 1 best in each, beta 0.5 of the sweep with easier cells ringed as best of all before)
    first = pd.DataFrame({"beta": [0.5, 1.0, 4.0], "rate": [4.91, 4.03, 1.88], "distortion": [783.50, 782.76, 786.88]})
    second = pd.DataFrame({"beta": [2.0, 1.0], "rate": [3.56, 4.62], "distortion": [811.00, 809.81]})
    ax = cellvae.pl.rate_distortion(pd.concat([first, second]), show=False)
    lines = {line.get_label(): line for line in ax.get_lines()}
    ring = lines["best ELBO of the 1 β in every sweep (β=1)"]
    np.testing.assert_allclose([ring.get_xdata()[0], ring.get_ydata()[0]], [(4.03 + 4.62) / 2, (782.76 + 809.81) / 2])
    plt.close(ax.figure)
    # one sweep that repeats a beta is one sweep: every beta is a candidate (one random_state)
    repeated = pd.DataFrame(
        {"beta": [0.1, 0.5, 1.0, 1.0, 2.0], "rate": [20, 10, 5, 5.2, 2.0], "distortion": [80, 88, 100, 100.5, 110]}
    )
    for one_sweep in (repeated, repeated.assign(random_state=0)):
        ax = cellvae.pl.rate_distortion(one_sweep, show=False)
        assert "best ELBO (β=0.5)" in [line.get_label() for line in ax.get_lines()]
        plt.close(ax.figure)
    # sweeps are told apart by their random_state and repeated index labels: stacked with ignore_index=True (or read
    # back from a CSV), by their seeds; of one seed (other settings, the default seed), by their labels; an older frame
    # without the column beside a newer one, by both
    for stacked_again in (
        pd.concat([first.assign(random_state=0), second.assign(random_state=1)], ignore_index=True),
        pd.concat([first.assign(random_state=0), second.assign(random_state=0)]),
        pd.concat([second, first.assign(random_state=1)]),
    ):
        ax = cellvae.pl.rate_distortion(stacked_again, show=False)
        assert "best ELBO of the 1 β in every sweep (β=1)" in [line.get_label() for line in ax.get_lines()]
        plt.close(ax.figure)
    # a group whose value is missing is a group of its own, ringed too
    missing = pd.concat([one.assign(seed=0.0), one.assign(seed=np.nan, distortion=one["distortion"] + 1.0)])
    ax = cellvae.pl.rate_distortion(missing, groupby="seed", show=False)
    assert {"best ELBO of seed=0.0 (β=1)", "best ELBO of seed=nan (β=1)"} <= {line.get_label() for line in ax.get_lines()}
    plt.close(ax.figure)
    ax = cellvae.pl.rate_distortion(first.iloc[:1], show=False)  # one point: no equal-ELBO line of no length
    assert [line.get_label() for line in ax.get_lines()] == ["_child0", "best ELBO (β=0.5)"]
    plt.close(ax.figure)
    with pytest.raises(KeyError, match=r"groupby='donor' is not a column of the frame"):
        cellvae.pl.rate_distortion(stacked, groupby="donor", show=False)
    with pytest.raises(TypeError, match=r"groupby takes one column name, e.g. groupby='seed', got \['seed'\]"):
        cellvae.pl.rate_distortion(stacked, groupby=["seed"], show=False)


def test_rate_distortion_plot_given_the_model_says_to_pass_the_sweeps_frame(small_model):
    """pl.history and pl.kl_per_dimension take the model; given it, pl.rate_distortion raised Python's bare
    "argument of type 'CellVAE' is not iterable"."""
    with pytest.raises(TypeError, match=r"pass the DataFrame returned by cellvae.tl.rate_distortion_sweep.*got CellVAE"):
        cellvae.pl.rate_distortion(small_model, show=False)
    with pytest.raises(TypeError, match=r"pass the DataFrame returned by .*, got dict"):
        cellvae.pl.rate_distortion({"beta": [1.0], "rate": [2.0], "distortion": [3.0]}, show=False)


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_posterior_draws_have_the_encoders_mean_and_covariance_and_its_density(posterior):
    vae, counts, covariates = simulated_module(posterior=posterior, n_latent=3)[:3]
    with torch.no_grad():
        vae.encoder.scale.bias.normal_(std=1.0, generator=torch.Generator().manual_seed(0))
        mean, scale = vae.encoder(counts[:4], covariates[:4])
        noise = torch.randn(100_000, 4, 3, generator=torch.Generator().manual_seed(1))
        z = vae.reparameterise(mean, scale, noise).double()
        if posterior == "full":
            q = torch.distributions.MultivariateNormal(mean, scale_tril=scale)
            covariance = q.covariance_matrix.double()
            assert (covariance - torch.diag_embed(torch.diagonal(covariance, dim1=-2, dim2=-1))).abs().max() > 0.1
            density = q.log_prob(z[:50].float())
        else:
            covariance = torch.diag_embed(scale.exp()).double()
            density = torch.distributions.Normal(mean, (0.5 * scale).exp()).log_prob(z[:50].float()).sum(-1)
        torch.testing.assert_close(vae.log_posterior_density(noise[:50], scale), density)
    centred = z - z.mean(0)
    empirical = torch.einsum("sci,scj->cij", centred, centred) / len(z)
    torch.testing.assert_close(z.mean(0), mean.double(), atol=0.02 * covariance.max().sqrt().item(), rtol=0)
    torch.testing.assert_close(empirical, covariance, rtol=0.03, atol=0.01 * covariance.max().item())


def test_the_posterior_density_is_exact_for_an_ill_conditioned_full_posterior():
    """A full posterior's factor L can reach cond(L) ≈ 1e10 (beta=0, a large learning rate): log q(z|x) from solving
    L⁻¹(z − mean) in float32 was off by up to 3.6e5 nats, and marginal_log_likelihood gave positive log p(x)."""
    vae = simulated_module(posterior="full", n_latent=3)[0]
    mean, scale = torch.zeros(1, 3), torch.tensor([[[1e-5, 0.0, 0.0], [30.0, 1.0, 0.0], [-20.0, 40.0, 1e-4]]])
    noise = torch.randn(1000, 1, 3, generator=torch.Generator().manual_seed(0))
    z = vae.reparameterise(mean.double(), scale.double(), noise.double())
    exact = torch.distributions.MultivariateNormal(mean.double(), scale_tril=scale.double()).log_prob(z)
    torch.testing.assert_close(vae.log_posterior_density(noise, scale).double(), exact, rtol=1e-6, atol=1e-3)
    solved = torch.distributions.MultivariateNormal(mean, scale_tril=scale).log_prob(vae.reparameterise(mean, scale, noise))
    assert (solved.double() - exact).abs().max() > 1.0  # (what the density was: the solve in float32)


@pytest.mark.parametrize("posterior", ["diagonal", "full"])
def test_the_rate_is_the_gaussian_kl_from_the_prior_and_its_marginals_are_the_per_dimension_kls(posterior):
    vae, counts, covariates = simulated_module(posterior=posterior, n_latent=4)[:3]
    with torch.no_grad():
        vae.encoder.scale.weight.normal_(std=0.3, generator=torch.Generator().manual_seed(0))
        mean, scale = vae.encoder(counts, covariates)
        if posterior == "full":
            q = torch.distributions.MultivariateNormal(mean, scale_tril=scale)
        else:
            q = torch.distributions.MultivariateNormal(mean, torch.diag_embed(scale.exp()))
        prior = torch.distributions.MultivariateNormal(torch.zeros(4), torch.eye(4))
        torch.testing.assert_close(vae.kl_divergence(mean, scale), torch.distributions.kl_divergence(q, prior))
        standard_deviations = torch.diagonal(q.covariance_matrix, dim1=-2, dim2=-1).sqrt()
        marginals = torch.distributions.kl_divergence(
            torch.distributions.Normal(mean, standard_deviations), torch.distributions.Normal(0.0, 1.0)
        )
        torch.testing.assert_close(vae.kl_per_dimension(mean, scale), marginals)
        if posterior == "full":  # the joint KL exceeds the sum of the marginals' by the total correlation
            assert (vae.kl_divergence(mean, scale) > vae.kl_per_dimension(mean, scale).sum(-1) + 1e-3).all()


def test_the_sweep_and_interpolate_read_a_view_of_a_backed_file(tmp_path):
    """anndata cannot view a view of a backed AnnData: both failed with anndata's bare 'cannot make a view of a
    view', where fit, get_latent and differential_expression stream the same view."""
    import anndata as ad

    adata = cellvae.datasets.simulate(n_cells=400, n_genes=40, n_batches=2, n_cell_types=3, random_state=0)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    in_batch0 = (backed.obs["batch"] == "batch0").to_numpy()
    view, in_memory = backed[in_batch0], adata[in_batch0].copy()
    frame = cellvae.tl.rate_distortion_sweep(view, betas=(1.0,), max_epochs=2, n_hidden=16, random_state=0)
    assert len(frame) == 1 and np.isfinite(frame[["elbo", "train_elbo"]].to_numpy()).all()
    model = CellVAE(in_memory, n_hidden=16).fit(max_epochs=2, progress=False, random_state=0)
    path = cellvae.tl.interpolate(model, "cell_type == 'type0'", "cell_type == 'type1'", 3, adata=view, progress=False)
    expected = cellvae.tl.interpolate(model, "cell_type == 'type0'", "cell_type == 'type1'", 3, adata=in_memory, progress=False)
    np.testing.assert_array_equal(path.X, expected.X)
    backed.file.close()
