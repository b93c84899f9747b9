"""Crash safety: SIGKILL at a random sample, no partial shard visible, --resume gives identical bytes."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from shardtest_helpers import tree_digest

from shard_tools.config import PackConfig
from shard_tools.format import MANIFEST_NAME
from shard_tools.pack import pack
from shard_tools.resume import ResumeError
from shard_tools.synth import make_image_folder

# Runs `shard pack` in a child process that SIGKILLs itself when it reaches
# input position KILL_AT (with --workers 1 every input is processed in the
# packer process itself, so this is a kill at an exact, chosen sample).
KILLER = """
import os, signal, sys
from shard_tools import cli, validate
kill_at = int(sys.argv[1])
real = validate.process
def process(pos, item, opts):
    if pos == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(pos, item, opts)
validate.process = process
sys.exit(cli.main(sys.argv[2:]))
"""

PACK_ARGS = ["--max-count", "7", "--shuffle", "--seed", "5"]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = make_image_folder(root / "src", num_classes=4, per_class=15, size=16, seed=11)
    (src / "class01" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return src


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory):
    dest = tmp_path_factory.mktemp("ref") / "out"
    args = ["pack", str(src), str(dest), *PACK_ARGS, "--workers", "1"]
    subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", *args], check=True, capture_output=True
    )
    return tree_digest(dest)


def _final_shards_are_complete(dest, reference):
    for name in (p.name for p in dest.iterdir() if p.is_file()):
        assert name != MANIFEST_NAME
        if name.endswith((".tar", ".idx")):
            # Anything under a final shard/index name is the complete file.
            assert tree_digest(dest)[name] == reference[name], name


@pytest.mark.parametrize("case", range(3))
def test_sigkill_then_resume_is_byte_identical(src, reference, tmp_path, case):
    kill_at = random.Random(1000 + case).randrange(1, 61)
    dest = tmp_path / "out"
    args = ["pack", str(src), str(dest), *PACK_ARGS, "--workers", "1"]
    proc = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    _final_shards_are_complete(dest, reference)
    assert not (dest / MANIFEST_NAME).exists()
    finished = len(list(dest.glob("shard-*.tar")))
    resumed = subprocess.run(
        [sys.executable, "-m", "shard_tools.cli", *args, "--resume", "--json"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    # The last shard may be in place without its journal entry yet (killed while
    # it was being published): it is then rewritten, with the same bytes.
    assert finished - 1 <= summary["resumed_shards"] <= finished
    assert tree_digest(dest) == reference


def test_sigkill_with_worker_processes(src, reference, tmp_path):
    # Kill the packer (and with it the pool) after its first shard is journaled.
    dest = tmp_path / "out"
    args = ["pack", str(src), str(dest), *PACK_ARGS, "--workers", "2", "--max-count", "3"]
    ref_dest = tmp_path / "ref3"
    pack(
        PackConfig(src=str(src), dest=str(ref_dest), max_count=3, shuffle=True, seed=5, workers=1),
        progress=False,
    )
    reference3 = tree_digest(ref_dest)
    proc = subprocess.Popen([sys.executable, "-m", "shard_tools.cli", *args])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if (dest / ".journal" / "shard-000001.json").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    if proc.returncode == 0:
        pytest.skip("the pack finished before it could be killed")
    _final_shards_are_complete(dest, reference3)
    assert not (dest / MANIFEST_NAME).exists()
    with pytest.raises(ResumeError, match="--resume"):
        pack(
            PackConfig(src=str(src), dest=str(dest), max_count=3, shuffle=True, seed=5),
            progress=False,
        )
    with pytest.raises(ResumeError, match="differ"):
        pack(
            PackConfig(
                src=str(src), dest=str(dest), max_count=4, shuffle=True, seed=5, resume=True
            ),
            progress=False,
        )
    result = pack(
        PackConfig(
            src=str(src), dest=str(dest), max_count=3, shuffle=True, seed=5, workers=2, resume=True
        ),
        progress=False,
    )
    assert result.resumed_shards >= 2
    assert tree_digest(dest) == reference3


# Runs `shard pack` and SIGKILLs it after every shard is published, just
# before rejected.jsonl and the manifest are written.
KILL_BEFORE_MANIFEST = """
import os, signal, sys
from shard_tools import cli, pack
pack._finish = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_corrupt_finished_shard_is_rewritten_on_resume(src, tmp_path):
    ref_dest = tmp_path / "ref"
    pack(PackConfig(src=str(src), dest=str(ref_dest), max_count=10, workers=1), progress=False)
    dest = tmp_path / "out"
    args = ["pack", str(src), str(dest), "--max-count", "10", "--workers", "1"]
    proc = subprocess.run([sys.executable, "-c", KILL_BEFORE_MANIFEST, *args], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert (
        len(list((dest / ".journal").glob("shard-*.json")))
        == len(list(ref_dest.glob("*.tar")))
        == 6
    )
    data = bytearray((dest / "shard-000001.tar").read_bytes())
    data[700] ^= 0xFF
    (dest / "shard-000001.tar").write_bytes(bytes(data))
    result = pack(
        PackConfig(src=str(src), dest=str(dest), max_count=10, workers=1, resume=True),
        progress=False,
    )
    assert result.resumed_shards == 1
    assert tree_digest(dest) == tree_digest(ref_dest)


# Sends SIGINT to the whole process group (what Ctrl-C in a terminal does)
# once the packer has received INTERRUPT_AT results from its worker pool.
INTERRUPTER = """
import os, signal, sys
from shard_tools import cli, pack
# A terminal's foreground job has Python's Ctrl-C handler; a background test
# runner may have started us with SIGINT ignored.
signal.signal(signal.SIGINT, signal.default_int_handler)
interrupt_at = int(sys.argv[1])
real = pack.ordered_results
def ordered_results(*args, **kwargs):
    for n, result in enumerate(real(*args, **kwargs)):
        if n == interrupt_at:
            os.killpg(os.getpgrp(), signal.SIGINT)
        yield result
pack.ordered_results = ordered_results
sys.exit(cli.main(sys.argv[2:]))
"""


def test_ctrl_c_stops_cleanly_and_resumes(src, tmp_path):
    dest = tmp_path / "out"
    ref_dest = tmp_path / "ref"
    pack(PackConfig(src=str(src), dest=str(ref_dest), max_count=2, workers=1), progress=False)
    args = ["pack", str(src), str(dest), "--max-count", "2", "--workers", "2"]
    proc = subprocess.run(
        [sys.executable, "-c", INTERRUPTER, "25", *args],
        start_new_session=True,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("shard pack: interrupted")
    assert "Traceback" not in proc.stderr
    assert not (dest / MANIFEST_NAME).exists()
    assert not list((dest / ".tmp").glob("*.tar"))  # the shard being written was removed
    pack(
        PackConfig(src=str(src), dest=str(dest), max_count=2, workers=2, resume=True),
        progress=False,
    )
    assert tree_digest(dest) == tree_digest(ref_dest)
