"""Inputs to pack: a class-folder tree, a manifest file, or existing webdataset tars.

Every source is listed up front into a list of small :class:`Item` references
(paths and tar offsets, never image bytes); workers read the bytes. The list
is what subset selection and ``--shuffle`` permute, and its order decides the
sample keys, so listing is deterministic (sorted) everywhere.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import fsspec
import numpy as np

from shard_tools import labels
from shard_tools.format import (
    INPUT_IMAGE_EXTS,
    LABEL_EXT,
    MANIFEST_NAME,
    META_EXT,
    Manifest,
    ManifestError,
    check_url,
    redact,
    scan_samples,
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
    """One input sample: where its bytes are, what to call it, its label."""

    ref: str | TarRef  # a local path or fsspec URL, or a member of a tar
    source: str  # how the sample is named in metadata and rejected.jsonl
    label: int
    extra: dict[str, Any] | None = None


@dataclass
class Source:
    """A listed input: classes (name -> label), items in pack order, listing rejects."""

    classes: dict[str, int]
    items: list[Item]
    rejected: list[tuple[str, str]] = field(default_factory=list)


def _is_url(path: str) -> bool:
    return "://" in path


def _kind(src: str | tuple[str, ...]) -> str:
    if isinstance(src, tuple) and len(src) > 1:
        return "tars"
    one = src[0] if isinstance(src, tuple) else src
    base = one.rstrip("/").lower()
    if base.endswith(MANIFEST_SUFFIXES):
        return "manifest"
    if base.endswith(".tar") or any(c in one for c in "*?[{"):
        return "tars"
    return "folder"


def list_source(
    src: str | tuple[str, ...], storage_options: dict[str, Any] | None = None
) -> Source:
    """List SRC (see the module doc) into a Source in its natural, sorted order."""
    kind = _kind(src)
    if kind == "tars":
        patterns = list(src) if isinstance(src, tuple) else [src]
        return _list_tars(patterns, storage_options)
    one = src[0] if isinstance(src, tuple) else src
    if kind == "manifest":
        return _list_manifest(one, storage_options)
    return _list_folder(one, storage_options)


def _list_folder(root: str, storage_options: dict[str, Any] | None) -> Source:
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
    names = sorted({printable(f.split("/", 1)[0]) for f in files if "/" in f})
    classes = {name: i for i, name in enumerate(names)}
    items, rejected = [], []
    prefix = root.rstrip("/") if _is_url(root) else base
    for rel in files:
        if "/" not in rel:
            rejected.append((printable(rel), "not inside a class folder (SRC/<class>/<image>)"))
            continue
        label = classes[printable(rel.split("/", 1)[0])]
        items.append(Item(f"{prefix}/{rel}", printable(rel), label))
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


def _as_int_label(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return None


def _list_manifest(url: str, storage_options: dict[str, Any] | None) -> Source:
    rows, where = _read_table(url, storage_options)
    if not rows:
        raise SourceError(f"SRC manifest {url} has no rows")
    for column in ("path", "label"):
        if not any(column in row for row in rows):
            raise SourceError(f"SRC manifest {url} lacks column {column}")
    rejected = []
    kept_rows, kept_where = [], []
    for row, at in zip(rows, where, strict=True):
        if row.get("path") is None or not str(row["path"]).strip():
            rejected.append((at, "row has no path"))  # its label names no class either
        else:
            kept_rows.append(row)
            kept_where.append(at)
    try:
        resolved = labels.resolve([row.get("label") for row in kept_rows], kept_where)
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
        extra = {k: v for k, v in row.items() if k not in ("path", "label")} or None
        items.append(Item(ref, shown, label, extra))
    return Source(classes=resolved.classes, items=items, rejected=rejected)


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


def _open_stream(url: str, opts: dict[str, Any]):
    # Large blocks: the scan reads each tar front to back once.
    fs, path = fsspec.core.url_to_fs(url, **opts)
    return fs.open(path, "rb", block_size=16 * 2**20)


def scan_tar(url: str, storage_options: dict[str, Any] | None):
    """Yield (key, {ext: Member}, {ext: small member bytes}) per sample of one tar.

    Streams the tar once; .cls and .json members are read, images only located.
    """
    opts = options_for(url, storage_options)
    small_exts = (LABEL_EXT, META_EXT)
    try:
        with _open_stream(url, opts) as f:
            for key, members in scan_samples(
                f, read=lambda ext: ext in small_exts, check=lambda m: check_member(url, m)
            ):
                by_ext = {m.ext: m for m in members}
                yield key, by_ext, {m.ext: m.data for m in members if m.data is not None}
    except tarfile.TarError as exc:
        raise SourceError(f"{url}: not a readable uncompressed tar ({exc})") from None
    except FileNotFoundError:
        raise SourceError(f"tar {url} not found") from None


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


def _list_tars(patterns: list[str], storage_options: dict[str, Any] | None) -> Source:
    urls = expand_tar_patterns(patterns, storage_options)
    if not urls:
        raise SourceError("no tars given")
    first_dir = urls[0].rsplit("/", 1)[0] if "/" in urls[0] else "."
    classes = _neighbour_classes(f"{first_dir}/{MANIFEST_NAME}", urls[0], storage_options)
    items, rejected, max_label = [], [], -1
    for url in urls:
        for key, members, small in scan_tar(url, storage_options):
            source = f"{redact(url)}#{key}"
            image = next(
                (e for e in members if e.rsplit(".", 1)[-1].lower() in INPUT_IMAGE_EXTS), None
            )
            label = _as_int_label(small.get(LABEL_EXT, b"").decode("ascii", "replace").strip())
            if image is None:
                rejected.append((source, "sample has no image member"))
                continue
            if label is None or label < 0:
                rejected.append((source, "sample has no valid .cls label"))
                continue
            extra = None
            if META_EXT in small:
                try:
                    meta = json.loads(small[META_EXT])
                    extra = meta.get("extra") if isinstance(meta, dict) else None
                except (json.JSONDecodeError, UnicodeDecodeError):
                    extra = None
            m = members[image]
            ext = image.rsplit(".", 1)[-1].lower()
            items.append(Item(TarRef(url, m.offset, m.size, ext), source, label, extra))
            max_label = max(max_label, label)
    if classes is None:
        classes = {str(i): i for i in range(max_label + 1)}
    elif max_label >= len(classes):
        raise SourceError(
            f"tar labels go up to {max_label} but {first_dir}/{MANIFEST_NAME} lists {len(classes)} classes"
        )
    return Source(classes=classes, items=items, rejected=rejected)


def select(
    source: Source,
    *,
    classes: tuple[str, ...] | None,
    fraction: float | None,
    shuffle: bool,
    seed: int,
) -> Source:
    """Apply --classes, --fraction and --shuffle; labels are renumbered 0..K-1."""
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
    return Source(classes=class_map, items=items, rejected=source.rejected)


def describe(items: list[Item]) -> bytes:
    """A compact fingerprint source of the listing (for resume checks)."""
    buf = io.StringIO()
    for it in items:
        buf.write(f"{it.source}\t{it.label}\n")
    return buf.getvalue().encode("utf-8", "surrogateescape")
