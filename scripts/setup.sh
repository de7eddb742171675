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
