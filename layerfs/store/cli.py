"""Command line for the layer store: ``layerfs image ...``, ``layerfs diff``, ``layerfs commit``.

``register()`` adds the subcommands to the main ``layerfs`` parser; ``main()`` runs them
standalone (``python -m layerfs.store.cli``). ``lowers_for_image()`` is what
``layerfs mount --image REF`` calls. Argument parsing and printing only.

Must not import: pyfuse3, trio.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from layerfs.errors import LayerfsError
from layerfs.store import default_store

if TYPE_CHECKING:
    from layerfs.store.progress import Progress
    from layerfs.store.store import Store

# The store's modules (tarfile, gzip, ctypes...) load only when a store command runs:
# ``layerfs mount`` builds this parser too, and its start-up time counts.


def _store(path: str | None) -> Store:
    from layerfs.store.store import Store

    return Store(path)


def _progress() -> Progress:
    from layerfs.store.progress import Progress

    return Progress()


def lowers_for_image(ref: str, store: str | None) -> list[str]:
    """The layer directories of image ``ref`` in ``store`` (default store if None),
    topmost first: the ``lowerdir`` list for mounting it."""
    s = _store(store)
    s.recover()
    return s.lowers(ref)


def record_upper(ref: str, upper: str, store: str | None, merged: str | None = None) -> None:
    """Record that ``upper`` is mounted on image ``ref`` at ``merged`` (call after ``mount
    --image``), so that ``diff``/``commit`` need no ``--image``, ``commit`` knows the upper
    is in use while ``merged`` is mounted, and ``image rm`` protects the image."""
    _store(store).record_upper(ref, upper, merged)


def _store_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help=f"layer store directory (default $LAYERFS_STORE or {default_store()})",
    )


def _max_size_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-size",
        type=_parse_size,
        metavar="SIZE",
        help="refuse a layer whose files add up to more than SIZE (apparent; K, M, G, T suffixes)",
    )


def _platform_tag_opts(p: argparse.ArgumentParser) -> None:
    """What an image coming into the store is picked by and tagged as (import, pull)."""
    p.add_argument("--platform", help="os/arch[/variant] (default: this host's)")
    p.add_argument(
        "--tag", action="append", dest="tags", metavar="NAME", help="tag in the store (repeatable)"
    )


def _insecure_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow plain HTTP and unverified TLS (localhost needs no flag for HTTP)",
    )


def _parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units else ""
    try:
        return int(float(t[: len(t) - len(unit)]) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}") from None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``image``, ``diff`` and ``commit`` to a ``layerfs`` subcommand parser."""
    image = subparsers.add_parser("image", help="manage images in the layer store")
    isub = image.add_subparsers(dest="image_command", metavar="COMMAND", required=True)

    p = isub.add_parser("import", help="import an image from an OCI layout DIR[:TAG]")
    _store_opt(p)
    p.add_argument("layout", metavar="OCI_LAYOUT[:TAG]")
    _platform_tag_opts(p)
    _max_size_opt(p)
    p.set_defaults(func=_guard(_cmd_import))

    p = isub.add_parser("pull", help="pull an image from a registry")
    _store_opt(p)
    p.add_argument("ref", metavar="[REGISTRY/]REPO[:TAG|@DIGEST]")
    _platform_tag_opts(p)
    _insecure_opt(p)
    _max_size_opt(p)
    p.add_argument("--jobs", type=int, default=4, metavar="N", help="blobs fetched at once")
    p.set_defaults(func=_guard(_cmd_pull))

    p = isub.add_parser("push", help="push an image to a registry")
    _store_opt(p)
    p.add_argument("ref", metavar="IMAGE")
    p.add_argument("dest", metavar="[REGISTRY/]REPO:TAG")
    _insecure_opt(p)
    p.add_argument(
        "--chunk-size",
        type=_parse_size,
        metavar="SIZE",
        help="upload blobs larger than SIZE in chunks of SIZE (default 64M)",
    )
    p.set_defaults(func=_guard(_cmd_push))

    p = isub.add_parser("ls", help="list images with sizes and shared layers")
    _store_opt(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--digests", action="store_true", help="show repository and digest pulled")
    p.set_defaults(func=_guard(_cmd_ls))

    p = isub.add_parser("rm", help="remove images (or tags); free layers no image uses")
    _store_opt(p)
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--force", action="store_true", help="even if an upper sits on the image")
    p.set_defaults(func=_guard(_cmd_rm))

    p = isub.add_parser("inspect", help="show an image's record, config and layers as JSON")
    _store_opt(p)
    p.add_argument("ref", metavar="REF")
    p.set_defaults(func=_guard(_cmd_inspect))

    p = isub.add_parser("verify", help="check extracted layers against their xxh3 manifests")
    _store_opt(p)
    p.add_argument("refs", nargs="+", metavar="REF")
    p.set_defaults(func=_guard(_cmd_verify))

    p = isub.add_parser("tag", help="add a tag to an image")
    _store_opt(p)
    p.add_argument("ref", metavar="REF")
    p.add_argument("tag", metavar="NEW")
    p.set_defaults(func=_guard(_cmd_tag))

    p = isub.add_parser("export", help="write an image to an OCI layout DIR[:TAG]")
    _store_opt(p)
    p.add_argument("ref", metavar="REF")
    p.add_argument("layout", metavar="OCI_LAYOUT[:TAG]")
    p.set_defaults(func=_guard(_cmd_export))

    p = subparsers.add_parser("diff", help="list a container's changes (A/C/D) from its upper")
    _store_opt(p)
    p.add_argument("upper", metavar="UPPER")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--image", metavar="REF", help="the image the upper sits on (tells A from C)")
    g.add_argument("--lowers", metavar="L1:L2", help="lowers, topmost first ('' for none)")
    p.set_defaults(func=_guard(_cmd_diff))

    p = subparsers.add_parser("commit", help="write an upper as a new image layer")
    _store_opt(p)
    p.add_argument("upper", metavar="UPPER")
    p.add_argument(
        "--image", metavar="REF", help="the image the upper sits on (default: as recorded)"
    )
    p.add_argument(
        "--tag", required=True, action="append", dest="tags", metavar="NEW", help="new tag"
    )
    p.add_argument("--into", metavar="OCI_LAYOUT", help="also write the image to this layout")
    p.add_argument("--compression", choices=("gzip", "zstd", "none"), default="gzip")
    p.add_argument("--message", "-m", help="history comment")
    p.add_argument("--author", help="config author")
    p.add_argument("--force", action="store_true", help="commit even if the upper is mounted")
    p.set_defaults(func=_guard(_cmd_commit))


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report OS errors (permission, missing file, full disk) as LayerfsError: one line, no
    traceback, whichever front end runs the command."""

    @functools.wraps(fn)
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except BrokenPipeError:
            raise  # the reader went away (``| head``): run() ends quietly
        except OSError as e:
            raise LayerfsError(str(e)) from None

    return run


def _cmd_import(args: argparse.Namespace) -> int:
    store = _store(args.store)
    from layerfs.store.oci import Platform

    platform = Platform.parse(args.platform) if args.platform else None
    tags = tuple(args.tags) if args.tags else None
    rec = store.import_layout(
        args.layout, platform=platform, tags=tags, progress=_progress(), max_size=args.max_size
    )
    names = store.tags_of(rec.manifest_digest)
    _say_moved(store)
    print(f"{rec.manifest_digest} {' '.join(names)}".rstrip())
    return 0


def _say_moved(store: Store) -> None:
    for tag, old in store.moved_tags:
        print(f"layerfs: tag {tag} moved from {old[:19]} to this image", file=sys.stderr)


def _cmd_pull(args: argparse.Namespace) -> int:
    from layerfs.store.oci import Platform
    from layerfs.store.pull import pull

    store = _store(args.store)
    platform = Platform.parse(args.platform) if args.platform else None
    rec = pull(
        store,
        args.ref,
        platform=platform,
        insecure=args.insecure,
        tags=tuple(args.tags) if args.tags else None,
        max_size=args.max_size,
        jobs=args.jobs,
    )
    _say_moved(store)
    print(f"Digest: {rec.repo_digest}", file=sys.stderr)
    print(f"{rec.manifest_digest} {' '.join(store.tags_of(rec.manifest_digest))}".rstrip())
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from layerfs.store.push import CHUNK_SIZE, push

    store = _store(args.store).require()
    digest = push(
        store,
        args.ref,
        args.dest,
        insecure=args.insecure,
        chunk_size=args.chunk_size or CHUNK_SIZE,
    )
    print(digest)
    return 0


def _cmd_ls(args: argparse.Namespace) -> int:
    store = _store(args.store).require()
    users = store.layer_users()
    sizes: dict[str, int] = {}
    for d in users:
        try:
            sizes[d] = int(str(store.layer_info(d).get("tar_size", 0)))
        except FileNotFoundError:
            sizes[d] = 0
    rows = []
    for rec in store.images():
        layers = list(dict.fromkeys(rec.diff_ids))
        rows.append(
            {
                "tags": store.tags_of(rec.manifest_digest),
                "digest": rec.manifest_digest,
                "layers": len(rec.layers),
                "shared_layers": sum(1 for d in layers if users.get(d, 0) > 1),
                "size": sum(sizes.get(d, 0) for d in layers),
                # What removing this image alone would free.
                "unique_size": sum(sizes.get(d, 0) for d in layers if users.get(d, 0) == 1),
                "platform": rec.platform,
                "created": rec.created,
                "repository": rec.repository,
                "repo_digest": rec.repo_digest,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    digests = f"  {'REPOSITORY':<40} REPO DIGEST" if args.digests else ""
    print(
        f"{'TAG':<32} {'DIGEST':<13} {'LAYERS':>6} {'SHARED':>6} {'SIZE':>10} {'UNIQUE':>10}"
        f"  {'PLATFORM':<12}{digests}".rstrip()
    )
    for r in rows:
        tags = r["tags"] or ["<none>"]
        assert isinstance(tags, list)
        extra = ""
        if args.digests:
            extra = f"  {r['repository'] or '<none>':<40} {r['repo_digest'] or r['digest']}"
        for t in tags:
            print(
                f"{t:<32} {str(r['digest'])[7:19]:<13} {r['layers']:>6} {r['shared_layers']:>6} "
                f"{_size(int(str(r['size']))):>10} {_size(int(str(r['unique_size']))):>10}"
                f"  {r['platform']:<12}{extra}".rstrip()
            )
    return 0


def _cmd_rm(args: argparse.Namespace) -> int:
    store = _store(args.store).require()
    for ref in args.refs:
        freed = store.remove(ref, force=args.force)
        print(f"removed {ref}" + (f" (freed {len(freed)} layers)" if freed else ""))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    store = _store(args.store).require()
    rec = store.resolve(args.ref)
    users = store.layer_users()
    layers = []
    for x in rec.layers:
        info: dict[str, object] = {
            "digest": x.digest,
            "mediaType": x.media_type,
            "size": x.size,
            "diff_id": x.diff_id,
        }
        info["path"] = store.layer_root(x.diff_id)
        info["images_using"] = users.get(x.diff_id, 0)
        try:
            info.update({k: v for k, v in store.layer_info(x.diff_id).items() if k not in info})
        except FileNotFoundError:
            info["missing"] = True
        layers.append(info)
    out = {
        **rec.to_json(),
        "tags": store.tags_of(rec.manifest_digest),
        "layers": layers,
        "config": json.loads(store.read_blob(rec.config_digest)),
    }
    print(json.dumps(out, indent=1))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    store = _store(args.store).require()
    status = 0
    for ref in args.refs:
        result = store.verify(ref, progress=_progress())
        bad = {d: p for d, p in result.items() if p}
        for d, problems in bad.items():
            for prob in problems:
                _print_name(f"{ref}: layer {d[7:19]}: {prob}")
        if bad:
            status = 1
        else:
            print(f"{ref}: ok ({len(result)} layers)")
    return status


def _cmd_tag(args: argparse.Namespace) -> int:
    _store(args.store).require().tag(args.ref, args.tag)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from layerfs.store.commit import export_layout

    store = _store(args.store).require()
    rec = store.resolve(args.ref)
    path, _, tag = args.layout.partition(":")
    names = store.tags_of(rec.manifest_digest)
    export_layout(store, rec, path, tag or (names[0] if names else None))
    return 0


def _cmd_diff(args: argparse.Namespace) -> int:
    from layerfs.store.diff import changes

    lowers: list[str] | None = None
    if args.lowers is not None:
        lowers = [p for p in args.lowers.split(":") if p]  # '': an upper on nothing
    else:
        store = _store(args.store)
        ref = args.image or store.image_for_upper(args.upper)
        if ref is None:
            # Without lowers, A and C cannot be told apart: say so rather than print all A.
            raise LayerfsError(
                f"no image recorded for {args.upper} in store {store.root}: "
                "name it with --image REF (and --store DIR) or --lowers L1:L2"
            )
        lowers = store.require().lowers(ref)
    for change in changes(args.upper, lowers):
        _print_name(str(change))
    return 0


def _cmd_commit(args: argparse.Namespace) -> int:
    from layerfs.store.commit import commit

    store = _store(args.store)
    base = args.image or store.image_for_upper(args.upper)
    if base is None:
        raise LayerfsError(f"no image recorded for {args.upper}: name it with --image REF")
    from layerfs.store.mounts import mounts_using

    live = mounts_using(args.upper, store.merged_for_upper(args.upper))
    if live and not args.force:
        raise LayerfsError(
            f"{args.upper} is still mounted on {live[0]}: files changing while it is read "
            "give a layer of no single moment; unmount (or stop the container) first, or "
            "use --force"
        )
    rec = commit(
        store,
        args.upper,
        base,
        tuple(args.tags),
        into=args.into,
        compression=args.compression,
        message=args.message,
        author=args.author,
        progress=_progress(),
    )
    _say_moved(store)
    print(f"{rec.manifest_digest} {' '.join(store.tags_of(rec.manifest_digest))}".rstrip())
    return 0


def _print_name(line: str) -> None:
    """Print a line holding file names: they are bytes (decoded with surrogateescape), so
    write them back as the exact bytes, not as text that may not encode."""
    sys.stdout.flush()
    sys.stdout.buffer.write(line.encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.buffer.flush()


def _size(n: int) -> str:
    from layerfs.store.progress import human_size

    return human_size(n)


def run(args: argparse.Namespace) -> int:
    """Run a parsed store subcommand, turning store errors into one-line messages."""
    if crash := os.environ.get("LAYERFS_STORE_CRASH_AT"):  # the crash-point tests' fault injection
        from layerfs.store.store import crash_at

        crash_at(crash)
    try:
        rc: int = args.func(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # ``layerfs image inspect REF | head``: the reader has what it wanted. Point stdout at
        # /dev/null so the interpreter's own final flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1
    except LayerfsError as e:
        print(f"layerfs: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Ctrl-C: whatever was half done is staging or a download, never the store itself.
        print("layerfs: interrupted", file=sys.stderr)
        return 130
    return rc


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: ``python -m layerfs.store.cli image ls`` and so on."""
    parser = argparse.ArgumentParser(prog="layerfs", description="layerfs layer store")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
