"""Busy is not dead: every wait of the distributed runtime ends on a dead or frozen peer, not on a busy one.

Each process runs one heartbeat: a daemon thread that bumps the key ``astra/heartbeat/<global rank>``
in the process group's store (the TCPStore every launcher creates) every ``interval`` seconds and reads
the other ranks' keys, remembering when each one last changed. A rank that is alive and working
(calibrating, decoding for minutes, sleeping in a hook) keeps beating: the thread runs whenever the
interpreter does. A rank that died, froze (SIGSTOP, a hung host, a partitioned network) or whose
interpreter is blocked stops beating.

`wait` waits for an asynchronous collective in slices and raises `PeerFailureError` only when a peer
of the exchange has been silent for ``timeout`` seconds (or the collective itself failed: a peer's
connection closed, the process group's own operation timeout). How long a busy peer may take is then
bounded by the process group's operation timeout (``init_process_group(timeout=...)``), not by ``timeout``.

What the heartbeat cannot see: a rank whose interpreter runs but that never joins the exchange (its
program took another path, a Python-level deadlock in its main thread). Such a wait ends at the
process group's operation timeout, with the same named error.

Backends: gloo waits are sliced as above. NCCL waits do not block the CPU (the stream waits), and
NCCL's own watchdog ends a stuck collective at the process group's timeout.
"""

from __future__ import annotations

import atexit
import threading
import time
from datetime import timedelta

import torch.distributed as dist

HEARTBEAT_PREFIX = "astra/heartbeat/"
# Beat every timeout / BEATS_PER_TIMEOUT seconds (at most MAX_INTERVAL_S): a few missed beats are not silence.
BEATS_PER_TIMEOUT = 8
MAX_INTERVAL_S = 0.5

_lock = threading.Lock()
_heartbeat: "Heartbeat | None" = None


class PeerFailureError(RuntimeError):
    """A peer died, froze or gave up during an exchange (a RuntimeError, as torch.distributed's own are)."""


class Heartbeat:
    """This process's heartbeat in ``store`` and what it has seen of the other ranks' (module docstring)."""

    def __init__(self, store, rank: int, world_size: int, interval: float):
        self.store, self.rank, self.world_size, self.interval = store, rank, world_size, float(interval)
        self.error: Exception | None = None  # the latest store failure (its host died or is frozen)
        self._values: dict[int, bytes] = {}
        self._last_change: dict[int, float] = {}
        self._stop = threading.Event()
        self._seen = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="astra-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        beat = 0
        while not self._stop.is_set():
            beat += 1
            try:
                self.store.set(f"{HEARTBEAT_PREFIX}{self.rank}", str(beat))
                for peer in range(self.world_size):
                    key = f"{HEARTBEAT_PREFIX}{peer}"
                    if peer == self.rank or not self.store.check([key]):
                        continue
                    value = self.store.get(key)
                    with self._seen:
                        if self._values.get(peer) != value:
                            self._values[peer], self._last_change[peer] = value, time.monotonic()
                self.error = None
            except Exception as error:  # noqa: BLE001 - the store's host died or is unreachable: peers fall silent
                self.error = error
            self._stop.wait(self.interval)

    def silence(self, peers: list[int], since: float) -> dict[int, float]:
        """Seconds since each of ``peers`` (global ranks) was last seen beating, counted from ``since`` at most."""
        now = time.monotonic()
        with self._seen:
            return {peer: now - max(self._last_change.get(peer, since), since) for peer in peers}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2 * self.interval + 1.0)


def start_heartbeat(timeout: float) -> Heartbeat | None:
    """This process's heartbeat (started on first use), beating often enough for ``timeout``.

    Call it as soon as the process group exists, before long local work (loading, calibrating), so
    that peers already waiting see this rank as alive: `rendezvous.init_process_group` does, and
    `DistributedRuntime` does at construction. None when the group has no store to beat in.
    """
    global _heartbeat
    interval = min(MAX_INTERVAL_S, timeout / BEATS_PER_TIMEOUT)
    with _lock:
        if _heartbeat is None:
            store = _default_store()
            if store is None:
                return None
            _heartbeat = Heartbeat(store, dist.get_rank(), dist.get_world_size(), interval)
            atexit.register(stop_heartbeat)
        _heartbeat.interval = min(_heartbeat.interval, interval)
        return _heartbeat


def stop_heartbeat() -> None:
    """Stop this process's heartbeat (at exit, or before destroying the process group)."""
    global _heartbeat
    with _lock:
        heartbeat, _heartbeat = _heartbeat, None
    if heartbeat is not None:
        heartbeat.stop()


def current_heartbeat() -> Heartbeat | None:
    return _heartbeat


def wait(works, what: str, timeout: float, peers: list[int], where: str, sliced: bool = True, since: float | None = None) -> None:
    """Wait for ``works`` (one or a list); `PeerFailureError` naming ``what`` when one fails or a peer is silent for ``timeout``.

    ``peers``: global ranks this exchange depends on. ``where``: who waits ("ASTRA rank 1/2").
    ``sliced=False`` (NCCL): one wait bounded by ``timeout`` per work, as the backend implements it.
    ``since`` (a `time.monotonic` time, default now): count a peer's silence from then at the earliest,
    e.g. from the start of a forward when draining it after an error, so that a peer already silent
    for ``timeout`` is not waited for a second ``timeout``.
    """
    works = list(works) if isinstance(works, (list, tuple)) else [works]
    started = time.monotonic()
    since = started if since is None else min(since, started)
    heartbeat = current_heartbeat() if sliced else None
    if heartbeat is None:
        try:
            for work in works:
                work.wait(timedelta(seconds=timeout))
        except RuntimeError as error:  # DistBackendError is a RuntimeError
            raise failure(where, what, started, timeout, f"a rank died, stalled or gave up. Cause: {error}") from error
        return
    if not works:
        return
    if all(_completed(work) for work in works):  # the usual case with overlap: no helper thread, no slices
        try:
            for work in works:
                work.wait()
        except RuntimeError as error:
            raise failure(where, what, started, timeout, f"a rank died or gave up. Cause: {error}") from error
        return
    done, outcome = _completion(works)
    while not done.wait(max(heartbeat.interval, 0.01)):
        silent = {peer: s for peer, s in heartbeat.silence(peers, since).items() if s > timeout}
        if silent:
            store = f"; the heartbeat store is unreachable too ({heartbeat.error})" if heartbeat.error else ""
            raise failure(
                where, what, started, timeout,
                f"no heartbeat from rank(s) {sorted(silent)} for {max(silent.values()):.1f}s: a rank died or froze{store}",
            )
    if outcome:
        error = outcome[0]
        raise failure(where, what, started, timeout, f"a rank died or gave up. Cause: {error}") from error


def _completed(work) -> bool:
    """True when ``work`` has ended (then its ``wait`` returns at once, or raises its error)."""
    try:
        return bool(work.is_completed())
    except (AttributeError, RuntimeError):
        return False


def _completion(works: list) -> tuple[threading.Event, list[Exception]]:
    """An event set when every one of ``works`` has ended, and the first exception among them (if any).

    A single collective has a future to hang a callback on; gloo's point-to-point works do not (and a
    gloo wait with a timeout closes the connection when it expires), so one helper thread waits for
    those, in order (about 0.1-0.2 ms per call on this project's CPU container).
    """
    done, outcome = threading.Event(), []
    future = None
    if len(works) == 1:
        try:
            future = works[0].get_future()
        except RuntimeError:
            future = None
    if future is not None:
        def finished(fut):
            try:
                fut.value()
            except Exception as error:  # noqa: BLE001 - handed to the waiting thread
                outcome.append(error)
            done.set()

        future.add_done_callback(finished)
        return done, outcome

    def waiter():
        try:
            for work in works:
                work.wait()
        except Exception as error:  # noqa: BLE001 - handed to the waiting thread
            outcome.append(error)
        done.set()

    threading.Thread(target=waiter, name="astra-wait", daemon=True).start()
    return done, outcome


def failure(where: str, what: str, started: float, timeout: float, cause: str) -> PeerFailureError:
    """The error every failed wait raises: who waited, for what, how long, and why."""
    return PeerFailureError(f"{where}: {what} failed after {time.monotonic() - started:.1f}s (timeout {timeout:g}s): {cause}")


def _default_store():
    """The default process group's store (every launcher makes one; torch has no public accessor)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except (RuntimeError, ValueError):
        return None
