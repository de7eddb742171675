"""LayerSpec: a declarative layer stack that the engine, FUSE and differential tests all share.

A spec is a list of layers, topmost first (as ``lowerdir=A:B:C``); each layer is a ``Dir`` tree
of ``File``, ``Dir``, ``Symlink``, ``HardLink``, ``Fifo``, ``Device`` and ``Whiteout`` nodes.
Names are bytes, so non-UTF-8 names, 255-byte names and names with newlines are plain values.

``materialize(dirs)`` writes each layer into a directory, in the dialect the node asks for
(whiteouts as char 0/0, OCI ``.wh.NAME``, or an xattr-marked empty file; opaque dirs by
trusted/user xattr or ``.wh..wh..opq``). ``to_kernel_form()`` returns the copy kernel overlayfs
understands (it reads neither OCI files nor ``user.`` xattrs without ``userxattr``), so the kernel
can serve as the reference for a subject mounted over the original dialects.

``layer_stacks()`` is a hypothesis strategy of random stacks built to collide: a small name
pool makes directories merge across layers, files replace directories and the reverse,
whiteouts hide lower entries and opaque directories cut merges.
"""

from __future__ import annotations

import os
import stat
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hypothesis import strategies as st

from . import acls

WhiteoutStyle = Literal["char", "oci", "xattr", "user_xattr"]
OpaqueStyle = Literal["trusted", "user", "oci"]

# A fixed, past mtime: entries still showing it were not modified through a mount.
DEFAULT_MTIME_NS = 1_500_000_000_123_456_789

# struct vfs_cap_data v2: magic (revision 2 | effective), permitted/inheritable low words, then
# high words.
# cap_net_bind_service (bit 10) permitted; the kernel validates this format on setxattr.
CAP_NET_BIND_SERVICE = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def cap_v3(rootid: int) -> bytes:
    """CAP_NET_BIND_SERVICE as a struct vfs_ns_cap_data (v3): valid for ROOTID's namespace."""
    return struct.pack("<IIIIII", 0x03000001, 1 << 10, 0, 0, 0, rootid)


# Absolute symlink target for generated stacks: shaped like /etc/passwd but absent on the host,
# so that no operation through a mount could ever reach a real system file.
SAFE_ABS_TARGET = b"/nonexistent-layerfs-test/etc/passwd"

XATTR_WHITEOUTS = ("xattr", "user_xattr")
OCI_WHITEOUT_PREFIX = b".wh."
OCI_OPAQUE = b".wh..wh..opq"


@dataclass
class Meta:
    """Ownership, permission bits, mtime and xattrs shared by all node kinds."""

    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = DEFAULT_MTIME_NS
    xattrs: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class File:
    """A regular file; with ``sparse`` its all-zero 4 KiB blocks are holes on disk."""

    content: bytes = b""
    meta: Meta = field(default_factory=Meta)
    sparse: bool = False

    def __repr__(self) -> str:
        # Failure reports print whole stacks: keep big contents readable.
        c = self.content
        shown = repr(c) if len(c) <= 64 else f"{c[:16]!r} * ... ({len(c)} bytes)"
        return f"File({shown}, {self.meta!r}{', sparse=True' if self.sparse else ''})"


@dataclass
class Dir:
    entries: dict[bytes, Node] = field(default_factory=dict)
    meta: Meta = field(default_factory=lambda: Meta(mode=0o755))
    opaque: OpaqueStyle | None = None


@dataclass
class Symlink:
    target: bytes
    meta: Meta = field(default_factory=lambda: Meta(mode=0o777))


@dataclass
class HardLink:
    """Another name for the ``File`` at ``target`` (a path from the same layer's root)."""

    target: bytes


@dataclass
class Fifo:
    meta: Meta = field(default_factory=Meta)


@dataclass
class Device:
    kind: Literal["c", "b"] = "c"
    major: int = 1
    minor: int = 3
    meta: Meta = field(default_factory=lambda: Meta(mode=0o600))


@dataclass
class Whiteout:
    style: WhiteoutStyle = "char"


Node = File | Dir | Symlink | HardLink | Fifo | Device | Whiteout


@dataclass
class LayerSpec:
    """A stack of layers, ``layers[0]`` topmost."""

    layers: list[Dir]

    def materialize(self, dirs: Sequence[os.PathLike[str] | str]) -> None:
        """Write layer i into ``dirs[i]`` (which must exist and be empty)."""
        assert len(dirs) == len(self.layers), (len(dirs), len(self.layers))
        for layer, d in zip(self.layers, dirs, strict=True):
            write_layer(layer, os.fsencode(d))

    def to_kernel_form(self, opaque: OpaqueStyle = "trusted") -> LayerSpec:
        """Return a copy in the dialects kernel overlayfs reads (char 0/0, OPAQUE xattrs:
        ``user`` for a kernel mounted ``userxattr``, which reads no other)."""
        return LayerSpec([_kernel_form(layer, opaque, is_root=True) for layer in self.layers])

    def user_namespace_form(self) -> LayerSpec:
        """Return a copy with every trusted.overlay.* marker in its user.overlay.* form: what a
        rootless engine's layers hold, since a user namespace can neither set nor read the
        trusted.* names (layerfs there, like the kernel's userxattr mounts, sees none)."""
        return LayerSpec([_user_form(layer) for layer in self.layers])

    def dialects(self) -> set[str]:
        """Which whiteout/opaque dialects and features the spec uses (for subject quirks)."""
        found: set[str] = set()
        for layer in self.layers:
            for _path, node in walk(layer):
                if isinstance(node, Whiteout):
                    found.add(f"whiteout:{node.style}")
                elif isinstance(node, Dir) and node.opaque:
                    found.add(f"opaque:{node.opaque}")
                elif isinstance(node, HardLink):
                    found.add("hardlink")
        return found


def walk(d: Dir, prefix: bytes = b"") -> Iterator[tuple[bytes, Node]]:
    """Yield (path, node) for every node below ``d``, parents before children."""
    for name, node in d.entries.items():
        path = prefix + name
        yield path, node
        if isinstance(node, Dir):
            yield from walk(node, path + b"/")


def _kernel_form(d: Dir, opaque: OpaqueStyle, *, is_root: bool = False) -> Dir:
    entries: dict[bytes, Node] = {}
    for name, node in d.entries.items():
        # The kernel (6.18) treats an xattr whiteout as a whiteout on lookup also in an
        # opaque=y directory (not only beside the opaque=x marker): char 0/0 is equivalent.
        if isinstance(node, Whiteout):
            entries[name] = Whiteout("char")
        elif isinstance(node, Dir):
            entries[name] = _kernel_form(node, opaque)
        else:
            entries[name] = node
    return Dir(entries, d.meta, opaque if d.opaque and not is_root else None)


def _user_form(d: Dir) -> Dir:
    entries: dict[bytes, Node] = {}
    for name, node in d.entries.items():
        if isinstance(node, Whiteout) and node.style == "xattr":
            entries[name] = Whiteout("user_xattr")
        elif isinstance(node, Dir):
            entries[name] = _user_form(node)
        else:
            entries[name] = node
    return Dir(entries, d.meta, "user" if d.opaque == "trusted" else d.opaque)


# --- writing ------------------------------------------------------------------------------


def write_layer(root: Dir, path: bytes) -> None:
    """Write one layer tree into the existing directory ``path``."""
    links: list[tuple[bytes, bytes]] = []
    _write_dir_entries(root, path, path, links)
    for target, name in links:
        os.link(path + b"/" + target, name, follow_symlinks=False)
    # Directory metadata last: creating children changes a directory's mtime.
    _finish_dirs(root, path, is_root=True)


def _write_dir_entries(d: Dir, path: bytes, root: bytes, links: list[tuple[bytes, bytes]]) -> None:
    if d.opaque == "oci":
        os.close(os.open(path + b"/" + OCI_OPAQUE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        _write_meta(path + b"/" + OCI_OPAQUE, Meta(), is_link=False)
    for name, node in d.entries.items():
        p = path + b"/" + name
        if isinstance(node, Dir):
            os.mkdir(p, 0o700)
            _write_dir_entries(node, p, root, links)
        elif isinstance(node, File):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if node.sparse:
                    os.ftruncate(fd, len(node.content))
                    for off in range(0, len(node.content), 4096):
                        block = node.content[off : off + 4096]
                        if block.strip(b"\0"):
                            os.pwrite(fd, block, off)
                else:
                    os.write(fd, node.content)
            finally:
                os.close(fd)
            _write_meta(p, node.meta, is_link=False)
        elif isinstance(node, Symlink):
            os.symlink(node.target, p)
            _write_meta(p, node.meta, is_link=True)
        elif isinstance(node, HardLink):
            links.append((node.target, p))
        elif isinstance(node, Fifo):
            os.mkfifo(p, 0o600)
            _write_meta(p, node.meta, is_link=False)
        elif isinstance(node, Device):
            kind = stat.S_IFCHR if node.kind == "c" else stat.S_IFBLK
            os.mknod(p, kind | 0o600, os.makedev(node.major, node.minor))
            _write_meta(p, node.meta, is_link=False)
        else:
            _write_whiteout(path, name, node.style)


def _write_whiteout(parent: bytes, name: bytes, style: WhiteoutStyle) -> None:
    if style == "char":
        os.mknod(parent + b"/" + name, stat.S_IFCHR, os.makedev(0, 0))
    elif style == "oci" and len(name) > 255 - len(OCI_WHITEOUT_PREFIX):
        # No room for the prefix: OCI cannot express this whiteout, write the kernel form.
        os.mknod(parent + b"/" + name, stat.S_IFCHR, os.makedev(0, 0))
    elif style == "oci":
        p = parent + b"/" + OCI_WHITEOUT_PREFIX + name
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    else:
        p = parent + b"/" + name
        os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        ns = b"trusted" if style == "xattr" else b"user"
        os.setxattr(p, ns + b".overlay.whiteout", b"y")
        os.utime(p, ns=(DEFAULT_MTIME_NS, DEFAULT_MTIME_NS))
        # The kernel looks for xattr whiteouts only in directories marked opaque=x.
        os.setxattr(parent, ns + b".overlay.opaque", b"x")


def _write_meta(p: bytes, meta: Meta, *, is_link: bool) -> None:
    # Order matters: chown clears setuid bits and security.capability, so mode and xattrs
    # come after it, and mtime comes last.
    os.chown(p, meta.uid, meta.gid, follow_symlinks=False)
    if not is_link:
        os.chmod(p, meta.mode)
    for k, v in meta.xattrs.items():
        os.setxattr(p, k, v, follow_symlinks=False)
    os.utime(p, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=False)


def _finish_dirs(d: Dir, path: bytes, *, is_root: bool = False) -> None:
    for name, node in d.entries.items():
        if isinstance(node, Dir):
            _finish_dirs(node, path + b"/" + name)
    if d.opaque in ("trusted", "user"):
        os.setxattr(path, d.opaque.encode() + b".overlay.opaque", b"y")
    if is_root:
        # The layer root belongs to the test's tmp dir: keep its owner, set mode and time only.
        os.chmod(path, d.meta.mode)
        os.utime(path, ns=(d.meta.mtime_ns, d.meta.mtime_ns))
        return
    _write_meta(path, d.meta, is_link=False)


# --- building helpers for hand-written scenarios -------------------------------------------


def d(
    entries: Mapping[bytes, Node] | None = None,
    *,
    opaque: str | None = None,
    mode: int = 0o755,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = DEFAULT_MTIME_NS,
    xattrs: dict[bytes, bytes] | None = None,
) -> Dir:
    """A directory node (short constructor for scenarios)."""
    assert opaque in (None, "trusted", "user", "oci"), opaque
    meta = Meta(mode, uid, gid, mtime_ns, dict(xattrs or {}))
    return Dir(dict(entries or {}), meta, opaque)  # type: ignore[arg-type]


def f(
    content: bytes = b"",
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
    mtime_ns: int = DEFAULT_MTIME_NS,
    xattrs: dict[bytes, bytes] | None = None,
) -> File:
    """A regular file node (short constructor for scenarios)."""
    return File(content, Meta(mode, uid, gid, mtime_ns, dict(xattrs or {})))


def sym(target: bytes, *, uid: int = 0, gid: int = 0, mtime_ns: int = DEFAULT_MTIME_NS) -> Symlink:
    return Symlink(target, Meta(0o777, uid, gid, mtime_ns))


def wh(style: str = "char") -> Whiteout:
    assert style in ("char", "oci", "xattr", "user_xattr"), style
    return Whiteout(style)  # type: ignore[arg-type]


# --- hypothesis strategies -----------------------------------------------------------------

# Few names, so that layers collide; one odd name of each kind now and then.
COMMON_NAMES = [b"a", b"b", b"c", b"d"]
ODD_NAMES = [b"\xff\xfeodd", b"new\nline", b"x" * 255, b"sp ace", b"caf\xc3\xa9"]

_MTIMES = st.sampled_from([DEFAULT_MTIME_NS, 1_000_000_000_000_000_001, 1_234_567_890_987_654_321])
_OWNERS = st.sampled_from([(0, 0), (1000, 1000), (0, 1000), (65534, 65534)])


# POSIX ACLs a generated file or directory may carry (support.acls' spelling): named entries
# for ids that layerfs-idmap maps to others (1000, 2000; gids 50, 1000) and to themselves
_ACCESS_ACLS = [
    acls.acl("u::rw,u:1000:r,g::r,m::r,o::"),
    acls.acl("u::rwx,u:2000:rw,u:65534:r,g::rx,g:50:rwx,m::rwx,o::r"),
    acls.acl("u::rw,u:999:-,g::-,g:1000:r,m::r,o::r"),
]
_DEFAULT_ACLS = [
    acls.acl("u::rwx,u:1000:rwx,g::rx,g:50:rx,m::rwx,o::x"),
    acls.acl("u::rwx,u:2000:rx,g::-,m::rx,o::-"),
]


@st.composite
def _meta(
    draw: st.DrawFn, modes: Sequence[int], *, xattrs: bool, acl: bool = False, is_dir: bool = False
) -> Meta:
    uid, gid = draw(_OWNERS)
    xs: dict[bytes, bytes] = {}
    if xattrs:
        xs = draw(
            st.dictionaries(
                st.sampled_from([b"user.a", b"user.b", b"trusted.t"]),
                st.binary(min_size=0, max_size=8),
                max_size=2,
            )
        )
        if draw(st.integers(0, 9)) == 0:  # a v2, or a v3 for root ids an id map moves
            xs[b"security.capability"] = draw(
                st.sampled_from([CAP_NET_BIND_SERVICE, cap_v3(1000), cap_v3(2000)])
            )
    if acl and draw(st.integers(0, 5)) == 0:
        xs[acls.ACCESS] = draw(st.sampled_from(_ACCESS_ACLS))
    if acl and is_dir and draw(st.integers(0, 4)) == 0:
        xs[acls.DEFAULT] = draw(st.sampled_from(_DEFAULT_ACLS))
    return Meta(draw(st.sampled_from(list(modes))), uid, gid, draw(_MTIMES), xs)


@dataclass(frozen=True)
class StackOptions:
    """What a generated stack may contain (narrowed for subjects with known quirks)."""

    whiteouts: tuple[WhiteoutStyle, ...] = ("char", "oci", "xattr", "user_xattr")
    opaques: tuple[OpaqueStyle, ...] = ("trusted", "user", "oci")
    hardlinks: bool = True
    specials: bool = True  # fifos and device nodes
    odd_names: bool = True
    xattrs: bool = True
    acls: bool = True  # POSIX ACLs (access; default ones on directories)
    setgid_dirs: bool = True
    setid_files: bool = True  # setuid/setgid regular files
    min_layers: int = 2
    max_layers: int = 4


def _names(opts: StackOptions) -> st.SearchStrategy[bytes]:
    if not opts.odd_names:
        return st.sampled_from(COMMON_NAMES)
    return st.one_of(
        st.sampled_from(COMMON_NAMES),
        st.sampled_from(COMMON_NAMES),
        st.sampled_from(COMMON_NAMES),
        st.sampled_from(ODD_NAMES),
    )


@st.composite
def _node(draw: st.DrawFn, opts: StackOptions, depth: int, lowest: bool) -> Node:
    kinds = ["file", "file", "dir", "dir", "symlink"]
    if depth > 2:
        kinds.remove("dir")
        kinds.remove("dir")
    kinds += ["whiteout", "whiteout"]  # also in the lowest layer: hidden, hiding nothing
    if opts.specials:
        kinds += ["fifo", "device"]
    kind = draw(st.sampled_from(kinds))
    if kind == "file":
        content = draw(
            st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"lower", b"x" * 70000]))
        )
        modes = [0o644, 0o600, 0o755, 0o444] + ([0o4755, 0o2755] if opts.setid_files else [])
        return File(content, draw(_meta(modes, xattrs=opts.xattrs, acl=opts.acls)))
    if kind == "dir":
        return draw(_dir(opts, depth + 1, lowest))
    if kind == "symlink":
        target = draw(
            st.sampled_from([b"a", b"../b", SAFE_ABS_TARGET, b"../../..", b"c/d", b"nowhere"])
        )
        uid, gid = draw(_OWNERS)
        return Symlink(target, Meta(0o777, uid, gid, draw(_MTIMES)))
    if kind == "whiteout":
        return Whiteout(draw(st.sampled_from(opts.whiteouts)))
    if kind == "fifo":
        return Fifo(draw(_meta([0o644, 0o600], xattrs=False)))
    return Device(
        draw(st.sampled_from(["c", "b"])),
        1,
        draw(st.sampled_from([3, 5, 7])),
        draw(_meta([0o600, 0o660], xattrs=False)),
    )


@st.composite
def _dir(draw: st.DrawFn, opts: StackOptions, depth: int, lowest: bool) -> Dir:
    names = draw(st.lists(_names(opts), max_size=4 if depth < 2 else 2, unique=True))
    entries = {n: draw(_node(opts, depth, lowest)) for n in names}
    opaque: OpaqueStyle | None = None
    if depth > 0 and not lowest and opts.opaques and draw(st.integers(0, 4)) == 0:
        opaque = draw(st.sampled_from(opts.opaques))
        has_xwhiteouts = any(
            isinstance(n, Whiteout) and n.style in XATTR_WHITEOUTS for n in entries.values()
        )
        if opaque == "oci" and has_xwhiteouts:
            # .wh..wh..opq beside opaque=x (the xattr whiteouts' marker) has no kernel meaning.
            opaque = "trusted" if "trusted" in opts.opaques else None
    modes = [0o755, 0o700, 0o1777] + ([0o2775] if opts.setgid_dirs else [])
    meta = draw(_meta(modes, xattrs=opts.xattrs, acl=opts.acls, is_dir=True))
    return Dir(entries, meta, opaque)


@st.composite
def layer_stacks(draw: st.DrawFn, opts: StackOptions | None = None) -> LayerSpec:
    """Random stacks of ``opts.min_layers``..``opts.max_layers`` colliding layers.

    Every layer holds at least one whiteout, one opaque directory and one hard link (those
    the options allow): left to chance, a layer without them was common, and the classes
    that need them in a given layer (a rename cut by an opaque lower, a redirect through a
    whiteout) went unseen for whole runs.
    """
    opts = opts or StackOptions()
    n = draw(st.integers(opts.min_layers, opts.max_layers))
    layers = [draw(_dir(opts, 0, i == n - 1)) for i in range(n)]
    for layer in layers:
        layer.meta.uid = layer.meta.gid = 0
        layer.meta.xattrs = {}
        _ensure_whiteout(draw, layer, opts)
        _ensure_opaque(draw, layer, opts)
        if opts.hardlinks:
            files = [p for p, node in walk(layer) if isinstance(node, File)]
            if not files:
                spot, name = _free_spot(draw, layer)
                spot.entries[name] = File(b"linked", Meta())
                files = [p for p, node in walk(layer) if isinstance(node, File)]
            target: bytes = draw(st.sampled_from(files))
            # Put the new name in the root, beside or above its target.
            name = b"hl-" + target.replace(b"/", b"_")[:200]
            if name not in layer.entries:
                layer.entries[name] = HardLink(target)
    return LayerSpec(layers)


def _dirs_of(layer: Dir) -> list[Dir]:
    return [layer, *(node for _, node in walk(layer) if isinstance(node, Dir))]


def _free_spot(draw: st.DrawFn, layer: Dir) -> tuple[Dir, bytes]:
    """A directory of LAYER and a common name free in it (a new one in the root if none)."""
    spots = [(d, n) for d in _dirs_of(layer) for n in COMMON_NAMES if n not in d.entries]
    if not spots:
        return layer, b"e"
    return draw(st.sampled_from(spots))


def _ensure_whiteout(draw: st.DrawFn, layer: Dir, opts: StackOptions) -> None:
    if not opts.whiteouts or any(isinstance(n, Whiteout) for _, n in walk(layer)):
        return
    spot, name = _free_spot(draw, layer)
    style = draw(st.sampled_from(opts.whiteouts))
    if style in XATTR_WHITEOUTS and spot.opaque == "oci":
        style = "char"  # .wh..wh..opq beside opaque=x has no kernel meaning (see _dir)
    spot.entries[name] = Whiteout(style)


def _ensure_opaque(draw: st.DrawFn, layer: Dir, opts: StackOptions) -> None:
    subdirs = _dirs_of(layer)[1:]  # the root's opaque mark means nothing
    if not opts.opaques or any(d.opaque for d in subdirs):
        return
    if subdirs:
        target = draw(st.sampled_from(subdirs))
    else:
        spot, name = _free_spot(draw, layer)
        target = spot.entries[name] = Dir({b"a": File(b"opaque", Meta())})
    styles = list(opts.opaques)
    if (
        "oci" in styles
        and len(styles) > 1
        and any(
            isinstance(n, Whiteout) and n.style in XATTR_WHITEOUTS for n in target.entries.values()
        )
    ):
        styles.remove("oci")
    target.opaque = draw(st.sampled_from(styles))
