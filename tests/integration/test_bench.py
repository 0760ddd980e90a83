"""The ladder runs end to end on the real binary and its numbers mean what they say."""

from __future__ import annotations

import json

import pytest

from loadgen.bench import run_bench
from loadgen.broker import EmbeddedNats
from loadgen.fleetbench import run_fleet
from loadgen.rung import BenchConfig, log_event

pytestmark = pytest.mark.timeout(300)


def test_ladder_smoke(tmp_path) -> None:
    cfg = BenchConfig(jobs=24, model="builtin:tiny", token_budget=4096, low_water=2048,
                      rungs=(0, 1, 3, 4, 5), null_jobs=300, host_path_steps=5)
    result = run_bench(cfg, tmp_path, log=lambda m: None)
    rungs = result["rungs"]
    assert all(r["jobs_ok"] == r["jobs"] for r in rungs.values())
    # Static batching pads for real; continuous batching and serial never pad.
    assert rungs["1"]["padding_fraction"] > 0.05
    assert rungs["3"]["padding_fraction"] < rungs["1"]["padding_fraction"]
    assert rungs["0"]["padding_fraction"] == 0.0 and rungs["4"]["padding_fraction"] == 0.0
    assert all(0 < r["executor_busy_fraction"] <= 1 for r in rungs.values())
    # Rungs 0-4 change the scheduler only; rung 5 changes the runner only (on the CPU its
    # decode steps run at fixed shapes without capture: the path a CUDA graph replays).
    assert [r["runner"] for r in rungs.values()] == ["eager"] * 4 + ["pipelined"]
    assert rungs["5"]["policy"] == "continuous" and rungs["5"]["rung"] == "pipelined"
    assert rungs["5"]["decode_graphs"] == "fixed shapes, no capture"
    assert rungs["5"]["graphed_step_fraction"] > 0 and rungs["4"]["graphed_step_fraction"] == 0
    assert rungs["5"]["padding_fraction"] == 0.0
    null = result["null_model"]
    assert (null["unique"], null["ok"], null["missing"]) == (300, 300, 0)
    assert null["results"] == 300 and null["jobs_per_s"] > 0  # exactly once, timed
    assert result["ceiling"]["useful_tokens_per_s"] > 0
    host = result["host_path"]  # the executor's own work per decode step, by phase
    assert [r["batch"] for r in host] == [1, 32, 256] and all(r["host"] > 0 for r in host)
    assert all(r["host"] == pytest.approx(r["schedule"] + r["prepare"] + r["postprocess"],
                                          abs=1e-3) for r in host)
    assert not (tmp_path / "ladder.partial.json").exists()  # replaced by the full file
    assert all(r["device_busy_fraction"] is None for r in rungs.values())  # no GPU here
    on_disk = json.loads((tmp_path / "ladder.json").read_text())
    assert on_disk["machine"]["cores"] and on_disk["rungs"].keys() == rungs.keys()
    md = (tmp_path / "ladder.md").read_text()
    assert "| 4 | continuous |" in md and "| 5 | pipelined |" in md and "Rung 5 runner" in md
    assert "Host path" in md and "| 256 |" in md
    # The null model runs with one intra-op thread (nothing to compute in parallel), and
    # every worker with the 1 ms GIL switch interval and its start-up heap frozen.
    null_ready = log_event(tmp_path / "work" / "null-0.log", "engine_ready")
    assert null_ready["intra_op_threads"] == 1 and null_ready["gil_switch_ms"] == 1.0
    assert null_ready["gc_frozen"] > 10_000 and null_ready["gc_thresholds"][0] == 20_000
    assert log_event(tmp_path / "work" / "r4-0.log", "engine_ready")["gil_switch_ms"] == 1.0



def test_fleet_burst_and_sustained_pinned_and_colocated(tmp_path) -> None:
    cfg = BenchConfig(model="builtin:tiny", token_budget=2048, low_water=1024, fleet_jobs=40,
                      fleet_sustained_s=6.0)
    with EmbeddedNats() as broker:
        fleet = run_fleet(cfg, broker, tmp_path, log=lambda m: None)
    # The pinned pair at the top level, as before; the pair sharing the cores beside it.
    for f in (fleet, fleet["colocated"]):
        assert f["one"]["jobs_ok"] == f["two"]["jobs_ok"] == 40
        assert f["ratio"] == f["two"]["jobs_per_s"] / f["one"]["jobs_per_s"]
        st = f["sustained"]
        for name, workers in (("one", 1), ("two", 2)):
            run = st[name]
            # Both workers of the pair took jobs off the one consumer.
            assert len(run["jobs_by_worker"]) == workers, run["jobs_by_worker"]
            w = run["sustained"]
            assert (w["start_s"], w["end_s"]) == (1.5, 6.0)
            # The closed loop kept going until the deadline: jobs were left when it stopped.
            assert 0 < w["jobs"] < run["jobs_ok"] < run["jobs"]
            assert w["jobs_per_s"] == w["jobs"] / 4.5 and w["useful_tokens_per_s"] > w["jobs_per_s"]
        assert st["ratio"] == (st["two"]["sustained"]["jobs_per_s"]
                               / st["one"]["sustained"]["jobs_per_s"])
    assert "colocated" not in fleet["colocated"]


def test_ladder_sustained(tmp_path) -> None:
    cfg = BenchConfig(jobs=12, model="builtin:tiny", token_budget=2048, low_water=1024,
                      rungs=(1, 4), null_jobs=0, sustained_s=4.0, host_path_steps=0)
    result = run_bench(cfg, tmp_path, log=lambda m: None)
    sus = result["sustained"]
    assert sus.keys() == {"1", "4"}
    assert [r["rung"] for r in sus.values()] == ["window", "continuous"]
    for r in sus.values():
        assert r["outstanding"] == 64 and r["sustained"]["jobs"] > 0
        assert (r["sustained"]["start_s"], r["sustained"]["end_s"]) == (1.0, 4.0)
    md = (tmp_path / "ladder.md").read_text()
    assert "keeping 64 jobs outstanding, read over 1-4 s" in md
    assert "| 1 | window |" in md.split("Sustained load")[1]
    assert "| 4 | continuous |" in md.split("Sustained load")[1]
