"""The lab notebooks: complete folders, committed without outputs, and runnable in quick mode.

The quick-mode runs (marker ``labs``) execute every notebook of a lab in
order, 01 -> 02 -> 03 -> 04, each in a fresh ``python3`` kernel of this
interpreter, with PEFTLABS_LAB_QUICK=1 and the lab's outputs in a temporary
folder. Each notebook ends with its own assert cells (loss finite, the
reloaded adapter reproduces the trained logits, the merge check or the
served model's logits), so a failing check fails the test with the cell
and traceback. `pytest -m "not labs"` skips them.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

from peftlabs.labs import execute_lab

LABS_DIR = Path(__file__).resolve().parents[1] / "labs"
EXPECTED_LABS = [
    "Lab-01-LoRA",
    "Lab-02-AdapterLayers",
    "Lab-03-Prompt_Tuning",
    "Lab-04-Prefix_Tuning",
    "Lab-05-IA3",
    "Lab-06-BitFit",
    "Lab-07-P_Tuning",
    "Lab-08-P_Tuning_v2",
]
MERGEABLE = {"Lab-01-LoRA", "Lab-05-IA3", "Lab-06-BitFit"}
# Run folders each lab's 02-Train writes under its output folder.
RUNS = {
    "Lab-01-LoRA": ["lora", "qlora"],
    "Lab-02-AdapterLayers": ["adapters"],
    "Lab-03-Prompt_Tuning": ["prompt_tuning"],
    "Lab-04-Prefix_Tuning": ["prefix_tuning"],
    "Lab-05-IA3": ["ia3"],
    "Lab-06-BitFit": ["bitfit"],
    "Lab-07-P_Tuning": ["p_tuning"],
    "Lab-08-P_Tuning_v2": ["p_tuning_v2"],
}


def all_notebooks() -> list[Path]:
    return sorted(LABS_DIR.glob("Lab-*/*.ipynb"))


def test_lab_folders_complete():
    found = sorted(path.name for path in LABS_DIR.glob("Lab-*") if path.is_dir())
    assert found == EXPECTED_LABS
    for name in EXPECTED_LABS:
        folder = LABS_DIR / name
        deploy = "04-Merge_and_Deploy.ipynb" if name in MERGEABLE else "04-Deploy.ipynb"
        for file in ("01-Setup.ipynb", "02-Train.ipynb", "03-Inference.ipynb", deploy, "README.md"):
            assert (folder / file).is_file(), f"{name} has no {file}"
        assert list(folder.glob("*.yaml")), f"{name} has no YAML config"


def test_lab_configs_valid():
    from peftlabs.config import build_config, read_yaml

    for name in EXPECTED_LABS:
        configs = sorted((LABS_DIR / name).glob("*.yaml"))
        methods = [build_config(read_yaml(path), {}).method for path in configs]
        assert sorted(methods) == sorted(RUNS[name]), name


def test_notebooks_committed_without_outputs():
    notebooks = all_notebooks()
    assert len(notebooks) == 32
    for path in notebooks:
        notebook = nbformat.read(path, as_version=4)
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            assert cell.outputs == [], f"{path.relative_to(LABS_DIR)} cell {index} has outputs"
            assert cell.execution_count is None, f"{path.relative_to(LABS_DIR)} cell {index} has an execution count"


def test_notebooks_match_generator(tmp_path):
    spec = importlib.util.spec_from_file_location("build_notebooks", LABS_DIR / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    for generated in module.build_all(tmp_path):
        committed = LABS_DIR / generated.relative_to(tmp_path)
        assert committed.is_file(), f"{committed} is missing: run python labs/build_notebooks.py"
        expected = json.loads(generated.read_text())
        actual = json.loads(committed.read_text())
        for cell in expected["cells"] + actual["cells"]:
            cell.pop("id", None)  # nbformat assigns random cell ids
        assert actual == expected, f"{committed} differs from labs/build_notebooks.py: rerun it"


@pytest.mark.labs
@pytest.mark.parametrize("lab", EXPECTED_LABS)
def test_lab_runs_in_quick_mode(lab, tmp_path):
    output = tmp_path / "outputs"
    notebooks = execute_lab(LABS_DIR / lab, output, quick=True)

    assert len(notebooks) == 4
    for run in RUNS[lab]:
        adapter = output / run / "adapter"
        assert adapter.is_dir(), f"no adapter folder {adapter}"
        assert any(adapter.iterdir()), f"adapter folder {adapter} is empty"
        metrics = json.loads((output / run / "train_metrics.json").read_text())
        assert metrics["steps"] >= 1
        assert metrics["tokens_per_second"] > 0
    if lab in MERGEABLE:
        assert (output / RUNS[lab][0] / "merged" / "config.json").is_file()
    # The committed notebook is left untouched by the run.
    for path in notebooks:
        assert all(not cell.get("outputs") for cell in nbformat.read(path, as_version=4).cells)


def write_lab(folder: Path, failing: str | None = None) -> Path:
    """A lab folder of four one-cell notebooks; the one named ``failing`` raises."""
    folder.mkdir(parents=True)
    for name in ("01-Setup", "02-Train", "03-Inference", "04-Deploy"):
        source = "raise RuntimeError('broken on purpose')" if name == failing else f"print('{name} ran')"
        book = nbformat.v4.new_notebook()
        book.cells = [nbformat.v4.new_code_cell(source)]
        book.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
        nbformat.write(book, folder / f"{name}.ipynb")
    return folder


def test_failing_lab_keeps_copy_and_others_run(tmp_path, capsys):
    from peftlabs.labs import main

    broken = write_lab(tmp_path / "Lab-91-Broken", failing="02-Train")
    working = write_lab(tmp_path / "Lab-92-Working")
    executed = tmp_path / "executed"

    status = main([str(broken), str(working), "--output-dir", str(tmp_path / "out"), "--executed-dir", str(executed)])

    assert status == 1
    assert "failed labs: Lab-91-Broken" in capsys.readouterr().err
    failed_copy = nbformat.read(executed / "Lab-91-Broken" / "02-Train.ipynb", as_version=4)
    assert failed_copy.cells[0].outputs[0]["ename"] == "RuntimeError"
    assert not (executed / "Lab-91-Broken" / "03-Inference.ipynb").exists()
    assert sorted(path.name for path in (executed / "Lab-92-Working").glob("*.ipynb")) == [
        "01-Setup.ipynb", "02-Train.ipynb", "03-Inference.ipynb", "04-Deploy.ipynb"]


def test_bad_lab_path_deletes_nothing(tmp_path):
    from peftlabs.labs import main

    working = write_lab(tmp_path / "Lab-92-Working")
    earlier = tmp_path / "out" / "Lab-92-Working" / "adapter"
    earlier.mkdir(parents=True)

    status = main([str(working), str(tmp_path / "Lab-93-Missing"), "--replace-outputs",
                   "--output-dir", str(tmp_path / "out")])

    assert status == 2
    assert earlier.is_dir()
