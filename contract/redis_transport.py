"""kombu's Redis transport, keeping one redis-py client per channel.

kombu builds a new `redis.Redis` object for every publish, ack and unacked-index update
(`Channel._create_client`), about three per task in a worker and two per task sent; on this
project's two-core machine that was a tenth of a worker's CPU. A client is a thin, thread-safe
front of the channel's connection pool, so one is kept per channel (rebuilt if the channel ever
gets a new pool). Everything else is kombu's own.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis

TRANSPORT = "contract.redis_transport:Transport"


class Channel(kombu_redis.Channel):
    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self.__dict__.get("_lv_client")
        if client is None or client.connection_pool is not self.pool:
            client = super()._create_client()  # type: ignore[no-untyped-call]
            self.__dict__["_lv_client"] = client
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
