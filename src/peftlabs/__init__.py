"""peftlabs: parameter-efficient fine-tuning methods behind one interface.

    peftlabs train                      # LoRA on the bundled SmolLM2 and demo tickets
    peftlabs train --config labs/Lab-01-LoRA/lora.yaml --max-steps 20
    peftlabs infer --run runs/lora-demo --text "I was charged twice"
    peftlabs merge --run runs/lora-demo --output merged/lora-demo
    peftlabs demo                       # train, evaluate before/after, merge
"""

__version__ = "0.1.0"

import logging as _logging

# Progress lines (step, loss, tok/s, memory) are INFO records of this logger;
# the CLI prints them and every run also writes them to its train.log.
_logging.getLogger("peftlabs").setLevel(_logging.INFO)
