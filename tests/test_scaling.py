"""Data-parallel training under `accelerate launch`, gradient accumulation, and the accelerate configs.

The data-parallel test starts two CPU processes that communicate over gloo on a
free loopback port and checks them against a single process that trains on the
same global batch: 8 examples per process x 2 processes equals 8 examples x 2
accumulation steps. In both runs an optimizer step sums the gradients of the
same two batches of 8 (the distributed sampler gives process 0 the first batch
and process 1 the second), so the adapters can differ only by float rounding:
the all-reduce averages (g0 + g1) / 2 where accumulation adds g0 / 2 + g1 / 2,
in another order. Dropout is 0 (LoRA dropout set to 0, the tiny models have
none), so no random masks differ between processes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import tiny_config
from peftlabs.errors import UserError
from peftlabs.train import train

REPO = Path(__file__).resolve().parents[1]
ACCELERATE_CONFIGS = REPO / "configs" / "accelerate"

# Largest allowed |difference| between adapter weights that should be equal up to float
# rounding. Measured: below 1e-6 after 4 steps, for weights up to 0.19. A different batch
# or data order moves weights by about the learning rate (1e-2) per step. A wrong gradient
# scale does not show here, because AdamW and gradient clipping are invariant to it, so
# the logged loss and gradient norm are compared too.
ADAPTER_TOLERANCE = 1e-5

# Small, fast and deterministic: no length grouping (its mega-batches depend on the
# per-process batch size), no LoRA dropout, no generation at the end.
SHARED = {"max_steps": 4, "logging_steps": 1, "save_steps": 2, "group_by_length": False, "final_eval": True,
          "max_new_tokens": 2}
LORA = {"lora": {"target_modules": ["all-linear"], "dropout": 0.0}}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def _cli_flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        if isinstance(value, bool):
            flags.append(f"--{key.replace('_', '-')}" if value else f"--no-{key.replace('_', '-')}")
        else:
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return flags


def _launch_two_processes(model: Path, data: dict[str, Path], output: Path) -> subprocess.CompletedProcess:
    """`accelerate launch` the unchanged CLI on 2 CPU processes with configs/accelerate/cpu_ddp.yaml.

    accelerate 1.16 starts several local processes only through torchrun, which
    the config's MULTI_GPU type selects; `--cpu --num_processes 2` or MULTI_CPU
    without an MPI hostfile start a single process. On a machine without GPUs the
    processes then use the CPU and gloo, because --device cpu sets TrainingArguments.use_cpu.
    """
    values = {"model": model, "dataset": data["train"], "eval_dataset": data["eval"], "output_dir": output,
              "batch_size": 8, "gradient_accumulation_steps": 1, "learning_rate": 1e-2, "max_length": 32,
              "instruction": "classify as {labels}", "device": "cpu", "precision": "fp32", **SHARED}
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ACCELERATE_CONFIGS / "cpu_ddp.yaml"), "--main_process_port", str(_free_port()),
               "-m", "peftlabs.cli", "train", *_cli_flags(values),
               "--lora.target-modules", "all-linear", "--lora.dropout", "0"]
    environment = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1",
                   "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def two_process_run(tiny_llama, tmp_path_factory):
    from conftest import make_sentences, write_jsonl

    folder = tmp_path_factory.mktemp("ddp")
    data = {"train": write_jsonl(folder / "train.jsonl", make_sentences(160, seed=1)),
            "eval": write_jsonl(folder / "eval.jsonl", make_sentences(40, seed=2))}
    completed = _launch_two_processes(tiny_llama, data, folder / "ddp")
    single = tiny_config(tiny_llama, data, folder / "single", batch_size=8, gradient_accumulation_steps=2,
                         method_args=LORA, **SHARED)
    train(single)
    return {"completed": completed, "ddp": folder / "ddp", "single": folder / "single"}


def test_two_processes_finish(two_process_run):
    completed = two_process_run["completed"]

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads((two_process_run["ddp"] / "run.json").read_text())["processes"] == 2


def test_two_processes_match_accumulation(two_process_run):
    ddp, single = _adapter(two_process_run["ddp"]), _adapter(two_process_run["single"])

    assert ddp.keys() == single.keys()
    for name in single:
        difference = (ddp[name] - single[name]).abs().max().item()
        assert difference <= ADAPTER_TOLERANCE, f"{name}: max |difference| {difference:.2e}"


def test_two_processes_match_logged_loss(two_process_run):
    """Loss and gradient norm are those of the global batch, not of one process's half."""
    def training_records(run: Path) -> list[dict]:
        lines = (run / "log.jsonl").read_text().splitlines()
        return [record for record in map(json.loads, lines) if "loss" in record]

    ddp, single = training_records(two_process_run["ddp"]), training_records(two_process_run["single"])

    assert len(ddp) == len(single) == 4
    for ddp_record, single_record in zip(ddp, single):
        assert ddp_record["loss"] == pytest.approx(single_record["loss"], rel=1e-3)
        assert ddp_record["grad_norm"] == pytest.approx(single_record["grad_norm"], rel=1e-4)


def test_two_processes_log_once(two_process_run):
    run = two_process_run["ddp"]
    log_lines = (run / "train.log").read_text().splitlines()
    step_lines = [line for line in log_lines if " step " in line and "/4  loss " in line]
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    train_steps = [record["step"] for record in records if "loss" in record]

    assert len(step_lines) == 4
    assert sum("method lora on" in line for line in log_lines) == 1
    assert sum("done in" in line for line in log_lines) == 1
    assert train_steps == [1, 2, 3, 4]
    assert sum(1 for record in records if record.get("final")) == 1


def test_two_processes_write_same_files(two_process_run):
    """The main process alone writes: the same files as one process, plus the second process's RNG state."""
    def files(run: Path) -> set[str]:
        return {str(path.relative_to(run)) for path in run.rglob("*") if path.is_file()}

    ddp, single = files(two_process_run["ddp"]), files(two_process_run["single"])
    # Each process saves its own RNG state in a checkpoint, so that a resumed run replays the same data.
    per_process = {f"checkpoints/checkpoint-{step}/rng_state_{rank}.pth" for step in (2, 4) for rank in (0, 1)}
    single_process = {f"checkpoints/checkpoint-{step}/rng_state.pth" for step in (2, 4)}

    assert ddp - single == per_process
    assert single - ddp == single_process
    assert not [name for name in ddp if ".tmp" in name]
    metrics = json.loads((two_process_run["ddp"] / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert "eval_accuracy" in metrics


def test_accumulation_matches_large_batch(tiny_llama, sentences, tmp_path):
    """Two accumulated batches of 8 give the adapter that one batch of 16 gives."""
    large = tiny_config(tiny_llama, sentences, tmp_path / "large", batch_size=16, method_args=LORA,
                        **{**SHARED, "max_steps": 3, "final_eval": False})
    accumulated = tiny_config(tiny_llama, sentences, tmp_path / "accumulated", batch_size=8,
                              gradient_accumulation_steps=2, method_args=LORA,
                              **{**SHARED, "max_steps": 3, "final_eval": False})
    train(large)
    train(accumulated)
    first, second = _adapter(tmp_path / "large"), _adapter(tmp_path / "accumulated")

    for name in first:
        difference = (first[name] - second[name]).abs().max().item()
        assert difference <= ADAPTER_TOLERANCE, f"{name}: max |difference| {difference:.2e}"


# ---------------------------------------------------------------------------
# accelerate config files
# ---------------------------------------------------------------------------

CONFIG_FILES = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))


def test_config_folder_complete():
    names = {path.stem for path in CONFIG_FILES}

    assert {"ddp", "fsdp", "fsdp_qlora", "deepspeed_zero2", "deepspeed_zero3", "cpu_ddp"} <= names


def _launcher_environment(path: Path) -> tuple[object, dict[str, str]]:
    """Run accelerate launch's own argument checks on a config file; return its args and the worker environment."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        # Set by launch_command before it calls the DeepSpeed launcher.
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, environment = prepare_deepspeed_cmd_env(args)
    else:
        environment = prepare_multi_gpu_env(args)
    return args, environment


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[path.stem for path in CONFIG_FILES])
def test_config_loads_in_accelerate(path):
    """accelerate's config loader and launcher accept the file, and its fields reach the workers."""
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    config = load_config_from_file(str(path))
    raw = yaml.safe_load(path.read_text())
    args, environment = _launcher_environment(path)

    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == DistributedType(raw["distributed_type"])
    assert args.num_processes == raw["num_processes"]
    assert args.main_process_ip == "127.0.0.1"
    assert args.use_fsdp == path.stem.startswith("fsdp")
    assert args.use_deepspeed == path.stem.startswith("deepspeed")


@pytest.mark.parametrize("name", ["fsdp", "fsdp_qlora"])
def test_fsdp_config_reaches_plugin(name):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    raw = yaml.safe_load((ACCELERATE_CONFIGS / f"{name}.yaml").read_text())["fsdp_config"]
    _, environment = _launcher_environment(ACCELERATE_CONFIGS / f"{name}.yaml")

    assert environment["FSDP_VERSION"] == str(raw["fsdp_version"])
    assert environment["FSDP_CPU_RAM_EFFICIENT_LOADING"] == "true"
    assert environment["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT"
    if raw["fsdp_version"] == 1:
        # FSDP1's plugin rejects sync_module_states on a machine without GPUs, so it is built on GPUs only.
        assert environment["FSDP_USE_ORIG_PARAMS"] == "false"
        return
    with patch_environment(**environment):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.reshard_after_forward is True
    assert plugin.cpu_ram_efficient_loading is True


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_config_reaches_plugin(stage):
    """The ZeRO settings become accelerate's DeepSpeedPlugin; building it does not import deepspeed."""
    from accelerate.utils import DeepSpeedPlugin, patch_environment

    _, environment = _launcher_environment(ACCELERATE_CONFIGS / f"deepspeed_zero{stage}.yaml")
    with patch_environment(**environment):
        plugin = DeepSpeedPlugin()

    assert plugin.zero_stage == stage
    assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
    assert plugin.deepspeed_config["zero_optimization"]["offload_optimizer"]["device"] == "none"


def test_broken_config_rejected(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    broken = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    broken["distributed_type"] = "MULTI_GPUS"  # misspelt
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))

    with pytest.raises(ValueError, match="MULTI_GPUS"):
        load_config_from_file(str(path))


def test_unknown_config_key_rejected(tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file

    broken = yaml.safe_load((ACCELERATE_CONFIGS / "deepspeed_zero3.yaml").read_text())
    broken["zero_stage"] = 3  # belongs under deepspeed_config
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))

    with pytest.raises(ValueError, match="zero_stage"):
        load_config_from_file(str(path))


FSDP_BREAKAGES = {
    "state_dict_type": ("fsdp_state_dict_type", "FULL", KeyError),
    "sync_module_states": ("fsdp_sync_module_states", False, ValueError),
    "wrap_policy": ("fsdp_auto_wrap_policy", "LAYER_WRAP", ValueError),
}


@pytest.mark.parametrize("breakage", list(FSDP_BREAKAGES), ids=list(FSDP_BREAKAGES))
def test_broken_fsdp_setting_rejected(breakage, tmp_path):
    from accelerate.utils import FullyShardedDataParallelPlugin, patch_environment

    key, value, error = FSDP_BREAKAGES[breakage]
    broken = yaml.safe_load((ACCELERATE_CONFIGS / "fsdp.yaml").read_text())
    broken["fsdp_config"][key] = value
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))

    with pytest.raises(error):
        _, environment = _launcher_environment(path)
        with patch_environment(**environment):
            FullyShardedDataParallelPlugin()


@pytest.mark.parametrize("backend,method,message", [
    ("ACCELERATE_USE_FSDP", "qlora", "qlora cannot run under FSDP yet"),
    ("ACCELERATE_USE_DEEPSPEED", "adapters", "cannot be saved from DeepSpeed shards"),
    ("ACCELERATE_USE_FSDP", "bitfit", "cannot be saved from FSDP shards"),
])
def test_sharding_rejects_unsupported_method(backend, method, message, tiny_bert, sentences, tmp_path, monkeypatch):
    """What `accelerate launch` sets for FSDP or DeepSpeed; the run stops before anything is written."""
    config = tiny_config(tiny_bert, sentences, tmp_path / "run", method=method, method_args={})
    monkeypatch.setenv(backend, "true")

    with pytest.raises(UserError, match=message):
        train(config)
    assert not (tmp_path / "run").exists()
