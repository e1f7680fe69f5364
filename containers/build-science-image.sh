#!/usr/bin/env bash
# Build the hpcddf science image for Charliecloud (a directory image for ch-run): Debian
# bookworm from the machine's own Debian mirror, the packages and hpcddf extras that
# containers/science-image.env names (the same file containers/hpcddf.def builds from), and
# hpcddf itself.
#
#   containers/build-science-image.sh [--plan] [DEST]   (default: $HPCDDF_SCIENCE_IMAGE or
#                                                        /var/cache/hpcddf/science-image)
#
# --plan builds nothing: it prints, per layer, "up-to-date" or "build" and the layer's hash.
#
# Two layers, each cached by a hash of its inputs (a stamp file in the image):
#   DEST.base  Debian + the science stack: this script, science-image.env and pyproject.toml
#              (about 5 min the first time on 2 cores; DDFacet comes from pip's wheel cache
#              once it has been built for the machine's own environment)
#   DEST       DEST.base + hpcddf from this checkout: also every file under hpcddf/ and
#              site_configs/ (seconds: a copy of the base and one wheel)
# The wheels are built by the machine's pip (its own index and mirror configuration, its
# wheel cache) and installed in the image without a network. Each layer is built under a
# temporary name and renamed into place, so an interrupted build never leaves half an image.
# Needs root and debootstrap.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAN=0
[[ ${1:-} == --plan ]] && { PLAN=1; shift; }
DEST=${1:-${HPCDDF_SCIENCE_IMAGE:-/var/cache/hpcddf/science-image}}
BASE=$DEST.base
PY=${HPCDDF_BUILD_PYTHON:-python3}
# shellcheck source=science-image.env
. containers/science-image.env
# shellcheck source=debian-mirror.sh
. containers/debian-mirror.sh

hash_of() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }
BASE_HASH=$(hash_of containers/build-science-image.sh containers/science-image.env containers/debian-mirror.sh pyproject.toml)
mapfile -t SOURCES < <(find hpcddf site_configs -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort)
TOP_HASH=$( (echo "$BASE_HASH"; sha256sum "${SOURCES[@]}") | sha256sum | cut -d' ' -f1)
stamp() { cat "$1/.hpcddf-stamp" 2>/dev/null || true; }
if ((PLAN)); then
    for layer in "base $BASE $BASE_HASH" "image $DEST $TOP_HASH"; do
        read -r name dir hash <<<"$layer"
        echo "$name $([[ "$(stamp "$dir")" == "$hash" ]] && echo up-to-date || echo build) $hash"
    done
    exit 0
fi
if [[ "$(stamp "$DEST")" == "$TOP_HASH" ]]; then
    echo "science image up to date: $DEST"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }

TMP=""
# an interrupted build unmounts what is mounted under its tree and removes it, never
# crossing into another file system
cleanup() {
    [[ -n "$TMP" ]] || return 0
    awk -v t="$TMP/" 'index($2, t) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n 1 umount -l || true
    rm -rf --one-file-system "$TMP" "$TMP.log"
}
trap cleanup EXIT

# publish DIR DEST HASH: stamp DIR and rename it to DEST (the old one goes only after)
publish() {
    echo "$3" >"$1/.hpcddf-stamp"
    chmod 755 "$1"
    rm -rf --one-file-system "$2.old"
    [[ -e "$2" ]] && mv "$2" "$2.old"
    mv "$1" "$2"
    rm -rf --one-file-system "$2.old"
}

# in_image DIR CMD...: run CMD as root inside the tree (with /proc), no network needed
in_image() {
    local dir=$1
    shift
    mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
    chroot "$dir" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        LANG=C.UTF-8 HOME=/root "$@"
    umount "$dir/proc"
}

# wheels DIR SPEC...: the wheels of SPEC and everything it needs, built or taken from pip's
# cache by the machine's own pip
wheels() {
    local dir=$1
    shift
    "$PY" -m pip wheel --quiet --wheel-dir "$dir" "$@" >"$dir.log" 2>&1 \
        || { grep -v "is ignored: it is neither" "$dir.log" | tail -20 >&2; echo "error: pip wheel $* failed" >&2; exit 1; }
    rm -f "$dir.log"
}

build_base() {
    local mirror
    mirror=$(debian_mirror) || exit 1
    mkdir -p "$(dirname "$BASE")"
    TMP=$(mktemp -d "$BASE.building.XXXXXX")
    echo "building the science image's base in $TMP from $mirror (about 5 min)"
    debootstrap --variant=minbase --include="$(tr ' ' ',' <<<"$RUN_PACKAGES")" bookworm "$TMP" "$mirror" \
        >"$TMP.log" 2>&1 || { tail -20 "$TMP.log" >&2; exit 1; }
    rm -f "$TMP.log"
    wheels "$TMP/wheels" ".[$EXTRAS]"
    in_image "$TMP" python3 -m pip install --quiet --no-cache-dir --break-system-packages --root-user-action=ignore --no-index \
        --find-links /wheels "hpcddf[$EXTRAS]"
    rm -rf "$TMP/wheels" "$TMP"/var/cache/apt/archives/*.deb "$TMP"/var/lib/apt/lists/*
    for m in $MOUNT_POINTS; do mkdir -p "$TMP$m"; done
    publish "$TMP" "$BASE" "$BASE_HASH"
    TMP=""
}

build_top() {
    TMP=$(mktemp -d "$DEST.building.XXXXXX")
    cp -a "$BASE/." "$TMP/"
    local whl
    # from a copy of the sources as they are now: a wheel built in the checkout reuses
    # setuptools' build/ directory, which keeps modules deleted since (the image probe then
    # sees another hpcddf than the job's)
    mkdir "$TMP/src"
    cp -a pyproject.toml README.md site_configs "$TMP/src/"
    tar -C . --exclude=__pycache__ -cf - hpcddf | tar -C "$TMP/src" -xf -
    wheels "$TMP/wheels" --no-deps "$TMP/src"
    rm -rf "$TMP/src"
    whl=$(cd "$TMP/wheels" && echo hpcddf-*.whl)
    in_image "$TMP" python3 -m pip install --quiet --no-cache-dir --break-system-packages --root-user-action=ignore --no-index \
        --no-deps --force-reinstall "/wheels/$whl"
    rm -rf "$TMP/wheels"
    publish "$TMP" "$DEST" "$TOP_HASH"
    TMP=""
}

t0=$SECONDS
[[ "$(stamp "$BASE")" == "$BASE_HASH" ]] || build_base
build_top
trap - EXIT
echo "science image built: $DEST ($(du -sh "$DEST" | cut -f1), $((SECONDS - t0)) s)"
