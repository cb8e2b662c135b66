"""Preemption and Ctrl-C: a signal only sets a flag; the loop acts on it at a step boundary.

SLURM sends SIGUSR1 (``--signal=B:USR1@N``, forwarded to the trainers) or SIGTERM before it
kills a job; a user presses Ctrl-C (SIGINT; ``accelerate launch`` forwards it to every rank).
Doing real work inside a signal handler is unsafe (it can interrupt a collective or a file
write), so the handler records the signal and returns: the loop finishes the step, saves and
stops. A second Ctrl-C is the user insisting: it aborts at once (KeyboardInterrupt).
"""

import signal


class PreemptionFlag:
    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def install(self) -> "PreemptionFlag":
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number, frame) -> None:
        if number == signal.SIGINT and self.interrupted:
            raise KeyboardInterrupt
        self.received = number

    @property
    def interrupted(self) -> bool:
        """Stopped by Ctrl-C (SIGINT), not by the scheduler."""
        return self.received == signal.SIGINT

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""
