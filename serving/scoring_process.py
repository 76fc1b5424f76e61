"""The candidate's own process: serving/shadow.py's thread hands it arrays, it answers predictions.

Why a process. A candidate in the server's own process takes CPU from the workers and, for its Python parts, the
GIL from the event loop: on a busy host both show in clients' latency. Here it runs at the lowest CPU priority
(SCORING_NICE) with its own interpreter, so the workers always come first: on a saturated host the candidate falls
behind and the shadow buffer drops records (counted), never a client's time.

The candidate was loaded, verified and checked by the worker (serving/model.py); the worker sends the loaded
predictor (the compiled model, else the pipeline) through the child's stdin, never a path or a URI. Messages are
pickles with an 8-byte length, both ways, over the child's own pipes: nothing else can write to them. The child's
stdout is the answer channel only; anything the model prints goes to stderr, the server's log.
"""

from __future__ import annotations

import os
import pickle  # nosec B403  # only between a worker and the child it started, over the child's own pipes
import select
import signal
import struct
import subprocess  # nosec B404  # this interpreter, fixed argv
import sys
import time
from typing import IO, TYPE_CHECKING, Any

# Light imports only: `python -m serving.scoring_process` lowers its priority before it imports numpy, scikit-learn
# and the compiled walk (seconds of CPU, which must not compete with the workers either).
if TYPE_CHECKING:  # serving.model imports MLflow, which the child never needs
    from features import FloatArray
    from serving.model import ServedModel

SCORING_NICE = 19  # the lowest priority: every core goes to the workers first
SCORE_TIMEOUT_S = 30.0  # a child that takes longer for one batch is stopped, and the batch counted as dropped
START_TIMEOUT_S = 60.0  # the child imports numpy, scikit-learn and the compiled walk before it answers
_LENGTH = struct.Struct("<Q")


class ScoringFailed(Exception):
    """The candidate raised on the batch, or its process died; the message says which."""


class ScoringTimedOut(ScoringFailed):
    """No answer within SCORE_TIMEOUT_S. Not evidence against the candidate: on a saturated host the child, at the
    lowest priority, may simply not have run (serving/shadow.py counts the batch as dropped, not failed)."""


def _write(channel: IO[bytes], message: tuple[Any, ...]) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    channel.write(_LENGTH.pack(len(data)) + data)
    channel.flush()


def _read_exactly(channel: IO[bytes], size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = channel.read(size - len(data))
        if not chunk:
            raise EOFError("the other end closed the pipe")
        data += chunk
    return bytes(data)


def _read(channel: IO[bytes]) -> tuple[Any, ...]:
    (size,) = _LENGTH.unpack(_read_exactly(channel, _LENGTH.size))
    message: tuple[Any, ...] = pickle.loads(_read_exactly(channel, size))  # nosec B301  # from our own worker
    return message


class ScoringProcess:
    """The worker's side: starts the child on first use, sends it the candidate when it changes, and scores."""

    def __init__(self) -> None:
        self._child: subprocess.Popen[bytes] | None = None
        self._loaded: ServedModel | None = None  # the model the child holds

    def predict(self, model: ServedModel, numeric: FloatArray, codes: FloatArray) -> tuple[FloatArray, float]:
        """`model`'s predictions of the records, and the child's CPU seconds for them; raises ScoringFailed."""
        try:
            requests, answers = self._running()
            if self._loaded is not model:  # the pipeline travels only when the compiled walk cannot serve it
                _write(requests, ("model", model.compiled, None if model.compiled else model.pipeline))
                self._loaded = model
            _write(requests, ("score", numeric, codes))
            answer = self._answer(answers, SCORE_TIMEOUT_S)
        except TimeoutError as error:
            self.close()  # a fresh child next time
            raise ScoringTimedOut(f"the scoring process gave {error}") from error
        except (OSError, EOFError, pickle.PickleError) as error:
            self.close()
            raise ScoringFailed(f"the scoring process failed: {error}") from error
        if answer[0] == "error":
            raise ScoringFailed(answer[1])
        return answer[1], answer[2]

    def close(self) -> None:
        """Stop the child (it exits when its stdin closes; killed if it does not within a second)."""
        child, self._child, self._loaded = self._child, None, None
        if child is None:
            return
        try:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=1.0)
        except (OSError, subprocess.TimeoutExpired):
            child.kill()
            child.wait()

    def _running(self) -> tuple[IO[bytes], IO[bytes]]:
        """The child's stdin and stdout, started (and answering) if it was not running."""
        child = self._child
        if child is None or child.poll() is not None:
            self.close()
            # stderr is inherited: the child's warnings and tracebacks land in the server's log
            child = self._child = subprocess.Popen([sys.executable, "-m", "serving.scoring_process"],  # nosec B603
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            if child.stdout is None or self._answer(child.stdout, START_TIMEOUT_S) != ("ready",):
                raise EOFError("the scoring process did not start")
        if child.stdin is None or child.stdout is None:  # never with PIPE; says so to the type checker
            raise EOFError("the scoring process has no pipes")
        return child.stdin, child.stdout

    @staticmethod
    def _answer(channel: IO[bytes], timeout_s: float) -> tuple[Any, ...]:
        ready, _, _ = select.select([channel], [], [], timeout_s)  # waits without the GIL
        if not ready:
            raise TimeoutError(f"no answer in {timeout_s:g} s")
        return _read(channel)


def main() -> None:
    """The child: lowest priority, then answer each message on stdin until it closes."""
    os.nice(SCORING_NICE)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on `make serve` reaches the group: the worker closes stdin
    from serving.trees import predict  # after os.nice: see the imports above
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # a print() in a model must not corrupt the answers
    requests = sys.stdin.buffer
    compiled: Any = None
    pipeline: Any = None
    unusable = ""  # why the last model sent cannot be loaded here, answered to every batch until the next model
    _write(answers, ("ready",))
    while True:
        try:
            message = _read(requests)
        except EOFError:
            return
        except Exception as error:  # noqa: BLE001 - only a model can fail to unpickle (a class this process cannot import)
            unusable = f"the candidate cannot be loaded in the scoring process: {type(error).__name__}: {error}"
            continue
        if message[0] == "model":
            _, compiled, pipeline = message
            unusable = ""
            continue
        if unusable:
            _write(answers, ("error", unusable))
            continue
        # CPU time, not wall time: at nice 19 on a busy host the child waits for the workers, and that wait is the
        # host's load, not the candidate's cost (`make bake` checks the latter against BAKE_MAX_P99_S).
        started = time.process_time()
        try:
            predictions = predict(compiled, pipeline, message[1], message[2])
        except Exception as error:  # noqa: BLE001 - the candidate's failure is the answer: evidence against it
            _write(answers, ("error", f"{type(error).__name__}: {error}"))
            continue
        _write(answers, ("scored", predictions, time.process_time() - started))


if __name__ == "__main__":
    main()
