"""Per-host progress of a fleet operation for the terminal: a live rich table, ``[host] message`` lines otherwise.

Handed to :class:`cluster.fleet.bringup.RayCluster` as its ``progress`` factory
(``Progress.factory(console)``); the fleet layer redacts secrets before calling it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from rich.console import Console
from rich.live import Live
from rich.table import Table


class Progress:
    """One operation's per-host state, shown live (implements the fleet layer's ``HostProgress``)."""

    def __init__(self, hosts: list[str], console: Console | None = None, title: str = ""):
        self.console = console or Console(stderr=True)
        self.state: dict[str, tuple[str, str]] = {h: ("…", "waiting") for h in hosts}
        self.title = title
        self._lock = threading.Lock()
        self._live: Live | None = None

    @classmethod
    def factory(cls, console: Console | None = None) -> Callable[[list[str], str], Progress]:
        """``(hosts, title) -> Progress`` on ``console`` (stderr by default), as RayCluster takes it."""
        return lambda hosts, title: cls(hosts, console, title)

    def _table(self) -> Table:
        table = Table(title=self.title, show_header=True, header_style="bold")
        table.add_column("host")
        table.add_column("")
        table.add_column("status")
        for host, (mark, msg) in self.state.items():
            table.add_row(host, mark, msg)
        return table

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            self._live = Live(self._table(), console=self.console, refresh_per_second=8, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def update(self, host: str, message: str, mark: str = "…") -> None:
        with self._lock:
            self.state[host] = (mark, message)
            if self._live is not None:
                self._live.update(self._table())
            else:
                self.console.print(f"[{host}] {message}", markup=False, highlight=False)

    def ok(self, host: str, message: str) -> None:
        self.update(host, message, "✓")

    def fail(self, host: str, message: str) -> None:
        self.update(host, message, "✗")

    def note(self, message: str) -> None:
        with self._lock:
            if self._live is not None:
                self._live.console.print(message, markup=False, highlight=False)
            else:
                self.console.print(message, markup=False, highlight=False)
