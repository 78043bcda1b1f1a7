"""The host's Ed25519 signing key: created on first use, private key readable by its owner only."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from device_agent.storage import atomic_write_bytes

from ..errors import ConfigError

PRIVATE, PUBLIC = "signing.key", "signing.pub"


def public_key_path(key_dir: Path) -> Path:
    return key_dir / PUBLIC


def load_or_create(key_dir: Path) -> Ed25519PrivateKey:
    priv = key_dir / PRIVATE
    if priv.exists():
        try:
            key = serialization.load_pem_private_key(priv.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{priv}: cannot load the signing key ({exc}); move it away to create a new one "
                              "(devices will then need the new public key)") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{priv}: not an Ed25519 private key")
        if not (key_dir / PUBLIC).exists():
            _write_public(key_dir, key)
        return key
    key_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    atomic_write_bytes(priv, pem)
    os.chmod(priv, 0o600)
    _write_public(key_dir, key)
    return key


def _write_public(key_dir: Path, key: Ed25519PrivateKey) -> None:
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(key_dir / PUBLIC, pub)
