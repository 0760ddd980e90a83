"""The wire contract between producers and workers: Job in, Result out, as msgpack maps.

Rule: everything that crosses the broker is one of these models, and decoding it raises
only DecodeError. JSON Schema files for producers in other languages are generated from
the models (`python -m schemas.export`) and a test fails when they drift.
"""

from schemas.codec import (
    DecodeError,
    decode_job,
    decode_result,
    encode,
    encode_completion,
    is_json,
)
from schemas.models import (
    ErrorCode,
    ErrorInfo,
    FinishReason,
    Job,
    Message,
    Result,
    Role,
    Sampling,
    Timing,
    TokenLogprob,
    Usage,
)

__all__ = [
    "DecodeError",
    "ErrorCode",
    "ErrorInfo",
    "FinishReason",
    "Job",
    "Message",
    "Result",
    "Role",
    "Sampling",
    "Timing",
    "TokenLogprob",
    "Usage",
    "decode_job",
    "decode_result",
    "encode",
    "encode_completion",
    "is_json",
]
