"""Which kombu transport a broker URL gets (no server needed)."""

from __future__ import annotations

from contract.broker import make_celery
from contract.redis_transport import Transport
from contract.settings import load_settings


def transport_of(url: str) -> object:
    settings = load_settings(broker_url=url, database_url="postgresql://x@127.0.0.1/x")
    return make_celery(settings).connection_for_write().transport


def test_plain_redis_gets_the_transport_that_keeps_one_client() -> None:
    assert isinstance(transport_of("redis://127.0.0.1:6379/0"), Transport)


def test_tls_redis_keeps_kombus_own_transport_so_tls_stays_on() -> None:
    """The review's H3: an explicit transport made kombu skip its `rediss` branch, and the
    password went out in plain text."""
    connection = make_celery(
        load_settings(broker_url="rediss://127.0.0.1:6380/0", database_url="postgresql://x@h/x")
    ).connection_for_write()
    assert not isinstance(connection.transport, Transport)
    assert connection.ssl
