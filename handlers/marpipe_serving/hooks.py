"""User hooks (`serve.hooks`): a file of the archive that may define ``decode(body, content_type)`` → dict of
arrays and ``encode(outputs)`` → something JSON can write, called per request inside our batching.

An exception in ``decode`` answers that request 400 with its message; in ``encode``, 500; neither touches the
other requests of the batch.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType


def load(model_dir: str, filename: str) -> ModuleType:
    if model_dir not in sys.path:
        sys.path.insert(0, model_dir)  # hooks may import their own modules shipped as extra files
    name = "marpipe_user_hooks"
    spec = importlib.util.spec_from_file_location(name, os.path.join(model_dir, filename))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
