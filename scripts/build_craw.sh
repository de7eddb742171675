#!/usr/bin/env bash
# Build the compiled raw path (LAYERFS_LOOP=craw, the default loop): PKG/_craw.pyx ->
# PKG/_craw.<EXT_SUFFIX>, for the interpreter PYTHON, which must import Cython.
#
#   scripts/build_craw.sh PYTHON PKG      (scripts/setup.sh: .venv/bin/python layerfs;
#                                          scripts/install-system.sh: an install's package)
#
# Cython writes C into a temporary directory, gcc compiles it against Python's and libfuse3's
# headers. Rebuilt when the source, Cython or the interpreter change (a stamp, PKG/.craw-stamp,
# holds what the build was made from). Prints one line; exit status 1 when the build failed,
# which is not fatal to the caller: the Python raw path then serves (docs/architecture.md,
# the compiled raw path).
set -uo pipefail

py=$1 pkg=$2
src=$pkg/_craw.pyx
ext=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))') || exit 1
want=$( { cat "$src"; "$py" -m cython --version 2>&1;
          "$py" -c 'import sys; print(sys.version, sys.base_prefix)'; } | sha256sum)
if [ -f "$pkg/_craw$ext" ] && [ "$(cat "$pkg/.craw-stamp" 2>/dev/null)" = "$want" ]; then
    echo "compiled raw path: up to date"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# the source's CRC-32, which layerfs.fusehooks.craw_module checks against the _craw.pyx
# beside the build: a build of another source (not rebuilt since) is not loaded
if crc=$("$py" -c 'import sys, zlib; print("%08x" % zlib.crc32(open(sys.argv[1], "rb").read()))' "$src") \
    && "$py" -m cython -3 -o "$tmp/_craw.c" "$src" \
    && gcc -O2 -shared -fPIC -DFUSE_USE_VERSION=314 -DLAYERFS_CRAW_SOURCE="\"$crc\"" \
        -I"$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" \
        $(pkg-config --cflags fuse3) "$tmp/_craw.c" -o "$tmp/_craw$ext" $(pkg-config --libs fuse3) \
    && mv "$tmp/_craw$ext" "$pkg/_craw$ext" && printf '%s\n' "$want" >"$pkg/.craw-stamp"; then
    echo "compiled raw path: built"
else
    echo "compiled raw path: NOT built (LAYERFS_LOOP=craw serves with the Python raw path)"
    exit 1
fi
