"""The house's rules, held by tests: which room may import what, and what the wheel holds.

- `worker/engine/` and `worker/model/` never import nats: the device side knows nothing of
  the broker. `worker/broker/` never imports torch: the edges never touch the device.
- The rooms (`broker`, `engine`, `features`, `model`, `ops`) never import the worker's top
  level (`app`, `admission`, `admitter`, `answers`, `lifecycle`, `options`, `cli`): the top
  wires the rooms, not the other way.
- Metrics and health read the worker through `worker.ops.view` only: nothing in `ops`
  imports the engine, the broker or the app.
- `fabric-worker check-config` and `provision` stay light: the command line imports no torch.

The import checks run in a fresh interpreter and look at `sys.modules`, so an import made
through any chain of modules counts, not only the ones written in a file.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import worker

ROOT = Path(__file__).resolve().parents[2]
PKG = Path(worker.__file__).parent
ROOMS = ("broker", "engine", "features", "model", "ops")
TOP = {"worker.app", "worker.admission", "worker.admitter", "worker.answers", "worker.lifecycle",
       "worker.options", "worker.cli"}


def modules(room: str) -> list[str]:
    return sorted("worker." + ".".join(p.relative_to(PKG).with_suffix("").parts)
                  for p in (PKG / room).rglob("*.py"))


def loaded_after_import(mods: list[str]) -> set[str]:
    """Top-level package names in sys.modules after importing `mods` in a fresh interpreter."""
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in mods)
            + "print(json.dumps(sorted({n.split('.')[0] for n in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def imports_of(path: Path) -> set[str]:
    """Every module a file imports by name (absolute imports; the repo uses no relative ones)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import"
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


@pytest.mark.parametrize("room", ["engine", "model"])
def test_the_device_side_never_imports_nats(room: str) -> None:
    loaded = loaded_after_import(modules(room))
    assert "torch" in loaded  # the check can see an import: the engine does use torch
    assert "nats" not in loaded


def test_the_broker_side_never_imports_torch() -> None:
    loaded = loaded_after_import(modules("broker"))
    assert "nats" in loaded
    assert "torch" not in loaded


def test_the_command_line_loads_no_torch_until_it_runs_a_worker() -> None:
    assert "torch" not in loaded_after_import(["worker.cli"])


@pytest.mark.parametrize("room", ROOMS)
def test_rooms_never_import_the_top_level(room: str) -> None:
    bad = {f"{p.relative_to(PKG)}: {m}" for p in (PKG / room).rglob("*.py")
           for m in imports_of(p) if m in TOP}
    assert not bad, bad


def test_metrics_and_health_read_the_worker_through_the_view_only() -> None:
    allowed = ("worker.ops", "worker.config", "schemas")
    bad = {f"{p.name}: {m}" for p in (PKG / "ops").rglob("*.py") for m in imports_of(p)
           if (m.startswith("worker.") or m.startswith("schemas"))
           and not m.startswith(allowed)}
    # The stats' step record is the executor's; it is named for type checking only.
    assert bad <= {"stats.py: worker.engine.executor", "stats.py: worker.engine.executor.StepReport"}


def test_every_module_lives_in_a_room_or_is_the_top_level() -> None:
    top = {p.stem for p in PKG.glob("*.py")}
    assert top == {"__init__", "__main__", "config"} | {m.split(".")[1] for m in TOP}
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert rooms == set(ROOMS)
    for room in ROOMS:
        assert (PKG / room / "__init__.py").read_text().startswith('"""')


def test_the_wheel_holds_every_subpackage_and_the_schema_files(tmp_path: Path) -> None:
    """Build the wheel with the installed setuptools (no network) from a copy of the tree."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for pkg in ("worker", "schemas", "loadgen"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    code = ("import sys; from setuptools import build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    wheel = out / run.stdout.strip().splitlines()[-1]
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {str(p.relative_to(ROOT)) for pkg in ("worker", "schemas", "loadgen")
                for p in (ROOT / pkg).rglob("__init__.py")}
    assert {"worker/broker/__init__.py", "worker/engine/__init__.py"} <= packages
    assert packages <= names, packages - names
    sources = {str(p.relative_to(ROOT)) for pkg in ("worker", "schemas", "loadgen")
               for p in (ROOT / pkg).rglob("*.py")}
    assert sources <= names, sources - names
    assert {"schemas/job.schema.json", "schemas/result.schema.json",
            "loadgen/traces/sample.csv"} <= names
