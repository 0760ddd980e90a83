"""Engine configuration: the nine fields and their rules, env overrides, and error
messages that name the field and never leak a traceback or a password."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker.config import (
    FIELDS,
    ConfigError,
    EngineConfig,
    cfg_summary,
    config_hash,
    load_config,
    redact_url,
)

GOOD: dict[str, Any] = {
    "nats_url": "nats://localhost:4222",
    "stream": "FABRIC_JOBS",
    "consumer": "fabric-workers",
    "model": "builtin:tiny",
    "device": "cpu",
    "dtype": "float32",
    "token_budget": 4096,
    "low_water": 1024,
    "max_seq_len": 2048,
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def write_config(tmp_path: Path, values: dict[str, Any], name: str = "engine.toml") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
    return path


def load(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> EngineConfig:
    return load_config(write_config(tmp_path, {**GOOD, **overrides}), environ=env or {})


def problems(tmp_path: Path, env: dict[str, str] | None = None, **overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, env, **overrides)
    return info.value.problems


def only_problem(tmp_path: Path, **overrides: Any) -> str:
    found = problems(tmp_path, **overrides)
    assert len(found) == 1, found
    return found[0]


def test_loads_a_good_file(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.model_dump() == GOOD
    assert cfg.servers == ["nats://localhost:4222"]


def test_exactly_nine_fields_all_required() -> None:
    assert FIELDS == (
        "nats_url", "stream", "consumer", "model", "device", "dtype",
        "token_budget", "low_water", "max_seq_len",
    )  # fmt: skip
    assert all(info.is_required() for info in EngineConfig.model_fields.values())


def test_is_frozen() -> None:
    cfg = EngineConfig.model_validate(GOOD)
    with pytest.raises(ValidationError):
        cfg.token_budget = 1  # type: ignore[misc]


@pytest.mark.parametrize("field", list(GOOD))
def test_missing_field(tmp_path: Path, field: str) -> None:
    values = {k: v for k, v in GOOD.items() if k != field}
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path, values), environ={})
    assert info.value.problems == [f"missing field {field!r}"]


def test_unknown_field_lists_the_nine(tmp_path: Path) -> None:
    message = only_problem(tmp_path, budget=4096)
    assert message.startswith("unknown field 'budget' (did you mean 'token_budget'?")
    assert "the nine fields are: nats_url, stream, consumer" in message


def test_unknown_table_is_rejected(tmp_path: Path) -> None:
    path = write_config(tmp_path, GOOD)
    path.write_text(path.read_text() + "[metrics]\nport = 9090\n")
    with pytest.raises(ConfigError, match="unknown field 'metrics'"):
        load_config(path, environ={})


def test_error_line_format(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, token_budget=-5)
    assert str(info.value) == (
        f"engine config {tmp_path / 'engine.toml'}: token_budget: must be greater than 0 (got -5)"
    )


def test_every_problem_is_reported_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, stream="a.b", device="gpu", budget=1)
    lines = str(info.value).splitlines()
    assert len(lines) == 3 and all(line.startswith("engine config ") for line in lines)
    assert [line.split(": ")[1].split(" ")[0] for line in lines] == ["stream", "device", "unknown"]


# --- field rules -------------------------------------------------------------------------

INVALID = [
    ("nats_url", "localhost:4222"),
    ("nats_url", "http://localhost:4222"),
    ("nats_url", "nats://"),
    ("nats_url", "nats://:4222"),
    ("nats_url", "nats://host:port"),
    ("nats_url", "nats://host:65536"),
    ("nats_url", "nats:host"),
    ("nats_url", "nats://[::1:4222"),
    ("nats_url", "nats://a:4222,"),
    ("nats_url", ""),
    ("nats_url", 4222),
    ("stream", ""),
    ("stream", "FABRIC JOBS"),
    ("stream", "FABRIC.JOBS"),
    ("stream", "JOBS*"),
    ("stream", "JOBS>"),
    ("stream", "a/b"),
    ("stream", "a\\b"),
    ("stream", "a\tb"),
    ("consumer", ""),
    ("consumer", "workers.1"),
    ("consumer", "w*"),
    ("consumer", "../w"),
    ("model", ""),
    ("model", "builtin:"),
    ("model", "builtin:a b"),
    ("model", " /models/x"),
    ("model", 3),
    ("device", "gpu"),
    ("device", "cuda:"),
    ("device", "cuda:-1"),
    ("device", "cuda:01"),
    ("device", "CPU"),
    ("device", "cuda:0 "),
    ("dtype", "fp16"),
    ("dtype", "float64"),
    ("dtype", "bf16"),
    ("token_budget", 0),
    ("token_budget", -5),
    ("token_budget", 1.5),
    ("token_budget", 4096.0),
    ("token_budget", True),
    ("token_budget", "4096"),
    ("low_water", -1),
    ("low_water", 1.5),
    ("low_water", False),
    ("max_seq_len", 0),
    ("max_seq_len", 2048.0),
]


@pytest.mark.parametrize(("field", "value"), INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_invalid_value_names_the_field(tmp_path: Path, field: str, value: Any) -> None:
    message = only_problem(tmp_path, **{field: value})
    assert message.startswith((f"{field}: must ", f"{field}: each URL ")), message
    assert "(got " in message and "Input should" not in message
    with pytest.raises(ValidationError):
        EngineConfig.model_validate({**GOOD, field: value})


VALID = [
    ("nats_url", "tls://nats.example.com:4443"),
    ("nats_url", "ws://a:8080,wss://b:443"),
    ("nats_url", "nats://[::1]:4222"),
    ("nats_url", "nats://user:pass@host"),
    ("nats_url", "nats://token@host:4222"),
    ("stream", "jobs-v2_A"),
    ("consumer", "w"),
    ("model", "builtin:tiny-llama_1.1"),
    ("model", "/models/llama-3-8b"),
    ("model", "relative/dir"),
    ("device", "cuda"),
    ("device", "cuda:0"),
    ("device", "cuda:12"),
    ("dtype", "bfloat16"),
    ("low_water", 0),
]


@pytest.mark.parametrize(("field", "value"), VALID, ids=[f"{f}={v!r}" for f, v in VALID])
def test_valid_value(tmp_path: Path, field: str, value: Any) -> None:
    assert getattr(load(tmp_path, **{field: value}), field) == value


def test_nats_url_list_is_normalized(tmp_path: Path) -> None:
    cfg = load(tmp_path, nats_url="nats://a:4222, nats://b:4222")
    assert cfg.nats_url == "nats://a:4222,nats://b:4222"
    assert cfg.servers == ["nats://a:4222", "nats://b:4222"]


def test_low_water_must_be_below_token_budget(tmp_path: Path) -> None:
    assert only_problem(tmp_path, low_water=4096) == (
        "low_water: must be less than token_budget (4096) (got 4096)"
    )
    assert load(tmp_path, low_water=4095).low_water == 4095


def test_max_seq_len_must_fit_the_budget(tmp_path: Path) -> None:
    assert only_problem(tmp_path, max_seq_len=4097) == (
        "max_seq_len: must be at most token_budget (4096) (got 4097)"
    )
    assert load(tmp_path, max_seq_len=4096).max_seq_len == 4096


def test_cross_checks_wait_for_a_valid_budget(tmp_path: Path) -> None:
    # A bad budget is one problem, not three.
    assert problems(tmp_path, token_budget=-1) == ["token_budget: must be greater than 0 (got -1)"]


def test_float16_on_cpu_is_refused(tmp_path: Path) -> None:
    message = only_problem(tmp_path, device="cpu", dtype="float16")
    assert message.startswith("dtype: float16 is refused on device 'cpu'")
    assert "bfloat16 or float32" in message


@pytest.mark.parametrize(("device", "dtype"), [("cpu", "bfloat16"), ("cuda:0", "float16")])
def test_other_device_dtype_pairs_are_allowed(tmp_path: Path, device: str, dtype: str) -> None:
    cfg = load(tmp_path, device=device, dtype=dtype)
    assert (cfg.device, cfg.dtype) == (device, dtype)


# --- files and the environment -----------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.toml", environ={})
    assert str(info.value).startswith(f"engine config {tmp_path / 'nope.toml'}: cannot read")


def test_invalid_toml(tmp_path: Path) -> None:
    path = tmp_path / "engine.toml"
    path.write_text("token_budget = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path, environ={})


def test_env_overrides_the_file(tmp_path: Path) -> None:
    env = {
        "FABRIC_TOKEN_BUDGET": "8192",
        "FABRIC_LOW_WATER": " 2048 ",
        "FABRIC_DEVICE": "cuda:1",
        "FABRIC_DTYPE": "bfloat16",
        "FABRIC_LOG_LEVEL": "debug",  # not an engine field: ignored here
    }
    cfg = load(tmp_path, env)
    assert (cfg.token_budget, cfg.low_water, cfg.device, cfg.dtype) == (
        8192, 2048, "cuda:1", "bfloat16",
    )  # fmt: skip
    assert cfg.stream == GOOD["stream"]


def test_env_supplies_a_field_the_file_lacks(tmp_path: Path) -> None:
    values = {k: v for k, v in GOOD.items() if k != "nats_url"}
    cfg = load_config(
        write_config(tmp_path, values), environ={"FABRIC_NATS_URL": "nats://nats:4222"}
    )
    assert cfg.nats_url == "nats://nats:4222"


@pytest.mark.parametrize("value", ["1.5", "4k", "", "0x10", "true"])
def test_env_int_that_is_not_an_integer(tmp_path: Path, value: str) -> None:
    found = problems(tmp_path, {"FABRIC_TOKEN_BUDGET": value})
    assert found == [
        f"token_budget: must be a valid integer (got {value!r} from FABRIC_TOKEN_BUDGET)"
    ]


def test_env_value_is_validated_like_a_file_value(tmp_path: Path) -> None:
    assert problems(tmp_path, {"FABRIC_TOKEN_BUDGET": "-5"}) == [
        "token_budget: must be greater than 0 (got -5 from FABRIC_TOKEN_BUDGET)"
    ]
    assert problems(tmp_path, {"FABRIC_STREAM": "a.b"})[0].startswith("stream: must ")


def test_lowercase_env_names_are_not_overrides(tmp_path: Path) -> None:
    assert load(tmp_path, {"fabric_token_budget": "1"}).token_budget == GOOD["token_budget"]


# --- hash, summary, secrets --------------------------------------------------------------


def test_config_hash_is_stable_and_sensitive() -> None:
    cfg = EngineConfig.model_validate(GOOD)
    digest = config_hash(cfg)
    assert len(digest) == 12 and int(digest, 16) >= 0
    assert config_hash(EngineConfig.model_validate(dict(reversed(GOOD.items())))) == digest
    assert config_hash(EngineConfig.model_validate({**GOOD, "low_water": 1023})) != digest
    # Credentials are part of the config: rotating them is a change worth seeing.
    with_creds = EngineConfig.model_validate({**GOOD, "nats_url": "nats://u:p@localhost:4222"})
    assert config_hash(with_creds) != digest


def test_summary_redacts_credentials() -> None:
    cfg = EngineConfig.model_validate(
        {**GOOD, "nats_url": "nats://user:s3cret@a:4222,tls://tok3n@b:4443,nats://c:4222"}
    )
    summary = cfg_summary(cfg)
    assert summary["nats_url"] == "nats://***@a:4222,tls://***@b:4443,nats://c:4222"
    assert "s3cret" not in repr(summary) and "tok3n" not in repr(summary)
    assert summary["config_hash"] == config_hash(cfg)
    assert {k: v for k, v in summary.items() if k not in ("nats_url", "config_hash")} == {
        k: v for k, v in GOOD.items() if k != "nats_url"
    }


def test_errors_do_not_leak_credentials(tmp_path: Path) -> None:
    message = only_problem(tmp_path, nats_url="http://user:s3cret@host:4222")
    assert "s3cret" not in message and "***@host" in message


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("nats://host:4222", "nats://host:4222"),
        ("nats://u:p@host", "nats://***@host"),
        ("nats://u:p@w@host/x", "nats://***@host/x"),
        ("nats://host/path@x", "nats://host/path@x"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted
