"""Run records: what a run directory states about how it was made, and reading many of them.

    peftlabs runs runs/                      # one line per run in the folder
    peftlabs runs --compare runs/a runs/b    # the settings and versions that differ

Every run.json records the seed, the library versions, the git commit of the
peftlabs code (and whether its tree had uncommitted changes) and a SHA-256
fingerprint of the training and eval data as loaded. metrics.json contains
the final metrics. Together with config.yaml that is enough to tell two runs apart.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from peftlabs.errors import UserError
from peftlabs.runs import ADAPTER_DIR, CHECKPOINT_DIR

# The metric shown for a run, first one present wins: accuracy for classification
# (also generative), ROUGE-L for generation, the eval loss when nothing else was scored.
MAIN_METRICS = ("eval_accuracy", "eval_rouge_l", "eval_loss")


def code_version() -> dict[str, Any]:
    """Git commit of the peftlabs source and whether its tree is dirty; nulls when not a git checkout.

    The package file must be tracked by git: an install inside another
    repository (a virtual environment in a project folder) is not that
    repository's code.
    """
    package = Path(__file__).resolve().parent
    unknown = {"commit": None, "dirty": None, "note": "not a git checkout"}
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=package,
                                 capture_output=True, text=True, timeout=10)
        if tracked.returncode != 0:
            return unknown
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=package, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=package,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return unknown
    return {"commit": commit, "dirty": bool(status.strip())}


def data_fingerprint(dataset) -> str | None:
    """SHA-256 over the rows of a loaded split, in order, as canonical JSON."""
    if dataset is None:
        return None
    digest = hashlib.sha256()
    for row in dataset:
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Reading run directories
# ---------------------------------------------------------------------------


def run_status(run_dir: Path) -> str:
    """finished (adapter and metrics saved), interrupted (checkpoints but no adapter) or incomplete."""
    if (run_dir / ADAPTER_DIR).is_dir() and (run_dir / "metrics.json").is_file():
        return "finished"
    if (run_dir / CHECKPOINT_DIR).is_dir():
        return "interrupted"
    return "incomplete"


def summarize_run(run_dir: Path) -> dict[str, Any]:
    config = _read_yaml(run_dir / "config.yaml")
    info = _read_json(run_dir / "run.json")
    metrics = _read_json(run_dir / "metrics.json")
    metric_name = next((name for name in MAIN_METRICS if metrics.get(name) is not None), None)
    return {
        "name": run_dir.name,
        "method": config.get("method", "?"),
        "model": info.get("model", config.get("model", "?")),
        "data": Path(str(config.get("dataset", "?"))).name,
        "metric": f"{metric_name[5:]} {metrics[metric_name]:.4f}" if metric_name else "-",
        "wall": _format_seconds(metrics.get("train_seconds")),
        "status": run_status(run_dir),
    }


def list_runs(folder: Path) -> list[dict[str, Any]]:
    """Summaries of the run directories (folders with a config.yaml) directly inside ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"runs folder not found: {folder}: pass the folder that contains your run directories")
    run_dirs = sorted(child for child in folder.iterdir() if (child / "config.yaml").is_file())
    return [summarize_run(run_dir) for run_dir in run_dirs]


def format_table(rows: list[dict[str, Any]]) -> str:
    headers = {"name": "NAME", "method": "METHOD", "model": "MODEL", "data": "DATA", "metric": "MAIN METRIC",
               "wall": "WALL", "status": "STATUS"}
    widths = {key: max([len(title)] + [len(str(row[key])) for row in rows]) for key, title in headers.items()}
    lines = ["  ".join(title.ljust(widths[key]) for key, title in headers.items()).rstrip()]
    for row in rows:
        lines.append("  ".join(str(row[key]).ljust(widths[key]) for key in headers).rstrip())
    return "\n".join(lines)


def recorded_settings(run_dir: Path) -> dict[str, Any]:
    """Return the settings in a run's config.yaml as one level with dotted keys, or {} when it is unreadable."""
    return flatten(_read_yaml(Path(run_dir) / "config.yaml"))


def compare_runs(first: Path, second: Path) -> list[tuple[str, Any, Any]]:
    """(setting, value in first, value in second) for every config key, method setting and record that differs."""
    records = []
    for run_dir in (Path(first), Path(second)):
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir} is not a run directory (no config.yaml): pass two training runs' folders")
        info = _read_json(run_dir / "run.json")
        flat = recorded_settings(run_dir)
        flat.pop("output_dir", None)  # differs between any two runs and changes nothing in them
        flat.update(flatten({"versions": info.get("versions", {}), "code": info.get("code", {}),
                              "data_fingerprint": info.get("data_fingerprint", {})}))
        records.append(flat)

    differences = []
    for key in sorted(set(records[0]) | set(records[1])):
        left, right = records[0].get(key, "(unset)"), records[1].get(key, "(unset)")
        if left != right:
            differences.append((key, left, right))
    return differences


def format_comparison(first: Path, second: Path, differences: list[tuple[str, Any, Any]]) -> str:
    if not differences:
        return f"{first} and {second} have the same settings, versions, code and data"
    rows = [("SETTING", str(first), str(second))] + [(key, _short(left), _short(right))
                                                        for key, left, right in differences]
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"{row[0].ljust(widths[0])}  {row[1].ljust(widths[1])}  {row[2]}".rstrip() for row in rows)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level, with dotted keys: {'lora': {'r': 8}} becomes {'lora.r': 8}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    # Fingerprints and commits are long; twelve hex digits tell them apart.
    return text[:12] if len(text) >= 40 and all(c in "0123456789abcdef" for c in text) else text


def _format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes}m{rest:02d}s" if minutes else f"{rest}s"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
