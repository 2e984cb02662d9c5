"""The benchmark scripts only call what their helper modules define.

The benchmarks are not run by the test suite (minutes each, and vs_torchscale needs torch), so a
helper renamed or dropped from ``bench_common`` / ``torchscale_side`` would otherwise surface
only when someone runs the benchmark: that happened once (``bench_common.Worker``). This reads
each script's source and checks every ``bc.NAME`` / ``ts.NAME`` it uses
against the names the helper module defines at top level, without importing torch.
"""

import ast
import pathlib

import pytest

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
HELPERS = {"bench_common": "bc", "torchscale_side": "ts"}


def top_level_names(module: str) -> set[str]:
    tree = ast.parse((BENCH / f"{module}.py").read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def used_names(script: pathlib.Path) -> dict[str, set[str]]:
    """{helper module: attribute names the script reads from it}, by the alias it imports."""
    tree = ast.parse(script.read_text())
    alias_to_module = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in HELPERS:
                    alias_to_module[a.asname or a.name] = a.name
    used: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in alias_to_module):
            used.setdefault(alias_to_module[node.value.id], set()).add(node.attr)
    return used


SCRIPTS = sorted(p for p in BENCH.glob("*.py") if p.stem not in HELPERS)


def test_every_benchmark_script_is_checked():
    assert {p.stem for p in SCRIPTS} >= {"vs_torchscale", "mfu", "depth_scaling",
                                         "diagnostics_overhead", "depth_compile"}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.stem)
def test_benchmark_uses_only_defined_helpers(script):
    for module, names in used_names(script).items():
        missing = names - top_level_names(module)
        assert not missing, f"{script.name} uses {module}.{sorted(missing)}, which it lacks"


def test_the_check_catches_a_missing_helper(tmp_path):
    script = tmp_path / "broken.py"
    script.write_text("import bench_common as bc\nbc.Worker()\nbc.no_such_helper()\n")
    used = used_names(script)
    assert used == {"bench_common": {"Worker", "no_such_helper"}}
    assert used["bench_common"] - top_level_names("bench_common") == {"no_such_helper"}
