#!/usr/bin/env bash
# Debian's chromium and its chromedriver, for the report.html browser test (tests/test_report_html.py).
# Idempotent and quiet when both are there; installs with apt-get as root, else says what to run.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "install_chromium.sh: chromium and chromedriver are missing; run as root: apt-get install -y chromium chromium-driver" >&2
  exit 1
fi
echo "install_chromium.sh: installing Debian's chromium and chromium-driver"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium chromium-driver >/dev/null
chromium --version
