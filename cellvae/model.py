"""CellVAE: the user-facing model. Build it on an AnnData, fit, embed, decode, save and load."""

from __future__ import annotations

import contextvars
import errno
import functools
import glob
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import tempfile
import traceback
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NoReturn, ParamSpec, TypeVar, overload

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from cellvae import data, diagnostics, differential
from cellvae.config import CELLVAE_VERSION, ROLES, Config, check_unique
from cellvae.distributions import autograd_on, count_sampler, seeded
from cellvae.module import VAE
from cellvae.train import (
    DEFAULT_LR,
    PRECISIONS,
    AgreedInterrupt,
    TrainSettings,
    all_reduce_max,
    default_kl_warmup,
    default_max_epochs,
    default_query_epochs,
    evaluate,
    library_sizes_across_ranks,
    penalised_rate,
    pick_device,
    progress_bar,
    rank_and_world,
    refuse_earlier_checkpoints,
    setup_distributed,
    split_cells,
    tensors_digest,
    train,
    train_every_category,
    with_progress,
)

MAX_LATENT = 1e6  # the largest latent code decode and generate take (the prior is N(0, I))
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
HISTORY_FILE = "history.json"
METADATA_KEY = "cellvae"  # the weights file's metadata: one JSON object under this key
ADATA_FILE = "adata.h5ad"  # written by save(save_anndata=True)
# Monitored cells whose loss fit compares before and after training, to tell a run that diverged.
DIVERGENCE_PROBE_CELLS = 1000
# A further fit, or a mapping, whose loss after training exceeds this share of its loss before made the model worse
# (undone: room for the noise of one draw of z per cell, 0.2% of ~300 nats); a first fit from random weights, or one
# of another beta, is undone where it ends over 5% above its start (one that ends no more than 0.2% lower is kept, warned of)
FURTHER_TRAINING_TOLERANCE = 1.002
FIRST_FIT_TOLERANCE = 1.05
# An epoch whose loss is this many times the loss before training stops it as diverged (no sound run comes near)
DIVERGED_LOSS_RATIO = 10

# scvi-tools' names for what cellvae spells otherwise (README, "Coming from scvi-tools"): code ported from
# scVI that uses one is told the cellvae name instead of Python's bare "no attribute" or "unexpected keyword".
SCVI_TOOLS_METHODS = {
    "setup_anndata": "CellVAE(adata, layer=..., batch_key=..., categorical_covariate_keys=..., continuous_covariate_keys=...)",
    "train": "fit(...)",
    "is_trained_": "is_trained",
    "history_": "history",
    "get_latent_representation": "get_latent(...)",
    "posterior_predictive_sample": "sample_counts(...) (samples on the first axis)",
    "load_query_data": "reference_model.map_query(query) (which also trains the mapping)",
    "get_marginal_ll": "marginal_log_likelihood(...) (per cell)",
    "get_elbo": "rate_distortion(...)['elbo'] (per cell; the ELBO itself, not its negative)",
    "get_reconstruction_error": "rate_distortion(...)['distortion'] (per cell)",
    "prepare_query_anndata": "nothing: map_query and get_latent match a query's genes to the model's by name "
    "(extra genes ignored, missing ones zero-filled with a warning)",
    "summary_string": "print(model) or repr(model)",
    "predict": "cellvae.tl.transfer_labels(reference, query, labels_key) on the embeddings (a k-NN vote, as scANVI's "
    "predict labels cells; cellvae has no semi-supervised model)",
    "from_scvi_model": "nothing: cellvae has no scANVI; label cells with cellvae.tl.transfer_labels on the embedding",
    "get_latent_library_size": "nothing: cellvae takes each cell's observed total counts over the model's genes as its "
    "library size, not a latent one",
    "get_feature_correlation_matrix": "np.corrcoef(model.get_normalized_expression(adata), rowvar=False) "
    "(gene by gene, on decoded expression)",
}
# scvi-tools' argument: its advice in each place, as (what the method must take for the advice to apply: a cellvae
# argument or the method's own name; None: any method; the advice); the first that applies is given
ON_THE_CPU = "drop it: load puts the model on the CPU; then model.to_device('cuda') (or 'auto') moves it"
ONE_MODEL_PER_FOLDER = "drop it: a cellvae model folder holds one model, its files named without a prefix"
SPARSE_AS_STORED = "drop it: cellvae reads sparse counts as they are stored"
BOTH_DIRECTIONS = "drop it: proba_de is P(|lfc| > delta), both directions; proba_up and proba_down give each"
POSTERIOR_MEAN = (
    "drop it: cellvae decodes each cell's posterior mean, where scvi-tools' n_samples averages what draws of z decode "
    "to (a few percent higher for lowly expressed genes); for draws, decode model.get_latent(adata, mean=False, "
    "random_state=seed) with batch= and covariates= the cells' own (sample_counts draws counts)"
)
SCVI_TOOLS_ARGUMENTS = {
    "gene_likelihood": [("likelihood", "use likelihood= ('nb', the default, 'zinb' or 'poisson')")],
    "dropout_rate": [("dropout", "use dropout=")],
    "use_batch_norm": [("normalization", "use normalization='batch' (BatchNorm in encoder and decoder)")],
    "use_layer_norm": [("normalization", "use normalization='layer' (the default)")],
    "encode_covariates": [("encode_batch", "use encode_batch=")],
    "train_size": [("validation_size", "use validation_size=, the share held out (1 - train_size)")],
    "accelerator": [
        ("device", "use device= ('auto', 'cpu', 'cuda', ...)"),
        ("load", ON_THE_CPU),
    ],
    "device": [("load", ON_THE_CPU)],
    "devices": [("device", "use device= for one device ('cuda', 'cuda:1'); for several GPUs launch with torchrun (README)")],
    "use_gpu": [
        ("device", "use device= ('cuda', 'auto' or 'cpu')"),
        ("load", ON_THE_CPU),
    ],
    "prefix": [
        ("load", ONE_MODEL_PER_FOLDER),
        ("save", ONE_MODEL_PER_FOLDER),
    ],
    "use_observed_lib_size": [("__init__", "drop it: cellvae scales each cell by its observed total counts, as scVI's default")],
    "batch_representation": [("__init__", "drop it: cellvae gives the batch one-hot, as scVI's default 'one-hot'")],
    "latent_distribution": [("__init__", "drop it: cellvae's posterior and prior are normal, as scVI's default 'normal'")],
    "check_val_every_n_epoch": [("fit", "drop it: cellvae computes the validation loss after every epoch")],
    "plan_kwargs": [
        ("weight_decay", "give lr= and weight_decay= to fit itself, and the KL warm-up to CellVAE(kl_warmup=...)"),
        ("map_query", "give lr= to map_query itself (it trains the new parameters without weight decay, as scArches)"),
    ],
    "silent": [("progress", "use progress=False")],
    "weight_decay": [("map_query", "drop it: map_query trains the new parameters without weight decay, as scArches")],
    "unfrozen": [
        (
            "train_input_layer",
            "cellvae trains only the new batches' parameters; train_input_layer=True also trains the encoder's first layer",
        )
    ],
    "inplace_subset_query_vars": [("map_query", "drop it: map_query matches the query's genes to the model's by name")],
    "labels_key": [("__init__", "cellvae has no scANVI: train without labels, then cellvae.tl.transfer_labels(...)")],
    "size_factor_key": [("__init__", "drop it: cellvae scales each cell by its total counts, as scVI without it")],
    "early_stopping_patience": [("patience", "use patience=")],
    "early_stopping_monitor": [("patience", "drop it: cellvae stops on the validation loss (its negative ELBO per cell)")],
    "early_stopping_min_delta": [("patience", "drop it: cellvae counts an epoch as better where its validation loss is lower")],
    "datasplitter_kwargs": [
        ("validation_size", "drop it: validation_size= is the share of cells held out, drawn by random_state=")
    ],
    "shuffle_set_split": [("validation_size", "drop it: fit draws its validation cells at random (random_state=)")],
    "load_sparse_tensor": [
        ("fit", SPARSE_AS_STORED),
        ("map_query", SPARSE_AS_STORED),
    ],
    "enable_progress_bar": [("progress", "use progress=")],
    "give_mean": [("mean", "use mean="), ("get_likelihood_parameters", POSTERIOR_MEAN)],
    "mc_samples": [
        (
            "return_dist",
            "drop it: cellvae's posterior is normal, so mean=True gives its exact mean (scvi-tools samples only for "
            "latent_distribution='ln'); mean=False draws one z per cell",
        )
    ],
    "indices": [("adata", "pass those cells as an AnnData, adata[indices]")],
    "return_numpy": [
        (None, "drop it: cellvae returns NumPy arrays (with gene_list, columns in its order; scvi-tools: var_names order)")
    ],
    "mode": [("delta", "drop it: cellvae runs one test, of the change in mean expression (like scVI's mode='change')")],
    "all_stats": [("delta", "drop it: cellvae always returns its statistics (lfc_*, proba_de, raw_* and the rest)")],
    "weights": [("delta", "drop it: cellvae weighs every cell of a group alike (a Bayesian bootstrap over them)")],
    "filter_outlier_cells": [("delta", "drop it: cellvae keeps every cell of a group")],
    "importance_weighting": [("delta", "drop it: cellvae decodes draws of each cell's posterior, unweighted")],
    "importance_weighting_kwargs": [("delta", "drop it: cellvae decodes draws of each cell's posterior, unweighted")],
    "pseudocounts": [("pseudocount", "use pseudocount=")],
    "n_mc_samples": [("n_samples", "use n_samples=")],
    "n_samples_overall": [("transform_batch", "drop it: cellvae returns every cell of adata; pass adata[cells] for some")],
    "n_samples": [
        ("transform_batch", POSTERIOR_MEAN),
        ("get_likelihood_parameters", POSTERIOR_MEAN),
        ("n_draws", "use n_draws=, the posterior draws per group"),
    ],
    "return_mean": [
        ("transform_batch", POSTERIOR_MEAN),
        ("marginal_log_likelihood", "drop it: cellvae returns one value per cell; .mean() gives scvi-tools' default"),
        ("rate_distortion", "drop it: cellvae returns one row per cell; .mean() gives the figures to quote"),
    ],
    "two_sided": [("delta", BOTH_DIRECTIONS)],
    "test_mode": [("delta", BOTH_DIRECTIONS)],
    "dir_path": [("path", "use path=, the model's folder")],
    "freeze_dropout": [
        ("map_query", "drop it: map_query trains with the model's dropout on, as scvi-tools' default freeze_dropout=False")
    ],
    "n_epochs_kl_warmup": [
        ("fit", "give the KL warm-up, in epochs, to the model as kl_warmup=... (of CellVAE, tl.embed, tl.rate_distortion_sweep)")
    ],
    "deeply_inject_covariates": [
        (
            "__init__",
            "drop it: cellvae gives the batch and covariates to every hidden layer of the decoder (and of the encoder, "
            "with encode_batch=True, the default)",
        )
    ],
}
# Advice that depends on the value given: (scvi-tools' argument, its value) -> the advice.
SCVI_TOOLS_ARGUMENT_VALUES = {
    ("use_batch_norm", "none"): "drop it: cellvae's hidden layers use LayerNorm (normalization='layer', the default)",
    ("use_batch_norm", "encoder"): "cellvae has no BatchNorm in the encoder alone: normalization='batch' puts it in "
    "encoder and decoder, normalization='layer' (the default) LayerNorm in both",
    ("use_batch_norm", "decoder"): "cellvae has no BatchNorm in the decoder alone: normalization='batch' puts it in "
    "encoder and decoder, normalization='layer' (the default) LayerNorm in both",
    ("use_layer_norm", "none"): "drop it: cellvae's hidden layers use LayerNorm by default (normalization='layer'); "
    "normalization='batch' uses BatchNorm, as scVI's default does",
    ("use_layer_norm", "encoder"): "cellvae has no LayerNorm in the encoder alone: normalization='layer' (the default) "
    "puts it in encoder and decoder",
    ("use_layer_norm", "decoder"): "cellvae has no LayerNorm in the decoder alone: normalization='layer' (the default) "
    "puts it in encoder and decoder",
    ("use_batch_norm", False): "drop it: cellvae's hidden layers use LayerNorm (normalization='layer', the default)",
    ("use_layer_norm", False): "drop it: cellvae's hidden layers use LayerNorm by default (normalization='layer'); "
    "normalization='batch' uses BatchNorm",
    ("use_observed_lib_size", False): "cellvae has no learnt library size: it scales each cell by its observed total "
    "counts (scVI's default, use_observed_lib_size=True)",
    ("batch_representation", "embedding"): "cellvae has no learnt batch embedding: it gives the batch one-hot (scVI's "
    "default 'one-hot')",
}


Parameters = ParamSpec("Parameters")
Returned = TypeVar("Returned")


def advise_on_foreign_arguments(
    method: Callable[Parameters, Returned], arguments: dict = SCVI_TOOLS_ARGUMENTS, whose: str = "scvi-tools'"
) -> Callable[Parameters, Returned]:
    """Refuse an argument named as in scvi-tools that ``method`` spells otherwise, saying the cellvae name
    where ``method`` takes it (elsewhere Python's own error stands: the advice would name what it lacks).
    ``arguments`` and ``whose``: another library's names, with their advice (scanpy's, for cellvae.tl)."""
    parameters = inspect.signature(method).parameters
    accepted = set(parameters)
    applies = accepted | {method.__name__}
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    by_keyword = [p.name for p in parameters.values() if p.kind == p.KEYWORD_ONLY]
    if any(p.kind == p.VAR_POSITIONAL for p in parameters.values()):
        by_keyword = []  # any number by position
    bound = 1 if positional and positional[0].name in ("self", "cls") else 0  # a method's self (or cls) is not counted

    @functools.wraps(method)
    def checked(*args: Parameters.args, **kwargs: Parameters.kwargs) -> Returned:
        if len(args) > len(positional) and by_keyword:  # e.g. fit(10), as scvi-tools' train(max_epochs) is called
            by_position = ", ".join(p.name for p in positional[bound:])
            takes = f"takes {by_position} by position and the rest by keyword" if by_position else "takes keywords only"
            epochs = "max_epochs" in by_keyword and isinstance(args[len(positional)], int)  # map_query(query, 5)
            raise TypeError(
                f"{method.__qualname__}() {takes}, got {len(args) - bound} positional; "
                f"e.g. {method.__name__}({'max_epochs' if epochs else by_keyword[0]}=...)"
            )
        for name in sorted(kwargs.keys() - accepted):
            advice = next((advice for needs, advice in arguments.get(name, []) if needs in applies | {None}), "")
            value = kwargs[name]
            scalar = isinstance(value, (bool, int, float, np.generic)) or (isinstance(value, np.ndarray) and value.ndim == 0)
            number = np.asarray(value).item() if scalar and not isinstance(value, (str, np.str_)) else None
            if isinstance(number, (bool, int, float)) and number in (0, 1):
                value = bool(number)  # (np.False_, 0, 0.0, np.array(False): as False; other values are not read)
            if advice and isinstance(value, (str, bool)):
                advice = SCVI_TOOLS_ARGUMENT_VALUES.get((name, value), advice)
            if advice:
                raise TypeError(f"{method.__qualname__}() got an unexpected keyword argument {name!r}, {whose} name: {advice}")
        return method(*args, **kwargs)

    return checked


def _missing_attribute(owner: str, name: str) -> AttributeError:
    """The AttributeError for ``owner.name``, naming the cellvae method where scvi-tools has one of that name."""
    message = f"{owner} has no attribute {name!r}"
    if name in SCVI_TOOLS_METHODS:
        message += f" (scvi-tools' {name}; in cellvae: {SCVI_TOOLS_METHODS[name]})"
    return AttributeError(message)


class _NamesScviToolsMethods(type):
    """CellVAE's metaclass: ``CellVAE.setup_anndata`` (scvi-tools' first call) says what to call instead."""

    if not TYPE_CHECKING:  # (to a type checker, a misspelt or scvi-tools name on the class stays an error)

        def __getattr__(cls, name: str):
            raise _missing_attribute(f"type object {cls.__name__!r}", name)


class CellVAE(metaclass=_NamesScviToolsMethods):
    """A negative-binomial VAE for raw single-cell counts.

    Parameters
    ----------
    adata
        Cells × genes AnnData with raw integer counts in ``X`` or ``layers[layer]``: in memory,
        backed (``anndata.read_h5ad(path, backed="r")``, which reads layers into memory;
        :func:`cellvae.read_h5ad_lazy` and :func:`cellvae.read_zarr_lazy` leave layers on disk too) or a view
        of either (``adata[cells, genes]``; a backed view's cells and genes are streamed from the file).
    layer
        Layer holding the counts; ``None`` uses ``adata.X``.
    batch_key
        ``obs`` column of batches to correct for (injected into decoder and, with
        ``encode_batch``, encoder).
    categorical_covariate_keys, continuous_covariate_keys
        Further ``obs`` columns injected like the batch.
    n_latent, n_hidden, n_layers, dropout
        Size of the latent space and of the encoder/decoder networks.
    decoder
        ``"mlp"`` (default): the decoder's hidden layers, as scVI's. ``"linear"``: z and the covariates map straight
        to the genes' log expression (an LDVAE: scvi-tools' ``LinearSCVI``, Svensson et al. 2020), whose weights
        :meth:`get_loadings` returns, the genes each latent dimension drives; ``n_hidden`` and ``n_layers`` then shape
        the encoder alone.
    normalization
        ``"layer"`` (default): LayerNorm in the hidden layers, each cell normalised on its own.
        ``"batch"``: BatchNorm, each hidden unit normalised over the minibatch while training and
        by running statistics afterwards (kept frozen by :meth:`map_query`). In the benchmarks it
        integrated worse on all four datasets, but mapped a perturbed query (stimulated cells
        onto a control reference) better with the reference frozen. Deep networks (``n_layers`` of 3 or more)
        with LayerNorm collapsed most latent dimensions on pbmc68k (5 layers: 1–4 of 10 active), with BatchNorm not.
    likelihood
        ``"nb"`` (default), ``"zinb"`` or ``"poisson"``.
    dispersion
        Inverse dispersion per ``"gene"``, per ``"gene-batch"`` or per ``"gene-cell"`` (``"gene"``
        with ``"poisson"``, which has none).
    beta
        Weight of the KL term (rate) in the objective ``distortion + beta * rate``; ``beta``,
        ``free_bits`` and ``batch_mmd`` may be 0 to 1e6.
    kl_warmup
        Epochs of linear KL warm-up; ``None`` picks a quarter of training (at most 50 epochs; whole
        epochs from 4 epochs of training on, else a quarter of its steps). A warm-up longer than ``fit``'s
        epochs gets a warning.
    free_bits
        Per-dimension KL floor (nats) below which the KL costs nothing; counters posterior collapse.
    batch_mmd
        Weight of a penalty, added to each minibatch's loss per cell, on the maximum mean discrepancy
        between each batch's latent codes and the other batches' (needs a ``batch_key``; default 0:
        off). It removes what is left of a batch's overall shift in the latent space. In the benchmarks
        10 raised the scib total on all four datasets (batch correction up, bio conservation slightly down
        on three) and lowered label transfer on the atlas whose batches differ in cell types. It pulls the
        batches' distributions together, so it suits batches that hold similar mixtures of cell types.
    encode_batch
        Give the encoder the covariates too (the decoder always gets them).
    posterior
        ``"diagonal"`` Gaussian q(z|x), or ``"full"`` covariance via a Cholesky factor.

    Attributes
    ----------
    config
        Every hyperparameter and what the model read from the AnnData (genes, categories), as saved in
        ``config.json``.
    adata
        The AnnData its methods read when given none (``None`` for a model loaded without one).
    module
        The torch network (:class:`cellvae.module.VAE`).
    history
        One row per epoch of the last :meth:`fit`: train and validation loss, distortion, rate and ELBO
        (the ELBO itself, negative; scvi-tools' ``elbo_train`` is the negative ELBO). ``kl_weight`` is the KL's
        weight at the epoch's last step: ``train_loss`` averages the epoch's steps, whose weight rises during the
        warm-up, while ``validation_loss`` charges the full ``beta``.
    is_trained
        Whether :meth:`fit` (or :meth:`map_query`) has trained it.
    train_indices, validation_indices
        Positions (in the AnnData it trained on, as scvi-tools' names) of the cells the last :meth:`fit` (or
        :meth:`map_query`) trained on and validated on, sorted; cells without counts are in neither. ``None``
        before training and for a loaded model (they are not saved). Data-parallel training splits all cells
        so (each process then trains its share of them).
    train_settings
        The settings of the last training (``None`` before it): :meth:`save` stores them with the weights and
        :meth:`load` restores them, so a saved model tells how it was trained.
    device
        Where the module lives between calls: the CPU after :meth:`fit` (which trains on its ``device`` and moves
        the module back), or the device :meth:`to_device` chose (``tl.embed`` returns the model on the device it
        trained on).

    Notes
    -----
    The AnnData is only read, never modified.
    """

    @advise_on_foreign_arguments
    def __init__(
        self,
        adata: ad.AnnData,
        *,
        layer: str | None = None,
        batch_key: str | None = None,
        categorical_covariate_keys: list[str] | None = None,
        continuous_covariate_keys: list[str] | None = None,
        n_latent: int = 10,
        n_hidden: int = 128,
        n_layers: int = 1,
        decoder: str = "mlp",
        dropout: float = 0.1,
        normalization: str = "layer",
        likelihood: str = "nb",
        dispersion: str = "gene",
        beta: float = 1.0,
        kl_warmup: int | None = None,
        free_bits: float = 0.0,
        batch_mmd: float = 0.0,
        encode_batch: bool = True,
        posterior: str = "diagonal",
    ):
        data.check_nonempty_anndata(adata)
        for name, keys in (
            ("categorical_covariate_keys", categorical_covariate_keys),
            ("continuous_covariate_keys", continuous_covariate_keys),
        ):
            if isinstance(keys, str):
                raise TypeError(f"{name} takes a list of obs columns, e.g. {name}=[{keys!r}], got the string {keys!r}")
            for key in key_list(keys):
                data.check_one_name(key, f"each entry of {name}")
        categorical, continuous = key_list(categorical_covariate_keys), key_list(continuous_covariate_keys)
        data.check_one_name(batch_key, "batch_key")
        # before the columns are read (one of them may warn about its values); Config checks it again
        check_unique(([batch_key] if batch_key is not None else []) + categorical + continuous, ROLES)
        matrix = data.count_matrix(adata, layer)
        layout = data.learn_covariate_layout(adata.obs, batch_key, categorical, continuous)
        if not adata.var_names.is_unique:
            dup = adata.var_names[adata.var_names.duplicated()].unique()[:5].tolist()
            raise ValueError(f"adata.var_names are not unique (e.g. {dup}); call adata.var_names_make_unique() first")
        # In a data-parallel run (a process group, or torchrun's WORLD_SIZE before fit joins one) fit checks a
        # backed matrix's values, each process only its part of the cells.
        in_parallel_run = rank_and_world()[1] > 1 or data.launched_processes() > 1
        values_checked_in_fit = data.is_backed_matrix(matrix) and in_parallel_run
        config = Config(
            gene_names=list(data.gene_names(adata)),
            layer=layer,
            batch_key=batch_key,
            batch_categories=layout.batch_categories,
            categorical_covariate_keys=layout.categorical_keys,
            categorical_covariate_categories=layout.categorical_categories,
            continuous_covariate_keys=layout.continuous_keys,
            continuous_covariate_mean=layout.continuous_mean,
            continuous_covariate_std=layout.continuous_std,
            n_latent=data.native(n_latent),
            n_hidden=data.native(n_hidden),
            n_layers=data.native(n_layers),
            decoder=decoder,
            dropout=data.native(dropout),
            normalization=normalization,
            likelihood=likelihood,
            dispersion=dispersion,
            beta=data.native(beta),
            kl_warmup=data.native(kl_warmup),
            free_bits=data.native(free_bits),
            batch_mmd=data.native(batch_mmd),
            encode_batch=data.native(encode_batch),
            posterior=posterior,
            cellvae_version=CELLVAE_VERSION,
        )  # checks the settings before the counts are read, which can take long for a large backed matrix
        config.check_new_model()
        if config.n_latent >= config.n_genes:
            data.warn_user(
                f"n_latent={config.n_latent} is not below the {config.n_genes} genes: a latent space that large cannot "
                "compress the counts (most of its dimensions will be unused); lower n_latent (the default is 10)",
                UserWarning,
            )
        with data.hint_where_counts_are(adata, layer, trained=False):
            data.validate_counts(matrix, data.counts_location(layer), read_values=not values_checked_in_fit)
        data.warn_about_counts(matrix, data.counts_location(layer), likelihood, dispersion, adata.obs, layout)
        if config.batch_mmd > 0 and len(config.batch_categories) < 2:
            data.warn_user(f"batch_mmd has no effect: obs[{batch_key!r}] holds a single batch", UserWarning)
        self._setup(config, adata)

    def __getstate__(self) -> dict:
        # (pickle, copy.deepcopy) a weak reference cannot be pickled: kept as whether adata is map_query's
        state = self.__dict__.copy()
        state["_mapped_query"] = self._is_mapped_query(self.adata)
        if self.adata is not None and self._reads_from_disk():  # (h5py's own error names neither model nor way out)
            where = f" ({self.adata.filename}, backed)" if self.adata.isbacked else ""
            raise TypeError(
                f"this model reads its counts from disk{where}, and an open file cannot be copied or pickled: save "
                "the model, model.save(path), and load a copy with CellVAE.load(path, adata=...)"
            )
        if self.adata is not None and self.adata.is_view:  # anndata deep-copies a view wrongly (its parent's shape)
            try:  # the view made afresh: with the obs columns the viewed AnnData gained since, as save_anndata keeps
                state["adata"] = self._own_adata().copy()
            except ValueError as error:  # a view of an AnnData changed since (not scipy's IndexError in copying it)
                raise ValueError(
                    f"{error}; to copy this model, save it, model.save(path), and load it with CellVAE.load(path, adata=...)"
                ) from None
        return state

    def __setstate__(self, state: dict) -> None:
        mapped = state.pop("_mapped_query", False)
        state.setdefault("_query_copied", mapped)  # (pickled before it was kept: a mapped query was always a copy)
        state.setdefault("_split_obs_names", None)
        self.__dict__.update(state)
        self._mapped_query = weakref.ref(self.adata) if mapped and self.adata is not None else None

    if not TYPE_CHECKING:  # (as the metaclass's: not for type checkers)

        def __getattr__(self, name: str):
            # reached only for names the object lacks
            raise _missing_attribute(f"{type(self).__name__!r} object", name)

    def _setup(self, config: Config, adata: ad.AnnData | None) -> None:
        self.config = config
        self.adata = adata
        with seeded(0):  # placeholder weights (fit draws them from its random_state) leave torch's generator alone
            self.module = VAE(config)
        self.module.eval()
        self.device = torch.device("cpu")
        self.history = pd.DataFrame()
        self.is_trained = False
        self.train_settings: TrainSettings | None = None
        self.train_indices: np.ndarray | None = None
        self.validation_indices: np.ndarray | None = None
        self._split_obs_names: pd.Index | None = None  # the cells those positions are of (the AnnData may change since)
        # this process's rank in the process group whose ranks all trained the model (None: not trained data-parallel):
        # save writes on rank 0 only, also once the group is destroyed
        self._data_parallel_rank: int | None = None
        # The folders the model was loaded from or saved to, each with the identity of the adata.h5ad it held then
        # (None: none): save keeps that file in its folder while it is the same file, not one another model wrote.
        self._folders: dict[Path, tuple | None] = {}
        # (a weak reference to) the AnnData map_query read the query from, told then of the genes it lacks: a new one
        # (_query_copied: its genes, its obs as it was then) or, for a view of counts on disk, the user's view itself
        self._mapped_query: weakref.ref | None = None
        self._query_copied = False

    @property
    def layout(self) -> data.CovariateLayout:
        """How the model reads cells' covariates from ``obs`` (from :attr:`config`): the batch key and its categories,
        the categorical covariates and theirs, the continuous covariates with the mean and sd that scale them."""
        return _layout(self.config)

    def __repr__(self) -> str:
        c = self.config
        state = "trained" if self.is_trained else "untrained"
        batches = f"batch_key={c.batch_key!r} with {len(c.batch_categories)} batches" if c.batch_key else "no batch_key"
        if c.reference_categories:  # a map_query model: which of its batches are the query's
            new = len(c.batch_categories) - c.reference_categories.get(c.batch_key, len(c.batch_categories))
            batches += f", {new} of them the query's (a map_query model{', input layer trained' if c.train_input_layer else ''})"
        decoder = ", decoder='linear'" if c.decoder == "linear" else ""
        return f"CellVAE({state}; {c.n_genes} genes, n_latent={c.n_latent}, likelihood={c.likelihood!r}{decoder}, {batches})"

    # ------------------------------------------------------------------ training

    @advise_on_foreign_arguments
    def fit(
        self,
        *,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = DEFAULT_LR,
        weight_decay: float | None = None,
        validation_size: float = 0.1,
        early_stopping: bool = True,
        patience: int = 20,
        random_state: int = 0,
        device: str | torch.device = "auto",
        progress: bool = True,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 1,
        resume: bool = False,
        precision: str = "float32",
    ) -> CellVAE:
        """Train on the AnnData the model was built on; returns the model.

        That AnnData (or the one given to :meth:`load`) must hold every gene of the model (a query model's may
        lack some, read as zero counts as :meth:`map_query` read them). Cells with
        zero total counts carry no information and are left out of training with a warning (they are
        still embedded by :meth:`get_latent`). ``model.history`` holds the
        per-epoch train/validation distortion, rate and ELBO (nats per cell). At the end the model
        keeps the parameters of its best epoch: the lowest validation loss (at the full beta, so warm-up epochs count, and
        with ``free_bits`` charging the KL as training does; a later epoch counts as better where it is lower by over
        1e-4 of the best so far, the same test early stopping's patience counts with;
        without validation cells, the lowest training loss after the KL warm-up), whose ``epoch`` value
        ``history.attrs["best_epoch"]`` holds (the last row is not always the model's;
        ``history.attrs["still_improving"]`` says the epochs ran out while the validation loss still fell, or without
        validation cells while the best epoch was the last; :meth:`save` keeps it). A further
        ``fit`` continues from the trained weights with a new KL warm-up and replaces ``history``; it validates on
        the cells its ``random_state`` and ``validation_size`` draw, the earlier fit's with the same values (others
        are warned of where they include cells the earlier fit trained on, matched by name where cells were filtered
        since; a loaded model does not know them).
        Ctrl-C stops training and keeps the best epoch so far, with a warning and
        ``history.attrs["interrupted"]``; Ctrl-C before the first epoch ends raises ``KeyboardInterrupt``
        and leaves the model as it was. An epoch whose loss is over 10 times the loss before ``fit`` ends
        training at once, as diverged (too large an ``lr``), with a warning. Training whose best epoch is worse
        than the model before ``fit`` (on up to 1,000 held-out cells: for a first fit, by over 5% of the random
        weights' loss; for a further fit of the same ``beta`` judged on cells the earlier fit of this session held out
        too, by over 0.2%) is undone, with a warning: the model, its ``history`` and whether it is trained are as
        before, so a further ``fit`` with a smaller ``lr`` starts afresh. A first fit that ends no more than 0.2% below
        the random weights is kept, with a warning (its ``lr`` too small or too large).

        On a query model (from :meth:`map_query`) ``fit`` trains the mapping further: as in mapping,
        only the query's new parameters train (no KL warm-up, no weight decay) and the reference's
        stay frozen, so reference cells embed as before, to float rounding (unless it was mapped with
        ``train_input_layer=True``, which trains the encoder's input layer again). A query model saved by an
        older cellvae may not record that it is one: map again to get it.

        Parameters
        ----------
        max_epochs
            Passes over the training cells; ``None`` picks about 500,000 cell passes, between 20
            and 400 epochs and never more than scVI's default for the dataset size (8 at 1M cells);
            for a query model (from :meth:`map_query`) what :meth:`map_query` picks.
        batch_size
            Cells per minibatch (128, as scVI).
        lr, weight_decay
            AdamW's learning rate and decoupled weight decay (``None``: 1e-6; 0 for a query model,
            which refuses any other value, since decay would shrink the reference's frozen weights).
        validation_size
            Share of the cells held out to monitor the loss and stop early (``0``: none, then the
            training loss is monitored).
        early_stopping, patience
            Stop after ``patience`` epochs without a 0.01% improvement of the monitored loss, counted from the
            end of the KL warm-up.
        random_state
            Seeds the initial weights of an untrained model, the validation split, the minibatch
            order and dropout, so equal seeds give bitwise-equal models on the CPU (with the same
            torch thread count); the global random state of torch and numpy is left as it was. (Dropout
            draws from torch's process-wide generator: another thread of yours drawing from it while fit
            runs changes the model.)
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (or a ``torch.device``).
        progress
            Show a tqdm progress bar.
        checkpoint_dir, checkpoint_every, resume
            ``checkpoint_dir`` receives ``checkpoint.safetensors`` (weights, optimizer, random-number
            generators, history, early-stopping state) every ``checkpoint_every`` epochs, written
            atomically. ``resume=True`` continues from it after a crash or Ctrl-C and ends with the
            same parameters as an uninterrupted run with the same arguments.
        precision
            ``"float32"`` or ``"bfloat16"``: the latter runs the gene-wide matrix multiplies (encoder
            input, decoder output, and the per-cell dispersion and zero-inflation heads of
            ``dispersion="gene-cell"`` and ``likelihood="zinb"``) in bfloat16 while training, with float32 weights,
            optimizer, likelihood and outputs. On a CPU with native bfloat16 (AVX512-BF16 or AMX) this
            trained 11% and 18% faster to the same held-out ELBO in interleaved benchmark fits, and from 6%
            slower to 40% faster in whole-run comparisons since; where bfloat16 is emulated it is slower.

        Notes
        -----
        Data-parallel training: launched by ``torchrun --nproc_per_node=N`` (or in processes
        that called ``torch.distributed.init_process_group``), each process trains on its own
        shard of the cells with gradients all-reduced (DDP; gloo on CPU, nccl on GPU) and all
        end with the same model; save it from rank 0 only. From a backed or Zarr matrix each process
        reads only its part of the cells: here it checks their counts and sums their library sizes
        (the model built on that matrix checked only its dtype and shape), and a bad count found by
        one process stops all of them.
        """
        if self.adata is None:
            raise ValueError("this model was loaded without an AnnData; pass one with CellVAE.load(path, adata=...)")
        # numpy scalars become Python numbers: the checks, the history and checkpoints (JSON) expect them
        max_epochs, batch_size, lr, weight_decay, validation_size, patience, random_state, checkpoint_every = map(
            data.native, (max_epochs, batch_size, lr, weight_decay, validation_size, patience, random_state, checkpoint_every)
        )
        query = bool(self.config.reference_categories)
        # BatchNorm keeps the reference's statistics while a query model trains, so any batch size works
        _check_training(
            max_epochs, batch_size, lr, validation_size, patience, random_state, None if query else self.config.normalization
        )
        _warn_if_mmd_sees_one_cell(self.config, batch_size)
        if query and weight_decay not in (None, 0):
            raise ValueError(
                f"weight_decay={weight_decay} on a query model (from map_query) would shrink the reference's frozen "
                "weights too; leave weight_decay=None (no decay)"
            )
        if query and not _query_parameters(self.module):
            raise ValueError(
                "this query model has nothing to train: all its batches and covariate categories are the reference's "
                "(and train_input_layer=False), so its cells already use the reference's frozen parameters"
            )
        weight_decay = (0.0 if query else 1e-6) if weight_decay is None else weight_decay
        _check_weight_decay(weight_decay)
        early_stopping = data.check_flag(early_stopping, "early_stopping")
        progress = data.check_flag(progress, "progress")
        resume = data.check_flag(resume, "resume")
        if not data.is_whole(checkpoint_every) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive number of epochs, got {checkpoint_every!r}")
        if resume and checkpoint_dir is None:
            raise ValueError("resume=True needs the checkpoint_dir=... of the run to continue")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        missing = pd.Index(self.config.gene_names).difference(data.gene_names(self.adata), sort=False)
        # reading them as zeros (as get_latent may) would teach the decoder that they are silent; a query model
        # trains only its new batches' parameters, which map_query trained on its query read so already
        if len(missing) and not query:
            raise ValueError(
                f"{len(missing)} of the model's {self.config.n_genes} genes are not in its AnnData (e.g. "
                f"{missing[:5].tolist()}), e.g. after sc.pp.filter_genes changed it in place; fit needs counts for every "
                "gene of the model: build a new CellVAE on the data as it is now, or load the model with an AnnData "
                "that has all its genes"
            )
        if checkpoint_dir is not None:  # a folder that cannot take them is told now, not after the first epoch
            _check_checkpoint_dir(checkpoint_dir)
            checkpoint_dir = Path(checkpoint_dir).expanduser()  # "~/ck" is the home's, where checks, writes and resume look
        # Under torchrun (or an initialised process group) each process trains on its shard, DDP-style.
        training_device = setup_distributed(pick_device(device))
        if checkpoint_dir is not None and not resume and rank_and_world()[1] == 1:  # (data-parallel: train, once the
            refuse_earlier_checkpoints(checkpoint_dir, 1)  # ranks have agreed on resume)
        # Ctrl-C while the ranks read and sum the counts (collectives) is agreed too; train gives it back.
        with AgreedInterrupt(rank_and_world()[1]) as interrupts:
            loader, cells = self._loader(self.adata, training_device, all_ranks=True)
            nonempty, train_cells, validation_cells, seen = self._training_split(loader, cells, validation_size, random_state)
            epochs = max_epochs or (default_query_epochs if query else default_max_epochs)(len(nonempty))
            # (int and float: a config saved by older cellvae may hold True for 1, which the saved settings would
            # keep as a bool that load refuses)
            warmup = default_kl_warmup(epochs) if self.config.kl_warmup is None else int(self.config.kl_warmup)
            if not query and warmup > epochs:
                data.warn_user(
                    f"kl_warmup={warmup} epochs is longer than the {epochs} epochs of training: the KL weight ends at about "
                    f"{epochs / warmup:.2g} × beta, so the model trains as if beta were smaller, and early stopping, which "
                    "waits for the warm-up to end, never starts; lower kl_warmup or raise max_epochs",
                    UserWarning,
                )
            settings = TrainSettings(
                max_epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                weight_decay=weight_decay,
                kl_warmup_epochs=0 if query else warmup,
                beta=float(self.config.beta),
                early_stopping=early_stopping,
                patience=patience,
                random_state=random_state,
                progress=progress,
                precision=precision,
            )
            # A model whose training fails or diverges is given back as it was (not half-trained or non-finite);
            # an untrained one with its weights from before this fit, not those drawn for it.
            before = _ModelBeforeFit.of(self)
            home = self.device  # where the outputs run (to_device), before and after training
            if not self.is_trained:
                # Initial weights from random_state (not the global torch RNG): equal seeds give equal models.
                with seeded(random_state):
                    self.module = VAE(self.config)
            # a few monitored cells' loss before and after: training that diverged (too large an lr) is told, not kept silently
            probe = (validation_cells if len(validation_cells) else train_cells)[:DIVERGENCE_PROBE_CELLS]
            try:
                self.device = loader.device
                _move(self.module, self.device)
                start_loss = self._mean_loss(loader, probe, batch_size, random_state)
                with _reference_frozen(self.module) if query else nullcontext():
                    history = train(
                        self.module,
                        loader,
                        train_cells,
                        validation_cells,
                        settings,
                        checkpoint_dir,
                        checkpoint_every,
                        resume,
                        interrupts=interrupts,
                        trained_before=self.is_trained,
                        diverged_above=DIVERGED_LOSS_RATIO * start_loss,
                    )
            except BaseException as error:  # Ctrl-C before the first epoch ended too: the model stays as it was
                _move(self.module, home)
                self.device = home
                self.module.load_state_dict(before.weights)
                self.module.eval()
                if isinstance(error, Exception) and self.adata.isbacked and not self.adata.file.is_open:
                    raise ValueError(
                        f"the backed file {self.adata.filename} was closed while fit was reading it; "
                        "keep it open until fit returns"
                    ) from error
                loader.release_device()  # (the error keeps fit's frame, and so the loader, while it is held)
                if is_out_of_memory(error):
                    _raise_out_of_memory(error, loader, batch_size, "fit(", also=", a smaller n_hidden")
                raise
        self.history, self.train_settings, self.is_trained = history, settings, True
        self.train_indices, self.validation_indices = np.sort(train_cells), np.sort(validation_cells)
        self._split_obs_names = self.adata.obs_names
        rank, world = rank_and_world()
        self._data_parallel_rank = rank if world > 1 else None
        if world > 1:  # each step's global minibatch was world × batch_size cells
            self.history.attrs["processes"] = world
        if query:  # it decodes with its reference's decoder: the record map_query gave it stays
            brief = before.history.attrs.get("brief_training")
        else:  # (a further fit: not judged)
            brief = None if before.is_trained else _brief_training(history, len(nonempty))
        if brief:  # told by differential_expression, and saved with the model
            self.history.attrs["brief_training"] = brief
        try:  # checks that only warn: the model is trained whether or not they finish
            self._keep_or_give_back(
                before, loader, probe, start_loss, train_cells, held_out_alone=len(validation_cells) > 0 and seen == 0
            )
        except KeyboardInterrupt:  # as Ctrl-C in training: stop, and give back the trained model
            data.warn_user("Ctrl-C: the checks after training were skipped; the model is trained", RuntimeWarning)
        finally:
            _move(self.module, home)
            self.device = home
        return self

    def _training_split(
        self, loader: data.CellLoader, cells: np.ndarray, validation_size: float, random_state: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int | None]:
        """The cells fit trains on: those with counts (the others warned about), split into training and validation
        cells (every batch and covariate category trained); returns them with how many validation cells an earlier
        fit trained on (:func:`_warn_about_seen_validation_cells`)."""
        query = bool(self.config.reference_categories)
        nonempty = cells[loader.library[cells] > 0]
        _warn_about_empty_cells(
            loader,
            cells,
            nonempty,
            self.config,
            "as they were drawn" if not query else "untrained",
            self.adata,
            "query_adata" if query else "adata",  # (the name map_query's warning gave the same cells)
        )
        totals = data.totals_over_all_genes(self.adata, self.config.layer)  # (those of the model's genes vary)
        _warn_about_equal_depths(
            (loader.library if totals is None else totals)[nonempty], data.counts_location(self.config.layer)
        )
        minimum = 1 if query else data.MIN_CELLS  # (a query model's few new parameters: as map_query)
        if len(nonempty) < minimum:
            raise ValueError(f"training needs at least {minimum} cell{'s' * (minimum > 1)} with counts, got {len(nonempty)}")
        _warn_about_small_categories(self, loader.covariates.codes, nonempty, "fit")
        train_cells, validation_cells = split_cells(nonempty, validation_size, random_state)
        _check_cells_left_to_train(train_cells, nonempty, validation_size)
        drawn = len(validation_cells)
        train_cells, validation_cells = train_every_category(train_cells, validation_cells, loader.covariates.codes)
        if drawn and not len(validation_cells):
            data.warn_user(
                f"the {drawn} validation cell{'s' if drawn > 1 else ''} drawn by validation_size={validation_size} "
                "held the only cells of a batch or covariate category and went to training (their parameters would "
                "stay as drawn), so there is no validation: early stopping follows the training loss; pass a larger "
                "validation_size for a validation set",
                UserWarning,
            )
        seen = _warn_about_seen_validation_cells(self, validation_cells)
        return nonempty, train_cells, validation_cells, seen

    def _keep_or_give_back(
        self,
        before: _ModelBeforeFit,
        loader: data.CellLoader,
        probe: np.ndarray,
        start_loss: float,
        train_cells: np.ndarray,
        held_out_alone: bool,
    ) -> None:
        """After fit: give back the model as it was ``before`` where training made its loss on the ``probe`` cells
        worse (diverged), else warn where it diverged after a sound best epoch, learned nothing or collapsed.
        ``held_out_alone``: the probe cells are validation cells that no earlier fit trained on."""
        history, settings = self.history, self.train_settings
        lr, epochs = settings.lr, settings.max_epochs
        end_loss = self._mean_loss(loader, probe, settings.batch_size, settings.random_state)
        # A further fit of the same objective, judged on cells its earlier fit held out too, competes with the model
        # it began from: one that ended worse gives it back. (A changed beta, as tl.rate_distortion_sweep's warm
        # start, began from another objective's optimum; cells the earlier fit trained on favour the start.)
        same_objective = before.is_trained and before.train_settings is not None and before.train_settings.beta == settings.beta
        tolerance = FURTHER_TRAINING_TOLERANCE if same_objective and held_out_alone else FIRST_FIT_TOLERANCE
        diverged = not end_loss <= tolerance * start_loss  # NaN too
        if rank_and_world()[1] > 1:  # every process gives back the same model
            diverged = bool(all_reduce_max([float(diverged)])[0])
        smaller = DEFAULT_LR if lr > DEFAULT_LR else lr / 10  # the learning rate advised where training went wrong
        cells_judged = f"{len(probe):,} {'held-out' if self.validation_indices.size else 'training'} cells"
        if diverged:
            # Fitting the diverged weights again, with any learning rate, would not bring them back.
            before.restore(self)
            stopped = ""
            if "diverged_epoch" in history.attrs:
                stopped = f" (stopped after epoch {history.attrs['diverged_epoch']} of {epochs}, numbered from 0)"
            why = (
                f"so this further fit did not improve on the trained model it continued from (lr={lr:g} may be "
                "too large to train it further, or it had converged)"
                if end_loss <= FIRST_FIT_TOLERANCE * start_loss
                else f"so training diverged{stopped}, most likely from too large a learning rate (lr={lr:g})"
            )
            data.warn_user(
                f"training made the model worse: its loss on {cells_judged} is {end_loss:.4g} nats per cell, "
                f"against {start_loss:.4g} when fit began, {why}. The model is given back as it was before this fit"
                f"{'' if self.is_trained else ' (untrained)'}: fit it again with a smaller one, e.g. "
                f"model.fit(lr={smaller:g}){', the default' if smaller == DEFAULT_LR else ''}",
                RuntimeWarning,
            )
        elif "diverged_epoch" in history.attrs:  # diverged after a sound best epoch, which is kept
            last = history.iloc[-1]
            loss = last["validation_loss"] if "validation_loss" in history else last["train_loss"]
            data.warn_user(
                f"training diverged at epoch {history.attrs['diverged_epoch']} of {epochs} (numbered from 0), most "
                f"likely from too large a learning rate (lr={lr:g}): its loss, {loss:.4g} nats per cell, was over "
                f"{DIVERGED_LOSS_RATIO} times the {start_loss:.4g} when fit began, so training stopped there. The "
                f"model keeps its best epoch, epoch {history.attrs['best_epoch']}; a smaller lr may train a better "
                f"one, e.g. fit(lr={smaller:g}){', the default' if smaller == DEFAULT_LR else ''}",
                RuntimeWarning,
            )
        elif not before.is_trained and not end_loss * FURTHER_TRAINING_TOLERANCE < start_loss:  # a first fit that
            # learned nothing beyond the noise of its measure (kept: not worse)
            fix = "train it longer (a larger max_epochs)"
            if lr != DEFAULT_LR:
                fix = f"lr={lr:g} is likely too {'small' if lr < DEFAULT_LR else 'large'}: fit it with lr={DEFAULT_LR:g}"
            data.warn_user(
                f"training did not lower the loss by more than its noise (0.2%): on {cells_judged} it is {end_loss:.6g} "
                f"nats per cell, against {start_loss:.6g} with the random weights fit began from, so the model learned "
                f"nothing of use. It is kept (trained); {fix}",
                RuntimeWarning,
            )
        elif not self.config.reference_categories or lr > DEFAULT_LR:  # (a diverged model's latent space says
            # nothing about collapse; a query model's is its reference's, whose own fit told of it, as in map_query)
            self._warn_if_collapsed(loader, train_cells[:5000], settings.batch_size, settings.random_state, lr)

    # ------------------------------------------------------------------ outputs

    def to_device(self, device: str | torch.device = "auto") -> CellVAE:
        """Run the outputs (:meth:`get_latent` and the rest) on ``device``, as scvi-tools' ``to_device``.

        A model runs them on the CPU until moved; :meth:`fit` trains on its own ``device`` and leaves
        the model where it was. On a GPU, outputs of many cells (``get_normalized_expression``,
        ``differential_expression``, ``marginal_log_likelihood``) run many times faster; their values
        differ from the CPU's by float rounding, and draws follow the device's random numbers.

        Parameters
        ----------
        device
            ``"auto"`` (CUDA, then MPS, then CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or ``"mps"`` (or a ``torch.device``).

        Returns
        -------
        The model itself.
        """
        self.device = pick_device(device)
        _move(self.module, self.device)
        return self

    @overload
    def get_latent(
        self,
        adata: ad.AnnData | None = None,
        *,
        mean: bool = True,
        batch_size: int = 4096,
        random_state: int = 0,
        refine_steps: int = 0,
        return_dist: Literal[False] = False,
        progress: bool = True,
    ) -> np.ndarray: ...

    @overload
    def get_latent(
        self,
        adata: ad.AnnData | None = None,
        *,
        mean: bool = True,
        batch_size: int = 4096,
        random_state: int = 0,
        refine_steps: int = 0,
        return_dist: Literal[True],
        progress: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def get_latent(
        self,
        adata: ad.AnnData | None = None,
        *,
        mean: bool = True,
        batch_size: int = 4096,
        random_state: int = 0,
        refine_steps: int = 0,
        return_dist: bool = False,
        progress: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]: ...

    @advise_on_foreign_arguments
    def get_latent(
        self,
        adata: ad.AnnData | None = None,
        *,
        mean: bool = True,
        batch_size: int = 4096,
        random_state: int = 0,
        refine_steps: int = 0,
        return_dist: bool = False,
        progress: bool = True,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Latent codes of each cell: posterior means, or draws if not ``mean``.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData. Genes are matched by name (at least 80%
            of the model's genes must be present; missing ones count as zeros, with a warning).
        mean
            Posterior means (the embedding to use for neighbours); ``False`` draws z ~ q(z|x).
        batch_size
            Cells per forward pass, fewer where genes are many (at most 2**21 counts densified at
            once), so memory stays bounded.
        random_state
            Seed of the draws (``mean=False``, and those of the refinement with ``refine_steps``): a cell's draws
            depend also on the other cells passed with it and on ``batch_size``. Calls with the same seed return the
            same draws (scvi-tools draws anew each call): pass another seed for further draws.
        refine_steps
            ``> 0`` (semi-amortized inference, with ``mean=True``) improves each cell's posterior by
            that many gradient steps on its own objective ``E_q[log p(x|z)] − beta·KL`` from the
            encoder's output, the decoder frozen (Adam, learning rate 0.01 decaying to a tenth, one draw
            of z per step; a cell keeps the refined mean only where it scores better); this closes part of the
            amortization gap (see :meth:`inference_gaps`) at the price of an optimisation per cell: on
            held-out cells of the Kang data 50 steps closed about 65% of the gap that 500 steps of
            :meth:`inference_gaps` find, 200 steps about 90% (``benchmarks/README.md``, "One-off measurements").
            With ``free_bits``, the KL of the dimensions whose mean KL over the cells embedded is below the floor
            is left out, as training leaves it out (refinement then does not pull them back to the prior). Each cell is
            refined for its own fit alone: ``batch_mmd``'s mixing penalty is not part of it, so refined means of
            a model trained with it mix batches less, and even without it they can separate cell types less
            well (on the Kang data 50 steps lowered the cell-type silhouette from 0.55 to 0.52): compare before
            you cluster on them.
        return_dist
            Return q(z|x) itself, as scvi-tools' ``return_dist=True``: each cell's posterior means and
            variances (for ``posterior="full"`` the diagonal of its covariance), whatever ``mean``.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        n_cells × n_latent float32 array, cells in ``adata``'s order; with ``return_dist`` a tuple
        ``(means, variances)`` of two such arrays.
        """
        mean = data.check_flag(mean, "mean")
        return_dist = data.check_flag(return_dist, "return_dist")
        progress = data.check_flag(progress, "progress")
        refine_steps = data.native(refine_steps)
        if not data.is_whole(refine_steps) or refine_steps < 0:
            raise ValueError(f"refine_steps must be a non-negative integer, got {refine_steps!r}")
        if refine_steps and not mean:
            raise ValueError("refine_steps refines posterior means; use it with mean=True")
        if refine_steps and return_dist:
            raise ValueError("return_dist gives the encoder's posterior, which refine_steps does not return; use one of them")
        random_state = data.check_seed(random_state)
        loader, cells = self._loader(self._resolve(adata), self.device)
        if refine_steps:
            with diagnostics.evaluation(self.module, random_state):
                return diagnostics.refined_latent(
                    self.module,
                    loader,
                    cells,
                    n_steps=refine_steps,
                    beta=self.config.beta,
                    free_bits=self.config.free_bits,
                    batch_size=min(batch_size, 1024),
                    progress=progress,
                )
        latent = np.empty((len(cells), self.config.n_latent), dtype=np.float32)
        variances = np.empty_like(latent) if return_dist else None
        with torch.no_grad(), diagnostics.evaluation(self.module, random_state):
            batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
            for rows, mb in with_progress(batches, len(cells), "get_latent", progress):
                q = self.module.inference(mb.counts, mb.covariates, sample=not (mean or return_dist))
                latent[rows] = q["z"].float().cpu().numpy()
                if return_dist:
                    variances[rows] = self.module.posterior_variances(q["scale"]).float().cpu().numpy()
        return (latent, variances) if return_dist else latent

    @advise_on_foreign_arguments
    def get_normalized_expression(
        self,
        adata: ad.AnnData | None = None,
        *,
        library_size: float = 1e4,
        transform_batch: str | list[str] | None = None,
        gene_list: list[str] | None = None,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> np.ndarray:
        """Denoised expression: the decoder mean at the posterior mean, scaled to ``library_size``.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        library_size
            Total counts of each row: every row sums to it (scvi-tools' default is 1, proportions: pass
            ``library_size=1`` for its scale). With ``likelihood="zinb"`` this is the
            negative binomial's mean, without the zero-inflation (as scvi-tools' normalized expression).
        transform_batch
            Decode every cell as if from this batch (a list averages over batches; ``None`` in it stands
            for the cell's own batch): batch-corrected expression. ``None`` decodes each cell with its own batch.
            Other covariates stay each cell's own (as in scvi-tools): to decode under other values of them, use
            :meth:`decode` with ``covariates=``.
        gene_list
            Return only these genes of the model, in this order (the rows still sum to ``library_size``
            over all genes); ``None``: all. Keeps the result small for many cells.
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        n_cells × n_genes float32 array, genes in ``gene_list``'s order, else as in ``adata.var_names`` where
        ``adata`` holds exactly the model's genes (so that ``adata.layers[...] = ...`` lines up), else in the
        model's order (``model.config.gene_names``).
        """
        if isinstance(library_size, (bool, np.bool_)) or not (
            isinstance(library_size, (int, float, np.number)) and 0 < library_size <= data.MAX_COUNT
        ):
            latent = " (scvi-tools' library_size='latent' has no counterpart: cellvae reads each cell's observed library size)"
            raise ValueError(
                f"library_size must be a positive number of counts up to {data.MAX_COUNT:.0e}, e.g. 1 for scvi-tools' "
                f"scale, got {library_size!r}" + (latent if isinstance(library_size, str) and library_size == "latent" else "")
            )
        progress = data.check_flag(progress, "progress")
        adata = self._resolve(adata)
        genes = self._gene_indices(gene_list) if gene_list is not None else self._adata_gene_columns(adata)
        targets = self._batch_overrides(transform_batch)
        loader, cells = self._loader(adata, self.device)
        n_out = self.config.n_genes if gene_list is None else len(genes)
        out = np.empty((len(cells), n_out), dtype=np.float32)
        with torch.no_grad(), diagnostics.evaluation(self.module, 0):
            batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
            for rows, mb in with_progress(batches, len(cells), "get_normalized_expression", progress):
                z = self.module.inference(mb.counts, mb.covariates, sample=False)["z"]
                library = torch.full_like(mb.library, library_size)
                total = 0.0
                for covariates, batch_index in self._decode_inputs(mb, targets):
                    total = total + self.module.generative(z, covariates, library, batch_index).log_mean.exp()[:, genes]
                out[rows] = (total / len(targets)).cpu().numpy()
        return out

    def _is_mapped_query(self, adata) -> bool:
        """Whether ``adata`` is the AnnData map_query read the query from for this model (its copy of the user's query,
        or a view of counts on disk given to it)."""
        return adata is not None and self._mapped_query is not None and self._mapped_query() is adata

    def _adata_gene_columns(
        self, adata: ad.AnnData, by_name: str = "pass gene_list=[...] for named columns"
    ) -> slice | torch.Tensor:
        """Columns that put per-gene outputs in ``adata``'s gene order where it holds exactly the model's
        genes in another order (on the model's device); else all columns, in the model's order (``by_name``: how the
        caller names its columns, told where they are not adata's)."""
        genes, names = pd.Index(self.config.gene_names), data.gene_names(adata)
        lacked = int((~genes.isin(names)).sum())
        if lacked and self._is_mapped_query(adata):  # (the query's own columns may number as many as the model's)
            data.warn_user(
                f"the query lacked {lacked:,} of the model's {len(genes):,} genes, so the output's columns are the "
                f"model's genes (model.config.gene_names), not the query's var_names: do not store it in the query's "
                f"layers; {by_name}",
                UserWarning,
            )
        if len(names) != len(genes) or names.equals(genes):
            return slice(None)
        positions = genes.get_indexer(names) if genes.is_unique else np.full(len(genes), -1)
        if (positions < 0).any() or len(np.unique(positions)) < len(positions):
            # as many genes as the model's, so the output fits adata.layers, yet its columns are not adata's genes
            missing = genes.difference(names, sort=False)
            differ = "some names repeat"
            if len(missing):
                differ = f"{len(missing):,} of the model's are not in it, e.g. {missing[:3].tolist()}"
            data.warn_user(
                f"adata holds as many genes as the model ({len(genes):,}) but not the same ones ({differ}): the output's "
                "columns are the model's genes (model.config.gene_names), not adata.var_names, so do not store it in "
                f"adata.layers; {by_name}",
                UserWarning,
            )
            return slice(None)
        return torch.from_numpy(positions).to(self.device)

    def _gene_indices(self, gene_list) -> torch.Tensor:
        """Positions of ``gene_list`` among the model's genes; unknown names are an error."""
        if isinstance(gene_list, str):
            raise TypeError(f"gene_list takes a list of gene names, e.g. gene_list=[{gene_list!r}]")
        values = np.asarray(gene_list)
        if values.ndim != 1 or not (values.dtype.kind in "OUS" or values.size == 0):
            advice = "for a boolean mask or positions pass the names: adata.var_names[mask]"
            if values.dtype.kind in "iu" and all(name.isdecimal() for name in self.config.gene_names):
                as_text = [str(v) for v in values.ravel()[:2]]
                advice = f"this model's gene names are numbers as text: pass them so, e.g. gene_list={as_text}"
            raise TypeError(f"gene_list takes a list of gene names, got {type(gene_list).__name__} of {values.dtype} ({advice})")
        names = [str(g) for g in gene_list]
        positions = pd.Index(self.config.gene_names).get_indexer(names)
        if len(names) == 0 or (positions < 0).any():
            unknown = [n for n, p in zip(names, positions) if p < 0]
            raise ValueError(f"gene_list names genes the model does not have: {unknown[:5]}" if unknown else "gene_list is empty")
        return torch.from_numpy(positions).to(self.device)

    @advise_on_foreign_arguments
    def get_likelihood_parameters(
        self, adata: ad.AnnData | None = None, *, batch_size: int = 1024, progress: bool = True
    ) -> dict[str, np.ndarray]:
        """The likelihood's parameters of each cell and gene, at the posterior mean.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        ``{"mean": ...}`` (expected counts at the cell's observed library size), plus ``"theta"``
        (inverse dispersion; NB and ZINB) and ``"zero_inflation"`` (probability of an extra zero;
        ZINB); each n_cells × n_genes float32. With ``dispersion="gene"`` every cell has the same
        ``"theta"``, so it is a read-only view of one row repeated (no memory; ``np.array(...)`` copies
        it). For ZINB ``"mean"`` is the mixture's mean,
        (1 − zero_inflation) × the NB component's mean; that NB mean (scvi-tools' ``"mean"`` for
        ZINB) is ``mean / (1 - zero_inflation)`` (imprecise in float32 where zero_inflation is within 1e-4
        of 1). Genes as in ``adata.var_names`` where ``adata`` holds
        exactly the model's genes, else in the model's order.
        """
        progress = data.check_flag(progress, "progress")
        adata = self._resolve(adata)
        loader, cells = self._loader(adata, self.device)
        columns = self._adata_gene_columns(adata, "select its columns by name with model.config.gene_names")
        likelihood = self.config.likelihood
        names = ["mean"] + ["theta"] * (likelihood != "poisson") + ["zero_inflation"] * (likelihood == "zinb")
        # written in place: the outputs are the only cells × genes arrays held
        shared_theta = self.config.dispersion == "gene" and "theta" in names  # one row for every cell
        parameters = {
            name: np.empty((len(cells), self.config.n_genes), dtype=np.float32)
            for name in names
            if not (name == "theta" and shared_theta)
        }
        with torch.no_grad(), diagnostics.evaluation(self.module, 0):
            batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
            for rows, mb in with_progress(batches, len(cells), "get_likelihood_parameters", progress):
                z = self.module.inference(mb.counts, mb.covariates, sample=False)["z"]
                dist = self.module.generative(z, mb.covariates, mb.library, mb.batch_index)
                parameters["mean"][rows] = dist.mean[:, columns].cpu().numpy()
                if "theta" in parameters:
                    parameters["theta"][rows] = dist.theta.expand_as(dist.log_mean)[:, columns].cpu().numpy()
                elif shared_theta:
                    theta_row = dist.theta[columns].float().cpu().numpy()
                if "zero_inflation" in parameters:
                    parameters["zero_inflation"][rows] = torch.sigmoid(dist.zi_logits[:, columns]).cpu().numpy()
        if shared_theta:  # a dense copy would be n_cells × n_genes of the same row (1M × 30,000 genes: 120 GB)
            parameters["theta"] = np.broadcast_to(theta_row, (len(cells), self.config.n_genes))
        return {name: parameters[name] for name in names}

    def get_loadings(self) -> pd.DataFrame:
        """The weights of a linear decoder (``decoder="linear"``): genes × latent dimensions, as scvi-tools' LinearSCVI.

        A cell's decoded log expression of gene g is ``loadings.loc[g] @ z`` plus the gene's covariate and bias
        terms, less a normalisation shared by all genes; a dimension's largest (and most negative) loadings name
        the genes it drives. Within a column, compare genes (a shift of a whole column changes no cell's expression).

        Returns
        -------
        DataFrame indexed by the model's genes, one column per latent dimension (``Z_0``, ``Z_1``, ...).
        """
        if self.config.decoder != "linear":
            raise ValueError(
                f"get_loadings reads the weights of a linear decoder, and this model's decoder is {self.config.decoder!r} "
                "(hidden layers): build the model with CellVAE(adata, decoder='linear') and train it"
            )
        if not self.is_trained:
            raise ValueError("get_loadings reads a trained decoder's weights; call model.fit() first")
        weights = self.module.decoder.proportions.weight[:, : self.config.n_latent].detach().cpu().numpy().copy()
        return pd.DataFrame(
            weights, index=pd.Index(self.config.gene_names), columns=[f"Z_{i}" for i in range(self.config.n_latent)]
        )

    @advise_on_foreign_arguments
    def sample_counts(
        self,
        adata: ad.AnnData | None = None,
        *,
        n_samples: int = 1,
        gene_list: list[str] | None = None,
        random_state: int = 0,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> np.ndarray:
        """Posterior-predictive counts: z ~ q(z|x), then x ~ p(x|z), at each cell's library size and batch.

        A draw's expected total is the cell's library size (with ``likelihood="zinb"``, less the share
        the zero inflation removes).

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        n_samples
            Draws per cell.
        gene_list
            Draw and return only these genes of the model, in this order (much faster than drawing all;
            their draws are not those of the same genes in a draw of all genes); ``None``: all. The result
            is dense, n_samples × cells × genes × 4 bytes, so list the genes needed when drawing many
            samples of many cells.
        random_state
            Seed of the draws (which depend also on the cells, ``batch_size`` and ``n_samples``: the first of two
            samples can differ from the one drawn with ``n_samples=1``). Two calls with the same seed (the default 0
            too) draw the same counts: for replicates pass ``n_samples``, or another seed per call.
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        n_cells × n_genes float32 counts, or n_samples × n_cells × n_genes when ``n_samples > 1`` (draws on
        the first axis; scvi-tools' ``posterior_predictive_sample`` puts them last); genes in
        ``gene_list``'s order, else as in ``adata.var_names`` where ``adata`` holds exactly the model's genes,
        else in the model's order.
        """
        data.check_positive_int(n_samples, "n_samples")
        random_state = data.check_seed(random_state)
        progress = data.check_flag(progress, "progress")
        adata = self._resolve(adata)
        columns = self._gene_indices(gene_list) if gene_list is not None else self._adata_gene_columns(adata)
        loader, cells = self._loader(adata, self.device)
        generator = torch.Generator(device=self.device).manual_seed(random_state)
        placed, count_generator = count_sampler(self.device, random_state, generator)
        n_out = self.config.n_genes if gene_list is None else len(columns)
        draws = np.empty((n_samples, len(cells), n_out), dtype=np.float32)
        with torch.no_grad(), diagnostics.evaluation(self.module, random_state):
            batches = loader.batches(cells, loader.evaluation_batch_size(batch_size))
            for rows, mb in with_progress(batches, len(cells), "sample_counts", progress):
                q = self.module.inference(mb.counts, mb.covariates, sample=False)
                for s in range(n_samples):
                    noise = torch.randn(q["mean"].shape, generator=generator, device=self.device, dtype=q["mean"].dtype)
                    z = self.module.reparameterise(q["mean"], q["scale"], noise)
                    dist = self.module.generative(z, mb.covariates, mb.library, mb.batch_index)
                    if gene_list is None:  # all genes, put in adata's order
                        drawn = placed(dist).sample(count_generator)[:, columns]
                    else:  # the listed genes alone: 14x faster for 10 of 16,579 genes
                        drawn = placed(dist.of_genes(columns)).sample(count_generator)
                    draws[s, rows] = drawn.cpu().numpy()
        return draws[0] if n_samples == 1 else draws

    @advise_on_foreign_arguments
    def differential_expression(
        self,
        adata: ad.AnnData | None = None,
        *,
        groupby: str | None = None,
        group1: str | list[str] | None = None,
        group2: str | None = None,
        idx1=None,
        idx2=None,
        delta: float = 0.25,
        batch_correction: bool = True,
        batchid1: str | list[str] | None = None,
        batchid2: str | list[str] | None = None,
        fdr_target: float = 0.05,
        n_draws: int = 1000,
        max_cells: int = 2000,
        pseudocount: float | None = None,
        random_state: int = 0,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Differential expression between groups of cells, from the decoded (denoised) expression.

        For each group, draws of its mean normalised expression combine a Bayesian bootstrap over its
        cells, posterior draws of each cell's latent code and the likelihood's counting noise, plus a
        weak prior: four pseudo-cells drawn from both groups together and scaled to the group's own mean,
        which give a group of a few cells the spread between cells it cannot show, so that it does not look
        certain, and leave its mean where its cells put it. The log2 fold change of two groups' means (with a small pseudocount)
        then has a posterior, and a gene is differentially expressed when ``|log2 fold change| > delta``.
        A difference is found with more certainty the more cells and counts support it. The fold changes
        are shrunk by a prior learnt from all genes of the comparison (adaptive shrinkage: most genes
        change little, so a gene measured too poorly to tell is not called; groups of fewer than 10 cells get their
        fold changes shrunk strongly, with a warning: compare ``expression1`` with ``expression2`` there; their genes
        with about a count or less expected can be called down on the decoding alone). On simulated
        data with known truth the realised false discovery rate, averaged over 10–20 datasets, was 2.3–6.1% at the 5% target, but
        8–10% with ~400 cells per group in one batch at ``delta=0.25``, where the genes a comparison leaves unchanged
        share a common shift near ``delta`` (compared as shares of each cell's counts) that the prior, centred at no change,
        does not expect (``benchmarks/README.md``, "Differential expression"). The uncertainty is
        the model's: it does not cover errors of the decoder itself, so an undertrained model can call genes that do not differ
        (train with the default epochs), or, stopped far sooner, find every difference small and call few (a warning
        says so where its first fit, or a query model's reference's, stopped under a quarter of the default epochs, its
        loss still falling), and a change the latent space does not separate (a modest effect inside one cell type whose
        cells of both groups overlap there) is shrunk towards no change; compare
        ``raw_normalized_mean1``/``raw_normalized_mean2`` there. ``expected_fdr`` belongs to the list
        down to a gene, not to the gene alone: a called gene may have ``proba_de`` well below 0.95.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        groupby
            ``obs`` column of group labels (e.g. clusters or cell types). Cells without a label (NaN)
            take no part.
        group1
            A group, or a list of groups each compared in turn (``group2`` among them is left out); ``None`` compares
            every group.
        group2
            The group to compare with; ``None`` (or ``"rest"``, where no group is called so) compares each group
            with all other labelled cells (``group2`` then reads ``"rest"``, or ``"<rest>"`` where a group is called
            "rest").
        idx1, idx2
            Instead of ``groupby``, as in scvi-tools: the cells of two groups to compare (obs names,
            positions, a boolean mask, or a condition on ``obs`` such as ``"cell_type == 'B cells'"``;
            they may not overlap). ``idx2=None`` compares with all other
            cells. The result's ``group1``/``group2`` read ``"idx1"``/``"idx2"`` (or ``"rest"``).
        delta
            Smallest |log2 fold change| of the means that counts as a difference (0.25: 19%).
        batch_correction
            Decode both groups under the same uniform mixture of the model's batches, so that groups
            drawn from different batches are compared without the batch effect. ``False`` decodes
            each cell with its own batch. Categorical and continuous covariates stay each cell's own (as in
            scvi-tools), so a covariate that differs between the groups (a chemistry nested in the batches,
            percent mito) still counts in the comparison. Where the two groups share no batch (e.g. conditions when the
            batches are samples, each of one condition), correction removes what the batch effects absorbed
            of their difference, and ``False`` counts the batch effects as differences: a warning
            says so (with either); train with a batch key that crosses the groups (donors).
        batchid1, batchid2
            As in scvi-tools: the model's batches (one or a list) under whose uniform mixture group 1 (group 2) is
            decoded, instead of all of them (``None``). Two lists that differ compare the groups as if measured in
            those batches, e.g. cells of one type as if under two protocols (the groups are still two sets of cells:
            split the type's cells in two; groups that share no batch get no
            warning: the batches' effects are part of the comparison). Needs ``batch_correction=True``.
        fdr_target
            Genes are called (``is_de``) while the posterior expected false discovery rate of the
            called list stays at or below this.
        n_draws
            Draws of each group's mean expression (at least 100).
        max_cells
            Cells of each group used for the draws (a random subset of larger groups; this makes
            the result for very large groups slightly conservative). The observed columns use all cells.
        pseudocount
            Added to the normalised expression (proportions summing to 1 per cell) before the log;
            ``None``: a hundredth of a count in a cell of median depth (over every labelled cell of ``groupby``, or
            the cells of ``idx1`` and ``idx2``, not only those of the two groups compared: the same two groups under
            another labelling get a slightly different pseudocount), so that genes barely expressed in both groups
            do not get large fold changes.
        random_state
            Seed of the cells, weights and latent draws.
        batch_size
            Latent codes decoded per forward pass (fewer where genes are many, as in the other outputs: at most
            2**21 values, e.g. 126 codes of 16,579 genes). The draws are taken from the stream in chunks of this
            size, so another ``batch_size`` gives other draws (results that differ by Monte Carlo noise).
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        pandas.DataFrame
            One row per gene and comparison (index: gene names), genes of each comparison ordered by
            ``proba_de`` and then by ``|lfc_mean|``. Columns: ``lfc_mean``, ``lfc_median``, ``lfc_std``,
            ``lfc_low``/``lfc_high`` (95% credible interval) of the log2 fold change group1/group2, shrunk
            (where few genes of the comparison change beyond their error, the prior learnt from them sits at no
            change, and every gene's interval is narrow around 0, narrower than its own error: the gene is not
            called, its change not measured; ``expression1``/``expression2`` keep the decoded means);
            ``proba_up``, ``proba_down``, ``proba_de`` (= P(|lfc| > delta)), ``proba_not_de``,
            ``bayes_factor`` (log odds of ``proba_de``, its draws counted with 1/2 added to each side, so at
            most log(2·n_draws + 1): 7.6 at 1,000 draws); ``expected_fdr`` (posterior expected false
            discovery rate of the list down to this gene) and ``is_de``; ``expression1``/``expression2``
            (decoded mean expression per 10,000 counts; with ``likelihood="zinb"`` the negative
            binomial's, while the fold change compares the means with zero-inflation);
            ``fraction_nonzero1``/``fraction_nonzero2`` and ``raw_normalized_mean1``/``raw_normalized_mean2``
            (observed: share of cells with a count, mean counts per 10,000 of the model's genes over the cells
            with counts); ``expected_counts`` (the counts that the group holding fewer counts, its cells drawn up to
            ``max_cells``, would hold of the gene at the higher of the two groups' levels, the likelihood's mean: under
            about 1 its own counts cannot tell a change, and a call rests on the model's decoding alone, mostly right
            but less reliable in groups of a few cells); ``group1``, ``group2`` and
            ``comparison`` (``"<group1> vs <group2>"``, as in scvi-tools). Genes of the model missing from
            ``adata`` (read as zeros) get no statistics (NaN, not called) and come last. Each comparison's
            draws depend on ``random_state``, its two groups (and their cells' order in ``adata``) and
            ``n_draws``, ``max_cells`` and ``batch_size``, not on the other comparisons requested. The draws
            are seeded by the groups' names (``idx1`` cells are named ``"idx1"``), so the same cells asked for
            by ``groupby`` and by ``idx1``, or under a renamed group, get other draws: results that differ within
            Monte Carlo error (B cells of Kang's 1,267-gene example: fold changes moved by up to 0.13, 8 of ~800
            calls changed; more ``n_draws`` narrow it).

        Notes
        -----
        The counting noise each draw adds comes from the likelihood's variance. A model with
        ``dispersion="gene-cell"`` fitted to read counts gives cells a tiny theta (huge overdispersion) where they have no
        count, and then calls far fewer genes; test with a model of one dispersion per gene (or batch).
        """
        _check_differential_arguments(delta, fdr_target, n_draws, max_cells, batch_size, pseudocount)
        random_state = data.check_seed(random_state)
        batch_correction = data.check_flag(batch_correction, "batch_correction")
        progress = data.check_flag(progress, "progress")
        decode_under = [
            self._decode_batches(batchid, name, batch_correction)
            for name, batchid in (("batchid1", batchid1), ("batchid2", batchid2))
        ]
        if idx1 is None and idx2 is not None:
            raise ValueError("idx2 needs idx1, the cells of the first group")
        if idx1 is not None and not (groupby is None and group1 is None and group2 is None):
            raise ValueError("compare groups of obs[groupby] (groupby, group1, group2) or sets of cells (idx1, idx2), not both")
        if idx1 is None and groupby is None:
            raise ValueError("pass groupby=... (an obs column of groups), or idx1=... (and idx2=...) to compare sets of cells")
        own_copy = adata is None and self._is_mapped_query(self.adata) and self._query_copied  # map_query's copy
        adata = self._resolve(adata)
        if idx1 is None:
            try:
                labels, names = differential.group_labels(adata, groupby)
            except KeyError as error:
                if not own_copy:
                    raise
                raise KeyError(
                    f"{error.args[0]}: a model from map_query reads its copy of the query, made when it was mapped; if "
                    "the column was added to the query since (e.g. transferred labels), pass adata=query"
                ) from None
            source = f"obs[{groupby!r}]"
            if isinstance(group2, str) and group2 == differential.REST and group2 not in names:
                group2 = None  # all other cells, as tl.rank_genes_groups' (and scanpy's) reference="rest"
        else:
            labels, names = differential.cell_set_labels(adata, idx1, idx2)
            group1, group2, source = "idx1", None if idx2 is None else "idx2", "idx1/idx2"
        comparisons = differential.comparisons(labels, names, source, group1, group2)
        _warn_if_trained_briefly(self)  # (once the groups are known to be right)
        loader, _ = self._loader(adata, self.device)
        counted = loader.library > 0
        labelled = labels.notna().to_numpy()
        # groups that share no batch are told of, with correction or without (each cell decoded in its own batch: the
        # batch effects are counted as differences); not where batchid1 != batchid2 chose the batches' effects apart
        tell_separate = bool(self.config.batch_key) and (not batch_correction or np.array_equal(decode_under[0], decode_under[1]))
        # Each comparison draws from its own generator, so its result does not depend on the others requested.
        generators = [
            np.random.default_rng(differential.comparison_seed(random_state, name1, name2, group2 is None))
            for name1, name2, _, _ in comparisons
        ]
        # picked: the cells (with counts, at most max_cells) whose draws stand for each group
        picked, compared = _picked_groups(comparisons, generators, labelled, counted, group2 is None, source, max_cells)
        separate = []  # comparisons of groups that share no batch
        for name1, name2, cells1, cells2 in comparisons if tell_separate else []:
            batches2 = loader.batch_index[differential.second_group(labelled, cells1, cells2)]
            if not np.isin(batches2, np.unique(loader.batch_index[cells1])).any():
                separate.append(f"{name1} vs {name2}")
        if separate:
            differential.warn_groups_share_no_batch(separate, self.config.batch_key, batch_correction)
        if pseudocount is None:
            depths = loader.library[labelled & counted]
            pseudocount = 0.01 / float(np.median(depths))
        observed = differential.observed_by_group(loader, labels.where(compared), batch_size, progress)
        measured = np.ones(self.config.n_genes, dtype=bool) if loader.gene_columns is None else loader.gene_columns >= 0
        encoded = np.unique(np.concatenate([np.concatenate(pair) for pair in picked]))
        n_batches = len(self.config.batch_categories)
        frames = []
        with diagnostics.evaluation(self.module, random_state), torch.no_grad():
            mean, scale = self._posterior_parameters(loader, encoded, batch_size)

            def cells_of(cells: np.ndarray, batches: np.ndarray | None) -> differential.Cells:
                rows = torch.from_numpy(np.searchsorted(encoded, cells)).to(self.device)
                return differential.Cells(
                    mean[rows], scale[rows], loader.covariates[cells], loader.batch_index[cells], loader.library[cells],
                    n_batches, batches,
                )  # fmt: skip

            comparing = zip(comparisons, picked, generators)
            decoded_per_pass = loader.evaluation_batch_size(batch_size)  # (all genes: 1,024 × 16,579 decoded took 0.5 GB)
            bar = progress_bar(len(comparisons), "differential_expression", progress, unit=" comparisons", iterable=comparing)
            for (name1, name2, cells1, cells2), pair, rng in bar:
                both = np.concatenate(pair)  # the prior's pseudo-cells, decoded as the group they join
                draws = [
                    differential.group_mean_draws(
                        self.module, cells_of(cells, batches), cells_of(both, batches), n_draws, rng, decoded_per_pass
                    )
                    for cells, batches in zip(pair, decode_under)
                ]
                frame = differential.compare(draws[0], draws[1], float(delta), float(pseudocount), measured, rng)
                frame.loc[~measured, :] = np.nan  # genes the data lack (read as zeros) say nothing
                frame["expected_fdr"] = np.nan
                frame.loc[measured, "expected_fdr"] = differential.expected_fdr(frame["proba_de"].to_numpy()[measured])
                frame["is_de"] = frame["expected_fdr"] <= round(fdr_target, 12)  # as expected_fdr is rounded
                for suffix, cells in (("1", cells1), ("2", differential.second_group(labelled, cells1, cells2))):
                    nonzero, normalized = observed(cells)
                    frame["fraction_nonzero" + suffix] = np.where(measured, nonzero, np.nan)
                    frame["raw_normalized_mean" + suffix] = np.where(measured, normalized, np.nan)
                # what the group of fewer counts can tell from its own: its counts of the gene at the higher of the two
                # levels (the likelihood's mean: with zero-inflation, that of the draws with counting noise)
                exposure = min(float(loader.library[cells].sum()) for cells in pair)
                level = 1 if self.config.likelihood == "zinb" else 0  # (else the decoded means, expression1/2)
                higher = torch.maximum(*(pair_draws[level].float().nanmean(0) for pair_draws in draws)).cpu().numpy()
                frame["expected_counts"] = np.where(measured, exposure * higher, np.nan)
                frame["group1"], frame["group2"] = name1, name2
                frame["comparison"] = f"{name1} vs {name2}"
                frame.index = pd.Index(self.config.gene_names, name="gene")
                order = np.lexsort((-frame["lfc_mean"].abs().to_numpy(), -frame["proba_de"].to_numpy()))
                frames.append(frame.iloc[order])
        return pd.concat(frames)

    def _posterior_parameters(self, loader: data.CellLoader, cells: np.ndarray, batch_size: int):
        """q(z|x)'s mean and scale parameters of ``cells`` (sorted), on the model's device."""
        means, scales = [], []
        for mb in loader.batches(cells, loader.evaluation_batch_size(batch_size)):
            q = self.module.inference(mb.counts, mb.covariates, sample=False)
            means.append(q["mean"])
            scales.append(q["scale"])
        return torch.cat(means), torch.cat(scales)

    # ------------------------------------------------------------------ persistence

    @advise_on_foreign_arguments
    def save(self, path: str | os.PathLike, *, overwrite: bool = False, save_anndata: bool = False) -> None:
        """Write ``config.json``, ``model.safetensors`` (with :attr:`train_settings` in its metadata) and
        ``history.json`` into directory ``path``.

        Parameters
        ----------
        path
            The model's folder; its parent folders are created.
        overwrite
            Replace an existing ``path``; otherwise a ``FileExistsError`` is raised (an empty folder, made
            ahead, is filled without it, keeping its permissions). An ``adata.h5ad`` the
            folder holds is kept where it is this model's (the model was loaded from or saved to this folder
            while it held that very file, or reads its counts from it), unless ``save_anndata`` replaces it;
            saving another model over the folder removes it, with a warning.
        save_anndata
            Also write the model's AnnData (in memory) as ``adata.h5ad``, which :meth:`load` then reads when
            given no ``adata``. Your AnnData is left as it is (string columns are not turned into categoricals).

        Notes
        -----
        The files are written to a temporary directory first and moved into place at the end,
        so an interrupted save never leaves a half-written model (a folder made ahead and left empty, a mount point,
        the working directory, a folder whose parent cannot be written, or one whose adata.h5ad, this model's own, is
        mounted or on another mount, is kept and written into, file by file: a save stopped midway leaves it without
        config.json, which load and save refuse, saying so). An adata.h5ad mounted on its own (``docker -v``) that
        the save would replace or remove is refused before any change. A model
        trained data-parallel (torchrun) is written by rank 0 only: the ranks hold the same model, and the others
        return at once, without waiting for it (call ``torch.distributed.barrier()`` before reading the folder on
        every rank).
        """
        overwrite = data.check_flag(overwrite, "overwrite")
        save_anndata = data.check_flag(save_anndata, "save_anndata")
        if save_anndata:
            self._check_anndata_can_be_saved()
        if (self._data_parallel_rank or 0) > 0:  # (the group may have been destroyed since: its rank is kept)
            return
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"save needs a folder path for the model, e.g. 'my_model/', got {path!r}")
        path = Path(path).expanduser()
        if path.resolve().name in ("", ".", "..") or path.name in ("", ".", ".."):
            raise ValueError(f"save needs a folder name for the model, e.g. 'my_model/', got {str(path)!r}")
        saved_data = path / ADATA_FILE
        known = self._folders.get(path.resolve())
        kept_here = known is not None and known == _file_identity(saved_data)  # (loaded from there, or saved there with it)
        own_folder = kept_here or self._reads_backed(saved_data)
        if (path.exists() or path.is_symlink()) and not is_empty_folder(path):  # (an empty one, made ahead, is taken)
            if not overwrite:
                raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
            what = why_not_a_model_folder(path)
            # the data this model was loaded from or saved with there, alone: a stopped save's folder, emptied but for
            # a mounted adata.h5ad (not a file the model merely reads backed: a user's data folder is no model's)
            only_own_data = kept_here and not path.is_symlink() and {p.name for p in path.iterdir()} <= {ADATA_FILE, ".DS_Store"}
            if what is not None and not only_own_data:
                raise ValueError(
                    f"{path} exists and is {what}, not a saved cellvae model folder; overwrite=True replaces only a "
                    "folder written by CellVAE.save: choose a new path, or empty or remove it yourself"
                    + (" (or save to the folder the link points to)" if path.is_symlink() else "")
                )
        path.parent.mkdir(parents=True, exist_ok=True)
        if saved_data.is_file() and (save_anndata or not own_folder) and is_mounted_file(saved_data):
            raise OSError(
                f"{saved_data} is mounted on its own (e.g. docker -v FILE:{saved_data}), so this save cannot "
                f"{'replace' if save_anndata else 'remove'} it: save the model to another folder, or unmount the file first"
            )
        in_place = saves_in_place(path)  # (the files are then made inside it, on its file system)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path if in_place else path.parent))
        dropped = not save_anndata and not own_folder and saved_data.is_file()
        beside, data_left = staging, False  # (data_left: the folder's adata.h5ad stays as it is, where written in place)
        try:
            if save_anndata:
                self._write_anndata(staging / ADATA_FILE)
            elif own_folder and saved_data.is_file():  # loaded from this folder, trained further, saved back
                staging, data_left = _staged_with_own_data(staging, path)
                in_place = in_place or data_left
            # the cellvae that wrote the file (a model loaded from an older one may hold fields that one does not know)
            replace(self.config, cellvae_version=CELLVAE_VERSION).to_json(staging / CONFIG_FILE)
            (staging / WEIGHTS_FILE).write_bytes(self._weights_file())
            (staging / HISTORY_FILE).write_text(_history_json(self.history))
            _make_durable_and_shareable(staging)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(beside, ignore_errors=True)
            if isinstance(error, OSError) and error.errno is not None and error.filename is None:  # a full disk: where?
                raise OSError(
                    error.errno, f"could not save the model in {path}: {error.strerror}; nothing there changed"
                ) from error
            raise
        previous = None
        try:
            if beside != staging:  # (left beside the folder when its files are made inside it)
                shutil.rmtree(beside, ignore_errors=True)
            if not in_place and path.exists():  # the old model moved aside before the new one is renamed in
                previous = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                try:
                    os.replace(path, previous / path.name)
                except OSError as error:  # a bind mount (not told by os.path.ismount) cannot be renamed: filled
                    if error.errno not in (errno.EBUSY, errno.EXDEV):
                        raise
                    previous.rmdir()
                    previous, in_place = None, True
                    # copied inside first (a full disk leaves the old model whole), the folder's own adata.h5ad linked
                    staging = _staged_inside(staging, path, keep_data=own_folder and not save_anndata)
            if in_place:
                _move_files_in(staging, path, keep_data=data_left)
            else:
                os.replace(staging, path)
        except BaseException:  # Ctrl-C between the two renames too: the old model goes back in place
            if previous is not None and (previous / path.name).exists() and not path.exists():
                os.replace(previous / path.name, path)  # put the old model back
            for folder in (staging, previous):
                if folder is not None:
                    shutil.rmtree(folder, ignore_errors=True)
            raise
        if previous is not None:
            # Renamed before deleting, so a save killed mid-deletion leaves no partial model under the
            # set-aside name: whatever ``.{name}.old.*/{name}`` holds is a complete previous model.
            os.replace(previous / path.name, previous / ".deleting")
            shutil.rmtree(previous, ignore_errors=True)
        self._folders[path.resolve()] = _file_identity(saved_data)
        left = _left_by_interrupted_saves(path)
        if left:
            data.warn_user(
                f"beside {path}, {', '.join(left[:3])}{' and more' if len(left) > 3 else ''} hold what saves into it "
                "that were killed left (a model each, whole or in part; a save into it running now writes there too): "
                "remove them once no save into it runs",
                UserWarning,
            )
        if dropped:
            data.warn_user(
                f"the {ADATA_FILE} that {path} held, saved with the model this one replaced, was removed with it (this "
                "model was not loaded from that folder with that file, nor saved there with it); save_anndata=True writes "
                "this model's AnnData",
                UserWarning,
            )

    def _weights_file(self) -> bytes:
        """The safetensors file of the weights, with the metadata :meth:`load` checks them by and tells the user of
        (whether and how the model was trained, checksums of the weights and of the genes and batches they are for)."""
        # float32, as load expects them (a module cast with .double() or .half() would save weights it refuses)
        state = {k: _as_saved(v) for k, v in self.module.state_dict().items()}
        metadata = {
            "format": "cellvae",
            "trained": str(self.is_trained).lower(),
            "interrupted": str(bool(self.history.attrs.get("interrupted"))).lower(),
            "still_improving": str(bool(self.history.attrs.get("still_improving"))).lower(),
            # the epoch whose parameters these are ("" where no epoch was kept or the history predates it)
            "best_epoch": str(self.history.attrs.get("best_epoch", "")),
            # how many data-parallel processes trained it ("" for one), each on minibatches of batch_size cells
            "processes": str(self.history.attrs.get("processes", "")),
            "sha256": tensors_digest(state),  # load checks it: a damaged file is refused, not used
            # and this: weights copied into another model's folder (the same shapes, other genes) are refused
            "layout_sha256": _layout_digest(self.config),
        }
        if self.history.attrs.get("brief_training"):  # a first fit stopped far short of its default epochs
            metadata["brief_training"] = self.history.attrs["brief_training"]  # (differential_expression tells it)
        if self.train_settings is not None:  # how it was trained, for whoever loads it (not used to train); progress
            # always True, whether or not a bar showed, so that the same weights save to the same bytes (older
            # cellvae needs the entry)
            metadata["train_settings"] = asdict(self.train_settings) | {"progress": True}
        # one metadata entry: safetensors writes several in an order that varies from save to save, so the
        # same model's file would differ byte for byte
        metadata = {METADATA_KEY: json.dumps(metadata, sort_keys=True)}
        return safetensors_bytes(state, metadata=metadata)

    @classmethod
    @advise_on_foreign_arguments
    def load(cls, path: str | os.PathLike, adata: ad.AnnData | None = None, *, load_anndata: bool = True) -> CellVAE:
        """Load a model saved by :meth:`save`; reads only JSON and safetensors, never unpickles.

        Parameters
        ----------
        path
            The folder written by :meth:`save`.
        adata
            (Also second positional, as in scvi-tools' ``load(dir_path, adata)``.) Becomes the default data of
            :meth:`get_latent`, :meth:`fit` and the other methods
            (genes matched by name; :meth:`fit` needs all of the model's); ``None``: the ``adata.h5ad`` that
            ``save(save_anndata=True)`` wrote, read into memory, or where there is none, pass an AnnData to each call.
        load_anndata
            ``False`` leaves that ``adata.h5ad`` unread: the weights alone, to embed other cells without
            reading (and holding) the training data.

        Returns
        -------
        The model, on the CPU, trained if it was when saved (with a warning where Ctrl-C had stopped its
        training). Weights that fail the checksum written by :meth:`save` are refused.
        """
        load_anndata = data.check_flag(load_anndata, "load_anndata")
        if adata is not None:
            data.check_nonempty_anndata(adata)
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"load needs the folder a model was saved in, e.g. 'my_model/', got {path!r:.60}")
        path = Path(path).expanduser()
        _refuse_unless_model_folder(path)
        config = Config.from_json(path / CONFIG_FILE)
        weights = path / WEIGHTS_FILE
        state, metadata = _read_weights(weights, config)
        model = cls.__new__(cls)
        model._setup(config, None)
        model._folders[path.resolve()] = _file_identity(path / ADATA_FILE)
        model.module.load_state_dict(state)
        model.history = _read_history(path / HISTORY_FILE)
        model.is_trained = metadata.get("trained", "true") != "false"  # older files: trained
        if "train_settings" in metadata:
            model.train_settings = _train_settings(metadata["train_settings"], weights)
            if model.train_settings.beta != config.beta:  # (fit takes it from the config: another model's weights?)
                data.warn_user(
                    f"{weights} was trained with beta={model.train_settings.beta:g}, but {CONFIG_FILE} says "
                    f"beta={config.beta:g}: were the weights copied from another model's folder? Further training would "
                    f"use {CONFIG_FILE}'s; keep each model's files together",
                    UserWarning,
                )
        best_epoch = metadata.get("best_epoch", "")
        epochs = {e for e in model.history["epoch"].tolist() if isinstance(e, int)} if "epoch" in model.history else set()
        if isinstance(best_epoch, str) and best_epoch.isdecimal() and int(best_epoch) in epochs:  # (else: no such epoch)
            model.history.attrs["best_epoch"] = int(best_epoch)
        processes = metadata.get("processes", "")
        if isinstance(processes, str) and processes.isdecimal() and int(processes) > 1:
            model.history.attrs["processes"] = int(processes)
        if "still_improving" in metadata:  # (older cellvae did not record it)
            model.history.attrs["still_improving"] = metadata["still_improving"] == "true"
        brief = metadata.get("brief_training")  # (an entry edited by hand into other values is left out)
        counts = ("epochs", "default_epochs", "cells")
        if (
            isinstance(brief, dict)
            and brief.keys() == {*counts, "interrupted"}
            and all(type(brief[key]) is int and brief[key] > 0 for key in counts)
            and isinstance(brief["interrupted"], bool)
        ):
            model.history.attrs["brief_training"] = brief
        if metadata.get("interrupted") == "true":
            model.history.attrs["interrupted"] = True
            data.warn_user(
                f"the model in {path} was saved after Ctrl-C stopped its training at epoch {len(model.history)}; "
                "train it further with model.fit(...) (or fit again with checkpoints and resume=True)",
                UserWarning,
            )
        from_folder = adata is None and load_anndata and (path / ADATA_FILE).is_file()
        if from_folder:
            try:
                adata = ad.read_h5ad(path / ADATA_FILE)
            except (OSError, KeyError, ValueError) as error:
                raise ValueError(
                    f"{path / ADATA_FILE}, the AnnData saved with the model, cannot be read ({error}); load the model "
                    "without it, CellVAE.load(path, load_anndata=False), and pass your AnnData"
                ) from error
        if adata is not None:
            model.adata = adata
            try:
                model._loader(adata, model.device)
            except (ValueError, KeyError) as error:
                if not from_folder:
                    raise
                told = error.args[0] if error.args else error  # (str() of a KeyError is its message quoted again)
                raise ValueError(
                    f"{path / ADATA_FILE}, the AnnData saved with the model, does not fit it: {told}. Load the model "
                    "without it, CellVAE.load(path, load_anndata=False), and pass your AnnData with adata=..."
                ) from error
        return model

    def _reads_backed(self, file: Path) -> bool:
        """Whether the model's AnnData is ``file`` read backed (the folders it was loaded from or saved to are told
        apart by the identity of their file, ``_folders``: another model's data written there since is not its own)."""
        if self.adata is None or not self.adata.isbacked or not file.is_file():
            return False
        return Path(self.adata.filename).resolve() == file.resolve()

    def _write_anndata(self, file: Path) -> None:
        """``save_anndata``'s file, with anndata's own error put in terms of the option."""
        try:
            # pandas string columns (read from files of anndata 0.13 with pandas 3) are written as they are
            with ad.settings.override(allow_write_nullable_strings=True):
                self._own_adata().write_h5ad(file, convert_strings_to_categoricals=False)  # (obs columns added since)
        except Exception as error:
            raise ValueError(
                f"save_anndata=True could not write the model's AnnData as {ADATA_FILE} ({type(error).__name__}: {error}); "
                "anndata cannot store something in its obs, var, obsm, layers or uns (e.g. a dict with non-string "
                "keys): remove or convert it, or save without save_anndata and keep your data file yourself"
            ) from error

    def _reads_from_disk(self) -> bool:
        """Whether the model's AnnData is backed, or its counts a matrix read lazily from a file."""
        if self.adata.isbacked:
            return True
        try:
            return data.is_backed_matrix(data.count_matrix(self.adata, self.config.layer))
        except (KeyError, ValueError):  # no counts where the model reads them (X set to None, a layer deleted)
            return False

    def _check_anndata_can_be_saved(self) -> None:
        """Refuse ``save(save_anndata=True)`` before anything is written where there is no AnnData in memory to save."""
        if self.adata is None:
            raise ValueError(
                "save_anndata=True needs the model's AnnData, and this model has none (loaded without adata=): "
                "pass the data to CellVAE.load(path, adata=adata), or save without save_anndata"
            )
        if self.adata.is_view:
            try:  # a view of an AnnData changed since: told so before anything is written
                data.view_positions(self.adata)
            except ValueError as error:
                raise ValueError(f"{error}; or save the model without save_anndata=True") from None
        if self._reads_from_disk():
            where = f" in {self.adata.filename}" if self.adata.isbacked else ""
            batches = ""
            if self.config.batch_key:  # a query mapped from another column has its batches in this one only
                batches = f", with obs[{self.config.batch_key!r}] holding each cell's batch as the model's AnnData does now"
            view = ""
            if self.adata.is_view:  # the whole file would give outputs for other cells
                view = (
                    f" and viewed as now (this model's AnnData is a view of {self.adata.n_obs:,} cells and "
                    f"{self.adata.n_vars:,} genes: take the same adata[cells, genes])"
                )
            raise ValueError(
                f"save_anndata=True writes an AnnData held in memory; this model's counts are read from disk{where}, "
                "so they are saved already: save without save_anndata and load with CellVAE.load(path, adata=...) "
                f"of the file read again{view}{batches}. Results written into the AnnData since it was read (obsm, uns, "
                "obs) are in memory only, not in that file: keep them with adata.write_h5ad('with_results.h5ad')"
            )
        genes = pd.Index(self.config.gene_names)
        present = genes.isin(self.adata.var_names)
        if present.mean() < MIN_QUERY_GENE_FRACTION:  # CellVAE.load(path) would refuse the file written
            raise ValueError(
                f"save_anndata=True writes the model's AnnData, but only {int(present.sum())} of the model's "
                f"{len(genes)} genes are in its var_names now (missing e.g. {genes[~present][:5].tolist()}: renamed or "
                "removed since the model was built?), so the model could not be loaded with it: put the model's gene "
                "names back, or save without save_anndata"
            )

    # ------------------------------------------------------------------ reference mapping

    @advise_on_foreign_arguments
    def map_query(
        self,
        query_adata: ad.AnnData,
        *,
        batch_key: str | None = None,
        train_input_layer: bool = False,
        max_epochs: int | None = None,
        batch_size: int = 128,
        lr: float = DEFAULT_LR,
        validation_size: float = 0.1,
        patience: int = 10,
        random_state: int = 0,
        device: str | torch.device = "auto",
        progress: bool = True,
    ) -> CellVAE:
        """Map query cells onto this (reference) model by architecture surgery; returns a new model.

        Query batches unseen by the reference get new one-hot columns in every covariate-fed
        layer (and new rows of a ``"gene-batch"`` dispersion), and so do new categories of the
        reference's categorical covariates (e.g. a new kit or protocol; this needs a reference trained
        with ``batch_key``); only these new parameters
        are trained, every reference weight stays frozen, so the query lands in the reference's
        latent space and reference cells embed as before (to float rounding, ~1e-6: the encoder's first matrix
        multiply is wider by the new batches' columns, zero for reference cells, which reorders its sums).
        ``query_model.fit(...)`` trains the mapping further the same way (as scVI's ``train`` on a query model);
        a reference's ``batch_mmd`` penalty applies among the query's batches while mapping too. A reference trained with
        ``encode_batch=False`` has no batch input in its encoder: the query is then embedded by the
        frozen encoder and mapping only fits the decoder's new columns (used by decoded expression).

        Parameters
        ----------
        query_adata
            Query cells with raw counts in the same place (``X`` or the reference's layer). Genes
            are matched by name: genes the reference lacks are dropped, reference genes missing
            from the query are zero-filled with a warning, and fewer than 80% present is an error.
            The query is only read, never modified. Counts on disk (``X`` of ``read_h5ad(path, backed="r")``,
            which reads layers into memory; ``X`` or a layer of :func:`cellvae.read_h5ad_lazy` or
            :func:`cellvae.read_zarr_lazy`), or a view of them, are streamed, not copied (a view must hold its batches
            in the reference's batch key); streamed cells are shuffled in blocks, so such a mapping is equally good but
            not bitwise equal to that of the same counts in memory. Cells with zero total counts are left out of
            mapping with a warning (as in :meth:`fit`; :meth:`get_latent` still embeds them). A new batch
            or category's parameters learn from its own cells alone: one of under 10 cells with counts maps, with a
            warning that so few place it less surely.
        batch_key
            ``obs`` column of the query's batches; ``None`` uses the reference's batch key. A query
            batch whose name is already a reference batch is treated as that reference batch
            (with a warning): its cells use the frozen reference parameters. The returned model reads
            batches from the reference's batch key, so to embed the query with ``get_latent(query)``
            give it that column too (``query_model.get_latent()`` embeds the aligned copy as is).
            Batch names are compared as text: an integer column's 1016 is ``"1016"``, a float
            column's 1016.0 is ``"1016.0"``, so give the query's column the type of the reference's (a
            query whose 1016.0 stands for the reference's 1016, or 1016 for its 1016.0, is refused with that advice).
        train_input_layer
            Also train the encoder's first layer (all of it). Reference cells then embed differently
            (in the four benchmark datasets they moved by 22–56% of the embedding's mean norm): re-embed
            them with the returned model and recompute neighbours and UMAP of reference and query
            together. Use it when the query is a perturbation of the reference (stimulated vs control
            cells): in the benchmark it lifted label transfer there from 0.71 to 0.85 (3 seeds, against
            the re-embedded reference; 0.80 against the old reference embedding), and was as good or
            better on the other datasets.
            A reference built with ``normalization="batch"`` maps such a query at 0.81 with
            everything frozen (0.84 with this option too), but integrates worse.
        max_epochs
            Epochs over the query; ``None`` picks about 200,000 cell passes, between 5 and 200 epochs.
        batch_size, lr, validation_size, random_state, device, progress
            As in :meth:`fit` (no weight decay, so frozen weights stay bit-identical).
        patience
            Early stopping on the query's validation loss after this many epochs without
            improvement (default 10, fewer than :meth:`fit`'s 20).

        Returns
        -------
        The query model: its config lists the reference batches followed by the new ones, it
        holds the query as ``query_model.adata`` (so ``query_model.get_latent()`` embeds it: a new AnnData of
        the query's genes that the reference has, so outputs without ``adata=`` come in the query's gene order
        where it holds just the model's genes (as outputs for the query itself do), else in the model's order
        (``config.gene_names``; with a warning where the query lacks some); its
        counts are the query's own matrix, not copied, where it is CSR or dense and its columns are those genes in
        that order, else an aligned copy; or the counts left on disk, which must stay open; and a copy of the query's ``obs`` as
        it was: pass ``adata=query`` to read columns added since; a view of counts on disk is held itself, all its
        genes and its own ``obs``) and embeds reference cells too. Save and load
        it like any model. Where the matrix is shared (as a model built on your AnnData reads it), counts
        changed in place afterwards (``sc.pp.downsample_counts``, ``normalize_total``) change what the query
        model reads: pass ``query_adata.copy()`` to keep them apart. Its outputs run where the
        reference's do (:meth:`to_device`), whatever ``device`` it trained on.
        """
        if not self.is_trained:
            raise ValueError("map_query needs a trained reference model; call model.fit() first")
        self._check_float32()  # (the query model is built in float32: grafting a cast reference's weights failed)
        if not self.config.batch_key:
            covariates = self.config.categorical_covariate_keys
            also = f" (query cells of categories of {covariates} it was not trained with need such a model)" if covariates else ""
            raise ValueError(
                "the reference model was trained without batch_key, so it has no batch parameters to extend; "
                f"embed the query directly with model.get_latent(query_adata), or retrain with batch_key=...{also}"
            )
        # BatchNorm keeps the reference's statistics while mapping, so any batch size works
        max_epochs, batch_size, lr, validation_size, patience, random_state = map(
            data.native, (max_epochs, batch_size, lr, validation_size, patience, random_state)
        )
        _check_training(max_epochs, batch_size, lr, validation_size, patience, random_state, normalization=None)
        _warn_if_mmd_sees_one_cell(self.config, batch_size)
        progress = data.check_flag(progress, "progress")
        train_input_layer = data.check_flag(train_input_layer, "train_input_layer")
        training_device = pick_device(device)
        data.check_nonempty_anndata(query_adata, "query_adata")
        data.check_one_name(batch_key, "batch_key")
        covariates = self.config.categorical_covariate_keys + self.config.continuous_covariate_keys
        missing = [key for key in covariates if key not in query_adata.obs.columns]
        if missing:  # before the counts are read and copied
            raise KeyError(f"obs columns {missing} (covariates of the reference) not found in query_adata.obs; add them")
        query_batches = _query_batches(query_adata, batch_key or self.config.batch_key)
        reference_key = self.config.batch_key
        with data.hint_where_counts_are(query_adata, self.config.layer, trained=True):
            aligned = _align_query(
                query_adata,
                self.config,
                query_batches,
                functools.partial(self._typical_share, reference_only=False),  # (the returned model's reference categories)
                batch_key or self.config.batch_key,
            )
        names = list(pd.unique(query_batches))  # the query's batches against each other (the reference's counts are gone)
        codes = pd.Categorical(query_batches, categories=names).codes
        location = "query_adata." + data.counts_location(self.config.layer).removeprefix("adata.")
        data.warn_about_unmeasured_genes(
            _model_counts(aligned, self.config.layer, "query_adata"), location, codes, names, batch_key or reference_key
        )
        if batch_key not in (None, reference_key) and reference_key in query_adata.obs.columns:
            if not np.array_equal(data.cell_texts(query_adata.obs[reference_key]), query_batches):
                data.warn_user(
                    f"the query's batches are read from obs[{batch_key!r}], but the returned model reads batches from "
                    f"obs[{reference_key!r}] (the reference's batch key), which this query also has with other values: "
                    f"query_model.get_latent(query_adata) would embed with those. Use query_model.get_latent() (the "
                    f"aligned copy), or set query_adata.obs[{reference_key!r}] = query_adata.obs[{batch_key!r}] first",
                    UserWarning,
                )
        reference_batches = self.config.batch_categories
        batch_column = batch_key or reference_key
        new_batches, categories = _new_query_categories(self.config, query_adata, aligned, query_batches, batch_column)
        config = Config(
            **{
                **asdict(self.config),
                "batch_categories": reference_batches + new_batches,
                "categorical_covariate_categories": categories,
                "reference_categories": {reference_key: len(reference_batches)}
                | {key: len(known) for key, known in self.config.categorical_covariate_categories.items()},
                "train_input_layer": train_input_layer,
            }
        )
        query_model = CellVAE.__new__(CellVAE)
        query_model._setup(config, aligned)
        query_model._mapped_query = weakref.ref(aligned)
        query_model._query_copied = aligned is not query_adata  # (a view of counts on disk: the user's own)
        query_model.device = self.device  # its outputs run where the reference's do (to_device)
        _move(query_model.module, self.device)  # (grafted on one device)
        with missing_genes_told():  # validates the covariates before any work; trains the mapping below
            loader, cells = query_model._loader(aligned, training_device)
        _graft_reference(self.module, query_model.module)
        query_model.is_trained = True
        if not _query_parameters(query_model.module):  # (query_model.fit would refuse: nothing of it trains)
            data.warn_user(
                "map_query trained nothing: every query batch and covariate category is the reference's (and "
                "train_input_layer=False), so the query model embeds as the reference model does; embed the query with "
                "reference_model.get_latent(query_adata), or rename its batches to map them as new ones",
                UserWarning,
            )
            return _decoding_as(self, query_model)
        nonempty = cells[loader.library[cells] > 0]
        _warn_about_empty_cells(loader, cells, nonempty, config, "at zero, untrained", query_adata, "query_adata")
        _warn_about_equal_depths(loader.library[nonempty], location)
        cells = nonempty
        if not len(cells):
            raise ValueError("query_adata has no cells with counts: the new batches' parameters would have nothing to learn from")
        _warn_about_small_categories(query_model, loader.covariates.codes, cells, "map_query")
        train_cells, validation_cells = split_cells(cells, validation_size, random_state)
        _check_cells_left_to_train(train_cells, cells, validation_size)
        # every new batch and new covariate category gets training cells, or its parameters stay at zero
        train_cells, validation_cells = train_every_category(train_cells, validation_cells, loader.covariates.codes)
        epochs = max_epochs or default_query_epochs(len(cells))
        settings = TrainSettings(
            max_epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            weight_decay=0.0,
            kl_warmup_epochs=0,
            beta=float(self.config.beta),
            early_stopping=True,
            patience=patience,
            random_state=random_state,
            progress=progress,
        )
        _move(query_model.module, loader.device)
        # as in fit: a mapping that leaves the query's loss worse than the untrained mapping's is undone, with a warning
        probe = (validation_cells if len(validation_cells) else train_cells)[:DIVERGENCE_PROBE_CELLS]
        before = {k: v.detach().clone() for k, v in query_model.module.state_dict().items()}
        try:
            start_loss = query_model._mean_loss(loader, probe, batch_size, random_state)
            with _reference_frozen(query_model.module):
                # trained in this process alone: under torchrun a script may map a query on one rank only
                query_model.history = train(
                    query_model.module,
                    loader,
                    train_cells,
                    validation_cells,
                    settings,
                    data_parallel=False,
                    diverged_above=DIVERGED_LOSS_RATIO * start_loss,
                )
            query_model.train_settings = settings
            query_model.train_indices, query_model.validation_indices = np.sort(train_cells), np.sort(validation_cells)
            query_model._split_obs_names = query_model.adata.obs_names
            end_loss = query_model._mean_loss(loader, probe, batch_size, random_state)
            if not end_loss <= FURTHER_TRAINING_TOLERANCE * start_loss:  # NaN too
                query_model.module.load_state_dict(before)  # unmapped: no record of a mapping
                query_model.history, query_model.train_settings = pd.DataFrame(), None
                query_model.train_indices = query_model.validation_indices = None
                smaller = DEFAULT_LR if lr > DEFAULT_LR else lr / 10
                data.warn_user(
                    f"mapping made the query model worse: its loss on {len(probe):,} "
                    f"{'held-out' if len(validation_cells) else 'training'} query cells is {end_loss:.4g} nats per "
                    f"cell, against {start_loss:.4g} before mapping, most likely from too large a learning rate "
                    f"(lr={lr:g}). The query model is given back unmapped (its new batches at their initial "
                    f"parameters): map again with a smaller one, e.g. map_query(query_adata, lr={smaller:g})"
                    f"{', the default' if smaller == DEFAULT_LR else ''}",
                    RuntimeWarning,
                )
            elif lr > DEFAULT_LR:  # (a reference collapsed already was told so by its own fit)
                query_model._warn_if_collapsed(loader, train_cells[:5000], batch_size, random_state, lr)
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            _raise_out_of_memory(error, loader, batch_size, "map_query(query_adata, ")
        except KeyboardInterrupt:
            if not len(query_model.history):  # Ctrl-C before mapping's first epoch ended: nothing to give back
                loader.release_device()
                raise
            data.warn_user("Ctrl-C: the checks after mapping were skipped; the query model is mapped", RuntimeWarning)
        finally:
            _move(query_model.module, query_model.device)
        return _decoding_as(self, query_model)

    # ------------------------------------------------------------------ diagnostics and generation

    @advise_on_foreign_arguments
    def rate_distortion(
        self,
        adata: ad.AnnData | None = None,
        *,
        n_samples: int = 1,
        batch_size: int = 1024,
        random_state: int = 0,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Per-cell rate and distortion (nats), the two terms of the objective ``distortion + beta * rate``.

        Parameters
        ----------
        adata
            Cells to evaluate; ``None`` uses the model's AnnData.
        n_samples
            Posterior draws of z averaged in the distortion.
        batch_size, random_state
            Cells per forward pass; seed of the draws (a cell's draws depend also on the other cells passed with it
            and on ``batch_size``: per-cell values move within Monte Carlo error, means over many cells hardly).
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        DataFrame indexed by ``obs_names`` with ``rate`` = KL(q(z|x) ‖ p(z)), ``distortion`` =
        −E_q[log p(x|z)] (the full likelihood, including log x!) and ``elbo`` = −(distortion + rate).
        Their means over cells are the figures to quote.
        """
        data.check_positive_int(n_samples, "n_samples")
        random_state = data.check_seed(random_state)
        progress = data.check_flag(progress, "progress")
        adata = self._resolve(adata)
        loader, cells = self._scoring_loader(adata)
        with diagnostics.evaluation(self.module, random_state):
            terms = diagnostics.rate_distortion(
                self.module, loader, cells, n_samples=n_samples, batch_size=batch_size, progress=progress
            )
        frame = pd.DataFrame(terms, index=adata.obs_names.copy())
        frame["elbo"] = -(frame["rate"] + frame["distortion"])
        return frame

    def _scoring_loader(self, adata: ad.AnnData) -> tuple[data.CellLoader, np.ndarray]:
        """The loader of cells whose likelihood is scored: its warnings say what zero-filled genes and empty
        cells do to the scores."""
        token = _SCORING_LIKELIHOODS.set(True)
        try:
            loader, cells = self._loader(adata, self.device)
        finally:
            _SCORING_LIKELIHOODS.reset(token)
        _warn_about_scoring_empty_cells(loader, cells)
        return loader, cells

    def kl_per_dimension(self, adata: ad.AnnData | None = None, *, batch_size: int = 4096, progress: bool = True) -> np.ndarray:
        """Mean over cells of each latent dimension's KL(q(z_d|x) ‖ N(0, 1)) in nats.

        Dimensions near zero carry no information (posterior collapse). For ``posterior="full"``
        these are the marginal KLs; the rate also counts the correlations between dimensions.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        Array of length ``n_latent``.
        """
        return self._posterior_statistics(adata, batch_size, progress, "kl_per_dimension")[0]

    def active_units(
        self,
        adata: ad.AnnData | None = None,
        *,
        threshold: float = diagnostics.ACTIVITY_THRESHOLD,
        batch_size: int = 4096,
        progress: bool = True,
    ) -> int:
        """Number of latent dimensions whose posterior mean varies across cells.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        threshold
            A dimension is active when Cov_x(E_q[z_d]), the variance over cells of its posterior
            mean, exceeds this (0.01, as Burda et al., 2016).
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        The number of active dimensions, from 0 to ``n_latent`` (at least 2 cells are needed).
        """
        data.check_threshold(threshold)
        if adata is not None and getattr(adata, "n_obs", 2) < 2:  # (what adata is, _posterior_statistics checks)
            raise ValueError(f"active_units measures how posterior means vary across cells: give 2 or more, got {adata.n_obs}")
        activity = self._posterior_statistics(adata, batch_size, progress, "active_units")[1]
        return int((activity > threshold).sum())

    def _posterior_statistics(
        self, adata: ad.AnnData | None, batch_size: int, progress: bool, desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each latent dimension's mean KL and activity over the cells of ``adata``, in one pass
        (:func:`~cellvae.diagnostics.posterior_statistics`), with a progress bar named ``desc``."""
        progress = data.check_flag(progress, "progress")
        loader, cells = self._loader(self._resolve(adata), self.device)
        with diagnostics.evaluation(self.module, 0):
            return diagnostics.posterior_statistics(
                self.module, loader, cells, batch_size=batch_size, progress=progress, desc=desc
            )

    @advise_on_foreign_arguments
    def marginal_log_likelihood(
        self,
        adata: ad.AnnData | None = None,
        *,
        n_samples: int = 100,
        batch_size: int = 1024,
        random_state: int = 0,
        progress: bool = True,
    ) -> np.ndarray:
        """Importance-weighted estimate of log p(x) of each cell (nats), the IWAE bound with ``n_samples`` draws.

        As in scVI, p(x) is conditional on the cell's observed library size (which scales the decoder's
        mean), its batch and covariates: compare it with models that condition likewise. The bound
        tightens as ``n_samples`` grows; ``n_samples=1`` is the ELBO. Memory grows with
        ``n_samples × cells × genes``, so cells are processed in chunks. For the estimate's Monte Carlo error, take
        the spread over a few ``random_state`` values: the importance weights from the encoder are heavy-tailed, so an
        error estimated from one run's weights (sd / (√K · mean)) understates it (1.6–1.8× for K = 10–300 on
        interferon-stimulated PBMCs). The bound holds in expectation: one cell's estimate can lie above its
        log p(x), by more than a nat where a draw falls far in the tail of a posterior narrower than the true one
        (means over cells stay below it); average over cells, or over seeds, before comparing.

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        n_samples
            Importance samples per cell.
        batch_size, random_state
            Cells per chunk (fewer when ``n_samples`` is large); seed of the draws (a cell's draws depend also on the
            other cells passed with it and on ``batch_size``: per-cell values move within Monte Carlo error, means over
            many cells hardly).
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        Array of length n_cells.
        """
        data.check_positive_int(n_samples, "n_samples")
        data.check_positive_int(batch_size, "batch_size")
        random_state = data.check_seed(random_state)
        progress = data.check_flag(progress, "progress")
        loader, cells = self._scoring_loader(self._resolve(adata))
        with diagnostics.evaluation(self.module, random_state):
            return diagnostics.marginal_log_likelihood(
                self.module, loader, cells, n_samples=n_samples, batch_size=batch_size, progress=progress
            )

    def inference_gaps(
        self,
        adata: ad.AnnData | None = None,
        *,
        n_steps: int = 500,
        lr: float = 0.01,
        n_samples: int = 1000,
        n_elbo_samples: int = 64,
        random_state: int = 0,
        progress: bool = True,
    ) -> pd.DataFrame:
        """Amortization and approximation gaps of each cell (Cremer, Li & Duvenaud, 2018), in nats.

        Each cell's Gaussian q is refined by ``n_steps`` Adam steps (learning rate ``lr``, decaying to a
        tenth; 4 draws of z per step) on its own ELBO, starting from the encoder's output with the
        decoder frozen, giving q*. Too few steps understate the amortization gap and overstate the
        approximation gap (on real data 100 steps found 62–78% of the gap that 500 find).

        Parameters
        ----------
        adata
            Cells to read; ``None`` uses the model's AnnData (genes matched as in :meth:`get_latent`).
        n_steps, lr
            Adam steps and initial learning rate of the refinement.
        n_samples
            Importance samples from q* for ``log_px``, an IWAE bound: below log p(x) in expectation,
            so the approximation gap is a lower bound (0.01–0.12 nats per cell low at 1,000 samples in
            1- and 2-dimensional cases where log p(x) could be computed exactly).
        n_elbo_samples
            Draws for both ELBOs (the same noise for the encoder's q and q*).
        random_state
            Seed of all draws (a cell's draws depend also on the other cells passed with it).
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        DataFrame indexed by ``obs_names``: ``elbo_encoder``, ``elbo_refined`` (both on the same
        ``n_elbo_samples`` draws), ``log_px`` (IWAE bound with ``n_samples`` draws from q*),
        ``amortization_gap`` = elbo_refined − elbo_encoder with its Monte-Carlo standard error
        ``amortization_gap_se`` (given q*: it leaves out the refinement's own randomness), and
        ``approximation_gap`` = log_px − elbo_refined with ``approximation_gap_se`` (standard errors are NaN
        with ``n_elbo_samples=1``, and the latter with ``n_samples=1``): a single cell's
        approximation gap is often within noise of 0, or below it. Quote their means; this costs an
        optimisation per cell, so pass a subset of cells for large data. With ``beta ≠ 1`` the encoder
        was trained for ``distortion + beta·rate``, not the ELBO refined here, so the amortization gap
        also holds that difference of objectives. Measure on held-out cells: the encoder fits the cells it
        trained on better, so their gap is smaller (tutorial 03, Kang: 2.19 against 3.95 nats per cell). The
        standard error of a mean gap over cells is their gaps' sd / √n (the per-cell ``*_se`` are only the
        Monte Carlo part of each). Like :meth:`marginal_log_likelihood`, the ELBOs and ``log_px`` are
        conditional on each cell's observed library size, batch and covariates.
        """
        for name, value in (("n_steps", n_steps), ("n_samples", n_samples), ("n_elbo_samples", n_elbo_samples)):
            data.check_positive_int(value, name)
        data.check_positive(lr, "lr")
        random_state = data.check_seed(random_state)
        progress = data.check_flag(progress, "progress")
        adata = self._resolve(adata)
        loader, cells = self._scoring_loader(adata)
        with diagnostics.evaluation(self.module, random_state):
            gaps = diagnostics.inference_gaps(
                self.module,
                loader,
                cells,
                n_steps=n_steps,
                lr=lr,
                n_samples=n_samples,
                n_elbo_samples=n_elbo_samples,
                progress=progress,
            )
        return pd.DataFrame(gaps, index=adata.obs_names.copy())

    def decode(
        self,
        z,
        *,
        batch: str | np.ndarray | None = None,
        covariates: dict | None = None,
        library_size: float | np.ndarray = 1e4,
        gene_list: list[str] | None = None,
        batch_size: int = 1024,
    ) -> np.ndarray:
        """Expected expression of latent codes: the decoder mean at ``library_size`` counts per cell
        (with ``likelihood="zinb"`` the negative binomial's mean, as in :meth:`get_normalized_expression`).

        Parameters
        ----------
        z
            Latent codes, n × n_latent (or one code of length n_latent).
        batch
            A batch name of the model, or one per code; ``None`` averages over all the model's batches.
        covariates
            The model's other covariates: ``{obs column: value or one value per code}``.
        library_size
            Total counts to scale the expression to (one number, or one per code).
        gene_list
            Return only these genes of the model, in this order (rows still sum to ``library_size`` over all genes);
            ``None``: all. Keeps the result small for many codes, as in :meth:`get_normalized_expression`.
        batch_size
            Codes per forward pass.

        Returns
        -------
        n × n_genes float32 array, genes in ``gene_list``'s order, else in the model's order.
        """
        data.check_positive_int(batch_size, "batch_size")
        genes = self._gene_indices(gene_list) if gene_list is not None else slice(None)
        self._warn_if_untrained()
        z = self._check_latent(z)
        library = checked_library_sizes(library_size, len(z))
        targets = [batch] if batch is not None or not self.config.batch_key else list(self.config.batch_categories)
        n_out = self.config.n_genes if gene_list is None else len(genes)
        expression = np.zeros((len(z), n_out), dtype=np.float32)  # the output, and no other copy
        for position, target in enumerate(targets):
            frame = self._covariate_frame(len(z), target, covariates)
            with warnings.catch_warnings():
                if position > 0:  # the covariates' warnings, told for the first batch, once (not once per batch)
                    warnings.simplefilter("ignore", UserWarning)
                for rows, dist in self._decoded(z, frame, library, batch_size):
                    expression[rows] += dist.log_mean[:, genes].exp().cpu().numpy()
        if len(targets) > 1:
            expression /= len(targets)
        return expression

    def generate(
        self,
        n_cells: int,
        *,
        batch: str | np.ndarray | None = None,
        covariates: dict | None = None,
        library_size: float | np.ndarray | None = None,
        random_state: int = 0,
        batch_size: int = 1024,
        progress: bool = True,
    ) -> ad.AnnData:
        """Cells sampled from the model: z ~ N(0, I), then counts x ~ p(x | z, batch, covariates).

        Parameters
        ----------
        n_cells
            Number of cells to generate.
        batch, covariates
            As in :meth:`decode`. What is not given (and the library sizes, when ``library_size``
            is None) is copied from randomly drawn cells of the model's AnnData, so batches appear
            in their training proportions; with ``batch`` or categorical ``covariates`` given, each cell's are
            drawn from the cells of its batch and covariate values (so a generated batch, or cell type where it is
            a covariate, has their depths), or from all cells where the model's AnnData holds none of them.
        library_size
            Library size of each generated cell (one number or one per cell): the negative binomial's
            mean sums to it, so it is the cell's expected total count (with ``likelihood="zinb"`` the
            zero inflation removes a share of those counts).
        random_state
            Seed of the draws: the codes and library sizes, then the counts, drawn per forward pass (so another
            ``batch_size`` gives the same codes and library sizes but other counts). Two calls with the same seed
            (the default 0 too) generate the same cells: pass another seed per call to add more.
        batch_size
            Cells per forward pass.
        progress
            Show a progress bar (where the work lasts over 2 seconds).

        Returns
        -------
        AnnData with ``X`` integer counts (CSR, float32), the model's genes as ``var_names``, ``obs``
        holding the model's covariate columns (``obs[batch_key]`` etc., with the values and dtype of the model's
        AnnData's columns, so that ``anndata.concat`` with real cells keeps one value per batch; text for a model
        loaded without its AnnData, or where the model's names do not all read back in the column's type, e.g. a
        query of numbered batches mapped onto a reference of named ones: ``.astype(str)`` the real cells' column
        before concatenating) and ``library_size`` (``generated_library_size`` where a covariate has that
        name), and the prior draws in ``obsm["z"]``.
        """
        data.check_positive_int(n_cells, "n_cells")
        data.check_positive_int(batch_size, "batch_size")
        random_state = data.check_seed(random_state)
        progress = data.check_flag(progress, "progress")
        self._warn_if_untrained()
        library = None if library_size is None else checked_library_sizes(library_size, n_cells)  # checked before any work
        c = self.config
        given = _covariate_values(covariates, c)
        needs_template = (
            library_size is None
            or (c.batch_key and batch is None)
            or any(k not in given for k in c.categorical_covariate_keys + c.continuous_covariate_keys)
        )
        rng = np.random.default_rng(random_state)
        template = None
        batch_names = None if batch is None else self._batch_names(batch, n_cells)
        # the values given checked now (those to be copied from cells stood in for), not after matching cells to them
        stand_ins = {key: c.categorical_covariate_categories[key][0] for key in c.categorical_covariate_keys}
        with warnings.catch_warnings():  # (their warnings come once, from the decoding itself)
            warnings.simplefilter("ignore", UserWarning)
            self._check_decoding(n_cells, batch_names, stand_ins | dict.fromkeys(c.continuous_covariate_keys, 0.0) | given, 1.0)
        if needs_template:
            if self.adata is None:
                absent = [key for key in c.categorical_covariate_keys + c.continuous_covariate_keys if key not in given]
                needed = (["batch=..."] if c.batch_key and batch is None else []) + (
                    [f"covariates={{{', '.join(f'{key!r}: ...' for key in absent)}}}"] if absent else []
                )
                needed += ["library_size=..."] if library_size is None else []
                listed = ", ".join(needed[:-1]) + " and " * (len(needed) > 1) + needed[-1]
                raise ValueError(
                    "this model was loaded without an AnnData, so generate() cannot copy batches, covariates and "
                    f"library sizes from it; pass {listed}"
                )
            own = self._own_adata()  # as it is now, as the other methods read it (obs changed since the view was made)
            loader, cells = self._loader(own, torch.device("cpu"))
            cells = cells[loader.library > 0]
            template = cells[rng.integers(0, len(cells), n_cells)]
            # each generated cell copies a cell of the batch and categorical covariate values asked for
            asked = {c.batch_key: batch_names} if batch_names is not None else {}
            for key in c.categorical_covariate_keys:
                if key in given:
                    asked[key] = _per_row(given[key], n_cells, f"covariates[{key!r}]")
            if asked:
                wanted, held_codes = _row_codes(
                    [pd.Series(np.asarray(values)) for values in asked.values()], [own.obs[k].iloc[cells] for k in asked]
                )
                absent = []
                for code in np.unique(wanted):
                    these = np.flatnonzero(wanted == code)
                    matching = cells[held_codes == code]
                    if len(matching):
                        template[these] = matching[rng.integers(0, len(matching), len(these))]
                    else:
                        absent.append(", ".join(f"{key}={str(values[these[0]])!r}" for key, values in asked.items()))
                if absent:
                    data.warn_user(
                        f"the model's AnnData holds no cell with counts of {'; '.join(absent[:5])}, so the cells "
                        "generated with those values copy library sizes (and covariates not given) from cells of every "
                        "batch and covariate value; pass library_size= (and covariates=) for their own",
                        UserWarning,
                    )
            if library is None:  # (a cell's total may exceed the largest single count accepted)
                library = checked_library_sizes(np.minimum(loader.library[template], data.MAX_COUNT), n_cells)
            template = own.obs.iloc[template]
            if batch is None and c.batch_key:
                batch = data.cell_texts(template[c.batch_key])
            for key in c.categorical_covariate_keys + c.continuous_covariate_keys:
                given.setdefault(key, template[key].to_numpy())
        frame = self._covariate_frame(n_cells, batch, given)
        generator = torch.Generator(device=self.device).manual_seed(random_state)
        z = torch.randn((n_cells, c.n_latent), generator=generator, device=self.device, dtype=torch.float32).cpu().numpy()
        placed, count_generator = count_sampler(self.device, random_state, generator)
        counts = _GrowingRows(n_cells, c.n_genes)
        with progress_bar(n_cells, "generate", progress) as bar:
            for rows, dist in self._decoded(z, frame, library, batch_size):
                counts.append(sp.csr_matrix(placed(dist).sample(count_generator).cpu().numpy().astype(np.float32)))
                bar.update(len(z[rows]))
        obs = frame.copy()
        obs.index = [f"generated{i}" for i in range(n_cells)]
        # the batch and categorical covariates as categoricals in the model's order, with the values of its AnnData's
        # column (the colours and order of plots of generated cells beside real ones, and one value per batch when
        # both are concatenated)
        named = ({c.batch_key: c.batch_categories} if c.batch_key else {}) | c.categorical_covariate_categories
        for key, names in named.items():
            held = None if self.adata is None or key not in self.adata.obs.columns else self.adata.obs[key]
            obs[key] = _as_held(pd.Categorical(data.as_text(obs[key]).astype(str), categories=names), held)
        # a covariate named library_size keeps its column
        obs["library_size" if "library_size" not in obs.columns else "generated_library_size"] = library
        generated = ad.AnnData(X=counts.matrix(), obs=obs, var=pd.DataFrame(index=list(c.gene_names)))
        generated.obsm["z"] = z
        return generated

    def _check_latent(self, z) -> np.ndarray:
        try:
            if z is None:  # (numpy reads None as NaN)
                raise TypeError("z is None")
            z = np.asarray(z, dtype=np.float64)  # (float32 once checked: a cast of 1e39 would warn of overflow first)
        except (TypeError, ValueError) as error:
            raise TypeError(
                f"z takes latent codes as numbers, n × {self.config.n_latent} (e.g. model.get_latent()), got {z!r:.80}"
            ) from error
        if z.ndim == 1:
            z = z[None, :]
        if z.ndim != 2 or z.shape[1] != self.config.n_latent:
            raise ValueError(f"z must have shape (n, {self.config.n_latent}) for this model, got {z.shape}")
        if not np.all(np.isfinite(z)):
            raise ValueError("z contains NaN or infinite values")
        if np.abs(z).max(initial=0.0) > MAX_LATENT:  # the decoder's sums overflow to NaN from about 1e22
            raise ValueError(
                f"z holds codes as large as {np.abs(z).max():.3g}; codes lie within a few units of 0 (the prior is N(0, I)), "
                f"and those beyond {MAX_LATENT:g} cannot be decoded"
            )
        return z.astype(np.float32)

    def _covariate_frame(self, n: int, batch, covariates: dict | None) -> pd.DataFrame:
        """An obs-like frame of ``n`` rows holding the model's covariate columns."""
        c = self.config
        covariates = _covariate_values(covariates, c)
        needed = c.categorical_covariate_keys + c.continuous_covariate_keys
        unknown = sorted(set(covariates) - set(needed))
        if unknown:
            raise ValueError(f"covariates {unknown} are not covariates of this model; it uses {needed}")
        missing = [k for k in needed if k not in covariates]
        if missing:
            raise ValueError(f"this model needs covariates {missing}; pass covariates={{{missing[0]!r}: ...}}")
        frame = pd.DataFrame(index=pd.RangeIndex(n))
        if c.batch_key or batch is not None:
            frame[c.batch_key] = self._batch_names(batch, n)
        for key in needed:
            frame[key] = _per_row(covariates[key], n, f"covariates[{key!r}]")
        return frame

    def _typical_share(self, genes: np.ndarray, reference_only: bool = True) -> float | None:
        """The share of a typical cell's counts the model gives ``genes`` (a mask of its genes): decoded at the
        latent space's centre, averaged over the batches and over each categorical covariate's categories (taken in
        turn), continuous covariates at their training mean; None for an untrained model. A query model averages
        over its reference's categories where ``reference_only``, so its warnings give the share that map_query's
        gave (map_query, from its reference, over all of that model's)."""
        c = self.config
        if not self.is_trained:
            return None
        limit = c.reference_categories if reference_only else {}
        categories = {key: names[: limit.get(key, len(names))] for key, names in c.categorical_covariate_categories.items()}
        batches = c.batch_categories[: limit.get(c.batch_key, len(c.batch_categories))] if c.batch_key else []
        # one row per category (and batch) in turn, not every combination: as many rows as the most categories
        rows = max([len(names) for names in [*categories.values(), batches] if len(names)], default=1)
        covariates = {key: [names[i % len(names)] for i in range(rows)] for key, names in categories.items()}
        covariates |= {key: mean for key, mean in zip(c.continuous_covariate_keys, c.continuous_covariate_mean)}
        batch = [batches[i % len(batches)] for i in range(rows)] if batches else None
        z = np.zeros((rows, c.n_latent), dtype=np.float32)
        decoded = self.decode(z, batch=batch, covariates=covariates or None, library_size=1.0)
        return float(decoded[:, genes].sum(1).mean())

    def _batch_names(self, batch, n: int) -> np.ndarray:
        """``batch=`` of the decoding methods as ``n`` names, each a batch of the model."""
        if batch is not None and not self.config.batch_key:
            raise ValueError("batch=... was given, but this model was trained without batch_key, so it has no batches")
        codes, given = pd.factorize(pd.Series(_per_row(batch, n, "batch"), dtype=object), use_na_sentinel=False)
        names = np.array([_as_category_name(value, self.config.batch_categories) for value in given], dtype=object)[codes]
        names = names.astype(str)
        unknown = sorted(set(names.tolist()) - set(self.config.batch_categories))
        if unknown:
            raise ValueError(
                f"batch={unknown[0]!r} is not a batch of this model; its batches are "
                f"{list(self.config.batch_categories)[:10]} (map new batches with model.map_query first)"
            )
        return names

    def _check_decoding(self, n: int, batch, covariates: dict | None, library_size) -> None:
        """Refuse, before any work, decoding arguments for ``n`` codes that :meth:`decode` would refuse."""
        checked_library_sizes(library_size, n)
        if batch is None and self.config.batch_key:  # decoded as each batch of the model
            batch = self.config.batch_categories[0]
        data.covariate_matrix(self._covariate_frame(n, batch, covariates), self.layout, "covariates")

    def _decoded(self, z: np.ndarray, frame: pd.DataFrame, library: np.ndarray, batch_size: int):
        """(row slice, p(x|z)) for chunks of latent codes decoded with the covariates in ``frame``."""
        self._check_float32()
        covariates = data.covariate_matrix(frame, self.layout, "covariates")
        codes = covariates.batch_codes
        with torch.no_grad(), diagnostics.evaluation(self.module, 0):
            for start in range(0, len(z), batch_size):
                rows = slice(start, start + batch_size)
                yield (
                    rows,
                    self.module.generative(
                        torch.from_numpy(z[rows]).to(self.device),
                        torch.from_numpy(covariates[rows]).to(self.device),
                        torch.from_numpy(library[rows, None]).to(self.device),
                        torch.from_numpy(codes[rows]).to(self.device),
                    ),
                )

    def _mean_loss(self, loader: data.CellLoader, cells: np.ndarray, batch_size: int, random_state: int) -> float:
        """The training objective ``distortion + beta·rate`` of ``cells`` (nats per cell; the rate floored by free
        bits as training floors it), dropout off, in training's minibatches (so it needs no more memory than a
        training step)."""
        with diagnostics.evaluation(self.module, random_state):
            terms = evaluate(self.module, loader, cells, batch_size)
        return terms["distortion"] + self.config.beta * penalised_rate(terms, self.config.free_bits)

    def _warn_if_collapsed(
        self, loader: data.CellLoader, cells: np.ndarray, batch_size: int, random_state: int, lr: float
    ) -> None:
        """Warn if most latent dimensions carry nothing (encoded in training's minibatches: no more memory). A check
        that fails (a device's quirk, its memory) warns too: the model it checks is trained, and kept."""
        try:
            with diagnostics.evaluation(self.module, random_state):
                kl, activity = diagnostics.posterior_statistics(self.module, loader, cells, batch_size=batch_size)
        except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
            data.warn_user(
                f"the posterior-collapse check after training failed ({type(error).__name__}: {error}); the model is "
                "trained: check model.kl_per_dimension() yourself",
                RuntimeWarning,
            )
            return
        c = self.config
        message = diagnostics.collapse_message(kl, activity, lr=lr, n_layers=c.n_layers, normalization=c.normalization)
        if message:
            data.warn_user(message, diagnostics.PosteriorCollapseWarning)

    # ------------------------------------------------------------------ helpers

    def _check_float32(self) -> None:
        """Refuse a module cast to another float type (``model.module.double()`` or ``.half()``): cellvae's counts,
        covariates and losses are float32 (torch's own error named two dtypes and no way back)."""
        cast = sorted({str(p.dtype).removeprefix("torch.") for p in self.module.parameters() if p.dtype != torch.float32})
        if cast:
            raise TypeError(
                f"model.module's parameters are {', '.join(cast)} (cast, e.g. by .double() or .half()), but cellvae "
                "computes in float32: call model.module.float() first (fit(precision='bfloat16') trains its "
                "matrix multiplies in bfloat16 with float32 weights)"
            )

    def _warn_if_untrained(self) -> None:
        if not self.is_trained:
            data.warn_user(
                "this model is not trained: its outputs come from random weights; call model.fit() first",
                UserWarning,
            )

    def _resolve(self, adata: ad.AnnData | None) -> ad.AnnData:
        self._warn_if_untrained()
        if adata is not None:
            data.check_is_anndata(adata)
            return adata
        if self.adata is None:
            raise ValueError("this model was loaded without an AnnData; pass adata=... explicitly")
        return self._own_adata()

    def _own_adata(self) -> ad.AnnData:
        """The model's AnnData as it is now. A view's ``obs`` is fixed when the view is made, so where the model was
        built on one (``adata[:, adata.var["highly_variable"]]``), a view made now reads the columns the viewed
        AnnData has since (leiden clusters added after training); map_query's copy of a query stays as it is."""
        fresh = data.fresh_view(self.adata)
        return self.adata if fresh is None or self._is_mapped_query(self.adata) else fresh

    def _loader(self, adata: ad.AnnData, device: torch.device, all_ranks: bool = False) -> tuple[data.CellLoader, np.ndarray]:
        """Validate ``adata`` against the model and wrap it in a loader (nothing is copied or modified).

        ``all_ranks`` (in ``fit``, which every rank of a data-parallel run calls): each rank checks and
        sums only its part of a backed matrix.
        """
        data.check_nonempty_anndata(adata)
        self._check_float32()
        matrix = _model_counts(adata, self.config.layer, "this AnnData")
        genes, names = pd.Index(self.config.gene_names), data.gene_names(adata)
        # model genes the data lacks are read as zero counts, as in map_query
        columns = None
        if not names.equals(genes):
            # (map_query told of the genes its query lacks: not again for each use of its copy of the query, except
            # for what they do to likelihood scores, which it did not tell)
            told = self._is_mapped_query(adata) and not _SCORING_LIKELIHOODS.get()
            with missing_genes_told() if told else nullcontext():
                columns = _gene_positions(names, genes, "adata", adata.var, self._typical_share, _raw_gene_names(adata))
        covariates = data.covariate_matrix(adata.obs, self.layout, trained=self.is_trained)
        location = data.counts_location(self.config.layer)
        present = None if columns is None else columns[columns >= 0]
        # (fit of a new model reads the values its construction left unchecked: a backed matrix in a data-parallel
        # run; there the counts' place is still the user's choice, layer=...)
        with data.hint_where_counts_are(adata, self.config.layer, trained=self.is_trained or not all_ranks):
            if all_ranks:
                library = library_sizes_across_ranks(matrix, present, check_as=location, cell_names=adata.obs_names)
            else:
                library = data.library_sizes(matrix, present, check_as=location)
        loader = data.CellLoader(matrix, covariates, library, covariates.batch_codes, columns, device)
        return loader, np.arange(adata.n_obs)

    def _decode_batches(self, batchid, name: str, batch_correction: bool) -> np.ndarray | None:
        """The batch codes under whose mixture differential_expression decodes a group (None: each cell's own)."""
        if batchid is None:
            n_batches = len(self.config.batch_categories)
            return np.arange(n_batches) if batch_correction and self.config.batch_key and n_batches > 1 else None
        if not batch_correction:
            raise ValueError(f"{name} chooses the batches of batch correction; it needs batch_correction=True")
        codes = self._batch_overrides(batchid, name)
        if None in codes:
            raise ValueError(f"{name} holds None; name the model's batches, from {self.config.batch_categories}")
        return np.unique(np.array(codes, dtype=np.int64))

    def _batch_overrides(self, transform_batch, name: str = "transform_batch") -> list[int | None]:
        if transform_batch is None:
            return [None]
        if not self.config.batch_key:
            raise ValueError(f"{name} needs a model trained with batch_key")
        data.check_ordered(transform_batch, name, "a batch or a list of batches")
        # Batch names are stored as strings (an integer column's 1016 is "1016"), as obs[batch_key].astype(str).
        scalar = isinstance(transform_batch, str) or np.ndim(transform_batch) == 0
        given = [transform_batch] if scalar else list(transform_batch)
        # None in a list: the cell's own batch, as in scvi-tools
        names = [None if batch is None else _as_category_name(batch, self.config.batch_categories) for batch in given]
        if not names:
            none = "for each cell's own batch" if name == "transform_batch" else "to decode under all the model's batches"
            raise ValueError(f"{name} is empty; name one batch or more, or pass None {none}")
        unknown = [n for n in names if n is not None and n not in self.config.batch_categories]
        if unknown:
            raise ValueError(f"{name} {unknown} not among the model's batches {self.config.batch_categories}")
        return [None if n is None else self.config.batch_categories.index(n) for n in names]

    def _decode_inputs(self, mb: data.Minibatch, targets: list[int | None]):
        """(covariates, batch codes) with the batch one-hot replaced by each target batch."""
        n_batches = len(self.config.batch_categories)
        for target in targets:
            if target is None:
                yield mb.covariates, mb.batch_index
                continue
            covariates = mb.covariates.clone()
            covariates[:, :n_batches] = 0.0
            covariates[:, target] = 1.0
            yield covariates, torch.full_like(mb.batch_index, target)


def _modified(path: Path) -> float:
    """When ``path`` was last modified (0 where it is gone)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _left_by_interrupted_saves(path: Path) -> list[str]:
    """The names of the folders :meth:`CellVAE.save` makes beside ``path`` (``.NAME.xxxxxxxx``, the new model
    written there first, and ``.NAME.old.xxxxxxxx``, the one it replaces set aside) that are still there."""
    made = re.compile(rf"\.{re.escape(path.name)}\.(old\.)?[a-z0-9_]{{8}}")
    left = []
    try:
        entries = list(path.parent.iterdir())
    except OSError:  # a folder that can be written but not listed: nothing to tell
        return []
    for entry in entries:
        found = made.fullmatch(entry.name)
        if not found or not entry.is_dir():
            continue
        # ".m.old.xxxxxxxx" is also where a save into a model named "m.old" writes first: a set-aside model of m's
        # holds m (or .deleting, as save renames it before removing it)
        if found[1] and not any((entry / name).exists() for name in (path.name, ".deleting")):
            continue
        left.append(entry.name)
    return sorted(left)


def _file_identity(file: Path) -> tuple | None:
    """Which file ``file`` is (device, inode, size, modification time), or None where there is none."""
    try:
        stat = file.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _is_cellvae_config(file: Path) -> bool:
    """Whether ``file`` is a config.json that :meth:`CellVAE.save` wrote (not another library's of that name)."""
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and {"gene_names", "n_latent", "likelihood"} <= set(config)


def _is_cellvae_weights(file: Path) -> bool:
    """Whether ``file`` is a model.safetensors that :meth:`CellVAE.save` wrote (its metadata says so)."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = json.loads((handle.metadata() or {}).get(METADATA_KEY, "{}"))
    except (SafetensorError, OSError, ValueError, RecursionError):
        return False
    return isinstance(metadata, dict) and metadata.get("format") == "cellvae"


def _not_model_files(folder: Path) -> list[str]:
    """The first few names in ``folder`` that :meth:`CellVAE.save` does not write there (a folder as ``name/``)."""
    model_files = {CONFIG_FILE, WEIGHTS_FILE, HISTORY_FILE, ADATA_FILE, ".DS_Store"}  # (.DS_Store: macOS's own)
    others = sorted(
        entry.name + "/" * entry.is_dir()
        for entry in folder.iterdir()
        if entry.name not in model_files or not entry.is_file() or entry.is_symlink()
    )
    return others[:3] + ["..."] * (len(others) > 3)


def is_model_folder(path: Path) -> bool:
    """Whether ``path`` is a folder that holds nothing but files written by :meth:`CellVAE.save` (or nothing)."""
    return why_not_a_model_folder(path) is None


def is_mounted_file(file: Path) -> bool:
    """Whether ``file`` is mounted on its own (``docker -v FILE:...``), which can be neither replaced nor removed: a
    hard link to it from a folder made beside it fails across devices. False where no such folder can be made."""
    probe = None
    try:
        probe = Path(tempfile.mkdtemp(prefix=f".{file.parent.name}.", dir=file.parent))
        os.link(file, probe / file.name)
    except OSError as error:
        return probe is not None and error.errno == errno.EXDEV
    finally:
        if probe is not None:
            shutil.rmtree(probe, ignore_errors=True)
    return False


def _stopped_save_hint(path: Path) -> str:
    """Where ``path`` holds cellvae's weights but no config.json, as a save into the folder itself (a mount point)
    stopped midway leaves it, what to do if so; else "". Told, not repaired: the user may have put the weights there
    beside files of their own."""
    if (path / CONFIG_FILE).exists() or not _is_cellvae_weights(path / WEIGHTS_FILE):
        return ""
    steps = "empty it and save the model into it again"
    if (path / ADATA_FILE).is_file() and is_mounted_file(path / ADATA_FILE):  # (it cannot be moved)
        steps = (
            f"delete all but its {ADATA_FILE}, which is mounted, and save into it again the model loaded from it, in the "
            "session that loaded it (or unmount the file and empty the folder)"
        )
    elif (path / ADATA_FILE).exists():  # (whole: files are renamed in one by one)
        steps = f"move its {ADATA_FILE} out, empty the folder, save the model into it again and move {ADATA_FILE} back"
    return f" (as a save into the folder itself that was stopped midway leaves it: if so, {steps}, or train it anew)"


def saves_in_place(path: Path) -> bool:
    """Whether :meth:`CellVAE.save` writes into the folder ``path`` rather than swapping it for a new one: a folder
    made ahead and left empty, a mount point or the working directory (which keep their permissions and inode), or a
    folder whose parent cannot be written (a mount inside a read-only one, which os.path.ismount may not tell)."""
    if not path.is_dir() or path.is_symlink():
        return False
    special = os.path.ismount(path) or path.resolve() == Path.cwd().resolve() or not os.access(path.parent, os.W_OK)
    return special or is_empty_folder(path)


def is_empty_folder(path: Path) -> bool:
    """Whether ``path`` is a folder (not a link to one) that holds nothing, or only macOS's ``.DS_Store``."""
    return path.is_dir() and not path.is_symlink() and not {entry.name for entry in path.iterdir()} - {".DS_Store"}


def why_not_a_model_folder(path: Path) -> str | None:
    """What ``path`` is where it is not a saved model's folder (or an empty one), e.g. ``"a file"``; None where it is."""
    if path.is_symlink():
        return "a symbolic link"
    if not path.is_dir():
        return "a file"
    others = _not_model_files(path)
    left = [name for name in others if re.fullmatch(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}/", name)]
    if left:  # (where save writes into the folder: a mount point, the working directory)
        return f"a folder holding what a save into it that was killed left ({', '.join(left)}: remove that)"
    if others:
        return f"a folder holding other files than a model's ({', '.join(others)})"
    names = {entry.name for entry in path.iterdir()} - {".DS_Store"}
    if not names:
        return None
    # files of those names that CellVAE.save did not write: another library's model (config.json and
    # model.safetensors are common names), the user's notes or an adata.h5ad of the user's data
    if not {CONFIG_FILE, WEIGHTS_FILE} <= names:
        lacking = " or ".join(sorted({CONFIG_FILE, WEIGHTS_FILE} - names))
        return f"a folder holding {', '.join(sorted(names))} but no {lacking}{_stopped_save_hint(path)}"
    if not _is_cellvae_config(path / CONFIG_FILE):
        return f"a folder whose files ({', '.join(sorted(names))}) are not a cellvae model's ({CONFIG_FILE} is another's)"
    return None


# safetensors' names of the dtypes a saved model holds (float32 weights, BatchNorm's int64 count)
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.int64: "I64"}


def _refuse_unless_model_folder(path: Path) -> None:
    """Raise a clear error unless ``path`` holds a saved model's config and weights (saying where a save into it
    that was interrupted set the model saved there before aside, and telling scvi-tools' models apart)."""
    if (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file():
        return
    # a save killed between its two renames leaves the previous model set aside beside the path
    set_aside = list(path.parent.glob(f".{glob.escape(path.name)}.old.*/{glob.escape(path.name)}"))
    set_aside = sorted(set_aside, key=_modified) if not path.exists() else []  # the last one saved last
    if (path / "model.pt").is_file():
        raise ValueError(
            f"{path} holds an scvi-tools model (model.pt), not a cellvae one: cellvae cannot read its weights; "
            "train a cellvae model on the same data (CellVAE(adata, ...).fit())"
        )
    if not path.exists() and not set_aside:  # (a typo in the path, most likely)
        raise FileNotFoundError(
            f"{path} does not exist: give the folder a model was saved in (by CellVAE.save or cellvae fit --model-dir)"
        )
    raise ValueError(
        f"{path} is not a saved cellvae model: it needs {CONFIG_FILE} and {WEIGHTS_FILE} (written by CellVAE.save)"
        + (_stopped_save_hint(path) if path.is_dir() else "")
        + (
            f"; a save into it was interrupted, and the model saved there before is in {set_aside[-1]}: move it "
            f"back to {path} to load it"
            if set_aside
            else ""
        )
    )


def _read_weights(weights: Path, config: Config) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and metadata of a model's safetensors file, checked against its ``config`` (shapes before any
    tensor is read, then checksum, finiteness and the genes and batches the weights were saved for)."""
    corrupt = f"{weights} is corrupt or not a safetensors file"
    try:  # first the file's header: the tensors' shapes and dtypes, before any is read
        with safe_open(str(weights), framework="pt") as handle:
            slices = {name: handle.get_slice(name) for name in handle.keys()}
            header = {name: (tuple(part.get_shape()), part.get_dtype()) for name, part in slices.items()}
            metadata = handle.metadata() or {}
        if METADATA_KEY in metadata:  # (older files hold its entries one by one)
            metadata = json.loads(metadata[METADATA_KEY])
            if not isinstance(metadata, dict):
                raise ValueError(f"its {METADATA_KEY!r} metadata is not a JSON object")
    except (SafetensorError, OSError, ValueError, RecursionError) as error:
        raise ValueError(f"{corrupt} ({error})") from error
    if config.n_layers > len(header):  # each layer holds tensors: bounds the modules load builds
        raise ValueError(
            f"{weights} does not match its config.json: n_layers={config.n_layers} but the file holds {len(header)} tensors"
        )
    _check_weights_fit(header, config, weights)
    try:
        with safe_open(str(weights), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in header}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{corrupt} ({error})") from error
    if "sha256" in metadata and tensors_digest(state) != metadata["sha256"]:  # (files saved before it have none)
        raise ValueError(f"{weights} is corrupt: its tensors do not match the checksum save wrote")
    if not all(torch.isfinite(tensor).all() for tensor in state.values() if tensor.is_floating_point()):
        raise ValueError(
            f"{weights} holds weights that are NaN or infinite (training never saves them: it undoes such steps), "
            "so every output would be NaN; use another copy of the model, or train it again"
        )
    if "layout_sha256" in metadata and _layout_digest(config) != metadata["layout_sha256"]:  # (older files: none)
        raise ValueError(
            f"{weights} was not saved with this {CONFIG_FILE}: the genes, batches or covariates its rows and columns "
            f"stand for (gene_names, batch_categories, the covariates' categories and scales) differ from "
            f"{CONFIG_FILE}'s; keep each model's files together in the folder save wrote"
        )
    if metadata.get("format") != "cellvae":  # (every file save wrote holds it, those of the first format too)
        data.warn_user(
            f"{weights} holds none of the metadata CellVAE.save writes (a file written again by another program, "
            "e.g. safetensors' save_file, loses it), so whether its weights were saved with this "
            f"{CONFIG_FILE} cannot be checked, and how they were trained is unknown; keep the file save wrote",
            UserWarning,
        )
    return state, metadata


def _read_history(history_file: Path) -> pd.DataFrame:
    """The per-epoch training history saved beside a model; empty, marked unread (``attrs["history_unread"]``, which
    pl.history explains), where the file is missing or unreadable (with a warning: the weights load all the same)."""
    unread = pd.DataFrame()
    unread.attrs["history_unread"] = True
    if not history_file.is_file():
        return unread
    try:
        records = json.loads(history_file.read_text())
        if not isinstance(records, list) or not all(isinstance(row, dict) for row in records):
            raise ValueError("it holds no list of per-epoch records")
        return pd.DataFrame(records)
    except (UnicodeDecodeError, ValueError, TypeError, RecursionError) as error:
        data.warn_user(
            f"{history_file} is not a readable training history ({error}); the model is loaded without it "
            "(model.history is empty)",
            UserWarning,
        )
        return unread


def _check_weights_fit(found: dict[str, tuple], config: Config, weights: Path) -> None:
    """Refuse a weights file whose tensors' (shape, safetensors dtype) are not those of ``config``'s model."""
    try:
        with torch.device("meta"):  # shapes only: a hostile config cannot make us allocate
            expected = {k: (tuple(v.shape), SAFETENSORS_DTYPES.get(v.dtype)) for k, v in VAE(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{weights.with_name(CONFIG_FILE)} describes no valid cellvae model ({error})") from error
    if expected != found:  # save writes float32 weights (and BatchNorm's int64 count): others are not its files
        diff = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
        told = "; ".join(
            f"{k}: {_tensor_text(found.get(k))}, config.json's model has {_tensor_text(expected.get(k))}" for k in diff[:3]
        )
        raise ValueError(f"{weights} does not match its config.json (tensors differing: {len(diff)}; {told})")


def _as_saved(tensor: torch.Tensor) -> torch.Tensor:
    """A weight as save writes it: on the CPU, float32 where it is floating-point."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous()


def _tensor_text(shape_and_dtype: tuple | None) -> str:
    """A tensor's (shape, safetensors dtype) as an error names it."""
    return "none" if shape_and_dtype is None else f"{list(shape_and_dtype[0])} {shape_and_dtype[1]}"


def _row_codes(asked: list[pd.Series], held: list[pd.Series]) -> tuple[np.ndarray, np.ndarray]:
    """One integer per row of the ``asked`` and of the ``held`` columns (the same keys in the same order), equal
    where two rows hold the same values, as text, under every key."""
    n_asked = len(asked[0])
    combined = np.zeros(n_asked + len(held[0]), dtype=np.int64)
    for asked_values, held_values in zip(asked, held):
        text = pd.concat([pd.Series(data.as_text(asked_values)), pd.Series(data.as_text(held_values))], ignore_index=True)
        codes, uniques = pd.factorize(text)
        combined = combined * (len(uniques) + 1) + codes
    return combined[:n_asked], combined[n_asked:]


def _layout(c: Config) -> data.CovariateLayout:
    """How a model of config ``c`` reads cells' covariates (see :attr:`CellVAE.layout`)."""
    return data.CovariateLayout(
        c.batch_key,
        c.batch_categories,
        c.categorical_covariate_keys,
        c.categorical_covariate_categories,
        c.continuous_covariate_keys,
        c.continuous_covariate_mean,
        c.continuous_covariate_std,
    )


def _as_category_name(value, names: list[str]) -> str:
    """A batch or category given by the user as the model names it: its text, or the one name of ``names`` that is
    the same number (1 for a float column's "1.0", 1.0 for an integer column's "1"), as differential expression and
    latent_shift match groups."""
    text = str(value)
    if text in names or isinstance(value, (bool, np.bool_)):
        return text
    try:
        number = float(value)
    except (TypeError, ValueError):
        return text
    same = [name for name in names if _number_or_none(name) == number]
    return same[0] if len(same) == 1 else text


def _number_or_none(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _per_row(value, n: int, name: str) -> np.ndarray:
    """A scalar repeated ``n`` times, or an array-like of length ``n``, as an array."""
    values = np.asarray(value)
    if values.ndim == 0:
        return np.repeat(values, n)
    if values.shape != (n,):
        raise ValueError(f"{name} must be one value or one per row ({n}), got shape {values.shape}")
    return values


def _layout_digest(config: Config) -> str:
    """SHA-256 of what the weights' rows and columns stand for: the genes, in order, and the covariates' categories
    and scales (not the obs and layer names they are read from, which a user may rename)."""
    fields = ("gene_names", "batch_categories", "categorical_covariate_categories")
    layout = {name: getattr(config, name) for name in fields}
    layout["categorical_covariate_categories"] = list(config.categorical_covariate_categories.values())
    layout |= {name: getattr(config, name) for name in ("continuous_covariate_mean", "continuous_covariate_std")}
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()


def _train_settings(saved: object, weights: Path) -> TrainSettings:
    """The :class:`TrainSettings` that :meth:`CellVAE.save` stored in the weights file's metadata, checked field by field."""
    known = {field.name: field for field in fields(TrainSettings)}
    required = {name for name, field in known.items() if field.default is MISSING}
    kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
    if not isinstance(saved, dict) or not required <= saved.keys() <= known.keys():
        raise ValueError(f"{weights} is corrupt: its train_settings metadata is not the settings save writes")
    for name, value in saved.items():
        kind = kinds[known[name].type]
        if not isinstance(value, kind) or (bool not in kind and isinstance(value, bool)):
            raise ValueError(f"{weights} is corrupt: its train_settings metadata holds {name}={value!r}")
    if saved.get("precision", "float32") not in PRECISIONS:
        raise ValueError(f"{weights} is corrupt: its train_settings metadata holds precision={saved['precision']!r}")
    return TrainSettings(**saved)


def _history_json(history: pd.DataFrame) -> str:
    """The per-epoch history as JSON records, every float exact (pandas' to_json keeps 15 digits), NaN as null."""
    rows = history.to_dict(orient="records")
    return json.dumps([{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()} for row in rows])


def _covariate_values(covariates, config: Config) -> dict:
    """``covariates=`` of the decoding methods, ``{obs column: value or one value per row}`` (a DataFrame's columns
    too), as a dict, a categorical covariate's values named as the model's categories are (101.0 or 101 for "101",
    as ``batch=`` reads them); a list of column names (or anything else) is refused before a bare error of ``dict()``."""
    if covariates is None:
        return {}
    if not isinstance(covariates, (Mapping, pd.DataFrame)):
        raise TypeError(
            f"covariates takes {{obs column: value or one value per cell}}, e.g. covariates={{'donor': 'd1'}}, got "
            f"{type(covariates).__name__} {covariates!r:.80}"
        )
    given = dict(covariates)
    for key, names in config.categorical_covariate_categories.items():
        values = np.asarray(given.get(key), dtype=object)
        if key in given and values.ndim <= 1:  # (other shapes are refused by name later)
            codes, distinct = pd.factorize(pd.Series(values.ravel(), dtype=object), use_na_sentinel=False)
            named = np.array([value if pd.isna(value) else _as_category_name(value, names) for value in distinct], dtype=object)
            given[key] = named[codes].reshape(values.shape)
    return given


def checked_library_sizes(value, n: int) -> np.ndarray:
    """``library_size`` (one number, or one per row) as float32, each a positive, finite number of counts."""
    sizes = _per_row(value, n, "library_size")
    if not np.issubdtype(sizes.dtype, np.number) or not (np.isfinite(sizes) & (sizes > 0)).all():
        raise ValueError(f"library_size must be positive, finite numbers of counts, got {value!r}")
    if (sizes > data.MAX_COUNT).any():  # (counts drawn beyond ~9e18 overflow torch's sampler, silently negative)
        raise ValueError(
            f"library_size must be at most {data.MAX_COUNT:.0e} counts (as counts given to cellvae), got {sizes.max():.3g}"
        )
    return sizes.astype(np.float32)


@dataclass
class _ModelBeforeFit:
    """What :meth:`CellVAE.fit` gives back where training fails or makes the model worse."""

    weights: dict[str, torch.Tensor]
    history: pd.DataFrame | None
    train_settings: TrainSettings | None
    is_trained: bool
    data_parallel_rank: int | None
    train_indices: np.ndarray | None
    validation_indices: np.ndarray | None
    split_obs_names: pd.Index | None

    @classmethod
    def of(cls, model: CellVAE) -> _ModelBeforeFit:
        weights = {k: v.detach().clone() for k, v in model.module.state_dict().items()}
        return cls(
            weights,
            model.history,
            model.train_settings,
            model.is_trained,
            model._data_parallel_rank,
            model.train_indices,
            model.validation_indices,
            model._split_obs_names,
        )

    def restore(self, model: CellVAE) -> None:
        model.module.load_state_dict(self.weights)
        model.history, model.train_settings, model.is_trained = self.history, self.train_settings, self.is_trained
        model._data_parallel_rank, model._split_obs_names = self.data_parallel_rank, self.split_obs_names
        model.train_indices, model.validation_indices = self.train_indices, self.validation_indices


def _check_training(max_epochs, batch_size, lr, validation_size, patience, random_state, normalization) -> None:
    """The training arguments that fit and map_query share, checked before any work."""
    if not isinstance(validation_size, (int, float, np.number)) or not 0.0 <= validation_size < 1.0:
        raise ValueError(f"validation_size must be a fraction in [0, 1), got {validation_size!r}")
    if max_epochs is not None and (not data.is_whole(max_epochs) or max_epochs < 1):
        raise ValueError(f"max_epochs must be a positive integer or None, got {max_epochs!r}")
    data.check_positive_int(batch_size, "batch_size")
    if batch_size < 2 and normalization == "batch":
        raise ValueError("normalization='batch' normalises over each minibatch, so it needs batch_size >= 2")
    data.check_positive(lr, "lr")
    if not data.is_whole(patience) or patience < 1:
        raise ValueError(f"patience must be a positive number of epochs, got {patience!r}")
    data.check_seed(random_state)


def _brief_training(history: pd.DataFrame, n_cells: int) -> dict | None:
    """Where a first fit stopped (its epochs ran out, or Ctrl-C) with its loss still falling, under a quarter of the
    epochs fit gives ``n_cells`` by default: its epochs, that default and the cells; else None."""
    epochs, default = len(history), default_max_epochs(n_cells)
    if not epochs or 4 * epochs >= default:
        return None
    interrupted = bool(history.attrs.get("interrupted"))
    last_was_best = "epoch" in history and history.attrs.get("best_epoch") == history["epoch"].iloc[-1]
    if not (history.attrs.get("still_improving") or (interrupted and last_was_best)):
        return None
    return {"epochs": epochs, "default_epochs": default, "cells": n_cells, "interrupted": interrupted}


def _check_differential_arguments(delta, fdr_target, n_draws, max_cells, batch_size, pseudocount) -> None:
    """Refuse :meth:`CellVAE.differential_expression`'s numbers where they are not what it needs."""
    if delta is None:  # scvi-tools' delta=None picks one from the data
        raise ValueError("delta must be a positive number, got None (scvi-tools picks one then): give it, e.g. 0.25")
    for name, value in (("delta", delta), ("fdr_target", fdr_target)):
        value = data.native(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < np.inf:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not fdr_target < 1:
        raise ValueError(f"fdr_target must lie between 0 and 1, got {fdr_target!r}")
    for name, value in (("n_draws", n_draws), ("max_cells", max_cells), ("batch_size", batch_size)):
        data.check_positive_int(value, name)
    minimum = differential.MIN_DE_DRAWS
    if n_draws < minimum:
        raise ValueError(f"n_draws must be at least {minimum} (probabilities from fewer draws are too coarse), got {n_draws}")
    if pseudocount is not None and (
        isinstance(pseudocount, bool) or not isinstance(pseudocount, (int, float, np.number)) or not 0 < pseudocount < np.inf
    ):
        raise ValueError(f"pseudocount must be a positive number (log2 of 0 is undefined) or None, got {pseudocount!r}")


def _picked_groups(
    comparisons: list,
    generators: list,
    labelled: np.ndarray,
    counted: np.ndarray,
    against_rest: bool,
    source: str,
    max_cells: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray]:
    """For each comparison of :meth:`CellVAE.differential_expression`, the cells with counts (at most ``max_cells``,
    drawn by the comparison's generator) whose draws stand for each of its two groups, and a mask of all cells of the
    groups compared (which the observed columns read). A group without counts is refused; groups of few cells are told
    of in one warning."""
    picked, few, small = [], set(), set()
    compared = np.zeros(len(labelled), dtype=bool)
    for (name1, name2, cells1, cells2), rng in zip(comparisons, generators):
        cells2 = differential.second_group(labelled, cells1, cells2)
        compared[cells1] = compared[cells2] = True
        # (the rest of the cells is no group of the column: told as what it is)
        rest = f"the rest (all but {name1!r})" if against_rest else None
        for name, cells in ((repr(name1), cells1), (rest or repr(name2), cells2)):
            n_counted = int(counted[cells].sum())
            if n_counted == 0:
                what = f"{name} of {source}" if name == rest else f"group {name} of {source}"
                leave_out = "" if name == rest else " (leave it out of the groups compared, or remove its cells)"
                raise ValueError(f"{what} has no cell with a non-zero count{leave_out}")
            if n_counted < 5:
                few.add(name)
            elif min(n_counted, max_cells) < differential.SHRUNK_GROUP_CELLS:
                small.add(name)
        picked.append(tuple(differential.subsample(cells[counted[cells]], max_cells, rng) for cells in (cells1, cells2)))
    differential.warn_about_group_sizes(sorted(few), sorted(small - few), max_cells, source)
    return picked, compared


def _warn_if_trained_briefly(model: CellVAE) -> None:
    """Warn where the model's first fit stopped far short of its default epochs, its loss still falling
    (:func:`_brief_training`): such a decoder spreads each gene over every group, so differential expression finds
    differences small and calls few (pbmc3k, B vs NK: none after 3 epochs, 1,108 genes after 20). A query model
    decodes with its reference's decoder: it is told of its reference's brief fit (:func:`_decoding_as`)."""
    brief = model.history.attrs.get("brief_training")
    if not brief:
        return
    epochs, default = brief["epochs"], brief["default_epochs"]
    query = bool(model.config.reference_categories)
    whose = "the training of the reference model this query model was mapped onto" if query else "this model's training"
    fix = (
        "train the reference further (reference_model.fit()) and map the query again"
        if query
        else "train it further (model.fit())"
    )
    data.warn_user(
        f"{whose} stopped{' by Ctrl-C' if brief['interrupted'] else ''} after {epochs} "
        f"epoch{'s' * (epochs != 1)}, under a quarter of the {default} that fit gives its {brief['cells']:,} cells by "
        "default, with its loss still falling: an undertrained decoder spreads each gene's expression over every group, "
        f"so differences come out small and few genes are called; {fix} before comparing groups",
        UserWarning,
    )


def _decoding_as(reference: CellVAE, query_model: CellVAE) -> CellVAE:
    """``query_model``, given its ``reference``'s record of brief training (:func:`_brief_training`), which
    differential_expression tells of: a query model decodes with its reference's decoder."""
    brief = reference.history.attrs.get("brief_training")
    if brief:
        query_model.history.attrs["brief_training"] = brief
    return query_model


def _warn_if_mmd_sees_one_cell(config: Config, batch_size: int) -> None:
    if config.batch_mmd > 0 and batch_size == 1:
        data.warn_user(
            "batch_mmd has no effect with batch_size=1: the penalty compares the batches within each minibatch, and "
            "one cell is one batch; use a batch_size of at least 2 (the default is 128)",
            UserWarning,
        )


def _check_weight_decay(weight_decay) -> None:
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not 0 <= weight_decay < math.inf:
        raise ValueError(f"weight_decay must be a non-negative finite number, got {weight_decay!r}")


def check_model(model) -> None:
    """Refuse anything but a CellVAE where a tool takes the model (None, or a saved model's path)."""
    if not isinstance(model, CellVAE):
        # (a path is shown, the likely mistake; the repr of a frame or an array would spread over many lines)
        shown = f" {os.fspath(model)!r}" if isinstance(model, (str, os.PathLike)) else ""
        raise TypeError(
            f"model must be a CellVAE, got {type(model).__name__}{shown}; train one, or load a saved one "
            "with cellvae.CellVAE.load('my_model/', adata=adata)"
        )


def _check_checkpoint_dir(folder: str | os.PathLike) -> None:
    """Create the checkpoint folder if needed and write a file there, so a folder that cannot take the
    checkpoints is told before training rather than as a bare OSError after its first epoch."""
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir takes a folder path (or None for no checkpoints), got {folder!r}")
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"checkpoint_dir={str(folder)!r} is a file, not a folder; name a folder for the checkpoints")
    refuse_a_model_folder_for_checkpoints(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ValueError(
            f"checkpoint_dir={str(folder)!r} cannot hold the checkpoints ({error.strerror}: {error.filename}); "
            "name a folder that can be created and written to"
        ) from None


def refuse_a_model_folder_for_checkpoints(folder: str | os.PathLike) -> None:
    """Refuse a saved model's folder for checkpoints: their files would keep a later save with overwrite from replacing
    that model (also checked by ``cellvae fit`` before it reads its input)."""
    path = Path(folder).expanduser()
    if (path / CONFIG_FILE).is_file() and is_model_folder(path.resolve()):  # (a link to a model's folder too)
        raise ValueError(
            f"checkpoint_dir={str(folder)!r} is a saved model's folder; checkpoints written there would keep that model "
            "from being replaced by a later save with overwrite: give the checkpoints a folder of their own"
        )
    for above in path.resolve().parents:  # (a model folder that holds the checkpoints' folder is no model folder then)
        if (above / WEIGHTS_FILE).is_file() and _is_cellvae_config(above / CONFIG_FILE):
            raise ValueError(
                f"checkpoint_dir={str(folder)!r} lies inside the saved model's folder {str(above)!r}; its checkpoints would "
                "keep that model from being replaced by a later save with overwrite: give them a folder outside it"
            )


def key_list(keys) -> list:
    """obs column names given as any collection (a list, a pandas Index, a NumPy array); None is none."""
    return [] if keys is None else [str(key) if isinstance(key, str) else key for key in keys]


def _link_or_copy(source: Path, target: Path) -> None:
    """``target`` names the file ``source`` names (a hard link: a backed AnnData keeps reading it), or a copy."""
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links
        shutil.copy2(source, target)


def _staged_with_own_data(staging: Path, folder: Path) -> tuple[Path, bool]:
    """Link ``folder``'s own adata.h5ad into ``staging`` (a backed AnnData keeps reading it), or copy it where the
    file system has no hard links; returns the staging folder and whether the file is left as it is instead. Where
    the link crosses mounts (the folder is a bind mount that os.path.ismount does not tell, or the file alone is
    mounted), the file is left in place and the save writes into the folder, from a staging folder made inside it
    (``staging`` itself is then left for the caller to remove): a copy would need the data's size on the other
    disk, and a mounted file can be neither replaced nor moved aside with its folder."""
    data_file = folder / ADATA_FILE
    try:
        os.link(data_file, staging / ADATA_FILE)
        return staging, False
    except OSError as error:
        if error.errno != errno.EXDEV:
            shutil.copy2(data_file, staging / ADATA_FILE)
            return staging, False
    if staging.parent != folder:  # (staged beside the folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder))
    return staging, True


def _staged_inside(staging: Path, folder: Path, keep_data: bool) -> Path:
    """A copy of ``staging`` made inside ``folder`` (on its file system, so that its files are then renamed in), with
    ``staging`` removed; a copy that fails (a full disk) is removed, leaving ``folder`` as it was. With ``keep_data``
    the folder's own adata.h5ad is linked in, not copied (it stays as it is)."""
    inside = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder))
    try:
        for file in staging.iterdir():
            if file.name == ADATA_FILE and keep_data:
                _link_or_copy(folder / ADATA_FILE, inside / ADATA_FILE)
            else:
                shutil.copy2(file, inside / file.name)
        _make_durable_and_shareable(inside)
    except BaseException:
        shutil.rmtree(inside, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return inside


def _move_files_in(staging: Path, folder: Path, keep_data: bool = False) -> None:
    """Move a saved model's files from ``staging`` into ``folder``, removing those of the model there before that
    the new one lacks (with ``keep_data``, its adata.h5ad stays); then remove ``staging``. The old config.json goes
    first and the new one comes last: a save stopped midway leaves no mix of two models, but a folder without
    config.json, which load refuses."""
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    for name in (WEIGHTS_FILE, HISTORY_FILE, *([] if keep_data else [ADATA_FILE]), CONFIG_FILE):
        new, old = staging / name, folder / name
        if new.exists() and old.exists() and os.path.samefile(new, old):  # this model's adata.h5ad, linked: kept
            new.unlink()
        elif new.exists():
            os.replace(new, old)
        elif old.exists():
            old.unlink()
    shutil.rmtree(staging)


def _make_durable_and_shareable(folder: Path) -> None:
    """fsync the files of ``folder`` (so a renamed model is complete after a power cut) and give it the
    permissions a new folder gets here (the umask), not mkdtemp's owner-only 0700."""
    probe = folder / ".new-folder"  # read the umask by making a folder: os.umask would set it process-wide meanwhile
    probe.mkdir()
    mode = probe.stat().st_mode & 0o777
    probe.rmdir()
    for file in folder.iterdir():
        try:  # (Windows' fsync, FlushFileBuffers, needs a handle open for writing)
            descriptor = os.open(file, os.O_RDWR)
        except PermissionError:  # a read-only file linked in (the user's adata.h5ad): POSIX's fsync takes either
            descriptor = os.open(file, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    folder.chmod(mode)


# ----------------------------------------------------------------------------- reference mapping helpers

MIN_QUERY_GENE_FRACTION = 0.8
# Missing genes that hold this share of a typical cell's counts or more get a warning that the embedding may shift.
MISSING_SHARE_WARNED = 0.1


def _new_query_categories(
    config: Config, query_adata: ad.AnnData, aligned: ad.AnnData, query_batches: np.ndarray, batch_column: str
) -> tuple[list[str], dict[str, list[str]]]:
    """The query's batches new to the reference ``config`` (in the column's category order) and each categorical
    covariate's categories, the reference's then the query's new ones; refuses new names that are the reference's
    written as another type (1016.0 beside 1016) and warns of batches already in the reference and of names
    that differ from the reference's only in case."""
    reference_batches = config.batch_categories
    overlapping = sorted(set(query_batches) & set(reference_batches))
    if overlapping:
        data.warn_user(
            f"query batches {overlapping[:5]} already exist in the reference; their cells are treated as those "
            "reference batches (frozen parameters). Rename them to map them as new batches, e.g. "
            f"query_adata.obs[{batch_column!r}] = 'query ' + query_adata.obs[{batch_column!r}].astype(str)",
            UserWarning,
        )
    # in the column's category order (sorted where it is not categorical), as the reference's batches are
    new_batches = [
        b for b in data.category_names(query_adata.obs[batch_column], batch_column, "query_adata") if b not in reference_batches
    ]
    # 1016.0 would be a new category beside the reference's 1016 (or 1016 beside its 1016.0)
    retyped = data.numbers_written_otherwise(new_batches, reference_batches, batch_column, "query_adata")
    retyped = retyped or data.new_numbers_typed_otherwise(new_batches, reference_batches, batch_column, "query_adata")
    alike = [data.names_in_other_case(new_batches, reference_batches, batch_column, "query_adata")]
    data.warn_of_missing_as_text(batch_column, new_batches, "query_adata")
    categories = {}  # each categorical covariate's reference categories, then the query's new ones
    for key, known in config.categorical_covariate_categories.items():
        new = [c for c in data.category_names(aligned.obs[key], key, "query_adata") if c not in known]
        retyped = retyped or data.numbers_written_otherwise(new, known, key, "query_adata")
        retyped = retyped or data.new_numbers_typed_otherwise(new, known, key, "query_adata")
        alike.append(data.names_in_other_case(new, known, key, "query_adata"))
        data.warn_of_missing_as_text(key, new, "query_adata")
        categories[key] = known + new
    if retyped:
        raise ValueError(retyped)
    for told in filter(None, alike):  # (a new batch "D1" beside the reference's "d1" may be meant)
        data.warn_user(
            f"{told}; map_query adds it as a new batch or category, whose parameters learn from the query alone. If "
            "it is indeed new, ignore this",
            UserWarning,
        )
    return new_batches, categories


def _query_batches(query: ad.AnnData, batch_key: str) -> np.ndarray:
    """The query's batch names as strings; clear errors for a missing column or NaN values."""
    if batch_key not in query.obs.columns:
        raise KeyError(
            f"batch column {batch_key!r} not found in query_adata.obs; available: {list(query.obs.columns)}. "
            "Pass batch_key=... naming the query's batch column"
        )
    column = query.obs[batch_key]
    if column.isna().any():
        raise ValueError(
            f"query_adata.obs[{batch_key!r}] has {int(column.isna().sum())} missing (NaN) batch values; "
            "fill them with a batch name or drop those cells before map_query"
        )
    return data.cell_texts(column)


class _GrowingRows:
    """CSR rows appended a chunk at a time into buffers sized ahead from the non-zeros seen so far. A list
    of chunks stacked at the end held twice the memory of a large generated AnnData (200,000 cells: +2.4 GB
    for 1.1 GB of counts), as the freed chunks stayed with the process."""

    def __init__(self, n_rows: int, n_columns: int):
        self.shape = (n_rows, n_columns)
        self.values, self.indices = np.empty(0, dtype=np.float32), np.empty(0, dtype=np.int32)
        self.row_lengths: list[np.ndarray] = []
        self.used = self.rows = 0

    def append(self, chunk: sp.csr_matrix) -> None:
        needed = self.used + chunk.nnz
        self.rows += chunk.shape[0]
        if needed > len(self.values):  # room for the rows left at this density, and 5% more
            size = max(needed, int(needed / self.rows * self.shape[0] * 1.05))
            self.values, self.indices = (
                np.concatenate([a[: self.used], np.empty(size - self.used, a.dtype)]) for a in (self.values, self.indices)
            )
        self.values[self.used : needed], self.indices[self.used : needed] = chunk.data, chunk.indices
        self.row_lengths.append(np.diff(chunk.indptr))
        self.used = needed

    def matrix(self) -> sp.csr_matrix:
        index_dtype = np.int32 if self.used < 2**31 else np.int64
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(self.row_lengths))]).astype(index_dtype)
        return sp.csr_matrix((self.values[: self.used], self.indices[: self.used], indptr), shape=self.shape)


def _warn_about_empty_cells(
    loader: data.CellLoader,
    cells: np.ndarray,
    nonempty: np.ndarray,
    config: Config,
    untrained: str,
    adata: ad.AnnData,
    name: str = "adata",
) -> None:
    """Warn that the cells with zero total counts are left out of training, naming the batches and covariate
    categories that train parameters (not a query model's frozen reference ones) and have no other cells, whose
    parameters stay ``untrained``; where ``adata`` (or the AnnData it views) holds other genes, that these cells may have counts
    in those, so that filtering ``adata`` itself would keep them."""
    if len(nonempty) == len(cells):
        return
    n_empty = len(cells) - len(nonempty)
    cells_have, are, them = (f"{n_empty} cells have", "are", "them") if n_empty > 1 else ("1 cell has", "is", "it")
    empty = []  # a batch (or category) whose cells all have zero counts has nothing to train its parameters on
    for (key, names), codes in zip(data.categorical_items(_layout(config)), loader.covariates.codes):
        unseen = np.setdiff1d(codes[cells], codes[nonempty])
        unseen = unseen[unseen >= config.reference_categories.get(key, 0)].tolist()
        if unseen:
            kind = "the batches" if key == config.batch_key else f"the categories of obs[{key!r}]"
            empty.append(f"{kind} {np.asarray(names)[unseen].tolist()[:5]}")
    empty_batches = (
        f"; {' and '.join(empty)} have no cells with counts, so their parameters stay {untrained} and their cells' codes "
        "mean little"
        if empty
        else ""
    )
    viewed = data.viewed_anndata(adata)
    others = not data.gene_names(adata).isin(config.gene_names).all()  # genes the model does not read
    if others or (viewed is not None and viewed.n_vars > adata.n_vars):  # (a view of some of the genes)
        matrix = ".X" if config.layer is None else f".layers[{config.layer!r}]"
        data.warn_user(
            f"{cells_have} no counts in the model's {config.n_genes} genes (they may have "
            f"counts in others) and {are} left out of training{empty_batches}; each gets the code of a cell without "
            "counts, so they gather as a cluster of their own: drop them, e.g. keep the cells with "
            f"np.asarray({name}[:, {name}.var_names.isin(genes)]{matrix}.sum(axis=1)).ravel() > 0, genes being the "
            "model's (config.gene_names)",
            UserWarning,
        )
        return
    data.warn_user(
        f"{cells_have} zero total counts and {are} left out of training{empty_batches}; "
        f"drop {them} with sc.pp.filter_cells({name}, min_counts=1) to silence this",
        UserWarning,
    )


# Raw counts' totals vary between cells with depth and cell size (a coefficient of variation of 0.32-0.75 in the
# shared datasets, droplet and plate data); totals within about 10% of each other are normalised counts rounded.
EQUAL_DEPTHS_CV = 0.1


def _warn_about_equal_depths(library: np.ndarray, where: str) -> None:
    """Warn where the training cells' total counts barely vary: counts normalised to one total (``normalize_total``)
    and rounded pass every check of whole counts, but the model's library sizes and counting noise then mean nothing."""
    if len(library) < 5 * data.MIN_CELLS:
        return
    spread = float(library.std() / library.mean())
    if spread < EQUAL_DEPTHS_CV:
        data.warn_user(
            f"the cells' total counts in {where} barely vary ({library.min():,.0f} to {library.max():,.0f}, a coefficient of "
            f"variation of {spread:.2f}, where raw counts vary 0.3-0.8): they look normalised to one total "
            "(sc.pp.normalize_total) and rounded, which are no counts; give the model the raw counts. If you downsampled "
            "the counts to one depth (sc.pp.downsample_counts), ignore this",
            UserWarning,
        )


def _warn_about_scoring_empty_cells(loader: data.CellLoader, cells: np.ndarray) -> None:
    """Warn that cells with zero total counts are scored although they have nothing to reconstruct: each one's
    ELBO is minus its rate alone (a few nats, against thousands for a cell with counts), which skews any mean."""
    empty = int(np.count_nonzero(loader.library[cells] == 0))
    if empty:
        data.warn_user(
            f"{empty} of the {len(cells)} cells {'have' if empty > 1 else 'has'} zero total counts: with nothing to "
            "reconstruct, each scores minus its rate alone (a few nats), which skews a mean over cells; drop "
            f"{'them' if empty > 1 else 'it'} first with sc.pp.filter_cells(adata, min_counts=1)",
            UserWarning,
        )


def _seen_validation_cells(model: CellVAE, validation_cells: np.ndarray) -> tuple[int | None, bool]:
    """How many of a further fit's validation cells the earlier fit of this session's model trained on, and whether
    the cells changed since. Unique names are matched by name where one fit's cells hold the other's (cells filtered,
    reordered or added); renamed cells (no name in common, as many cells) and names made unique keep their positions.
    None where it cannot be told: a loaded or untrained model, or names changed otherwise (renumbered, partly replaced:
    matching them by name or position could count other cells)."""
    if not model.is_trained or model.train_indices is None:
        return None, False
    then, now = model._split_obs_names, model.adata.obs_names
    same_cells = then is None or then is now or then.equals(now)
    if not same_cells and then.is_unique and now.is_unique:
        if now.isin(then).all() or then.isin(now).all():  # filtered, reordered or added: matched by name
            return int(now[validation_cells].isin(then[model.train_indices]).sum()), True
        same_cells = len(then) == len(now) and not now.isin(then).any()  # renamed: the same cells, by position
    elif not same_cells:
        same_cells = len(then) == len(now) and _made_unique(then, now)
    if not same_cells:
        return None, True
    return len(np.intersect1d(validation_cells, model.train_indices)), False


def _made_unique(then: pd.Index, now: pd.Index) -> bool:
    """Whether ``now`` is ``then`` after ``obs_names_make_unique()``: a name changed only by a suffix "-1", "-2", ..."""
    before, after = np.asarray(then, dtype=object), np.asarray(now, dtype=object)
    changed = np.flatnonzero(before != after)
    return all(
        str(a).startswith(f"{b}-") and str(a)[len(str(b)) + 1 :].isdecimal() for a, b in zip(after[changed], before[changed])
    )


def _warn_about_seen_validation_cells(model: CellVAE, validation_cells: np.ndarray) -> int | None:
    """Warn where a further fit of this session's model validates on cells its earlier fit trained on; return how
    many (None: not known)."""
    seen, changed = _seen_validation_cells(model, validation_cells)
    if seen is None and changed:
        data.warn_user(
            "this fit's validation cells may include cells the earlier fit trained on: the cells' names changed since "
            "in a way that does not tell which cells are the earlier fit's (renumbered, partly replaced, or names "
            "that repeat); to judge on unseen cells only, fit a new CellVAE",
            UserWarning,
        )
    if not seen:
        return seen
    held = model.validation_indices if model.validation_indices is not None else np.array([])
    if changed:
        keep = (
            "the cells have changed since the earlier fit (filtered, reordered, added to or renamed), so its validation "
            "cells cannot be drawn again: to judge on unseen cells only, fit a new CellVAE"
        )
    elif len(held):
        earlier = model.train_settings.random_state if model.train_settings is not None else None
        share = len(held) / (len(held) + len(model.train_indices))
        keep = (
            f"to keep the earlier validation cells, continue with its random_state={earlier!r} and its "
            f"validation_size (it held out {share:.1%} of the cells)"
        )
    else:
        keep = "the earlier fit held out no cells (validation_size=0), so none are left unseen"
    data.warn_user(
        f"{seen:,} of this fit's {len(validation_cells):,} validation cells were training cells of the earlier fit, "
        f"so early stopping and the best epoch are judged partly on cells the model has learnt; {keep}",
        UserWarning,
    )
    return seen


def _warn_about_small_categories(model: CellVAE, codes: list[np.ndarray], cells: np.ndarray, training: str) -> None:
    """Warn where a batch or covariate category that ``training`` (``"fit"`` or ``"map_query"``) learns has under
    ``MIN_CELLS`` cells with counts: its parameters are learnt from those cells alone. A query model learns only the
    categories its reference lacks."""
    query = bool(model.config.reference_categories)
    small = []
    for (key, names), code in zip(data.categorical_items(model.layout), codes):
        first_learnt = model.config.reference_categories.get(key, len(names)) if query else 0
        counts = np.bincount(code[cells], minlength=len(names))
        small += [
            f"obs[{key!r}] {names[i]!r}: {counts[i]}" for i in range(first_learnt, len(names)) if 0 < counts[i] < data.MIN_CELLS
        ]
    if small:
        shown = ", ".join(small[:5]) + (f" and {len(small) - 5} more" if len(small) > 5 else "")
        fix = (
            "map more cells of them together where you have them"
            if query
            else "pool each with one of like origin (e.g. the same protocol or donor), or leave its cells out"
        )
        data.warn_user(
            f"{'new ' if query else ''}batches or categories with under {data.MIN_CELLS} cells with counts ({shown}): "
            f"{training} learns each one's parameters from its own cells alone, and from so few they are uncertain; {fix}",
            UserWarning,
        )


def _check_cells_left_to_train(train_cells: np.ndarray, cells: np.ndarray, validation_size: float) -> None:
    """Refuse a ``validation_size`` that leaves too few cells to train on (a small dataset keeps its 9 of 10)."""
    if len(train_cells) < min(data.MIN_CELLS, len(cells) // 2):
        raise ValueError(
            f"validation_size={validation_size} leaves {len(train_cells)} of {len(cells)} cells to train on; "
            "lower validation_size (the default is 0.1)"
        )


def _model_counts(adata: ad.AnnData, layer: str | None, name: str):
    """The counts where a trained model reads them (``X`` or the layer it was trained on)."""
    if layer is not None and layer not in adata.layers:
        holding = data.layers_holding_counts(adata)
        fix = (  # a layer whose values look like counts (in memory), else X
            f"adata.layers[{holding[0]!r}] looks like counts: add them, adata.layers[{layer!r}] = adata.layers[{holding[0]!r}]"
            if holding and not data.looks_like_counts(data.stored_x(adata))
            else f"if its counts are in X, add them: adata.layers[{layer!r}] = adata.X"
        )
        raise KeyError(
            f"this model reads counts from layers[{layer!r}], the layer it was trained on, which {name} lacks "
            f"(layers: {data.layer_names(adata)}); {fix}"
        )
    return data.count_matrix(adata, layer)


def _as_held(names: pd.Categorical, held: pd.Series | None) -> pd.Categorical | pd.Index:
    """Batch or covariate names (text) as the values of ``held``, the model's AnnData column they come from: numbers
    as numbers of its dtype (categories where it is categorical); text where it holds text or is absent, or where
    some name does not read back in its dtype (one column of mixed types could not be written to .h5ad)."""
    if held is None:
        return names
    categorical = isinstance(held.dtype, pd.CategoricalDtype)
    values = pd.Index(held.cat.categories if categorical else pd.unique(held.dropna()))
    if pd.api.types.infer_dtype(values, skipna=True) in ("string", "empty"):
        return names
    texts = values.astype(str)
    where = texts.get_indexer(names.categories) if texts.is_unique else np.array([-1])
    if (where >= 0).all():
        originals = values[where]
    else:  # names the column lacks (a query model's AnnData holds the query's batches only): in its dtype, where
        try:  # they read back as they were written
            originals = pd.Index(names.categories).astype(values.dtype)
        except (TypeError, ValueError):
            return names
        if not np.array_equal(originals.astype(str), names.categories.astype(str)):
            return names
    if categorical:
        return pd.Categorical.from_codes(names.codes, categories=originals)
    return originals.take(names.codes)


def _align_query(
    query: ad.AnnData,
    config: Config,
    batches: np.ndarray,
    share_of: Callable[[np.ndarray], float | None] | None = None,
    batch_column: str | None = None,
) -> ad.AnnData:
    """The AnnData the query model reads: a new one with the query's batches in the reference's batch column
    (``batch_column``'s own values where they are those batches) and its counts, in memory (the query's genes that
    the reference has, in the query's order where it holds just those, else in the reference's; missing ones are
    read as zeros) or on disk (a backed file or Zarr store)
    left there in the file's gene order, which the query model reads by name; or a view of counts on disk itself,
    where its batches are already in the reference's batch column."""
    matrix = _model_counts(query, config.layer, "query_adata")
    if isinstance(matrix, data.BackedView):
        column = query.obs[config.batch_key] if config.batch_key in query.obs.columns else None
        if column is None or not np.array_equal(data.cell_texts(column), batches):
            raise ValueError(
                f"query_adata is a view of an AnnData whose counts are on disk, and obs[{config.batch_key!r}] (the "
                "reference's batch key, where the query model reads batches) does not hold its batches; a view cannot "
                "be given that column: add it to the whole AnnData before taking the view, or load the view with "
                "query_adata.to_memory()"
            )
    data.validate_counts(matrix, "query " + data.counts_location(config.layer))
    positions = _gene_positions(
        data.gene_names(query), pd.Index(config.gene_names), "query_adata", query.var, share_of, _raw_gene_names(query)
    )
    if isinstance(matrix, data.BackedView):
        return query
    obs = query.obs.copy()
    # the query's own batch values where they are the batches (numbers stay numbers, as in the reference's column)
    given = query.obs[batch_column] if batch_column in query.obs.columns else None
    same = given is not None and np.array_equal(np.asarray(data.as_text(given).astype(str)), batches)
    obs[config.batch_key] = given if same else pd.Categorical(batches)
    if data.is_backed_matrix(matrix):
        counts, var = matrix, pd.DataFrame(index=data.gene_names(query))
    else:
        # Only the genes the query measured (the query model reads genes by name): missing ones are not stored as
        # zeros, so the query model still knows them as missing (differential_expression gives them no statistics),
        # as it does for a query on disk; its loaders read them as zeros, as map_query's own does. In the query's own
        # order where it holds just the reference's genes (outputs then fit its layers, as they do for the query
        # itself), else in the reference's, as outputs for the query itself then come (and scvi-tools'
        # prepare_query_anndata orders a query's genes)
        kept = positions[positions >= 0]
        kept = np.sort(kept) if len(kept) == matrix.shape[1] == len(config.gene_names) else kept
        as_stored = isinstance(matrix, np.ndarray) or (sp.issparse(matrix) and matrix.format == "csr")
        if np.array_equal(kept, np.arange(matrix.shape[1])) and as_stored and not query.is_view:  # its own columns
            counts = matrix  # as fit reads the user's own matrix: a copy would double the memory of a large query
        else:
            counts = sp.csr_matrix(data.select_genes(sp.csr_matrix(matrix, dtype=np.float32), kept))
        var = pd.DataFrame(index=data.gene_names(query)[kept])
    if config.layer is None:
        return ad.AnnData(X=counts, obs=obs, var=var)
    return ad.AnnData(obs=obs, var=var, layers={config.layer: counts})


# Set while the cells of a likelihood score are read: zero-filled genes are then scored as observed zeros.
_SCORING_LIKELIHOODS: contextvars.ContextVar[bool] = contextvars.ContextVar("cellvae_scoring_likelihoods", default=False)


@contextmanager
def missing_genes_told() -> Iterator[None]:
    """Silence the warning about model genes missing from the data, which map_query gave once already (a
    query on disk keeps its own genes, so each loader over it finds them missing again)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".* of the model's \d+ genes are missing from adata")
        yield


def _gene_positions(
    var_names: pd.Index,
    model_genes: pd.Index,
    name: str,
    var: pd.DataFrame | None = None,
    share_of: Callable[[np.ndarray], float | None] | None = None,
    raw_names: pd.Index | None = None,
) -> np.ndarray:
    """Position of each model gene in ``var_names``, -1 where it is missing (read as zero counts): a
    warning names the missing ones (and, with ``share_of``, a model's :meth:`CellVAE._typical_share`, the share of
    a typical cell's counts they hold), and fewer than ``MIN_QUERY_GENE_FRACTION`` present is an error (which
    names a column of ``var`` that holds the model's genes, versioned Ensembl IDs, ``raw`` holding them
    (``raw_names``: a subset of variable genes whose counts stayed in ``adata.raw``) or names in another case, where
    that is why)."""
    positions = data.gene_positions(var_names, model_genes, name)
    present = positions >= 0
    if present.mean() < MIN_QUERY_GENE_FRACTION:
        missing = model_genes[~present]
        share = np.floor(present.mean() * 1000) / 10  # 79.96% is not 80%
        raise ValueError(
            f"only {int(present.sum())} of the model's {len(model_genes)} genes ({share:g}%) are in "
            f"{name}.var_names (at least {MIN_QUERY_GENE_FRACTION:.0%} needed); missing e.g. {missing[:5].tolist()}. "
            + (
                _where_the_models_genes_are(var_names, model_genes, name, var)
                or _raw_holds_the_models_genes(raw_names, model_genes, name)
                or _case_advice(var_names, missing, name)
                or "Check that the data and the model use the same gene identifiers (symbols vs Ensembl IDs)"
            )
        )
    if not present.all():
        share = None if share_of is None else share_of(~present)
        held = "" if share is None else f"; the model gives them {share:.1%} of a typical cell's counts"
        if share is not None and share >= MISSING_SHARE_WARNED:
            held += ", so the embedding of these cells may shift: compare it on cells of a known type"
        if _SCORING_LIKELIHOODS.get():
            held += (
                "; the likelihood scores count them as observed zeros, so compare them only with scores of data "
                "lacking the same genes"
            )
        named_otherwise = _versions_advice(var_names, model_genes[~present], name) or _case_advice(
            var_names, model_genes[~present], name
        )
        data.warn_user(
            f"{int((~present).sum())} of the model's {len(model_genes)} genes are missing from {name} "
            f"(e.g. {model_genes[~present][:3].tolist()}); they are filled with zero counts{held}"
            + (f". {named_otherwise}" if named_otherwise else ""),
            UserWarning,
        )
    return positions


def _unversioned(names) -> pd.Index:
    """Ensembl IDs without their version (``ENSG00000141510.17`` -> ``ENSG00000141510``); other names as they are."""
    return pd.Index(names, dtype=object).astype(str).str.replace(r"^(ENS\w*\d{6,})\.\d+$", r"\1", regex=True)


def _versions_advice(var_names: pd.Index, missing: pd.Index, name: str) -> str:
    """Advice where model genes missing from ``var_names`` are there with another Ensembl version, or without
    the model's one (or with one the model's lack); else ''."""
    data_names = _unversioned(var_names)
    missing = pd.Index(missing)
    missing = missing[~missing.isin(pd.Index(var_names, dtype=object).astype(str))]  # only genes truly absent
    found = missing.isin(data_names) | _unversioned(missing).isin(data_names)
    if not found.any():
        return ""
    example = missing[found][0]
    if data_names.equals(pd.Index(var_names, dtype=object).astype(str)):  # the data's have none: the model's do
        return (
            f"{int(found.sum())} of them are in {name} without the model's Ensembl version (e.g. {example!r}): name them "
            "as the model does first, e.g. genes = pd.Index(model.config.gene_names); lookup = dict(zip("
            rf"genes.str.replace(r'\.\d+$', '', regex=True), genes)); {name}.var_names = [lookup.get(g, g) for g in "
            f"{name}.var_names]"
        )
    return (
        f"{int(found.sum())} of them are in {name} with an Ensembl version the model's lack (e.g. "
        rf"{example!r}): drop the versions first, {name}.var_names = {name}.var_names.str.replace(r'\.\d+$', '', regex=True)"
    )


def _case_advice(var_names: pd.Index, missing: pd.Index, name: str) -> str:
    """Advice where model genes missing from ``var_names`` are there in another case (``cd3e`` for ``CD3E``); else ''."""
    names = pd.Index(var_names, dtype=object).astype(str)
    by_case = dict(zip(names.str.casefold(), names))
    missing = pd.Index(missing, dtype=object).astype(str)
    found = [(gene, by_case[gene.casefold()]) for gene in missing if gene.casefold() in by_case and gene not in names]
    if not found:
        return ""
    gene, written = found[0]
    return (
        f"{len(found)} of them are in {name} in another case (e.g. {gene!r} as {written!r}): if they are the same "
        "genes (not another species' orthologs, as mouse Cd3e and human CD3E), name them as the model does first, "
        f"e.g. lookup = {{g.casefold(): g for g in model.config.gene_names}}; {name}.var_names = "
        f"{name}.var_names.map(lambda g: lookup.get(g.casefold(), g))"
    )


def _raw_gene_names(adata: ad.AnnData) -> pd.Index | None:
    raw = getattr(adata, "raw", None)
    return None if raw is None else pd.Index(raw.var_names)


def _raw_holds_the_models_genes(raw_names: pd.Index | None, model_genes: pd.Index, name: str) -> str:
    """Advice where ``adata.raw`` holds the model's genes that ``var_names`` lack (variable genes kept, the others in
    ``raw``); else ''."""
    if raw_names is None or model_genes.isin(raw_names).mean() < MIN_QUERY_GENE_FRACTION:
        return ""
    return (
        f"{name}.raw holds the model's genes ({name} keeps a subset, e.g. its highly variable genes): give the model "
        f"{name}.raw.to_adata() (its genes are matched by name), if raw keeps the counts"
    )


def _where_the_models_genes_are(var_names: pd.Index, model_genes: pd.Index, name: str, var: pd.DataFrame | None) -> str:
    """Advice where most of the model's genes are in a column of ``var`` (Ensembl IDs as var_names, symbols in
    ``var['gene_symbols']``, as in CELLxGENE's ``feature_name``), or are ``var_names`` with or without an
    Ensembl version (``ENSG00000141510.17``); else ''."""

    def covered(names) -> float:
        return float(pd.Index(model_genes).isin(pd.Index(names, dtype=object).astype(str)).mean())

    for column in [] if var is None else var.columns:
        values = var[column]
        if (pd.api.types.is_object_dtype(values) or isinstance(values.dtype, (pd.CategoricalDtype, pd.StringDtype))) and (
            covered(values.dropna()) >= MIN_QUERY_GENE_FRACTION
        ):
            return (
                f"{name}.var[{column!r}] holds the model's genes: name the genes by it first, "
                f"{name}.var_names = {name}.var[{column!r}].astype(str) (then {name}.var_names_make_unique() if some repeat)"
            )
    if covered(_unversioned(var_names)) >= MIN_QUERY_GENE_FRACTION:
        return (
            f"{name}.var_names are Ensembl IDs with a version (e.g. {var_names[0]!r}), the model's without: drop the "
            rf"versions first, {name}.var_names = {name}.var_names.str.replace(r'\.\d+$', '', regex=True)"
        )
    return _versions_advice(var_names, model_genes, name)


def _new_columns(config: Config) -> np.ndarray:
    """Which covariate columns of a query model belong to categories the reference lacked (boolean mask)."""
    new = []
    for key, names in config.categories:
        known = config.reference_categories.get(key, len(names))
        new += [False] * known + [True] * (len(names) - known)
    return np.array(new + [False] * len(config.continuous_covariate_keys), dtype=bool)


def _covariate_linears(vae: VAE) -> list[torch.nn.Linear]:
    """The layers whose input ends with the covariate vector: every hidden layer of the decoder (a linear decoder's
    heads), and of the encoder when it sees the covariates."""
    encoder = list(vae.encoder.body.linears) if vae.encoder.use_covariates else []
    return encoder + vae.decoder.covariate_linears()


def _graft_reference(reference: VAE, query: VAE) -> None:
    """Copy the reference's weights into ``query``: the columns of new categories start at zero, and the
    dispersion of a new batch (``"gene-batch"``) at the reference batches' mean."""
    columns = torch.as_tensor(np.flatnonzero(~_new_columns(query.config)))  # the reference's columns among the query's
    grafted = set()
    with torch.no_grad():
        for old, new in zip(_covariate_linears(reference), _covariate_linears(query)):
            width = new.in_features - query.config.n_covariates  # the hidden (or gene) input before the covariates
            new.weight.zero_()
            new.weight[:, :width] = old.weight[:, :width]
            new.weight[:, width + columns] = old.weight[:, width:]
            grafted.add(id(new.weight))
        old_state = dict(reference.named_parameters()) | dict(reference.named_buffers())
        for name, new in list(query.named_parameters()) + list(query.named_buffers()):
            if id(new) in grafted:
                continue
            old = old_state[name]
            if new.shape == old.shape:
                new.copy_(old)
            else:  # a "gene-batch" dispersion: one row per batch
                new[: len(old)] = old
                new[len(old) :] = old.mean(0)


def _query_parameters(query: VAE) -> list[tuple[torch.nn.Parameter, torch.Tensor | None]]:
    """The parameters a query model trains, with gradient masks (``None``: all of it): the covariate columns
    of categories new to the reference, new batches' dispersions, and the encoder's input layer if
    ``train_input_layer``. Empty for a model that :meth:`CellVAE.map_query` did not make."""
    config = query.config
    if not config.reference_categories:
        return []
    new = torch.as_tensor(_new_columns(config))
    trainable: list[tuple[torch.nn.Parameter, torch.Tensor | None]] = []
    if new.any():
        for linear in _covariate_linears(query):
            mask = torch.zeros_like(linear.weight)
            mask[:, linear.in_features - config.n_covariates :] = new.to(mask.dtype)
            trainable.append((linear.weight, mask))
    log_theta = getattr(query.decoder, "log_theta", None)
    n_reference_batches = config.reference_categories.get(config.batch_key, 0)
    if log_theta is not None and log_theta.dim() == 2 and len(log_theta) > n_reference_batches:
        mask = torch.zeros_like(log_theta)
        mask[n_reference_batches:] = 1.0
        trainable.append((log_theta, mask))
    if config.train_input_layer:
        first = query.encoder.body.linears[0]
        trainable = [(p, m) for p, m in trainable if p is not first.weight] + [(first.weight, None), (first.bias, None)]
    return trainable


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a device running out of memory (on an Apple GPU a plain RuntimeError)."""
    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "MPS backend out of memory" in str(error)
    )


def _raise_out_of_memory(error: RuntimeError, loader: data.CellLoader, batch_size: int, call: str, also: str = "") -> NoReturn:
    """Free what training held and raise ``error`` again with the ways to need less memory: ``call`` (begun, e.g.
    ``"fit("``) with half the batch size, and ``also`` what else to lower.

    The error's traceback holds training's frames (their optimizer state, model copies and CUDA graphs), and the
    loader holds the counts on the GPU: freed here, a retry (in an except block, or in Jupyter, which keeps the last
    error) finds the memory free."""
    loader.release_device()
    traceback.clear_frames(error.__traceback__)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    raise torch.OutOfMemoryError(
        f"the {loader.device.type} device ran out of memory training with batch_size={batch_size}; "
        f"pass a smaller batch_size (e.g. {call}batch_size={max(1, batch_size // 2)})){also}"
        + ("" if loader.device.type == "cpu" else ", or device='cpu'")
    ) from error


def _move(module: torch.nn.Module, device: str | torch.device) -> None:
    """Move ``module``'s weights to ``device`` as trainable tensors, also inside the caller's
    ``torch.inference_mode`` (where the moved copies would be inference tensors that training refuses)."""
    with autograd_on():
        module.to(device)


@contextmanager
def _reference_frozen(query: VAE) -> Iterator[None]:
    """While a query model trains, only :func:`_query_parameters` get gradients (the reference's columns of a
    shared layer are masked out), and BatchNorm layers keep the reference's statistics."""
    trainable = _query_parameters(query)
    query.requires_grad_(False)
    hooks = []
    for param, mask in trainable:
        param.requires_grad_(True)
        if mask is not None:
            mask = mask.to(param.device)
            hooks.append(param.register_hook(lambda grad, m=mask: grad * m))
    query.frozen_statistics = True
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        query.requires_grad_(True)
        query.frozen_statistics = False
