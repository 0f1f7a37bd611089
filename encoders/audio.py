"""Audio for the CPU prepare stage (decode, mono, resample, cap) and for the encoder (windows on
its device, pooling per clip).

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
    - options: merge ``AUDIO_OPTIONS`` into its table; in ``build_spec`` store
      ``AudioPreprocess.from_options(opts).as_dict()`` as ``preprocessing`` (declared data:
      ``sample_rate``, ``window_seconds``, ``min_seconds``, ``min_coverage``) and check
      ``validate_window_pooling(opts["window_pooling"])``;
    - prepare: ``prepare_audio(values, AudioPreprocess.from_options(spec.options))``;
    - encode: ``batch = audio_batch(values, prep, device)``; ``batch.windows(i, j, context)`` ->
      (w, samples) float32 on the device for micro-batches of windows, ``batch.window_lengths()``
      for masks; ``pool_windows(vectors, batch.window_rows, n, mode)`` -> (n, d); return
      ``(vectors, batch.valid, {"windows": batch.counts})`` (``<output>_windows``).
"""
from __future__ import annotations

import functools
import io
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from encoders.errors import error_value
from encoders.files import RowError, open_input
from encoders.spec import Prepared

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
            raise ValueError(f"{where}: missing {missing[0]!r}; give sample_rate and window_seconds "
                             "(and min_seconds, min_coverage)")
        unknown = sorted(set(raw) - set(_PREPROCESS_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}; valid keys: {', '.join(_PREPROCESS_KEYS)}")
        window = float(raw["window_seconds"])
        hop = options.get("hop_seconds")
        prep = cls(int(raw["sample_rate"]), window, window if hop is None else float(hop),
                   int(DEFAULT_MAX_WINDOWS if options.get("max_windows") is None else options["max_windows"]),
                   float(raw.get("min_seconds", DEFAULT_MIN_SECONDS)),
                   float(raw.get("min_coverage", DEFAULT_MIN_COVERAGE)))
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
        return {"sample_rate": self.sample_rate, "window_seconds": self.window_seconds,
                "min_seconds": self.min_seconds, "min_coverage": self.min_coverage}


def validate_window_pooling(value: str) -> str:
    if value not in WINDOW_POOLINGS:
        raise ValueError(f"option window_pooling: {value!r} is not valid; valid values: {', '.join(WINDOW_POOLINGS)}")
    return value


# --- prepare (CPU task) -----------------------------------------------------------------------

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
        piece = _resample_bucketed(wave[left: start + chunk + context], source_rate, target_rate)
        first = (start - left) // step * outputs  # the chunk's first output within the piece
        begin, end = start // step * outputs, min(total, (start + chunk) // step * outputs)
        out[begin:end] = piece[first: first + end - begin]
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
def _resampler(source_rate: int, target_rate: int) -> torch.nn.Module:
    """torchaudio's ``Resample`` (the same windowed sinc as ``functional.resample``) with its
    kernel built once per rate pair: building it is about half of a short clip's resample."""
    import torchaudio.transforms as AT

    return AT.Resample(source_rate, target_rate, dtype=torch.float32)  # as functional.resample on float32


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
        raise RowError("decode_failed", f"truncated: the header declares {match.group(1)} bytes of samples, "
                                        f"the file holds {match.group(2)}")


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
        out[filled: filled + len(frames)] = frames.mean(axis=1) if channels > 1 else frames[:, 0]
        filled += len(frames)
    declared = int(audio.frames) if audio.frames and audio.frames > 0 else 0
    wanted = min(limit, declared)
    # Compressed formats estimate their length a little (MP3 without a Xing header): allow 1%.
    if declared and filled + max(2304, wanted // 100) < wanted:
        raise RowError("decode_failed", f"truncated: the file ends after {filled} of the {declared} frames its header declares")
    return out[:filled]


# --- encoder side -----------------------------------------------------------------------------

def plan_windows(n_samples: int, prep: AudioPreprocess) -> np.ndarray:
    """The start sample of each window of a clip of ``n_samples`` (rule in the module docstring)."""
    window, hop = prep.window_samples, prep.hop_samples
    count = 1 + max(0, math.ceil((n_samples - window) / hop))
    if count > 1 and n_samples - (count - 1) * hop < prep.min_window_samples:
        count -= 1
    return np.arange(min(count, prep.max_windows), dtype=np.int64) * hop


@dataclass
class AudioBatch:
    """One encoder call's prepared clips on the encoder's device, with their window plan.
    Windows are listed row by row, in time order."""

    flat: torch.Tensor  # (T,) float32: the non-null clips end to end
    offsets: np.ndarray  # (n + 1,) int64: row i is flat[offsets[i]:offsets[i + 1]]
    valid: np.ndarray  # (n,) bool: rows that have a clip
    counts: np.ndarray  # (n,) int64: windows per row (0 where not valid)
    window_rows: np.ndarray  # (W,) int64: the row of each window
    window_starts: np.ndarray  # (W,) int64: each window's first sample within its row
    prep: AudioPreprocess
    _layouts: dict = field(default_factory=dict, repr=False)  # (context, align) -> layout()

    @property
    def n_windows(self) -> int:
        return len(self.window_rows)

    def lengths(self) -> np.ndarray:
        """(n,) int64 samples per row."""
        return np.diff(self.offsets)

    def window_lengths(self) -> np.ndarray:
        """(W,) int64: samples of audio in each window (the rest of the window is zeros)."""
        return np.clip(self.lengths()[self.window_rows] - self.window_starts, 0, self.prep.window_samples)

    def row_reduce(self, values: torch.Tensor, reduce: str) -> torch.Tensor:
        """(T,) per-sample values (e.g. ``flat ** 2``) -> (n,) their ``sum`` or ``max`` per row
        (0 for rows without samples), in segments: no per-sample row index is built."""
        lengths = torch.from_numpy(self.lengths()).to(values.device)
        return torch.segment_reduce(values, reduce, lengths=lengths, unsafe=True, initial=0)

    def layout(self, context: tuple[int, int] = (0, 0), align: int = 1) -> tuple[torch.Tensor, np.ndarray]:
        """The rows copied into one zero-filled tensor on the device, each with zeros around it:
        -> ``(padded, bases)``, row r's sample 0 at ``padded[bases[r]]``, at least ``left`` zeros
        before it and zeros after it for as far as its last window reaches (+ ``right``), and
        ``(bases[r] - left) % align == 0`` (so frames of hop ``align`` fall on the same samples
        in every row). Every window is then one contiguous slice. Cached per (context, align)."""
        key = (context, align)
        if key not in self._layouts:
            left, right = context
            lengths = self.lengths()
            window_ends = np.zeros(len(lengths), dtype=np.int64)  # the furthest sample a row's windows reach
            if self.n_windows:
                np.maximum.at(window_ends, self.window_rows, self.window_starts + self.prep.window_samples)
            spans = np.maximum(lengths, window_ends) + right  # a row's samples and trailing zeros
            bases = np.zeros(len(lengths), dtype=np.int64)
            position = 0
            for r, span in enumerate(spans):
                start = -(-position // align) * align  # the row's leading context starts here
                bases[r] = start + left
                position = bases[r] + span
            padded = torch.zeros(max(position, left + self.prep.window_samples + right), dtype=self.flat.dtype,
                                 device=self.flat.device)
            for r in np.flatnonzero(lengths):
                padded[bases[r]: bases[r] + lengths[r]] = self.flat[self.offsets[r]: self.offsets[r + 1]]
            self._layouts[key] = (padded, bases)
        return self._layouts[key]

    def windows(self, start: int = 0, stop: int | None = None, context: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """Windows ``start:stop`` -> (w, left + window + right) float32 on the device. Each spans
        its row's samples [s - left, s + window + right); samples outside the row are zeros.
        ``context`` lets a centred STFT see the neighbours it would see over the whole clip."""
        stop = self.n_windows if stop is None else min(stop, self.n_windows)
        left, right = context
        size = left + self.prep.window_samples + right
        if stop <= start:
            return torch.zeros((0, size), dtype=torch.float32, device=self.flat.device)
        padded, bases = self.layout(context)
        firsts = bases[self.window_rows[start:stop]] + self.window_starts[start:stop] - left
        # Every window is a slice of ``padded``: one strided view, one copy of the rows asked for.
        return padded.unfold(0, size, 1)[torch.from_numpy(firsts).to(padded.device)]

    def scale_rows(self, factors: torch.Tensor) -> None:
        """Multiply each row's samples by its factor ((n,) on the device), in place."""
        lengths = torch.from_numpy(self.lengths()).to(self.flat.device)
        self.flat = self.flat * torch.repeat_interleave(factors.to(self.flat.dtype), lengths, output_size=self.flat.numel())
        self._layouts.clear()


def audio_batch(values: pa.Array, prep: AudioPreprocess, device: torch.device | str = "cpu") -> AudioBatch:
    """Prepared values (``AUDIO_TYPE``) -> an ``AudioBatch`` on ``device``: one copy of the samples
    to the device, windows cut there on demand."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    valid = ~values.is_null().to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = values.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    plans = [plan_windows(int(n), prep) if ok else np.zeros(0, np.int64) for n, ok in zip(lengths, valid)]
    counts = np.array([len(p) for p in plans], dtype=np.int64)
    return AudioBatch(
        # Arrow's buffers are read-only: one copy (as the device transfer would make anyway).
        flat=torch.from_numpy(flat.copy() if not flat.flags.writeable else flat).to(device),
        offsets=offsets, valid=valid, counts=counts,
        window_rows=np.repeat(np.arange(len(values), dtype=np.int64), counts),
        window_starts=np.concatenate(plans) if plans else np.zeros(0, np.int64),
        prep=prep,
    )


def pool_windows(vectors: torch.Tensor, window_rows: np.ndarray, n_rows: int, mode: str = "mean") -> torch.Tensor:
    """(W, d) window vectors -> (n_rows, d) clip vectors: ``mean``, ``max`` or ``first`` over each
    row's windows. Rows without windows get zeros (their valid flag is False)."""
    validate_window_pooling(mode)
    rows = torch.from_numpy(window_rows).to(vectors.device)
    out = torch.zeros((n_rows, vectors.shape[1]), dtype=vectors.dtype, device=vectors.device)
    if vectors.shape[0] == 0:
        return out
    if mode == "max":
        index = rows[:, None].expand_as(vectors)
        return out.scatter_reduce_(0, index, vectors, reduce="amax", include_self=False)
    if mode == "first":
        first = np.flatnonzero(np.r_[True, window_rows[1:] != window_rows[:-1]])  # rows are grouped
        out[torch.from_numpy(window_rows[first]).to(vectors.device)] = vectors[torch.from_numpy(first).to(vectors.device)]
        return out
    counts = torch.bincount(rows, minlength=n_rows).clamp_(min=1).to(vectors.dtype)
    return out.index_add_(0, rows, vectors) / counts[:, None]
