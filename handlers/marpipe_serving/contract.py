"""What a request may send, from the archive's ``marpipe.json``: the declared inputs with their dtypes, ranges and
dims, which inputs take images, whether text is tokenized, the row and dim limits, the user's hooks, and how
outputs are answered. `check` turns values a client sent into arrays the model can run, or a BadRequest.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from . import images
from .bodies import parse_json_or_npz
from .errors import BadRequest
from .models import np_dtype
from .rows import TextArrays

TEXT_KEY = "text"  # the JSON key (and multipart part) that carries text for a text model
MAX_RESPONSE = 6_553_500  # TorchServe's default max_response_size: for archives that do not record serve.max_response_bytes


class Contract:
    def __init__(self, meta: dict, model_dir: str) -> None:
        self.meta = meta
        self.inputs: list[dict] = meta["inputs"]
        self.names = [t["name"] for t in self.inputs]
        self.by_name = {t["name"]: t for t in self.inputs}
        self.images = {t["name"]: t["image"] for t in self.inputs if t.get("image")}
        self.max_rows = meta.get("serve", {}).get("max_rows")
        self.max_response: int = meta.get("serve", {}).get("max_response_bytes") or MAX_RESPONSE
        self.dim_max: dict[str, int] = meta.get("dim_max") or {}
        self.labels = {o["name"]: o["labels"] for o in meta["outputs"] if o.get("labels")}
        self.text = None
        if meta.get("text"):
            from .text import TextCodec

            self.text = TextCodec(model_dir, meta["text"], self.inputs)
        self.hooks = None
        if meta.get("hooks"):
            from . import hooks

            self.hooks = hooks.load(model_dir, meta["hooks"]["file"])

    @property
    def pad_dim(self) -> str | None:
        """The dynamic dim that batches pad (a text model's sequence), or None: requests must then agree."""
        return self.text.seq_dim if self.text else None

    def pad_value(self, name: str) -> int:
        return self.text.pad_values.get(name, 0) if self.text else 0

    # ------------------------------------------------------------ request forms

    def from_json(self, payload: Any, numeric: bool = False) -> dict[str, np.ndarray]:
        """``{"inputs": {name: value}}`` (or a bare value for a one-input model); a text model also takes
        ``{"inputs": {"text": "..." | [...]}}``; an image input also takes ``{"b64": ...}`` or a list of them."""
        if isinstance(payload, dict) and "inputs" in payload and self.names != ["inputs"]:
            extra = sorted(set(payload) - {"inputs"})
            if extra:
                raise BadRequest(f'unknown top-level keys {extra}; send {{"inputs": {{...}}}}')
            payload = payload["inputs"]
            if isinstance(payload, (list, str)) and len(self.names) == 1:
                payload = {self.names[0]: payload}
        elif isinstance(payload, list) and len(self.names) == 1:
            payload = {self.names[0]: payload}
        if self.text and isinstance(payload, str):
            payload = {TEXT_KEY: payload}
        if not isinstance(payload, dict):
            names = ", ".join(self.names)
            raise BadRequest(f'expected {{"inputs": {{{names}: [...]}}}}, got {type(payload).__name__}')
        return self.check(payload, numeric)

    def from_rows(self, payload: dict) -> dict[str, np.ndarray]:
        """KServe v1's ``{"instances": [row, ...]}``: a row is the one input's value (a text model's string, an
        image's ``{"b64"}``), or an object of named inputs (``text`` for a text model)."""
        extra = sorted(set(payload) - {"instances"})
        if extra:
            raise BadRequest(f'unknown top-level keys {extra}; a KServe v1 body is {{"instances": [...]}}')
        rows = payload["instances"]
        if not isinstance(rows, list) or not rows:
            raise BadRequest('"instances" must be a non-empty list of rows')
        if self.max_rows and len(rows) > self.max_rows:
            raise BadRequest(f"{len(rows)} rows in one request; at most {self.max_rows} are allowed (serve.max_rows)", 413)
        image_rows = len(self.names) == 1 and self.images and all(isinstance(r, dict) and set(r) == {"b64"} for r in rows)
        if all(isinstance(r, dict) for r in rows) and not image_rows:
            keys = set(rows[0])
            if any(set(r) != keys for r in rows):
                raise BadRequest("every row of instances must name the same inputs")
            return self.check({k: [r[k] for r in rows] for k in rows[0]})
        if self.text and all(isinstance(r, str) for r in rows):
            return self.check({TEXT_KEY: rows})
        if len(self.names) != 1:
            raise BadRequest(f"this model takes {self.names}: each row of instances must be an object of them")
        return self.check({self.names[0]: rows})

    def from_image(self, body: bytes) -> dict[str, np.ndarray]:
        """A raw image body: one row of the model's one image input."""
        if len(self.images) != 1 or len(self.names) != 1:
            takes = ", ".join(self.names)
            what = "no image input" if not self.images else f"the inputs {takes}"
            raise BadRequest(f"an image body needs a model with one image input; this one has {what}: send JSON or multipart")
        name = next(iter(self.images))
        return self.check({name: images.preprocess(bytes(body), self.images[name], name, self.by_name[name]["shape"])[None]})

    def from_texts(self, texts: Any) -> dict[str, np.ndarray]:
        if self.text is None:
            raise BadRequest("this model takes no text: send its inputs as JSON or npz")
        return self.check({TEXT_KEY: texts})

    def from_parts(self, parts: dict[str, Any], types: dict[str, str]) -> dict[str, np.ndarray]:
        """multipart/form-data: one part per input, named after it (an image input's part holds the image file)."""
        values: dict[str, Any] = {}
        for name, data in parts.items():
            if name in self.images:
                values[name] = images.preprocess(_bytes(data), self.images[name], name, self.by_name[name]["shape"])[None]
            elif name == TEXT_KEY and self.text:
                values[name] = data.decode("utf-8", "replace") if isinstance(data, (bytes, bytearray)) else data
            else:
                values[name] = parse_json_or_npz(data, types.get(name, ""), f"part {name!r}")
        return self.check(values)

    # ------------------------------------------------------------ checks

    def check(self, payload: dict[str, Any], numeric: bool = False) -> dict[str, np.ndarray]:
        """Check values against the declared inputs; cast safely; tokenize text; decode base64 images.

        `numeric`: the caller knows the values hold only numbers and booleans (no strings, no nulls), so a float
        input's nested lists may be converted with their dtype given (twice as fast on an image)."""
        payload = dict(payload)
        from_text = bool(self.text) and TEXT_KEY in payload and TEXT_KEY not in self.by_name
        if from_text:
            given = sorted(set(payload) & set(self.text.fields))
            if given:
                raise BadRequest(f"send either text or {', '.join(given)}, not both")
            payload.update(self.text.encode(payload.pop(TEXT_KEY)))
        unknown = sorted(set(payload) - set(self.names))
        if unknown:
            hint = " (and text)" if self.text else ""
            raise BadRequest(f"unknown inputs {unknown}; this model takes {self.names}{hint}")
        arrays: dict[str, np.ndarray] = {}
        sizes: dict[str, int] = {}
        for t in self.inputs:
            if t["name"] not in payload:
                raise BadRequest(f"missing input {t['name']!r}")
            value = payload[t["name"]]
            if t["name"] in self.images:
                value = self._b64_images(t, value)
            arrays[t["name"]] = self._array(t, value, sizes, numeric)
        if self.max_rows and sizes["batch"] > self.max_rows:
            raise BadRequest(f"{sizes['batch']} rows in one request; at most {self.max_rows} are allowed (serve.max_rows)", 413)
        for dim, limit in self.dim_max.items():
            if sizes.get(dim, 0) > limit:
                raise BadRequest(f"dimension {dim} is {sizes[dim]}, at most {limit} are allowed (dims.{dim}.max)")
        return TextArrays(arrays) if from_text else arrays

    def _b64_images(self, t: dict, value: Any) -> Any:
        """``{"b64": ...}`` or a list of them: decoded and preprocessed rows; anything else is a tensor."""
        rows = [value] if isinstance(value, dict) else value
        if not (isinstance(rows, list) and rows and all(isinstance(r, dict) for r in rows)):
            return value
        if self.max_rows and len(rows) > self.max_rows:  # before any image is decoded
            raise BadRequest(f"{len(rows)} rows in one request; at most {self.max_rows} are allowed (serve.max_rows)", 413)
        out = []
        for r in rows:
            if set(r) != {"b64"} or not isinstance(r["b64"], str):
                raise BadRequest(f'input {t["name"]!r}: an image is {{"b64": "<base64 of the file>"}}')
            try:
                data = base64.b64decode(r["b64"], validate=True)
            except (binascii.Error, ValueError) as exc:
                raise BadRequest(f"input {t['name']!r}: b64 is not valid base64 ({exc})") from None
            out.append(images.preprocess(data, self.images[t["name"]], t["name"], t["shape"]))
        return np.stack(out)

    def _array(self, t: dict, value: Any, sizes: dict[str, int], numeric: bool = False) -> np.ndarray:
        name, shape = t["name"], t["shape"]
        arr = None
        if numeric and isinstance(value, list) and np_dtype(t["dtype"]).kind == "f":
            try:  # float64 first: the cast below still checks for overflow of the declared dtype
                arr = np.array(value, dtype=np.float64)
            except (ValueError, TypeError, RecursionError):
                arr = None  # ragged, or deeper than numpy goes: the general path says which
            if arr is not None and np.isnan(arr).any():
                arr = None  # a null (or a NaN literal): the general path, which refuses nulls and keeps NaN
        try:
            if arr is None:
                arr = value if isinstance(value, np.ndarray) else np.asarray(value)
        except (ValueError, TypeError, RecursionError) as exc:
            raise BadRequest(f"input {name!r}: not a rectangular array of numbers ({str(exc)[:200]})") from None
        if arr.dtype.kind not in "biuf":
            kind = arr.dtype.name if arr.dtype.kind != "O" else "mixed values"
            raise BadRequest(f"input {name!r}: values must be numbers, got {kind}")
        if arr.ndim != len(shape):
            raise BadRequest(f"input {name!r}: expected {len(shape)} dimensions {shape}, got shape {list(arr.shape)}")
        for axis, (want, got) in enumerate(zip(shape, arr.shape)):
            if isinstance(want, int):
                if want != got:
                    raise BadRequest(f"input {name!r}: dimension {axis} must be {want}, got shape {list(arr.shape)}")
            elif sizes.setdefault(want, got) != got:
                raise BadRequest(f"input {name!r}: dimension {axis} ({want}) is {got}, another input has {sizes[want]}")
        if arr.shape[0] == 0:
            raise BadRequest(f"input {name!r}: no rows")
        return cast(name, arr, t["dtype"], t.get("range"))


def cast(name: str, arr: np.ndarray, dtype: str, rng: list | None) -> np.ndarray:
    """To the declared dtype, only when safe: integers to floats yes, floats to integers no; ranges enforced."""
    target = np.dtype(np_dtype(dtype))
    kind = arr.dtype.kind
    if target.kind == "f":
        with np.errstate(over="ignore"):  # overflow is reported just below, as the client's 400
            out = arr.astype(target, copy=False)
        finite = np.isfinite(arr) if kind == "f" else True  # integers are all finite; float16 holds only up to 65504
        if out.dtype != arr.dtype and not np.isfinite(out[finite]).all():
            raise BadRequest(f"input {name!r}: values overflow {dtype}")
        return out
    if kind == "f":
        raise BadRequest(f"input {name!r}: expects {dtype}, got floating-point values (cannot cast safely)")
    if target.kind == "b":
        if not np.isin(arr, (0, 1)).all():
            raise BadRequest(f"input {name!r}: expects booleans (0/1)")
        return arr.astype(bool)
    info = np.iinfo(target)
    if arr.size and (arr.min() < info.min or arr.max() > info.max):
        raise BadRequest(f"input {name!r}: values out of range for {dtype}")
    if rng is not None and arr.size and (arr.min() < rng[0] or arr.max() >= rng[1]):
        raise BadRequest(f"input {name!r}: values must lie in [{rng[0]}, {rng[1]})")
    return arr.astype(target, copy=False)


def _bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    raise BadRequest("an image part must carry the file's bytes")
