"""How much work one call may ask for, checked before the work is done.

Four scopes, each with one limit (or two) and the option that raises it:

- **element**: ``max_chars``, the longest text read from one element (the FHIR reader refuses longer ones);
- **input** (one ``predict``/``predict_many``/``predict_files``/``predict_sources`` call, one CDS request):
  ``max_input_chars`` and ``max_input_windows``, the texts' total characters and model windows. Texts are
  admitted in input order until a limit would be passed; that text and every later one are reported as
  ``too-costly`` (nothing of them is tokenized for the model or run), and every text before is predicted;
- **process**: ``max_windows_in_flight``, the tokenized windows all threads together may hold at once. Work
  runs in chunks of ``chunk_windows`` windows; a chunk waits until the process is under the bound;
- **request bytes** (the CDS service): ``max_request_bytes``, a larger body is answered 413 unread.

The defaults come from measurements with the default plugin (medical-abstracts-mesh, MiniLM, int8 on 2 CPU
cores): one 256-token window costs about 18 ms, a 1,000,000-character note is about 1,260 windows (≈ 29 s),
and a streamed window holds about 6 KB (not the ~100 KB of a fully materialized tokenizer encoding).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from fhirplug.errors import UsageError
from fhirplug.fhir.outcome import Issue

__all__ = ["DEFAULT_BUDGET", "Budget", "WindowGate", "over_budget"]

#: The API keyword (``Budget`` field) → CLI flag that raises each limit, for messages.
_FLAGS = {
    "max_chars": "--max-chars",
    "max_input_chars": "--max-input-chars",
    "max_input_windows": "--max-input-windows",
    "max_windows_in_flight": "--max-windows-in-flight",
    "chunk_windows": "--chunk-windows",
    "max_request_bytes": "--max-request-bytes",
}


@dataclass(frozen=True)
class Budget:
    """Limits on one call's work, shared by the Python API, the CLI and the CDS service.

    Attributes:
        max_chars: longest text read from one element (characters). 1,000,000 ≈ 29 s of int8 inference.
        max_input_chars: total characters of the texts of one input (call or request). 2,000,000 ≈ 2,500
            windows of prose ≈ 45 s of int8 inference on 2 cores.
        max_input_windows: total model windows of one input. 6,000 lets a 5,000-note Bundle of short notes
            through and caps text that tokenizes densely (markup, digits) at ≈ 110 s of full windows.
        max_windows_in_flight: tokenized windows every thread of the process together may hold at once;
            a chunk over the bound waits for others to finish.
        chunk_windows: windows tokenized and run per step (memory per step does not grow with note length).
        max_request_bytes: largest CDS Hooks request body, CLI input file or standard input (bytes); a larger one
            is answered 413 (CLI: reported as too-costly) unread.
    """

    max_chars: int = 1_000_000
    max_input_chars: int = 2_000_000
    max_input_windows: int = 6_000
    max_windows_in_flight: int = 256
    chunk_windows: int = 64
    max_request_bytes: int = 50 * 1024 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"Budget.{f.name} must be an integer ≥ 1, got {value!r}")

    @property
    def chunk(self) -> int:
        """Windows per step: never more than the process bound, so no call waits forever on itself."""
        return min(self.chunk_windows, self.max_windows_in_flight)


DEFAULT_BUDGET = Budget()


def over_budget(limit: str, budget: Budget, what: str, expression: tuple[str, ...], source: str | None) -> Issue:
    """The ``too-costly`` issue for work refused by ``limit`` (a :class:`Budget` field name).

    ``what`` says what came (e.g. "this text would bring the input to 2,400,000 characters").
    """
    value = getattr(budget, limit)
    return Issue(
        "error",
        "too-costly",
        f"{what}, over the budget of {value:,} ({limit}); it was not predicted. Split the input, or raise the "
        f"limit: load_plugin(..., budget=Budget({limit}=N)) or {_FLAGS[limit]} N",
        expression,
        source,
    )


class WindowGate:
    """A counter of tokenized windows held by every thread of the process (a counting semaphore that takes
    several permits at once, so two chunks never deadlock each holding half of what they need)."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.held = 0
        #: Most windows ever held at once (for tests and benchmarks).
        self.peak = 0
        self._cond = threading.Condition()

    def acquire(self, n: int) -> None:
        """Wait until ``n`` more windows fit under the bound, then hold them."""
        n = min(n, self.bound)
        with self._cond:
            self._cond.wait_for(lambda: self.held + n <= self.bound)
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        n = min(n, self.bound)
        with self._cond:
            self.held -= n
            self._cond.notify_all()
