# migexport: `serve` by default; the same image runs `migexport run` (with psql for SQL migrations),
# `migexport baseline` and the demo workload of docker-compose.yml.
FROM python:3.11-slim

# psql: the migration command of the compose stack's `migrate` service (`migexport run -- psql ...`).
RUN apt-get update \
    && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The lint extra: squawk, which `migexport preflight` runs on migration.sql_files.
RUN pip install --no-cache-dir ".[lint]" && rm -rf /src

# Non-root. /var/lib/migexport holds the state, log and baseline files: a named volume mounted there
# starts with this ownership, so `serve` and `run` (same user) share it.
RUN groupadd --system --gid 10001 migexport \
    && useradd --system --uid 10001 --gid migexport --home-dir /var/lib/migexport --shell /usr/sbin/nologin migexport \
    && mkdir -p /var/lib/migexport /etc/migexport \
    && chown migexport:migexport /var/lib/migexport
USER 10001:10001
WORKDIR /var/lib/migexport

EXPOSE 9745
# No curl in the slim image: fetch /metrics with Python. A scrape answers within scrape_timeout (5s).
HEALTHCHECK --interval=15s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9745/metrics', timeout=8).read()"]

ENTRYPOINT ["migexport"]
CMD ["serve", "-c", "/etc/migexport/migexport.yml"]
