"""The trainer's DALI reader on DALI's CPU backend (nvidia-dali is not in CI's set: it is
~1 GB and needs packaging<=26.3, one below our pin; `make test-dali` installs it and runs
this file). Checked against the PIL path, which stays the fallback."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason="nvidia-dali is not installed (make test-dali)")

from lens_fast.train.buckets import BucketTable  # noqa: E402
from lens_fast.train.webdata import DaliDecoder, WebDatasetSource, decode_pil  # noqa: E402


def _jpeg(seed, w, h):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth: resamplers agree
    img = Image.fromarray(base).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_dali_cpu_decoder_matches_pil():
    datas = [_jpeg(i, w, h) for i, (w, h) in enumerate([(96, 64), (64, 96), (80, 80)])]
    out = DaliDecoder(max_batch=4, device_id=None)(datas, 48, 48)
    assert out.shape == (3, 3, 48, 48) and out.dtype == torch.uint8 and out.device.type == "cpu"
    for d, got in zip(datas, out):
        ref = torch.from_numpy(decode_pil(d, 48, 48)).float()
        assert (got.float() - ref).abs().mean() < 6.0  # two cubic resamplers and two JPEG decoders


def test_webdataset_source_reads_with_dali_on_cpu(tmp_path):
    path = os.path.join(tmp_path, "s.tar")
    with tarfile.open(path, "w") as tar:
        for i in range(4):
            caption = json.dumps({"caption": f"c{i}"}).encode()
            for name, data in ((f"{i:04d}.jpg", _jpeg(i, 64, 64)), (f"{i:04d}.json", caption)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    table = BucketTable([32], ["1:1"], {32: 2}, multiple=8)
    src = WebDatasetSource([path], table, min_side=16, decoder="dali", prefetch=False, device="cpu")
    try:
        assert src.dali is not None and src.dali.device_id is None
        raw = src.batch(0, 0, 1)
        assert raw.images.shape == (2, 3, 32, 32) and raw.images.dtype == torch.uint8
    finally:
        src.close()
