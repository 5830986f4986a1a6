from __future__ import annotations

import json
from pathlib import Path

import pytest

from fhirplug import load_plugin
from fhirplug.bundle import SIGNATURE_FILE, generate_keypair, verify_bundle, write_manifest
from fhirplug.errors import IntegrityError, ManifestError, SignatureError


def _flip_one_byte(path: Path, at: int = 1000) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _resign(bundle: Path, key: Path | None) -> None:
    """Re-write the manifest of a bundle (keeping its fields), signed with ``key``."""
    raw = json.loads((bundle / "manifest.json").read_text())
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(bundle, raw, variants=variants, signing_key=key)


def test_unsigned_bundle_needs_permission(tiny_bundle: Path) -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(tiny_bundle)
    verified = verify_bundle(tiny_bundle, allow_unsigned=True)
    assert verified.signed_by is None
    assert len(verified.manifest_sha256) == 64


@pytest.mark.parametrize("name", ["model.int8.onnx", "model.fp32.onnx", "tokenizer.json", "labels.json"])
def test_one_flipped_byte_is_named(tiny_bundle: Path, name: str) -> None:
    _flip_one_byte(tiny_bundle / name, at=100)
    with pytest.raises(IntegrityError, match=rf"{name}: sha256 is [0-9a-f]{{64}}, the manifest says"):
        verify_bundle(tiny_bundle, allow_unsigned=True)
    with pytest.raises(IntegrityError, match=name):
        load_plugin(tiny_bundle, allow_unsigned=True)


def test_missing_model_file_is_named(tiny_bundle: Path) -> None:
    (tiny_bundle / "model.fp32.onnx").unlink()
    with pytest.raises(IntegrityError, match=r"missing: model\.fp32\.onnx"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_extra_model_file_is_named(tiny_bundle: Path) -> None:
    (tiny_bundle / "model.fp16.onnx").write_bytes(b"not declared")
    with pytest.raises(IntegrityError, match=r"not declared in the manifest: model\.fp16\.onnx"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_missing_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a plugin bundle directory"):
        verify_bundle(tmp_path / "nowhere", allow_unsigned=True)
    with pytest.raises(ManifestError, match="cannot read the manifest"):
        verify_bundle(tmp_path, allow_unsigned=True)


def test_signed_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    generate_keypair(tmp_path / "b.key", tmp_path / "b.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    assert (tiny_bundle / SIGNATURE_FILE).exists()
    verified = verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "b.pub", tmp_path / "a.pub"])
    assert verified.signed_by is not None
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "b.pub"])
    with pytest.raises(SignatureError, match="no trusted public key"):
        verify_bundle(tiny_bundle)
    # A signed bundle never falls back to "unsigned allowed".
    with pytest.raises(SignatureError):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_edited_manifest_breaks_the_signature(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    manifest = tiny_bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace("Tiny test plugin", "Tiny tampered plugin"))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_bundle(tiny_bundle, trusted_keys=[tmp_path / "a.pub"])


def test_rewriting_without_a_key_drops_a_stale_signature(tiny_bundle: Path, tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    _resign(tiny_bundle, None)
    assert not (tiny_bundle / SIGNATURE_FILE).exists()
