# sidecar-agent as a sidecar container. (Not built in CI: this machine has no Docker engine.)
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 agent
WORKDIR /app
COPY pyproject.toml README.md ./
COPY agent ./agent
COPY plugins ./plugins
COPY sidecar_ui ./sidecar_ui
RUN pip install --no-cache-dir .

USER agent
WORKDIR /home/agent
# The journal lives here: mount a volume so nothing is lost across container restarts.
VOLUME ["/home/agent/.sidecar-agent"]
ENV SIDECAR_AGENT_TOKEN=""
EXPOSE 8765
# In a container, listen on all interfaces; a non-loopback host requires server.token,
# so the config sets token = "${SIDECAR_AGENT_TOKEN}" and the container must be given one.
COPY examples/sidecar.toml /etc/sidecar-agent/agent.toml
STOPSIGNAL SIGTERM
ENTRYPOINT ["sidecar-agent"]
CMD ["run", "--config", "/etc/sidecar-agent/agent.toml"]
