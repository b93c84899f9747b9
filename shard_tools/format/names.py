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
# shard pack's metadata member when a re-packed sample brings a .json of its own
# (kept byte for byte): the key's "shardflow.json".
OWN_META_EXT = "shardflow.json"

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


TAR_SUFFIXES = (".tar",)
COMPRESSED_TAR_SUFFIXES = (".tar.gz", ".tgz")


def is_tar_name(name: str) -> bool:
    """A webdataset shard by its name: ``.tar``, or gzip-compressed ``.tar.gz`` / ``.tgz``."""
    return name.lower().endswith(TAR_SUFFIXES + COMPRESSED_TAR_SUFFIXES)


def is_compressed_tar(name: str) -> bool:
    return name.lower().endswith(COMPRESSED_TAR_SUFFIXES)


def index_name(shard: str) -> str:
    """The ``.idx`` beside SHARD: its base name without ``.tar`` (``a.train.00001.tar`` ->
    ``a.train.00001.idx``), so shards whose names share a first part never share an index."""
    base = shard.rsplit("/", 1)[-1]
    return (base[: -len(".tar")] if base.lower().endswith(".tar") else base) + INDEX_SUFFIX
