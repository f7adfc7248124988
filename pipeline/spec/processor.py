"""`inputs[].image.processor`: a Hugging Face image processor's `preprocessor_config.json`, read into the steps the
handler reproduces with Pillow and numpy (`handlers/marpipe_serving/images.py`, `hf_pixels`), as transformers'
PIL backend computes them.

Reproduced: the processors of `TYPES` with `do_convert_rgb`, `do_resize` with `size` as `{height, width}` (squash),
`{shortest_edge}` (ConvNeXt: with `crop_pct`) or `{shortest_edge, longest_edge}`, `resample`,
`do_center_crop`/`crop_size`, `do_rescale`/`rescale_factor`, `do_normalize`/`image_mean`/`image_std`. A field
that is set and not reproduced is a SpecError naming it: never a silent difference. A field the file leaves out
takes the class's default (`TYPES`; tests/test_processor.py compares them with transformers' own classes).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.spec.reader import Reader

FILE = "preprocessor_config.json"
IMAGENET_STANDARD = [0.5, 0.5, 0.5]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
CONVNEXT = "ConvNextImageProcessor"
_COMMON = {"do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_center_crop": None}
_COMMON |= {"crop_size": None, "do_convert_rgb": None, "crop_pct": None}
# Each class's defaults (transformers 5's *ImageProcessorPil class attributes) and whether an int size means a square.
TYPES: dict[str, dict[str, Any]] = {
    "ViTImageProcessor": {**_COMMON, "size": {"height": 224, "width": 224}, "resample": 2, "image_mean": IMAGENET_STANDARD},
    "DeiTImageProcessor": {
        **_COMMON,
        "size": {"height": 256, "width": 256},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "image_mean": IMAGENET_STANDARD,
    },
    "CLIPImageProcessor": {
        **_COMMON,
        "size": {"shortest_edge": 224},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": 224, "width": 224},
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
    },
    CONVNEXT: {**_COMMON, "size": {"shortest_edge": 384}, "resample": 3, "crop_pct": 224 / 256, "image_mean": IMAGENET_STANDARD},
}
for _name, _defaults in TYPES.items():
    _defaults["image_std"] = CLIP_STD if _name == "CLIPImageProcessor" else IMAGENET_STANDARD
SQUARE = {"ViTImageProcessor": True, "DeiTImageProcessor": True, "CLIPImageProcessor": False, CONVNEXT: False}
# Fields that change nothing here when they hold these values (or are absent).
INERT: dict[str, tuple[Any, ...]] = {
    "image_processor_type": (),
    "processor_class": (),
    "feature_extractor_type": (),
    "default_to_square": (),
    "do_pad": (None, False),
    "pad_size": (),
    "data_format": (None, "channels_first"),
    "input_data_format": (None,),
    "return_tensors": (),
    "device": (None, "cpu"),
    "disable_grouping": (),
    "image_seq_length": (),
}
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def read(r: Reader, value: Any, where: str) -> tuple[Path, dict[str, Any]]:
    """(the file, the steps the handler runs): the processor's fields, defaults filled in and checked."""
    rel = r.str_(value, where)
    path = (r.base / rel).resolve()
    if path.is_dir():
        path = path / FILE
    if not path.is_file():
        raise r.fail(where, f"file not found: {rel} (a {FILE}, or the folder holding one; relative to {r.base or '.'}/)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise r.fail(where, f"{path.name}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict):
        raise r.fail(where, f"{path.name}: expected a JSON object")
    kind = str(doc.get("image_processor_type") or doc.get("feature_extractor_type") or "")
    kind = kind.removesuffix("Pil").removesuffix("Fast").replace("FeatureExtractor", "ImageProcessor")
    if kind not in TYPES:
        raise r.fail(where, f"{path.name}: image_processor_type {kind or None!r} is not one marpipe reproduces ({', '.join(TYPES)})")
    for key, value in doc.items():
        if key in TYPES[kind]:
            continue
        if key not in INERT or (INERT[key] and value not in INERT[key]):
            raise r.fail(f"{where}: {path.name}: {key}", f"{value!r} is not reproduced by the handler; remove it, or use a decode hook")
    f = {**TYPES[kind], **{k: v for k, v in doc.items() if k in TYPES[kind]}}
    return path, _steps(r, f"{where}: {path.name}", kind, f)


def _steps(r: Reader, where: str, kind: str, f: dict[str, Any]) -> dict[str, Any]:
    steps: dict[str, Any] = {"type": kind, "convert_rgb": bool(f["do_convert_rgb"])}
    if f["do_resize"]:
        size = _size(r, f"{where}: size", f["size"], SQUARE[kind])
        if kind == CONVNEXT and "shortest_edge" not in size:
            raise r.fail(f"{where}: size", f"{CONVNEXT} resizes by shortest_edge, got {f['size']!r}")
        if kind != CONVNEXT and f["crop_pct"] is not None:
            raise r.fail(f"{where}: crop_pct", f"only {CONVNEXT} applies crop_pct")
        if f["resample"] not in RESAMPLE:
            raise r.fail(f"{where}: resample", f"{f['resample']!r} is not a PIL resampling filter (0-5)")
        steps["resize"] = size
        steps["resample"] = int(f["resample"])
        if kind == CONVNEXT:
            steps["crop_pct"] = float(f["crop_pct"] if f["crop_pct"] is not None else 224 / 256)
    if f["do_center_crop"]:
        steps["crop"] = _size(r, f"{where}: crop_size", f["crop_size"], True)
        if "height" not in steps["crop"]:
            raise r.fail(f"{where}: crop_size", f"expected {{height, width}}, got {f['crop_size']!r}")
    if f["do_rescale"]:
        steps["rescale"] = float(f["rescale_factor"])
    if f["do_normalize"]:
        for key in ("image_mean", "image_std"):
            value = f[key]
            value = [value] * 3 if isinstance(value, (int, float)) else value
            if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, (int, float)) for v in value)):
                raise r.fail(f"{where}: {key}", f"expected three numbers (RGB), got {f[key]!r}")
            steps[key.removeprefix("image_")] = [float(v) for v in value]
    return steps


def _size(r: Reader, where: str, value: Any, square: bool) -> dict[str, int]:
    """A size as transformers' get_size_dict reads it: a dict, or an int (a square, or the shortest edge)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return {"height": value, "width": value} if square else {"shortest_edge": value}
    forms = ({"height", "width"}, {"shortest_edge"}, {"shortest_edge", "longest_edge"})
    if isinstance(value, dict):
        given = {k for k, v in value.items() if v is not None}
        if given in forms and all(isinstance(value[k], int) and not isinstance(value[k], bool) and value[k] > 0 for k in given):
            return {k: int(value[k]) for k in sorted(given)}
    forms_text = "{height, width}, {shortest_edge} or {shortest_edge, longest_edge}"
    raise r.fail(where, f"{value!r} is not reproduced; marpipe takes {forms_text}")


def output_size(steps: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) of every processed image, or None when it depends on the image."""
    if "crop" in steps:
        return steps["crop"]["height"], steps["crop"]["width"]
    size = steps.get("resize") or {}
    if steps["type"] == CONVNEXT and size:
        return size["shortest_edge"], size["shortest_edge"]
    if "height" in size:
        return size["height"], size["width"]
    return None
