# One image for every prefloop service (web, workers, beat, flower, migrations).
# TORCH_INDEX picks the torch build: the CPU wheels by default, a CUDA index for GPU workers, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# pg_dump/pg_restore refuse a server newer than themselves: the client tools of the major version
# that docker-compose.yml runs (postgres:16), from the PostgreSQL project's apt repository.
ARG PG_MAJOR=16
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PREFLOOP_DATA_DIR=/data

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

WORKDIR /srv/prefloop
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip install -e '.[ops]'

RUN useradd --create-home --uid 1000 prefloop && mkdir -p /data /backups \
 && chown prefloop /data /backups
USER prefloop
EXPOSE 8000
CMD ["prefloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
