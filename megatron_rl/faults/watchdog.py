"""Hang watchdog: each phase of a step gets a deadline from its own recent durations, and a thread acts when
one passes, so that a stuck collective or worker never holds the run forever.

deadline(phase) = max(floor_s, factor x the longest of its last runs); factor x floor_s while it has none
(the first run of a phase pays for warm-up). The process groups' collective timeout is factor x floor_s
(`collective_timeout_s`), at least as long as any first deadline: the watchdog, which has a report to write,
acts first; the collective timeout is the backstop when the watchdog is off.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

RECENT = 10  # runs of a phase its deadline looks back on


def collective_timeout_s(watchdog: Any) -> float:
    """The torch.distributed (gloo/NCCL) timeout for a run's process groups, from `run.watchdog`."""
    return float(watchdog.factor * watchdog.floor_s)


EXIT_GRACE_S = 30.0
# How the watchdog interrupts a stuck controller: a signal of its own, with its own handler, so that the
# interrupt arrives however SIGINT is set (a command that a non-interactive shell starts in the background,
# `nohup ... &` or a batch script's `cmd &`, ignores SIGINT). A real-time signal: no library here uses one
# (SIGALRM is pytest-timeout's, SIGUSR1 preemption's, SIGUSR2 the workers' stack dumps).
INTERRUPT_SIGNAL = signal.SIGRTMIN + 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"hang watchdog: signal {signum}")


class Watchdog:
    """`with watchdog.phase("train", step):` arms a deadline for that phase; when it passes, `on_hang(phase,
    step, elapsed, deadline)` runs in the watchdog's thread (collect stacks, stop the stuck workers so the
    main thread's wait ends in an error). If the main thread is still stuck `floor_s` later it is
    interrupted, and the process exits max(`floor_s`, EXIT_GRACE_S) after that: never a hang."""

    def __init__(self, settings: Any, on_hang: Callable[[str, int, float, float], None]) -> None:
        self.enabled, self.factor, self.floor_s = bool(settings.enabled), settings.factor, settings.floor_s
        self.on_hang = on_hang
        self.history: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=RECENT))
        self.fired: str | None = None  # what the last hang was, for the restart's cause
        self._armed: tuple[str, int, float, float] | None = None  # phase, step, start, deadline
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._interrupt_signal = signal.SIGINT  # until a handler of its own is installed
        self._previous_handler: Any = None

    def deadline(self, phase: str) -> float:
        recent = self.history[phase]
        if not recent:
            return self.factor * self.floor_s
        return max(self.floor_s, self.factor * max(recent))

    @contextmanager
    def phase(self, name: str, step: int) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._ensure_thread()
        start = time.monotonic()
        with self._cond:
            self._armed = (name, step, start, self.deadline(name))
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._armed = None
                self._cond.notify()
        if self.fired is None:
            self.history[name].append(time.monotonic() - start)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            if threading.current_thread() is threading.main_thread():  # where handlers can be set
                self._previous_handler = signal.signal(INTERRUPT_SIGNAL, _interrupt)
                self._interrupt_signal = INTERRUPT_SIGNAL
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        with self._cond:
            while not self._stop:
                if self._armed is None:
                    self._cond.wait()
                    continue
                armed = self._armed
                name, step, start, deadline = armed
                left = start + deadline - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._cond.release()
                try:
                    self._fire(name, step, time.monotonic() - start, deadline, armed)
                finally:
                    self._cond.acquire()

    def _fire(self, name: str, step: int, elapsed: float, deadline: float, armed: Any) -> None:
        self.fired = f"{name} of step {step} passed its {deadline:.0f} s deadline"
        try:
            self.on_hang(name, step, elapsed, deadline)
        except Exception as exc:  # noqa: BLE001 - the escalation below must still happen
            print(
                f"hang watchdog: the report failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True
            )
        for action in ("interrupt", "exit"):
            # Exiting kills the process: the interrupted main thread gets at least EXIT_GRACE_S to unwind
            # (a loaded machine can take seconds), whatever a short floor says.
            grace = self.floor_s if action == "interrupt" else max(self.floor_s, EXIT_GRACE_S)
            with self._cond:
                self._cond.wait_for(lambda: self._armed is not armed or self._stop, timeout=grace)
                if self._armed is not armed or self._stop:
                    return
            if action == "interrupt":
                print(
                    f"hang watchdog: {name} still stuck; interrupting the controller",
                    file=sys.stderr,
                    flush=True,
                )
                # A real signal to the main thread: it also ends a blocking call (sleep, a socket wait).
                signal.pthread_kill(threading.main_thread().ident, self._interrupt_signal)
        print(f"hang watchdog: {name} still stuck; exiting", file=sys.stderr, flush=True)
        os._exit(1)

    def take_fired(self) -> str | None:
        fired, self.fired = self.fired, None
        return fired

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(INTERRUPT_SIGNAL, self._previous_handler)
            self._previous_handler = None
