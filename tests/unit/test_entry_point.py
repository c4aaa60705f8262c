"""A process spawned by a worker (a decode process) imports its parent's main module first, as
`__mp_main__`: the console script or `python -m listing_vision`. Neither may pull the command
line in (each child would carry about 100 MB of it and start 0.4 s later)."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

NOT_LOADED = (
    "import sys\n"
    "heavy = [m for m in ('listing_vision.cli', 'torch', 'celery') if m in sys.modules]\n"
    "assert not heavy, heavy\n"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_the_console_script_enters_through_the_light_main_module() -> None:
    (entry,) = [
        ep
        for ep in importlib.metadata.entry_points(group="console_scripts")
        if ep.name == "listing-vision"
    ]
    assert entry.value == "listing_vision.__main__:main"
    done = _run(f"import {entry.module}\n{NOT_LOADED}")
    assert done.returncode == 0, done.stderr


def test_a_spawned_child_of_the_console_script_imports_no_command_line() -> None:
    script = shutil.which("listing-vision", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the project is not installed with its console script")
    # What multiprocessing's spawn does with a parent's main script (`_fixup_main_from_path`).
    done = _run(f"import runpy\nrunpy.run_path({script!r}, run_name='__mp_main__')\n{NOT_LOADED}")
    assert done.returncode == 0, done.stderr


def test_a_spawned_child_of_python_dash_m_imports_no_command_line() -> None:
    # What spawn does with a parent started as `python -m listing_vision` (by module name).
    done = _run(
        "import runpy\n"
        "runpy.run_module('listing_vision.__main__', run_name='__mp_main__', alter_sys=True)\n"
        f"{NOT_LOADED}"
    )
    assert done.returncode == 0, done.stderr
