"""Image-embedding throughput: compute floor vs a hand-written Ray Data pipeline vs omniembed.

One run, one image folder, one model (the bundled EfficientNet-Lite0), three numbers in images/s:
  (a) floor      one process, images already decoded, resized, cropped and normalized into
                 batches of tensors; forward only, torch on all cores.
  (b) ray-naive  in the style of Ray's image benchmark (multimodal_inference_benchmarks/
                 image_classification/ray_data_main.py): read_images -> map(preprocess) ->
                 map_batches(actor) -> write_parquet.
  (c) omniembed  `omniembed embed DIR --kind image --image-model efficientnet-lite0` in a fresh
                 process, wall clock for everything.
The images are derived from real photos (scikit-image samples): random crops, flips, brightness
and sizes, JPEG-encoded. Target: c/a >= 0.8 (see benchmarks/README.md).

    python benchmarks/image_throughput.py [--images 2000] [--skip-ray] [--skip-omniembed]
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from encoders import MODELS, resolve_weights  # noqa: E402
from encoders.image.cnn import build_feature_model  # noqa: E402
from encoders.image.prepare import ImagePreprocess, decode_rgb, resize_crop  # noqa: E402
from encoders.image.tensors import to_model_input  # noqa: E402
from tests.image_data import SKIMAGE_PHOTOS as PHOTOS  # noqa: E402  (the tests' real photos)

MODEL = "efficientnet-lite0"
MIN_COSINE = 0.99


def build_images(folder: Path, count: int, seed: int) -> list[Path]:
    """``count`` JPEGs: random crop (40-100% per side), flip, brightness, longer side 256-640 px."""
    import skimage.data
    from PIL import Image, ImageEnhance

    rng = np.random.default_rng(seed)
    sources = [np.asarray(getattr(skimage.data, n)()) for n in PHOTOS]
    sources = [np.repeat(s[..., None], 3, 2) if s.ndim == 2 else s[..., :3] for s in sources]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = sources[i % len(sources)]
        h, w = image.shape[:2]
        ch, cw = int(h * rng.uniform(0.4, 1.0)), int(w * rng.uniform(0.4, 1.0))
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = Image.fromarray(np.ascontiguousarray(image[y : y + ch, x : x + cw]))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop = ImageEnhance.Brightness(crop).enhance(rng.uniform(0.7, 1.3))
        side = int(rng.integers(256, 641))
        crop.thumbnail((side, side))
        path = folder / f"img-{i:05d}.jpg"
        crop.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def preprocess_all(paths: list[Path], prep: ImagePreprocess) -> torch.Tensor:
    return torch.stack([resize_crop(decode_rgb(p.read_bytes()), prep) for p in paths])


def bench_floor(images: torch.Tensor, prep: ImagePreprocess, weights: str, batch: int) -> tuple[float, np.ndarray]:
    model = build_feature_model("efficientnet-lite0", weights).eval()
    batches = [to_model_input(images[s : s + batch], prep, torch.device("cpu")) for s in range(0, len(images), batch)]
    out = []
    with torch.inference_mode():
        model(batches[0])  # warm-up
        t0 = time.perf_counter()
        for x in batches:
            out.append(model(x).numpy())
        seconds = time.perf_counter() - t0
    return seconds, np.concatenate(out)


class Embedder:
    """The map_batches actor a user writes: load once in __init__, embed in __call__."""

    def __init__(self, weights: str, prep: dict):
        self.prep = ImagePreprocess.from_options({"preprocessing": prep})
        self.model = build_feature_model("efficientnet-lite0", weights).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = to_model_input(torch.from_numpy(np.stack(batch["image"])), self.prep, torch.device("cpu"))
        with torch.inference_mode():
            features = self.model(x).numpy()
        return {"path": batch["path"], "embedding": features}


def bench_ray(folder: Path, outdir: str, weights: str, prep: ImagePreprocess, batch: int) -> float:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get([ray.remote(lambda: None).remote() for _ in range(8)])  # time data, not startup

    def preprocess(row: dict) -> dict:
        chw = torch.from_numpy(np.ascontiguousarray(row["image"])).permute(2, 0, 1)
        return {"path": row["path"], "image": resize_crop(chw, prep).numpy()}

    t0 = time.perf_counter()
    (
        ray.data.read_images(str(folder), mode="RGB", include_paths=True)
        .map(preprocess)
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"weights": weights, "prep": prep.as_dict()},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=batch,
            num_cpus=1,
        )
        .write_parquet(outdir)
    )
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds


def bench_omniembed(folder: Path, outdir: str) -> float:
    exe = Path(sys.executable).parent / "omniembed"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "pipeline.cli"]
    cmd += ["embed", str(folder), "--kind", "image", "--image-model", MODEL, "--output", outdir, "--overwrite"]
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=REPO, check=True)
    return time.perf_counter() - t0


def check(name: str, ids: list[str], vectors: np.ndarray, reference: dict[str, np.ndarray]) -> None:
    assert sorted(ids) == sorted(reference), f"{name}: ids differ from the input files"
    ref = np.stack([reference[i] for i in ids])
    cos = (vectors * ref).sum(1) / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(ref, axis=1)).clip(1e-12)
    print(f"check {name}: {len(ids)} rows, min cosine vs floor {cos.min():.6f}")
    assert cos.min() >= MIN_COSINE, f"{name}: embeddings differ from the floor's"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--folder", help="reuse/write the images here instead of a temp folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-omniembed", action="store_true")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omniembed-img-bench-"))
    folder = Path(args.folder) if args.folder else work / "images"
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(paths) != args.images:
        paths = build_images(folder, args.images, args.seed)
    alias = MODELS.get(MODEL)
    prep = ImagePreprocess.from_options(alias.defaults)
    weights = resolve_weights(MODEL).path
    print(f"{len(paths)} images in {folder}, model {MODEL}, torch threads {torch.get_num_threads()}", flush=True)

    images = preprocess_all(paths, prep)
    seconds, floor_vectors = bench_floor(images, prep, weights, args.batch_size)
    reference = {p.name: v for p, v in zip(paths, floor_vectors)}
    results = {"(a) floor": len(paths) / seconds}
    if not args.skip_ray:
        out = str(work / "ray")
        seconds = bench_ray(folder, out, weights, prep, args.batch_size)
        table = pq.read_table(out)
        check(
            "ray-naive",
            [Path(p).name for p in table.column("path").to_pylist()],
            np.stack(table.column("embedding").to_numpy(zero_copy_only=False)),
            reference,
        )
        results["(b) ray-naive"] = len(paths) / seconds
    if not args.skip_omniembed:
        out = str(work / "omniembed")
        seconds = bench_omniembed(folder, out)
        table = pq.read_table(out, columns=["id", "image_embedding", "image_error"])
        assert table.column("image_error").null_count == table.num_rows, "omniembed: rows with errors"
        check(
            "omniembed",
            table.column("id").to_pylist(),
            np.array(table.column("image_embedding").to_pylist(), dtype=np.float32),
            reference,
        )
        results["(c) omniembed"] = len(paths) / seconds
    floor = results["(a) floor"]
    print(f"\n{'pipeline':<16}{'images/s':>10}{'x floor':>9}")
    for name, rate in results.items():
        print(f"{name:<16}{rate:>10.1f}{rate / floor:>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
