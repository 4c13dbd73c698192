"""The ``fleetserve`` command line.

Each layer registers its own commands (``cluster/commands/*.py``) so the CLI
mirrors the architecture: hosts/SSH/Ray cluster, model generation, serving,
kernels. Commands import their heavy dependencies (ray, vllm) lazily so that
``fleetserve --help`` stays fast.
"""

from __future__ import annotations

import typer

from cluster.commands import cluster_cmds, model_cmds, observe_cmds, serve_cmds

app = typer.Typer(
    name="fleetserve",
    help="Serve large multimodal models with Ray Serve + vLLM across SSH-bootstrapped GPU hosts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)

for module in (cluster_cmds, model_cmds, serve_cmds, observe_cmds):
    module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
