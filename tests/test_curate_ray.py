"""The Ray Data executor on a local Ray instance runs the same stage code as the local
executor and produces the same manifest and the same shards."""
import os

import pytest

pytest.importorskip("ray.data", reason="ray[data] is not installed (pip install -e '.[ray]')")
pytest.importorskip("faiss")

from lens_fast.chat_server import LocalChatServer  # noqa: E402
from lens_fast.curate import curate  # noqa: E402
from lens_fast.curate.toy_proof import toy_config  # noqa: E402
from lens_fast.curate.toyset import make_toy_set  # noqa: E402
from lens_fast.curate.worker import read_parquet  # noqa: E402


def test_ray_executor_matches_the_local_one(tmp_path):
    import ray

    make_toy_set(str(tmp_path / "images"), 12, 1, seed=1)
    outputs = {}
    with LocalChatServer("lens_fast.curate.toy_models:caption_handler", model="toy-vlm") as server:
        for executor in ("local", "ray"):
            cfg = toy_config(str(tmp_path), server.url)
            cfg.execution.executor, cfg.execution.unit_size = executor, 8
            cfg.execution.workers = 2 if executor == "ray" else 1
            cfg.shards.samples_per_shard = 4
            out = str(tmp_path / executor)
            report = curate([str(tmp_path / "images")], out, cfg, say=lambda s: None)
            assert report["executor"] == executor and report["kept"] == 12
            shards = sorted(os.listdir(os.path.join(out, "shards")))
            outputs[executor] = (read_parquet(os.path.join(out, "manifest.parquet")),
                                 {n: open(os.path.join(out, "shards", n), "rb").read() for n in shards})
    assert not ray.is_initialized()  # the executor stopped the local instance it started
    assert outputs["ray"][0] == outputs["local"][0]
    assert outputs["ray"][1] == outputs["local"][1]
