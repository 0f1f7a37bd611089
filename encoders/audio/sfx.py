"""audio-sfx: aiSFX's sound-effects embedding CNN (512-d; Cross-dataset "X-Sequential-CE", ISMIR
2022), reimplemented in torch so that its real weights (``aisfx/models/checkpoint.pth``) load
without importing the package (it pins numpy 1.23). The checkpoint is a (state dict, dataset
table) pickle holding numpy scalars: it loads with ``torch.load(weights_only=True)`` with exactly
those numpy types allowed (``torch.serialization.safe_globals``), no arbitrary code.

Front end: aiSFX's librosa path (``spectrogram/spectrogram_librosa.py``), on the encoder's device.
aiSFX's default is Essentia (not installable here); its docs say the librosa path "may yield
lower results" than the paper's Essentia spectrograms. Per clip:
- peak normalization (``y / max|y|``, over the whole prepared clip) at 44.1 kHz;
- power mel spectrogram: n_fft = win 2048 (Hann), hop 1024, centred frames with zero padding
  (librosa >= 0.10), 96 HTK mels from 0 to 22050 Hz, each filter normalized to unit sum;
- ``log10(10000 x + 1)``, then min-max scaling with the paper's fixed range (0, 9.4578).
Blocks of 100 frames (2.32 s) every 50 frames (aiSFX's ``emb_hop_size`` 0.5), the last dropped
when incomplete (``drop_partial_block``), go through the 4-block CNN ("Cnn_9layers": conv-BN-ReLU
x2 and 2x2 max pooling per block; mean over mel bins, max over time) to 512-d vectors.

Windows are aiSFX's blocks: window 102400 samples (100 frames x 1024), hop 51200, min_coverage
0.99 (a block needs its last frame's centre inside the clip, as aiSFX's frame count gives), so a
clip under the cap gets exactly aiSFX's blocks; each window's STFT sees the 1024 samples before it.
A clip shorter than one block is padded as aiSFX pads it: frames past librosa's ``1 + n // 1024``
get zero rows in the scaled spectrogram. The clip vector is the mean of its block vectors (aiSFX
returns the blocks unpooled).

aiSFX 0.1.2's librosa helper returns librosa's (mels, frames) layout, which its ``blocking``
would cut along the mel axis; the network (and the Essentia path) take (frames, mels), as here.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from encoders.audio.family import DeclaredAudioFamily
from encoders.audio.prepare import AUDIO_OPTIONS, AudioPreprocess, declared_features
from encoders.audio.windows import audio_batch, pool_windows
from encoders.core.device import DeviceModel, autocast
from encoders.core.fold import fold_batchnorm
from encoders.core.spec import EncodeResult, EncoderSpec, check_dim

FEATURE_KEYS = ("n_fft", "hop_length", "n_mels", "f_min", "f_max", "log_gain", "norm_min", "norm_max")

SFX_OPTIONS: dict[str, tuple[Any, Any]] = {
    **AUDIO_OPTIONS,
    "features": (dict, None),  # declared front end, FEATURE_KEYS
    "normalize": (bool, False),  # aiSFX's vectors are not normalized
    "precision": (str, "auto"),
    "micro_batch": (int, 64),  # windows per forward
}


def _features(options: Mapping[str, Any]) -> dict[str, Any]:
    features = declared_features(options, FEATURE_KEYS, ("n_fft", "hop_length", "n_mels"))
    if not (1 <= features["hop_length"] <= features["n_fft"]) or features["norm_max"] <= features["norm_min"]:
        raise ValueError("option features: need 1 <= hop_length <= n_fft and norm_max > norm_min")
    return features


class SFXFamily(DeclaredAudioFamily):
    name = "audio-sfx"

    option_table = SFX_OPTIONS
    features = staticmethod(_features)

    def load(self, spec: EncoderSpec, device: torch.device) -> "SFXEncoder":
        return SFXEncoder(spec, device)


class ConvBlock(torch.nn.Module):
    """Two 3x3 conv-BN-ReLU layers, then max pooling (aiSFX's cnn2d.ConvBlock)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(out_channels)
        self.bn2 = torch.nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor, pool: tuple[int, int]) -> torch.Tensor:
        x = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.max_pool2d(x, kernel_size=pool)


class SFXNet(torch.nn.Module):
    """(b, frames, mels) scaled log mels -> (b, 512): aiSFX's EmbeddingNet('max', 3, 1, 64)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.conv_block1 = ConvBlock(1, width)
        self.conv_block2 = ConvBlock(width, width * 2)
        self.conv_block3 = ConvBlock(width * 2, width * 4)
        self.conv_block4 = ConvBlock(width * 4, width * 8)

    def forward(self, mels: torch.Tensor) -> torch.Tensor:
        x = mels.unsqueeze(1)  # (b, 1, frames, mels)
        x = self.conv_block1(x, (2, 2))
        x = self.conv_block2(x, (2, 2))
        x = self.conv_block3(x, (2, 2))
        x = self.conv_block4(x, (1, 1))  # (b, 512, frames / 8, mels / 8)
        return x.mean(dim=3).amax(dim=2)  # mean over mel bins, max over time -> (b, 512)


def load_sfx_net(path: str) -> SFXNet:
    """aiSFX's checkpoint -> SFXNet (the embedding net; the per-dataset classifier heads are
    training-only and skipped)."""
    from numpy._core.multiarray import scalar

    # The pickle holds the dataset table's numpy int64 scalars: allow exactly those types.
    allowed = [(scalar, "numpy.core.multiarray.scalar"), np.dtype, np.dtypes.Int64DType]
    with torch.serialization.safe_globals(allowed):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint[0] if isinstance(checkpoint, (tuple, list)) else checkpoint
    prefix = "embedding_net."
    if not isinstance(state, dict) or f"{prefix}conv_block1.conv1.weight" not in state:
        raise ValueError(f"{path!r} is not an aiSFX checkpoint (no embedding_net weights)")
    net = SFXNet(int(state[f"{prefix}conv_block1.conv1.weight"].shape[0]))
    net.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return net.eval()


class SFXEncoder(DeviceModel):
    """The model half of audio-sfx: runs in the encoder actor."""

    def __init__(self, spec: EncoderSpec, device: torch.device) -> None:
        import torchaudio

        super().__init__(spec, device)
        self.prep = AudioPreprocess.from_options(spec.options)
        self.features = _features(spec.options)
        self.net = load_sfx_net(spec.weights.path)
        # Batch norms into their convolutions (encoders/core/fold.py), checked on random mels.
        mels = torch.rand((2, 64, int(self.features["n_mels"])), generator=torch.Generator().manual_seed(0))
        self.folded = fold_batchnorm(self.net, mels)
        self.net = self.net.to(device)
        n_fft, hop = self.features["n_fft"], self.features["hop_length"]
        self.spectrogram = torchaudio.transforms.Spectrogram(n_fft=n_fft, hop_length=hop, power=2.0, center=False).to(
            device
        )
        fbanks = torchaudio.functional.melscale_fbanks(
            n_fft // 2 + 1,
            self.features["f_min"],
            self.features["f_max"],
            self.features["n_mels"],
            self.prep.sample_rate,
            norm=None,
            mel_scale="htk",
        )  # (freqs, mels)
        self.fbanks = (fbanks / fbanks.sum(0, keepdim=True).clamp(min=1e-30)).to(device)  # librosa norm=1
        self.context = (n_fft // 2, n_fft // 2 - hop)  # centred frames over the whole clip
        self.dim = check_dim(spec, int(self.net.conv_block4.conv2.out_channels))

    def __call__(self, modality: str, values: pa.Array, max_tokens: int = 0) -> EncodeResult:
        batch = audio_batch(values, self.prep, self.device)
        peaks = batch.row_reduce(batch.flat.abs(), "max")
        batch.scale_rows(1 / torch.where(peaks > 0, peaks, torch.ones_like(peaks)))
        step = self.options["micro_batch"]
        with torch.inference_mode():
            parts = [
                self._embed(batch.windows(s, s + step, self.context), self._real_frames(batch, s, s + step))
                for s in range(0, batch.n_windows, step)
            ]
            windows = torch.cat(parts) if parts else torch.zeros((0, self.dim), device=self.device)
            vectors = pool_windows(windows, batch.window_rows, len(batch.valid), self.options["window_pooling"])
            if self.options["normalize"]:
                vectors = F.normalize(vectors, dim=1)
        return EncodeResult(vectors.cpu().numpy(), batch.valid, {"windows": batch.counts})

    def log_mels(self, windows: torch.Tensor) -> torch.Tensor:
        """(w, context + window samples) -> (w, frames, mels), scaled as the network expects."""
        power = self.spectrogram(windows)  # (w, freqs, frames)
        mels = torch.matmul(power.transpose(1, 2), self.fbanks)  # (w, frames, mels)
        logs = torch.log10(mels * self.features["log_gain"] + 1)
        return (logs - self.features["norm_min"]) / (self.features["norm_max"] - self.features["norm_min"])

    def _real_frames(self, batch: Any, start: int, stop: int) -> torch.Tensor:
        """(w,) frames of each window whose centre lies inside its clip: librosa computes
        ``1 + n // hop`` frames, and aiSFX pads past them with zero rows, not zero audio."""
        hop = self.features["hop_length"]
        lengths = batch.lengths()[batch.window_rows[start:stop]]
        real = lengths // hop - batch.window_starts[start:stop] // hop + 1
        return torch.from_numpy(real).to(self.device)

    def _embed(self, windows: torch.Tensor, real_frames: torch.Tensor) -> torch.Tensor:
        mels = self.log_mels(windows)  # (w, frames, mels)
        frames = torch.arange(mels.shape[1], device=self.device)
        mels = torch.where(
            (frames[None, :] < real_frames[:, None])[..., None], mels, torch.zeros((), device=self.device)
        )
        with autocast(self.device, self.precision):
            return self.net(mels).float()
