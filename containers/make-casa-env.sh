#!/usr/bin/env bash
# Build (once) the separate CASA environment the PHANGS CASA stages run in: a venv holding
# casatools/casatasks 6.7.0.31 (the only release with a Python 3.11 wheel that imports on
# Debian 12), casadata (measures tables, antenna lists) and six (a missing dependency of
# casatasks), plus DEST/casasiteconfig.py so CASA needs no ~/.casa and never touches the network.
#
#   containers/make-casa-env.sh DEST        (e.g. /work/casa-env; hpcddf finds it through
#                                            $HPCDDF_CASA_ENV)
#
# Reused while this script is unchanged (a stamp holds its hash), so reruns take a second.
# Built under a temporary name and renamed, so an interrupted build never leaves a half
# environment behind. pip's wheel cache is reused (the casadata wheel alone is 350 MB).
# PYTHON selects the interpreter (default python3); it must be Python 3.11.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DEST" >&2; exit 2; }
DEST=$(realpath -m "$1")
PYTHON=${PYTHON:-python3}
STAMP="$DEST/.hpcddf-stamp"
HASH=$(sha256sum "$0" | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$HASH" ]]; then
    echo "CASA environment up to date: $DEST"
    exit 0
fi
PYVER=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
if [[ "$PYVER" != "3.11" ]]; then
    echo "error: $PYTHON is Python $PYVER; casatools 6.7.0.31 has wheels for Python 3.11 only (set PYTHON=python3.11)" >&2
    exit 1
fi
mkdir -p "$(dirname "$DEST")"
TMP=$(mktemp -d "$DEST.building.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
echo "building the CASA environment in $TMP (about 1.5 min with a cold pip cache)"
"$PYTHON" -m venv "$TMP"
"$TMP/bin/python" -m pip install -q --upgrade pip
"$TMP/bin/python" -m pip install -q casatools==6.7.0.31 casatasks==6.7.0.31 casadata six

# Paths inside the venv as they will be once it is renamed to DEST.
SITE=$("$TMP/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
SITE=${SITE/#$TMP/$DEST}
mkdir -p "$TMP/cache"
cat > "$TMP/casasiteconfig.py" <<EOF
# CASA site configuration written by hpcddf's containers/make-casa-env.sh; point
# CASASITECONFIG at this file (an absolute path). Measures come from the casadata wheel and are
# never updated over the network; no logger window, GUI or interactive matplotlib.
import os as _os
import tempfile as _tempfile

measurespath = "$SITE/casadata/__data__"
datapath = [measurespath]
measures_auto_update = False
data_auto_update = False
skipnetworkcheck = True
cachedir = "$DEST/cache"
startupfile = "$DEST/cache/startup.py"
nologger = True
nogui = True
agg = True
# CASA writes its log beside the products when the caller names one (hpcddf does), never in
# the working directory.
logfile = _os.environ.get("HPCDDF_CASA_LOGFILE") or _os.path.join(
    _tempfile.gettempdir(), "casa-%d.log" % _os.getpid())
EOF

# A venv records its own path in its scripts (shebangs, activate); point them at DEST.
grep -rlI --null -- "$TMP" "$TMP/bin" | xargs -0 -r sed -i "s|$TMP|$DEST|g"
rm -rf "$DEST.old"
[[ -e "$DEST" ]] && mv "$DEST" "$DEST.old"
mv "$TMP" "$DEST"
rm -rf "$DEST.old"
trap - EXIT
# The first import builds CASA's caches and proves the environment works.
CASASITECONFIG="$DEST/casasiteconfig.py" HPCDDF_CASA_LOGFILE=/dev/null \
    "$DEST/bin/python" -c 'import casatools, casatasks' >/dev/null \
    || { echo "error: casatools/casatasks do not import from $DEST" >&2; exit 1; }
echo "$HASH" > "$STAMP"     # last: only a working environment is reused
echo "CASA environment built: $DEST"
