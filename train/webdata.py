"""WebDataset tar shards (image + caption per sample) read with ``tarfile``, resumable
mid-epoch from (shard, byte offset) without re-reading what was consumed.

A sample is the run of tar members sharing a key (the member path up to the first dot
of its file name), as in webdataset: ``000123.jpg`` + ``000123.json``. Order is fixed
by (seed, epoch, data rank): each epoch the shard list is permuted by (seed, epoch) and
data rank r reads shards r, r + R, ... (R data ranks); with fewer shards than ranks
every rank reads all shards and keeps every R-th sample. Shards are expected to be
shuffled when written (img2dataset does); there is no shuffle buffer.

Each step a rank draws a base area, then takes the first ratio buffer holding a full
batch for that area, reading samples (header-parsed only, bytes kept) into the buffer of
their nearest ratio until one does. Images are decoded only when batched: on the GPU
with nvidia-dali when installed (``decoder="dali"`` also runs DALI's CPU backend), else
PIL in a thread pool, resized to cover the bucket
and centre-cropped. Corrupt, truncated or caption-less samples, unreadable shards and
images whose short side is below ``min_side`` are skipped and counted. A source that
cannot make progress stops with ``NoUsableData`` naming the shards and what was
skipped, instead of reading on forever: after ``max_consecutive_skips`` skipped samples
in a row, or a whole pass over a rank's shards without a usable sample. The saved
position is the stream's (epoch, shard, offset) plus the (shard, offset) of every
buffered sample.
"""
from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Deque, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from lens_fast.errors import InvalidValue, MissingFile, NoUsableData, one_line
from lens_fast.ops.optional import has_dali

from .buckets import BucketTable, step_rng
from .data import RawBatch

log = logging.getLogger(__name__)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_shards(patterns: List[str]) -> List[str]:
    """Paths, globs and ``{000..099}`` ranges -> the sorted list of existing tar files."""
    out = []
    for pat in patterns:
        parts = [pat]
        while any(re.search(r"\{(\d+)\.\.(\d+)\}", p) for p in parts):
            nxt = []
            for p in parts:
                m = re.search(r"\{(\d+)\.\.(\d+)\}", p)
                if not m:
                    nxt.append(p)
                    continue
                a, b = m.group(1), m.group(2)
                nxt += [p[:m.start()] + str(i).zfill(len(a)) + p[m.end():] for i in range(int(a), int(b) + 1)]
            parts = nxt
        missing, unreadable = [], []
        for p in parts:
            hits = sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p]
            missing += [h for h in hits if not os.path.isfile(h)] or ([] if hits else [p])
            unreadable += [h for h in hits if os.path.isfile(h) and not os.access(h, os.R_OK)]
            out += hits
        for bad, what in ((missing, "do not exist"), (unreadable, "are not readable (permission denied)")):
            if bad:
                shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
                error = MissingFile if bad is missing else InvalidValue
                raise error(f"{len(bad)} data shard(s) from pattern {pat!r} {what}: {shown}")
    if not out:
        raise InvalidValue("data.shards is empty; expected tar files, globs or {000..099} patterns")
    return sorted(set(out))


@dataclass
class Pending:
    shard: int  # index into the sorted shard list
    offset: int  # byte offset of the sample's first tar header
    image: bytes
    caption: str


def read_samples(path: str, offset: int):
    """Yield (key, {ext: bytes}, start offset, next offset) from ``offset`` on; a
    truncated or corrupt tail ends the shard with a ('', None, offset, -1) item."""
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError:
            if offset:  # a clean end of archive after the last sample
                return
            yield "", None, offset, -1
            return
        key, files, start = None, {}, offset
        try:
            while True:
                info = tar.next()
                tar.members = []
                if info is None:
                    break
                if not info.isfile():
                    continue
                name = info.name
                base = name.rsplit("/", 1)[-1]
                if "." not in base:
                    continue
                k = name[:len(name) - len(base)] + base.split(".", 1)[0]
                ext = base.split(".", 1)[1].lower()
                if k != key:
                    if key is not None:
                        yield key, files, start, info.offset
                    key, files, start = k, {}, info.offset
                files[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError, EOFError):
            yield "", None, start, -1
            return
        if key is not None:
            yield key, files, start, -1


def resize_center_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Scale to cover (height, width), centre-crop, -> uint8 [3, H, W]."""
    w, h = img.size
    scale = max(height / h, width / w)
    nw, nh = max(width, round(w * scale)), max(height, round(h * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - width) // 2, (nh - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return np.array(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_pil(data: bytes, height: int, width: int) -> Optional[np.ndarray]:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return resize_center_crop(im.convert("RGB"), height, width)
    except Exception:  # noqa: BLE001 - any decoder failure is a corrupt sample
        return None


class DaliDecoder:
    """nvidia-dali decode + cover-resize + centre crop, one pipeline per bucket shape: on
    the GPU (``device_id``: the mixed decoder), or on the CPU (``device_id=None``: DALI's CPU
    backend). Any failure of a batch returns None (the caller falls back to PIL)."""

    def __init__(self, max_batch: int, device_id: Optional[int]):
        self.max_batch, self.device_id, self.pipes = max_batch, device_id, {}

    def _pipe(self, height, width):
        if (height, width) not in self.pipes:
            from nvidia.dali import fn, pipeline_def, types

            @pipeline_def(batch_size=self.max_batch, num_threads=4, device_id=self.device_id,
                          exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
            def pipe():
                enc = fn.external_source(name="encoded", dtype=types.UINT8)
                where = "cpu" if self.device_id is None else "mixed"
                img = fn.decoders.image(enc, device=where, output_type=types.RGB)
                img = fn.resize(img, resize_x=width, resize_y=height, mode="not_smaller",
                                interp_type=types.INTERP_CUBIC)
                return fn.crop(img, crop_h=height, crop_w=width, crop_pos_x=0.5, crop_pos_y=0.5)

            p = pipe()
            p.build()
            self.pipes[(height, width)] = p
        return self.pipes[(height, width)]

    def __call__(self, datas: List[bytes], height: int, width: int) -> Optional[torch.Tensor]:
        pipe = self._pipe(height, width)
        pipe.feed_input("encoded", [np.frombuffer(d, dtype=np.uint8) for d in datas])
        (out,) = pipe.run()
        dense = out.as_tensor()
        if self.device_id is None:
            return torch.from_numpy(np.array(dense)).permute(0, 3, 1, 2).contiguous()
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = torch.empty(tuple(dense.shape()), dtype=torch.uint8, device=f"cuda:{self.device_id}")
        feed_ndarray(dense, t, cuda_stream=torch.cuda.current_stream(self.device_id))
        return t.permute(0, 3, 1, 2).contiguous()


class _RankStream:
    """One data rank's position: epoch, shard cursor, byte offset, ratio buffers."""

    def __init__(self, src: "WebDatasetSource", data_rank: int, data_world: int):
        self.src, self.rank, self.world = src, data_rank, data_world
        self.epoch, self.cursor, self.offset, self.counter = 0, 0, 0, 0
        self.pending: Dict[str, Deque[Pending]] = {r: deque() for r in src.table.ratios}
        self.skips: Counter = Counter()  # since the start of training
        self.new_skips: Counter = Counter()  # while producing the current batch
        self.skips_in_a_row = 0  # samples skipped while reading since the last one that parsed
        self.failed_decodes_in_a_row = 0  # parsed samples whose image did not decode, since the last that did
        self.shards_without_usable = 0  # shards finished since the last sample that parsed
        self._iter = None

    # -- shard order ---------------------------------------------------------------------
    def _order(self) -> List[int]:
        n = len(self.src.shards)
        perm = np.random.default_rng([self.src.seed, self.epoch, 11]).permutation(n).tolist()
        return perm[self.rank::self.world] if n >= self.world else perm

    def _skip(self, reason: str, at_decode: bool = False) -> None:
        self.skips[reason] += 1
        self.new_skips[reason] += 1
        if at_decode:
            self.failed_decodes_in_a_row += 1
        else:
            self.skips_in_a_row += 1
        run = max(self.skips_in_a_row, self.failed_decodes_in_a_row)
        if run >= self.src.max_consecutive_skips:
            raise self._stuck(f"the last {run} samples it read were all skipped")

    def decoded(self, ok: bool) -> None:
        """A buffered sample's image decoded (into a batch) or did not (skipped)."""
        if ok:
            self.failed_decodes_in_a_row = 0
        else:
            self._skip("corrupt", at_decode=True)

    def _stuck(self, what: str) -> NoUsableData:
        names = [os.path.basename(self.src.shards[i]) for i in self._order()]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        skipped = ", ".join(f"{k} {v}" for k, v in sorted(self.skips.items())) or "none"
        return NoUsableData(f"data rank {self.rank} cannot make progress: {what} (shards {shown}; skipped so far: "
                            f"{skipped}); check the shards, data.caption_keys {self.src.caption_keys} and "
                            f"data.min_side {self.src.min_side}")

    def _end_shard(self) -> None:
        self.cursor, self.offset, self._iter = self.cursor + 1, 0, None
        self.shards_without_usable += 1
        if self.shards_without_usable > len(self._order()):
            raise self._stuck(f"a whole pass over its {len(self._order())} shard(s) gave no usable sample")

    def _next_item(self, shard: int):
        try:
            return next(self._iter, None)
        except OSError as e:  # removed or made unreadable after the start
            log.warning("data shard %s cannot be read (%s); skipping it", self.src.shards[shard], one_line(e))
            self._skip("unreadable_shard")
            return ("", None, self.offset, -1)

    def pull(self) -> None:
        """Read one more sample into its ratio buffer (or count it as skipped)."""
        strided = len(self.src.shards) < self.world
        while True:
            order = self._order()
            if self.cursor >= len(order):
                self.epoch, self.cursor, self.offset, self._iter = self.epoch + 1, 0, 0, None
                continue
            shard = order[self.cursor]
            if self._iter is None:
                self._iter = read_samples(self.src.shards[shard], self.offset)
            item = self._next_item(shard)
            if item is None or item[1] is None or item[3] == -1:
                self._end_shard()
                if item is None:
                    continue
                if item[1] is None:
                    self._skip("truncated_shard")
                    continue
            else:
                self.offset = item[3]
            _, files, start, _ = item
            self.counter += 1
            if strided and (self.counter - 1) % self.world != self.rank:
                continue
            sample = self.src.parse(shard, start, files)
            if isinstance(sample, str):
                self._skip(sample)
                continue
            self.shards_without_usable = self.skips_in_a_row = 0
            self.pending[sample[0]].append(sample[1])
            return

    def restore_pending(self, items) -> None:
        for ratio, shard, offset in items:
            for key, files, start, _ in read_samples(self.src.shards[shard], offset):
                sample = self.src.parse(shard, start, files) if files is not None else "corrupt"
                if not isinstance(sample, str):
                    self.pending[ratio].append(sample[1])
                break

    def state(self) -> dict:
        return dict(epoch=self.epoch, cursor=self.cursor, offset=self.offset, counter=self.counter,
                    world=self.world, skips=dict(self.skips),
                    pending=[[r, p.shard, p.offset] for r, q in self.pending.items() for p in q])


class WebDatasetSource:
    """Raw image + caption batches (``RawBatch``) per data rank from tar shards; wrap
    in ``EncodedSource`` with the frozen VAE and text encoder."""

    def __init__(self, shards: List[str], table: BucketTable, seed: int = 0, min_side: int = 64,
                 caption_keys=("json:caption", "txt"), workers: int = 4, prefetch: bool = True,
                 decoder: str = "auto", device: Optional[torch.device] = None, max_consecutive_skips: int = 1000):
        if decoder not in ("auto", "pil", "dali"):
            raise InvalidValue(f"decoder={decoder!r}: expected auto, pil or dali")
        if not isinstance(max_consecutive_skips, int) or max_consecutive_skips < 1:
            raise InvalidValue(f"max_consecutive_skips={max_consecutive_skips!r}: expected an integer >= 1")
        self.max_consecutive_skips = max_consecutive_skips
        self.shards = expand_shards(list(shards))
        self.table, self.seed, self.min_side = table, int(seed), int(min_side)
        self.caption_keys = list(caption_keys)
        self.pool = ThreadPoolExecutor(max(1, workers))
        self.prefetcher = ThreadPoolExecutor(1) if prefetch else None
        self._future: Dict[int, Tuple[int, object]] = {}
        self._lock = threading.Lock()
        self.streams: Dict[int, _RankStream] = {}
        self.dali = None
        cuda = device is not None and torch.device(device).type == "cuda"
        if decoder == "dali" or (decoder == "auto" and cuda and has_dali()):
            if not has_dali():
                raise InvalidValue("decoder='dali' needs nvidia-dali installed (pip install -e '.[dali]')")
            self.dali = DaliDecoder(max(b.batch for b in table.all()),
                                    (torch.device(device).index or 0) if cuda else None)
        self.dali_required = decoder == "dali"
        self._consumed: Dict[int, dict] = {}

    # -- samples ---------------------------------------------------------------------------
    def parse(self, shard: int, offset: int, files: Dict[str, bytes]):
        """(ratio, Pending) or the reason for skipping."""
        caption = None
        for ck in self.caption_keys:
            ext, _, field_ = ck.partition(":")
            if ext in files:
                try:
                    caption = json.loads(files[ext])[field_] if field_ else files[ext].decode("utf-8")
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    continue
                if isinstance(caption, str):
                    break
                caption = None
        if caption is None:
            return "no_caption"
        data = next((files[e] for e in IMAGE_EXTS if e in files), None)
        if data is None:
            return "no_image"
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
        except Exception:  # noqa: BLE001
            return "corrupt"
        if min(w, h) < self.min_side:
            return "too_small"
        return self.table.nearest_ratio(w, h), Pending(shard, offset, data, caption)

    def _decode(self, items: List[Pending], height: int, width: int) -> List[Optional[torch.Tensor]]:
        if self.dali is not None:
            try:
                out = self.dali([p.image for p in items], height, width)
                return list(out)
            except Exception as e:  # noqa: BLE001
                if self.dali_required:
                    raise
                log.warning("DALI decode failed (%s); decoding this batch with PIL", e)
        arrays = self.pool.map(lambda p: decode_pil(p.image, height, width), items)
        return [None if a is None else torch.from_numpy(a) for a in arrays]

    def _produce(self, step: int, data_rank: int, data_world: int) -> Tuple[RawBatch, dict]:
        stream = self.streams.get(data_rank)
        if stream is None or stream.world != data_world:
            stream = self.streams[data_rank] = _RankStream(self, data_rank, data_world)
        stream.new_skips = Counter()
        area = self.table.draw_area(step_rng(self.seed, step, data_rank, 3))
        b = self.table.get(area, self.table.ratios[0]).batch
        while True:
            full = [r for r in self.table.ratios if len(stream.pending[r]) >= b]
            if full:
                break
            stream.pull()
        ratio = max(full, key=lambda r: len(stream.pending[r]))
        bucket = self.table.get(area, ratio)
        images, captions = [], []
        while len(images) < b:
            while len(stream.pending[ratio]) < b - len(images):
                stream.pull()
            take = [stream.pending[ratio].popleft() for _ in range(b - len(images))]
            for p, img in zip(take, self._decode(take, bucket.height, bucket.width)):
                stream.decoded(img is not None)
                if img is not None:
                    images.append(img)
                    captions.append(p.caption)
        skips = dict(stream.new_skips)
        stacked = torch.stack([i.to(images[0].device) for i in images])
        raw = RawBatch(stacked, captions, sum(skips.values()), skips)
        return raw, stream.state()

    # -- the raw-source protocol -----------------------------------------------------------
    def batch(self, step: int, data_rank: int, data_world: int) -> RawBatch:
        with self._lock:
            fut = self._future.pop(data_rank, None)
        if fut is not None and fut[0] == (step, data_world):
            raw, state = fut[1].result()
        else:
            if fut is not None:
                fut[1].result()  # never race the stream it mutates
                self.streams.pop(data_rank, None)
                if data_rank in self._consumed:
                    self._restore(data_rank, self._consumed[data_rank])
            raw, state = self._produce(step, data_rank, data_world)
        self._consumed[data_rank] = state
        if self.prefetcher is not None:
            with self._lock:
                self._future[data_rank] = ((step + 1, data_world),
                                           self.prefetcher.submit(self._produce, step + 1, data_rank, data_world))
        return raw

    def preview(self, n: int) -> RawBatch:
        """The first n decodable samples of the first shard at the first bucket (fixed)."""
        bucket = self.table.get(self.table.areas[0], self.table.ratios[0])
        images, captions = [], []
        for _, files, start, _ in read_samples(self.shards[0], 0):
            sample = self.parse(0, start, files) if files is not None else "corrupt"
            if isinstance(sample, str):
                continue
            img = decode_pil(sample[1].image, bucket.height, bucket.width)
            if img is not None:
                images.append(torch.from_numpy(img))
                captions.append(sample[1].caption)
            if len(images) == n:
                break
        if not images:
            raise InvalidValue(f"no decodable sample in {self.shards[0]} for a preview")
        return RawBatch(torch.stack(images), captions)

    def _drain(self) -> None:
        with self._lock:
            futures, self._future = list(self._future.values()), {}
        for _, f in futures:
            f.result()

    def _restore(self, data_rank: int, st: dict) -> None:
        s = _RankStream(self, int(data_rank), int(st["world"]))
        s.epoch, s.cursor, s.offset, s.counter = st["epoch"], st["cursor"], st["offset"], st["counter"]
        s.skips = Counter(st.get("skips", {}))
        s.restore_pending(st["pending"])
        self.streams[int(data_rank)] = s

    def state_dict(self) -> dict:
        return {"shards": len(self.shards), "ranks": {str(r): s for r, s in self._consumed.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("shards") not in (None, len(self.shards)):
            raise InvalidValue(f"the saved data position is for {state['shards']} shards; data.shards now "
                             f"expands to {len(self.shards)}")
        self._drain()
        self.streams, self._consumed = {}, {}
        for r, st in state.get("ranks", {}).items():
            self._restore(int(r), st)
            self._consumed[int(r)] = st

    def skip_totals(self) -> Dict[str, int]:
        total: Counter = Counter()
        for st in self._consumed.values():
            total.update(st.get("skips", {}))
        return dict(total)

    def close(self) -> None:
        self._drain()
        self.pool.shutdown()
        if self.prefetcher is not None:
            self.prefetcher.shutdown()
