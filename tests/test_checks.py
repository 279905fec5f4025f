from __future__ import annotations

import pytest
from django.test import override_settings

from taskhub.checks import check_settings
from taskhub.conf import conf


def ids(**settings):
    with override_settings(**settings):
        return [e.id for e in check_settings()]


def test_defaults_pass():
    assert ids() == []


@pytest.mark.parametrize("value", [0, -1, "30", True, float("inf")])
def test_e001_pickup_timeout(value):
    assert ids(TASKHUB_PICKUP_TIMEOUT=value) == ["taskhub.E001"]


def test_e001_accepts_none():
    assert ids(TASKHUB_PICKUP_TIMEOUT=None, TASKHUB_COMPLETE_TIMEOUT=None) == []


@pytest.mark.parametrize("value", [0, "x", -5.0])
def test_e002_complete_timeout(value):
    assert ids(TASKHUB_COMPLETE_TIMEOUT=value) == ["taskhub.E002"]


@pytest.mark.parametrize("name", ["MAX_MESSAGE_SIZE", "MAX_PAYLOAD_SIZE", "INLINE_PAYLOAD_SIZE"])
def test_e003_sizes(name):
    assert ids(**{f"TASKHUB_{name}": 1.5}) == ["taskhub.E003"]


def test_e004_size_order():
    assert ids(TASKHUB_MAX_PAYLOAD_SIZE=800 * 1024) == ["taskhub.E004"]
    assert ids(TASKHUB_INLINE_PAYLOAD_SIZE=600 * 1024) == ["taskhub.E004"]


@pytest.mark.parametrize(
    "name",
    ["INSTANCE_LEASE", "SWEEP_INTERVAL", "AUTH_TIMEOUT", "RESUME_GRACE", "RETRY_BACKOFF_MAX", "AUTH_FAILURE_WINDOW"],
)
def test_e005_durations(name):
    assert ids(**{f"TASKHUB_{name}": 0}) == ["taskhub.E005"]


def test_e006_lease_outlives_sweeps():
    assert ids(TASKHUB_INSTANCE_LEASE=2.0, TASKHUB_SWEEP_INTERVAL=1.0) == ["taskhub.E006"]


def test_w001_message_size_over_daphnes_limit():
    assert ids(TASKHUB_MAX_MESSAGE_SIZE=2 * 1024 * 1024) == ["taskhub.W001"]


def test_e007_channel_layer():
    assert ids(CHANNEL_LAYERS={}) == ["taskhub.E007"]


@pytest.mark.parametrize("value", [0, -2, 1.5, "4", True])
def test_e008_db_threads(value):
    assert ids(TASKHUB_DB_THREADS=value) == ["taskhub.E008"]


def test_e008_accepts_a_thread_count():
    assert ids(TASKHUB_DB_THREADS=4) == []


@pytest.mark.parametrize("name", ["TASKHUB_PREPARED_STATEMENTS", "TASKHUB_SQLITE_INLINE"])
@pytest.mark.parametrize("value", [0, 1, "yes", None])
def test_e009_switches(name, value):
    assert ids(**{name: value}) == ["taskhub.E009"]


@pytest.mark.parametrize("name", ["TASKHUB_PREPARED_STATEMENTS", "TASKHUB_SQLITE_INLINE"])
def test_e009_accepts_false(name):
    assert ids(**{name: False}) == []


@pytest.mark.parametrize("name", ["AUTH_FAILURES", "MAX_QUEUED_FRAMES"])
@pytest.mark.parametrize("value", [0, 2.5, "10", None])
def test_e011_counts(name, value):
    assert ids(**{f"TASKHUB_{name}": value}) == ["taskhub.E011"]


@pytest.mark.parametrize("value", [0, 1.5e7, 1024, 768 * 1024, None])
def test_e012_buffered_bytes(value):
    # 768 KiB could not hold two whole messages of the default limit.
    assert ids(TASKHUB_MAX_BUFFERED_BYTES=value) == ["taskhub.E012"]


def test_e012_accepts_twice_the_message_size():
    assert ids(TASKHUB_MAX_BUFFERED_BYTES=2 * 768 * 1024) == []


@pytest.mark.parametrize("name", ["KEEP_SUCCEEDED", "KEEP_FAILED"])
@pytest.mark.parametrize("value", [0, -1, "1 day", float("inf")])
def test_e013_retention(name, value):
    assert ids(**{f"TASKHUB_{name}": value}) == ["taskhub.E013"]


def test_e013_accepts_seconds_and_none():
    assert ids(TASKHUB_KEEP_SUCCEEDED=3600, TASKHUB_KEEP_FAILED=None) == []


@pytest.mark.parametrize("value", [0, 2.5, None, "100"])
def test_e014_purge_batch(value):
    assert ids(TASKHUB_PURGE_BATCH=value) == ["taskhub.E014"]


@pytest.mark.parametrize("value", ["", "short", 12345678901234567890])
def test_e015_metrics_token(value):
    assert ids(TASKHUB_METRICS_TOKEN=value) == ["taskhub.E015"]


def test_e015_accepts_a_long_token():
    assert ids(TASKHUB_METRICS_TOKEN="x" * 32) == []


def test_settings_are_read_on_access_and_unknown_names_fail():
    assert conf.PICKUP_TIMEOUT == 30.0  # remembered from here on
    with override_settings(TASKHUB_PICKUP_TIMEOUT=7.0):
        assert conf.PICKUP_TIMEOUT == 7.0
        with override_settings(TASKHUB_COMPLETE_TIMEOUT=9.0):  # another setting changes
            assert (conf.PICKUP_TIMEOUT, conf.COMPLETE_TIMEOUT) == (7.0, 9.0)
        assert conf.COMPLETE_TIMEOUT == 300.0
    assert conf.PICKUP_TIMEOUT == 30.0
    with pytest.raises(AttributeError, match="unknown TaskHub setting"):
        _ = conf.PICKUP_TIMEOTU


def test_a_setting_changed_with_pytest_djangos_fixture_is_seen(settings):
    assert conf.MAX_PAYLOAD_SIZE == 512 * 1024
    settings.TASKHUB_MAX_PAYLOAD_SIZE = 1024
    assert conf.MAX_PAYLOAD_SIZE == 1024
    settings.TASKHUB_MAX_PAYLOAD_SIZE = 2048
    assert conf.MAX_PAYLOAD_SIZE == 2048
