"""Train several methods and a full fine-tuning baseline on one task, and tabulate them.

    peftlabs compare --task-config benchmarks/compare/sst2-minilm.yaml \\
        --dataset ../shared/data/sst2/train.tsv --eval-dataset ../shared/data/sst2/dev.tsv \\
        --output-dir runs/compare/sst2-minilm
    peftlabs compare --model minilm-l6 --dataset train.csv --methods full,lora,ia3 \\
        --max-steps 200 --seeds 42,43,44 --output-dir runs/compare/mine

Every method gets the same data, budget (steps or epochs), batch size, seed
and evaluation. Only the settings in ``PER_METHOD_FIELDS`` (the optimiser's
learning rate and schedule) and the method's own hyperparameters may differ.
The task config is a YAML file of run settings shared by all methods, an
optional ``methods:`` list, and one section per method::

    model: minilm-l6
    max_steps: 500
    methods: [full, lora, bitfit]
    lora: {learning_rate: 1.0e-3, r: 8}
    full: {learning_rate: 5.0e-5}

With ``--seeds 42,43,44`` (or ``seeds: [42, 43, 44]`` in the task config)
every method is trained once per seed, seed by seed, so that the first
seed's runs form a whole comparison before the second starts. The table then
contains one row per method: the mean over seeds of each measurement, and for
each evaluation metric also its sample standard deviation (``eval_NAME_std``).
The column ``eval_NAME_vs_full`` is the headline metric minus that of full
fine-tuning trained with the same seed, averaged over seeds. ``results.md``
adds a second table with every run, and ``results_runs.csv`` has the same rows.

Each method is trained by ``peftlabs.train.train`` in its own child process
(``python -m peftlabs.cli train``), so that its peak resident memory is its
own: the parent samples the child's RSS every ``RSS_INTERVAL_SECONDS``.
Output folder::

    OUTPUT/runs/METHOD/      the method's run directory (adapter, metrics.json, ...)
    OUTPUT/runs/METHOD-seedN/    the same, when there is more than one seed
    OUTPUT/configs/METHOD.yaml   the resolved settings the child was started with
    OUTPUT/results.json, results.csv, results.md, and the PNG plots

A method whose run directory already has ``metrics.json`` is not trained
again, provided its recorded settings are the ones planned now. If they
differ, the command stops before training anything and names the setting.
A run directory without ``metrics.json`` (an interrupted method) is trained
again from the start, so that its time and memory are measured in one piece.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlabs import runs
from peftlabs.config import RunConfig, build_config, config_fields
from peftlabs.errors import UserError

log = logging.getLogger("peftlabs")

BASELINE = "full"
# Settings a method section may change; everything else is shared so the comparison stays fair.
PER_METHOD_FIELDS = ("learning_rate", "weight_decay", "warmup_ratio", "lr_scheduler")
# Flags of `peftlabs train` that have no meaning for a comparison.
REJECTED_FIELDS = {"method": "--methods", "resume": "rerun the same command", "overwrite": "a new --output-dir"}
RSS_INTERVAL_SECONDS = 0.25
DEFAULT_OUTPUT_DIR = "runs/compare"
PLOTS = ("quality_vs_parameters.png", "quality_vs_time.png", "peak_memory.png")


@dataclass
class MethodPlan:
    """One training run of the comparison: the settings to train with, or why the method is skipped."""

    name: str
    config: RunConfig | None
    skip_reason: str | None = None
    seed: int | None = None
    run_name: str = ""

    def __post_init__(self):
        self.run_name = self.run_name or self.name


@dataclass
class Comparison:
    output_dir: Path
    task: str
    plans: list[MethodPlan]
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def several_seeds(self) -> bool:
        return len({plan.seed for plan in self.plans if plan.config is not None}) > 1

    @property
    def run_rows(self) -> list[dict[str, Any]]:
        """One row per training run, with its difference from full fine-tuning trained with the same seed."""
        return with_baseline_gap(self.runs)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """One row per method: its single run, or the mean over its seeds."""
        return aggregate_seeds(self.run_rows) if self.several_seeds else self.run_rows


# ---------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------


def all_method_names() -> list[str]:
    """The full fine-tuning baseline first, then every PEFT method."""
    from peftlabs.methods import method_names

    return [BASELINE] + method_names()


def plan_comparison(file_values: dict[str, Any], cli_values: dict[str, Any],
                    methods: list[str] | None = None) -> tuple[Path, str, list[MethodPlan]]:
    """Resolve the settings of every method; raise UserError on bad input before anything runs."""
    from peftlabs.methods import get_method

    known_fields = {f.name for f in config_fields()}
    names = all_method_names()
    shared: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}

    # The task config: shared settings, the method list, one section per method.
    file_values = dict(file_values)
    cli_values = dict(cli_values)
    listed = file_values.pop("methods", None)
    seeds = _resolve_seeds(file_values, cli_values)
    for key, value in file_values.items():
        if key in known_fields:
            shared[key] = value
        elif key in names:
            if not isinstance(value, dict):
                raise UserError(f"task config section '{key}' must be a mapping of {key} settings")
            sections[key] = dict(value)
        else:
            raise UserError(f"unknown task config key '{key}': use run settings, 'methods', or a method "
                            f"section ({', '.join(names)})")

    # Command-line flags win: plain ones are shared, --METHOD.NAME ones go to that method.
    for key, value in cli_values.items():
        if "." in key:
            method, name = key.split(".", 1)
            sections.setdefault(method, {})[name] = value
        else:
            shared[key] = value
    for key, fix in REJECTED_FIELDS.items():
        if key in shared:
            raise UserError(f"compare does not take '{key.replace('_', '-')}': use {fix}")
    output_dir = Path(shared.pop("output_dir", DEFAULT_OUTPUT_DIR))

    # Which methods: the flag, else the task config's list, else all that apply.
    requested = methods if methods is not None else _parse_method_list(listed)
    explicit = requested is not None
    chosen = requested if explicit else names
    if not chosen:
        raise UserError("no methods to compare: pass --methods full,lora,... or leave it out for all")
    for name in chosen:
        get_method(name)
    if len(set(chosen)) != len(chosen):
        raise UserError(f"methods listed twice in {','.join(chosen)}: name each method once")
    for name in sections:
        if name not in chosen:
            get_method(name)  # an unknown section name is an error even when unused

    # One run per method and seed, ordered seed by seed. A method that does not apply is listed once.
    plans = []
    task = None
    for seed in seeds:
        for name in chosen:
            run_name = name if len(seeds) == 1 else f"{name}-seed{seed}"
            if seed is not None:
                shared["seed"] = seed
            config = _method_config(name, shared, sections.get(name, {}), output_dir / "runs" / run_name,
                                    known_fields)
            task = task or _task_of(config)
            reason = not_applicable_reason(config, task)
            if reason and explicit:
                raise UserError(f"method '{name}' does not apply here: {reason}; drop it from --methods")
            if reason and seed != seeds[0]:
                continue
            plans.append(MethodPlan(name, None if reason else config, reason, config.seed, run_name))
    return output_dir, task, plans


def _resolve_seeds(file_values: dict[str, Any], cli_values: dict[str, Any]) -> list[int | None]:
    """Return the seeds to train each method with, removing 'seeds' and an overridden 'seed' from both inputs.

    A flag wins over the task config, as for every setting: ``--seeds`` replaces
    the file's ``seed`` and ``--seed`` the file's ``seeds``. ``[None]`` means
    one run per method with the seed of the shared settings.
    """
    for source, values, both in (("the task config", file_values, "'seed' and 'seeds'"),
                                 ("the command line", cli_values, "--seed and --seeds")):
        if "seed" in values and "seeds" in values:
            raise UserError(f"{source} sets both {both}: keep one")
    file_seeds = _parse_seeds(file_values.pop("seeds", None))
    cli_seeds = _parse_seeds(cli_values.pop("seeds", None))
    if cli_seeds is not None:
        file_values.pop("seed", None)
        return cli_seeds
    if file_seeds is not None and "seed" not in cli_values:
        return file_seeds
    return [None]


def _parse_seeds(listed) -> list[int] | None:
    """Parse seeds from "42,43,44" (a flag) or [42, 43, 44] (YAML), or return None when not given."""
    if listed is None:
        return None
    if isinstance(listed, str):
        parts = [part.strip() for part in listed.split(",") if part.strip()]
    elif isinstance(listed, list):
        parts = listed
    else:
        parts = [listed]

    seeds = []
    for part in parts:
        if isinstance(part, str) and part.isdigit():
            part = int(part)
        if not isinstance(part, int) or isinstance(part, bool) or part < 0:
            raise UserError(f"invalid seeds {listed!r}: pass whole numbers of 0 or more, such as 42,43,44")
        seeds.append(part)
    if not seeds:
        raise UserError("no seeds given: pass seeds such as 42,43,44, or leave seeds out for one run per method")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"seeds listed twice in {listed!r}: name each seed once")
    return seeds


def _parse_method_list(listed) -> list[str] | None:
    if listed is None:
        return None
    if isinstance(listed, str):
        return [part.strip() for part in listed.split(",") if part.strip()]
    if isinstance(listed, list) and all(isinstance(item, str) for item in listed):
        return listed
    raise UserError(f"task config 'methods' must be a list of method names, found {listed!r}")


def _method_config(name: str, shared: dict[str, Any], section: dict[str, Any], run_dir: Path,
                   known_fields: set[str]) -> RunConfig:
    """Build one method's RunConfig: shared settings, its allowed run overrides, its hyperparameters."""
    from peftlabs.methods import get_method, method_names

    run_overrides = {}
    params = {}
    for key, value in section.items():
        if key in PER_METHOD_FIELDS:
            run_overrides[key] = value
        elif key in known_fields:
            raise UserError(f"'{key}' in the '{name}' section must be the same for every method: set it at the "
                            f"top level (per-method settings: {', '.join(PER_METHOD_FIELDS)})")
        else:
            params[key] = value
    get_method(name).parse_params(params)

    file_values = {**shared, **run_overrides}
    if params and name in method_names():
        file_values[name] = params
    # The default learning rate is written out, as `peftlabs train` records it in the run's config.yaml.
    file_values.setdefault("learning_rate", get_method(name).default_learning_rate)
    cli_values = {"method": name, "output_dir": str(run_dir), "overwrite": True}
    return build_config(file_values, cli_values)


def _task_of(config: RunConfig) -> str:
    from peftlabs.models import detect_task, read_model_config, resolve_model

    if config.task != "auto":
        return config.task
    return detect_task(read_model_config(resolve_model(config.model), config.trust_remote_code))


def not_applicable_reason(config: RunConfig, task: str) -> str | None:
    """Why the method cannot train this model and task, or None when it can.

    The method's own check runs on the model built on PyTorch's meta device:
    the architecture with no weights loaded, which is enough to see, for
    example, that a Llama model has no bias terms for BitFit.
    """
    import torch
    from transformers import AutoModel

    from peftlabs.methods import get_method
    from peftlabs.models import read_model_config, resolve_model

    method = get_method(config.method)
    params = method.parse_params(config.method_args.get(method.name))
    try:
        method.check(None, task, params)
        model_config = read_model_config(resolve_model(config.model), config.trust_remote_code)
        with torch.device("meta"):
            structure = AutoModel.from_config(model_config, trust_remote_code=config.trust_remote_code)
        method.check(structure, task, params)
    except UserError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------


def run_comparison(file_values: dict[str, Any], cli_values: dict[str, Any],
                   methods: list[str] | None = None) -> Comparison:
    """Train every planned method that has no finished run yet, then write the tables and plots."""
    output_dir, task, plans = plan_comparison(file_values, cli_values, methods)
    check_finished_runs(plans)
    output_dir.mkdir(parents=True, exist_ok=True)
    comparison = Comparison(output_dir, task, plans)

    for index, plan in enumerate(plans, 1):
        if plan.skip_reason:
            log.info("[%d/%d] %s skipped: %s", index, len(plans), plan.name, plan.skip_reason)
            comparison.runs.append(_skipped_row(plan))
            continue
        run_dir = Path(plan.config.output_dir)
        if (run_dir / "metrics.json").is_file():
            log.info("[%d/%d] %s already finished in %s: not trained again", index, len(plans), plan.run_name,
                     run_dir)
        else:
            log.info("[%d/%d] training %s in %s", index, len(plans), plan.run_name, run_dir)
            failure = _train_in_child(plan, output_dir)
            if failure:
                # One failed run does not stop the others; the command still fails at the end.
                log.error("%s failed: %s", plan.run_name, failure)
                comparison.runs.append({**_skipped_row(plan), "status": "failed", "note": failure})
                write_results(comparison)
                continue
        comparison.runs.append(collect_row(plan, run_dir))
        write_results(comparison)

    write_results(comparison)
    write_plots(comparison)
    log.info("results in %s", output_dir / "results.md")
    failed = [row["run"] for row in comparison.runs if row["status"] == "failed"]
    if failed:
        raise UserError(f"training failed for {', '.join(failed)}: see the note column of "
                        f"{output_dir / 'results.md'} and the logs in {output_dir / 'configs'}")
    return comparison


def check_finished_runs(plans: list[MethodPlan]) -> None:
    """Raise UserError when a finished run's recorded settings differ from the planned ones.

    Without this check, changing a learning rate and running the same command
    again would put the old run's scores in the new table.
    """
    import yaml

    from peftlabs.records import flatten, recorded_settings

    for plan in plans:
        if plan.config is None:
            continue
        run_dir = Path(plan.config.output_dir)
        if not (run_dir / "metrics.json").is_file():
            continue
        recorded = recorded_settings(run_dir)
        planned = flatten(yaml.safe_load(yaml.safe_dump(plan.config.to_dict())))
        # A run folder may have been moved, or continued with --resume: neither changes what it trained.
        for key in ("output_dir", "resume"):
            recorded.pop(key, None)
            planned.pop(key, None)
        changed = [key for key in sorted(set(recorded) | set(planned))
                   if not _same_setting(recorded.get(key), planned.get(key))]
        if not changed:
            continue

        key = changed[0]
        fix = "use a new --output-dir, or move that run away to train it again"
        if key not in recorded:
            raise UserError(f"{run_dir} was trained by an older peftlabs without the setting {key}: {fix}")
        raise UserError(f"{run_dir} was trained with {key}={recorded[key]}, now {key}={planned.get(key, '(unset)')}: "
                        f"{fix}")


def _same_setting(recorded, planned) -> bool:
    """Compare two setting values, counting two spellings of one existing file or folder as equal."""
    if recorded == planned:
        return True
    if isinstance(recorded, str) and isinstance(planned, str) and Path(recorded).exists() and Path(planned).exists():
        return Path(recorded).resolve() == Path(planned).resolve()
    return False


def _train_in_child(plan: MethodPlan, output_dir: Path) -> str | None:
    """Run `peftlabs train` on one run's settings and record its wall time and sampled peak RSS.

    Returns None on success, else the child's last line of output.
    """
    import psutil

    from peftlabs.config import write_yaml

    config = plan.config
    config_path = output_dir / "configs" / f"{plan.run_name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    write_yaml(config, config_path)
    log_path = output_dir / "configs" / f"{plan.run_name}.log"
    command = [sys.executable, "-m", "peftlabs.cli", "train", "--config", str(config_path)]

    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        child = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=_child_environment())
        sampler = _RssSampler(psutil.Process(child.pid))
        sampler.start()
        try:
            status = child.wait()
        except KeyboardInterrupt:
            # The child got the same Ctrl-C and saves a checkpoint; wait for it to finish doing so.
            child.wait()
            raise
        finally:
            sampler.stop()
    wall_seconds = time.perf_counter() - started

    if status != 0:
        tail = [line for line in log_path.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
        return f"exit status {status}: {tail[0]}"
    runs.write_json_atomic(Path(config.output_dir) / "compare.json", {
        "wall_seconds": round(wall_seconds, 2),
        "peak_rss_bytes": sampler.peak,
        "rss_sample_interval_seconds": RSS_INTERVAL_SECONDS,
    })
    return None


def _child_environment() -> dict[str, str]:
    # The child must import the same peftlabs as this process, also from a source checkout.
    environment = dict(os.environ)
    source = str(Path(__file__).resolve().parent.parent)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [source, environment.get("PYTHONPATH")]))
    return environment


class _RssSampler:
    """Peak resident set size of a process and its children, sampled on a background thread.

    Sampling can miss a spike shorter than the interval; the child's own
    getrusage peak is not used because Linux keeps ru_maxrss across exec, so
    it can include the parent's memory at the time of the fork.
    """

    def __init__(self, process):
        self.process = process
        self.peak = 0
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _sample(self) -> None:
        import psutil

        while not self._stopped.is_set():
            try:
                processes = [self.process] + self.process.children(recursive=True)
                self.peak = max(self.peak, sum(p.memory_info().rss for p in processes))
            except psutil.Error:
                pass  # the child exited between listing and reading
            self._stopped.wait(RSS_INTERVAL_SECONDS)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


def _skipped_row(plan: MethodPlan) -> dict[str, Any]:
    from peftlabs.methods import get_method

    return {"method": plan.name, "run": plan.run_name, "seed": plan.seed, "status": "skipped",
            "note": plan.skip_reason, "mergeable": _mergeable(get_method(plan.name))}


def _mergeable(method) -> str:
    if method.name == BASELINE:
        return "n/a (baseline)"
    return "yes" if method.mergeable else "no"


def collect_row(plan: MethodPlan, run_dir: Path) -> dict[str, Any]:
    """Build one table row from a finished run directory."""
    import json

    from peftlabs.methods import get_method

    metrics = json.loads((run_dir / "metrics.json").read_text())
    measured = run_dir / "compare.json"
    child = json.loads(measured.read_text()) if measured.is_file() else {}
    config = plan.config
    trainable, total = metrics["trainable_parameters"], metrics["total_parameters"]
    row = {
        "method": plan.name,
        "run": plan.run_name,
        "seed": config.seed,
        "status": "done",
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_percent": round(100 * trainable / total, 4),
        "adapter_bytes": _folder_bytes(run_dir / runs.ADAPTER_DIR),
        "peak_rss_bytes": child.get("peak_rss_bytes"),
        "train_tokens_per_second": metrics.get("train_tokens_per_second"),
        "train_seconds": metrics.get("train_seconds"),
        "wall_seconds": child.get("wall_seconds"),
        "steps": metrics.get("steps"),
        "learning_rate": config.learning_rate or get_method(plan.name).default_learning_rate,
        "mergeable": _mergeable(get_method(plan.name)),
        "note": "" if child else "wall time and peak RSS not recorded (compare.json missing)",
    }
    for key, value in metrics.items():
        if key.startswith("eval_") and isinstance(value, (int, float)):
            row[key] = round(value, 6) if isinstance(value, float) else value
    return row


def with_baseline_gap(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copy the rows, adding the headline metric minus full fine-tuning's with the same seed."""
    metric = quality_metric(runs)
    baseline = {row["seed"]: row[metric] for row in runs
                if row["method"] == BASELINE and row["status"] == "done" and metric in row}
    rows = []
    for row in runs:
        row = dict(row)
        if row["method"] != BASELINE and metric in row and row["seed"] in baseline:
            row[f"{metric}_vs_full"] = round(row[metric] - baseline[row["seed"]], 4)
        rows.append(row)
    return rows


# Measurements that the seed does not change, and those averaged over seeds.
SAME_FOR_EVERY_SEED = ("trainable_parameters", "total_parameters", "trainable_percent", "adapter_bytes", "steps",
                       "learning_rate", "mergeable")
AVERAGED_OVER_SEEDS = ("train_tokens_per_second", "train_seconds", "wall_seconds")


def aggregate_seeds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return one row per method: the mean over seeds, each metric's sample standard deviation, the largest peak RSS.

    A method with a failed seed gets a failed row, so that a mean is never
    taken over fewer seeds than the other methods had.
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in runs:
        by_method.setdefault(row["method"], []).append(row)

    rows = []
    for method, group in by_method.items():
        seeds = ",".join(str(row["seed"]) for row in group if row["seed"] is not None)
        row = {"method": method, "run": method, "seeds": seeds, "mergeable": group[0]["mergeable"]}
        statuses = {entry["status"] for entry in group}
        if statuses != {"done"}:
            if statuses == {"skipped"}:
                rows.append({**row, "status": "skipped", "note": group[0]["note"]})
            else:
                notes = [f"seed {entry['seed']}: {entry['note']}" for entry in group if entry["status"] != "done"]
                rows.append({**row, "status": "failed", "note": "; ".join(notes)})
            continue

        row["status"] = "done"
        for key in SAME_FOR_EVERY_SEED:
            row[key] = group[0].get(key)
        peaks = [entry["peak_rss_bytes"] for entry in group if entry.get("peak_rss_bytes")]
        row["peak_rss_bytes"] = max(peaks) if peaks else None
        for key in AVERAGED_OVER_SEEDS:
            values = [entry[key] for entry in group if entry.get(key) is not None]
            row[key] = round(statistics.mean(values), 2) if values else None
        metrics = sorted({key for entry in group for key in entry if key.startswith("eval_")})
        for key in metrics:
            values = [entry[key] for entry in group if isinstance(entry.get(key), (int, float))]
            if not values:
                continue
            row[key] = round(statistics.mean(values), 4)
            if len(values) > 1 and not key.endswith("_vs_full"):
                row[f"{key}_std"] = round(statistics.stdev(values), 4)
        row["note"] = "; ".join(sorted({entry["note"] for entry in group if entry.get("note")}))
        rows.append(row)
    return rows


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def quality_metric(rows: list[dict[str, Any]]) -> str:
    """Return the headline metric: accuracy for classification, BLEU for generation, else eval loss."""
    for name in ("eval_accuracy", "eval_bleu", "eval_loss"):
        if any(name in row for row in rows):
            return name
    return "eval_loss"


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    seed_column = "seeds" if any("seeds" in row for row in rows) else "seed"
    columns = ["method", seed_column, "status", "trainable_parameters", "trainable_percent", "adapter_bytes",
               "peak_rss_bytes", "train_tokens_per_second", "train_seconds", "wall_seconds", "steps", "learning_rate"]
    metrics = sorted({key for row in rows for key in row if key.startswith("eval_")})
    return columns + metrics + ["mergeable", "note"]


def write_results(comparison: Comparison) -> None:
    """Write results.json, results.csv and results.md, each replaced atomically."""
    rows = comparison.rows
    summary = {
        "task": comparison.task,
        "quality_metric": quality_metric(rows),
        "shared_settings": _shared_settings(comparison.plans),
        "peak_rss": f"resident set size of the training process, sampled every {RSS_INTERVAL_SECONDS} s",
        "rows": rows,
    }
    seeds = sorted({plan.seed for plan in comparison.plans if plan.config is not None})
    if comparison.several_seeds:
        summary["shared_settings"].pop("seed", None)
        summary["seeds"] = seeds
        summary["aggregation"] = ("each row: the mean over seeds, the sample standard deviation of each metric "
                                  "(NAME_std), and the largest peak RSS of its runs; 'runs' has every run")
        summary["runs"] = comparison.run_rows
    runs.write_json_atomic(comparison.output_dir / "results.json", summary)

    _write_csv(comparison.output_dir / "results.csv", rows)
    if comparison.several_seeds:
        _write_csv(comparison.output_dir / "results_runs.csv", comparison.run_rows)

    text = markdown_table(rows)
    if comparison.several_seeds:
        gap = any(key.endswith("_vs_full") for row in rows for key in row)
        text += (f"\n\nMean ± sample standard deviation over seeds {', '.join(map(str, seeds))}; peak RSS is the "
                 f"largest of the method's runs."
                 + (" 'vs full' is the difference from full fine-tuning trained with the same seed, averaged "
                    "over seeds." if gap else "")
                 + " Every run:\n\n" + markdown_table(comparison.run_rows, seed_column=True))
    _write_text_atomic(comparison.output_dir / "results.md", text + "\n")


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=table_columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    _write_text_atomic(path, buffer.getvalue())


def _shared_settings(plans: list[MethodPlan]) -> dict[str, Any]:
    configs = [plan.config for plan in plans if plan.config is not None]
    if not configs:
        return {}
    values = configs[0].to_dict()
    for name in ("method", "output_dir", "overwrite", "method_args", *PER_METHOD_FIELDS):
        values.pop(name, None)
    return values


def markdown_table(rows: list[dict[str, Any]], seed_column: bool = False) -> str:
    """Format the comparison as a Markdown table with units; a metric with a spread reads "mean ± std"."""
    metrics = sorted({key for row in rows for key in row if key.startswith("eval_") and key != "eval_loss"
                      and not key.endswith(("_std", "_vs_full"))})
    gap = next((key for row in rows for key in row if key.endswith("_vs_full")), None)
    header = (["method"] + (["seed"] if seed_column else []) +
              ["trainable params", "% of total", "adapter on disk", "peak RSS", "train tok/s", "train time",
               "wall time", "learning rate"] + [name[5:] for name in metrics] +
              (["vs full"] if gap else []) + ["mergeable", "note"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"]] + ([str(row.get("seed", ""))] if seed_column else []) + [
            _number(row.get("trainable_parameters")),
            _percent(row.get("trainable_percent")),
            _megabytes(row.get("adapter_bytes")),
            _megabytes(row.get("peak_rss_bytes")),
            _number(row.get("train_tokens_per_second")),
            _seconds(row.get("train_seconds")),
            _seconds(row.get("wall_seconds")),
            f"{row['learning_rate']:.0e}" if row.get("learning_rate") else "",
        ]
        for name in metrics:
            spread = row.get(f"{name}_std")
            cells.append(_metric(row.get(name)) + (f" ± {spread:.3f}" if spread is not None else ""))
        if gap:
            cells.append("" if row.get(gap) is None else f"{row[gap]:+.3f}")
        note = row.get("note") or ""
        cells += [row.get("mergeable", ""), note.replace("|", "/")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _number(value) -> str:
    return "" if value is None else f"{value:,.0f}"


def _percent(value) -> str:
    return "" if value is None else f"{value:.3g}%"


def _megabytes(value) -> str:
    if value is None:
        return ""
    return f"{value / 1e3:,.1f} KB" if value < 1e6 else f"{value / 1e6:,.1f} MB"


def _seconds(value) -> str:
    return "" if value is None else f"{value:,.0f} s"


def _metric(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _write_text_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def write_plots(comparison: Comparison) -> None:
    """Quality against trainable parameters (log x) and against training time, and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [row for row in comparison.rows if row.get("status") == "done"]
    metric = quality_metric(done)
    label = metric[5:].replace("_", " ")
    scored = [row for row in done if row.get(metric) is not None]

    def scatter(x_key: str, x_label: str, filename: str, log_x: bool) -> None:
        figure, axes = plt.subplots(figsize=(6.4, 4.4))
        for row in scored:
            if row.get(x_key) is None:
                continue
            marker = "s" if row["method"] == BASELINE else "o"
            axes.errorbar(row[x_key], row[metric], yerr=row.get(f"{metric}_std"), fmt=marker, capsize=3)
            axes.annotate(row["method"], (row[x_key], row[metric]), textcoords="offset points", xytext=(4, 4),
                          fontsize=8)
        if log_x:
            axes.set_xscale("log")
        axes.set_xlabel(x_label)
        axes.set_ylabel(label + (" (mean ± std over seeds)" if comparison.several_seeds else ""))
        axes.set_title(f"{label} against {x_label.split(' (')[0]}")
        axes.grid(True, alpha=0.3)
        figure.tight_layout()
        _save_figure(figure, comparison.output_dir / filename)
        plt.close(figure)

    scatter("trainable_parameters", "trainable parameters (log scale)", PLOTS[0], log_x=True)
    scatter("train_seconds", "training time (s)", PLOTS[1], log_x=False)

    figure, axes = plt.subplots(figsize=(6.4, 4.4))
    measured = [row for row in done if row.get("peak_rss_bytes")]
    axes.bar([row["method"] for row in measured], [row["peak_rss_bytes"] / 1e9 for row in measured])
    axes.set_ylabel("peak RSS (GB)")
    axes.set_title("peak resident memory of the training process")
    axes.tick_params(axis="x", labelrotation=45)
    figure.tight_layout()
    _save_figure(figure, comparison.output_dir / PLOTS[2])
    plt.close(figure)


def _save_figure(figure, path: Path) -> None:
    temporary = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(temporary, dpi=110)
    os.replace(temporary, path)


def read_task_config(path: str | Path) -> dict[str, Any]:
    """Read a task config file (see the module docstring)."""
    from peftlabs.config import read_yaml

    return read_yaml(path)

