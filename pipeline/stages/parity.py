"""Stage parity: the artifact, loaded exactly as the handler loads it, must answer like the eager model.

Compares output names, then shapes, then values (``|a-b| <= atol + rtol*|b|``, b the eager reference), on
every batch size and at least two sizes of every other dynamic dim, several samples each. Prints one
✓/✗ line per output, collects every failure and raises once: a failure stops the build. An archive at a precision
other than fp32 is judged by the accuracy gate instead of atol/rtol (`pipeline/stages/gate.py`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from handlers.marpipe_serving import rows
from handlers.marpipe_serving.rows import per_row, select_last
from pipeline.errors import ParityError, SpecError, first_line
from pipeline.spec.spec import Spec
from pipeline.stages import gate, inputs, precision, reference, samples
from pipeline.stages.compare import compare, shape_problem
from pipeline.stages.export import run_eager
from pipeline.stages.load import Loaded


@dataclass
class OutputRecord:
    atol: float
    rtol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    mismatched: float = 0.0  # worst fraction of mismatched elements over all shapes
    nan: int = 0
    inf: int = 0
    failures: list[str] = field(default_factory=list)
    limits: tuple[float, float] | None = None  # the gate's (agreement, cosine): a precision other than fp32
    measured: gate.Tally = field(default_factory=gate.Tally)  # agreement and cosine vs eager, every build
    reference: gate.Tally | None = None  # the same over parity.reference's rows (gated builds)

    def as_dict(self) -> dict[str, Any]:
        extra = {"reference": self.reference.as_dict()} if self.reference else {}
        if self.limits:
            extra["gate"] = {"agreement": self.limits[0], "cosine": self.limits[1]}
        return {
            "atol": self.atol,
            "rtol": self.rtol,
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "mismatched_fraction": self.mismatched,
            "nan": self.nan,
            "inf": self.inf,
            **self.measured.as_dict(),
            **extra,
            "passed": not self.failures,
        }

    def archived(self) -> dict[str, Any]:
        """What the archive keeps: the tolerances (or the gate's thresholds) it passed. The measured errors depend on
        the machine's threads (onnxruntime's and torch's reductions split differently), so they go to the build's
        report only."""
        if self.limits:
            return {"agreement": self.limits[0], "cosine": self.limits[1], "passed": not self.failures}
        return {"atol": self.atol, "rtol": self.rtol, "passed": not self.failures}


@dataclass
class ParityResult:
    device: str
    shapes: list[dict[str, int]]
    samples: int
    outputs: dict[str, OutputRecord]
    reference_inputs: dict[str, np.ndarray]  # one small batch, stored in the archive for `marpipe smoke`
    reference_outputs: dict[str, np.ndarray]
    output_shapes: dict[str, list[int | str]] = field(default_factory=dict)  # e.g. ["batch", "seq", 32]
    requests: list[samples.Sample] = field(default_factory=list)  # raw requests with the eager answers
    reference: dict[str, Any] | None = None  # parity.reference: its file, sha256 and the rows checked
    from_pretrained: bool = False  # a transformers model was checked against transformers' own from_pretrained
    gate: dict[str, Any] | None = None  # a precision other than fp32: how the accuracy gate judged it (gate.archived)

    def record(self) -> dict[str, Any]:
        """The build's report: the measured errors included."""
        return {**self.archived(), "outputs": {k: v.as_dict() for k, v in self.outputs.items()}}

    def archived(self) -> dict[str, Any]:
        """marpipe.json's record: only what the build's inputs determine (`OutputRecord.archived`)."""
        extra = {"reference": self.reference} if self.reference else {}
        if self.from_pretrained:
            extra["from_pretrained"] = True
        if self.gate:
            extra["gate"] = self.gate
        return {
            "device": self.device,
            "shapes": self.shapes,
            "samples": self.samples,
            "outputs": {k: v.archived() for k, v in self.outputs.items()},
            **extra,
        }


def resolve_device(spec: Spec, override: str | None, where: str = "export.precision") -> str:
    """The device parity runs on: `--device`, else parity.device (auto: cuda where torch sees a GPU), as the
    spec's precision allows (`precision.device`; `where` names the spec field in its errors)."""
    import torch

    want = override or spec.parity.device
    named = None if want == "auto" else "--device" if override else "parity.device"
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    elif want == "cuda" and not torch.cuda.is_available() and spec.export.precision != "int8":  # int8: named below
        if override:
            raise SpecError("--device cuda: torch sees no GPU here; use --device auto or cpu")
        raise SpecError(f"{spec.source}: parity.device: 'cuda' asked for, but torch sees no GPU here; use auto or cpu")
    return precision.device(spec, want, named, where)  # as the precision allows: int8 on the CPU


def run(spec: Spec, loaded: Loaded, workdir: Path, meta: dict[str, Any], device: str, release: bool = False) -> ParityResult:
    """Eager references first; with `release` the eager model is then dropped before the artifact is loaded,
    so a large model is never held twice."""
    import torch

    from handlers.marpipe_serving.models import exact_float32, load_runner, name_outputs

    exact_float32()
    names = [o["name"] for o in meta["outputs"]]
    model = loaded.model.to(device)
    shapes = inputs.shapes(spec)
    stored = next((i for i, dims in enumerate(shapes) if dims["batch"] >= 2), 0) * spec.parity.samples
    cases = []
    for s, dims in enumerate(shapes):
        for k in range(spec.parity.samples):
            tensors = inputs.make(spec, dims, inputs.SEED + 1000 * s + k)
            with one_thread(len(cases) == stored):  # the case stored in the archive
                expected = name_outputs(run_eager(spec, model, {n: t.to(device) for n, t in tensors.items()}, loaded.by_name), names)
            cases.append((_label(dims), dims, {n: t.numpy() for n, t in tensors.items()}, expected))
    checked = _references(spec, loaded, model, cases, names, device)
    ref = reference.read(spec, names) if spec.parity.reference else None
    if ref is not None:
        by_name = loaded.by_name
        eager = reference.check_rows(spec, ref, lambda a, m=model: _eager_rows(spec, m, a, names, device, by_name), "the eager model")
        if eager:
            more = f" (+{len(eager) - 1} more)" if len(eager) > 1 else ""
            raise ParityError(f"{spec.name}: parity.reference {ref.path.name} vs the eager model: {eager[0]}{more}")
    with one_thread():  # their answers are stored in the archive
        raw = _raw_samples(spec, model, workdir, meta, device, loaded.by_name, output_shapes([(d, e) for _, d, _, e in cases]))
    _check_labels(spec, meta, cases[0][3])
    limits = gate.thresholds(spec)
    if limits is None:  # a gated build still needs the fp32 model for the gate's rows: dropped after them
        model = _let_go(loaded, release)
    try:
        runner = load_runner(str(workdir), meta, device, 0 if device == "cuda" else None, threads=torch.get_num_threads())
    except Exception as exc:
        raise ParityError(
            f"{spec.name}: the {spec.export.format} artifact does not load as the handler loads it: {type(exc).__name__}: {exc}"
        ) from None
    records = {n: OutputRecord(*spec.tolerance(n), limits=limits) for n in names}
    ref_in: dict[str, np.ndarray] = {}
    ref_out: dict[str, np.ndarray] = {}
    cases += [(f"request {s.name}", None, s.arrays, s.expected) for s in raw]
    for i, (label, _, arrays, expected) in enumerate(cases):
        try:
            got = runner(arrays)
        except Exception as exc:
            for rec in records.values():
                rec.failures.append(f"{label}: the {spec.export.format} model raised {type(exc).__name__}: {first_line(exc)}")
            continue
        for n in names:
            _compare(records[n], expected[n], got.get(n), label)
        if i == stored:
            ref_in, ref_out = arrays, select_last(expected, arrays, rows.selected(meta))  # as the server answers
    if ref is not None and limits is None:
        for failure in reference.check_rows(spec, ref, runner, f"the {spec.export.format} model"):
            name = failure.split(" ", 1)[0]
            records.get(name, next(iter(records.values()))).failures.append(f"parity.reference {ref.path.name}: {failure}")
    if limits is not None:
        _gate(spec, lambda a, m=model: _eager_rows(spec, m, a, names, device, loaded.by_name), runner, records, ref)
        model = _let_go(loaded, release)
    del runner
    _print(spec, records, len(cases))
    if ref is not None:
        mark = "✗" if failed_any(records) else "✓"
        print(f"  {mark} {spec.name}: parity.reference {ref.path.name}: {ref.rows} rows (eager and {spec.export.format})")
    failed = [
        f"{n}: {r.failures[0]}" + (f" (+{len(r.failures) - 1} more)" if len(r.failures) > 1 else "")
        for n, r in records.items()
        if r.failures
    ]
    if failed:
        what = f"{spec.export.precision} accuracy gate" if limits else "parity"
        raise ParityError(f"{spec.name}: {spec.export.format} {what} failed on {device}: " + "; ".join(failed))
    named = output_shapes([(dims, expected) for _, dims, _, expected in cases if dims is not None])
    _check_select(spec, named)
    result = ParityResult(device, shapes, spec.parity.samples, records, ref_in, ref_out, named, raw)
    result.reference = ref.record() if ref is not None else None
    result.from_pretrained = checked
    result.gate = gate.archived(spec) if limits else None
    return result


def _let_go(loaded: Loaded, release: bool) -> None:
    """The eager model is done with: dropped (`release`), or back on the CPU for the next candidate of auto."""
    if release:
        loaded.release()
    else:
        loaded.model.to("cpu")


def _gate(spec: Spec, eager: Any, runner: Any, records: dict[str, OutputRecord], ref: Any) -> None:
    """A gated build's rows beyond the parity runs, through the fp32 eager model and the artifact: the gate's
    generated rows, then parity.reference's (measured apart); then each output judged by its thresholds."""
    sets = [(gate.rows(spec), "measured")]
    if ref is not None:
        for rec in records.values():
            rec.reference = gate.Tally()
        chunks = ({n: a[i : i + gate.CHUNK] for n, a in ref.inputs.items()} for i in range(0, ref.rows, gate.CHUNK))
        sets.append((chunks, "reference"))
    for batches, tally in sets:
        for arrays in batches:
            want = eager(arrays)
            try:
                got = runner(arrays)
            except Exception as exc:
                for rec in records.values():
                    rec.failures.append(f"the gate's {tally} rows: {type(exc).__name__}: {first_line(exc)}")
                return
            for n, rec in records.items():
                answer = got.get(n)
                problem = shape_problem(want[n], answer)
                if problem:
                    rec.failures.append(f"the gate's {tally} rows: {n} {problem}")
                else:
                    getattr(rec, tally).add(want[n], answer)
    for rec in records.values():
        rec.failures += gate.judge(rec.measured, rec.limits, "the parity runs and generated inputs, vs the fp32 eager model")
        if rec.reference is not None:
            found = gate.judge(rec.reference, rec.limits, f"parity.reference {ref.path.name}, vs the fp32 eager model")
            rec.failures += [f"parity.reference {ref.path.name}: {f}" for f in found]


def failed_any(records: dict[str, OutputRecord]) -> bool:
    return any(r.failures for r in records.values())


def _references(spec: Spec, loaded: Loaded, model: Any, cases: list, names: list[str], device: str) -> bool:
    """A transformers model against transformers' own from_pretrained, once per build (format auto runs parity per
    candidate); True when it was checked."""
    if spec.architecture.source != "transformers":
        return False
    if loaded.reference_line is None:
        loaded.reference_line = reference.from_pretrained(spec, loaded, cases, names, device)
    print(loaded.reference_line)
    return "skipped" not in loaded.reference_line


def _eager_rows(spec: Spec, model: Any, arrays: dict[str, np.ndarray], names: list[str], device: str, by_name: bool) -> dict:
    """The eager model's named outputs for numpy inputs, cast to the declared dtypes on `device`."""
    import torch

    from handlers.marpipe_serving.models import name_outputs

    tensors = {t.name: torch.from_numpy(np.ascontiguousarray(arrays[t.name])).to(device, getattr(torch, t.dtype)) for t in spec.inputs}
    return name_outputs(run_eager(spec, model, tensors, by_name), names)


@contextlib.contextmanager
def one_thread(active: bool = True) -> Iterator[None]:
    """torch on one intra-op thread for what the archive stores: a reduction split over N threads sums in another
    order than over one, so the stored eager outputs would otherwise depend on the build machine's core count."""
    import torch

    before = torch.get_num_threads()
    if active:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if active:
            torch.set_num_threads(before)


def _raw_samples(
    spec: Spec, model: Any, workdir: Path, meta: dict[str, Any], device: str, by_name: bool, shapes: dict
) -> list[samples.Sample]:
    """Sample raw requests decoded as the handler decodes them, with the eager model's answers (and the JSON answers
    the handler gives: `select: last` applied, texts' per-token outputs trimmed row by row)."""
    if not samples.needed(spec):
        return []
    from handlers.marpipe_serving.contract import Contract

    contract = Contract(meta, str(workdir))
    names = [o["name"] for o in meta["outputs"]]
    selected = rows.selected(meta)
    pad = contract.pad_dim
    per_token = [n for n, shape in shapes.items() if n not in selected and n not in contract.labels and pad and shape[1:2] == [pad]]
    made = samples.make(spec, contract)
    for s in made:
        s.expected = _eager_rows(spec, model, s.arrays, names, device, by_name)
        chosen = select_last(s.expected, s.arrays, selected)
        s.stored = chosen if chosen is not s.expected else None
        s.answer = samples.answer(per_row(chosen, s.arrays, per_token), contract)
    return made


def _check_select(spec: Spec, shapes: dict[str, list[int | str]]) -> None:
    """`select: last` takes the axis after the batch: it must follow a dynamic dim of the inputs (the tokens)."""
    dims = set(spec.dims)
    for i, o in enumerate(spec.outputs or ()):
        shape = shapes.get(o.name) or []
        if o.select and (len(shape) < 2 or shape[1] not in dims):
            raise SpecError(
                f"{spec.source}: outputs[{i}].select: last takes each row's last token along the output's second axis, but "
                f"{o.name} has the shape {shape}, whose second axis follows no dynamic input dim ({', '.join(sorted(dims)) or 'none'})"
            )


def _check_labels(spec: Spec, meta: dict[str, Any], outputs: dict[str, np.ndarray]) -> None:
    """As many labels as the output has classes per row."""
    for i, o in enumerate(spec.outputs or ()):
        names = next((m.get("labels") or {} for m in meta["outputs"] if m["name"] == o.name), {}).get("names")
        if names is None:
            continue
        classes = int(np.prod(outputs[o.name].shape[1:], dtype=np.int64))
        if len(names) != classes:
            raise SpecError(f"{spec.source}: outputs[{i}].labels: {len(names)} labels for an output with {classes} values per row")


def output_shapes(runs: list[tuple[dict[str, int], dict[str, np.ndarray]]]) -> dict[str, list[int | str]]:
    """Each output's shape with its dynamic axes named: an axis is `d` when it equals dim d's size in every run
    and d took several sizes; otherwise its size if fixed, else None."""
    varying = {d for d in runs[0][0] if len({dims[d] for dims, _ in runs}) > 1} if runs else set()
    out: dict[str, list[int | str]] = {}
    for name, first in runs[0][1].items() if runs else ():
        shape: list[int | str] = []
        for axis in range(first.ndim):
            sizes = [outputs[name].shape[axis] for _, outputs in runs]
            named = [d for d in sorted(varying) if all(s == dims[d] for s, (dims, _) in zip(sizes, runs))]
            shape.append(named[0] if named else sizes[0] if len(set(sizes)) == 1 else None)
        out[name] = shape
    return out


def _compare(rec: OutputRecord, expected: np.ndarray, got: np.ndarray | None, label: str) -> None:
    result = compare(expected, got, rec.atol, rec.rtol)
    if "max_abs" not in result:
        rec.failures.append(f"{label}: {result['why']}")
        return
    rec.measured.add(expected, got)
    rec.max_abs = max(rec.max_abs, result["max_abs"])
    rec.max_rel = max(rec.max_rel, result["max_rel"])
    rec.mismatched = max(rec.mismatched, result["mismatched"])
    rec.nan += result["nan"]
    rec.inf += result["inf"]
    if not result["ok"] and rec.limits is None:  # a gated output is judged by its measures (_gate)
        rec.failures.append(
            f"{label}: max abs error {result['max_abs']:.3g} > atol {rec.atol:g} + rtol {rec.rtol:g}·|eager|, "
            f"{100 * result['mismatched']:.1f}% of elements mismatched"
        )


def _label(dims: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in dims.items())


def _print(spec: Spec, records: dict[str, OutputRecord], runs: int) -> None:
    for name, r in records.items():
        mark = "✗" if r.failures else "✓"
        if r.limits:
            m, ref = r.measured, r.reference
            reference = f"; parity.reference: {_share(ref.agreement)}, {_share(ref.cosine, 5)}" if ref else ""
            print(
                f"  {mark} {spec.name}/{name}: agreement {_share(m.agreement)}, cosine {_share(m.cosine, 5)} vs fp32 eager over "
                f"{m.rows} rows (gate {r.limits[0]:g}, {r.limits[1]:g}; max abs {r.max_abs:.3g}){reference}"
            )
            continue
        print(
            f"  {mark} {spec.name}/{name}: max abs {r.max_abs:.3g}, max rel {r.max_rel:.3g} "
            f"(atol {r.atol:g}, rtol {r.rtol:g}, {runs} runs)",
        )


def _share(value: float | None, digits: int = 4) -> str:
    """A measure as printed: `-` where it was not measured (no top-1 in a row of one value, no rows)."""
    return "-" if value is None else f"{value:.{digits}f}"
