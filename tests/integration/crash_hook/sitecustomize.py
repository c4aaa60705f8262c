"""Test only: never on a deployment's path. A worker started with this folder on PYTHONPATH
(tests/integration/test_crash_input.py) loads it at interpreter start-up.

A PNG carrying the text chunk `lv-test: crash` kills the process while its header is read, as a
decoder bug in native code does (libwebp's CVE-2023-4863, a Pillow or libpng segfault): no
Python exception, no `finally`, no ack. Every other image decodes as usual.
"""

from __future__ import annotations

import os
import signal

from PIL import PngImagePlugin

_open = PngImagePlugin.PngImageFile._open


def _open_or_crash(self: PngImagePlugin.PngImageFile) -> None:
    _open(self)
    if self.info.get("lv-test") == "crash":
        os.kill(os.getpid(), signal.SIGKILL)


PngImagePlugin.PngImageFile._open = _open_or_crash  # type: ignore[method-assign]
