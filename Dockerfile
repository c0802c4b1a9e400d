# One image for every service of the application; compose.yaml picks the service
# (and the migrations) with the command it runs.
#
# Two stages: `build` installs the dependencies into a virtualenv, in a layer of
# their own that is rebuilt only when pyproject.toml changes, then the project;
# `runtime` copies the virtualenv and the source tree onto a clean slim image,
# without compilers, caches, or the dev extras (pytest, ruff, playwright...).

FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# The dependencies alone, read from pyproject.toml: this layer stays cached while
# only the code changes.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > requirements.txt \
    && pip install -r requirements.txt

# The project itself: the `framework` console script and the packages.
COPY README.md ./
COPY framework ./framework
COPY services ./services
RUN pip install --no-deps .


FROM python:3.11-slim AS runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH

# Non-root. /data/storage is created here owned by the app user so that the named
# volume compose mounts there starts with that ownership.
RUN useradd --system --uid 10001 --no-create-home app \
    && mkdir -p /data/storage \
    && chown app /data/storage

COPY --from=build /opt/venv /opt/venv

# `framework db upgrade <service>` finds services/<service>/migrations relative to
# the working directory, and `framework run` puts it first on sys.path.
WORKDIR /app
COPY --chown=root:root framework ./framework
COPY --chown=root:root services ./services

USER app

# HEALTH_SERVER_ADDRESS (readiness, liveness, /metrics), as compose.yaml sets it;
# 8000 is the web service's HTTP.
EXPOSE 9000 8000

CMD ["framework", "run", "services.users.service", "--config", "services/users/config.yaml"]
