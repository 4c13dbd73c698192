"""Errors that carry where the bad input is and how to fix it.

Every user-facing config error in fleetserve is a :class:`ConfigError`: it
names the file, the key (or line) and the fix, so the CLI can print it as one
clear message instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class FleetserveError(Exception):
    """Base class for errors the CLI prints without a traceback."""


class ConfigError(FleetserveError):
    """A problem in a config file: which file, which key/line, and the fix."""

    def __init__(self, source: str | Path | None, location: str | None, problem: str, fix: str | None = None):
        self.source = str(source) if source is not None else None
        self.location = location
        self.problem = problem
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = self.source or "<config>"
        if self.location:
            where = f"{where}: {self.location}"
        msg = f"{where}: {self.problem}"
        if self.fix:
            msg += f"\n  fix: {self.fix}"
        return msg


class ConfigErrors(ConfigError):
    """Several config problems found at once (all are kept in ``errors``, not just the first).

    The message shows the first :data:`MAX_SHOWN` and how many more: a 20,000-line file of
    one mistake should not print a megabyte.
    """

    MAX_SHOWN = 20

    def __init__(self, errors: Iterable[ConfigError]):
        self.errors = list(errors)
        first = self.errors[0]
        super().__init__(first.source, first.location, first.problem, first.fix)

    def _render(self) -> str:  # type: ignore[override]
        shown = "\n".join(e._render() for e in self.errors[: self.MAX_SHOWN])
        more = len(self.errors) - self.MAX_SHOWN
        return shown + (f"\n... and {more} more error{'s' if more > 1 else ''}" if more > 0 else "")


def pydantic_errors(source: str | Path | None, exc, prefix: str = "", fixes: dict[str, str] | None = None) -> ConfigErrors:
    """Turn a pydantic ValidationError into ConfigErrors naming file and dotted key."""
    fixes = fixes or {}
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ()))
        key = f"{prefix}{loc}" if loc else prefix.rstrip(".") or None
        msg = err.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        fix = fixes.get(loc)
        if fix is None and err.get("type") == "extra_forbidden":
            fix = "remove the key or check its spelling"
        elif fix is None and err.get("type") == "missing":
            fix = "add the key"
        out.append(ConfigError(source, key, msg, fix))
    return ConfigErrors(out)
