"""Image preprocessing from a Hugging Face image processor: the handler's Pillow + numpy steps against transformers'
own *ImageProcessorPil classes, on non-square images of odd sizes, JPEG and PNG (RGBA and grayscale too)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

from handlers.marpipe_serving import images
from pipeline.errors import SpecError
from pipeline.spec import processor
from pipeline.spec.reader import Reader

transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

CASES = {  # class, its overrides (small sizes: the tests stay fast)
    "vit": ("ViTImageProcessorPil", {"size": {"height": 32, "width": 48}}),
    "vit_int_size": ("ViTImageProcessorPil", {"size": 40}),
    "deit": ("DeiTImageProcessorPil", {"size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}}),
    "clip": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 36}, "crop_size": {"height": 32, "width": 32}}),
    "clip_longest": ("CLIPImageProcessorPil", {"size": {"shortest_edge": 40, "longest_edge": 50}, "crop_size": 32}),
    "convnext": ("ConvNextImageProcessorPil", {"size": {"shortest_edge": 32}, "crop_pct": 0.875}),
    "convnext_384": ("ConvNextImageProcessorPil", {"size": {"shortest_edge": 384}, "resample": 2}),
}


def picture(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1) + rng.integers(-30, 31, (height, width, 3))
    im = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    if mode == "RGBA":
        alpha = Image.fromarray((x * 255 // width).astype(np.uint8))
        im = im.copy()
        im.putalpha(alpha)
    return im.convert(mode) if mode != "RGBA" else im


def encoded(im: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return buf.getvalue()


def steps(folder: Path) -> dict:
    _, found = processor.read(Reader(folder / "spec.yaml"), ".", "inputs[0].image.processor")
    return found


@pytest.mark.parametrize("case", sorted(CASES))
def test_handler_pixels_equal_transformers_processor(tmp_path: Path, case: str) -> None:
    name, overrides = CASES[case]
    hf = getattr(transformers, name)(**overrides)
    hf.save_pretrained(tmp_path)
    record = {"mode": "RGB", "processor": steps(tmp_path), "max_pixels": 10**7}
    images_tried = [(97, 61, "RGB", "JPEG"), (61, 97, "RGB", "PNG"), (45, 123, "RGBA", "PNG"), (123, 45, "L", "JPEG")]
    images_tried.append((33, 31, "RGB", "PNG"))  # smaller than some crops: zero-padded
    for width, height, mode, fmt in images_tried:
        if mode != "RGB" and not record["processor"]["convert_rgb"]:
            continue  # transformers keeps the image's own channels there (4 or 1), which it then cannot normalise
        data = encoded(picture(width, height, mode, seed=width), fmt)
        with Image.open(io.BytesIO(data)) as im:
            want = hf(im, return_tensors="np")["pixel_values"][0]
        got = images.preprocess(data, record, "pixel_values", ["batch", *want.shape])
        assert got.shape == want.shape and got.dtype == np.float32, (case, mode, fmt, got.shape, want.shape)
        assert np.array_equal(got, want), (case, mode, fmt, float(np.abs(got - want).max()))


@pytest.mark.parametrize("kind", sorted(processor.TYPES))
def test_defaults_are_the_classes_own(kind: str) -> None:
    cls = getattr(transformers, f"{kind}Pil")
    instance = cls()
    for key, ours in processor.TYPES[kind].items():
        theirs = getattr(instance, key, None)
        theirs = dict(theirs) if hasattr(theirs, "keys") else list(theirs) if isinstance(theirs, (tuple, list)) else theirs
        theirs = {k: v for k, v in theirs.items() if v is not None} if isinstance(theirs, dict) else theirs
        assert theirs == (pytest.approx(ours) if isinstance(ours, (float, list)) else ours), (key, theirs, ours)
    assert processor.SQUARE[kind] == bool(getattr(cls, "default_to_square", True))


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("do_pad", True, "do_pad"),
        ("do_flip_channel_order", True, "do_flip_channel_order"),
        ("size", {"max_height": 30, "max_width": 30}, "size"),
        ("crop_pct", 0.9, "crop_pct"),
        ("image_processor_type", "SiglipImageProcessor", "image_processor_type"),
    ],
)
def test_a_field_not_reproduced_is_exit_2_naming_it(tmp_path: Path, field: str, value: object, named: str) -> None:
    transformers.ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    path = tmp_path / processor.FILE
    doc = json.loads(path.read_text())
    doc[field] = value
    path.write_text(json.dumps(doc))
    with pytest.raises(SpecError, match=named) as caught:
        steps(tmp_path)
    assert caught.value.exit_code == 2
