"""SIGINT / SIGTERM during training: finish the current step, save the state, stop.

The handler only records the signal; the training loop looks at it between steps, writes the state file and
raises ``TrainingInterrupted``. The first signal also puts the previous handlers back, so a second Ctrl-C (or
SIGTERM) acts as it would without us: a run stuck in a step can still be stopped at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Context manager: ``signum`` is the first SIGINT / SIGTERM received inside it (None before any).

    Handlers can only be installed from the main thread; elsewhere this does nothing (``signum`` stays None).
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS) -> None:
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.signum = signum
        self._restore()
        log.warning("%s received: saving the training state after this step", signal.Signals(signum).name)

    def __exit__(self, *exc: object) -> None:
        self._restore()
