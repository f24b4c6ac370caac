"""cellvae: a fast negative-binomial VAE for single-cell RNA-seq counts in AnnData."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cellvae")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from cellvae import datasets, pl, tl
from cellvae.data import read_zarr_lazy
from cellvae.model import CellVAE

__all__ = ["CellVAE", "datasets", "pl", "read_zarr_lazy", "tl", "__version__"]
