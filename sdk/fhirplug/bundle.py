"""Plugin bundles on disk: integrity (sha256 of every file), signatures, and writing new bundles.

A bundle is a directory::

    manifest.json        the Manifest (schema v1), canonical JSON
    manifest.sig         optional: base64 ed25519 signature over manifest.json's bytes
    model.int8.onnx ...  the variants, each with its sha256 in manifest.variants
    tokenizer.json ...   every other file, with its sha256 in manifest.files

Verification refuses a changed, missing or undeclared file and names it. Since manifest.json holds every hash,
signing it signs the whole bundle.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhirplug.errors import IntegrityError, ManifestError, SignatureError
from fhirplug.manifest import MANIFEST_FILE, Manifest, parse_manifest

__all__ = [
    "SIGNATURE_FILE",
    "VerifiedBundle",
    "generate_keypair",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]

SIGNATURE_FILE = "manifest.sig"
_CHUNK = 1 << 20


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new ed25519 key pair as PEM files (see :mod:`fhirplug._signing`)."""
    from fhirplug import _signing  # cryptography loads only when signatures are in play (cold start)

    _signing.generate_keypair(private_path, public_path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose every file matched its manifest hash."""

    path: Path
    manifest: Manifest
    #: sha256 of manifest.json: one value that identifies the whole bundle (it holds every other hash).
    manifest_sha256: str
    #: Key id of the trusted key that signed it, or None for an unsigned bundle.
    signed_by: str | None
    #: The bytes of every declared file, read once and hashed: the runtime builds the model, the tokenizer and
    #: every task file from these bytes, so nothing is re-read from disk after it was checked.
    contents: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def read(self, name: str) -> bytes:
        """The verified bytes of the declared file ``name``.

        Raises:
            IntegrityError: ``name`` is not a file the manifest declares.
        """
        try:
            return self.contents[name]
        except KeyError:
            raise IntegrityError(
                f"{self.path}: {name!r} is not a file of this bundle's manifest; "
                f"declared: {', '.join(sorted(self.contents))}"
            ) from None


def _declared(manifest: Manifest) -> dict[str, str]:
    declared = dict(manifest.files)
    for variant in manifest.variants:
        declared[variant.file] = variant.sha256
    return declared


def _bundle_files(root: Path) -> set[str]:
    found = set()
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST_FILE, SIGNATURE_FILE):
                found.add(rel)
    return found


def read_manifest(path: Path) -> tuple[Manifest, bytes]:
    manifest_path = path / MANIFEST_FILE
    if not path.is_dir():
        raise ManifestError(f"{path}: not a plugin bundle directory (it does not exist or is a file)")
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{manifest_path}: cannot read the manifest ({exc.strerror})") from exc
    return parse_manifest(raw, manifest_path), raw


def verify_bundle(
    path: str | Path,
    *,
    trusted_keys: Iterable[str | Path] = (),
    allow_unsigned: bool = False,
) -> VerifiedBundle:
    """Check a bundle's manifest, every file's sha256 and its signature.

    Args:
        path: the bundle directory.
        trusted_keys: PEM public key files; a signed bundle must verify with one of them.
        allow_unsigned: accept a bundle with no manifest.sig. Off by default: an unsigned bundle is refused.

    Raises:
        ManifestError: the manifest is unreadable or invalid.
        IntegrityError: a file is changed, missing or undeclared (the message names it).
        SignatureError: unsigned and not allowed, or the signature does not verify with a trusted key.
    """
    root = Path(path)
    manifest, raw = read_manifest(root)
    declared = _declared(manifest)
    present = _bundle_files(root)
    missing = sorted(set(declared) - present)
    if missing:
        raise IntegrityError(f"{root}: file(s) listed in the manifest are missing: {', '.join(missing)}")
    extra = sorted(present - set(declared))
    if extra:
        raise IntegrityError(
            f"{root}: file(s) not declared in the manifest: {', '.join(extra)}; "
            "a bundle holds exactly the files its manifest hashes"
        )
    contents: dict[str, bytes] = {}
    for name, expected in sorted(declared.items()):
        data = (root / name).read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        contents[name] = data
        if actual != expected:
            raise IntegrityError(
                f"{root / name}: sha256 is {actual}, the manifest says {expected}; the file was changed "
                "after packaging; rebuild or re-download the plugin"
            )
    signature_path = root / SIGNATURE_FILE
    signed_by = None
    if signature_path.exists():
        from fhirplug import _signing

        keys = [_signing.load_public_key(Path(k)) for k in trusted_keys]
        signed_by = _signing.verify(raw, signature_path.read_bytes(), keys, str(signature_path))
    elif not allow_unsigned:
        raise SignatureError(
            f"{root}: the bundle is unsigned (no {SIGNATURE_FILE}); load it only if you trust its source, "
            "with allow_unsigned=True (CLI: --allow-unsigned)"
        )
    return VerifiedBundle(root, manifest, hashlib.sha256(raw).hexdigest(), signed_by, contents)


def write_manifest(
    path: str | Path,
    fields: Mapping[str, Any],
    *,
    variants: Sequence[Mapping[str, Any]],
    signing_key: str | Path | None = None,
) -> Manifest:
    """Hash the files in ``path``, write manifest.json (and manifest.sig when a key is given).

    ``fields`` holds every manifest key but ``variants`` and ``files``; ``variants`` holds each variant's keys
    but ``sha256``. Every other file already in the directory is hashed into ``files``, so write the model card
    and metrics before calling this. A stale signature is removed.

    Returns:
        The validated manifest that was written.
    """
    root = Path(path)
    variant_files = {v["file"] for v in variants}
    full_variants = [{**v, "sha256": sha256_file(root / v["file"])} for v in variants]
    files = {name: sha256_file(root / name) for name in sorted(_bundle_files(root) - variant_files)}
    manifest = parse_manifest({**fields, "variants": full_variants, "files": files}, root / MANIFEST_FILE)
    text = manifest.to_json().encode()
    (root / MANIFEST_FILE).write_bytes(text)
    signature_path = root / SIGNATURE_FILE
    if signing_key is not None:
        from fhirplug import _signing

        signature_path.write_bytes(_signing.sign(text, _signing.load_private_key(Path(signing_key))))
    elif signature_path.exists():
        signature_path.unlink()
    return manifest
