"""Command-line entry point: `peftlabs train | infer | merge | serve | demo | compare | methods | runs`.

Every setting of RunConfig and every method hyperparameter becomes a flag:
``--learning-rate 1e-3``, ``--lora.r 16``. Flags override the YAML file given
with ``--config``. Bad input ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import typing
from pathlib import Path

from peftlabs.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.handler(args)
    except UserError as error:
        print(f"peftlabs {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"peftlabs {args.command}: aborted by Ctrl-C", file=sys.stderr)
        return 130
    except Exception as error:
        # Expected failures that are not user input: interrupted runs, failed merge checks.
        from peftlabs.merge import MergeCheckFailed
        from peftlabs.train import Interrupted

        if isinstance(error, (Interrupted, MergeCheckFailed)):
            print(f"peftlabs {args.command}: {error}", file=sys.stderr)
            return 130 if isinstance(error, Interrupted) else 1
        raise


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def _train(args) -> int:
    from peftlabs.train import train

    train(_config_from_args(args))
    return 0


def _demo(args) -> int:
    from peftlabs.config import build_config, read_yaml
    from peftlabs.demo import DEMO_CONFIG, run_demo

    values = _cli_values(args)
    file_values = read_yaml(args.config) if args.config else read_yaml(DEMO_CONFIG)
    if "method" in values and not args.config:
        # The preset's LoRA section does not apply to another method.
        file_values.pop(file_values.get("method", "lora"), None)
    values.setdefault("overwrite", True)
    run_demo(build_config(file_values, values))
    return 0


def _infer(args) -> int:
    from peftlabs.infer import load_run, predict, read_inputs

    if bool(args.text) == bool(args.input):
        raise UserError("pass exactly one of --text TEXT or --input FILE")
    if args.output and Path(args.output).exists() and not args.overwrite:
        raise UserError(f"output file {args.output} already exists: pass --overwrite or choose another --output")
    inputs = [args.text] if args.text else read_inputs(Path(args.input))
    loaded = load_run(args.run, args.model)
    outputs = predict(loaded, inputs, args.batch_size, args.max_new_tokens, progress=len(inputs) > 1)

    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        rows = [{"input": i, "output": o} for i, o in zip(inputs, outputs)]
        temporary = Path(args.output).with_name(f".{Path(args.output).name}.tmp")
        temporary.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        os.replace(temporary, args.output)
        print(f"wrote {len(rows)} outputs to {args.output}")
    else:
        for text, output in zip(inputs, outputs):
            print(output if len(inputs) == 1 else f"{text}\t{output}")
    return 0


def _merge(args) -> int:
    from peftlabs.merge import merge_run

    report = merge_run(args.run, args.output, args.tolerance, args.overwrite, args.samples)
    identical = "greedy generations" if report.generations_identical is not None else "predicted labels"
    print(f"merged model written to {report.output}: max |logit difference| "
          f"{report.max_abs_logit_difference:.2e} <= {report.tolerance:.0e} on {report.samples} samples, "
          f"{identical} identical, reloaded with transformers: {report.reload_max_abs_logit_difference:.2e}")
    return 0


def _serve(args) -> int:
    from peftlabs.serve import serve_from_args

    return serve_from_args(args)


def _methods(args) -> int:
    from peftlabs.methods import get_method, method_names

    counts = {} if args.no_counts else _bundled_model_counts()
    for name in method_names():
        method = get_method(name)
        merge = method.merge_summary or ("yes" if method.mergeable else "no")
        print(f"{name}\n  trains: {method.trains}\n  class: {method.library_class}\n"
              f"  tasks: {', '.join(method.tasks)}\n  mergeable: {merge}")
        for model, count in counts.get(name, {}).items():
            print(f"  trainable on {model}: {count}")
    return 0


def _runs(args) -> int:
    from peftlabs import records

    if args.compare:
        first, second = (Path(path) for path in args.compare)
        print(records.format_comparison(first, second, records.compare_runs(first, second)))
        return 0
    rows = records.list_runs(Path(args.folder))
    print(records.format_table(rows) if rows else f"no run directories in {args.folder}")
    return 0


def _compare(args) -> int:
    from peftlabs.compare import read_task_config, run_comparison

    values = _cli_values(args)
    methods = values.pop("methods", None)
    file_values = read_task_config(args.config) if args.config else {}
    comparison = run_comparison(file_values, values, methods)
    print((comparison.output_dir / "results.md").read_text(), end="")
    return 0


def _bundled_model_counts() -> dict:
    """Trainable parameters of each method with its defaults on both bundled models, cached on disk."""
    from peftlabs.methods import count_on_bundled_models

    return count_on_bundled_models()


# ---------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peftlabs", description="Parameter-efficient fine-tuning labs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library warnings too")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train an adapter and write a run directory")
    _add_config_flags(train)
    train.set_defaults(handler=_train)

    demo = commands.add_parser("demo", help="train, score base vs tuned on the test split, merge")
    _add_config_flags(demo)
    demo.set_defaults(handler=_demo)

    infer = commands.add_parser("infer", help="generate or classify with a trained run")
    infer.add_argument("--run", required=True, help="run directory written by `peftlabs train`")
    infer.add_argument("--text", help="one input")
    infer.add_argument("--input", help="file of inputs: .txt (one per line) or .jsonl with a 'text' field")
    infer.add_argument("--output", help="write JSONL results here instead of printing")
    infer.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    infer.add_argument("--model", help="base model to load instead of the recorded one (must match it)")
    infer.add_argument("--batch-size", type=int, default=16, help="inputs per forward pass")
    infer.add_argument("--max-new-tokens", type=int, help="max tokens to generate per response")
    infer.set_defaults(handler=_infer)

    merge = commands.add_parser("merge", help="fold the adapter into the base weights and verify")
    merge.add_argument("--run", required=True, help="run directory written by `peftlabs train`")
    merge.add_argument("--output", required=True, help="folder for the standalone merged model")
    merge.add_argument("--tolerance", type=float, default=1e-3,
                       help="largest allowed absolute logit difference between merged and unmerged")
    merge.add_argument("--samples", type=int, default=8, help="evaluation examples used for the check")
    merge.add_argument("--overwrite", action="store_true", help="replace an existing --output folder")
    merge.set_defaults(handler=_merge)

    compare = commands.add_parser("compare", help="train several methods and full fine-tuning, tabulate and plot")
    _add_config_flags(compare)
    compare.add_argument("--task-config", dest="config",
                         help="YAML task config: shared settings, 'methods', one section per method")
    compare.add_argument("--methods", type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                         help="comma-separated methods, 'full' for full fine-tuning; default: all that apply")
    compare.add_argument("--seeds", default=argparse.SUPPRESS,
                         help="comma-separated seeds, such as 42,43,44. Each method is trained once per seed, in "
                              "OUTPUT/runs/METHOD-seedN. The table reports the mean and sample standard deviation, "
                              "and 'vs full' the gap to full fine-tuning with the same seed. Default: one run with "
                              "--seed")
    compare.set_defaults(handler=_compare)

    serve = commands.add_parser("serve", help="serve the base model and adapters over an OpenAI-compatible API")
    from peftlabs.serve import add_arguments as add_serve_arguments

    add_serve_arguments(serve)
    serve.set_defaults(handler=_serve)

    methods = commands.add_parser("methods", help="list the PEFT methods")
    methods.add_argument("--no-counts", action="store_true",
                         help="skip the trainable-parameter counts on the bundled models (first run: about a minute)")
    methods.set_defaults(handler=_methods)

    runs = commands.add_parser("runs", help="list the runs in a folder, or compare two runs' settings")
    runs.add_argument("folder", nargs="?", default="runs", help="folder that holds run directories (default: runs)")
    runs.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"),
                      help="print the settings, versions, code commit and data fingerprints that differ")
    runs.set_defaults(handler=_runs)
    return parser


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field and per method hyperparameter, default: not given."""
    from peftlabs.config import config_fields
    from peftlabs.methods import get_method, method_names

    parser.add_argument("--config", help="YAML file of settings; flags override it")
    for field in config_fields():
        _add_field_flag(parser, field.name.replace("_", "-"), field.name, field, typing.get_type_hints(
            _config_class())[field.name])
    for name in method_names():
        params = get_method(name).Params
        hints = typing.get_type_hints(params)
        group = parser.add_argument_group(f"{name} settings")
        for field in dataclasses.fields(params):
            _add_field_flag(group, f"{name}.{field.name.replace('_', '-')}", f"{name}.{field.name}", field,
                            hints[field.name])


def _config_class():
    from peftlabs.config import RunConfig

    return RunConfig


def _add_field_flag(parser, flag: str, dest: str, field: dataclasses.Field, hint) -> None:
    help_text = field.metadata.get("help", "")
    # Accept both spellings of method names in flags: --prompt_tuning.x and --prompt-tuning.x.
    names = [f"--{flag}"]
    if "." in flag and "_" in flag.split(".")[0]:
        names.append("--" + flag.replace("_", "-"))
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    if base is bool:
        parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction,
                            default=argparse.SUPPRESS, help=help_text)
    elif typing.get_origin(base) is list:
        # Items stay strings here; the method's parse_params converts them to the field's item type.
        parser.add_argument(*names, dest=dest, default=argparse.SUPPRESS,
                            type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
                            help=f"{help_text} (comma-separated)")
    else:
        kind = base if base in (int, float) else str
        parser.add_argument(*names, dest=dest, type=kind, default=argparse.SUPPRESS, help=help_text)


def _cli_values(args) -> dict:
    skip = {"command", "handler", "config", "verbose"}
    return {key: value for key, value in vars(args).items() if key not in skip}


def _config_from_args(args):
    from peftlabs.config import build_config, read_yaml

    values = _cli_values(args)
    file_values = read_yaml(args.config) if args.config else {}
    if values.get("resume") and not args.config:
        # Resuming reads the settings the run was started with.
        output_dir = values.get("output_dir", "runs/lora-demo")
        config_path = Path(output_dir) / "config.yaml"
        if config_path.is_file():
            file_values = read_yaml(config_path)
    return build_config(file_values, values)


def _setup_logging(verbose: bool) -> None:
    from tqdm.auto import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record):
            tqdm.write(self.format(record), file=sys.stderr)

    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        import warnings

        import transformers

        import datasets

        transformers.logging.set_verbosity_error()
        datasets.disable_progress_bars()
        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        for name in ("datasets", "httpx", "urllib3", "huggingface_hub"):
            logging.getLogger(name).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
