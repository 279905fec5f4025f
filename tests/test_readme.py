"""The README, run as a new user runs it: every code block, against live hubs.

Each fenced block follows an ``<!-- test: NAME -->`` comment, and :data:`COVERED` names
the test that runs it; a block without one fails :func:`test_every_block_is_run`. Blocks
run as written, with the virtualenv active (its ``bin`` first on ``PATH``, as
``. .venv/bin/activate`` does), in a folder of their own unless the README says "in the
repository". What the README tells users to supply comes from the environment, as it
says: ``TASKHUB_KEY`` is the key ``create`` printed, ``TASKHUB_URL`` the test's hub.
Where a block names something that is the user's own (a path, a host, a port), the test
puts its own in its place with :func:`replace`, which fails if the README changed there.

The README's settings tables are checked here too: the runnable project reads every
TaskHub setting from the environment, logs each line once, and under ``DJANGO_DEBUG=1``
with empty ``ALLOWED_HOSTS`` accepts local browser origins only.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin

from taskhub import conf
from taskhub.client import Client
from tests.conftest import TIMEOUT
from tests.processes import (
    ROOT,
    START_TIMEOUT,
    Hub,
    create_database,
    drop_database,
    free_port,
    start_redis,
    wait_for_port,
)

pytestmark = [
    pytest.mark.timeout(60 * TIMEOUT),
    pytest.mark.skipif(
        bool(os.environ.get("TASKHUB_TEST_EXTRA_COLUMN")),
        reason="the README runs hub processes of its own, as tests/e2e does, which the run of "
        "tests/test_store.py with columns added leaves out",
    ),
]

README = ROOT / "README.md"
#: The virtualenv the suite runs in: what ``. .venv/bin/activate`` puts first on PATH.
VENV_BIN = Path(sys.executable).parent
UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"

#: Each block of the README, and the test that runs it.
COVERED = {
    "two-commands": "test_two_commands",
    "first-credentials": "test_first_credentials",
    "worker": "test_worker_and_caller",
    "caller": "test_worker_and_caller",
    "cli-worker": "test_command_line",
    "jobs.py": "test_command_line",
    "cli-caller": "test_command_line",
    "credentials": "test_credentials",
    "purge": "test_purge",
    "scaled-out": "test_scaled_out",
    "integrator-install": "test_integrator_project",
    "integrator-settings": "test_integrator_project",
    "integrator-asgi": "test_integrator_project",
    "integrator-urls": "test_integrator_project",
    "integrator-run": "test_integrator_project",
}

MARKED_BLOCK = re.compile(r"^<!-- test: (?P<name>\S+) -->\n```(?P<language>\w+)\n(?P<code>.*?)^```$", re.M | re.S)


def blocks() -> dict[str, str]:
    """The README's marked code blocks by name: their code, each line ending in a newline."""
    found: dict[str, str] = {}
    for match in MARKED_BLOCK.finditer(README.read_text()):
        assert match["name"] not in found, f"two README blocks are named {match['name']!r}"
        found[match["name"]] = match["code"]
    return found


def block(name: str) -> str:
    return blocks()[name]


def replace(code: str, old: str, new: str) -> str:
    """``code`` with ``old`` (something of the user's own) replaced by the test's ``new``."""
    assert code.count(old) == 1, f"the README block no longer has {old!r} once:\n{code}"
    return code.replace(old, new)


def user_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell with the suite's virtualenv active: nothing that
    points Python at the repository, a settings module, a database or the hub."""
    dropped = ("PYTHONPATH", "DJANGO_SETTINGS_MODULE", "DATABASE_URL", "REDIS_URL", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in dropped and not k.startswith("TASKHUB_")}
    env = activated(env, VENV_BIN)
    env.update(extra)
    return env


def activated(env: dict[str, str], bin_dir: Path) -> dict[str, str]:
    """``env`` with the virtualenv of ``bin_dir`` active, and no other."""
    path = [p for p in env.get("PATH", "").split(os.pathsep) if p and Path(p) not in (VENV_BIN, bin_dir)]
    return {**env, "PATH": os.pathsep.join([str(bin_dir), *path]), "VIRTUAL_ENV": str(bin_dir.parent)}


def sh(code: str, cwd: Path, env: dict[str, str], timeout: float = 30 * TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run shell lines as a user pastes them, stopping at the first that fails."""
    return subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def in_background(code: str, cwd: Path, env: dict[str, str], log: Path | None = None) -> subprocess.Popen[str]:
    """Start shell lines that run until stopped (a server, a worker), in a process group
    of their own; with ``log``, their output goes there, else standard error is a pipe."""
    output: Any = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen(
        ["bash", "-e", "-c", code],
        cwd=cwd,
        env=env,
        stdout=output if log is not None else None,
        stderr=subprocess.STDOUT if log is not None else output,
        text=True,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[str]) -> None:
    """Stop a process group :func:`in_background` started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=START_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def json_documents(text: str) -> Iterator[Any]:
    """The JSON documents printed one after another in ``text``."""
    decoder, position = json.JSONDecoder(), 0
    while text[position:].strip():
        while text[position].isspace():
            position += 1
        document, position = decoder.raw_decode(text, position)
        yield document


async def round_trip(worker_url: str, worker_key: str, caller_url: str, caller_key: str) -> Any:
    """Publish ``mail:send-bulk`` as ``webapp`` at ``caller_url`` and serve it as ``mailer``
    at ``worker_url``: the result."""

    async def send_bulk(task: Any) -> Any:
        return {"sent": len(await task.get_payload())}

    worker = Client(worker_url, name="mailer", key=worker_key)
    worker.sub("mail:send-bulk", send_bulk)
    async with worker, Client(caller_url, name="webapp", key=caller_key) as caller:
        return await asyncio.wait_for(caller.pub("mail:send-bulk", ["a@example.org"]).get_result(), 10 * TIMEOUT)


# -- a hub and credentials made as the README makes them ----------------------------------


@pytest.fixture(scope="module")
def readme_redis() -> Iterator[str]:
    url, process = start_redis()
    yield url
    process.terminate()
    process.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def readme_db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, migrated database (on PostgreSQL when the suite runs there)."""
    base = os.environ.get("DATABASE_URL", "")
    url = create_database(base, tmp_path_factory.mktemp("readme-db"))
    yield url
    drop_database(base, url)


@pytest.fixture(scope="module")
def first_credentials(readme_db: str) -> tuple[dict[str, str], subprocess.CompletedProcess[str]]:
    """The README's first credentials, made by its block in the repository: ``({name: key},
    what the block printed)``."""
    done = sh(block("first-credentials"), cwd=ROOT, env=user_env(DATABASE_URL=readme_db))
    assert done.returncode == 0, done.stdout + done.stderr
    keys = dict(re.findall(r"^Created credential (\S+)\. Its key \(shown once\):\n(\S+)$", done.stdout, re.M))
    return keys, done


@pytest.fixture(scope="module")
def keys(first_credentials: tuple[dict[str, str], Any]) -> dict[str, str]:
    return first_credentials[0]


@pytest.fixture(scope="module")
def hub(readme_db: str, readme_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    h = Hub(readme_db, readme_redis, tmp_path_factory.mktemp("readme-hub") / "hub.log")
    yield h
    h.stop()


# -- the blocks -----------------------------------------------------------------------------


def test_every_block_is_run():
    text = README.read_text()
    fences = re.findall(r"^```", text, re.M)
    found = blocks()
    assert len(fences) == 2 * len(found), "a README code block has no <!-- test: NAME --> comment before it"
    assert set(found) == set(COVERED)
    assert all(name in globals() for name in COVERED.values())


def test_two_commands(tmp_path):
    run_hub, run_tests = block("two-commands").splitlines()
    port = free_port()
    env = user_env(DATABASE_URL=f"sqlite:///{tmp_path / 'hub.sqlite3'}", PORT=str(port))
    process = in_background(run_hub, ROOT, env, log=tmp_path / "run-hub.log")
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]  # a text-mode process
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=TIMEOUT) as page:
            assert page.status == 200 and b'name="password"' in page.read()
    finally:
        stop(process)
    # The suite's command, on one file only (this test runs inside it): ruff, mypy, pytest.
    done = sh(f"{run_tests.split('#')[0].strip()} --collect-only -q tests/test_docs.py", ROOT, user_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^\d+ tests? collected", done.stdout, re.M), done.stdout


async def test_first_credentials(first_credentials, hub):
    keys, done = first_credentials
    assert set(keys) == {"mailer", "webapp"}
    # createsuperuser asks its questions on a terminal; without one it says so, and passes.
    assert "Superuser creation skipped due to not running in a TTY" in done.stdout + done.stderr
    for name, key in keys.items():
        async with Client(hub.url, name=name, key=key) as client:
            assert await client.ping() >= 0


def test_worker_and_caller(hub, keys, tmp_path):
    tmp_path.joinpath("worker.py").write_text(block("worker"))
    tmp_path.joinpath("caller.py").write_text(block("caller"))
    worker = in_background("python worker.py", tmp_path, user_env(TASKHUB_URL=hub.url, TASKHUB_KEY=keys["mailer"]))
    try:
        done = sh("python caller.py", tmp_path, user_env(TASKHUB_URL=hub.url, TASKHUB_KEY=keys["webapp"]))
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines() == [
            "{'sent': 2}",  # the first result
            "0.5 {'sent': 1}",  # the progress of the third task
            "1.0 {'sent': 2}",
            "success ['init', 'start', 'pickup', 'update', 'update', 'success', 'end']",
            "None",  # the cancelled task, watched by id
            "{'sent': 2}",  # ...then retried: the only failed task
        ]
    finally:
        stop(worker)
    assert worker.stderr is not None
    assert "Traceback" not in worker.stderr.read()


def test_command_line(hub, keys, tmp_path):
    jobs = block("jobs.py")
    assert jobs == ROOT.joinpath("examples", "jobs.py").read_text()  # the module the README shows
    tmp_path.joinpath("jobs.py").write_text(jobs)
    worker = in_background(block("cli-worker"), tmp_path, user_env(TASKHUB_URL=hub.url, TASKHUB_KEY=keys["mailer"]))
    assert worker.stderr is not None  # a pipe
    try:
        assert "serving mail:send-bulk" in worker.stderr.readline()
        done = sh(block("cli-caller"), tmp_path, user_env(TASKHUB_URL=hub.url, TASKHUB_KEY=keys["webapp"]))
        assert done.returncode == 0, done.stderr
        # Each pub's result and the watched task's, alone on standard output.
        assert list(json_documents(done.stdout)) == [{"sent": 2}, {"sent": 1}, {"sent": 1}, {"sent": 1}]
        # On standard error: each task's id, its progress, the watched task's timeline.
        ids = re.findall(rf"^task ({UUID})$", done.stderr, re.M)
        assert len(ids) == 3, done.stderr
        assert "[###############...............]  50%" in done.stderr
        assert re.search(r"^\S+  init +webapp", done.stderr, re.M), done.stderr
        # The worker logs a line per task.
        logged = ""
        while not all(task_id in logged for task_id in ids):
            line = worker.stderr.readline()
            assert line, f"the worker ended: {logged}"
            logged += line
    finally:
        stop(worker)


def test_credentials(readme_db, keys):
    done = sh(block("credentials"), ROOT, user_env(DATABASE_URL=readme_db))
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert "Created credential geo. Its key (shown once):" in out
    assert "geo\tactive\tmax_instances=4\tsub=geo,weather:forecast\tpub=log" in out  # updated, then listed
    assert "Disabled geo." in out
    assert out[-2] == "New key of geo (shown once):" and re.fullmatch(r"[\w-]{32,}", out[-1])


OLD_TASKS = """
import uuid
from datetime import timedelta
from django.utils import timezone
from taskhub.models import TaskEvent, TaskRecord
now = timezone.now()
for status, age in (("success", 40), ("failed", 40), ("failed", 1)):
    when = now - timedelta(days=age)
    task = TaskRecord.objects.create(
        id=uuid.uuid4(), action="readme:purge", publisher_name="app", status=status,
        created_at=when, finished_at=when,
    )
    TaskEvent.objects.create(task=task, kind="init", service="app", created_at=when)
"""


def test_purge(readme_db):
    env = user_env(DATABASE_URL=readme_db)
    made = sh(f"python manage.py shell -c '{OLD_TASKS}'", ROOT, env)
    assert made.returncode == 0, made.stdout + made.stderr
    done = sh(block("purge"), ROOT, env)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    # The dry run counts the two tasks over 30 days old; the second run deletes the failed one.
    assert [line.split(" that ")[0] for line in out if "would delete" in line] == [
        "success: would delete 1 tasks (1 events, 0 assignments)",
        "failed: would delete 1 tasks (1 events, 0 assignments)",
        "ended: would delete 0 tasks (0 events, 0 assignments)",
    ]
    assert any(line.startswith("failed: deleted 1 tasks (1 events, 0 assignments)") for line in out), out


async def test_scaled_out(readme_db, readme_redis, keys, hub, tmp_path):
    export, migrate, serve = block("scaled-out").splitlines()
    written = dict(re.findall(r"(\w+)=(\S+)", export.removeprefix("export ")))
    assert list(written) == ["DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ALLOWED_HOSTS"]
    # The test's database, Redis and secret in place of the example's hosts and "...".
    env = user_env(
        DATABASE_URL=readme_db,
        REDIS_URL=readme_redis,
        SECRET_KEY=secrets.token_urlsafe(),
        ALLOWED_HOSTS=written["ALLOWED_HOSTS"],
    )
    done = sh(migrate, ROOT, env)
    assert done.returncode == 0, done.stdout + done.stderr
    port = free_port()
    process = in_background(replace(serve, "-p 8001", f"-p {port}"), ROOT, env, log=tmp_path / "daphne.log")
    try:
        wait_for_port(port, process)  # type: ignore[arg-type]  # a text-mode process
        # A worker on one process (the module's hub) and a caller on this one work together.
        url = f"ws://127.0.0.1:{port}/ws/taskhub/"
        assert await round_trip(hub.url, keys["mailer"], url, keys["webapp"]) == {"sent": 1}
    finally:
        stop(process)


def copy_repository(destination: Path) -> None:
    """The repository's files as a user's clone has them (no virtualenv, caches or data)."""
    ignored = shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache", "node_modules"
    )
    shutil.copytree(ROOT, destination, ignore=ignored)


@pytest.mark.timeout(600 * TIMEOUT)
async def test_integrator_project(readme_redis, tmp_path):
    """A fresh virtualenv with the install line, ``django-admin startproject mysite``, the
    README's settings and ``asgi.py``; then its run block serves the hub."""
    source = tmp_path / "taskhub"
    copy_repository(source)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=60 * TIMEOUT)
    env = activated(user_env(), venv / "bin")

    async def run(code: str, cwd: Path, **extra: str) -> subprocess.CompletedProcess[str]:
        done = await asyncio.to_thread(sh, code, cwd, {**env, **extra}, 300 * TIMEOUT)
        assert done.returncode == 0, f"{code}\n{done.stdout}{done.stderr}"
        return done

    await run(replace(block("integrator-install"), "/path/to/taskhub", str(source)), tmp_path)
    await run("django-admin startproject mysite", tmp_path)
    project = tmp_path / "mysite"
    settings = project / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + "\n" + block("integrator-settings"))
    project.joinpath("mysite", "asgi.py").write_text(block("integrator-asgi"))
    project.joinpath("mysite", "urls.py").write_text(block("integrator-urls"))
    check = await run("python manage.py check", project)
    assert "System check identified no issues" in check.stdout
    assert (await run("python -c 'import mysite.asgi; print(mysite.asgi.application)'", project)).stdout

    port = free_port()
    serve = in_background(
        replace(block("integrator-run"), "daphne ", f"daphne -p {port} "),
        project,
        {**env, "REDIS_URL": readme_redis},
        log=tmp_path / "daphne.log",
    )
    try:
        await asyncio.to_thread(wait_for_port, port, serve, 3 * START_TIMEOUT)  # type: ignore[arg-type]
        url = f"ws://127.0.0.1:{port}/ws/taskhub/"
        created = [
            (await run(f"python manage.py taskhub_credential create {name} {perm}", project)).stdout.split()[-1]
            for name, perm in (("mailer", "--sub mail"), ("webapp", "--pub mail"))
        ]
        assert await round_trip(url, created[0], url, created[1]) == {"sent": 1}
        # A page of another site cannot open the hub's socket in a browser (DEBUG is on).
        with pytest.raises(InvalidStatus) as refused:
            async with websockets.connect(url, origin=Origin("http://evil.example"), open_timeout=TIMEOUT):
                pass
        assert refused.value.response.status_code == 403
        # The app's pages are mounted: the dashboard sends an anonymous visitor to log in.
        dashboard = await asyncio.to_thread(http_status, f"http://127.0.0.1:{port}/taskhub/")
        assert dashboard == (302, "/admin/login/?next=/taskhub/")
    finally:
        stop(serve)
    assert "Traceback" not in (tmp_path / "daphne.log").read_text()


def http_status(url: str) -> tuple[int, str]:
    """The status of a GET, and where a redirect goes (not followed)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(url, timeout=TIMEOUT) as response:
            return response.status, ""
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", "")


# -- the settings the README lists, from the environment ------------------------------------


def readme_settings() -> list[str]:
    """The names (without ``TASKHUB_``) in the README's table of TaskHub's settings."""
    text = README.read_text()
    table = text[text.index("| setting | unit | default | meaning |") :].split("\n\n")[0]
    return re.findall(r"^\| `TASKHUB_(\w+)` \|", table, re.M)


def sample(name: str) -> tuple[str, Any]:
    """A value of the setting's type other than its default: as the environment spells it,
    and as read."""
    hint = typing.get_type_hints(conf.Settings)[name]
    kinds = typing.get_args(hint) or (hint,)
    for kind, text, value in ((bool, "false", False), (int, "12345", 12345), (float, "2.5", 2.5), (str, "orm", "orm")):
        if kind in kinds:
            return text, value
    raise AssertionError(f"TASKHUB_{name} has a type the environment cannot spell: {kinds}")


def project_settings(names: list[str], **environ: str) -> subprocess.CompletedProcess[str]:
    """Print the runnable project's ``TASKHUB_<name>`` settings (JSON), with ``environ``."""
    code = (
        "import json; from django.conf import settings; "
        f"print(json.dumps({{name: getattr(settings, 'TASKHUB_' + name) for name in {names!r}}}))"
    )
    env = user_env(DJANGO_SETTINGS_MODULE="hubproject.settings", **environ)
    return subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_every_setting_in_the_readme_is_read_from_the_environment():
    names = readme_settings()
    assert "AUTH_TIMEOUT" in names and "MAX_PAYLOAD_SIZE" in names
    assert not set(names) - set(conf.DEFAULTS), "the README lists settings taskhub.conf does not know"
    samples = {name: sample(name) for name in names}
    assert all(value != conf.DEFAULTS[name] for name, (_, value) in samples.items())
    done = project_settings(names, **{f"TASKHUB_{name}": text for name, (text, _) in samples.items()})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {name: value for name, (_, value) in samples.items()}
    # "none" for the settings that may be None.
    nullable = [n for n in names if type(None) in typing.get_args(typing.get_type_hints(conf.Settings)[n])]
    assert nullable
    done = project_settings(nullable, **{f"TASKHUB_{name}": "none" for name in nullable})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == dict.fromkeys(nullable)


@pytest.mark.parametrize(
    ("variable", "value", "error"),
    [
        ("TASKHUB_AUTH_TIMEOUT", "ten", "the environment variable TASKHUB_AUTH_TIMEOUT='ten' is not a number"),
        ("TASKHUB_MAX_PAYLOAD_SIZE", "1.5", "TASKHUB_MAX_PAYLOAD_SIZE='1.5' is not a whole number"),
        ("TASKHUB_PICKUP_TIMEOUT", "never", "TASKHUB_PICKUP_TIMEOUT='never' is not a number or none"),
    ],
)
def test_a_setting_the_environment_misspells_stops_with_an_error_naming_it(variable, value, error):
    done = project_settings(["AUTH_TIMEOUT"], **{variable: value})
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1].startswith("django.core.exceptions.ImproperlyConfigured: ")
    assert done.stderr.splitlines()[-1].endswith(error)


def test_hub_log_lines_appear_once(readme_db, tmp_path):
    h = Hub(readme_db, None, tmp_path / "hub.log", TASKHUB_LOG_LEVEL="DEBUG")
    h.stop()  # it logs this line before it listens
    log = h.log()
    assert log.count("the sweeper starts with daphne's event loop") == 1, log
    assert "DEBUG" in log and "taskhub.asgi" in log  # TASKHUB_LOG_LEVEL, and the logger's name


async def test_debug_with_empty_allowed_hosts_accepts_local_origins_only(readme_db, tmp_path):
    h = Hub(readme_db, None, tmp_path / "hub.log", DJANGO_DEBUG="1", ALLOWED_HOSTS="")
    try:
        for origin, accepted in (
            ("http://evil.example", False),
            ("http://localhost.evil.example", False),
            (f"http://localhost:{h.port}", True),
            (f"http://127.0.0.1:{h.port}", True),
            ("http://app.localhost", True),
        ):
            try:
                async with websockets.connect(h.url, origin=Origin(origin), open_timeout=TIMEOUT):
                    opened = True
            except InvalidStatus as exc:
                assert exc.response.status_code == 403
                opened = False
            assert opened is accepted, origin
    finally:
        h.stop()
