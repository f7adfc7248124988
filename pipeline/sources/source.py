"""`ModelSource`: what builds the spec's model, whichever way the spec names its architecture.

`arch` resolves a file or a factory into one, `hf` a Hugging Face folder; the load stage constructs the model
from it and the package stage records its requirements.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.sources.imports import ImportTracker


@dataclass
class ModelSource:
    """What builds the spec's model: `make()` constructs it on the current default device."""

    make: Callable[[], Any]
    imports: ImportTracker
    field: str  # the spec field to blame when construction fails
    config: Any = None  # transformers: the config, overrides applied (it goes into the archive as config.json)
    cache_off: bool = False  # transformers: use_cache was set to False (the forward would return a cache)

    def requirements(self) -> list[dict[str, str]]:
        return self.imports.requirements()
