"""The Celery peer: an ``echo`` task on a Redis broker and result backend.

Its worker is started by ``bench.run`` as
``celery -A bench.celery_app worker --pool=solo`` with ``BENCH_REDIS_URL`` set.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app = Celery("bench", broker=url, backend=url)
app.conf.update(task_default_queue="bench", worker_hijack_root_logger=False, result_expires=600)


@app.task(name="echo")
def echo(payload: Any) -> Any:
    return payload
