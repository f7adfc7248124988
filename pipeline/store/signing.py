"""Signatures of archives, made and checked by OpenSSF's `model-signing` library with an elliptic-curve key.

What is signed is every byte the server loads: a `.mar` file whole, or every file of a directory archive but its
signature (`marpipe.sig`) and the bytecode caches (`__pycache__`) Python writes into a served folder. The
signature is model-signing's own file (a Sigstore bundle holding a DSSE envelope over an in-toto statement of
each file's sha256), unchanged, so `model_signing verify key` checks it too. Where it lives: `signature_path`.

A leaf of `pipeline.store`: the modules that write and read archives import it; it imports only `pipeline.errors`.
The library (and through it sigstore) is imported when a signature is made or checked, never for a build without one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

from pipeline.errors import SpecError, first_line

SIGNATURE = "marpipe.sig"  # inside a directory archive
SUFFIX = ".sig"  # beside a .mar: <name>.mar.sig
PYCACHE = "__pycache__"  # written by the worker when it imports the archive's modules from the folder
CURVES = ("secp256r1", "secp384r1", "secp521r1")  # the curves model-signing signs with
NEW_KEY = "openssl ecparam -name prime256v1 -genkey -noout -out key.pem && openssl ec -in key.pem -pubout -out key.pub.pem"


def signature_path(archive: Path) -> Path:
    """Where an archive's signature lives: `<name>.mar.sig` beside a `.mar`, `<name>/marpipe.sig` in a folder."""
    return archive / SIGNATURE if archive.is_dir() else archive.with_name(archive.name + SUFFIX)


def _load(path: Path, private: bool, option: str):  # noqa: ANN202 (a cryptography key)
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kind = "private" if private else "public"
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        key = serialization.load_pem_private_key(data, None) if private else serialization.load_pem_public_key(data)
    except TypeError:  # an encrypted private key
        raise SpecError(f"{option} {path}: an encrypted key; marpipe signs with an unencrypted PEM key (kept in a secret store)") from None
    except ValueError:
        other = b"PUBLIC KEY" in data if private else b"PRIVATE KEY" in data
        hint = f"this is a {'public' if private else 'private'} key, pass the {kind} one" if other else f"make a key pair: {NEW_KEY}"
        raise SpecError(f"{option} {path}: not a PEM {kind} key; {hint}") from None
    public = key.public_key() if private else key
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name not in CURVES:
        raise SpecError(f"{option} {path}: model-signing signs with elliptic-curve keys ({', '.join(CURVES)}); make one: {NEW_KEY}")
    return key


def check_private_key(path: Path, option: str = "--sign-key") -> str:
    """Refuse (SpecError, exit 2) a key model-signing cannot sign with, before any work; returns its fingerprint."""
    return _fingerprint(_load(path, True, option).public_key())


def check_public_key(path: Path, option: str = "--key") -> str:
    """Refuse (SpecError, exit 2) a key model-signing cannot verify with, before any work; returns its fingerprint."""
    return _fingerprint(_load(path, False, option))


def _fingerprint(public) -> str:  # noqa: ANN001
    """The sha256 of the public key's PEM: the `publicKey.hint` model-signing writes into each signature."""
    from cryptography.hazmat.primitives import serialization

    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def signer(signature: Path) -> str | None:
    """The fingerprint of the key a signature names (read, not checked: `verify` checks it); None if unreadable."""
    try:
        doc = json.loads(signature.read_text(encoding="utf-8"))
        hint = doc["verificationMaterial"]["publicKey"]["hint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return hint if isinstance(hint, str) else None


def _hashing(archive: Path):  # noqa: ANN202 (a model_signing.hashing.Config)
    """What is signed: the file; or every file of the folder but the signature and the bytecode caches. Git's
    files are not left out (model-signing's default): whatever is in an archive, the server has it."""
    from model_signing import hashing

    ignored = [SIGNATURE]
    if archive.is_dir():
        ignored += sorted(p.relative_to(archive).as_posix() for p in archive.rglob(PYCACHE) if p.is_dir())
    return hashing.Config().set_ignored_paths(paths=ignored if archive.is_dir() else [], ignore_git_paths=False)


def sign(archive: Path, key: Path, out: Path) -> None:
    """Sign `archive` (a file or a folder) with the private key file `key`; the signature is written to `out`
    (the caller puts it in place: a temporary name, then `os.replace`)."""
    from model_signing import signing

    signing.Config().use_elliptic_key_signer(private_key=key).set_hashing_config(_hashing(archive)).sign(archive, out)
    with open(out, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(out, 0o644)


def verify(archive: Path, public_key: Path, signature: Path | None = None) -> str | None:
    """Why `archive` is not signed by the key `public_key` (a PEM public key file), or None when it is.

    Any error reading or checking the signature is a refusal: a signature is either shown good or not taken."""
    signature = signature or signature_path(archive)
    if not signature.is_file():
        return f"not signed: no {signature.name} {'in' if archive.is_dir() else 'beside'} it; sign it with marpipe sign --key KEY.pem"
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(_hashing(archive)).verify(archive, signature)
    except Exception as exc:  # ValueError, cryptography's InvalidSignature, a malformed bundle's KeyError...: all refusals
        why = first_line(exc, 240)
        if "Key mismatch" in why:
            return f"{signature.name} was made with another key (key sha256 {str(signer(signature))[:12]}…), not {Path(public_key).name}'s"
        if "mismatch" in why.lower():
            return f"{signature.name} does not match the archive's bytes (changed after it was signed): {why}"
        return f"{signature.name} is not a valid signature by {Path(public_key).name}: {type(exc).__name__}: {why}"
    return None


def signed_by(archive: Path, private_key: Path) -> bool:
    """Whether `archive`'s signature holds for the public half of `private_key` (signing again is then needless)."""
    from cryptography.hazmat.primitives import serialization

    if not signature_path(archive).is_file():
        return False
    public = _load(private_key, True, "--sign-key").public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with tempfile.TemporaryDirectory(prefix="marpipe-key-") as tmp:
        path = Path(tmp) / "key.pub.pem"
        path.write_bytes(pem)
        return verify(archive, path) is None


def fingerprint(private_key: Path) -> str:
    """The fingerprint of a private key's public half (as `signer` reads it from a signature)."""
    return check_private_key(private_key)


def temporary(archive: Path) -> Path:
    """The temporary name a signature of `archive` is written under before it is renamed into place (beside the
    archive, so the rename is atomic; hidden, so no store lists it)."""
    return archive.parent / f".{archive.name}{SUFFIX}.{os.getpid()}.tmp"


def clean_leftovers(archive: Path) -> None:
    """Remove the temporary signatures of `archive` that killed signers left (call it holding the archive's lock)."""
    pattern = re.compile(rf"^\.{re.escape(archive.name)}{re.escape(SUFFIX)}\.\d+\.tmp$")
    for p in archive.parent.iterdir():
        if pattern.match(p.name):
            discard(p)


def discard(path: Path | None) -> None:
    if path is not None:
        with contextlib.suppress(OSError):
            path.unlink()
