"""Validated values for every way into atp other than ``atp.attach``: command line flags, recipe
keys, and the files they name.

A :class:`Number` is an argparse ``type=`` (``type=COUNT``) that the recipe loader and
:class:`atp.components.budget_loss.Budget` use too, so the three refuse the same values: wrong
types, casts that would truncate (``2.7`` or ``"2.5"`` for a count), values out of range, NaN and
infinities. :func:`read_text`, :func:`read_yaml` and :func:`read_json` read a file a flag names
and raise a ``ValueError`` that names the file and says what to do, never a parser's traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path


def plain_number(value: object) -> int | float | None:
    """``value`` as a plain int or float; None when it is not a real number.

    Python, numpy and 0-dim torch numbers count (integral ones become ints); bools and bool
    tensors do not, so ``True`` is never read as 1.
    """
    if not isinstance(value, numbers.Number) and getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # a 0-dim tensor or array
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _parse(text: str) -> int | float | None:
    """The number a string spells (``"4"`` -> 4, ``"2.5"`` -> 2.5, ``"nan"`` -> nan), else None."""
    for kind in (int, float):
        try:
            return kind(text.strip())
        except ValueError:
            continue
    return None


@dataclass(frozen=True)
class Number:
    """An int or float in a range: the ``type=`` of a number flag, and its check elsewhere.

    ``kind`` is ``int`` (no fractions, not even ``2.0``) or ``float``; ``low`` and ``high`` bound
    it (``low_open`` / ``high_open``: the bound itself is out); ``also`` lists values allowed
    outside the range (``-1`` for "not set"), with ``meaning`` saying what they mean. Every value
    is finite. Text (a flag) and numbers (a recipe's YAML, Python) are read alike; bools never.
    """

    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    also: tuple = ()
    meaning: str = ""

    def expected(self) -> str:
        """``an int >= 1``, ``a finite number in (0, 1)``, ... (with ``also`` and its meaning)."""
        noun = "an int" if self.kind is int else "a finite number"
        text = f"{noun} {interval(self.low, self.high, self.low_open, self.high_open)}".rstrip()
        return (
            text
            + "".join(f", or {value}" for value in self.also)
            + (f" ({self.meaning})" if self.meaning else "")
        )

    def check(self, value: object, name: str = "", text: bool = True) -> int | float:
        """``value`` as the number it must be; ``TypeError`` / ``ValueError`` naming ``name``,
        the value given and what to give instead. ``text``: a string spelling a number counts
        (flags, recipes); the Python API passes False and gets numbers only."""
        number = _parse(value) if isinstance(value, str) and text else plain_number(value)
        if number is None:
            self._fail(name, value, ValueError if isinstance(value, str) and text else TypeError)
        if number in self.also and (self.kind is float or isinstance(number, int)):
            return number
        if not math.isfinite(number):
            self._fail(name, value)
        if self.kind is int and not isinstance(number, int):
            whole = math.floor(number)
            hint = f"a whole number such as {whole} or {whole + 1}" if whole != number else f"{whole}"
            self._fail(name, value, hint=f"; give {hint}, without a decimal point (nothing is rounded)")
        low, high = self.low, self.high
        if (low is not None and (number <= low if self.low_open else number < low)) or (
            high is not None and (number >= high if self.high_open else number > high)
        ):
            self._fail(name, value)
        return self.kind(number)

    def _fail(self, name: str, value: object, error=ValueError, hint: str = ""):
        given = value if isinstance(value, str) and error is ValueError else repr(value)
        if isinstance(value, bool):
            hint = "; give a number, not true/false"
        elif isinstance(value, str) and error is TypeError and _parse(value) is not None:  # Python: text
            hint = f"; give the number itself ({value.strip()}), not a string"
        elif not isinstance(value, (str, numbers.Real)):
            hint = f"; give one number, not a {type(value).__name__}"
        raise error(f"{name + ' ' if name else ''}must be {self.expected()}, got {given}{hint}")

    def __call__(self, value: object) -> int | float:
        """The argparse ``type=``: argparse then reports ``argument --flag: must be ..., got ...``."""
        try:
            return self.check(value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None


def interval(low=None, high=None, low_open: bool = False, high_open: bool = False) -> str:
    """The text of a range for messages: ``in (0, 1]``, ``> 0``, ``>= 2``; empty when unbounded."""
    low_text, high_text = (f"{bound:g}" if isinstance(bound, float) else str(bound) for bound in (low, high))
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low_text}, {high_text}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low_text}"
    return f"{'<' if high_open else '<='} {high_text}" if high is not None else ""


class Warmup(Number):
    """Warm-up: a ratio of the steps in [0, 1), or a whole number of steps (never truncated)."""

    def check(self, value: object, name: str = "", text: bool = True) -> int | float:
        number = super().check(value, name, text)
        if number >= 1 and number != int(number):
            whole = int(number)
            raise ValueError(
                f"{name + ' ' if name else ''}must be a ratio in [0, 1) or a whole number of steps, got "
                f"{value}; give {whole} or {whole + 1} steps, or a ratio such as 0.03"
            )
        return number


COUNT = Number(int, low=1)  # batch size, steps, tokens, repeats, processes ...
NON_NEGATIVE_COUNT = Number(int, low=0)  # data loader workers, warm-up rounds
LAYER = Number(int, low=0)  # a decoder layer index (0 only for policies acting before the LM)
SEED = Number(int, low=0, high=2**32 - 1)  # numpy's seeds, which the Trainer sets too
MAX_STEPS = Number(int, low=1, also=(-1,), meaning="-1: train for --epochs")
POSITIVE = Number(float, low=0.0, low_open=True)  # epochs, temperatures, token targets
NON_NEGATIVE = Number(float, low=0.0)  # loss weights, learning rates, token counts
OPEN_FRACTION = Number(float, low=0.0, high=1.0, low_open=True, high_open=True)  # thresholds, fractions
WARMUP = Warmup(float, low=0.0)


def at_least(low: int) -> Number:
    """An int count of at least ``low`` (``--size`` of at least 16 pixels, ...)."""
    return Number(int, low=low)


# the files that flags and recipes name ---------------------------------------------------------
def read_text(path: str | Path, what: str) -> str:
    """The UTF-8 text of the file ``path`` (a ``what``: "recipe", "accelerate config", ...);
    a ``ValueError`` naming it when it is missing, a folder or not text."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{what} {file} is a folder; give the path of the {what} file itself")
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{what} {file} does not exist; check the path (relative to {Path.cwd()})") from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} {file} is not UTF-8 text (byte {error.start}); give a text file, saved as UTF-8"
        ) from None
    except OSError as error:
        raise ValueError(
            f"{what} {file} cannot be read ({error.strerror or error}); check its permissions"
        ) from None


def read_yaml(path: str | Path, what: str) -> dict:
    """The mapping a YAML file holds (an empty file is ``{}``); errors name the file and line."""
    import yaml

    text = read_text(path, what)
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{what} {path} is not valid YAML{where}: {problem}; fix the file") from None
    return _mapping(path, what, {} if values is None else values, "key: value lines")


def read_json(path: str | Path, what: str) -> dict:
    """The object a JSON file holds; errors name the file and line."""
    text = read_text(path, what)
    try:
        values = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} {path} is not valid JSON at line {error.lineno}, column {error.colno}: {error.msg}; "
            "fix the file"
        ) from None
    return _mapping(path, what, values, "a JSON object")


def _mapping(path, what: str, values: object, form: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{what} {path} holds a {type(values).__name__}; it must be a mapping ({form})")
    return values
