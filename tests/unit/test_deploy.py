"""Deployment files are checked by the tools that consume them, offline, and against each other.

Rule: the Dockerfile, compose.yaml and everything under deploy/ pass the real linter, schema
or parser for their kind (hadolint, the Compose specification, Kubernetes' OpenAPI schemas,
deploy/schemas/crds.schema.json for the custom resources, `nats-server -t`, the worker's own
CLI parser and config loader); a live nats-server enforces the NATS permissions the way the
worker's code uses them; and the names that tie the files together (stream, consumer,
account, users, Secrets, grace periods, fleet size) agree. A rename fails here, not in a
cluster.

Every tool is a dev dependency and needs no network: check-jsonschema's builtin schemas and
kubernetes-validate's schemas ship inside those packages. A test skips, saying why, only when
its tool is not installed.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest

from worker.cli import build_parser
from worker.broker.topology import Topology

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
NATS_DIR = DEPLOY / "nats"
PERMISSIONS = NATS_DIR / "worker-permissions.conf"
CRD_SCHEMA = DEPLOY / "schemas" / "crds.schema.json"

ENGINE_FIELDS = {"nats_url", "stream", "consumer", "model", "device", "dtype",
                 "token_budget", "low_water", "max_seq_len"}
METRICS_PORT = 9400
CUSTOM_GROUPS = ("keda.sh", "jetstream.nats.io")  # validated by CRD_SCHEMA, not by Kubernetes'
K8S_VERSIONS = ["1.29.0", "latest"]  # the oldest cluster supported, and the newest schemas
# nats-server resolves these from its environment (worker-permissions.conf).
NATS_PASSWORD_ENV = {"FABRIC_WORKER_PASSWORD": "worker-pw",
                     "FABRIC_PROVISIONER_PASSWORD": "provisioner-pw",
                     "FABRIC_PRODUCER_PASSWORD": "producer-pw"}


# -- helpers --------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A dev tool on PATH, or beside this interpreter (a venv used without activation)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed (pip install -e '.[dev]')")
    return found


def _run(*cmd: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=None if env is None else {**os.environ, **env})


def _load(path: Path) -> Any:
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (pip install -e '.[dev]')")
    return yaml.safe_load(path.read_text())


def _manifests(custom: bool | None = None) -> list[Path]:
    """Resources under deploy/k8s (read as text: collection must not need pyyaml)."""
    is_custom = re.compile(r"^apiVersion: (%s)/" % "|".join(map(re.escape, CUSTOM_GROUPS)), re.M)
    paths = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    return [p for p in paths if custom is None or bool(is_custom.search(p.read_text())) == custom]


def _doc(rel: str) -> dict[str, Any]:
    return _load(K8S / rel)


def _pod(rel: str) -> dict[str, Any]:
    return _doc(rel)["spec"]["template"]["spec"]


def _container(rel: str) -> dict[str, Any]:
    [container] = _pod(rel)["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def _compose() -> dict[str, Any]:
    return _load(ROOT / "compose.yaml")["services"]


def _engine_texts() -> dict[str, str]:
    return {"compose": (DEPLOY / "engine.toml").read_text(),
            "k8s": _doc("worker/configmap.yaml")["data"]["engine.toml"]}


def _k8s_engine() -> dict[str, Any]:
    return tomllib.loads(_engine_texts()["k8s"])


def _topology() -> Topology:
    """The worker's own Topology for the deployed engine: its defaults are the contract."""
    engine = _k8s_engine()
    return Topology(jobs_stream=engine["stream"], consumer=engine["consumer"])


def _image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""


def _duration_s(text: str) -> int:
    """A Compose or Go duration ("45s", "1m30s") in seconds."""
    parts = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    assert parts and any(parts.groups()), f"not a duration: {text!r}"
    h, m, s = (int(g or 0) for g in parts.groups())
    return h * 3600 + m * 60 + s


def _permission_users() -> dict[str, str]:
    """user -> its block of worker-permissions.conf."""
    text = PERMISSIONS.read_text()
    starts = [(m.group(1), m.start()) for m in re.finditer(r"^\s*user:\s*(\w+)\s*$", text, re.M)]
    ends = [s for _, s in starts[1:]] + [len(text)]
    return {user: text[start:end] for (user, start), end in zip(starts, ends)}


def _allowed(block: str, direction: str) -> set[str]:
    body = re.search(direction + r":\s*{\s*allow:\s*\[(.*?)\]", block, re.S)
    assert body, f"no {direction} allow-list in:\n{block}"
    return set(re.findall(r'"([^"]+)"', body.group(1)))


# -- Dockerfile -----------------------------------------------------------------------


def test_dockerfile_is_lint_clean():
    out = _run(_tool("hadolint"), "--no-color", "--failure-threshold", "style", "Dockerfile")
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_runs_one_worker_as_non_root():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("pytorch/pytorch:") and "-cuda" in base and base.endswith("-runtime")
    assert re.search(r'^ENTRYPOINT \["fabric-worker"\]$', text, re.M)
    assert re.search(rf"^EXPOSE {METRICS_PORT}$", text, re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    uid = re.findall(r"^USER (\d+):\d+$", text, re.M)
    assert uid and uid[-1] != "0", "a numeric non-root USER, so Kubernetes can verify it"
    health = re.search(r"^HEALTHCHECK .*?\n(?=\S)", text, re.M | re.S).group(0)
    assert f"127.0.0.1:{METRICS_PORT}/healthz" in health and '"python"' in health
    assert "PYTHONUNBUFFERED=1" in text and "PYTHONDONTWRITEBYTECODE=1" in text
    assert "pip install --no-cache-dir" in text


def test_dockerignore_sends_only_what_pip_install_needs():
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "allow-list: nothing enters the build context unless named"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set(re.findall(r"^COPY (\S+?)/? ", (ROOT / "Dockerfile").read_text(), re.M))
    assert copied == allowed == {"pyproject.toml", "README.md", "worker", "schemas", "loadgen"}


# -- the worker's command lines -------------------------------------------------------


def test_every_worker_command_line_parses():
    """Each way the deploy files start fabric-worker is accepted by the real CLI parser."""
    dockerfile_cmd = json.loads(re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(),
                                          re.M).group(1))
    services = _compose()
    runs = {"Dockerfile CMD": dockerfile_cmd,
            "compose worker": services["worker"]["command"],
            "k8s worker": _container("worker/deployment.yaml")["args"]}
    provisions = {"compose provision": services["provision"]["command"],
                  "k8s provision": _container("provision/job.yaml")["args"]}
    for where, argv in {**runs, **provisions}.items():
        args = build_parser().parse_args(argv)
        assert args.config == "/etc/fabric/engine.toml", where
        assert args.cmd == ("run" if where in runs else "provision"), where
        if args.cmd == "run":
            assert args.metrics_port == METRICS_PORT, where
    k8s_provision = build_parser().parse_args(provisions["k8s provision"])
    assert k8s_provision.replicas == 3, "R3 streams on the 3-node cluster"


# -- compose --------------------------------------------------------------------------


def test_compose_matches_the_compose_specification():
    out = _run(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "compose.yaml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wires_nats_provision_worker_and_loadgen():
    services = _compose()
    assert set(services) == {"nats", "provision", "worker", "loadgen"}

    nats = services["nats"]
    assert _image_tag(nats["image"]) not in ("", "latest")
    assert "-js" in nats["command"] and "/etc/nats/nats.conf" in nats["command"]
    assert "./deploy/nats:/etc/nats:ro" in nats["volumes"]
    assert any(v.endswith(":/data") for v in nats["volumes"]), "JetStream store on a volume"
    assert any(p.endswith(":8222") for p in nats["ports"]), "monitoring port"
    assert "/healthz" in " ".join(nats["healthcheck"]["test"])
    assert set(NATS_PASSWORD_ENV) <= set(nats["environment"])
    # Same NATS everywhere, so compose rehearses what Kubernetes runs.
    assert nats["image"] == _container("nats/statefulset.yaml")["image"]

    engine_mount = "./deploy/engine.toml:/etc/fabric/engine.toml:ro"
    provision, worker, loadgen = services["provision"], services["worker"], services["loadgen"]
    assert provision["depends_on"]["nats"]["condition"] == "service_healthy"
    assert provision["environment"]["FABRIC_NATS_USER"] == "provisioner"
    assert engine_mount in provision["volumes"] and engine_mount in worker["volumes"]
    assert worker["depends_on"]["provision"]["condition"] == "service_completed_successfully"
    assert worker["environment"]["FABRIC_NATS_USER"] == "worker"
    [gpu] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert worker["stop_signal"] == "SIGTERM"
    assert "/readyz" in " ".join(worker["healthcheck"]["test"])
    assert loadgen["profiles"] == ["loadgen"] and loadgen["entrypoint"] == ["fabric-loadgen"]
    assert "nats://producer:" in " ".join(loadgen["command"]), "loadgen publishes as producer"


# -- Kubernetes -----------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", _manifests(custom=False), ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_matches_the_kubernetes_schema(path: Path, version: str):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    yaml = pytest.importorskip("yaml", reason="pyyaml is not installed (pip install -e '.[dev]')")
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, "one resource per file"
    try:
        kv.validate(docs[0], kv.latest_version() if version == "latest" else version, strict=True)
    except kv.ValidationError as e:
        pytest.fail(f"{path.relative_to(ROOT)} at {'/'.join(map(str, e.path))}: {e.message}")
    except kv.SchemaNotFoundError as e:
        pytest.fail(e.message)


def test_custom_resources_match_their_schema():
    custom = _manifests(custom=True)
    assert {(d["apiVersion"], d["kind"]) for d in map(_load, custom)} == {
        ("keda.sh/v1alpha1", "ScaledObject"), ("jetstream.nats.io/v1beta2", "Account"),
        ("jetstream.nats.io/v1beta2", "Stream"), ("jetstream.nats.io/v1beta2", "Consumer"),
        ("jetstream.nats.io/v1beta2", "KeyValue")}
    out = _run(_tool("check-jsonschema"), "--schemafile", str(CRD_SCHEMA), *map(str, custom))
    assert out.returncode == 0, out.stdout + out.stderr


def test_custom_resource_schema_rejects_a_typo():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    doc = _doc("worker/scaledobject.yaml")
    meta = doc["spec"]["triggers"][0]["metadata"]
    meta["lagTreshold"] = meta.pop("lagThreshold")
    validator = jsonschema.Draft202012Validator(json.loads(CRD_SCHEMA.read_text()))
    assert any("lagTreshold" in e.message for e in validator.iter_errors(doc))


def test_kustomizations_cover_every_manifest_once():
    listed = [(kfile.parent / rel).resolve()
              for kfile in K8S.rglob("kustomization.yaml") for rel in _load(kfile)["resources"]]
    # A listed folder is a kustomization of its own (its files are listed there).
    folders = [p for p in listed if p.is_dir()]
    assert all((p / "kustomization.yaml").exists() for p in folders)
    files = [p for p in listed if not p.is_dir()]
    assert sorted(files) == sorted(p.resolve() for p in _manifests())


def test_k8s_resources_live_in_one_namespace():
    for path in _manifests():
        doc = _load(path)
        namespace = doc["metadata"]["name" if doc["kind"] == "Namespace" else "namespace"]
        assert namespace == "fabric", path


def test_k8s_worker_pod_contract():
    pod = _pod("worker/deployment.yaml")
    [c] = pod["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    probes = {name: (c[name]["httpGet"]["path"], ports[c[name]["httpGet"]["port"]])
              for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": ("/healthz", METRICS_PORT),
                      "livenessProbe": ("/healthz", METRICS_PORT),
                      "readinessProbe": ("/readyz", METRICS_PORT)}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), "writable /tmp"
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/etc/fabric")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert mount["readOnly"] is True
    assert volume["configMap"] == {"name": "fabric-engine",
                                   "items": [{"key": "engine.toml", "path": "engine.toml"}]}
    env = _env(c)
    assert env["FABRIC_NATS_PASSWORD"]["secretKeyRef"] == {"name": "fabric-nats-worker",
                                                          "key": "password"}
    assert "$(POD_NAME)" in c["args"] and "POD_NAME" in env


def test_provision_job_uses_the_worker_image_and_config():
    job = _pod("provision/job.yaml")
    [c] = job["containers"]
    assert c["image"] == _container("worker/deployment.yaml")["image"]
    assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), "provisioning needs no GPU"
    assert _env(c)["FABRIC_NATS_USER"] == "provisioner"
    assert any(v.get("configMap", {}).get("name") == "fabric-engine" for v in job["volumes"])


def test_nats_cluster_has_three_routed_nodes():
    sts = _doc("nats/statefulset.yaml")
    headless = _doc("nats/service-headless.yaml")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "nats-headless"
    assert headless["metadata"]["name"] == "nats-headless"
    assert headless["spec"]["clusterIP"] == "None"
    routes = re.findall(r"nats://(nats-\d)\.nats-headless:6222",
                        (NATS_DIR / "nats-cluster.conf").read_text())
    assert routes == ["nats-0", "nats-1", "nats-2"]
    assert _doc("nats/pdb.yaml")["spec"]["maxUnavailable"] == 1, "keep a 2-of-3 quorum"


# -- NATS configuration and permissions -----------------------------------------------


@pytest.mark.parametrize("conf", ["nats.conf", "nats-cluster.conf"])
def test_nats_server_accepts_the_config(conf: str):
    out = _run(_tool("nats-server"), "-t", "-c", str(NATS_DIR / conf),
               env={**NATS_PASSWORD_ENV, "POD_NAME": "nats-0"})
    assert out.returncode == 0 and "is valid" in out.stdout + out.stderr, out.stdout + out.stderr


def test_k8s_nats_configmap_is_the_nats_files_verbatim():
    data = _doc("nats/configmap.yaml")["data"]
    for key, source in (("nats.conf", "nats-cluster.conf"),
                        ("worker-permissions.conf", "worker-permissions.conf")):
        assert data[key] == (NATS_DIR / source).read_text(), (
            f"copy deploy/nats/{source} into data[{key!r}] of deploy/k8s/nats/configmap.yaml")


def test_every_nats_password_comes_from_a_secret():
    env = _env(_container("nats/statefulset.yaml"))
    referenced = set(re.findall(r"\$(FABRIC_\w+_PASSWORD)", PERMISSIONS.read_text()))
    assert referenced == set(NATS_PASSWORD_ENV)
    for var in referenced:
        role = var.removeprefix("FABRIC_").removesuffix("_PASSWORD").lower()
        assert env[var]["secretKeyRef"] == {"name": f"fabric-nats-{role}", "key": "password"}
    assert _doc("nack/account.yaml")["spec"]["user"]["secret"]["name"] == "fabric-nats-provisioner"


def test_worker_permissions_are_least_privilege():
    topo = _topology()
    stream = topo.jobs_stream
    users = _permission_users()
    assert set(users) == {"worker", "provisioner", "producer"}
    assert _allowed(users["worker"], "publish") == {
        "$JS.API.INFO",
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.STREAM.INFO.{topo.results_stream}",
        f"$JS.API.STREAM.INFO.{topo.dlq_stream}",
        # Every consumer of the jobs stream: one per priority and per session partition.
        f"$JS.API.CONSUMER.INFO.{stream}.*",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.*",
        f"$JS.ACK.{stream}.>",
        # The members bucket: its own entry (put, purge on leaving), the list (stream info),
        # the others' entries and the leader's owners (get: direct, or through the API).
        f"$JS.API.STREAM.INFO.KV_{topo.members_bucket}",
        f"$JS.API.STREAM.PURGE.KV_{topo.members_bucket}",
        f"$JS.API.DIRECT.GET.KV_{topo.members_bucket}.>",
        f"$JS.API.STREAM.MSG.GET.KV_{topo.members_bucket}",
        f"$KV.{topo.members_bucket}.>",
        f"{topo.results_prefix}>",
        f"{topo.dlq_prefix}>",
        # The cancels the broker kept, read once at start through an ephemeral consumer of
        # that stream alone (it may delete only consumers there: its own, when done).
        f"$JS.API.STREAM.INFO.{topo.cancels_stream}",
        f"$JS.API.CONSUMER.CREATE.{topo.cancels_stream}",
        f"$JS.API.CONSUMER.CREATE.{topo.cancels_stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{topo.cancels_stream}.>",
        f"$JS.API.CONSUMER.DELETE.{topo.cancels_stream}.>",
    }
    # Cancels: every worker hears them, and may answer one sent as a request (only that).
    # and the members' puts (a joiner is heard at once, not at the next refresh).
    assert _allowed(users["worker"], "subscribe") == {"_INBOX.>", "fabric.cancel",
                                                      f"$KV.{topo.members_bucket}.>"}
    assert "allow_responses: true" in users["worker"]
    provisioner = _allowed(users["provisioner"], "publish")
    assert not any(".DELETE" in subject for subject in provisioner)
    for name in (stream, topo.results_stream, topo.dlq_stream, topo.cancels_stream):
        assert {f"$JS.API.STREAM.CREATE.{name}", f"$JS.API.STREAM.UPDATE.{name}"} <= provisioner
    assert {f"$JS.API.STREAM.CREATE.KV_{topo.members_bucket}",
            f"$JS.API.CONSUMER.CREATE.{stream}.*"} <= provisioner
    assert {"fabric.jobs.>", "fabric.prio.>", "fabric.session.>",
            "fabric.cancel"} <= _allowed(users["producer"], "publish")
    assert _allowed(users["producer"], "subscribe") == {f"{topo.results_prefix}>", "_INBOX.>"}
    for rel in ("worker/deployment.yaml", "provision/job.yaml"):
        assert _env(_container(rel))["FABRIC_NATS_USER"] in users


async def test_live_nats_server_enforces_the_permissions(tmp_path: Path):
    """The compose nats.conf on a real server, driven through the worker's own code paths."""
    nats = pytest.importorskip("nats", reason="nats-py is not installed")
    from worker.broker.members import Membership
    from worker.broker.topology import provision, verify
    from worker.features.cancels import Cancels

    port, http_port = _free_port(), _free_port()
    conf = (NATS_DIR / "nats.conf").read_text()
    for old, new in (("store_dir: /data", f"store_dir: {tmp_path / 'js'}"),
                     ("listen: 0.0.0.0:4222", f"listen: 127.0.0.1:{port}"),
                     ("http: 0.0.0.0:8222", f"http: 127.0.0.1:{http_port}")):
        assert old in conf
        conf = conf.replace(old, new)
    (tmp_path / "nats.conf").write_text(conf)
    shutil.copy(PERMISSIONS, tmp_path)
    proc = subprocess.Popen([_tool("nats-server"), "-c", str(tmp_path / "nats.conf")],
                            env={**os.environ, **NATS_PASSWORD_ENV},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    violations: list[str] = []

    async def on_error(e: Exception) -> None:
        violations.append(str(e).lower())

    async def login(user: str) -> Any:
        return await nats.connect(f"nats://127.0.0.1:{port}", user=user,
                                  password=NATS_PASSWORD_ENV[f"FABRIC_{user.upper()}_PASSWORD"],
                                  error_cb=on_error, allow_reconnect=False)

    async def denied(nc: Any, subject: str) -> None:
        with pytest.raises((nats.errors.TimeoutError, nats.errors.NoRespondersError)):
            await nc.request(subject, b"{}", timeout=0.5)

    try:
        _wait_for_port(port, proc)
        topo = _topology()
        prov, producer, worker = [await login(u) for u in ("provisioner", "producer", "worker")]
        try:
            await provision(prov.jetstream(), topo)
            await provision(prov.jetstream(), topo)  # again: the update path

            results = await producer.subscribe(f"{topo.results_prefix}run1.>")
            await producer.jetstream().publish("fabric.jobs.run1", b"job-1",
                                               headers={"Nats-Msg-Id": "job-1"})
            await producer.publish(topo.cancel_subject, b'{"ids": ["job-9"]}')
            await producer.flush()
            js = worker.jetstream()
            assert (await verify(js, topo)).cancels_kept
            # A worker starting now reads the cancels the broker kept, with its own rights.
            cancels = Cancels(held=None, stats=None, worker_id="w", answer=None, end=None,
                              room_changed=None)
            assert await cancels.replay(js, topo.cancels_stream, topo.cancel_subject) == 1
            assert "job-9" in cancels.remembered
            sub = await js.pull_subscribe_bind(durable=topo.consumer, stream=topo.jobs_stream)
            [msg] = await sub.fetch(1, timeout=2)
            await msg.in_progress()
            await js.publish(f"{topo.results_prefix}run1.job-1", b"result-1",
                             headers={"Nats-Msg-Id": "job-1"})
            await js.publish(f"{topo.dlq_prefix}run1", b"dead-letter")
            await msg.ack_sync()
            assert (await results.next_msg(timeout=2)).data == b"result-1"
            info = await js.consumer_info(topo.jobs_stream, topo.consumer)
            assert (info.num_pending, info.num_ack_pending) == (0, 0)
            # Priorities and sessions: the producer may publish to their subjects, the
            # worker pull from their consumers and keep its entry in the members bucket.
            await producer.jetstream().publish("fabric.prio.0.run1", b"urgent")
            await producer.jetstream().publish("fabric.session.5.chat-1", b"turn")
            verified = await verify(js, topo)
            # Ten priorities, and three classes of priorities per session partition.
            assert len(verified.queues) == 10 + 3 * topo.partitions and verified.members
            m = Membership(worker, js, topo, "w-1", topo.partitions, on_change=lambda o: None)
            await m.join()
            assert m.members == ("w-1",) and m.owned == frozenset(range(topo.partitions))
            # A second member: the leader (w-1) reads both entries and writes the owners,
            # which the other reads back.
            m2 = Membership(worker, js, topo, "w-2", topo.partitions, on_change=lambda o: None)
            await m2.join()
            await m.refresh()
            await m2.refresh()
            assert m.owned and m2.owned and not m.owned & m2.owned
            assert m.owned | m2.owned == frozenset(range(topo.partitions))
            await m2.leave()
            urgent = await js.pull_subscribe_bind(durable=f"{topo.consumer}-p0",
                                                  stream=topo.jobs_stream)
            [msg] = await urgent.fetch(1, timeout=2)
            assert msg.data == b"urgent"
            await msg.ack_sync()
            await m.leave()
            assert await m.read() == ()
            assert violations == []

            await asyncio.gather(
                denied(worker, f"$JS.API.STREAM.CREATE.{topo.jobs_stream}"),
                denied(worker, f"$JS.API.STREAM.DELETE.{topo.jobs_stream}"),
                denied(worker, f"$JS.API.CONSUMER.DELETE.{topo.jobs_stream}.{topo.consumer}"),
                denied(worker, "fabric.jobs.run1"),
                denied(prov, f"$JS.API.STREAM.DELETE.{topo.jobs_stream}"),
                denied(producer, f"$JS.API.CONSUMER.MSG.NEXT.{topo.jobs_stream}.{topo.consumer}"),
            )
            await asyncio.sleep(0.1)
            assert len(violations) == 6 and all("permissions violation" in v for v in violations)
        finally:
            for nc in (prov, producer, worker):
                await nc.close()
    finally:
        proc.terminate()
        log = proc.communicate(timeout=10)[0].decode()
    assert log.count("Publish Violation") == 6, log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nats-server exited: {proc.communicate()[0].decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("nats-server did not start listening")


# -- consistency ----------------------------------------------------------------------


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_engine_config_has_exactly_the_nine_fields(where: str, tmp_path: Path):
    from worker.config import load_config
    text = _engine_texts()[where]
    engine = tomllib.loads(text)
    assert set(engine) == ENGINE_FIELDS
    assert engine["low_water"] < engine["token_budget"]
    assert engine["max_seq_len"] <= engine["token_budget"]
    assert engine["device"] == "cuda:0", "each container sees exactly one GPU"
    # And the worker's own loader accepts it, with no FABRIC_* overrides in play.
    (tmp_path / "engine.toml").write_text(text)
    load_config(tmp_path / "engine.toml", environ={})


def test_compose_and_k8s_engines_share_the_topology():
    compose, k8s = (tomllib.loads(t) for t in _engine_texts().values())
    assert (compose["stream"], compose["consumer"]) == (k8s["stream"], k8s["consumer"])


def test_grace_periods_outlast_the_drain():
    drain_s = build_parser().parse_args(["run", "--config", "x"]).grace_s
    assert drain_s == 30
    assert _duration_s(_compose()["worker"]["stop_grace_period"]) > drain_s
    assert _pod("worker/deployment.yaml")["terminationGracePeriodSeconds"] > drain_s


def test_keda_scales_on_the_engines_consumer():
    topo = _topology()
    so = _doc("worker/scaledobject.yaml")["spec"]
    [trigger] = so["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "nats-jetstream"
    assert (meta["stream"], meta["consumer"]) == (topo.jobs_stream, topo.consumer)
    assert re.search(rf"^accounts {{\n  {meta['account']} {{", PERMISSIONS.read_text(), re.M)
    # Headless: in a cluster KEDA reaches the consumer leader as <server_name>.<endpoint>.
    assert meta["natsServerMonitoringEndpoint"] == "nats-headless.fabric.svc.cluster.local:8222"
    assert so["scaleTargetRef"]["name"] == _doc("worker/deployment.yaml")["metadata"]["name"]
    assert 1 <= so["minReplicaCount"] < so["maxReplicaCount"]


def test_nack_resources_describe_the_workers_topology():
    topo = _topology()
    consumer = _doc("nack/consumer-workers.yaml")["spec"]
    assert (consumer["streamName"], consumer["durableName"]) == (topo.jobs_stream, topo.consumer)
    assert consumer["ackPolicy"] == "explicit" and "deliverSubject" not in consumer
    assert _duration_s(consumer["ackWait"]) == topo.ack_wait_s
    assert consumer["maxDeliver"] == topo.max_deliver
    streams = {d["spec"]["name"]: d["spec"] for d in map(_doc, (
        "nack/stream-jobs.yaml", "nack/stream-results.yaml", "nack/stream-dlq.yaml",
        "nack/stream-cancels.yaml"))}
    # The subjects and the session partitions' transform are what `provision` makes.
    made = {sc.name: sc for sc in topo.stream_configs()}
    assert {name: s["subjects"] for name, s in streams.items()} == {
        name: list(sc.subjects) for name, sc in made.items()}
    tr = made[topo.jobs_stream].subject_transform
    assert streams[topo.jobs_stream]["subjectTransform"] == {"source": tr.src, "dest": tr.dest}
    cancels = streams[topo.cancels_stream]
    assert cancels["noAck"] and _duration_s(cancels["maxAge"]) == topo.duplicate_window_s
    assert consumer["filterSubjects"] == list(topo.queues()[0].subjects)
    for spec in [*streams.values(), consumer]:
        assert spec["replicas"] == 3 and spec["account"] == "fabric" and spec["preventDelete"]
    assert all(s["retention"] == "limits" and s["storage"] == "file" for s in streams.values())
    # Every server holds a replica of every R3 stream: together they must fit its store.
    store = re.search(r"max_file_store:\s*(\d+)GB", (NATS_DIR / "nats-cluster.conf").read_text())
    assert sum(s["maxBytes"] for s in streams.values()) <= int(store.group(1)) * 10**9


def test_nack_makes_every_queue_and_the_members_bucket():
    """The generated NACK resources are current and are the queues `provision` makes: the
    same consumers, filters and priority groups, and the same members bucket."""
    from worker.broker import nack
    assert nack.stale_files() == [], "regenerate with `python -m worker.broker.nack`"
    assert nack.main(["--check"]) == 0
    topo = _topology()
    assert (nack.DEPLOYED.jobs_stream, nack.DEPLOYED.consumer) == (topo.jobs_stream,
                                                                  topo.consumer)
    kust = _doc("nack/kustomization.yaml")["resources"]
    assert all((K8S / "nack" / r).exists() for r in kust)
    assert {nack.QUEUES_DIR, nack.MEMBERS_FILE} <= set(kust)
    listed = _doc(f"nack/{nack.QUEUES_DIR}/kustomization.yaml")["resources"]
    specs = {d["spec"]["durableName"]: d["spec"]
             for d in (_doc(f"nack/{nack.QUEUES_DIR}/{r}") for r in listed)}
    queues = topo.queues()[1:]
    assert list(specs) == [q.consumer for q in queues]
    default = _doc("nack/consumer-workers.yaml")["spec"]
    for q in queues:
        spec = specs[q.consumer]
        assert spec["filterSubjects"] == list(q.subjects)
        assert (spec.get("priorityGroups"), spec.get("priorityPolicy")) == (
            ([q.group], "overflow") if q.group else (None, None))
        want = topo.consumer_config(q)
        assert (_duration_s(spec["ackWait"]), spec["maxDeliver"]) == (
            want["ack_wait"] / 1e9, want["max_deliver"])
        for key in ("ackPolicy", "maxAckPending", "replicas", "account", "streamName"):
            assert spec[key] == default[key], key
    kv = _doc("nack/keyvalue-members.yaml")["spec"]
    assert (kv["bucket"], _duration_s(kv["ttl"]), kv["history"]) == (
        topo.members_bucket, topo.member_ttl_s, 1)


def test_fleet_fits_under_max_ack_pending():
    """maxReplicaCount workers, each holding its whole budget in the smallest jobs, fit."""
    from worker.engine.lanes import LANE_MIN_WIDTH  # the KV block size: the smallest padded job
    most_held_per_worker = _k8s_engine()["token_budget"] // LANE_MIN_WIDTH
    fleet = _doc("worker/scaledobject.yaml")["spec"]["maxReplicaCount"] * most_held_per_worker
    job = build_parser().parse_args(_container("provision/job.yaml")["args"])
    assert fleet <= job.max_ack_pending
    assert fleet <= _doc("nack/consumer-workers.yaml")["spec"]["maxAckPending"]
