# The ooda agent (`ooda run`), slim and unprivileged. The node daemon is not in here: it runs on
# each GPU node under systemd (deploy/systemd/ooda-node.service).
#
#   docker build -t ooda-agent .
#   docker run --rm -p 9464:9464 -v ooda-state:/var/lib/ooda ooda-agent          # the twin, dry-run
#   docker run --rm -v /etc/ooda:/etc/ooda:ro -v ooda-state:/var/lib/ooda ooda-agent \
#       --config /etc/ooda/agent.toml --metrics-listen 0.0.0.0:9464
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PATH=/opt/ooda/bin:$PATH

COPY pyproject.toml README.md /src/
COPY agent /src/agent
COPY policies /src/policies
COPY docs /src/docs
COPY deploy /src/deploy
# The install step: the very command tests/test_deploy.py runs in a clean virtual environment.
RUN sh /src/deploy/install.sh /opt/ooda /src && rm -rf /src

RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/ooda --shell /usr/sbin/nologin ooda \
    && install -d -o ooda -g ooda -m 0700 /var/lib/ooda \
    && install -d -m 0755 /etc/ooda \
    && cp /opt/ooda/share/examples/twin.toml /etc/ooda/agent.toml

USER 10001:10001
WORKDIR /var/lib/ooda
VOLUME ["/var/lib/ooda"]
EXPOSE 9464
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4)"]
ENTRYPOINT ["ooda", "run"]
CMD ["--config", "/etc/ooda/agent.toml", "--metrics-listen", "0.0.0.0:9464"]
