"""The pages a forked process holds apart from its parent: ``python -m benchmarks.pagediff``.

``python -m benchmarks.pagediff CHILD... [--parent PID]`` (default: the first CHILD's
parent, e.g. the fork server of a mount's daemon) compares each
writable mapping of CHILD with the same addresses in PARENT, page by page, through
``/proc/PID/pagemap``: a present page whose frame differs from the parent's is the child's own
(a copy made at a write, by either process, or a new page). Each such page is then read from
both (``/proc/PID/mem``) and put in one class:

- ``new``: the parent has no page there;
- ``same``: same bytes as the parent's (a reference count raised and lowered again);
- ``counts``: every changed 8-byte word moved by less than 2**20 (reference counts, counters);
- ``other``: some other word changed (new or freed objects, pointers, quickened bytecode).

Regions: ``[heap]`` (glibc's main heap), ``anon`` (pymalloc's arenas, glibc's thread arenas,
big buffers), ``[stack]``, and the data of each mapped file by its name. ``--words FILE``
writes each changed word (address, the parent's and the child's value, region), to give to
the objects at those addresses by other means (docs/benchmarks.md, session 11 ballast).

With several children it also says how many distinct contents their own pages hold: what
merging identical pages (KSM) would leave of them at best, the ``same`` pages merged back into
the parent's and each other content kept once. Root
only: without CAP_SYS_ADMIN pagemap shows no frame numbers. Both processes should be stopped
or idle: a page either one writes meanwhile is compared as it is at that moment.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import IO

PAGE = os.sysconf("SC_PAGE_SIZE")
_PRESENT = 1 << 63
_PFN = (1 << 55) - 1
_SMALL = 1 << 20  # a word that moved by less than this: a count
CLASSES = ("new", "same", "counts", "other")


@dataclass
class Diff:
    """CHILD's own pages: (region, class) -> pages, and the addresses of each class."""

    pages: Counter[tuple[str, str]] = field(default_factory=Counter)
    addresses: dict[str, list[int]] = field(default_factory=lambda: {c: [] for c in CLASSES})
    contents: set[bytes] = field(default_factory=set)  # digests of the pages not "same"

    def total(self) -> int:
        return sum(self.pages.values())


def _mappings(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, region) of each writable mapping of PID."""
    found = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if "w" not in fields[1]:
                continue
            start, end = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5].strip() if len(fields) > 5 else ""
            region = name if name.startswith("[") or not name else os.path.basename(name)
            found.append((start, end, region or "anon"))
    return found


def _frames(pagemap: IO[bytes], start: int, end: int) -> tuple[int, ...]:
    """The pagemap entries of [START, END), one per page."""
    pagemap.seek(start // PAGE * 8)
    data = pagemap.read((end - start) // PAGE * 8)
    return struct.unpack(f"{len(data) // 8}Q", data)


def _read(mem: IO[bytes], address: int) -> bytes | None:
    try:
        mem.seek(address)
        return mem.read(PAGE)
    except OSError:
        return None


def compare(child: int, parent: int, words: IO[str] | None = None) -> Diff:
    """CHILD's pages that are not PARENT's, by region and class; each changed word to WORDS."""
    diff = Diff()
    n = PAGE // 8
    with (
        open(f"/proc/{child}/pagemap", "rb") as cmap,
        open(f"/proc/{parent}/pagemap", "rb") as pmap,
        open(f"/proc/{child}/mem", "rb", buffering=0) as cmem,
        open(f"/proc/{parent}/mem", "rb", buffering=0) as pmem,
    ):
        for start, end, region in _mappings(child):
            for i, (ours, theirs) in enumerate(
                zip(_frames(cmap, start, end), _frames(pmap, start, end), strict=False)
            ):
                if not ours & _PRESENT:
                    continue
                if theirs & _PRESENT and ours & _PFN == theirs & _PFN:
                    continue  # shared
                address = start + i * PAGE
                kind = "new"
                mine = _read(cmem, address)
                if mine is None or len(mine) < PAGE:
                    continue
                if theirs & _PRESENT:
                    before = _read(pmem, address)
                    if before is None or len(before) < PAGE:
                        continue
                    kind = "same"
                    if mine != before:
                        a = struct.unpack(f"{n}Q", mine)
                        b = struct.unpack(f"{n}Q", before)
                        changed = [j for j in range(n) if a[j] != b[j]]
                        small = all(
                            min((a[j] - b[j]) % 2**64, (b[j] - a[j]) % 2**64) < _SMALL
                            for j in changed
                        )
                        kind = "counts" if small else "other"
                        if words is not None:
                            for j in changed:
                                words.write(f"{address + 8 * j:#x} {b[j]:#x} {a[j]:#x} {region}\n")
                diff.pages[(region, kind)] += 1
                diff.addresses[kind].append(address)
                if kind != "same":
                    diff.contents.add(hashlib.blake2b(mine, digest_size=16).digest())
    return diff


def report(diff: Diff) -> str:
    """A table: pages (KiB) of each region by class, the largest regions first."""
    regions = Counter[str]()
    for (region, _), pages in diff.pages.items():
        regions[region] += pages
    kib = PAGE // 1024
    lines = [f"{'region':40} {'KiB':>7} " + " ".join(f"{c:>7}" for c in CLASSES)]
    for region, pages in regions.most_common():
        row = " ".join(f"{diff.pages[(region, c)] * kib:7d}" for c in CLASSES)
        lines.append(f"{region[:40]:40} {pages * kib:7d} {row}")
    total = " ".join(
        f"{sum(p for (_, k), p in diff.pages.items() if k == c) * kib:7d}" for c in CLASSES
    )
    lines.append(f"{'total':40} {diff.total() * kib:7d} {total}")
    return "\n".join(lines)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rpartition(b")")[2].split()[1])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pagediff", description=__doc__)
    parser.add_argument("children", type=int, nargs="+", metavar="CHILD")
    parser.add_argument("--parent", type=int, help="default: the first CHILD's parent")
    parser.add_argument("--words", metavar="FILE", help="write the first CHILD's changed words")
    args = parser.parse_args()
    parent = args.parent if args.parent is not None else _parent(args.children[0])
    diffs = []
    for i, child in enumerate(args.children):
        if args.words and i == 0:
            with open(args.words, "w") as out:
                diffs.append(compare(child, parent, out))
        else:
            diffs.append(compare(child, parent))
    print(f"process {args.children[0]}, against {parent}:")
    print(report(diffs[0]))
    if len(diffs) > 1:
        kib = PAGE // 1024
        own = sum(d.total() for d in diffs) * kib
        merged = len(set().union(*(d.contents for d in diffs))) * kib
        print(
            f"{len(diffs)} processes: {own} KiB of their own pages ({own / len(diffs):.0f} a "
            f"process); {merged} KiB distinct, {merged / len(diffs):.0f} a process (identical "
            "pages merged, the same as the parent's merged into it)"
        )


if __name__ == "__main__":
    main()
