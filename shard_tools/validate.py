"""Per-sample work done in the worker processes: read, validate, maybe re-encode.

Keep-or-convert policy (so every downstream decoder, DALI or PIL, gets 8-bit
gray or RGB in a format it reads):

- JPEG, PNG and WebP in mode L (gray) or RGB are kept byte for byte;
- any other mode (CMYK/YCCK JPEG, palette, RGBA/LA, 16-bit, 1-bit) is
  converted to RGB: JPEG sources are re-encoded as JPEG (``--quality``), all
  others as lossless PNG. Alpha is dropped, not composited;
- ``--resize-max-side`` (downscale only) or ``--format jpeg|webp`` re-encode
  every image;
- other formats PIL can read (GIF, BMP, TIFF, ...) are rejected as unsupported.

The stored extension follows the stored bytes (``jpg``, ``png``, ``webp``),
not the input file name, because readers pick decoders by extension. EXIF
orientation is kept as metadata and not applied.

Validation opens the header, refuses images above ``max_pixels`` before
allocating them (decompression bombs), then decodes every pixel: JPEGs that
are kept as they are with libjpeg-turbo (``simplejpeg``), everything else, and
anything libjpeg-turbo does not accept outright, with PIL.
``--no-validate`` skips only that full decode of images kept as they are
(and, for large local files, reads just the header: the writer reads the
bytes once, by reference); images in other modes are still converted.
"""

from __future__ import annotations

import io
import json
import os
import signal
import stat
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any

import fsspec
from PIL import Image, ImageFile, UnidentifiedImageError

from shard_tools.format import LABEL_EXT, META_EXT, OWN_META_EXT, redact
from shard_tools.sources import Item, TarRef
from shard_tools.storage import options_for
from shard_tools.tarwrite import FileRef, sample_chunk

try:  # libjpeg-turbo without PIL's Python header parser; optional, PIL does all without it
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency, but packing works without it
    simplejpeg = None

EXT_OF = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# JPEG colour spaces kept as they are (8-bit gray or RGB), and how to decode them.
_KEPT_JPEG_COLORSPACES = {"Gray": "GRAY", "YCbCr": "RGB", "RGB": "RGB"}
KEEP_MODES = ("L", "RGB")
# Kept local images at least this large go to the writer as a FileRef (the
# writer re-reads them from the page cache) instead of through the pipe.
BY_REFERENCE_MIN_BYTES = 32 * 1024
# --no-validate reads this much of a large JPEG for its header (EXIF and ICC
# segments come first and may be long; a header beyond it goes to PIL).
JPEG_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True, kw_only=True)
class WorkerOptions:
    """What a worker needs to turn an Item into tar members (picklable)."""

    class_names: tuple[str, ...]
    validate: bool = True
    max_pixels: int = 89_478_485
    resize_max_side: int | None = None
    quality: int = 95
    image_format: str = "keep"
    storage_options: dict[str, Any] | None = None


class Rejected(Exception):
    """This input cannot be packed; the message is the reason."""


# (pos, label, tar chunk) for a packed sample, (pos, None, reason) for a rejected one.
# The key is the zero-padded input position: unique, stable, sorting in pack order.
Result = tuple[int, int | None, Any]

_TAR_HANDLES: dict[str, Any] = {}


def configure_pil() -> tuple[Any, bool]:
    """Our PIL settings (we check pixel counts ourselves and never load
    truncated data); returns the previous ones for :func:`restore_pil`."""
    previous = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    return previous


def restore_pil(previous: tuple[Any, bool]) -> None:
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = previous


def init_worker(environ: dict[str, str] | None = None, packer_pid: int | None = None) -> None:
    """Set up a pool worker process.

    ENVIRON is the parent's environment at pool start: a fork-server child
    would otherwise see the environment of the moment the server started
    (stale AWS_* variables, for instance). PACKER_PID: exit when the packer
    is gone (pool workers otherwise outlive a SIGKILLed packer forever).
    """
    # Ctrl-C reaches the whole process group: the packer handles it and
    # stops the pool; a worker dying mid-task would only break the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if environ is not None and environ != os.environ:
        os.environ.clear()
        os.environ.update(environ)
    configure_pil()
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    if packer_pid is not None:
        threading.Thread(target=_exit_without, args=(packer_pid, os.getppid()), daemon=True).start()


def _exit_without(packer_pid: int, parent_pid: int) -> None:
    while True:
        time.sleep(0.5)
        try:
            os.kill(packer_pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            os._exit(1)  # the pid now belongs to another user: the packer is gone
        if os.getppid() != parent_pid:
            os._exit(1)


# Where bytes came from when that was a local file: (path, offset, (st_size, st_mtime_ns)).
Origin = tuple[str, int, tuple[int, int]] | None


def close_handles() -> None:
    """Close the tar files this process keeps open between samples."""
    for f in _TAR_HANDLES.values():
        f.close()
    _TAR_HANDLES.clear()


def _local_tar(path: str):
    f = _TAR_HANDLES.get(path)
    if f is None:
        if len(_TAR_HANDLES) > 8:
            for old in _TAR_HANDLES.values():
                old.close()
            _TAR_HANDLES.clear()
        f = _TAR_HANDLES[path] = open(path, "rb")  # noqa: SIM115 - cached across samples
    return f


def open_local(path: str):
    """Open a local input file for reading; refuse anything but a regular file.

    A FIFO named like an image would block ``open()`` (and the whole pack)
    until some writer appears, and a device can be read forever: open without
    blocking, look at what it is, and only then read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise Rejected("not a file")
        if not stat.S_ISREG(mode):
            raise Rejected("not a regular file (a FIFO, socket or device)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(ref: str | TarRef, storage_options: dict[str, Any] | None) -> tuple[bytes, Origin]:
    """The raw bytes of one input (a file, a URL or a tar member) and, if local, their origin."""
    try:
        if isinstance(ref, TarRef):
            local = "://" not in ref.url
            if local:
                f = _local_tar(ref.url)
            else:
                f = _TAR_HANDLES.get(ref.url)
                if f is None:
                    f = fsspec.open(ref.url, "rb", **options_for(ref.url, storage_options)).open()
                    _TAR_HANDLES[ref.url] = f
            f.seek(ref.offset)
            data = f.read(ref.size)
            if len(data) != ref.size:
                raise Rejected(f"tar member truncated ({len(data)} of {ref.size} bytes)")
            if not local:
                return data, None
            st = os.fstat(f.fileno())
            return data, (ref.url, ref.offset, (st.st_size, st.st_mtime_ns))
        if "://" not in ref:
            with open_local(ref) as f:
                st = os.fstat(f.fileno())
                return f.read(), (ref, 0, (st.st_size, st.st_mtime_ns))
        with fsspec.open(ref, "rb", **options_for(ref, storage_options)) as f:
            return f.read(), None
    except PermissionError:
        raise Rejected("unreadable: permission denied") from None
    except FileNotFoundError:
        raise Rejected("missing: file not found") from None
    except IsADirectoryError:
        raise Rejected("not a file") from None
    except OSError as exc:
        raise Rejected(f"unreadable: {exc.strerror or exc}") from None


def _encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        img.save(out, "JPEG", quality=quality)
    elif fmt == "WEBP":
        img.save(out, "WEBP", quality=quality, method=4)
    else:
        img.save(out, "PNG")
    return out.getvalue()


def open_header(fp: Any, opts: WorkerOptions) -> Image.Image:
    """Open an image's header and check its format and pixel count (nothing decoded yet)."""
    try:
        img = Image.open(fp)
    except UnidentifiedImageError:
        raise Rejected("not an image (unrecognised format)") from None
    except Exception as exc:  # PIL raises many types on hostile headers
        raise Rejected(f"undecodable header: {type(exc).__name__}: {exc}") from None
    if img.format not in EXT_OF:
        raise Rejected(f"unsupported format {img.format} (packable: JPEG, PNG, WebP)")
    width, height = img.size
    if width * height > opts.max_pixels:
        raise Rejected(
            f"decompression bomb: {width}x{height} = {width * height} pixels > --max-pixels {opts.max_pixels}"
        )
    return img


def _turbo_header(data: bytes, opts: WorkerOptions) -> tuple[int, int, str] | None:
    """(width, height, colour space) of a JPEG as TurboJPEG reads its header (DATA
    may be just the file's first bytes); None where PIL should look: not a
    JPEG, a header TurboJPEG cannot read, or too many pixels (PIL rejects those
    with the usual reason)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8\xff"):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return None if width * height > opts.max_pixels else (width, height, colorspace)


def _kept_jpeg(data: bytes, opts: WorkerOptions) -> tuple[str, bytes, int, int] | None:
    """A JPEG kept byte for byte, validated by libjpeg-turbo directly; None: ask PIL.

    PIL parses JPEG headers in Python, which costs more than decoding a small
    image; TurboJPEG reads the header and decodes every pixel in C (a 32 px
    CIFAR image: about 11 us against 90 us). Anything it does not accept
    outright (a warning in strict mode, a subsampling its header call cannot
    name, CMYK/YCCK that is converted anyway) goes to the PIL path, which gives
    the verdict and the reason: the set of packed images is PIL's set.
    """
    header = _turbo_header(data, opts) if opts.image_format == "keep" else None
    if header is None or header[2] not in _KEPT_JPEG_COLORSPACES:
        return None
    width, height, colorspace = header
    if opts.resize_max_side is not None and max(width, height) > opts.resize_max_side:
        return None
    if opts.validate:
        try:
            simplejpeg.decode_jpeg(data, colorspace=_KEPT_JPEG_COLORSPACES[colorspace], strict=True)
        except ValueError:
            return None
    return "jpg", data, width, height


def image_member(data: bytes, opts: WorkerOptions) -> tuple[str, bytes, int, int]:
    """Validate (and maybe convert) one image: (ext, bytes, width, height) or Rejected."""
    if not data:
        raise Rejected("empty file (0 bytes)")
    kept = _kept_jpeg(data, opts)
    if kept is not None:
        return kept
    img = open_header(io.BytesIO(data), opts)
    fmt = img.format
    width, height = img.size
    # The mode is in the header: --no-validate skips the decode of images kept as
    # they are, never the conversion (which has to decode anyway).
    convert = img.mode not in KEEP_MODES
    resize = opts.resize_max_side is not None and max(width, height) > opts.resize_max_side
    kept = not (convert or resize or opts.image_format != "keep")
    if kept and not opts.validate:
        return EXT_OF[fmt], data, width, height
    try:
        img.load()
    except Exception as exc:
        raise Rejected(f"undecodable: {type(exc).__name__}: {exc}") from None
    if kept:
        return EXT_OF[fmt], data, width, height
    target = {"jpeg": "JPEG", "webp": "WEBP"}.get(opts.image_format)
    if target is None:
        target = fmt if not convert else ("JPEG" if fmt == "JPEG" else "PNG")
    if convert or (target == "WEBP" and img.mode != "RGB"):
        img = img.convert("RGB")
    if resize:
        scale = opts.resize_max_side / max(width, height)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return EXT_OF[target], _encode(img, target, opts.quality), img.width, img.height


def _header_only(ref: str | TarRef, opts: WorkerOptions) -> tuple[str, int, int, FileRef] | None:
    """--no-validate on a large local file: read its header only, and let the writer
    read the bytes (once) by reference. None where this does not apply."""
    if not isinstance(ref, str) or "://" in ref:
        return None
    try:
        with open_local(ref) as f:
            st = os.fstat(f.fileno())
            if st.st_size < BY_REFERENCE_MIN_BYTES:
                return None
            stamp = (st.st_size, st.st_mtime_ns)
            header = _turbo_header(f.read(JPEG_HEADER_BYTES), opts)
            if header is not None:
                if header[2] not in _KEPT_JPEG_COLORSPACES:
                    return None  # CMYK/YCCK: converted on the full path
                return "jpg", header[0], header[1], FileRef(ref, 0, st.st_size, stamp)
            f.seek(0)
            img = open_header(f, opts)
            if img.mode not in KEEP_MODES:
                return None  # converted on the full path
            return EXT_OF[img.format], img.width, img.height, FileRef(ref, 0, st.st_size, stamp)
    except OSError:
        return None  # the full read reports it with the usual reasons


def process(pos: int, item: Item, opts: WorkerOptions) -> Result:
    """Turn one input into its tar members, or into a rejection reason."""
    file_ref = None
    try:
        header_only = None if opts.validate else _header_only(item.ref, opts)
        if header_only is not None:
            ext, width, height, file_ref = header_only
            payload = b""  # the writer reads the file itself
        else:
            data, origin = read_bytes(item.ref, opts.storage_options)
            ext, payload, width, height = image_member(data, opts)
            if origin is not None and payload is data and len(data) >= BY_REFERENCE_MIN_BYTES:
                file_ref = FileRef(origin[0], origin[1], len(data), origin[2])
    except Rejected as exc:
        return pos, None, redact(str(exc))  # a reason may quote the input's URL
    try:
        kept = [(e, read_bytes(ref, opts.storage_options)[0]) for e, ref in item.keep]
    except Rejected as exc:
        return pos, None, redact(f"a member to keep cannot be read: {exc}")
    labelled = item.label >= 0
    meta: dict[str, Any] = {
        "source": item.source,
        "label": item.label,
        "class": opts.class_names[item.label] if labelled else None,
        "width": width,
        "height": height,
    }
    if item.extra:
        meta["extra"] = item.extra
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    members = [(ext, payload)]
    if labelled:
        members.append((LABEL_EXT, str(item.label).encode("ascii")))
    members += kept  # byte for byte, under their own names (captions, the source's .json)
    taken = {e.lower() for e, _ in kept}
    members.append((META_EXT if META_EXT not in taken else OWN_META_EXT, text.encode("utf-8")))
    return pos, item.label, sample_chunk(f"{pos:010d}", members, file_ref=file_ref)


def process_batch(start: int, items: list[Item], opts: WorkerOptions) -> list[Result]:
    """Process consecutive items START, START+1, ... (one task per batch keeps IPC cheap)."""
    return [process(start + i, item, opts) for i, item in enumerate(items)]
