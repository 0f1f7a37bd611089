"""Audio on the encoder's side: the window plan of each prepared clip, the clips of one call on
the device with windows cut there on demand (``AudioBatch``), and window vectors pooled per clip.

The window rule is in encoders/audio/prepare.py's docstring; ``plan_windows`` is a pure function
of a row's length, so the plan is never shipped from the prepare task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from encoders.audio.prepare import AudioPreprocess, validate_window_pooling
from encoders.core.device import DeviceModel
from encoders.core.spec import EncodeResult, EncoderSpec, check_dim


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
            padded = torch.zeros(
                max(position, left + self.prep.window_samples + right), dtype=self.flat.dtype, device=self.flat.device
            )
            for r in np.flatnonzero(lengths):
                padded[bases[r] : bases[r] + lengths[r]] = self.flat[self.offsets[r] : self.offsets[r + 1]]
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
        self.flat = self.flat * torch.repeat_interleave(
            factors.to(self.flat.dtype), lengths, output_size=self.flat.numel()
        )
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
        offsets=offsets,
        valid=valid,
        counts=counts,
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
        out[torch.from_numpy(window_rows[first]).to(vectors.device)] = vectors[
            torch.from_numpy(first).to(vectors.device)
        ]
        return out
    counts = torch.bincount(rows, minlength=n_rows).clamp_(min=1).to(vectors.dtype)
    return out.index_add_(0, rows, vectors) / counts[:, None]


class WindowEncoder(DeviceModel):
    """The model half of a family whose model takes one window at a time (hf-audio, hf-clap):
    prepared clips -> windows on the device -> micro-batched forwards -> window vectors pooled
    per clip. Subclasses set ``options``, ``device`` and ``dim`` and define ``_embed``."""

    dim: int
    exact_lengths = False  # True: only windows with the same number of real samples share a forward

    def _embed(self, waves: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(w, samples) windows on the device (zeros past each length), (w,) lengths -> (w, d) float32."""
        raise NotImplementedError

    def _check_dim(self, spec: EncoderSpec) -> None:
        prep = AudioPreprocess.from_options(spec.options)
        probe = torch.zeros((1, prep.window_samples), dtype=torch.float32, device=self.device)  # silence
        with torch.inference_mode():
            self.dim = check_dim(
                spec, int(self._embed(probe, torch.tensor([prep.window_samples], device=self.device)).shape[1])
            )

    def encode_audio(self, values: pa.Array) -> EncodeResult:
        batch = audio_batch(values, AudioPreprocess.from_options(self.options), self.device)
        lengths = torch.from_numpy(batch.window_lengths()).to(self.device)  # (W,)
        vectors = torch.zeros((batch.n_windows, self.dim), dtype=torch.float32, device=self.device)
        step = self.options["micro_batch"]
        with torch.inference_mode():
            for start in range(0, batch.n_windows, step):
                waves, stop = batch.windows(start, start + step), min(start + step, batch.n_windows)  # (w, window)
                for index in _same_length_groups(lengths[start:stop]) if self.exact_lengths else [None]:
                    if index is None:
                        longest = int(lengths[start:stop].max())
                        vectors[start:stop] = self._embed(waves[:, :longest], lengths[start:stop])
                    else:
                        n = int(lengths[start + index[0]])
                        vectors[start + index] = self._embed(waves[index, :n], lengths[start + index])
            if self.options["normalize"]:
                vectors = torch.nn.functional.normalize(vectors, dim=1)
            pooled = pool_windows(vectors, batch.window_rows, len(batch.valid), self.options["window_pooling"])
            if self.options["normalize"]:
                pooled = torch.nn.functional.normalize(pooled, dim=1)
        valid = batch.valid & (batch.counts > 0)
        return EncodeResult(pooled.cpu().numpy(), valid, {"windows": batch.counts.astype(np.int64)})


def _same_length_groups(lengths: torch.Tensor) -> list[torch.Tensor]:
    """Indices into ``lengths`` grouped by value: windows that can share a forward unpadded."""
    return [torch.nonzero(lengths == n).flatten() for n in torch.unique(lengths)]
