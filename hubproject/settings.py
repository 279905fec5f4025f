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
=================  ===============================================  ===========================
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import dj_database_url

BASE_DIR = Path(__file__).resolve().parent.parent

_DEV_SECRET = "taskhub-development-only-secret-key-change-me"
SECRET_KEY = os.environ.get("SECRET_KEY", _DEV_SECRET)
if SECRET_KEY == _DEV_SECRET:
    warnings.warn("SECRET_KEY is not set: using the development key", stacklevel=1)
DEBUG = os.environ.get("DJANGO_DEBUG", "0").lower() in {"1", "true", "yes", "on"}
ALLOWED_HOSTS = [
    h.strip() for h in os.environ.get("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h.strip()
]

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
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {"taskhub": {"handlers": ["console"], "level": os.environ.get("TASKHUB_LOG_LEVEL", "INFO")}},
}

# TaskHub's own settings (see README, "Settings"); each may be overridden from the environment.
for _name in ("PICKUP_TIMEOUT", "COMPLETE_TIMEOUT", "INSTANCE_LEASE", "SWEEP_INTERVAL"):
    if f"TASKHUB_{_name}" in os.environ:
        _value = os.environ[f"TASKHUB_{_name}"]
        globals()[f"TASKHUB_{_name}"] = None if _value.lower() == "none" else float(_value)
