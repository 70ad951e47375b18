#!/usr/bin/env bash
# mypy over pkisvc, backends and ext_pillar as installed: backends/ is the package pkisvc.backends
# (setup.py package_dir), which mypy cannot map, so type-check a tree of symlinks shaped
# like the installed package.
set -euo pipefail
cd "$(dirname "$0")/.."
tree=.typecheck
rm -rf "$tree"
mkdir -p "$tree/pkisvc"
for f in pkisvc/*.py; do ln -s "../../$f" "$tree/pkisvc/"; done
ln -s ../../backends "$tree/pkisvc/backends"
ln -s ../../pkisvc/testing "$tree/pkisvc/testing"
ln -s ../../ext_pillar "$tree/pkisvc/ext_pillar"
cd "$tree"
exec ../.venv/bin/mypy --config-file ../setup.cfg pkisvc
