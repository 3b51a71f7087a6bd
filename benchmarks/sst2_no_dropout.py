"""Train a BERT classifier with every dropout set to zero, as a test.

BitFit trains only the bias vectors and the classifier on MiniLM-L6 and ends
one epoch of SST-2 with a training loss about twice that of full
fine-tuning. If dropout, not the small number of trained parameters, were
what held it back, the gap to full fine-tuning would shrink once dropout is
gone. This script runs one
`peftlabs train` config with hidden, attention and classifier dropout set to
0 in the model's config before the model is built. It is an experiment, not a
peftlabs option: it patches BertForSequenceClassification in this process only.

    .venv/bin/python benchmarks/sst2_no_dropout.py train --config CONFIG.yaml

CONFIG is a method's config that `peftlabs compare` wrote, with a new
output_dir (those configs set `overwrite: true`).
Results: docs/results.md, SST-2 section, "Further tries at one to three epochs".
"""

import sys

from transformers.models.bert import modeling_bert

from peftlabs.cli import main

init_with_dropout = modeling_bert.BertForSequenceClassification.__init__


def init_without_dropout(self, config):
    config.hidden_dropout_prob = 0.0
    config.attention_probs_dropout_prob = 0.0
    config.classifier_dropout = 0.0
    init_with_dropout(self, config)


modeling_bert.BertForSequenceClassification.__init__ = init_without_dropout

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
