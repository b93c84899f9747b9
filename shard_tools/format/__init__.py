"""The shard format, defined once: writer and reader side by side.

What is a sample's key, which members belong to it, which extensions are
images: :mod:`~shard_tools.format.names` (webdataset's rule: the key is the
member name up to the first dot of its base name; consecutive members with one
key are one sample). How its bytes are laid out in a tar and read back:
:mod:`~shard_tools.format.tar`. The ``.idx`` beside each shard (DALI's v1.2
webdataset index): :mod:`~shard_tools.format.index`. The ``manifest.json`` that
makes a folder of shards a dataset, and its version:
:mod:`~shard_tools.format.manifest`; its per-shard table, stored as columns in
``manifest.shards``: :mod:`~shard_tools.format.table`. ``shard_tools`` writes with it and
``pipeline`` reads with it; nothing else defines any of it.
"""

from shard_tools.format.index import (
    IDX_VERSION,
    LABELS_SUFFIX,
    ShardIndex,
    index_line,
    index_text,
    labels_text,
    parse_index,
    parse_labels,
    slice_samples,
)
from shard_tools.format.manifest import (
    CREDENTIALS_HINT,
    FORMAT_VERSION,
    Manifest,
    ManifestError,
    ShardInfo,
    check_url,
    join_url,
    options_for,
    read_manifest,
    redact,
    write_manifest,
)
from shard_tools.format.names import (
    IMAGE_EXTS,
    INDEX_SUFFIX,
    INPUT_IMAGE_EXTS,
    LABEL_EXT,
    MANIFEST_NAME,
    META_EXT,
    OWN_META_EXT,
    REJECTED_NAME,
    SHARD_PATTERN,
    check_key,
    image_ext,
    index_name,
    is_compressed_tar,
    is_tar_name,
    member_name,
    shard_name,
    split_name,
)
from shard_tools.format.table import TABLE_NAME, ShardTable
from shard_tools.format.tar import (
    BLOCK,
    RECORD,
    Member,
    RawSample,
    TarFormatError,
    finished_size,
    iter_tar,
    padded,
    scan_samples,
    tar_header,
    tar_samples,
)

__all__ = [
    "BLOCK",
    "CREDENTIALS_HINT",
    "FORMAT_VERSION",
    "IDX_VERSION",
    "IMAGE_EXTS",
    "INDEX_SUFFIX",
    "INPUT_IMAGE_EXTS",
    "LABELS_SUFFIX",
    "LABEL_EXT",
    "MANIFEST_NAME",
    "META_EXT",
    "OWN_META_EXT",
    "RECORD",
    "REJECTED_NAME",
    "SHARD_PATTERN",
    "TABLE_NAME",
    "Manifest",
    "ManifestError",
    "Member",
    "RawSample",
    "ShardIndex",
    "ShardInfo",
    "ShardTable",
    "TarFormatError",
    "check_key",
    "check_url",
    "finished_size",
    "image_ext",
    "index_line",
    "index_name",
    "index_text",
    "iter_tar",
    "join_url",
    "labels_text",
    "member_name",
    "options_for",
    "padded",
    "parse_index",
    "parse_labels",
    "read_manifest",
    "redact",
    "scan_samples",
    "shard_name",
    "slice_samples",
    "is_compressed_tar",
    "is_tar_name",
    "split_name",
    "tar_header",
    "tar_samples",
    "write_manifest",
]
