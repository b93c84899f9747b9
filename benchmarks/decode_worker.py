"""The decode-only baseline's worker task, in a module that imports nothing but PIL.

Pool workers import the module of the function they run. Defined next to the
suite, the task would drag in the harness and with it torch (about 1.5 s per
worker), and the baseline would be charged for an import instead of for
decoding.
"""

from __future__ import annotations

from PIL import Image


def decode_files(paths: list[str]) -> int:
    """Open and fully decode every file in PATHS; return how many."""
    for p in paths:
        with Image.open(p) as img:
            img.load()
    return len(paths)


def decode_files_turbo(paths: list[str]) -> int:
    """Decode every JPEG in PATHS with libjpeg-turbo (simplejpeg), as pack validation does."""
    import simplejpeg

    for p in paths:
        with open(p, "rb") as f:
            data = f.read()
        _, _, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        simplejpeg.decode_jpeg(data, colorspace="GRAY" if colorspace == "Gray" else "RGB")
    return len(paths)
