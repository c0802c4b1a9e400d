# One image for every service of the application: the framework, its dependencies
# and the source tree. compose.yaml picks the service (and its migrations) with the
# command it runs.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY . .

# `framework db upgrade users` finds services/users/migrations relative to the
# working directory, and `framework run` puts the working directory first on
# sys.path, so both run from this source tree; `pip install .` brings the
# dependencies and the `framework` console script.
RUN pip install . \
    && useradd --system --uid 10001 --no-create-home app

USER app

# HEALTH_SERVER_ADDRESS (readiness, liveness, /metrics), as compose.yaml sets it.
EXPOSE 9000

CMD ["framework", "run", "services.users.service", "--config", "services/users/config.yaml"]
