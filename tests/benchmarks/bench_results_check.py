"""Checks shared by the benchmark CLI tests: a suite's result files are well-formed."""

from __future__ import annotations

import json
import math
from pathlib import Path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    """PATH starts with the PNG signature and an IHDR chunk of non-zero size."""
    head = path.read_bytes()[:24]
    # Signature, then the IHDR chunk with a non-zero width and height.
    return (
        head[:8] == PNG_MAGIC
        and head[12:16] == b"IHDR"
        and int.from_bytes(head[16:20], "big") > 0
        and int.from_bytes(head[20:24], "big") > 0
    )


def check_results(out: Path, suite: str) -> dict:
    """The suite's JSON/Markdown/PNG under OUT are there and well-formed; returns the JSON."""
    (path,) = out.glob(f"{suite}_*.json")
    payload = json.loads(path.read_text())
    assert payload["suite"] == suite
    env = payload["environment"]
    for key in ("date", "git_sha", "cpu_model", "cpu_count", "versions", "gpu"):
        assert key in env, key
    assert {"torch", "torchvision", "nvidia.dali", "webdataset"} <= set(env["versions"])
    results = payload["results"]
    assert results, f"{suite}: no measurements"
    names = {r["name"] for r in results}
    assert len(names) == len(results), f"{suite}: duplicate measurement names"
    for r in results:
        # A rate has its timed seconds; a plain figure (seconds to a first batch, MiB) its values.
        assert r.get("values") or (r["seconds"] and all(s > 0 for s in r["seconds"])), r["name"]
        assert math.isfinite(r["median"]) and r["median"] > 0, r["name"]
        assert r["min"] <= r["median"] <= r["max"], r["name"]
        if r["baseline"] is not None:
            assert r["baseline"] in names, r["name"]
            assert payload["ratios"][r["name"]] > 0, r["name"]
    assert set(payload["ratios"]) == {r["name"] for r in results if r["baseline"]}

    md = path.with_suffix(".md").read_text()
    assert md.startswith(f"## {suite}")
    assert "| what | median | min | max | unit | vs baseline |" in md
    for r in results:
        assert f"| {r['name']} |" in md
    (png,) = [p for p in out.glob(f"{suite}_*.png") if p.stem == path.stem]
    assert is_png(png)
    return payload
