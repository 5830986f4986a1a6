"""ed25519 signatures over manifest.json (which holds the sha256 of every other file).

Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public), the format ``openssl genpkey -algorithm
ed25519`` writes. The signature file holds the base64 of the raw 64-byte signature.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fhirplug.errors import SignatureError


def generate_keypair(private_path: Path, public_path: Path) -> None:
    """Write a new ed25519 key pair as PEM files (the private key readable by its owner only)."""
    key = Ed25519PrivateKey.generate()
    private_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    private_path.chmod(0o600)
    public_path.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


#: A PEM ed25519 key is about 120 bytes; a key file is never bigger than this.
MAX_KEY_BYTES = 16 << 10


def _read_key_file(path: Path) -> bytes:
    """The bytes of a key file: a regular file of at most MAX_KEY_BYTES, opened without waiting on a pipe.

    Raises:
        OSError: it cannot be opened or read; or (with errno EINVAL) it is not a regular file or too big.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(22, "not a regular file")
        if info.st_size > MAX_KEY_BYTES:
            raise OSError(22, f"{info.st_size} bytes, too big for a key file")
        return os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(_read_key_file(path), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path}: cannot read an unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: expected an ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(_read_key_file(path))
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        raise SignatureError(f"{path}: cannot read a PEM public key ({exc})") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: expected an ed25519 public key, got {type(key).__name__}")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of its raw bytes' base64."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b16encode(raw).decode()[:16].lower()


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    return base64.b64encode(private_key.sign(data)) + b"\n"


def verify(data: bytes, signature: bytes, trusted: Iterable[Ed25519PublicKey], where: str) -> str:
    """Return the key id of the trusted key that made ``signature`` over ``data``.

    Raises:
        SignatureError: the signature is malformed, or no trusted key verifies it.
    """
    try:
        raw = base64.b64decode(signature.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{where}: signature is not base64 ({exc})") from exc
    keys = list(trusted)
    if not keys:
        raise SignatureError(
            f"{where}: the bundle is signed but no trusted public key was given; pass --trusted-key FILE "
            "(or trusted_keys=[...]) with the publisher's key"
        )
    for key in keys:
        try:
            key.verify(raw, data)
        except InvalidSignature:
            continue
        return key_id(key)
    raise SignatureError(
        f"{where}: signature does not verify with any of the {len(keys)} trusted key(s) "
        f"({', '.join(key_id(k) for k in keys)}); the manifest was changed or signed by another key"
    )
