"""The pack journal: what an interrupted pack already finished, so ``--resume`` can go on.

``DEST/.journal/options.json`` fingerprints the run (recorded options, classes,
the listing); ``DEST/.journal/shard-NNNNNN.json`` is written (atomically) right
after shard NNNNNN and its index are in place, and holds everything the
manifest needs from that shard: size, sha256, keys, per-class counts, the
inputs rejected in its range and the input position where the next shard
starts. One small file per shard, because object stores cannot append.

On resume, journal entries are taken in order while their shard and index
still hash to the recorded sha256; packing restarts after the last good one.
Because keys, shard boundaries and bytes are pure functions of the input
order and the options, the result equals an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from shard_tools.storage import TMP_DIR, Destination

JOURNAL_DIR = ".journal"
OPTIONS_NAME = f"{JOURNAL_DIR}/options.json"


class ResumeError(Exception):
    """The destination holds an unfinished pack that cannot be continued as asked."""


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8")


def _load(dest: Destination, name: str) -> Any:
    """A journal file's content; None if it is missing or unreadable.

    Journal files are not fsync'ed (they are hints, checked against the
    shards' hashes), so after a power loss one may be empty or cut short:
    that only means less work is kept.
    """
    try:
        return json.loads(dest.read_bytes(name))
    except (FileNotFoundError, ValueError):
        return None


def entry_name(shard_name: str) -> str:
    return f"{JOURNAL_DIR}/{shard_name.rsplit('.', 1)[0]}.json"


def has_unfinished(dest: Destination) -> bool:
    """True if DEST holds a journal or shard files but no manifest."""
    if dest.names(JOURNAL_DIR):
        return True
    return any(n.startswith("shard-") and n.endswith(".tar") for n in dest.names())


def file_sha256(dest: Destination, name: str) -> str | None:
    """sha256 of DEST/NAME, or None if it is missing."""
    h = hashlib.sha256()
    try:
        with dest.open_read(name) as f:
            while chunk := f.read(8 * 2**20):
                h.update(chunk)
    except FileNotFoundError:
        return None
    return h.hexdigest()


def begin(dest: Destination, fingerprint: dict[str, Any], *, resume: bool) -> list[dict[str, Any]]:
    """Start or continue a pack: return the verified finished shard entries, in order."""
    if not resume:
        if has_unfinished(dest):
            raise ResumeError(
                f"{dest.url} holds an unfinished pack (shards or a journal, no manifest): "
                "rerun with --resume, or choose an empty destination"
            )
        dest.makedirs()
        dest.write_bytes(OPTIONS_NAME, _dump(fingerprint), durable=False)
        return []
    recorded = _load(dest, OPTIONS_NAME)
    if recorded is None:
        # Nothing (readable) was journaled: start over (shard files left without a
        # journal entry are rewritten with the same names).
        dest.makedirs()
        dest.write_bytes(OPTIONS_NAME, _dump(fingerprint), durable=False)
        return []
    if recorded != fingerprint:
        changed = sorted(
            k for k in set(recorded) | set(fingerprint) if recorded.get(k) != fingerprint.get(k)
        )
        raise ResumeError(
            f"--resume: the input or options differ from the interrupted pack ({', '.join(changed)}); "
            "rerun with the same SRC and options, or choose an empty destination"
        )
    done: list[dict[str, Any]] = []
    names = set(dest.names(JOURNAL_DIR))
    while True:
        shard = f"shard-{len(done):06d}.tar"
        entry_file = entry_name(shard).split("/", 1)[1]
        if entry_file not in names:
            break
        entry = _load(dest, entry_name(shard))
        if entry is None:
            break
        if file_sha256(dest, entry["name"]) != entry["sha256"]:
            break
        if file_sha256(dest, entry["index"]) != entry["index_sha256"]:
            break
        done.append(entry)
    return done


def record(dest: Destination, entry: dict[str, Any]) -> None:
    """Journal one finished shard (after the shard and its index are in place)."""
    dest.write_bytes(entry_name(entry["name"]), _dump(entry), durable=False)


def clear(dest: Destination) -> None:
    """Remove the journal and temp files once the manifest is written."""
    dest.remove(JOURNAL_DIR)
    dest.remove(TMP_DIR)
