"""Audio-embedding throughput: compute floor vs a hand-written Ray Data pipeline vs omniembed.

One run, one folder of espeak-ng speech clips, one model (the bundled resemblyzer speaker
encoder, 256-d), three numbers in clips/s:
  (a) floor      one process; clips decoded, mono, resampled to 16 kHz and laid out as tensors
                 beforehand; timed: the family's own ``SpeakerEncoder.forward`` (gain to -30 dBFS,
                 mel of each clip, LSTM on micro-batches of 1.6 s windows, mean pooling per clip,
                 L2 normalization) at its fastest micro-batch size. Torch on all cores. Measured
                 with the LSTM in fp32 and in bf16 autocast (the front end in fp32 both times, as
                 omniembed runs it); the floor is the fastest whose vectors keep min cosine
                 >= 0.999 to fp32's (benchmarks/floors.py).
  (b) ray-naive  in the style of Ray's audio benchmark (multimodal_inference_benchmarks/
                 audio_transcription/ray_data_main.py): read_binary_files -> map(soundfile decode,
                 mono, torchaudio Resample) -> map_batches(actor: resemblyzer's embed_utterance in
                 batches, same network and mel) -> write_parquet.
  (c) omniembed  `omniembed embed DIR --kind audio --audio-model resemblyzer` in a fresh process
                 at its default `precision: auto` (the resolved precision is read from the output's
                 _manifest.json), wall clock for everything; run twice, on the first --small clips
                 (default a third) and on all of them. The difference splits (c) into a fixed cost per run
                 (interpreter, imports, Ray's start and stop, model load, first and last block)
                 and a rate once running: (N - n) / (t_N - t_n) clips/s.
(a) and (b) run on the first --floor-clips; (c) on all --clips (about 3 minutes of the bf16 floor,
as the text benchmark sizes its job), every clip present once. Vectors must match the fp32 floor's
on the clips it ran (cosine per clip >= 0.99 for (b), >= 0.999 for (c), the same window count;
else exit 1). Target: c/a >= 0.8 end to end (see benchmarks/README.md); a miss prints FAIL but
does not change the exit status.

    python benchmarks/audio_throughput.py [--clips 12000] [--floor-clips 4800] [--small 4000] [--folder DIR]
        [--skip-ray] [--skip-omniembed] [--precision auto|fp32|bf16]
    python benchmarks/audio_throughput.py --one-hour     # only: peak RSS of prepare on a 1 h file
"""

from __future__ import annotations

import os

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: bind 127.0.0.1
# The floor runs with libgomp's default wait policy (spin, then sleep), its fastest on an idle
# machine: 57 s here against 61 s with OMP_WAIT_POLICY=ACTIVE and 65-72 s with PASSIVE (2400
# clips, each at its best micro-batch). Its two-thread LSTM ends each of its 480 steps in a
# thread barrier, so it is fragile: any other process taking a core makes the default policy
# 4-7x slower. Run the benchmark on a quiet machine (the load average is printed).

import argparse
import io
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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

from encoders import FAMILIES, MODELS  # noqa: E402
from encoders.audio.prepare import AudioPreprocess, decode_audio, waveforms_to_arrow  # noqa: E402
from encoders.audio.speaker import INT16_MAX, load_speaker_net  # noqa: E402
from encoders.audio.windows import pool_windows  # noqa: E402
from pipeline.config import config_from_dict  # noqa: E402
from pipeline.plan import plan_encoders  # noqa: E402
from tests.audio_data import SENTENCES, VOICES, write_long_wav  # noqa: E402

MODEL = "resemblyzer"
RATES = (16_000, 22_050, 44_100)  # espeak-ng speaks at 22.05 kHz: two of three need sox
AUDIO_EXTENSIONS = ("wav", "flac")
MIN_COSINE = 0.99  # (b), resemblyzer's own code path in fp32
FLOOR_MICRO_BATCHES = (32, 64, 128, 256, 512)
FLOOR_PRECISIONS = ("fp32", "bf16")  # of the LSTM; the mel front end stays fp32


# --- clips ----------------------------------------------------------------------------------


def build_clips(folder: Path, count: int, seed: int, max_sentences: int) -> list[Path]:
    """``count`` clips: a voice in turn, 1..max_sentences random sentences, speed 140-200 wpm,
    pitch 25-75, amplitude 60-180; written at 16/22.05/44.1 kHz in turn, WAV or FLAC at random."""
    for tool in ("espeak-ng", "sox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install espeak-ng sox")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    raw = folder / ".espeak.wav"
    paths = []
    for i in range(count):
        text = " ".join(rng.choice(SENTENCES, int(rng.integers(1, max_sentences + 1)), replace=False))
        speed, pitch, amplitude = (str(int(rng.integers(lo, hi))) for lo, hi in ((140, 201), (25, 76), (60, 181)))
        voice = ["-v", VOICES[i % len(VOICES)], "-s", speed, "-p", pitch, "-a", amplitude]
        subprocess.run(["espeak-ng", *voice, "-w", str(raw), text], check=True, capture_output=True)
        path = folder / f"clip-{i:04d}.{AUDIO_EXTENSIONS[int(rng.integers(0, 2))]}"
        subprocess.run(["sox", str(raw), "-r", str(RATES[i % len(RATES)]), str(path)], check=True, capture_output=True)
        paths.append(path)
    raw.unlink()
    return paths


def list_clips(folder: Path) -> list[Path]:
    return sorted(p for ext in AUDIO_EXTENSIONS for p in folder.glob(f"*.{ext}")) if folder.is_dir() else []


# --- (a) compute floor ----------------------------------------------------------------------


def plan_speaker(precision: str = "fp32"):
    """The spec and loaded encoder omniembed itself uses for ``--audio-model resemblyzer``."""
    config = config_from_dict(
        {
            "sources": [{"path": "x", "id_column": "id"}],
            "output": {"path": "o"},
            "encoders": [{"output": "audio", "column": "audio", "model": MODEL, "precision": precision}],
        }
    )
    spec = plan_encoders(config.encoders)[0]
    return spec, FAMILIES.get(spec.family).load(spec, torch.device("cpu"))


def normalize_volume(wave: np.ndarray, target_dbfs: float) -> np.ndarray:
    """resemblyzer's normalize_volume(increase_only=True): gain up to ``target_dbfs``, never down."""
    rms = np.sqrt(np.mean((wave.astype(np.float64) * INT16_MAX) ** 2))
    change = target_dbfs - 20 * np.log10(max(rms, 1e-12) / INT16_MAX)
    return wave * np.float32(10 ** (change / 20)) if rms > 0 and change > 0 else wave


def bench_floors(paths: list[Path], group: int = 64) -> tuple[list[FloorResult], np.ndarray, np.ndarray]:
    """-> (one result per precision, fp32's (n, 256) vectors, (n,) windows per clip). Only the
    forward is timed: the family's own ``SpeakerEncoder.forward`` (per-clip gain to -30 dBFS from
    a sum of squares, mel of each clip scaled by the gain squared, LSTM on micro-batches of
    windows in the encoder's precision, mean pooling, L2 normalization) on batches whose samples
    are decoded, resampled and laid out beforehand. Each precision takes its fastest micro-batch
    size on all cores (measured first on two batches), not omniembed's one-thread default."""
    spec, encoder = plan_speaker()
    prep = AudioPreprocess.from_options(spec.options)
    hop = spec.options["features"]["hop_length"]
    batches, audio_seconds = [], 0.0
    for start in range(0, len(paths), group):
        waves = [decode_audio(str(p), prep) for p in paths[start : start + group]]
        audio_seconds += sum(len(w) for w in waves) / prep.sample_rate
        batch = encoder.batch(waveforms_to_arrow(waves))
        batch.layout(encoder.context, align=hop)  # the padded samples the mel reads, built now
        batches.append(batch)
    counts = np.concatenate([batch.counts for batch in batches])
    print(
        f"(a) {len(paths)} clips, {audio_seconds:.0f} s of audio, {int(counts.sum())} windows of {prep.window_seconds}s"
    )
    results, reference = [], None
    for precision in FLOOR_PRECISIONS:
        encoder = plan_speaker(precision)[1]
        trial = {}
        for size in FLOOR_MICRO_BATCHES:
            encoder.forward(batches[0], size)  # warm-up: first-call allocations
            t0 = time.perf_counter()
            for batch in batches[:2]:
                encoder.forward(batch, size)
            trial[size] = time.perf_counter() - t0
        step = min(trial, key=trial.get)
        trials = ", ".join(f"{k}: {v:.2f} s" for k, v in trial.items())
        print(f"(a) {precision}: micro-batch {step} (trial on {2 * group} clips: {trials})", flush=True)

        def run(encoder=encoder, step=step) -> np.ndarray:
            return torch.cat([encoder.forward(batch, step) for batch in batches]).numpy()

        result, vectors = time_floor(precision, run, reference)
        reference = vectors if reference is None else reference
        results.append(result)
    return results, reference, counts


# --- (b) hand-written Ray Data pipeline -----------------------------------------------------


class Embedder:
    """The map_batches actor a user writes: resemblyzer's VoiceEncoder.embed_utterance (partials
    of 160 mel frames every 77, the last kept at >= 75% audio, mean of the partial vectors) on a
    batch, with the same network and mel front end."""

    PARTIAL_FRAMES, FRAME_STEP, HOP, MIN_COVERAGE = 160, 77, 160, 0.75

    def __init__(self, weights: str):
        import torchaudio

        self.net = load_speaker_net(weights)
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=16000,
            n_fft=400,
            hop_length=self.HOP,
            n_mels=40,
            power=2.0,
            center=True,
            pad_mode="constant",
            mel_scale="slaney",
            norm="slaney",
        )  # librosa >= 0.10's padding

    def partial_starts(self, n_samples: int) -> list[int]:
        """resemblyzer's compute_partial_slices, as mel-frame starts."""
        n_frames = int(np.ceil((n_samples + 1) / self.HOP))
        starts = list(range(0, max(1, n_frames - self.PARTIAL_FRAMES + self.FRAME_STEP + 1), self.FRAME_STEP))
        coverage = (n_samples - starts[-1] * self.HOP) / (self.PARTIAL_FRAMES * self.HOP)
        return starts[:-1] if coverage < self.MIN_COVERAGE and len(starts) > 1 else starts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        partials, counts = [], []
        with torch.inference_mode():
            for wave in batch["wave"]:
                wave = normalize_volume(wave.astype(np.float32), -30.0)
                starts = self.partial_starts(len(wave))
                wave = np.pad(wave, (0, max(0, (starts[-1] + self.PARTIAL_FRAMES) * self.HOP - len(wave))))
                mel = self.mel(torch.from_numpy(wave)).T  # (frames, 40)
                partials += [mel[s : s + self.PARTIAL_FRAMES] for s in starts]
                counts.append(len(starts))
            embeds = torch.cat([self.net(torch.stack(partials[s : s + 256])) for s in range(0, len(partials), 256)])
            rows = np.repeat(np.arange(len(counts)), counts)
            vectors = torch.nn.functional.normalize(pool_windows(embeds, rows, len(counts), "mean"), dim=1)
        return {"path": batch["path"], "embedding": vectors.numpy(), "windows": np.array(counts)}


def decode(row: dict) -> dict:
    """soundfile decode, mono, torchaudio resample to 16 kHz (as Ray's audio benchmark does)."""
    import soundfile as sf
    import torchaudio

    wave, rate = sf.read(io.BytesIO(row["bytes"]), dtype="float32", always_2d=True)
    wave = torch.from_numpy(wave.mean(axis=1))
    if rate != 16000:
        wave = torchaudio.transforms.Resample(rate, 16000)(wave)
    return {"path": row["path"], "wave": wave.numpy()}


def bench_ray(folder: Path, outdir: str, weights: str, batch_size: int) -> tuple[float, int]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.get([ray.remote(lambda: None).remote() for _ in range(8)])  # time data, not startup
    # Ray sets OMP_NUM_THREADS=num_cpus (1) in its workers: the actor's torch runs on one
    # thread. That is what a typical user gets, so we leave it and report it.
    threads = ray.get(ray.remote(num_cpus=1)(lambda: torch.get_num_threads()).remote())
    t0 = time.perf_counter()
    (
        ray.data.read_binary_files(str(folder), include_paths=True, file_extensions=list(AUDIO_EXTENSIONS))
        .map(decode)
        .map_batches(
            Embedder,
            fn_constructor_kwargs={"weights": weights},
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=batch_size,
            num_cpus=1,
        )
        .write_parquet(outdir)
    )
    seconds = time.perf_counter() - t0
    ray.shutdown()  # give both cores back before omniembed starts its own Ray
    return seconds, threads


# --- (c) omniembed, end to end --------------------------------------------------------------


def run_omniembed(
    paths: list[Path],
    folder: Path,
    work: Path,
    args: argparse.Namespace,
    vectors: dict[str, np.ndarray],
    windows: dict[str, int],
) -> tuple[float, str, float]:
    """(c) on ``paths`` (all of ``folder``, or links to a prefix of it): every clip once, those
    the floor ran checked against its fp32 ``vectors`` and ``windows`` by clip name -> (seconds,
    resolved precision, min cosine)."""
    n, name = len(paths), f"omniembed {len(paths)} clips"
    folder = folder_of(paths, folder, args.clips, work / f"small-{n}")
    out = str(work / f"omniembed-{n}")
    seconds = embed_cli(folder, out, "audio", MODEL, args.precision, ["-vv"] if args.verbose else [])
    precision = manifest_precision(out, "audio")
    table = pq.read_table(out, columns=["id", "audio_embedding", "audio_error", "audio_windows"])
    assert table.column("audio_error").null_count == table.num_rows, f"{name}: rows with errors"
    ids = table.column("id").to_pylist()
    got = np.array(table.column("audio_embedding").to_pylist(), dtype=np.float32)
    cosine = check_vectors(name, ids, got, vectors, FAITHFUL_COSINE, [p.name for p in paths])
    check_windows(name, ids, table.column("audio_windows").to_numpy(), windows)
    return seconds, precision, cosine


def check_windows(name: str, ids: list[str], got: np.ndarray, windows: dict[str, int]) -> None:
    """Each clip the floor ran averaged as many windows as the floor's."""
    wrong = sum(int(w) != windows[i] for i, w in zip(ids, got) if i in windows)
    assert wrong == 0, f"{name}: {wrong} clips with another window count than the floor's"


# --- one-hour file: prepare's peak memory ----------------------------------------------------

RSS_PROBE = """
import json, resource, sys, time
sys.path.insert(0, {repo!r})
import pyarrow as pa
from encoders.audio.prepare import AudioPreprocess, prepare_audio
prep = AudioPreprocess.from_options({options!r})
prepare_audio(pa.array([{short!r}]), prep)  # imports and first-call allocations are not the call's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
prepared = prepare_audio(pa.array([{long!r}]), prep)
seconds = time.perf_counter() - t0
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert prepared.errors == [None], prepared.errors
print(json.dumps({{"before_kib": before, "after_kib": after, "seconds": seconds,
                  "samples": len(prepared.values[0])}}))
"""


def one_hour_memory(work: Path) -> None:
    """Peak RSS (ru_maxrss, KiB on Linux) of prepare_audio on a one-hour 48 kHz stereo WAV, in a
    fresh process, against that process's peak just before the call."""
    short = work / "short.wav"
    subprocess.run(["espeak-ng", "-v", VOICES[0], "-w", str(short), SENTENCES[0]], check=True, capture_output=True)
    path = work / "one_hour_48k_stereo.wav"
    t0 = time.perf_counter()
    write_long_wav(path, 3600, rate=48_000, channels=2, source=short)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.0f}s", flush=True)
    cases = {
        f"{MODEL} (64 x 1.6 s windows, hop 0.77 s)": {**MODELS.get(MODEL).defaults},
        "10 s windows, default cap (16)": {"preprocessing": {"sample_rate": 16000, "window_seconds": 10.0}},
    }
    for name, options in cases.items():
        options = {k: v for k, v in options.items() if k in ("preprocessing", "hop_seconds", "max_windows")}
        code = RSS_PROBE.format(repo=str(REPO), options=options, short=str(short), long=str(path))
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"one hour, {name}: ru_maxrss {r['before_kib'] / 1024:.0f} MiB before the call, "
            f"{r['after_kib'] / 1024:.0f} MiB after (+{(r['after_kib'] - r['before_kib']) / 1024:.0f} MiB); "
            f"{r['samples'] / 16000:.1f} s kept, {r['seconds']:.2f}s"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clips", type=int, default=12_000, help="(c): about 3 minutes of the bf16 floor on 2 cores")
    ap.add_argument("--floor-clips", type=int, default=4_800, help="(a) and (b) on the first N (rates)")
    ap.add_argument("--max-sentences", type=int, default=3, help="sentences per clip: 1..N (4 s each)")
    ap.add_argument("--batch-size", type=int, default=64, help="(b): clips per actor batch")
    ap.add_argument("--folder", help="reuse/write the clips here instead of a temp folder")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="(c): omniembed's")
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-omniembed", action="store_true")
    ap.add_argument("--small", type=int, help="(c) also on this many clips (default clips // 3; 0: skip)")
    ap.add_argument("--verbose", action="store_true", help="run omniembed with -vv (Ray Data operator stats)")
    ap.add_argument("--one-hour", action="store_true", help="only measure prepare's peak RSS on a 1 h file")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="omniembed-audio-bench-"))
    ray_threads, failed, runs = None, None, {}  # runs: clips -> (seconds, precision, min cosine)
    try:
        if args.one_hour:
            one_hour_memory(work)
            return 0
        up_start = uptime()  # every number here is CPU-bound: flag a busy machine
        print(f"start: {up_start}", flush=True)
        torch.set_num_threads(os.cpu_count() or 1)  # the floor uses every core
        floor_allocator()
        folder = Path(args.folder) if args.folder else work / "clips"
        paths = list_clips(folder)
        if len(paths) != args.clips:
            t0 = time.perf_counter()
            shutil.rmtree(folder, ignore_errors=True)
            paths = build_clips(folder, args.clips, args.seed, args.max_sentences)
            print(f"built {len(paths)} clips in {folder} in {time.perf_counter() - t0:.0f}s")
        print(f"{len(paths)} clips in {folder}, model {MODEL}, torch threads {torch.get_num_threads()}", flush=True)

        floor_paths = paths[: args.floor_clips]  # (a) and (b) are rates
        floors, fp32_vectors, floor_windows = bench_floors(floor_paths)
        floors, floor = choose_floor(floors)
        vectors = {p.name: v for p, v in zip(floor_paths, fp32_vectors)}
        windows = {p.name: int(w) for p, w in zip(floor_paths, floor_windows)}
        rows = []
        if not args.skip_ray:
            out, weights = str(work / "ray"), str(plan_speaker()[0].weights.path)
            ray_folder = folder_of(floor_paths, folder, len(paths), work / "floor-clips")
            seconds, ray_threads = bench_ray(ray_folder, out, weights, args.batch_size)
            table = pq.read_table(out)
            ids = [Path(p).name for p in table.column("path").to_pylist()]
            got = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
            cosine = check_vectors("ray-naive", ids, got, vectors, MIN_COSINE)
            check_windows("ray-naive", ids, table.column("windows").to_numpy(), windows)
            rows.append(("(b) ray-naive", len(floor_paths), seconds, f"fp32, min cosine to fp32 {cosine:.6f}"))
        small = len(paths) // 3 if args.small is None else args.small
        sizes = ([small] if 0 < small < len(paths) else []) + [len(paths)]
        try:  # a failure of (c) still reports (a) and (b), then exits 1
            for n in [] if args.skip_omniembed else sizes:
                runs[n] = run_omniembed(paths[:n], folder, work, args, vectors, windows)
        except (subprocess.CalledProcessError, OSError, KeyError, AssertionError) as exc:
            failed = f"omniembed FAILED: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nmachine: nproc={os.cpu_count()}; torch threads: floor {torch.get_num_threads()} "
        f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY') or 'default'})"
        + (f", ray actor {ray_threads} (OMP_NUM_THREADS from num_cpus=1)" if ray_threads else "")
    )
    for n, (seconds, precision, cosine) in sorted(runs.items()):
        note = f"precision {args.precision} -> {precision} (_manifest.json), min cosine to fp32 {cosine:.6f}"
        rows.append(("(c) omniembed", n, seconds, note))
    floors, floor = floor_again(floors, floor)
    print_table(floor_rows(floors, floor) + rows, floor, "clips")
    print_floor(floors, floor, "clips")
    if len(runs) == 2:  # (c) on n and on N clips: a fixed cost per run and a rate once running
        print_split({n: run[0] for n, run in runs.items()}, floor, "clips")
    print("\nsummary (a miss is reported, not an error):")
    print("  " + (verdict(len(paths), runs[len(paths)][0], floor) if len(paths) in runs else "c/a end to end: n/a"))
    print(f"uptime at start: {up_start}\nuptime at end:   {uptime()}")
    if failed:
        print(failed)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
