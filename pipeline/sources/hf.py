"""Hugging Face models (`architecture.transformers`): the config read from the folder, never downloaded.

The class is `architecture.class` (any transformers class, `AutoModelFor...` included) or the config's
`architectures[0]`; `architecture.kwargs` override config values. The model is built from the config with
an attention implementation that traces (`eager`), and so is the eager archive's model in the handler, from
the `config.json` the archive carries.
"""

from __future__ import annotations

import difflib
import logging

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
    transformers.logging.set_verbosity_error()  # its notices (unused config keys, tracing) are noise in a build log
    logging.getLogger("transformers").setLevel(logging.ERROR)
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
    return ModelSource(lambda: architectures.transformers_model(name, config), tracker, "architecture.transformers", config=config)
