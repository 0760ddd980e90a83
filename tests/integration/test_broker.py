"""EmbeddedNats against the real binary: JetStream works, restart keeps the store,
and nothing it started outlives it."""

from __future__ import annotations

import gc
import os
import secrets
from pathlib import Path

import nats
import pytest

from loadgen.broker import EmbeddedNats


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_jetstream_publish_fetch_ack(nats_url: str) -> None:
    name = f"T_{secrets.token_hex(4)}"
    subject = f"broker.{name}"
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await js.add_stream(name=name, subjects=[f"{subject}.>"])
        ack = await js.publish(f"{subject}.a", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert ack.stream == name and ack.seq == 1
        # Same Msg-Id inside the duplicate window: stored once.
        dup = await js.publish(f"{subject}.a", b"hello", headers={"Nats-Msg-Id": "m1"})
        assert dup.duplicate

        psub = await js.pull_subscribe(f"{subject}.>", durable="c", stream=name)
        msgs = await psub.fetch(1, timeout=5)
        assert [m.data for m in msgs] == [b"hello"]
        await msgs[0].ack_sync()
        info = await js.consumer_info(name, "c")
        assert info.num_ack_pending == 0 and info.num_pending == 0
        await js.delete_stream(name)
    finally:
        await nc.close()


async def test_restart_keeps_stored_messages_on_the_same_url() -> None:
    with EmbeddedNats() as server:
        url, first_pid = server.url, server.pid
        nc = await nats.connect(url)
        try:
            await nc.jetstream().add_stream(name="KEEP", subjects=["keep.>"])
            for i in range(3):
                await nc.jetstream().publish("keep.x", str(i).encode())
        finally:
            await nc.close()

        server.restart()
        assert server.url == url and server.pid != first_pid
        assert not pid_alive(first_pid)

        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            assert (await js.stream_info("KEEP")).state.messages == 3
            psub = await js.pull_subscribe("keep.>", durable="k", stream="KEEP")
            msgs = await psub.fetch(3, timeout=5)
            assert [m.data for m in msgs] == [b"0", b"1", b"2"]
        finally:
            await nc.close()


async def test_kill_then_restart_recovers_the_store() -> None:
    with EmbeddedNats() as server:
        nc = await nats.connect(server.url)
        try:
            js = nc.jetstream()
            await js.add_stream(name="K9", subjects=["k9.>"])
            # The publish ack means the message is in the store before the SIGKILL.
            await js.publish("k9.x", b"survives")
        finally:
            await nc.close()
        pid = server.pid
        server.kill()
        assert not server.is_running() and not pid_alive(pid)
        server.restart()
        nc = await nats.connect(server.url)
        try:
            assert (await nc.jetstream().stream_info("K9")).state.messages == 1
        finally:
            await nc.close()


def test_stop_leaves_no_process_and_close_removes_owned_dirs() -> None:
    server = EmbeddedNats().start()
    pid, store = server.pid, server.store_dir
    assert pid is not None and pid_alive(pid)
    server.stop()
    assert server.pid is None and not pid_alive(pid)
    server.stop()  # idempotent
    assert store.exists()  # stop keeps the store: restart() needs it
    server.close()
    assert not store.exists()


def test_caller_store_dir_survives_close(tmp_path: Path) -> None:
    with EmbeddedNats(store_dir=tmp_path / "js") as server:
        assert server.store_dir == tmp_path / "js"
    assert (tmp_path / "js").exists()


def test_finalizer_reaps_a_forgotten_server() -> None:
    server = EmbeddedNats().start()
    pid = server.pid
    del server  # no stop(): the finalizer must kill it
    gc.collect()
    assert pid is not None and not pid_alive(pid)


async def test_extra_config_is_applied() -> None:
    # max_payload is visible in the INFO the server sends every client.
    with EmbeddedNats(extra_config="max_payload: 65536") as server:
        nc = await nats.connect(server.url)
        try:
            assert nc.max_payload == 65536
        finally:
            await nc.close()


def test_bad_config_fails_loudly() -> None:
    with pytest.raises(RuntimeError, match="did not start"):
        EmbeddedNats(extra_config="this is { not valid").start()
