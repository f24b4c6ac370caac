"""Every hyperparameter of a model in one dataclass, with a JSON round-trip."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.version import InvalidVersion, Version

try:
    CELLVAE_VERSION = version("cellvae")  # written into every saved config
except PackageNotFoundError:  # running from a source tree that is not installed
    CELLVAE_VERSION = "0.0.0+local"
FORMAT_VERSION = 1
# Fields added to format 1 after its first readers: saved only where they differ from these defaults, so that a model
# not using them loads in a cellvae that lacks them (a newer field's default keeps the older behaviour; a field whose
# absence older readers would misread needs a new FORMAT_VERSION instead).
LATER_FIELD_DEFAULTS = {
    "normalization": "layer",
    "batch_mmd": 0.0,
    "reference_categories": {},
    "train_input_layer": False,
    "decoder": "mlp",
}
LIKELIHOODS = ("nb", "zinb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-cell")
POSTERIORS = ("diagonal", "full")
# Largest beta, free_bits or batch_mmd a new model accepts: far above any useful weight, far below float32 overflow.
MAX_WEIGHT = 1e6
ROLES = "the batch key and covariate keys together (each obs column has one role)"
NORMALIZATIONS = ("layer", "batch")
DECODERS = ("mlp", "linear")
REPR_ITEMS = 5  # items of a long list (the model's genes) that repr(config) shows
MIN_LAYER_NORMED_UNITS = 3  # LayerNorm of 1 unit gives its bias, of 2 units ±1: no information about the cell


@dataclass
class Config:
    """Architecture, objective and data layout of a :class:`~cellvae.CellVAE`.

    The data-dependent fields (gene names, category orders, covariate scaling) are filled
    from the AnnData the model was built on, so a saved model needs no AnnData to load.
    """

    gene_names: list[str] = field(default_factory=list)
    layer: str | None = None
    batch_key: str | None = None
    batch_categories: list[str] = field(default_factory=list)
    categorical_covariate_keys: list[str] = field(default_factory=list)
    categorical_covariate_categories: dict[str, list[str]] = field(default_factory=dict)
    continuous_covariate_keys: list[str] = field(default_factory=list)
    continuous_covariate_mean: list[float] = field(default_factory=list)
    continuous_covariate_std: list[float] = field(default_factory=list)
    n_latent: int = 10
    n_hidden: int = 128
    n_layers: int = 1
    decoder: str = "mlp"
    dropout: float = 0.1
    normalization: str = "layer"
    likelihood: str = "nb"
    dispersion: str = "gene"
    encode_batch: bool = True
    posterior: str = "diagonal"
    beta: float = 1.0
    kl_warmup: int | None = None
    free_bits: float = 0.0
    batch_mmd: float = 0.0
    # Set by map_query (empty for a model trained from scratch): how many of the categories of the batch key
    # and of each categorical covariate came from the reference. Their weights stay frozen whenever this model
    # trains; only the new categories' columns (and the input layer, if train_input_layer) are trained.
    reference_categories: dict[str, int] = field(default_factory=dict)
    train_input_layer: bool = False
    format_version: int = FORMAT_VERSION
    cellvae_version: str = ""

    def __repr__(self) -> str:
        """Every field, long lists (gene names, categories, covariate scaling) shortened to their first items and length."""

        def shown(value):
            if isinstance(value, list) and len(value) > REPR_ITEMS:
                return f"[{', '.join(map(repr, value[:REPR_ITEMS]))}, ... ({len(value)} in all)]"
            if isinstance(value, dict):
                return "{" + ", ".join(f"{key!r}: {shown(item)}" for key, item in value.items()) + "}"
            return repr(value)

        return f"Config({', '.join(f'{f.name}={shown(getattr(self, f.name))}' for f in fields(self))})"

    def __post_init__(self) -> None:
        # before the range checks compare them (a bool passes here as before: check_new_model refuses it in new models)
        for name in ("dropout", "beta", "free_bits", "batch_mmd"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        checks = [
            (self.likelihood in LIKELIHOODS, f"likelihood must be one of {LIKELIHOODS}, got {self.likelihood!r}"),
            (self.dispersion in DISPERSIONS, f"dispersion must be one of {DISPERSIONS}, got {self.dispersion!r}"),
            (self.posterior in POSTERIORS, f"posterior must be one of {POSTERIORS}, got {self.posterior!r}"),
            (self.decoder in DECODERS, f"decoder must be one of {DECODERS}, got {self.decoder!r}"),
            (
                self.normalization in NORMALIZATIONS,
                f"normalization must be one of {NORMALIZATIONS}, got {self.normalization!r}",
            ),
            (_is_positive_int(self.n_latent), f"n_latent must be a positive integer, got {self.n_latent!r}"),
            (_is_positive_int(self.n_hidden), f"n_hidden must be a positive integer, got {self.n_hidden!r}"),
            (_is_positive_int(self.n_layers), f"n_layers must be a positive integer, got {self.n_layers!r}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}"),
            (0.0 <= self.beta < math.inf, f"beta must be a non-negative finite number, got {self.beta!r}"),
            (0.0 <= self.free_bits < math.inf, f"free_bits must be a non-negative finite number, got {self.free_bits!r}"),
            (0.0 <= self.batch_mmd < math.inf, f"batch_mmd must be a non-negative finite number, got {self.batch_mmd!r}"),
            (
                self.kl_warmup is None or (isinstance(self.kl_warmup, int) and self.kl_warmup >= 0),
                f"kl_warmup must be None or a non-negative whole number of epochs, got {self.kl_warmup!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self._check_data_layout()
        if self.dispersion == "gene-batch" and not self.batch_key:
            raise ValueError("dispersion='gene-batch' needs a batch_key; pass batch_key=... or use dispersion='gene'")
        if self.batch_mmd > 0 and not self.batch_key:
            raise ValueError(
                "batch_mmd > 0 penalises differences between batches and needs a batch_key; pass batch_key=... or batch_mmd=0"
            )

    def check_new_model(self) -> None:
        """Stricter checks for a model being built (a saved model may hold values older cellvae accepted)."""
        for name, value in (("beta", self.beta), ("free_bits", self.free_bits), ("batch_mmd", self.batch_mmd)):
            if isinstance(value, bool) or not 0.0 <= value <= MAX_WEIGHT:
                raise ValueError(f"{name} must be a number from 0 to {MAX_WEIGHT:g}, got {value!r}")
        if isinstance(self.dropout, bool):
            raise ValueError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        for name in ("layer", "batch_key"):  # "" (an unset shell variable) would mean no layer or no batches
            if getattr(self, name) == "":
                raise ValueError(f"{name} is the empty string: give a key, or None (on the command line: leave the option out)")
        if isinstance(self.kl_warmup, bool):
            raise ValueError(f"kl_warmup must be None or a non-negative whole number of epochs, got {self.kl_warmup!r}")
        if self.normalization == "layer" and self.n_hidden < MIN_LAYER_NORMED_UNITS:
            raise ValueError(
                f"n_hidden={self.n_hidden} with normalization='layer': LayerNorm over {self.n_hidden} unit(s) leaves "
                "every cell the same hidden values (one unit: its bias; two: ±1), so all cells would embed alike; "
                f"use n_hidden of at least {MIN_LAYER_NORMED_UNITS} (the default is 128), or normalization='batch'"
            )
        roles = ([self.batch_key] if self.batch_key else []) + self.categorical_covariate_keys + self.continuous_covariate_keys
        _check_names(roles, ROLES)
        if self.likelihood == "poisson" and self.dispersion != "gene":
            raise ValueError(
                f"a Poisson likelihood has no dispersion, so dispersion={self.dispersion!r} would be ignored; "
                "leave dispersion='gene' (the default) or use likelihood='nb'"
            )

    def _check_data_layout(self) -> None:
        """The fields read from the AnnData: names unique strings, one list of categories per key."""
        for name in ("gene_names", "batch_categories", "categorical_covariate_keys", "continuous_covariate_keys"):
            _check_names(getattr(self, name), name)
        for name in ("layer", "batch_key"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be None or an obs/layers key (a string), got {getattr(self, name)!r}")
        if not self.gene_names:
            raise ValueError("gene_names is empty: a model needs at least one gene")
        if not isinstance(self.encode_batch, bool):
            raise ValueError(f"encode_batch must be True or False, got {self.encode_batch!r}")
        categories = self.categorical_covariate_categories
        if not isinstance(categories, dict) or list(categories) != list(self.categorical_covariate_keys):
            raise ValueError(
                "categorical_covariate_categories must map each of categorical_covariate_keys "
                f"{self.categorical_covariate_keys} to its categories, in that order"
            )
        for key, values in categories.items():
            _check_names(values, f"the categories of {key!r}")
            if not values:
                raise ValueError(f"categorical covariate {key!r} has no categories")
        keys = [key for key, _ in self.categories]
        known = {key: len(names) for key, names in self.categories}
        reference = self.reference_categories
        if not isinstance(reference, dict) or any(
            key not in known or not _is_positive_int(n) or n > known[key] for key, n in reference.items()
        ):
            raise ValueError(
                f"reference_categories must map batch/categorical covariate keys {keys} to how many of their "
                f"categories the reference had (1 to all of them), got {reference!r}"
            )
        if not isinstance(self.train_input_layer, bool):
            raise ValueError(f"train_input_layer must be True or False, got {self.train_input_layer!r}")
        for name in ("continuous_covariate_mean", "continuous_covariate_std"):
            values = getattr(self, name)
            numbers = isinstance(values, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if not numbers or len(values) != len(self.continuous_covariate_keys):
                raise ValueError(f"{name} must hold one number per continuous covariate key, got {values!r}")
            if not all(math.isfinite(v) and (v > 0 or name.endswith("mean")) for v in values):
                kind = "finite numbers" if name.endswith("mean") else "finite positive numbers"
                raise ValueError(f"{name} must hold {kind} (each covariate is scaled by them), got {values!r}")

    @property
    def n_genes(self) -> int:
        return len(self.gene_names)

    @property
    def n_batches(self) -> int:
        return max(len(self.batch_categories), 1)

    @property
    def categories(self) -> list[tuple[str, list[str]]]:
        """(key, categories) of the batch key and of each categorical covariate, in the covariate vector's
        order (a list: models saved by older cellvae may use one key in two roles)."""
        batch = [(self.batch_key, self.batch_categories)] if self.batch_key else []
        return batch + [(key, self.categorical_covariate_categories[key]) for key in self.categorical_covariate_keys]

    @property
    def n_covariates(self) -> int:
        """Width of the covariate vector: batch one-hot, other one-hots, continuous values."""
        return sum(len(names) for _, names in self.categories) + len(self.continuous_covariate_keys)

    def to_json(self, path: str | Path) -> None:
        values = {k: v for k, v in asdict(self).items() if k not in LATER_FIELD_DEFAULTS or v != LATER_FIELD_DEFAULTS[k]}
        Path(path).write_text(json.dumps(values, indent=2))

    @classmethod
    def from_json(cls, path: str | Path) -> Config:
        """Read a config written by :meth:`to_json`, refusing unknown format versions."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{path} is not a readable cellvae config.json ({error})") from error
        if not isinstance(raw, dict):
            raise ValueError(f"{path} is not a cellvae config.json: expected a JSON object")
        version = raw.get("format_version")
        if not _is_positive_int(version):
            raise ValueError(f"{path} has no valid format_version (got {version!r}); is it a cellvae model?")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{path} has model format version {version}, this cellvae reads versions up to "
                f"{FORMAT_VERSION}; upgrade cellvae to load it"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            saved_by = raw.get("cellvae_version")
            if _is_newer(saved_by, CELLVAE_VERSION):
                raise ValueError(
                    f"{path} has config fields this cellvae does not know, {unknown}: it was saved by cellvae {saved_by}, "
                    f"newer than this one ({CELLVAE_VERSION}); upgrade cellvae to load it"
                )
            raise ValueError(
                f"{path} has config fields this cellvae does not know, {unknown}: mistyped, or saved by a newer build of "
                "cellvae (then upgrade cellvae); or is it no cellvae model?"
            )
        missing = sorted(known - set(raw) - set(LATER_FIELD_DEFAULTS))  # (save writes the others where not at their default)
        if missing:  # a default in their place could read the counts elsewhere (layer) or change the model without a word
            raise ValueError(
                f"{path} lacks config fields that save writes into every config.json, {missing}: it was edited or damaged; "
                "use the folder as save wrote it"
            )
        try:
            return cls(**raw)
        except TypeError as error:  # a field of the wrong type, e.g. dropout="high"
            raise ValueError(f"{path} has a field of the wrong type ({error}); is it a cellvae model?") from error
        except ValueError as error:
            raise ValueError(f"{path} is not a valid cellvae config: {error}") from error


def _check_names(values: object, name: str) -> None:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{name} must be a list of strings, got {values!r:.200}")
    check_unique(values, name)


def check_unique(values: list, name: str) -> None:
    """Refuse a list of names that holds one twice, naming those (up to 5)."""
    if len(set(values)) != len(values):
        duplicated = sorted((v for v, n in Counter(values).items() if n > 1), key=str)[:5]
        raise ValueError(f"{name} must be unique; duplicated: {duplicated}")


def _is_newer(version: object, than: str) -> bool:
    """Whether ``version`` (a config's ``cellvae_version``) is a release after ``than``."""
    try:  # (a source tree run uninstalled is "0.0.0+local": no telling which is newer)
        return isinstance(version, str) and not Version(than).local and Version(version) > Version(than)
    except InvalidVersion:
        return False


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
