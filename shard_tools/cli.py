"""The ``shard`` command: pack, adopt, verify, inspect, index, synth.

argv is parsed here and nowhere else. Bad options print one line naming the
option and exit 2; failures (bad data, unfinished destinations, mismatches)
print one line and exit 1. Storage credentials come from the standard AWS
variables or ``--profile`` and are never printed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import Any

from shard_tools import __version__


class UsageError(Exception):
    """An option value that parses but is invalid (exit 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _size(text: str) -> int:
    from shard_tools.config import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _add_storage(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--endpoint-url", help="S3 endpoint URL (default: from AWS_ENDPOINT_URL_S3 / AWS config)"
    )
    p.add_argument(
        "--profile", help="AWS profile name for s3:// URLs (default: the AWS default chain)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shard", description="Pack image datasets into verified webdataset tar shards."
    )
    parser.add_argument("--version", action="version", version=f"shard {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pack", help="pack images into tar shards + DALI .idx + manifest.json")
    p.add_argument(
        "src",
        nargs="+",
        metavar="SRC",
        help="class-folder tree, .csv/.jsonl/.parquet manifest, or tar glob/brace pattern(s)",
    )
    p.add_argument(
        "dest", metavar="DEST", help="local folder or fsspec URL (s3://bucket/prefix, ...)"
    )
    p.add_argument(
        "--max-count", type=int, default=10_000, help="samples per shard (default: %(default)s)"
    )
    p.add_argument(
        "--max-bytes",
        type=_size,
        default="256MB",
        help="bytes per shard file, e.g. 256MB (10^6), 1GiB (2^30) (default: 256MB)",
    )
    p.add_argument(
        "--shuffle",
        action="store_true",
        help="pack in a seeded random order (default: input order)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed for --shuffle and --fraction (default: %(default)s)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=0,
        help="worker processes; 0 = one per CPU, 1 = none; with --executor ray and no "
        "--ray-address, the CPUs of the local Ray instance (default: %(default)s)",
    )
    p.add_argument(
        "--resize-max-side",
        type=int,
        metavar="PX",
        help="downscale so the longer side is at most PX pixels (re-encodes)",
    )
    p.add_argument(
        "--quality",
        type=int,
        default=95,
        help="JPEG/WebP quality when re-encoding, 1-100 (default: %(default)s)",
    )
    p.add_argument(
        "--format",
        dest="image_format",
        choices=["keep", "jpeg", "webp"],
        default="keep",
        help="stored image format (default: keep the input bytes)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=89_478_485,
        help="reject images with more pixels, as decompression bombs (default: %(default)s)",
    )
    p.add_argument(
        "--classes", help="comma-separated class names to keep (labels renumbered 0..K-1)"
    )
    p.add_argument(
        "--fraction",
        type=float,
        help="keep this fraction of every class, chosen with --seed (0 < F <= 1)",
    )
    p.add_argument(
        "--no-validate",
        action="store_true",
        help="skip the full decode of images kept as they are (headers are still checked; CMYK, palette, alpha and 16-bit images are still converted to RGB)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="fail (exit 1, no manifest) on the first rejected input",
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted pack into DEST")
    p.add_argument(
        "--json", action="store_true", help="print a JSON summary instead of the summary line"
    )
    p.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="local: worker processes on this machine; ray: Ray tasks on a cluster "
        "(pip install 'shardflow[ray]'), each packing a chunk of the input straight to "
        "DEST, which every machine must reach (shared folder or s3://); on a cluster: "
        "`ray start --head` on one machine, `ray start --address HEAD:6379` on the others, "
        "then --executor ray --ray-address auto (default: %(default)s)",
    )
    p.add_argument(
        "--ray-address",
        help="Ray cluster for --executor ray: HOST:PORT of the head (e.g. :6379), auto on a "
        "cluster node, or ray://HOST:10001 from outside (needs ray[client]) "
        "(default: start a local Ray instance with --workers CPUs)",
    )
    p.add_argument(
        "--ray-chunk-size",
        type=_positive_int,
        default=0,
        metavar="N",
        help="inputs per Ray task; each chunk ends its last shard early, so the shards depend "
        "on N (recorded in the manifest); 0 = the smallest multiple of --max-count >= 10,000 "
        "(default: %(default)s)",
    )
    _add_labels(p, table=True)
    _add_storage(p)

    p = sub.add_parser(
        "adopt", help="make existing webdataset tars a dataset where they are (.idx + manifest)"
    )
    p.add_argument(
        "src",
        nargs="+",
        metavar="SRC",
        help="tar paths, URLs, globs or brace patterns ({000..099})",
    )
    p.add_argument(
        "--manifest-to",
        dest="dest",
        required=True,
        metavar="DEST",
        help="folder or URL for the manifest, .idx and .labels files (the tars stay where they are)",
    )
    p.add_argument(
        "--base-url",
        help="the URL shard names are relative to (default: the tars' deepest common folder)",
    )
    p.add_argument(
        "--hash",
        action="store_true",
        help="record each tar's sha256 (reads every byte; default: sizes and etags only)",
    )
    p.add_argument(
        "--workers",
        type=_positive_int,
        default=8,
        help="tars scanned at once, in threads (default: %(default)s)",
    )
    p.add_argument(
        "--json", action="store_true", help="print a JSON summary instead of the summary line"
    )
    _add_labels(p, table=False)
    _add_storage(p)

    p = sub.add_parser("verify", help="check shards against manifest.json (sizes, counts, sha256)")
    p.add_argument("dest", metavar="DEST", help="dataset folder or URL")
    p.add_argument("--decode", action="store_true", help="also decode every image fully")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    _add_storage(p)

    p = sub.add_parser("inspect", help="totals, classes, image sizes and shards of a dataset")
    p.add_argument("dest", metavar="DEST", help="dataset folder or URL")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--no-scan",
        action="store_true",
        help="manifest only: skip reading image sizes from the shards",
    )
    _add_storage(p)

    p = sub.add_parser("index", help="write DALI .idx files next to existing webdataset tars")
    p.add_argument(
        "tars", nargs="+", metavar="TARS", help="tar paths, URLs, globs or brace patterns"
    )
    _add_storage(p)

    p = sub.add_parser("synth", help="write a synthetic, learnable class-folder image dataset")
    p.add_argument("dest", metavar="DEST", help="folder to create")
    p.add_argument(
        "--classes", type=int, default=10, help="number of classes (default: %(default)s)"
    )
    p.add_argument(
        "--per-class", type=int, default=100, help="images per class (default: %(default)s)"
    )
    p.add_argument(
        "--size", type=int, default=32, help="image side in pixels (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed (default: %(default)s)")
    p.add_argument(
        "--format",
        dest="image_format",
        choices=["jpeg", "png"],
        default="jpeg",
        help="(default: %(default)s)",
    )
    return parser


def _add_labels(p: argparse.ArgumentParser, *, table: bool) -> None:
    where = (
        "cls = the tar samples' .cls member (any case), json:FIELD = a field of their .json "
        "(dotted for nested fields, e.g. json:meta.label)"
        + ("; for a CSV/JSONL/Parquet SRC the column name" if table else "")
        + " (default: class folders, the 'label' column, or cls)"
    )
    p.add_argument("--label", metavar="SPEC", help=f"where labels come from: {where}")
    p.add_argument(
        "--classes-from",
        metavar="FILE",
        help="class names in label order (one per line, a JSON list, or a JSON {name: label}); "
        "names are mapped through it and others rejected (default: the sorted names found)",
    )
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="no labels (image-text, self-supervised data): every label is -1",
    )
    p.add_argument(
        "--max-reject-fraction",
        type=float,
        default=0.5,
        metavar="F",
        help="fail (exit 1, no manifest) if more than this fraction of the inputs is rejected, "
        "or if nothing is kept (default: %(default)s)",
    )


def _storage(args: argparse.Namespace) -> dict[str, Any]:
    from shard_tools.storage import storage_options_from

    return storage_options_from(args.endpoint_url, args.profile)


def _cmd_pack(args: argparse.Namespace) -> int:
    from shard_tools.pack import pack

    src = args.src[0] if len(args.src) == 1 else tuple(args.src)
    with _usage_errors():
        config = _pack_config(args, src)
    result = pack(
        config, storage_options=_storage(args), progress=sys.stderr.isatty() and not args.json
    )
    from shard_tools.format import redact

    print(
        redact(json.dumps(result.summary(), sort_keys=True) if args.json else result.summary_line())
    )
    return 1 if args.strict and result.rejected else 0


@contextlib.contextmanager
def _usage_errors():
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _pack_config(args: argparse.Namespace, src: str | tuple[str, ...]):
    from shard_tools.config import PackConfig

    return PackConfig(
        src=src,
        dest=args.dest,
        max_count=args.max_count,
        max_bytes=args.max_bytes,
        shuffle=args.shuffle,
        seed=args.seed,
        workers=args.workers,
        resize_max_side=args.resize_max_side,
        quality=args.quality,
        image_format=args.image_format,
        validate=not args.no_validate,
        max_pixels=args.max_pixels,
        strict=args.strict,
        resume=args.resume,
        classes=tuple(args.classes.split(",")) if args.classes is not None else None,
        fraction=args.fraction,
        executor=args.executor,
        ray_address=args.ray_address,
        ray_chunk_size=args.ray_chunk_size,
        label=args.label or "",
        classes_from=args.classes_from,
        unlabelled=args.unlabelled,
        max_reject_fraction=args.max_reject_fraction,
    )


def _cmd_adopt(args: argparse.Namespace) -> int:
    from shard_tools.adopt import AdoptConfig, adopt
    from shard_tools.format import redact

    with _usage_errors():
        cfg = AdoptConfig(src=tuple(args.src), dest=args.dest, label=args.label or "",
                          classes_from=args.classes_from, unlabelled=args.unlabelled,
                          hash=args.hash, workers=args.workers, base_url=args.base_url,
                          max_reject_fraction=args.max_reject_fraction)  # fmt: skip
    result = adopt(
        cfg, storage_options=_storage(args), progress=sys.stderr.isatty() and not args.json
    )
    print(
        redact(json.dumps(result.summary(), sort_keys=True) if args.json else result.summary_line())
    )
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from shard_tools.verify import verify

    report = verify(args.dest, decode=args.decode, storage_options=_storage(args))
    if args.json:
        print(json.dumps(report.to_dict(), sort_keys=True))
    else:
        for problem in report.problems:
            print(problem)
        print(report.summary_line())
    return 0 if report.ok else 1


def _cmd_inspect(args: argparse.Namespace) -> int:
    from shard_tools.inspect import inspect_dataset, render

    info = inspect_dataset(args.dest, scan=not args.no_scan, storage_options=_storage(args))
    print(json.dumps(info, sort_keys=True, indent=1) if args.json else render(info))
    return 0


def _cmd_index(args: argparse.Namespace) -> int:
    from shard_tools.index import index_tars

    for tar_url, idx_url, samples in index_tars(args.tars, storage_options=_storage(args)):
        print(f"{idx_url}: {samples} samples ({tar_url})")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from shard_tools.synth import make_image_folder

    with _usage_errors():
        root = make_image_folder(
            args.dest,
            num_classes=args.classes,
            per_class=args.per_class,
            size=args.size,
            seed=args.seed,
            image_format=args.image_format,
        )
    print(f"wrote {args.classes * args.per_class} images in {args.classes} classes to {root}")
    return 0


COMMANDS = {
    "pack": _cmd_pack,
    "adopt": _cmd_adopt,
    "verify": _cmd_verify,
    "inspect": _cmd_inspect,
    "index": _cmd_index,
    "synth": _cmd_synth,
}


def _storage_errors() -> tuple[type[BaseException], ...]:
    # s3fs re-raises connection-level failures as botocore's own types, which are
    # not OSError; botocore is imported only once such a failure happens.
    try:
        from botocore.exceptions import BotoCoreError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError)


def _storage_urls(args: argparse.Namespace) -> str:
    """The URLs (scheme://...) among the command's sources and destination."""
    given: list[str] = []
    for name in ("src", "tars", "dest"):
        value = getattr(args, name, None)
        given += value if isinstance(value, list) else [value] if value else []
    urls = [u for u in given if "://" in u]
    return ", ".join(urls or given) or "the storage"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``shard`` console script; returns the exit status."""
    from shard_tools.adopt import AdoptError
    from shard_tools.format import CREDENTIALS_HINT, ManifestError, redact
    from shard_tools.inspect import InspectError
    from shard_tools.pack import PackError
    from shard_tools.resume import ResumeError
    from shard_tools.sources import SourceError

    args = build_parser().parse_args(argv)
    prog = f"shard {args.command}"

    def fail(message: str, status: int = 1) -> int:
        # Error text may quote a URL the user gave: never print its credentials.
        print(f"{prog}: error: {redact(message)}", file=sys.stderr)
        return status

    try:
        return COMMANDS[args.command](args)
    except UsageError as exc:
        return fail(str(exc), 2)
    except (PackError, ResumeError, SourceError, ManifestError, InspectError, AdoptError) as exc:
        return fail(str(exc))
    except FileNotFoundError as exc:
        return fail(f"not found: {exc.filename or exc}")
    except PermissionError as exc:
        # A local file has a name; an object store refusal (wrong secret) only says
        # "Forbidden", so name the storage URLs the command was given.
        where = exc.filename or f"{_storage_urls(args)} ({exc}); {CREDENTIALS_HINT}"
        return fail(f"permission denied: {where}")
    except _storage_errors() as exc:
        # Storage that still fails after the S3 client's own retries (unreachable,
        # connection reset, 503s): one line, and for pack the way to continue.
        hint = "; rerun with --resume to continue" if args.command == "pack" else ""
        cause = " ".join(str(exc).split())
        return fail(f"storage: {type(exc).__name__}: {cause}{hint}")
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (rerun pack with --resume to continue)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
