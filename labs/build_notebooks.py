"""Write the lab notebooks (labs/Lab-*/0N-*.ipynb) from the cell texts in this file.

    python labs/build_notebooks.py          # rewrite every notebook, without outputs

The notebooks are the teaching material and are committed; this script keeps
the cells that every lab shares (parameters, settings, data, Trainer, checks)
word for word the same across the eight labs. Edit the cells here and rerun
it rather than editing a notebook by hand. The method-specific cells live in
labs/lab_methods.py.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import nbformat

LABS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(LABS_DIR))

from lab_methods import LABS, Lab, MethodCells  # noqa: E402


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def join(*parts: str) -> str:
    """Dedent each part and join them into one cell source, a blank line apart."""
    return "\n\n".join(textwrap.dedent(part).strip() for part in parts if part.strip())


def notebook(cells) -> nbformat.NotebookNode:
    book = nbformat.v4.new_notebook()
    book.cells = cells
    for index, cell in enumerate(cells):
        cell.id = f"cell-{index:02d}"  # stable ids, so a rebuild changes only the edited cells
    book.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    return book


def quick_settings(lab: Lab) -> str:
    lines = [f'    "{key}": {value!r},' for key, value in lab.quick.items()]
    return "\n".join(["# The settings QUICK overrides: a few steps and examples, minutes on a CPU.",
                      "QUICK_SETTINGS = {", *lines, "}"])


SETUP_PARAMETER_HELP = """
    ## Parameters

    `INSTALL = True` installs the pinned requirements first. `MODEL`
    checks here that another model (for example `{gpu_model}`) resolves
    and loads its config; it does not carry over to the next notebooks, so
    to train with it set `MODEL` (and `DEVICE`) again in `02-Train`.
    `QUICK` and the output folder come from the environment variables the
    tests set, `PEFTLABS_LAB_QUICK` and `PEFTLABS_LAB_OUTPUT`.
"""

LATER_PARAMETER_HELP = """
    ## Parameters

    The model, data and method come from the settings that `02-Train`
    saved beside the adapter, so a run on a GPU with a hub model needs
    only `DEVICE = "cuda"` here. `QUICK` cuts the run to a few examples,
    which is what the tests do: they set `PEFTLABS_LAB_QUICK=1` and point
    `PEFTLABS_LAB_OUTPUT` at a temporary folder.
"""

PARAMETER_HELP = """
    ## Parameters

    Change this cell, and only this cell, to run the lab elsewhere. The
    defaults run the full lab on CPU with the bundled model. On a GPU, set
    `MODEL` to a hub model (for example `{gpu_model}`) and `DEVICE = "cuda"`.
    `QUICK` cuts the run to a few steps and examples, which is what the tests
    do: they set `PEFTLABS_LAB_QUICK=1` and point `PEFTLABS_LAB_OUTPUT` at a
    temporary folder.
"""


# ---------------------------------------------------------------------------
# 01-Setup
# ---------------------------------------------------------------------------


def setup_notebook(lab: Lab) -> nbformat.NotebookNode:
    config_files = ", ".join(f"`{m.config_file}`" for m in lab.methods)
    cells = [
        md(f"# {lab.title} · 1. Setup\n\n{lab.idea}"),
        md(SETUP_PARAMETER_HELP.format(gpu_model=lab.gpu_model)),
        code(f"""
            import os
            from pathlib import Path

            INSTALL = False  # True: install the pinned requirements into this kernel's environment first
            CONFIG_FILE = Path("{lab.methods[0].config_file}")  # the settings of this lab, shared with `peftlabs train --config`
            MODEL = None  # None: the model named in the config; or a hub id such as "{lab.gpu_model}"
            QUICK = os.environ.get("PEFTLABS_LAB_QUICK", "0") == "1"
            OUTPUT_DIR = Path(os.environ.get("PEFTLABS_LAB_OUTPUT", "outputs"))
        """),
        md("""
            ## What each dependency is for

            | package | role in this lab |
            |---|---|
            | `torch` | tensors, autograd and the optimizer step |
            | `transformers` | the base model (`AutoModelFor...`), tokenizer, `TrainingArguments` and `Trainer` |
            | `peft` | the method configs (`LoraConfig`, `PromptTuningConfig`, ...), `get_peft_model`, `PeftModel`, merging |
            | `adapters` | AdapterHub bottleneck adapters (Lab 2) |
            | `bitsandbytes` | 4-bit NF4 quantization of the frozen base for QLoRA (Lab 1) |
            | `accelerate` | device placement used inside `Trainer` |
            | `datasets` | loading and tokenising the ticket data |
            | `scikit-learn` | accuracy and macro-F1, computed locally |
            | `matplotlib` | the loss curve |
            | `peftlabs` | this repository: offline model and data resolution, evaluation, plotting helpers |

            The exact versions are pinned in `constraints.txt` at the repository
            root. Set `INSTALL = True` above to install them into the running
            kernel's environment (`pip install -c constraints.txt -e ".[dev]"`),
            then restart the kernel.
        """),
        code("""
            import subprocess
            import sys

            REPOSITORY = Path.cwd().resolve().parents[1]  # labs/<lab>/ -> repository root
            if INSTALL:
                command = [sys.executable, "-m", "pip", "install", "-c", str(REPOSITORY / "constraints.txt"),
                           "-e", f"{REPOSITORY}[dev]"]
                print(" ".join(command))
                subprocess.run(command, check=True)
                print("installed: restart the kernel before running the next cell")
            else:
                print("INSTALL is False: using the installed packages")
        """),
        md("""
            ## Library versions

            The labs were written against the pinned versions; a different
            `transformers` or `peft` may change names or defaults.
        """),
        code("""
            from peftlabs.versions import library_versions

            versions = library_versions()
            for name, version in versions.items():
                print(f"{name:14s} {version}")
            missing = [name for name, version in versions.items() if version == "not installed"]
            assert not missing, f"missing packages {missing}: set INSTALL = True and rerun this notebook"
        """),
        md("""
            ## Hardware

            `pick_device("auto")` chooses CUDA, then Apple's MPS, then the CPU.
            bf16 halves activation memory and is fast on recent GPUs and on CPUs
            with AMX or AVX-512 BF16; elsewhere the CPU emulates it and fp32 is
            much faster, which is what `pick_precision("auto", ...)` decides.
        """),
        code("""
            import torch

            from peftlabs.hardware import cpu_has_fast_bf16, pick_device, pick_precision

            device = pick_device("auto")
            print("CUDA:", torch.cuda.is_available(), "| MPS:", torch.backends.mps.is_available(),
                  "| CPU threads:", torch.get_num_threads())
            if device == "cuda":
                properties = torch.cuda.get_device_properties(0)
                print(f"GPU {properties.name}, {properties.total_memory / 1e9:.1f} GB, bf16:",
                      torch.cuda.is_bf16_supported())
            print("CPU has native bf16 matrix units:", cpu_has_fast_bf16())
            print(f"this lab will train on {device} in {pick_precision('auto', device)}")
        """),
        md(f"""
            ## The lab's settings

            The YAML file beside this notebook ({config_files}) holds every
            setting of the training run. `02-Train` reads it, and the command
            line runs the very same settings:

            ```bash
            peftlabs train --config labs/{lab.folder}/{lab.methods[0].config_file}
            ```
        """),
        code("""
            from peftlabs.config import build_config, read_yaml

            print(CONFIG_FILE.read_text())
            config = build_config(read_yaml(CONFIG_FILE), {"model": MODEL} if MODEL else {})
        """),
        md("""
            ## Model and data are available offline

            Bundled model aliases resolve to a local folder. SmolLM2 is converted
            from its GGUF file on first use and cached, which took about 45 s on
            2 CPU cores and may show the converter's progress bar; later runs
            reuse the cache. Hub ids are downloaded by `transformers` as usual. The demo
            data ships inside `peftlabs`.
        """),
        code("""
            import datasets

            from peftlabs.data import load_task_data
            from peftlabs.models import detect_task, read_model_config, resolve_model

            datasets.disable_progress_bars()  # keep the notebook output to the results
            location = resolve_model(config.model)
            task = detect_task(read_model_config(location)) if config.task == "auto" else config.task
            data = load_task_data(config, task)
            print(f"model {config.model} -> {location} ({task})")
            print(f"data: {len(data.train)} train / {len(data.eval)} eval / {len(data.test)} test rows, labels {data.labels}")
            OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
            print("outputs go to", OUTPUT_DIR.resolve())
        """),
    ]
    return notebook(cells)


# ---------------------------------------------------------------------------
# 02-Train
# ---------------------------------------------------------------------------


def train_notebook(lab: Lab) -> nbformat.NotebookNode:
    first = lab.methods[0]
    extra_files = "\n".join(
        f'{m.name.upper()}_CONFIG_FILE = Path("{m.config_file}")\nTRAIN_{m.name.upper()} = True  '
        f"# False: skip the {m.label} part"
        for m in lab.methods[1:]
    )
    cells = [
        md(f"# {lab.title} · 2. Train\n\n{lab.train_intro}"),
        md(PARAMETER_HELP.format(gpu_model=lab.gpu_model)),
        code(join(f"""
            import os
            from pathlib import Path

            CONFIG_FILE = Path("{first.config_file}")  # the same file `peftlabs train --config` accepts
            MODEL = None  # None: the config's model; or a hub id such as "{lab.gpu_model}"
            DATASET = None  # None: the config's dataset ("demo": the bundled support tickets)
            MAX_STEPS = None  # None: the config's
            DEVICE = "auto"  # auto, cpu, cuda or mps
            QUICK = os.environ.get("PEFTLABS_LAB_QUICK", "0") == "1"
            OUTPUT_DIR = Path(os.environ.get("PEFTLABS_LAB_OUTPUT", "outputs"))
            OVERWRITE = False  # True: replace an adapter trained by an earlier run of this notebook
        """, quick_settings(lab), extra_files)),
        md("""
            ## Settings

            `build_config` merges the YAML file with the overrides from the
            parameter cell and checks every value, exactly as `peftlabs train`
            does with its flags. The resolved settings are saved beside the
            adapter, so `03-Inference` and `04` rebuild the same data.
        """),
        code(f"""
            from peftlabs.config import build_config, read_yaml
            from peftlabs.errors import UserError


            def lab_config(config_file: Path, run_name: str):
                overrides = {{"output_dir": str(OUTPUT_DIR / run_name), "device": DEVICE}}
                if MODEL:
                    overrides["model"] = MODEL
                if DATASET:
                    overrides["dataset"] = DATASET
                if MAX_STEPS:
                    overrides["max_steps"] = MAX_STEPS
                if QUICK:
                    overrides.update(QUICK_SETTINGS)
                config = build_config(read_yaml(config_file), overrides)
                if (Path(config.output_dir) / "adapter").exists() and not OVERWRITE:
                    raise UserError(f"{{config.output_dir}}/adapter exists from an earlier run: set OVERWRITE = True "
                                    f"or choose another OUTPUT_DIR")
                return config


            config = lab_config(CONFIG_FILE, "{first.name}")
            RUN_DIR = Path(config.output_dir)
            print(f"method {{config.method}} on {{config.model}}, {{config.dataset}} data; "
                  f"max_steps {{config.max_steps}}, epochs {{config.epochs}}, batch {{config.batch_size}}, "
                  f"learning rate {{config.learning_rate}}")
            print(f"{{config.method}} settings:", config.method_args.get(config.method, {{}}))
        """),
        md("""
            ## Device and number format

            fp32 on CPUs without native bf16, bf16 on recent GPUs; the
            `Trainer` applies it through autocast while the frozen weights stay
            as loaded.
        """),
        code("""
            from peftlabs.hardware import pick_device, pick_precision

            device = pick_device(config.device)
            precision = pick_precision(config.precision, device)
            print(f"device {device}, precision {precision}")
        """),
        md(f"""
            ## Tokenizer and data

            `resolve_model` turns the bundled alias into a local folder, so
            nothing is downloaded. {lab.data_text}
        """),
        code(f"""
            import datasets

            from peftlabs.data import collator, load_task_data, tokenize_split
            from peftlabs.models import load_tokenizer, resolve_model

            datasets.disable_progress_bars()  # keep the notebook output to the results
            location = resolve_model(config.model)
            tokenizer = load_tokenizer(location)
            data = load_task_data(config, "{lab.task}")
            print(f"{{len(data.train)}} training rows, {{len(data.eval)}} eval rows; labels {{data.labels}}")
            data.train[0]
        """),
        md(lab.tokenize_text),
        code(lab.tokenize_code),
        md(f"""
            ## The frozen base model

            {lab.base_text}
        """),
        code(first.load_base_code),
    ]
    cells += train_method_cells(lab, first, first_method=True)
    for method in lab.methods[1:]:
        flag = f"TRAIN_{method.name.upper()}"
        cells += [md(f"# Part 2: {method.label}\n\n{method.part_intro}"),
                  code(f"""
                      if {flag}:
                          config = lab_config({method.name.upper()}_CONFIG_FILE, "{method.name}")
                          RUN_DIR = Path(config.output_dir)
                          print(f"{{config.method}} settings:", config.method_args.get(config.method, {{}}))
                  """),
                  code(_guard(flag, method.load_base_code))]
        cells += [_guarded(cell, flag) for cell in train_method_cells(lab, method, first_method=False)]
    return notebook(cells)


def _guard(flag: str, source: str) -> str:
    body = textwrap.indent(textwrap.dedent(source).strip(), "    ")
    return f"if {flag}:\n{body}"


def _guarded(cell, flag):
    if cell.cell_type != "code":
        return cell
    cell.source = _guard(flag, cell.source)
    return cell


def train_method_cells(lab: Lab, method: MethodCells, first_method: bool) -> list:
    count_comment = "  # 4-bit weights count as their real number of values" if method.name == "qlora" else ""
    return [
        md(method.apply_text),
        code(method.apply_code),
        md("""
            ## Trainable and total parameters

            Only the parameters with `requires_grad=True` receive gradients and
            optimizer state, which is where the memory saving of PEFT comes from.
        """),
        code(join(method.count_code, f"""
            from peftlabs.models import count_parameters

            trainable, total = count_parameters(model){count_comment}
            print(f"trainable {{trainable:,}} of {{total:,}} parameters ({{100 * trainable / total:.3f}}%)")
        """)),
        md("""
            ## `TrainingArguments`

            The optimisation settings, all taken from the config: steps or
            epochs, batch size, learning rate and schedule. `save_strategy="no"`
            because the adapter is saved once at the end (the `peftlabs train`
            command also writes resumable checkpoints).
            `include_num_input_tokens_seen="non_padding"` makes the `Trainer`
            count real tokens, for the throughput below.
        """),
        code("""
            from transformers import TrainingArguments

            args = TrainingArguments(
                output_dir=str(RUN_DIR / "checkpoints"),
                max_steps=config.max_steps,
                num_train_epochs=config.epochs,
                per_device_train_batch_size=config.batch_size,
                gradient_accumulation_steps=config.gradient_accumulation_steps,
                learning_rate=config.learning_rate,
                lr_scheduler_type=config.lr_scheduler,
                warmup_ratio=config.warmup_ratio,
                weight_decay=config.weight_decay,
                logging_steps=config.logging_steps,
                save_strategy="no",
                seed=config.seed,
                data_seed=config.seed,
                use_cpu=device == "cpu",
                bf16=precision == "bf16",
                fp16=precision == "fp16",
                include_num_input_tokens_seen="non_padding",
                remove_unused_columns=False,
                label_names=["labels"],
                report_to=[],
            )
        """),
        md("""
            ## `Trainer`

            The `Trainer` runs the loop: batches from the collator (padded to
            the longest example of each batch), forward pass, loss, backward
            pass through the frozen model into the trainable parameters, AdamW
            step, learning-rate schedule.
        """),
        code("""
            from transformers import Trainer

            trainer = Trainer(model=model, args=args, train_dataset=train_set,
                              data_collator=collator(tokenizer, data.task))
            result = trainer.train()
        """),
        md("""
            ## Loss curve

            The training loss logged every `logging_steps` steps, from
            `trainer.state.log_history`.
        """),
        code(f"""
            from peftlabs.labs import plot_loss

            plot_loss(trainer.state.log_history, "{method.label} on " + config.model);
        """),
        md("""
            ## Throughput

            Tokens per second counts the non-padding input tokens the model
            processed, divided by the wall-clock training time (which includes
            data loading and the optimizer step). In quick mode the run is two
            or three steps, the first of which also warms up the kernels: the
            rate is only an example of the measurement. For rates that can be
            compared between methods, see `benchmarks/` and `docs/results.md`.
        """),
        code("""
            seconds = result.metrics["train_runtime"]
            tokens = trainer.state.num_input_tokens_seen
            train_metrics = {
                "steps": result.global_step,
                "train_loss": result.training_loss,
                "train_seconds": seconds,
                "train_tokens": int(tokens),
                "tokens_per_second": tokens / seconds,
                "trainable_parameters": trainable,
                "total_parameters": total,
            }
            print(f"{result.global_step} steps in {seconds:.1f} s, {int(tokens):,} tokens, "
                  f"{tokens / seconds:,.0f} tok/s, mean training loss {result.training_loss:.4f}")
        """),
        md(method.save_text),
        code(join(method.save_code, """

            from peftlabs.config import write_yaml
            from peftlabs.runs import write_json_atomic

            write_yaml(config, RUN_DIR / "config.yaml")
            write_json_atomic(RUN_DIR / "train_metrics.json", train_metrics)
            for path in sorted(ADAPTER_DIR.iterdir()):
                print(f"{path.stat().st_size:>12,} bytes  {path.name}")
        """)),
        md("""
            ## Reference logits

            The logits of the trained model on four evaluation examples are
            saved with their inputs. `03-Inference` and `04` load the adapter
            into a fresh base model and must reproduce them.
        """),
        code("""
            import torch

            from peftlabs.labs import logits_of, sample_batch

            reference_batch = sample_batch(tokenizer, data, data.eval, count=4, max_length=config.max_length)
            torch.save({"batch": reference_batch, "logits": logits_of(model, reference_batch)},
                       RUN_DIR / "reference_logits.pt")
        """),
        md("## Checks"),
        code(join(method.check_code, """

            import math

            assert math.isfinite(result.training_loss), f"training loss is {result.training_loss}"
            assert result.global_step == trainer.state.max_steps
            assert 0 < trainable < total
            assert (RUN_DIR / "reference_logits.pt").is_file()
            print("checks passed")
        """)),
    ]


# ---------------------------------------------------------------------------
# 03-Inference
# ---------------------------------------------------------------------------


def inference_notebook(lab: Lab) -> nbformat.NotebookNode:
    cells = [
        md(f"# {lab.title} · 3. Inference\n\n{lab.inference_intro}"),
        md(LATER_PARAMETER_HELP),
        code("""
            import os
            from pathlib import Path

            DEVICE = "auto"
            QUICK = os.environ.get("PEFTLABS_LAB_QUICK", "0") == "1"
            OUTPUT_DIR = Path(os.environ.get("PEFTLABS_LAB_OUTPUT", "outputs"))
            TEST_EXAMPLES = 4 if QUICK else None  # None: the whole test split
            SHOW_EXAMPLES = 8  # rows of the side-by-side table
        """),
        md("""
            ## Settings and test data of the training run

            `02-Train` saved its resolved settings as `config.yaml` beside the
            adapter. Rebuilding the data from them gives the same label set,
            instruction and test split.
        """),
        code(f"""
            import datasets
            import torch

            from peftlabs.config import build_config, read_yaml
            from peftlabs.data import load_task_data
            from peftlabs.hardware import pick_device
            from peftlabs.models import load_tokenizer, resolve_model

            RUN_DIR = OUTPUT_DIR / "{lab.methods[0].name}"
            config = build_config(read_yaml(RUN_DIR / "config.yaml"), {{}})
            datasets.disable_progress_bars()
            device = pick_device(DEVICE)
            location = resolve_model(config.model)
            tokenizer = load_tokenizer(location)
            data = load_task_data(config, "{lab.task}")
            test = data.test if TEST_EXAMPLES is None else data.test.select(range(min(TEST_EXAMPLES, len(data.test))))
            print(f"{{len(test)}} test examples, model {{config.model}} on {{device}}")
        """),
    ]
    for index, method in enumerate(lab.methods):
        if index > 0:
            cells += [md(f"# {method.label}\n\nThe same steps for the {method.label} adapter."),
                      code(f"""
                          RUN_DIR = OUTPUT_DIR / "{method.name}"
                          config = build_config(read_yaml(RUN_DIR / "config.yaml"), {{}})
                      """)]
        cells += inference_method_cells(lab, method, index)
    cells += [
        md("""
            ## Scores

            Accuracy and macro-F1 on the test examples. In quick mode the model
            has trained for a few steps only and the scores mean little.
            `labs/README.md` lists each method's scores from longer runs and
            says how they were measured.
        """),
        code("""
            import pandas as pd

            pd.DataFrame(scores).T
        """),
        md("""
            ## Side by side

            The same inputs, the expected label, and each model's answer.
        """),
        code("""
            table = pd.DataFrame({"input": [row["input"][:80] for row in rows["base"]],
                                  "expected": [row["expected"] for row in rows["base"]]})
            for name, model_rows in rows.items():
                table[name] = [row["output"] for row in model_rows]
            table.head(SHOW_EXAMPLES)
        """),
        md("""
            ## Checks

            The reloaded adapter reproduced the training run's logits (checked
            above). In full mode the tuned model must also beat the base model.
        """),
        code("""
            for name, value in scores.items():
                assert 0.0 <= value["accuracy"] <= 1.0, (name, value)
            tuned = [name for name in scores if name != "base"]
            if not QUICK:
                for name in tuned:
                    assert scores[name]["accuracy"] > scores["base"]["accuracy"], f"{name} did not beat the base model"
            print("checks passed")
        """),
    ]
    return notebook(cells)


def inference_method_cells(lab: Lab, method: MethodCells, index: int) -> list:
    cells = []
    if index == 0:
        cells += [
            md(f"""
                ## The base model alone

                A fresh base model, with no adapter. {lab.base_score_text}
            """),
            code(join(method.load_base_code, """
                from peftlabs.evaluate import evaluate_split

                scores, rows = {}, {}
                base_model.to(device)
                scores["base"], rows["base"] = evaluate_split(base_model, tokenizer, data, test, progress=False)
                print("base:", scores["base"])
            """)),
            md(f"""
                ## A fresh base model with the trained adapter

                {method.load_text}
            """),
            code(method.load_base_code),
        ]
    else:
        cells += [md(f"## A fresh base model with the {method.label} adapter\n\n{method.load_text}"),
                  code(method.load_base_code)]
    cells += [
        code(join('ADAPTER_DIR = RUN_DIR / "adapter"', method.load_code, "model.to(device)\nmodel.eval();")),
        md("""
            ## The reload reproduces the trained model

            The logits on the reference inputs saved by `02-Train` must match
            to float precision: anything larger means a weight or a head was
            not saved or not loaded.
        """),
        code(f"""
            from peftlabs.labs import logits_of, max_logit_difference

            reference = torch.load(RUN_DIR / "reference_logits.pt")
            reloaded = logits_of(model, reference["batch"])
            difference = max_logit_difference(reference["logits"], reloaded, reference["batch"]["attention_mask"])
            print(f"max |logit difference| after reload: {{difference:.2e}}")
            assert difference < 1e-4, f"the reloaded {method.label} model differs from the trained one by {{difference}}"
        """),
        code(f"""
            scores["{method.name}"], rows["{method.name}"] = evaluate_split(model, tokenizer, data, test, progress=False)
            print("{method.name}:", scores["{method.name}"])
        """),
    ]
    return cells


# ---------------------------------------------------------------------------
# 04-Merge_and_Deploy / 04-Deploy
# ---------------------------------------------------------------------------


def deploy_preamble(lab: Lab, title: str, intro: str) -> list:
    merge_parameters = ("MERGE_TOLERANCE = 1e-3  # largest accepted |logit difference|; docs/merging.md lists measured ones"
                        if lab.mergeable else "")
    return [
        md(f"# {lab.title} · 4. {title}\n\n{intro}"),
        md(LATER_PARAMETER_HELP),
        code(join("""
            import os
            from pathlib import Path

            DEVICE = "auto"
            QUICK = os.environ.get("PEFTLABS_LAB_QUICK", "0") == "1"
            OUTPUT_DIR = Path(os.environ.get("PEFTLABS_LAB_OUTPUT", "outputs"))
            TIMED_CALLS = 1 if QUICK else 5  # inference calls timed per model, after one warm-up call
            CHECK_EXAMPLES = 2 if QUICK else 4  # test inputs whose answers must survive the merge or reload
        """, merge_parameters)),
        md("""
            ## Settings, tokenizer and data of the training run
        """),
        code(f"""
            import datasets
            import torch

            from peftlabs.config import build_config, read_yaml
            from peftlabs.data import load_task_data
            from peftlabs.hardware import pick_device
            from peftlabs.models import load_tokenizer, resolve_model

            RUN_DIR = OUTPUT_DIR / "{lab.methods[0].name}"
            ADAPTER_DIR = RUN_DIR / "adapter"
            config = build_config(read_yaml(RUN_DIR / "config.yaml"), {{}})
            datasets.disable_progress_bars()
            device = pick_device(DEVICE)
            location = resolve_model(config.model)
            tokenizer = load_tokenizer(location)
            data = load_task_data(config, "{lab.task}")
            reference = torch.load(RUN_DIR / "reference_logits.pt")
            texts = list(data.test["{'prompt' if lab.task == 'causal_lm' else 'text'}"][:CHECK_EXAMPLES])
        """),
        md(lab.answer_text),
        code(lab.answer_code),
    ]


def merge_notebook(lab: Lab) -> nbformat.NotebookNode:
    method = lab.methods[0]
    cells = deploy_preamble(lab, "Merge and deploy", lab.merge_intro)
    cells += [
        md(f"## Base model with the adapter, unmerged\n\n{method.load_text}"),
        code(method.load_base_code),
        code(join(method.load_code, """
            model.to(device)
            model.eval()

            from peftlabs.labs import logits_of, max_logit_difference, time_calls

            batch = reference["batch"]
            mask = batch["attention_mask"]
            before = logits_of(model, batch)
            print(f"unmerged vs training run: {max_logit_difference(reference['logits'], before, mask):.2e}")
            answers_before = [answer(model, text) for text in texts]
            unmerged_seconds = time_calls(lambda: answer(model, texts[0]), TIMED_CALLS)
        """)),
        md(method.merge_text),
        code(method.merge_code),
        md("""
            ## The merge check

            The merged model must give the same logits as the unmerged one on
            the reference inputs (up to float rounding) and the same answers.
        """),
        code("""
            after = logits_of(merged, batch)
            difference = max_logit_difference(before, after, mask)
            answers_after = [answer(merged, text) for text in texts]
            print(f"max |logit difference| merged vs unmerged: {difference:.2e} (tolerance {MERGE_TOLERANCE:.0e})")
            for text, first, second in zip(texts, answers_before, answers_after):
                print(f"{first!r:>20} | {second!r:<20} | {text[:60]}")
            assert difference < MERGE_TOLERANCE, f"merge changed the logits by {difference}"
            assert answers_before == answers_after, "merge changed the answers"
        """),
        md("""
            ## Save the standalone model and reload it with `transformers` alone

            The merged folder is a plain `transformers` model: loading it needs
            neither `peft` nor `peftlabs`. It is written under a temporary name
            and renamed when complete.
        """),
        code(lab.save_merged_code),
        md("""
            ## Inference time, unmerged vs merged

            One answer per call, after a warm-up call. The unmerged model does
            the adapter's extra work in every forward pass; the merged one has
            exactly the base model's cost. Quick mode times a single call per
            model, and one call on a shared CPU varies too much to compare the
            two; full mode times five.
        """),
        code("""
            merged_seconds = time_calls(lambda: answer(standalone, texts[0]), TIMED_CALLS)
            for name, seconds in (("unmerged", unmerged_seconds), ("merged", merged_seconds)):
                print(f"{name:9s} {1000 * sum(seconds) / len(seconds):8.1f} ms per answer "
                      f"(min {1000 * min(seconds):.1f}, {len(seconds)} calls)")
            print("merged answer:", answer(standalone, texts[0]))
        """),
        md("## Checks"),
        code("""
            reloaded_difference = max_logit_difference(before, logits_of(standalone, batch), mask)
            print(f"reloaded standalone vs unmerged: {reloaded_difference:.2e}")
            assert reloaded_difference < MERGE_TOLERANCE
            assert [answer(standalone, text) for text in texts] == answers_before
            print("checks passed")
        """),
    ]
    for extra in lab.methods[1:]:
        cells += [md(f"# {extra.label}\n\n{extra.merge_text}")] + [code(source) for source in extra.merge_sections]
    return notebook(cells)


def unmerged_deploy_notebook(lab: Lab) -> nbformat.NotebookNode:
    method = lab.methods[0]
    cells = deploy_preamble(lab, "Deploy", lab.merge_intro)
    cells += [
        md(f"""
            ## Why this adapter is not merged

            {method.no_merge_text}
        """),
        md("""
            ## Export: the adapter folder is the deliverable

            What ships is the adapter folder (kilobytes to a few megabytes)
            plus the name of its base model. Many adapters can share one
            copy of the base model.
        """),
        code("""
            from peftlabs.labs import folder_bytes

            for path in sorted(ADAPTER_DIR.iterdir()):
                print(f"{path.stat().st_size:>12,} bytes  {path.name}")
            adapter_bytes = folder_bytes(ADAPTER_DIR)
        """),
        md(f"""
            ## Serve: a fresh base model with the adapter attached

            {method.load_text}
        """),
        code(method.load_base_code),
        code(join("base_bytes = sum(p.numel() * p.element_size() for p in base_model.parameters())",
                  method.load_code, """
            model.to(device)
            model.eval()
            print(f"adapter {adapter_bytes / 1e6:.2f} MB on a base model of {base_bytes / 1e6:.0f} MB "
                  f"({100 * adapter_bytes / base_bytes:.2f}%)")
        """)),
        md("""
            ## The served model reproduces the trained one

            Same check as in `03-Inference`: the logits on the reference inputs
            saved by `02-Train`.
        """),
        code("""
            from peftlabs.labs import logits_of, max_logit_difference, time_calls

            batch = reference["batch"]
            difference = max_logit_difference(reference["logits"], logits_of(model, batch), batch["attention_mask"])
            print(f"max |logit difference| served vs trained: {difference:.2e}")
            assert difference < 1e-4, f"the served model differs from the trained one by {difference}"
        """),
        md("""
            ## Answer requests, timed

            `answer` is the whole serving function: text in, label out. Each call
            is timed after one warm-up call. Quick mode times a single call,
            too few to compare with the base model below; full mode times five.
        """),
        code("""
            for text in texts:
                print(f"{answer(model, text)!r:>20} | {text[:70]}")
            served_seconds = time_calls(lambda: answer(model, texts[0]), TIMED_CALLS)
            print(f"with adapter: {1000 * sum(served_seconds) / len(served_seconds):.1f} ms per answer "
                  f"(min {1000 * min(served_seconds):.1f}, {len(served_seconds)} calls)")
        """),
        md(method.base_timing_text),
        code(method.base_timing_code),
        md("## Checks"),
        code("""
            answers = [answer(model, text) for text in texts]
            assert answers == [answer(model, text) for text in texts], "answers are not deterministic"
            assert all(isinstance(item, str) for item in answers)
            print("checks passed")
        """),
    ]
    return notebook(cells)


def readme(lab: Lab) -> str:
    """The lab folder's README: the method, the notebooks in order, the config and the command line."""
    deploy = "04-Merge_and_Deploy.ipynb" if lab.mergeable else "04-Deploy.ipynb"
    deploy_line = ("merges the adapter into the weights with a numerical check, saves a standalone model "
                   "and times it" if lab.mergeable else
                   "exports the adapter unmerged, serves it from a fresh base model and times it")
    configs = "\n".join(f"    peftlabs train --config labs/{lab.folder}/{m.config_file}" for m in lab.methods)
    parts = [
        f"# {lab.title}",
        textwrap.dedent(lab.idea).strip(),
        "## Notebooks, in order",
        "\n".join([
            "1. `01-Setup.ipynb` checks the environment (versions, CPU/CUDA/MPS, bf16) and, with "
            "`INSTALL = True`, installs the pinned requirements.",
            "2. `02-Train.ipynb` builds the method with the library's own classes, trains it with the "
            "`transformers` `Trainer`, plots the loss and reports trainable parameters and tokens/s.",
            "3. `03-Inference.ipynb` loads the saved adapter into a fresh base model, checks it reproduces "
            "the trained logits, and compares base and tuned model on held-out tickets.",
            f"4. `{deploy}` {deploy_line}.",
        ]),
    ]
    if not lab.mergeable:
        parts += ["## Why this method is not merged", textwrap.dedent(lab.methods[0].no_merge_text).strip()]
    parts += [
        "## Settings and the command line",
        f"The YAML file{'s' if len(lab.methods) > 1 else ''} in this folder "
        f"({', '.join(f'`{m.config_file}`' for m in lab.methods)}) hold{'' if len(lab.methods) > 1 else 's'} "
        "every setting of the training run. `02-Train` reads "
        f"{'them' if len(lab.methods) > 1 else 'it'}, and the command line runs the same settings:",
        f"```bash\n{textwrap.dedent(configs).strip()}\n```",
        "## Quick mode, outputs, GPUs",
        textwrap.dedent(f"""
            The first code cell of each notebook holds its parameters. `QUICK = True`
            (or the environment variable `PEFTLABS_LAB_QUICK=1`) trains for a few steps
            on a few examples, which is what `tests/test_labs.py` runs. Adapters, reference
            logits and merged models go to `outputs/` in this folder (git-ignored), or to
            `PEFTLABS_LAB_OUTPUT`. To run on a GPU, set `MODEL` in `02-Train` to a hub model
            such as `{lab.gpu_model}` and `DEVICE = "cuda"`; the later notebooks read the
            model from the saved settings. The labs were tested on CPU only.

            To work through the notebooks in a browser, run `make jupyter` at the
            repository root (it installs JupyterLab into `.venv` and serves the labs on
            http://127.0.0.1:8888); `labs/README.md` has the other ways.
        """).strip(),
    ]
    return "\n\n".join(parts) + "\n"


def build_all(target: Path = LABS_DIR) -> list[Path]:
    """Write every lab's notebooks under ``target``/<lab folder>/; return their paths."""
    written = []
    for lab in LABS:
        folder = target / lab.folder
        folder.mkdir(parents=True, exist_ok=True)
        books = {
            "01-Setup.ipynb": setup_notebook(lab),
            "02-Train.ipynb": train_notebook(lab),
            "03-Inference.ipynb": inference_notebook(lab),
        }
        if lab.mergeable:
            books["04-Merge_and_Deploy.ipynb"] = merge_notebook(lab)
        else:
            books["04-Deploy.ipynb"] = unmerged_deploy_notebook(lab)
        for name, book in books.items():
            nbformat.validate(book)
            path = folder / name
            nbformat.write(book, path)
            written.append(path)
        (folder / "README.md").write_text(readme(lab))
    return written


if __name__ == "__main__":
    for path in build_all():
        print(path.relative_to(LABS_DIR.parent))
