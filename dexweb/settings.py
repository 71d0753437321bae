"""Dex settings: one module, read from the environment.

With no DATABASE_URL / REDIS_URL the embedded Postgres and Redis under `.dex/` are used (dexweb/embedded.py);
with them set, the servers they name. Bad values fail loudly with ImproperlyConfigured.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ImproperlyConfigured(f"{name} must be a boolean (true/false), got {raw!r}")


def env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a number, got {raw!r}") from None


def env_int(name: str, default: int) -> int:
    value = env_float(name, default)
    if value != int(value):
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}")
    return int(value)


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    value = env_str(name, default).strip().lower()
    if value not in choices:
        raise ImproperlyConfigured(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def database_from_url(url: str) -> dict:
    """DATABASE_URL → DATABASES entry. `?host=/socket/dir` selects a unix socket (as pgserver gives)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ImproperlyConfigured(f"DATABASE_URL must be a postgres:// URL, got scheme {parsed.scheme!r}")
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    host = query.pop("host", None) or unquote(parsed.hostname or "")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parsed.path.lstrip("/")) or "postgres",
        "USER": unquote(parsed.username or ""),
        "PASSWORD": unquote(parsed.password or ""),
        "HOST": host,
        "PORT": str(parsed.port or ""),
        # Workers and the scheduler keep their connection; the health check drops one Postgres closed.
        "CONN_MAX_AGE": env_int("DEX_CONN_MAX_AGE", 600),
        "CONN_HEALTH_CHECKS": True,
        "OPTIONS": query,
        "TEST": {"NAME": env_str("DEX_TEST_DATABASE", "") or None},
    }


# DEX_ENV=production (README "Deploy"): no defaults for secrets or addresses, no embedded servers, HTTPS only;
# `manage.py check --deploy` is clean. DEX_DEBUG=false alone only turns debugging off (benchmarks use that).
PRODUCTION = env_choice("DEX_ENV", ("development", "production"), "development") == "production"


def env_required(name: str) -> str:
    """A variable production can't do without: ImproperlyConfigured naming it when it is unset."""
    value = env_str(name).strip()
    if not value:
        raise ImproperlyConfigured(f"{name} must be set when DEX_ENV=production")
    return value


DEBUG = env_bool("DEX_DEBUG", not PRODUCTION)
if PRODUCTION and DEBUG:
    raise ImproperlyConfigured("DEX_DEBUG=true is not allowed when DEX_ENV=production")
if PRODUCTION:
    SECRET_KEY = env_required("DEX_SECRET_KEY")
else:
    SECRET_KEY = env_str("DEX_SECRET_KEY") or ("dev-only-insecure-key-do-not-use-in-production" if DEBUG else "")
if not SECRET_KEY:
    raise ImproperlyConfigured("DEX_SECRET_KEY must be set when DEX_DEBUG is false")
_hosts = env_required("DEX_ALLOWED_HOSTS") if PRODUCTION else env_str("DEX_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]")
ALLOWED_HOSTS = [h.strip() for h in _hosts.split(",") if h.strip()]
CSRF_TRUSTED_ORIGINS = [o for o in env_str("DEX_CSRF_TRUSTED_ORIGINS").split(",") if o]

if PRODUCTION:
    # Behind a TLS-terminating proxy (compose: put one in front of `web`) that sets X-Forwarded-Proto.
    if env_bool("DEX_SECURE_PROXY_SSL_HEADER", False):
        SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = env_bool("DEX_SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("DEX_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DEX_HSTS_INCLUDE_SUBDOMAINS", True)
    SECURE_HSTS_PRELOAD = env_bool("DEX_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True

DATABASE_URL = env_required("DATABASE_URL") if PRODUCTION else env_str("DATABASE_URL")
REDIS_URL = env_required("REDIS_URL") if PRODUCTION else env_str("REDIS_URL")
if not DATABASE_URL or not REDIS_URL:
    from dexweb import embedded

    DATABASE_URL = DATABASE_URL or embedded.postgres_url()
    REDIS_URL = REDIS_URL or embedded.redis_url()

DATABASES = {"default": database_from_url(DATABASE_URL)}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_htmx",
    "template_partials",
    "ninja",
    "runs",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "runs.web.security_headers.security_headers_middleware",
    # Static files (htmx, its ws extension, our css) from daphne itself, DEBUG or not: no proxy needed.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    # Outside CSRF and the rest, so whatever they answer under /api/ leaves as JSON.
    "runs.api.middleware.ApiJsonErrorsMiddleware",
    "runs.api.middleware.ApiBodyLimitMiddleware",
    "runs.web.errors.FormSizeMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    # Innermost: replaces Django's DEBUG pages with the dashboard's own (runs/web/errors.py).
    "runs.web.errors.DebugPageMiddleware",
]

ROOT_URLCONF = "dexweb.urls"
ASGI_APPLICATION = "dexweb.asgi.application"
WSGI_APPLICATION = None

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

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = BASE_DIR / "staticfiles"
# Serve from the apps' static dirs when collectstatic hasn't run (a fresh clone); STATIC_ROOT when it has.
WHITENOISE_USE_FINDERS = True
STATIC_ROOT.mkdir(exist_ok=True)  # WhiteNoise warns on every start when it is missing

# --- Large outputs (runs/offload.py) and retention (runs/ops/retention.py) ----------------------------------

# A step or run output whose JSON is larger than this goes to the "dex_outputs" storage; the row keeps a reference.
DEX_OUTPUT_INLINE_MAX_BYTES = env_int("DEX_OUTPUT_INLINE_MAX_BYTES", 64 * 1024)
DEX_OUTPUT_STORAGE = env_choice("DEX_OUTPUT_STORAGE", ("filesystem", "s3"), "filesystem")
if DEX_OUTPUT_STORAGE == "s3":
    # S3 or any S3-compatible store (MinIO, R2, ...) through django-storages; credentials come from boto3's
    # usual sources (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an instance role, ...).
    if not env_str("DEX_S3_BUCKET"):
        raise ImproperlyConfigured("DEX_S3_BUCKET must be set when DEX_OUTPUT_STORAGE=s3")
    _output_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": env_str("DEX_S3_BUCKET"),
            "location": env_str("DEX_S3_PREFIX", "dex-outputs"),
            "endpoint_url": env_str("DEX_S3_ENDPOINT_URL") or None,
            "region_name": env_str("DEX_S3_REGION") or None,
            "file_overwrite": True,
            "default_acl": None,
        },
    }
else:
    _data_dir = Path(env_str("DEX_DATA_DIR") or BASE_DIR / ".dex")
    _output_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        # Every web, worker and scheduler process must see the same directory (compose: a shared volume).
        "OPTIONS": {"location": env_str("DEX_OUTPUT_DIR") or str(_data_dir / "outputs")},
    }
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    "dex_outputs": _output_storage,
}
# Finished runs older than this many days are deleted by the scheduler (with their steps, logs and stored
# outputs); 0 keeps them forever. `manage.py prune_runs` does the same by hand, with filters.
DEX_RETENTION_DAYS = env_float("DEX_RETENTION_DAYS", 30)
if DEX_RETENTION_DAYS < 0:
    raise ImproperlyConfigured(f"DEX_RETENTION_DAYS must be 0 (keep forever) or more, got {DEX_RETENTION_DAYS:g}")
# How often a scheduler applies DEX_RETENTION_DAYS.
DEX_RETENTION_INTERVAL_SECONDS = env_float("DEX_RETENTION_INTERVAL_SECONDS", 3600)

# --- Redis: Channels layer and Celery broker --------------------------------------------------------------


def otel_configured() -> bool:
    """OpenTelemetry tracing is on when the standard variables name an exporter: an OTLP endpoint, or
    OTEL_TRACES_EXPORTER (not "none"); OTEL_SDK_DISABLED=true turns it off."""
    if env_str("OTEL_SDK_DISABLED").strip().lower() == "true":
        return False
    exporter = env_str("OTEL_TRACES_EXPORTER").strip().lower()
    if exporter == "none":
        return False
    return bool(exporter or env_str("OTEL_EXPORTER_OTLP_ENDPOINT") or env_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def celery_url_from_redis(url: str) -> str:
    # Celery (kombu) spells a unix socket `redis+socket://PATH`; channels-redis spells it `unix://PATH`.
    if url.startswith("unix://"):
        return "redis+socket://" + url.removeprefix("unix://")
    return url


CHANNEL_LAYERS = {
    "default": {
        # The pub/sub layer: one PUBLISH per group message however many clients watch, which is what the
        # run page's step-by-step stream needs (the core layer fans out per member).
        "BACKEND": "channels_redis.pubsub.RedisPubSubChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL], "prefix": env_str("DEX_CHANNEL_PREFIX", "dex")},
    }
}

CELERY_BROKER_URL = env_str("CELERY_BROKER_URL") or celery_url_from_redis(REDIS_URL)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_TASK_IGNORE_RESULT = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]

# --- Dex -----------------------------------------------------------------------------------------------

# A worker renews its lease every third of this; a worker that dies is replaced within about this long.
DEX_LEASE_SECONDS = env_float("DEX_LEASE_SECONDS", 15.0)
# The scheduler sleeps until the next due time (a wake-up, a lease expiry, a cron slot) or a notice that one
# came nearer, but at most this long: a worker whose process died is noticed within it (its Postgres session
# is gone), so its run resumes within about a second instead of at the lease's expiry.
DEX_SCHEDULER_TICK_SECONDS = env_float("DEX_SCHEDULER_TICK_SECONDS", 1.0)
# "transaction" behind a transaction-mode pooler (PgBouncer): no server-side prepared statements and no
# detection of a dead worker by its Postgres session (the lease's expiry still recovers its runs).
DEX_DB_POOLER = env_choice("DEX_DB_POOLER", ("none", "transaction"), "none")
# The version a run records for the code executing it (ctx.patched); else the git revision, else a source hash.
DEX_CODE_VERSION = env_str("DEX_CODE_VERSION").strip()
# Events older than this are deleted by the scheduler's retention (a wait's window can't reach further back).
DEX_EVENT_RETENTION_SECONDS = env_float("DEX_EVENT_RETENTION_SECONDS", 7 * 24 * 3600)
# A queued run with no claim this long is re-sent to the broker (its wake-up message was lost).
DEX_REQUEUE_STALE_SECONDS = env_float("DEX_REQUEUE_STALE_SECONDS", 60.0)
# A step running this long is recorded as in flight by the heartbeat, so a worker dying under it shows that
# attempt as lost ("worker lost") when the step runs again. Shorter steps are not recorded (a write per step).
DEX_INFLIGHT_AFTER_SECONDS = env_float("DEX_INFLIGHT_AFTER_SECONDS", 1.0)
# A run whose worker died this many times is dead-lettered (failed) instead of re-queued again.
DEX_MAX_RECOVERIES = env_int("DEX_MAX_RECOVERIES", 5)
DEX_MAX_PAYLOAD_BYTES = env_int("DEX_MAX_PAYLOAD_BYTES", 1024 * 1024)
DEX_MAX_STEP_OUTPUT_BYTES = env_int("DEX_MAX_STEP_OUTPUT_BYTES", 1024 * 1024)
# Security (README "Security"): API rate limits ("N/PERIOD"; "off" disables), websocket frame cap, CSP.
DEX_API_RATE_LIMIT = env_str("DEX_API_RATE_LIMIT", "600/60s")
DEX_API_AUTH_FAILURE_LIMIT = env_str("DEX_API_AUTH_FAILURE_LIMIT", "60/60s")
DEX_RATE_LIMIT_PREFIX = env_str("DEX_RATE_LIMIT_PREFIX", "dex")
DEX_MAX_WS_MESSAGE_BYTES = env_int("DEX_MAX_WS_MESSAGE_BYTES", 64 * 1024)
DEX_CONTENT_SECURITY_POLICY = env_str("DEX_CONTENT_SECURITY_POLICY")
DEX_DEFAULT_QUEUE = env_str("DEX_DEFAULT_QUEUE", "dex")
CELERY_TASK_DEFAULT_QUEUE = DEX_DEFAULT_QUEUE
# Redis hands an unacked message out again after the visibility timeout: keep it far above the lease so
# the broker never redelivers a message whose run is still being worked on (the lease fences it anyway).
CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": max(3600, int(DEX_LEASE_SECONDS * 20))}
# A worker takes a message only when a process is free to start it (Redis): a worker that dies holds no
# wake-ups it had not started (RabbitMQ hands a dead consumer's unacked messages out again by itself).
CELERY_WORKER_DISABLE_PREFETCH = CELERY_BROKER_URL.split(":", 1)[0].startswith("redis")
# RabbitMQ serves priorities only on queues declared with x-max-priority: Celery declares them so (a queue
# declared earlier without it must be deleted once). Redis (kombu) needs nothing: it keeps a list per priority.
if CELERY_BROKER_URL.split(":", 1)[0] in ("amqp", "amqps", "pyamqp"):
    CELERY_TASK_QUEUE_MAX_PRIORITY = 10
# The project's agents folder, loaded as the package `dex_agents` (runs/sdk/registry.py).
DEX_AGENTS_DIR = Path(env_str("DEX_AGENTS_DIR") or BASE_DIR / "agents")
DEX_AGENT_MODULES = [m.strip() for m in env_str("DEX_AGENT_MODULES").split(",") if m.strip()]
DEX_IDEMPOTENCY_TTL_SECONDS = env_float("DEX_IDEMPOTENCY_TTL_SECONDS", 24 * 3600)
# Seconds of execution a run of a task without its own max_duration may use before it ends timed_out (DESIGN §3:
# a runaway loop must not hold a worker forever). 0 = no limit.
DEX_DEFAULT_MAX_DURATION = env_float("DEX_DEFAULT_MAX_DURATION", 3600.0)
if DEX_DEFAULT_MAX_DURATION < 0:
    raise ImproperlyConfigured("DEX_DEFAULT_MAX_DURATION must be 0 (no limit) or a number of seconds, not negative")
# LLM providers (JSON, validated by runs.ai.providers) and price overrides; the local server when unset.
DEX_LLM_PROVIDERS = env_str("DEX_LLM_PROVIDERS") or None
DEX_LLM_PRICING = env_str("DEX_LLM_PRICING") or None

DATA_UPLOAD_MAX_MEMORY_SIZE = DEX_MAX_PAYLOAD_BYTES + 64 * 1024

# Alerts (runs/ops/alerts.py): global destinations on top of those edited at /alerts/ and `@task(alerts=...)`.
DEX_ALERT_WEBHOOK_URL = env_str("DEX_ALERT_WEBHOOK_URL")
DEX_ALERT_WEBHOOK_SECRET = env_str("DEX_ALERT_WEBHOOK_SECRET")
if DEX_ALERT_WEBHOOK_URL and not DEX_ALERT_WEBHOOK_SECRET:
    raise ImproperlyConfigured("DEX_ALERT_WEBHOOK_URL needs DEX_ALERT_WEBHOOK_SECRET: alert webhooks are signed")
DEX_ALERT_EMAILS = [e.strip() for e in env_str("DEX_ALERT_EMAILS").split(",") if e.strip()]
# Alert webhooks go out through runs.safe_fetch: public addresses only, so a destination can't reach what only
# the server can (loopback, a cloud's metadata service, the private network). Receivers that are internal on
# purpose are listed here: host names, addresses or networks, e.g. "alerts.internal,10.1.0.0/16,127.0.0.1".
DEX_ALERT_ALLOW_PRIVATE_HOSTS = [h.strip() for h in env_str("DEX_ALERT_ALLOW_PRIVATE_HOSTS").split(",") if h.strip()]
for _entry in DEX_ALERT_ALLOW_PRIVATE_HOSTS:
    if "/" in _entry:
        try:
            ipaddress.ip_network(_entry, strict=False)
        except ValueError:
            raise ImproperlyConfigured(
                f"DEX_ALERT_ALLOW_PRIVATE_HOSTS: {_entry!r} is not a network (e.g. 10.0.0.0/8)"
            ) from None
# A run waiting for an event or an approval longer than this raises a "stuck" alert (0: never).
DEX_ALERT_STUCK_SECONDS = env_float("DEX_ALERT_STUCK_SECONDS", 3600.0)
DEX_ALERT_MAX_ATTEMPTS = env_int("DEX_ALERT_MAX_ATTEMPTS", 6)
# The n-th retry of a delivery waits initial * 4**(n-1) seconds, at most an hour.
DEX_ALERT_RETRY_INITIAL_SECONDS = env_float("DEX_ALERT_RETRY_INITIAL_SECONDS", 10.0)
DEX_ALERT_TIMEOUT_SECONDS = env_float("DEX_ALERT_TIMEOUT_SECONDS", 10.0)
# How often the scheduler looks for lost alerts and due deliveries (retries wait for the first scan after their
# back-off), and how far back. A scan is three statements:
# every 60 s keeps an idle scheduler near one statement a second (bench parked: idle_queries_per_s).
DEX_ALERT_SCAN_SECONDS = env_float("DEX_ALERT_SCAN_SECONDS", 60.0)
DEX_ALERT_LOOKBACK_SECONDS = env_float("DEX_ALERT_LOOKBACK_SECONDS", 24 * 3600)
# Links in alerts point here (e.g. https://dex.example.com); relative links when unset.
DEX_BASE_URL = env_str("DEX_BASE_URL").rstrip("/")
DEFAULT_FROM_EMAIL = env_str("DEX_FROM_EMAIL", "dex@localhost")
EMAIL_BACKEND = env_str("DEX_EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
EMAIL_HOST = env_str("DEX_EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("DEX_EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("DEX_EMAIL_USER")
EMAIL_HOST_PASSWORD = env_str("DEX_EMAIL_PASSWORD")
EMAIL_USE_TLS = env_bool("DEX_EMAIL_USE_TLS", False)

# GET /metrics (runs/ops/metrics.py): Prometheus scrapes with `Authorization: Bearer <this>`; staff may look too.
DEX_METRICS_TOKEN = env_str("DEX_METRICS_TOKEN")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"},
        # One JSON object a line, with run_id / task / step when logged inside a run (runs/ops/jsonlog.py).
        "json": {"()": "runs.ops.jsonlog.JsonFormatter"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": env_choice("DEX_LOG_FORMAT", ("plain", "json"), "plain"),
        }
    },
    "root": {"handlers": ["console"], "level": env_str("DEX_LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "INFO"}, "pgserver": {"level": "WARNING"}},
}

# OpenTelemetry traces of runs (runs.integrations.otel, README: Tracing). Off, nothing of OpenTelemetry is
# imported; on, the incoming `traceparent` of a request is the context a run is triggered in.
DEX_OTEL = otel_configured()
if DEX_OTEL:
    MIDDLEWARE.insert(0, "runs.integrations.otel.TraceContextMiddleware")
