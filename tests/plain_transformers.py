"""A Python subprocess that loads merged folders with transformers alone, where peftlabs cannot be imported.

The child runs with ``-I -S``: no PYTHONPATH, no user site, and no
``site`` processing, so the ``.pth`` files in site-packages (among them the
editable install of peftlabs) are not read. Only the site-packages folders
themselves are put on ``sys.path``. The child reports whether peftlabs can be
imported, so a test can assert the isolation instead of assuming it.

One child serves many requests (one JSON line each), because importing torch
and transformers takes several seconds on a small machine.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
from pathlib import Path

import torch

CHILD_SCRIPT = r"""
import importlib.util, json, sys
sys.path[:0] = json.loads(sys.argv[1])
status = {name: importlib.util.find_spec(name) is not None for name in ("peftlabs", "torch", "transformers")}
print(json.dumps(status), flush=True)

import torch
import transformers

for line in sys.stdin:
    request = json.loads(line)
    try:
        auto_class = getattr(transformers, request["auto_class"])
        model = auto_class.from_pretrained(request["folder"], dtype=torch.float32)
        model.eval()
        batch = torch.load(request["batch"])
        with torch.no_grad():
            logits = model(**batch).logits
        torch.save(logits, request["logits"])
        reply = {"ok": True, "class": type(model).__name__,
                 "modules": [name for name, _ in model.named_children()],
                 "imported": sorted(n for n in ("peft", "adapters", "peftlabs") if n in sys.modules)}
    except Exception as error:
        reply = {"ok": False, "error": f"{type(error).__name__}: {error}"}
    print(json.dumps(reply), flush=True)
"""


class PlainTransformersProcess:
    """Load merged model folders in the isolated child and return their logits."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.count = 0
        paths = [p for p in site.getsitepackages() if Path(p).is_dir()]
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", CHILD_SCRIPT, json.dumps(paths)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=workdir,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        self.status = json.loads(self.process.stdout.readline())

    def load(self, folder: Path, auto_class: str, batch: dict) -> tuple[dict, torch.Tensor | None]:
        """Return the child's reply and the logits of ``folder`` on ``batch`` (None if loading failed)."""
        self.count += 1
        batch_file = self.workdir / f"batch-{self.count}.pt"
        logits_file = self.workdir / f"logits-{self.count}.pt"
        torch.save(dict(batch), batch_file)
        request = {"folder": str(folder), "auto_class": auto_class, "batch": str(batch_file),
                   "logits": str(logits_file)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        reply = json.loads(self.process.stdout.readline())
        logits = torch.load(logits_file) if reply["ok"] else None
        return reply, logits

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)
