"""scale: what web-scale shard and sample counts cost the loader, ``shard adopt`` and the planner.

1. Many shards. Tiny generated shards (``--per-shard`` samples of an 8x8 JPEG
   and a label each), 10 / 1,000 / 10,000 / 100,000 of them. In a fresh process
   per case: seconds from ``build_loader`` to the first batch, and the loader's
   resident memory once it has handed that batch out (RSS after minus RSS before
   building it). Compared with the 10-shard case: the first batch should take
   at most 2x as long at 100,000 shards and memory grow by < 100 bytes per shard.
2. Adopt. ``shard adopt`` over tars on a SeaweedFS S3 server (loopback), in
   shards/s, beside reading the same tars whole from it (what any scan must read).
3. Planning. ``plan_rank`` (one rank's order for an epoch) at 10^6, 10^7 and 10^8
   samples (10,000 per shard, 8 ranks, shuffle buffer 4,096 starting at 2 batches, the
   loader's default), fresh and after an
   elastic resume (4 ranks had taken 30% of the epoch), beside the one-input-at-a-
   time shuffle buffer of earlier versions (at 10^6 and 10^7; goal: <= 5 s at 10^8).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks import data
from benchmarks.harness import Measurement

SHARD_COUNTS = (10, 1_000, 10_000, 100_000)
QUICK_SHARD_COUNTS = (10, 1_000)
PLAN_SAMPLES = (10**6, 10**7, 10**8)
QUICK_PLAN_SAMPLES = (10**5, 10**6)
PLAN_WORLD, PLAN_BATCH, PLAN_BUFFER, PER_SHARD = 8, 256, 4096, 10_000
REPO = Path(__file__).resolve().parents[1]


def add_arguments(parser) -> None:
    parser.add_argument(
        "--per-shard", type=int, default=10, help="samples per tiny shard (default: %(default)s)"
    )
    parser.add_argument("--adopt-shards", type=int, default=2_000,
                        help="tars on the S3 server for the adopt figure (default: %(default)s)")  # fmt: skip
    parser.add_argument("--no-s3", action="store_true", help="skip the adopt-from-S3 figure")
    data.add_work_dir_argument(parser)


def _tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 127, dtype=np.uint8)).save(buf, "JPEG", quality=50)
    return buf.getvalue()


def tiny_dataset(root: Path, shards: int, per_shard: int) -> Path:
    """SHARDS shards of PER_SHARD tiny samples, written with the format's writer (a pack
    of 10^6 one-pixel images would time the decoder, not the layout)."""
    from shard_tools.format import (
        MANIFEST_NAME,
        Manifest,
        ShardInfo,
        index_name,
        shard_name,
        write_manifest,
    )
    from shard_tools.tarwrite import ShardTarWriter

    if (root / MANIFEST_NAME).exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    image = _tiny_jpeg()
    infos = []
    for s in range(shards):
        name = shard_name(s)
        with open(root / name, "wb") as f:
            writer = ShardTarWriter(f)
            for i in range(per_shard):
                writer.add(
                    f"{s * per_shard + i:010d}", [("jpg", image), ("cls", str(i % 10).encode())]
                )
            idx = writer.finish()
        (root / index_name(name)).write_text(idx)
        infos.append(ShardInfo(name=name, samples=per_shard, bytes=writer.bytes_written, sha256="",
                               index=index_name(name)))  # fmt: skip
    manifest = Manifest(shards=tuple(infos), classes={str(c): c for c in range(10)},
                        samples=shards * per_shard, bytes=sum(i.bytes for i in infos))  # fmt: skip
    write_manifest(lambda name, data: (root / name).write_bytes(data), manifest)
    return root


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def probe(root: str) -> dict[str, float]:
    """In this (fresh) process: seconds to the first batch and the loader's RSS growth."""
    import gc

    import torchvision.io  # noqa: F401  (imported before the clock: not the loader's cost)
    import torchvision.transforms.v2  # noqa: F401

    from pipeline import (
        LoaderConfig,
        World,
        build_loader,
        torch_backend,  # noqa: F401
    )

    cfg = LoaderConfig(data=root, backend="torch", num_workers=0, batch_size=32, image_size=8,
                       recipe="small", seed=0)  # fmt: skip
    gc.collect()
    before = _rss_bytes()
    t0 = time.perf_counter()
    loader = build_loader(cfg, World(rank=0, world_size=8))
    batch = next(iter(loader))
    first_s = time.perf_counter() - t0
    gc.collect()
    after = _rss_bytes()
    assert len(batch) == 32
    loader.close()
    return {"first_batch_s": first_s, "rss_bytes": after - before}


def _probe_in_fresh_process(root: Path) -> dict[str, float]:
    code = "import json, sys; from benchmarks.scale import probe; print(json.dumps(probe(sys.argv[1])))"
    out = subprocess.run([sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def _value(
    name: str, unit: str, values: list[float], baseline: str | None = None, **params
) -> Measurement:
    return Measurement(
        name=name, unit=unit, items=1, values=values, baseline=baseline, params=params
    )


def _many_shards(
    work: Path, counts, per_shard: int, repeats: int, notes: dict
) -> list[Measurement]:
    roots = {}
    for n in counts:
        t = time.perf_counter()
        roots[n] = tiny_dataset(work / f"tiny-{n}x{per_shard}", n, per_shard)
        print(f"-- {n:,} tiny shards ready in {time.perf_counter() - t:.0f} s", flush=True)
    first: dict[int, list[float]] = {n: [] for n in counts}
    rss: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(repeats):  # interleaved rounds: load on the machine hits every case alike
        for n in counts:
            got = _probe_in_fresh_process(roots[n])
            first[n].append(got["first_batch_s"])
            rss[n].append(got["rss_bytes"])
            print(f"  {n:,} shards, round {r + 1}: first batch {got['first_batch_s']:.3f} s, "
                  f"loader RSS {got['rss_bytes'] / 2**20:.1f} MiB", flush=True)  # fmt: skip
    base = counts[0]
    out = []
    for n in counts:
        out.append(
            _value(
                f"first-batch/{n}-shards",
                "s",
                first[n],
                None if n == base else f"first-batch/{base}-shards",
                shards=n,
            )
        )
        out.append(
            _value(
                f"loader-rss/{n}-shards",
                "MiB",
                [b / 2**20 for b in rss[n]],
                None if n == base else f"loader-rss/{base}-shards",
                shards=n,
            )
        )
        if n != base:
            grow = (float(np.median(rss[n])) - float(np.median(rss[base]))) / (n - base)
            notes[f"RSS growth per shard, {base} -> {n:,} shards (bytes)"] = round(grow, 1)
    notes["many-shards goals"] = (
        "first batch at 100,000 shards <= 2x the 10-shard time; RSS growth < 100 B per shard"
    )
    return out


def _adopt_from_s3(work: Path, shards: int, per_shard: int, repeats: int) -> list[Measurement]:
    import fsspec

    from shard_tools import s3_server
    from shard_tools.adopt import AdoptConfig, adopt

    root = tiny_dataset(work / f"tiny-{shards}x{per_shard}", shards, per_shard)
    shutil.rmtree(work / "s3", ignore_errors=True)
    server = s3_server.start(work / "s3", bucket="scale")
    try:
        opts = server.storage_options()
        fs = fsspec.filesystem("s3", **opts)
        prefix = "scale/tars"
        tars = sorted(str(p) for p in root.glob("shard-*.tar"))
        fs.put(tars, f"{prefix}/")
        urls = [f"s3://{prefix}/{Path(t).name}" for t in tars]
        mb = sum(Path(t).stat().st_size for t in tars) / 1e6
        raw, scan = [], []
        for r in range(repeats):
            t = time.perf_counter()
            fs.cat(urls)  # every byte once, 32 requests in flight (s3fs's batching)
            raw.append(time.perf_counter() - t)
            dest = work / f"adopted-{r}"
            shutil.rmtree(dest, ignore_errors=True)
            t = time.perf_counter()
            adopt(AdoptConfig(src=(f"s3://{prefix}/*.tar",), dest=str(dest), workers=16),
                  storage_options=opts, progress=False)  # fmt: skip
            scan.append(time.perf_counter() - t)
            print(f"  adopt round {r + 1}: {shards / scan[-1]:,.0f} shards/s "
                  f"(whole reads: {shards / raw[-1]:,.0f} shards/s)", flush=True)  # fmt: skip
    finally:
        s3_server.stop(server)
    params = {"shards": shards, "mb": round(mb, 1), "per_shard": per_shard}
    read = Measurement(
        name="s3/read-whole-tars", unit="shards/s", items=shards, seconds=raw, params=params
    )
    adopted = Measurement(name="s3/shard-adopt", unit="shards/s", items=shards, seconds=scan,
                          params=params, baseline=read.name)  # fmt: skip
    return [read, adopted]


def _plans(samples, repeats: int) -> list[Measurement]:
    from pipeline import order as order_mod
    from pipeline.order import Generation, plan_rank

    out = []
    for total in samples:
        sizes = [PER_SHARD] * (total // PER_SHARD)
        consumed = int(0.3 * total / (4 * PLAN_BATCH))
        cases = {"fresh": [], "elastic": [Generation(4, PLAN_BATCH, consumed)]}
        for kind, history in cases.items():

            def run(history=history, sizes=sizes):
                t = time.perf_counter()  # initial: where the loader's buffer starts by default
                plan_rank(sizes, epoch=0, seed=0, policy="pad", shuffle=True, buffer=PLAN_BUFFER,
                          history=history, world_size=PLAN_WORLD, batch_size=PLAN_BATCH, rank=3,
                          initial=2 * PLAN_BATCH)  # fmt: skip
                return time.perf_counter() - t

            secs = [run() for _ in range(repeats)]
            name = f"plan/{total:.0e}-samples/{kind}"
            ref_name = None
            if total <= 10**7:  # the loop of earlier versions, in the same run
                fast = order_mod.shuffle_buffer_order, order_mod._remaining_stream
                order_mod.shuffle_buffer_order = order_mod._reference_shuffle_buffer_order
                order_mod._remaining_stream = order_mod._reference_remaining_stream
                try:
                    ref = [run() for _ in range(max(1, repeats // 2))]
                finally:
                    order_mod.shuffle_buffer_order, order_mod._remaining_stream = fast
                ref_name = f"{name}/one-at-a-time"
                out.append(_value(ref_name, "s", ref, samples=total))
            out.append(_value(name, "s", secs, ref_name, samples=total, world_size=PLAN_WORLD))
            print(f"  plan {total:,} samples ({kind}): {np.median(secs):.2f} s", flush=True)
    return out


def run(args) -> tuple[list[Measurement], dict]:
    notes: dict = {"load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    counts = QUICK_SHARD_COUNTS if args.quick else SHARD_COUNTS
    with data.work_dir(args.work_dir, "scale") as work:
        results = _many_shards(work, counts, args.per_shard, args.repeats, notes)
        if not args.no_s3:
            n = min(args.adopt_shards, 200) if args.quick else args.adopt_shards
            results += _adopt_from_s3(work, n, args.per_shard, args.repeats)
    results += _plans(QUICK_PLAN_SAMPLES if args.quick else PLAN_SAMPLES, args.repeats)
    notes["plan setup"] = (f"{PER_SHARD:,} samples per shard, {PLAN_WORLD} ranks, batch {PLAN_BATCH}, "
                           f"buffer {PLAN_BUFFER}; elastic: 4 ranks took 30% of the epoch first")  # fmt: skip
    notes["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    return results, notes
