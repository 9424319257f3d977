#!/usr/bin/env bash
# A Label Studio server for tests/test_labelstudio.py: label-studio in a venv of its own (.venv-labelstudio; its
# Django stack stays out of .venv) and a migrated, empty database the test server starts from (a fresh one
# migrates for about 30 s on 2 cores). Returns at once when both are there.
set -euo pipefail
cd "$(dirname "$0")/../.."
VERSION=1.23.2  # the server label-studio-sdk 2.1.x (pyproject.toml) speaks to
VENV=.venv-labelstudio
STAMP="$VENV/.installed-$VERSION"
[ -e "$STAMP" ] && exit 0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! {
    rm -rf "$VENV" &&
    "${PYTHON:-python3}" -m venv "$VENV" &&
    "$VENV/bin/pip" install --quiet --upgrade pip &&
    "$VENV/bin/pip" install --quiet "label-studio==$VERSION" &&
    LATEST_VERSION_CHECK=false COLLECT_ANALYTICS=false "$VENV/bin/label-studio" version \
        --data-dir "$VENV/template"
} >"$log" 2>&1; then
    cat "$log" >&2
    echo "install_labelstudio.sh: failed (output above)" >&2
    exit 1
fi
[ -s "$VENV/template/label_studio.sqlite3" ] || { echo "install_labelstudio.sh: no template database" >&2; exit 1; }
touch "$STAMP"
