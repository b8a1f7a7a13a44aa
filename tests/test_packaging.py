"""The Python versions setup.cfg claims are the ones the suite runs on (issue 17 item 5).

``lease/manager.py`` catches ``asyncio.wait_for``'s timeout as the builtin ``TimeoutError``; before 3.11
those are different classes, so on 3.10 the lease keeper died at its first renewal timer while
setup.cfg claimed ``>=3.10`` and the suite only ran on 3.11. These tests tie the claim to tox's envlist
(what CI runs) and to the code's reliance on 3.11 semantics.
"""

from __future__ import annotations

import ast
import configparser
import re
import sys
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("lease", "udpflannel", "tun")
CANDIDATES = [f"3.{minor}" for minor in range(6, 20)]


def claimed() -> SpecifierSet:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return SpecifierSet(cfg["options"]["python_requires"])


def tox_pythons() -> set[str]:
    """The interpreters tox.ini's envlist runs the suite on (``py311`` -> ``3.11``)."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "tox.ini")
    envs = re.split(r"[,\s]+", cfg["tox"]["envlist"])
    return {f"{m[1]}.{m[2]}" for env in envs if (m := re.fullmatch(r"py(\d)(\d+)", env))}


def test_setup_cfg_claims_exactly_the_python_versions_tox_runs_the_suite_on():
    runs_on = tox_pythons()
    assert runs_on, "tox.ini's envlist names no pyXY environment"
    assert {v for v in CANDIDATES if v in claimed()} == runs_on


def test_the_suite_runs_on_a_claimed_python():
    assert f"{sys.version_info.major}.{sys.version_info.minor}" in claimed()


def test_classifiers_name_the_claimed_versions():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    named = set(re.findall(r"Programming Language :: Python :: (3\.\d+)", cfg["metadata"]["classifiers"]))
    assert named == tox_pythons()


def catches_builtin_timeout(path: Path) -> list[int]:
    """Lines of ``except TimeoutError`` (alone or in a tuple) in one source file."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            names = node.type.elts if isinstance(node.type, ast.Tuple) else [node.type]
            if any(isinstance(n, ast.Name) and n.id == "TimeoutError" for n in names):
                lines.append(node.lineno)
    return lines


def test_code_that_catches_asyncio_timeouts_as_builtin_timeouterror_is_not_claimed_for_python_before_311():
    """asyncio.TimeoutError is the builtin TimeoutError only from 3.11 on (bpo-42413)."""
    users = {str(p.relative_to(ROOT)): lines for pkg in PRODUCT for p in sorted((ROOT / pkg).rglob("*.py"))
             if (lines := catches_builtin_timeout(p))}
    assert "lease/manager.py" in users, "the renewal timer's `except TimeoutError` moved: update this test"
    before_311 = [v for v in CANDIDATES if v in claimed() and tuple(map(int, v.split("."))) < (3, 11)]
    assert not before_311, f"{users} catch asyncio timeouts as TimeoutError, which {before_311} do not raise"
