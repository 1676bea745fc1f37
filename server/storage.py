"""Images answered with ``response_format: "url"``: stored on disk under random ids until they expire."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path

from engine.errors import NotFoundError
from engine.images import OUTPUT_FORMATS

# token_urlsafe(32): 256 random bits as 43 URL-safe characters. Only names of this shape are ever
# looked up, so an id cannot name a path outside the folder ("..", "/", "%2F" never match).
_FILE_ID = re.compile(r"[A-Za-z0-9_-]{43}\.(png|jpeg|webp)")


class ImageStore:
    """A folder of encoded images, each readable by its unguessable id for ``ttl_s`` seconds.

    With no ``folder``, a private temporary folder is made and removed by ``close()``.
    Expired files answer NotFoundError and are deleted when next looked up or swept.
    """

    def __init__(self, folder: Path | None, ttl_s: float):
        self._owned = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="imagegen-images-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ttl_s = ttl_s
        self._last_sweep = time.time()
        self._sweep_lock = threading.Lock()

    def save(self, data: bytes, output_format: str) -> str:
        """Store ``data`` and return its id (the file name, extension included)."""
        file_id = f"{secrets.token_urlsafe(32)}.{output_format}"
        # Written under a temporary name and renamed, so a reader never sees half a file.
        scratch = self.folder / f".{file_id}.part"
        scratch.write_bytes(data)
        os.replace(scratch, self.folder / file_id)
        self._sweep_if_due()
        return file_id

    def read(self, file_id: str) -> tuple[bytes, str]:
        """(content, media type) of a stored image; NotFoundError when unknown or expired."""
        if not _FILE_ID.fullmatch(file_id):
            raise NotFoundError(f"No image file '{file_id}'.", param="file_id")
        path = self.folder / file_id
        try:
            if self._expired(path.stat().st_mtime):
                path.unlink(missing_ok=True)
                raise FileNotFoundError(path)
            data = path.read_bytes()
        except FileNotFoundError as error:
            raise NotFoundError(f"No image file '{file_id}'; it may have expired.", param="file_id") from error
        return data, OUTPUT_FORMATS[file_id.rsplit(".", 1)[1]]

    def _expired(self, stored_at: float) -> bool:
        return time.time() - stored_at > self.ttl_s

    def _sweep_if_due(self) -> None:
        """Delete expired files, at most about ten times per TTL."""
        now = time.time()
        if now - self._last_sweep < min(self.ttl_s / 10, 60) or not self._sweep_lock.acquire(blocking=False):
            return
        try:
            self._last_sweep = now
            for path in self.folder.iterdir():
                if _FILE_ID.fullmatch(path.name):
                    try:
                        if self._expired(path.stat().st_mtime):
                            path.unlink(missing_ok=True)
                    except FileNotFoundError:
                        pass
        finally:
            self._sweep_lock.release()

    def close(self) -> None:
        """Remove the folder if this store made it. Idempotent."""
        if self._owned:
            shutil.rmtree(self.folder, ignore_errors=True)
