"""The spec's request contract: how an image or a text becomes the model's tensors, labelled outputs, user
hooks, and the largest size a dynamic dim may take. Parsed with the same field-naming reader as the rest."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.spec.reader import Reader

IMAGE_MODES = {"RGB": 3, "L": 1}
ACTIVATIONS = ("softmax", "sigmoid", "none")
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what a tokenizer fills, by these names
DEFAULT_MAX_PIXELS = 25_000_000  # a 5000 x 5000 photo; a decompression bomb declares far more


@dataclass(frozen=True)
class ImageSpec:
    """How an encoded image becomes one row of a [batch, C, H, W] float input (see images.preprocess)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    mode: str = "RGB"
    resize: int | None = None
    crop: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    processor: dict[str, Any] | None = None  # a Hugging Face image processor's steps (pipeline/spec/processor.py)
    processor_file: Path | None = None

    def record(self) -> dict[str, Any]:
        if self.processor is not None:
            return {"mode": self.mode, "processor": self.processor, "max_pixels": self.max_pixels}
        return {
            "mode": self.mode,
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "max_pixels": self.max_pixels,
        }


@dataclass(frozen=True)
class TextSpec:
    """Text requests tokenized with a Hugging Face `tokenizers` file into input_ids (and mask, type ids)."""

    tokenizer: Path  # a tokenizer.json, or a folder with tokenizer.json and tokenizer_config.json (transformers loads it)
    max_length: int | None = 128  # None: a folder's model_max_length (128 where it has none)

    @property
    def folder(self) -> bool:
        return self.tokenizer.is_dir()


def image(r: Reader, value: Any, where: str, shape: tuple[int | str, ...], dtype: str) -> ImageSpec:
    m = r.mapping(value, where, ("resize", "crop", "mean", "std", "mode", "max_pixels", "processor"))
    if m.get("processor") is not None:
        return _processed(r, m, where, shape, dtype)
    mode = r.choice(m.get("mode", "RGB"), f"{where}.mode", tuple(IMAGE_MODES))
    channels = IMAGE_MODES[mode]
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise r.fail(f"{where}", f"an image input must have a floating-point dtype, not {dtype}")
    if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        raise r.fail(f"{where}", f"an image input has shape [batch, {channels}, height, width] with fixed sizes, got {list(shape)}")
    if shape[1] != channels:
        raise r.fail(f"{where}.mode", f"{mode} images have {channels} channel(s), the input's shape declares {shape[1]}")
    stats = {}
    for key in ("mean", "std"):
        default = [0.0] * channels if key == "mean" else [1.0] * channels
        items = r.list_(m.get(key, default), f"{where}.{key}")
        if len(items) != channels:
            raise r.fail(f"{where}.{key}", f"give one value per channel ({channels}), got {len(items)}")
        values = []
        for i, v in enumerate(items):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise r.fail(f"{where}.{key}[{i}]", f"expected a number, got {v!r}")
            values.append(float(v))
        stats[key] = tuple(values)
    if any(not s > 0 for s in stats["std"]):
        raise r.fail(f"{where}.std", f"standard deviations must be > 0, got {list(stats['std'])}")
    resize = None if m.get("resize") is None else r.int_(m["resize"], f"{where}.resize", minimum=1)
    crop = None if m.get("crop") is None else r.int_(m["crop"], f"{where}.crop", minimum=1)
    height, width = shape[2], shape[3]
    if crop is not None and (crop != height or crop != width):
        raise r.fail(f"{where}.crop", f"the crop ({crop}x{crop}) must equal the input's height and width ({height}x{width})")
    if crop is not None and resize is not None and resize < crop:
        raise r.fail(f"{where}.resize", f"resizing the shorter side to {resize} leaves too little for a {crop}x{crop} crop")
    if resize is not None and crop is None and height != width:
        raise r.fail(f"{where}.crop", f"resize without crop gives a square only from a square image; add crop: {min(height, width)}")
    max_pixels = r.int_(m.get("max_pixels", DEFAULT_MAX_PIXELS), f"{where}.max_pixels", minimum=1)
    return ImageSpec(mean=stats["mean"], std=stats["std"], mode=mode, resize=resize, crop=crop, max_pixels=max_pixels)


def _processed(r: Reader, m: dict[str, Any], where: str, shape: tuple[int | str, ...], dtype: str) -> ImageSpec:
    """`image: {processor: PATH}`: a Hugging Face image processor does every step; nothing else but max_pixels."""
    from pipeline.spec import processor

    others = sorted(set(m) - {"processor", "max_pixels"})
    if others:
        raise r.fail(f"{where}.{others[0]}", "the processor decides the image's steps: give processor (and max_pixels) only")
    path, steps = processor.read(r, m["processor"], f"{where}.processor")
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise r.fail(where, f"an image input must have a floating-point dtype, not {dtype}")
    size = processor.output_size(steps)
    if size is None:
        raise r.fail(f"{where}.processor", f"{path.name}: the processed size depends on the image (no crop): the input needs fixed sizes")
    if len(shape) != 4 or list(shape[1:]) != [3, *size]:
        raise r.fail(f"{where}.processor", f"{path.name} makes [3, {size[0]}, {size[1]}] images, the input is declared {list(shape)}")
    max_pixels = r.int_(m.get("max_pixels", DEFAULT_MAX_PIXELS), f"{where}.max_pixels", minimum=1)
    return ImageSpec(mean=(), std=(), max_pixels=max_pixels, processor=steps, processor_file=path)


def text(r: Reader, value: Any, inputs: tuple[Any, ...], dim_max: dict[str, int]) -> TextSpec | None:
    """`text: {tokenizer, max_length}`; the model must declare input_ids [batch, <dim>], and the mask and type ids
    it takes on the same dims, all integers."""
    if value is None:
        return None
    m = r.mapping(value, "text", ("tokenizer", "max_length"), ("tokenizer",))
    given = (r.base / r.str_(m["tokenizer"], "text.tokenizer")).resolve()
    if given.is_dir():
        if not (given / "tokenizer.json").is_file():
            raise r.fail("text.tokenizer", f"{m['tokenizer']}: a folder without tokenizer.json (transformers' fast tokenizer)")
        tokenizer = given
    else:
        tokenizer = r.file(m["tokenizer"], "text.tokenizer")
        if tokenizer.suffix != ".json":
            raise r.fail("text.tokenizer", f"expected a Hugging Face tokenizers file (tokenizer.json) or its folder, got {m['tokenizer']}")
    given_length = m.get("max_length", None if tokenizer.is_dir() else 128)
    max_length = None if given_length is None else r.int_(given_length, "text.max_length", minimum=1)
    by_name = {t.name: t for t in inputs}
    ids = by_name.get("input_ids")
    if ids is None:
        raise r.fail("text", "a text model needs an input named input_ids (and attention_mask, token_type_ids if it takes them)")
    if len(ids.shape) != 2 or not isinstance(ids.shape[1], str):
        raise r.fail("text", f"input_ids must have the shape [batch, <sequence dim>], got {list(ids.shape)}")
    for name in TEXT_INPUTS:
        t = by_name.get(name)
        if t is None:
            continue
        if tuple(t.shape) != tuple(ids.shape):
            raise r.fail("text", f"{name} must have the shape of input_ids {list(ids.shape)}, got {list(t.shape)}")
        if t.dtype not in ("int64", "int32", "int16", "uint8", "int8", "bool") and name != "attention_mask":
            raise r.fail("text", f"{name} must be an integer input, got {t.dtype}")
    limit = dim_max.get(str(ids.shape[1]))
    if limit is not None and max_length is not None and max_length > limit:
        raise r.fail("text.max_length", f"{max_length} is over dims.{ids.shape[1]}.max ({limit}): a long text would be refused")
    return TextSpec(tokenizer=tokenizer, max_length=max_length)


def dims(r: Reader, value: Any, used: list[str], default: tuple[int, ...]) -> tuple[dict[str, tuple[int, ...]], dict[str, int]]:
    """`dims: {seq: [5, 16]}` or `{seq: {sizes: [5, 16], max: 64}}`: the sizes parity tests, and the largest a
    request may send (a longer one is a 400, not the model's IndexError)."""
    m = r.mapping(value, "dims", tuple(used))
    sizes: dict[str, tuple[int, ...]] = {}
    maxima: dict[str, int] = {}
    for name in used:
        item = m.get(name, list(default))
        where = f"dims.{name}"
        if isinstance(item, dict):
            d = r.mapping(item, where, ("sizes", "max"))
            if d.get("max") is not None:
                maxima[name] = r.int_(d["max"], f"{where}.max", minimum=1)
            item = d.get("sizes", list(default))
            where = f"{where}.sizes"
        listed = r.list_(item, where)
        if len(set(listed)) < 2:
            raise r.fail(where, "give at least two different sizes to test the dynamic dimension with")
        sizes[name] = tuple(r.int_(s, f"{where}[{i}]", minimum=1) for i, s in enumerate(listed))
        if name in maxima and max(sizes[name]) > maxima[name]:
            raise r.fail(f"dims.{name}.max", f"{maxima[name]} is below a size parity tests ({max(sizes[name])})")
    return sizes, maxima


@dataclass(frozen=True)
class OutputLabels:
    """Answer an output as labels with scores, best first: `labels` (a file, or 'from_config'), topk, activation."""

    source: Path | str  # a JSON file, or "from_config" (a Hugging Face config's id2label)
    names: tuple[str, ...] | None  # read from the file; None for from_config, which is read at build
    topk: int = 5
    activation: str = "softmax"


def output_labels(r: Reader, m: dict[str, Any], where: str) -> OutputLabels | None:
    if m.get("labels") is None:
        for key in ("topk", "activation"):
            if m.get(key) is not None:
                raise r.fail(f"{where}.{key}", "only meaningful with labels: add labels (a JSON file, or from_config)")
        return None
    raw = m["labels"]
    source: Path | str = "from_config" if raw == "from_config" else r.file(raw, f"{where}.labels")
    return OutputLabels(
        source=source,
        names=None if source == "from_config" else read_labels(r, source, f"{where}.labels"),
        topk=r.int_(m.get("topk", 5), f"{where}.topk", minimum=1),
        activation=r.choice(m.get("activation", "softmax"), f"{where}.activation", ACTIVATIONS),
    )


def read_labels(r: Reader, source: Path, where: str) -> tuple[str, ...]:
    """A labels file: a JSON list, or an object {"0": "cat", ...} whose keys are the indices 0..n-1."""
    import json

    try:
        doc = json.loads(source.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise r.fail(where, f"{source.name}: not a readable JSON file ({exc})") from None
    if isinstance(doc, list) and all(isinstance(v, (str, int, float)) for v in doc):
        return tuple(str(v) for v in doc)
    if isinstance(doc, dict):
        try:
            indexed = {int(k): str(v) for k, v in doc.items()}
        except (TypeError, ValueError):
            raise r.fail(where, f'{source.name}: the keys of {{"index": "label"}} must be integers') from None
        if sorted(indexed) != list(range(len(indexed))):
            raise r.fail(where, f"{source.name}: indices must run from 0 to {len(indexed) - 1} without gaps")
        return tuple(indexed[i] for i in range(len(indexed)))
    raise r.fail(where, f'{source.name}: expected a JSON list of labels or {{"index": "label"}}')


def hooks(r: Reader, value: Any) -> Path | None:
    if value is None:
        return None
    path = r.file(value, "serve.hooks")
    if path.suffix != ".py":
        raise r.fail("serve.hooks", f"expected a Python file (.py), got {value}")
    try:
        defined = hook_functions(path)
    except SyntaxError as exc:
        raise r.fail("serve.hooks", f"{value}: syntax error at line {exc.lineno}: {exc.msg}") from None
    if not defined & {"decode", "encode"}:
        raise r.fail("serve.hooks", f"{value} defines neither decode(body, content_type) nor encode(outputs)")
    if "decode" in defined and "samples" not in defined:
        raise r.fail(
            "serve.hooks",
            f"{value} defines decode() but no samples(); add samples() returning [(body bytes, content type), ...] "
            "so that parity checks the model through your decoding",
        )
    return path


def hook_functions(path: Path) -> set[str]:
    """The top-level functions a hooks file defines, found without running it."""
    import ast

    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
