"""An encoded image (JPEG, PNG, WebP...) into one row of a [C, H, W] float input, exactly as the spec declares.

decode with Pillow → convert to `mode` → resize so the shorter side is `resize` (the longer side
``int(resize * long / short)``, bilinear) → centre-crop `crop`×`crop` (top ``int(round((h - crop) / 2))``, left
likewise) → scale to [0, 1] → subtract `mean`, divide by `std` per channel → HWC to CHW. Pillow is imported
only when an archive has image inputs.

An input with a Hugging Face image processor (`image.processor` in marpipe.json) is prepared as transformers' PIL
backend prepares it instead (`hf_pixels`): convert to RGB (alpha composited onto white) → resize (squash to
{height, width}; shortest edge to `shortest_edge`, the longer ``int(edge * long / short)``; within
{shortest_edge, longest_edge}; ConvNeXt: shortest edge to ``int(edge / crop_pct)`` then a centre crop, or a squash
from 384 up) with its `resample` filter → centre crop (top ``(h - crop) // 2``; zero-padded where the image is
smaller) → rescale in float64, to float32 → ``(x - mean) / std`` in float32.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np

from .errors import BadRequest

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")  # what Pillow may decode here: not EPS (Ghostscript), PSD, ...
# What a body's first bytes say it is: a client that sends no Content-Type still gets its image read.
MAGIC = ((b"\xff\xd8\xff", "image/jpeg"), (b"\x89PNG\r\n\x1a\n", "image/png"), (b"GIF8", "image/gif"), (b"BM", "image/bmp"))


def sniff(body: bytes) -> str | None:
    """The image content type a body's magic bytes announce, or None."""
    head = bytes(body[:16])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), None)


def preprocess(data: bytes, spec: dict[str, Any], name: str, shape: list) -> np.ndarray:
    """One image as a float32 [C, H, W] array. BadRequest 400 for what is not a decodable image, 413 over the
    pixel limit (checked from the header, before any pixel is decoded)."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape[1], shape[2], shape[3]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as im:
                if spec.get("processor"):
                    return hf_pixels(im, spec["processor"], name, spec["max_pixels"])
                w, h = im.size
                resize, crop = spec.get("resize"), spec.get("crop")
                size = None
                if resize:
                    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
                for what, (x, y) in (("image", (w, h)), ("resized image", size or (0, 0))):
                    if x * y > spec["max_pixels"]:  # a 250000x100 strip is small, resized to a short side of 256 it is not
                        raise BadRequest(f"input {name!r}: the {what} is {x}x{y} pixels, over the limit of {spec['max_pixels']}", 413)
                im = im.convert(spec["mode"])
                if size:
                    im = im.resize(size, Image.BILINEAR)
                if crop:
                    w, h = im.size
                    top, left = int(round((h - crop) / 2)), int(round((w - crop) / 2))
                    im = im.crop((left, top, left + crop, top + crop))
                pixels = np.asarray(im, dtype=np.float32)
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(
            f"input {name!r}: the image declares too many pixels, over the limit of {spec['max_pixels']} ({exc})", 413
        ) from None
    except UnidentifiedImageError:
        raise BadRequest(f"input {name!r}: the body is not a decodable image (JPEG, PNG, WebP, ...)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise BadRequest(f"input {name!r}: the image cannot be decoded ({exc})") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.shape[:2] != (height, width):
        raise BadRequest(f"input {name!r}: the image is {pixels.shape[1]}x{pixels.shape[0]}, the model takes {width}x{height}")
    pixels /= np.float32(255)
    pixels -= np.asarray(spec["mean"], dtype=np.float32)
    pixels /= np.asarray(spec["std"], dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1)[:channels])


def hf_pixels(im: Any, p: dict[str, Any], name: str, max_pixels: int) -> np.ndarray:
    """One image as transformers' PIL-backend processor makes it: float32 [3, H, W]."""
    from PIL import Image

    w, h = im.size
    size = _resized(h, w, p)
    for what, (y, x) in (("image", (h, w)), ("resized image", size or (0, 0))):
        if x * y > max_pixels:
            raise BadRequest(f"input {name!r}: the {what} is {x}x{y} pixels, over the limit of {max_pixels}", 413)
    if p["convert_rgb"] and ("A" in im.getbands() or im.info.get("transparency") is not None):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    elif im.mode != "RGB":
        im = im.convert("RGB")  # (without do_convert_rgb transformers keeps other modes' channels, which the model refuses)
    if size is not None:
        im = im.resize((size[1], size[0]), resample=p["resample"])
    pixels = np.asarray(im)
    if p.get("crop_pct") is not None and p["resize"]["shortest_edge"] < 384:
        edge = p["resize"]["shortest_edge"]
        pixels = center_crop(pixels, edge, edge)
    if p.get("crop"):
        pixels = center_crop(pixels, p["crop"]["height"], p["crop"]["width"])
    if "rescale" in p:
        pixels = (pixels.astype(np.float64) * p["rescale"]).astype(np.float32)
    if pixels.dtype != np.float32:
        pixels = pixels.astype(np.float32)
    if "mean" in p:
        pixels = (pixels - np.asarray(p["mean"], dtype=np.float32)) / np.asarray(p["std"], dtype=np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _resized(h: int, w: int, p: dict[str, Any]) -> tuple[int, int] | None:
    """(height, width) the processor resizes to (transformers' get_resize_output_image_size and
    get_size_with_aspect_ratio), or None."""
    size = p.get("resize")
    if not size:
        return None
    if p.get("crop_pct") is not None:  # ConvNeXt
        edge = size["shortest_edge"]
        return _shortest(h, w, int(edge / p["crop_pct"])) if edge < 384 else (edge, edge)
    if "height" in size:
        return size["height"], size["width"]
    if "longest_edge" in size:
        return _aspect(h, w, size["shortest_edge"], size["longest_edge"])
    return _shortest(h, w, size["shortest_edge"])


def _shortest(h: int, w: int, edge: int) -> tuple[int, int]:
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return (new_long, edge) if w <= h else (edge, new_long)


def _aspect(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    raw = None
    low, high = float(min(h, w)), float(max(h, w))
    if high / low * size > max_size:
        raw = max_size * low / high
        size = int(round(raw))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    if w < h:
        return (int(raw * h / w) if raw is not None else int(size * h / w)), size
    return size, (int(raw * w / h) if raw is not None else int(size * w / h))


def center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, C] cropped about the centre to height x width (top ``(H - height) // 2``), zero-padded where smaller."""
    h, w = pixels.shape[:2]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0 and top + height <= h and left + width <= w:
        return pixels[top : top + height, left : left + width]
    new_h, new_w = max(height, h), max(width, w)
    padded = np.zeros((new_h, new_w, *pixels.shape[2:]), dtype=pixels.dtype)
    pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
    padded[pad_top : pad_top + h, pad_left : pad_left + w] = pixels
    top, left = top + pad_top, left + pad_left
    return padded[max(0, top) : min(new_h, top + height), max(0, left) : min(new_w, left + width)]
