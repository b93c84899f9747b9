"""Which tar members form a sample, what its key is, and how files are named.

A sample is a run of consecutive tar members that share a key, webdataset's
rule: the key is the member name up to the first dot of its base name, the
extension is the rest (``train/n01440764_10026.jpg`` -> key
``train/n01440764_10026``, extension ``jpg``; ``a.seg.png`` -> ``a``,
``seg.png``). Extensions are compared in lower case. A shard written by
``shard pack`` holds per sample one image member (``jpg``, ``png`` or
``webp``), ``cls`` (the integer label in ASCII) and ``json`` (metadata).
"""

from __future__ import annotations

# Image members a loader decodes, in the order one is picked when a sample has several.
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Image-like members a pack takes as a sample's image (and rejects, with the reason,
# when it is not a format it packs).
INPUT_IMAGE_EXTS = (*IMAGE_EXTS, "bmp", "gif", "tif", "tiff", "ppm", "pgm", "jp2")
LABEL_EXT = "cls"
META_EXT = "json"

SHARD_PATTERN = "shard-{index:06d}.tar"
INDEX_SUFFIX = ".idx"
MANIFEST_NAME = "manifest.json"
REJECTED_NAME = "rejected.jsonl"


def split_name(name: str) -> tuple[str, str]:
    """Member name -> (key, extension): ``'dir/abc.seg.jpg'`` -> ``('dir/abc', 'seg.jpg')``."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def check_key(key: str) -> None:
    """Refuse a key the format cannot carry: reading it back must give the same key."""
    base = key.rsplit("/", 1)[-1]
    parts = key.split("/")
    if not base or "." in base or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(
            f"sample key {key!r} cannot be stored: its last part must be a non-empty name "
            "without dots (the first dot starts the extension), in a relative folder"
        )


def member_name(key: str, ext: str) -> str:
    """The tar member that holds extension EXT of sample KEY."""
    return f"{key}.{ext}"


def image_ext(exts) -> str | None:
    """The member of EXTS (a sample's extensions) a loader decodes, or None."""
    lower = {e.lower(): e for e in exts}
    return next((lower[e] for e in IMAGE_EXTS if e in lower), None)


def shard_name(number: int) -> str:
    return SHARD_PATTERN.format(index=number)


def index_name(shard: str) -> str:
    """The ``.idx`` that ``shard pack`` writes beside SHARD (``shard-000001.tar`` -> ``.idx``)."""
    return shard[: -len(".tar")] + INDEX_SUFFIX if shard.endswith(".tar") else shard + INDEX_SUFFIX


def wds2idx_index_name(tar_name: str) -> str:
    """The index name DALI's ``wds2idx`` derives: the tar's base name up to its first dot."""
    base = tar_name.rsplit("/", 1)[-1]
    dot = base.find(".", 1)
    return (base[:dot] if dot > 0 else base) + INDEX_SUFFIX
