"""The third-party distributions an archive needs where it is served, checked before anything imports them:
what an eager archive's architecture imports (TorchScript and ONNX archives need none of those), the torch an aoti
package was compiled against, and Pillow or tokenizers for image or text inputs, in every format.

marpipe records them at build time (``requirements`` in ``marpipe.json``, and ``requirements.txt``). A missing
one fails the worker with one line that names the package and version, which TorchServe's log and
``marpipe smoke`` show.
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
            why = req.get("for", "architecture")
            hint = ", or serve a torchscript or onnx archive, which need none" if why == "architecture" else ""
            raise MissingRequirementError(
                f"{meta.get('name', 'this archive')} needs {name}=={version} (for its {why}), which is not installed "
                f"where TorchServe runs: pip install {name}=={version}{hint}"
            ) from None
        if installed != version and installed.split("+")[0] != version:  # ==2.13.0 takes 2.13.0+cpu (PEP 440)
            log.warning("marpipe: %s was built with %s==%s, this server has %s", meta.get("name"), name, version, installed)
