"""QLoRA: LoRA on a base model stored in 4-bit NF4 with double quantization.

The frozen base weights are quantized to 4-bit NormalFloat with their
quantization constants quantized again (Dettmers et al. 2023,
arXiv:2305.14314); LoRA's A and B stay in full precision. bitsandbytes
0.50.2 runs NF4 on CPU as well as CUDA.

Merging: peft's `merge_and_unload` on a 4-bit base adds the update and
quantizes the sum back to 4 bits, which on CPU changed SmolLM2's logits by
up to 46 in one run and by 14.6 in another (docs/merging.md). peftlabs
instead de-quantizes the NF4 weights to fp32 (the exact values the adapter
was trained against) and merges into that copy.
"""

from __future__ import annotations

import torch

from peftlabs.errors import UserError
from peftlabs.methods.lora import Lora, LoraParams


class QLora(Lora):
    name = "qlora"
    trains = "LoRA matrices A, B on a 4-bit NF4 (double-quantized) frozen base"
    library_class = "peft.LoraConfig + transformers.BitsAndBytesConfig"
    mergeable = True
    default_learning_rate = 2e-4
    Params = LoraParams

    def load_base(self, location, task, labels, tokenizer, params, trust_remote_code=False):
        from transformers import BitsAndBytesConfig

        from peftlabs.models import load_base_model

        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError("method 'qlora' needs bitsandbytes: run `pip install bitsandbytes`") from None
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        )
        return load_base_model(location, task, labels, tokenizer, quantization_config=quantization,
                               trust_remote_code=trust_remote_code)

    def apply(self, model, task, params, head):
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, task, params, head)

    def merge(self, model):
        """Merge into a de-quantized fp32 copy of the 4-bit base (see the module docstring).

        The adapter is saved, the LoRA layers are removed, the NF4 base is
        de-quantized in place, and the adapter is attached again to that fp32
        model and merged; ``model`` is consumed.
        """
        import tempfile

        from peft import PeftModel

        with tempfile.TemporaryDirectory() as adapter_dir:
            model.save_pretrained(adapter_dir, safe_serialization=True)
            base = model.unload()
            base = base.dequantize()
            if hasattr(base.config, "quantization_config"):
                del base.config.quantization_config
            restored = PeftModel.from_pretrained(base, adapter_dir)
            return restored.merge_and_unload()
