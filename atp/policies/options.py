"""Option checks shared by the policies: plain numbers, ranges and messages that say what to give."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NoReturn

import torch

from atp.arguments import interval, plain_number
from atp.plugins import registry


def plain_options(value: object) -> object:
    """``value`` with every scalar (numpy, 0-dim tensor) as a plain int, float or bool, inside
    lists, tuples and dicts too, so options save as JSON; anything else is left as it is."""
    if isinstance(value, dict):
        return {key: plain_options(item) for key, item in value.items()}
    if type(value) in (list, tuple):
        return type(value)(plain_options(item) for item in value)
    if getattr(value, "ndim", None) == 0 and str(getattr(value, "dtype", "")) in ("bool", "torch.bool"):
        return bool(value.item())  # a numpy or 0-dim torch bool
    number = plain_number(value)
    return value if number is None or isinstance(value, bool) else number


def described(value: object) -> str:
    """``0.5``, ``None``, ``'0.5' (type str)``: the value (shortened) and, unless a number, its type."""
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value) if len(repr(value)) <= 80 else repr(value)[:76] + " ..."
    return (
        text if value is None or plain_number(value) is not None else f"{text} (type {type(value).__name__})"
    )


@dataclass(frozen=True)
class OptionCheck:
    """Checks a policy's options as it is built and returns them as plain Python values.

    Each method raises a ``TypeError`` (wrong type) or ``ValueError`` (out of range) that names
    the policy, the option, the value given and what to give instead.
    """

    policy: str

    def fail(self, name: str, value: object, expected: str, error=ValueError, example: str = "") -> NoReturn:
        hint = f"; e.g. {example}" if example else ""
        if not example and isinstance(value, str) and _parse_number(value) is not None:
            hint = f"; give the number itself ({name}={value.strip()}), not a string"
        raise error(f"policy {self.policy!r}: option {name} must be {expected}, got {described(value)}{hint}")

    def real(self, name: str, value, low=None, high=None, low_open=False, high_open=False) -> float:
        """A finite number in the range (ints, floats, numpy and 0-dim tensor numbers)."""
        number = plain_number(value)
        expected = f"a number {interval(low, high, low_open, high_open) or '(finite)'}"
        if number is None:
            self.fail(name, value, expected, TypeError)
        if not math.isfinite(number):
            self.fail(
                name, value, f"a finite number {interval(low, high, low_open, high_open) or '(finite)'}"
            )
        if (low is not None and (number <= low if low_open else number < low)) or (
            high is not None and (number >= high if high_open else number > high)
        ):
            self.fail(name, value, expected)
        return float(number)

    def integer(self, name: str, value, low=None, high=None) -> int:
        """An int in ``[low, high]`` (numpy and 0-dim tensor integers too; not bools, not 2.0)."""
        number = plain_number(value)
        expected = f"an int {interval(low, high) or '(finite)'}"
        if not isinstance(number, int):
            self.fail(name, value, expected, TypeError)
        if (low is not None and number < low) or (high is not None and number > high):
            self.fail(name, value, expected)
        return number

    def flag(self, name: str, value) -> bool:
        """True or False (numpy and 0-dim tensor bools too; not 0 or 1)."""
        plain = plain_options(value)
        if not isinstance(plain, bool):
            self.fail(name, value, "True or False", TypeError)
        return plain

    def component(self, name: str, value, kind: str):
        """The factory registered as ``kind`` ``value`` (a built-in or a plugin's)."""
        components = registry()
        names = components.names(kind)
        if value not in names:  # `atp plugins` lists them with the packages they come from
            expected = f"a registered {kind} name, one of: {', '.join(names)} (see `atp plugins`)"
            self.fail(name, value, expected, ValueError if isinstance(value, str) else TypeError)
        return components.get(kind, value).factory

    def keywords(self, name: str, value, factory) -> dict:
        """Keyword arguments for ``factory`` (None: none); names it does not take are refused."""
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
            self.fail(name, value, "a dict of keyword arguments", TypeError, f"{name}={{'key': value}}")
        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # no signature to read: the factory checks its own arguments
            params = {"**kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [] if takes_any else sorted(set(value) - set(params))
        if unknown:
            takes = ", ".join(params) or "nothing"
            raise ValueError(
                f"policy {self.policy!r}: option {name} has {', '.join(unknown)}, which "
                f"{getattr(factory, '__name__', factory)} does not take; it takes: {takes}"
            )
        return dict(value)

    def per_layer(self, name: str, value, layers: tuple[int, ...], what: str, entry) -> list:
        """A list or tuple with one ``entry(f"{name}[i]", value[i])`` per ATP layer, as a list."""
        count = len(layers)
        if value is None:
            raise ValueError(
                f"the {self.policy!r} policy needs {name}=[...], {what} per ATP layer "
                f"({count} layers: {list(layers)})"
            )
        if not isinstance(value, (list, tuple)):
            scalar = _parse_number(value) if isinstance(value, str) else plain_number(value)
            example = f"{name}={[scalar] * count}" if scalar is not None else f"{name}=[...]"
            if getattr(value, "ndim", None) == 1 and len(value) == count:  # an array: its list
                example = f"{name}={plain_options(value.tolist())}"
            expected = f"a list with {what} per ATP layer (layers {list(layers)})"
            self.fail(name, value, expected, TypeError, example)
        if len(value) != count:
            raise ValueError(
                f"policy {self.policy!r}: option {name} has {len(value)} entries but there are {count} "
                f"ATP layers ({list(layers)}); give {what} per layer"
            )
        return [entry(f"{name}[{index}]", item) for index, item in enumerate(value)]


def _parse_number(text: str) -> int | float | None:
    """The finite number a string spells (``"4"`` -> 4, ``"0.5"`` -> 0.5), else None."""
    for kind in (int, float):
        try:
            number = kind(text)
        except ValueError:
            continue
        return number if math.isfinite(number) else None
    return None
