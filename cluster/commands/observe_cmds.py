"""Observability commands: ``fleetserve prometheus`` scrapes every Ray node.

Ray's dashboard keeps a Prometheus service-discovery file on the head
(``<session dir>/prom_metrics_service_discovery.json``, linked from
``<temp dir>/prom_metrics_service_discovery.json``; ``--temp-dir`` is the
hostfile's ``ray.temp_dir``) listing every alive node's metrics endpoint, and
rewrites it every 5 s as nodes join and leave. Prometheus's ``file_sd_configs``
follows it, so one config scrapes the whole cluster at any size. This command
writes that config and runs the distribution's ``prometheus`` with it (its own
data directory, listening on the head's loopback by default). Ray's
``ray metrics launch-prometheus`` does the same but downloads a Prometheus
release from GitHub, which sites without internet access cannot do.

The Ray dashboard looks for Prometheus at ``http://localhost:9090`` unless its
process was started with ``RAY_PROMETHEUS_HOST``, so the default ``--listen``
needs no setting on the head.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import typer
import yaml
from rich.console import Console

from cluster.commands import fail
from cluster.errors import FleetserveError

#: File name Ray 2.58 gives the service-discovery file (ray._private.ray_constants).
SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"
DEFAULT_DIR = Path.home() / ".cache" / "fleetserve" / "prometheus"
_DURATION = re.compile(r"^[1-9][0-9]*(ms|s|m|h)$")

console = Console()


def service_discovery_file(ray_temp_dir: str | Path) -> Path:
    """Where the head's dashboard keeps the file for the cluster started with ``--temp-dir=ray_temp_dir``."""
    return Path(ray_temp_dir) / SERVICE_DISCOVERY_FILE


def prometheus_config(sd_file: Path, scrape_interval: str = "10s") -> str:
    """A prometheus.yml scraping every node listed in Ray's service-discovery file."""
    if not _DURATION.match(scrape_interval):
        raise FleetserveError(f"--scrape-interval {scrape_interval!r} is not a Prometheus duration "
                              "(a whole number with ms, s, m or h, e.g. 10s)")
    return yaml.safe_dump({
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "scrape_configs": [{
            # Ray's file labels its targets job="ray" too; Ray's own Grafana boards expect that.
            "job_name": "ray",
            # Prometheus also watches the file; the refresh catches a head restarted into a new session.
            "file_sd_configs": [{"files": [str(sd_file)], "refresh_interval": "30s"}],
        }],
    }, sort_keys=False)


def prometheus_command(config_file: Path, data_dir: Path, listen: str, binary: str = "prometheus") -> list[str]:
    return [binary, f"--config.file={config_file}", f"--storage.tsdb.path={data_dir}",
            f"--web.listen-address={listen}"]


def prometheus(
    ray_temp_dir: Path = typer.Option(Path("/tmp/ray"), "--ray-temp-dir",
                                      help="Ray's --temp-dir on the head (the hostfile's ray.temp_dir)."),
    sd_file: Path | None = typer.Option(None, "--sd-file",
                                        help="Ray's service-discovery file itself (default: in --ray-temp-dir)."),
    directory: Path = typer.Option(DEFAULT_DIR, "--dir", help="Where prometheus.yml and the data go."),
    listen: str = typer.Option("127.0.0.1:9090", "--listen",
                               help="Prometheus's address (0.0.0.0:9090 to let a Grafana elsewhere query it)."),
    scrape_interval: str = typer.Option("10s", "--scrape-interval", help="How often each node is scraped."),
    print_only: bool = typer.Option(False, "--print-only",
                                    help="Write prometheus.yml and print the command instead of running it."),
) -> None:
    """Run Prometheus on the Ray head, scraping every node through Ray's service-discovery file.

    Runs in the foreground (Ctrl-C stops it); run it under systemd, tmux or nohup to keep it.
    The Ray dashboard's charts also need Grafana: see docs/operations.md.
    """
    sd = sd_file or service_discovery_file(ray_temp_dir)
    try:
        if not sd.is_file():
            raise FleetserveError(
                f"{sd} does not exist: run this on the Ray head, after `fleetserve up` (the dashboard writes it; "
                "ray.dashboard must not be false), with --ray-temp-dir set to the hostfile's ray.temp_dir")
        config = prometheus_config(sd.absolute(), scrape_interval)
        binary = shutil.which("prometheus")
        if binary is None and not print_only:
            raise FleetserveError("no `prometheus` on PATH: install it (Debian/Ubuntu: apt-get install prometheus; "
                                  "elsewhere: https://prometheus.io/download) or use --print-only")
    except FleetserveError as exc:
        fail(exc)
    directory.mkdir(parents=True, exist_ok=True)
    config_file = directory / "prometheus.yml"
    config_file.write_text(config)
    cmd = prometheus_command(config_file, directory / "data", listen, binary or "prometheus")
    host = listen.rsplit(":", 1)
    url = f"http://{'localhost' if host[0] in ('', '0.0.0.0', '127.0.0.1') else host[0]}:{host[-1]}"
    console.print(f"wrote {config_file} (targets from {sd})", highlight=False, soft_wrap=True)
    if url != "http://localhost:9090":
        console.print(f"the Ray dashboard finds it if the head starts with RAY_PROMETHEUS_HOST={url}",
                      highlight=False, soft_wrap=True)
    if print_only:
        console.print(" ".join(cmd), highlight=False, soft_wrap=True)
        return
    console.print(f"prometheus on {url} (Ctrl-C stops it)", highlight=False, soft_wrap=True)
    # exec: the PID the caller started is Prometheus itself, so a signal reaches it directly.
    os.execv(cmd[0], cmd)


def register(app: typer.Typer) -> None:
    app.command("prometheus")(prometheus)
