#!/usr/bin/env bash
# Makes sure /usr/bin/chromium exists for the browser tests (`make browser`).
# Without it those tests skip, unless TOKENRELAY_REQUIRE_BROWSER=1 (CI), where they fail.
set -uo pipefail

CHROMIUM=/usr/bin/chromium

warn() {
    echo "" >&2
    echo "######################################################################" >&2
    echo "# install-browser: WARNING: $*" >&2
    if [ "${TOKENRELAY_REQUIRE_BROWSER:-}" = "1" ]; then
        echo "# TOKENRELAY_REQUIRE_BROWSER=1: the browser tests will FAIL." >&2
    else
        echo "# The browser tests (pytest -m browser) will be SKIPPED." >&2
    fi
    echo "######################################################################" >&2
    echo "" >&2
}

if [ -x "$CHROMIUM" ]; then
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    warn "$CHROMIUM is missing and this is not root; install it with: sudo apt-get install -y chromium"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    warn "$CHROMIUM is missing and there is no apt-get here; install Chromium at $CHROMIUM"
    exit 0
fi
echo "install-browser: installing chromium with apt-get"
export DEBIAN_FRONTEND=noninteractive
if ! apt-get update -qq; then
    warn "apt-get update failed; cannot install chromium"
    exit 0
fi
if ! apt-get install -y -qq chromium; then
    warn "apt-get install chromium failed"
    exit 0
fi
if [ ! -x "$CHROMIUM" ]; then
    warn "chromium was installed but $CHROMIUM does not exist"
    exit 0
fi
echo "install-browser: $("$CHROMIUM" --version 2>/dev/null || echo chromium) ready"
