#!/bin/sh
# Installs Debian's `chromium` for the browser tests (tests/conversations/test_chat_page.py), which
# Playwright (pinned in pyproject.toml) drives with executable_path=/usr/bin/chromium: no browser
# download. Idempotent: does nothing when /usr/bin/chromium is there. Skipped (with a message) when
# apt-get is missing or not run as root; the browser tests then skip, saying why.
set -eu
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1 || [ "$(id -u)" != 0 ]; then
    echo "install-chromium: needs apt-get as root; the browser tests will be skipped" >&2
    exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
