#!/usr/bin/env bash
# A plain install (no extras) in a fresh virtual environment gives a working raytrade:
# `raytrade --help`, `raytrade config show`, and every module of ours imports. CI's own
# environment always has the test extras, which once hid a runtime dependency that only
# arrived through them (pydantic-settings).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python3.11 || command -v python3)
d=$(mktemp -d)
trap 'rm -rf "$d"' EXIT
"$PY" -m venv "$d/venv"
"$d/venv/bin/python" -m pip install --quiet --upgrade pip
# From a copy of the tracked (and untracked, not ignored) files: an in-tree build/ could
# package modules that no longer exist.
mkdir "$d/src"
git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C "$d/src"
"$d/venv/bin/python" -m pip install --quiet -c constraints.txt "$d/src"
cd "$d"  # away from the checkout: the installed package is what runs, not the source tree
"$d/venv/bin/raytrade" --help >/dev/null
RAYTRADE_STORE__URI="$d/store" "$d/venv/bin/raytrade" config show >/dev/null
"$d/venv/bin/python" - <<'PY'
import importlib
import pkgutil

n = 0
for pkg in ("raytrade", "cluster", "core", "actors", "serve", "tune"):
    m = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(m.__path__, pkg + "."):
        if info.name.endswith(".__main__"):
            continue  # `python -m raytrade`: running it is `raytrade --help`'s check above
        importlib.import_module(info.name)
        n += 1
print(f"plain install: raytrade --help, config show, and {n} modules import")
PY
