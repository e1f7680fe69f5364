#!/usr/bin/env bash
# Build (once) the small container image the integration tests run real containers from:
# a debootstrap minimal Debian bookworm with python3, as a Charliecloud directory image.
#
#   containers/build-test-rootfs.sh [DEST]     (default: $HPCDDF_TEST_ROOTFS or
#                                               /var/cache/hpcddf/test-rootfs)
#
# Reused while this script is unchanged (a stamp holds its hash), so CI pays the ~2.5 min
# debootstrap once per machine. Built under a temporary name and renamed, so an interrupted
# build never leaves a half image behind. Needs root and the debootstrap package.
set -euo pipefail
DEST=${1:-${HPCDDF_TEST_ROOTFS:-/var/cache/hpcddf/test-rootfs}}
STAMP="$DEST/.hpcddf-stamp"
HASH=$(sha256sum "$0" "$(dirname "$0")/debian-mirror.sh" | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "test image up to date: $DEST"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
# shellcheck source=debian-mirror.sh
. "$(dirname "$0")/debian-mirror.sh"
MIRROR=$(debian_mirror) || exit 1
mkdir -p "$(dirname "$DEST")"
TMP=$(mktemp -d "$DEST.building.XXXXXX")
# debootstrap mounts /proc inside the tree while it works: an interrupted build unmounts what is
# mounted under the tree before removing it, and never crosses into another file system
cleanup() {
    awk -v t="$TMP/" 'index($2, t) == 1 {print $2}' /proc/mounts | sort -r | xargs -r -n 1 umount -l || true
    rm -rf --one-file-system "$TMP" "$TMP.log"
}
trap cleanup EXIT
echo "building test image in $TMP from $MIRROR (about 2.5 min)"
debootstrap --variant=minbase --include=python3 bookworm "$TMP" "$MIRROR" >"$TMP.log" 2>&1 \
    || { tail -20 "$TMP.log" >&2; rm -f "$TMP.log"; exit 1; }
rm -f "$TMP.log"
rm -rf "$TMP"/var/cache/apt/archives/*.deb "$TMP"/var/lib/apt/lists/*
# ch-run mounts the image read-only, so the targets of the binds sites use must exist in it.
mkdir -p "$TMP"/scratch "$TMP"/data "$TMP"/work "$TMP"/project "$TMP"/home
chmod 755 "$TMP"
echo "$HASH" > "$TMP/.hpcddf-stamp"
rm -rf "$DEST.old"
[[ -e "$DEST" ]] && mv "$DEST" "$DEST.old"
mv "$TMP" "$DEST"
rm -rf "$DEST.old"
trap - EXIT
echo "test image built: $DEST"
