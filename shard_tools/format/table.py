"""The per-shard table of a manifest, held and stored as columns.

A dataset of 10^5 shards described shard by shard in JSON is a 23 MB
``manifest.json`` that takes seconds to parse and about 800 bytes of memory per
shard once parsed, before the first sample is read. So format 3 keeps only the
dataset's totals in ``manifest.json`` and puts the table beside it in
``manifest.shards``: one column after another, each described in
``manifest.json`` by its encoding, byte range and sha256.

Encodings: ``int64`` (little-endian), ``lines`` (UTF-8 values joined by
``\\n``; ``""`` stands for None where a field may be None) and ``index_name``
(every value is :func:`~shard_tools.format.names.index_name` of the shard's
name, stored as nothing). A reader fetches a column when it first needs it, with
one ranged read, checks its hash and validates it as a whole (regular
expressions over the column, not a Python loop per shard); the loader reads the
counts and names and never the hashes or first/last keys.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from shard_tools.format.names import index_name, shard_name

TABLE_NAME = "manifest.shards"
INT_COLUMNS = ("samples", "bytes")
TEXT_COLUMNS = ("name", "sha256", "index", "first_key", "last_key", "etag", "labels")
NULLABLE = ("index", "etag", "labels")  # "" in the column is None in ShardInfo
COLUMNS = INT_COLUMNS + TEXT_COLUMNS

# A shard name is a relative path below the dataset (or base_url): a line of the
# name column that matches any of these is refused.
_BAD_PATH = re.compile(rb"^$|://|\\|^/|//|/$|(?:^|/)\.{1,2}(?:/|$)|[\x00-\x09\x0b-\x1f]", re.M)
# Index and labels files are plain names in the manifest's folder ("" = none).
_BAD_PLAIN = re.compile(rb"[/\\]|^\.\.|^\.$|[\x00-\x09\x0b-\x1f]", re.M)


def _may_be_bad(blob: bytes, path: bool, ends: np.ndarray | None = None) -> bool:
    """A cheap vectorised pre-test over the column's bytes (the regex with its
    alternatives is far slower): False means no line can match the regex. ENDS: where
    each line ends (the TextColumn's offsets), to not search the newlines again."""
    a = np.frombuffer(blob, dtype=np.uint8)
    if not len(a) or b"\\" in blob or np.any((a < 32) & (a != 10)):
        return True
    starts = (ends[:-1] if ends is not None else np.flatnonzero(a == 10)) + 1  # line starts
    firsts = np.append(a[starts[starts < len(a)]], a[0])
    if np.any(firsts == ord(".")) or (path and np.any((firsts == 10) | (firsts == ord("/")))):
        return True
    if not path:
        return b"/" in blob
    if a[-1] in (10, ord("/")) or b"/" not in blob:
        return bool(a[-1] in (10, ord("/")))
    after = np.flatnonzero(a[:-1] == ord("/")) + 1  # the byte after every "/" but a last one
    return bool(np.any((a[after] == ord("/")) | (a[after] == ord(".")) | (a[after] == 10)))


class ManifestError(ValueError):
    """A manifest (or its shard table) that is missing, malformed, damaged or of an
    unknown format version."""


TableError = ManifestError


def _line_at(blob: bytes, pos: int) -> str:
    a = blob.rfind(b"\n", 0, pos) + 1
    b = blob.find(b"\n", pos)
    return blob[a : b if b >= 0 else len(blob)].decode("utf-8", "replace")


class _Indexed(Sequence):
    """A sequence of ``count`` values computed one at a time by ``_at(i)``; slices and
    negative positions as for a list."""

    count: int

    def _at(self, i: int):
        raise NotImplementedError

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._at(j) for j in range(*i.indices(self.count))]
        if i < 0:
            i += self.count
        if not 0 <= i < self.count:
            raise IndexError(i)
        return self._at(i)


class TextColumn(_Indexed):
    """N strings kept as one UTF-8 blob and where each ends (none when every one is
    empty); decoded one at a time on access."""

    def __init__(self, blob: bytes, count: int) -> None:
        self.blob = blob
        self.count = count
        if count == 0:
            if blob:
                raise TableError("a text column of 0 values holds bytes")
            self.ends = np.zeros(0, dtype=np.int64)
            return
        if blob == b"\n" * (count - 1):  # every value empty (no index, no labels): no offsets
            self.ends = None
            return
        cuts = np.flatnonzero(np.frombuffer(blob, dtype=np.uint8) == 10)
        if len(cuts) != count - 1:
            raise TableError(f"a text column holds {len(cuts) + 1} values, the table {count}")
        dtype = np.int32 if len(blob) < 2**31 else np.int64
        self.ends = np.append(cuts, len(blob)).astype(dtype)

    @classmethod
    def of(cls, values: Sequence[str]) -> TextColumn:
        return cls("\n".join(values).encode("utf-8"), len(values))

    def _at(self, i: int) -> str:
        if self.ends is None:
            return ""
        a = int(self.ends[i - 1]) + 1 if i else 0
        return self.blob[a : int(self.ends[i])].decode("utf-8")

    def __iter__(self) -> Iterator[str]:
        return iter(self.blob.decode("utf-8").split("\n") if len(self) else [])

    def text(self) -> str:
        return self.blob.decode("utf-8")


class NumberedColumn(_Indexed):
    """The names ``shard pack`` gives (``shard-000000.tar``, ...), stored as nothing."""

    def __init__(self, count: int) -> None:
        self.count = count

    def _at(self, i: int) -> str:
        return shard_name(i)


class DerivedColumn(_Indexed):
    """A column stored as a rule: every value is a function of the shard's name."""

    def __init__(self, names: Sequence[str], rule) -> None:
        self.names, self.rule, self.count = names, rule, len(names)

    def _at(self, i: int) -> str:
        return self.rule(self.names[i])


def _check_column(name: str, col) -> None:
    """Refuse a column of values the format does not allow, naming the first one."""
    if name in INT_COLUMNS:
        if len(col) and int(col.min()) < 0:
            at = int(np.flatnonzero(col < 0)[0])
            raise TableError(f"shard {at}: negative {name}")
        return
    if not isinstance(col, TextColumn) or name not in ("name", "index", "labels") or not len(col):
        return
    blob = col.blob  # checked as bytes: no str copy of a column of 10^5 names
    path = name == "name"
    if col.ends is None and not path:  # every value empty: no index / no labels files
        return
    suspect = _may_be_bad(blob, path, col.ends)
    bad = (_BAD_PATH if path else _BAD_PLAIN).search(blob) if suspect else None
    if bad is None:
        return
    value = _line_at(blob, bad.start())
    if name == "name":
        raise TableError(
            "shard name must be a plain file name or a relative path below the dataset, "
            f"got {value!r}"
        )
    raise TableError(f"{name} name must be a plain file name, got {value!r}")


class ShardTable(_Indexed):
    """The shards of a manifest: ``table[i]`` is a :class:`ShardInfo`; columns as arrays.

    Built from ShardInfo rows (writers, manifests of formats 1 and 2) or opened
    lazily from a ``manifest.shards`` file (format 3): a column is read the first
    time it is used.
    """

    def __init__(self, count: int, columns: dict[str, Any], source=None) -> None:
        self.count = count
        self._cols = dict(columns)
        self._source = source  # (fs, path, spec by column, what) for lazy columns
        self._lock = threading.Lock()

    # -- building ---------------------------------------------------------------
    @classmethod
    def of(cls, shards) -> ShardTable:
        if isinstance(shards, ShardTable):
            return shards
        rows = list(shards)
        cols: dict[str, Any] = {
            c: np.array([getattr(s, c) for s in rows], dtype=np.int64) for c in INT_COLUMNS
        }
        for c in TEXT_COLUMNS:
            cols[c] = TextColumn.of([_text(getattr(s, c)) for s in rows])
        return cls(len(rows), cols)

    @classmethod
    def open(cls, fs, path: str, spec: dict[str, Any], *, what: str) -> ShardTable:
        """The table in file PATH of FS as SPEC (``manifest.json``'s ``shard_table``) says."""
        try:
            count = int(spec["count"])
            columns = spec["columns"]
            missing = [c for c in COLUMNS if c not in columns]
        except (KeyError, TypeError, ValueError):
            raise TableError(f"{what}: shard_table must give count and columns") from None
        if missing:
            raise TableError(f"{what}: shard_table lacks columns {missing}")
        return cls(count, {}, source=(fs, path, columns, what))

    # -- columns ----------------------------------------------------------------
    def column(self, name: str):
        """Column NAME: an int64 array, or a sequence of str (None where "" for nullable)."""
        col = self._cols.get(name)
        if col is not None:
            return col
        with self._lock:
            col = self._cols.get(name)
            if col is None:
                col = self._load(name)
                self._cols[name] = col
        return col

    def _load(self, name: str):
        if self._source is None:
            raise KeyError(name)
        fs, path, columns, what = self._source
        spec = columns[name]
        enc = spec.get("encoding") if isinstance(spec, dict) else None
        if enc == "index_name":
            return DerivedColumn(self.column("name"), index_name)
        if enc == "shard_name" and name == "name":
            return NumberedColumn(self.count)
        if enc not in ("int64", "lines"):
            raise TableError(f"{what}: column {name} has unknown encoding {enc!r}")
        start, length = int(spec["offset"]), int(spec["length"])
        try:
            raw = fs.cat_file(path, start=start, end=start + length) if length else b""
        except FileNotFoundError:
            raise TableError(
                f"{what} lists its shards in {path.rsplit('/', 1)[-1]}, which is missing beside "
                "it: copy the dataset folder whole"
            ) from None
        if len(raw) != length or hashlib.sha256(raw).hexdigest() != spec.get("sha256"):
            raise TableError(
                f"{what}: column {name} of {path} does not match the manifest (truncated, or "
                "from another pack): re-run the pack or adopt that wrote it"
            )
        if enc == "int64":
            col = np.frombuffer(raw, dtype="<i8").astype(np.int64, copy=False)
            if len(col) != self.count:
                raise TableError(f"{what}: column {name} holds {len(col)} values, not {self.count}")
            if name == "samples" and (not len(col) or 0 <= col.min() <= col.max() < 2**31):
                col = col.astype(np.int32)  # held for the run: half the memory per shard
        else:
            try:
                col = TextColumn(raw, self.count)
                if not raw.isascii():  # names are ASCII in the common case: no copy to check
                    raw.decode("utf-8")
            except UnicodeDecodeError:
                raise TableError(f"{what}: column {name} is not UTF-8") from None
            except TableError as exc:
                raise TableError(f"{what}: column {name}: {exc}") from None
        try:
            _check_column(name, col)
        except TableError as exc:
            raise TableError(f"{what}: {exc}") from None
        return col

    def validate(self, names: Iterable[str] = ("samples", "bytes", "name", "index", "labels")):
        """Load and check the columns a reader depends on (raises TableError)."""
        for c in names:
            _check_column(c, self.column(c))

    @property
    def samples(self) -> np.ndarray:
        return self.column("samples")

    @property
    def bytes(self) -> np.ndarray:
        return self.column("bytes")

    @property
    def names(self) -> Sequence[str]:
        return self.column("name")

    def value(self, name: str, i: int):
        v = self.column(name)[i]
        if name in INT_COLUMNS:
            return int(v)
        return None if (v == "" and name in NULLABLE) else v

    # -- rows -------------------------------------------------------------------
    def _at(self, i: int):
        from shard_tools.format.manifest import ShardInfo

        return ShardInfo(**{c: self.value(c, i) for c in COLUMNS})

    def __iter__(self):
        return (self[i] for i in range(self.count))

    def __eq__(self, other) -> bool:
        if not isinstance(other, ShardTable):
            try:
                other = ShardTable.of(other)
            except (TypeError, AttributeError):
                return NotImplemented
        return len(self) == len(other) and all(
            list(self.column(c)) == list(other.column(c)) for c in COLUMNS
        )

    def __repr__(self) -> str:
        return f"ShardTable({self.count} shards)"

    # -- writing ----------------------------------------------------------------
    def encode(self) -> tuple[bytes, dict[str, Any]]:
        """The ``manifest.shards`` bytes and the ``shard_table`` entry that describes them."""
        parts: list[bytes] = []
        columns: dict[str, Any] = {}
        offset = 0
        names = self.column("name")
        for c in COLUMNS:
            col = self.column(c)
            if c == "name" and all(n == shard_name(i) for i, n in enumerate(col)):
                columns[c] = {"encoding": "shard_name"}  # the pack's numbering
                continue
            if (
                c == "index"
                and len(col)
                and all(v == index_name(n) for v, n in zip(col, names, strict=True))
            ):
                columns[c] = {"encoding": "index_name"}
                continue
            if c in INT_COLUMNS:
                raw, enc = np.asarray(col, dtype="<i8").tobytes(), "int64"
            else:
                raw, enc = "\n".join(col).encode("utf-8"), "lines"
            columns[c] = {"encoding": enc, "offset": offset, "length": len(raw),
                          "sha256": hashlib.sha256(raw).hexdigest()}  # fmt: skip
            parts.append(raw)
            offset += len(raw)
        return b"".join(parts), {"file": TABLE_NAME, "count": self.count, "columns": columns}

    def __getstate__(self):  # a table sent to another process takes what it has read
        return {"count": self.count, "cols": self._cols, "source": self._source}

    def __setstate__(self, state) -> None:
        self.count, self._cols, self._source = state["count"], state["cols"], state["source"]
        self._lock = threading.Lock()


def _text(value) -> str:
    if value is None:
        return ""
    if "\n" in value:
        raise TableError(f"a shard table value cannot hold a newline: {value!r}")
    return value
