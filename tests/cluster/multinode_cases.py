"""A real three-raylet Ray cluster on 127.0.0.1 (``ray.cluster_utils.Cluster``: a head and two
worker nodes), jobs submitted through the head's job API, and failures injected while they run.

Run only in its own process (``tests/cluster/test_multinode.py`` starts it with pytest in a
subprocess), never next to the session's shared local Ray. The file name keeps the main
pytest run from collecting it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: loopback only

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

from pipeline.sink import committed_parts  # noqa: E402
from tests.conftest import _save_tiny_bert  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
ROWS = 2400
FILES = 12
DIM = 32
# Every custom resource is on at least two nodes: losing one worker leaves each stage a place.
HEAD_RESOURCES = {"io_slot": 4}
WORKER_RESOURCES = {"io_slot": 4, "encode_slot": 2}
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _add_worker(cluster):
    # Nodes on one machine share the session folder. Each real node has its own disk, so each
    # gets its own runtime_env folder here: otherwise a worker node unpacking the job's
    # working_dir replaces the folder that is the driver's cwd on the head.
    cluster.worker_count = getattr(cluster, "worker_count", 0) + 1
    return cluster.add_node(
        num_cpus=2,
        resources=WORKER_RESOURCES,
        dashboard_agent_listen_port=_free_port(),
        runtime_env_dir_name=f"runtime_resources_worker{cluster.worker_count}",
    )


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "resources": HEAD_RESOURCES,
            "include_dashboard": True,
            # Every node's agent gets its own port: they all default to 52365, and the job API
            # needs the head's agent.
            "dashboard_port": _free_port(),
            "dashboard_agent_listen_port": _free_port(),
            # Notice a dead node in ~3 s instead of the default ~30 s.
            "_system_config": {
                "health_check_initial_delay_ms": 1000,
                "health_check_period_ms": 1000,
                "health_check_failure_threshold": 3,
            },
        },
    )
    c.workers = [_add_worker(c) for _ in range(2)]
    c.wait_for_nodes()
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def client(cluster):
    from ray.job_submission import JobSubmissionClient

    url = cluster.head_node.address_info["webui_url"]
    assert url.split(":")[0] == "127.0.0.1", url
    return JobSubmissionClient(f"http://{url}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over a lazy dog while red cups of coffee cool on the table".split()
    rng = np.random.default_rng(0)
    texts = {f"doc-{i:05d}": " ".join(rng.choice(words, size=int(rng.integers(5, 60)))) for i in range(ROWS)}
    ids = list(texts)
    for f in range(FILES):
        with open(folder / f"part{f:02d}.jsonl", "w") as out:
            for i in ids[f::FILES]:
                out.write(json.dumps({"id": i, "text": texts[i]}) + "\n")
    return folder, texts


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    _save_tiny_bert(folder)
    return folder


def _config(tmp: Path, name: str, corpus: Path, model: Path) -> tuple[Path, Path]:
    out = tmp / name / "out"
    config = {
        "sources": [{"path": str(corpus), "id_column": "id"}],
        "encoders": [
            {
                "output": "text",
                "column": "text",
                "model": str(model),
                "precision": "fp32",  # compared with an fp32 AutoModel reference within 1e-5
                "resources": {
                    "cpus": 0.5,
                    "pool": [1, 2],
                    "threads": 1,
                    "batch_rows": 100,
                    "resources": {"encode_slot": 1},
                },
            }
        ],
        "resources": {
            "prepare": {"cpus": 0.25, "resources": {"io_slot": 1}},
            "write": {"cpus": 0.25, "resources": {"io_slot": 1}},
        },
        # Commits flushed at once; a lease fresh for 90 s, so the refused re-run below is certain.
        "output": {"path": str(out), "rows_per_file": 100, "commit_seconds": 0, "lease_seconds": 30},
    }
    path = tmp / name / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path, out


def _submit(client, config: Path, *flags: str) -> str:
    deadline = time.time() + 60
    while True:
        try:
            return client.submit_job(
                # This machine's `python` is not the venv's; on a cluster it is the nodes' own.
                entrypoint=" ".join([sys.executable, "-m", "jobs.embed", "--config", str(config), *flags]),
                runtime_env={
                    "working_dir": str(ROOT),
                    "excludes": [".git", ".venv", "**/__pycache__", "examples/out", "*.egg-info", "benchmarks"],
                    "env_vars": {"HF_HUB_OFFLINE": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
                },
            )
        except RuntimeError as exc:  # the head's job agent registers a few seconds after start
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(1)


def _wait(client, job: str, timeout: float = 240) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = str(client.get_job_status(job).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job} still running after {timeout}s:\n{client.get_job_logs(job)[-3000:]}")


def _manifest(out: Path) -> dict | None:
    try:
        return json.loads((out / "_manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _wait_for_parts(client, job: str, out: Path, parts: int, rows: int = 0) -> dict:
    """Block until the running job has committed ``parts`` part files and ``rows`` rows (and is
    not done)."""
    deadline = time.time() + 180
    while time.time() < deadline:
        manifest, committed = _manifest(out), committed_parts(str(out))
        if manifest and committed and len(committed) >= parts and sum(p["rows"] for p in committed) >= rows:
            assert manifest["status"] == "running", "the job finished before the failure could be injected"
            return manifest
        assert str(client.get_job_status(job).value) not in TERMINAL, client.get_job_logs(job)[-3000:]
        time.sleep(0.05)
    raise AssertionError("no part committed in time")


def _read(out: Path, texts: dict[str, str]) -> dict[str, np.ndarray]:
    """The output against the contract; returns id -> vector."""
    manifest = _manifest(out)
    assert manifest["status"] == "complete", manifest["status"]
    assert manifest["rows"] == manifest["input_rows"] == len(texts)
    listed = sorted(f["name"] for f in manifest["files"])
    on_disk = sorted(p.name for p in out.iterdir() if p.name != "_manifest.json")
    assert on_disk == listed, "a part file the manifest does not list (partial or duplicate)"
    assert not (out.parent / ".out.omniembed-staging").exists()
    table = pq.read_table([str(out / n) for n in listed])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(texts) and set(ids) == set(texts), "every id exactly once"
    assert table.column("text_error").null_count == table.num_rows
    vectors = table.column("text_embedding").to_pylist()
    assert all(v is not None and len(v) == DIM for v in vectors)
    meta = json.loads(table.schema.metadata[b"omniembed"])
    assert meta["encoders"]["text"]["dim"] == DIM
    return {i: np.asarray(v, dtype=np.float32) for i, v in zip(ids, vectors)}


def _assert_same(got: dict[str, np.ndarray], clean: dict[str, np.ndarray]) -> None:
    assert got.keys() == clean.keys()
    worst = max(float(np.abs(got[i] - clean[i]).max()) for i in clean)
    assert worst <= 1e-5, worst


def _encoder_nodes(cluster) -> set[str]:
    """Nodes with an alive encoder actor, from the cluster's state API."""
    from ray.util.state import list_actors

    # An explicit address: "auto" may find another Ray on this machine.
    return {
        a.node_id
        for a in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")], limit=10_000, detail=True)
        if "MapBatches(Encode[" in a.class_name and a.node_id
    }


def _driver_pids(config: Path) -> list[int]:
    """The job's entrypoint processes (python -m jobs.embed --config <config>)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"jobs.embed" in argv and str(config).encode() in argv and b"python" in argv[0]:
            pids.append(int(entry.name))
    return pids


@pytest.fixture(scope="module")
def clean_run(cluster, client, corpus, model, tmp_path_factory):
    folder, texts = corpus
    config, out = _config(tmp_path_factory.mktemp("clean"), "clean", folder, model)
    job = _submit(client, config)
    status = _wait(client, job)
    logs = client.get_job_logs(job)
    assert status == "SUCCEEDED", logs[-4000:]
    return _read(out, texts), logs


def test_job_output_meets_the_contract(clean_run, corpus, model):
    vectors, logs = clean_run
    _, texts = corpus
    # A reference computed outside omniembed: AutoModel, one unpadded sequence at a time, mean pooling.
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, bert = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()
    for i in sorted(texts)[::97]:
        tokens = tokenizer(texts[i], truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            expected = bert(**tokens).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(vectors[i], expected, atol=1e-5)
    assert "complete" in logs  # the final summary tells the outcome


def test_stages_spread_over_the_nodes(cluster, clean_run):
    """Encoder actors ran on the worker nodes only (encode_slot); the clean run's tasks and
    actors together used more than one node."""
    from ray.util.state import list_actors, list_tasks

    workers = {w.node_id for w in cluster.workers}
    placed = [
        a.node_id
        for a in list_actors(address=cluster.address, limit=10_000, detail=True)
        if "MapBatches(Encode[" in a.class_name and a.node_id
    ]
    assert placed and set(placed) <= workers
    tasks = {
        t.node_id
        for t in list_tasks(address=cluster.address, limit=10_000, detail=True)
        if t.node_id and any(n in t.name for n in ("MapBatches(Write)", "MapBatches(Prepare[", "MapBatches(Read)"))
    }
    assert len(tasks | set(placed)) >= 2


def test_worker_loss(cluster, client, corpus, model, clean_run, tmp_path_factory):
    folder, texts = corpus
    config, out = _config(tmp_path_factory.mktemp("worker-loss"), "worker-loss", folder, model)
    job = _submit(client, config)
    _wait_for_parts(client, job, out, 2)
    # The victim is a worker node that runs one of this job's encoder actors right now.
    busy = _encoder_nodes(cluster)
    index = next(i for i, w in enumerate(cluster.workers) if w.node_id in busy)
    victim = cluster.workers[index]
    os.kill(victim.all_processes["raylet"][0].process.pid, signal.SIGKILL)
    assert _manifest(out)["status"] == "running"
    status = _wait(client, job)
    assert status == "SUCCEEDED", client.get_job_logs(job)[-4000:]
    _assert_same(_read(out, texts), clean_run[0])
    from ray.util.state import list_nodes

    dead = {n.node_id for n in list_nodes(address=cluster.address, limit=100) if n.state == "DEAD"}
    assert victim.node_id in dead  # the job really lost a node while running
    # Put the node count back for the next case.
    cluster.workers[index] = _add_worker(cluster)


def test_driver_loss_then_rerun(cluster, client, corpus, model, clean_run, tmp_path_factory):
    """The driver killed at about 75% of the run: the re-run finds at least half the rows
    committed, by read chunk, and ends with every id exactly once."""
    folder, texts = corpus
    config, out = _config(tmp_path_factory.mktemp("driver-loss"), "driver-loss", folder, model)
    job = _submit(client, config)
    _wait_for_parts(client, job, out, 1, rows=ROWS * 3 // 4)
    pids = _driver_pids(config)
    assert pids, "driver process not found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    assert _wait(client, job) == "FAILED"
    killed, killed_parts = _manifest(out), committed_parts(str(out))
    assert killed["status"] == "running" and killed_parts, "a killed run looks incomplete"
    # A dry run plans the resume without writing: at least half the rows are already committed.
    dry = _submit(client, config, "--dry-run")
    assert _wait(client, dry) == "SUCCEEDED", client.get_job_logs(dry)[-4000:]
    line = next(x for x in client.get_job_logs(dry).splitlines() if x.startswith('{"rows"'))
    report = json.loads(line)
    assert report["rows"] == ROWS and report["committed"] >= ROWS // 2, report
    assert report["committed"] + report["to_embed"] == ROWS and report["chunks_to_read"] < report["chunks"]
    # The killed driver's lease is still fresh: a second writer is refused in one line...
    refused = _submit(client, config)
    assert _wait(client, refused) == "FAILED" and "--takeover" in client.get_job_logs(refused)
    # ...and --takeover resumes at once.
    rerun = _submit(client, config, "--takeover")
    assert _wait(client, rerun) == "SUCCEEDED", client.get_job_logs(rerun)[-4000:]
    manifest = _manifest(out)
    assert manifest["resumed_from"] and manifest["resumed_from"] >= len(killed_parts), "the re-run resumed"
    assert manifest["timing"]["rows_this_run"] == report["to_embed"] <= ROWS // 2
    _assert_same(_read(out, texts), clean_run[0])


def test_pool_and_threads_follow_each_nodes_cpus(cluster):
    """Nodes of different CPU counts (three of 2, one of 8 added here): one CPU stays free on
    each, the pool's maximum sums what each fits, and the thread decision an encoder actor makes
    on its node, run as a task pinned to each node, follows that node's CPUs."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from pipeline.adapter import resolve_encode_stage
    from pipeline.cluster import cluster_shape
    from pipeline.config import StageResources

    cluster.add_node(
        num_cpus=8, dashboard_agent_listen_port=_free_port(), runtime_env_dir_name="runtime_resources_wide"
    )
    ray.init(address=cluster.address)
    try:
        deadline = time.time() + 60  # not cluster.wait_for_nodes(): it also waits for the node killed above
        while 8.0 not in [n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]] and time.time() < deadline:
            time.sleep(0.5)
        shape = cluster_shape()
        assert sorted(shape.node_cpus) == [2.0, 2.0, 2.0, 8.0]
        free = resolve_encode_stage(StageResources(), shape, 256, "e")
        assert free.pool == (1, 1 + 1 + 1 + 7) and free.num_cpus == 1.0  # not 13 of 14 CPUs
        small = resolve_encode_stage(StageResources(pool=(1, 4)), shape, 256, "e")  # about one actor a node

        @ray.remote(num_cpus=0)
        def decide(policy):
            return policy()

        threads = {}
        for node in ray.nodes():
            if node["Alive"]:
                pinned = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                cpus = node["Resources"]["CPU"]
                threads[cpus] = ray.get(decide.options(scheduling_strategy=pinned).remote(small.node_threads))
        assert threads == {2.0: 2, 8.0: 8}  # each actor uses its own node's cores
    finally:
        ray.shutdown()
