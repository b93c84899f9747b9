"""The dataset manifest: the one schema the write side and the read side share.

A dataset written by ``shard pack`` is a folder (local or any fsspec URL) of
``shard-NNNNNN.tar`` shards, one DALI ``.idx`` index per shard, an optional
``rejected.jsonl`` and ``manifest.json``. The manifest is written last and is
the commit marker: a folder without one is an unfinished pack.

A dataset made by ``shard adopt`` references tars that stay where they are:
its manifest (beside their ``.idx`` files) names ``base_url``, and shard names
are paths relative to it. Its shards may lack a sha256 (``""``: adopted
without ``--hash``) and record their size and the storage's etag, so that a
changed tar is noticed.

Format 2 added ``labelled``, ``base_url`` and per-shard ``etag``; format 3
moved the per-shard entries out of ``manifest.json`` into the columnar
``manifest.shards`` beside it (:mod:`~shard_tools.format.table`: a loader of
10^5 shards reads a few arrays, not 10^5 JSON objects). Formats 1 and 2 read as
they are. Readers call :func:`read_manifest` and get a
validated :class:`Manifest`; a version they do not know is refused with a
message that says what to do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import fsspec
import numpy as np

from shard_tools.format.names import MANIFEST_NAME
from shard_tools.format.table import TABLE_NAME, ManifestError, ShardTable

FORMAT_VERSION = 3
READ_VERSIONS = (1, 2, 3)


CREDENTIALS_HINT = (
    "check the storage credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the profile, "
    "or storage_options)"
)


def _relative_path(name: str) -> bool:
    """A path below a base URL: relative, no '..' or empty parts, no scheme."""
    parts = name.split("/")
    return (
        bool(name)
        and "://" not in name
        and "\\" not in name
        and not name.startswith("/")
        and all(p not in ("", ".", "..") for p in parts)
    )


def _plain_name(name: str) -> bool:
    """A file directly in the dataset folder: no path separator, not '.', '..' or empty."""
    return (
        bool(name)
        and "/" not in name
        and "\\" not in name
        and name not in (".", "..")
        and (not name.startswith(".."))
    )


@dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One tar shard: enough to verify it and to plan reads without opening it."""

    name: str  # file name relative to the dataset root, e.g. "shard-000000.tar"
    samples: int
    bytes: int
    sha256: str
    index: str | None  # DALI index file name (None for foreign tars without one)
    first_key: str = ""
    last_key: str = ""
    etag: str | None = None  # the storage's ETag when adopted (None: written by pack)
    # Adopted: the .labels file beside the manifest (the samples kept and their labels).
    labels: str | None = None

    def __post_init__(self) -> None:
        for kind, name in (("index", self.index), ("labels", self.labels)):
            if name is not None and not _plain_name(name):
                raise ManifestError(f"{kind} name must be a plain file name, got {name!r}")
        if not _relative_path(self.name):
            # Below the dataset root (or an adopted dataset's base_url), never outside it.
            raise ManifestError(
                f"shard name must be a plain file name or a relative path below the dataset, "
                f"got {self.name!r}"
            )
        if self.samples < 0 or self.bytes < 0:
            raise ManifestError(f"shard {self.name}: negative samples or bytes")


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """A whole dataset. ``classes`` maps class name to integer label; ``shards`` is a
    :class:`~shard_tools.format.table.ShardTable` (given as any sequence of ShardInfo)."""

    shards: ShardTable
    classes: dict[str, int]
    samples: int
    bytes: int
    rejected: int = 0
    class_counts: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    tool_version: str = ""
    labelled: bool = True  # False: packed or adopted --unlabelled, every label is -1
    base_url: str | None = None  # adopted: shard names are relative to this URL
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version not in READ_VERSIONS:
            raise ManifestError(
                f"manifest format version {self.format_version} is not supported by this "
                f"shardflow (it reads versions {READ_VERSIONS}); upgrade shardflow, or "
                "re-pack the dataset with this version's `shard pack`"
            )
        if not self.labelled and self.classes:
            raise ManifestError("an unlabelled dataset lists no classes")
        object.__setattr__(self, "shards", ShardTable.of(self.shards))
        if int(np.sum(self.shards.samples)) != self.samples:
            raise ManifestError("manifest totals disagree: samples != sum of shard samples")
        if int(np.sum(self.shards.bytes)) != self.bytes:
            raise ManifestError("manifest totals disagree: bytes != sum of shard bytes")
        labels = sorted(self.classes.values())
        if labels != list(range(len(labels))):
            raise ManifestError("class labels must be 0..num_classes-1 without gaps")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shard_sizes(self) -> np.ndarray:
        """Samples per shard (int64), in manifest order."""
        return self.shards.samples

    def encode(self) -> tuple[str, bytes]:
        """(``manifest.json`` text, ``manifest.shards`` bytes): deterministic (sorted keys,
        no timestamps), so equal inputs give equal bytes."""
        table, spec = self.shards.encode()
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shards"}
        data["format_version"] = FORMAT_VERSION
        data["shard_table"] = spec
        return json.dumps(data, indent=2, sort_keys=True) + "\n", table

    @classmethod
    def from_json(
        cls, text: str, *, source: str = "manifest", storage_options: dict[str, Any] | None = None
    ) -> Manifest:
        """Parse ``manifest.json`` text read from SOURCE (its URL: a format-3 manifest's
        shard table is the ``manifest.shards`` beside it, opened lazily)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(
                f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})"
            ) from None
        if not isinstance(data, dict):
            raise ManifestError(f"{source} must hold a JSON object")
        version = data.get("format_version")
        if version not in READ_VERSIONS:
            raise ManifestError(
                f"{source} has format version {version!r}; this shardflow reads versions "
                f"{', '.join(map(str, READ_VERSIONS))}: upgrade shardflow or re-pack the dataset"
            )
        try:
            if version >= 3:
                spec = data.pop("shard_table")
                base = source.rsplit("/", 1)[0] if "/" in source else "."
                table_url = join_url(base, spec.get("file", TABLE_NAME))
                fs, path = fsspec.core.url_to_fs(
                    table_url, **options_for(table_url, storage_options)
                )
                shards = ShardTable.open(fs, path, spec, what=source)
            else:
                shards = tuple(ShardInfo(**s) for s in data.pop("shards"))
            return cls(shards=shards, **data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ManifestError(f"{source} is malformed: {exc}") from None
        except ManifestError as exc:  # a shard entry refused itself: say which file holds it
            raise ManifestError(f"{source}: {exc}") from None


_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """TEXT with the ``user:password@`` part of every URL in it replaced by ``***@``."""
    return _USERINFO.sub(r"\1***@", text)


def check_url(url: str, what: str) -> None:
    """Refuse credentials embedded in an object-store URL (s3://key:secret@bucket/...).

    fsspec's object stores do not read them (the bucket would be "key:secret@bucket"),
    and a URL travels into shell histories, manifests and logs. HTTP(S) sources may
    carry basic-auth credentials: they are used to read and redacted everywhere else.
    """
    scheme, sep, rest = url.partition("://")
    if sep and scheme.lower() not in ("http", "https") and "@" in rest.split("/", 1)[0]:
        raise ValueError(
            f"{what} {redact(url)}: credentials in {scheme}:// URLs are not supported; "
            f"{CREDENTIALS_HINT}"
        )


def options_for(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options apply to remote URLs only (a local path takes none)."""
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return dict(storage_options or {}) if protocol not in ("file", "local") else {}


def join_url(root: str, name: str) -> str:
    """Join a dataset root (local path or URL) and a member name."""
    return root.rstrip("/") + "/" + name


def read_manifest(root: str, storage_options: dict[str, Any] | None = None) -> Manifest:
    """Load and validate ``ROOT/manifest.json``; raise ManifestError with the reason."""
    url = join_url(root, MANIFEST_NAME)
    opts = options_for(url, storage_options)
    try:
        with fsspec.open(url, "rt", **opts) as f:
            text = f.read()
    except FileNotFoundError:
        raise ManifestError(
            f"no {MANIFEST_NAME} under {root}: {_what_is_there(root, opts)}"
        ) from None
    except PermissionError as exc:
        # Object stores answer a wrong secret with a bare "Forbidden": say what was read.
        raise ManifestError(f"access denied reading {url} ({exc}): {CREDENTIALS_HINT}") from None
    manifest = Manifest.from_json(text, source=url, storage_options=opts)
    manifest.shards.validate()  # what a reader relies on, checked before anything is read
    return manifest


def write_manifest(write: Callable[[str, bytes], Any], manifest: Manifest) -> None:
    """Write MANIFEST with WRITE(name, data): the shard table, then ``manifest.json`` (the
    commit marker, last)."""
    text, table = manifest.encode()
    write(TABLE_NAME, table)
    write(MANIFEST_NAME, text.encode("utf-8"))


def _what_is_there(root: str, opts: dict[str, Any]) -> str:
    """What a folder without a manifest holds, and the command that makes it a dataset."""
    from shard_tools.format.names import is_tar_name

    try:
        fs, path = fsspec.core.url_to_fs(root, **opts)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except (OSError, ValueError):
        names = []
    if ".journal" in names:
        return "its pack did not finish (run the same `shard pack ... --resume` to complete it)"
    tars = [n for n in names if is_tar_name(n)]
    if tars:
        return (
            f"it holds {len(tars)} tar(s) but is not a shardflow dataset; to read them as they "
            f"are: shard adopt '{root.rstrip('/')}/*.tar' --manifest-to DEST (then use DEST)"
        )
    return "not a shardflow dataset (shard pack writes one; shard adopt makes one of existing tars)"
