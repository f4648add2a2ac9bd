"""`make key`: make sure every `dvc` command finds the id-hashing key, and say where it is.

Creates the per-user key file ($XDG_CONFIG_HOME/agent-flywheel/id_key, default ~/.config/...) when
no key is set up; a repo that still has the .flywheel/id_key of earlier versions gets that key copied
there (same key, so the same outputs). Never prints the key, only its fingerprint.
"""
from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path
from typing import Mapping

from stages.core import KEY_ENV, KEY_FILE_ENV, LEGACY_KEY_FILE, KeyedHasher, find_key, user_key_path


def _write_private(path: Path, data: bytes) -> None:
    """Write a 0600 file in a 0700 folder, atomically, refusing to overwrite one that appeared meanwhile."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)  # fails if the file exists: never replace a key someone just made
    finally:
        tmp.unlink(missing_ok=True)


def ensure_key(env: Mapping[str, str] | None = None, cwd: Path | None = None) -> str:
    """Set the key up if needed; returns one line saying what was done (never the key)."""
    env = os.environ if env is None else env
    cwd = cwd or Path.cwd()
    user, legacy = user_key_path(env), cwd / LEGACY_KEY_FILE
    if env.get(KEY_ENV) or env.get(KEY_FILE_ENV) or user.is_file():
        key, where = find_key(env, cwd)  # also refuses two different keys
        return f"id key: {where} (fingerprint {KeyedHasher(key).fingerprint()}); nothing to do"
    if legacy.is_file():
        key, _ = find_key(env, cwd)
        _write_private(user, key + b"\n")
        return (f"id key: copied {LEGACY_KEY_FILE} to {user} (the same key: outputs unchanged; "
                f"fingerprint {KeyedHasher(key).fingerprint()}); {LEGACY_KEY_FILE} can go")
    key = secrets.token_hex(32).encode()
    _write_private(user, key + b"\n")
    return (f"id key: created {user} (new random key, fingerprint {KeyedHasher(key).fingerprint()}); "
            f"a team shares one key: put the team's in that file instead (see README, Keys)")


def main() -> None:
    try:
        print(ensure_key())
    except FileExistsError:  # another `make key` won the race: use its key
        print(ensure_key())
    sys.stdout.flush()


if __name__ == "__main__":
    main()
