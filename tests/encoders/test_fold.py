"""Batch norm folding (encoders/core/fold.py): the folded network computes what the original
did, and a fold that would change it (a second reader of the convolution's output, a shared
convolution, batch statistics) is not made or is undone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from encoders.core.fold import fold_batchnorm
from tests.image_data import real_photos


def randomize_statistics(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the defaults, as training leaves them
    (a freshly built network's batch norms are nearly the identity, which any fold would pass)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


def photo_batch(size: int = 96) -> torch.Tensor:
    photos = [torch.from_numpy(p[:size, :size].copy()).permute(2, 0, 1) for p in real_photos().values()]
    x = torch.stack([p for p in photos if p.shape[1:] == (size, size)][:4]).float() / 255
    return (x - 0.45) / 0.23


def counts(model: nn.Module) -> int:
    return sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize("architecture", ["resnet18", "mobilenet_v3_small"])
def test_folded_torchvision_cnn_computes_the_same(architecture):
    import torchvision

    original = randomize_statistics(torchvision.models.get_model(architecture, weights=None, num_classes=10))
    folded = copy.deepcopy(original)
    batch_norms = counts(original)
    assert fold_batchnorm(folded, torch.randn(2, 3, 64, 64)) == batch_norms > 0
    assert counts(folded) == 0
    x = photo_batch()
    with torch.no_grad():
        expected, got = original(x), folded(x)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert not torch.equal(got, expected)  # the weights really changed (rounding shows)


class ReadTwice(nn.Module):
    """The convolution's raw output is read again after its batch norm: no fold may touch it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


class Shared(nn.Module):
    """One convolution called twice, each time into a batch norm of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_a_second_reader_of_the_conv_output_undoes_the_fold():
    model = randomize_statistics(ReadTwice())
    weight, bias = model.conv.weight.detach().clone(), model.conv.bias.detach().clone()
    x = photo_batch(32)
    with torch.no_grad():
        expected = model(x)
    assert fold_batchnorm(model, x[:2]) == 0
    assert isinstance(model.bn, nn.BatchNorm2d)
    assert torch.equal(model.conv.weight, weight) and torch.equal(model.conv.bias, bias)
    with torch.no_grad():
        assert torch.equal(model(x), expected)


def test_shared_convs_batch_statistics_and_training_mode_are_left_alone():
    shared = randomize_statistics(Shared())
    assert fold_batchnorm(shared, torch.randn(2, 3, 8, 8)) == 0 and counts(shared) == 2
    batch_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False)).eval()
    assert fold_batchnorm(batch_stats, torch.randn(2, 3, 8, 8)) == 0 and counts(batch_stats) == 1
    training = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).train()
    assert fold_batchnorm(training, torch.randn(2, 3, 8, 8)) == 0 and counts(training) == 1
    # A sample the model cannot take (fp16 weights, fp32 sample) leaves it as it is, no error.
    half = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)).eval().half()
    assert fold_batchnorm(half, torch.randn(2, 3, 8, 8)) == 0 and counts(half) == 1


def test_symmetric_same_padding_moves_into_the_convolution():
    """EfficientNet ports pad with a ZeroPad2d before a padding-free convolution; a symmetric
    one becomes the convolution's own padding, an asymmetric one (stride 2) stays."""

    class SamePadConv(nn.Conv2d):
        def __init__(self, pad: tuple[int, int, int, int], **kwargs) -> None:
            super().__init__(3, 3, 3, bias=False, **kwargs)
            self.static_padding = nn.ZeroPad2d(pad)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding)

    model = nn.Sequential(
        SamePadConv((1, 1, 1, 1)), nn.BatchNorm2d(3), SamePadConv((0, 1, 0, 1), stride=2), nn.BatchNorm2d(3)
    )
    randomize_statistics(model)
    original = copy.deepcopy(model)
    assert fold_batchnorm(model, torch.randn(2, 3, 16, 16)) == 3  # two batch norms, one padding
    assert model[0].padding == (1, 1) and isinstance(model[0].static_padding, nn.Identity)
    assert model[2].padding == (0, 0) and isinstance(model[2].static_padding, nn.ZeroPad2d)
    x = photo_batch(32)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-4)
