"""Every error fhirplug raises, in one tree.

```
FhirplugError                     base of everything fhirplug raises on purpose
├── PluginError                   a plugin bundle cannot be used
│   ├── ManifestError             manifest.json unreadable, wrong schema version, unknown or bad key
│   ├── IntegrityError            a file is changed, missing or extra (sha256 mismatch)
│   └── SignatureError            bad, missing or untrusted ed25519 signature
├── PluginNotFoundError           no bundle directory and no discovered plugin of that name
├── TaskError                     unknown task, or a task that breaks the task contract
├── ProviderError                 asked for an execution provider or variant that is not available
├── InputError                    FHIR input that cannot be used; carries OperationOutcome issues
├── MissingExtraError             an optional extra (train, gpu, bench) is not installed
├── UsageError (also ValueError)  a public function called with an argument it cannot take (misuse, not input)
├── AuthError (fhirplug.serve._auth)  request credentials refused; the server answers a bare 401
└── ConvertError                  train side: bad recipe, bad data, failed parity gate
```

Third-party exceptions (onnxruntime, pydantic, tokenizers) are translated at one boundary each with
``raise ... from exc``, so callers catch ``FhirplugError`` alone. Messages say what failed, what was
expected, what came, and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fhirplug.fhir.outcome import Issue

__all__ = [
    "ConvertError",
    "FhirplugError",
    "InputError",
    "IntegrityError",
    "ManifestError",
    "MissingExtraError",
    "PluginError",
    "PluginNotFoundError",
    "ProviderError",
    "SignatureError",
    "TaskError",
    "UsageError",
]


class FhirplugError(Exception):
    """Base class of every error fhirplug raises on purpose."""

    #: Exit status the CLI uses for this family of errors.
    exit_code = 1


class PluginError(FhirplugError):
    """A plugin bundle cannot be used."""

    exit_code = 3


class ManifestError(PluginError):
    """manifest.json is unreadable, has the wrong schema version, or an unknown or invalid key."""


class IntegrityError(PluginError):
    """A bundle file does not match the sha256 in its manifest, is missing, or is not declared."""


class SignatureError(PluginError):
    """The bundle signature is missing where required, invalid, or made by an untrusted key."""


class PluginNotFoundError(FhirplugError):
    """Neither a bundle directory nor a discovered plugin has that name."""

    exit_code = 3


class TaskError(FhirplugError):
    """An unknown task name, or a task implementation that breaks the task contract."""

    exit_code = 3  # the plugin cannot be used, like an invalid bundle


class ProviderError(FhirplugError):
    """The requested execution provider or model variant is not available."""

    exit_code = 5


class MissingExtraError(FhirplugError):
    """An optional dependency set is not installed; the message names the install command."""

    exit_code = 6

    def __init__(self, extra: str, purpose: str, also: str = "") -> None:
        self.extra = extra
        more = f" && {also}" if also else ""
        super().__init__(
            f"{purpose} needs the [{extra}] extra, which is not installed. "
            f"Install it with: pip install -c constraints.txt -e '.[{extra}]'{more}"
        )


class UsageError(FhirplugError, ValueError):
    """A public function was called with an argument it cannot take (a programming error, not bad input).

    Also a ``ValueError``, so code written against the standard library's convention keeps working.
    """

    exit_code = 2  # the CLI's usage status


class ConvertError(FhirplugError):
    """Train side: a bad recipe or data file, or a variant that failed the parity gate."""

    exit_code = 7


class InputError(FhirplugError):
    """FHIR input that cannot be used at all. ``issues`` are OperationOutcome issues."""

    exit_code = 4

    def __init__(self, message: str, issues: Sequence[Issue] = ()) -> None:
        super().__init__(message)
        self.issues = list(issues)
