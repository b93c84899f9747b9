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


# -- where labels come from: a sample's .cls, a field of its .json, a table column -------

LABEL_HINT_FIELDS = ("label", "labels", "class", "cls", "category", "target", "class_id",
                     "label_id", "class_name")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LabelSpec:
    """``--label``, ``--classes-from`` and ``--unlabelled`` of one pack or adopt.

    KIND is ``cls`` (a tar sample's ``.cls`` member, any case), ``json`` (the field
    at PATH of its ``.json`` member, dotted for nested fields), ``column`` (the
    column PATH of a CSV/JSONL/Parquet manifest) or ``none`` (unlabelled: label -1).
    CLASSES, from ``--classes-from``, fixes the class names and their order.
    """

    kind: str
    path: str = ""
    classes: tuple[str, ...] | None = None
    classes_from: str | None = None

    @property
    def labelled(self) -> bool:
        return self.kind != "none"

    def describe(self) -> str:
        return {"cls": ".cls member", "json": f".json field {self.path}",
                "column": f"column {self.path}", "none": "no label"}[self.kind]  # fmt: skip


def parse_spec(
    text: str | None, *, unlabelled: bool = False, classes_from: str | None = None,
    table: bool = False, storage_options: dict[str, Any] | None = None,
) -> LabelSpec:  # fmt: skip
    """``--label`` TEXT (None: the default, ``cls`` for tars and column ``label`` for a
    table) with ``--unlabelled`` and ``--classes-from``; ValueError for a bad combination."""
    if unlabelled:
        if text or classes_from:
            raise ValueError("--unlabelled takes neither --label nor --classes-from")
        return LabelSpec(kind="none")
    classes = read_class_list(classes_from, storage_options) if classes_from else None
    text = (text or "").strip()
    if table:
        column = text.removeprefix("column:") if text else "label"
        if not column or text.startswith(("json:", "cls")):
            raise ValueError(f"--label {text!r}: a CSV/JSONL/Parquet SRC takes a column name")
        return LabelSpec(kind="column", path=column, classes=classes, classes_from=classes_from)
    if not text or text.lower() == "cls":
        return LabelSpec(kind="cls", classes=classes, classes_from=classes_from)
    if text.startswith("json:") and text[5:].strip(". "):
        return LabelSpec(kind="json", path=text[5:], classes=classes, classes_from=classes_from)
    raise ValueError(f"--label {text!r}: use cls (the .cls member) or json:FIELD (e.g. json:label)")


def read_class_list(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, ...]:
    """Class names in label order from a file: one name per line, a JSON list, or a JSON
    object {name: label} whose labels are 0..N-1."""
    import json

    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8", **(storage_options or {})) as f:
            text = f.read()
    except FileNotFoundError:
        raise ValueError(f"--classes-from {url}: not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--classes-from {url}: cannot be read ({exc})") from None
    stripped = text.strip()
    names: list[str]
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--classes-from {url}: not valid JSON ({exc.msg})") from None
        if isinstance(data, dict):
            by_label = sorted((v, k) for k, v in data.items() if isinstance(v, int))
            if [v for v, _ in by_label] != list(range(len(data))):
                raise ValueError(f"--classes-from {url}: labels must be 0..N-1, one per name")
            names = [k for _, k in by_label]
        else:
            names = [str(x) for x in data]
    else:
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not names:
        raise ValueError(f"--classes-from {url}: lists no class")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ValueError(f"--classes-from {url}: class {dup!r} is listed twice")
    return tuple(names)


def field(meta: Any, path: str) -> Any:
    """META's value at the dotted PATH (``a.b`` -> meta["a"]["b"]), or None."""
    for part in path.split("."):
        if not isinstance(meta, dict) or part not in meta:
            return None
        meta = meta[part]
    return meta


def resolve_spec(values: list[Any], where: list[str], spec: LabelSpec) -> Labels:
    """Labels of VALUES under SPEC: through its class list if it has one (an integer is
    an index into it, a name must be in it; other rows are rejected), else as
    :func:`resolve` decides."""
    if not spec.labelled:
        return Labels(classes={}, labels=[-1] * len(values), reasons=[""] * len(values))
    if spec.classes is None:
        return resolve(values, where)
    index = {name: i for i, name in enumerate(spec.classes)}
    labels: list[int | None] = []
    reasons: list[str] = []
    for raw in values:
        p = parse_value(raw)
        if p.value is None:
            labels.append(None)
            reasons.append(p.reason)
        elif isinstance(p.value, int) and 0 <= p.value < len(spec.classes):
            labels.append(p.value)
            reasons.append("")
        elif isinstance(p.value, str) and p.value in index:
            labels.append(index[p.value])
            reasons.append("")
        else:
            labels.append(None)
            reasons.append(f"label {raw!r} is not a class of --classes-from {spec.classes_from}")
    return Labels(classes=index, labels=labels, reasons=reasons)
