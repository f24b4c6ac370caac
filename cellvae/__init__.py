"""cellvae: a fast negative-binomial VAE for single-cell RNA-seq counts in AnnData."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from cellvae.config import CELLVAE_VERSION as __version__

if TYPE_CHECKING:
    from cellvae import datasets, pl, tl
    from cellvae.data import read_h5ad_lazy, read_zarr_lazy
    from cellvae.model import CellVAE

# Imported on first use, so that `cellvae --help` and argument errors do not wait for torch and scanpy.
_HOMES = {
    "CellVAE": "cellvae.model",
    "read_h5ad_lazy": "cellvae.data",
    "read_zarr_lazy": "cellvae.data",
    "datasets": None,
    "pl": None,
    "tl": None,
}

__all__ = ["CellVAE", "datasets", "pl", "read_h5ad_lazy", "read_zarr_lazy", "tl", "__version__"]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'cellvae' has no attribute {name!r}")
    home = _HOMES[name]
    value = importlib.import_module(f"cellvae.{name}") if home is None else getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:  # (the public names and the module's own, for completion: not its imports)
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))
