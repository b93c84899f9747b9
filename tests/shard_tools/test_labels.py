"""Manifest labels keep their kind, bad rows are rejected or named, --no-validate converts."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image
from shardtest_helpers import read_rejected

from shard_tools import labels
from shard_tools.cli import main
from shard_tools.config import PackConfig
from shard_tools.pack import pack
from shard_tools.sources import SourceError, list_source


def _write(table, rows, fmt):
    if fmt == "csv":
        names = sorted({k for r in rows for k in r})
        with open(table, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(rows)
    elif fmt == "jsonl":
        table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), table)


def _jpgs(src):
    return [str(p.relative_to(src)) for p in sorted(src.rglob("*.jpg"))]


def test_resolve_kinds():
    where = [f"row {i}" for i in range(6)]
    r = labels.resolve([3, "2", 3.0, "10", " 0 ", "1.0"], where)
    assert r.labels == [3, 2, 3, 10, 0, 1]
    assert r.classes == {str(k): k for k in range(11)}
    r = labels.resolve(["cat", None, "dog", "", float("nan"), "cat"], where)
    assert r.classes == {"cat": 0, "dog": 1}
    assert r.labels == [0, None, 1, None, None, 0]
    assert [bool(x) for x in r.reasons] == [False, True, False, True, True, False]
    with pytest.raises(labels.LabelError, match=r"row 2: label 'cat' mixes with row 0's 3"):
        labels.resolve([3, 4, "cat"], where[:3])
    with pytest.raises(labels.LabelError, match=r"row 1: label 2.5 is not a whole number"):
        labels.resolve([1, "2.5"], where[:2])
    with pytest.raises(labels.LabelError, match=r"row 0: label -1 is negative"):
        labels.resolve([-1, 2], where[:2])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_integer_labels_stay_integers_and_missing_rows_are_rejected(small_src, tmp_path, fmt):
    """Labels 0..11 as the format stores them, one float-looking and one missing: the
    classes are the integers (not text-sorted names), the missing row is rejected."""
    paths = _jpgs(small_src)[:13]
    if fmt == "parquet":
        values = [float(i) for i in range(12)] + [None]  # a nullable float column
    elif fmt == "csv":
        values = [str(i) for i in range(11)] + ["11.0", ""]
    else:
        values = [*range(11), 11.0, None]
    rows = [{"path": p, "label": v} for p, v in zip(paths, values, strict=True)]
    table = small_src / f"list.{fmt}"
    _write(table, rows, fmt)
    src = list_source(str(table))
    assert src.classes == {str(i): i for i in range(12)}
    assert [it.label for it in src.items] == list(range(12))
    assert [p for p, _ in src.rejected] == [paths[12]]
    dest = tmp_path / "out"
    m = pack(PackConfig(src=str(table), dest=str(dest), workers=1), progress=False).manifest
    assert m.samples == 12 and m.classes == {str(i): i for i in range(12)}
    got = sorted(int(s["cls"]) for s in wds.WebDataset(str(dest / "shard-000000.tar")))
    assert got == list(range(12))
    reason = read_rejected(dest)[paths[12]]
    assert "label" in reason and str(table) in reason


def test_mixed_labels_name_the_row(small_src, capsys):
    paths = _jpgs(small_src)
    table = small_src / "mixed.csv"
    rows = [{"path": p, "label": i % 3} for i, p in enumerate(paths[:5])]
    rows.append({"path": paths[5], "label": "class02"})
    _write(table, rows, "csv")
    with pytest.raises(SourceError, match=rf"{table} line 7: label 'class02' mixes"):
        list_source(str(table))
    assert main(["pack", str(table), str(small_src.parent / "out")]) == 1
    err = capsys.readouterr().err
    assert "line 7" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_jsonl_rows_without_path_or_label(small_src, tmp_path):
    paths = _jpgs(small_src)
    table = small_src / "holes.jsonl"
    lines = [
        json.dumps({"path": paths[0], "label": "class00"}),
        json.dumps({"label": "class01"}),  # no path
        "",
        json.dumps({"path": paths[1]}),  # no label
        json.dumps({"path": paths[2], "label": "class02"}),
    ]
    table.write_text("\n".join(lines) + "\n")
    src = list_source(str(table))
    assert [it.source for it in src.items] == [paths[0], paths[2]]
    assert src.classes == {"class00": 0, "class02": 1}
    assert dict(src.rejected) == {
        f"{table} line 2": "row has no path",
        paths[1]: f"no label ({table} line 4)",
    }
    dest = tmp_path / "out"
    assert main(["pack", str(table), str(dest), "--workers", "1"]) == 0
    assert set(read_rejected(dest)) == {f"{table} line 2", paths[1]}
    broken = small_src / "broken.jsonl"
    broken.write_text(lines[0] + "\n{not json\n")
    with pytest.raises(SourceError, match=rf"{broken} line 2: not JSON"):
        list_source(str(broken))


def test_reshard_with_an_unreadable_neighbour_manifest(small_src, tmp_path):
    first = tmp_path / "first"
    pack(PackConfig(src=str(small_src), dest=str(first), workers=1), progress=False)
    (first / "manifest.json").write_text('{"format_version": 1, "shards": [')
    with pytest.raises(SourceError, match="manifest.json is not valid JSON.*remove it"):
        list_source(str(first / "*.tar"))
    (first / "manifest.json").unlink()
    assert list_source(str(first / "*.tar")).classes == {"0": 0, "1": 1, "2": 2}


def _image(mode: str, size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    img = rgb.convert("L").convert("I;16") if mode == "I;16" else rgb.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


ODD_MODES = {
    "cmyk.jpg": ("CMYK", (20, 14), "JPEG"),
    "cmyk_big.jpg": ("CMYK", (400, 300), "JPEG"),  # > 32 KiB: the header-only path
    "rgba.png": ("RGBA", (20, 14), "PNG"),
    "rgba_big.png": ("RGBA", (200, 150), "PNG"),
    "palette.png": ("P", (20, 14), "PNG"),
    "la.png": ("LA", (20, 14), "PNG"),
    "deep.png": ("I;16", (20, 14), "PNG"),
    "rgb.jpg": ("RGB", (400, 300), "JPEG"),
    "gray.png": ("L", (20, 14), "PNG"),
}


def test_no_validate_converts_modes_like_the_validated_pack(tmp_path):
    src = tmp_path / "src" / "odd"
    src.mkdir(parents=True)
    for i, (name, (mode, size, fmt)) in enumerate(ODD_MODES.items()):
        (src / name).write_bytes(_image(mode, size, fmt, seed=i))
    assert (src / "cmyk_big.jpg").stat().st_size > 32 * 1024
    shards = {}
    for validate in (True, False):
        dest = tmp_path / f"out-{validate}"
        pack(
            PackConfig(src=str(src.parent), dest=str(dest), workers=1, validate=validate),
            progress=False,
        )
        shards[validate] = {
            json.loads(s["json"])["source"]: s
            for s in wds.WebDataset(str(dest / "shard-000000.tar"), shardshuffle=False)
        }
    assert shards[True].keys() == shards[False].keys() == {f"odd/{n}" for n in ODD_MODES}
    for source, sample in shards[False].items():
        ext = next(e for e in ("jpg", "png", "webp") if e in sample)
        assert Image.open(io.BytesIO(sample[ext])).mode in ("L", "RGB"), source
        assert sample[ext] == shards[True][source][ext], source
