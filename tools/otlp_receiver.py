"""A minimal OTLP/HTTP trace receiver: what the tests export spans to, and the sink the
benchmark runs ``--otel`` gateways against.

It answers ``POST /v1/traces`` (protobuf, optionally gzip) as a collector does, and
keeps each span as a :class:`ReceivedSpan` (``keep=False``: only counts them, the
sink that drops spans). ``python -m tools.otlp_receiver --port 4318`` runs one
until Ctrl-C, printing how many spans it received.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import signal
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.processes import free_ports

TRACES_PATH = "/v1/traces"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as it arrived: ids in hex, its resource's service name and instance,
    its kind as OTLP numbers it (2 server, 3 client, 4 producer, 5 consumer)."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    instance: str
    attributes: dict[str, Any]


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    return None if kind is None else getattr(any_value, kind)


class OtlpReceiver:
    """Receives spans over OTLP/HTTP on ``host``:``port`` (0: a free one, from the
    range ``GATEWAY_PORT_RANGE`` names)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, keep: bool = True) -> None:
        self.host = host
        self.port = port
        self.keep = keep
        self.spans: list[ReceivedSpan] = []
        self.received = 0
        self.requests = 0
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        """The base URL for ``OTEL_EXPORTER_OTLP_ENDPOINT``."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post(TRACES_PATH, self._export)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        if self.port == 0:
            self.port = free_ports(1)[0]
        await web.TCPSite(self._runner, self.host, self.port).start()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        self.requests += 1
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                self.received += len(scope_spans.spans)
                if not self.keep:
                    continue
                for span in scope_spans.spans:
                    self.spans.append(ReceivedSpan(
                        span.name, span.kind, span.trace_id.hex(), span.span_id.hex(),
                        span.parent_span_id.hex(), str(resource.get("service.name", "")),
                        str(resource.get("service.instance.id", "")),
                        {a.key: _value(a.value) for a in span.attributes}))
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")


async def _main(port: int, keep: bool) -> None:
    receiver = OtlpReceiver("127.0.0.1", port, keep=keep)
    await receiver.start()
    print(f"otlp receiver {receiver.endpoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await receiver.close()
    print(f"otlp receiver: {receiver.received} spans in {receiver.requests} requests",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.otlp_receiver",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=4318)
    parser.add_argument("--keep", action="store_true",
                        help="keep the spans (default: count and drop them)")
    args = parser.parse_args()
    asyncio.run(_main(args.port, args.keep))


if __name__ == "__main__":
    main()
