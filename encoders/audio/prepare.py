"""Audio for the CPU prepare stage: decode, mono, resample, cap; and the options every audio
family shares. The encoder's side (windows on its device, pooling per clip) is windows.py.

Prepared value, one per row (``AUDIO_TYPE``, Arrow ``list<float32>``; null when absent or bad):
    the clip from its start, mono, float32, at the model's ``sample_rate``, cut to at most
    ``prep.max_samples = window + (max_windows - 1) * hop`` samples. It is not padded: an encoder
    knows each window's real length (attention masks, partial windows) from the row's length.

Window plan (``plan_windows``, a pure function of the row's length, so it is never shipped):
    windows of ``window_seconds`` (the model's declared length) start at 0, hop, 2 hop, ...
    (``hop_seconds``, default the window length); there are ``1 + ceil(max(0, n - window) / hop)``
    so that every sample is covered; the last is dropped when less than ``min_coverage`` of it is
    audio (never the only one); then at most ``max_windows`` are kept. A row cut at
    ``max_samples`` gives exactly ``max_windows`` full windows.
    Where a window runs past the clip (a clip shorter than one window, or the last window) the
    missing samples are zeros (``AudioBatch.windows``). A clip shorter than the model's
    ``min_seconds`` is a ``too_short`` error.

Decode rules:
    - soundfile (libsndfile here reads WAV, FLAC, OGG/Vorbis/Opus, MP3 and the other
      ``soundfile.available_formats()``); ``torchaudio.load`` is not used (it needs torchcodec
      and FFmpeg).
    - Channels are averaged to mono. torchaudio's ``resample`` (windowed sinc) converts the rate.
    - Bad input becomes an error value: unreadable or truncated-header files and text files
      ``decode_failed``, absent paths ``missing_file``, non-path values ``bad_type``, clips under
      ``min_seconds`` ``too_short``. A file that ends before the length its header declares (a
      truncated WAV, MP3 or FLAC) is ``decode_failed``, not a silently shorter clip.
    - Silence is valid audio: the row gets a vector and the model decides what it means (AudioSet
      has a "Silence" class; the speaker encoder documents its rule).

Memory bound, per row: only the first ``ceil(max_samples * source_rate / sample_rate)`` frames
(plus a few for the resampler's filter) are read, in blocks of at most 4 MiB of interleaved
samples, each averaged to mono straight away; the resampler runs in chunks of 2^19 source samples
(``resample``). The peak is therefore about ``4 * max_samples * source_rate / sample_rate``
bytes (the mono prefix) + 4 MiB (a block) + ~30 MiB (one resampler chunk) + the output,
whatever the file's length or channel count: a one-hour 48 kHz stereo file costs what its first
``max_samples`` do. Nothing is read past that.
``max_windows`` defaults to 16: the clip vector is a mean of windows, and 16 windows (2.7 min of
10 s windows) describe a clip while one row stays under ~10 MiB of samples and bounded compute.

How an audio family uses this module:
    - options: merge ``AUDIO_OPTIONS`` into its table; in ``build_spec`` call
      ``resolve_audio_options(opts)``, which stores the declared data (``sample_rate``,
      ``window_seconds``, ``min_seconds``, ``min_coverage``) as ``preprocessing`` and checks the
      window options; a declared front end is read with ``declared_features``;
    - prepare: ``prepare_audio(values, AudioPreprocess.from_options(spec.options))``;
    - the family subclasses ``AudioFamily`` (family.py: this prepare, and ``<output>_windows``);
    - encode (windows.py): ``batch = audio_batch(values, prep, device)``; ``batch.windows(i, j,
      context)`` -> (w, samples) float32 on the device for micro-batches of windows,
      ``batch.window_lengths()`` for masks; ``pool_windows(vectors, batch.window_rows, n, mode)``
      -> (n, d); return ``EncodeResult(vectors, batch.valid, {"windows": batch.counts})``.
"""

from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch

from encoders.audio.resample import Resampler
from encoders.core.errors import error_value
from encoders.core.files import RowError, open_input
from encoders.core.spec import Prepared

AUDIO_TYPE = pa.list_(pa.float32())  # per row: mono float32 samples at the model's rate
DEFAULT_MAX_WINDOWS = 16  # 16 x 10 s windows = 2.7 min per clip, 10 MiB of samples per row at 16 kHz
DEFAULT_MIN_SECONDS = 0.1
DEFAULT_MIN_COVERAGE = 0.5
WINDOW_POOLINGS = ("mean", "max", "first")
_BLOCK_VALUES = 1 << 20  # interleaved samples per read: 4 MiB of float32
_RESAMPLE_BUCKET = 1 << 15  # resampler inputs are padded to a multiple of this (``_resample_bucketed``)
_WAV_SHORT = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)  # libsndfile's log
_PREPROCESS_KEYS = ("sample_rate", "window_seconds", "min_seconds", "min_coverage")

# Options every audio family takes (merge into its table): name -> (type, default).
# ``preprocessing`` is the model's declared data; the others are the user's knobs.
AUDIO_OPTIONS: dict[str, tuple[Any, Any]] = {
    "preprocessing": (dict, None),
    "hop_seconds": ((int, float), None),
    "max_windows": (int, DEFAULT_MAX_WINDOWS),
    "window_pooling": (str, "mean"),
}


@dataclass(frozen=True)
class AudioPreprocess:
    """How clips become model windows. ``sample_rate``, ``window_seconds``, ``min_seconds`` and
    ``min_coverage`` are the model's declared data (option ``preprocessing``); ``hop_seconds``
    and ``max_windows`` are top-level options a user may change."""

    sample_rate: int
    window_seconds: float
    hop_seconds: float
    max_windows: int = DEFAULT_MAX_WINDOWS
    min_seconds: float = DEFAULT_MIN_SECONDS
    min_coverage: float = DEFAULT_MIN_COVERAGE

    @property
    def window_samples(self) -> int:
        return round(self.window_seconds * self.sample_rate)

    @property
    def hop_samples(self) -> int:
        return round(self.hop_seconds * self.sample_rate)

    @property
    def max_samples(self) -> int:
        """The most samples a row keeps: ``max_windows`` windows."""
        return self.window_samples + (self.max_windows - 1) * self.hop_samples

    @property
    def min_window_samples(self) -> int:
        """Audio samples a last window needs to be kept (``min_coverage`` of a window, in whole
        samples: 0.99 x 102400 must be 101376, not a float a hair above it)."""
        return math.ceil(self.min_coverage * self.window_samples - 1e-6)

    @property
    def min_samples(self) -> int:
        return max(1, math.ceil(self.min_seconds * self.sample_rate))

    @classmethod
    def from_options(cls, options: Mapping[str, Any], where: str = "preprocessing") -> "AudioPreprocess":
        raw = options.get("preprocessing")
        if not isinstance(raw, Mapping):
            raise ValueError(f"{where}: the model declares no audio preprocessing (sample_rate, window_seconds)")
        missing = [k for k in ("sample_rate", "window_seconds") if k not in raw]
        if missing:
            raise ValueError(
                f"{where}: missing {missing[0]!r}; give sample_rate and window_seconds (and min_seconds, min_coverage)"
            )
        unknown = sorted(set(raw) - set(_PREPROCESS_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_PREPROCESS_KEYS)}")
        window = float(raw["window_seconds"])
        hop = options.get("hop_seconds")
        prep = cls(
            int(raw["sample_rate"]),
            window,
            window if hop is None else float(hop),
            int(DEFAULT_MAX_WINDOWS if options.get("max_windows") is None else options["max_windows"]),
            float(raw.get("min_seconds", DEFAULT_MIN_SECONDS)),
            float(raw.get("min_coverage", DEFAULT_MIN_COVERAGE)),
        )
        if prep.sample_rate < 1 or prep.window_samples < 1:
            raise ValueError(f"{where}: sample_rate and window_seconds must give at least one sample per window")
        if prep.hop_samples < 1:
            raise ValueError(f"option hop_seconds: must be > 0 (at least one sample), got {hop!r}")
        if prep.max_windows < 1:
            raise ValueError(f"option max_windows: must be >= 1, got {prep.max_windows}")
        if not 0 <= prep.min_coverage <= 1:
            raise ValueError(f"{where}.min_coverage: must be between 0 and 1, got {prep.min_coverage}")
        if prep.min_seconds < 0:
            raise ValueError(f"{where}.min_seconds: must be >= 0, got {prep.min_seconds}")
        return prep

    def as_dict(self) -> dict[str, Any]:
        """The ``preprocessing`` option (the declared part; hop and cap stay top-level options)."""
        return {key: getattr(self, key) for key in _PREPROCESS_KEYS}


def validate_window_pooling(value: str) -> str:
    if value not in WINDOW_POOLINGS:
        raise ValueError(f"option window_pooling: {value!r} is not valid; valid values: {', '.join(WINDOW_POOLINGS)}")
    return value


def resolve_audio_options(opts: dict[str, Any]) -> AudioPreprocess:
    """The shared audio options of a family's table, checked: ``preprocessing`` stored as plain
    data, ``hop_seconds`` and ``max_windows`` resolved (the metadata shows them), the pooling."""
    prep = AudioPreprocess.from_options(opts)
    opts["preprocessing"] = prep.as_dict()
    opts["hop_seconds"], opts["max_windows"] = prep.hop_seconds, prep.max_windows
    validate_window_pooling(opts["window_pooling"])
    return prep


def declared_features(options: Mapping[str, Any], keys: tuple[str, ...], int_keys: tuple[str, ...]) -> dict[str, Any]:
    """A front end the model declares as data (option ``features``: exactly ``keys``), as numbers."""
    raw = options.get("features")
    if not isinstance(raw, Mapping):
        raise ValueError(f"option features: the model declares no front end ({', '.join(keys)})")
    missing = [k for k in keys if k not in raw]
    unknown = sorted(set(raw) - set(keys))
    if missing or unknown:
        problem = f"missing {missing[0]!r}" if missing else f"unknown key {unknown[0]!r}"
        raise ValueError(f"option features: {problem}; valid keys: {', '.join(keys)}")
    return {k: int(raw[k]) if k in int_keys else float(raw[k]) for k in keys}


def prepare_audio(values: pa.Array, prep: AudioPreprocess) -> Prepared:
    """Paths/URIs (str) or encoded bytes -> per row the prepared waveform (see the module
    docstring; null when absent or bad) and error values. Never raises for a bad row."""
    clips: list[np.ndarray | None] = [None] * len(values)
    errors: list[str | None] = [None] * len(values)
    for i, value in enumerate(values.to_pylist()):
        if value is None:
            continue
        try:
            clips[i] = decode_audio(value, prep)
        except RowError as exc:
            errors[i] = error_value(exc.code, str(exc))
    return Prepared(waveforms_to_arrow(clips), errors)


def waveforms_to_arrow(clips: list[np.ndarray | None]) -> pa.Array:
    """(n_i,) float32 arrays or None -> ``list<float32>`` without a Python float per sample."""
    lengths = np.array([0 if c is None else len(c) for c in clips], dtype=np.int32)
    offsets = np.zeros(len(clips) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    kept = [c for c in clips if c is not None]
    flat = np.concatenate(kept).astype(np.float32, copy=False) if kept else np.zeros(0, np.float32)
    mask = pa.array([c is None for c in clips], type=pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat), mask=mask, type=AUDIO_TYPE)


def decode_audio(value: Any, prep: AudioPreprocess) -> np.ndarray:
    """A path/URI or bytes -> (n,) float32 mono at ``prep.sample_rate``, n <= ``prep.max_samples``.
    Raises ``RowError`` for a bad row."""
    import soundfile as sf

    with open_input(value) as handle:
        try:
            # A local file is read by libsndfile through its descriptor, not through Python
            # read callbacks (~10% of a FLAC decode).
            source = handle.fileno() if isinstance(handle, io.BufferedReader) else handle
            with sf.SoundFile(source, closefd=False) as audio:
                source_rate = int(audio.samplerate)
                _check_wav_header(audio)
                mono = _read_mono(audio, _source_frames_needed(prep, source_rate))
        except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as exc:
            # LibsndfileError's own text names the file object; its error_string is the reason.
            message = (getattr(exc, "error_string", None) or str(exc) or type(exc).__name__).splitlines()[0][:200]
            raise RowError("decode_failed", f"not audio soundfile can read ({message})") from None
    if source_rate < 1:
        raise RowError("decode_failed", f"sample rate {source_rate} in the header")
    if not np.isfinite(mono).all():
        raise RowError("decode_failed", "the samples contain NaN or infinity")
    seconds = len(mono) / source_rate
    if seconds * prep.sample_rate < prep.min_samples:
        raise RowError("too_short", f"{seconds:.3f} s of audio; the model needs at least {prep.min_seconds:g} s")
    wave = resample(mono, source_rate, prep.sample_rate)
    return wave[: prep.max_samples].astype(np.float32, copy=False)


def resample(wave: np.ndarray, source_rate: int, target_rate: int, chunk: int = 1 << 19) -> np.ndarray:
    """(n_src,) float32 -> (ceil(n_src * target / source),) with torchaudio's ``resample``, in
    chunks: its convolution unfolds the whole input (about 25 bytes per output sample per filter
    tap, 200 MB for 3 minutes at 48 kHz), so each chunk of ``chunk`` output-aligned source
    samples is resampled with enough neighbours on both sides for the filter and only its own
    outputs are kept. The result equals a single call up to float rounding."""
    if source_rate == target_rate:
        return wave
    step = source_rate // math.gcd(source_rate, target_rate)  # source samples per output period
    outputs = target_rate // math.gcd(source_rate, target_rate)
    context = step * (8 + math.ceil(64 / step))  # > the filter's reach (about 6.1 x step + 1)
    chunk = max(step, chunk // step * step)
    total = math.ceil(len(wave) * outputs / step)
    if len(wave) <= chunk + 2 * context:
        return _resample_bucketed(wave, source_rate, target_rate)
    out = np.empty(total, dtype=np.float32)
    for start in range(0, len(wave), chunk):
        left = max(0, start - context)
        piece = _resample_bucketed(wave[left : start + chunk + context], source_rate, target_rate)
        first = (start - left) // step * outputs  # the chunk's first output within the piece
        begin, end = start // step * outputs, min(total, (start + chunk) // step * outputs)
        out[begin:end] = piece[first : first + end - begin]
    return out


def _resample_bucketed(wave: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """torchaudio's resample of ``wave`` computed on the wave with zeros appended up to a
    multiple of ``_RESAMPLE_BUCKET`` source samples, then cut to ``ceil(n * target / source)``:
    the kernel pads the end with zeros anyway, so the result is identical, and the convolution
    sees few distinct lengths. oneDNN compiles a primitive per input length; a new length costs
    about 3 ms, twice the resample of a 9 s clip itself."""
    n = len(wave)
    size = -(-n // _RESAMPLE_BUCKET) * _RESAMPLE_BUCKET
    padded = np.zeros(size, dtype=np.float32)
    padded[:n] = wave
    out = _resampler(source_rate, target_rate)(torch.from_numpy(padded)).numpy()
    divisor = math.gcd(source_rate, target_rate)
    # torchaudio's own output length, computed as it computes it
    return out[: int(torch.ceil(torch.as_tensor(target_rate // divisor * n / (source_rate // divisor))))]


@functools.lru_cache(maxsize=32)
def _resampler(source_rate: int, target_rate: int) -> Resampler:
    """torchaudio's windowed sinc (``functional.resample``'s kernel) built once per rate pair:
    building it is about half of a short clip's resample. Only the taps each output uses are
    computed (encoders/audio/resample.py)."""
    return Resampler(source_rate, target_rate)


def _source_frames_needed(prep: AudioPreprocess, source_rate: int) -> int:
    # Frames for max_samples output samples, plus room for the resampler's filter (its width is
    # about 6 zero crossings of the lower rate), so the kept samples equal a resample of the whole.
    ratio = source_rate / prep.sample_rate
    return math.ceil(prep.max_samples * ratio) + 16 * math.ceil(max(ratio, 1.0)) + 16


def _check_wav_header(audio: Any) -> None:
    """A WAV whose data chunk is shorter than its header says was cut short: libsndfile quietly
    reads what is there, so its header log decides. Streaming headers (size 0 or 2^32 - 1,
    written before the length was known) are not truncation."""
    match = _WAV_SHORT.search(getattr(audio, "extra_info", "") or "")
    if match and int(match.group(1)) not in (0, 0x7FFFFFFF, 0xFFFFFFFF) and int(match.group(1)) > int(match.group(2)):
        raise RowError(
            "decode_failed",
            f"truncated: the header declares {match.group(1)} bytes of samples, the file holds {match.group(2)}",
        )


def _read_mono(audio: Any, limit: int) -> np.ndarray:
    """The first ``limit`` frames of an open SoundFile, averaged over channels, block by block."""
    channels = max(1, int(audio.channels))
    known = int(audio.frames) if audio.frames and audio.frames > 0 else limit
    out = np.empty(min(limit, known), dtype=np.float32)
    block = max(1024, _BLOCK_VALUES // channels)
    filled = 0
    while filled < limit:
        frames = audio.read(frames=min(block, limit - filled), dtype="float32", always_2d=True)  # (f, c)
        if len(frames) == 0:
            break
        if filled + len(frames) > len(out):  # the header undercounted (streams): grow
            out = np.concatenate([out[:filled], np.empty(max(len(frames), len(out)), np.float32)])
        out[filled : filled + len(frames)] = frames.mean(axis=1) if channels > 1 else frames[:, 0]
        filled += len(frames)
    declared = int(audio.frames) if audio.frames and audio.frames > 0 else 0
    wanted = min(limit, declared)
    # Compressed formats estimate their length a little (MP3 without a Xing header): allow 1%.
    if declared and filled + max(2304, wanted // 100) < wanted:
        raise RowError(
            "decode_failed", f"truncated: the file ends after {filled} of the {declared} frames its header declares"
        )
    return out[:filled]
