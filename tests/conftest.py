"""Shared fixtures: the bundled PBMC example, simulated batches, the shared real-data folder; the slow marker; code
shown to users (README, tutorials) run with a tenth of its training."""

import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import cellvae

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

torch.set_num_threads(2)


def pytest_addoption(parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the long evaluations on real data (marked slow)")


def pytest_collection_modifyitems(config, items) -> None:
    """Skip the tests marked slow unless ``--run-slow`` is given: they keep CI's run within its time."""
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: a long evaluation on real data; run it with python -m pytest --run-slow")
    for item in items:
        if item.get_closest_marker("slow") is not None:
            item.add_marker(skip)


EPOCH_DIVISOR, MIN_EPOCHS = 10, 5
DEFAULT_EPOCHS_TESTED = 20  # for a training call that leaves max_epochs at its default (hundreds for a small dataset)


def with_fewer_epochs(source: str) -> str:
    """Code shown to users (a tutorial cell, a README block) with a tenth of its training: ``max_epochs=N`` as
    N / EPOCH_DIVISOR (at least MIN_EPOCHS), and ``DEFAULT_EPOCHS_TESTED`` given to ``model.fit``, ``CellVAE(...).fit``,
    ``tl.embed`` and ``map_query`` calls without ``max_epochs``: the same calls, run in a fraction of the time."""
    source = re.sub(r"max_epochs=(\d+)", lambda m: f"max_epochs={max(MIN_EPOCHS, int(m.group(1)) // EPOCH_DIVISOR)}", source)

    def with_epochs(call: re.Match) -> str:
        arguments = call.group(2)
        if "max_epochs" in arguments:
            return call.group(0)
        return f"{call.group(1)}({arguments}{', ' if arguments.strip() else ''}max_epochs={DEFAULT_EPOCHS_TESTED})"

    return re.sub(r"(model\.fit|CellVAE\([^()]*\)\.fit|tl\.embed|\.map_query)\(([^()]*)\)", with_epochs, source)


def shared_dataset(name: str):
    """Read ``../shared/data/<name>`` or skip the test with the reason."""
    import anndata as ad

    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real dataset {path} not found (the ../shared/data folder beside the repository is absent)")
    return ad.read_h5ad(path)


@contextmanager
def no_warnings() -> Iterator[None]:
    """Fail on any warning, except the deprecation notices of cellvae's dependencies about one another
    (e.g. anndata reading a pandas option that pandas 3.1 deprecates), which users cannot act on."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def ctrl_c_at_call(target, name: str, call: int, monkeypatch) -> None:
    """Ctrl-C (KeyboardInterrupt) arriving during the ``call``-th call of ``target.name``; the others run as usual."""
    original, calls = getattr(target, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, interrupted)


def knn_accuracy(representation, labels) -> float:
    """5-fold (stratified, shuffled) accuracy of a 15-nearest-neighbour classifier of ``labels``."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(15), representation, np.asarray(labels), cv=folds).mean())


def pca_of(adata, n_comps: int = 10) -> np.ndarray:
    """``n_comps`` principal components of log-normalised counts (scanpy's standard workflow)."""
    import anndata as ad
    import scanpy as sc

    norm = ad.AnnData(adata.X.copy())
    sc.pp.normalize_total(norm, target_sum=1e4)
    sc.pp.log1p(norm)
    sc.pp.pca(norm, n_comps=n_comps, random_state=0)
    return norm.obsm["X_pca"]


@pytest.fixture(scope="session")
def pbmc():
    return cellvae.datasets.pbmc68k()


@pytest.fixture(scope="session")
def two_batches():
    return cellvae.datasets.simulate(n_cells=1200, n_genes=300, n_batches=2, n_cell_types=4, random_state=1, batch_effect=0.6)


def simulated_module(**options):
    """The float32 module of a CellVAE (no dropout) for 60 simulated cells of two batches, and its cells'
    counts, one-hot batch covariates, library sizes and batch codes."""
    adata = cellvae.datasets.simulate(n_cells=60, n_genes=50, n_batches=2, random_state=2)
    vae = cellvae.CellVAE(adata, batch_key="batch", dropout=0.0, **options).module
    counts = torch.from_numpy(adata.X.toarray()).float()
    batch_index = torch.from_numpy(adata.obs["batch"].cat.codes.to_numpy().astype(np.int64))
    covariates = torch.nn.functional.one_hot(batch_index, 2).float()
    return vae, counts, covariates, counts.sum(1, keepdim=True), batch_index
