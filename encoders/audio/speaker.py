"""audio-speaker: the GE2E speaker encoder of resemblyzer (256-d voice vectors), reimplemented in
torch so that its real weights (``resemblyzer/pretrained.pt``) load without importing the package
(its declared dependencies do not install here). Weights load with ``torch.load(weights_only=True)``.

The network (resemblyzer 0.1.4, ``VoiceEncoder``): volume normalization to -30 dBFS (gain only up,
over the whole clip), a power mel spectrogram (not log: 16 kHz, n_fft 400 = 25 ms Hann, hop 160,
40 Slaney mels, centred frames with zero padding as librosa >= 0.10 pads), a 3-layer LSTM(40 -> 256),
Linear(256 -> 256), ReLU and L2 normalization of the last hidden state of each 1.6 s partial.

Windows are resemblyzer's partials. ``embed_utterance(wav, rate=1.3, min_coverage=0.75)`` cuts
160-frame (1.6 s) partials every round(16000 / 1.3 / 160) = 77 frames (0.77 s), zero-pads the last,
drops it when under 75% audio, computes the mel once over the whole utterance and averages the
L2-normalized partial vectors, then L2-normalizes the mean. Here the declared window plan is the
same (window 1.6 s, hop 0.77 s, min_coverage 0.75; encoders/audio/prepare.py): each window's mel is
computed with the 200 / 40 samples of context a whole-clip centred STFT gives its edge frames, so
a clip under ``max_windows`` (64 partials, 50 s) gets exactly ``embed_utterance``'s vector, and a
longer one the vector of its first 50 s. ``<output>_windows`` counts the partials averaged.

Differences from resemblyzer's ``preprocess_wav``, on purpose:
- its webrtcvad silence trimming does not run (webrtcvad does not install here); resampling is
  torchaudio's, not librosa's (prepare stage, encoders/audio/prepare.py);
- digital silence (RMS 0) gets no gain (resemblyzer would multiply 0 by infinity and return
  NaN): it gets the network's vector for an all-zero spectrogram, a finite constant vector.
"""

from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa
import torch

from encoders.audio.family import DeclaredAudioFamily
from encoders.audio.prepare import AUDIO_OPTIONS, AudioPreprocess, declared_features
from encoders.audio.windows import audio_batch, pool_windows
from encoders.core.device import DeviceModel, autocast
from encoders.core.spec import EncodeResult, EncoderSpec, check_dim

INT16_MAX = 2**15 - 1
# Windows per LSTM forward. On one CPU thread 32-48 windows keep the gates (b x 1024) in cache:
# 4.2 ms a window against 4.8 at 256 (benchmarks/README.md); a GPU wants wide batches.
DEFAULT_MICRO_BATCH_CPU = 32
DEFAULT_MICRO_BATCH_GPU = 512
MEL_CHUNK_FRAMES = 4096  # frames per STFT call: ~7 MB of spectrum, whatever the batch's length
FEATURE_KEYS = ("n_fft", "hop_length", "n_mels", "target_dbfs")

# Option name -> (type, default): the shared audio options, then this family's own.
SPEAKER_OPTIONS: dict[str, tuple[Any, Any]] = {
    **AUDIO_OPTIONS,
    "features": (dict, None),  # declared front end: n_fft, hop_length, n_mels, target_dbfs
    "normalize": (bool, True),  # L2-normalize the pooled vector (resemblyzer does)
    "precision": (str, "auto"),  # a run keeps bf16 only where the fidelity probe passes (pipeline/precision.py)
    "micro_batch": (int, None),  # windows per forward; default by device (below)
}


def _features(options: Mapping[str, Any]) -> dict[str, Any]:
    features = declared_features(options, FEATURE_KEYS, ("n_fft", "hop_length", "n_mels"))
    if features["hop_length"] < 1 or features["n_fft"] < features["hop_length"]:
        raise ValueError("option features: need 1 <= hop_length <= n_fft")
    return features


class SpeakerFamily(DeclaredAudioFamily):
    name = "audio-speaker"
    # On CPU, one torch thread per actor in as many actors as there are cores: the LSTM's 160
    # small steps per window each end in a barrier, so a two-thread forward stalls whenever a
    # prepare task takes a core (pipeline/adapter.py).
    cpu_actor_threads = 1

    option_table = SPEAKER_OPTIONS
    features = staticmethod(_features)

    def load(self, spec: EncoderSpec, device: torch.device) -> "SpeakerEncoder":
        return SpeakerEncoder(spec, device)


class SpeakerNet(torch.nn.Module):
    """resemblyzer's VoiceEncoder network: (b, frames, n_mels) power mels -> (b, 256) unit vectors."""

    def __init__(self, n_mels: int = 40, hidden: int = 256, embedding: int = 256, layers: int = 3) -> None:
        super().__init__()
        self.lstm = torch.nn.LSTM(n_mels, hidden, layers, batch_first=True)
        self.linear = torch.nn.Linear(hidden, embedding)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(mels)  # hidden: (layers, b, hidden)
        embeds = torch.relu(self.linear(hidden[-1]))  # (b, embedding)
        return embeds / torch.norm(embeds, dim=1, keepdim=True)


def load_speaker_net(path: str) -> SpeakerNet:
    """A resemblyzer checkpoint (``{"model_state": ...}``, or a bare state dict) -> SpeakerNet.
    The GE2E loss's similarity_weight/bias are training-only and skipped."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model_state", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "linear.weight" not in state:
        raise ValueError(
            f"{path!r} is not a resemblyzer speaker-encoder checkpoint (no model_state with lstm/linear weights)"
        )
    state = {k: v for k, v in state.items() if k.startswith(("lstm.", "linear."))}
    layers = 1 + max(int(k.rsplit("_l", 1)[1]) for k in state if k.startswith("lstm.weight_ih_l"))
    hidden = state["lstm.weight_hh_l0"].shape[1]
    net = SpeakerNet(state["lstm.weight_ih_l0"].shape[1], hidden, state["linear.weight"].shape[0], layers)
    net.load_state_dict(state)
    return net.eval()


class SpeakerEncoder(DeviceModel):
    """The model half of audio-speaker: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        import torchaudio

        super().__init__(spec, device)
        self.prep = AudioPreprocess.from_options(spec.options)
        self.features = _features(spec.options)
        self.net = load_speaker_net(spec.weights.path).to(device)
        n_fft, hop = self.features["n_fft"], self.features["hop_length"]
        # center=False on windows that carry their own context (see ``_window_mels``) computes
        # the frames a centred STFT over the whole clip would.
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=self.prep.sample_rate,
            n_fft=n_fft,
            hop_length=hop,
            n_mels=self.features["n_mels"],
            power=2.0,
            center=False,
            mel_scale="slaney",
            norm="slaney",
        ).to(device)
        self.context = (n_fft // 2, n_fft // 2 - hop)
        # Windows that start on the frame grid share their frames with the clip's mel.
        self.shared_frames = self.prep.hop_samples % hop == 0
        self.dim = check_dim(spec, int(self.net.linear.out_features))

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        batch = self.batch(values)
        return EncodeResult(self.forward(batch).cpu().numpy(), batch.valid, {"windows": batch.counts})

    def batch(self, values: pa.Array) -> Any:
        """Prepared values -> an ``AudioBatch`` on the device (volume normalization happens in
        ``forward``, on the mels)."""
        return audio_batch(values, self.prep, self.device)

    def forward(self, batch: Any, micro_batch: int | None = None) -> torch.Tensor:
        """An ``AudioBatch`` -> (n, d) clip vectors on the device (zeros for invalid rows): the
        mel front end, the network on micro-batches of windows, pooling and normalization."""
        step = (
            micro_batch
            or self.options["micro_batch"]
            or (DEFAULT_MICRO_BATCH_CPU if self.device.type == "cpu" else DEFAULT_MICRO_BATCH_GPU)
        )
        with torch.inference_mode():
            # The gain to target_dbfs, applied to the power mel as its square: |STFT(g x)|^2 =
            # g^2 |STFT(x)|^2, so the samples are never rescaled (one pass over the block less).
            scales = (self._gains(batch) ** 2)[torch.from_numpy(batch.window_rows).to(self.device)]  # (W,)
            mels = (
                self._clip_mels(batch)
                if self.shared_frames
                else (lambda i, j: self._window_mels(batch.windows(i, j, self.context)))
            )
            parts = [
                self._network(mels(s, s + step) * scales[s : s + step, None, None])
                for s in range(0, batch.n_windows, step)
            ]
            windows = torch.cat(parts) if parts else torch.zeros((0, self.dim), device=self.device)
            vectors = pool_windows(windows, batch.window_rows, len(batch.valid), self.options["window_pooling"])
            return torch.nn.functional.normalize(vectors, dim=1) if self.options["normalize"] else vectors

    def _gains(self, batch: Any) -> torch.Tensor:
        """(n,) per-clip gain to ``target_dbfs`` (resemblyzer's normalize_volume, increase only)."""
        # Sums of squares in float32 (one pass, no float64 copy of the block), the rest per clip
        # in float64: the gain differs from a float64 sum by ~1e-7 relative.
        power = batch.row_reduce(batch.flat.square(), "sum").double() * INT16_MAX**2
        lengths = torch.from_numpy(batch.lengths()).to(self.device).clamp(min=1)
        rms = torch.sqrt(power / lengths)
        change = self.features["target_dbfs"] - 20 * torch.log10(rms / INT16_MAX)
        # rms 0 (digital silence): log10 gives -inf, the change +inf; no gain instead of NaN.
        return torch.where((rms > 0) & (change > 0), 10 ** (change / 20), torch.ones_like(rms)).float()

    def _clip_mels(self, batch: Any) -> Any:
        """The mel frames of every clip computed once (resemblyzer computes the whole utterance's
        mel and slices partials from it; windows overlap about 2x, so per-window mels would
        compute most frames twice) -> ``mels(i, j)``: windows i:j as (w, frames, n_mels).
        Rows sit in one zero-padded tensor with their first frames on the hop grid, so frame f
        covers the same samples as a centred STFT over the row alone (zero padded, as librosa
        >= 0.10 pads)."""
        n_fft, hop = self.features["n_fft"], self.features["hop_length"]
        left, right = self.context
        padded, bases = batch.layout(self.context, align=hop)
        total = (len(padded) - n_fft) // hop + 1
        chunk = MEL_CHUNK_FRAMES
        frames = torch.cat(
            [self.mel(padded[f * hop : (min(f + chunk, total) - 1) * hop + n_fft]) for f in range(0, total, chunk)],
            dim=1,
        )  # (n_mels, total)
        firsts = (bases[batch.window_rows] + batch.window_starts - left) // hop
        per_window = (left + self.prep.window_samples + right - n_fft) // hop + 1
        strided = frames.unfold(1, per_window, 1)  # (n_mels, total - per_window + 1, per_window): a view
        index = torch.from_numpy(firsts).to(self.device)
        return lambda i, j: strided[:, index[i:j]].permute(1, 2, 0).contiguous()  # (w, per_window, n_mels)

    def _window_mels(self, windows: torch.Tensor) -> torch.Tensor:
        """(w, context + window samples) -> (w, frames, n_mels) power mels."""
        return self.mel(windows).transpose(1, 2)  # (w, n_mels, frames) -> (w, frames, n_mels)

    def _network(self, mels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.net(mels).float()
