"""A Celery app for Celery's own tools, configured from the `LV_` settings as the workers' is:

    celery -A listing_vision.celery_app inspect ping
    celery -A listing_vision.celery_app inspect lv_stats
    celery -A listing_vision.celery_app control revoke JOB_ID
    celery -A listing_vision.celery_app events
    celery -A listing_vision.celery_app flower

With `LV_BROKER_URL` unset it uses the embedded broker of the running stack (`listing-vision
up`, under `LV_HOME`); it never starts one.
"""

from __future__ import annotations

from typing import Any

from celery.worker.control import inspect_command

from contract.broker import (
    ANALYZE_GROUP_TASK,
    ANALYZE_TASK,
    RUN_CHUNK_TASK,
    STATS_COMMAND,
    make_celery,
)
from contract.settings import Settings, SettingsError, load_settings
from listing_vision.embedded import running_urls


def _settings() -> Settings:
    settings = load_settings()
    if settings.broker_url and settings.database_url:
        return settings
    running = running_urls(settings.home)
    broker = settings.broker_url or running.broker_url
    if broker is None:
        raise SettingsError(
            "no broker: set LV_BROKER_URL, or start the stack with `listing-vision up` "
            f"(LV_HOME {settings.home})"
        )
    return settings.with_servers(settings.database_url or running.database_url, broker)


@inspect_command(name=STATS_COMMAND)
def lv_stats(state: Any) -> dict[str, Any]:  # pragma: no cover - answered by the workers
    """Declared here so `celery inspect lv_stats` knows the command; workers answer it with
    their batches and model calls (`worker/tasks.py`)."""
    return {}


app = make_celery(_settings())
# kombu's own Redis transport here: the tools publish little, and Flower reads the broker's
# kind from the URL's scheme, which the workers' transport (`contract/redis_transport.py`)
# would turn into its class path ("'redis' broker is not supported" on the broker page).
app.conf.broker_transport = None
celery = app  # what `celery -A listing_vision.celery_app` looks for first


def _declare_worker_tasks() -> None:
    """The workers' task names, known to this app so Flower's controls (rate limits, time
    limits) accept them; the tasks run only in `listing-vision worker`, never here."""
    for name in (ANALYZE_TASK, ANALYZE_GROUP_TASK, RUN_CHUNK_TASK):

        @app.task(name=name, bind=True)
        def declared(self: Any, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(
                f"{self.name} runs in `listing-vision worker`, not in listing_vision.celery_app"
            )


_declare_worker_tasks()
