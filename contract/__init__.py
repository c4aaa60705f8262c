"""The contract layer: what the producer, the workers and the operator tools agree on.

Settings, the broker contract (Celery configuration, task and queue names, the message's shape),
the model registry's entries, the error types and the image-URL policy. It imports none of
`producer`, `worker`, `db` or `listing_vision`, so either side can depend on it alone.
"""
