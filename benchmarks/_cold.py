"""Cold start and memory: import + load + first prediction in a fresh interpreter, median of a few.

Peak RSS is read from ``VmHWM`` (the high-water mark of the child's own memory map). ``ru_maxrss`` is not used:
Linux carries it over from the parent across fork + exec, so a child of a big benchmark process would report at
least the parent's size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

#: Keeps transformers offline and quiet in the child processes.
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
PROBE = "Patient seen in clinic; history reviewed and plan discussed."

_PEAK = """
def _peak_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""
_REPORT = """
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_prediction_s": t3 - t2, "total_s": t3 - t0,
                  "peak_rss_mb": _peak_mb()}))
"""
#: As fhirplug._bench.cold_start: import + load_plugin (verify included) + one FHIR prediction.
COLD_FHIRPLUG = (
    """
import json, sys, time
t0 = time.perf_counter()
import fhirplug
t1 = time.perf_counter()
p = fhirplug.load_plugin(sys.argv[1], allow_unsigned=True, provider="cpu", variant=sys.argv[3])
t2 = time.perf_counter()
p.predict({"resourceType": "Observation", "status": "final", "code": {"text": "note"}, "valueString": sys.argv[2]})
t3 = time.perf_counter()
"""
    + _PEAK
    + _REPORT
)
COLD_TORCH = (
    """
import json, sys, time
t0 = time.perf_counter()
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
t2 = time.perf_counter()
with torch.inference_mode():
    model(**tok([sys.argv[2]], return_tensors="pt", truncation=True)).logits
t3 = time.perf_counter()
"""
    + _PEAK
    + _REPORT
)
COLD_OPTIMUM = (
    """
import json, sys, time
t0 = time.perf_counter()
from optimum.onnxruntime import ORTModelForSequenceClassification
from transformers import AutoTokenizer
t1 = time.perf_counter()
tok = AutoTokenizer.from_pretrained(sys.argv[3])
model = ORTModelForSequenceClassification.from_pretrained(sys.argv[1], file_name="model.onnx")
t2 = time.perf_counter()
model(**tok([sys.argv[2]], return_tensors="pt", truncation=True)).logits
t3 = time.perf_counter()
"""
    + _PEAK
    + _REPORT
)


def cold_subprocess(script: str, args: Sequence[str], runs: int) -> dict[str, Any]:
    """Median over ``runs`` fresh interpreters of a script that prints the cold-start JSON last."""
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", script, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
            env={**os.environ, **ENV},
        )
        if out.returncode != 0:
            raise RuntimeError(f"cold-start process failed: {out.stderr.strip()[-2000:]}")
        sample = json.loads(out.stdout.strip().splitlines()[-1])
        sample["process_wall_s"] = time.perf_counter() - started
        samples.append(sample)
    return {key: float(np.median([s[key] for s in samples])) for key in samples[0]} | {"runs": runs}
