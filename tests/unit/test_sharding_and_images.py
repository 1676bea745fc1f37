from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from engine.images import encode_image, encoded_as, to_pil
from workers.data import OmniDiffusionRequest, group_shares, shard_requests
from workers.runtime.encoding import encode_pixels


def request(size: int = 64, images: int = 1) -> OmniDiffusionRequest:
    return OmniDiffusionRequest("x", height=size, width=size, num_inference_steps=4, seed=0, num_images=images)


def test_shards_balance_images_and_cover_every_request_once():
    requests = [request(images=n) for n in (4, 1, 1, 2, 1, 3)]
    shards = shard_requests(requests, 3)
    assert sorted(r.request_id for shard in shards for r in shard) == sorted(r.request_id for r in requests)
    loads = [sum(r.num_images for r in shard) for shard in shards]
    assert max(loads) - min(loads) <= 3


def test_one_shard_keeps_order():
    requests = [request() for _ in range(5)]
    assert shard_requests(requests, 1) == [requests]


def test_sharding_is_deterministic_and_groups_compatible_requests():
    requests = [request(64), request(128), request(64), request(128)]
    assert shard_requests(requests, 2) == shard_requests(list(requests), 2)
    for shard in shard_requests(requests, 2):
        assert len({r.batch_key() for r in shard}) == 1


def test_groups_out_of_service_get_no_share_and_the_serving_ones_split_the_step():
    requests = [request() for _ in range(6)]
    shares = group_shares(requests, 3, groups=(0, 2))
    assert shares[1] == [] and shares[0] + shares[2] == requests
    assert [shares[0], shares[2]] == shard_requests(requests, 2)
    # A step sent to one group goes there whole, whatever else serves.
    assert group_shares(requests, 3, group=2) == [[], [], requests]
    with pytest.raises(ValueError, match="groups must be rank groups"):
        group_shares(requests, 3, groups=(3,))


@pytest.mark.parametrize("fmt, pil_format", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_image_formats(fmt, pil_format):
    pixels = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_image(to_pil(pixels), fmt)))
    assert decoded.format == pil_format
    assert decoded.size == (48, 32)


def test_png_is_lossless_and_compression_shrinks_jpeg():
    pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    image = to_pil(pixels)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_image(image, "png")))), pixels)
    assert len(encode_image(image, "jpeg", 20)) < len(encode_image(image, "jpeg", 95))


@pytest.mark.parametrize("height, width", [(1, 1), (7, 300), (64, 48), (256, 256)])
def test_the_workers_png_is_plain_png_that_pillow_reads_back_to_the_same_pixels(height, width):
    rng = np.random.default_rng(height * width)
    noise = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    # A smooth picture too: the "up" filter's differences wrap around modulo 256 between rows.
    smooth = np.cumsum(rng.integers(0, 9, (height, width, 3)), axis=0).astype(np.uint8)
    for pixels in (noise, smooth):
        encoded = encode_pixels(pixels)
        Image.open(io.BytesIO(encoded.data)).verify()  # chunk CRCs and structure
        decoded = Image.open(io.BytesIO(encoded.data))
        assert (decoded.format, decoded.mode, decoded.size) == ("PNG", "RGB", (width, height))
        assert np.array_equal(np.asarray(decoded), pixels)
        assert (encoded.width, encoded.height) == (width, height)


def test_a_workers_file_is_opened_lazily_and_given_back_only_as_asked():
    pixels = np.random.default_rng(2).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    encoded = encode_pixels(pixels, "webp", 30)
    image = to_pil(encoded)
    assert image.fp is not None  # header read, pixels not decoded yet
    assert image.size == (24, 16) and image.format == "WEBP"
    assert encoded_as(encoded, "webp", 30) == encoded.data
    assert encoded_as(encoded, "webp", 90) is None and encoded_as(encoded, "png", None) is None
    assert encoded_as(encode_pixels(pixels), "png", 50) is not None  # output_compression means nothing to png
