# The ooda agent (`ooda run`), slim and unprivileged. The node daemon is not in here: it runs on
# each GPU node under systemd (deploy/systemd/ooda-node.service).
#
#   docker build -t ooda-agent .
#   docker build -t ooda-agent --build-arg SLURM_CLIENT=22.05.8-4+deb12u3 .   # + Slurm's clients
#   docker run --rm -p 9464:9464 -v ooda-state:/var/lib/ooda ooda-agent         # the twin, dry-run
#   docker run --rm -v /etc/ooda:/etc/ooda:ro -v ooda-state:/var/lib/ooda \
#       -v /etc/slurm:/etc/slurm:ro -v /run/munge:/run/munge ooda-agent \
#       --config /etc/ooda/agent.toml --metrics-listen 0.0.0.0:9464
#
# Reproducible: the base image by the digest of its multi-platform index (python:3.11-slim-bookworm,
# Python 3.11.16 on Debian 12, built 2026-08-25, as docker-library/repo-info records it in
# repos/python/remote/3.11-slim-bookworm.md; `docker buildx imagetools inspect
# python:3.11-slim-bookworm` gives the current one), exactly the packages of
# deploy/requirements.txt (pinned, hashes checked; `make lock`), and no pip left in the image.
# Slurm's clients and munge: docs/operator-guide.md, "The container image".
ARG BASE=python:3.11-slim-bookworm@sha256:0bee7276f83efd4a1ee05bbbf4281d95ed28e079220a9457f25a93e3f1e3c31b

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY pyproject.toml README.md /src/
COPY agent /src/agent
COPY policies /src/policies
COPY docs /src/docs
COPY deploy /src/deploy
# The install step, as tests/test_deploy.py runs it into an empty root: no user or units here
# (the image's user is made below), and no pip, setuptools or wheel left in /opt/ooda.
RUN sh /src/deploy/install.sh --prefix /opt/ooda --src /src --no-user --no-units --no-pip

FROM ${BASE}
# Debian's slurm-client at this version (empty: none): the cluster's Slurm release, or at most
# two older (Slurm's daemons take commands from the two previous releases). Debian 12 has 22.05.
ARG SLURM_CLIENT=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/ooda/bin:$PATH
# Nothing installs Python packages at run time: the base image's own pip goes too.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
    && rm -f /usr/local/bin/pip /usr/local/bin/pip3*
RUN if [ -n "$SLURM_CLIENT" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "slurm-client=$SLURM_CLIENT" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/ooda /opt/ooda
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
