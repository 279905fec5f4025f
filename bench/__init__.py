"""Benchmarks: TaskHub against Celery and a raw websockets echo, measured in one run."""
