"""The layers of cluster/ import only downward: fleet < serving < commands; kernels is a switch on its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cluster"

#: layer folder -> the packages its modules must not import
FORBIDDEN = {
    "fleet": ("cluster.serving", "cluster.commands"),
    "serving": ("cluster.commands",),
    "kernels": ("cluster.serving", "cluster.commands"),
}


def imported_modules(path: Path) -> set[str]:
    """Every module an ``import``/``from ... import`` in the file names (at any depth, lazy ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against the file's package
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                names.add(".".join((*base, node.module)))
            else:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_nothing_above_it(layer: str) -> None:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"cluster/{layer} has no modules"
    bad = [f"{path.relative_to(PACKAGE.parent)} imports {name}" for path in files
           for name in sorted(imported_modules(path))
           if any(name == top or name.startswith(top + ".") for top in FORBIDDEN[layer])]
    assert not bad, "\n".join(bad)


def test_the_check_sees_lazy_imports(tmp_path: Path) -> None:
    probe = PACKAGE / "fleet" / "ssh.py"
    assert "cluster.fleet.hostfile" in imported_modules(probe)
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from cluster import serving\n    import cluster.commands.cli\n")
    assert {"cluster.serving", "cluster.commands.cli"} <= imported_modules(lazy)


def test_programs_shipped_to_the_hosts_need_nothing_of_fleetserve() -> None:
    """The probe runs before anything says the host's Python is usable: standard library only.
    The other fleet programs need Ray there, and nothing of fleetserve."""
    import sys

    remote = PACKAGE / "fleet" / "remote"
    for path in sorted(remote.glob("*.py")):
        if path.name == "__init__.py":
            continue
        tops = {name.split(".")[0] for name in imported_modules(path)}
        allowed = set(sys.stdlib_module_names) | ({"ray"} if path.name != "probe.py" else set())
        assert tops <= allowed, f"{path.name} imports {sorted(tops - allowed)}"
