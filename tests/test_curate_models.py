"""The model stages on tiny random models of the real architectures, loaded from folders
through the real code path, checked against the models run directly; missing or unusable
weights give one clear line."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lens_fast.curate.models import (AestheticScore, ClassifierScore, Head, TransformersEmbedder,
                                     WeightsNotConfigured, _processor, load_embedder)
from lens_fast.curate.tiny import make_tiny_classifier, make_tiny_clip, make_tiny_head, make_tiny_siglip_vision


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(40, 30), (32, 64), (50, 50)]]


def _pixels(folder, images):
    return _processor(folder)(images=images, return_tensors="pt")["pixel_values"]


def test_clip_embedder_matches_the_model(tmp_path, images):
    from transformers import CLIPModel

    folder = make_tiny_clip(str(tmp_path / "clip"))
    emb = load_embedder(folder, "cpu", batch_size=2)(images)
    with torch.no_grad():
        ref = CLIPModel.from_pretrained(folder).get_image_features(pixel_values=_pixels(folder, images)).pooler_output
    ref = torch.nn.functional.normalize(ref, dim=-1).numpy()
    assert emb.shape == (3, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert np.allclose(emb, ref, atol=1e-5)


def test_siglip_vision_embedder_matches_the_model(tmp_path, images):
    from transformers import SiglipVisionModel

    folder = make_tiny_siglip_vision(str(tmp_path / "siglip"))
    emb = TransformersEmbedder(folder, "cpu")(images)
    with torch.no_grad():
        ref = SiglipVisionModel.from_pretrained(folder)(pixel_values=_pixels(folder, images)).pooler_output
    assert np.allclose(emb, torch.nn.functional.normalize(ref, dim=-1).numpy(), atol=1e-5)


def test_classifier_folder_scores_the_named_labels(tmp_path, images):
    from transformers import ViTForImageClassification

    folder = make_tiny_classifier(str(tmp_path / "nsfw"), ["normal", "porn", "hentai"])
    score = ClassifierScore("nsfw", folder, ["porn", "HENTAI"], "cpu")(images, None)
    with torch.no_grad():
        model = ViTForImageClassification.from_pretrained(folder)
        probs = model(pixel_values=_pixels(folder, images)).logits.softmax(-1)
    assert np.allclose(score, probs[:, 1:].sum(-1).numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"labels \['normal', 'porn', 'hentai'\]; none of nsfw.labels \['nsfw'\]"):
        ClassifierScore("nsfw", folder, ["nsfw"], "cpu")


def test_heads_match_a_torch_mlp(tmp_path):
    folder = make_tiny_head(str(tmp_path / "aes"), [16, 8, 4, 1])  # LAION's layout: layers.0/.2/.4, no activation
    weights = Head(folder).layers
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(), torch.nn.Linear(8, 4), torch.nn.Dropout(),
                              torch.nn.Linear(4, 1)).eval()
    for layer, (w, b) in zip([mlp[0], mlp[2], mlp[4]], weights):
        layer.weight.data, layer.bias.data = torch.from_numpy(w), torch.from_numpy(b)
    emb = np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32)
    assert np.allclose(AestheticScore(folder)(None, emb), mlp(torch.from_numpy(emb))[:, 0].detach().numpy(), atol=1e-5)
    wm = make_tiny_head(str(tmp_path / "wm"), [16, 1], output="sigmoid")
    w, b = Head(wm).layers[0]
    p = ClassifierScore("watermark", wm, ["watermark"])(None, emb)
    assert np.allclose(p, 1 / (1 + np.exp(-(emb @ w.T + b)[:, 0])), atol=1e-6)
    relu = make_tiny_head(str(tmp_path / "relu"), [16, 8, 3], activation="relu", output="softmax",
                          labels=["clean", "watermark", "logo"])
    probs = Head(relu)(emb)
    assert np.allclose(probs.sum(1), 1, atol=1e-6)
    assert np.allclose(ClassifierScore("watermark", relu, ["watermark", "logo"])(None, emb), probs[:, 1:].sum(1))


def test_missing_or_unusable_weights_are_one_clear_line(tmp_path):
    with pytest.raises(WeightsNotConfigured, match="the nsfw stage is on but nsfw.model is not set"):
        ClassifierScore("nsfw", None, ["nsfw"])
    with pytest.raises(WeightsNotConfigured, match="aesthetic.model is not set"):
        AestheticScore(None)
    with pytest.raises(WeightsNotConfigured, match="the dedup stage needs CLIP image embeddings"):
        load_embedder(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedder(str(tmp_path / "nowhere"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text('{"model_type": "clip"}')
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        load_embedder(str(pickled))
    (tmp_path / "oc").mkdir()
    (tmp_path / "oc" / "open_clip_config.json").write_text('{"model_name": "ViT-B-32"}')
    try:
        import open_clip  # noqa: F401
    except Exception:  # noqa: BLE001 - here open_clip cannot import (torchvision does not load beside this torch)
        with pytest.raises(ImportError, match="open_clip does not import here"):
            load_embedder(str(tmp_path / "oc"))
    head = tmp_path / "bad_head"
    head.mkdir()
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, os.path.join(head, "head.safetensors"))
    with pytest.raises(ValueError, match="not '<prefix>.<index>.weight|bias'"):
        Head(str(head))
