"""The lab-specific cells: each method's idea, config, save, load and merge code.

build_notebooks.py combines them with the cells every lab shares. Counts of
trainable parameters quoted below are the output of `peftlabs methods`
(docs/methods.md) for the bundled models with each lab's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SMOLLM_GPU = "HuggingFaceTB/SmolLM2-1.7B-Instruct"
ENCODER_GPU = "FacebookAI/roberta-large"


@dataclass
class MethodCells:
    name: str  # peftlabs method name, also the run folder under OUTPUT_DIR
    label: str
    config_file: str
    load_base_code: str  # defines a fresh `base_model`
    apply_text: str
    apply_code: str  # defines `model` from `base_model`
    load_text: str
    load_code: str  # attaches ADAPTER_DIR to `base_model`, defines `model`
    save_text: str
    save_code: str  # writes ADAPTER_DIR
    count_code: str = ""
    check_code: str = ""
    merge_text: str = ""
    merge_code: str = ""  # defines `merged` from `model`
    merge_sections: list[str] = field(default_factory=list)
    no_merge_text: str = ""
    base_timing_text: str = ""
    base_timing_code: str = ""
    part_intro: str = ""


@dataclass
class Lab:
    folder: str
    title: str
    task: str  # causal_lm or classification
    gpu_model: str
    methods: list[MethodCells]
    mergeable: bool
    idea: str
    train_intro: str
    inference_intro: str
    merge_intro: str
    quick: dict
    # Task-specific cells: CAUSAL_TASK or CLASSIFICATION_TASK below.
    data_text: str
    tokenize_text: str
    tokenize_code: str
    base_text: str
    base_score_text: str
    answer_text: str
    answer_code: str
    save_merged_code: str


# ---------------------------------------------------------------------------
# Cells shared by the labs of one task
# ---------------------------------------------------------------------------

CAUSAL_BASE = """
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(config.seed)
    base_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    if base_model.config.pad_token_id is None:
        base_model.config.pad_token_id = tokenizer.pad_token_id
    fp32_base_bytes = base_model.get_memory_footprint()
    print(f"fp32 base model: {fp32_base_bytes / 1e6:.0f} MB in memory")
"""

CLASSIFICATION_BASE = """
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(config.seed)  # the classification head is new and initialised at random
    base_model = AutoModelForSequenceClassification.from_pretrained(
        location,
        num_labels=len(data.labels),
        id2label=dict(enumerate(data.labels)),
        label2id={label: index for index, label in enumerate(data.labels)},
        dtype=torch.float32,
    )
"""

CAUSAL_TASK = dict(
    data_text=(
        "The tickets are a classification dataset; for a causal LM it becomes instruction tuning whose answer "
        "is the label name (`prompt` = ticket, `response` = label), with the label list in the system message."
    ),
    tokenize_text="""
        ## What the model sees

        Each example is the chat template applied to the system message and
        the ticket, followed by the label and the end-of-turn token. The
        labels are `-100` (ignored by the loss) on every prompt token, so the
        loss covers the answer only.
    """,
    tokenize_code="""
        from peftlabs.data import encode_causal_example

        example = encode_causal_example(tokenizer, data.train[0]["prompt"], data.train[0]["response"],
                                        data.instruction, config.max_length)
        print(tokenizer.decode(example["input_ids"]))
        print("tokens in the loss:", sum(label != -100 for label in example["labels"]), "of", len(example["labels"]))

        train_set = tokenize_split(data.train, tokenizer, data, config.max_length)
    """,
    base_text=(
        "`AutoModelForCausalLM.from_pretrained` loads the pretrained weights in fp32. Nothing in it will be "
        "trained: the method below adds or selects the few trainable parameters. The bundled SmolLM2 ships "
        "as a 4-bit GGUF file (Q4_1), which `transformers` de-quantizes to fp32 on conversion, so these fp32 "
        "weights already carry one round of 4-bit rounding; a hub checkpoint such as "
        "`HuggingFaceTB/SmolLM2-135M-Instruct` has the original values."
    ),
    base_score_text=(
        "SmolLM2-Instruct answers a ticket as a chat assistant instead of naming a category, so its accuracy "
        "is near 0: the exact label string is what counts."
    ),
    answer_text="""
        ## The answer function

        Greedy decoding of just enough tokens for the longest label name
        plus the end-of-turn token, with the same system message as in
        training.
    """,
    answer_code="""
        from peftlabs.evaluate import generate

        ANSWER_TOKENS = max(len(tokenizer(label, add_special_tokens=False)["input_ids"]) for label in data.labels) + 1


        def answer(model, text: str) -> str:
            \"\"\"Return the model's greedy answer to one ticket.\"\"\"
            return generate(model, tokenizer, [text], data.instruction, ANSWER_TOKENS, progress=False)[0]
    """,
    save_merged_code="""
        from transformers import AutoModelForCausalLM

        from peftlabs.runs import atomic_dir

        MERGED_DIR = RUN_DIR / "merged"
        with atomic_dir(MERGED_DIR) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        standalone = AutoModelForCausalLM.from_pretrained(MERGED_DIR, dtype=torch.float32).to(device).eval()
        print(sorted(path.name for path in MERGED_DIR.iterdir()))
    """,
)

CLASSIFICATION_TASK = dict(
    data_text=(
        "MiniLM is an encoder, so the tickets are plain sequence classification: the text goes in, a new "
        "linear head on the [CLS] representation scores the five labels."
    ),
    tokenize_text="""
        ## What the model sees

        The tokenizer adds `[CLS]` and `[SEP]`; the label becomes its index
        in the label list. The new classification head is trained in full by
        every method (it did not exist before), and is saved with the adapter.
    """,
    tokenize_code="""
        train_set = tokenize_split(data.train, tokenizer, data, config.max_length)
        first = train_set[0]
        print(tokenizer.decode(first["input_ids"]), "->", data.labels[first["labels"]])
    """,
    base_text=(
        "`AutoModelForSequenceClassification.from_pretrained` loads the pretrained encoder in fp32 and adds a "
        "randomly initialised head with one output per label (transformers warns that the head is new)."
    ),
    base_score_text=(
        "Its classification head is untrained (random, with the run's seed), so it scores near chance, 0.2 "
        "for five labels."
    ),
    answer_text="""
        ## The answer function

        The label with the highest logit.
    """,
    answer_code="""
        from peftlabs.evaluate import classify


        def answer(model, text: str) -> str:
            \"\"\"Return the label the model predicts for one ticket.\"\"\"
            return data.labels[classify(model, tokenizer, [text], progress=False)[0]]
    """,
    save_merged_code="""
        from transformers import AutoModelForSequenceClassification

        from peftlabs.runs import atomic_dir

        MERGED_DIR = RUN_DIR / "merged"
        with atomic_dir(MERGED_DIR) as staging:
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        standalone = AutoModelForSequenceClassification.from_pretrained(MERGED_DIR, dtype=torch.float32).to(device).eval()
        print(sorted(path.name for path in MERGED_DIR.iterdir()))
    """,
)

SMOLLM_QUICK = {"max_steps": 2, "batch_size": 2, "max_train_samples": 8, "max_eval_samples": 4,
                "logging_steps": 1, "max_length": 160}
MINILM_QUICK = {"max_steps": 3, "batch_size": 4, "max_train_samples": 16, "max_eval_samples": 8,
                "logging_steps": 1}

PEFT_SAVE_TEXT = """
    ## Save the adapter

    `save_pretrained` on a `PeftModel` writes the adapter and never the
    frozen base: `adapter_config.json` (the method's settings and the base
    model's name), `adapter_model.safetensors`, and a model card,
    `README.md`. What the file holds is
    what inference needs, which is not always what was trained. For LoRA and
    (IA)³ these are the trained weights. For the prompt-learning methods
    (prompt tuning, prefix tuning, P-tuning) peft runs the prompt encoder
    once and saves its output, the final virtual tokens: a reparameterisation
    MLP or LSTM used in training is not saved. For a classification model,
    the new head is saved as well. The folder is written under a temporary
    name and renamed when complete, so an interrupted save leaves no
    half-written adapter.
"""

PEFT_SAVE_CODE = """
    from safetensors.torch import load_file

    from peftlabs.runs import atomic_dir

    ADAPTER_DIR = RUN_DIR / "adapter"
    with atomic_dir(ADAPTER_DIR) as staging:
        model.save_pretrained(staging)
    saved_values = sum(tensor.numel() for tensor in load_file(ADAPTER_DIR / "adapter_model.safetensors").values())
    print(f"{saved_values:,} values saved, {trainable:,} trained")
"""

PEFT_LOAD_TEXT = (
    "`PeftModel.from_pretrained` wraps a freshly loaded base model and loads the saved adapter weights "
    "into it. It modifies the base model in place."
)
PEFT_LOAD_TEXT_CLASSIFICATION = (
    "`PeftModel.from_pretrained` wraps a freshly loaded base model and loads the saved adapter weights "
    "into it, and the saved classification head (listed in `modules_to_save`) over the random one. It "
    "modifies the base model in place."
)

PEFT_LOAD_CODE = """
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, ADAPTER_DIR)
"""

PEFT_COUNT = "model.print_trainable_parameters()"

PEFT_BASE_TIMING_TEXT = """
    ## What the adapter costs, like for like

    Timing answers would not compare the same work: a generated answer
    stops at its end-of-turn token, so the tuned model's short label and the
    base model's long chat reply differ in length. The adapter's cost is
    measured instead on one forward pass over the reference batch, with the
    adapter and with it switched off by `model.disable_adapter()`. The
    prompt methods add 20 positions to attention or to the input, which is
    small next to the 30 layers' matrix products, so the two times can be
    within the noise of a shared CPU of each other.
"""

PEFT_BASE_TIMING_CODE = """
    with_adapter = time_calls(lambda: logits_of(model, batch), TIMED_CALLS)
    with model.disable_adapter():
        base_alone = time_calls(lambda: logits_of(model, batch), TIMED_CALLS)
    # A difference of a few percent either way is within the noise of a shared CPU.
    for name, seconds in (("with adapter", with_adapter), ("base alone", base_alone)):
        print(f"{name:13s} {1000 * sum(seconds) / len(seconds):7.1f} ms per forward pass over "
              f"{len(batch['input_ids'])} inputs (min {1000 * min(seconds):.1f})")
"""

PEFT_CHECK = 'assert (ADAPTER_DIR / "adapter_config.json").is_file()'


def peft_method(name: str, label: str, config_file: str, base: str, apply_text: str, apply_code: str,
                **extra) -> MethodCells:
    extra.setdefault("base_timing_text", PEFT_BASE_TIMING_TEXT)
    extra.setdefault("base_timing_code", PEFT_BASE_TIMING_CODE)
    return MethodCells(
        name=name, label=label, config_file=config_file, load_base_code=base,
        apply_text=apply_text, apply_code=apply_code,
        load_text=PEFT_LOAD_TEXT_CLASSIFICATION if base is CLASSIFICATION_BASE else PEFT_LOAD_TEXT,
        load_code=PEFT_LOAD_CODE,
        save_text=PEFT_SAVE_TEXT, save_code=PEFT_SAVE_CODE,
        count_code=PEFT_COUNT, check_code=PEFT_CHECK,
        **extra,
    )


# ---------------------------------------------------------------------------
# Lab 1: LoRA and QLoRA
# ---------------------------------------------------------------------------

LORA_IDEA = r"""
**LoRA** (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language
Models*, arXiv:2106.09685) freezes every pretrained weight matrix
$W_0 \in \mathbb{R}^{d \times k}$ and learns a low-rank update beside it:

$$h = W_0 x + \frac{\alpha}{r} B A x, \qquad A \in \mathbb{R}^{r \times k},\; B \in \mathbb{R}^{d \times r},\; r \ll \min(d, k).$$

$A$ starts random and $B$ at zero, so training starts exactly at the base
model. Only $A$ and $B$ change: $r(d + k)$ values per adapted matrix. On
SmolLM2-135M (30 layers, hidden size 576, keys and values 192 wide because
of grouped-query attention) with $r = 8$ on `q_proj` and `v_proj`:
$30 \cdot 8 \cdot ((576 + 576) + (576 + 192)) = 460{,}800$ trainable
parameters, 0.34% of the model.

- `r`: the rank, the capacity of the update.
- `alpha`: the update is scaled by $\alpha / r$, so changing `r` does not
  change the effective step size much.
- `dropout`: dropout on the input of $A$, a regulariser.
- `target_modules`: which linear layers get an update.

After training, $W = W_0 + \frac{\alpha}{r} B A$ is a matrix of the same
shape as $W_0$: the update **merges** into the weights and inference costs
nothing extra (notebook 4).

**QLoRA** (Dettmers et al. 2023, *QLoRA: Efficient Finetuning of Quantized
LLMs*, arXiv:2305.14314) keeps the same $A$ and $B$ but stores the frozen
$W_0$ in 4-bit NormalFloat (NF4), a data type whose 16 levels are quantiles
of a normal distribution, with the per-block quantization constants
quantized again ("double quantization"). The forward pass de-quantizes each
block on the fly; gradients flow through it into $A$ and $B$, which stay in
full precision. Each quantized linear layer takes about an eighth of its
fp32 memory (4 bits per weight plus the constants, against 32). The input
embeddings are not quantized, and in SmolLM2 they hold 28 M of the 135 M
parameters, so the whole base model shrinks less: 166 MB against 538 MB in
fp32 when measured here, 31%. Notebook 2 prints both.
"""

QLORA_BASE = """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 4-bit NormalFloat
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too
        bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    )
    # NOTE: the CUDA path (device_map on GPU 0) was not run here: these labs were tested on CPU only.
    base_model = AutoModelForCausalLM.from_pretrained(location, quantization_config=quantization,
                                                      dtype=torch.float32,
                                                      device_map={"": 0} if device == "cuda" else None)
    quantized_bytes = base_model.get_memory_footprint()
    print(f"4-bit base model: {quantized_bytes / 1e6:.0f} MB in memory, "
          f"{100 * quantized_bytes / fp32_base_bytes:.0f}% of the fp32 base model loaded above")
"""

LORA_APPLY_TEXT = """
    ## The LoRA adapter: `LoraConfig` and `get_peft_model`

    `LoraConfig` holds the method's hyperparameters from the YAML's `lora:`
    section. `get_peft_model` replaces each targeted `nn.Linear` with a
    LoRA layer that keeps the original weight frozen and adds $A$ and $B$,
    and freezes every other parameter.
"""

LORA_APPLY = """
    from peft import LoraConfig, TaskType, get_peft_model

    from peftlabs.methods import get_method

    lora = get_method("lora").parse_params(config.method_args.get("lora"))  # the YAML's lora: section, with defaults
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
    )
    model = get_peft_model(base_model, peft_config)
"""

QLORA_APPLY_TEXT = """
    ## LoRA on the 4-bit base

    `prepare_model_for_kbit_training` readies a quantized model for
    training: it keeps layer norms in fp32 and makes the input embeddings
    require gradients so they flow back through the frozen 4-bit layers.
    Then the same `LoraConfig` as before.
"""

QLORA_APPLY = """
    from peft import LoraConfig, TaskType, get_peft_model, prepare_model_for_kbit_training

    from peftlabs.methods import get_method

    base_model = prepare_model_for_kbit_training(base_model, use_gradient_checkpointing=False)
    qlora = get_method("qlora").parse_params(config.method_args.get("qlora"))
    peft_config = LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=qlora.r,
        lora_alpha=qlora.alpha,
        lora_dropout=qlora.dropout,
        target_modules=qlora.target_modules,
    )
    model = get_peft_model(base_model, peft_config)
"""

LORA_MERGE_TEXT = """
    ## Merge: `merge_and_unload`

    `merge_and_unload` computes $W_0 + \\frac{\\alpha}{r} B A$ for every
    adapted layer, writes it into the layer's weight and removes the LoRA
    modules. The result is a plain `transformers` model.
"""

LORA_MERGE = """
    merged = model.merge_and_unload()
    merged.eval()
    print(type(merged).__name__, "- LoRA layers left:", sum("lora" in name for name, _ in merged.named_modules()))
"""

QLORA_MERGE_TEXT = """
QLoRA trains against the NF4 weights. Merging $B A$ into a 4-bit base with
`merge_and_unload` adds the update and quantizes the sum back to 4 bits.
The rounding can move the logits as much as the adapter itself did: on CPU
with SmolLM2 it moved them by 7.2 in a quick run of this lab and by 14.6
and 46 in the runs recorded in `docs/merging.md`, depending on the
adapter. The cell below prints both numbers. The correct merge de-quantizes the base to
fp32 (the exact values the adapter was trained against), attaches the
adapter again and merges into that copy; `peftlabs.methods.qlora` does the
same. Below, both are compared with the unmerged 4-bit model.
"""

QLORA_MERGE_SECTIONS = [
    """
    # The unmerged QLoRA model: 4-bit base + adapter.
    from peft import PeftModel
    from transformers import BitsAndBytesConfig

    QLORA_DIR = OUTPUT_DIR / "qlora"
    qlora_reference = torch.load(QLORA_DIR / "reference_logits.pt")
    qlora_batch = qlora_reference["batch"]


    def load_qlora():
        \"\"\"Return a fresh 4-bit base model with the QLoRA adapter attached.\"\"\"
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16 if device == "cuda" else torch.float32)
        base = AutoModelForCausalLM.from_pretrained(location, quantization_config=quantization, dtype=torch.float32,
                                                    device_map={"": 0} if device == "cuda" else None)
        return PeftModel.from_pretrained(base, QLORA_DIR / "adapter").eval()


    quantized = load_qlora()
    qlora_before = logits_of(quantized, qlora_batch)
    qlora_answers = [answer(quantized, text) for text in texts]
    print(f"unmerged QLoRA vs training run: "
          f"{max_logit_difference(qlora_reference['logits'], qlora_before, qlora_batch['attention_mask']):.2e}")
    with quantized.disable_adapter():
        adapter_effect = max_logit_difference(logits_of(quantized, qlora_batch), qlora_before,
                                              qlora_batch["attention_mask"])
    print(f"what the adapter changed: max |logit difference| {adapter_effect:.2e} against the 4-bit base alone")
    """,
    """
    # The wrong way, for comparison: merge into the 4-bit weights, which re-quantizes them.
    requantized = quantized.merge_and_unload()
    requantized_difference = max_logit_difference(qlora_before, logits_of(requantized, qlora_batch),
                                                  qlora_batch["attention_mask"])
    print(f"merged into the 4-bit base: max |logit difference| {requantized_difference:.2e}")
    del quantized, requantized
    """,
    """
    # The right way: de-quantize the base to fp32, attach the adapter again, merge.
    fresh = load_qlora()
    dequantized_base = fresh.unload().dequantize()
    if hasattr(dequantized_base.config, "quantization_config"):
        del dequantized_base.config.quantization_config  # the weights are plain fp32 tensors now
    qlora_merged = PeftModel.from_pretrained(dequantized_base, QLORA_DIR / "adapter").merge_and_unload().eval()
    qlora_difference = max_logit_difference(qlora_before, logits_of(qlora_merged, qlora_batch),
                                            qlora_batch["attention_mask"])
    qlora_answers_after = [answer(qlora_merged, text) for text in texts]
    print(f"merged into a de-quantized fp32 copy: max |logit difference| {qlora_difference:.2e} "
          f"(tolerance {MERGE_TOLERANCE:.0e})")
    assert qlora_difference < MERGE_TOLERANCE, f"QLoRA merge changed the logits by {qlora_difference}"
    assert qlora_answers_after == qlora_answers, "QLoRA merge changed the answers"
    print("QLoRA merge check passed")
    """,
]

LAB_LORA = Lab(
    folder="Lab-01-LoRA",
    title="Lab 1: LoRA and QLoRA",
    task="causal_lm",
    gpu_model=SMOLLM_GPU,
    mergeable=True,
    quick=SMOLLM_QUICK,
    idea=LORA_IDEA + """
This lab teaches SmolLM2-135M-Instruct to sort support tickets into five
categories, answering with the category name: first with LoRA on the fp32
base (`lora.yaml`), then with QLoRA on a 4-bit base (`qlora.yaml`). Run the
notebooks in order: 1 Setup, 2 Train, 3 Inference, 4 Merge and deploy.
""",
    train_intro="""
Part 1 trains a LoRA adapter on the frozen fp32 SmolLM2 with the
`transformers` `Trainer`; part 2 trains the same adapter on a 4-bit NF4
copy of the base (QLoRA). Both adapters, their settings and reference
logits are written to `OUTPUT_DIR/lora/` and `OUTPUT_DIR/qlora/`.
""",
    inference_intro="""
Each adapter is loaded into a fresh base model with `PeftModel.from_pretrained`
and compared with the base model alone on held-out test tickets.
""",
    merge_intro="""
LoRA's update $\\frac{\\alpha}{r} B A$ has the shape of the weight it adapts,
so it can be added into that weight once and for all. This notebook merges
the LoRA adapter, proves the merged model computes the same function, saves
it as a standalone `transformers` model and times it. The last part does the
same for QLoRA, whose base is 4-bit.
""",
    methods=[
        peft_method("lora", "LoRA", "lora.yaml", CAUSAL_BASE, LORA_APPLY_TEXT, LORA_APPLY,
                    merge_text=LORA_MERGE_TEXT, merge_code=LORA_MERGE),
        peft_method("qlora", "QLoRA", "qlora.yaml", QLORA_BASE, QLORA_APPLY_TEXT, QLORA_APPLY,
                    merge_text=QLORA_MERGE_TEXT, merge_sections=QLORA_MERGE_SECTIONS,
                    part_intro="The same LoRA adapter, trained on a base model stored in 4-bit NF4. "
                               "Compare the base model's memory with the fp32 one above."),
    ],
    **CAUSAL_TASK,
)


# ---------------------------------------------------------------------------
# Lab 2: bottleneck adapters (AdapterHub `adapters`)
# ---------------------------------------------------------------------------

ADAPTERS_IDEA = r"""
**Bottleneck adapters** (Houlsby et al. 2019, *Parameter-Efficient Transfer
Learning for NLP*, arXiv:1902.00751; Pfeiffer et al. 2021, *AdapterFusion:
Non-Destructive Task Composition for Transfer Learning*, arXiv:2005.00247)
insert a small residual MLP into every transformer layer and train only
that (and the task head):

$$h \leftarrow h + W_\text{up}\, f(W_\text{down}\, h), \qquad W_\text{down} \in \mathbb{R}^{m \times d},\; W_\text{up} \in \mathbb{R}^{d \times m},\; m = d / \text{reduction\_factor}.$$

Houlsby places one adapter after the attention block and one after the
feed-forward block of each layer (`DoubleSeqBnConfig`); Pfeiffer keeps only
the one after the feed-forward block (`SeqBnConfig`), with nearly the same
accuracy at half the size. Each adapter has $2dm + d + m$ parameters. On
MiniLM-L6 (6 layers, hidden size 384) with the Pfeiffer variant and
reduction factor 16 ($m = 24$): $6 \cdot 18{,}840 = 113{,}040$ adapter
parameters plus the 1,925 of the 5-label head, 0.50% of the model.

- `variant`: `pfeiffer` (one adapter per layer) or `houlsby` (two).
- `reduction_factor`: $d / m$; smaller means a wider bottleneck and more
  capacity.

The adapters are implemented by the AdapterHub `adapters` library:
`adapters.init` adds adapter support to a `transformers` model,
`add_adapter` inserts the modules, `train_adapter` freezes everything else.

This lab trains a Pfeiffer adapter on MiniLM-L6 to classify the bundled
support tickets into five categories (`adapters.yaml`). Run the notebooks in
order: 1 Setup, 2 Train, 3 Inference, 4 Deploy.
"""

ADAPTERS_APPLY_TEXT = """
    ## The adapter: `adapters.init`, `add_adapter`, `train_adapter`

    `adapters.init` gives the `transformers` model the adapter methods.
    `add_adapter` inserts a bottleneck module with the chosen configuration
    into every layer; `train_adapter` activates it, and freezes every other
    parameter, the new head included. The head did not exist before and
    must be trained, so it is unfrozen again by hand.
"""

ADAPTERS_APPLY = """
    import adapters
    from adapters import DoubleSeqBnConfig, SeqBnConfig

    from peftlabs.methods import get_method

    ADAPTER_NAME = "tickets"
    settings = get_method("adapters").parse_params(config.method_args.get("adapters"))  # the YAML's adapters: section
    config_class = DoubleSeqBnConfig if settings.variant == "houlsby" else SeqBnConfig
    adapter_config = config_class(reduction_factor=settings.reduction_factor)

    adapters.init(base_model)
    base_model.add_adapter(ADAPTER_NAME, config=adapter_config)
    base_model.train_adapter(ADAPTER_NAME)
    for parameter in base_model.classifier.parameters():
        parameter.requires_grad = True
    model = base_model
"""

ADAPTERS_COUNT = "print(model.adapter_summary())"

ADAPTERS_SAVE_TEXT = """
    ## Save the adapter and the head

    `save_adapter` writes the adapter's configuration and weights
    (safetensors). The classification head belongs to the `transformers`
    model, not to the adapter. `adapters` 1.3 also writes that head
    (`model_head.safetensors`), but this lab saves it explicitly as
    `head.safetensors` and loads it explicitly, so the reload does not
    depend on that default. The folder is written under a temporary name
    and renamed when complete.
"""

ADAPTERS_SAVE = """
    from safetensors.torch import save_file

    from peftlabs.runs import atomic_dir

    ADAPTER_DIR = RUN_DIR / "adapter"
    with atomic_dir(ADAPTER_DIR) as staging:
        model.save_adapter(str(staging), ADAPTER_NAME, use_safetensors=True)
        head = {name: tensor.contiguous() for name, tensor in model.classifier.state_dict().items()}
        save_file(head, str(staging / "head.safetensors"))
"""

ADAPTERS_LOAD_TEXT = (
    "`adapters.init` on a fresh base model, then `load_adapter` reads the saved adapter and "
    "`set_active=True` switches it on. The saved head is copied into the model's classifier."
)

ADAPTERS_LOAD = """
    import adapters
    from safetensors.torch import load_file

    adapters.init(base_model)
    base_model.load_adapter(str(ADAPTER_DIR), load_as="tickets", set_active=True, use_safetensors=True)
    base_model.classifier.load_state_dict(load_file(str(ADAPTER_DIR / "head.safetensors")))
    model = base_model
"""

ADAPTERS_NO_MERGE = """
A bottleneck adapter is a new block, $W_\\text{up} f(W_\\text{down} h)$ with
a nonlinearity $f$ in the middle, added to each layer's output. No change
to the existing weight matrices can reproduce a function that contains an
extra nonlinearity, so there is nothing to fold: the adapter is deployed as
a separate small file next to the unchanged base model, and the extra
matrix products run at every forward pass. The upside is that one base
model can serve many task adapters, switched per request.
"""

ADAPTERS_BASE_TIMING_TEXT = """
    ## The same calls without the adapter

    A fresh base model with the same trained head, but no adapter, shows
    what the adapter adds to each answer.
"""

ADAPTERS_BASE_TIMING = """
    from safetensors.torch import load_file

    plain = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=len(data.labels), id2label=dict(enumerate(data.labels)), dtype=torch.float32)
    plain.classifier.load_state_dict(load_file(str(ADAPTER_DIR / "head.safetensors")))
    plain.to(device).eval()
    base_seconds = time_calls(lambda: answer(plain, texts[0]), TIMED_CALLS)
    print(f"base alone:   {1000 * sum(base_seconds) / len(base_seconds):.1f} ms per answer")
"""

LAB_ADAPTERS = Lab(
    folder="Lab-02-AdapterLayers",
    title="Lab 2: Bottleneck adapters (Houlsby, Pfeiffer)",
    task="classification",
    gpu_model=ENCODER_GPU,
    mergeable=False,
    quick=MINILM_QUICK,
    idea=ADAPTERS_IDEA,
    train_intro="""
Trains a Pfeiffer bottleneck adapter and the classification head of
MiniLM-L6 with the `transformers` `Trainer`, then saves both to
`OUTPUT_DIR/adapters/`.
""",
    inference_intro="""
Loads the saved adapter and head into a fresh MiniLM and compares it with
the untrained base model on held-out test tickets.
""",
    merge_intro="""
Exports the adapter unmerged and serves it: a fresh base model with the
adapter attached answers tickets, timed, and must reproduce the training
run's logits.
""",
    methods=[MethodCells(
        name="adapters", label="Bottleneck adapter", config_file="adapters.yaml",
        load_base_code=CLASSIFICATION_BASE,
        apply_text=ADAPTERS_APPLY_TEXT, apply_code=ADAPTERS_APPLY,
        count_code=ADAPTERS_COUNT,
        save_text=ADAPTERS_SAVE_TEXT, save_code=ADAPTERS_SAVE,
        check_code='assert (ADAPTER_DIR / "head.safetensors").is_file()',
        load_text=ADAPTERS_LOAD_TEXT, load_code=ADAPTERS_LOAD,
        no_merge_text=ADAPTERS_NO_MERGE,
        base_timing_text=ADAPTERS_BASE_TIMING_TEXT, base_timing_code=ADAPTERS_BASE_TIMING,
    )],
    **CLASSIFICATION_TASK,
)


# ---------------------------------------------------------------------------
# Labs 3, 4, 7, 8: prompt-style methods (peft)
# ---------------------------------------------------------------------------

PROMPT_NO_MERGE = """
Prompt tuning does not change any weight: its virtual tokens are extra
*inputs*, embeddings placed in front of the text. A weight matrix acts on
every token the same way, so no change to the weights can stand in for
extra tokens that the attention of every later position can look at. There
is nothing to fold into the model; it is deployed as base model plus the
small adapter file, and every request carries the virtual tokens, which
makes each sequence slightly longer.
"""

PREFIX_NO_MERGE = """
A prefix is a set of extra keys and values inside every attention layer:
each position attends to $[P_k; K]$ and $[P_v; V]$ instead of $K$ and $V$.
Attention's softmax mixes the prefix with the real tokens in a way that
depends on each input, so no change to $W_q$, $W_k$ or $W_v$ can express
it. There is nothing to fold into the weights; the model is deployed as base
model plus the adapter file, and every forward pass attends over the
prefix as well.
"""

PROMPT_TUNING_IDEA = r"""
**Prompt tuning** (Lester et al. 2021, *The Power of Scale for
Parameter-Efficient Prompt Tuning*, arXiv:2104.08691) freezes the whole
model and learns only the embeddings of $n$ "virtual tokens" that are put
in front of every input:

$$\text{input embeddings} = [P; E(x)], \qquad P \in \mathbb{R}^{n \times d}.$$

Only $P$ is trained: $n \cdot d$ parameters. On SmolLM2-135M (embedding size
576) with 20 virtual tokens: $20 \cdot 576 = 11{,}520$ parameters, 0.009% of
the model, the smallest of all labs. Lester et al. show the method closes
the gap to full fine-tuning as models grow past a few billion parameters;
on a 135M model expect it to learn more slowly than LoRA.

- `num_virtual_tokens`: $n$, the prompt length.
- `init` / `init_text`: start $P$ from the embeddings of a text describing
  the task (more stable on small models) or at random.

This lab trains a soft prompt for SmolLM2-135M-Instruct to sort support
tickets into five categories, answering with the category name
(`prompt_tuning.yaml`). Run the notebooks in order: 1 Setup, 2 Train,
3 Inference, 4 Deploy.
"""

PROMPT_TUNING_APPLY_TEXT = """
    ## The soft prompt: `PromptTuningConfig` and `get_peft_model`

    With `PromptTuningInit.TEXT` the virtual tokens start as the embeddings
    of `prompt_tuning_init_text` (repeated or cut to `num_virtual_tokens`),
    which needs the tokenizer's location. `get_peft_model` freezes the
    model and prepends the trainable prompt to every input.
"""

PROMPT_TUNING_APPLY = """
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    from peftlabs.methods import get_method

    settings = get_method("prompt_tuning").parse_params(config.method_args.get("prompt_tuning"))
    peft_config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit.TEXT if settings.init == "text" else PromptTuningInit.RANDOM,
        prompt_tuning_init_text=settings.init_text if settings.init == "text" else None,
        tokenizer_name_or_path=location,
    )
    model = get_peft_model(base_model, peft_config)
"""

LAB_PROMPT_TUNING = Lab(
    folder="Lab-03-Prompt_Tuning",
    title="Lab 3: Prompt tuning",
    task="causal_lm",
    gpu_model=SMOLLM_GPU,
    mergeable=False,
    quick=SMOLLM_QUICK,
    idea=PROMPT_TUNING_IDEA,
    train_intro="""
Trains 20 virtual-token embeddings in front of the frozen SmolLM2 with the
`transformers` `Trainer` and saves them to `OUTPUT_DIR/prompt_tuning/`.
""",
    inference_intro="""
Loads the soft prompt into a fresh base model with `PeftModel.from_pretrained`
and compares it with the base model alone on held-out test tickets.
""",
    merge_intro="""
Exports the soft prompt unmerged and serves it: a fresh base model with the
prompt attached answers tickets, timed, and must reproduce the training
run's logits.
""",
    methods=[peft_method("prompt_tuning", "Prompt tuning", "prompt_tuning.yaml", CAUSAL_BASE,
                         PROMPT_TUNING_APPLY_TEXT, PROMPT_TUNING_APPLY, no_merge_text=PROMPT_NO_MERGE)],
    **CAUSAL_TASK,
)

PREFIX_TUNING_IDEA = r"""
**Prefix tuning** (Li and Liang 2021, *Prefix-Tuning: Optimizing
Continuous Prompts for Generation*, arXiv:2101.00190) gives every attention
layer $n$ trainable key and value vectors that all real tokens can attend
to:

$$\text{head} = \text{Attention}\big(x W_q,\; [P_k; x W_k],\; [P_v; x W_v]\big).$$

Training the prefixes directly is unstable, so the paper produces them with
a two-layer MLP from a smaller embedding during training
(`prefix_projection`); only the MLP's output matters at inference. With
SmolLM2-135M (30 layers; keys and values 192 wide) and 20 prefix tokens the
prefixes themselves are $20 \cdot 30 \cdot 2 \cdot 192 = 230{,}400$ values;
the embedding and the MLP (hidden size 512) that produce them are
6,012,416 trainable parameters, 4.3% of the model.

- `num_virtual_tokens`: $n$, the prefix length per layer.
- `prefix_projection`: train through the MLP (the paper's setting) or the
  prefixes directly (that is P-tuning v2, Lab 8).
- `encoder_hidden_size`: the MLP's hidden size.

This lab trains a prefix for SmolLM2-135M-Instruct to sort support tickets
into five categories, answering with the category name
(`prefix_tuning.yaml`). Run the notebooks in order: 1 Setup, 2 Train,
3 Inference, 4 Deploy.
"""

PREFIX_TUNING_APPLY_TEXT = """
    ## The prefix: `PrefixTuningConfig` and `get_peft_model`

    `get_peft_model` freezes the model and, at every forward pass, builds
    the key/value prefixes of all layers (through the MLP when
    `prefix_projection=True`) and hands them to the attention layers as
    past keys and values.
"""

PREFIX_TUNING_APPLY = """
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from peftlabs.methods import get_method

    settings = get_method("prefix_tuning").parse_params(config.method_args.get("prefix_tuning"))
    peft_config = PrefixTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=settings.prefix_projection,
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    model = get_peft_model(base_model, peft_config)
"""

LAB_PREFIX_TUNING = Lab(
    folder="Lab-04-Prefix_Tuning",
    title="Lab 4: Prefix tuning",
    task="causal_lm",
    gpu_model=SMOLLM_GPU,
    mergeable=False,
    quick=SMOLLM_QUICK,
    idea=PREFIX_TUNING_IDEA,
    train_intro="""
Trains a 20-token prefix (through its MLP) for the frozen SmolLM2 with the
`transformers` `Trainer` and saves it to `OUTPUT_DIR/prefix_tuning/`.
""",
    inference_intro="""
Loads the prefix into a fresh base model with `PeftModel.from_pretrained`
and compares it with the base model alone on held-out test tickets.
""",
    merge_intro="""
Exports the prefix unmerged and serves it: a fresh base model with the
prefix attached answers tickets, timed, and must reproduce the training
run's logits.
""",
    methods=[peft_method("prefix_tuning", "Prefix tuning", "prefix_tuning.yaml", CAUSAL_BASE,
                         PREFIX_TUNING_APPLY_TEXT, PREFIX_TUNING_APPLY, no_merge_text=PREFIX_NO_MERGE)],
    **CAUSAL_TASK,
)

P_TUNING_IDEA = r"""
**P-tuning** (Liu et al. 2021, *GPT Understands, Too*, arXiv:2103.10385)
also puts virtual tokens in front of the input, like prompt tuning, but
their embeddings come out of a small trainable **prompt encoder** (an MLP
or a bidirectional LSTM followed by an MLP) applied to learned input
embeddings:

$$P = \text{encoder}(h_1, \dots, h_n), \qquad \text{input embeddings} = [P; E(x)].$$

The encoder lets the virtual tokens depend on each other, which the paper
found trains faster and more stably than free embeddings. After training
only $P$ matters. On SmolLM2-135M with 20 virtual tokens and an MLP encoder
of hidden size 128: $20 \cdot 576 = 11{,}520$ embeddings plus
164,672 encoder parameters, 176,192 in all (0.13%).

- `num_virtual_tokens`: $n$.
- `encoder`: `MLP` or `LSTM`.
- `encoder_hidden_size`: the encoder's hidden size.

This lab trains P-tuning on SmolLM2-135M-Instruct to sort support tickets
into five categories, answering with the category name (`p_tuning.yaml`).
Run the notebooks in order: 1 Setup, 2 Train, 3 Inference, 4 Deploy.
"""

P_TUNING_APPLY_TEXT = """
    ## The prompt encoder: `PromptEncoderConfig` and `get_peft_model`

    `encoder_reparameterization_type` picks the MLP or the LSTM. At every
    forward pass the encoder produces the virtual-token embeddings, which
    are put in front of the ticket's embeddings.
"""

P_TUNING_APPLY = """
    from peft import PromptEncoderConfig, TaskType, get_peft_model

    from peftlabs.methods import get_method

    settings = get_method("p_tuning").parse_params(config.method_args.get("p_tuning"))
    peft_config = PromptEncoderConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=settings.num_virtual_tokens,
        encoder_reparameterization_type=settings.encoder.upper(),
        encoder_hidden_size=settings.encoder_hidden_size,
    )
    model = get_peft_model(base_model, peft_config)
"""

LAB_P_TUNING = Lab(
    folder="Lab-07-P_Tuning",
    title="Lab 7: P-tuning",
    task="causal_lm",
    gpu_model=SMOLLM_GPU,
    mergeable=False,
    quick=SMOLLM_QUICK,
    idea=P_TUNING_IDEA,
    train_intro="""
Trains a prompt encoder and its 20 virtual tokens for the frozen SmolLM2
with the `transformers` `Trainer` and saves them to `OUTPUT_DIR/p_tuning/`.
""",
    inference_intro="""
Loads the prompt encoder into a fresh base model with
`PeftModel.from_pretrained` and compares it with the base model alone on
held-out test tickets.
""",
    merge_intro="""
Exports the P-tuning adapter unmerged and serves it: a fresh base model with
the adapter attached answers tickets, timed, and must reproduce the training
run's logits.
""",
    methods=[peft_method("p_tuning", "P-tuning", "p_tuning.yaml", CAUSAL_BASE,
                         P_TUNING_APPLY_TEXT, P_TUNING_APPLY, no_merge_text=PROMPT_NO_MERGE)],
    **CAUSAL_TASK,
)

P_TUNING_V2_IDEA = r"""
**P-tuning v2** (Liu et al. 2022, *P-Tuning v2: Prompt Tuning Can Be
Comparable to Fine-tuning Universally Across Scales and Tasks*,
arXiv:2110.07602) is "deep prompt tuning": trainable prompts in **every
layer**, not only at the input, trained directly without a
reparameterisation MLP, with a plain linear classification head on top. It
targets natural-language understanding, where prompt tuning on small models
fell well short of fine-tuning. In `peft` it is `PrefixTuningConfig` with
`prefix_projection=False`: each layer's attention gets $n$ trainable key and
value vectors,

$$\text{head} = \text{Attention}\big(x W_q,\; [P_k^{(l)}; x W_k],\; [P_v^{(l)}; x W_v]\big),$$

so it trains $n \cdot L \cdot 2 \cdot d$ values. On MiniLM-L6 ($L = 6$,
$d = 384$) with 20 prompt tokens: $20 \cdot 6 \cdot 2 \cdot 384 = 92{,}160$
plus the 1,925 of the 5-label head, 0.41% of the model.

- `num_virtual_tokens`: $n$, the prompt length per layer.

This lab trains deep prompts and the head of MiniLM-L6 to classify support
tickets into five categories (`p_tuning_v2.yaml`), the NLU setting of the
paper. Run the notebooks in order: 1 Setup, 2 Train, 3 Inference, 4 Deploy.
"""

P_TUNING_V2_APPLY_TEXT = """
    ## Deep prompts: `PrefixTuningConfig(prefix_projection=False)`

    Without the projection, the per-layer key/value prompts are the trained
    parameters themselves. `modules_to_save=["classifier"]` makes `peft`
    train the new head in full and save it with the prompts.
"""

P_TUNING_V2_APPLY = """
    from peft import PrefixTuningConfig, TaskType, get_peft_model

    from peftlabs.methods import get_method

    settings = get_method("p_tuning_v2").parse_params(config.method_args.get("p_tuning_v2"))
    peft_config = PrefixTuningConfig(
        task_type=TaskType.SEQ_CLS,
        num_virtual_tokens=settings.num_virtual_tokens,
        prefix_projection=False,
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base_model, peft_config)
"""

P_TUNING_V2_BASE_TIMING_TEXT = """
    ## The same calls without the deep prompts

    A separately loaded base model without prompts shows what the prompts
    add to each answer. Its head is untrained, which does not change the
    cost of a call.
"""

P_TUNING_V2_BASE_TIMING = """
    # NOTE: peft 0.21.2's `model.disable_adapter()` raises AttributeError on prompt-learning
    # classification models (it saves `prepare_inputs_for_generation`, which a BERT classifier
    # lacks), so the base model is loaded on its own here.
    plain = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=len(data.labels), id2label=dict(enumerate(data.labels)), dtype=torch.float32)
    plain.to(device).eval()
    base_seconds = time_calls(lambda: answer(plain, texts[0]), TIMED_CALLS)
    print(f"base alone:   {1000 * sum(base_seconds) / len(base_seconds):.1f} ms per answer")
"""

LAB_P_TUNING_V2 = Lab(
    folder="Lab-08-P_Tuning_v2",
    title="Lab 8: P-tuning v2",
    task="classification",
    gpu_model=ENCODER_GPU,
    mergeable=False,
    quick=MINILM_QUICK,
    idea=P_TUNING_V2_IDEA,
    train_intro="""
Trains deep prompts in all six layers of MiniLM-L6 and its classification
head with the `transformers` `Trainer`, and saves them to
`OUTPUT_DIR/p_tuning_v2/`.
""",
    inference_intro="""
Loads the deep prompts and the head into a fresh MiniLM with
`PeftModel.from_pretrained` and compares it with the untrained base model
on held-out test tickets.
""",
    merge_intro="""
Exports the deep prompts unmerged and serves them: a fresh base model with
the adapter attached classifies tickets, timed, and must reproduce the
training run's logits.
""",
    methods=[peft_method("p_tuning_v2", "P-tuning v2", "p_tuning_v2.yaml", CLASSIFICATION_BASE,
                         P_TUNING_V2_APPLY_TEXT, P_TUNING_V2_APPLY, no_merge_text=PREFIX_NO_MERGE,
                         base_timing_text=P_TUNING_V2_BASE_TIMING_TEXT, base_timing_code=P_TUNING_V2_BASE_TIMING)],
    **CLASSIFICATION_TASK,
)


# ---------------------------------------------------------------------------
# Lab 5: (IA)³
# ---------------------------------------------------------------------------

IA3_IDEA = r"""
**(IA)³**, "Infused Adapter by Inhibiting and Amplifying Inner Activations"
(Liu et al. 2022, *Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning*, arXiv:2205.05638), learns three vectors
per layer that rescale activations elementwise:

$$k' = l_k \odot k, \qquad v' = l_v \odot v, \qquad h_\text{ff}' = W_\text{down}\,(l_\text{ff} \odot \gamma(W_\text{up}\, x)).$$

The vectors start at ones, so training starts at the base model. Only they
change: on SmolLM2-135M (keys and values 192 wide, feed-forward width 1536)
that is $30 \cdot (192 + 192 + 1536) = 57{,}600$ parameters, 0.04% of the
model. Because each vector scales the output (or the input) of one weight
matrix, it folds into that matrix after training: $W' = \text{diag}(l) W$
(or $W \text{diag}(l)$). Merged inference costs nothing extra.

- `target_modules`: the layers whose activations are rescaled
  (`k_proj`, `v_proj`, `down_proj`).
- `feedforward_modules`: the targets whose *input* is rescaled
  (`down_proj`), a subset of `target_modules`.

(IA)³ has no rank or size to choose: its capacity is fixed by the model.

This lab trains (IA)³ on SmolLM2-135M-Instruct to sort support tickets into
five categories, answering with the category name (`ia3.yaml`). Run the
notebooks in order: 1 Setup, 2 Train, 3 Inference, 4 Merge and deploy.
"""

IA3_APPLY_TEXT = """
    ## The scaling vectors: `IA3Config` and `get_peft_model`

    `get_peft_model` wraps each target layer so that its output (or, for the
    feed-forward targets, its input) is multiplied by a trainable vector
    initialised to ones, and freezes everything else.
"""

IA3_APPLY = """
    from peft import IA3Config, TaskType, get_peft_model

    from peftlabs.methods import get_method

    settings = get_method("ia3").parse_params(config.method_args.get("ia3"))
    peft_config = IA3Config(
        task_type=TaskType.CAUSAL_LM,
        target_modules=settings.target_modules,
        feedforward_modules=settings.feedforward_modules,
    )
    model = get_peft_model(base_model, peft_config)
"""

IA3_MERGE_TEXT = """
    ## Merge: `merge_and_unload`

    For each target layer `merge_and_unload` multiplies the weight matrix by
    its vector, rows for output scaling and columns for the feed-forward
    input scaling, and removes the wrapper. The result is a plain
    `transformers` model.
"""

IA3_MERGE = """
    merged = model.merge_and_unload()
    merged.eval()
    print(type(merged).__name__, "- (IA)3 layers left:", sum("ia3" in name for name, _ in merged.named_modules()))
"""

LAB_IA3 = Lab(
    folder="Lab-05-IA3",
    title="Lab 5: (IA)³",
    task="causal_lm",
    gpu_model=SMOLLM_GPU,
    mergeable=True,
    quick=SMOLLM_QUICK,
    idea=IA3_IDEA,
    train_intro="""
Trains the (IA)³ scaling vectors of the frozen SmolLM2 with the
`transformers` `Trainer` and saves them to `OUTPUT_DIR/ia3/`.
""",
    inference_intro="""
Loads the vectors into a fresh base model with `PeftModel.from_pretrained`
and compares it with the base model alone on held-out test tickets.
""",
    merge_intro="""
Folds the scaling vectors into the weight matrices, proves the merged model
computes the same function, saves it as a standalone `transformers` model
and times it against the unmerged one.
""",
    methods=[peft_method("ia3", "(IA)3", "ia3.yaml", CAUSAL_BASE, IA3_APPLY_TEXT, IA3_APPLY,
                         merge_text=IA3_MERGE_TEXT, merge_code=IA3_MERGE)],
    **CAUSAL_TASK,
)


# ---------------------------------------------------------------------------
# Lab 6: BitFit
# ---------------------------------------------------------------------------

BITFIT_IDEA = r"""
**BitFit** (Ben Zaken et al. 2022, *BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models*, arXiv:2106.10199)
trains only the **bias terms** of the model, $b$ in every $Wx + b$ (and the
layer norms' shifts), plus the task head; every weight matrix stays frozen.
There is no new module and no library class: the method is a choice of
which parameters get `requires_grad=True`.

On MiniLM-L6 the biases are 26,112 values; with the 1,925 of the 5-label
head, 28,037 trainable parameters, 0.12% of the model. BitFit needs a model
with biases: BERT-family encoders such as MiniLM have them, Llama-family
models such as SmolLM2 are built without them, which is why this lab uses
MiniLM.

BitFit has no hyperparameters of its own; the learning rate matters most.
The trained biases *are* the model's biases, so "merging" is just saving
the model: a BitFit model has exactly the base model's cost.

This lab trains BitFit on MiniLM-L6 to classify the bundled support tickets
into five categories (`bitfit.yaml`). Run the notebooks in order: 1 Setup,
2 Train, 3 Inference, 4 Merge and deploy.
"""

BITFIT_APPLY_TEXT = """
    ## Freeze everything but the biases

    One loop over `named_parameters`: a parameter is trained when its name
    ends in `bias` or it belongs to the new classification head.
"""

BITFIT_APPLY = """
    for name, parameter in base_model.named_parameters():
        parameter.requires_grad = name.endswith("bias") or name.startswith("classifier.")
    model = base_model
"""

BITFIT_COUNT = """
    trained_names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    print(len(trained_names), "trained tensors, for example:", trained_names[:3])
"""

BITFIT_SAVE_TEXT = """
    ## Save the biases and the head

    The adapter is just the trained tensors, saved with `safetensors` under
    their parameter names. The folder is written under a temporary name and
    renamed when complete.
"""

BITFIT_SAVE = """
    from safetensors.torch import save_file

    from peftlabs.runs import atomic_dir

    ADAPTER_DIR = RUN_DIR / "adapter"
    trained = {name: parameter.detach().contiguous() for name, parameter in model.named_parameters()
               if parameter.requires_grad}
    with atomic_dir(ADAPTER_DIR) as staging:
        save_file(trained, str(staging / "bitfit.safetensors"))
"""

BITFIT_CHECK = """
    assert all(name.endswith("bias") or name.startswith("classifier.") for name in trained)
"""

BITFIT_LOAD_TEXT = (
    "`load_state_dict(..., strict=False)` copies the saved biases and head into a fresh base model; "
    "every weight matrix keeps its pretrained value. Any saved name the model does not have is an error."
)

BITFIT_LOAD = """
    from safetensors.torch import load_file

    loaded = base_model.load_state_dict(load_file(str(ADAPTER_DIR / "bitfit.safetensors")), strict=False)
    assert not loaded.unexpected_keys, f"tensors that do not fit this base model: {loaded.unexpected_keys}"
    model = base_model
"""

BITFIT_MERGE_TEXT = """
    ## Merge: nothing to add

    The loaded model already *is* the merged model: the trained biases were
    copied into its own parameters. The check below still compares the
    model with the saved adapter loaded against the standalone copy, and
    confirms that only biases and the head differ from the pretrained model.
"""

BITFIT_MERGE = """
    merged = model
    pretrained = AutoModelForSequenceClassification.from_pretrained(
        location, num_labels=len(data.labels), dtype=torch.float32).state_dict()
    changed = [name for name, tensor in merged.state_dict().items() if not torch.equal(tensor.cpu(), pretrained[name])]
    print(len(changed), "tensors differ from the pretrained model, for example:", changed[:3])
    assert all(name.endswith("bias") or name.startswith("classifier.") for name in changed)
"""

LAB_BITFIT = Lab(
    folder="Lab-06-BitFit",
    title="Lab 6: BitFit",
    task="classification",
    gpu_model=ENCODER_GPU,
    mergeable=True,
    quick=MINILM_QUICK,
    idea=BITFIT_IDEA,
    train_intro="""
Trains the bias terms and the classification head of MiniLM-L6 with the
`transformers` `Trainer` and saves them to `OUTPUT_DIR/bitfit/`.
""",
    inference_intro="""
Copies the trained biases and head into a fresh MiniLM and compares it with
the untrained base model on held-out test tickets.
""",
    merge_intro="""
Saves the model with its trained biases as a standalone `transformers`
model, checks it against the loaded adapter, and times it.
""",
    methods=[MethodCells(
        name="bitfit", label="BitFit", config_file="bitfit.yaml",
        load_base_code=CLASSIFICATION_BASE,
        apply_text=BITFIT_APPLY_TEXT, apply_code=BITFIT_APPLY,
        count_code=BITFIT_COUNT,
        save_text=BITFIT_SAVE_TEXT, save_code=BITFIT_SAVE, check_code=BITFIT_CHECK,
        load_text=BITFIT_LOAD_TEXT, load_code=BITFIT_LOAD,
        merge_text=BITFIT_MERGE_TEXT, merge_code=BITFIT_MERGE,
    )],
    **CLASSIFICATION_TASK,
)

LABS = [LAB_LORA, LAB_ADAPTERS, LAB_PROMPT_TUNING, LAB_PREFIX_TUNING, LAB_IA3, LAB_BITFIT, LAB_P_TUNING,
        LAB_P_TUNING_V2]
