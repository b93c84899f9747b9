"""shard_tools: the write side of shardflow (pack, verify, inspect, index).

``shard pack SRC DEST`` writes, in DEST (a folder or any fsspec URL):

- ``shard-NNNNNN.tar``: webdataset samples ``<key>.<ext>`` (the image),
  ``<key>.cls`` (the integer label in ASCII) and ``<key>.json`` (source,
  label, class, width, height, and any extra manifest columns under
  ``extra``). The key is the zero-padded position of the input in pack order
  (``0000000042``): unique, stable, sorting in pack order; rejected inputs
  leave gaps. Tar headers are fixed (mtime 0, uid/gid 0, no user names, mode
  0644, ustar), so the same input and options give the same bytes with any
  ``--workers``, after ``--resume``, and on any storage;
- ``shard-NNNNNN.idx``: DALI's webdataset index (v1.2, as ``wds2idx``
  writes it), built from the offsets the writer knows;
- ``rejected.jsonl``: ``{"path", "reason"}`` per input not packed;
- ``manifest.shards``: the per-shard table, column by column (format 3);
- ``manifest.json``, written last: the commit marker, with the totals and
  each table column's byte range and sha256.

The format (keys, members, tar layout, ``.idx``, manifest) is defined once,
writer and reader side by side, in ``shard_tools.format``; the pipeline reads
with it.

``--executor ray`` packs the input in chunks of ``--ray-chunk-size`` inputs
as Ray tasks (``pip install 'shardflow[ray]'``), each writing straight to
DEST, which every machine must reach (a shared folder or an object store);
the driver numbers the shards in input order and writes the manifest last.
Keys stay global input positions, and the output is byte-identical across
runs for one chunk size, but each chunk ends its last shard early, so the
shards match a local pack's only when the chunk size is a multiple of
``--max-count`` and no input is rejected (``ray_executor``). On a cluster, run
``ray start --head`` on one machine and ``ray start --address HEAD:6379`` on
the others, then ``shard pack SRC DEST --executor ray --ray-address auto``.

Design notes live with the code: what is kept or converted
(``validate``), how writes are made all-or-nothing on local disks and object
stores (``storage``), how an interrupted pack resumes (``resume``), why
worker processes come from a fork server (``pack``), and how Ray chunks are
numbered and merged (``ray_executor``).
"""

__version__ = "0.1.0"
