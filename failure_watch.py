"""One failing rank ends all: every rank of a distributed run watches the group's key-value
store and exits seconds after another rank failed, instead of waiting in a collective.

Collectives wait up to init_process_group's timeout (30 min) for a rank that never comes: NCCL
does not notice that a peer process died (gloo does, from the closed socket), and only some
launchers stop the others (torchrun's agent does; srun without --kill-on-bad-exit does not).
utils.init_distributed_mode starts the watch, utils.cleanup_distributed stops it."""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Optional

import torch.distributed as dist

from errors import UserError, user_error_message

FAILURE_KEY = "sparo_dino/failure"         # the first failing rank's one-line description
FAILURE_COUNT_KEY = "sparo_dino/failures"  # how many ranks failed (the first one writes)
FAILURE_SEEN_KEY = "sparo_dino/seen"       # how many ranks saw it (before they exit)
FAILURE_POLL_SECONDS = 2.0
FAILED_EXIT_SECONDS = 10  # a failing rank's own exit takes well under a second

_failure_watch: Optional["FailureWatch"] = None


class FailureWatch:
    """Ends this process seconds after another rank of the group failed.

    A rank on its way out with an exception writes one line about it to the group's key-value
    store (announce(), from cleanup_distributed); every rank polls the store from a daemon
    thread every FAILURE_POLL_SECONDS and, on finding it, prints that line on stderr and exits
    with status 1, wherever its main thread waits (a collective, a barrier, a data loader). The
    store is the rendezvous one (torchrun's agent or rank 0's process), reached over TCP without
    any collective; polling it costs one small request per rank and poll.
    """

    def __init__(self, store: Any, rank: int, world_size: int,
                 poll_seconds: float = FAILURE_POLL_SECONDS) -> None:
        self.store, self.rank, self.world_size, self.poll_seconds = store, rank, world_size, poll_seconds
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="sparo-failure-watch", daemon=True)
        self.thread.start()

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_seconds):
            try:
                if not self.store.check([FAILURE_KEY]):
                    continue
                message = self.store.get(FAILURE_KEY).decode(errors="replace")
                self.store.add(FAILURE_SEEN_KEY, 1)
            except Exception:  # the store has gone (its host process ended): nothing left to watch
                return
            if not self.stopped.is_set():  # this rank is not failing itself
                _end_process(f"{message}; rank {self.rank} stops too")

    def announce(self, description: str) -> None:
        """Tell every rank that this one fails. The store's host (rank 0's process, unless
        torchrun's agent holds it) then waits, three polls at most, until the others have seen
        it: the store ends with its process."""
        self.stopped.set()
        try:
            if self.store.add(FAILURE_COUNT_KEY, 1) == 1:  # the first failure is the cause
                self.store.set(FAILURE_KEY, f"rank {self.rank} failed: {description}")
            hosts_store = self.rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
            deadline = time.monotonic() + 3 * self.poll_seconds
            while (hosts_store and self.store.add(FAILURE_SEEN_KEY, 0) < self.world_size - 1
                   and time.monotonic() < deadline):
                time.sleep(0.1)
        except Exception:  # no store left to tell: the others see the closed connections
            pass

    def stop(self) -> None:
        self.stopped.set()


def watch_for_failures(rank: int, world_size: int) -> None:
    """Start this process's FailureWatch on the default group's store (once per group)."""
    global _failure_watch
    if _failure_watch is None and dist.is_initialized():
        _failure_watch = FailureWatch(dist.distributed_c10d._get_default_store(), rank, world_size)


def _is_failure(error: Optional[BaseException]) -> bool:
    if isinstance(error, SystemExit):
        return error.code not in (0, None)
    return error is not None


def _describe_failure(error: BaseException) -> str:
    """One line: a UserError's message, else the exception's type and first line."""
    if isinstance(error, SystemExit) and error.__context__ is not None:  # sys.exit() in an except
        error = error.__context__
    if isinstance(error, UserError):
        return user_error_message(error)
    if isinstance(error, SystemExit):
        return f"exit status {error.code}"
    first_line = next((line for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {first_line[:300]}" if first_line else type(error).__name__


def _exit_after(seconds: float, message: str) -> None:
    """End the process `seconds` from now unless it has ended by then (a daemon timer)."""
    timer = threading.Timer(seconds, _end_process, (message,))
    timer.daemon = True
    timer.start()


def _end_process(message: str) -> None:
    """`error: message` on stderr, then exit status 1 at once, wherever the main thread waits."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(1)


def stop_watching(error: Optional[BaseException]) -> None:
    """Stop this process's FailureWatch as it leaves the group. When `error` (the exception on
    its way out: an error, a CUDA out-of-memory error, Ctrl-C, a non-zero sys.exit) is a failure,
    the other ranks are told first, and the process is ended FAILED_EXIT_SECONDS later if
    leaving the group or exiting hangs (NCCL's teardown can, while a peer is stuck)."""
    global _failure_watch
    watch, _failure_watch = _failure_watch, None
    if watch is None:
        return
    if _is_failure(error):
        watch.announce(_describe_failure(error))
        _exit_after(FAILED_EXIT_SECONDS, f"rank {watch.rank} did not exit within {FAILED_EXIT_SECONDS} s "
                                         f"of its failure; ending it")
    watch.stop()
