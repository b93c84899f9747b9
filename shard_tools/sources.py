"""Inputs to pack: a class-folder tree, a manifest file, or existing webdataset tars.

Every source is listed up front into a list of small :class:`Item` references
(paths and tar offsets, never image bytes); workers read the bytes. The list
is what subset selection and ``--shuffle`` permute, and its order decides the
sample keys, so listing is deterministic (sorted) everywhere. Labels come from
where a :class:`~shard_tools.labels.LabelSpec` says (class folders, a table
column, a tar sample's ``.cls`` or ``.json``), or there are none
(``--unlabelled``: label -1).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import posixpath
import tarfile
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import numpy as np

from shard_tools import labels, rejects, tarsource
from shard_tools.format import (
    LABEL_EXT,
    MANIFEST_NAME,
    META_EXT,
    Manifest,
    ManifestError,
    check_url,
    is_compressed_tar,
    is_tar_name,
    redact,
)
from shard_tools.storage import options_for

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")


class SourceError(Exception):
    """The input cannot be packed as a whole (missing, malformed, or unsafe)."""


class TarRef(NamedTuple):
    """One member inside a tar: read SIZE bytes at OFFSET of URL."""

    url: str
    offset: int
    size: int
    ext: str


class Item(NamedTuple):
    """One input sample: where its bytes are, what to call it, its label (-1: none)."""

    ref: str | TarRef  # a local path or fsspec URL, or a member of a tar
    source: str  # how the sample is named in metadata and rejected.jsonl
    label: int
    extra: dict[str, Any] | None = None
    # Members of a tar sample written again byte for byte (.txt captions, .json, ...).
    keep: tuple[tuple[str, TarRef], ...] = ()


@dataclass
class Source:
    """A listed input: classes (name -> label), items in pack order, listing rejects."""

    classes: dict[str, int]
    items: list[Item]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    labelled: bool = True
    # What a user may have meant when many inputs were rejected (see fail_loudly).
    hints: list[str] = field(default_factory=list)
    # Removes what listing made on the side (decompressed copies of .tar.gz inputs).
    cleanup: Callable[[], None] | None = field(default=None, repr=False)

    def close(self) -> None:
        if self.cleanup is not None:
            self.cleanup()
            self.cleanup = None


def _is_url(path: str) -> bool:
    return "://" in path


def _kind(src: str | tuple[str, ...]) -> str:
    if isinstance(src, tuple) and len(src) > 1:
        return "tars"
    one = src[0] if isinstance(src, tuple) else src
    base = one.rstrip("/").lower()
    if base.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if is_tar_name(base) or any(c in one for c in "*?[{"):
        return "tars"
    return "folder"


def list_source(
    src: str | tuple[str, ...],
    storage_options: dict[str, Any] | None = None,
    spec: labels.LabelSpec | None = None,
) -> Source:
    """List SRC (see the module doc) into a Source in its natural, sorted order."""
    kind = _kind(src)
    if spec is None:
        spec = labels.parse_spec(None, table=kind == "manifest")
    if kind == "tars":
        patterns = list(src) if isinstance(src, tuple) else [src]
        return _list_tars(patterns, storage_options, spec)
    one = src[0] if isinstance(src, tuple) else src
    if kind == "manifest":
        return _list_manifest(one, storage_options, spec)
    if spec.kind == "json":
        raise SourceError(f"--label json:{spec.path} reads tar samples' .json; {one} is a folder")
    return _list_folder(one, storage_options, spec)


def _list_folder(
    root: str, storage_options: dict[str, Any] | None, spec: labels.LabelSpec
) -> Source:
    fs, base = fsspec.core.url_to_fs(root, **options_for(root, storage_options))
    if not fs.isdir(base):
        raise SourceError(
            f"SRC {root} is not a folder, a .csv/.jsonl/.parquet manifest or a .tar pattern"
        )
    base = base.rstrip("/")
    files: list[str] = []
    if _is_url(root):
        files = [p[len(base) + 1 :] for p in fs.find(base)]
    else:
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = os.path.relpath(dirpath, base)
            for name in filenames:
                if not name.startswith("."):
                    files.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    files.sort()
    prefix = root.rstrip("/") if _is_url(root) else base
    if not spec.labelled:  # every file is a sample, whatever folder it is in
        items = [Item(f"{prefix}/{rel}", printable(rel), -1) for rel in files]
        return Source(classes={}, items=items, labelled=False)
    if spec.classes is not None:
        classes = {name: i for i, name in enumerate(spec.classes)}
    else:
        names = sorted({printable(f.split("/", 1)[0]) for f in files if "/" in f})
        classes = {name: i for i, name in enumerate(names)}
    items, rejected = [], []
    for rel in files:
        if "/" not in rel:
            rejected.append((printable(rel), "not inside a class folder (SRC/<class>/<image>)"))
            continue
        folder = printable(rel.split("/", 1)[0])
        if folder not in classes:
            rejected.append(
                (
                    printable(rel),
                    f"class folder {folder} is not in --classes-from {spec.classes_from}",
                )
            )
            continue
        items.append(Item(f"{prefix}/{rel}", printable(rel), classes[folder]))
    return Source(classes=classes, items=items, rejected=rejected)


def printable(name: str) -> str:
    """NAME with bytes that are not UTF-8 escaped as ``\\xNN``.

    Local file names are bytes; Python hands the undecodable ones over as lone
    surrogates, which UTF-8 JSON (sample metadata, rejected.jsonl, the
    manifest's class names) cannot hold. The file itself is still opened by
    its real name.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _read_table(
    url: str, storage_options: dict[str, Any] | None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of a CSV/JSONL/Parquet manifest and where each one is ("FILE line N")."""
    opts = options_for(url, storage_options)
    name = redact(url)  # what rows and errors call the file (it reaches rejected.jsonl)
    try:
        if url.lower().endswith(".parquet"):
            import pyarrow.parquet as pq

            with fsspec.open(url, "rb", **opts) as f:
                rows = pq.read_table(f).to_pylist()
            return rows, [f"{name} row {i}" for i in range(len(rows))]
        with fsspec.open(url, "rt", encoding="utf-8", newline="", **opts) as f:
            if url.lower().endswith(".csv"):
                reader = csv.DictReader(f)
                rows, where = [], []
                for row in reader:
                    rows.append(row)
                    where.append(f"{name} line {reader.line_num}")
                return rows, where
            rows, where = [], []
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise SourceError(f"{name} line {n}: not JSON ({exc.msg})") from None
                    if not isinstance(row, dict):
                        raise SourceError(f"{name} line {n}: expected a JSON object")
                    rows.append(row)
                    where.append(f"{name} line {n}")
            return rows, where
    except FileNotFoundError:
        raise SourceError(f"SRC manifest {name} not found") from None
    except (csv.Error, UnicodeDecodeError, OSError) as exc:
        raise SourceError(f"SRC manifest {name} cannot be read: {exc}") from None
    except Exception as exc:  # pyarrow raises its own types for a damaged Parquet file
        if type(exc).__module__.startswith("pyarrow"):
            raise SourceError(f"SRC manifest {name} cannot be read: {exc}") from None
        raise


def _list_manifest(
    url: str, storage_options: dict[str, Any] | None, spec: labels.LabelSpec
) -> Source:
    rows, where = _read_table(url, storage_options)
    if not rows:
        raise SourceError(f"SRC manifest {redact(url)} has no rows")
    column = spec.path if spec.kind == "column" else None
    for name in ("path", column):
        if name is not None and not any(name in row for row in rows):
            raise SourceError(f"SRC manifest {redact(url)} lacks column {name}" + (
                " (--label names another column; --unlabelled packs without labels)"
                if name == column else ""))  # fmt: skip
    rejected = []
    kept_rows, kept_where = [], []
    for row, at in zip(rows, where, strict=True):
        if row.get("path") is None or not str(row["path"]).strip():
            rejected.append((at, "row has no path"))  # its label names no class either
        else:
            kept_rows.append(row)
            kept_where.append(at)
    try:
        values = [row.get(column) for row in kept_rows] if column else [None] * len(kept_rows)
        resolved = labels.resolve_spec(values, kept_where, spec)
    except labels.LabelError as exc:
        raise SourceError(f"SRC manifest {exc}") from None
    base = url.rsplit("/", 1)[0] if "/" in url else "."
    items = []
    for row, at, label, reason in zip(
        kept_rows, kept_where, resolved.labels, resolved.reasons, strict=True
    ):
        path = str(row["path"])
        shown = redact(path)  # an http(s) path may carry basic-auth credentials
        if label is None:
            rejected.append((shown, f"{reason} ({at})"))
            continue
        try:
            check_url(path, "path")
        except ValueError as exc:
            rejected.append((shown, f"{exc} ({at})"))
            continue
        ref = path if _is_url(path) or path.startswith("/") else f"{base}/{path}"
        extra = {k: v for k, v in row.items() if k not in ("path", column)} or None
        items.append(Item(ref, shown, label, extra))
    return Source(classes=resolved.classes, items=items, rejected=rejected, labelled=spec.labelled)


def expand_tar_patterns(patterns: list[str], storage_options: dict[str, Any] | None) -> list[str]:
    """Brace- and glob-expand tar patterns into existing URLs (sorted per glob)."""
    urls: list[str] = []
    for pattern in patterns:
        import braceexpand  # only tar patterns need it (webdataset's dependency)

        for one in braceexpand.braceexpand(pattern):
            fs, path = fsspec.core.url_to_fs(one, **options_for(one, storage_options))
            if any(c in one for c in "*?["):
                found = sorted(fs.glob(path))
                if not found:
                    raise SourceError(f"no tar matches {one}")
                prefix = one.split("://", 1)[0] + "://" if _is_url(one) else ""
                urls.extend(prefix + p if prefix and "://" not in p else p for p in found)
            elif not fs.exists(path):
                raise SourceError(f"tar {one} not found")
            else:
                urls.append(one)
    return urls


def check_member(tar_url: str, member: tarfile.TarInfo) -> None:
    """Refuse members that could escape a folder or are not plain data."""
    name = member.name
    if name.startswith("/") or posixpath.isabs(name) or ".." in name.split("/"):
        raise SourceError(
            f"{tar_url}: unsafe member name {name!r} (absolute or '..'); refusing this tar"
        )
    if member.issym() or member.islnk():
        raise SourceError(f"{tar_url}: member {name!r} is a link; refusing this tar")
    if not (member.isfile() or member.isdir()):
        raise SourceError(f"{tar_url}: member {name!r} is not a regular file; refusing this tar")


def _neighbour_classes(
    url: str, tar_url: str, storage_options: dict[str, Any] | None
) -> dict[str, int] | None:
    """The class names of the shardflow dataset the tars belong to, or None for foreign tars.

    A manifest that exists but cannot be read is an error: numbering the classes
    by label instead would silently rename every class of a re-shard.
    """
    try:
        with fsspec.open(url, "rt", **options_for(tar_url, storage_options)) as f:
            text = f.read()
    except FileNotFoundError:
        return None  # foreign tars: class names are the label numbers
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(
            f"{url} exists but cannot be read ({exc}); the tars' class names come from it"
        ) from None
    try:
        return dict(Manifest.from_json(text, source=url).classes)
    except ManifestError as exc:
        raise SourceError(
            f"{exc}; the tars' class names come from it: repair it, or remove it to name the "
            "classes by their label numbers"
        ) from None


def _list_tars(
    patterns: list[str], storage_options: dict[str, Any] | None, spec: labels.LabelSpec
) -> Source:
    urls = expand_tar_patterns(patterns, storage_options)
    if not urls:
        raise SourceError("no tars given")
    first_dir = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
    neighbour = f"{first_dir}/{MANIFEST_NAME}"
    own = _neighbour_classes(neighbour, urls[0], storage_options)
    if own is not None and spec.kind == "cls" and spec.classes is None:
        # Re-sharding a shardflow dataset: its labels are numbers of its class names.
        names = tuple(n for n, _ in sorted(own.items(), key=lambda kv: kv[1]))
        spec = labels.LabelSpec(kind="cls", classes=names, classes_from=neighbour)
    gz_copies = tempfile.TemporaryDirectory(prefix="shardflow-gz-") if any(
        is_compressed_tar(u) for u in urls) else None  # fmt: skip
    samples: list[tuple[str, tarsource.TarSample, str]] = []  # (url, sample, local path)
    counts: dict[str, int] = {}
    try:
        for n, url in enumerate(urls):
            path = url
            if is_compressed_tar(url):  # members need byte offsets: decompress once
                path = tarsource.local_copy(url, storage_options, f"{gz_copies.name}/{n}.tar")
            for sample in tarsource.scan_tar(path, storage_options, group=True, counts=counts,
                                             check=lambda m, url=url: check_member(url, m)):  # fmt: skip
                samples.append((url, sample, path))
    except tarsource.TarSourceError as exc:
        if gz_copies is not None:
            gz_copies.cleanup()
        raise SourceError(str(exc)) from None
    source = _tar_items(samples, spec, own is not None)
    if counts.get("split"):
        source.hints.append(f"{counts['split']} samples had members that were not adjacent in "
                            "their tar; they were grouped by key")  # fmt: skip
    if gz_copies is not None:
        source.cleanup = gz_copies.cleanup
    return source


def _tar_items(
    samples: list[tuple[str, tarsource.TarSample, str]], spec: labels.LabelSpec, own: bool
) -> Source:
    """Items of listed tar samples: image found, label resolved, members to keep."""
    where = [f"{redact(url)}#{s.key}" for url, s, _ in samples]
    raw, why = (
        zip(*(s.label_value(spec) for _, s, _ in samples), strict=True) if samples else ((), ())
    )
    try:
        resolved = labels.resolve_spec(list(raw), where, spec)
    except labels.LabelError as exc:
        raise SourceError(str(exc)) from None
    items, rejected = [], []
    reasons = Counter()
    for (_, sample, path), at, label, reason, missing in zip(
        samples, where, resolved.labels, resolved.reasons, why, strict=True
    ):
        image, problem = sample.image()
        if image is None:
            rejected.append((at, problem))
            reasons["image"] += 1
            continue
        if label is None:
            rejected.append((at, missing or reason))
            reasons["label"] += 1
            continue
        drop = {id(image)}
        extra = None
        for m in sample.members:
            if spec.kind == "cls" and m.ext.lower() == LABEL_EXT:
                drop.add(id(m))  # written again from the label
            if own and m.ext.lower() == META_EXT:
                drop.add(id(m))  # shardflow's own metadata: written afresh
                meta = sample.meta()
                extra = meta.get("extra") if isinstance(meta, dict) else None
        keep = tuple((m.ext, TarRef(path, m.offset, m.size, m.ext)) for m in sample.members
                     if id(m) not in drop)  # fmt: skip
        ext = image.ext.rsplit(".", 1)[-1].lower()
        items.append(Item(TarRef(path, image.offset, image.size, ext), at, label, extra, keep))
    source = Source(classes=resolved.classes, items=items, rejected=rejected,
                    labelled=spec.labelled)  # fmt: skip
    if reasons["label"] and spec.kind == "cls":
        source.hints += rejects.hints(rejects.evidence([s for _, s, _ in samples]))
    return source


def select(
    source: Source,
    *,
    classes: tuple[str, ...] | None,
    fraction: float | None,
    shuffle: bool,
    seed: int,
) -> Source:
    """Apply --classes, --fraction and --shuffle; labels are renumbered 0..K-1."""
    if classes is not None and not source.labelled:
        raise SourceError("--classes selects classes; the input is unlabelled")
    items = source.items
    class_map = source.classes
    if classes is not None:
        unknown = [c for c in classes if c not in source.classes]
        if unknown:
            known = ", ".join(sorted(source.classes)[:20])
            raise SourceError(f"--classes: unknown class {unknown[0]!r} (known: {known})")
        kept = sorted(set(classes), key=lambda c: source.classes[c])
        class_map = {c: i for i, c in enumerate(kept)}
        renumber = {source.classes[c]: i for i, c in enumerate(kept)}
        items = [it._replace(label=renumber[it.label]) for it in items if it.label in renumber]
    if fraction is not None and fraction < 1.0:
        by_label: dict[int, list[int]] = {}
        for i, it in enumerate(items):
            by_label.setdefault(it.label, []).append(i)
        keep: list[int] = []
        for label, idx in sorted(by_label.items()):
            n = max(1, round(fraction * len(idx)))
            # One generator per class: a class's subset does not depend on the others.
            rng = np.random.default_rng([seed, label])
            keep.extend(idx[j] for j in rng.choice(len(idx), size=n, replace=False))
        items = [items[i] for i in sorted(keep)]
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
    return dataclasses.replace(source, classes=class_map, items=items)


def describe(items: list[Item]) -> bytes:
    """A compact fingerprint source of the listing (for resume checks)."""
    buf = io.StringIO()
    for it in items:
        buf.write(f"{it.source}\t{it.label}\n")
    return buf.getvalue().encode("utf-8", "surrogateescape")
