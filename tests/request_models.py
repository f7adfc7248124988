"""Projects with image, text, hooks and two-input models, built once and shared by the request tests."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch
from conftest import Project

LABELS = ["cat", "dog", "bird", "fish", "frog"]
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
WORDS = "the quick brown fox jumps over lazy dog a much longer sentence that goes on and".split()
HOOKS = """
import numpy as np


def decode(body, content_type):
    if content_type != "text/csv":
        raise ValueError(f"expected text/csv, got {content_type or 'no content type'}")
    rows = [[float(v) for v in line.split(",")] for line in body.decode().strip().splitlines()]
    return {"x": np.asarray(rows, dtype=np.float32)}


def encode(outputs):
    y = outputs["output"]
    if (np.abs(y) > 1e6).any():
        raise RuntimeError("sums too large to report")
    return {"sums": y.sum(axis=1).tolist()}


def samples():
    return [(b"1,2,3,4\\n0.5,0,0,1\\n", "text/csv")]
"""


CLIENT_TEXTS = ["the quick brown fox", "a dog"]


def client_inputs() -> dict[str, dict[str, np.ndarray]]:
    """What the client tests send to the one-input, two-input and text models of `request_specs`."""
    rng = np.random.default_rng(5)
    return {
        "one": {"x": rng.standard_normal((2, 4)).astype(np.float32)},
        "two": {"x": rng.standard_normal((2, 4)).astype(np.float32), "seq": rng.standard_normal((2, 3, 4)).astype(np.float32)},
        "text": {"text": np.array(CLIENT_TEXTS, dtype=object)},
    }


def make_tokenizer(path: Path) -> Path:
    """A word-level tokenizer with BERT's [CLS] ... [SEP] template, built here (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(WORDS))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(path))
    return path


def request_specs(project: Project) -> dict[str, Path]:
    """Specs (with checkpoints) of an image classifier with labels, a text classifier with a tokenizer, a Linear
    model behind hooks, and a two-input model; keyed by archive name."""
    project.save(project.model("TinyImage").state_dict(), "image.pth")
    (project.root / "labels.json").write_text(json.dumps(LABELS))
    image = project.spec(
        name="image",
        cls="TinyImage",
        checkpoint={"path": "image.pth"},
        inputs=[{"name": "image", "shape": ["batch", 3, 16, 16], "image": {"resize": 20, "crop": 16, "mean": MEAN, "std": STD}}],
        outputs=[{"name": "logits", "labels": "labels.json", "topk": 3}],
        parity={"atol": 1e-4, "rtol": 1e-3},
        serve={"batch_size": 8, "max_batch_delay_ms": 50},
    )
    project.save(project.model("TinyText").state_dict(), "text.pth")
    make_tokenizer(project.root / "tokenizer.json")
    text = project.spec(
        name="text",
        cls="TinyText",
        checkpoint={"path": "text.pth"},
        inputs=[
            {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 32]},
            {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2]},
        ],
        dims={"seq": {"sizes": [4, 9], "max": 16}},
        text={"tokenizer": "tokenizer.json", "max_length": 12},
        serve={"batch_size": 8, "max_batch_delay_ms": 50},
    )
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    (project.root / "csv_hooks.py").write_text(HOOKS)
    hooks = project.spec(name="hooks", serve={"hooks": "csv_hooks.py", "batch_size": 8, "max_batch_delay_ms": 50})
    two, _ = project.multi_io_specs()
    return {"image": image, "text": text, "hooks": hooks, "two": two}


def preprocess(data: bytes) -> np.ndarray:
    """The image spec's preprocessing, written out independently of the handler: [1, 3, 16, 16]."""
    from PIL import Image

    im = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = im.size
    size = (20, int(20 * h / w)) if w <= h else (int(20 * w / h), 20)
    im = im.resize(size, Image.BILINEAR)
    w, h = im.size
    top, left = int(round((h - 16) / 2)), int(round((w - 16) / 2))
    x = np.asarray(im.crop((left, top, left + 16, top + 16)), dtype=np.float32) / 255
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return x.transpose(2, 0, 1)[None]


def picture(fmt: str, size: tuple[int, int] = (40, 30), seed: int = 0) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def top_labels(logits: np.ndarray, k: int = 3) -> list[list[dict]]:
    """Softmax, then the k best labels with scores, per row, computed here with numpy."""
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return [[{"label": LABELS[i], "score": float(row[i])} for i in np.argsort(-row)[:k]] for row in p]


def eager_image(project: Project, x: np.ndarray) -> np.ndarray:
    model = project.model("TinyImage")
    model.load_state_dict(torch.load(project.root / "image.pth", weights_only=True))
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


def eager_text(project: Project, texts: list[str]) -> np.ndarray:
    """Each text on its own (no padding), tokenized here with the tokenizers library."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(project.root / "tokenizer.json"))
    tok.enable_truncation(12)
    model = project.model("TinyText")
    model.load_state_dict(torch.load(project.root / "text.pth", weights_only=True))
    rows = []
    for t in texts:
        ids = torch.tensor([tok.encode(t).ids])
        with torch.no_grad():
            rows.append(model(ids, torch.ones_like(ids))[0].numpy())
    return np.stack(rows)


def close_labels(got: list, want: list, atol: float = 1e-4) -> bool:
    return all(
        [g["label"] for g in gr] == [w["label"] for w in wr] and all(abs(g["score"] - w["score"]) <= atol for g, w in zip(gr, wr))
        for gr, wr in zip(got, want)
    ) and len(got) == len(want)
