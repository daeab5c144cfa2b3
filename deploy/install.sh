#!/bin/sh
# Install ooda into a virtual environment: install.sh [PREFIX [SOURCE]]
#   PREFIX  where the environment goes (default /opt/ooda: /opt/ooda/bin/ooda)
#   SOURCE  the source tree (default: the one this script is in)
# The Dockerfile runs exactly this, and so does the test that checks the container's install
# step (tests/test_deploy.py) in a clean virtual environment. PIP_NO_CACHE_DIR=1 (the Dockerfile
# sets it) keeps pip's cache out of the image.
set -eu
PREFIX="${1:-/opt/ooda}"
SRC="${2:-$(cd "$(dirname "$0")/.." && pwd)}"
PYTHON="${PYTHON:-python3}"

"$PYTHON" -m venv "$PREFIX"
"$PREFIX/bin/pip" install --disable-pip-version-check --quiet "$SRC"
mkdir -p "$PREFIX/share/doc" "$PREFIX/share/examples" "$PREFIX/share/deploy"
cp "$SRC/docs/operator-guide.md" "$SRC/docs/node-daemon.md" "$PREFIX/share/doc/"
cp "$SRC"/deploy/examples/*.toml "$PREFIX/share/examples/"
cp -R "$SRC/deploy/systemd" "$SRC/deploy/prometheus" "$SRC/deploy/grafana" "$PREFIX/share/deploy/"
"$PREFIX/bin/ooda" --help >/dev/null
echo "ooda installed in $PREFIX ($("$PREFIX/bin/python" -c 'import importlib.metadata as m; print(m.version("ooda-agent"))'))"
