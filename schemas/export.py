"""Writes the JSON Schema files that producers in other languages build against.

Rule: the files are generated from the pydantic models and never edited by hand;
`python -m schemas.export --check` exits 1 when a committed file differs from what the
models generate, so drift fails CI instead of reaching a producer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.models import Job, Result
from schemas.openai import BatchOutput, BatchRequest, ChatBody, CompletionBody, EmbeddingBody

SCHEMA_DIR = Path(__file__).resolve().parent
SCHEMAS: dict[str, type[BaseModel]] = {
    "job.schema.json": Job,
    "result.schema.json": Result,
    # The OpenAI Batch API's shapes: the line (its `body` one of the three by `url`), the
    # bodies, and the output line.
    "openai-batch-request.schema.json": BatchRequest,
    "openai-chat-body.schema.json": ChatBody,
    "openai-completion-body.schema.json": CompletionBody,
    "openai-embedding-body.schema.json": EmbeddingBody,
    "openai-batch-output.schema.json": BatchOutput,
}
# pydantic emits draft 2020-12; saying so lets validators pick the right dialect.
_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def render(model: type[BaseModel]) -> str:
    schema = {"$schema": _DIALECT, **model.model_json_schema()}
    return json.dumps(schema, sort_keys=True, indent=2) + "\n"


def stale_files(directory: Path = SCHEMA_DIR) -> list[Path]:
    """The schema files under `directory` that are missing or differ from the models."""
    stale = []
    for name, model in SCHEMAS.items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(model):
            stale.append(path)
    return stale


def write_all(directory: Path = SCHEMA_DIR) -> list[Path]:
    written = []
    for name, model in SCHEMAS.items():
        path = directory / name
        path.write_text(render(model), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m schemas.export", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a schema file is stale; write nothing"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path} (regenerate with python -m schemas.export)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_all():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
