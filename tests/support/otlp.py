"""A real OTLP/HTTP trace receiver for tests: ``POST /v1/traces`` with a protobuf ``ExportTraceServiceRequest``
(decoded with the ``opentelemetry-proto`` package), on a free loopback port.

    with OtlpReceiver() as rx:
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = rx.endpoint
        ...
        rx.spans()  # [(service.name, Span proto), ...]
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _hex_ids_to_base64(body: bytes) -> bytes:
    """OTLP/JSON writes trace and span ids as hex; protobuf's JSON parser wants base64 for bytes fields."""
    import base64
    import json

    def fix(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: (base64.b64encode(bytes.fromhex(v)).decode() if k in ("traceId", "spanId", "parentSpanId")
                        and isinstance(v, str) and v else fix(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [fix(v) for v in obj]
        return obj

    return json.dumps(fix(json.loads(body))).encode()


class OtlpReceiver:
    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None, Any]] = []  # (path, content type, ExportTraceServiceRequest)
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                    ExportTraceServiceRequest,
                    ExportTraceServiceResponse,
                )

                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        body += self.rfile.read(size)
                        self.rfile.readline()
                else:
                    body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                req = ExportTraceServiceRequest()
                try:
                    if "json" in (self.headers.get("Content-Type") or ""):  # OTLP/HTTP JSON (ids in hex)
                        from google.protobuf import json_format

                        json_format.Parse(_hex_ids_to_base64(body), req)
                    else:
                        req.ParseFromString(body)
                except Exception:  # noqa: BLE001 - not OTLP: refuse like a collector does
                    self.send_response(400)
                    self.end_headers()
                    return
                with receiver._lock:
                    receiver.requests.append((self.path, self.headers.get("Content-Type"), req))
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)

    @property
    def endpoint(self) -> str:
        """The base URL (``OTEL_EXPORTER_OTLP_ENDPOINT``); traces go to ``<endpoint>/v1/traces``."""
        return f"http://127.0.0.1:{self._server.server_port}"

    def __enter__(self) -> "OtlpReceiver":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def spans(self) -> list[tuple[str, Any]]:
        """(service.name, span) of every span received so far."""
        out = []
        with self._lock:
            requests = list(self.requests)
        for _path, _ctype, req in requests:
            for rs in req.resource_spans:
                service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "")
                for ss in rs.scope_spans:
                    out.extend((service, s) for s in ss.spans)
        return out
