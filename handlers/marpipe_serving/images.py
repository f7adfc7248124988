"""An encoded image (JPEG, PNG, WebP...) into one row of a [C, H, W] float input, exactly as the spec declares.

decode with Pillow → convert to `mode` → resize so the shorter side is `resize` (the longer side
``int(resize * long / short)``, bilinear) → centre-crop `crop`×`crop` (top ``int(round((h - crop) / 2))``, left
likewise) → scale to [0, 1] → subtract `mean`, divide by `std` per channel → HWC to CHW. Pillow is imported
only when an archive has image inputs.
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
