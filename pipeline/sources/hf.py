"""Hugging Face models (`architecture.transformers`): the config read from the folder, never downloaded.

The class is `architecture.class` (any transformers class, `AutoModelFor...` included) or the config's
`architectures[0]`; `architecture.kwargs` override config values. The model is built from the config with
an attention implementation that traces (`eager`), and so is the eager archive's model in the handler, from
the `config.json` the archive carries. A forward that can return a cache (it takes `use_cache`) is built with
the cache off, unless `kwargs` says otherwise: a cache is no answer a server can send.

The weights go through transformers' own loading code (`load_pretrained`: `from_pretrained` given the state_dict
marpipe read), so whatever the installed transformers does to a checkpoint on load happens here too: its key
renames and conversions, tied weights, non-persistent buffers. `reference_model` is `from_pretrained` on the
folder itself, which the parity stage compares with.
"""

from __future__ import annotations

import difflib
import inspect
import logging
from pathlib import Path
from typing import Any

from handlers.marpipe_serving import architectures
from pipeline.errors import SpecError, first_line
from pipeline.sources.imports import ImportTracker
from pipeline.sources.source import ModelSource
from pipeline.spec.spec import Spec

INSTALL = "pip install 'torchserve-pipeline[hf]' (transformers)"


def transformers_source(spec: Spec) -> ModelSource:
    arch = spec.architecture
    where = f"{spec.source}: architecture"
    tracker = ImportTracker(roots=("transformers",))
    try:
        with tracker, architectures.offline():
            import transformers
    except ImportError as exc:
        raise SpecError(f"{where}.transformers: needs the transformers package ({exc}); {INSTALL}") from None
    quiet(transformers)
    try:
        config, unused = architectures.transformers_config(str(arch.transformers), **arch.kwargs)
    except Exception as exc:
        raise SpecError(f"{where}.transformers: {arch.transformers}/config.json: {type(exc).__name__}: {first_line(exc)}") from None
    if unused:
        raise SpecError(f"{where}.kwargs: not attributes of {type(config).__name__}: {', '.join(sorted(unused))}")
    cls = architectures.transformers_class(arch.class_name)
    if cls is None or not isinstance(cls, type):
        names = [n for n in dir(transformers) if n.startswith(("Auto", arch.class_name[:4]))]
        hint = difflib.get_close_matches(arch.class_name, names, n=1)
        extra = f"; did you mean '{hint[0]}'?" if hint else ""
        raise SpecError(f"{where}.class: transformers {transformers.__version__} has no class {arch.class_name!r}{extra}")
    name = arch.class_name
    cache_off = False
    if getattr(config, "use_cache", False) and "use_cache" not in arch.kwargs and _takes_use_cache(name, config):
        config.use_cache = False
        cache_off = True
    return ModelSource(lambda: architectures.transformers_model(name, config), tracker, "architecture.transformers", config, cache_off)


def quiet(transformers: Any) -> None:
    """transformers' notices (unused config keys, tracing, loading reports, progress bars) are noise in a build log."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _takes_use_cache(class_name: str, config: Any) -> bool:
    """Whether the class's forward takes `use_cache` (an Auto class: the class it picks for this config)."""
    import torch

    cls = architectures.transformers_class(class_name)
    if class_name.startswith("Auto"):
        with torch.device("meta"), architectures.offline():
            cls = type(architectures.transformers_model(class_name, config))
    try:
        return "use_cache" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def load_pretrained(cls: type, config: Any, state_dict: dict[str, Any], dtype: Any, strict: bool) -> tuple[Any, dict[str, Any]]:
    """`cls.from_pretrained` given the state_dict marpipe read: transformers' own renames, conversions, ties and
    buffers. Returns (model in eval mode on the CPU, its loading info: missing_keys, unexpected_keys,
    mismatched_keys as (key, checkpoint shape, model shape)). Missing and mismatched keys are initialised by
    transformers; the caller decides (with `strict`) whether that is an error."""
    with architectures.offline():
        model, info = cls.from_pretrained(
            None,
            config=config,
            state_dict=state_dict,
            attn_implementation=architectures.ATTN_IMPLEMENTATION,
            dtype=dtype,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
    return model.eval(), info


def reference_model(folder: Path, cls: type, config: Any, dtype: Any) -> Any:
    """The folder as transformers itself loads it: `from_pretrained(folder)`, same class, config (the spec's
    overrides applied) and attention implementation."""
    with architectures.offline():
        model = cls.from_pretrained(
            str(folder), config=config, attn_implementation=architectures.ATTN_IMPLEMENTATION, dtype=dtype, local_files_only=True
        )
    return model.eval().requires_grad_(False)


def fast_tokenizer(folder: Path) -> tuple[str, dict[str, Any]]:
    """A tokenizer folder (tokenizer.json with tokenizer_config.json) as transformers' fast tokenizer loads it:
    (its tokenizers JSON, as transformers set it up: special tokens, post-processor; and the settings the handler
    applies around it: pad_id, padding_side, truncation_side, model_max_length). SpecError when it does not load."""
    try:
        with architectures.offline():
            import transformers

            quiet(transformers)
            tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise SpecError(f"text.tokenizer: {folder}: transformers cannot load it: {type(exc).__name__}: {first_line(exc)}") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise SpecError(f"text.tokenizer: {folder}: {type(tok).__name__} is not a fast tokenizer (no tokenizer.json)")
    settings = {
        "pad_id": tok.pad_token_id,
        "padding_side": tok.padding_side,
        "truncation_side": tok.truncation_side,
        "model_max_length": tok.model_max_length if tok.model_max_length < 1_000_000 else None,
        "fields": [n for n in tok.model_input_names if n in ("input_ids", "attention_mask", "token_type_ids")],
    }
    return backend.to_str(), settings
