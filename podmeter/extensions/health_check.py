"""health_check extension: HTTP 200 while every pipeline runs, 503 naming the failing components otherwise (and
while the agent is still starting its components): readiness. On `liveness_path`, 503 only when a component can
recover by a restart alone (RestartRequired): liveness.

Components that are unavailable on this host (no GPU, no socket) do not fail health: a DaemonSet on a CPU-only
node must be ready. Exporter delivery failures (a backend outage) do not fail it either: restarting the agent
would not bring the backend back, and it would lose the queue. A failing receiver fails readiness but not
liveness: restarting the agent would not bring back a dead socket or a hung device, and every other receiver's
data would be lost each time.
"""

from __future__ import annotations

import json
import threading

from pydantic import Field, ValidationInfo, field_validator

from podmeter import httpserve
from podmeter.component import Extension, Factory, Host, Stability
from podmeter.config import ComponentConfig, Endpoint, split_endpoint


class HealthCheckConfig(ComponentConfig):
    endpoint: Endpoint = Field("0.0.0.0:13133", description="Address to serve health on")
    path: str = Field("/", description="URL path answering health (any path answers; this one is documented)")
    liveness_path: str = Field(
        "/livez", pattern=r"^/", description="URL path answering liveness: 503 only when a component needs the agent "
                                             "restarted (the NVIDIA driver replaced under it), for the livenessProbe")

    @field_validator("liveness_path")
    @classmethod
    def _not_readiness(cls, value: str, info: ValidationInfo) -> str:
        if value == info.data.get("path"):
            raise ValueError(f"{value!r} is also `path`: liveness and readiness need paths of their own")
        return value


class HealthCheck(Extension):
    def __init__(self, settings, config: HealthCheckConfig) -> None:
        self.settings, self.config = settings, config
        self.server: httpserve.Server | None = None
        self.service = None

    def start(self, host: Host) -> None:
        providers = host.lookup("component_status")
        self.service = providers[0] if providers else None
        extension = self

        # httpserve's: a probe must still be answered after a flood of stalled connections (request deadline,
        # connection limit, listen backlog); it does not log (probes come every few seconds)
        class Handler(httpserve.Handler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                live = self.path.split("?", 1)[0] == extension.config.liveness_path
                code, body = extension.liveness() if live else extension.report()
                payload = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.write_body((payload,))

            do_HEAD = do_GET  # noqa: N815 - the same headers, no body (write_body skips it)

        host_, port = split_endpoint(self.config.endpoint)
        self.server = httpserve.Server((host_, port), Handler)
        threading.Thread(target=self.server.serve_forever, name="health_check", daemon=True).start()

    def report(self) -> tuple[int, dict]:
        if self.service is None:
            return 200, {"status": "Server available"}
        stopping = getattr(self.service, "stopping", None)
        if stopping is not None and stopping.is_set():
            # as the collector's: not ready once shutdown has begun (a signal received, exporters flushing)
            return 503, {"status": "Server not available", "stopping": True}
        statuses = self.service.statuses()
        failing = {s.id: s.message for s in statuses.values() if s.state == "error"}
        # served from the moment this extension starts, before the components after it: not ready until they are
        starting = [s.id for s in statuses.values() if s.state == "starting"]
        components = {f"{s.kind}:{s.id}": s.state for s in statuses.values()}
        if failing or starting:
            return 503, {"status": "Server not available", "failing": failing, "starting": starting,
                         "components": components}
        return 200, {"status": "Server available", "components": components}

    def liveness(self) -> tuple[int, dict]:
        statuses = self.service.statuses() if self.service is not None else {}
        restart = {s.id: s.message for s in statuses.values() if s.state == "error" and s.restart}
        if restart:
            return 503, {"status": "Restart required", "failing": restart}
        return 200, {"status": "Alive"}

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


factory = Factory(kind="extension", type="health_check", config_model=HealthCheckConfig, create=HealthCheck,
                  stability=Stability.BETA, description="HTTP health endpoint for liveness and readiness probes")
