#!/usr/bin/env bash
# Installs what redfuse's tests and local runs need, skipping whatever is already there:
#   apt: redis-server, redis-tools    redis-server, redis-cli, redis-benchmark (every test)
#        prometheus                   prometheus, promtool (tests/deploy.rs)
#        python3, python3-pip         when missing
#   pip: kubernetes-validate          Kubernetes schemas, offline, and PyYAML (tests/deploy.rs)
# Prints one line per install step; the package managers' own output is kept quiet.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

have() { command -v "$1" >/dev/null 2>&1; }

apt_pkgs=()
if ! { have redis-server && have redis-cli && have redis-benchmark; }; then
  apt_pkgs+=(redis-server redis-tools)
fi
if ! { have prometheus && have promtool; }; then
  apt_pkgs+=(prometheus)
fi
if ! have python3; then
  apt_pkgs+=(python3 python3-pip)
elif ! python3 -m pip --version >/dev/null 2>&1; then
  apt_pkgs+=(python3-pip)
fi
if [ "${#apt_pkgs[@]}" -gt 0 ]; then
  echo "install-deps: apt-get install ${apt_pkgs[*]}"
  $SUDO apt-get update -qq
  # No recommends: prometheus would pull in node-exporter and start it.
  $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
fi

if ! python3 -c 'import kubernetes_validate, yaml' >/dev/null 2>&1; then
  echo "install-deps: pip install kubernetes-validate"
  user=()
  if [ "$(id -u)" != 0 ]; then user=(--user); fi
  pip_install() {
    python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
      "${user[@]}" "$@"
  }
  # A Debian-managed python3 refuses global installs (PEP 668) unless told otherwise.
  pip_install kubernetes-validate 2>/dev/null ||
    pip_install --break-system-packages kubernetes-validate
  python3 -m kubernetes_validate --version >/dev/null
fi

# chromium (+ a font): headless screenshots of the admin status page (tests/ops.rs)
if ! { have chromium || have chromium-browser; }; then
  echo "install-deps: apt-get install chromium"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
