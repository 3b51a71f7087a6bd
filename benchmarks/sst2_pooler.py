"""Train MiniLM's pooler beside BitFit or P-tuning v2, to test whether it closes their SST-2 gap.

all-MiniLM-L6-v2 was trained as a sentence encoder with mean pooling, and its
BERT pooler (the dense layer over the first token that the classifier reads)
looks untrained: weight standard deviation 0.009, bias zero. BitFit and
P-tuning v2 keep that layer's weights frozen. This script runs one
`peftlabs train` config with the pooler's weights trained in full as well,
beside the classification head. It is an experiment, not a peftlabs option:
it patches the two methods in this process only.

    .venv/bin/python benchmarks/sst2_pooler.py train --config CONFIG.yaml

CONFIG is a method's config that `peftlabs compare` wrote, for example
runs/compare/sst2-minilm-400/configs/bitfit.yaml, with a new output_dir.
Those configs set `overwrite: true`, so an unchanged output_dir would
replace the compare's own run.
Results: docs/results.md, SST-2 section, "Further tries at one to three epochs".

NOTE: only BitFit and P-tuning v2 are patched. A config for any other
method trains as plain `peftlabs train` would, without the pooler and
without a warning.
"""

import sys

import peftlabs.methods.bitfit as bitfit
import peftlabs.methods.p_tuning_v2 as p_tuning_v2
from peftlabs.cli import main

bitfit_apply = bitfit.BitFit.apply


def apply_with_pooler(self, model, task, params, head):
    model = bitfit_apply(self, model, task, params, head)
    for name, parameter in model.named_parameters():
        if name.startswith(("pooler.", "bert.pooler.")):
            parameter.requires_grad = True  # BitFit's save() writes every trainable tensor, these included
    return model


bitfit.BitFit.apply = apply_with_pooler

# peft trains and saves every module named in modules_to_save in full.
p_tuning_v2.head_modules = lambda head: [head, "pooler"] if head else None

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
