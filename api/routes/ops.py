"""Operations: /healthz (liveness), /readyz (readiness: the database, Redis and the broker answer), /metrics."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api.deps import metrics_reader
from db.session import get_engine
from db.settings import get_settings

router = APIRouter(tags=["ops"])
log = logging.getLogger("andon.api")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers. Always 200; it checks no dependency (see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency (database, Redis, broker) is unreachable"}})
async def readyz() -> JSONResponse:
    """Readiness: 200 when the database and Redis (and a separate broker: Redis or AMQP) each answer
    within ``ANDON_READY_TIMEOUT_S``, else 503 naming the ones that don't."""
    settings = get_settings()
    timeout = settings.ready_timeout_s
    probes: dict[str, Callable[[], Awaitable[None]]] = {
        "database": lambda: asyncio.to_thread(_ping_database),
        "redis": lambda: _ping_redis(settings.resolved_redis_url, timeout),
    }
    broker = settings.resolved_broker_url
    if broker != settings.resolved_redis_url and broker.startswith(("redis://", "rediss://")):
        probes["broker"] = lambda: _ping_redis(broker, timeout)
    elif broker.startswith(("amqp://", "amqps://", "pyamqp://")):  # RabbitMQ: an AMQP handshake
        probes["broker"] = lambda: asyncio.to_thread(_ping_amqp, broker, timeout)
    names = list(probes)
    answers = await asyncio.gather(*(_probe(name, probes[name], timeout) for name in names))
    checks = {name: answer or "ok" for name, answer in zip(names, answers)}
    down = [f"{name} {answer}" for name, answer in zip(names, answers) if answer]
    if down:
        return JSONResponse({"status": "unavailable", "detail": "not ready: " + "; ".join(down), "checks": checks},
                            status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(metrics_reader)],
            responses={401: {"description": "with tenants set: the admin token is missing"}})
def metrics() -> PlainTextResponse:
    return PlainTextResponse(generate_latest(), media_type=CONTENT_TYPE_LATEST)


def _ping_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def _ping_amqp(url: str, timeout: float) -> None:
    from kombu import Connection

    with Connection(url, connect_timeout=timeout) as connection:
        connection.connect()


async def _ping_redis(url: str, timeout: float) -> None:
    client = aioredis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        await client.ping()
    finally:
        await client.aclose()


#: One probe of each dependency in flight at a time, per event loop: a database that hangs holds at
#: most one thread (a thread can't be interrupted; ``to_thread`` only stops waiting for it), however
#: often /readyz is asked meanwhile.
_in_flight: dict[tuple[int, str], asyncio.Task[Any]] = {}


async def _probe(name: str, check: Callable[[], Awaitable[None]], timeout: float) -> str | None:
    """None if ``check`` succeeded within ``timeout``; else why not, in a few words (the full error
    goes to the log, not to an unauthenticated caller)."""
    key = (id(asyncio.get_running_loop()), name)
    task = _in_flight.get(key)
    if task is None:
        task = asyncio.ensure_future(check())
        _in_flight[key] = task
        task.add_done_callback(lambda done: _forget(key, done))
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
        return None
    except asyncio.TimeoutError:
        return f"unreachable (no answer within {timeout:g}s)"
    except Exception as exc:
        log.warning("readiness: %s unreachable: %s", name, " ".join(str(exc).split())[:500])
        return f"unreachable ({type(exc).__name__})"


def _forget(key: tuple[int, str], task: asyncio.Task[Any]) -> None:
    if _in_flight.get(key) is task:
        del _in_flight[key]
    if not task.cancelled():
        task.exception()  # retrieved: a probe nobody waited for any more is not an asyncio warning
