#!/usr/bin/env bash
# Demo: build a sample three-layer stack, mount it with layerfs, and show the merged tree,
# copy-up, new files, deletions (whiteouts) and a replaced directory (opaque) in the upper.
# Run as root:  sudo ./scripts/demo.sh
# Set KEEP=1 to keep the temporary directory (it is unmounted either way); LAYERFS=PROGRAM to
# demo another build of the `layerfs` command (default: .venv/bin/layerfs).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: run as root (sudo ./scripts/demo.sh): it creates whiteout devices and mounts" >&2
    exit 1
fi

layerfs=${LAYERFS:-$repo/.venv/bin/layerfs}
PATH="$(dirname "$layerfs"):$PATH"

if [ -t 1 ]; then bold=$'\033[1m' plain=$'\033[0m'; else bold="" plain=""; fi
heading() { printf '\n%s== %s%s\n' "$bold" "$*" "$plain"; }
run() { printf '$ %s\n' "$*"; "$@"; }
runsh() { printf '$ %s\n' "$1"; sh -c "$1"; }

demo_dir=$(mktemp -d "${TMPDIR:-/tmp}/layerfs-demo.XXXXXX")
base=$demo_dir/layers/base      # bottom lower
update=$demo_dir/layers/update  # middle lower
app=$demo_dir/layers/app        # topmost lower
upper=$demo_dir/upper
merged=$demo_dir/merged

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if mountpoint -q "$merged" 2>/dev/null; then
        echo "demo: cleaning up: unmounting $merged" >&2
        "$layerfs" umount "$merged" 2>/dev/null || fusermount3 -u -z "$merged" || true
    fi
    if mountpoint -q "$merged" 2>/dev/null; then
        echo "demo: $merged is still mounted; leaving $demo_dir in place" >&2
    elif [ "${KEEP:-0}" = 1 ]; then
        echo "demo: kept $demo_dir" >&2
    else
        rm -rf "$demo_dir"
    fi
    if [ "$rc" -ne 0 ]; then
        echo "demo: FAILED (exit $rc)" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# put FILE CONTENT: create a file with its parent directories.
put() {
    mkdir -p "$(dirname "$1")"
    printf '%s\n' "$2" >"$1"
}

# show_tree DIR: one line per entry, relative to DIR, with type+mode; whiteout devices and
# symlink targets spelled out.
show_tree() {
    (cd "$1" && find . -mindepth 1 -printf '%M %p\n' | sort -k2 | while read -r mode path; do
        case $mode in
            c*) printf '%s %s  (char device %s)\n' "$mode" "$path" "$(stat -c '%Hr/%Lr' "$path")" ;;
            l*) printf '%s %s -> %s\n' "$mode" "$path" "$(readlink "$path")" ;;
            *) printf '%s %s\n' "$mode" "$path" ;;
        esac
    done)
}

# ---------------------------------------------------------------------------------------------
heading "0. Set up the machine (scripts/setup.sh; quick once done)"
"$repo/scripts/setup.sh"

# ---------------------------------------------------------------------------------------------
heading "1. Build three lower layers in $demo_dir/layers"

# base: a tiny distribution.
put "$base/etc/os-release" $'NAME="Sample Linux"\nVERSION="1.0"\nID=sample'
put "$base/etc/hostname" "sample"
put "$base/etc/motd" "Welcome to Sample Linux 1.0"
put "$base/bin/sh" $'#!/bin/busybox sh'
put "$base/bin/hello" $'#!/bin/sh\necho hello from base'
put "$base/usr/share/doc/base/README" "base layer docs"
put "$base/opt/plugins/old-a.conf" "plugin a (base)"
put "$base/opt/plugins/old-b.conf" "plugin b (base)"
put "$base/var/log/base.log" "log line from base"
put "$base/srv/data.txt" "data written in base"
mkdir -p "$base/srv/empty-dir"
ln -s ../usr/share/doc "$base/srv/docs"
chmod 755 "$base/bin/sh" "$base/bin/hello"

# update: an upgrade. Replaces os-release, deletes motd with a kernel-style whiteout
# (character device 0/0, as overlayfs writes it), adds to /bin and /usr/share/doc.
put "$update/etc/os-release" $'NAME="Sample Linux"\nVERSION="1.1"\nID=sample'
mknod "$update/etc/motd" c 0 0
chmod 000 "$update/etc/motd"
put "$update/bin/tool" $'#!/bin/sh\necho tool from update'
chmod 755 "$update/bin/tool"
put "$update/usr/share/doc/update/README" "update layer docs"
put "$update/opt/plugins/old-b.conf" "plugin b (update)"

# app: an application layer in OCI form. Deletes /bin/hello with a `.wh.hello` file and
# replaces /opt/plugins with an opaque directory (`.wh..wh..opq`).
put "$app/bin/app" $'#!/bin/sh\necho app'
chmod 755 "$app/bin/app"
: >"$app/bin/.wh.hello"
mkdir -p "$app/opt/plugins"
: >"$app/opt/plugins/.wh..wh..opq"
put "$app/opt/plugins/new.conf" "plugin new (app)"
put "$app/usr/share/doc/app/README" "app layer docs"

for layer in base update app; do
    printf -- '-- layers/%s\n' "$layer"
    show_tree "$demo_dir/layers/$layer"
done

mkdir -p "$upper" "$merged"
# From here on, work inside the demo directory so the commands shown are short.
cd "$demo_dir"

# ---------------------------------------------------------------------------------------------
heading "2. Mount: app (top) : update : base (bottom), upper empty"
run layerfs mount layers/app:layers/update:layers/base upper merged
run findmnt -n -o TARGET,SOURCE,FSTYPE "$merged" || true
echo "(no --workdir given: the default workdir is .upper.layerfs-work, beside the upper)"
run ls -A

# ---------------------------------------------------------------------------------------------
heading "3. The merged tree"
actual=$(cd merged && find . -mindepth 1 | sort)
printf '%s\n' "$actual"

expected=$(sort <<'EOF'
./bin
./bin/app
./bin/sh
./bin/tool
./etc
./etc/hostname
./etc/os-release
./opt
./opt/plugins
./opt/plugins/new.conf
./srv
./srv/data.txt
./srv/docs
./srv/empty-dir
./usr
./usr/share
./usr/share/doc
./usr/share/doc/app
./usr/share/doc/app/README
./usr/share/doc/base
./usr/share/doc/base/README
./usr/share/doc/update
./usr/share/doc/update/README
./var
./var/log
./var/log/base.log
EOF
)
if [ "$actual" != "$expected" ]; then
    echo "demo: the merged tree is not what the layers say it should be (- expected, + actual):" >&2
    diff <(printf '%s\n' "$expected") <(printf '%s\n' "$actual") >&2 || true
    exit 1
fi
echo "(as expected: /etc/motd and /bin/hello are whited out, /opt/plugins is opaque,"
echo " /bin and /usr/share/doc are merged from all three layers)"

run cat merged/etc/os-release
run cat merged/opt/plugins/new.conf
run ls -l merged/srv/docs
run ls merged/srv/docs/

# ---------------------------------------------------------------------------------------------
heading "4. Change the merged tree"
echo "- append to a file from the base layer (copy-up):"
runsh "echo 'appended through layerfs' >>merged/srv/data.txt"
run cat merged/srv/data.txt
echo "- create a new file:"
runsh "echo 'new file' >merged/etc/new.conf"
echo "- delete a file from the base layer (whiteout):"
run rm merged/var/log/base.log
echo "- replace a merged directory with a new, empty one (opaque):"
run rm -r merged/usr/share/doc
run mkdir merged/usr/share/doc
runsh "echo 'fresh docs' >merged/usr/share/doc/NEW"
run ls -A merged/usr/share/doc merged/var/log

# ---------------------------------------------------------------------------------------------
heading "5. What layerfs wrote to the upper"
show_tree upper
echo "-- overlay xattrs in the upper:"
run getfattr -R -h -d -m '^trusted\.overlay\.' upper
echo "-- the lower file is unchanged:"
run cat layers/base/srv/data.txt

# ---------------------------------------------------------------------------------------------
heading "6. Unmount"
run layerfs umount merged
if mountpoint -q "$merged"; then
    echo "demo: $merged is still mounted after layerfs umount" >&2
    exit 1
fi
echo "unmounted; the merged directory is empty again: [$(ls -A "$merged")]"

heading "Done"
