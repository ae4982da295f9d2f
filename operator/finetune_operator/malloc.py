"""glibc's allocator, set for a process of many threads that allocate briefly and often."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("finetune_operator")
M_ARENA_MAX = -8  # mallopt's parameter number, from glibc's malloc.h
ARENAS = 2


def limit_arenas(arenas: int = ARENAS) -> bool:
    """At most `arenas` malloc arenas, as MALLOC_ARENA_MAX would set them; call it before the threads start.

    glibc gives each thread that allocates concurrently an arena of its own, up to 8 per core, and freed memory
    stays in the arena that held it. The handler pool's 16 threads decode and build large JSON bodies, so each
    arena keeps a high-water mark of its own. Elsewhere than glibc (musl) this does nothing and says so."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        log.info("not glibc: malloc arenas left as they are")
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))
