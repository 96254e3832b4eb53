"""Files on disk: paths built only from validated ids, durable writes, atomic completion.

Every path is ``data_dir / area / <id> / <id>``, each part checked to be a 26-character id
(ASCII letters and digits) and the result checked to stay inside ``data_dir``: nothing a
peer sends ever names a file. Files are created 0600 with ``O_NOFOLLOW`` in 0700 folders.

Blocking calls (write, fsync, rename) run in worker threads so the event loop keeps serving
pings while a disk is slow. :meth:`FileStore.complete` is the atomic finish: fsync the file,
rename it into place, fsync the folder.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from daemon.errors import BadRequest, PayloadTooLarge, RequestTimeout
from daemon.ids import is_valid_id

INCOMING = "incoming"
FILES = "files"
OUTGOING = "outgoing"
IMAGES = "images"

SAVE_BLOCK = 4 * 1024 * 1024


class FileStore:
    """The data directory's files, and the blocking operations on them."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.resolve()

    def path(self, area: str, *ids: str, suffix: str = "") -> Path:
        """``root/area/id[/id…]`` from validated ids only."""
        if not ids or not all(is_valid_id(part) for part in ids):
            raise ValueError("file paths are built from 26-character ids only")
        path = self.root.joinpath(area, *ids)
        path = path.with_name(path.name + suffix)
        if os.path.commonpath([self.root, path]) != str(self.root):
            raise ValueError("path outside the data directory")
        return path

    @staticmethod
    def _open_for_write(path: Path) -> int:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    async def open_for_write(self, path: Path) -> int:
        """Open (creating) a file for positional writes; returns the descriptor."""
        return await asyncio.to_thread(self._open_for_write, path)

    @staticmethod
    def _pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    async def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write all of ``data`` at ``offset``."""
        await asyncio.to_thread(self._pwrite_all, fd, data, offset)

    @staticmethod
    def _pwritev_all(fd: int, chunks: list[bytes], offset: int) -> None:
        if len(chunks) > 512:  # below IOV_MAX; only a body of tiny chunks gets joined
            chunks = [b"".join(chunks)]
        views = [memoryview(c) for c in chunks if c]
        while views:
            written = os.pwritev(fd, views, offset)
            offset += written
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    async def pwritev(self, fd: int, chunks: list[bytes], offset: int) -> None:
        """Write ``chunks`` one after another at ``offset``, in one system call when it can."""
        await asyncio.to_thread(self._pwritev_all, fd, chunks, offset)

    async def fsync(self, fd: int) -> None:
        """Flush a file's data and metadata to the disk."""
        await asyncio.to_thread(os.fsync, fd)

    @staticmethod
    def _cut_back(fd: int, length: int) -> int:
        size = os.fstat(fd).st_size
        if size > length:
            os.ftruncate(fd, length)
            os.fsync(fd)
            return length
        return size

    async def cut_back(self, fd: int, length: int) -> int:
        """Cut a file back to ``length`` bytes if it is longer (never extends it).

        Returns the file's size afterwards, which is less than ``length`` only when bytes
        that were once on disk are missing.
        """
        return await asyncio.to_thread(self._cut_back, fd, length)

    async def close(self, fd: int) -> None:
        """Close a descriptor."""
        await asyncio.to_thread(os.close, fd)

    @staticmethod
    def _complete(source: Path, target: Path) -> None:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.replace(source, target)
        _fsync_dir(target.parent)
        if source.parent != target.parent:
            _fsync_dir(source.parent)

    async def complete(self, source: Path, target: Path) -> None:
        """Atomically move a finished file into place (fsync, rename, fsync the folder)."""
        await asyncio.to_thread(self._complete, source, target)

    async def save(
        self, path: Path, chunks: AsyncIterator[bytes], *, limit: int, progress_timeout: float
    ) -> int:
        """Stream a whole request body to ``path`` (atomically, durably); return its size.

        413 past ``limit`` bytes, 408 after ``progress_timeout`` seconds without data, 400
        when empty; nothing is left behind then.
        """
        part = path.with_name(path.name + ".part")
        fd = await self.open_for_write(part)
        try:
            size = await self._copy(fd, chunks, limit, progress_timeout)
        except BaseException:
            await self.close(fd)
            await self.remove(part)
            raise
        await self.close(fd)
        await self.complete(part, path)
        return size

    async def _copy(
        self, fd: int, chunks: AsyncIterator[bytes], limit: int, progress_timeout: float
    ) -> int:
        size, block = 0, bytearray()
        iterator = aiter(chunks)
        while True:
            try:
                async with asyncio.timeout(progress_timeout):
                    chunk = await anext(iterator)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise RequestTimeout(detail=f"no data for {progress_timeout:g}s") from None
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(detail=f"files are limited to {limit} bytes")
            block += chunk
            if len(block) >= SAVE_BLOCK:  # large writes, each in a thread
                await self.pwrite(fd, bytes(block), size - len(block))
                block.clear()
        if block:
            await self.pwrite(fd, bytes(block), size - len(block))
        if size == 0:
            raise BadRequest("The file is empty.")
        return size

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # A temporary file of its own (O_EXCL, mode 0600): two writers of the same path never
        # share one, and the last rename wins with a whole file.
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            try:
                FileStore._pwrite_all(fd, data, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)

    async def write_atomic(self, path: Path, data: bytes) -> None:
        """Replace ``path`` with ``data`` all at once (temporary file, fsync, rename)."""
        await asyncio.to_thread(self._write_atomic, path, data)

    @staticmethod
    def _size(path: Path) -> int | None:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None

    async def size(self, path: Path) -> int | None:
        """A file's size, or None when it does not exist."""
        return await asyncio.to_thread(self._size, path)

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    async def remove(self, path: Path) -> None:
        """Delete a file if it exists."""
        await asyncio.to_thread(self._remove, path)

    def free_bytes(self) -> int:
        """Free space on the data directory's file system, for unprivileged users."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return shutil.disk_usage(self.root).free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
