"""The failure policy as plain functions, without a broker or a device: failpoint specs,
poison routing at ingress, subject coverage checks, and what the security options log."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from schemas import ErrorCode, Job, encode
from worker.ops import failpoints
from worker.broker.connection import Security, _refused
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.model.tokenizer import ByteTokenizer
from worker.broker.topology import _covers, _matches


def test_failpoint_specs_parse_several_actions_and_job_filters() -> None:
    pts = failpoints.parse("executor.step=sleep(0.5);executor.step=raise@40;"
                           "publisher.publish=exit(3):job=poison-;ingress.fetch=hang@2")
    step = pts["executor.step"]
    assert [(p.action, p.arg, p.after) for p in step] == [("sleep", 0.5, 1), ("raise", 0.0, 40)]
    assert pts["publisher.publish"][0].job_prefix == "poison-"
    assert pts["ingress.fetch"][0].after == 2
    with pytest.raises(ValueError, match="cannot parse"):
        failpoints.parse("executor.step=explode")


def test_job_filtered_failpoint_counts_only_matching_hits(monkeypatch) -> None:
    monkeypatch.setattr(failpoints, "_points", failpoints.parse("p=raise@2:job=bad-"))
    failpoints.hit("p", jobs=lambda: ["good-1"])
    failpoints.hit("p", jobs=lambda: ["good-1", "bad-7"])  # first counted hit: not yet
    failpoints.hit("p")  # a call site that reports no jobs never matches a filter
    with pytest.raises(failpoints.FailpointError, match="hit 2"):
        failpoints.hit("p", jobs=lambda: ["bad-7"])
    failpoints.hit("unarmed", jobs=lambda: pytest.fail("not evaluated when unarmed"))


@dataclass
class FakeMsg:
    data: bytes
    num_delivered: int
    subject: str = "fabric.jobs.x"

    @property
    def metadata(self):
        return SimpleNamespace(num_delivered=self.num_delivered, stream="S",
                               sequence=SimpleNamespace(stream=9))


def _validator(max_deliver: int) -> Validator:
    return Validator(Limits(vocab_size=256, max_seq_len=1088, budget_tokens=4096, block_size=16,
                            reply_prefix="fabric.results.", max_deliver=max_deliver),
                     ByteTokenizer())


def test_last_delivery_is_a_dead_letter_and_earlier_ones_run() -> None:
    job = encode(Job(id="j1", prompt=[1, 2, 3], max_new_tokens=4, reply_to="fabric.results.r"))
    v = _validator(max_deliver=5)
    [t] = v.check(FakeMsg(job, 4), time.monotonic())
    assert isinstance(t, Ticket)
    out = v.check(FakeMsg(job, 5), time.monotonic())
    assert isinstance(out, Outcome) and out.dead_letter and out.terminate
    assert out.error.code == ErrorCode.POISON and out.reply_to == "fabric.results.r"
    assert "max_deliver 5" in out.dead_letter
    # Undecodable at the last delivery: still a dead letter, nobody to answer.
    junk = v.check(FakeMsg(b"\xc1junk", 5), time.monotonic())
    assert junk.dead_letter and junk.reply_to is None
    # A forbidden reply subject is never answered, poison or not.
    evil = encode(Job(id="e", prompt=[1], max_new_tokens=1, reply_to="$JS.API.STREAM.DELETE.X"))
    assert v.check(FakeMsg(evil, 5), time.monotonic()).reply_to is None
    # max_deliver <= 0 (unlimited): never dead-lettered.
    [t] = _validator(max_deliver=-1).check(FakeMsg(job, 99), time.monotonic())
    assert isinstance(t, Ticket)


def test_subject_coverage() -> None:
    assert _covers("fabric.results.>", "fabric.results.")
    assert _covers(">", "fabric.results.")
    assert not _covers("fabric.results.*", "fabric.results.")  # one token only
    assert not _covers("fabric.results.>", "fabric.")
    assert _matches("fabric.dlq.>", "fabric.dlq.FABRIC_JOBS")
    assert _matches("fabric.*.FABRIC_JOBS", "fabric.dlq.FABRIC_JOBS")
    assert not _matches("fabric.dlq.>", "fabric.dlq")


def test_security_options_describe_without_secrets() -> None:
    env = {"FABRIC_NATS_USER": "worker", "FABRIC_NATS_PASSWORD": "hunter2",
           "FABRIC_TLS_CA": "/ca.pem"}
    s = Security.from_env(env, user=None, tls_ca="/other-ca.pem")
    assert s.user == "worker" and s.password == "hunter2" and s.tls_ca == "/other-ca.pem"
    assert s.describe() == {"auth": "user", "tls": True}
    assert "hunter2" not in repr(s.describe())
    assert Security(token="t0k").describe()["auth"] == "token"


def test_refusals_are_told_apart_from_outages() -> None:
    import ssl

    import nats.errors
    assert _refused(nats.errors.AuthorizationError())
    assert _refused(ssl.SSLCertVerificationError("bad"))
    assert _refused(ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED]"))
    assert not _refused(ConnectionRefusedError(111, "refused"))
    assert not _refused(ssl.SSLEOFError(8, "EOF"))
