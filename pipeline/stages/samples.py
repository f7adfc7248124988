"""Sample raw requests, for parity through the preprocessing: what a client sends to a model with image or text
inputs or a user decode hook, decoded exactly as the served handler decodes it.

Images: one generated picture (not the model's size, so resize and crop run) encoded as PNG and as JPEG. Text:
texts of different lengths, as a text/plain body and as a JSON list. A decode hook: its own ``samples()``. The
archive stores each body with the eager model's answer; the parity stage checks the exported model on them, and
``marpipe smoke`` replays them against TorchServe.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SpecError
from pipeline.spec.spec import Spec

TEXTS = (
    "a",
    "the quick brown fox jumps over the lazy dog",
    " ".join(["a much longer sentence that goes on and on"] * 40),  # past any max_length: truncation runs
)
INDEX = "parity_requests.json"


@dataclass
class Sample:
    name: str
    body: bytes
    content_type: str
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # as the handler decodes the body
    expected: dict[str, np.ndarray] = field(default_factory=dict)  # the eager model's raw outputs
    stored: dict[str, np.ndarray] | None = None  # what the server answers in npz (select: last applied), if other
    answer: Any = None  # the handler's JSON answer for the eager outputs (labels, a hook's encode)


def needed(spec: Spec) -> bool:
    return bool(spec.text or spec.serve.hooks or any(t.image for t in spec.inputs))


def make(spec: Spec, contract: Any) -> list[Sample]:
    """The raw requests for this spec, decoded through the handler's own `contract` (built on the staged archive)."""
    if contract.hooks is not None and hasattr(contract.hooks, "decode"):
        bodies = _hook_samples(spec, contract.hooks)
    elif any(t.image for t in spec.inputs):
        bodies = _image_samples(spec)
    elif spec.text:
        bodies = [
            ("text_plain", TEXTS[1].encode(), "text/plain"),
            ("text_json", json.dumps({"inputs": {"text": list(TEXTS)}}).encode(), "application/json"),
        ]
    else:  # an encode hook only: our own tensor request
        bodies = [("tensors", json.dumps({"inputs": _tensor_rows(spec, skip=())}).encode(), "application/json")]
    samples = []
    for name, body, ctype in bodies:
        try:
            arrays = _decode(contract, body, ctype)
        except Exception as exc:
            raise SpecError(f"{spec.source}: the sample request {name!r} ({ctype}) is refused by the handler: {exc}") from None
        samples.append(Sample(name, body, ctype, arrays))
    return samples


def _decode(contract: Any, body: bytes, ctype: str) -> dict[str, np.ndarray]:
    from handlers.marpipe_serving import codecs

    class Headers:
        @staticmethod
        def get_all_request_header(idx: int) -> dict[str, str]:
            return {"Content-Type": ctype}

    return codecs.decode({"body": body}, Headers(), 0, contract).arrays


def _image_samples(spec: Spec) -> list[tuple[str, bytes, str]]:
    from PIL import Image

    pictures = {t.name: _picture(t) for t in spec.inputs if t.image}
    out = []
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        encoded = {}
        for name, picture in pictures.items():
            buf = io.BytesIO()
            Image.fromarray(picture).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            encoded[name] = buf.getvalue()
        if len(spec.inputs) == 1:
            out.append((fmt.lower(), next(iter(encoded.values())), ctype))
        else:  # other inputs too: JSON with the images in base64
            inputs = {n: {"b64": base64.b64encode(b).decode()} for n, b in encoded.items()}
            inputs.update(_tensor_rows(spec, skip=tuple(encoded)))
            out.append((f"{fmt.lower()}_json", json.dumps({"inputs": inputs}).encode(), "application/json"))
    return out


def _picture(t: Any) -> np.ndarray:
    """A deterministic picture, larger than the model's input and not square, so resize and crop both work."""
    height, width = t.shape[2], t.shape[3]
    h, w = int(height * 1.5) + 7, int(width * 1.25) + 5
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(20240229)
    channels = [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(w + h, 1))]
    picture = np.stack(channels, axis=-1).astype(np.int64) + rng.integers(-20, 21, (h, w, 3))
    picture = np.clip(picture, 0, 255).astype(np.uint8)
    return picture if t.image.mode == "RGB" else picture[:, :, 0]


def _tensor_rows(spec: Spec, skip: tuple[str, ...]) -> dict[str, Any]:
    """One row of generated values for each input not in `skip`, as nested lists."""
    from pipeline.stages import inputs

    dims = {"batch": 1, **{d: v[0] for d, v in spec.dims.items()}}
    made = inputs.make(spec, dims, inputs.SEED + 7)
    return {n: v.tolist() for n, v in made.items() if n not in skip}


def _hook_samples(spec: Spec, hooks: Any) -> list[tuple[str, bytes, str]]:
    try:
        items = list(hooks.samples())
    except Exception as exc:
        raise SpecError(f"{spec.source}: serve.hooks: samples() failed: {type(exc).__name__}: {exc}") from None
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], bytes) and isinstance(item[1], str)):
            raise SpecError(f"{spec.source}: serve.hooks: samples()[{i}] must be a (body bytes, content type) pair")
        out.append((f"hook_{i}", item[0], item[1]))
    if not out:
        raise SpecError(f"{spec.source}: serve.hooks: samples() returned no request")
    return out


def answer(outputs: dict[str, np.ndarray], contract: Any) -> Any:
    """The JSON answer the handler gives for these outputs (labels, the encode hook, or raw lists)."""
    from handlers.marpipe_serving import codecs

    body, _ = codecs.encode(outputs, codecs.Request(outputs), contract)
    return json.loads(body)


BOUND = 1_000_000  # bytes: the most the stored parity samples (tensors, requests and answers) take in an archive


def raw_answer(answer: Any, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
    """A JSON answer that is only the outputs as numbers, as arrays (a row list of different lengths as
    `name.0`, `name.1`, ...): stored as npz, not JSON. None for other answers (labels, a hook's)."""
    doc = answer.get("outputs") if isinstance(answer, dict) and set(answer) == {"outputs"} else None
    if not isinstance(doc, dict) or set(doc) != set(outputs):
        return None
    arrays: dict[str, np.ndarray] = {}
    for name, value in doc.items():
        try:
            arrays[name] = np.asarray(value, dtype=outputs[name].dtype)
            if arrays[name].dtype == object:
                raise ValueError
        except (ValueError, TypeError):  # rows of different lengths
            if not isinstance(value, list):
                return None
            arrays.pop(name, None)
            try:
                arrays.update({f"{name}.{i}": np.asarray(row, dtype=outputs[name].dtype) for i, row in enumerate(value)})
            except (ValueError, TypeError):
                return None
    return arrays


def answer_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """The JSON answer `raw_answer` stored."""
    doc: dict[str, Any] = {}
    for key in sorted(arrays, key=lambda k: (k.rpartition(".")[0] or k, int(k.rpartition(".")[2]) if "." in k else -1)):
        name, dot, index = key.rpartition(".")
        if dot and index.isdigit():
            doc.setdefault(name, []).append(arrays[key].tolist())
        else:
            doc[key] = arrays[key].tolist()
    return {"outputs": doc}


def write(samples: list[Sample], folder: Path, budget: int = BOUND) -> dict[str, Path]:
    """Archive entries: each body, its expected raw outputs (npz), the JSON answer (npz when it is the outputs
    themselves), and an index with content types. Samples are kept in order while they fit `budget` bytes (the
    first always)."""
    from pipeline.store.archive import write_npz

    (folder / "parity_requests").mkdir(exist_ok=True)
    files, index, used = {}, [], 0
    for s in samples:
        body, outputs = f"parity_requests/{s.name}.body", f"parity_requests/{s.name}.npz"
        entry: dict[str, Any] = {"name": s.name, "content_type": s.content_type, "body": body, "outputs": outputs}
        (folder / body).write_bytes(s.body)
        write_npz(folder / outputs, s.expected if s.stored is None else s.stored)
        new = {body: folder / body, outputs: folder / outputs}
        raw = raw_answer(s.answer, s.expected if s.stored is None else s.stored)
        if raw is not None:
            entry["answer_npz"] = f"parity_requests/{s.name}.answer.npz"
            write_npz(folder / entry["answer_npz"], raw)
            new[entry["answer_npz"]] = folder / entry["answer_npz"]
        else:
            entry["answer"] = s.answer
        size = sum(p.stat().st_size for p in new.values()) + len(json.dumps(entry))
        if index and used + size > budget:
            for p in new.values():
                p.unlink()
            continue
        used += size
        files.update(new)
        index.append(entry)
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    files[INDEX] = folder / INDEX
    return files
