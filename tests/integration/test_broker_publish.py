"""Publishing to the real Valkey: pipelined, one redis-py client per channel, nothing lost."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from contract.broker import make_celery, model_queue, send_analysis
from contract.settings import load_settings
from tests.integration.conftest import Stack


def test_many_jobs_are_published_whole_with_one_client_and_few_round_trips(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings().with_servers(stack.database_url, stack.broker_url)
    app = make_celery(settings)
    model = f"publish-{uuid.uuid4().hex[:8]}"
    job_ids = [uuid.uuid4() for _ in range(1200)]
    built = []
    real_init = redis.Redis.__init__

    def counting_init(self: redis.Redis, *args: object, **kwargs: object) -> None:
        built.append(1)
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(redis.Redis, "__init__", counting_init)
    send_analysis(app, job_ids, model)
    send_analysis(app, job_ids[:10], model)  # the same channel again: no new client
    monkeypatch.undo()

    client = redis.Redis.from_url(stack.broker_url)
    queue = model_queue(model)
    bodies = [json.loads(raw) for raw in client.lrange(queue, 0, -1)]
    assert len(bodies) == 1210
    sent = {body["headers"]["id"] for body in bodies}
    assert sent == {str(job_id) for job_id in job_ids}
    assert len(built) <= 2  # kombu alone builds one per publish: 2,420 here
    client.delete(queue)
