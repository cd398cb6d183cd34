#!/usr/bin/env bash
# Install Debian's Chromium (and ChromeDriver) for tests/test_browser.py; idempotent.
# Playwright drives this system browser: it never downloads a browser of its own.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null  # keep make test readable
