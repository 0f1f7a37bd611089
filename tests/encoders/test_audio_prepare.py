"""The audio prepare stage (encoders/audio/prepare.py): bad audio becomes error values and no row is lost,
decoded samples match librosa's decode of the same files, long files are capped without being
read whole, and the encoder-side window cutting and pooling match a direct numpy computation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

import encoders.audio.prepare as audio
from encoders.audio.prepare import AudioPreprocess, prepare_audio
from encoders.audio.windows import audio_batch, plan_windows, pool_windows
from encoders.core.errors import error_code
from tests.audio_data import speak, write_bad_files, write_long_wav

PREP = AudioPreprocess.from_options(
    {
        "preprocessing": {"sample_rate": 16000, "window_seconds": 1.0, "min_seconds": 0.1, "min_coverage": 0.5},
        "hop_seconds": 0.5,
        "max_windows": 8,
    }
)


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    folder = tmp_path_factory.mktemp("bad-audio")
    return folder, write_bad_files(folder)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1])


def test_bad_audio_becomes_error_values_and_no_row_is_lost(bad_files):
    folder, expected = bad_files
    names = list(expected)
    values = [str(folder / n) for n in names] + [None]
    prepared = prepare_audio(pa.array(values), PREP)
    assert len(prepared.values) == len(prepared.errors) == len(values)
    for name, value, error in zip(names, prepared.values.to_pylist(), prepared.errors):
        assert (error_code(error) if error else None) == expected[name], (name, error)
        assert (value is None) == (error is not None), name
    assert prepared.values[-1].as_py() is None and prepared.errors[-1] is None  # null: absent
    assert "truncated" in prepared.errors[names.index("truncated.wav")]


def test_decoded_samples_match_librosa(bad_files):
    """Every readable format and layout decodes to the same speech as librosa's own decode and
    resample (soxr) of the original: mono, 16 kHz, same start."""
    librosa = pytest.importorskip("librosa", reason="extra 'dev' not installed")
    folder, expected = bad_files
    good = [n for n, code in expected.items() if code is None and n != "silence.wav"]
    prepared = prepare_audio(pa.array([str(folder / n) for n in good]), PREP)
    reference, _ = librosa.load(folder / "voice.wav", sr=16000, mono=True)
    for name, value in zip(good, prepared.values.to_pylist()):
        wave = np.asarray(value, dtype=np.float32)
        assert abs(len(wave) - len(reference)) <= 16 * 8, name  # mp3/ogg frame padding at most
        # Lossless and channel/rate conversions are near identical; lossy codecs less so.
        floor = 0.95 if name.endswith((".mp3", ".ogg")) or name == "8k.wav" else 0.999
        assert correlation(wave, reference) >= floor, name
    silence = prepare_audio(pa.array([str(folder / "silence.wav")]), PREP).values[0].as_py()
    assert len(silence) == 32000 and not any(silence)


def test_bytes_file_uri_and_fsspec_uri(tmp_path):
    import fsspec

    clip = speak(tmp_path / "a.wav", "Hello there, this is a test.")
    data = clip.read_bytes()
    with fsspec.filesystem("memory").open("/audio/a.wav", "wb") as handle:
        handle.write(data)
    by_path = prepare_audio(pa.array([str(clip)]), PREP).values[0].as_py()
    for value in (f"file://{clip}", "memory://audio/a.wav"):
        assert prepare_audio(pa.array([value]), PREP).values[0].as_py() == by_path, value
    from_bytes = prepare_audio(pa.array([data, b"", None]), PREP)
    assert from_bytes.values[0].as_py() == by_path
    assert error_code(from_bytes.errors[1]) == "decode_failed" and from_bytes.errors[2] is None
    assert error_code(prepare_audio(pa.array(["memory://audio/none.wav"]), PREP).errors[0]) == "missing_file"


def test_long_file_is_capped_without_reading_it_all(tmp_path, monkeypatch):
    """A 10-minute 48 kHz stereo WAV (110 MiB): only the first max_windows windows' worth of
    frames (plus the resampler's margin) is read, and those samples equal the decode of a file
    holding only that prefix."""
    source = speak(tmp_path / "s.wav", "The quick brown fox jumps over the lazy dog.")
    long_wav = write_long_wav(tmp_path / "long.wav", 600, source=source)
    read = {"bytes": 0}
    real_open = audio.open_input

    class Counting:
        def __init__(self, handle):
            self.handle = handle

        def read(self, size=-1):
            data = self.handle.read(size)
            read["bytes"] += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def counting_open(value):
        import contextlib

        @contextlib.contextmanager
        def wrapped():
            with real_open(value) as handle:
                yield Counting(handle)

        return wrapped()

    monkeypatch.setattr(audio, "open_input", counting_open)
    wave = np.asarray(prepare_audio(pa.array([str(long_wav)]), PREP).values[0].as_py(), np.float32)
    assert len(wave) == PREP.max_samples == 16000 + 7 * 8000
    needed = PREP.max_samples * 3 * 2 * 2  # 48k/16k source frames x 2 channels x 2 bytes
    assert read["bytes"] <= needed + 64 * 1024, read  # a few blocks of header and margin at most
    assert long_wav.stat().st_size > 100 * needed
    monkeypatch.undo()
    import soundfile as sf

    head, rate = sf.read(long_wav, frames=PREP.max_samples * 3 + 4800, dtype="float32")
    sf.write(tmp_path / "head.wav", head, rate, subtype="PCM_16")
    reference = np.asarray(prepare_audio(pa.array([str(tmp_path / "head.wav")]), PREP).values[0].as_py(), np.float32)
    assert np.allclose(wave, reference, atol=1e-6)
    assert len(plan_windows(len(wave), PREP)) == PREP.max_windows


@pytest.mark.parametrize("source, target", [(48000, 16000), (44100, 16000), (8000, 16000), (22050, 48000)])
def test_chunked_resample_equals_one_torchaudio_call(source, target):
    import torchaudio.functional as AF

    wave = np.random.default_rng(0).standard_normal(300_001).astype(np.float32)
    chunked = audio.resample(wave, source, target, chunk=1 << 14)
    whole = AF.resample(torch.from_numpy(wave), source, target).numpy()
    assert chunked.shape == whole.shape and np.abs(chunked - whole).max() < 1e-5


@pytest.mark.parametrize("n", [1, 441, 32_767, 32_769, 100_003])
def test_bucketed_resample_has_torchaudios_length_and_samples(n):
    """Inputs are zero-padded to a bucket length before the convolution (a oneDNN primitive per
    distinct length is expensive); the output still has torchaudio's length and values."""
    import torchaudio.functional as AF

    wave = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    for source in (44100, 22050, 48000):
        ours = audio.resample(wave, source, 16000)
        reference = AF.resample(torch.from_numpy(wave), source, 16000).numpy()
        assert ours.shape == reference.shape, (n, source)
        assert np.abs(ours - reference).max() < 1e-6, (n, source)


@pytest.mark.parametrize(
    "source, target, banded",
    [(22050, 16000, True), (44100, 16000, True), (11025, 16000, True), (16000, 22050, True), (48000, 16000, False)],
)
def test_the_banded_resampler_equals_torchaudio_on_every_length(source, target, banded):
    """Only the taps each output phase uses are multiplied (encoders/audio/resample.py): the
    samples and the length are torchaudio's, for lengths around a period and a bucket."""
    import torchaudio.functional as AF

    from encoders.audio.resample import Resampler

    resampler = Resampler(source, target)
    assert resampler.banded == banded
    if banded:  # far fewer taps than torchaudio's period-long kernel
        assert resampler.band * 4 < resampler.taps
    rng = np.random.default_rng(source + target)
    for n in (1, 7, 440, 441, 442, 32_768, 100_003):
        wave = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        ours, reference = resampler(wave), AF.resample(wave, source, target)
        assert ours.shape == reference.shape, n
        assert torch.abs(ours - reference).max() < 1e-6, n


@pytest.mark.parametrize(
    "n, starts",
    [
        (100, [0]),  # shorter than a window: one window (zero-padded by the encoder)
        (16000, [0]),
        (16001, [0, 8000]),  # the second window holds 8001 samples: coverage >= 0.5
        (20000, [0, 8000]),
        (24000, [0, 8000]),
        (24001, [0, 8000, 16000]),
        (10**7, list(range(0, 8 * 8000, 8000))),  # capped at max_windows
    ],
)
def test_window_plan(n, starts):
    assert plan_windows(n, PREP).tolist() == starts


def test_window_plan_drops_a_thin_last_window():
    prep = AudioPreprocess.from_options(
        {"preprocessing": {"sample_rate": 10, "window_seconds": 10, "min_coverage": 0.75}}
    )
    assert plan_windows(170, prep).tolist() == [0]  # the second window would be 70% audio
    assert plan_windows(175, prep).tolist() == [0, 100]
    assert plan_windows(30, prep).tolist() == [0]  # the only window is kept whatever its coverage


def test_windows_and_pooling_match_numpy():
    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(n).astype(np.float32) for n in (30000, 5000, 64000, 1)]
    values = audio.waveforms_to_arrow([clips[0], None, clips[1], clips[2], clips[3]])
    batch = audio_batch(values, PREP)
    assert batch.valid.tolist() == [True, False, True, True, True]
    assert batch.counts.tolist() == [3, 0, 1, 7, 1]  # 1 + ceil((n - 16000) / 8000)
    left, right = 200, 240
    windows = batch.windows(context=(left, right)).numpy()
    assert windows.shape == (12, left + 16000 + right)
    expected = []
    for clip, count in zip(clips, (3, 1, 7, 1)):
        padded = np.concatenate([np.zeros(left, np.float32), clip, np.zeros(16000 * 9, np.float32)])
        expected += [padded[s : s + left + 16000 + right] for s in np.arange(count) * 8000]
    assert np.array_equal(windows, np.stack(expected))
    assert np.array_equal(batch.windows(3, 6).numpy(), np.stack(expected)[3:6, left : left + 16000])
    assert batch.window_lengths().tolist()[:5] == [16000, 16000, 14000, 5000, 16000]
    vectors = torch.from_numpy(rng.standard_normal((batch.n_windows, 3)).astype(np.float32))
    v, rows = vectors.numpy(), batch.window_rows
    for mode, reduce in (("mean", np.mean), ("max", np.max), ("first", lambda x, axis: x[0])):
        pooled = pool_windows(vectors, rows, 5, mode).numpy()
        for r in range(5):
            want = reduce(v[rows == r], axis=0) if (rows == r).any() else np.zeros(3)
            assert np.allclose(pooled[r], want, atol=1e-6), (mode, r)


def test_preprocess_errors_name_the_field():
    declared = {"sample_rate": 16000, "window_seconds": 1.0}
    with pytest.raises(ValueError, match="declares no audio preprocessing"):
        AudioPreprocess.from_options({})
    with pytest.raises(ValueError, match="missing 'window_seconds'"):
        AudioPreprocess.from_options({"preprocessing": {"sample_rate": 16000}})
    with pytest.raises(ValueError, match="unknown key 'rate'"):
        AudioPreprocess.from_options({"preprocessing": {**declared, "rate": 1}})
    with pytest.raises(ValueError, match="hop_seconds"):
        AudioPreprocess.from_options({"preprocessing": declared, "hop_seconds": 0})
    with pytest.raises(ValueError, match="max_windows"):
        AudioPreprocess.from_options({"preprocessing": declared, "max_windows": -1})
    with pytest.raises(ValueError, match="window_pooling"):
        audio.validate_window_pooling("median")
    prep = AudioPreprocess.from_options({"preprocessing": declared})
    assert prep.hop_samples == prep.window_samples == 16000 and prep.max_windows == audio.DEFAULT_MAX_WINDOWS
    assert AudioPreprocess.from_options({"preprocessing": prep.as_dict()}) == prep
    assert math.isclose(prep.min_seconds, audio.DEFAULT_MIN_SECONDS)
