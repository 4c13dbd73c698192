"""Programs the fleet layer runs on the hosts, shipped by their own source.

Each is a real module (linted, importable in tests) that runs as ``python -``
on a host: its source goes over SSH on stdin, its arguments as one JSON object
in ``argv[1]``; progress lines and a final ``RESULT {json}`` line come back on
stdout. Nothing of fleetserve needs to be installed on the host for them.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType


def program_source(program: ModuleType) -> str:
    """The text a host runs for ``program``: the module's own file."""
    assert program.__file__ is not None
    return Path(program.__file__).read_text()
