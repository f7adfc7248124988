"""Stage load: read the checkpoint safely, normalise it, load it strictly into the architecture, eval()."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handlers.marpipe_serving.architectures import has_non_persistent_buffers, load_weights, tied_keys
from pipeline.errors import CheckpointError, first_line
from pipeline.sources.arch import construct, keyword_inputs, model_class
from pipeline.sources.checkpoint import RawCheckpoint, normalise_keys, read_checkpoint
from pipeline.sources.source import ModelSource
from pipeline.spec.spec import Spec


@dataclass
class Loaded:
    model: Any  # torch.nn.Module in eval mode, on the CPU
    checkpoint: RawCheckpoint
    skipped: list[str] = field(default_factory=list)  # keys left out by strict: false
    cast: list[str] = field(default_factory=list)  # keys whose dtype was changed
    source: ModelSource | None = None  # what built the model: its requirements, a transformers config
    by_name: bool = False  # inputs passed by keyword (every declared input is a parameter of forward)
    tied: list[str] = field(default_factory=list)  # keys absent from the checkpoint because they are tied to others
    reference_line: str | None = None  # transformers: the from_pretrained check's result, once per build
    converted: int = 0  # checkpoint keys transformers renamed or converted on load (the file then does not load as it is)

    @property
    def verbatim(self) -> bool:
        """The checkpoint file loads as it is: the handler can read it directly, no re-save needed."""
        ck = self.checkpoint
        return (
            ck.format in ("torch-zip", "safetensors")
            and not ck.shards
            and not ck.nested_key
            and not ck.stripped
            and not ck.renamed
            and not ck.ignored_extras
            and not self.skipped
            and not self.cast
            and not self.converted
        )

    def release(self) -> None:
        """Drop the model and tensors (unmapping the checkpoint) once no later stage needs them."""
        import gc

        self.model = None
        self.checkpoint.state_dict = {}
        gc.collect()

    def summary(self) -> dict[str, Any]:
        ck = self.checkpoint
        return {
            "path": str(ck.path),
            "format": ck.format,
            "sha256": ck.sha256,
            "size": ck.size,
            "tensors": len(ck.state_dict),
            "nested_key": ck.nested_key,
            "stripped_prefixes": ck.stripped,
            "renamed_keys": ck.renamed,
            "ignored_extras": ck.ignored_extras,
            "skipped_keys": self.skipped,
            "cast_keys": len(self.cast),
            **({"converted_keys": self.converted} if self.converted else {}),
            **({"index": ck.index, "files": ck.shards} if ck.shards else {}),
        }


def run(spec: Spec) -> Loaded:
    source = model_class(spec)
    cfg = spec.checkpoint
    raw = read_checkpoint(cfg.path, cfg.sha256)
    normalise_keys(raw, cfg.strip_prefix, cfg.key_map)
    if spec.architecture.source == "transformers":
        return _run_transformers(spec, source, raw)
    # Meta construction costs no memory; the mmap'd tensors are then assigned, not copied.
    model = construct(spec, source, "meta")
    expected = model.state_dict()
    sd = raw.state_dict
    tied = tied_keys(model, set(sd))  # saved once (save_pretrained, safetensors): tied again after loading
    skipped = _check_keys(spec, raw, expected, set(tied))
    if skipped:
        sd = {k: v for k, v in sd.items() if k not in skipped}
    cast = _check_values(spec, raw, expected, sd)
    if not cfg.strict:
        model = construct(spec, source, "cpu")  # missing keys need the constructor's real initialisation
    elif has_non_persistent_buffers(model, expected):
        model = construct(spec, source, "cpu", params_only=True)  # their values come from the constructor
    try:
        load_weights(model, sd, strict=cfg.strict, assign=cfg.strict)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {cfg.path}: load_state_dict failed: {str(exc).splitlines()[0]}") from None
    model.eval()
    model.requires_grad_(False)
    by_name = keyword_inputs(model, [t.name for t in spec.inputs])
    return Loaded(model=model, checkpoint=raw, skipped=sorted(skipped), cast=cast, source=source, by_name=by_name, tied=sorted(tied))


def _run_transformers(spec: Spec, source: ModelSource, raw: RawCheckpoint) -> Loaded:
    """A Hugging Face model: the checkpoint goes through transformers' own loading code (`load_pretrained`), as
    `from_pretrained` loads it; then the same checks as any checkpoint (keys, finiteness)."""
    import torch

    from pipeline.sources.hf import load_pretrained

    cfg = spec.checkpoint
    meta_model = construct(spec, source, "meta")
    expected = meta_model.state_dict()
    floats = [t.dtype for t in expected.values() if t.dtype.is_floating_point]
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (floats[0] if floats else torch.float32)
    sd = raw.state_dict
    try:
        model, info = load_pretrained(type(meta_model), source.config, sd, dtype, cfg.strict)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {cfg.path}: transformers' loading failed: {type(exc).__name__}: {first_line(exc)}") from None
    missing = sorted(info["missing_keys"])
    unexpected = sorted(info["unexpected_keys"])
    mismatched = sorted(info["mismatched_keys"])
    if cfg.strict and (missing or unexpected or mismatched):
        shapes = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, a, b in mismatched]
        raise CheckpointError(f"checkpoint {raw.path}: as transformers loads it, {_key_faults(missing, unexpected, shapes)}")
    state = model.state_dict()
    if not cfg.allow_nonfinite:
        bad = sorted(k for k, v in state.items() if v.dtype.is_floating_point and not _all_finite(v))
        if bad:
            raise CheckpointError(
                f"checkpoint {raw.path}: {len(bad)} tensors contain NaN or Inf ({_few(bad)}); "
                "the training run diverged? set checkpoint.allow_nonfinite: true to package anyway"
            )
    model.requires_grad_(False)
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    tied = sorted(k for k in ties if k not in sd)
    converted = len(set(sd) - set(expected) - set(unexpected))
    cast = sorted(k for k in set(sd) & set(state) if sd[k].dtype != state[k].dtype)
    skipped = sorted(set(unexpected) | {k for k, _, _ in mismatched})
    by_name = keyword_inputs(model, [t.name for t in spec.inputs])
    return Loaded(model, raw, skipped, cast, source, by_name, tied, converted=converted)


def _check_keys(spec: Spec, raw: RawCheckpoint, expected: dict[str, Any], tied: set[str]) -> set[str]:
    """Missing (other than tied), unexpected and mis-shaped keys: an error when strict, the keys to skip otherwise."""
    sd = raw.state_dict
    missing = sorted(set(expected) - set(sd) - tied)
    unexpected = sorted(set(sd) - set(expected))
    mismatched = sorted(k for k in set(sd) & set(expected) if tuple(sd[k].shape) != tuple(expected[k].shape))
    if not spec.checkpoint.strict:
        return set(unexpected) | set(mismatched)
    if not (missing or unexpected or mismatched):
        return set()
    shapes = [f"{k}: checkpoint {list(sd[k].shape)} vs model {list(expected[k].shape)}" for k in mismatched]
    raise CheckpointError(f"checkpoint {raw.path}: {_key_faults(missing, unexpected, shapes)}")


def _key_faults(missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """What a strict load found wrong with the keys, and what to do: `2 missing keys (...), 1 unexpected (...); set
    checkpoint.key_map ...` (`shapes`: one line per key whose shape differs)."""
    parts = [f"{len(missing)} missing keys ({_few(missing)})"] if missing else []
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_few(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({_few(shapes)})")
    hint = "check architecture.kwargs, or set strict: false" if shapes else "set checkpoint.key_map or strip_prefix, or strict: false"
    return f"{', '.join(parts)}; {hint}"


def _check_values(spec: Spec, raw: RawCheckpoint, expected: dict[str, Any], sd: dict[str, Any]) -> list[str]:
    """Dtypes and finiteness; casts floating tensors to the model's dtype (or checkpoint.dtype). In place."""
    import torch

    cfg = spec.checkpoint
    target = getattr(torch, cfg.dtype) if cfg.dtype else None
    wrong_kind, nonfinite, cast = [], [], []
    for key, tensor in sd.items():
        want = expected.get(key)
        if want is None:
            continue
        if want.dtype.is_floating_point and not tensor.dtype.is_floating_point and target is None:
            wrong_kind.append(f"{key}: {str(tensor.dtype).removeprefix('torch.')}")
            continue
        dtype = target if target is not None and want.dtype.is_floating_point else want.dtype
        if tensor.dtype != dtype:
            sd[key] = tensor.to(dtype)
            cast.append(key)
        if sd[key].dtype.is_floating_point and not cfg.allow_nonfinite and not _all_finite(sd[key]):
            nonfinite.append(key)
    if wrong_kind:
        raise CheckpointError(
            f"checkpoint {raw.path}: {len(wrong_kind)} tensors hold integers where the model expects floats "
            f"({_few(wrong_kind)}); set checkpoint.dtype: float32 to cast them"
        )
    if nonfinite:
        raise CheckpointError(
            f"checkpoint {raw.path}: {len(nonfinite)} tensors contain NaN or Inf ({_few(nonfinite)}); "
            "the training run diverged? set checkpoint.allow_nonfinite: true to package anyway"
        )
    return cast


def _all_finite(tensor: Any, step: int = 1 << 22) -> bool:
    """No NaN or Inf anywhere. A NaN or Inf makes the sum NaN or Inf, so a finite sum proves it in one fast
    pass; only a non-finite sum (which overflow can also cause) needs the elementwise check, in slices so
    that no bool tensor as large as the weights is allocated."""
    import torch

    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def _few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", … {len(items) - n} more" if len(items) > n else "")
