# Two images from one file:
#   web     (--target web)     the web server, beat, flower, bootstrap and backups: no torch
#   worker  (--target worker, the default) everything: workers, and `prefloop serve` all-in-one
# TORCH_INDEX picks the torch build for the worker: the CPU wheels by default, a CUDA index for GPU
# workers, e.g. docker build --target worker --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
# Dependencies are installed from pyproject.toml + constraints.txt before any code is copied, so a
# code change rebuilds only the last layers.
FROM python:3.11-slim-bookworm AS base

# pg_dump/pg_restore refuse a server newer than themselves: the client tools of the major version
# that docker-compose.yml runs (postgres:16), from the PostgreSQL project's apt repository.
ARG PG_MAJOR=16
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PREFLOOP_DATA_DIR=/data HF_HOME=/cache/huggingface

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
      https://www.postgresql.org/media/keys/ACCC4CF8.asc \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends "postgresql-client-${PG_MAJOR}" \
 && apt-get purge -y curl && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 prefloop \
 && mkdir -p /data/models /backups /cache/huggingface \
 && chown -R prefloop /data /backups /cache
WORKDIR /srv/prefloop
# A small helper: the requirement lines of the runtime plus the named extras, from pyproject.toml.
RUN printf '%s\n' \
    'import sys, tomllib' \
    'project = tomllib.load(open("pyproject.toml", "rb"))["project"]' \
    'extras = project["optional-dependencies"]' \
    'print(*project["dependencies"], *[r for e in sys.argv[1:] for r in extras[e]], sep=chr(10))' \
    > /usr/local/bin/prefloop-requirements.py

# The wheel (templates, static files and migrations ship inside it).
FROM base AS build
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip wheel --no-deps --wheel-dir /wheels .

FROM base AS web-deps
COPY pyproject.toml constraints.txt ./
RUN python /usr/local/bin/prefloop-requirements.py ops > requirements.txt \
 && pip install -c constraints.txt -r requirements.txt

FROM web-deps AS worker-deps
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# torch alone from its index (PyPI's Linux wheel is the CUDA build); its dependencies from PyPI.
RUN pip install -c constraints.txt --no-deps --index-url "$TORCH_INDEX" torch \
 && python /usr/local/bin/prefloop-requirements.py worker > requirements-worker.txt \
 && pip install -c constraints.txt -r requirements-worker.txt

FROM web-deps AS web
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
USER prefloop
EXPOSE 8000
CMD ["uvicorn", "app.main:create_app", "--factory", "--host", "0.0.0.0", "--port", "8000"]

FROM worker-deps AS worker
COPY --from=build /wheels /wheels
RUN pip install --no-deps /wheels/*.whl && rm -rf /wheels
USER prefloop
EXPOSE 8000
CMD ["prefloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
