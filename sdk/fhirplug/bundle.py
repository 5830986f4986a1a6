"""Plugin bundles on disk: integrity (sha256 of every file), trust (signature or first-party pin), writing bundles.

A bundle is a directory of regular files::

    manifest.json        the Manifest (schema v1), canonical JSON
    manifest.sig         optional: base64 ed25519 signature over manifest.json's bytes
    model.int8.onnx ...  the variants, each with its sha256 in manifest.variants
    tokenizer.json ...   every other file, with its sha256 in manifest.files

Verification refuses a changed, missing or undeclared file, a symbolic link, a special file (FIFO, device,
socket) and a directory that holds no declared file, each by name; it reads through directory descriptors and
never follows a link or waits on a pipe (see :mod:`fhirplug._safe_read`). Since manifest.json holds every hash,
signing it signs the whole bundle.

Trust, decided on manifest.json's bytes:

1. ``trusted_keys`` given: manifest.sig must exist and verify with one of them. Nothing else is accepted
   (``allow_unsigned`` does not apply: an explicit trust list is the policy).
2. No keys, a manifest.sig present: refused (a signed bundle needs its publisher's key).
3. No keys, unsigned, manifest sha256 equal to the pin fhirplug ships for that plugin name
   (:mod:`fhirplug._pins`, first-party plugins): trusted by pin.
4. No keys, unsigned, ``allow_unsigned=True``: accepted as unsigned. Otherwise refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fhirplug._pins import pin_for
from fhirplug._safe_read import BundleDir, Entry
from fhirplug.errors import IntegrityError, ManifestError, SignatureError, UsageError
from fhirplug.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE, Manifest, parse_manifest

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_FILE",
    "TrustedBy",
    "VerifiedBundle",
    "generate_keypair",
    "read_manifest",
    "sha256_file",
    "verify_bundle",
    "write_manifest",
]

#: Largest manifest.sig read (a base64 ed25519 signature is 89 bytes).
MAX_SIGNATURE_BYTES = 4096
_CHUNK = 1 << 20

#: How a bundle came to be trusted: a trusted key's signature, a pin shipped with fhirplug, or allow_unsigned.
TrustedBy = Literal["key", "pin", "unsigned"]


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
    """A trusted bundle whose every file matched its manifest hash."""

    path: Path
    manifest: Manifest
    #: sha256 of manifest.json: one value that identifies the whole bundle (it holds every other hash).
    manifest_sha256: str
    #: Key id of the trusted key that signed it, or None for an unsigned bundle.
    signed_by: str | None
    #: The bytes of every declared file, read once and hashed: the runtime builds the model, the tokenizer and
    #: every task file from these bytes, so nothing is re-read from disk after it was checked.
    contents: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    #: ``key`` (signed by a trusted key), ``pin`` (a first-party manifest fhirplug ships the sha256 of) or
    #: ``unsigned`` (accepted because the caller passed allow_unsigned).
    trusted_by: TrustedBy = "unsigned"

    @property
    def trust(self) -> str:
        """How the bundle was trusted, in words (what ``fhirplug verify`` prints)."""
        if self.trusted_by == "key":
            return f"signed by key {self.signed_by} (one of the trusted keys)"
        if self.trusted_by == "pin":
            return f"first-party pin (unsigned; its manifest sha256 is the one fhirplug ships for {self.manifest.name})"
        return "unsigned, allowed by --allow-unsigned (allow_unsigned=True)"

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


def _refuse_odd_entries(root: Path, entries: Mapping[str, Entry], needed_dirs: set[str]) -> None:
    """Links, special files and directories no declared file needs are refused, each by name."""
    for name, entry in entries.items():
        if entry.kind == "file":
            continue
        if entry.kind == "directory":
            if name in needed_dirs:
                continue
            raise IntegrityError(
                f"{root / name}: a directory that holds no declared file; a bundle holds exactly the files its "
                "manifest hashes, remove it"
            )
        raise IntegrityError(
            f"{root / name}: is a {entry.kind}; a bundle holds regular files only (no symbolic links, pipes, "
            "devices or sockets), replace it with the file itself or remove it"
        )


def _parents(names: Iterable[str]) -> set[str]:
    dirs: set[str] = set()
    for name in names:
        parts = name.split("/")[:-1]
        dirs.update("/".join(parts[: i + 1]) for i in range(len(parts)))
    return dirs


def _manifest_bytes(root: Path, folder: BundleDir) -> bytes:
    raw = folder.read(MANIFEST_FILE, ManifestError, max_bytes=MAX_MANIFEST_BYTES)
    if raw is None:
        raise ManifestError(f"{root / MANIFEST_FILE}: cannot read the manifest (no such file)")
    return raw


def read_manifest(path: Path) -> tuple[Manifest, bytes]:
    """The parsed manifest of the bundle at ``path`` and its bytes (no hash or trust check).

    Raises:
        ManifestError: no bundle directory, or manifest.json is not a regular file, too big or invalid.
    """
    root = Path(path)
    with BundleDir(root, ManifestError) as folder:
        raw = _manifest_bytes(root, folder)
    return parse_manifest(raw, root / MANIFEST_FILE), raw


def _trust(
    root: Path,
    manifest: Manifest,
    raw: bytes,
    digest: str,
    signature: bytes | None,
    key_paths: Sequence[Path],
    allow_unsigned: bool,
) -> tuple[TrustedBy, str | None]:
    where = str(root / SIGNATURE_FILE)
    if key_paths:
        from fhirplug import _signing

        keys = [_signing.load_public_key(k) for k in key_paths]
        if signature is None:
            raise SignatureError(
                f"{root}: the bundle is unsigned (no {SIGNATURE_FILE}) but trusted keys were given "
                f"({', '.join(_signing.key_id(k) for k in keys)}): it must be signed by one of them. "
                "allow_unsigned does not apply over a trust list; ask the publisher for the signed bundle"
            )
        return "key", _signing.verify(raw, signature, keys, where)
    if signature is not None:
        from fhirplug import _signing

        _signing.verify(raw, signature, [], where)  # raises: signed, but no key to check it with
    if pin_for(manifest.name) == digest:
        return "pin", None
    if allow_unsigned:
        return "unsigned", None
    pinned = pin_for(manifest.name)
    why = (
        f"; fhirplug pins {manifest.name} at manifest sha256 {pinned}, this one is {digest}, so it is not the "
        "first-party bundle"
        if pinned
        else ""
    )
    raise SignatureError(
        f"{root}: the bundle is unsigned (no {SIGNATURE_FILE}){why}; load it only if you trust its source, "
        "with allow_unsigned=True (CLI: --allow-unsigned), or get it signed and pass the publisher's key"
    )


def verify_bundle(
    path: str | os.PathLike[str],
    *,
    trusted_keys: Iterable[str | os.PathLike[str]] = (),
    allow_unsigned: bool = False,
) -> VerifiedBundle:
    """Check a bundle's files, manifest, every file's sha256 and its trust (see the module docstring).

    Args:
        path: the bundle directory.
        trusted_keys: PEM ed25519 public key files. When any is given the bundle must carry a signature that
            verifies with one of them; an unsigned bundle is then refused whatever ``allow_unsigned`` says.
        allow_unsigned: with no trusted keys, accept an unsigned bundle that no first-party pin covers.
            Off by default.

    Returns:
        The bundle, with the verified bytes of every declared file and how it was trusted (``trusted_by``).

    Raises:
        ManifestError: the manifest is missing, not a regular file, over 1 MiB or invalid.
        IntegrityError: a file is changed, missing, undeclared, a link or a special file, or a directory holds
            no declared file (the message names it).
        SignatureError: untrusted: unsigned where a signature is needed, manifest.sig not a regular file, or a
            signature that does not verify with a trusted key.
        UsageError: ``trusted_keys`` is a single path rather than a list of paths.
    """
    if isinstance(trusted_keys, (str, bytes, os.PathLike)):
        raise UsageError(f"trusted_keys takes a list of key files, got the single value {trusted_keys!r}")
    root = Path(path)
    key_paths = [Path(k) for k in trusted_keys]
    with BundleDir(root, ManifestError) as folder:
        raw = _manifest_bytes(root, folder)
        signature = folder.read(SIGNATURE_FILE, SignatureError, max_bytes=MAX_SIGNATURE_BYTES)
        manifest = parse_manifest(raw, root / MANIFEST_FILE)
        digest = hashlib.sha256(raw).hexdigest()
        # Trust first: nothing more of an untrusted bundle is read.
        trusted_by, signed_by = _trust(root, manifest, raw, digest, signature, key_paths, allow_unsigned)
        declared = _declared(manifest)
        entries = folder.entries()
        _refuse_odd_entries(root, entries, _parents(declared))
        present = {name for name, entry in entries.items() if entry.kind == "file"} - {MANIFEST_FILE, SIGNATURE_FILE}
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
            data = folder.read(name, IntegrityError)
            assert data is not None  # present, checked above
            actual = hashlib.sha256(data).hexdigest()
            if actual != expected:
                raise IntegrityError(
                    f"{root / name}: sha256 is {actual}, the manifest says {expected}; the file was changed "
                    "after packaging; rebuild or re-download the plugin"
                )
            contents[name] = data
    return VerifiedBundle(root, manifest, digest, signed_by, contents, trusted_by)


def _bundle_files(root: Path) -> set[str]:
    """The regular files a bundle directory holds (but the manifest and signature), refusing what
    :func:`verify_bundle` would refuse, so a packaged bundle always verifies."""
    with BundleDir(root, IntegrityError) as folder:
        entries = folder.entries()
    files = {name for name, entry in entries.items() if entry.kind == "file"} - {MANIFEST_FILE, SIGNATURE_FILE}
    _refuse_odd_entries(root, entries, _parents(files))
    return files


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

    Raises:
        IntegrityError: the directory holds a link, a special file or an empty directory (it would not verify).
        ManifestError: the fields do not make a valid manifest.
    """
    root = Path(path)
    variant_files = {v["file"] for v in variants}
    present = _bundle_files(root)
    full_variants = [{**v, "sha256": sha256_file(root / v["file"])} for v in variants]
    files = {name: sha256_file(root / name) for name in sorted(present - variant_files)}
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
