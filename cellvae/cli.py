"""The ``cellvae`` command line: ``demo``, ``fit`` and ``embed``."""

from __future__ import annotations

import argparse
import math
import os
import re
import shlex
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

from cellvae.config import DISPERSIONS, LIKELIHOODS

DESCRIPTION = """cellvae: a negative-binomial VAE for single-cell RNA-seq counts.

  cellvae demo                          train on the bundled PBMC example, write UMAP plots
  cellvae fit IN.h5ad --out OUT.h5ad --model-dir DIR [--batch-key batch --layer counts]
  cellvae fit IN.zarr ...               the same from a Zarr store, its counts streamed from disk
  cellvae fit IN.h5ad --backed ...      the same, the .h5ad's counts streamed from disk
  torchrun --nproc_per_node=N -m cellvae.cli fit ...   the same, data-parallel over N processes
  cellvae embed IN.h5ad --model-dir DIR --out OUT.h5ad [--layer counts]
"""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        hint = _input_taken_as_a_key(sys.argv[1:] if argv is None else argv)
        if exit.code == 2 and hint:
            print(hint, file=sys.stderr)
        raise
    if args.command is None:
        parser.print_help()
        return 1
    if args.command != "fit" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # every process would write the same outputs (one then failing on the other's "--out exists")
        raise SystemExit(
            f"error: cellvae {args.command} runs in one process: run it without torchrun (only cellvae fit trains data-parallel)"
        )
    if argv is None:  # run from the shell (main([...]) from Python keeps its backend and warning format)
        import matplotlib

        matplotlib.use("Agg")  # figures only go to files
        # warnings as one line each: the source line they would name is cellvae's or runpy's, not the user's
        warnings.formatwarning = lambda message, category, *_: f"{category.__name__}: {in_command_line_terms(str(message))}\n"
    try:
        return args.run(args)
    except KeyboardInterrupt:  # one line, not a traceback (fit tells what it wrote when Ctrl-C stopped training)
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, KeyError, TypeError, OSError, FloatingPointError, RuntimeError) as error:
        # bad input found by cellvae, anndata, h5py or the file system, training that failed (non-finite
        # losses, out of memory): its message, not a traceback
        if isinstance(error, RuntimeError) and type(error).__name__ != "OutOfMemoryError":
            raise
        message = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
        raise SystemExit(f"error: {in_command_line_terms(message)}") from error


def in_command_line_terms(message: str) -> str:
    """An error's or warning's advice, given in Python's terms, with the command line's options."""
    message = message.replace("pass overwrite=True", "pass --overwrite")
    message = message.replace("device='auto' or 'cpu'", "--device auto or --device cpu")
    message = message.replace("call fit(resume=False) to start over", "leave out --resume to start over")
    message = message.replace("fit(..., resume=True) continues", "--resume continues")
    message = message.replace("mask_var ", "--mask-var ")
    message = re.sub(r"pass layer='([^']+)'", lambda found: f"pass --layer {shlex.quote(found[1])}", message)
    # a trained model's counts from another layer: embed's --layer reads them and puts them where the model reads them
    another_layer = r"(give the model ad\.AnnData\(X=adata\.layers\['([^']+)'\], obs=adata\.obs, var=adata\.var\)"
    another_layer += r"|put them where the model reads them, adata\.layers\['[^']+'\] = adata\.layers\['([^']+)'\])"
    message = re.sub(another_layer, lambda found: f"pass --layer {shlex.quote(found[2] or found[3])}", message)
    message = message.replace("leave out layer= (layer=None reads X)", "leave out --layer (or pass --layer X)")
    message = re.sub(
        r"adata\.X holds whole counts: adata\.layers\['[^']+'\] = adata\.X", "adata.X holds whole counts: pass --layer X", message
    )
    notes = []
    for dispersion in ("gene-batch", "gene-cell"):
        if f"dispersion='{dispersion}'" in message:
            notes.append(f"--dispersion {dispersion} sets dispersion='{dispersion}'")
    if "layer=" in message:
        notes.append("--layer NAME reads the counts from adata.layers[NAME]")
    if "map_query(" in message:
        notes.append("there is no mapping: map new batches onto the model with the Python API")
    return message + "".join(f"\n(on the command line: {note})" for note in notes)


def _input_taken_as_a_key(words: list[str]) -> str | None:
    """Advice where an option taking several keys also took the input file (argparse's error says only that
    the input is missing)."""
    for position, word in enumerate(words):
        if word not in ("--categorical-covariate-keys", "--continuous-covariate-keys"):
            continue
        for value in words[position + 1 :]:
            if value.startswith("-"):
                break
            store = Path(value)
            is_store = any((store / name).exists() for name in ("zarr.json", ".zgroup"))  # Zarr v3, v2
            if value.rstrip("/").endswith((".h5ad", ".zarr")) or store.is_file() or is_store:
                return (
                    f"{word} took {value!r} as a key (it takes every word up to the next option); "
                    f"put the input first: cellvae fit {value} {word} ..."
                )
    return None


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a random seed, a whole number in 0 .. 2**32 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must be a whole number from 0 to 4294967295, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellvae", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(command=None)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train on the bundled PBMC example and plot its UMAP")
    demo.add_argument("--out-dir", default="cellvae_demo", help="folder for the results (default: cellvae_demo)")
    demo.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: chosen from data size)")
    demo.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(command="demo", run=run_demo)

    fit = commands.add_parser("fit", help="train a model on an .h5ad or .zarr of raw counts and embed it")
    fit.add_argument("input", help="input .h5ad with raw counts, or a .zarr store (its counts are streamed from disk)")
    fit.add_argument(
        "--out", required=True, help="output .h5ad with embedding, neighbours, UMAP and Leiden clusters (see --embedding-only)"
    )
    fit.add_argument("--model-dir", required=True, help="folder to save the trained model in")
    fit.add_argument(
        "--backed",
        action="store_true",
        help="stream the counts of an .h5ad from disk instead of loading them (for files larger than memory; "
        "under torchrun each process then reads only its own part of the cells)",
    )
    fit.add_argument("--layer", default=None, help="layer with the raw counts, or X (default: X)")
    fit.add_argument(
        "--mask-var",
        default=None,
        help="boolean var column of the genes to train on, e.g. highly_variable (default: every gene; with batches, "
        "about 2,000 variable genes integrate better)",
    )
    fit.add_argument("--batch-key", default=None, help="obs column of batches to integrate")
    fit.add_argument(
        "--categorical-covariate-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="obs columns of further categorical covariates (e.g. donor, technology) the model conditions on",
    )
    fit.add_argument(
        "--continuous-covariate-keys",
        nargs="+",
        default=None,
        metavar="KEY",
        help="obs columns of continuous covariates (e.g. percent mitochondrial counts) the model conditions on",
    )
    fit.add_argument("--key-added", default="X_cellvae", help="obsm key of the embedding (default: X_cellvae)")
    fit.add_argument("--n-latent", type=positive_int, default=10, help="latent dimensions (default: 10)")
    fit.add_argument("--likelihood", choices=LIKELIHOODS, default="nb", help="count likelihood (default: nb)")
    fit.add_argument(
        "--dispersion", choices=DISPERSIONS, default="gene", help="dispersion per gene (default), gene and batch, or cell"
    )
    fit.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: chosen from data size)")
    fit.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default: 128)")
    fit.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    fit.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    fit.add_argument(
        "--precision",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the gene-wide matrix multiplies while training (default: float32)",
    )
    fit.add_argument(
        "--embedding-only",
        action="store_true",
        help="write only the embedding (obsm[KEY_ADDED] and its settings in uns['cellvae'], or in uns[KEY_ADDED] "
        "for another key) to --out, without neighbours, UMAP and Leiden "
        "(for atlases where you run those yourself, e.g. on a GPU)",
    )
    fit.add_argument("--overwrite", action="store_true", help="replace an existing model directory and --out file")
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument(
        "--checkpoint-dir",
        default=None,
        help="folder for a training checkpoint written after every epoch (one file per process under torchrun)",
    )
    fit.add_argument(
        "--resume",
        action="store_true",
        help="continue the run saved in --checkpoint-dir (same input and options, same number of torchrun processes); "
        "ends with the same model as an uninterrupted run",
    )
    fit.set_defaults(command="fit", run=run_fit)

    embed = commands.add_parser("embed", help="embed an .h5ad or .zarr of raw counts with a saved model")
    embed.add_argument("input", help="input .h5ad or .zarr store with the model's genes as raw counts")
    embed.add_argument("--model-dir", required=True, help="folder of a model saved by 'cellvae fit'")
    embed.add_argument(
        "--out",
        required=True,
        help="output .h5ad with the embedding in obsm and its record in uns['cellvae'] (uns[KEY_ADDED] for another key)",
    )
    embed.add_argument("--key-added", default="X_cellvae", help="obsm key of the embedding (default: X_cellvae)")
    embed.add_argument(
        "--layer",
        default=None,
        help="layer with the raw counts, or X (default: where the model read them in training)",
    )
    embed.add_argument("--backed", action="store_true", help="stream the counts of an .h5ad from disk instead of loading them")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    embed.set_defaults(command="embed", run=run_embed)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    import matplotlib.pyplot as plt
    import scanpy as sc

    from cellvae import datasets, pl, tl

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc68k()
    print(f"cellvae demo: {adata.n_obs} PBMCs × {adata.n_vars} genes (scanpy's pbmc68k_reduced, raw counts restored)")
    model = tl.embed(adata, random_state=args.seed, max_epochs=args.epochs, progress=not args.quiet)
    _neighbours_umap_leiden(adata, "X_cellvae", args.seed)
    h5ad = out_dir / "pbmc68k.h5ad"
    adata.write_h5ad(h5ad)
    umap_png = out_dir / "umap_cell_type.png"
    figure = sc.pl.umap(adata, color=["cell_type", "leiden"], show=False, return_fig=True, wspace=0.6)
    figure.savefig(umap_png, dpi=150, bbox_inches="tight")
    plt.close(figure)
    history_png = out_dir / "training_history.png"
    pl.history(model, show=False, save=str(history_png))
    model.save(out_dir / "model", overwrite=True)
    print(f"trained {len(model.history)} epochs; wrote:")
    for path in (h5ad, umap_png, history_png, out_dir / "model"):
        print(f"  {path}")
    return 0


def run_fit(args: argparse.Namespace) -> int:

    from cellvae import CellVAE, tl
    from cellvae.train import pick_device, rank_and_world, setup_distributed

    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("error: --resume needs the --checkpoint-dir of the run to continue")
    _check_input_and_output(args)
    _check_model_dir(args)
    layer = None if args.layer == "X" else args.layer
    adata = _read(args.input, backed=args.backed, layer=layer)
    setup_distributed(pick_device(args.device))  # joins the process group under torchrun (else does nothing)
    model_kwargs = {
        "layer": layer,
        "batch_key": args.batch_key,
        "categorical_covariate_keys": args.categorical_covariate_keys,
        "continuous_covariate_keys": args.continuous_covariate_keys,
        "n_latent": args.n_latent,
        "likelihood": args.likelihood,
        "dispersion": args.dispersion,
    }
    fit_kwargs = {
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
    }
    tl._check_embed(adata, args.key_added, model_kwargs, fit_kwargs)  # on every rank: all stop at a bad key alike
    genes = tl._genes_to_train(adata, args.mask_var)  # (checked here, before any work)
    if rank_and_world()[0] > 0:  # under torchrun every rank trains the same model; rank 0 embeds and writes it
        CellVAE(genes, **model_kwargs).fit(max_epochs=args.epochs, random_state=args.seed, progress=False, **fit_kwargs)
        return 0
    replaced = args.key_added in adata.obsm  # an earlier embedding, whose graph and UMAP the input may hold
    model = tl.embed(
        adata,
        mask_var=args.mask_var,
        key_added=args.key_added,
        random_state=args.seed,
        max_epochs=args.epochs,
        progress=not args.quiet,
        fit_kwargs=fit_kwargs,
        **model_kwargs,
    )
    model.save(args.model_dir, overwrite=args.overwrite)  # first, so that a failure below loses no training
    print(f"trained {len(model.history)} epochs; saved the model in {args.model_dir}")
    interrupted = bool(model.history.attrs.get("interrupted"))  # Ctrl-C in training: keep what was trained
    graph_stopped, graph_error = False, None
    if not interrupted and not args.embedding_only:
        try:
            _neighbours_umap_leiden(adata, args.key_added, args.seed)
        except KeyboardInterrupt:
            graph_stopped = True
        except Exception as error:  # scanpy's graph code, not cellvae's: keep the embedding
            graph_error = error
    graph_computed = not (interrupted or args.embedding_only or graph_stopped or graph_error is not None)
    if not graph_computed:  # the output keeps the input's graph, UMAP and clusters: say where they are stale
        _warn_if_graph_is_stale(adata, args.key_added, replaced)
    try:
        _write(adata, args.out)
    except (OSError, KeyboardInterrupt) as error:
        earlier = " (the file there is from an earlier run)" if Path(args.out).is_file() else ""
        told = f"could not write {args.out}{earlier}; the model is saved in {args.model_dir}"
        if isinstance(error, KeyboardInterrupt):
            print(f"interrupted: {told}", file=sys.stderr)
            return 130
        raise SystemExit(f"error: {told} ({type(error).__name__}: {error})") from error
    if interrupted:
        resume = " (continue with --resume --overwrite)" if args.checkpoint_dir else ""
        print(f"interrupted: wrote {args.out} with obsm[{args.key_added!r}] of the best epoch so far{resume}", file=sys.stderr)
        return 130
    only = f"wrote {args.out} with obsm[{args.key_added!r}] only (the model is saved): run them with scanpy"
    if graph_stopped:
        print(f"interrupted: neighbours/UMAP/Leiden stopped; {only}", file=sys.stderr)
        return 130
    if graph_error is not None:
        failed = f"{type(graph_error).__name__}: {graph_error}"
        raise SystemExit(f"error: neighbours/UMAP/Leiden failed ({failed}); {only}") from graph_error
    print(f"wrote {args.out} (obsm[{args.key_added!r}]{'' if args.embedding_only else ', UMAP, leiden'})")
    return 0


def run_embed(args: argparse.Namespace) -> int:

    from cellvae import CellVAE, tl
    from cellvae.data import counts_location, layer_names

    _check_input_and_output(args)
    model_dir, out = Path(args.model_dir).expanduser().resolve(), Path(args.out).expanduser().resolve()
    if out == model_dir or model_dir in out.parents:
        raise SystemExit("error: --out must not be --model-dir or inside it (it would replace the model's files)")
    model = CellVAE.load(args.model_dir, load_anndata=False)  # the weights alone: the input is what gets embedded
    layer = model.config.layer if args.layer is None else None if args.layer == "X" else args.layer
    adata = _read(args.input, backed=args.backed, layer=layer)
    if layer is not None and layer not in adata.layers:
        trained = " (where the model read its counts in training)" if args.layer is None else ""
        raise SystemExit(
            f"error: {args.input} has no layers[{layer!r}]{trained}; name the counts' place with --layer NAME, "
            f"or --layer X (layers here: {layer_names(adata)})"
        )
    tl._check_record_is_its_own(adata, args.key_added, tl._uns_key(args.key_added))
    counts = _counts_where_model_reads(adata, layer, model.config.layer)
    replaced = args.key_added in adata.obsm
    try:
        adata.obsm[args.key_added] = model.get_latent(counts)
    except (ValueError, TypeError) as error:  # the checks name the model's place, where the counts were put for it
        if counts is adata:
            raise
        moved_from, moved_to = counts_location(layer), counts_location(model.config.layer)
        raise type(error)(str(error).replace(moved_to, moved_from)) from error
    _record_embedding(adata, args.key_added, model, args.model_dir, layer, replaced)
    _write(adata, args.out)
    print(f"wrote {args.out} with obsm[{args.key_added!r}] ({adata.n_obs} cells × {model.config.n_latent})")
    return 0


def _counts_where_model_reads(adata, layer: str | None, model_layer: str | None):
    """``adata`` itself if its counts are where the model reads them, else an AnnData with its obs (for
    the covariates), its gene names and the same matrix, not copied, in that place."""
    import anndata as ad
    import pandas as pd

    from cellvae.data import count_matrix

    if layer == model_layer:
        return adata
    counts = count_matrix(adata, layer)
    names = {"obs": adata.obs, "var": pd.DataFrame(index=adata.var_names)}
    return ad.AnnData(X=counts, **names) if model_layer is None else ad.AnnData(layers={model_layer: counts}, **names)


def _record_embedding(adata, key_added: str, model, model_dir: str, layer: str | None, replaced: bool) -> None:
    """``embed``'s record in ``uns`` (where ``tl.embed`` keeps its settings; ``layer``: where the counts were read,
    ``None`` for X), replacing an earlier fit's, and a warning where the input held an ``obsm[key_added]``
    (``replaced``) and a graph or UMAP likely made from it."""
    from cellvae import tl

    uns_key = tl._uns_key(key_added)
    record = adata.uns.get(uns_key)
    if record is None or (isinstance(record, Mapping) and "epochs_trained" in record.get("params", {})):
        params = {"key_added": key_added, "model_dir": str(model_dir), "layer": layer}
        params |= {"batch_key": model.config.batch_key, "epochs_trained": int(len(model.history))}
        adata.uns[uns_key] = {**(record or {}), "params": {k: v for k, v in params.items() if v is not None}}
    _warn_if_graph_is_stale(adata, key_added, replaced)


def _warn_if_graph_is_stale(adata, key_added: str, replaced: bool) -> None:
    """A warning where the input held an ``obsm[key_added]`` (``replaced``), now replaced, and a graph or UMAP likely
    made from it, which the output keeps (``cellvae embed``; ``cellvae fit`` where it computed no graph)."""
    neighbours = adata.uns.get("neighbors", {})
    made_from_it = isinstance(neighbours, Mapping) and neighbours.get("params", {}).get("use_rep") == key_added
    if replaced and (made_from_it or "X_umap" in adata.obsm):
        print(
            f"warning: the input's neighbours, UMAP and Leiden clusters were made from an earlier obsm[{key_added!r}]; "
            f"recompute them from the new one, e.g. sc.pp.neighbors(adata, use_rep={key_added!r})",
            file=sys.stderr,
        )


def _check_input_and_output(args: argparse.Namespace) -> None:
    """Fail before any work, not after training, on --backed misuse, a bad --key-added or an --out that
    cannot (or may not) be written."""
    if args.backed and Path(args.input).is_dir():
        raise SystemExit("error: --backed is for .h5ad files; a .zarr store is always streamed from disk")
    out = args.out
    if Path(out).resolve() == Path(args.input).resolve():
        raise SystemExit("error: --out is the input file; give another path (the input is never replaced)")
    if Path(out).is_dir():
        raise SystemExit(f"error: --out {out} is a folder; give the path of the .h5ad file to write")
    folder = Path(out).resolve().parent
    if not folder.is_dir():
        raise SystemExit(f"error: the folder of --out {out} does not exist; create it first")
    if Path(out).exists() and not args.overwrite:
        raise SystemExit(f"error: --out {out} exists; pass --overwrite to replace it")
    if not args.key_added or "/" in args.key_added:
        raise SystemExit(f"error: --key-added must be a non-empty obsm key without '/', got {args.key_added!r}")
    if args.command == "fit" and args.key_added in GRAPH_KEYS and not args.embedding_only:
        raise SystemExit(
            f"error: --key-added {args.key_added} would be overwritten by what fit's neighbours, Leiden and UMAP "
            f"write ({', '.join(GRAPH_KEYS)}); choose another key"
        )


def _check_model_dir(args: argparse.Namespace) -> None:
    """Fail before training, not after it, where the model could not be saved in --model-dir."""
    from cellvae.model import is_model_folder

    model_dir = Path(args.model_dir).expanduser()
    resolved = model_dir.resolve()
    if model_dir.name in ("", ".", "..") or resolved.name in ("", ".", ".."):
        raise SystemExit(f"error: --model-dir needs a folder name for the model, e.g. my_model/, got {args.model_dir!r}")
    blocked = next((path for path in (resolved, *resolved.parents) if path.exists() and not path.is_dir()), None)
    if blocked is not None:
        raise SystemExit(f"error: --model-dir {args.model_dir} cannot be made: {blocked} is a file")
    if model_dir.exists():
        if not args.overwrite:
            raise SystemExit(f"error: model directory {args.model_dir} exists; pass --overwrite to replace it")
        if not is_model_folder(model_dir):
            raise SystemExit(
                f"error: {args.model_dir} holds files that are not a saved cellvae model; --overwrite replaces only a "
                "model folder: choose a new --model-dir or remove it yourself"
            )
    checkpoints = None if args.checkpoint_dir is None else Path(args.checkpoint_dir).resolve()
    nested = checkpoints is not None and (checkpoints in (resolved, *resolved.parents) or resolved in checkpoints.parents)
    if nested:
        raise SystemExit("error: --checkpoint-dir and --model-dir must be separate folders, neither inside the other")
    out = Path(args.out).resolve()
    if out == resolved or resolved in out.parents:
        raise SystemExit("error: --out must not be --model-dir or inside it")
    if checkpoints is not None and (out == checkpoints or checkpoints in out.parents):
        raise SystemExit("error: --out must not be --checkpoint-dir or inside it")


def _write(adata, out: str) -> None:
    """Write ``adata`` to a new file beside ``out``, then move it into place: never a half-written file, nor
    one mixed with an old one (anndata writes a backed AnnData into an existing file)."""
    import anndata as ad

    target = Path(out)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial.h5ad")
    try:
        # An input written by anndata 0.13 with pandas 3 holds pandas string arrays, which anndata 0.12 writes
        # only when allowed; the output keeps them as the input stored them.
        with ad.settings.override(allow_write_nullable_strings=True):
            if any(_on_disk(matrix) for matrix in _matrices(adata)):
                _write_copying_on_disk_matrices_in_blocks(adata, partial)
            else:
                ad.AnnData.write_h5ad(adata, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


COPY_BLOCK = 1 << 24  # stored values (or dense rows × genes) copied at once from a backed input to --out


def _matrices(adata) -> list:
    return [adata.X, *adata.layers.values(), *([adata.raw.X] if adata.raw is not None else [])]


def _on_disk(elem) -> bool:
    import h5py
    import zarr
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(elem, (CSRDataset, CSCDataset, h5py.Dataset, zarr.Array))


def _write_copying_on_disk_matrices_in_blocks(adata, path: Path) -> None:
    """Write ``adata`` as anndata would, but copy its count matrices that are still on disk (a backed file,
    a Zarr store) a block at a time: anndata reads each stored array of a sparse one into memory whole, which
    for a file larger than memory would fail after training."""
    import h5py
    from anndata.experimental import write_dispatched

    def write(write_elem, store, key, elem, *, dataset_kwargs, iospec) -> None:
        if elem is None and key.rsplit("/", 1)[-1] == "raw" and store.name == "/":
            return  # no raw: nothing is written (as anndata's write_h5ad), not an element "raw" holding None
        if not _on_disk(elem):
            write_elem(store, key, elem, dataset_kwargs=dataset_kwargs)
        elif hasattr(elem, "format"):  # anndata's backed CSR/CSC: its three arrays, as anndata stores them
            group = store.require_group(key)
            group.attrs.update({"encoding-type": f"{elem.format}_matrix", "encoding-version": "0.1.0"})
            group.attrs["shape"] = tuple(int(n) for n in elem.shape)
            for name in ("data", "indices", "indptr"):  # resizable, as anndata writes them (for appending)
                _copy_in_blocks(elem.group[name], group, name, COPY_BLOCK, maxshape=(None,))
        else:  # a dense array, whole rows at a time
            rows = max(1, COPY_BLOCK // max(1, math.prod(elem.shape[1:])))
            _copy_in_blocks(elem, store, key, rows)
            store[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    adata.strings_to_categoricals()  # as anndata's write_h5ad does
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    with h5py.File(path, "w") as file:
        write_dispatched(file, "/", adata, callback=write)


def _copy_in_blocks(source, group, name: str, rows: int, maxshape: tuple | None = None) -> None:
    target = group.create_dataset(name, shape=source.shape, dtype=source.dtype, maxshape=maxshape)
    for start in range(0, source.shape[0], rows):
        target[start : start + rows] = source[start : start + rows]


def _read(path: str, backed: bool = False, layer: str | None = None):
    """An .h5ad read into memory (or opened read-only with ``backed``), or a .zarr store whose counts stay on disk."""
    import anndata as ad

    source = Path(path)
    if not source.exists():
        raise SystemExit(f"error: input {path} does not exist")
    try:
        if source.is_dir():
            from cellvae import read_zarr_lazy

            return read_zarr_lazy(source)
        if backed and layer is not None:  # anndata's backed mode would read the layer into memory
            import h5py

            from cellvae.data import read_lazily

            adata = read_lazily(h5py.File(source, "r"))  # open while the process runs, like a backed file
        else:
            adata = ad.read_h5ad(source, backed="r" if backed else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise SystemExit(f"error: could not read {path} as an AnnData ({type(error).__name__}: {error})") from error
    if not isinstance(adata, ad.AnnData):
        raise SystemExit(f"error: could not read {path} as an AnnData (it holds a {type(adata).__name__})")
    return adata


# What _neighbours_umap_leiden writes besides obs["leiden"] and obsp: an embedding under one of these keys
# would lose its uns record (or, X_umap, itself) to scanpy.
GRAPH_KEYS = ("X_umap", "neighbors", "leiden", "umap")


def _neighbours_umap_leiden(adata, key: str, seed: int) -> None:
    """Neighbour graph, Leiden clusters and UMAP of ``obsm[key]``, computed on an AnnData of that embedding
    alone and added to ``adata`` at the end: a failure or Ctrl-C on the way leaves ``adata`` as it was (not a
    new graph and clusters beside an input's earlier UMAP)."""
    import anndata as ad
    import pandas as pd
    import scanpy as sc

    graph = ad.AnnData(obs=pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str)), obsm={key: adata.obsm[key]})
    sc.pp.neighbors(graph, use_rep=key, random_state=seed)
    # Leiden first: scanpy's UMAP changes obsp["connectivities"] in place, so clusters found after it
    # would differ from those of the same graph in a notebook (neighbors, leiden, umap)
    sc.tl.leiden(graph, random_state=seed, flavor="igraph", n_iterations=2, directed=False)
    sc.tl.umap(graph, random_state=seed)
    adata.obs["leiden"] = graph.obs["leiden"].array
    adata.obsp.update(graph.obsp)
    adata.obsm["X_umap"] = graph.obsm["X_umap"]
    adata.uns.update(graph.uns)


if __name__ == "__main__":
    sys.exit(main())
