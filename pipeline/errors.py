"""One error hierarchy, one exit code per failure kind.

User mistakes (bad spec, rejected checkpoint, failed parity...) are `PipelineError`s and are printed as one
line. Anything else that escapes is a bug in marpipe and exits 1 with a traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the user can fix. `exit_code` is the documented process exit status."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class SpecError(PipelineError):
    """The spec file or the command line is invalid (exit 2)."""

    exit_code = 2


class CheckpointError(PipelineError):
    """The checkpoint was rejected: unreadable, unsafe, or not matching the architecture (exit 3)."""

    exit_code = 3


class ExportError(PipelineError):
    """TorchScript or ONNX export failed (exit 4)."""

    exit_code = 4


class ParityError(PipelineError):
    """The exported or served model does not answer like the eager model (exit 5)."""

    exit_code = 5


class PackageError(PipelineError):
    """Writing, reading or verifying an archive failed, or an I/O error (exit 6)."""

    exit_code = 6


class SignatureError(PackageError):
    """An archive's signature is missing, made with another key, or does not match its bytes (exit 6, as every
    archive that fails verification: issue 21's contract)."""


def first_line(exc: BaseException, limit: int | None = 300, prefer: tuple[str, ...] = ()) -> str:
    """An exception's first non-empty line (its type's name when it has none), for a one-line message; or, with
    `prefer`, the first line that holds one of those words (where a banner comes before what failed)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = next((ln for ln in lines if any(w in ln for w in prefer)), lines[0] if lines else type(exc).__name__)
    return text[:limit]


EXIT_CODES = {
    0: "ok",
    1: "internal error (a bug in marpipe: traceback printed)",
    2: "invalid spec or usage",
    3: "checkpoint rejected",
    4: "export failed",
    5: "parity failed",
    6: "packaging or I/O failed",
}
