"""Classify from the mean of MiniLM's token states instead of its first-token pooler, as a test.

all-MiniLM-L6-v2 was trained as a sentence encoder whose sentence vector is
the mean of its last hidden states over the real tokens. Its BERT pooler,
which BertForSequenceClassification feeds to the classifier, reads the first
token only and looks untrained. Full fine-tuning can retrain attention to
that token; BitFit and P-tuning v2 may not. This script runs one
`peftlabs train` config with the pooler output replaced by the masked mean of
the last hidden states, for every method, so that the gap to full
fine-tuning can be measured under the same head. It is an experiment, not a
peftlabs option: it patches BertModel in this process only.

    .venv/bin/python benchmarks/sst2_mean_pool.py train --config CONFIG.yaml

CONFIG is a method's config that `peftlabs compare` wrote, with a new
output_dir (those configs set `overwrite: true`).
Results: docs/results.md, SST-2 section, "Further tries at one to three epochs".

NOTE: a run trained here is saved as a normal run, but `peftlabs infer`,
`merge` and `serve` load it with the first-token pooler, so their outputs do
not match what was trained. Use the scores this script prints.
"""

import functools
import sys

from transformers.models.bert import modeling_bert

from peftlabs.cli import main

first_token_forward = modeling_bert.BertModel.forward


# peft reads the signature to check for past_key_values, so the wrapper keeps it.
@functools.wraps(first_token_forward)
def mean_pool_forward(self, input_ids=None, attention_mask=None, *args, **kwargs):
    kwargs["return_dict"] = True
    outputs = first_token_forward(self, input_ids, attention_mask, *args, **kwargs)

    # Prefix methods prepend their virtual tokens to the mask only: keep the real positions.
    hidden = outputs.last_hidden_state
    mask = attention_mask[:, -hidden.shape[1]:].unsqueeze(-1).to(hidden.dtype)
    outputs.pooler_output = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
    return outputs


modeling_bert.BertModel.forward = mean_pool_forward

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
