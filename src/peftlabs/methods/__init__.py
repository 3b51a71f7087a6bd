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


def method_names() -> list[str]:
    return list(_REGISTRY)


def get_method(name: str) -> Method:
    """Return an instance of the named method, or raise UserError listing the known ones."""
    try:
        return _REGISTRY[name]()
    except KeyError:
        known = ", ".join(_REGISTRY)
        raise UserError(f"unknown method '{name}': choose one of {known}") from None
