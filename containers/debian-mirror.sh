# Sourced by the image builds: the Debian mirror is the machine's own (its apt sources), never
# a host written in this project; HPCDDF_DEBIAN_MIRROR overrides it.
apt_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] && awk '/^URIs:/{for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] && awk '$1 == "deb" {for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/ && $i !~ /security/) {print $i; exit}}' "$f"
    done
    return 0
}

# debian_mirror: the mirror to debootstrap from, or an error naming the fix
debian_mirror() {
    local mirror=${HPCDDF_DEBIAN_MIRROR:-$(apt_mirror | head -n 1 || true)}
    [[ -n "$mirror" ]] || { echo "error: no Debian mirror in the apt sources (set HPCDDF_DEBIAN_MIRROR=URL)" >&2; return 1; }
    echo "$mirror"
}
