"""A decode function for the decode pool's fault tests, in a module of its own: a pool
process imports it to unpickle the function, and importing the test module instead (torch,
pytest) took seconds on a loaded host, longer than the tests' per-image deadline."""

from __future__ import annotations

import os
import time

from worker.decode_child import DecodedForModel, decode_for_model

KILLER = b"kill the decoder process"
HANG = b"hang the decoder process"
SLOW = b"take a second"


def crash_on_cue(
    data: bytes, sha256: str, max_pixels: int, draft_size: int, side: int
) -> DecodedForModel | str:
    """Runs in a pool process: dies on `KILLER` (as a decoder crash would), hangs on `HANG`,
    takes a second on `SLOW`, else decodes."""
    if data == KILLER:
        os._exit(1)
    if data == HANG:
        time.sleep(3600)
    if data == SLOW:
        time.sleep(1.0)
    return decode_for_model(data, sha256, max_pixels, draft_size, side)
