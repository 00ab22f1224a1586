#!/usr/bin/env bash
# Make sure Debian's PostgreSQL server binaries are there for the PostgreSQL half of the database
# tests (tests/postgres_server.py starts a throwaway server from /usr/lib/postgresql/*/bin).
# Installs them only when running as root with apt-get; otherwise says what the tests need.
set -u
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's postgresql for the database tests..."
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  exit $?
fi
echo "NOTE: PostgreSQL is missing; its database tests will be skipped (apt-get install postgresql)."
