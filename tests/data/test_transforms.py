import pytest
import torch
from PIL import Image

from umm.config.schema import ImageTransformConfig
from umm.data.transforms import ImageTransform, resize_factor, target_size

VAE = ImageTransformConfig(stride=16, min_size=512, max_size=1024)


@pytest.mark.parametrize("size", [(2000, 1000), (300, 400), (1024, 1024), (700, 513), (5000, 100)])
def test_target_size_on_stride_grid_within_limits(size):
    w, h = target_size(*size, VAE)
    assert w % 16 == 0 and h % 16 == 0
    assert max(w, h) <= 1024
    if max(size) / min(size) <= 2:  # ordinary aspect ratios also meet the short-side minimum
        assert min(w, h) >= 512 - 8


def test_target_size_keeps_aspect_and_upstream_numbers():
    assert target_size(2000, 1000, VAE) == (1024, 512)  # long side capped, short side at min
    assert target_size(300, 400, VAE) == (512, 688)  # short side raised to min: 400 * 512/300 = 682.7 -> 688
    assert target_size(1024, 1024, VAE) == (1024, 1024)


def test_transform_output_range_and_shape():
    image = Image.new("RGB", (100, 60), (255, 0, 0))
    out = ImageTransform(ImageTransformConfig(stride=14, min_size=56, max_size=112))(image)
    assert out.shape == (3, 56, 98)
    assert torch.allclose(out[0], torch.ones_like(out[0]), atol=1e-6)
    assert torch.allclose(out[1], -torch.ones_like(out[1]), atol=1e-6)


def test_resize_factor_flags_far_outside_images():
    small = ImageTransformConfig(stride=16, min_size=64, max_size=64)
    assert resize_factor(64, 64, small) == 1.0
    assert resize_factor(4096, 4096, small) == 64.0
    assert resize_factor(4, 4, small) == 16.0


def test_bad_transform_config_is_one_clear_error():
    with pytest.raises(ValueError, match="min_size <= max_size"):
        ImageTransform(ImageTransformConfig(stride=16, min_size=128, max_size=64))
