"""The synthetic dataset: deterministic, class folders, decodable images."""

from __future__ import annotations

import hashlib

from PIL import Image

from shard_tools.cli import main
from shard_tools.synth import class_names, make_image_folder


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_folder_layout_and_determinism(tmp_path):
    a = make_image_folder(tmp_path / "a", num_classes=3, per_class=4, size=16, seed=7)
    b = make_image_folder(tmp_path / "b", num_classes=3, per_class=4, size=16, seed=7)
    c = make_image_folder(tmp_path / "c", num_classes=3, per_class=4, size=16, seed=8)
    assert sorted(p.name for p in a.iterdir()) == class_names(3)
    files = sorted(a.rglob("*.jpg"))
    assert len(files) == 12
    with Image.open(files[0]) as img:
        img.load()
        assert img.size == (16, 16) and img.mode == "RGB"
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_png_and_cli(tmp_path, capsys):
    assert (
        main(
            ["synth", str(tmp_path / "s"), "--classes", "2", "--per-class", "3", "--format", "png"]
        )
        == 0
    )
    assert len(list((tmp_path / "s").rglob("*.png"))) == 6
    assert "6 images" in capsys.readouterr().out
