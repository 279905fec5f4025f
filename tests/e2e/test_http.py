"""What daphne serves over HTTP besides the hub: the admin, styled."""

from __future__ import annotations

import asyncio
import urllib.request

import pytest

from tests.conftest import TIMEOUT

pytestmark = pytest.mark.timeout(30 * TIMEOUT)


def get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
        return response.status, response.headers.get("Content-Type", ""), response.read()


async def test_the_admin_is_styled_under_daphne(hub):
    base = f"http://127.0.0.1:{hub.port}/"
    status, _, login = await asyncio.to_thread(get, base + "admin/login/")
    assert status == 200 and b"/static/admin/css/base.css" in login
    status, content_type, css = await asyncio.to_thread(get, base + "static/admin/css/base.css")
    assert status == 200 and content_type.startswith("text/css") and len(css) > 1000
