"""The curation pipeline's deterministic stages against hand-computed values, stage 1's
handling of bad files, and the dedup stage's cluster-then-compare rule."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lens_fast.curate import dedup as dd
from lens_fast.curate import measures as m
from lens_fast.curate.config import CurateConfig, CurateConfigError
from lens_fast.curate.decode import BadImage, decode


def gray_rgb(g):
    g = np.asarray(g, dtype=np.uint8)
    return np.stack([g, g, g], axis=-1)


# ---------------------------------------------------------------- measures
def test_gray_is_bt601():
    px = np.array([[[200, 100, 50]]], dtype=np.uint8)
    assert m.gray(px)[0, 0] == pytest.approx(0.299 * 200 + 0.587 * 100 + 0.114 * 50)


def test_laplacian_variance_of_one_bright_pixel():
    # 5x5 zeros with 10 in the centre: the 3x3 interior Laplacian is
    # [[0, 10, 0], [10, -40, 10], [0, 10, 0]]: mean 0, variance (4 * 100 + 1600) / 9.
    g = np.zeros((5, 5))
    g[2, 2] = 10
    assert m.clarity(gray_rgb(g), side=None) == pytest.approx(2000 / 9)
    assert m.clarity(gray_rgb(np.full((6, 7), 90)), side=None) == 0.0


def test_clarity_is_scale_normalised():
    def waves(n):  # four horizontal sine cycles: the same picture at any size
        x = np.arange(n) + 0.5
        return gray_rgb(np.tile(127.5 + 100 * np.sin(2 * np.pi * 4 * x / n), (n, 1)))

    small, large = m.clarity(waves(64), side=64), m.clarity(waves(256), side=64)
    assert large == pytest.approx(small, rel=0.05)
    # unnormalised, the 4x larger copy reads as blurry (4^4 = 256x less, plus 8-bit rounding noise)
    assert m.clarity(waves(256), side=None) < small / 50


def test_entropy_hand_values():
    assert m.entropy(gray_rgb(np.full((4, 4), 77))) == 0.0
    assert m.entropy(gray_rgb([[0, 255], [0, 255]])) == pytest.approx(1.0)
    assert m.entropy(gray_rgb([[0, 50, 100, 150]])) == pytest.approx(2.0)
    assert m.entropy(gray_rgb([[0, 0, 0, 9]])) == pytest.approx(-(0.75 * np.log2(0.75) + 0.25 * np.log2(0.25)))


def test_luminance_is_mean_hsv_value():
    px = np.array([[[255, 0, 0], [0, 0, 0]], [[0, 51, 0], [10, 20, 255]]], dtype=np.uint8)
    assert m.luminance(px) == pytest.approx((1 + 0 + 0.2 + 1) / 4)
    assert m.area(640, 480) == 307200.0


# ---------------------------------------------------------------- stage 1: bad files
def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_with_size(w, h):
    data = bytearray(_png(Image.new("RGB", (4, 4), (9, 9, 9))))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"no image here\n" * 10, "not_an_image"),
    (_png(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "corrupt"),
    (_png_with_size(60000, 60000), "bomb"),  # 3.6e9 pixels claimed by a 70-byte file
    (_png_with_size(20000, 20000), "bomb"),  # under PIL's own error limit, over ours
    (_png(Image.new("RGB", (100, 10))), "aspect"),
])
def test_bad_files_are_refused_with_a_reason(data, reason):
    with pytest.raises(BadImage) as e:
        decode(data, max_pixels=89_478_485, max_aspect=4.0)
    assert e.value.reason == reason and str(e.value).startswith(reason)


def test_bomb_is_refused_from_the_header_alone():
    with pytest.raises(BadImage, match=r"40x40 = 1600 pixels, over the limit of 1000"):
        decode(_png(Image.new("RGB", (40, 40))), max_pixels=1000)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif, quality=95)
    out = decode(buf.getvalue())
    assert (out.width, out.height) == (20, 40) and out.image.size == (20, 40) and out.rotated
    top, bottom = np.asarray(out.image)[5, 10], np.asarray(out.image)[35, 10]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the red half is now on top


def test_cmyk_16bit_alpha_and_palette_become_8bit_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, "JPEG", quality=95)
    red = np.asarray(decode(buf.getvalue()).image)[4, 4]
    assert red[0] > 230 and red[1] < 30 and red[2] < 30
    sixteen = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 0.502 of full scale
    out = decode(_png(sixteen))
    assert out.mode.startswith("I") and np.asarray(out.image)[0, 0].tolist() == [128, 128, 128]
    rgba = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    rgba.paste((10, 200, 30, 255), (0, 0, 4, 8))
    arr = np.asarray(decode(_png(rgba), background=(255, 255, 255)).image)
    assert arr[0, 0].tolist() == [10, 200, 30] and arr[0, 7].tolist() == [255, 255, 255]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    pal.info["transparency"] = 1
    assert np.asarray(decode(_png(pal), background=(0, 0, 255)).image)[0, 0].tolist() == [0, 0, 255]


# ---------------------------------------------------------------- stage 9
def test_dedup_cluster_keeps_the_first_of_each_group():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    emb = np.stack([base[0], base[1], base[0] + 0.01 * rng.normal(size=16), base[2],
                    base[1] + 0.01 * rng.normal(size=16)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    areas = np.array([100, 100, 400, 50, 100])  # item 2 is the larger copy of item 0: it is kept
    ids = ["a", "b", "c", "d", "e"]
    dropped, dup_of, nearest = dd.dedup_cluster(emb, dd.priority_order(areas, ids), 0.95)
    assert dropped.tolist() == [True, False, False, False, True]
    assert dup_of.tolist() == [2, -1, -1, -1, 1]
    sims = emb @ emb.T
    np.fill_diagonal(sims, -1)
    assert np.allclose(nearest, sims.max(axis=1), atol=1e-6)


def test_kmeans_then_exact_finds_every_planted_pair():
    rng = np.random.default_rng(1)
    n = 300
    x = rng.normal(size=(n, 32)).astype(np.float32)
    copies = x[:40] + 0.02 * rng.normal(size=(40, 32)).astype(np.float32)
    emb = np.concatenate([x, copies])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    centroids = dd.train_centroids(emb, dd.n_clusters(len(emb), None), seed=0)
    labels = dd.assign(emb, centroids)
    assert np.array_equal(labels, (emb @ centroids.T).argmax(axis=1))
    found = set()
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        order = dd.priority_order(np.ones(len(idx)), [f"{i:04d}" for i in idx])
        dropped, _, _ = dd.dedup_cluster(emb[idx], order, 0.95)
        found |= set(idx[dropped].tolist())
    assert found == set(range(n, n + 40))


# ---------------------------------------------------------------- config
def test_config_errors_name_the_key():
    with pytest.raises(CurateConfigError, match="unknown key clarity.minimum"):
        CurateConfig().override(["clarity.minimum=3"])
    with pytest.raises(CurateConfigError, match=r"luminance bounds \[0.9, 0.1\]"):
        CurateConfig().override(["luminance.min_score=0.9", "luminance.max_score=0.1"]).validate()
    cfg = CurateConfig().override(["execution.workers=3"])
    assert cfg.digest() == CurateConfig().digest()  # execution settings do not change the output
    assert CurateConfig().override(["clarity.min_score=5"]).digest() != CurateConfig().digest()
