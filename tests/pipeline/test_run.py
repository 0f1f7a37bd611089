"""End to end on the session's Ray: the CLI, the YAML, the Python API and the job entry point
agree; bad rows become error values; exit codes; resume and overwrite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.cli import main as cli_main
from tests.conftest import MINILM_ID

ROOT = Path(__file__).resolve().parents[2]


def embed_args(src, out, model, *extra):
    return [
        "embed",
        str(src),
        "--output",
        str(out),
        "--id-column",
        "id",
        "--text-column",
        "text",
        "--text-model",
        model,
        *extra,
    ]


def read_output(out) -> pa.Table:
    return pq.read_table(out).sort_by("id")


def vectors(table: pa.Table, column: str) -> dict[str, np.ndarray | None]:
    return {
        i: (None if v is None else np.asarray(v, dtype=np.float32))
        for i, v in zip(table.column("id").to_pylist(), table.column(column).to_pylist())
    }


@pytest.fixture(scope="module")
def messy_input(tmp_path_factory, real_texts) -> tuple[Path, list[dict]]:
    """Real text plus every kind of bad and absent value the text stage must handle."""
    rows = [{"id": f"real-{i:03d}", "text": t.encode()} for i, t in enumerate(real_texts[:60])]
    rows += [
        {"id": "null", "text": None},
        {"id": "empty", "text": b""},
        {"id": "blank", "text": b"  \n\t "},
        {"id": "bad-utf8", "text": b"caf\xe9 au lait"},
        {"id": "cjk-rtl-emoji", "text": "東京の天気 — مرحبا بالعالم — 🙂🚀 ok".encode()},
        {"id": "huge", "text": ("All work and no play makes Jack a dull boy. " * 24_000).encode()[:1_000_000]},
    ]
    path = tmp_path_factory.mktemp("messy") / "input.parquet"
    # A binary column: invalid UTF-8 must arrive intact to become a decode_failed error.
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("text", pa.binary())])), path)
    return path, rows


@pytest.fixture(scope="module")
def minilm_run(ray_session, minilm_path, messy_input, tmp_path_factory):
    src, rows = messy_input
    out = tmp_path_factory.mktemp("minilm") / "out"
    code = cli_main(embed_args(src, out, MINILM_ID, "--max-error-rate", "0.5", "--rows-per-file", "25"))
    return code, out, rows


def test_fidelity_with_sentence_transformers(minilm_run, minilm_path):
    from sentence_transformers import SentenceTransformer

    code, out, rows = minilm_run
    assert code == 0
    got = vectors(read_output(out), "text_embedding")
    texts = {
        r["id"]: r["text"].decode() for r in rows if r["id"].startswith("real-") or r["id"] in ("cjk-rtl-emoji", "huge")
    }
    reference = SentenceTransformer(minilm_path, device="cpu").encode(list(texts.values()), batch_size=16)
    for (row_id, _), ref in zip(texts.items(), reference):
        v = got[row_id]
        assert v is not None and v.shape == (384,)
        assert float(v @ ref / (np.linalg.norm(v) * np.linalg.norm(ref))) >= 0.9999, row_id


def test_vectors_do_not_depend_on_batching_or_row_order(minilm_run, messy_input, tmp_path):
    """In fp32, the same vectors (<= 1e-5) with other block sizes, token budgets and the rows
    reversed; the default run (precision auto: bf16 on a CPU that has it) within cosine 0.999."""
    _, auto, _ = minilm_run
    src, _ = messy_input
    reversed_src = tmp_path / "reversed.parquet"
    pq.write_table(pq.read_table(src).take(list(range(pq.read_metadata(src).num_rows))[::-1]), reversed_src)
    out, other = tmp_path / "fp32", tmp_path / "other"
    flags = ("--max-error-rate", "0.5", "--precision", "fp32")
    assert cli_main(embed_args(src, out, MINILM_ID, *flags)) == 0
    assert cli_main(embed_args(reversed_src, other, MINILM_ID, *flags, "--batch-rows", "7", "--max-tokens", "300")) == 0
    first, second = vectors(read_output(out), "text_embedding"), vectors(read_output(other), "text_embedding")
    default = vectors(read_output(auto), "text_embedding")
    assert first.keys() == second.keys() == default.keys()
    for row_id, v in first.items():
        assert (v is None) == (second[row_id] is None) == (default[row_id] is None), row_id
        if v is not None:
            assert np.abs(v - second[row_id]).max() <= 1e-5, row_id
            assert v @ default[row_id] / np.linalg.norm(v) / np.linalg.norm(default[row_id]) >= 0.999, row_id


def test_bad_and_absent_rows_are_kept_with_errors(minilm_run):
    _, out, rows = minilm_run
    table = read_output(out)
    assert sorted(table.column("id").to_pylist()) == sorted(r["id"] for r in rows)  # none lost, none twice
    by_id = {r["id"]: r for r in table.select(["id", "text_embedding", "text_error"]).to_pylist()}
    assert by_id["null"]["text_embedding"] is None and by_id["null"]["text_error"] is None
    for row_id, code in (("empty", "empty_text"), ("blank", "empty_text"), ("bad-utf8", "decode_failed")):
        assert by_id[row_id]["text_embedding"] is None
        assert by_id[row_id]["text_error"].startswith(f"{code}: ")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["errors"] == {"decode_failed": 1, "empty_text": 2}
    assert manifest["rows"] == len(rows) and manifest["rows_with_errors"] == 3
    parts = sorted(p.name for p in out.glob("part-*.parquet"))
    assert parts == sorted(f["name"] for f in manifest["files"]) and len(parts) >= 3


def test_non_string_values_are_bad_type(ray_session, tiny_bert, tmp_path):
    src = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": [1, 2, None]}), src)
    out = tmp_path / "out"
    assert cli_main(embed_args(src, out, tiny_bert, "--max-error-rate", "1")) == 0
    errors = read_output(out).column("text_error").to_pylist()
    assert errors[0].startswith("bad_type: ") and errors[1].startswith("bad_type: ") and errors[2] is None


def test_error_rate_past_threshold_exits_3(ray_session, tiny_bert, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "text": ["fine text"] * 8 + ["", " "]}), src)
    assert cli_main(embed_args(src, tmp_path / "strict", tiny_bert, "--max-error-rate", "0.1")) == 3
    manifest = json.loads((tmp_path / "strict" / "_manifest.json").read_text())
    assert manifest["status"] == "failed_error_rate" and manifest["error_rate"] == pytest.approx(0.2)
    assert pq.read_table(tmp_path / "strict").num_rows == 10  # the rows are still all written
    assert cli_main(embed_args(src, tmp_path / "lenient", tiny_bert, "--max-error-rate", "0.2")) == 0


def test_usage_errors_exit_2_with_one_line(ray_session, tiny_bert, tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["x"]}), src)
    cases = [
        (embed_args(tmp_path / "missing.parquet", tmp_path / "o1", tiny_bert), "missing.parquet"),
        (embed_args(src, tmp_path / "o2", str(tmp_path / "no-model")), "no-model"),
        (
            [
                "embed",
                str(src),
                "--output",
                str(tmp_path / "o3"),
                "--id-column",
                "id",
                "--text-column",
                "body",
                "--text-model",
                tiny_bert,
            ],
            "'body'",
        ),
        (
            [
                "embed",
                str(src),
                "--output",
                str(tmp_path / "o4"),
                "--id-column",
                "sku",
                "--text-column",
                "text",
                "--text-model",
                tiny_bert,
            ],
            "'sku'",
        ),
        (["run", str(tmp_path / "nope.yaml")], "nope.yaml"),
    ]
    for argv, needle in cases:
        assert cli_main(argv) == 2, argv
        # Ray may forward worker log lines to the same stream; omniembed's own is one line.
        ours = [line for line in capsys.readouterr().err.splitlines() if line.startswith("omniembed")]
        assert len(ours) == 1 and ours[0].startswith("omniembed: error: ") and needle in ours[0], ours
    assert not any((tmp_path / f"o{i}").exists() for i in (1, 2, 3))


def test_yaml_python_api_and_job_agree(ray_session, tiny_bert, tmp_path):
    import ray

    from jobs.embed import main as job_main
    from pipeline import embed

    texts = ["red shoe", "blue mug", "green tea cup", "a cat and a dog", None]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"sku": f"s{i}", "body": t}) + "\n" for i, t in enumerate(texts)))
    config = {
        "sources": [{"path": str(src), "id_column": "sku"}],
        "encoders": [{"output": "body", "column": "body", "model": tiny_bert, "normalize": True}],
        "output": {"path": str(tmp_path / "yaml-out")},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert cli_main(["run", str(tmp_path / "c.yaml")]) == 0
    config["output"]["path"] = str(tmp_path / "job-out")
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(config))
    assert job_main(["--config", str(tmp_path / "j.yaml")]) == 0
    from_yaml = vectors(read_output(tmp_path / "yaml-out"), "body_embedding")
    from_job = vectors(read_output(tmp_path / "job-out"), "body_embedding")

    ds = ray.data.from_items([{"id": f"s{i}", "body": t} for i, t in enumerate(texts)])
    rows = embed(ds, {"encoders": config["encoders"]}).take_all()
    assert {r["id"] for r in rows} == set(from_yaml)
    # The same column order from the API as in the output files.
    assert (
        list(rows[0])
        == read_output(tmp_path / "yaml-out").column_names
        == ["id", "body", "body_embedding", "body_error"]
    )
    for r in rows:
        a, b, c = from_yaml[r["id"]], from_job[r["id"]], r["body_embedding"]
        if a is None:
            assert b is None and c is None and r["body_error"] is None
        else:
            assert np.allclose(a, b, atol=1e-6) and np.allclose(a, np.asarray(c), atol=1e-6)
            assert np.linalg.norm(a) == pytest.approx(1.0, abs=1e-5)


def test_text_folder_source(ray_session, tiny_bert, tmp_path):
    docs = tmp_path / "docs"
    (docs / "nested").mkdir(parents=True)
    (docs / "one.txt").write_text("the red shoe is fast")
    (docs / "nested" / "two.txt").write_text("a blue mug of coffee")
    (docs / "nested" / "bad.txt").write_bytes(b"\xff\xff")
    out = tmp_path / "out"
    assert (
        cli_main(
            [
                "embed",
                str(docs),
                "--kind",
                "text",
                "--output",
                str(out),
                "--text-model",
                tiny_bert,
                "--max-error-rate",
                "0.5",
            ]
        )
        == 0
    )
    table = read_output(out)
    assert table.column_names == ["id", "text_embedding", "text_error"]
    assert table.column("id").to_pylist() == ["nested/bad.txt", "nested/two.txt", "one.txt"]
    assert table.column("text_error")[0].as_py().startswith("decode_failed")


def test_two_encoders_side_by_side(ray_session, tiny_bert, tiny_st, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "title": ["red shoe", None, "blue mug"], "body": ["tea", "coffee", None]}), src
    )
    config = {
        "sources": [{"path": str(src), "id_column": "id"}],
        "encoders": [
            {"output": "title", "column": "title", "model": tiny_bert},
            {"output": "body", "column": "body", "model": tiny_st},
        ],
        "output": {"path": str(tmp_path / "out"), "vector_type": "fixed_size_list"},
    }
    from pipeline import run

    manifest = run(config)
    table = read_output(tmp_path / "out")
    assert table.column_names == [
        "id",
        "title",
        "body",
        "title_embedding",
        "title_error",
        "body_embedding",
        "body_error",
    ]
    assert table.schema.field("title_embedding").type == pa.list_(pa.float32(), 32)
    assert table.column("title_embedding").null_count == 1 and table.column("body_embedding").null_count == 1
    assert set(manifest["encoders"]) == {"title", "body"} and manifest["encoders"]["body"]["pooling"] == "cls"


def test_resume_skips_committed_ids_and_drops_uncommitted_parts(ray_session, tiny_bert, tmp_path):
    src = tmp_path / "in.parquet"
    n = 120
    pq.write_table(
        pa.table({"id": [f"r{i:03d}" for i in range(n)], "text": [f"the red shoe {i}" for i in range(n)]}), src
    )
    out = tmp_path / "out"
    args = embed_args(src, out, tiny_bert, "--rows-per-file", "30")
    assert cli_main(args) == 0
    clean = vectors(read_output(out), "text_embedding")

    # A run that died after moving its last part in but before recording it, and whose
    # earlier part files are intact: the manifest lists all but the last part.
    manifest = json.loads((out / "_manifest.json").read_text())
    lost = manifest["files"].pop()
    manifest["status"] = "running"
    (out / "_manifest.json").write_text(json.dumps(manifest))
    assert cli_main(args) == 0
    resumed = json.loads((out / "_manifest.json").read_text())
    assert resumed["status"] == "complete" and resumed["timing"]["rows_this_run"] == lost["rows"]
    table = read_output(out)
    assert table.num_rows == n and pc.count_distinct(table.column("id")).as_py() == n
    assert sorted(p.name for p in out.glob("part-*.parquet")) == sorted(f["name"] for f in resumed["files"])
    again = vectors(table, "text_embedding")
    assert all(np.allclose(again[k], clean[k], atol=1e-5) for k in clean)

    # A complete run re-run with unchanged inputs stops before Ray: nothing is written.
    before = (out / "_manifest.json").read_bytes()
    assert cli_main(args) == 0
    assert (out / "_manifest.json").read_bytes() == before
    # A touched input is re-planned by a run, which finds every id committed and embeds nothing.
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))
    assert cli_main(args) == 0
    assert json.loads((out / "_manifest.json").read_text())["timing"]["rows_this_run"] == 0


def test_changed_config_refuses_to_resume_without_overwrite(ray_session, tiny_bert, tmp_path, capsys):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "text": ["red shoe", "blue mug"]}), src)
    out = tmp_path / "out"
    assert cli_main(embed_args(src, out, tiny_bert)) == 0
    assert cli_main(embed_args(src, out, tiny_bert, "--pooling", "cls")) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli_main(embed_args(src, out, tiny_bert, "--pooling", "cls", "--overwrite")) == 0
    assert json.loads((out / "_manifest.json").read_text())["encoders"]["text"]["pooling"] == "cls"
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("not ours")
    assert cli_main(embed_args(src, tmp_path / "theirs", tiny_bert, "--overwrite")) == 2
    assert (tmp_path / "theirs" / "notes.txt").exists()


def test_loopback_only_for_local_runs(monkeypatch):
    from pipeline.ray_env import LOOPBACK_VAR, prepare_environment

    monkeypatch.delenv(LOOPBACK_VAR, raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    prepare_environment("ray://10.0.0.1:10001")
    assert LOOPBACK_VAR not in os.environ  # joining a cluster keeps the cluster's addresses
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    prepare_environment(None)
    assert LOOPBACK_VAR not in os.environ
    monkeypatch.setenv("RAY_ADDRESS", "local")  # Ray's own word for a new embedded instance
    prepare_environment(None)
    assert os.environ[LOOPBACK_VAR] == "0"


def test_console_script_is_a_thin_shell(tmp_path):
    """A real process: importing the CLI does not import Ray, and a bad config exits 2 with
    one line before Ray starts."""
    probe = subprocess.run(
        [sys.executable, "-c", "import sys, pipeline, pipeline.cli; print('ray' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert probe.stdout.strip() == "False"
    (tmp_path / "bad.yaml").write_text("sources: [{path: x.parquet, id_column: id}]\nencoders: []\noutput: {path: o}\n")
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(tmp_path / "bad.yaml")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "omniembed: error: config: encoders must be a non-empty list"


# Ray's per-node processes; the two agents outlive a driver that exits without ray.shutdown().
RAY_DAEMONS = (
    b"gcs_server",
    b"raylet/raylet",
    b"ray::DashboardAgent",
    b"ray::RuntimeEnvAgent",
    b"log_monitor.py",
    b"autoscaler/_private/monitor.py",
)


def _ray_daemon_pids() -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:  # gone meanwhile
                continue
            if any(name in cmdline for name in RAY_DAEMONS):
                pids.add(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_console_script_exits_with_the_runs_code_and_leaves_no_ray(tiny_bert, tmp_path):
    """The command's own process (console_main: main, then os._exit past Python's teardown):
    the exit code is the run's (3 past max_error_rate), the summary reaches a pipe, the output
    is complete, and the embedded Ray it started is shut down (none of its daemons left)."""
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(10)], "text": ["fine text"] * 8 + ["", " "]}), src)
    before = _ray_daemon_pids()
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.cli",
            *embed_args(src, tmp_path / "out", tiny_bert, "--max-error-rate", "0.1"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "omniembed summary" in done.stdout and "failed_error_rate" in done.stdout
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert manifest["status"] == "failed_error_rate" and pq.read_table(tmp_path / "out").num_rows == 10
    assert _ray_daemon_pids() <= before


SHUTDOWN_PROBE = """
import json, sys
import ray
from pipeline.ray_env import init_ray, shutdown_ray

joined = sys.argv[1] == "joined"
if joined:  # a cluster this driver did not start: its monitor belongs to the head node
    from ray.cluster_utils import Cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    monitor = cluster.head_node.all_processes["monitor"][0].process
    init_ray(cluster.address)
else:
    init_ray()
    monitor = ray._private.worker._global_node.all_processes["monitor"][0].process
pids = [info.process.pid for infos in ray._private.worker._global_node.all_processes.values() for info in infos]
alive_at_shutdown = []
real_shutdown = ray.shutdown
def spy(*args, **kwargs):
    alive_at_shutdown.append(monitor.poll() is None)
    return real_shutdown(*args, **kwargs)
ray.shutdown = spy
shutdown_ray()
result = {"alive_at_shutdown": alive_at_shutdown, "alive_after": monitor.poll() is None,
          "initialized": ray.is_initialized(), "pids": pids}
if joined:
    cluster.shutdown()
print(json.dumps(result))
"""


def _shutdown_probe(mode: str) -> dict:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_PROBE, mode], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_shutdown_stops_the_embedded_autoscaler_monitor_first():
    """shutdown_ray on the embedded Ray: the autoscaler monitor is already gone when
    ray.shutdown runs (otherwise Ray waits a second for it to answer SIGTERM through the GCS
    it has just stopped), and every process of that Ray is gone afterwards."""
    result = _shutdown_probe("embedded")
    assert result["alive_at_shutdown"] == [False] and not result["alive_after"] and not result["initialized"]
    assert len(result["pids"]) >= 4  # gcs, raylet, monitor, log monitor, ...
    assert not [pid for pid in result["pids"] if Path(f"/proc/{pid}").exists()]


def test_shutdown_leaves_a_joined_clusters_monitor_alone():
    """A driver that joined a cluster it did not start stops only itself: the head node's
    monitor is still running after shutdown_ray."""
    result = _shutdown_probe("joined")
    assert result["alive_at_shutdown"] == [True] and result["alive_after"] and not result["initialized"]
    assert result["pids"] == []  # the driver's own node record holds no processes
