"""Turns listing events into analysis jobs. Never imports torch.

For the catalogue's ingestion code::

    from contract.settings import load_settings
    from producer import Producer

    settings = load_settings()  # LV_DATABASE_URL and LV_BROKER_URL set
    with Producer(settings) as producer:
        report = producer.enqueue([{"listing_id": "sku-1", "title": "Red bag",
                                    "image_urls": ["https://cdn.example.com/a.jpg"]}])
"""

from producer.enqueue import EnqueueReport, Producer
from producer.events import ListingEvent, Refusal

__all__ = ["EnqueueReport", "ListingEvent", "Producer", "Refusal"]
