# syntax=docker/dockerfile:1
# The feed's image: `docker build -t dbfeed .`, or let `docker compose up` build it.
# Three stages: the dashboard's assets (Node), the Python install (a virtual environment), and a
# small final image holding that environment and nothing else, run as a non-root user.
# .ci/verify-dockerfile-steps.sh replays the first two stages' steps without Docker.

# -- 1. dashboard: socket.io-client from the npm registry, pinned by package-lock.json ----------
FROM node:20-bookworm AS dashboard
WORKDIR /src
COPY dashboard/ dashboard/
COPY clients/js/index.js clients/js/index.js
RUN make -C dashboard build

# -- 2. build: the package and its dependencies in /opt/feed ------------------------------------
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY feed/ feed/
COPY connectors/ connectors/
COPY migrations/ migrations/
COPY deploy/install.sh deploy/install.sh
COPY --from=dashboard /src/feed/dashboard/ feed/dashboard/
RUN sh deploy/install.sh /opt/feed

# -- 3. the image: the virtual environment, a default config, a non-root user -------------------
FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/feed feed
COPY --from=build /opt/feed /opt/feed
COPY deploy/feed.toml /etc/feed/feed.toml
ENV PATH=/opt/feed/bin:$PATH PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
USER feed
WORKDIR /home/feed
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=15s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]
# SIGTERM stops the feed gracefully: clients are disconnected and positions saved, then exit 0.
STOPSIGNAL SIGTERM
CMD ["feed", "serve", "--config", "/etc/feed/feed.toml"]
