#!/usr/bin/env bash
# Set up a fresh Debian 12 machine (as root) to build, test and run layerfs.
#
# Idempotent: each step is skipped when it is already done, so a second run takes seconds.
#   1. apt packages (apt-get update only when something is missing)
#   2. /dev/fuse (modprobe fuse when it is missing)
#   3. .venv in the repo, with `pip install -e '.[dev]'`, made by /usr/bin/python3 when it is a
#      usable Python >= 3.11 (venv and headers: python3-venv, python3-dev), else by python3 on
#      PATH (PYTHON=... overrides both); remade when the interpreter changes, reinstalled when
#      pyproject.toml or this script's pip step changes
#   3b. the compiled raw path (LAYERFS_LOOP=craw) into layerfs/_craw.*.so (scripts/build_craw.sh)
#   3c. the engine compiled by mypyc into build/mypyc (scripts/build_compiled.py)
#   4. the unprivileged user the rootless podman test runs as (layerfs-rootless, with
#      subordinate uid/gid ranges): made here because the test session may not change
#      /etc/passwd (tests/conftest.py checks it)
#
# Environment: LAYERFS_SKIP_APT=1 skips step 1 (for machines set up by other means).
#   LAYERFS_PYTHON=static3.13 makes the venv from a CPython 3.13 linked statically from pyenv's
#   build (into .python/static3.13; static3.12 likewise): less memory a mount, more CPU a
#   request than the default 3.11 (docs/usage.md); the default interpreter when pyenv's files
#   are absent. PYTHON=/path/to/python picks any other interpreter.
set -euo pipefail

# Every Debian package the project needs: build (pyfuse3 compiles against libfuse3), run, test,
# benchmark. One list: add to it here.
APT_PACKAGES=(
    # build and run
    fuse3 libfuse3-dev pkg-config gcc python3-venv python3-dev
    # tests and tools
    attr acl kmod fuse-overlayfs strace
    podman runc crun skopeo umoci uidmap slirp4netns
    fio debootstrap busybox-static
    # layerfs-snapshotter: containerd (1.6) for the end-to-end test; Go and containerd's Go
    # sources for its conformance suite (GOPATH mode). The two github.com/golang/protobuf
    # packages conflict and either satisfies grpc's dependency: 1.5 is named, the one that
    # goes with Debian's google.golang.org/protobuf.
    containerd golang golang-github-containerd-containerd-dev golang-github-golang-protobuf-1-5-dev
    # image pull/push tests: a local registry (distribution 2.8), htpasswd for its basic auth,
    # openssl to sign its bearer tokens
    docker-registry apache2-utils openssl
)

# Minimum Python for the venv (pyproject: requires-python >= 3.11).
MIN_PYTHON=(3 11)

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root for: $* (run as root or install sudo)"
    fi
}

# --- 1. apt packages -----------------------------------------------------------------------
missing_packages() {
    # dpkg-query prints one status line per known package; unknown ones go to stderr.
    local installed
    installed=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null \
        | awk '$2 == "installed" { print $1 }') || true
    local p
    for p in "${APT_PACKAGES[@]}"; do
        grep -qxF "$p" <<<"$installed" || printf '%s\n' "$p"
    done
}

install_packages() {
    local missing
    mapfile -t missing < <(missing_packages)
    if [ ${#missing[@]} -eq 0 ]; then
        say "apt packages: all ${#APT_PACKAGES[@]} installed"
        return
    fi
    say "apt packages missing: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Recommends are installed: podman needs some of them (catatonit, netavark, ...) to run.
    local apt_opts=(-y -q -o Dpkg::Use-Pty=0)
    # Update the lists first when they are absent or more than a day old; otherwise try the
    # install as is and update only if it fails (a package not in the lists, a stale mirror).
    local lists_fresh=0
    if compgen -G '/var/lib/apt/lists/*_Packages*' >/dev/null \
        && [ -n "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -1440 -print -quit)" ]; then
        lists_fresh=1
    fi
    if [ "$lists_fresh" -eq 0 ]; then
        say "apt-get update"
        as_root apt-get update -q </dev/null
        as_root apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null
    elif ! as_root apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null; then
        say "install failed with the current lists: apt-get update and retry"
        as_root apt-get update -q </dev/null
        as_root apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null
    fi
    mapfile -t missing < <(missing_packages)
    [ ${#missing[@]} -eq 0 ] || die "still missing after apt-get install: ${missing[*]}"
    say "apt packages: installed"
}

if [ "${LAYERFS_SKIP_APT:-0}" = 1 ]; then
    say "apt packages: skipped (LAYERFS_SKIP_APT=1)"
else
    install_packages
fi

# --- 2. /dev/fuse --------------------------------------------------------------------------
if [ -c /dev/fuse ]; then
    say "/dev/fuse: present"
else
    say "/dev/fuse missing: modprobe fuse"
    as_root modprobe fuse || say "modprobe fuse failed (module built in, or not allowed here)"
    if [ ! -c /dev/fuse ] && grep -qw fuse /proc/filesystems; then
        # The driver is there but no device node (a minimal /dev): create it, as udev would.
        as_root mknod -m 0666 /dev/fuse c 10 229 || true
    fi
    [ -c /dev/fuse ] || die "/dev/fuse is still missing: FUSE is not available on this machine"
    say "/dev/fuse: ready"
fi

# --- 3. Python venv ------------------------------------------------------------------------
# The distribution's /usr/bin/python3 first: Debian links libpython into that executable
# (no call through the PLT for the interpreter's own functions), where a pyenv build on PATH is
# usually a shared libpython. Same code, 6 rounds alternating: the daemon's CPU per failed
# lookup, create, unlink, untar and 1 MiB WRITE, every handler's and a mount caller's lower
# (6-30%), PSS the same (docs/benchmarks.md, session 12 interp). "Usable": >= MIN_PYTHON, with
# venv (python3-venv) and the headers pyfuse3 compiles against (python3-dev); else python3 on
# PATH, as before.
usable_python() {
    "$1" - <<EOF 2>/dev/null
import ensurepip, os, sys, sysconfig, venv
sys.exit(sys.version_info[:2] < (${MIN_PYTHON[0]}, ${MIN_PYTHON[1]})
         or not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
EOF
}
# LAYERFS_PYTHON=static3.13 (or static3.12): a CPython linked statically from pyenv's build of
# that version, in a prefix inside the checkout (.python/static3.13), the venv made from it.
# Why (docs/benchmarks.md, session 16 py313s): from 3.12 on the fork server's objects are made
# immortal (PEP 683, forkserver.immortalize) and a mount's PSS drops from 7.4 to 5.0 MiB; a
# shared libpython, as pyenv builds it, pays a call to __tls_get_addr for each access to the
# thread state, which the static link relaxes away. The prefix is a copy, not links to pyenv's:
# /root is 0700, and the tests' other users (nobody, layerfs-rootless) run the venv's python.
# Without pyenv's files for that version: one line, and the default interpreter below.
static_python() {
    local version=$1 root=${PYENV_ROOT:-$HOME/.pyenv}
    local src="" d
    # The newest pyenv build of that version that left its static library (sort -V: 3.13.10 >
    # 3.13.9).
    for d in $(ls -d "$root/versions/$version".* 2>/dev/null | sort -V -r); do
        if compgen -G "$d/lib/python$version/config-$version-*/libpython$version.a" >/dev/null; then
            src=$d
            break
        fi
    done
    if [ -z "$src" ]; then
        say "LAYERFS_PYTHON=static$version: no pyenv build of $version with libpython$version.a under $root/versions: using the default interpreter" >&2
        return 3
    fi
    local config
    config=$(compgen -G "$src/lib/python$version/config-$version-*" | head -n1)
    local prefix=$repo/.python/static$version
    local exe=$prefix/bin/python$version
    # Remade when the source build or this step change (the library's size and time name it).
    local want
    want=$(printf '%s\n' "$src" "static-python-v1" \
        "$(stat -c '%s %Y' "$config/libpython$version.a" "$config/python.o")" | sha256sum | cut -d' ' -f1)
    if [ -x "$exe" ] && [ "$(cat "$prefix/.layerfs-static-stamp" 2>/dev/null)" = "$want" ] \
        && "$exe" -c 'import sys' 2>/dev/null; then
        say "static python: $exe up to date (from $src)" >&2
        printf '%s\n' "$exe"
        return 0
    fi
    say "static python: linking $exe from $src's libpython$version.a, copying its stdlib" >&2
    rm -rf "$prefix"
    (
        umask 022
        mkdir -p "$prefix/bin" "$prefix/lib" "$prefix/include"
        # The executable: python.o with every object of the library (the extension modules
        # need all of its symbols: -export-dynamic); the library's objects are -fPIC, and
        # linked into an executable their thread-local accesses become direct.
        gcc -o "$exe" "$config/python.o" -Wl,--whole-archive "$config/libpython$version.a" \
            -Wl,--no-whole-archive -Xlinker -export-dynamic -ldl -lm -lpthread -lutil
        ln -s "python$version" "$prefix/bin/python3"
        ln -s "python$version" "$prefix/bin/python"
        # The stdlib (with lib-dynload, ensurepip's wheels and sysconfig's data), its tests,
        # the GUI and the build's own site-packages left out; the config directory without
        # the 65 MB library. The headers, for pyfuse3, _craw and mypyc.
        tar -C "$src/lib" --exclude="python$version/test" --exclude="python$version/idlelib" \
            --exclude="python$version/tkinter" --exclude="python$version/turtledemo" \
            --exclude="python$version/site-packages/*" --exclude="libpython$version.a" \
            -cf - "python$version" | tar -C "$prefix/lib" -xf -
        cp -a "$src/include/python$version" "$prefix/include/"
        chmod -R a+rX "$prefix"
    ) || die "static python: building $prefix failed"
    "$exe" -c 'import sys, sysconfig, ensurepip, venv, ctypes, ssl, sqlite3' \
        || die "static python: $exe does not run"
    printf '%s\n' "$want" >"$prefix/.layerfs-static-stamp"
    printf '%s\n' "$exe"
}

case "${LAYERFS_PYTHON:-}" in
"" | python3) ;;
static3.1[2-9])
    [ -z "${PYTHON:-}" ] || die "set PYTHON or LAYERFS_PYTHON, not both"
    PYTHON=$(static_python "${LAYERFS_PYTHON#static}") || {
        rc=$?
        [ "$rc" -eq 3 ] || exit "$rc"
        PYTHON=""
    }
    ;;
*) die "LAYERFS_PYTHON=$LAYERFS_PYTHON: known values are python3 (the default), static3.13, static3.12" ;;
esac

if [ -n "${PYTHON:-}" ]; then
    python=$PYTHON
elif [ -x /usr/bin/python3 ] && usable_python /usr/bin/python3; then
    python=/usr/bin/python3
else
    python=python3
fi
command -v "$python" >/dev/null 2>&1 || die "$python not found on PATH"
"$python" -c "import sys; sys.exit(sys.version_info[:2] < (${MIN_PYTHON[0]}, ${MIN_PYTHON[1]}))" \
    || die "$("$python" -V 2>&1) is too old: layerfs needs Python >= ${MIN_PYTHON[0]}.${MIN_PYTHON[1]}"

venv=$repo/.venv
stamp=$venv/.layerfs-setup-stamp

# The interpreter a venv is made from (for a venv's own python: the one it was made from).
python_identity() { "$1" -c 'import sys; print(sys.version, sys.base_prefix)' 2>/dev/null; }
want_python=$(python_identity "$python")

# What the installed venv depends on: the project metadata, the interpreter and the pip step.
want_stamp=$( { cat pyproject.toml; printf '%s\n' "$want_python";
                echo "pip-step-v1"; } | sha256sum | cut -d' ' -f1)

venv_ok() {
    [ -x "$venv/bin/python" ] && [ "$(python_identity "$venv/bin/python")" = "$want_python" ]
}

if ! venv_ok; then
    [ -e "$venv" ] && say "removing $venv: broken, or made by another interpreter"
    rm -rf "$venv"
    say "creating venv with $("$python" -V 2>&1) at .venv"
    "$python" -m venv "$venv"
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want_stamp" ] \
    && [ -x "$venv/bin/layerfs" ] && [ -x "$venv/bin/pytest" ]; then
    say "venv: up to date"
else
    say "pip install -e '.[dev]' (pyfuse3 builds against libfuse3-dev)"
    export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
    "$venv/bin/python" -m pip install -q -e '.[dev]' </dev/null
    "$venv/bin/python" -c 'import pyfuse3, trio, xxhash' \
        || die "the venv cannot import pyfuse3/trio/xxhash after install"
    printf '%s\n' "$want_stamp" >"$stamp"
    say "venv: installed"
fi

# Byte-compile the checkout (an editable install leaves it to the first import): where
# PYTHONDONTWRITEBYTECODE is set, every mount.layerfs and daemon would compile the modules it
# imports from source on each start (~15 ms of CPU a mount, ~0.4 MiB more per daemon).
"$venv/bin/python" -m compileall -q layerfs mount_helper layerfs_snapshotter >/dev/null \
    || die "cannot byte-compile the sources"

# --- 3b. the compiled raw path (LAYERFS_LOOP=craw) -----------------------------------------
# layerfs/_craw.pyx -> layerfs/_craw.<EXT_SUFFIX> (scripts/build_craw.sh: Cython from the dev
# extras, then gcc), rebuilt when the source, Cython or the interpreter change; never committed
# (.gitignore). A failed build is not fatal: LAYERFS_LOOP=craw then serves with the Python raw
# path, and its tests skip (docs/concurrency.md, the compiled raw path).
scripts/build_craw.sh "$venv/bin/python" layerfs | sed 's/^/setup: /' || true

# --- 3c. the engine compiled by mypyc ------------------------------------------------------
# layerfs/compiled.py (daemons run it with LAYERFS_COMPILED=1; tests/fuse/test_compiled.py
# needs it): built into build/mypyc when the engine's sources changed, ~2 min of CPU; a failed
# build (no gcc, no Python headers) leaves the engine interpreted, said in one line.
"$venv/bin/python" scripts/build_compiled.py | sed 's/^/setup: /' || true

# mount.layerfs: the C front end (mount_helper/front.c, built here with gcc, never committed),
# which makes the thin request to a fork server without starting Python, in front of
# mount.layerfs-py, a launcher that starts Python without site and without pip's wrapper (which
# imports re), for everything else; the launcher alone where the C one does not build
# (mount_helper/launcher.py). Rewritten on every run: pip writes its own wrapper whenever it
# reinstalls.
"$venv/bin/python" -m mount_helper.launcher "$venv/bin/mount.layerfs" \
    || die "cannot write $venv/bin/mount.layerfs"

# --- 4. the rootless test user --------------------------------------------------------------
rootless_user=layerfs-rootless
if [ "$(id -u)" -ne 0 ]; then
    say "user $rootless_user: skipped (not root)"
elif id "$rootless_user" >/dev/null 2>&1 && grep -q "^$rootless_user:" /etc/subuid \
    && grep -q "^$rootless_user:" /etc/subgid; then
    say "user $rootless_user: present"
else
    if ! id "$rootless_user" >/dev/null 2>&1; then
        # useradd -m gives a new user subordinate id ranges (login.defs SUB_UID_*)
        useradd -m -s /bin/sh -c "layerfs rootless podman tests" "$rootless_user"
    fi
    if ! grep -q "^$rootless_user:" /etc/subuid || ! grep -q "^$rootless_user:" /etc/subgid; then
        usermod --add-subuids 300000-365535 --add-subgids 300000-365535 "$rootless_user"
    fi
    say "user $rootless_user: created"
fi

say "done"
