"""The method registry: name -> Method class.

Adding a method means writing one module with a Method subclass and adding
one line to ``_REGISTRY`` below; the training loop, CLI flags, saving and
tests pick it up from here.
"""

from __future__ import annotations

from peftlabs.errors import UserError
from peftlabs.methods.base import Method
from peftlabs.methods.lora import Lora

_REGISTRY: dict[str, type[Method]] = {
    Lora.name: Lora,
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
