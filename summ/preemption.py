"""Stopping on SIGTERM or SIGINT at a step boundary, with a checkpoint.

A scheduler preempting a job sends SIGTERM (Slurm, Kubernetes, spot instances), a user presses
Ctrl-C (SIGINT). Either one, the first time, asks the training loop to finish the optimizer step it
is in, write a checkpoint and stop; a second one ends the process at once. Handlers are installed
only in the main thread: a Ray trial runs in a worker thread and is stopped by Tune's own path.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """While entered, SIGTERM and SIGINT set `received` instead of ending the process."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum
        print(f"{signal.Signals(signum).name}: finishing this optimizer step, then saving a checkpoint and "
              f"stopping (send it again to stop at once, without one)", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> int | None:
        """The signal this or any other process received, the same on every rank (one small
        collective per step when there are several processes)."""
        if accelerator.num_processes == 1:
            return self.received
        flag = torch.tensor(self.received or 0, device=accelerator.device)
        return int(accelerator.reduce(flag, "max").item()) or None
