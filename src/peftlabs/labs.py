"""Helpers for the lab notebooks in labs/: sample inputs, logit checks, loss curves, timing, execution.

    python -m peftlabs.labs labs/Lab-01-LoRA --quick            # run one lab's notebooks in order
    python -m peftlabs.labs labs/Lab-* --executed-dir build/labs  # full mode, keep copies with outputs + HTML

The notebooks do the training, loading and merging themselves with the
transformers, peft and adapters APIs; this module contains only the plumbing
that would distract from those calls.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from peftlabs import data as data_module
from peftlabs.errors import UserError
from peftlabs.runs import write_text_atomic

# Environment variables read by every notebook's parameter cell.
QUICK_VARIABLE = "PEFTLABS_LAB_QUICK"
OUTPUT_VARIABLE = "PEFTLABS_LAB_OUTPUT"

NOTEBOOK_ORDER = ("01-Setup.ipynb", "02-Train.ipynb", "03-Inference.ipynb")
DEPLOY_NOTEBOOKS = ("04-Merge_and_Deploy.ipynb", "04-Deploy.ipynb")


def sample_batch(tokenizer, data: data_module.TaskData, split, count: int, max_length: int) -> dict[str, Any]:
    """Tokenised inputs of the first ``count`` rows of a split, padded into one batch.

    Causal LM rows are prompt and response together, so the logits cover the
    tokens the adapter was trained to produce.
    """
    rows = split.select(range(min(count, len(split))))
    if data.task == "classification":
        return dict(tokenizer(list(rows["text"]), truncation=True, max_length=max_length, padding=True,
                              return_tensors="pt"))
    features = []
    for prompt, response in zip(rows["prompt"], rows["response"]):
        encoded = data_module.encode_causal_example(tokenizer, prompt, response, data.instruction, max_length)
        features.append({"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]})
    return dict(tokenizer.pad(features, return_tensors="pt"))


@torch.no_grad()
def logits_of(model, batch: dict[str, Any]) -> torch.Tensor:
    """fp32 logits of a model on a batch, on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    inputs = {name: value.to(device) for name, value in batch.items()}
    return model(**inputs).logits.float().cpu()


def max_logit_difference(first: torch.Tensor, second: torch.Tensor, attention_mask: torch.Tensor | None = None) -> float:
    """Largest absolute difference between two logit tensors, over real (non-padding) tokens.

    Prompt-learning models return logits for their virtual tokens too; those
    leading positions carry no attention mask of the input and are compared in full.
    """
    if first.shape != second.shape:
        raise ValueError(f"logit shapes differ: {tuple(first.shape)} and {tuple(second.shape)}")
    difference = (first - second).abs()
    if difference.dim() == 3 and attention_mask is not None:
        virtual = difference.shape[1] - attention_mask.shape[1]
        mask = torch.cat([torch.ones(attention_mask.shape[0], virtual, dtype=torch.bool),
                          attention_mask.bool().cpu()], dim=1)
        difference = difference[mask]
    return float(difference.max())


def loss_history(log_history: list[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """(steps, training losses) from ``trainer.state.log_history``."""
    steps = [entry["step"] for entry in log_history if "loss" in entry]
    losses = [entry["loss"] for entry in log_history if "loss" in entry]
    return steps, losses


def plot_loss(log_history: list[dict[str, Any]], title: str):
    """Plot the training loss logged by the Trainer; returns the matplotlib figure."""
    import matplotlib.pyplot as plt

    steps, losses = loss_history(log_history)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, losses, marker="o")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def time_calls(function: Callable[[], Any], repeats: int = 3) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``function``, after one untimed warm-up call."""
    function()
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return seconds


def folder_bytes(path: str | Path) -> int:
    """Total size of the files in a folder, in bytes."""
    return sum(file.stat().st_size for file in Path(path).rglob("*") if file.is_file())


def lab_notebooks(lab_dir: str | Path) -> list[Path]:
    """The notebooks of a lab folder in the order they must run: setup, train, inference, deploy."""
    lab_dir = Path(lab_dir)
    notebooks = [lab_dir / name for name in NOTEBOOK_ORDER]
    notebooks += [lab_dir / name for name in DEPLOY_NOTEBOOKS if (lab_dir / name).is_file()]
    missing = [path.name for path in notebooks if not path.is_file()]
    if missing:
        raise UserError(f"lab folder {lab_dir} has no {', '.join(missing)}: pass a folder under labs/")
    return notebooks


def execute_lab(lab_dir: str | Path, output_dir: str | Path, quick: bool, executed_dir: str | Path | None = None,
                cell_timeout: int = 1800) -> list[Path]:
    """Execute a lab's notebooks in order in one fresh kernel each; return the notebooks run.

    The kernel is the ``python3`` kernel of this interpreter (jupyter_client
    starts it with ``sys.executable``), with the lab folder as working
    directory and the quick-mode and output-folder variables set. With
    ``executed_dir``, a copy of each notebook with its outputs and an HTML
    rendering are written to ``executed_dir/<lab folder>/``, also for a
    notebook that failed, so its outputs up to the failing cell can be read.
    The source notebooks are never modified. A failing cell raises nbclient's
    ``CellExecutionError``, which names the cell and shows its traceback;
    the lab's later notebooks are not run, because they read what the
    earlier ones saved.
    """
    import nbformat
    from nbclient import NotebookClient

    lab_dir = Path(lab_dir).resolve()
    environment = dict(os.environ)
    environment[QUICK_VARIABLE] = "1" if quick else "0"
    environment[OUTPUT_VARIABLE] = str(Path(output_dir).resolve())
    environment.setdefault("HF_HUB_OFFLINE", "1")
    environment.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The kernel imports the same peftlabs sources as this process, even from a source checkout.
    source_root = str(Path(__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source_root, environment.get("PYTHONPATH")]))
    # matplotlib draws into the notebook; no display is needed.
    environment["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"

    notebooks = lab_notebooks(lab_dir)
    if executed_dir is not None:
        # Copies from an earlier run would otherwise sit next to this run's, unmarked as old.
        for old_copy in (Path(executed_dir) / lab_dir.name).glob("0*-*.*"):
            old_copy.unlink()
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(notebook, kernel_name="python3", timeout=cell_timeout,
                                resources={"metadata": {"path": str(lab_dir)}})
        started = time.perf_counter()
        try:
            client.execute(env=environment)
        finally:
            print(f"{lab_dir.name}/{path.name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
            if executed_dir is not None:
                _write_executed(notebook, Path(executed_dir) / lab_dir.name / path.name)
    return notebooks


def _write_executed(notebook, target: Path) -> None:
    """Write an executed notebook and its HTML rendering, each replaced in one rename."""
    import nbformat
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter().from_notebook_node(notebook)
    write_text_atomic(target, nbformat.writes(notebook))
    write_text_atomic(target.with_suffix(".html"), html)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peftlabs.labs", description="Execute lab notebooks in order.")
    parser.add_argument("labs", nargs="+", help="lab folders, such as labs/Lab-01-LoRA")
    parser.add_argument("--quick", action="store_true", help="a few training steps and examples per lab")
    parser.add_argument("--output-dir", default=None,
                        help="folder for adapters and merged models; default: outputs/ inside each lab")
    parser.add_argument("--executed-dir", default=None, help="write executed copies and HTML here")
    parser.add_argument("--replace-outputs", action="store_true",
                        help="delete each lab's earlier adapters and merged models before running it")
    args = parser.parse_args(argv)

    # Every folder is checked before any lab runs or any output is deleted.
    try:
        for lab in args.labs:
            lab_notebooks(lab)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from nbclient.exceptions import CellExecutionError

    # A failing lab does not stop the others: each is reported, and the exit status is 1 at the end.
    failed = []
    for lab in args.labs:
        output = Path(args.output_dir) / Path(lab).name if args.output_dir else Path(lab) / "outputs"
        if args.replace_outputs and output.exists():
            shutil.rmtree(output)
        try:
            execute_lab(lab, output, args.quick, args.executed_dir)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        except CellExecutionError as error:
            print(f"{Path(lab).name} failed:\n{error}", file=sys.stderr)
            failed.append(Path(lab).name)

    if failed:
        where = f" (executed copies up to the failing cell are in {args.executed_dir})" if args.executed_dir else ""
        print(f"failed labs: {', '.join(failed)}{where}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

