"""glibc's allocator, set for a process of many threads that allocate briefly and often."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time

log = logging.getLogger("finetune_operator")
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2
TRIM_SECONDS = 30.0


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "gnu_get_libc_version") else None


def trim_periodically(seconds: float = TRIM_SECONDS) -> threading.Thread | None:
    """Hand the heap's free pages back to the system every `seconds`: glibc keeps what a burst freed (the decoded
    watch events and API answers of a thousand jobs) as free chunks inside its arenas, and returns only the top
    of each heap by itself. malloc_trim(0) releases the free pages anywhere in them. Not on other libcs."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None

    def trim() -> None:
        while True:
            time.sleep(seconds)
            libc.malloc_trim(0)

    thread = threading.Thread(target=trim, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas, as MALLOC_ARENA_MAX would set them; call it before the threads start.

    glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core, and freed memory
    stays in the arena that held it. The handler pool's 16 threads decode and build large JSON bodies, so each
    arena keeps a high-water mark of its own. Elsewhere than glibc (musl) this does nothing and says so."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        log.info("not glibc: malloc arenas left as they are")
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
