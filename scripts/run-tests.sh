#!/usr/bin/env bash
# Run the whole test suite (pure core, WebsocketCommunicator, end-to-end against daphne
# and a redis-server the suite starts itself). Extra arguments go to pytest.
# With DATABASE_URL set (postgres://...), the suite runs against that database.
source "$(dirname "$0")/_env.sh"
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis-server is missing: install Debian's redis-server (the end-to-end tests start their own)" >&2
    exit 1
  fi
fi
.venv/bin/ruff check taskhub tests bench hubproject manage.py
.venv/bin/mypy taskhub tests bench
exec .venv/bin/python -m pytest "$@"
