"""Real audio for the audio tests: espeak-ng speech in several voices, the ALSA voice clips,
conversions made with sox, and the bad files the prepare stage must turn into error values."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

# Distinct espeak-ng voices: English with male and female variants (pitch and formants differ).
VOICES = ("en+m3", "en+f2", "en+m7", "en+f4", "en-us+m1", "en+f5")
SENTENCES = (
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "A large cargo ship sailed slowly into the harbour before dawn this morning.",
    "We measured the temperature every hour and wrote the numbers in a notebook.",
    "Seven green bottles were standing on the wall when the wind began to blow.",
    "My grandmother grew tomatoes, beans and pumpkins in her garden every summer.",
)
ALSA_CLIPS = Path("/usr/share/sounds/alsa")  # alsa-utils: 48 kHz mono speech ("Front center", ...)


def require_tools(*tools: str) -> None:
    import pytest

    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install espeak-ng sox alsa-utils)")


def alsa_clips(*names: str) -> list[Path]:
    """The ALSA voice clips (Debian's alsa-utils ships them), or a skip that says what to install."""
    import pytest

    paths = [ALSA_CLIPS / name for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"the ALSA voice clip {missing[0]} is not installed (apt-get install alsa-utils)")
    return paths


def speak(path: Path, text: str, voice: str = "en+m3") -> Path:
    """espeak-ng speech: 22.05 kHz mono 16-bit WAV."""
    require_tools("espeak-ng")
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, capture_output=True)
    return path


def speech_corpus(folder: Path, voices: tuple[str, ...] = VOICES[:4], sentences: int = 5) -> dict[str, list[Path]]:
    """voice -> one WAV per sentence."""
    return {
        voice: [
            speak(folder / f"{voice.replace('+', '_')}_{i}.wav", text, voice)
            for i, text in enumerate(SENTENCES[:sentences])
        ]
        for voice in voices
    }


def sox(source: Path, target: Path, *effects: str, rate: int | None = None, channels: int | None = None) -> Path:
    """A sox conversion: ``rate``/``channels`` set the output format; ``effects`` follow."""
    require_tools("sox")
    fmt = [*(["-r", str(rate)] if rate else []), *(["-c", str(channels)] if channels else [])]
    subprocess.run(["sox", str(source), *fmt, str(target), *effects], check=True, capture_output=True)
    return target


def write_long_wav(
    path: Path, seconds: float, rate: int = 48_000, channels: int = 2, source: Path | None = None
) -> Path:
    """A long 16-bit WAV, written block by block (never whole in memory): real speech repeated
    (``source``) or a slow chirp."""
    import soundfile as sf

    if source is not None:
        block, source_rate = sf.read(source, dtype="float32", always_2d=True)
        block = block.mean(axis=1)
        block = np.interp(np.arange(0, len(block), source_rate / rate), np.arange(len(block)), block)
    else:
        t = np.arange(rate * 10) / rate
        block = 0.3 * np.sin(2 * np.pi * (220 + 20 * t) * t)
    block = np.repeat(block.astype(np.float32)[:, None], channels, axis=1)  # (f, c)
    total = int(seconds * rate)
    with sf.SoundFile(path, "w", rate, channels, "PCM_16") as out:
        written = 0
        while written < total:
            part = block[: total - written]
            out.write(part)
            written += len(part)
    return path


def write_bad_files(folder: Path) -> dict[str, str | None]:
    """Bad and edge-case files in ``folder``: file name -> the expected error code (None: a
    vector). The one-hour file is the benchmark's (tests use ``write_long_wav`` with minutes)."""
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    voice = speak(folder / "voice.wav", SENTENCES[0])
    data = voice.read_bytes()
    (folder / "zero.wav").write_bytes(b"")
    (folder / "truncated.wav").write_bytes(data[: len(data) // 2])  # header says twice the samples
    (folder / "header_only.wav").write_bytes(data[:30])
    (folder / "text.wav").write_text("this is not audio, only text in a file named .wav\n")
    sf.write(folder / "short.wav", np.full(int(0.01 * 16000), 0.2, np.float32), 16000)  # 0.01 s
    sf.write(folder / "silence.wav", np.zeros(16000 * 2, np.float32), 16000, subtype="PCM_16")
    sox(voice, folder / "8k.wav", rate=8000)
    sox(voice, folder / "48k_stereo.wav", rate=48000, channels=2)
    sox(voice, folder / "6ch.wav", rate=44100, channels=6)
    mono, rate = sf.read(voice, dtype="float32")
    sf.write(folder / "voice.flac", mono, rate)
    sf.write(folder / "voice.ogg", mono, rate, format="OGG")
    sf.write(folder / "voice.mp3", mono, rate, format="MP3")
    return {
        "zero.wav": "decode_failed",
        "truncated.wav": "decode_failed",
        "header_only.wav": "decode_failed",
        "text.wav": "decode_failed",
        "missing.wav": "missing_file",
        "short.wav": "too_short",
        "silence.wav": None,
        "8k.wav": None,
        "48k_stereo.wav": None,
        "6ch.wav": None,
        "voice.wav": None,
        "voice.flac": None,
        "voice.ogg": None,
        "voice.mp3": None,
    }
