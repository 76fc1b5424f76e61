# The serving image: serve.py and its serving/ package, features.py (the schema and feature code it shares with
# training) and the serving dependencies only. The model comes from the registry at start-up (MLFLOW_TRACKING_URI,
# MODEL_NAME, MODEL_ALIAS), or from MODEL_URI; every setting is described at the top of serve.py.
# The base by digest: python:3.11-slim-bookworm (Python 3.11.16), its multi-platform index as docker-library/repo-info
# records it. A tag can move under us, a digest cannot; Dependabot proposes the next digest (.github/dependabot.yml).
# `make image` builds with a locally made stand-in for this base (scripts/build_image.sh: no registry is reachable).
FROM python:3.11-slim-bookworm@sha256:fe556eaffd0d96abd8685b83bb8a69addd0dc730fa193669a7df0d49ddcfac02

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8000 \
    PREDICTION_LOG_DIR=/app/logs \
    NUMBA_CACHE_DIR=/app/numba-cache \
    NUMBA_CPU_NAME=generic

WORKDIR /app
COPY requirements-serve.txt ./
# Hash-locked (`make lock`): pip takes exactly the files whose sha256 the lock lists, and nothing the lock leaves out.
# Swagger UI (GET /docs) loads swagger-ui-bundle.js, swagger-ui.css and a favicon: its source maps and ES-module
# bundles (9 MB) go in the same layer, so they never reach the image; so do Numba's own tests (13 MB).
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements-serve.txt \
    && swagger_ui="$(python -c 'import swagger_ui_bundle; print(swagger_ui_bundle.swagger_ui_path)')" \
    && rm "$swagger_ui"/*.map "$swagger_ui"/swagger-ui-es-bundle*.js \
    && rm -r "$(python -c 'import numba, os; print(os.path.dirname(numba.__file__))')/tests" \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /app --shell /usr/sbin/nologin serve \
    && mkdir logs && chown 10001:10001 logs
COPY serve.py features.py names.py ./
COPY serving/ serving/
# The compiled predictor (serving/trees.py), compiled now into NUMBA_CACHE_DIR: a worker then loads it in
# milliseconds instead of compiling for seconds at start. NUMBA_CPU_NAME=generic: compiled for any x86-64, not only
# the build machine's CPU, so the cache holds wherever the image runs (as fast here: the walk is scalar code).
RUN python -c "import serving.trees" && chown -R 10001:10001 "$NUMBA_CACHE_DIR"

USER 10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=3)"]
CMD ["python", "serve.py"]
