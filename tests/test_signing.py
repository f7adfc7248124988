"""Signed archives: `build --sign-key`, `sign`, `verify --key`, `deploy --verify-key`, `kserve --verify-key`.

Keys are EC P-256 made here with `cryptography`. The attacker can write to the store: they build an archive with
marpipe itself from other weights (every hash inside valid), leave it unsigned or copy the genuine signature
beside it, flip a byte, or sign with a key of their own. Each is exit 6, and deploy leaves the server's store as
it was. The signatures are model-signing's own files: the library's verifier, called directly, accepts ours.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import Project, marpipe, store_state

from pipeline.errors import EXIT_CODES, PackageError, SignatureError
from pipeline.store import archive, layout, signing

SIG = SignatureError.exit_code


def _key_pair(folder: Path, name: str) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / f"{name}.pem", folder / f"{name}.pub.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    (ours, ours_pub), (theirs, theirs_pub) = _key_pair(folder, "ours"), _key_pair(folder, "theirs")
    return {"key": ours, "pub": ours_pub, "other": theirs, "other_pub": theirs_pub}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, Path]) -> dict[str, Path]:
    """A signed tiny.mar (ours), a signed directory archive, and the attacker's tiny.mar: built by marpipe from
    other weights, unsigned, every hash inside it valid."""
    project = Project(tmp_path_factory.mktemp("signing"))
    out: dict[str, Path] = {"project": project.root}
    weights = project.model("Linear").state_dict()
    for name, layout_, key in (("ours", "mar", keys["key"]), ("dir", "dir", keys["key"]), ("evil", "mar", None)):
        project.save({k: v + 1.0 for k, v in weights.items()} if name == "evil" else weights, "tiny.pth")
        spec = project.spec(name="tiny")
        store = project.root / name
        args = ["build", "--store", str(store), "--layout", layout_, str(spec)] + (["--sign-key", str(key)] if key else [])
        result = marpipe(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        out[name] = store / ("tiny" if layout_ == "dir" else "tiny.mar")
    return out


def _verify(*archives: Path | str, key: Path) -> tuple[int, str]:
    result = marpipe("verify", "--key", str(key), *map(str, archives))
    return result.returncode, result.stdout + result.stderr


def test_exit_code_7_is_the_signature_code() -> None:
    assert SIG == PackageError.exit_code == 6 and 7 not in EXIT_CODES


def test_a_signed_build_verifies_and_the_index_says_so(built: dict[str, Path], keys: dict[str, Path]) -> None:
    mar = built["ours"]
    assert signing.signature_path(mar) == mar.with_name("tiny.mar.sig") and signing.signature_path(mar).is_file()
    code, out = _verify(mar, key=keys["pub"])
    assert code == 0 and out.startswith("ok   ") and "signature by the key holds" in out, out
    entry = json.loads((mar.parent / "index.json").read_text())["archives"][0]
    fingerprint = signing.check_public_key(keys["pub"])
    assert entry["signed"] is True and entry["signer"] == fingerprint
    assert sorted(p.name for p in mar.parent.iterdir()) == ["index.json", "tiny.mar", "tiny.mar.sig"]  # no leftovers


def test_the_signature_is_model_signings_own(built: dict[str, Path], keys: dict[str, Path]) -> None:
    """Checked by the library directly, with its default settings (what `model_signing verify key` does); and
    the fingerprint the index records is the hint the library writes."""
    from model_signing import verifying

    mar, sig = built["ours"], signing.signature_path(built["ours"])
    verifying.Config().use_elliptic_key_verifier(public_key=keys["pub"]).verify(mar, sig)
    with pytest.raises(Exception, match="Key mismatch"):
        verifying.Config().use_elliptic_key_verifier(public_key=keys["other_pub"]).verify(mar, sig)
    bundle = json.loads(signing.signature_path(built["ours"]).read_text())
    assert bundle["verificationMaterial"]["publicKey"]["hint"] == signing.check_public_key(keys["pub"])


def test_the_attackers_archive_is_refused(built: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    """Built by marpipe from other weights: plain `verify` passes it (every hash inside is valid); with the key,
    unsigned and with the genuine signature copied beside it are both exit 6."""
    evil = tmp_path / "store" / "tiny.mar"
    evil.parent.mkdir()
    shutil.copyfile(built["evil"], evil)
    assert marpipe("verify", str(evil)).returncode == 0
    code, out = _verify(evil, key=keys["pub"])
    assert code == SIG and "not signed" in out and "FAIL" in out, out
    shutil.copyfile(signing.signature_path(built["ours"]), signing.signature_path(evil))
    code, out = _verify(evil, key=keys["pub"])
    assert code == SIG and "does not match the archive's bytes" in out, out
    code, out = _verify(built["ours"], evil, key=keys["pub"])  # one bad archive among good ones
    assert code == SIG and out.count("FAIL") == 1, out


def test_a_flipped_byte_a_foreign_key_or_a_broken_signature_is_refused(
    built: dict[str, Path], keys: dict[str, Path], tmp_path: Path
) -> None:
    mar = tmp_path / "tiny.mar"
    data = bytearray(built["ours"].read_bytes())
    data[len(data) // 2] ^= 1
    mar.write_bytes(bytes(data))
    shutil.copyfile(signing.signature_path(built["ours"]), signing.signature_path(mar))
    code, out = _verify(mar, key=keys["pub"])
    assert code == SIG and "does not match" in out, out
    code, out = _verify(built["ours"], key=keys["other_pub"])
    assert code == SIG and "another key" in out, out
    shutil.copyfile(built["ours"], mar)
    for broken in (b"", b"{not json", json.dumps({"mediaType": "x", "verificationMaterial": {}}).encode()):
        signing.signature_path(mar).write_bytes(broken)
        code, out = _verify(mar, key=keys["pub"])
        assert code == SIG and "not a valid signature" in out, (broken, out)
    code, out = _verify(mar, key=keys["key"])  # the private key where the public one belongs: a usage error
    assert code == 2 and "pass the public one" in out, out


def test_an_attackers_own_key_does_not_help(built: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    evil = tmp_path / "tiny.mar"
    shutil.copyfile(built["evil"], evil)
    signed = marpipe("sign", str(evil), "--key", str(keys["other"]))
    assert signed.returncode == 0, signed.stderr
    assert _verify(evil, key=keys["other_pub"])[0] == 0
    code, out = _verify(evil, key=keys["pub"])
    assert code == SIG and "another key" in out, out


def test_deploy_refuses_before_touching_the_servers_store(built: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    """No server runs: the signature check comes before any request. A signed archive passes it and then fails
    to reach the server (exit 6); an unsigned one, or one with the genuine signature copied beside it, is exit 6."""
    server_store = tmp_path / "server_store"
    server_store.mkdir()
    (server_store / "other-1.0-0123456789ab.mar").write_bytes(b"already there")
    before = store_state(server_store)
    evil = tmp_path / "evil" / "tiny.mar"
    evil.parent.mkdir()
    shutil.copyfile(built["evil"], evil)

    def deploy(*archives: Path) -> tuple[int, str]:
        nowhere = "http://127.0.0.1:9"
        args = ["deploy", *map(str, archives), "--management", nowhere, "--inference", nowhere, "--model-store", str(server_store)]
        result = marpipe(*args, "--verify-key", str(keys["pub"]), "--timeout", "5")
        return result.returncode, result.stdout + result.stderr

    code, out = deploy(evil)
    assert code == SIG and "not signed" in out and "nothing was copied or registered" in out, out
    shutil.copyfile(signing.signature_path(built["ours"]), signing.signature_path(evil))
    code, out = deploy(built["ours"], evil)  # one bad archive: none goes
    assert code == SIG and "does not match" in out, out
    assert store_state(server_store) == before
    code, out = deploy(built["ours"], built["dir"])
    assert code == 6 and "not reachable" in out, out  # past the signature check
    assert store_state(server_store) == before


def test_kserve_copies_signatures_and_refuses_unsigned(built: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(built["evil"], store / "tiny.mar")
    out = tmp_path / "out"
    result = marpipe("kserve", str(out), "--store", str(store), "--verify-key", str(keys["pub"]))
    assert result.returncode == SIG and "nothing was written" in result.stderr and not out.exists(), result.stderr
    shutil.copyfile(built["ours"], store / "tiny.mar")
    shutil.copyfile(signing.signature_path(built["ours"]), store / "tiny.mar.sig")
    result = marpipe("kserve", str(out), "--store", str(store), "--verify-key", str(keys["pub"]))
    assert result.returncode == 0, result.stderr
    model_store = out / "model-store"
    assert sorted(p.name for p in model_store.iterdir()) == ["tiny.mar", "tiny.mar.sig"]
    assert signing.verify(model_store / "tiny.mar", keys["pub"]) is None


def test_directory_archive_signature_inside_covers_every_file_but_the_bytecode_cache(
    built: dict[str, Path], keys: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "tiny"
    shutil.copytree(built["dir"], folder)
    assert (folder / "marpipe.sig").is_file() and layout.verify(folder) == []  # the signature is not an unlisted entry
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "marpipe_handler.cpython-311.pyc").write_bytes(b"written by the worker")
    (folder / "marpipe_serving" / "__pycache__").mkdir()
    assert _verify(folder, key=keys["pub"])[0] == 0
    (folder / "extra.py").write_text("import os\n")  # anything more is refused
    code, out = _verify(folder, key=keys["pub"])
    assert code == SIG and "extra.py" in out, out
    (folder / "extra.py").unlink()
    handler = folder / "marpipe_handler.py"
    handler.write_text(handler.read_text() + "\n# changed\n")
    assert _verify(folder, key=keys["pub"])[0] == SIG


def test_cache_keeps_or_renews_the_signature_and_an_unsigned_rebuild_drops_it(keys: dict[str, Path], linear_project: Project) -> None:
    spec = linear_project.spec()
    mar = linear_project.store / "tiny.mar"
    assert linear_project.build(spec, "--sign-key", str(keys["key"])).returncode == 0
    sig = signing.signature_path(mar)
    before = store_state(linear_project.store)
    again = linear_project.build(spec, "--sign-key", str(keys["key"]))
    assert "unchanged" in again.stdout and store_state(linear_project.store) == before  # still signed by it: untouched
    other = linear_project.build(spec, "--sign-key", str(keys["other"]))  # another key: signed again, not rebuilt
    assert other.returncode == 0 and "unchanged" in other.stdout, other.stdout + other.stderr
    assert mar.read_bytes() == before["tiny.mar"] and sig.read_bytes() != before["tiny.mar.sig"]
    assert _verify(mar, key=keys["other_pub"])[0] == 0 and _verify(mar, key=keys["pub"])[0] == SIG
    index = json.loads((linear_project.store / "index.json").read_text())["archives"][0]
    assert index["signer"] == signing.check_public_key(keys["other_pub"])
    assert "unchanged" in linear_project.build(spec).stdout and sig.is_file()  # no key: the signature stays, it still holds
    rebuilt = linear_project.build(spec, "--force")  # new bytes without a key: no signature that is not theirs
    assert rebuilt.returncode == 0 and not sig.exists(), rebuilt.stderr
    assert json.loads((linear_project.store / "index.json").read_text())["archives"][0]["signed"] is False
    assert sorted(store_state(linear_project.store)) == ["index.json", "tiny.mar"]


def test_a_failed_or_refused_signed_build_leaves_the_store_as_it_was(keys: dict[str, Path], project: Project) -> None:
    project.save(project.model("Linear").state_dict(), "tiny.pth")
    assert project.build(project.spec(), "--sign-key", str(keys["key"])).returncode == 0
    before = store_state(project.store)
    project.save(project.model("Noisy").state_dict(), "noisy.pth")
    failed = project.build(project.spec(cls="Noisy", checkpoint={"path": "noisy.pth"}), "--sign-key", str(keys["other"]))
    assert failed.returncode == 5 and store_state(project.store) == before
    refused = project.build(project.spec(name="new"), "--sign-key", str(keys["pub"]))  # a public key: refused up front
    assert refused.returncode == 2 and "pass the private one" in refused.stderr and store_state(project.store) == before


def test_signing_that_fails_puts_nothing_in_place(keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The archive and its signature are written under temporary names and renamed together: a failure while
    signing leaves the previous archive and its signature, byte for byte, and no temporary file."""
    store = tmp_path / "store"
    src = tmp_path / "handler.py"
    src.write_text("x = 1\n")
    man = archive.manifest("m", "1.0", "handler.py", "handler.py")
    archive.write_archive(store / "m.mar", {"handler.py": src}, {"name": "m"}, man)
    with archive.begin(store / "m.mar", sign_key=keys["key"]) as draft:
        draft.finish({"handler.py": src}, {"name": "m"}, man)
    assert signing.verify(store / "m.mar", keys["pub"]) is None
    before = store_state(store)

    def broken(model: Path, key: Path, out: Path) -> None:
        out.write_bytes(b"half a signature")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(signing, "sign", broken)
    src.write_text("x = 2\n")
    with pytest.raises(PackageError, match="No space left"), archive.begin(store / "m.mar", sign_key=keys["key"]) as draft:
        draft.finish({"handler.py": src}, {"name": "m"}, man)
    assert store_state(store) == before


def test_sign_refuses_a_tampered_archive_and_index_notes_signatures(built: dict[str, Path], keys: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(built["evil"], store / "tiny.mar")
    shutil.copytree(built["dir"], store / "folder")
    (store / "folder" / "marpipe.sig").unlink()
    assert marpipe("index", str(store)).returncode == 0
    signed = {e["file"]: e["signed"] for e in json.loads((store / "index.json").read_text())["archives"]}
    assert signed == {"folder": False, "tiny.mar": False}
    result = marpipe("sign", str(store / "tiny.mar"), str(store / "folder"), "--key", str(keys["key"]))
    assert result.returncode == 0, result.stderr
    assert _verify(store / "tiny.mar", store / "folder", key=keys["pub"])[0] == 0
    entries = json.loads((store / "index.json").read_text())["archives"]
    assert all(e["signed"] and e["signer"] == signing.check_public_key(keys["pub"]) for e in entries), entries
    data = bytearray((store / "tiny.mar").read_bytes())
    data[data.index(b"class Linear") + 1] ^= 1
    (store / "tiny.mar").write_bytes(bytes(data))
    (store / "tiny.mar.sig").unlink()
    before = store_state(store)
    result = marpipe("sign", str(store / "tiny.mar"), "--key", str(keys["key"]))
    assert result.returncode == 6 and "not signed (a signature would vouch for it)" in result.stderr, result.stderr
    assert store_state(store) == before
