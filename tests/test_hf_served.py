"""Hugging Face models served by a real TorchServe, against transformers itself (issue 20's done-when): a ViT with
its ViT processor and a ConvNeXt with its processor (shortest edge + crop_pct, bicubic), eager and ONNX, answer
non-square JPEG and PNG images within 2e-4 of transformers' processor + from_pretrained model, top-1 equal; a GPT-2
folder with `select: last` answers a JSON list of texts row by row as each text alone, in every format."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import Project, marpipe, serving

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_processor import encoded, picture  # noqa: E402

TEXTS = ["a good movie", "the worst film i never watched and it was really very boring", "fun"]
IMAGES = [(97, 61, "JPEG"), (61, 97, "PNG"), (123, 45, "JPEG"), (45, 123, "PNG")]
RAW = "application/json; raw=true"


def _vision(root: Path) -> None:
    from transformers import ConvNextConfig, ConvNextForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, num_labels=5, **sizes)).save_pretrained(root / "vit")
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    convnext = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)
    ConvNextForImageClassification(convnext).save_pretrained(root / "convnext")
    transformers.ConvNextImageProcessorPil(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(root / "convnext")


def _gpt2(root: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from make_bert import WORDS

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=1000, n_positions=64)).save_pretrained(root / "gpt2")
    vocab = {t: i for i, t in enumerate(["<|endoftext|>", *dict.fromkeys(WORDS)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "gpt2" / "tokenizer.json"))
    special = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 64, **special}
    (root / "gpt2" / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Project:
    project = Project(tmp_path_factory.mktemp("hf_served"))
    root = project.root
    _vision(root)
    _gpt2(root)
    image = {"name": "pixel_values", "shape": ["batch", 3, 32, 32]}
    specs = {
        "vit": {"architecture": {"transformers": "vit"}, "inputs": [dict(image, image={"processor": "vit"})]},
        "convnext": {"architecture": {"transformers": "convnext"}, "inputs": [dict(image, image={"processor": "convnext"})]},
        "gpt2": {
            "architecture": {"transformers": "gpt2"},
            "inputs": [
                {"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 1000]},
                {"name": "attention_mask", "shape": ["batch", "seq"], "dtype": "int64", "range": [0, 2], "generate": "padding_mask"},
            ],
            "dims": {"seq": {"sizes": [8, 16], "max": 64}},
            "text": {"tokenizer": "gpt2"},
            "outputs": [{"name": "logits", "select": "last"}],
        },
    }
    paths = []
    for name, doc in specs.items():
        doc["parity"] = {"atol": 1e-4, "rtol": 1e-3}
        paths.append(root / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump({"name": name, **doc}, sort_keys=False))
    for formats, chosen in (("eager,onnx", paths[:2]), ("eager,torchscript,onnx", paths[2:])):  # archives <name>_<format>
        result = marpipe("build", "--store", str(project.store), "--format", formats, *map(str, chosen), timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        print(result.stdout)
    return project


@pytest.fixture(scope="module")
def server(project: Project):
    yield from serving(project.store)


def _post(server, name: str, body: bytes, ctype: str) -> np.ndarray | dict:
    code, _, answer = server.request("inference", f"/predictions/{name}", body, {"Content-Type": ctype, "Accept": RAW})
    assert code == 200, answer[:300]
    return json.loads(answer)["outputs"]


@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_images_answer_as_transformers_processor_and_model(project: Project, server, family: str) -> None:
    folder = project.root / family
    processor = getattr(transformers, "ViTImageProcessorPil" if family == "vit" else "ConvNextImageProcessorPil").from_pretrained(folder)
    model = transformers.AutoModelForImageClassification.from_pretrained(folder, attn_implementation="eager").eval()
    for fmt in ("eager", "onnx"):
        worst = 0.0
        for width, height, kind in IMAGES:
            data = encoded(picture(width, height, seed=width + height), kind)
            with Image.open(io.BytesIO(data)) as im, torch.no_grad():
                want = model(**processor(im, return_tensors="pt")).logits.numpy()
            got = np.asarray(_post(server, f"{family}_{fmt}", data, f"image/{kind.lower()}")["logits"])
            worst = max(worst, float(np.abs(got - want).max()))
            assert np.abs(got - want).max() <= 2e-4 and got.argmax() == want.argmax(), (fmt, width, height, kind)
        print(f"{family} {fmt}: served vs transformers max abs {worst:.3g} over {len(IMAGES)} images")
    b64 = {"inputs": {"pixel_values": {"b64": base64.b64encode(data).decode()}}}  # base64 in JSON keeps working
    assert np.allclose(_post(server, f"{family}_onnx", json.dumps(b64).encode(), "application/json")["logits"], want, atol=2e-4)


@pytest.mark.parametrize("fmt", ["eager", "torchscript", "onnx"])
def test_gpt2_answers_each_text_as_alone_at_its_last_token(project: Project, server, fmt: str) -> None:
    folder = project.root / "gpt2"
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
    got = np.asarray(_post(server, f"gpt2_{fmt}", json.dumps({"inputs": {"text": TEXTS}}).encode(), "application/json")["logits"])
    assert got.shape == (3, 1000)
    worst = 0.0
    for row, text in zip(got, TEXTS):
        with torch.no_grad():
            alone = model(**tok(text, return_tensors="pt")).logits[0, -1].numpy()
        worst = max(worst, float(np.abs(row - alone).max()))
    print(f"gpt2 {fmt}: each row vs the text alone, max abs {worst:.3g}")
    assert worst <= 1e-4
