"""Reads of the big lower file: sequential (dd, 1 MiB blocks) and random 4 KiB (fio, or a
Python pread loop without fio), cold and warm."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

from benchmarks.dataset import Dataset
from benchmarks.model import Scenario
from benchmarks.scenarios._util import Measurement, Mounted, repeat, time_call, timed
from benchmarks.system import CommandError


def prepare(dataset: Dataset) -> None:
    pass


def _seq(mnt: Mounted) -> float:
    return timed(["dd", f"if={mnt.path / mnt.dataset.big_rel}", "of=/dev/null", "bs=1M"])


def seq_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("seq read big cold", [_seq(mnt)])]


def seq_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("seq read big warm", repeat(mnt, lambda: _seq(mnt)))]


def _rand(mnt: Mounted) -> float:
    path = mnt.path / mnt.dataset.big_rel
    n = mnt.dataset.params.rand_reads
    if shutil.which("fio"):
        return _rand_fio(str(path), n, mnt.dataset.params.big_file)
    return _rand_python(str(path), n, mnt.dataset.params.big_file)


def _rand_fio(path: str, n: int, size: int) -> float:
    # Same seed every time (randrepeat), no cache invalidation: the harness decides coldness.
    cmd = [
        "fio",
        "--name=randread",
        f"--filename={path}",
        "--readonly",
        "--rw=randread",
        "--bs=4k",
        "--ioengine=psync",
        f"--number_ios={n}",
        f"--size={size}",
        "--norandommap",
        "--randrepeat=1",
        "--invalidate=0",
        "--output-format=json",
    ]
    proc = subprocess.run(cmd, capture_output=True, check=False)
    if proc.returncode != 0:
        raise CommandError(f"fio: exit {proc.returncode}: {proc.stderr.decode()[-500:]}")
    out = proc.stdout.decode()
    job = json.loads(out[out.index("{") :])["jobs"][0]["read"]
    # Sum of per-read latencies: fio's own startup is not the filesystem's cost.
    return float(job["lat_ns"]["mean"]) * int(job["total_ios"]) / 1e9


def _rand_python(path: str, n: int, size: int) -> float:
    rng = random.Random(4096)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]
    fd = os.open(path, os.O_RDONLY)

    def loop() -> None:
        for off in offsets:
            os.pread(fd, 4096, off)

    try:
        return time_call(loop)
    finally:
        os.close(fd)


def rand_cold(mnt: Mounted) -> list[Measurement]:
    return [Measurement("random 4k reads cold", [_rand(mnt)])]


def rand_warm(mnt: Mounted) -> list[Measurement]:
    return [Measurement("random 4k reads warm", repeat(mnt, lambda: _rand(mnt)))]


SCENARIOS = [
    Scenario("seqread-cold", "dd bs=1M of the big lower file, cold", seq_cold, cold=True),
    Scenario("seqread-warm", "dd bs=1M of the big lower file, read once before", seq_warm),
    Scenario(
        "randread-cold",
        "random 4 KiB preads of the big lower file (fio), cold",
        rand_cold,
        cold=True,
    ),
    Scenario("randread-warm", "the same random reads, repeated warm", rand_warm),
]
