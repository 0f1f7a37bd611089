"""Image-embedding throughput: compute floor vs a hand-written Ray Data pipeline vs omniembed.

One run, one image folder, one model (the bundled EfficientNet-Lite0), three numbers in images/s:
  (a) floor      one process, images already decoded, resized, cropped and normalized into
                 batches of tensors; forward only, torch on all cores; on the first
                 --floor-images (a rate). Measured in fp32 and bf16 autocast, each with model and
                 input in NCHW and in channels-last (NHWC); the floor is the fastest whose
                 vectors keep min cosine >= 0.999 to fp32's (benchmarks/floors.py).
  (b) ray-naive  on the floor's images, in the style of Ray's image benchmark (multimodal_inference_benchmarks/
                 image_classification/ray_data_main.py): read_images -> map(preprocess) ->
                 map_batches(actor) -> write_parquet.
  (c) omniembed  `omniembed embed DIR --kind image --image-model efficientnet-lite0` in a fresh
                 process at its default `precision: auto` (the run's probe decides; the resolved
                 precision is read from the output's _manifest.json), wall clock for everything;
                 run twice, on the first --small images (default a third) and on all of them,
                 which splits it into a fixed cost per run and a rate once running.
The images are derived from real photos (scikit-image samples): random crops, flips, brightness
and sizes, JPEG-encoded. (b)'s vectors must keep cosine >= 0.99 to the fp32 floor's, (c)'s
>= 0.999 (on the floor's images; every image must be there once); a run that fails that exits
1. Target: c/a >= 0.8 end to end (see benchmarks/README.md); a miss prints FAIL but does not
change the exit status.

    python benchmarks/image_throughput.py [--images 24000] [--floor-images 2000] [--small N] [--folder DIR]
        [--precision auto|fp32|bf16] [--skip-ray] [--skip-omniembed]
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
from floors import (  # noqa: E402
    FAITHFUL_COSINE,
    FloorResult,
    check_vectors,
    choose_floor,
    embed_cli,
    floor_again,
    floor_allocator,
    floor_rows,
    folder_of,
    manifest_precision,
    print_floor,
    print_split,
    print_table,
    time_floor,
    uptime,
    verdict,
)

from encoders import MODELS, resolve_weights  # noqa: E402
from encoders.core.fold import fold_batchnorm  # noqa: E402
from encoders.image.cnn import build_feature_model  # noqa: E402
from encoders.image.prepare import ImagePreprocess, decode_rgb, resize_crop  # noqa: E402
from encoders.image.tensors import to_model_input  # noqa: E402
from tests.image_data import SKIMAGE_PHOTOS as PHOTOS  # noqa: E402  (the tests' real photos)

MODEL = "efficientnet-lite0"
MIN_COSINE = 0.99  # (b), an fp32 pipeline: a wrong resize or normalization lands well below
# Floor variants: name -> (autocast dtype or None, channels-last model and input, batch norms
# folded into the convolutions as omniembed's encoder runs them, encoders/core/fold.py). fp32,
# the model as published, comes first: the others are checked against its vectors.
FLOOR_VARIANTS = {
    "fp32": (None, False, False),
    "fp32-channels-last": (None, True, False),
    "fp32-channels-last-folded": (None, True, True),
    "bf16": (torch.bfloat16, False, False),
    "bf16-channels-last": (torch.bfloat16, True, False),
}


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


def autocast(dtype: torch.dtype | None) -> torch.autocast:
    return torch.autocast("cpu", dtype=dtype, enabled=dtype is not None)


def floor_runner(
    model: torch.nn.Module, batches: list[torch.Tensor], dtype: torch.dtype | None
) -> Callable[[], np.ndarray]:
    """One variant: every batch's forward, (n, 1280) float32 vectors out."""

    def run() -> np.ndarray:
        with torch.inference_mode(), autocast(dtype):
            return torch.cat([model(x).float() for x in batches]).numpy()

    return run


def bench_floors(
    images: torch.Tensor, prep: ImagePreprocess, weights: str, batch: int
) -> tuple[list[FloorResult], np.ndarray]:
    """Every variant's forward on the same normalized batches (built before any clock); returns
    their results and fp32's vectors."""
    results, reference = [], None
    for name, (dtype, channels_last, folded) in FLOOR_VARIANTS.items():
        model = build_feature_model(MODEL, weights).eval()
        if folded:
            fold_batchnorm(model, torch.randn((2, 3, prep.crop, prep.crop)))
        batches = [
            to_model_input(images[s : s + batch], prep, torch.device("cpu")) for s in range(0, len(images), batch)
        ]
        if channels_last:  # (n, 3, h, w) stored as (n, h, w, 3): oneDNN's preferred layout
            model = model.to(memory_format=torch.channels_last)
            batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
        with torch.inference_mode(), autocast(dtype):
            model(batches[0])  # warm-up: first-call allocations, oneDNN kernel choice
        result, vectors = time_floor(name, floor_runner(model, batches, dtype), reference)
        reference = vectors if reference is None else reference
        results.append(result)
    return results, reference


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


def run_omniembed(
    paths: list[Path], folder: Path, everything: int, work: Path, args: argparse.Namespace, reference: dict
) -> tuple:
    """(c) on ``paths`` (all ``everything`` images of ``folder``, or a prefix) -> (seconds, note)."""
    n = len(paths)
    folder = folder_of(paths, folder, everything, work / f"small-{n}")
    out = str(work / f"omniembed-{n}")
    seconds = embed_cli(folder, out, "image", MODEL, args.precision, [])
    precision = manifest_precision(out, "image")
    table = pq.read_table(out, columns=["id", "image_embedding", "image_error"])
    assert table.column("image_error").null_count == table.num_rows, "omniembed: rows with errors"
    vectors = np.array(table.column("image_embedding").to_pylist(), dtype=np.float32)
    ids, names = table.column("id").to_pylist(), [p.name for p in paths]
    cosine = check_vectors(f"omniembed {n}", ids, vectors, reference, FAITHFUL_COSINE, names)
    return seconds, f"precision {args.precision} -> {precision} (_manifest.json), min cosine to fp32 {cosine:.6f}"


def bench(args: argparse.Namespace, work: Path) -> int:
    up_start = uptime()
    print(f"start: {up_start}", flush=True)
    floor_allocator()
    folder = Path(args.folder) if args.folder else work / "images"
    paths = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    if len(paths) != args.images:
        t0 = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        paths = build_images(folder, args.images, args.seed)
        print(f"built {len(paths)} images in {folder} in {time.perf_counter() - t0:.0f}s")
    alias = MODELS.get(MODEL)
    prep = ImagePreprocess.from_options(alias.defaults)
    weights = resolve_weights(MODEL).path
    floor_paths = paths[: args.floor_images]
    print(
        f"{len(paths)} images in {folder} (floors on {len(floor_paths)}), model {MODEL}, "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )

    floors, fp32_vectors = bench_floors(preprocess_all(floor_paths, prep), prep, weights, args.batch_size)
    floors, floor = choose_floor(floors)
    reference = {p.name: v for p, v in zip(floor_paths, fp32_vectors)}
    rows = []
    if not args.skip_ray:
        out = str(work / "ray")
        ray_folder = folder_of(floor_paths, folder, len(paths), work / "floor-images")
        seconds = bench_ray(ray_folder, out, weights, prep, args.batch_size)
        table = pq.read_table(out)
        ids = [Path(p).name for p in table.column("path").to_pylist()]
        vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
        cosine = check_vectors("ray-naive", ids, vectors, reference, MIN_COSINE)
        rows.append(("(b) ray-naive", len(floor_paths), seconds, f"fp32, min cosine to fp32 {cosine:.6f}"))
    failed, runs = None, {}
    small = len(paths) // 3 if args.small is None else args.small
    sizes = ([small] if 0 < small < len(paths) else []) + [len(paths)]
    try:  # a failure of (c) still reports (a) and (b), then exits 1
        for n in [] if args.skip_omniembed else sizes:
            runs[n] = run_omniembed(paths[:n], folder, len(paths), work, args, reference)
            rows.append(("(c) omniembed", n, *runs[n]))
    except (subprocess.CalledProcessError, OSError, KeyError, AssertionError) as exc:
        failed = f"omniembed FAILED: {exc}"
    floors, floor = floor_again(floors, floor)
    print_table(floor_rows(floors, floor) + rows, floor, "images")
    print_floor(floors, floor, "images")
    if len(runs) == 2:  # (c) on n and on N images: a fixed cost per run and a rate once running
        print_split({n: run[0] for n, run in runs.items()}, floor, "images")
    print("\nsummary (a miss is reported, not an error):")
    done = len(paths) in runs
    print("  " + (verdict(len(paths), runs[len(paths)][0], floor) if done else "c/a end to end: n/a"))
    print(f"uptime at start: {up_start}\nuptime at end:   {uptime()}")
    if failed:
        print(failed)
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=24000, help="(c)'s job: 2-3 minutes of the floor")
    ap.add_argument("--floor-images", type=int, default=2000, help="(a) and (b) on the first N: rates")
    ap.add_argument("--small", type=int, help="(c) also on this many images (default images // 3; 0: skip)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--folder", help="reuse/write the images here instead of a temp folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="(c): omniembed's")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-omniembed", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="omniembed-img-bench-"))
    try:
        return bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
