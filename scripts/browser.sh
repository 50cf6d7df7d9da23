#!/usr/bin/env bash
# Installs a real headless browser (Debian's chromium) for the tests that check rendered pages.
set -euo pipefail
if command -v chromium >/dev/null || command -v chromium-browser >/dev/null; then exit 0; fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "==> installing chromium (Debian package), for the tests of rendered pages"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
