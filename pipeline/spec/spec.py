"""The model spec: parsed and validated once, at the entry point, before torch is imported.

Every error names the spec file and the field path, e.g.
``specs/mlp.yaml: architecture.class: 'MLP2' not defined in models/mlp.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import SpecError
from pipeline.spec import precision as precisions
from pipeline.spec import requests
from pipeline.spec.model import CAST_DTYPES, IDENT_RE, Architecture, parse_architecture, parse_generate
from pipeline.spec.reader import Reader as _Reader
from pipeline.spec.requests import ImageSpec, OutputLabels, TextSpec

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
FORMATS = ("eager", "torchscript", "onnx", "aoti")  # in order of simplicity: auto prefers the earlier on a tie
AUTO = "auto"  # every candidate format through parity, the fastest packaged (pipeline/build/auto.py)
DTYPES = ("float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
DEVICES = ("auto", "cpu", "cuda")
BATCH = "batch"
DEFAULT_DIM_SIZES = (3, 7)
TS_MAX_RESPONSE_MB = 6.5535  # TorchServe's default max_response_size, 6,553,500 bytes
TS_MAX_SIZE_MB = (2**31 - 1) / 1e6  # TorchServe reads its size limits as 32-bit integers of bytes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | str, ...]
    dtype: str = "float32"
    range: tuple[float, float] | None = None  # the rule for requests (and, without generate, for test values)
    generate: str | tuple[float, float] | None = None  # what parity and bench feed: PADDING_MASK or a (low, high) range
    image: ImageSpec | None = None  # requests may send an encoded image for this input


@dataclass(frozen=True)
class OutputSpec:
    name: str
    atol: float | None = None
    rtol: float | None = None
    labels: OutputLabels | None = None  # answered as labels with scores
    select: str | None = None  # "last": each row's value at its last real token (handlers/marpipe_serving/rows.py)


@dataclass(frozen=True)
class KeyRename:
    pattern: str  # a prefix, or a regular expression when `regex` is true
    to: str
    regex: bool = False


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    sha256: str | None = None
    strict: bool = True
    strip_prefix: tuple[str, ...] = ()
    key_map: tuple[KeyRename, ...] = ()
    dtype: str | None = None
    allow_nonfinite: bool = False


@dataclass(frozen=True)
class Export:
    format: str = "eager"  # one of FORMATS, or AUTO
    candidates: tuple[str, ...] = FORMATS  # what auto tries: `format` or `format:precision` (pipeline/spec/precision.py)
    precision: str = precisions.FP32  # fp32 | fp16 | bf16 | int8
    torchscript_method: str = "trace"
    onnx_opset: int | None = None
    onnx_exporter: str = "dynamo"


@dataclass(frozen=True)
class Parity:
    atol: float = 1.0e-5
    rtol: float = 1.0e-4
    batch_sizes: tuple[int, ...] = (1, 4)
    device: str = "auto"
    samples: int = 3
    reference: Path | None = None  # an .npz of inputs and expected outputs from the user's own code
    agreement: float = 0.99  # the accuracy gate of a precision other than fp32 (pipeline/stages/gate.py)
    cosine: float = 0.99


@dataclass(frozen=True)
class Serve:
    batch_size: int = 8
    max_batch_delay_ms: int = 20
    min_workers: int = 1
    max_workers: int = 1
    response_timeout_s: int = 120
    max_rows: int = 64
    max_response_mb: float = TS_MAX_RESPONSE_MB  # the largest answer the server sends (TorchServe's max_response_size)
    handler: Path | None = None
    extra_files: tuple[Path, ...] = ()
    hooks: Path | None = None  # user decode()/encode() around our batching

    @property
    def max_response_bytes(self) -> int:
        return round(self.max_response_mb * 1e6)


@dataclass(frozen=True)
class Spec:
    source: Path  # the spec file, as the user named it
    name: str
    version: str
    architecture: Architecture
    checkpoint: Checkpoint
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[OutputSpec, ...] | None
    dims: dict[str, tuple[int, ...]]
    export: Export
    parity: Parity
    serve: Serve
    text: TextSpec | None = None  # text requests, tokenized into input_ids (attention_mask, token_type_ids)
    dim_max: dict[str, int] = field(default_factory=dict)  # the largest size a request may give a dynamic dim

    def with_format(self, fmt: str, suffix: bool, precision: str | None = None, tag: bool = False) -> Spec:
        """This spec exported as `fmt` (at `precision`, else its own); with `suffix` the archive is named
        `<name>_<fmt>`, with `tag` too `<name>_<fmt>_<precision>`."""
        precision = precision or self.export.precision
        name = self.name + (f"_{fmt}" if suffix else "") + (f"_{precision}" if tag else "")
        return replace(self, name=name, export=replace(self.export, format=fmt, precision=precision))

    def tolerance(self, output: str) -> tuple[float, float]:
        """(atol, rtol) for one output: its own override, else the spec's `parity` values."""
        for out in self.outputs or ():
            if out.name == output:
                return (
                    self.parity.atol if out.atol is None else out.atol,
                    self.parity.rtol if out.rtol is None else out.rtol,
                )
        return self.parity.atol, self.parity.rtol


def load_spec(path: str | Path) -> Spec:
    """Read and validate one spec file. Raises `SpecError` (exit 2) naming the file and field."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{source}: spec file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{source}: cannot read spec: {exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{source}: not valid YAML{where}: {problem}") from None
    return parse_spec(data, source)


def parse_spec(data: Any, source: Path) -> Spec:
    r = _Reader(source)
    top = r.mapping(
        data,
        "",
        ("name", "version", "architecture", "checkpoint", "inputs", "outputs", "dims", "export", "parity", "serve", "text"),
        ("name", "architecture", "inputs"),
    )
    name = r.str_(top["name"], "name")
    if not NAME_RE.match(name):
        raise r.fail("name", f"{name!r} is not a valid model name (letters, digits, '_', '-', '.'; no '/')")
    version = r.str_(top.get("version", "1.0"), "version")
    inputs = _inputs(r, top["inputs"])
    used = sorted({d for t in inputs for d in t.shape[1:] if isinstance(d, str)})
    dims, dim_max = requests.dims(r, top.get("dims"), used, DEFAULT_DIM_SIZES)
    architecture = parse_architecture(r, top["architecture"])
    if top.get("checkpoint") is None and architecture.transformers is None:
        raise r.fail("checkpoint", "required")
    return Spec(
        source=source,
        name=name,
        version=version,
        architecture=architecture,
        checkpoint=_checkpoint(r, top.get("checkpoint"), architecture.transformers),
        inputs=inputs,
        outputs=_outputs(r, top.get("outputs")),
        dims=dims,
        export=_export(r, top.get("export")),
        parity=_parity(r, top.get("parity")),
        serve=_serve(r, top.get("serve")),
        text=requests.text(r, top.get("text"), inputs, dim_max),
        dim_max=dim_max,
    )


def _checkpoint(r: _Reader, value: Any, default: Path | None = None) -> Checkpoint:
    """`default`: the path when none is given (a transformers folder holds its own weights)."""
    keys = ("path", "sha256", "strict", "strip_prefix", "key_map", "dtype", "allow_nonfinite")
    m = r.mapping(value, "checkpoint", keys, () if default else ("path",))
    path = default if m.get("path") is None else _file_or_folder(r, m["path"], "checkpoint.path")
    sha = m.get("sha256")
    if sha is not None:
        sha = r.str_(sha, "checkpoint.sha256").lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha):
            raise r.fail("checkpoint.sha256", "expected 64 hexadecimal digits (the output of sha256sum)")
    strips = tuple(
        r.str_(p, f"checkpoint.strip_prefix[{i}]") for i, p in enumerate(r.list_(m.get("strip_prefix"), "checkpoint.strip_prefix"))
    )
    renames = []
    for i, item in enumerate(r.list_(m.get("key_map"), "checkpoint.key_map")):
        where = f"checkpoint.key_map[{i}]"
        km = r.mapping(item, where, ("prefix", "regex", "to"), ("to",))
        if ("prefix" in km) == ("regex" in km):
            raise r.fail(where, "give exactly one of 'prefix' or 'regex', and 'to'")
        to = km["to"] if isinstance(km["to"], str) else r.str_(km["to"], f"{where}.to")
        if "regex" in km:
            pattern = r.str_(km["regex"], f"{where}.regex")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise r.fail(f"{where}.regex", f"invalid regular expression: {exc}") from None
            renames.append(KeyRename(pattern, to, regex=True))
        else:
            renames.append(KeyRename(r.str_(km["prefix"], f"{where}.prefix"), to))
    dtype = m.get("dtype")
    if dtype is not None:
        dtype = r.choice(dtype, "checkpoint.dtype", CAST_DTYPES)
    return Checkpoint(
        path=path,
        sha256=sha,
        strict=r.bool_(m.get("strict", True), "checkpoint.strict"),
        strip_prefix=strips,
        key_map=tuple(renames),
        dtype=dtype,
        allow_nonfinite=r.bool_(m.get("allow_nonfinite", False), "checkpoint.allow_nonfinite"),
    )


def _file_or_folder(r: _Reader, value: Any, path: str) -> Path:
    rel = r.str_(value, path)
    resolved = (r.base / rel).resolve()
    if not resolved.exists():
        raise r.fail(path, f"file not found: {rel} (relative to {r.base or '.'}/)")
    return resolved


def _inputs(r: _Reader, value: Any) -> tuple[TensorSpec, ...]:
    items = r.list_(value, "inputs")
    if not items:
        raise r.fail("inputs", "declare at least one input, e.g. - {name: x, shape: [batch, 10]}")
    out: list[TensorSpec] = []
    for i, item in enumerate(items):
        where = f"inputs[{i}]"
        m = r.mapping(item, where, ("name", "shape", "dtype", "range", "generate", "image"), ("name", "shape"))
        name = r.str_(m["name"], f"{where}.name")
        if not IDENT_RE.match(name):
            raise r.fail(f"{where}.name", f"{name!r} is not a valid input name (letters, digits, '_')")
        if any(t.name == name for t in out):
            raise r.fail(f"{where}.name", f"duplicate input name {name!r}")
        shape = r.list_(m["shape"], f"{where}.shape")
        dims: list[int | str] = []
        for j, d in enumerate(shape):
            if isinstance(d, bool) or not (isinstance(d, str) and IDENT_RE.match(d) or isinstance(d, int) and d > 0):
                raise r.fail(
                    f"{where}.shape[{j}]",
                    f"{d!r} cannot be generated: use a positive size or a dimension name (e.g. seq) with sizes in dims",
                )
            dims.append(d)
        if not dims or dims[0] != BATCH:
            raise r.fail(f"{where}.shape", f"the first dimension must be '{BATCH}' (the dynamic batch dimension)")
        if BATCH in dims[1:]:
            raise r.fail(f"{where}.shape", f"'{BATCH}' may only be the first dimension")
        dtype = r.choice(m.get("dtype", "float32"), f"{where}.dtype", DTYPES)
        rng = m.get("range")
        if rng is not None:
            rng = r.list_(rng, f"{where}.range")
            if len(rng) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in rng) or rng[0] >= rng[1]:
                raise r.fail(f"{where}.range", f"expected [low, high] with low < high, got {rng!r}")
            if dtype not in CAST_DTYPES and not all(float(v).is_integer() for v in rng):
                raise r.fail(f"{where}.range", f"an {dtype} input needs integer bounds, got {rng!r}")
            rng = (rng[0], rng[1])
        generate = None if m.get("generate") is None else parse_generate(r, m["generate"], f"{where}.generate", dtype, dims, rng)
        if rng is None and generate is None and dtype not in CAST_DTYPES and dtype != "bool":
            raise r.fail(f"{where}.range", f"an {dtype} input needs range: [low, high] (or generate) to generate test values")
        picture = None if m.get("image") is None else requests.image(r, m["image"], f"{where}.image", tuple(dims), dtype)
        out.append(TensorSpec(name=name, shape=tuple(dims), dtype=dtype, range=rng, generate=generate, image=picture))
    return tuple(out)


def _outputs(r: _Reader, value: Any) -> tuple[OutputSpec, ...] | None:
    if value is None:
        return None
    items = r.list_(value, "outputs")
    out: list[OutputSpec] = []
    for i, item in enumerate(items):
        where = f"outputs[{i}]"
        m = r.mapping(item, where, ("name", "atol", "rtol", "labels", "topk", "activation", "select"), ("name",))
        name = r.str_(m["name"], f"{where}.name")
        if any(o.name == name for o in out):
            raise r.fail(f"{where}.name", f"duplicate output name {name!r}")
        atol = None if m.get("atol") is None else r.float_(m["atol"], f"{where}.atol")
        rtol = None if m.get("rtol") is None else r.float_(m["rtol"], f"{where}.rtol")
        select = None if m.get("select") is None else r.choice(m["select"], f"{where}.select", ("last",))
        out.append(OutputSpec(name=name, atol=atol, rtol=rtol, labels=requests.output_labels(r, m, where), select=select))
    return tuple(out) or None


def _export(r: _Reader, value: Any) -> Export:
    m = r.mapping(value, "export", ("format", "precision", "candidates", "torchscript", "onnx"))
    fmt = r.choice(m.get("format", "eager"), "export.format", (*FORMATS, AUTO))
    precision = r.choice(m.get("precision", precisions.FP32), "export.precision", precisions.PRECISIONS)
    if fmt != AUTO and not precisions.supports(fmt, precision):
        raise r.fail("export.precision", precisions.why_not(fmt, precision))
    candidates = precisions.default_candidates(FORMATS, precision)
    if m.get("candidates") is not None:
        if fmt != AUTO:
            raise r.fail("export.candidates", f"only format: auto tries candidates; format is {fmt}")
        candidates = precisions.candidates(r, m["candidates"], FORMATS, precision)
    ts = r.mapping(m.get("torchscript"), "export.torchscript", ("method",))
    ox = r.mapping(m.get("onnx"), "export.onnx", ("opset", "exporter"))
    opset = ox.get("opset")
    if opset is not None:
        opset = r.int_(opset, "export.onnx.opset", minimum=7)
    return Export(
        format=fmt,
        candidates=candidates,
        precision=precision,
        torchscript_method=r.choice(ts.get("method", "trace"), "export.torchscript.method", ("trace", "script")),
        onnx_opset=opset,
        onnx_exporter=r.choice(ox.get("exporter", "dynamo"), "export.onnx.exporter", ("dynamo", "torchscript")),
    )


def _parity(r: _Reader, value: Any) -> Parity:
    m = r.mapping(value, "parity", ("atol", "rtol", "batch_sizes", "device", "samples", "reference", "agreement", "cosine"))
    d = Parity()
    sizes = m.get("batch_sizes", list(d.batch_sizes))
    sizes = tuple(r.int_(s, f"parity.batch_sizes[{i}]", minimum=1) for i, s in enumerate(r.list_(sizes, "parity.batch_sizes")))
    if not sizes:
        raise r.fail("parity.batch_sizes", "give at least one batch size")
    return Parity(
        atol=r.float_(m.get("atol", d.atol), "parity.atol"),
        rtol=r.float_(m.get("rtol", d.rtol), "parity.rtol"),
        batch_sizes=sizes,
        device=r.choice(m.get("device", d.device), "parity.device", DEVICES),
        samples=r.int_(m.get("samples", d.samples), "parity.samples", minimum=1),
        reference=_reference(r, m.get("reference")),
        agreement=_fraction(r, m.get("agreement", d.agreement), "parity.agreement"),
        cosine=_fraction(r, m.get("cosine", d.cosine), "parity.cosine"),
    )


def _fraction(r: _Reader, value: Any, path: str) -> float:
    number = r.float_(value, path)
    if not 0 < number <= 1:
        raise r.fail(path, f"must be a fraction in (0, 1], e.g. 0.99, got {value}")
    return number


def _reference(r: _Reader, value: Any) -> Path | None:
    """`parity.reference`: an .npz file (its arrays are checked against the model's inputs and outputs at build)."""
    if value is None:
        return None
    path = r.file(value, "parity.reference")
    with open(path, "rb") as f:
        zipped = f.read(4) == b"PK\x03\x04"
    if path.suffix != ".npz" or not zipped:
        raise r.fail("parity.reference", f"expected an .npz file (numpy.savez) of inputs and expected outputs, got {value}")
    return path


def _serve(r: _Reader, value: Any) -> Serve:
    keys = (
        "batch_size",
        "max_batch_delay_ms",
        "min_workers",
        "max_workers",
        "response_timeout_s",
        "max_rows",
        "max_response_mb",
        "handler",
        "extra_files",
        "hooks",
    )
    m = r.mapping(value, "serve", keys)
    d = Serve()
    take: Callable[[str, int], int] = lambda key, minimum: r.int_(m.get(key, getattr(d, key)), f"serve.{key}", minimum)
    serve = Serve(
        batch_size=take("batch_size", 1),
        max_batch_delay_ms=take("max_batch_delay_ms", 0),
        min_workers=take("min_workers", 0),
        max_workers=take("max_workers", 1),
        response_timeout_s=take("response_timeout_s", 1),
        max_rows=take("max_rows", 1),
        max_response_mb=_megabytes(r, m.get("max_response_mb", d.max_response_mb), "serve.max_response_mb"),
        handler=None if m.get("handler") is None else r.file(m["handler"], "serve.handler"),
        extra_files=tuple(r.file(f, f"serve.extra_files[{i}]") for i, f in enumerate(r.list_(m.get("extra_files"), "serve.extra_files"))),
        hooks=requests.hooks(r, m.get("hooks")),
    )
    if serve.max_workers < serve.min_workers:
        raise r.fail("serve.max_workers", f"must be >= serve.min_workers ({serve.min_workers}), got {serve.max_workers}")
    if serve.handler is not None and serve.handler.suffix != ".py":
        raise r.fail("serve.handler", f"expected a Python file (.py), got {m['handler']}")
    return serve


def _megabytes(r: _Reader, value: Any, path: str) -> float:
    """A size in MB (10^6 bytes): a positive number whose bytes TorchServe can hold in a 32-bit integer."""
    number = r.float_(value, path)
    if number * 1e6 < 1:
        raise r.fail(path, f"must be a positive number of MB (1 byte at least), got {value}")
    if number > TS_MAX_SIZE_MB:
        raise r.fail(path, f"must be at most {TS_MAX_SIZE_MB:.0f} (TorchServe's sizes are 32-bit integers of bytes), got {value}")
    return number
