"""``shard inspect``: what a dataset holds, from its manifest and its samples' metadata.

Totals, classes and shards come from ``manifest.json``; the image size
distribution comes from the ``.json`` member of every sample (the shards are
streamed and only those small members are read; ``scan=False`` skips it).
"""

from __future__ import annotations

import gzip
import json
import statistics
import tarfile
import zlib
from typing import Any

from shard_tools.format import (
    META_EXT,
    OWN_META_EXT,
    ShardInfo,
    is_compressed_tar,
    read_manifest,
    scan_samples,
)
from shard_tools.storage import Destination, options_for

SIDE_BUCKETS = (64, 128, 256, 512, 1024)


def _bucket(side: int) -> str:
    for limit in SIDE_BUCKETS:
        if side <= limit:
            return f"<={limit}"
    return f">{SIDE_BUCKETS[-1]}"


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class InspectError(ValueError):
    """A shard that cannot be scanned (truncated, not a tar, damaged metadata)."""


def _shard_sizes(dest: Destination, shard: ShardInfo) -> list[tuple[int, int]]:
    """(width, height) of the samples of SHARD from their metadata (shard pack's, or a
    .json with width and height fields, as img2dataset writes)."""
    name = shard.name
    try:
        size = dest.size(name)
    except FileNotFoundError:
        raise InspectError(f"{name}: missing (listed in the manifest)") from None
    if size != shard.bytes:
        raise InspectError(
            f"{name}: is {size:,} bytes but the manifest says {shard.bytes:,} (truncated or "
            "replaced shard); `shard verify` names the damage"
        )
    sizes, seen = [], 0
    wanted = (META_EXT, OWN_META_EXT)
    try:
        with dest.open_read(name) as f:
            stream = gzip.GzipFile(fileobj=f, mode="rb") if is_compressed_tar(name) else f
            for key, members in scan_samples(stream, read=lambda ext: ext.lower() in wanted):
                seen += 1
                data = {m.ext.lower(): m.data for m in members if m.data is not None}
                raw = data.get(OWN_META_EXT) or data.get(META_EXT)
                if raw is None:
                    continue
                try:
                    meta = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    raise InspectError(f"{name}: sample {key} has a damaged .json member") from None
                if not isinstance(meta, dict):
                    continue
                w, h = meta.get("width"), meta.get("height")
                if isinstance(w, int) and isinstance(h, int):
                    sizes.append((w, h))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise InspectError(
            f"{name}: not a readable tar ({exc}); `shard verify` names the damage"
        ) from None
    # An adopted shard's manifest counts the samples kept; its tar may hold rejected ones too.
    if seen < shard.samples or (seen != shard.samples and not shard.labels):
        raise InspectError(
            f"{name}: holds {seen} samples but the manifest says {shard.samples} (truncated or "
            "damaged shard); `shard verify` names the damage"
        )
    return sizes


def image_sizes(dest: Destination, shards) -> dict[str, Any]:
    """Width/height statistics and longer-side buckets of the SHARDS' samples."""
    widths, heights = [], []
    buckets = {_bucket(b): 0 for b in (*SIDE_BUCKETS, SIDE_BUCKETS[-1] + 1)}
    for shard in shards:
        for w, h in _shard_sizes(dest, shard):
            widths.append(w)
            heights.append(h)
            buckets[_bucket(max(w, h))] += 1
    return {
        "images": len(widths),
        "width": _stats(widths),
        "height": _stats(heights),
        "max_side": buckets,
    }


def inspect_dataset(
    dest_url: str, *, scan: bool = True, storage_options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A JSON-able description of the dataset at DEST_URL."""
    m = read_manifest(dest_url, options_for(dest_url, storage_options))
    info: dict[str, Any] = {
        "dest": dest_url,
        "format_version": m.format_version,
        "tool_version": m.tool_version,
        "samples": m.samples,
        "bytes": m.bytes,
        "rejected": m.rejected,
        "num_classes": m.num_classes,
        "classes": [
            {"name": name, "label": label, "samples": m.class_counts.get(name, 0)}
            for name, label in sorted(m.classes.items(), key=lambda kv: kv[1])
        ],
        "shards": [
            {"name": s.name, "samples": s.samples, "bytes": s.bytes, "index": s.index}
            for s in m.shards
        ],
        "options": m.options,
        "labelled": m.labelled,
        "base_url": m.base_url,
    }
    if scan:
        dest = Destination(m.base_url or dest_url, storage_options)
        info["image_sizes"] = image_sizes(dest, m.shards)
    return info


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


def render(info: dict[str, Any]) -> str:
    """Human-readable tables for ``inspect_dataset``'s result."""
    n = max(info["samples"], 1)
    out = [
        f"dataset {info['dest']} (format v{info['format_version']}, shard_tools {info['tool_version']})",
        f"{info['samples']:,} samples in {len(info['shards'])} shards, {info['bytes'] / 1e6:,.1f} MB, "
        f"{info['num_classes']} classes, {info['rejected']:,} inputs rejected",
        "",
        _table(
            [
                [c["name"], c["label"], f"{c['samples']:,}", f"{100 * c['samples'] / n:.1f}%"]
                for c in info["classes"]
            ],
            ["class", "label", "samples", "share"],
        ),
        "",
        _table(
            [
                [s["name"], f"{s['samples']:,}", f"{s['bytes'] / 1e6:,.1f}", s["index"] or "-"]
                for s in info["shards"]
            ],
            ["shard", "samples", "MB", "index"],
        ),
    ]
    sizes = info.get("image_sizes")
    if sizes and sizes["images"]:
        w, h = sizes["width"], sizes["height"]
        out += [
            "",
            f"image width  min/median/max: {w['min']} / {w['median']:g} / {w['max']} px",
            f"image height min/median/max: {h['min']} / {h['median']:g} / {h['max']} px",
            _table(
                [[k, f"{v:,}"] for k, v in sizes["max_side"].items()], ["longer side", "images"]
            ),
        ]
    return "\n".join(out)
