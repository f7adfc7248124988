"""The third-party distributions an eager archive's architecture imports, checked before it is imported.

marpipe records them at build time (``requirements`` in ``marpipe.json``, and ``requirements.txt``);
TorchScript and ONNX archives need none. A missing one fails the worker with one line that names the
package and version, which TorchServe's log and ``marpipe smoke`` show.
"""

from __future__ import annotations

import importlib.metadata
import logging

log = logging.getLogger("marpipe_handler")


class MissingRequirementError(RuntimeError):
    """A distribution the archive's architecture imports is not installed where it is served."""


def check(meta: dict) -> None:
    """Raise MissingRequirementError for the first missing distribution; log a differing version."""
    for req in meta.get("requirements") or []:
        name, version = req["name"], req["version"]
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            raise MissingRequirementError(
                f"{meta.get('name', 'this archive')} needs {name}=={version} (its architecture imports it), which is not installed "
                f"where TorchServe runs: pip install {name}=={version}, or serve a torchscript or onnx archive, which need none"
            ) from None
        if installed != version:
            log.warning("marpipe: %s was built with %s==%s, this server has %s", meta.get("name"), name, version, installed)
