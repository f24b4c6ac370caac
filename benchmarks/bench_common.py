"""What the benchmark scripts share: where a result came from, merging new rows into a results CSV, and the
optional packages (the ``bench`` extra) a script needs before it starts any work."""

from __future__ import annotations

import datetime
import importlib.util
import platform
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
INSTALL_BENCH = 'pip install -e ".[bench]"'


def git_commit() -> str:
    """The repository's short commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def run_stamp() -> dict[str, str]:
    """The date (UTC) and commit of a run: the columns every new row of a results CSV carries."""
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "commit": git_commit()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux); platform.processor() is empty there."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment() -> dict:
    """The run stamp with the machine and the versions that produced a result."""
    import os

    import torch

    import cellvae

    return {
        **run_stamp(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "scvi_tools": package_version("scvi-tools"),
        "cellvae": cellvae.__version__,
    }


def merge_rows(path: Path, rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Write ``rows`` into the CSV at ``path``: earlier rows with the same ``keys`` are replaced, the others kept.

    Columns are aligned by name; a column the earlier rows lack stays empty there. Returns the whole table.
    """
    if rows.empty:
        raise SystemExit(f"no rows to write: {path} is left as it was")
    if path.is_file():
        earlier = pd.read_csv(path)
        if set(keys) <= set(earlier.columns):
            replaced = identities(earlier, keys).isin(identities(rows, keys))
            rows = pd.concat([earlier[~replaced], rows], ignore_index=True)
            for key in dict.fromkeys([*keys, *(["seed"] if "seed" in rows else [])]):  # (with an empty cell a column
                values = rows[key]  # reads as floats: seeds and other whole-number keys stay whole)
                if pd.api.types.is_float_dtype(values) and (values.dropna() % 1 == 0).all():
                    rows[key] = values.astype("Int64")
        else:
            raise SystemExit(f"{path} lacks the columns {keys} that identify its rows: write to another file")
    path.parent.mkdir(parents=True, exist_ok=True)
    rows.to_csv(path, index=False)
    return rows


def identities(rows: pd.DataFrame, keys: list[str]) -> pd.MultiIndex:
    """Each row's ``keys`` as text, whole numbers without a decimal point (a key column with an empty cell reads as
    floats: seed 0 as 0.0), empty cells as ""."""

    def text(value) -> str:
        if pd.isna(value):
            return ""
        if isinstance(value, float) and value.is_integer():
            return str(int(value))
        return str(value)

    return pd.MultiIndex.from_frame(rows[keys].map(text))


def require(modules: dict[str, str], skip_hint: str = "") -> None:
    """Exit with how to install them if any of ``modules`` (import name -> package name) is missing.

    Called before any work, so that a missing optional package does not fail minutes into a run.
    """
    missing = [package for module, package in modules.items() if importlib.util.find_spec(module) is None]
    if missing:
        message = f"this benchmark needs {', '.join(missing)} (the bench extra): {INSTALL_BENCH}"
        raise SystemExit(message + (f", or {skip_hint}" if skip_hint else ""))
