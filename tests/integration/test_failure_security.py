"""Issue test 7: TLS (verify on, client certificates) + authentication against a real
nats-server, with certificates made here. The worker runs as the least-privilege `worker`
user of deploy/nats/worker-permissions.conf -- the same file production uses -- and serves
jobs; without its password, its client certificate or the right CA it refuses to run
(exit 2, at once, not after the connect give-up), and no secret reaches its logs.
Token and NKey authentication are checked through the same connection code."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadgen.broker import EmbeddedNats
from loadgen.fleet import WorkerProcess, provision, worker_env, write_engine_toml
from schemas import Job
from worker.broker.connection import ConnectError, Security, connect

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"FABRIC_WORKER_PASSWORD": "w-Secret-4711", "FABRIC_PROVISIONER_PASSWORD": "p-Secret-0815",
             "FABRIC_PRODUCER_PASSWORD": "c-Secret-2342"}


def _key_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer_cert.subject if issuer_cert else name)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def make_pki(d: Path, tag: str = "") -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, as PEM files."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(f"fabric-test-ca{tag}", ca_key, ca=True)
    out: dict[str, Path] = {}
    for role, server in (("server", True), ("client", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"fabric-{role}", key, ca, ca_key, server=server)
        out[role] = d / f"{role}{tag}.pem"
        out[role].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[f"{role}_key"] = d / f"{role}{tag}-key.pem"
        out[f"{role}_key"].write_bytes(_key_pem(key))
    out["ca"] = d / f"ca{tag}.pem"
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    return out


def _q(p: Path) -> str:
    return '"' + str(p).replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture
def secure_broker(tmp_path: Path, monkeypatch):
    """nats-server with TLS verify on and the production accounts and permissions."""
    pki = make_pki(tmp_path)
    for k, v in PASSWORDS.items():
        monkeypatch.setenv(k, v)  # nats-server resolves $FABRIC_*_PASSWORD from its environment
    perms = (ROOT / "deploy/nats/worker-permissions.conf").read_text()
    conf = (f"tls {{\n  cert_file: {_q(pki['server'])}\n  key_file: {_q(pki['server_key'])}\n"
            f"  ca_file: {_q(pki['ca'])}\n  verify: true\n  timeout: 2\n}}\n{perms}")
    with EmbeddedNats(extra_config=conf) as server:
        yield server, pki


def _engine(tmp_path: Path, url: str) -> Path:
    # The stream and consumer names the permission file grants (FABRIC_JOBS, fabric-workers).
    return write_engine_toml(tmp_path / "engine.toml", {
        "nats_url": url.replace("nats://", "tls://"), "stream": "FABRIC_JOBS",
        "consumer": "fabric-workers", "model": "builtin:tiny", "device": "cpu",
        "dtype": "float32", "token_budget": 4096, "low_water": 2048, "max_seq_len": 1088})


def _tls_env(pki: dict[str, Path], user: str | None, password: str | None) -> dict[str, str]:
    env = {"FABRIC_TLS_CA": str(pki["ca"]), "FABRIC_TLS_CERT": str(pki["client"]),
           "FABRIC_TLS_KEY": str(pki["client_key"])}
    if user:
        env["FABRIC_NATS_USER"] = user
    if password:
        env["FABRIC_NATS_PASSWORD"] = password
    return env


def _run(cfg: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    base = {k: v for k, v in worker_env(env).items() if not k.startswith("FABRIC_") or k in env}
    return subprocess.run([sys.executable, "-m", "worker", "run", "--config", str(cfg),
                           "--connect-give-up-s", "20"],
                          env=base, capture_output=True, text=True, timeout=timeout)


async def test_tls_and_auth_worker_serves_with_credentials_and_refuses_without(
        secure_broker, tmp_path: Path) -> None:
    server, pki = secure_broker
    cfg = _engine(tmp_path, server.url)
    provision(cfg, env=_tls_env(pki, "provisioner", PASSWORDS["FABRIC_PROVISIONER_PASSWORD"]))

    w = WorkerProcess(cfg, worker_id="secure", log_path=tmp_path / "secure.log",
                      env=_tls_env(pki, "worker", PASSWORDS["FABRIC_WORKER_PASSWORD"])).start()
    try:
        w.wait_ready(120)
        producer = Security(user="producer", password=PASSWORDS["FABRIC_PRODUCER_PASSWORD"],
                            tls_ca=str(pki["ca"]), tls_cert=str(pki["client"]),
                            tls_key=str(pki["client_key"]))
        nc = await connect(server.url.replace("nats://", "tls://"), "producer", producer, 10)
        got: dict[str, object] = {}
        done = asyncio.Event()

        async def on_result(m) -> None:
            from schemas import decode_result
            r = decode_result(m.data)
            got[r.id] = r
            if len(got) == 5:
                done.set()

        await nc.subscribe("fabric.results.sec", cb=on_result)
        await nc.flush()
        js = nc.jetstream()
        for i in range(5):
            await js.publish("fabric.jobs.sec", __import__("schemas").encode(
                Job(id=f"sec-{i}", prompt=[1, 2, 3 + i], max_new_tokens=4,
                    reply_to="fabric.results.sec")))
        await asyncio.wait_for(done.wait(), 60)
        assert all(r.ok for r in got.values())
        # The producer may not pull jobs: least privilege holds for it too.
        import nats.errors
        import nats.js.errors
        with pytest.raises((nats.errors.TimeoutError, nats.js.errors.APIError)):
            sub = await js.pull_subscribe_bind("fabric-workers", stream="FABRIC_JOBS")
            await sub.fetch(1, timeout=2)
        await nc.close()
    finally:
        assert w.terminate(grace_s=10) == 0
    log = (tmp_path / "secure.log").read_text()
    assert '"auth": "user", "tls": true' in log
    for secret in PASSWORDS.values():
        assert secret not in log

    # Refusals: each exits 2 at once (the give-up is 20 s) and names the cause, no secret.
    wrong = make_pki(tmp_path, tag="-other")
    cases = {
        "no password": _tls_env(pki, "worker", None),
        "wrong password": _tls_env(pki, "worker", "not-" + PASSWORDS["FABRIC_WORKER_PASSWORD"]),
        "no client certificate": {"FABRIC_TLS_CA": str(pki["ca"]), "FABRIC_NATS_USER": "worker",
                                  "FABRIC_NATS_PASSWORD": PASSWORDS["FABRIC_WORKER_PASSWORD"]},
        "untrusted server": {**_tls_env(pki, "worker", PASSWORDS["FABRIC_WORKER_PASSWORD"]),
                             "FABRIC_TLS_CA": str(wrong["ca"])},
    }
    for case, env in cases.items():
        t0 = time.monotonic()
        p = _run(cfg, env)
        took = time.monotonic() - t0
        assert p.returncode == 2, (case, p.stderr[-2000:])
        assert "refused" in p.stderr or "cannot connect" in p.stderr, (case, p.stderr[-2000:])
        assert took < 15, (case, took)
        for secret in PASSWORDS.values():
            assert secret not in p.stderr + p.stdout, case


@pytest.fixture
def auth_broker(request, tmp_path: Path):
    with EmbeddedNats(extra_config=request.param) as server:
        yield server


TOKEN = "tok-9c1f0e7a"


@pytest.mark.parametrize("auth_broker", [f'authorization {{ token: "{TOKEN}" }}'], indirect=True)
async def test_token_auth(auth_broker) -> None:
    nc = await connect(auth_broker.url, "t", Security(token=TOKEN), 5)
    assert nc.is_connected
    await nc.close()
    with pytest.raises(ConnectError, match="refused") as e:
        await connect(auth_broker.url, "t", Security(token="wrong"), 20)
    assert TOKEN not in str(e.value)


def test_nkey_auth(tmp_path: Path) -> None:
    nkeys = pytest.importorskip("nkeys")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "worker.nk"
    seed_file.write_bytes(seed)
    with EmbeddedNats(extra_config=f"authorization {{ users = [ {{ nkey: {public} }} ] }}") as s:
        async def go() -> None:
            nc = await connect(s.url, "n", Security(nkey_seed_file=str(seed_file)), 5)
            assert nc.is_connected
            await nc.close()
            with pytest.raises(ConnectError, match="refused"):
                await connect(s.url, "n", Security(), 20)
        asyncio.run(go())
    assert Security(nkey_seed_file=str(seed_file)).describe() == {"auth": "nkey", "tls": False}
