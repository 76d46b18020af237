# busagent: the agent and the fleet monitor (`busagent run`, `busagent monitor`).
# libvirt-python builds against libvirt-dev; pkg-config also finds libvirt-api.xml at run time.
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends libvirt-dev pkg-config gcc \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY busagent ./busagent
RUN pip install --no-cache-dir . \
    && useradd --system --no-create-home busagent

USER busagent
# docker-compose.yml gives each service its command
CMD ["busagent", "--help"]
