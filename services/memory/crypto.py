"""Encryption of sensitive user preferences (Fernet: AES-128-CBC + HMAC-SHA256, from ``cryptography``).

Keys come from ``MEMORY_ENCRYPTION_KEY``: one or more url-safe base64 Fernet keys separated by
commas. The first encrypts; every one of them decrypts, which is how a key is rotated (put the new key
first, keep the old one until its values were rewritten). Make one with
``python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())"``.

Without the variable, a development key is generated once into ``MEMORY_ENCRYPTION_KEY_FILE``
(default ``.data/memory-encryption.key``, mode 0600) and a warning is logged. That is fine for one
machine; replicas of the memory service must share a key, so production sets the variable (a secret).
Losing the key loses the sensitive values: they are unreadable without it, which is the point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Protocol

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from shared.contracts.errors import MeshError
from shared.runtime.logging import get_logger

log = get_logger(__name__)

DEFAULT_KEY_FILE = Path(".data") / "memory-encryption.key"


class Cipher(Protocol):
    def encrypt(self, value: Any) -> bytes: ...

    def decrypt(self, token: bytes) -> Any: ...


class PreferenceCipher:
    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise ValueError("at least one encryption key is needed")
        self._fernet = MultiFernet([Fernet(k) for k in keys])

    def encrypt(self, value: Any) -> bytes:
        return self._fernet.encrypt(json.dumps(value, separators=(",", ":")).encode("utf-8"))

    def decrypt(self, token: bytes) -> Any:
        try:
            return json.loads(self._fernet.decrypt(token))
        except InvalidToken:
            raise MeshError("a sensitive preference cannot be decrypted with the configured keys") from None


def load_cipher(keys: str | None, key_file: str | Path | None = None) -> PreferenceCipher:
    """The configured keys, else the development key file (created on first use)."""
    if keys:
        return PreferenceCipher([k.strip().encode() for k in keys.split(",") if k.strip()])
    path = Path(key_file) if key_file else DEFAULT_KEY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(Fernet.generate_key())
        try:
            os.link(tmp, path)  # atomic and exclusive: of two processes starting at once, one key wins
            log.warning("memory.dev_encryption_key_created", path=str(path),
                        hint="set MEMORY_ENCRYPTION_KEY in production; replicas must share one key")
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    return PreferenceCipher([path.read_bytes().strip()])


class LazyCipher:
    """The service's cipher: keys are read (or the dev key made) on first use, not at start-up."""

    def __init__(self, keys: str | None, key_file: str | Path | None) -> None:
        self._keys, self._key_file = keys, key_file
        self._cipher: PreferenceCipher | None = None

    def _get(self) -> PreferenceCipher:
        if self._cipher is None:
            try:
                self._cipher = load_cipher(self._keys, self._key_file)
            except OSError as exc:
                raise ValueError(f"no encryption key for sensitive preferences: {exc}") from None
        return self._cipher

    def encrypt(self, value: Any) -> bytes:
        return self._get().encrypt(value)

    def decrypt(self, token: bytes) -> Any:
        return self._get().decrypt(token)
