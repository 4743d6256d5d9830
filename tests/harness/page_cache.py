"""How much of a file the OS page cache holds, and evicting it: for tests and cold-start benchmarks.

``resident_fraction`` asks the kernel with mincore(2) over a shared read-only mapping;
``evict`` drops a file's clean pages with posix_fadvise(POSIX_FADV_DONTNEED), as vmtouch -e
does, for one file or a whole folder. Unlike ``echo 3 > /proc/sys/vm/drop_caches`` it needs
no root and touches only the files named.

    python -m tests.harness.page_cache status /tmp/gams-9b-shaped      # percent cached, per file
    python -m tests.harness.page_cache evict /tmp/gams-9b-shaped /tmp/site
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
from pathlib import Path
from typing import Iterator, Tuple

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_pages(path: Path) -> Tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all)."""
    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    if size == 0:
        return 0, 0
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            vector = (ctypes.c_ubyte * pages)()
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            return sum(byte & 1 for byte in vector), pages
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)


def resident_fraction(path: Path) -> float:
    resident, pages = resident_pages(path)
    return resident / pages if pages else 1.0


def evict(path: Path) -> None:
    """Drop the cached pages of one file (written data is flushed first, so it can be dropped)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def files_under(root: Path) -> Iterator[Path]:
    if root.is_file():
        yield root
        return
    for folder, _dirs, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and not path.is_symlink():
                yield path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=("status", "evict"))
    parser.add_argument("paths", nargs="+", type=Path)
    args = parser.parse_args()
    for root in args.paths:
        resident = total = 0
        for path in files_under(root):
            try:
                if args.action == "evict":
                    evict(path)
                cached, pages = resident_pages(path)
            except OSError:  # unreadable, or a special file
                continue
            resident, total = resident + cached, total + pages
            if args.action == "status" and path.stat().st_size > 2**30:
                print(f"  {path}: {100 * cached / max(pages, 1):.0f}% cached")
        print(f"{root}: {resident * mmap.PAGESIZE / 1e9:.2f} of {total * mmap.PAGESIZE / 1e9:.2f} GB in the page cache"
              + (" after eviction" if args.action == "evict" else ""))


if __name__ == "__main__":
    main()
