"""The method registry: name -> Method class.

Adding a method means writing one module with a Method subclass and adding
one line to ``_REGISTRY`` below; the training loop, CLI flags, saving and
tests pick it up from here.
"""

from __future__ import annotations

from peftlabs.errors import UserError
from peftlabs.methods.base import Method
from peftlabs.methods.bitfit import BitFit
from peftlabs.methods.bottleneck import BottleneckAdapters
from peftlabs.methods.full import FullFineTuning
from peftlabs.methods.ia3 import Ia3
from peftlabs.methods.lora import Lora
from peftlabs.methods.p_tuning import PTuning
from peftlabs.methods.p_tuning_v2 import PTuningV2
from peftlabs.methods.prefix_tuning import PrefixTuning
from peftlabs.methods.prompt_tuning import PromptTuning
from peftlabs.methods.qlora import QLora

_REGISTRY: dict[str, type[Method]] = {
    Lora.name: Lora,
    QLora.name: QLora,
    BottleneckAdapters.name: BottleneckAdapters,
    PromptTuning.name: PromptTuning,
    PrefixTuning.name: PrefixTuning,
    Ia3.name: Ia3,
    BitFit.name: BitFit,
    PTuning.name: PTuning,
    PTuningV2.name: PTuningV2,
}

# Reachable by name like a method, but not a PEFT method: not in method_names().
_BASELINES: dict[str, type[Method]] = {
    FullFineTuning.name: FullFineTuning,
}


def method_names() -> list[str]:
    return list(_REGISTRY)


def baseline_names() -> list[str]:
    """Names of the non-PEFT baselines (full fine-tuning) that train like a method."""
    return list(_BASELINES)


def get_method(name: str) -> Method:
    """Return an instance of the named method or baseline, or raise UserError listing the known ones."""
    if name in _BASELINES:
        return _BASELINES[name]()
    try:
        return _REGISTRY[name]()
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise UserError(f"unknown method '{name}': choose one of {known}, or 'full' for full fine-tuning") from None


def count_on_bundled_models() -> dict[str, dict[str, str]]:
    """Apply every method with its defaults to both bundled models and count trainable parameters.

    The result is cached in the peftlabs cache folder, keyed by the library
    versions, because building each model takes a few seconds.
    """
    import json

    from peftlabs.models import cache_dir, count_parameters, load_base_model, load_tokenizer, resolve_model
    from peftlabs.data import DEMO_LABELS
    from peftlabs.versions import library_versions

    versions = library_versions()
    cache = cache_dir() / "method_counts.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("versions") == versions:
            return stored["counts"]

    counts: dict[str, dict[str, str]] = {name: {} for name in _REGISTRY}
    for alias, task in (("smollm2-135m-instruct", "causal_lm"), ("minilm-l6", "classification")):
        location = resolve_model(alias)
        tokenizer = load_tokenizer(location)
        for name in _REGISTRY:
            method = get_method(name)
            params = method.parse_params({})
            labels = DEMO_LABELS if task == "classification" else None
            try:
                base = method.load_base(location, task, labels, tokenizer, params)
                from peftlabs.models import classification_head_name

                head = classification_head_name(base) if task == "classification" else None
                model = method.apply(base, task, params, head)
            except UserError as error:
                counts[name][alias] = f"not applicable ({str(error).split(':')[0]})"
                continue
            trainable, total = count_parameters(model)
            counts[name][alias] = f"{trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"versions": versions, "counts": counts}, indent=2))
    return counts
