"""`listing-vision flower`: Flower on the stack's broker, never reachable without credentials.

Flower itself starts on any address without authentication, and even with basic auth its own
Prometheus endpoint (`/metrics`: worker names, task names and counts) answers anyone. So
Flower is started through this module: it refuses an address beyond loopback unless both
`LV_FLOWER_USER` and `LV_FLOWER_PASSWORD` are set, and puts `/metrics` behind the same basic
auth as every page and API. `/healthcheck` (it answers "OK") stays open for probes. Its broker
page also lists the model queues that hold messages without a live worker.
"""

from __future__ import annotations

import ipaddress
import logging
import os

import redis

from contract.errors import one_line
from contract.settings import Settings, SettingsError

log = logging.getLogger(__name__)

MAX_TASKS = 10_000  # tasks Flower keeps in memory (its default, made explicit)


def is_loopback(address: str) -> bool:
    """Whether `address` can be reached only from this host."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name or "": it may be reachable from elsewhere
        return False


def check_exposure(settings: Settings, address: str) -> None:
    """Refuse to serve beyond loopback without complete credentials (a half-set pair is
    already refused when the settings are read)."""
    if is_loopback(address) or (settings.flower_user and settings.flower_password):
        return
    shown = address or "all interfaces"
    raise SettingsError(
        f"Flower on {shown} would be reachable from other hosts without authentication: "
        "set LV_FLOWER_USER and LV_FLOWER_PASSWORD, or bind it to 127.0.0.1"
    )


def adapt_handlers() -> None:
    """Flower's handlers, adapted before its app is built: `/metrics` behind its authentication
    (a no-op when none is configured, which only loopback allows), and the broker page and
    queue-length API listing every model queue that holds messages, not only the queues live
    workers consume (work waiting for a model nobody serves is what an operator must see)."""
    from flower.api.tasks import GetQueueLengths
    from flower.views.broker import BrokerView
    from flower.views.monitor import Metrics
    from tornado import web

    class AuthenticatedMetrics(Metrics):
        @web.authenticated
        async def get(self) -> None:
            await super().get()

    class ModelQueuesBroker(_WaitingQueues, BrokerView):
        pass

    class ModelQueueLengths(_WaitingQueues, GetQueueLengths):
        pass

    _replace_handler("/metrics", AuthenticatedMetrics)
    _replace_handler("/broker", ModelQueuesBroker)
    _replace_handler("/api/queues/length", ModelQueueLengths)


class _WaitingQueues:
    """Adds the broker's non-empty `lv.*` queues to the queues Flower asks the length of."""

    def get_active_queue_names(self) -> list[str]:
        names = set(super().get_active_queue_names())  # type: ignore[misc]
        try:
            names |= waiting_queues(self.application.broker_uri_with_password)  # type: ignore[attr-defined]
        except (redis.RedisError, ValueError) as error:
            log.warning("broker page: waiting queues not listed: %s", one_line(error, 200))
        return sorted(names)


def waiting_queues(broker_url: str) -> set[str]:
    """The `lv.*` queues holding messages now: Redis keeps a list only while it is non-empty,
    and kombu a list per priority step (their names end in its separator and the step)."""
    from kombu.transport.redis import Channel

    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)
    try:
        keys = client.scan_iter(match="lv.*", _type="LIST", count=1000)
        return {key.decode(errors="replace").split(Channel.sep, 1)[0] for key in keys}
    finally:
        client.close()


def _replace_handler(path: str, handler: type) -> None:
    from flower import urls
    from tornado.web import URLSpec

    for index, entry in enumerate(urls.handlers):
        if isinstance(entry, URLSpec) and entry.regex.pattern.rstrip("$") == path:
            urls.handlers[index] = URLSpec(path, handler, entry.kwargs, entry.name)
        elif isinstance(entry, tuple) and entry[0] == path:
            urls.handlers[index] = (path, handler)


def run_flower(settings: Settings, address: str, port: int) -> None:
    """Run Flower in this process (Celery's own `flower` command on
    `listing_vision.celery_app`) until it is stopped. The password travels in the environment,
    never on a command line that `ps` shows."""
    check_exposure(settings, address)
    if settings.flower_user and settings.flower_password:
        password = settings.flower_password.get_secret_value()
        os.environ["FLOWER_BASIC_AUTH"] = f"{settings.flower_user}:{password}"
    else:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    adapt_handlers()
    from celery.bin.celery import celery

    argv = [
        "-A",
        "listing_vision.celery_app",
        "flower",
        f"--address={address}",
        f"--port={port}",
        f"--max_tasks={MAX_TASKS}",
    ]
    celery(args=argv, prog_name="celery", auto_envvar_prefix="CELERY")
