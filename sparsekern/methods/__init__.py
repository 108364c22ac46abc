"""Sparse-training methods, by name. Each: the state a layer holds, the op its forward calls."""
from .asl import ASL
from .base import FixedMask, MagnitudeMethod, MaskMethod, Method
from .feather import Feather
from .gmp import GMP
from .st3 import ST3, ST3Sigma
from .nm import NM
from .starfire import Starfire
from .str_ import STR

METHODS: dict[str, type[Method]] = {m.name: m for m in (STR, ST3, ST3Sigma, Feather, GMP, ASL, Starfire, NM)}


def method_class(name: str) -> type[Method]:
    """The Method class registered as ``name``; ValueError listing the known ones otherwise."""
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def make_method(method: "str | Method", **options) -> Method:
    """A Method from its name and options, or ``method`` itself if it already is one."""
    if isinstance(method, Method):
        if options:
            raise TypeError(f"options {sorted(options)} given with a Method instance")
        return method
    return method_class(method)(**options)


__all__ = ["METHODS", "Method", "MagnitudeMethod", "MaskMethod", "FixedMask", "STR", "ST3", "ST3Sigma", "Feather", "GMP", "ASL",
           "Starfire", "NM", "method_class", "make_method"]
