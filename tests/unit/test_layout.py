"""The house's rules, held by tests: which room may import what, how big a module may grow,
and what the wheel holds.

- `worker/engine/` and `worker/model/` never import nats: the device side knows nothing of
  the broker. `worker/broker/` never imports torch: the edges never touch the device.
- The rooms (`broker`, `engine`, `features`, `model`, `ops`) never import the worker's top
  level (`app`, `admission`, `admitter`, `answers`, `lifecycle`, `options`, `cli`): the top
  wires the rooms, not the other way.
- `worker/features/` (what producers ask beyond tokens: cancels, stop strings, response
  formats) lives on the event loop: it never loads torch and names nothing of the engine
  but its plain records (`worker.engine.sequence`); the executor is reached through
  callbacks the app wires.
- Metrics and health read the worker through `worker.ops.view` only: nothing in `ops`
  imports the engine, the broker or the app, and `ops` has no import circle (the view is
  plain data; nothing it names imports it back).
- No module in `worker/`, `loadgen/` or `schemas/` passes 400 lines (past that it probably
  holds two nouns), and `worker/app.py` stays at most 250: it builds the stages, wires their
  callbacks, runs and stops; what a stage does lives in the stage.
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
MAX_MODULE_LINES = 400
MAX_APP_LINES = 250


def modules(room: str) -> list[str]:
    return sorted("worker." + ".".join(p.relative_to(PKG).with_suffix("").parts)
                  for p in (PKG / room).rglob("*.py"))


def loaded_after_import(mods: list[str], full: bool = False) -> set[str]:
    """Top-level package names (every module name with `full`) in sys.modules after
    importing `mods` in a fresh interpreter."""
    names = "sys.modules" if full else "{n.split('.')[0] for n in sys.modules}"
    code = ("import json, sys\n" + "".join(f"import {m}\n" for m in mods)
            + f"print(json.dumps(sorted({names})))")
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


def test_the_features_stay_on_the_event_loop() -> None:
    """Cancels, stop strings and response formats load no torch and none of the engine's
    internals: at run time they reach the executor only through the app's callbacks."""
    loaded = loaded_after_import(modules("features"), full=True)
    assert "torch" not in loaded
    engine = {m for m in loaded if m.startswith("worker.engine.")}
    # What the broker's records load for admission's KV accounting (plain data).
    assert engine <= {"worker.engine.blocks"}, engine
    named = {f"{p.name}: {m}" for p in (PKG / "features").rglob("*.py") for m in imports_of(p)
             if m.startswith("worker.engine") and not m.startswith("worker.engine.sequence")}
    assert not named, named


def test_ops_has_no_import_circle() -> None:
    """Every import between ops modules, type-checking ones included, points one way."""
    ops = {m for m in modules("ops") if not m.endswith("__init__")}
    edges = {m: {i for i in imports_of(PKG / "ops" / (m.split(".")[-1] + ".py")) if i in ops}
             for m in ops}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n}))
                   for n in edges[start])

    circles = sorted(m for m in ops if reaches(m, m, set()))
    assert not circles, circles
    assert edges["worker.ops.view"] <= {"worker.ops.stats"}  # plain data, counters for a type


def _sources() -> list[Path]:
    return sorted(p for pkg in ("worker", "loadgen", "schemas") for p in (ROOT / pkg).rglob("*.py"))


def test_no_module_passes_400_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in _sources()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, long


def test_the_app_only_builds_and_wires() -> None:
    assert len((PKG / "app.py").read_text().splitlines()) <= MAX_APP_LINES


def test_every_module_opens_with_a_docstring() -> None:
    bare = [str(p.relative_to(ROOT)) for p in _sources()
            if p.stat().st_size and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not bare, bare


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
