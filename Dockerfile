# One image for every prefloop service (web, workers, beat, flower, migrations).
# TORCH_INDEX picks the torch build: the CPU wheels by default, a CUDA index for GPU workers, e.g.
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 .
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PREFLOOP_DATA_DIR=/data

WORKDIR /srv/prefloop
RUN pip install --index-url "$TORCH_INDEX" "torch>=2.4"
COPY pyproject.toml README.md alembic.ini ./
COPY app ./app
COPY worker ./worker
COPY migrations ./migrations
COPY templates ./templates
COPY static ./static
RUN pip install -e '.[ops]'

RUN useradd --create-home --uid 1000 prefloop && mkdir -p /data && chown prefloop /data
USER prefloop
EXPOSE 8000
CMD ["prefloop", "serve", "--host", "0.0.0.0", "--port", "8000"]
