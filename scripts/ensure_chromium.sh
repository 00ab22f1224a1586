#!/usr/bin/env bash
# Make sure Debian's chromium is there for the browser tests. Installs it only when running as
# root with apt-get (CI, fresh dev machines here); otherwise says what the browser tests need.
set -u
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the browser tests..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  exit $?
fi
echo "NOTE: /usr/bin/chromium is missing; browser tests will be skipped (apt-get install chromium)."
