"""The dashboard in a real browser (Debian's chromium, driven by Playwright), against real
daphne hubs: a staff user watches a task run and finish without reloading; anyone else is
refused over HTTP and over the WebSocket; a monitor hears every hub process.

Each test starts hubs of its own: failed authentications are counted per client address
and per hub process (all tests connect from 127.0.0.1), so the session's shared hub may be
throttling by the time these run, and the refusals here must not throttle others."""

from __future__ import annotations

import asyncio
import json
import secrets
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import websockets
from django.contrib.auth import BACKEND_SESSION_KEY, HASH_SESSION_KEY, SESSION_KEY, get_user_model
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.utils import timezone

from tests.conftest import TIMEOUT

pytestmark = pytest.mark.timeout(60 * TIMEOUT)

CHROMIUM = "/usr/bin/chromium"
#: Milliseconds Playwright waits for what the page shows.
WAIT_MS = int(4 * TIMEOUT * 1000)

HubDb = Callable[[Callable[[str], Any]], Any]


def add_user(hub_db: HubDb, *, staff: bool, password: str = "") -> str:
    """A user in the hubs' database, with a password the hubs' own hasher reads (the
    tests' settings hash with MD5, which the project does not accept); returns its name."""
    name = f"user-{secrets.token_hex(4)}"
    hashed = PBKDF2PasswordHasher().encode(password, PBKDF2PasswordHasher().salt()) if password else "!"

    def create(alias: str) -> None:
        get_user_model().objects.db_manager(alias).create(username=name, password=hashed, is_staff=staff)

    hub_db(create)
    return name


def session_for(hub_db: HubDb, name: str) -> str:
    """A logged-in session of the user in the hubs' database, as Django's login makes it;
    returns its key (the ``sessionid`` cookie)."""

    def create(alias: str) -> str:
        user = get_user_model().objects.using(alias).get(username=name)
        key = secrets.token_hex(16)
        data = {
            SESSION_KEY: str(user.pk),
            BACKEND_SESSION_KEY: "django.contrib.auth.backends.ModelBackend",
            HASH_SESSION_KEY: user.get_session_auth_hash(),
        }
        Session.objects.using(alias).create(
            session_key=key, session_data=SessionStore().encode(data), expire_date=timezone.now() + timedelta(hours=1)
        )
        return key

    key: str = hub_db(create)
    return key


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        # Debian's chromium: no browser is ever downloaded.
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield launched
        await launched.close()


async def open_dashboard(browser: Any, base: str, name: str, password: str) -> Any:
    """A page on the dashboard, logged in through the admin's login form as users do."""
    page = await browser.new_page(viewport={"width": 1500, "height": 900})
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{base}/taskhub/")
    assert "/admin/login/" in page.url  # not logged in yet: sent to the login
    await page.fill("#id_username", name)
    await page.fill("#id_password", password)
    await page.click("input[type=submit]")
    await page.wait_for_url(f"{base}/taskhub/")
    await page.wait_for_selector('#connection[data-state="live"]')
    return page


async def test_a_staff_user_watches_a_task_run_and_succeed_without_reloading(make_hub, parties, hub_db, browser):
    hub = make_hub()
    password = secrets.token_urlsafe(12)
    name = add_user(hub_db, staff=True, password=password)
    base = f"http://127.0.0.1:{hub.port}"
    page = await open_dashboard(browser, base, name, password)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.evaluate("window.loadedOnce = true")  # gone if the page reloads

    release = asyncio.Event()
    worker = parties.worker(hub.url)

    async def half_then_wait(task: Any) -> Any:
        await task.pickup()
        await task.update({"step": "half"}, progress=0.5)
        await release.wait()
        return {"sent": 2}

    worker.sub(parties.action, half_then_wait)

    async with worker, parties.caller(hub.url) as caller:
        handle = caller.pub(parties.action, ["a@example.org", "b@example.org"])
        row = f'[data-task-id="{handle.task_id}"]'
        await page.wait_for_selector(f'{row}[data-status="started"][data-progress="0.5"]')
        assert await page.locator(row).count() == 1  # one element per task
        cells = await page.locator(f"{row} td").all_inner_texts()
        assert parties.action in cells and parties.caller_name in cells
        assert parties.worker_name in " ".join(cells)  # the service on it

        release.set()
        assert await handle.get_result() == {"sent": 2}
        await page.wait_for_selector(f'{row}[data-status="success"]')
        assert await page.evaluate("window.loadedOnce") is True
        assert await page.locator(row).count() == 1

        await page.click(row)
        timeline = page.locator("#timeline")
        await timeline.wait_for(state="visible")
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#timeline-events tr')].some(r => r.dataset.kind === 'end')"
        )
        kinds = await page.eval_on_selector_all("#timeline-events tr", "rows => rows.map(r => r.dataset.kind)")
        assert kinds == ["init", "start", "pickup", "update", "success", "end"]
        first = await page.locator("#timeline-events tr").first.locator("td").all_inner_texts()
        assert first[0] == "+0.0" and first[1] == "init" and first[2] == parties.caller_name
        update = await page.locator('#timeline-events tr[data-kind="update"] td').all_inner_texts()
        assert update[2] == parties.worker_name and update[3] == "1" and '"progress":0.5' in update[4]
        assert float(update[0].lstrip("+")) >= 0
        await page.wait_for_function("() => document.querySelector('#timeline-payload').textContent.includes('b@')")
        assert json.loads(await page.inner_text("#timeline-result")) == {"sent": 2}
        assert await page.locator("#timeline-facts a.admin").get_attribute("href") == (
            f"/admin/taskhub/taskrecord/{handle.task_id}/change/"
        )
    assert errors == []


async def test_a_failure_stands_out_and_filters_narrow_the_list(make_hub, parties, hub_db, browser):
    hub = make_hub()
    password = secrets.token_urlsafe(12)
    name = add_user(hub_db, staff=True, password=password)
    page = await open_dashboard(browser, f"http://127.0.0.1:{hub.port}", name, password)
    worker = parties.worker(hub.url)

    async def fail_odd(task: Any) -> Any:
        if (await task.get_payload()) % 2:
            raise ValueError("odd numbers are refused")
        return "even"

    worker.sub(parties.action, fail_odd)

    async with worker, parties.caller(hub.url) as caller:
        even, odd = caller.pub(parties.action, 2), caller.pub(parties.action, 3)
        assert await even.get_result() == "even"
        assert await odd.get_result(default="failed") == "failed"
    failed = f'[data-task-id="{odd.task_id}"][data-status="failed"]'
    await page.wait_for_selector(failed)
    assert (await page.inner_text(f"{failed} .reason")).startswith("error: ValueError: odd numbers are refused")
    assert await page.locator(f"{failed} .badge.status-failed").count() == 1

    await page.select_option("#filter-status", "failed")
    await page.wait_for_selector(f'[data-task-id="{even.task_id}"]', state="hidden")
    assert await page.locator(failed).is_visible()
    await page.select_option("#filter-status", "")
    await page.fill("#filter-search", even.task_id[:8])
    await page.wait_for_selector(failed, state="hidden")
    assert await page.locator(f'[data-task-id="{even.task_id}"]').is_visible()


async def test_the_page_converges_on_the_database_when_the_layer_loses_transitions(make_hub, parties, hub_db, browser):
    """Every other message on the layer is lost, the monitors' feed included: the page still
    shows every task's outcome, read again from the database."""
    lossy = {"DJANGO_SETTINGS_MODULE": "tests.e2e.lossy_settings", "TASKHUB_TEST_LOSE_EVERY": "2"}
    first = make_hub(**lossy)
    password = secrets.token_urlsafe(12)
    name = add_user(hub_db, staff=True, password=password)
    page = await open_dashboard(browser, f"http://127.0.0.1:{first.port}", name, password)
    second = make_hub(**lossy)  # the tasks run there: their transitions reach the page over the layer
    worker = parties.worker(second.url)

    async def step(task: Any) -> Any:
        await task.update(None, progress=0.5)
        return "done"

    worker.sub(parties.action, step)
    async with worker, parties.caller(second.url) as caller:
        handles = [caller.pub(parties.action, i) for i in range(6)]
        for handle in handles:
            assert await handle.get_result() == "done"
    for handle in handles:
        await page.wait_for_selector(f'[data-task-id="{handle.task_id}"][data-status="success"][data-progress="0.5"]')
    assert await page.locator(f'[data-task-id^="{handles[0].task_id[:8]}"]').count() == 1


def http_get(url: str, cookie: str | None = None) -> tuple[int, str]:
    """``(status, Location)`` of a GET that is not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    request = urllib.request.Request(url, headers={"Cookie": f"sessionid={cookie}"} if cookie else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(request, timeout=TIMEOUT) as response:
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", "")


MONITOR_HELLO = """async () => {
  const ws = new WebSocket(`ws://${location.host}/ws/taskhub/`);
  const heard = [];
  return await new Promise((resolve) => {
    ws.onopen = () => ws.send(JSON.stringify({type: 'hello', monitor: true, ref: 1}));
    ws.onmessage = (event) => heard.push(JSON.parse(event.data));
    ws.onclose = (event) => resolve({heard, code: event.code});
  });
}"""


@pytest.mark.parametrize("who", ["anonymous", "not staff"])
async def test_others_are_refused_over_http_and_over_the_websocket(make_hub, hub_db, browser, who):
    hub = make_hub()
    base = f"http://127.0.0.1:{hub.port}"
    cookie = session_for(hub_db, add_user(hub_db, staff=False)) if who == "not staff" else None
    status, location = await asyncio.to_thread(http_get, f"{base}/taskhub/", cookie)
    assert (status, location) == (302, "/admin/login/?next=/taskhub/")

    context = await browser.new_context()
    if cookie:
        await context.add_cookies([{"name": "sessionid", "value": cookie, "url": base}])
    page = await context.new_page()
    page.set_default_timeout(WAIT_MS)
    await page.goto(f"{base}/taskhub/")
    assert "/admin/login/" in page.url and await page.locator("[data-task-id]").count() == 0
    if cookie:  # the admin tells a logged-in user why
        assert "not authorized" in await page.inner_text("#content")
    # A script of the hub's own origin (same cookies) cannot monitor either.
    refused = await page.evaluate(MONITOR_HELLO)
    assert refused["code"] == 4001
    assert [(m["type"], m.get("code"), m.get("ref")) for m in refused["heard"]] == [
        ("error", "authentication_failed", 1)
    ]
    await context.close()


async def test_a_monitor_hears_transitions_written_by_another_hub_process(make_hub, parties, hub_db):
    """The monitor on one process, the worker and the caller on another: the second
    process learns from the database that a monitor is live, and sends to its group."""
    first = make_hub()
    cookie = session_for(hub_db, add_user(hub_db, staff=True))
    headers = {"Cookie": f"sessionid={cookie}"}
    async with websockets.connect(first.url, additional_headers=headers, open_timeout=TIMEOUT) as monitor:
        await monitor.send(json.dumps({"type": "hello", "monitor": True, "ref": 1}))
        welcome = json.loads(await asyncio.wait_for(monitor.recv(), TIMEOUT))
        assert welcome["type"] == "welcome" and welcome["monitor"] is True
        second = make_hub()  # started once the monitor is in the database
        worker = parties.worker(second.url)
        worker.sub(parties.action, lambda task: "done")
        async with worker, parties.caller(second.url) as caller:
            handle = caller.pub(parties.action, None)
            assert await handle.get_result() == "done"
        kinds: list[str] = []
        while "end" not in kinds:
            message = json.loads(await asyncio.wait_for(monitor.recv(), TIMEOUT))
            if message["type"] == "transition" and message["task"]["id"] == handle.task_id:
                kinds += [event["kind"] for event in message["events"]]
        assert kinds[:2] == ["init", "start"] and kinds[-2:] == ["success", "end"]
