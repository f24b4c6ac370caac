"""The ``cellvae`` command line: ``demo``, ``fit``, ``embed`` and ``map``."""

from __future__ import annotations

import argparse
import ast
import io
import math
import os
import re
import shlex
import signal
import sys
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, redirect_stderr
from dataclasses import dataclass
from pathlib import Path

from cellvae.config import CELLVAE_VERSION, DECODERS, DISPERSIONS, LIKELIHOODS

DESCRIPTION = """cellvae: a negative-binomial VAE for single-cell RNA-seq counts.

  cellvae demo                          train on the bundled PBMC example, write UMAP plots
  cellvae fit IN.h5ad --out OUT.h5ad --model-dir DIR [--batch-key batch --layer counts]
  cellvae fit IN.zarr ...               the same from a Zarr store, its counts streamed from disk
  cellvae fit IN.h5ad --backed ...      the same, the .h5ad's counts streamed from disk
  torchrun --nproc_per_node=N -m cellvae.cli fit ...   the same, data-parallel over N processes
  cellvae embed IN.h5ad --model-dir DIR --out OUT.h5ad [--layer counts]
  cellvae map QUERY.h5ad --model-dir DIR --out OUT.h5ad [--reference REF.h5ad --labels-key cell_type]
                                        map new batches onto a reference model, transfer its labels
"""
VAR_NAMES_HELP = (
    "var column that names the genes as the model does, e.g. feature_name where var_names are Ensembl IDs "
    "(default: var_names; a repeated name stays with its first gene, as var_names_make_unique() leaves it)"
)


def main(argv: list[str] | None = None) -> int:
    """Run the ``cellvae`` command with ``argv`` (``None``: the process's arguments); returns its exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit:
        words = sys.argv[1:] if argv is None else argv
        hint = _input_taken_as_a_key(words) or _options_meant(words, parser)
        if exit.code == 2 and hint:
            print(hint, file=sys.stderr)
        raise
    if args.command is None:  # (as argparse tells a missing argument: usage on stderr, exit status 2)
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: name a command, e.g. {parser.prog} demo (or {parser.prog} --help)", file=sys.stderr)
        return 2
    for option in PATH_OPTIONS:  # "~/x" quoted (or from a pipeline's config) is the home's, as the shell would read it
        if isinstance(getattr(args, option, None), str):
            setattr(args, option, os.path.expanduser(getattr(args, option)))
    if args.command != "fit" and int(os.environ.get("WORLD_SIZE") or 1) > 1:  # (torch is not loaded for this)
        # every process would write the same outputs (one then failing on the other's "--out exists")
        raise SystemExit(
            f"error: cellvae {args.command} runs in one process: run it without torchrun (only cellvae fit trains data-parallel)"
        )
    if argv is None:  # run from the shell (main([...]) from Python keeps its backend and warning format)
        import matplotlib

        matplotlib.use("Agg")  # figures only go to files
        # warnings as one line each (the source line they would name is cellvae's or runpy's, not the user's), and
        # each once: a check that a later step repeats (map_query, then get_latent) would tell it again
        shown: set[str] = set()

        def show_once(text, category, *_args, **_kwargs) -> None:
            told = in_command_line_terms(str(text), args)  # (a warning's fix in Python is for the next run: this one goes on)
            told = told.replace(
                "(on the command line: no cellvae option does this; fix", "(on the command line: this run goes on; fix"
            )
            line = f"{category.__name__}: {told}"
            if line not in shown:
                shown.add(line)
                print(line, file=sys.stderr)

        warnings.showwarning = show_once
        # a path or batch name that the console's encoding lacks (Windows' ANSI code page, redirected) is escaped,
        # not an error after the work is done
        if hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(errors="backslashreplace")
        # A cluster's scheduler stops a job at its time limit (or scancel) with SIGTERM: taken as Ctrl-C, so that
        # fit keeps its best epoch so far, saves the model and writes --out before the scheduler's SIGKILL
        signal.signal(signal.SIGTERM, _stop_as_ctrl_c)
        return _run_past_hdf5_write_failures(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """Run the parsed command; its exit status (a user error: ``SystemExit`` with a one-line message)."""
    grouped = _in_a_process_group()  # a group the caller made is kept; the one fit joins under torchrun is left at the end
    try:
        status = args.run(args)
        return EXIT_TERMINATED if status == EXIT_INTERRUPTED and _SHELL_RUN.terminated else status
    except KeyboardInterrupt:  # one line, not a traceback (fit tells what it wrote when Ctrl-C stopped training)
        print("terminated (SIGTERM)" if _SHELL_RUN.terminated else "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if _SHELL_RUN.terminated else EXIT_INTERRUPTED
    except (ValueError, KeyError, TypeError, OSError, FloatingPointError, RuntimeError) as error:
        # bad input found by cellvae, anndata, h5py or the file system, training that failed (non-finite
        # losses, out of memory): its message, not a traceback
        if isinstance(error, RuntimeError) and type(error).__name__ != "TrainingDivergedError":
            from cellvae.model import is_out_of_memory  # (an Apple GPU's is a plain RuntimeError)

            if not is_out_of_memory(error):
                raise
        raise SystemExit(f"error: {in_command_line_terms(_message_of(error), args)}") from error
    finally:
        if not grouped and _in_a_process_group():  # (nccl warns at exit of a group that was never destroyed)
            sys.modules["torch.distributed"].destroy_process_group()


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # the shell's statuses for SIGINT and SIGTERM (128 + signal)


@dataclass
class _ShellRun:
    """What happened to a command run from the shell that its exit must take into account."""

    terminated: bool = False  # by SIGTERM: exit status 143, not Ctrl-C's 130
    hdf5_left_open: bool = False  # h5py could not close a file it failed to write (a full disk or quota)


_SHELL_RUN = _ShellRun()


def _run_past_hdf5_write_failures(args: argparse.Namespace) -> int:
    """:func:`_run`, but where h5py failed to close a file it wrote (--out on a full disk; see :func:`_write`), the
    process ends at once after the command's message: Python's exit would close that file again and crash (a
    segmentation fault)."""
    try:
        status = _run(args)
    except SystemExit as exit:
        if not _SHELL_RUN.hdf5_left_open:
            raise
        if not isinstance(exit.code, int | None):
            print(exit.code, file=sys.stderr)
        status = exit.code if isinstance(exit.code, int) else 0 if exit.code is None else 1
    if _SHELL_RUN.hdf5_left_open:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _stop_as_ctrl_c(signum: int, frame) -> None:
    """SIGTERM handled as Ctrl-C is at that moment (training's handler while it trains data-parallel)."""
    _SHELL_RUN.terminated = True
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # Ctrl-C ignored (a background job) or the system's default
        raise KeyboardInterrupt
    handler(signal.SIGINT, frame)


def _in_a_process_group() -> bool:
    """Whether this process is in a torch.distributed process group (torch is not loaded to tell)."""
    distributed = sys.modules.get("torch.distributed")
    return distributed is not None and distributed.is_available() and distributed.is_initialized()


PATH_OPTIONS = ("input", "out", "out_dir", "model_dir", "query_model_dir", "checkpoint_dir", "reference")


def _message_of(error: Exception) -> str:
    """An error's message (a KeyError's without the quotes ``str`` adds)."""
    return str(error.args[0] if isinstance(error, KeyError) and error.args else error)


def in_command_line_terms(message: str, args: argparse.Namespace | None = None) -> str:
    """An error's or warning's advice, given in Python's terms, with the command line's options (``args``: the
    command's, whose input file a fix in Python reads)."""
    message = message.replace("pass overwrite=True", "pass --overwrite")
    message = message.replace(  # (adata.X holding nothing)
        "or in a layer named when the model is built (CellVAE(adata, layer=...))", "or in a layer named by --layer"
    )
    trained = getattr(args, "command", None) in ("embed", "map")
    told = "; without --layer, the counts are read where the model read them in training" if trained else ""
    message = message.replace("; a trained model reads the layer it was trained on", told)
    message = message.replace(  # (map_query's word where every query batch is the reference's)
        "embed the query with reference_model.get_latent(query_adata), or rename its batches to map them as new ones",
        "embed it with cellvae embed and the reference model, or pass --batch-prefix to map its batches as new ones",
    )
    message = message.replace("nothing was written into adata", "nothing was written (neither --out nor the model)")
    message = re.sub(  # (out of memory in fit or map_query)
        r"pass a smaller batch_size \(e\.g\. (?:fit\(|map_query\(query_adata, )batch_size=(\d+)\)\)(?:, a smaller n_hidden)?"
        r"(, or device='cpu')?",
        lambda found: f"pass a smaller --batch-size (e.g. --batch-size {found[1]}){' or --device cpu' if found[2] else ''}",
        message,
    )
    message = re.sub(  # the command line has no --lr
        r"run it again with a smaller one, e.g. fit_kwargs=\{'lr': ([^}]+)\}",
        r"the command line has no --lr: train in Python, cellvae.tl.embed(adata, fit_kwargs={'lr': \1}, ...)",
        message,
    )
    message = message.replace("device='auto' or 'cpu'", "--device auto or --device cpu")
    message = message.replace("train on the CPU (device='cpu')", "train on the CPU (--device cpu)")
    message = message.replace("fit(..., resume=True) continues", "--resume continues")
    message = message.replace("model.history numbers epochs from 0", "epochs numbered from 0")
    message = message.replace("checkpoint_dir=", "--checkpoint-dir ").replace("pass resume=True", "pass --resume")
    message = message.replace("another checkpoint_dir", "another --checkpoint-dir")
    message = message.replace("mask_var ", "--mask-var ")
    message = re.sub(
        rf"\bunlabeled_category[= ]{PYTHON_TEXT}", lambda found: f"--unlabeled-category {_as_shell_word(found)}", message
    )
    message = message.replace("novelty_threshold needs", "--novelty-threshold needs")
    message = message.replace("pass novelty_threshold=None", "leave out --novelty-threshold")
    message = message.replace("unknown_threshold or novelty_threshold", "--unknown-threshold or --novelty-threshold")
    # (a warning of the --reference file's comes prefixed with its path)
    where = "that file" if message.startswith("--reference ") else f"the input, {getattr(args, 'input', None) or 'IN.h5ad'}"
    message = re.sub(r"(genes are missing from) (?:query_)?adata\b", lambda found: f"{found[1]} {where}", message)
    message = message.replace("ref_adata.obs[", "the --reference file's obs[")
    message = message.replace("ref_adata has ", "the --reference file has ")
    # the --reference file is read where the model reads its counts, by its var_names: --layer and --var-names are the
    # input's options, so its fixes stay in Python (made in the --reference file)
    about_the_reference = message.startswith("--reference ")
    # the model's genes, in a fix made in Python: read from the saved model (the command line's model has no name)
    model_dir = str(getattr(args, "model_dir", None) or "MODEL_DIR")
    message = message.replace(
        "model.config.gene_names", f"cellvae.CellVAE.load({model_dir!r}, load_anndata=False).config.gene_names"
    )
    # (not scanpy's own: sc.pp.neighbors(..., key_added='...'))
    message = re.sub(r"(?<!\.\.\., )\bkey_added='([^']*)'", lambda found: f"--key-added {shlex.quote(found[1])}", message)
    message = message.replace("another key_added", "another --key-added")
    message = message.replace("pass batch_key=...", "pass --batch-key KEY")
    column = r"query_adata\.obs\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\]"  # (a quoted name: spaces and ] too)
    rename = rf"Rename them to map them as new batches, e\.g\. {column} = 'query ' \+ {column}\.astype\(str\)"
    given = getattr(args, "batch_prefix", None)
    prefix = "Pass --batch-prefix 'query ' to map them as new batches (it puts that before each query batch name)"
    if given:  # the prefixed names are the reference's too (a reference that is itself a query model, say)
        prefix = f"Pass another --batch-prefix than {given!r} (e.g. {given.strip() + '_2 '!r}) to map them as new batches"
    message = re.sub(rename, prefix, message)
    # map's output is embedded by the query model as mapped; a later cellvae embed of it reads the reference's column
    other_column = (
        rf"query_model\.get_latent\(query_adata\) would embed with those\. Use query_model\.get_latent\(\) \(the "
        rf"aligned copy\), or set {column} = {column} first"
    )
    message = re.sub(
        other_column,
        lambda found: (
            "the output's embedding reads the query's batches as mapped, but a later cellvae embed of this file "
            f"with the query model (saved by --query-model-dir) would read those: pass it --batch-key {_as_shell_word(found, 2)}"
        ),
        message,
    )
    message = message.replace("use dispersion='gene'", "use --dispersion gene")
    message = re.sub(r"so dispersion='([\w-]+)' would be ignored", r"so --dispersion \1 would be ignored", message)
    message = message.replace(
        "leave dispersion='gene' (the default) or use likelihood='nb'",
        "leave out --dispersion (or pass --dispersion gene), or pass --likelihood nb",
    )
    message = message.replace("a later save with overwrite", "a later run with --overwrite")
    message = message.replace("random_state draws the validation cells", "--seed draws the validation cells")
    message = re.sub(
        r"\bn_latent=(\d+) is not below (.*); lower n_latent", r"--n-latent \1 is not below \2; lower --n-latent", message
    )
    message = re.sub(  # a checkpoint's settings that differ from this run's, named by the options that set them
        r"\b(n_latent|likelihood|dispersion|batch_key|layer|categorical_covariate_keys|continuous_covariate_keys): checkpoint",
        lambda found: f"--{found[1].replace('_', '-')}: checkpoint",
        message,
    )
    message = message.replace("belongs in categorical_covariate_keys", "belongs in --categorical-covariate-keys")
    message = re.sub(r"\bk=(\d+) is larger than (.*); lower k$", r"--k \1 is larger than \2; lower --k", message)
    if not about_the_reference:
        message = re.sub(r"pass layer='([^']+)'", lambda found: f"pass --layer {shlex.quote(found[1])}", message)
        # a trained model's counts from another layer: embed's --layer reads them and puts them where the model reads them
        another_layer = r"(give the model ad\.AnnData\(X=adata\.layers\['([^']+)'\], obs=adata\.obs, var=adata\.var\)"
        another_layer += r"|put them where the model reads them, adata\.layers\['[^']+'\] = adata\.layers\['([^']+)'\])"
        message = re.sub(another_layer, lambda found: f"pass --layer {shlex.quote(found[2] or found[3])}", message)
        message = message.replace("leave out layer= (layer=None reads X)", "leave out --layer (or pass --layer X)")
        # genes named by a var column (cellvae embed and map): --var-names reads them from it
        by_column = r"name the genes by it first, (\w+)\.var_names = \1\.var\['([^']+)'\]\.astype\(str\) "
        by_column += r"\(then \1\.var_names_make_unique\(\) if some repeat\)"
        message = re.sub(by_column, lambda found: f"pass --var-names {shlex.quote(found[2])}", message)
        message = re.sub(
            r"adata\.X holds whole counts: adata\.layers\['[^']+'\] = adata\.X",
            "adata.X holds whole counts: pass --layer X",
            message,
        )
    message = message.replace("(written by CellVAE.save)", "(written by cellvae fit or CellVAE.save)")
    message = message.replace(" (on a copy, adata = adata.copy(), to keep the values as they were)", "")  # (a new file)
    message = message.replace(
        "train it further with model.fit(...) (or fit again with checkpoints and resume=True)",
        "train it further with cellvae fit (its --resume continues a run from its --checkpoint-dir)",
    )
    notes = []
    for dispersion in ("gene-batch", "gene-cell"):
        if f"dispersion='{dispersion}'" in message and "--dispersion gene)" not in message:  # (not the Poisson refusal)
            notes.append(f"--dispersion {dispersion} sets dispersion='{dispersion}'")
    if "was written by a different run:" in message:  # the checkpoint's arguments, by the options that set them
        options = {
            "random_state": "--seed",
            "max_epochs": "--epochs",
            "kl_warmup_epochs": "--epochs",
            "batch_size": "--batch-size",
        }
        named = sorted({option for name, option in options.items() if f"'{name}'" in message})
        if named:
            notes.append(f"pass {' and '.join(named)} as the run that wrote the checkpoint did (its values above)")
        streamed = re.search(r"\{'counts_streamed_from_disk': (True|False)", message)
        if streamed:  # (read from the file as it streams, or into memory: the order of the minibatches differs)
            notes.append(
                "pass --backed, as the run that wrote the checkpoint did"
                if streamed[1] == "True"
                else "leave out --backed, as the run that wrote the checkpoint did"
            )
    fixed_in_python = "map_query(" not in message and _needs_python(message)
    names_a_layer = re.search(r"\blayer=", message) is not None and not about_the_reference  # (not train_input_layer=)
    if names_a_layer and not fixed_in_python:
        notes.append("--layer NAME reads the counts from adata.layers[NAME]")
    elif "not found in adata.layers" in message:
        notes.append("--layer NAME names another of the layers; leave out --layer (or pass --layer X) to read adata.X")
    if "free_bits=..." in message:  # the collapse warning's remedies are the model's arguments, no option's
        notes.append(
            "fit has no option for beta, kl_warmup or free_bits: train in Python with them, e.g. "
            "cellvae.tl.embed(adata, beta=0.5, free_bits=0.5, ...), or lower --n-latent"
        )
    if "(symbols vs Ensembl IDs)" in message and not about_the_reference:
        notes.append("--var-names COLUMN names the genes by a var column, e.g. feature_name where var_names are Ensembl IDs")
    if "map_query(" in message:
        notes.append("cellvae map NEW.h5ad --model-dir MODEL --out OUT.h5ad maps new batches onto a model")
    elif fixed_in_python:  # (a layer named in the fix is then read with --layer: one note, not two that disagree)
        notes.append(_fix_in_python(message, args, names_a_layer))
    return message + "".join(f"\n(on the command line: {note})" for note in notes)


PYTHON_TEXT = r"""('(?:[^'\\\n]|\\.)*'|"(?:[^"\\\n]|\\.)*")"""  # a Python repr of text, in either quotes, on one line


def _as_shell_word(found: re.Match, group: int = 1) -> str:
    """The text a Python repr (``found[group]``) stands for, quoted for a shell; the repr itself where it is none."""
    try:
        return shlex.quote(ast.literal_eval(found[group]))
    except (ValueError, SyntaxError):
        return found[group]


def _fix_in_python(message: str, args: argparse.Namespace | None, names_a_layer: bool = False) -> str:
    """How to make a fix that only Python can make: read the file the message is about (the input, or the
    --reference it names) under the name the advice uses, change it, write it anew (``names_a_layer``: and read
    the counts from the layer the fix put them in)."""
    path = getattr(args, "input", None) or "IN.h5ad"
    about_the_reference = re.match(r"--reference (.+?): ", message)
    then = "then run cellvae on FIXED.h5ad" + (" with --layer NAME, the layer that holds the counts" if names_a_layer else "")
    layer = getattr(args, "layer", None)
    if not names_a_layer and layer not in (None, "X") and f"adata.layers[{layer!r}] = " in message:  # (changed in place)
        then += f" with --layer {shlex.quote(layer)} again"
    if about_the_reference:
        path, then = about_the_reference[1], "then pass --reference FIXED.h5ad"
    name = "query_adata" if "query_adata" in message else "adata"
    reader = "read_zarr" if str(path).rstrip("/").endswith(".zarr") else "read_h5ad"
    return (
        f"no cellvae option does this; fix the file in Python first, {name} = anndata.{reader}({str(path)!r}), "
        f"the change above, {name}.write_h5ad('FIXED.h5ad'), {then}"
    )


def _needs_python(message: str) -> bool:
    """Whether a message's fix is Python code (a call such as ``adata.var_names_make_unique()``, an assignment
    such as ``adata.layers['counts'] = adata.raw[:, adata.var_names].X``) or an edit of
    the file's cells (missing batch values) that no option translated into one that does it instead (a fix that
    ends "then pass --layer counts" still needs its first step in Python)."""
    on_the_data = r"(?:adata\S*|\bsc\.\w+|\bnp|\bad)\.\w+\(|[\w\]] = \w*adata\."  # (not model.fit(...): no file edit)
    python_fix = re.search(on_the_data, message) or "missing (NaN)" in message
    return bool(python_fix) and re.search(r"(?<!then )pass --", message) is None


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


# options as scanpy and scvi-tools name them, and the option of cellvae's that does the same
OTHER_TOOLS_OPTIONS = {
    "--max-epochs": "--epochs",
    "--n-epochs": "--epochs",
    "--random-state": "--seed",
    "--label-key": "--labels-key",
    "--output": "--out",
    "-o": "--out",
    "--model": "--model-dir",
    "--save-dir": "--model-dir",
}


def _options_meant(words: list[str], parser: argparse.ArgumentParser) -> str | None:
    """Advice where options are spelled as in Python or another tool (``--batch_key``, ``--max-epochs``), which
    argparse only calls unrecognized: the command's option meant by each."""
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction)).choices
    command = next((word for word in words if word in commands), None)
    before_command = words[: words.index(command)] if command else words
    if any(word.startswith("-") and word not in ("-h", "--help", "--version") for word in before_command):
        # (argparse takes the option's value for the command: "invalid choice: 'batch'")
        return (
            f"name the command first, then its options: cellvae COMMAND [options], e.g. cellvae fit counts.h5ad --out "
            f"embedded.h5ad --model-dir model --batch-key batch (commands: {', '.join(commands)}; cellvae COMMAND --help)"
        )
    if command is None:
        return None
    known = set(commands[command]._option_string_actions)
    meant = {}
    for word in words:
        option = word.split("=", 1)[0]
        if not option.startswith("-") or option in known:
            continue
        spelled = option.replace("_", "-").lower()
        option_meant = OTHER_TOOLS_OPTIONS.get(spelled, spelled)
        if option_meant in known and not any(name.startswith(option) for name in known):  # (not an abbreviation)
            meant[option] = option_meant
    if not meant:
        return None
    return f"cellvae {command} spells these options so: " + ", ".join(f"{given} -> {it}" for given, it in meant.items())


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


def fraction(text: str) -> float:
    """argparse type: a number from 0 to 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number from 0 to 1, got {text!r}")
    return value


def add_compression_option(command: argparse.ArgumentParser) -> None:
    """``--compression`` for a command that writes ``--out``."""
    command.add_argument(
        "--compression",
        choices=("gzip", "lzf"),
        default=None,
        help="compress the arrays of --out: gzip (smaller, slower to write and read) or lzf (faster, larger) "
        "(default: none, as anndata's write_h5ad)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``cellvae`` command and its subcommands (demo, fit, embed, map)."""
    parser = argparse.ArgumentParser(
        prog="cellvae", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.set_defaults(command=None)
    parser.add_argument("--version", action="version", version=f"cellvae {CELLVAE_VERSION}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    demo = commands.add_parser("demo", help="train on the bundled PBMC example and plot its UMAP")
    demo.add_argument(
        "--out-dir", default="cellvae_demo", help="folder for the results, replacing an earlier demo's (default: cellvae_demo)"
    )
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
    fit.add_argument(
        "--decoder",
        choices=DECODERS,
        default="mlp",
        help="decoder with hidden layers (default), or linear: genes' log expression linear in the latent space, its "
        "weights read by CellVAE.load(MODEL_DIR).get_loadings()",
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
    add_compression_option(fit)
    fit.add_argument("--quiet", action="store_true", help="no progress bar")
    fit.add_argument(
        "--checkpoint-dir",
        default=None,
        help="folder for a training checkpoint written after every epoch (under torchrun each process keeps its newest and the "
        "one before, which --resume falls back to: keep both)",
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
    embed.add_argument("--var-names", default=None, metavar="COLUMN", help=VAR_NAMES_HELP)
    embed.add_argument(
        "--batch-key",
        default=None,
        help="obs column of the cells' batches, which must be among the model's (default: the model's batch key; "
        "cellvae map adds new batches)",
    )
    embed.add_argument(
        "--batch-prefix",
        default=None,
        metavar="PREFIX",
        help="put PREFIX before each batch name, as cellvae map --batch-prefix PREFIX named the batches of the query model "
        "in --model-dir; --out carries the new names",
    )
    embed.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    embed.add_argument("--backed", action="store_true", help="stream the counts of an .h5ad from disk instead of loading them")
    embed.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_compression_option(embed)
    embed.add_argument("--quiet", action="store_true", help="no progress bar")
    embed.set_defaults(command="embed", run=run_embed)

    mapping = commands.add_parser(
        "map",
        help="map a query's new batches onto a saved reference model, embed it and transfer the reference's labels",
        description="Map query cells, whose batches are new to a reference model, onto it (scArches-style architecture "
        "surgery: only the new batches' parameters are trained, the reference's stay frozen), write their embedding "
        "in the reference's latent space and, with --reference and --labels-key, the reference's labels voted by "
        "each query cell's nearest reference cells. The reference model's folder is only read.",
    )
    mapping.add_argument("input", help="query .h5ad or .zarr store of raw counts on the reference model's genes")
    mapping.add_argument(
        "--model-dir", required=True, help="folder of the reference model, saved by 'cellvae fit --batch-key ...' (only read)"
    )
    mapping.add_argument(
        "--out",
        required=True,
        help="output .h5ad: the query with its embedding in obsm, its record in uns['cellvae'] (uns[KEY_ADDED] for "
        "another key) and, with --labels-key, the transferred labels in obs",
    )
    mapping.add_argument(
        "--query-model-dir",
        default=None,
        help="folder to save the query model in, the reference with the query's batches added (default: not saved); "
        "cellvae embed NEW.h5ad --model-dir QUERY_MODEL_DIR (with the same --batch-prefix) then embeds more cells of "
        "these batches",
    )
    mapping.add_argument(
        "--batch-key", default=None, help="obs column of the query's batches (default: the reference model's batch key)"
    )
    mapping.add_argument(
        "--batch-prefix",
        default=None,
        metavar="PREFIX",
        help="put PREFIX before each of the query's batch names (e.g. 'query '), so that query batches named like "
        "reference batches are mapped as new ones; --out and --query-model-dir carry the new names",
    )
    mapping.add_argument(
        "--layer", default=None, help="layer with the query's raw counts, or X (default: where the model read them in training)"
    )
    mapping.add_argument("--key-added", default="X_cellvae", help="obsm key of the embedding (default: X_cellvae)")
    mapping.add_argument(
        "--var-names", default=None, metavar="COLUMN", help=VAR_NAMES_HELP + " (the query's; --reference uses var_names)"
    )
    mapping.add_argument(
        "--reference",
        default=None,
        help="labelled reference .h5ad or .zarr (cells of the reference model's batches, counts where the model read them "
        "in training), for --labels-key; it is embedded with the model (an embedding stored in it is not used)",
    )
    mapping.add_argument(
        "--labels-key",
        default=None,
        help="obs column of the reference's labels to transfer: writes obs[LABELS_KEY_predicted], "
        "obs[LABELS_KEY_uncertainty] and obs[LABELS_KEY_novelty] (needs --reference)",
    )
    mapping.add_argument("--k", type=positive_int, default=15, help="reference neighbours that vote on a label (default: 15)")
    mapping.add_argument(
        "--unknown-threshold",
        type=fraction,
        default=None,
        help="label 'Unknown' the query cells whose vote's uncertainty exceeds this, e.g. 0.5 (default: none)",
    )
    mapping.add_argument(
        "--novelty-threshold",
        type=fraction,
        default=None,
        help="label 'Unknown' the query cells whose novelty (unlike any reference cell) exceeds this, e.g. 0.95 (default: none)",
    )
    mapping.add_argument(
        "--unlabeled-category",
        default=None,
        help="the label of unlabelled reference cells, which do not vote (cells with a missing label never do)",
    )
    mapping.add_argument(
        "--soft",
        action="store_true",
        help="also write obsm[LABELS_KEY_vote_shares], each query cell's vote share of every reference label "
        "(the labels in uns[LABELS_KEY_vote_shares]['labels'])",
    )
    mapping.add_argument(
        "--train-input-layer",
        action="store_true",
        help="also train the encoder's first layer (for a query that is a perturbation of the reference): reference "
        "cells then embed differently; embed them again with 'cellvae embed --model-dir QUERY_MODEL_DIR'",
    )
    mapping.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="mapping epochs over the query (default: chosen from its size, with early stopping)",
    )
    mapping.add_argument("--batch-size", type=positive_int, default=128, help="minibatch size (default: 128)")
    mapping.add_argument("--seed", type=seed, default=0, help="random seed (default: 0)")
    mapping.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    mapping.add_argument(
        "--backed", action="store_true", help="stream the counts of the .h5ad files from disk instead of loading them"
    )
    mapping.add_argument("--overwrite", action="store_true", help="replace an existing --out file and --query-model-dir")
    add_compression_option(mapping)
    mapping.add_argument("--quiet", action="store_true", help="no progress bar")
    mapping.set_defaults(command="map", run=run_map)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """``cellvae demo``: train on the bundled PBMC example; write the embedded data, its UMAP, the training history and the
    model to ``--out-dir``."""
    import matplotlib.pyplot as plt
    import scanpy as sc

    from cellvae import datasets, pl, tl
    from cellvae.model import why_not_a_model_folder

    out_dir = Path(args.out_dir).expanduser()
    # told before training, not after it: a file in the folder's place, or a model folder holding other files
    blocked = next((path for path in (out_dir, *out_dir.parents) if path.exists() and not path.is_dir()), None)
    if blocked is not None:
        raise SystemExit(f"error: --out-dir {args.out_dir} cannot be made: {blocked} is a file; name a folder")
    if (out_dir / "model").is_symlink():  # (a link to nowhere does not exist, but save refuses it)
        raise SystemExit(
            f"error: {out_dir / 'model'} is a symbolic link, where the demo saves its model in a folder; choose another "
            "--out-dir or remove the link"
        )
    if (out_dir / "model").is_file():
        raise SystemExit(f"error: {out_dir / 'model'} is a file, where the demo saves its model; choose another --out-dir")
    not_a_model = why_not_a_model_folder(out_dir / "model") if (out_dir / "model").exists() else None
    if not_a_model is not None:
        raise SystemExit(
            f"error: {out_dir / 'model'} is {not_a_model}, not a saved cellvae model, where the demo saves its model; "
            "choose another --out-dir or move them"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    adata = datasets.pbmc68k()
    print(f"cellvae demo: {adata.n_obs} PBMCs × {adata.n_vars} genes (scanpy's pbmc68k_reduced, raw counts restored)")
    model = tl.embed(adata, random_state=args.seed, max_epochs=args.epochs, progress=not args.quiet)
    _neighbours_umap_leiden(adata, "X_cellvae", args.seed)
    h5ad = out_dir / "pbmc68k.h5ad"
    _write(adata, str(h5ad))
    umap_png = out_dir / "umap_cell_type.png"
    figure = sc.pl.umap(adata, color=["cell_type", "leiden"], show=False, return_fig=True, wspace=0.6)
    figure.savefig(umap_png, dpi=150, bbox_inches="tight")
    plt.close(figure)
    history_png = out_dir / "training_history.png"
    pl.history(model, show=False, save=str(history_png))
    model.save(out_dir / "model", overwrite=True)
    print(f"trained {_epochs(len(model.history))}; wrote:")
    for path in (h5ad, umap_png, history_png, out_dir / "model"):
        print(f"  {path}")
    return 0


def run_fit(args: argparse.Namespace) -> int:
    """``cellvae fit``: train a model on the input's counts, save it and write the embedding (and graph) to ``--out``."""
    from cellvae import CellVAE, tl
    from cellvae.train import pick_device, rank_and_world, setup_distributed

    if args.resume and args.checkpoint_dir is None:
        raise SystemExit("error: --resume needs the --checkpoint-dir of the run to continue")
    _check_input_and_output(args)
    separate = {"--checkpoint-dir": args.checkpoint_dir}
    inputs = {"the input": args.input}
    _check_model_dir(args.model_dir, "--model-dir", overwrite=args.overwrite, out=args.out, separate=separate, inputs=inputs)
    if args.checkpoint_dir is not None:  # (fit checks the rest, creating it, once the input is read)
        from cellvae.model import refuse_a_model_folder_for_checkpoints

        refuse_a_model_folder_for_checkpoints(args.checkpoint_dir)
    layer = None if args.layer == "X" else args.layer
    adata = _read(args.input, backed=args.backed, layer=layer)
    _check_fit_obs_columns(adata, args)
    setup_distributed(pick_device(args.device))  # joins the process group under torchrun (else does nothing)
    model_kwargs = {
        "layer": layer,
        "batch_key": args.batch_key,
        "categorical_covariate_keys": args.categorical_covariate_keys,
        "continuous_covariate_keys": args.continuous_covariate_keys,
        "n_latent": args.n_latent,
        "likelihood": args.likelihood,
        "dispersion": args.dispersion,
        "decoder": args.decoder,
    }
    fit_kwargs = {
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "checkpoint_dir": args.checkpoint_dir,
        "resume": args.resume,
    }
    key_added, _ = tl._check_embed(adata, args.key_added, model_kwargs, fit_kwargs)  # on every rank: all stop alike
    genes = tl._genes_to_train(adata, args.mask_var)  # (checked here, before any work)
    if rank_and_world()[0] > 0:  # under torchrun every rank trains the same model; rank 0 embeds and writes it
        CellVAE(genes, **model_kwargs).fit(max_epochs=args.epochs, random_state=args.seed, progress=False, **fit_kwargs)
        return 0
    stale = tl._stale_graph_message(adata, args.key_added)  # an earlier embedding, whose graph and UMAP the input may hold
    replaced = adata.obsm.get(args.key_added)
    seed, progress = tl.check_seed(args.seed), not args.quiet
    model = tl._trained_model(genes, model_kwargs, args.epochs, seed, progress, fit_kwargs)
    trained = f"trained {_epochs(len(model.history))}{_still_improving(model)}"
    try:  # first, so that a failure (or Ctrl-C) below loses no training
        model.save(args.model_dir, overwrite=args.overwrite)
        print(f"{trained}; saved the model in {args.model_dir}")
        save_error = None
    except OSError as error:  # a full disk or quota there: the embedding is still written to --out, then told
        print(f"{trained}; could not save the model in {args.model_dir}", file=sys.stderr)
        save_error = error
    with warnings.catch_warnings():  # told below, only where no new graph is computed
        if stale:
            warnings.filterwarnings("ignore", message=re.escape(stale), category=UserWarning)
        tl._store_embedding(adata, genes, model, key_added, seed, args.mask_var, progress, model_kwargs, fit_kwargs)
    stale = tl._stale_unless_same(stale, replaced, adata.obsm[args.key_added])
    recorded = adata.uns[tl._uns_key(args.key_added)]["params"]
    recorded["model_dir"] = None if save_error else _recorded_path(args.model_dir)  # (as embed and map record it)
    if args.checkpoint_dir is not None:
        recorded["checkpoint_dir"] = _recorded_path(args.checkpoint_dir)
    if _streamed(args):  # (read from disk in blocks: the same model as in memory, but not the same minibatches)
        recorded["backed"] = True
    interrupted = bool(model.history.attrs.get("interrupted"))  # Ctrl-C in training: keep what was trained
    graph_stopped, graph_error = False, None
    replacing = _graph_results_held(adata)  # (the input's own, e.g. from PCA: the output's are the embedding's)
    if not interrupted and not args.embedding_only:
        try:
            _neighbours_umap_leiden(adata, args.key_added, args.seed)
        except KeyboardInterrupt:
            graph_stopped = True
        except Exception as error:  # scanpy's graph code, not cellvae's: keep the embedding
            graph_error = error
    graph_computed = not (interrupted or args.embedding_only or graph_stopped or graph_error is not None)
    if not graph_computed:  # the output keeps the input's graph, UMAP and clusters: say where they are stale
        _warn_if_graph_is_stale(stale)
    try:
        _write(adata, args.out, args.compression)
    except (OSError, KeyboardInterrupt) as error:
        earlier = " (the file there is from an earlier run)" if Path(args.out).is_file() else ""
        saved = (
            f"the model could not be saved in {args.model_dir} either"
            if save_error
            else f"the model is saved in {args.model_dir}"
        )
        told = f"could not write {args.out}{earlier}; {saved}"
        if isinstance(error, KeyboardInterrupt):
            print(f"interrupted: {told}", file=sys.stderr)
            return EXIT_INTERRUPTED
        reason = os.strerror(error.errno) if error.errno is not None else f"{type(error).__name__}: {error}"
        raise SystemExit(f"error: {told} ({reason})") from error
    if save_error is not None:
        raise SystemExit(
            f"error: {save_error} (wrote {args.out} with obsm[{args.key_added!r}]); free space there, or name another "
            "--model-dir, and fit again"
        ) from save_error
    if interrupted:
        resume = " (continue with --resume --overwrite)" if args.checkpoint_dir else ""
        print(f"interrupted: wrote {args.out} with obsm[{args.key_added!r}] of the best epoch so far{resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    only = f"wrote {args.out} with obsm[{args.key_added!r}] only (the model is saved): run them with scanpy"
    if graph_stopped:
        print(f"interrupted: neighbours/UMAP/Leiden stopped; {only}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if graph_error is not None:
        failed = f"{type(graph_error).__name__}: {graph_error}"
        raise SystemExit(f"error: neighbours/UMAP/Leiden failed ({failed}); {only}") from graph_error
    replaced_there = f"; replacing the input's {', '.join(replacing)}" if replacing and not args.embedding_only else ""
    print(f"wrote {args.out} (obsm[{args.key_added!r}]{'' if args.embedding_only else ', UMAP, leiden'}{replaced_there})")
    return 0


def _graph_results_held(adata) -> list[str]:
    """What of a neighbours graph, UMAP and Leiden clusters ``adata`` holds (where fit writes the embedding's)."""
    held = {
        "neighbours graph": "neighbors" in adata.uns or "connectivities" in adata.obsp,
        "UMAP": "X_umap" in adata.obsm,
        "leiden clusters": "leiden" in adata.obs,
    }
    return [name for name, present in held.items() if present]


def run_embed(args: argparse.Namespace) -> int:
    """``cellvae embed``: embed the input's cells with a saved model and write the embedding to ``--out``."""
    from cellvae import CellVAE, tl

    _check_input_and_output(args)  # (also an --out inside --model-dir)
    model = CellVAE.load(args.model_dir, load_anndata=False)  # the weights alone: the input is what gets embedded
    model.to_device(args.device)
    batch_key = model.config.batch_key
    if args.batch_key is not None and not batch_key:
        raise SystemExit(
            f"error: the model in {args.model_dir} was trained without --batch-key, so it reads no batches; leave out --batch-key"
        )
    if args.batch_prefix and not batch_key:
        raise SystemExit(f"error: the model in {args.model_dir} reads no batches; leave out --batch-prefix")
    adata, layer = _read_for_model(args.input, model, args.layer, args.backed, var_names=args.var_names)
    column = args.batch_key or batch_key
    if batch_key and args.batch_key is None:
        _check_batches_read_as_recorded(adata, args.input, batch_key, args.model_dir)
    if batch_key and column in adata.obs.columns:  # (a missing column is told below)
        _refuse_batches_this_run_would_embed_wrongly(adata.obs[column], column, model.config, args)
        if args.batch_prefix:
            adata.obs[column] = _prefixed(adata.obs[column], args.batch_prefix)
    if batch_key:
        _check_obs_columns(adata, args.input, column, model.config, args.batch_key is not None, "the model", "the cells'")
        if not args.batch_prefix:
            _warn_if_a_batch_prefix_seems_meant(adata.obs[column], model.config, args)
    tl._check_record_is_its_own(adata, args.key_added, tl._uns_key(args.key_added))
    stale, replaced = tl._stale_graph_message(adata, args.key_added), adata.obsm.get(args.key_added)
    batches_from = None if args.batch_key in (None, batch_key) else (args.batch_key, batch_key)
    with (
        _errors_name_where_counts_were_read(layer, model.config.layer, adata, args.var_names),
        _errors_name_the_genes_column(args.var_names),
        _errors_name_the_batch_column(batches_from),
    ):
        counts = _counts_where_model_reads(adata, layer, model.config.layer, args.var_names, batches_from)
        adata.obsm[args.key_added] = model.get_latent(counts, progress=not args.quiet)
    stale = tl._stale_unless_same(stale, replaced, adata.obsm[args.key_added])
    more = {} if batches_from is None else {"input_batch_key": args.batch_key}
    more |= {"batch_prefix": args.batch_prefix or None, "var_names": args.var_names, "backed": _streamed(args) or None}
    _record_embedding(adata, args.key_added, model, args.model_dir, layer, stale, more)
    _write(adata, args.out, args.compression)
    print(f"wrote {args.out} with obsm[{args.key_added!r}] ({adata.n_obs} cells × {model.config.n_latent})")
    return 0


def run_map(args: argparse.Namespace) -> int:
    """``cellvae map``: map a query onto a saved reference model (its new batches trained), embed it, transfer
    labels from ``--reference`` where given, and write the result to ``--out``."""
    import anndata as ad

    from cellvae import CellVAE, tl
    from cellvae.model import missing_genes_told

    _check_input_and_output(args)
    _check_labels_options(args)
    if args.query_model_dir is not None:  # never inside the reference's folder: --overwrite would replace the reference
        separate = {"--model-dir": args.model_dir}
        inputs = {"the input": args.input, "--reference": args.reference}
        _check_model_dir(
            args.query_model_dir, "--query-model-dir", overwrite=args.overwrite, out=args.out, separate=separate, inputs=inputs
        )
    reference_model = CellVAE.load(args.model_dir, load_anndata=False)  # only read: the query model is a new one
    reference_model.to_device(args.device)  # (the query model's outputs run where the reference's do)
    config = reference_model.config
    if not config.batch_key:
        raise SystemExit(
            f"error: the model in {args.model_dir} was trained without --batch-key, so it has no batches to add the "
            f"query's to: embed the query with cellvae embed {shlex.quote(args.input)} --model-dir "
            f"{shlex.quote(args.model_dir)} --out ..., or train a reference with --batch-key"
        )
    query, layer = _read_for_model(args.input, reference_model, args.layer, args.backed, var_names=args.var_names)
    batch_key = config.batch_key if args.batch_key is None else args.batch_key
    if args.batch_key is None:  # (an earlier map's output, mapped from another column, mapped again)
        _check_batches_read_as_recorded(query, args.input, batch_key)
    _check_obs_columns(query, args.input, batch_key, config, given=args.batch_key is not None)
    tl._check_record_is_its_own(query, args.key_added, tl._uns_key(args.key_added))
    if args.batch_prefix:
        query.obs[batch_key] = _prefixed(query.obs[batch_key], args.batch_prefix)
    reference = None
    if args.reference is not None:  # its labels and its embedding, checked before the query is trained
        reference = _read_for_model(args.reference, reference_model, None, args.backed, option="--reference")[0]
        if args.labels_key not in reference.obs.columns:
            raise SystemExit(
                f"error: --reference {args.reference} has no obs[{args.labels_key!r}] (--labels-key); "
                f"obs columns there: {list(reference.obs.columns)}"
            )
        try:
            tl._voting_cells(reference, args.labels_key, args.k, args.unlabeled_category, args.novelty_threshold)
        except (ValueError, KeyError) as error:  # named as the command line names them: the file and its option
            message = _message_of(error).replace(f"ref_adata.obs[{args.labels_key!r}]", f"--labels-key {args.labels_key}")
            raise type(error)(f"--reference {args.reference}: {message}") from error
        # (also checks its counts, genes and batches); the query model embeds reference cells alike, unless
        # --train-input-layer trains their encoder's first layer too
        reference_latent = _embed_reference(reference_model, reference, args)
    stale, replaced = tl._stale_graph_message(query, args.key_added), query.obsm.get(args.key_added)
    with (
        _errors_name_where_counts_were_read(layer, config.layer, query, args.var_names),
        _errors_name_the_genes_column(args.var_names),
    ):
        query_model = reference_model.map_query(
            _counts_where_model_reads(query, layer, config.layer, args.var_names),
            batch_key=args.batch_key,
            train_input_layer=args.train_input_layer,
            max_epochs=args.epochs,
            batch_size=args.batch_size,
            random_state=args.seed,
            device=args.device,
            progress=not args.quiet,
        )
    if args.query_model_dir is not None:  # first, so that a failure (or Ctrl-C) below loses no training
        query_model.save(args.query_model_dir, overwrite=args.overwrite)
        print(f"mapped in {_epochs(len(query_model.history))}; saved the query model in {args.query_model_dir}")
    with missing_genes_told():  # map_query told them once; the query's aligned counts lack them again
        query.obsm[args.key_added] = query_model.get_latent(progress=not args.quiet)
    stale = tl._stale_unless_same(stale, replaced, query.obsm[args.key_added])
    written = [f"obsm[{args.key_added!r}]"]
    if reference is not None:
        if args.train_input_layer:
            reference_latent = _embed_reference(query_model, reference, args)
        voters = ad.AnnData(obs=reference.obs[[args.labels_key]], obsm={args.key_added: reference_latent})
        with warnings.catch_warnings():  # (the check before mapping told an unknown --unlabeled-category once)
            warnings.filterwarnings("ignore", message=r"unlabeled_category .* is no label of")
            tl.transfer_labels(
                voters,
                query,
                args.labels_key,
                use_rep=args.key_added,
                k=args.k,
                unknown_threshold=args.unknown_threshold,
                unlabeled_category=args.unlabeled_category,
                novelty_threshold=args.novelty_threshold,
                soft=args.soft,
            )
        written += [f"obs[{args.labels_key + suffix!r}]" for suffix in ("_predicted", "_uncertainty", "_novelty")]
        shares = args.labels_key + "_vote_shares"
        written += [f"obsm[{shares!r}] (labels in uns[{shares!r}]['labels'])"] if args.soft else []
    interrupted = bool(query_model.history.attrs.get("interrupted"))  # Ctrl-C while mapping: keep what was trained
    record = {
        "query_batch_key": batch_key,
        "batch_prefix": args.batch_prefix or None,
        "mapping_epochs": int(len(query_model.history)),
        "mapping_max_epochs": int(query_model.train_settings.max_epochs) if query_model.train_settings else None,
        "train_input_layer": args.train_input_layer,
        "query_model_dir": _recorded_path(args.query_model_dir),
        "reference": _recorded_path(args.reference),
        "labels_key": args.labels_key,
        "interrupted": interrupted or None,
        "mapping_random_state": args.seed,
        "mapping_batch_size": int(query_model.train_settings.batch_size) if query_model.train_settings else args.batch_size,
        "var_names": args.var_names,
        "backed": _streamed(args) or None,
    }
    record |= {f"mapping_{name}": value for name, value in tl._where_trained(query_model).items()}
    if reference is not None:  # the vote's settings (None ones are left out of the record)
        record |= {"k": args.k, "unknown_threshold": args.unknown_threshold, "novelty_threshold": args.novelty_threshold}
        record |= {"unlabeled_category": args.unlabeled_category, "soft": args.soft or None}
    _record_embedding(query, args.key_added, reference_model, args.model_dir, layer, stale, record)
    _write(query, args.out, args.compression)
    new_batches = query_model.config.batch_categories[len(config.batch_categories) :]
    new_categories = "".join(  # a categorical covariate's categories the reference lacked, mapped too
        f", new {key}: {names[len(config.categorical_covariate_categories[key]) :]}"
        for key, names in query_model.config.categorical_covariate_categories.items()
        if len(names) > len(config.categorical_covariate_categories[key])
    )
    mapped = f"mapped {query.n_obs} cells (new batches: {new_batches}{new_categories}) in {_epochs(len(query_model.history))}"
    if interrupted:
        print(f"interrupted: {mapped}, the best so far; wrote {args.out} with {', '.join(written)}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"{mapped}; wrote {args.out} with {', '.join(written)}")
    return 0


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _still_improving(model) -> str:
    """A note where training was still improving at its last epoch (``history.attrs["still_improving"]``), else ''."""
    if model.history.attrs.get("still_improving"):
        return f" (still improving at the last epoch: more --epochs than {len(model.history)} may give a better model)"
    return ""


def _check_labels_options(args: argparse.Namespace) -> None:
    """``cellvae map``'s label-transfer options come together: --reference with --labels-key, and the vote's
    options only with them."""
    if (args.reference is None) != (args.labels_key is None):
        given, missing = ("--reference", "--labels-key") if args.labels_key is None else ("--labels-key", "--reference")
        raise SystemExit(
            f"error: {given} needs {missing}: --reference names the labelled reference .h5ad, --labels-key its obs "
            "column of labels to transfer (the query's embedding alone needs neither)"
        )
    vote = {"--unknown-threshold": args.unknown_threshold, "--novelty-threshold": args.novelty_threshold}
    vote |= {"--unlabeled-category": args.unlabeled_category, "--soft": True if args.soft else None}
    given = [option for option, value in vote.items() if value is not None]
    if given and args.labels_key is None:
        raise SystemExit(f"error: {given[0]} is an option of the label transfer: pass --reference and --labels-key too")
    shares = f"{args.labels_key}_vote_shares"
    if args.soft and args.key_added == shares:  # the vote shares would replace the embedding in obsm (and uns)
        raise SystemExit(f"error: --soft writes obsm[{shares!r}], the --key-added given for the embedding; choose another")


def _check_fit_obs_columns(adata, args: argparse.Namespace) -> None:
    """Refuse obs columns that fit's options name and the input lacks before any work, naming the option that gave
    them (the model's error names only adata.obs)."""
    keys = {"--batch-key": [args.batch_key] if args.batch_key is not None else []}
    keys |= {"--categorical-covariate-keys": args.categorical_covariate_keys or []}
    keys |= {"--continuous-covariate-keys": args.continuous_covariate_keys or []}
    for option, given in keys.items():
        missing = [key for key in given if key and key not in adata.obs.columns]  # ("": the model says why)
        if missing:
            columns = list(adata.obs.columns)
            raise SystemExit(f"error: {args.input} has no obs columns {missing} ({option}); obs columns there: {columns}")


def _check_obs_columns(
    query, path: str, batch_key: str, config, given: bool, model: str = "the reference model", cells: str = "the query's"
) -> None:
    """Refuse a query (embed's input) without its batch column or the model's covariates before any work
    (map_query would find out only after the reference was read and embedded)."""
    columns = list(query.obs.columns)
    if batch_key not in columns:
        name = "--batch-key" if given else f"{model}'s batch key; name {cells} batch column with --batch-key"
        raise SystemExit(f"error: {path} has no obs[{batch_key!r}] ({name}); obs columns there: {columns}")
    covariates = config.categorical_covariate_keys + config.continuous_covariate_keys
    missing = [key for key in covariates if key not in columns]
    if missing:
        raise SystemExit(f"error: {path} lacks obs columns {missing}, covariates of {model}; add them")


def _check_batches_read_as_recorded(adata, path: str, batch_key: str, model_dir: str | None = None) -> None:
    """Refuse, before any work, to read the model's batch column where a record of the input (``map --batch-key``'s
    or ``embed --batch-key``'s, under any key in ``uns``), made by a model reading that same batch key, says its
    cells' batches were read from another column it has: the model's column's values, e.g. a reference batch's name,
    would embed the cells otherwise than before without a word. (Without the model's column, the check of the
    columns that follows names it.) ``model_dir``: embed's, whose advice names the query model that mapped the
    cells where it is another; None for map, which maps them anew onto the reference."""
    columns = adata.obs.columns
    for uns_key, record in adata.uns.items():
        params = record.get("params") if isinstance(record, Mapping) else None
        if not isinstance(params, Mapping) or params.get("batch_key") != batch_key:
            continue  # (a record of a model with another batch key says nothing of this one's column)
        read_from = params.get("query_batch_key") or params.get("input_batch_key")
        if isinstance(read_from, str) and read_from != batch_key and read_from in columns and batch_key in columns:
            mapped_by = params.get("query_model_dir")  # (map's record: its batches are the query model's)
            other_model = model_dir is not None and isinstance(mapped_by, str)
            other_model = other_model and os.path.realpath(mapped_by) != os.path.realpath(model_dir)
            by = f" with the query model that mapped them (--model-dir {shlex.quote(mapped_by)})" if other_model else ""
            raise SystemExit(
                f"error: {path} records (in uns[{uns_key!r}]['params']) that its cells' batches were read from "
                f"obs[{read_from!r}], not from the model's batch key {batch_key!r}: pass --batch-key {read_from} to "
                f"read them as before{by}, or --batch-key {batch_key} to read obs[{batch_key!r}]"
            )


def _warn_if_a_batch_prefix_seems_meant(batches, config, args: argparse.Namespace) -> None:
    """Warn where batches of the input are reference batches that the (query) model also holds as mapped batches
    with a prefix before them (cellvae map --batch-prefix): the cells would be embedded as the reference's."""
    from cellvae.data import cell_texts, warn_user

    given = sorted(set(cell_texts(batches.dropna())))
    held = [name for name in given if _prefix_of_mapped_batches([name], config) is not None]
    prefix = _prefix_of_mapped_batches(held, config)
    if prefix is not None:
        others = sorted(set(given) - set(held))
        alone = f" for them, in a run of their own (those of {_listed(others)} without it)" if others else ""
        warn_user(
            f"{args.input}'s batches {_listed(held)} are embedded with the reference's parameters for them, but the model "
            f"also holds them as mapped query batches named with {prefix!r} before them ({prefix + held[0]!r}): if "
            f"these are the query's cells, pass --batch-prefix {prefix!r}{alone}; if they are the reference's, ignore this",
            UserWarning,
        )


def _refuse_batches_this_run_would_embed_wrongly(batches, column: str, config, args: argparse.Namespace) -> None:
    """Refuse, before any work, input batches that this run would not embed with their own parameters, telling each
    batch its step: a mapped query's (cellvae map --batch-prefix) with the model's prefix, the model's batches as they
    are without one, new ones to map. Without --batch-prefix, the advice for unseen batches (map them) would map the
    mapped query's cells a second time; with a mistyped one, or beside reference or new batches, the run cannot work."""
    from cellvae.data import cell_texts, numbers_written_otherwise

    given, known = set(cell_texts(batches.dropna())), set(config.batch_categories)
    prefix = args.batch_prefix
    if prefix and {prefix + name for name in given} <= known:
        return
    # numbers written otherwise (2.0 for the model's 2, or for a mapped query's query_2) are told as such, not as
    # batches to map: compared with the model's names, mapped ones without the given prefix or any (query_2: 2)
    reference, mapped = _reference_and_mapped_batches(config)
    unprefixed = set(reference) | {_number_after_a_prefix(name, prefix) for name in mapped}
    retyped = numbers_written_otherwise(sorted(given - unprefixed), sorted(unprefixed), column)
    if retyped:
        raise ValueError(retyped)
    held = _prefix_of_batches_held_so(sorted(given), config)  # the model's prefix, where it holds some of them so
    if not prefix and held is None:  # (new batches alone are told as unseen, with the advice to map them)
        return
    with_it, as_is, new = _batches_by_prefix(given, known, held or prefix)
    where = f"{args.input}'s obs[{column!r}]"
    if prefix and not with_it and not new:  # e.g. map's own output, or the reference's batches
        raise SystemExit(f"error: {where} holds the model's batches as they are ({_listed(as_is)}): leave out --batch-prefix")
    if prefix and not with_it and not as_is:
        raise SystemExit(
            f"error: {where} holds {_batches(new)} new to the model, with or without --batch-prefix {prefix!r}: "
            "map them (cellvae map)"
        )
    unknown = [name for name in with_it if name not in known]  # (the others also name reference batches)
    if not prefix and not unknown and not new:  # reference-named batches alone: warned of once embedded
        return
    steps = _steps_for_batches(with_it, as_is, new, held or prefix, known)
    # an example of a batch the model holds with its prefix (with_it is empty only where a given prefix fits none)
    named = f"({held + (unknown or with_it)[0]!r}, named so by cellvae map --batch-prefix {shlex.quote(held)})" if held else ""
    if prefix and held not in (None, prefix):  # mistyped, or "query" for "query_"
        lead = f"the model holds mapped query batches with --batch-prefix {held!r} before them {named}, not {prefix!r}"
    elif prefix:
        lead = f"not all of the batches in {where} are held by the model with --batch-prefix {prefix!r} before them"
    elif unknown:
        names, held_as, them = (
            ("this name", "a mapped query batch", "it") if len(unknown) == 1 else ("these names", "mapped query batches", "them")
        )
        raise SystemExit(
            f"error: {where} holds {_batches(unknown)} that the model does not know by {names}, but it holds {held_as} of "
            f"{names} with {held!r} before {them} {named}. If these are the mapped query's cells: {steps}. If they are "
            "other batches, map them (cellvae map)"
        )
    else:
        one = len(with_it) == 1
        lead = (
            f"{where} holds {_batches(new)} new to the model, and {_listed(with_it)}, which it holds both as "
            f"{'a reference batch and as a mapped query batch' if one else 'reference batches and as mapped query batches'} "
            f"with {held!r} before {'it' if one else 'them'} {named}"
        )
    raise SystemExit(f"error: {lead}: {steps}")


def _steps_for_batches(with_it: list[str], as_is: list[str], new: list[str], prefix: str, known: set[str]) -> str:
    """Each batch's step, for :func:`_refuse_batches_this_run_would_embed_wrongly`: those the model holds with
    ``prefix`` before them, those it holds as they are, and new ones (every batch named: a user splits the file so)."""
    option = f"--batch-prefix {shlex.quote(prefix)}"
    steps = []
    if with_it:
        steps.append(f"pass {option}" if not as_is and not new else f"embed the cells of {with_it} with {option}")
        both = [name for name in with_it if name in known]  # a query batch named like a reference one
        if both:
            them = ("names a reference batch", "it") if len(both) == 1 else ("name reference batches", "them")
            steps[-1] += f" ({both} also {them[0]}: embed the reference's cells of {them[1]} without --batch-prefix)"
    if as_is:
        steps.append(f"embed the cells of {as_is} (the model's batches as they are) without --batch-prefix")
    if new:
        steps.append(f"map the cells of {new}, new to the model (cellvae map)")
    return "; ".join(steps) if len(steps) == 1 else "in separate runs, " + "; ".join(steps)


def _batches_by_prefix(given: set[str], known: set[str], prefix: str) -> tuple[list[str], list[str], list[str]]:
    """``given``'s batches the model holds with ``prefix`` before them, those it holds only as they are, and new ones."""
    with_it = sorted(name for name in given if prefix + name in known)
    as_is = sorted(name for name in given & known if prefix + name not in known)
    new = sorted(name for name in given - known if prefix + name not in known)
    return with_it, as_is, new


def _number_after_a_prefix(name: str, prefix: str | None) -> str:
    """A mapped batch's name without ``prefix`` where it starts so, else the number it ends in after a separator
    (query_2: 2, as cellvae map --batch-prefix names a numbered query's), else as it is."""
    if prefix and name.startswith(prefix):
        return name.removeprefix(prefix)
    found = re.fullmatch(r".*?[^0-9A-Za-z.](-?[0-9]+(?:\.[0-9]+)?)", name)  # (query_-1: -1)
    return found[1] if found else name


def _batches(names: list[str]) -> str:
    """``batch ['a']`` or ``batches ['a', 'b']`` (cut as :func:`_listed`), for a message."""
    return f"batch {names!r}" if len(names) == 1 else f"batches {_listed(names)}"


def _listed(names: list[str], at_most: int = 10) -> str:
    """``names`` as a list for a message, cut after ``at_most`` names with how many there are in all."""
    return repr(names) if len(names) <= at_most else f"{repr(names[:at_most])[:-1]}, ... ({len(names)} in all)]"


def _prefix_of_batches_held_so(names: list[str], config) -> str | None:
    """The prefix before those of ``names`` that the (query) model holds as mapped batches with a prefix before them,
    where they share one (the others may be reference batches, or new)."""
    held = [name for name in names if _prefix_of_mapped_batches([name], config, reference_names=False) is not None]
    return _prefix_of_mapped_batches(held, config, reference_names=False)


def _reference_and_mapped_batches(config) -> tuple[list[str], list[str]]:
    """The (query) model's batches: the reference's, and those map_query added (none for a reference model)."""
    n_reference = config.reference_categories.get(config.batch_key, len(config.batch_categories))
    return config.batch_categories[:n_reference], config.batch_categories[n_reference:]


def _prefix_of_mapped_batches(given: list[str], config, reference_names: bool = True) -> str | None:
    """Where every batch ``given`` (with ``reference_names``, each a reference batch too) the (query) model holds as a
    mapped batch with one prefix before it (cellvae map --batch-prefix), that prefix. A prefix ends in a separator
    ("query ", "new_"): "1" before "0" is no prefix but batch "10" of a numbered query."""
    reference, mapped = _reference_and_mapped_batches(config)
    prefixes = {
        name: {
            new[: -len(name)]
            for new in mapped
            if len(new) > len(name) and new.endswith(name) and not new[-len(name) - 1].isalnum()
        }
        for name in given
    }
    if not given or (reference_names and not set(given) <= set(reference)) or not all(prefixes.values()):
        return None
    common = set.intersection(*prefixes.values())
    return common.pop() if len(common) == 1 else None


def _prefixed(batches, prefix: str):
    """Batch names with ``prefix`` before each (categories kept in their order; missing values stay missing)."""
    import pandas as pd

    if isinstance(batches.dtype, pd.CategoricalDtype):
        return batches.cat.rename_categories([prefix + str(name) for name in batches.cat.categories])
    return batches.map(lambda name: prefix + str(name), na_action="ignore")


def _embed_reference(model, reference, args: argparse.Namespace):
    """The reference cells' embedding by ``model``, its errors naming the --reference file. A stored embedding is
    never used: it may come from another model, and a vote across two spaces would be wrong without a word."""
    told: list[warnings.WarningMessage] = []
    try:
        # its warnings name the file too: recorded under the caller's filters (ignored ones stay ignored, errors
        # raise), then given again, named, also where an error follows
        with warnings.catch_warnings(record=True) as told:
            return model.get_latent(reference, progress=not args.quiet)
    except (ValueError, KeyError, TypeError) as error:
        # the reference's cells are of the model's batches: map_query's advice for new ones is the query's
        advice = "--reference holds cells of the model's own batches; cells of new batches are the query (the input)"
        message = _message_of(error).replace("Map new batches with model.map_query(...)", advice)
        raise type(error)(f"--reference {args.reference}: {message}") from error
    finally:
        for warning in told:
            warnings.warn(f"--reference {args.reference}: {warning.message}", warning.category, stacklevel=2)


def _read_for_model(
    path: str, model, layer_option: str | None, backed: bool, option: str = "the input", var_names: str | None = None
):
    """The AnnData at ``path`` and where its counts are read (``None``: X): ``layer_option`` (``"X"`` for X), or where
    ``model`` read them in training; a missing layer, or a missing ``var`` column ``var_names`` (--var-names), is
    refused with the options that name another place."""
    from cellvae.data import layer_names

    layer = model.config.layer if layer_option is None else None if layer_option == "X" else layer_option
    adata = _read(path, backed=backed, layer=layer, option="input" if option == "the input" else option)
    if layer is not None and layer not in adata.layers:
        trained = " (where the model read its counts in training)" if layer_option is None else ""
        fix = "name the counts' place with --layer NAME, or --layer X" if option == "the input" else "put the counts there"
        where = path if option == "the input" else f"{option} {path}"
        raise SystemExit(f"error: {where} has no layers[{layer!r}]{trained}; {fix} (layers here: {layer_names(adata)})")
    if var_names is not None and var_names not in adata.var.columns:
        raise SystemExit(f"error: {path} has no var[{var_names!r}] (--var-names); var columns there: {list(adata.var.columns)}")
    return adata, layer


@contextmanager
def _errors_name_where_counts_were_read(
    layer: str | None, model_layer: str | None, adata, var_names: str | None = None
) -> Iterator[None]:
    """Inside: an error about counts that :func:`_counts_where_model_reads` put where the model reads them names
    the place they were read from (``layer``, given with --layer) instead; where those values are no counts, the
    advice is the option's: leave out --layer to read them where the model was trained, where ``adata`` holds counts
    there (checked in memory only: a backed file is not read for advice), and rounding where the error advised it."""
    from cellvae.data import NO_COUNTS_ELSEWHERE, count_matrix, counts_location, is_backed_matrix, validate_counts

    try:
        yield
    except (ValueError, TypeError) as error:
        raw_left_out = adata.raw is not None and (adata.isbacked or var_names is not None)  # (see _counts_where_model_reads)
        if raw_left_out and NO_COUNTS_ELSEWHERE in str(error):
            error = type(error)(str(error).split(NO_COUNTS_ELSEWHERE)[0].rstrip())
        if layer == model_layer:
            raise error
        moved_from, moved_to = counts_location(layer), counts_location(model_layer)
        message = str(error).replace(moved_to, moved_from)
        no_counts = re.match(r"(.* has (?:non-integer|negative) values .*?; it looks [^.]*)\.", message)
        if no_counts is None:
            raise type(error)(message) from error
        option = "X" if layer is None else shlex.quote(layer)
        advice = f"give --layer the place of the raw counts (the model was trained on {moved_to}, which this file lacks)"
        holds_counts = False
        if model_layer is None or model_layer in adata.layers:
            advice = f"leave out --layer to read the counts where the model was trained, {moved_to}"
            matrix = count_matrix(adata, model_layer)
            try:
                if not is_backed_matrix(matrix):
                    validate_counts(matrix, moved_to)
                    holds_counts = True
                    advice = f"leave out --layer: the model reads its counts from {moved_to}, which holds whole counts"
            except (ValueError, TypeError):
                advice = f"give --layer the place of the raw counts ({moved_to}, where the model was trained, holds none)"
        rounding = ""  # estimated counts (the error advised rounding), rounded into a layer of their own
        if not holds_counts and " If these are estimated or ambient-corrected counts" in message:
            rounded = "rounded" if layer != "rounded" else "rounded_counts"
            rounding = (
                ". If these are estimated or ambient-corrected counts (salmon, kallisto, RSEM, alevin, SoupX, decontX; "
                f"not TPM or CPM), round them into a layer of their own in Python, adata.layers[{rounded!r}] = "
                f"np.rint({moved_from}), write the file and pass --layer {rounded}"
            )
        raise type(error)(f"{no_counts[1]}, so --layer {option} gives no counts: {advice}{rounding}") from error


@contextmanager
def _errors_name_the_genes_column(var_names: str | None) -> Iterator[None]:
    """Inside: an error about the genes' names, read from ``var[var_names]`` (--var-names) by
    :func:`_counts_where_model_reads`, names that column (and its fix acts on it) instead of ``var_names``."""
    try:
        yield
    except (ValueError, TypeError) as error:
        if var_names is None or ".var_names" not in str(error):
            raise
        raise type(error)(str(error).replace(".var_names", f".var[{var_names!r}]")) from error


@contextmanager
def _errors_name_the_batch_column(batches_from: tuple[str, str] | None) -> Iterator[None]:
    """Inside: an error about the model's batch column, which :func:`_counts_where_model_reads` filled from
    ``obs[column]`` (``batches_from``: column, the model's batch key; --batch-key), names that column instead."""
    try:
        yield
    except (ValueError, KeyError, TypeError) as error:
        model_column = None if batches_from is None else f"obs[{batches_from[1]!r}]"
        if model_column is None or model_column not in _message_of(error):
            raise
        raise type(error)(_message_of(error).replace(model_column, f"obs[{batches_from[0]!r}]")) from error


def _counts_where_model_reads(
    adata, layer: str | None, model_layer: str | None, var_names: str | None = None, batches_from: tuple[str, str] | None = None
):
    """``adata`` itself if its counts are where the model reads them under the model's gene names, else an AnnData
    with its obs (for the covariates), its gene names (those of ``var[var_names]``, made unique as
    ``var_names_make_unique`` makes them) and the same matrix, not copied, in that place. ``batches_from``
    (column, the model's batch key): that obs column is the batch column there (``adata`` keeps its obs)."""
    import anndata as ad
    import pandas as pd
    from anndata.utils import make_index_unique

    from cellvae.data import count_matrix, stored_x

    if layer == model_layer and var_names is None and batches_from is None:
        return adata
    counts = count_matrix(adata, layer)
    genes = adata.var_names if var_names is None else make_index_unique(pd.Index(adata.var[var_names].astype(str)))
    obs = adata.obs
    if batches_from is not None:
        obs = obs.copy()
        obs[batches_from[1]] = obs[batches_from[0]]
    # X, the other layers and raw ride along, not copied, for the advice of errors about the counts, which names
    # another place holding counts; not raw of a backed file (it would be read) nor where its genes are named otherwise
    raw = None if adata.isbacked or var_names is not None else adata.raw
    names = {"obs": obs, "var": pd.DataFrame(index=genes), "raw": raw}
    layers = {name: matrix for name, matrix in adata.layers.items() if name is not None and name != model_layer}
    if model_layer is None:
        return ad.AnnData(X=counts, layers=layers, **names)
    return ad.AnnData(X=stored_x(adata), layers=layers | {model_layer: counts}, **names)


def _record_embedding(
    adata, key_added: str, model, model_dir: str, layer: str | None, stale: str | None, more: Mapping | None = None
) -> None:
    """``embed``'s (and ``map``'s, with its ``more`` entries) record in ``uns`` (where ``tl.embed`` keeps its settings;
    ``layer``: where the counts were read, ``None`` for X), replacing an earlier fit's, and the word ``stale`` where the
    input held an ``obsm[key_added]`` and a graph or UMAP likely made from it."""
    from cellvae import tl

    uns_key = tl._uns_key(key_added)
    # layer and batch_key as tl.embed and cellvae fit record them: None for X, or for no batches (the record's other
    # entries are kept; tl._check_record_is_its_own refused, before any work, a record that is not embed's to write)
    params = {"cellvae_version": CELLVAE_VERSION, "key_added": key_added, "model_dir": _recorded_path(model_dir), "layer": layer}
    params["batch_key"] = model.config.batch_key
    params |= {"epochs_trained": int(len(model.history))}
    if model.train_settings is not None:  # the epochs the model was trained for (with early stopping, more)
        params["max_epochs"] = int(model.train_settings.max_epochs)
    params |= tl._kept_epoch_record(model.history)  # as tl.embed and cellvae fit record them
    params |= {k: v for k, v in (more or {}).items() if v is not None}
    adata.uns[uns_key] = {**adata.uns.get(uns_key, {}), "params": params}
    _warn_if_graph_is_stale(stale)


def _streamed(args: argparse.Namespace) -> bool:
    """Whether the input's counts were streamed from disk: --backed, or a .zarr store (always streamed)."""
    return bool(args.backed) or Path(args.input).is_dir()


def _recorded_path(path: str | None) -> str | None:
    """A path as the output's record keeps it: absolute, so that it names the same place from another folder."""
    return None if path is None else os.path.abspath(path)


def _warn_if_graph_is_stale(stale: str | None) -> None:
    """Print ``stale``, :func:`tl._stale_graph_message`'s word taken before the input's ``obsm[key_added]`` was replaced,
    where the output keeps the input's graph, UMAP and clusters (``cellvae embed``; ``cellvae fit`` where it computed no
    graph)."""
    if stale:
        print(f"warning: {stale.replace('adata holds', 'the input holds')}", file=sys.stderr)


OUTPUT_FOLDER_OPTIONS = ("model_dir", "query_model_dir", "checkpoint_dir")  # folders a command writes (or reads) whole


def _check_input_and_output(args: argparse.Namespace) -> None:
    """Fail before any work, not after training, on --backed misuse, a bad --key-added or an --out that
    cannot (or may not) be written."""
    read = [args.input, *([args.reference] if getattr(args, "reference", None) else [])]  # (map's --reference too)
    if args.backed and all(Path(path).is_dir() for path in read):  # (it streams whichever of them is an .h5ad)
        raise SystemExit("error: --backed is for .h5ad files; a .zarr store is always streamed from disk")
    out = args.out
    if _same_file(out, args.input):
        raise SystemExit("error: --out is the input file; give another path (the input is never replaced)")
    reference = getattr(args, "reference", None)  # (map's)
    if reference is not None and _same_file(out, reference):
        raise SystemExit("error: --out is the --reference file; give another path (the reference is never replaced)")
    if Path(out).is_dir():
        raise SystemExit(f"error: --out {out} is a folder; give the path of the .h5ad file to write")
    # --out inside a model or checkpoint folder first: the advice below (create the folder, --overwrite) would not help
    folders = {f"--{name.replace('_', '-')}": getattr(args, name, None) for name in OUTPUT_FOLDER_OPTIONS}
    read_only = ("--model-dir",) if args.command in ("map", "embed") else ()  # (the model these commands read)
    _check_out_is_outside(out, {option: path for option, path in folders.items() if path is not None}, read_only)
    if Path(out).suffix.lower() != ".h5ad":  # (under .zarr an .h5ad file would not open as a Zarr store)
        raise SystemExit(
            f"error: --out {out}: cellvae writes .h5ad files (it reads .zarr stores only); give a path ending in .h5ad"
        )
    folder = Path(out).resolve().parent
    blocked = next((path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None)
    if blocked is not None:  # (no folder can be made there)
        raise SystemExit(f"error: --out {out} cannot be written: {blocked} is a file, not a folder")
    # a folder that does not exist yet is made when --out is written (as --model-dir's): checked where it would be
    _check_can_write(next(path for path in (folder, *folder.parents) if path.exists()), "--out", out)
    if Path(out).exists() and not args.overwrite:
        raise SystemExit(f"error: --out {out} exists; pass --overwrite to replace it")
    if not args.key_added or "/" in args.key_added:
        raise SystemExit(f"error: --key-added must be a non-empty obsm key without '/', got {args.key_added!r}")
    if args.command == "fit" and args.key_added in GRAPH_KEYS and not args.embedding_only:
        raise SystemExit(
            f"error: --key-added {args.key_added} would be overwritten by what fit's neighbours, Leiden and UMAP "
            f"write ({', '.join(GRAPH_KEYS)}); choose another key"
        )


def _same_file(path: str, other: str) -> bool:
    """Whether two paths name one file: the same path once resolved, or (existing) the same file on disk, as on a
    case-insensitive file system (macOS, Windows: data.h5ad and Data.h5ad) or through a hard link."""
    if Path(path).resolve() == Path(other).resolve():
        return True
    return Path(path).exists() and Path(other).exists() and os.path.samefile(path, other)


def _check_model_dir(
    model_dir: str,
    option: str,
    *,
    overwrite: bool,
    out: str,
    separate: Mapping[str, str | None] | None = None,
    inputs: Mapping[str, str | None] | None = None,
) -> None:
    """Fail before training, not after it, where the model could not be saved in ``model_dir`` (given as
    ``option``), where saving it or writing ``out`` would replace the files of a ``separate`` folder
    (``{option: path}``: fit's checkpoints, map's reference model), or where replacing the folder would remove one
    of the ``inputs`` (``{option: path}``: a model's ``adata.h5ad`` given as the input)."""
    from cellvae.model import ADATA_FILE, is_empty_folder, is_mounted_file, saves_in_place, why_not_a_model_folder

    folder = Path(model_dir).expanduser()
    resolved = folder.resolve()
    if folder.name in ("", ".", "..") or resolved.name in ("", ".", ".."):
        raise SystemExit(f"error: {option} needs a folder name for the model, e.g. my_model/, got {model_dir!r}")
    if folder.is_symlink():  # (first: where it points says nothing; a link to nowhere does not exist, but save refuses it)
        raise SystemExit(
            f"error: {model_dir} is a symbolic link, not a model folder; cellvae saves models only into folders: "
            f"give {option} the folder the link points to, or a new one"
        )
    blocked = next((path for path in (resolved, *resolved.parents) if path.exists() and not path.is_dir()), None)
    if blocked is not None:
        raise SystemExit(f"error: {option} {model_dir} cannot be made: {blocked} is a file")
    others = {name: path for name, path in (separate or {}).items() if path is not None}
    for other, path in others.items():
        if _nested(Path(path), resolved):
            raise SystemExit(f"error: {other} and {option} must be separate folders, neither inside the other")
    # where save writes: into the folder (empty, a mount point, the working directory, in a read-only one), else beside it
    in_place = saves_in_place(folder)
    _check_can_write(folder if in_place else next(path for path in resolved.parents if path.exists()), option, model_dir)
    if folder.exists() and not is_empty_folder(folder):  # (an empty one, made ahead, is taken)
        if not overwrite:
            raise SystemExit(f"error: model directory {model_dir} exists; pass --overwrite to replace it")
        what = why_not_a_model_folder(folder)
        if what is not None:
            raise SystemExit(
                f"error: {model_dir} is {what}, not a saved cellvae model folder; "
                f"--overwrite replaces only a model folder: choose a new {option}, or empty or remove it yourself"
            )
        if (folder / ADATA_FILE).is_file() and is_mounted_file(folder / ADATA_FILE):  # (save refuses it, after training)
            raise SystemExit(
                f"error: {folder / ADATA_FILE} is mounted on its own (e.g. docker -v FILE:...), so the new model's save "
                f"cannot remove it: choose another {option}, or unmount the file first"
            )
        for name, path in (inputs or {}).items():
            if path is not None and resolved in Path(path).expanduser().resolve().parents:
                raise SystemExit(
                    f"error: {name} {path} lies in {option} {model_dir}, which --overwrite replaces (removing it): "
                    f"copy it out of the folder first, or choose another {option}"
                )
        if not in_place and not os.access(folder, os.W_OK):  # (a folder moved aside has its ".." entry rewritten)
            raise SystemExit(
                f"error: {option} {model_dir} cannot be replaced: the folder is read-only, and cellvae moves the old "
                f"model aside; make it writable (chmod u+w), or choose another {option}"
            )
    _check_out_is_outside(out, {option: model_dir, **others})


def _check_can_write(folder: Path, option: str, given: str) -> None:
    """Fail before any work, not after training, where nothing can be written in ``folder`` (where ``option``'s
    path ``given`` goes): a file is made there and removed."""
    try:
        handle, probe = tempfile.mkstemp(prefix=".cellvae-write-check.", dir=folder)
    except OSError as error:
        raise SystemExit(
            f"error: {option} {given} cannot be written: nothing can be written in {folder} ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from error
    os.close(handle)
    os.unlink(probe)


def _nested(first: Path, second: Path) -> bool:
    """Whether two folders are one, or one lies inside the other."""
    first, second = first.expanduser().resolve(), second.expanduser().resolve()
    return first == second or first in second.parents or second in first.parents


def _check_out_is_outside(out: str, folders: Mapping[str, str], read_only: tuple[str, ...] = ()) -> None:
    """Refuse an --out that is one of ``folders`` (``{option: path}``) or lies inside a model folder: saving the model
    replaces the folder whole (a checkpoint folder takes only its checkpoint files: --out may lie there); a model
    folder the command only reads (``read_only``) holds a model's files only."""
    target = Path(out).expanduser().resolve()
    for option, folder in folders.items():
        resolved = Path(folder).expanduser().resolve()
        # (inside the checkpoint folder: only not under a checkpoint file's name)
        inside = resolved in target.parents and (option != "--checkpoint-dir" or target.name.lstrip(".").startswith("checkpoint"))
        if target == resolved or inside:
            why = (
                "it is the model's folder, which holds a saved model's files only: "
                + (
                    "adata.h5ad there is the data CellVAE.load gives the model"
                    if target.name == "adata.h5ad"
                    else "a later cellvae fit --model-dir of it with --overwrite would refuse it"
                )
                if option in read_only
                else "it would replace the files there"
            )
            raise SystemExit(f"error: --out must not be {option} or inside it ({why})")


def _write(adata, out: str, compression: str | None = None) -> None:
    """Write ``adata`` to a new file beside ``out``, then move it into place: never a half-written file, nor
    one mixed with an old one (anndata writes a backed AnnData into an existing file). ``compression``: h5py's
    filter for the arrays ("gzip", "lzf"), as anndata's ``write_h5ad`` takes it."""
    import anndata as ad

    # in the folder the check before any work looked at (_check_input_and_output: through links, without "..")
    target = Path(out).parent.resolve() / Path(out).name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial.h5ad")
    try:
        # An input written by anndata 0.13 with pandas 3 holds pandas string arrays, which anndata 0.12 writes
        # only when allowed; the output keeps them as the input stored them.
        with ad.settings.override(allow_write_nullable_strings=True), _quiet_if_hdf5_cannot_close():
            if any(_on_disk(matrix) for matrix in _matrices(adata)):
                _write_copying_on_disk_matrices_in_blocks(adata, partial, compression)
            else:
                ad.AnnData.write_h5ad(adata, partial, compression=compression)
        os.replace(partial, target)
    except OSError as error:  # HDF5's own message names the partial file and its write offsets, over several lines
        if error.errno is None:
            raise
        raise OSError(error.errno, f"could not write {out}: {os.strerror(error.errno)}") from error
    finally:
        partial.unlink(missing_ok=True)


@contextmanager
def _quiet_if_hdf5_cannot_close() -> Iterator[None]:
    """Where h5py cannot close a file it writes (a full disk or quota), it prints a traceback for each of the file's
    objects (a page of them) besides raising the error that the command tells in one line: those are left out, and
    the process is marked to end without closing the file again (:func:`_run_past_hdf5_write_failures`). Anything
    else written to stderr meanwhile is printed after."""
    previous_hook, captured, left_open = sys.unraisablehook, io.StringIO(), []

    def hdf5_objects_left_open(unraisable) -> None:
        if "h5py" in str(unraisable.object):
            left_open.append(unraisable.object)
        else:
            previous_hook(unraisable)

    sys.unraisablehook = hdf5_objects_left_open
    try:
        with redirect_stderr(captured):
            yield
    finally:
        sys.unraisablehook = previous_hook
        if left_open:
            _SHELL_RUN.hdf5_left_open = True
        else:
            sys.stderr.write(captured.getvalue())


COPY_BLOCK = 1 << 24  # stored values (or dense rows × genes) copied at once from a backed input to --out


def _matrices(adata) -> list:
    from cellvae.data import stored_x

    return [stored_x(adata), *adata.layers.values(), *([adata.raw.X] if adata.raw is not None else [])]


def _on_disk(elem) -> bool:
    import h5py
    import zarr
    from anndata.abc import CSCDataset, CSRDataset

    return isinstance(elem, (CSRDataset, CSCDataset, h5py.Dataset, zarr.Array))


def _write_copying_on_disk_matrices_in_blocks(adata, path: Path, compression: str | None = None) -> None:
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
                _copy_in_blocks(elem.group[name], group, name, COPY_BLOCK, maxshape=(None,), **dataset_kwargs)
        else:  # a dense array, whole rows at a time
            rows = max(1, COPY_BLOCK // max(1, math.prod(elem.shape[1:])))
            _copy_in_blocks(elem, store, key, rows, **dataset_kwargs)
            store[key].attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})

    adata.strings_to_categoricals()  # as anndata's write_h5ad does
    if adata.raw is not None:
        adata.strings_to_categoricals(adata.raw.var)
    with h5py.File(path, "w") as file:
        write_dispatched(file, "/", adata, callback=write, dataset_kwargs={"compression": compression} if compression else {})


def _copy_in_blocks(source, group, name: str, rows: int, maxshape: tuple | None = None, **dataset_kwargs) -> None:
    target = group.create_dataset(name, shape=source.shape, dtype=source.dtype, maxshape=maxshape, **dataset_kwargs)
    for start in range(0, source.shape[0], rows):
        target[start : start + rows] = source[start : start + rows]


# scanpy's readers of the formats a count matrix often comes in, by file suffix
SCANPY_READERS = {".h5": "read_10x_h5", ".loom": "read_loom", ".csv": "read_csv", ".mtx": "read_mtx", ".txt": "read_text"}


def _read(path: str, backed: bool = False, layer: str | None = None, option: str = "input"):
    """An .h5ad read into memory (or opened read-only with ``backed``), or a .zarr store whose counts stay on disk
    (``option``: what the path was given as, for the error where it is missing)."""
    import anndata as ad

    source = Path(path)
    if not source.exists():
        raise SystemExit(f"error: {option} {path} does not exist")
    try:
        with warnings.catch_warnings():
            # anndata's warning about repeated gene names: cellvae's own error names them and the fix (or --var-names
            # reads the names from a column, where the repeats do not matter)
            warnings.filterwarnings("ignore", "Variable names are not unique", UserWarning)
            if source.is_dir():
                from cellvae import read_zarr_lazy

                return read_zarr_lazy(source)
            if backed and layer is not None:  # anndata's backed mode would read the layer into memory
                from cellvae import read_h5ad_lazy

                adata = read_h5ad_lazy(source)  # open while the process runs, like a backed file
            else:
                adata = ad.read_h5ad(source, backed="r" if backed else None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        convert = ""
        if source.suffix.lower() not in (".h5ad", ".zarr"):  # another format (10x's .h5 or folder, .loom, .csv)
            reader = "read_10x_mtx" if source.is_dir() else SCANPY_READERS.get(source.suffix.lower(), "read")
            convert = (
                "; cellvae reads .h5ad files and .zarr stores: convert it with scanpy first, "
                f"python -c \"import scanpy as sc; sc.{reader}({str(path)!r}).write_h5ad('IN.h5ad')\""
            )
        text = re.sub(  # the store named by a Python call (any repr of its path), quoted for the shell
            r"cellvae\.read_zarr_lazy\(('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\")\)",
            lambda found: f"give cellvae {shlex.quote(ast.literal_eval(found[1]))} as its input",
            str(error),
        )
        raise SystemExit(f"error: could not read {path} as an AnnData ({type(error).__name__}: {text}){convert}") from error
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
