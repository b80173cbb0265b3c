"""Process set-up shared by every stage: logging, seeds, threads, quiet libraries."""

from __future__ import annotations

import logging
import os
import random
import sys

import numpy as np
import torch

log = logging.getLogger("sentimerge")


class CurrentStderrHandler(logging.StreamHandler):
    """A stream handler that writes to `sys.stderr` as it is when a record is emitted, not as it was at set-up.

    A handler bound once (`logging.basicConfig`'s) keeps writing to a stream that may since have been replaced and
    closed (a test's captured stderr, a notebook's redirected one), and every later record then prints a "--- Logging
    error ---" traceback (`ValueError: I/O operation on closed file`) instead of the message.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # read by logging.StreamHandler.emit and flush
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ and setStream assign it: sys.stderr wins
        pass


def setup_logging(verbose: bool = False) -> None:
    """Log sentimerge's messages as `[sentimerge] message` to the current stderr; quiet the libraries' own logs.

    Only the `sentimerge` loggers speak at INFO (DEBUG with `verbose`); every other logger reaches the console from
    WARNING up, so a library's progress chatter (matplotlib's "generated new fontManager" on a fresh machine) stays
    out of a run's output while its warnings do not."""
    logging.basicConfig(level=logging.WARNING, format="[sentimerge] %(message)s",
                        handlers=[CurrentStderrHandler()], force=True)
    logging.getLogger("sentimerge").setLevel(logging.DEBUG if verbose else logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.utils.logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def release_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the system (glibc's `malloc_trim`).

    A training or scoring loop allocates tensors of a new shape at almost every batch; glibc keeps the freed blocks
    in its arenas, so a process's resident memory climbs to several times what it holds. Called between steps and
    stages, `malloc_trim(0)` returns them (a few milliseconds). A no-op where the C library is not glibc."""
    import gc

    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_TRIM: list = []


def _malloc_trim():
    if not _TRIM:
        import ctypes
        import ctypes.util

        try:
            _TRIM.append(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim)
        except (OSError, AttributeError):  # not glibc (musl, macOS, Windows)
            _TRIM.append(None)
    return _TRIM[0]


KERNEL_CACHE_CAPACITY = "64"


def limit_kernel_cache() -> None:
    """Cap oneDNN's primitive cache at 64 kernels (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, unless already set).

    On CPU every new batch shape (padded width) builds new bf16 matmul kernels, and oneDNN keeps up to 1024 of them
    with their scratch memory: 280 MB more resident memory after 64 LoRA training steps on SmolLM2-135M than with 64,
    at the same speed (benchmarks/results/demo_profile.md). oneDNN reads the variable when it creates its first
    kernel, so this runs before any model math (the CLI calls it first, `api.session` too)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)
