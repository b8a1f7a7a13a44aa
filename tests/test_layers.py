"""The layers run one way: ``udpflannel`` depends on ``tun`` and ``lease``, never the reverse, and the
two leaves do not know each other (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def imported_packages(path: Path) -> set[str]:
    """The top-level package of every import in ``path``, inline imports included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize(("leaf", "forbidden"), [("tun", {"udpflannel", "lease", "benchmarks"}),
                                                 ("lease", {"udpflannel", "tun", "benchmarks"})])
def test_a_leaf_imports_no_layer_above_it_nor_the_other_leaf(leaf: str, forbidden: set[str]) -> None:
    modules = sorted((ROOT / leaf).rglob("*.py"))
    assert len(modules) >= 5
    wrong = {str(m.relative_to(ROOT)): sorted(imported_packages(m) & forbidden) for m in modules}
    assert {m: p for m, p in wrong.items() if p} == {}


def test_the_check_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from udpflannel.packet import Verdict\n    import lease.etcd\n")
    assert imported_packages(module) == {"udpflannel", "lease"}


def test_the_command_line_imports_no_heavy_library() -> None:
    """``udpflannel status`` must stay fast: the CLI module loads no numpy, netlink, TUN, etcd or gRPC code."""
    import subprocess
    import sys

    heavy = ("numpy", "tun._gso_c", "pyroute2", "pytun", "aetcd", "grpc")
    code = f"import sys, udpflannel.cli; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
