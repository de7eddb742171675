#!/usr/bin/env bash
# Install layerfs for every user of the machine (as root): a venv built with the system's
# python3 under PREFIX (default /opt/layerfs), holding this checkout as a plain (non-editable)
# package with the compiled raw path and the engine compiled by mypyc built for it (what the
# daemons run by default, as in the checkout's venv), with `layerfs` and `mount.layerfs`
# linked into BINDIR (default /usr/local/bin).
#
# The checkout's own .venv (scripts/setup.sh) is for development: it may be built with a Python
# only its owner can read (a pyenv under /root), and it runs the checkout's files in place. A
# rootless podman runs its mount program as the user who runs podman, so the program, its
# interpreter and its packages must be readable and executable by everyone: this is that.
#
#   scripts/install-system.sh [--prefix DIR] [--bindir DIR|--no-links] [--python PYTHON]
#
# Needs python3 >= 3.11 with venv and its headers, and libfuse3's (pyfuse3 is built from
# source, the compiled paths with gcc): Debian packages python3-venv python3-dev libfuse3-dev
# pkg-config gcc fuse3, all in scripts/setup.sh's list, and, for the builds only, Cython and
# mypy from pip's index. Rerun it after updating the checkout: the venv is rebuilt in place.
set -euo pipefail

prefix=/opt/layerfs
bindir=/usr/local/bin
python=/usr/bin/python3
while [ $# -gt 0 ]; do
    case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --bindir) bindir=$2; shift 2 ;;
    --no-links) bindir=""; shift ;;
    --python) python=$2; shift 2 ;;
    -h | --help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "install-system: unknown argument $1" >&2; exit 2 ;;
    esac
done

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
say() { printf 'install-system: %s\n' "$*"; }

"$python" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
    || { say "$("$python" -V 2>&1) is too old: layerfs needs Python >= 3.11"; exit 1; }

# Everything installed must be readable by all, whatever the caller's umask.
umask 022
mkdir -p "$prefix"
venv=$prefix/venv
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    rm -rf "$venv"
    say "creating $venv with $("$python" -V 2>&1) ($python)"
    "$python" -m venv "$venv"
fi
say "pip install $repo"
# A copy of the checkout, not an editable install: the venv must not depend on the checkout
# staying where it is, nor on its directory being readable by the users who run layerfs.
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$venv/bin/python" -m pip install -q --upgrade --force-reinstall --no-deps "$repo" </dev/null
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$venv/bin/python" -m pip install -q "$repo" </dev/null
"$venv/bin/python" -c 'import layerfs.mount, mount_helper.main, pyfuse3, trio, xxhash'

# The compiled paths the daemons run by default, built as scripts/setup.sh builds them for the
# checkout's venv: the raw path (scripts/build_craw.sh) beside the installed _craw.pyx, the
# engine compiled by mypyc (scripts/build_compiled.py; copied from the checkout's build/mypyc
# where that one is of the same sources and interpreter) where the installed layerfs.compiled
# looks for it. Their tools, Cython and mypy at the dev extras' pins (Debian 12's cython3 0.29
# and python3-mypy 1.0 are too old for them), go into a directory of their own on PYTHONPATH
# for these builds only: the install runs without them. A failed build is one line, as in
# setup.sh: the daemons then run the Python raw path, or the engine's sources.
{ read -r pkg; read -r built; } < <(cd / && "$venv/bin/python" -c \
    'import os, layerfs.compiled as c; print(os.path.dirname(c.__file__), c.DIR, sep="\n")')
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
pins=$("$python" -c '
import re, sys, tomllib
with open(sys.argv[1], "rb") as f:
    dev = tomllib.load(f)["project"]["optional-dependencies"]["dev"]
print(" ".join(r for r in dev if re.split("[=<>]", r)[0].lower() in ("cython", "mypy")))
' "$repo/pyproject.toml")
say "build tools: $pins"
# shellcheck disable=SC2086 # the pins are words
PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 \
    "$venv/bin/python" -m pip install -q --target "$tools" $pins </dev/null \
    || say "build tools not installed: the builds below need them"
PYTHONPATH=$tools "$repo/scripts/build_craw.sh" "$venv/bin/python" "$pkg" \
    | sed 's/^/install-system: /' || true
PYTHONPATH=$tools "$venv/bin/python" "$repo/scripts/build_compiled.py" --out "$built" \
    </dev/null | sed 's/^/install-system: /' || true
# mount.layerfs as scripts/setup.sh writes it (mount_helper/launcher.py): the C front end
# (built with gcc when there is one), in front of the launcher mount.layerfs-py (no site, no
# pip wrapper); the launcher alone as mount.layerfs where gcc is missing
(cd / && "$venv/bin/python" -m mount_helper.launcher "$venv/bin/mount.layerfs")
chmod -R a+rX "$prefix"

if [ -n "$bindir" ]; then
    mkdir -p "$bindir"
    for exe in layerfs mount.layerfs; do
        ln -sfn "$venv/bin/$exe" "$bindir/$exe"
    done
    say "linked $bindir/layerfs and $bindir/mount.layerfs -> $venv/bin"
fi
say "done: $("$venv/bin/mount.layerfs" --version 2>&1 | head -1)"
