"""Labels as inputs give them: integers, class names, or nothing usable.

A column (or field) of labels is read one of two ways, decided by all of its
values together, never by the first one alone:

- every present value looks like an integer (``3``, ``"3"``, ``3.0``,
  ``"3.0"``): integer labels, classes ``"0".."max"``;
- every present value is a name: classes are the sorted set of names.

A value that is absent (missing key, ``None``, ``NaN``, an empty string) is
not a label: its row is rejected with the reason, and the others are kept.
Mixing the two kinds, a non-whole number or a negative integer is an error
that names the first offending row: guessing would silently renumber every
class.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class LabelError(ValueError):
    """Labels that cannot be read as one consistent kind; the message names a row."""


@dataclass(frozen=True, slots=True)
class Parsed:
    """One raw label value: an integer, a name, or absent (REASON says why)."""

    value: int | str | None
    reason: str = ""


def parse_value(raw: Any) -> Parsed:
    """Classify one raw label value (see the module doc); never raises."""
    if raw is None:
        return Parsed(None, "no label")
    if isinstance(raw, bool):  # a JSON true/false is neither a class id nor a name
        return Parsed(None, f"label {raw!r} is a boolean, not an integer or a class name")
    if isinstance(raw, int | np.integer):
        return Parsed(int(raw))
    if isinstance(raw, float | np.floating):
        if math.isnan(raw):
            return Parsed(None, "no label (NaN)")
        return Parsed(int(raw)) if float(raw).is_integer() else Parsed(float(raw))
    text = str(raw).strip()
    if not text:
        return Parsed(None, "empty label")
    if _INT.fullmatch(text):
        return Parsed(int(text))
    if _FLOAT.fullmatch(text):
        number = float(text)
        return Parsed(int(number)) if number.is_integer() else Parsed(number)
    return Parsed(text)


@dataclass(frozen=True, kw_only=True)
class Labels:
    """A resolved label column: the class map and one label per row (None: rejected)."""

    classes: dict[str, int]
    labels: list[int | None]
    reasons: list[str]  # why each None label was rejected ("" for kept rows)


def resolve(values: list[Any], where: list[str]) -> Labels:
    """Turn raw label VALUES (row I described by WHERE[I]) into integer labels.

    Raises LabelError for mixed kinds, non-whole numbers and negative integers.
    """
    parsed = [parse_value(v) for v in values]
    present = [(i, p.value) for i, p in enumerate(parsed) if p.value is not None]
    for i, v in present:
        if isinstance(v, float):
            raise LabelError(f"{where[i]}: label {v!r} is not a whole number")
    ints = [(i, v) for i, v in present if isinstance(v, int)]
    names = [(i, v) for i, v in present if isinstance(v, str)]
    if ints and names:
        first_int, first_name = ints[0], names[0]
        odd = max(first_int, first_name)  # the later of the two first rows breaks the pattern
        other = min(first_int, first_name)
        raise LabelError(
            f"{where[odd[0]]}: label {values[odd[0]]!r} mixes with {where[other[0]]}'s "
            f"{values[other[0]]!r}: labels must be all integers or all class names"
        )
    if ints:
        negative = next(((i, v) for i, v in ints if v < 0), None)
        if negative is not None:
            raise LabelError(f"{where[negative[0]]}: label {negative[1]} is negative")
        top = max(v for _, v in ints)
        classes = {str(k): k for k in range(top + 1)}
    else:
        classes = {name: k for k, name in enumerate(sorted({v for _, v in names}))}
    labels: list[int | None] = []
    for p in parsed:
        if p.value is None:
            labels.append(None)
        else:
            labels.append(p.value if isinstance(p.value, int) else classes[p.value])
    return Labels(classes=classes, labels=labels, reasons=[p.reason for p in parsed])
