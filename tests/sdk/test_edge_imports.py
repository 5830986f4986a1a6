"""The edge promise, checked: the runtime never loads torch or transformers."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import TINY_PLUGIN


def test_runtime_does_not_import_torch() -> None:
    code = (
        "import sys, fhirplug\n"
        f"p = fhirplug.load_plugin({str(TINY_PLUGIN)!r}, allow_unsigned=True)\n"
        "p.predict({'resourceType': 'Observation', 'status': 'final', 'code': {'text': 'note'},"
        " 'valueString': 'asthma with wheezing'})\n"
        "import fhirplug.cli\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'optimum', 'peft', 'fhirplug_convert')"
        " if m in sys.modules)\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
