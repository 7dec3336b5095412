"""How a rank ends when another one fails, whatever started the ranks (sslforge, torchrun, srun).

Collectives cannot tell a slow peer from a dead one: NCCL waits for the collective timeout
(`engine.collective_timeout_min`, an hour by default) and gloo notices only peers whose sockets
close. So each rank talks to the rendezvous store (MASTER_ADDR:MASTER_PORT, through a client of
its own, never the collectives' one) from two daemon threads:

- the heartbeat beats (a counter) every `interval_s` and watches the next rank's beat (a ring:
  the store serves O(world size) requests per beat, not O(world size^2)); a rank that raises
  publishes "rank R failed: ERROR" before it exits, and a watcher whose peer has not beaten for
  `timeout_s` (killed, node down, frozen) publishes "rank R stopped responding";
- the judge ends the process at once (`os._exit`: the main thread may be blocked in a collective
  that would never return) when that record exists, when the store has not answered for
  `timeout_s` (its host, rank 0 or torchrun's agent, died or froze: a request to a frozen host
  never returns, which is why the heartbeat never judges), or when the local launcher that
  started this rank is gone.

A rank that raised *failed*: the job fails. A rank that went silent, or a store that stopped
answering, is *lost* (its node died, or it froze): the job is not at fault, and the launcher may
pass `on_peer_lost` to start it again from its latest checkpoint (on SLURM: a requeue).

Data-loader workers ignore SIGTERM and SIGINT (the trainer checkpoints on them), so nothing may
wait for them on the way out: `kill_data_workers` SIGKILLs them, at interpreter exit before
multiprocessing would send its ignored SIGTERM and join them forever, and on the judge's exit.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator

LAUNCHER_PID_VAR = "SSLFORGE_LAUNCHER_PID"  # set by launcher.local for the ranks it starts
EXIT_PEER_FAILED = 1
_ABORT = "abort"
_FAILED, _LOST = "failed", "lost"  # kinds of abort record: a rank raised / a rank or the store went silent
PeerLostHook = Callable[[str], None]


def _record(kind: str, text: str) -> str:
    return f"{kind}|{text}"


def _read(record: bytes) -> tuple[str, bool]:
    """(text, lost) of an abort record."""
    kind, _, text = record.decode().partition("|")
    return text, kind == _LOST


def kill_data_workers() -> None:
    """SIGKILL and reap this process's daemonic multiprocessing children (the data workers)."""
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)


def _stop_data_workers() -> None:
    """At exit: the data workers, then the fork server they came from, then the resource tracker
    the fork server started, each waited for (left alone, the server and the tracker notice this
    process is gone only after it has exited, and outlive it by a moment)."""
    kill_data_workers()
    from multiprocessing import forkserver, resource_tracker

    # No public API: each closes its lifeline and reaps the process (a no-op if never started).
    # The tracker last: its pipe reaches EOF only once the server and workers holding it are gone.
    forkserver._forkserver._stop()
    resource_tracker._resource_tracker._stop()


_exit_hook_installed = False


def kill_data_workers_at_exit() -> None:
    """Registered after multiprocessing's own exit hook (imported with torch), so it runs first."""
    global _exit_hook_installed
    if not _exit_hook_installed:
        atexit.register(_stop_data_workers)
        _exit_hook_installed = True


def _die(message: str, on_peer_lost: PeerLostHook | None = None) -> None:
    """One line naming the cause, then leave now, from any thread, without waiting for anything
    but `on_peer_lost` (when a peer was lost rather than failed)."""
    try:
        print(f"sslforge: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        kill_data_workers()
        if on_peer_lost is not None:
            on_peer_lost(message)
    finally:  # a closed stderr or a worker list changing under us must not keep this rank alive
        os._exit(EXIT_PEER_FAILED)


def _summary(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class Watchdog:
    """One rank's heartbeat and failure record on the rendezvous store (see the module docstring)."""

    def __init__(self, rank: int, world_size: int, timeout_s: float,
                 on_peer_lost: PeerLostHook | None = None) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.on_peer_lost = on_peer_lost
        self.interval_s = max(timeout_s / 10, 0.2)
        self.peer = (rank + 1) % world_size
        self.launcher_pid = int(os.environ.get(LAUNCHER_PID_VAR, "0")) or None
        self.store = self._connect() if world_size > 1 else None
        self._stopped = threading.Event()
        self._answered = time.monotonic()  # when the store last answered a whole beat
        self._verdict: tuple[str, bool] | None = None  # (why this rank must stop, lost), as the heartbeat found it
        self._peer_beat, self._peer_seen, self._peer_done = -1, time.monotonic(), False
        self._heartbeat = threading.Thread(target=self._beat_loop, name="sslforge-heartbeat", daemon=True)
        self._judge = threading.Thread(target=self._judge_loop, name="sslforge-watchdog", daemon=True)

    def _connect(self) -> Any:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=timedelta(seconds=self.timeout_s), wait_for_workers=False)
        # A restarted torchrun attempt shares the agent's store: never read the last attempt's records.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return dist.PrefixStore(f"sslforge/watchdog/{attempt}/", store)

    def start(self) -> None:
        if self.store is not None:
            self._heartbeat.start()
        if self.store is not None or self.launcher_pid is not None:
            self._judge.start()

    def stop(self) -> None:
        """This rank is done (finished or stopped with a checkpoint): its silence is not a failure."""
        self._halt()
        self._ask(lambda store: store.set(f"done/{self.rank}", "1"))

    def fail(self, exc: BaseException) -> None:
        """Called with the exception leaving this rank. When another rank failed first, this error
        is only its echo (a broken collective): say who failed and exit without a traceback."""
        self._halt()
        mine = _record(_FAILED, f"rank {self.rank} failed: {_summary(exc)}")
        first = self._ask(lambda store: store.compare_set(_ABORT, "", mine))
        if first is not None and first.decode() != mine:
            text, lost = _read(first)
            self._die(f"{text}; rank {self.rank} stops too", lost)

    def _halt(self) -> None:
        """Stop both threads and wait for them (briefly: a frozen store host never answers): a
        daemon thread leaving a store call while the interpreter exits aborts the process."""
        self._stopped.set()
        for thread in (self._heartbeat, self._judge):
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=2 * self.interval_s)

    def _ask(self, request: Callable[[Any], Any]) -> Any:
        """A store request from the main thread, given two beats to answer; None if it did not."""
        if self.store is None:
            return None
        answer: list[Any] = []

        def call() -> None:
            try:
                answer.append(request(self.store))
            except Exception:  # the store is gone: there is nobody left to tell
                pass

        caller = threading.Thread(target=call, name="sslforge-store-request", daemon=True)
        caller.start()
        caller.join(timeout=2 * self.interval_s)
        return answer[0] if answer else None

    # ---------------------------------------------------------------- threads
    def _beat_loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            try:
                verdict = self._beat()
            except Exception:  # the connection broke: stop asking, the judge times the silence
                return
            self._answered = time.monotonic()
            if verdict is not None:
                self._verdict = verdict
                return

    def _die(self, message: str, lost: bool) -> None:
        _die(message, self.on_peer_lost if lost else None)

    def _beat(self) -> tuple[str, bool] | None:
        """Our beat up; then the failure record, or the watched peer's silence, if any."""
        store = self.store
        store.add(f"beat/{self.rank}", 1)
        if store.check([_ABORT]):
            return _read(store.get(_ABORT))
        self._peer_done = self._peer_done or store.check([f"done/{self.peer}"])
        return None if self._peer_done else self._check_peer(store.add(f"beat/{self.peer}", 0))

    def _check_peer(self, beat: int) -> tuple[str, bool] | None:
        now = time.monotonic()
        if beat != self._peer_beat:
            self._peer_beat, self._peer_seen = beat, now
            return None
        if now - self._peer_seen <= self.timeout_s:
            return None
        reason = (f"rank {self.peer} stopped responding (no heartbeat for {self.timeout_s:g} s: "
                  "killed, its node down, or frozen)")
        return _read(self.store.compare_set(_ABORT, "", _record(_LOST, reason)))

    def _judge_loop(self) -> None:
        while not self._stopped.wait(self.interval_s):
            verdict = self._judgement()
            if verdict is not None and not self._stopped.is_set():
                self._die(f"{verdict[0]}; rank {self.rank} stops too", verdict[1])

    def _judgement(self) -> tuple[str, bool] | None:
        """(why this rank must stop, whether a peer was lost rather than failed), or None."""
        if self.launcher_pid is not None and os.getppid() != self.launcher_pid:
            return f"the sslforge launcher (pid {self.launcher_pid}) is gone", False
        if self._verdict is not None:
            return self._verdict
        if self.store is not None and time.monotonic() - self._answered > self.timeout_s:
            return (f"the rendezvous store {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} has not "
                    f"answered for {self.timeout_s:g} s (rank 0 or its node died, or froze)"), True
        return None


@contextmanager
def watch_peers(rank: int, world_size: int, timeout_s: float,
                on_peer_lost: PeerLostHook | None = None) -> Iterator[Watchdog]:
    """Run the body as one rank of the job: any rank's failure ends every rank within
    `timeout_s` plus two beats, and this rank never waits for its data workers on the way out."""
    kill_data_workers_at_exit()
    dog = Watchdog(rank, world_size, timeout_s, on_peer_lost)
    dog.start()
    try:
        yield dog
    except BaseException as exc:
        dog.fail(exc)
        raise
    dog.stop()
