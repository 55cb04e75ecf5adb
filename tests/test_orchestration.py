"""The launcher's port choice and health wait (tandem/launch.py, tandem/services.py)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tandem.launch import ROLE_SERVICES, free_ports
from tandem.services import wait_for_health


def test_free_ports_are_distinct() -> None:
    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(0 < p < 65536 for p in ports)


def test_health_wait_names_the_service() -> None:
    """A server of another kind on the port is not taken for the one expected: the launcher
    waits on the role's own service, which that server does not know."""

    async def run() -> None:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for name in ("", ROLE_SERVICES["vision"]):  # a vision service, say
                await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
            target = f"127.0.0.1:{port}"
            await wait_for_health(target, 2.0)  # the server as a whole: serving
            await wait_for_health(target, 2.0, ROLE_SERVICES["vision"])
            with pytest.raises(TimeoutError):
                await wait_for_health(target, 1.0, ROLE_SERVICES["prefill"])
        finally:
            await server.stop(None)

    asyncio.run(run())
