#!/bin/sh
# Install ooda as docs/operator-guide.md ("Install") describes, on the agent host or a GPU node:
#
#   sudo sh deploy/install.sh [--prefix /opt/ooda] [--root /] [--src DIR] [--no-user]
#                             [--no-units] [--no-pip]
#
#   --prefix DIR  the virtual environment, as the system will see it (default /opt/ooda:
#                 /opt/ooda/bin/ooda; the units and runbook links are written for it)
#   --root DIR    install into DIR as the system's root: a chroot, an image being built, a test's
#                 empty directory (default /). The virtual environment lives at ROOT/PREFIX.
#   --src DIR     the source tree (default: the one this script is in)
#   --no-user     do not create the `ooda` system user (the Dockerfile makes its own)
#   --no-units    do not install the systemd units
#   --no-pip      leave no pip, setuptools or wheel in the environment (the image)
#
# What it does: the virtual environment with exactly the packages of deploy/requirements.txt
# (pinned, hashes checked) and ooda itself; the system user and group `ooda`; the units
# of deploy/systemd (ooda-agent.service, ooda-node.service and ooda-site.service, the site
# coordinator) in /etc/systemd/system (not enabled); /etc/ooda (0750 root:ooda) with a
# configuration skeleton agent.toml (0640) to fill in; /var/lib/ooda (0700) and /var/log/ooda
# (0750) owned by ooda; every doc, example (a site's under examples/site), unit, rule file and
# dashboard under PREFIX/share. Run again (an upgrade), it replaces what it installed and keeps
# what the operator owns: /etc/ooda/agent.toml and anything else in /etc/ooda, the state, the logs.
set -eu
PATH=$PATH:/usr/sbin:/sbin  # useradd

PREFIX=/opt/ooda
ROOT=/
SRC=$(cd "$(dirname "$0")/.." && pwd)
MAKE_USER=1
UNITS=1
KEEP_PIP=1
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --src) SRC=$2; shift 2 ;;
        --no-user) MAKE_USER=0; shift ;;
        --no-units) UNITS=0; shift ;;
        --no-pip) KEEP_PIP=0; shift ;;
        *) echo "install.sh: error: unknown option $1 (see the comment at its top)" >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "install.sh: error: --prefix $PREFIX is not absolute" >&2; exit 2 ;; esac
mkdir -p "$ROOT" && ROOT=$(cd "$ROOT" && pwd) && ROOT=${ROOT%/}
PYTHON=${PYTHON:-python3}
DEST="$ROOT$PREFIX"
LOCK="$SRC/deploy/requirements.txt"
[ -f "$LOCK" ] || { echo "install.sh: error: $LOCK missing: --src is not an ooda source tree" >&2; exit 2; }

# -- the environment: the locked build backend, then the locked packages (hashes checked; the
# few without wheels built with that backend), then ooda itself, built offline with it too.
# (PIP_NO_CACHE_DIR=1 keeps pip's cache out of an image.)
[ -x "$DEST/bin/python" ] || "$PYTHON" -m venv "$DEST"
pip_install() { "$DEST/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }
backend=$(mktemp)
trap 'rm -f "$backend"' EXIT
awk '/^[A-Za-z0-9]/ { keep = ($0 ~ /^(setuptools|wheel)==/) } keep' "$LOCK" >"$backend"
pip_install --require-hashes --no-deps -r "$backend"
pip_install --require-hashes --no-deps --no-build-isolation -r "$LOCK"
pip_install --no-deps --no-build-isolation --no-index --force-reinstall "$SRC"
"$DEST/bin/python" -m pip check >/dev/null

# -- everything an operator reads or copies from, in PREFIX/share (replaced on upgrade).
mkdir -p "$DEST/share/doc" "$DEST/share/examples/site" "$DEST/share/deploy"
cp "$SRC"/docs/*.md "$DEST/share/doc/"
cp "$SRC"/deploy/examples/*.toml "$DEST/share/examples/"
# A site's coordinator and an agent in it (site.toml names demand-response.toml beside it).
cp "$SRC"/deploy/site/*.toml "$DEST/share/examples/site/"
rm -rf "$DEST/share/deploy/systemd" "$DEST/share/deploy/prometheus" "$DEST/share/deploy/grafana"
cp -R "$SRC/deploy/systemd" "$SRC/deploy/prometheus" "$SRC/deploy/grafana" "$DEST/share/deploy/"
# Units and runbook links name the default prefix: point them at this one.
for file in "$DEST"/share/deploy/systemd/*.service "$DEST/share/deploy/prometheus/ooda-rules.yml"; do
    sed -i "s|/opt/ooda/|$PREFIX/|g" "$file"
done

# -- the system user and group, their directories and the configuration skeleton.
owner=""
if [ "$MAKE_USER" = 1 ]; then
    if ! grep -q '^ooda:' "$ROOT/etc/passwd" 2>/dev/null; then
        set -- --system --user-group --home-dir /var/lib/ooda --no-create-home \
            --shell /usr/sbin/nologin --comment "ooda agent" ooda
        if [ -n "$ROOT" ]; then useradd --root "$ROOT" "$@"; else useradd "$@"; fi
    fi
    # Numeric ids from the root's own files: the host's names may differ from the root's.
    uid=$(awk -F: '$1 == "ooda" { print $3 }' "$ROOT/etc/passwd")
    gid=$(awk -F: '$1 == "ooda" { print $3 }' "$ROOT/etc/group")
    owner="$uid:$gid"
fi
mkdir -p "$ROOT/etc/ooda" "$ROOT/var/lib/ooda" "$ROOT/var/log/ooda"
chmod 0750 "$ROOT/etc/ooda" "$ROOT/var/log/ooda"
chmod 0700 "$ROOT/var/lib/ooda"
if [ ! -e "$ROOT/etc/ooda/agent.toml" ]; then
    cp "$SRC/deploy/examples/cluster.toml" "$ROOT/etc/ooda/agent.toml"
    chmod 0640 "$ROOT/etc/ooda/agent.toml"
    fresh_config=1
fi
if [ -n "$owner" ]; then
    chown "0:${owner#*:}" "$ROOT/etc/ooda"
    [ -z "${fresh_config:-}" ] || chown "0:${owner#*:}" "$ROOT/etc/ooda/agent.toml"
    chown "$owner" "$ROOT/var/lib/ooda" "$ROOT/var/log/ooda"
fi

# -- the units (not enabled: fill in /etc/ooda/agent.toml first).
if [ "$UNITS" = 1 ]; then
    mkdir -p "$ROOT/etc/systemd/system"
    for unit in "$DEST"/share/deploy/systemd/*.service; do
        install -m 0644 "$unit" "$ROOT/etc/systemd/system/${unit##*/}"
    done
    if [ -z "$ROOT" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
fi

if [ "$KEEP_PIP" = 0 ]; then
    "$DEST/bin/python" -m pip uninstall --quiet --yes pip setuptools wheel
fi
"$DEST/bin/ooda" --help >/dev/null
version=$("$DEST/bin/python" -c 'import importlib.metadata as m; print(m.version("ooda-agent"))')
echo "ooda $version installed in $DEST${fresh_config:+; fill in $ROOT/etc/ooda/agent.toml}"
