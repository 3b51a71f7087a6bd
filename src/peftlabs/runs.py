"""The run directory: what a training run writes, and how it is read back.

    runs/NAME/
      config.yaml     resolved settings; `peftlabs train --config` on it reruns the run
      run.json        base model, task, labels, instruction, base fingerprint, versions
      adapter/        the trained adapter (safetensors), written atomically at the end
      checkpoints/    resumable Trainer checkpoints (adapter, optimizer, scheduler, RNG)
      metrics.json    final metrics, written atomically
      train.log       the log of the run

Every file that marks a finished step is written under a temporary name and
renamed into place, so a crash or Ctrl-C never leaves a half-written adapter
or metrics file that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from peftlabs.errors import UserError

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.json"  # written last in every Trainer checkpoint


def check_output_dir(path: Path, overwrite: bool, resume: bool) -> None:
    """Reject an existing run directory unless the user asked to replace or resume it."""
    if resume:
        if not (path / "config.yaml").is_file():
            raise UserError(f"cannot resume: {path} is not a run directory (no config.yaml): check --output-dir")
        return
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise UserError(
            f"output directory {path} already exists: pass --overwrite to replace it, "
            f"--resume to continue it, or choose another --output-dir"
        )


def replace_dir(path: Path) -> None:
    """Remove an old run directory that the user asked to overwrite."""
    if path.exists():
        shutil.rmtree(path)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a staging folder; on success it replaces ``target`` in one rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        set_default_permissions(staging)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def set_default_permissions(path: Path) -> None:
    """Give a staged file, or a folder and everything in it, the permissions the user's umask gives.

    ``tempfile.mkdtemp`` and ``mkstemp`` create private entries (0700 and
    0600), and the rename into place keeps that mode. Saved runs and models
    are often read by another user or a server.
    """
    umask = os.umask(0)
    os.umask(umask)
    entries = [path, *path.rglob("*")] if path.is_dir() else [path]
    for entry in entries:
        if entry.is_dir():
            entry.chmod(0o777 & ~umask)
        elif entry.is_file():
            entry.chmod(0o666 & ~umask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        set_default_permissions(Path(temporary))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` through a temporary file renamed into place."""
    write_text_atomic(path, json.dumps(data, indent=2, default=str) + "\n")


def read_run(path: Path) -> dict[str, Any]:
    """Read run.json of a finished run, raising an error that names what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"run directory not found: {path}: pass the --output-dir of a training run")
    info = path / "run.json"
    if not info.is_file():
        raise UserError(f"{path} is not a peftlabs run directory (no run.json): pass a training run's folder")
    if not (path / ADAPTER_DIR).is_dir():
        raise UserError(
            f"run {path} has no finished adapter: the run did not complete; "
            f"continue it with `peftlabs train --output-dir {path} --resume`"
        )
    return json.loads(info.read_text())


def last_complete_checkpoint(run_dir: Path) -> Path | None:
    """Newest checkpoint whose Trainer state file exists, which the Trainer writes last."""
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return None
    complete = []
    for child in folder.iterdir():
        if child.name.startswith("checkpoint-") and (child / TRAINER_STATE).is_file():
            complete.append((int(child.name.split("-")[1]), child))
    return max(complete)[1] if complete else None


def remove_incomplete_checkpoints(run_dir: Path) -> None:
    folder = run_dir / CHECKPOINT_DIR
    if not folder.is_dir():
        return
    for child in folder.iterdir():
        if child.name.startswith("checkpoint-") and not (child / TRAINER_STATE).is_file():
            shutil.rmtree(child, ignore_errors=True)
