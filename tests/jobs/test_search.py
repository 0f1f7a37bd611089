"""jobs.search: exact search against numpy, the FAISS index against exact search, queries
embedded through the recorded encoder against the model called directly (bundled MiniLM via
sentence-transformers; a tiny CLIP via transformers), the index folder beside the dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.ann import AnnParams, ExactIndex, build_ann, search_space
from jobs.search import Query, main, measure_recall, run_query
from jobs.vectors import read_vectors
from tests.conftest import own_stderr


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(clusters, size=n)] + 0.6 * rng.normal(size=(n, dim))).astype(np.float32)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_ann_recall_at_10_on_12k_clustered_vectors(kind):
    space = search_space(clustered(12_000, 64, 50, seed=1), "cosine")
    params = AnnParams(kind=kind)
    measured = measure_recall(
        space, build_ann(space, params), params, k=10, queries=500, seed=0, progress=lambda it, **_: it
    )
    print(f"{kind} recall@10 on 12,000 clustered vectors: {measured['recall']:.4f}")
    assert measured["recall"] >= 0.95


def test_exact_search_equals_numpy():
    rng = np.random.default_rng(0)
    vectors, queries = rng.normal(size=(3000, 32)).astype(np.float32), rng.normal(size=(40, 32)).astype(np.float32)
    scores, rows = ExactIndex(vectors, chunk=16).search(queries, 7)
    brute = queries @ vectors.T
    assert np.array_equal(rows, np.argsort(-brute, axis=1)[:, :7])
    assert np.allclose(scores, np.take_along_axis(brute, rows, axis=1), atol=1e-4)


def test_build_and_text_query_with_bundled_minilm(job_data, minilm_path, capsys):
    from sentence_transformers import SentenceTransformer

    dataset = job_data["dataset"]
    assert main(["build", dataset, "--column", "text_embedding"]) == 0
    index = Path(dataset + ".index")
    assert index.is_dir() and not (Path(dataset) / "text_embedding.faiss").exists()
    info = json.loads((index / "text_embedding.json").read_text())
    assert info["metric"] == "ip" and info["vectors"] == 360 and info["recall"] >= 0.95
    print(f"MiniLM recall@10 of the HNSW index on {info['vectors']} real vectors: {info['recall']:.4f}")
    # The dataset still reads as a dataset: the index is not in it.
    assert pq.read_table(dataset).num_rows == 360
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(f"{dataset}/*.parquet").height == 360

    text = "Send an e-mail message through an SMTP server"
    capsys.readouterr()
    assert main(["query", dataset, "--column", "text_embedding", "--text", text, "--exact", "-k", "10", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)["results"]
    reference = SentenceTransformer(minilm_path, device="cpu").encode([text], normalize_embeddings=True)[0]
    vectors = read_vectors(dataset, "text_embedding")
    brute = vectors.vectors @ reference
    expected = vectors.ids[np.argsort(-brute)[:10]].tolist()
    assert [r["id"] for r in exact] == expected
    assert np.allclose([r["score"] for r in exact], np.sort(brute)[::-1][:10], atol=1e-4)
    ann = run_query(dataset, "text_embedding", Query(text=text), k=10, show=["topic"])
    assert len(set(r["id"] for r in ann) & set(expected)) >= 9
    assert ann[0]["topic"] == "email"


def test_id_query_leaves_the_row_out(job_data):
    dataset = job_data["dataset"]
    vectors = read_vectors(dataset, "text_embedding")
    results = run_query(dataset, "text_embedding", Query(id=vectors.ids[3]), k=5, exact=True)
    brute = vectors.vectors @ vectors.vectors[3]
    assert [r["id"] for r in results] == vectors.ids[np.argsort(-brute)[1:6]].tolist()


def test_cross_modal_text_to_image_equals_direct_clip(ray_session, tmp_path):
    from transformers import CLIPModel, CLIPTokenizerFast

    from encoders.image.prepare import ImagePreprocess, prepare_images
    from encoders.image.tensors import images_to_tensor, to_model_input
    from jobs.entrypoint import JobError
    from pipeline.graph import run
    from tests.encoders.test_image_hf import save_tiny_clip
    from tests.image_data import encode, real_photos

    clip = save_tiny_clip(tmp_path / "clip")
    photos = real_photos()
    names = sorted(photos)[:10]
    paths = []
    for name in names:
        paths.append(str(tmp_path / f"{name}.jpg"))
        Path(paths[-1]).write_bytes(encode(photos[name]))
    rows = [{"id": n, "caption": f"the {n}", "image": p} for n, p in zip(names, paths)]
    rows.append({"id": "no-image", "caption": "the cat", "image": None})
    src = tmp_path / "photos.parquet"
    pq.write_table(pa.Table.from_pylist(rows), src)
    out = tmp_path / "out" / "photos"
    run(
        {
            "sources": [{"path": str(src), "id_column": "id"}],
            "output": {"path": str(out)},
            "encoders": [
                {
                    "output": "clip",
                    "model": str(clip),
                    "columns": {"text": "caption", "image": "image"},
                    "precision": "fp32",
                }
            ],
        }
    )
    assert main(["build", str(out), "--column", "clip_image_embedding", "--recall-queries", "10"]) == 0
    info = json.loads((tmp_path / "out" / "photos.index" / "clip_image_embedding.json").read_text())
    assert info["vectors"] == 10 and info["nulls_skipped"] == 1

    query = "the cat"
    got_exact = run_query(str(out), "clip_image_embedding", Query(text=query), k=10, exact=True)
    got_ann = run_query(str(out), "clip_image_embedding", Query(text=query), k=10)
    # The reference: transformers' CLIPModel on the same tokens and the same uint8 crops.
    model = CLIPModel.from_pretrained(clip).eval()
    tokens = CLIPTokenizerFast.from_pretrained(clip)([query], return_tensors="pt")
    spec_options = json.loads(pq.read_schema(next(out.glob("*.parquet"))).metadata[b"omniembed"])["encoders"]["clip"][
        "options"
    ]
    prep = ImagePreprocess.from_options(spec_options)
    images, _ = images_to_tensor(prepare_images(pa.array(paths), prep).values, prep.crop)
    with torch.no_grad():
        text = _features(model.get_text_features(**tokens))
        image = _features(model.get_image_features(pixel_values=to_model_input(images, prep, torch.device("cpu"))))
    similarity = (torch.nn.functional.normalize(image, dim=1) @ torch.nn.functional.normalize(text, dim=1).T)[
        :, 0
    ].numpy()
    expected = [names[i] for i in np.argsort(-similarity)]
    assert [r["id"] for r in got_exact] == expected
    assert [r["id"] for r in got_ann] == expected
    assert np.allclose([r["score"] for r in got_exact], np.sort(similarity)[::-1], atol=1e-4)

    # Other weights than the metadata's hash: refused, the query would land in another space.
    other = tmp_path / "clip-other"
    shutil.copytree(clip, other)
    perturbed = CLIPModel.from_pretrained(other)
    with torch.no_grad():
        perturbed.text_projection.weight.mul_(1.5)
    perturbed.save_pretrained(other)
    with pytest.raises(JobError, match="weights sha256"):
        run_query(str(out), "clip_image_embedding", Query(text=query), exact=True, model=str(other))


def _features(output):
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def test_user_errors_are_one_line_exit_2(job_data, tmp_path, capsys):
    dataset = job_data["dataset"]
    cases = [
        (["build", str(tmp_path / "nope"), "--column", "text_embedding"], "does not exist"),
        (["build", dataset, "--column", "title_embedding"], "vector columns: text_embedding"),
        (
            ["query", dataset, "--column", "text_embedding", "--image", str(tmp_path / "x.jpg"), "--exact"],
            "embeds text, not image",
        ),
        (["build", dataset, "--column", "text_embedding", "--index", dataset + "/idx"], "inside the dataset folder"),
    ]
    for argv, message in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = own_stderr(capsys.readouterr().err)
        assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    # A vector with the wrong number of values: named, with the row.
    table = pq.read_table(dataset)
    bad = table.set_column(
        table.schema.get_field_index("text_embedding"),
        "text_embedding",
        pa.array([[0.5] * 383] + table.column("text_embedding").to_pylist()[1:], pa.list_(pa.float32())),
    )
    folder = tmp_path / "bad"
    folder.mkdir()
    pq.write_table(bad.replace_schema_metadata(table.schema.metadata), folder / "part-0.parquet")
    assert main(["build", str(folder), "--column", "text_embedding"]) == 2
    assert "has 383 values, but the metadata says dim 384" in capsys.readouterr().err
