"""``shard adopt``: make existing webdataset tars a dataset without rewriting them.

    shard adopt 'SRC/{000000..001023}.tar' --manifest-to DEST [--label json:label] [--hash]

The tars stay where they are (read-only, another bucket, a public mirror);
DEST receives, per tar, the DALI ``.idx`` of the samples kept and a
``.labels`` file (each kept sample's key and label), then ``rejected.jsonl``
and, last, ``manifest.json``, whose ``base_url`` is the tars' common folder.
The loader and the trainer then read the original tars with everything they
do for packed ones (exact order, resume, S3 streaming, corrupt-sample skip).

Each tar is read once, in parallel threads: local tars header by header
(member data is skipped, except the small ``.cls`` / ``.json`` that labels
need), remote ones as one sequential stream. ``--hash`` reads every byte for a
sha256. Samples without an image or a label are rejected (listed in
``rejected.jsonl``; the index leaves them out, so no reader sees them), and an
adopt that keeps nothing or rejects more than ``--max-reject-fraction`` fails
with the reasons. Members of one sample must be adjacent (a tar read in place
cannot be regrouped; ``shard pack`` re-packs such a tar).

Running adopt again on the same DEST compares every tar's size and etag with
the manifest's: unchanged tars keep their scan, changed and new ones are
scanned again, and the summary says which.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec

from shard_tools import __version__, labels, rejects, tarsource
from shard_tools.format import (
    LABELS_SUFFIX,
    MANIFEST_NAME,
    REJECTED_NAME,
    Manifest,
    ManifestError,
    ShardInfo,
    check_url,
    index_line,
    index_name,
    index_text,
    is_compressed_tar,
    labels_text,
    parse_labels,
    read_manifest,
    redact,
    write_manifest,
)
from shard_tools.sources import SourceError, check_member, expand_tar_patterns
from shard_tools.storage import Destination, options_for


class AdoptError(Exception):
    """The tars cannot be adopted as asked (one-line reason)."""


@dataclass(frozen=True, kw_only=True)
class AdoptConfig:
    src: tuple[str, ...]
    dest: str
    label: str = ""
    classes_from: str | None = None
    unlabelled: bool = False
    hash: bool = False
    workers: int = 8
    base_url: str | None = None
    max_reject_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not self.src:
            raise ValueError("give the tars to adopt (paths, globs or {000..009} patterns)")
        for url in (*self.src, self.dest, *([self.base_url] if self.base_url else [])):
            check_url(url, "URL")
        if self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ValueError("--max-reject-fraction must be within [0, 1]")

    def recorded_options(self) -> dict[str, Any]:
        """What decides the labels and indexes (a re-adopt with others rescans every tar)."""
        return {
            "adopted": [redact(s) for s in self.src],
            "label": self.label or None,
            "classes_from": redact(self.classes_from) if self.classes_from else None,
            "unlabelled": self.unlabelled,
            "hash": self.hash,
        }


@dataclass
class Scan:
    """One tar as adopt read it."""

    url: str
    name: str  # relative to base_url
    size: int
    etag: str | None
    sha256: str
    keys: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # index line per sample
    values: list[Any] = field(default_factory=list)  # raw label per sample (None: absent)
    why: list[str] = field(default_factory=list)  # why a label is absent
    images: list[str | None] = field(default_factory=list)  # None: has an image; else reason
    evidence: Counter = field(default_factory=Counter)  # for hints (rejects.evidence)
    reused: bool = False


@dataclass(frozen=True)
class AdoptResult:
    manifest: Manifest
    dest: str
    rejected: int
    seconds: float
    changed: list[str]
    unchanged: int
    new: int

    def summary(self) -> dict[str, Any]:
        m = self.manifest
        return {"dest": self.dest, "base_url": m.base_url, "samples": m.samples,
                "shards": len(m.shards), "bytes": m.bytes, "rejected": self.rejected,
                "classes": m.num_classes, "labelled": m.labelled, "seconds": round(self.seconds, 3),
                "shards_per_s": round(len(m.shards) / self.seconds, 1) if self.seconds else None,
                "changed": self.changed, "unchanged": self.unchanged, "new": self.new}  # fmt: skip

    def summary_line(self) -> str:
        s = self.summary()
        line = (f"adopted {s['samples']:,} samples in {s['shards']} tars ({s['bytes'] / 1e6:,.1f} MB) "
                f"under {s['base_url']}: manifest at {s['dest']} in {s['seconds']:.1f} s; "
                f"rejected {s['rejected']:,}")  # fmt: skip
        if self.unchanged or self.changed:
            line += (f"; since the last adopt: {len(self.changed)} changed (rescanned), "
                     f"{self.unchanged} unchanged, {self.new} new")  # fmt: skip
        return line


def common_base(urls: list[str]) -> str:
    """The deepest folder that holds every URL."""
    folders = [u.rsplit("/", 1)[0] if "/" in u else "." for u in urls]
    base = folders[0]
    for f in folders[1:]:
        while not (f == base or f.startswith(base.rstrip("/") + "/")):
            if "/" not in base.rstrip("/") or base.endswith("://"):
                raise AdoptError(f"{urls[0]} and {f} share no folder; give --base-url")
            base = base.rsplit("/", 1)[0]
    return base


def _stat(url: str, storage_options: dict[str, Any] | None) -> tuple[int, str | None]:
    """(size, etag) of a tar; a local file's etag is its mtime and inode."""
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag")
    if etag is None and "mtime" in info:
        etag = f"mtime:{info['mtime']}:ino:{info.get('ino', 0)}"
    return int(info["size"]), (str(etag).strip('"') if etag is not None else None)


class _Hashing:
    """A read-only stream that hashes what passes through it."""

    def __init__(self, f) -> None:
        self._f = f
        self.sha = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        return data

    def drain(self) -> None:
        while self.read(16 * 2**20):
            pass


def scan_one(url: str, name: str, spec: labels.LabelSpec, cfg: AdoptConfig,
             storage_options: dict[str, Any] | None) -> Scan:  # fmt: skip
    """Read one tar: its samples' index lines, raw labels and image problems."""
    size, etag = _stat(url, storage_options)
    scan = Scan(url=url, name=name, size=size, etag=etag, sha256="")
    local = "://" not in url or url.startswith("file://")
    compressed = is_compressed_tar(url)
    fs, path = fsspec.core.url_to_fs(url, **options_for(url, storage_options))
    samples = []
    with fs.open(path, "rb", block_size=tarsource.STREAM_BLOCK) as raw:
        hashing = _Hashing(raw) if cfg.hash else None
        stream: Any = hashing if hashing is not None else raw
        if compressed:
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        for sample in tarsource.scan_stream(
            stream, url, group=False, check=lambda m: check_member(url, m),
            seekable=local and not compressed and hashing is None,
        ):  # fmt: skip
            if spec.kind == "cls" and len(samples) < 10_000:
                samples.append(sample)  # evidence for a hint, if labels turn out missing
            scan.keys.append(sample.key)
            scan.lines.append(index_line(sample.members))
            image, problem = sample.image()
            scan.images.append(None if image is not None else problem)
            value, why = sample.label_value(spec)
            scan.values.append(value)
            scan.why.append(why)
        if hashing is not None:
            hashing.drain()  # the tar's end-of-archive blocks and padding
            scan.sha256 = hashing.sha.hexdigest()
    if spec.kind == "cls" and any(v is None for v in scan.values):
        scan.evidence = rejects.evidence(samples)
    return scan


def _side_name(rel: str, suffix: str) -> str:
    """A plain file name in DEST for the tar at REL below base_url ("/" -> "--")."""
    flat = rel.replace("/", "--")
    base = index_name(flat)[: -len(".idx")]
    for ext in (".tar.gz", ".tgz"):
        if flat.lower().endswith(ext):
            base = flat[: -len(ext)]
    return base + suffix


def adopt(cfg: AdoptConfig, *, storage_options: dict[str, Any] | None = None,
          progress: bool = True) -> AdoptResult:  # fmt: skip
    """Adopt CFG.src into a manifest at CFG.dest (see the module doc)."""
    t0 = time.perf_counter()
    try:
        urls = expand_tar_patterns(list(cfg.src), storage_options)
    except SourceError as exc:
        raise AdoptError(str(exc)) from None
    if not urls:
        raise AdoptError("no tars match")
    if len(set(urls)) != len(urls):
        raise AdoptError("a tar is named twice among the patterns")
    base = cfg.base_url.rstrip("/") if cfg.base_url else common_base(urls)
    for u in urls:
        if not u.startswith(base + "/"):
            raise AdoptError(f"{u} is not below --base-url {base}")
    rel = {u: u[len(base) + 1 :] for u in urls}
    try:
        spec = labels.parse_spec(cfg.label or None, unlabelled=cfg.unlabelled,
                                 classes_from=cfg.classes_from, storage_options=storage_options)  # fmt: skip
    except ValueError as exc:
        raise AdoptError(str(exc)) from None
    dest = Destination(cfg.dest, storage_options)
    earlier = _earlier(cfg, dest, base, storage_options)
    scans, changed, unchanged = _scan_all(urls, rel, spec, cfg, storage_options, earlier, progress)
    result = _finish(cfg, spec, dest, base, scans, time.perf_counter() - t0)
    new = sum(1 for s in scans if s.name not in earlier)
    return AdoptResult(manifest=result[0], dest=cfg.dest, rejected=result[1],
                       seconds=time.perf_counter() - t0, changed=changed,
                       unchanged=unchanged if earlier else 0, new=new if earlier else 0)  # fmt: skip


def _earlier(cfg: AdoptConfig, dest: Destination, base: str,
             storage_options: dict[str, Any] | None) -> dict[str, tuple[ShardInfo, Any]]:  # fmt: skip
    """name -> (ShardInfo, its .labels) of an earlier adopt at DEST with the same options."""
    if not dest.exists(MANIFEST_NAME):
        return {}
    try:
        old = read_manifest(cfg.dest, options_for(cfg.dest, storage_options))
    except ManifestError as exc:
        raise AdoptError(f"{exc}; remove it to adopt into {cfg.dest} afresh") from None
    if old.base_url is None:
        raise AdoptError(
            f"{cfg.dest} holds a packed dataset, not an adopted one; choose another DEST"
        )
    if old.base_url != base or old.options != cfg.recorded_options():
        return {}  # other tars or other label options: every tar is scanned again
    out = {}
    for s in old.shards:
        if s.labels and dest.exists(s.labels):
            out[s.name] = (
                s,
                parse_labels(dest.read_bytes(s.labels).decode("utf-8"), source=s.labels),
            )
    out["__classes__"] = (None, dict(old.classes))  # type: ignore[assignment]
    return out


def _scan_all(urls, rel, spec, cfg, storage_options, earlier, progress):
    """Scan every tar (reusing an earlier scan where size and etag are unchanged)."""
    from tqdm import tqdm

    old_classes = earlier.get("__classes__", (None, {}))[1]
    names_of = {v: k for k, v in old_classes.items()}
    scans: list[Scan | None] = [None] * len(urls)
    changed: list[str] = []
    todo = []
    for i, url in enumerate(urls):
        name = rel[url]
        if name in earlier:
            info, (old_labels, old_keys) = earlier[name]
            size, etag = _stat(url, storage_options)
            if (size, etag) == (info.bytes, info.etag):
                scans[i] = _reused(url, name, info, old_labels, old_keys, names_of, spec, cfg)
                continue
            changed.append(redact(url))
        todo.append(i)
    bar = tqdm(total=len(urls), initial=len(urls) - len(todo), unit="tar", disable=not progress)
    with ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="adopt-scan") as pool:
        futures = {i: pool.submit(scan_one, urls[i], rel[urls[i]], spec, cfg, storage_options)
                   for i in todo}  # fmt: skip
        try:
            for i in todo:
                scans[i] = futures[i].result()
                bar.update(1)
        except tarsource.TarSourceError as exc:
            for f in futures.values():
                f.cancel()
            raise AdoptError(str(exc)) from None
        finally:
            bar.close()
    return scans, changed, len(urls) - len(todo)


def _reused(url, name, info, old_labels, old_keys, names_of, spec, cfg) -> Scan:
    """An unchanged tar's earlier scan: its kept samples with their labels (as values the
    label resolution takes again: class names when the classes came from names)."""
    scan = Scan(url=url, name=name, size=info.bytes, etag=info.etag, sha256=info.sha256,
                reused=True)  # fmt: skip
    by_name = spec.kind == "json" or any(not n.isdigit() for n in names_of.values())
    scan.keys = list(old_keys)
    scan.values = [int(v) if v < 0 or not by_name else names_of[int(v)] for v in old_labels]
    if not spec.labelled:
        scan.values = [-1] * len(old_keys)
    scan.why = [""] * len(old_keys)
    scan.images = [None] * len(old_keys)
    scan.lines = []  # the index at DEST is kept as it is
    return scan


def _finish(cfg, spec, dest, base, scans, seconds) -> tuple[Manifest, int]:
    where = [f"{redact(s.url)}#{k}" for s in scans for k in s.keys]
    values = [v for s in scans for v in s.values]
    try:
        resolved = labels.resolve_spec(values, where, spec)
    except labels.LabelError as exc:
        raise AdoptError(str(exc)) from None
    rejected: list[tuple[str, str]] = []
    shards: list[ShardInfo] = []
    counts: Counter = Counter()
    pos = 0
    writes: list[tuple[str, bytes]] = []
    for s in scans:
        kept_rows, kept_lines = [], []
        for j, key in enumerate(s.keys):
            label, reason, at = resolved.labels[pos], resolved.reasons[pos], where[pos]
            pos += 1
            if s.images[j] is not None:
                rejected.append((at, s.images[j]))
            elif label is None:
                rejected.append((at, s.why[j] or reason))
            else:
                kept_rows.append((label, key))
                if s.lines:
                    kept_lines.append(s.lines[j])
                counts[label] += 1
        labels_name = _side_name(s.name, LABELS_SUFFIX)
        idx_name = None if is_compressed_tar(s.url) else _side_name(s.name, ".idx")
        if not s.reused:
            writes.append((labels_name, labels_text(kept_rows).encode("utf-8")))
            if idx_name is not None:
                writes.append((idx_name, index_text(kept_lines).encode("utf-8")))
        shards.append(ShardInfo(name=s.name, samples=len(kept_rows), bytes=s.size, sha256=s.sha256,
                                index=idx_name, etag=s.etag or "", labels=labels_name,
                                first_key=kept_rows[0][1] if kept_rows else "",
                                last_key=kept_rows[-1][1] if kept_rows else ""))  # fmt: skip
    kept = sum(sh.samples for sh in shards)
    seen = sum((s.evidence for s in scans), Counter())
    rejects.check(kept, rejected, cfg.max_reject_fraction, rejects.hints(seen), what="adopt",
                  error=AdoptError)  # fmt: skip
    for name, data in writes:
        dest.write_bytes(name, data)
    names = {v: k for k, v in resolved.classes.items()}
    lines = "".join(json.dumps({"path": p, "reason": r}, sort_keys=True, ensure_ascii=False) + "\n"
                    for p, r in rejected)  # fmt: skip
    dest.write_bytes(REJECTED_NAME, lines.encode("utf-8"))
    manifest = Manifest(
        shards=tuple(shards), classes=dict(resolved.classes), samples=kept,
        bytes=sum(sh.bytes for sh in shards), rejected=len(rejected),
        class_counts={names[k]: n for k, n in sorted(counts.items()) if k >= 0},
        options=cfg.recorded_options(), tool_version=__version__, labelled=spec.labelled,
        base_url=base,
    )  # fmt: skip
    write_manifest(dest.write_bytes, manifest)  # manifest.json last: the commit marker
    return manifest, len(rejected)
