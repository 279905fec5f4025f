#!/usr/bin/env bash
# Run the hub on the embedded default: SQLite and the in-memory channel layer, one
# daphne process on 127.0.0.1:8000 (override with HOST / PORT; DATABASE_URL and
# REDIS_URL switch to PostgreSQL and Redis).
source "$(dirname "$0")/_env.sh"
.venv/bin/python manage.py migrate --no-input
exec .venv/bin/daphne -b "${HOST:-127.0.0.1}" -p "${PORT:-8000}" --websocket_timeout -1 hubproject.asgi:application
