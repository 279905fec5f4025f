"""Settings of the runnable hub, configured from the environment.

=================  ===============================================  ===========================
variable           meaning                                          default
=================  ===============================================  ===========================
DATABASE_URL       any dj-database-url URL                          ``sqlite:///<BASE>/var/taskhub.sqlite3``
REDIS_URL          channels-redis; unset means the in-memory layer  unset
TASKHUB_LAYER      ``core`` or ``pubsub`` (with REDIS_URL)          ``core``
SECRET_KEY         Django's secret key                              a development key (warns)
DJANGO_DEBUG       ``1`` for debug pages                            ``0``
ALLOWED_HOSTS      comma-separated host names                       ``localhost,127.0.0.1,[::1]``
TASKHUB_LOG_LEVEL  the level of the ``taskhub`` loggers             ``INFO``
TASKHUB_*          any of TaskHub's settings (``taskhub.conf``)     the app's defaults
=================  ===============================================  ===========================

Empty ``ALLOWED_HOSTS`` under ``DJANGO_DEBUG=1`` means the local names only, as Django's
own host check has it under ``DEBUG``.
"""

from __future__ import annotations

import os
import types
import typing
import warnings
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from taskhub import conf as _taskhub_conf

BASE_DIR = Path(__file__).resolve().parent.parent

_DEV_SECRET = "taskhub-development-only-secret-key-change-me"
SECRET_KEY = os.environ.get("SECRET_KEY", _DEV_SECRET)
if SECRET_KEY == _DEV_SECRET:
    warnings.warn("SECRET_KEY is not set: using the development key", stacklevel=1)
DEBUG = os.environ.get("DJANGO_DEBUG", "0").lower() in {"1", "true", "yes", "on"}
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()
]
if DEBUG and not ALLOWED_HOSTS:
    # What Django's host check (and taskhub.security's Origin check) take under DEBUG when
    # ALLOWED_HOSTS is empty, spelled out.
    ALLOWED_HOSTS = [".localhost", "127.0.0.1", "[::1]"]

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "channels",
    "taskhub",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # daphne serves no static files: the admin's and the dashboard's are served by the
    # application itself (WhiteNoise).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "hubproject.urls"
ASGI_APPLICATION = "hubproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, object]:
    url = os.environ.get("DATABASE_URL") or f"sqlite:///{BASE_DIR / 'var' / 'taskhub.sqlite3'}"
    db: dict[str, object] = dict(dj_database_url.parse(url))
    options: dict[str, object] = dict(db.get("OPTIONS") or {})  # type: ignore[call-overload]
    if db["ENGINE"] == "django.db.backends.sqlite3":
        Path(str(db["NAME"])).parent.mkdir(parents=True, exist_ok=True)
        # WAL lets readers run beside the writer; IMMEDIATE makes every transaction take
        # the write lock up front, so racing transitions queue instead of deadlocking.
        options.update(
            transaction_mode="IMMEDIATE",
            timeout=20,
            init_command="PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        )
        # Keep the connection: Channels closes old connections around every database
        # call, and closing the last connection of a WAL database checkpoints it, which
        # cost a round trip about 16 ms (measured with py-spy, see bench/README.md).
        db["CONN_MAX_AGE"] = None
        db["TEST"] = {"NAME": str(BASE_DIR / "var" / "test.sqlite3")}
    elif db["ENGINE"] == "django.db.backends.postgresql":
        # A connection per message costs 4x without a pool (measured).
        options.setdefault("pool", {"min_size": 2, "max_size": 20})
        db["CONN_MAX_AGE"] = 0
    db["OPTIONS"] = options
    return db


DATABASES = {"default": _database()}

REDIS_URL = os.environ.get("REDIS_URL", "")
if REDIS_URL:
    _layer = os.environ.get("TASKHUB_LAYER", "core")
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer"
            if _layer == "pubsub"
            else "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL], **({} if _layer == "pubsub" else {"capacity": 1000})},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer", "CONFIG": {"capacity": 1000}}}

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True
STATIC_URL = "static/"
# `STATIC_ROOT=DIR manage.py collectstatic` gathers the files there (optional: see
# WHITENOISE_USE_FINDERS); unset, WhiteNoise serves them from the apps' folders.
STATIC_ROOT = os.environ.get("STATIC_ROOT") or None
# Serve the apps' static files straight from their folders too, so that a fresh
# checkout is styled without a collectstatic step.
WHITENOISE_USE_FINDERS = True
# Under DEBUG, files edited while the hub runs are served as they are now (not cut to the
# size they had at start).
WHITENOISE_AUTOREFRESH = DEBUG
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)-8s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    # A handler of its own, so that TaskHub's lines show under any server (manage.py
    # configures no root handler); not propagated, or a root handler (daphne's) would
    # write each line a second time.
    "loggers": {
        "taskhub": {
            "handlers": ["console"],
            "level": os.environ.get("TASKHUB_LOG_LEVEL", "INFO").upper(),
            "propagate": False,
        }
    },
}


_BOOLEANS = {**dict.fromkeys(("1", "true", "yes", "on"), True), **dict.fromkeys(("0", "false", "no", "off"), False)}


def _from_environment(name: str, hint: object) -> object:
    """``TASKHUB_<name>`` from the environment, as the type the app's setting has.

    Raises:
        ImproperlyConfigured: the variable does not spell a value of that type.
    """
    text = os.environ[f"TASKHUB_{name}"].strip()
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in kinds and text.lower() == "none":
        return None
    try:
        if bool in kinds:
            return _BOOLEANS[text.lower()]
        if int in kinds:
            return int(text)
        if float in kinds:
            return float(text)
    except (KeyError, ValueError):
        what = {bool: "true or false", int: "a whole number", float: "a number"}
        expected = next(what[kind] for kind in (bool, int, float) if kind in kinds)
        also = " or none" if type(None) in kinds else ""
        raise ImproperlyConfigured(
            f"the environment variable TASKHUB_{name}={text!r} is not {expected}{also}"
        ) from None
    return text


# TaskHub's own settings (README, "Settings"): each one may be set from the environment as
# TASKHUB_<NAME>, read as the type taskhub.conf gives it ("none" for None). Taken from
# taskhub.conf, so that a new setting needs no line here.
for _name, _hint in typing.get_type_hints(_taskhub_conf.Settings).items():
    if _name in _taskhub_conf.DEFAULTS and f"TASKHUB_{_name}" in os.environ:
        globals()[f"TASKHUB_{_name}"] = _from_environment(_name, _hint)
