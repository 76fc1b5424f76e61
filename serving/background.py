"""The base of the server's three background threads: the model poller, the drift monitor and the prediction log."""

from __future__ import annotations

import threading


class BackgroundThread:
    """A daemon thread running `_run` until `stop()` sets `_stop`; subclasses name it and write `_run`."""

    name = "background"
    join_timeout_s = 5.0

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self.join_timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
