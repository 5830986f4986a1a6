"""Adversarial inputs through the real CLI, and how many of them are clean (GitHub issue 9).

    .venv/bin/python benchmarks/adversarial.py --json benchmarks/results/adversarial.json
    .venv/bin/python benchmarks/adversarial.py --fast            # leave out the slow (43 MB, 1M-character) cases

The cases are listed in ``tests/fixtures/adversarial/cases.json``: each names its class (html, budgets,
decoding, json, trust, api), its input (a small file under ``tests/fixtures/adversarial/``, or a generator below
that builds a big or hostile one at run time: nothing big is committed) and what must happen. Each case runs in
its own process: ``fhirplug predict`` / ``fhirplug verify`` for the CLI cases, ``python -c`` for the API ones,
with a deadline, and the child's peak RSS sampled from its ``/proc/PID/status`` ``VmHWM``.

A case is **clean** when all of these hold:

- it ends before its deadline (no hang) and no ``Traceback`` reaches stderr;
- the exit code is one the case allows (0 ok · 2 usage · 3 plugin not found/invalid/tampered/untrusted · 4 FHIR
  input with errors, the good input still predicted and written · 5 provider/variant · 6 missing extra);
- stderr ends with one line: ``Error: ...`` for a refusal, the ``N prediction(s) from M text(s)`` summary for a
  prediction run (the expected words in it when the case names them);
- every good entry is predicted (the output Bundle or NDJSON holds a prediction whose evidence points at it, with
  the code the case names), text that must not be read yields no prediction, and the OperationOutcome written by
  ``--outcome`` holds the issues the case names (code, FHIRPath, source) and no more errors than it says;
- a refused bundle writes no output (no tampered bundle is accepted).

The trust cases work on copies of ``tests/fixtures/plugins/tiny-notes`` signed with a key made by
``fhirplug keygen`` (``write_manifest(..., signing_key=...)``), tampered after signing; the FHIR cases use the
default plugin, ``plugins/medical-abstracts-mesh/bundle``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ADVERSARIAL = REPO / "tests" / "fixtures" / "adversarial"
MANIFEST = ADVERSARIAL / "cases.json"
DEFAULT_PLUGIN = REPO / "plugins" / "medical-abstracts-mesh" / "bundle"
TINY_PLUGIN = REPO / "tests" / "fixtures" / "plugins" / "tiny-notes"
NER_PLUGIN = REPO / "plugins" / "bc5cdr-ner" / "bundle"
DEFAULT_TIMEOUT_S = 60.0

#: Texts the default plugin codes with confidence: a good note must come back with its code.
NEOPLASM = "Metastatic breast carcinoma."  # D009369 Neoplasms, p ≈ 0.88
CARDIAC = "Acute myocardial infarction with heart failure."  # D002318 Cardiovascular Diseases, p ≈ 0.87
PROSE = (
    "The patient is a 64 year old woman seen for follow up of metastatic breast carcinoma treated with "
    "chemotherapy; she reports fatigue and mild dyspnoea on exertion, no chest pain. Examination is "
    "unremarkable apart from a healed mastectomy scar. Plan: continue treatment and review in four weeks. "
)
SUMMARY = re.compile(r"^\d+ prediction\(s\) from \d+ text\(s\); \d+ error\(s\); ")


# --- inputs built at run time -----------------------------------------------------------------------------------


def _document(rid: str, text: str, content_type: str = "text/plain; charset=utf-8") -> dict[str, Any]:
    return {
        "resourceType": "DocumentReference",
        "id": rid,
        "status": "current",
        "subject": {"reference": "Patient/p-1"},
        "content": [{"attachment": {"contentType": content_type, "data": base64.b64encode(text.encode()).decode()}}],
    }


def _bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def _write(work: Path, name: str, data: dict[str, Any] | str) -> Path:
    path = work / name
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def _prose(chars: int) -> str:
    return (PROSE * (chars // len(PROSE) + 1))[:chars]


def gen_html_lt_a(work: Path) -> Path:
    """999,999 characters of ``<a `` as a text/html attachment (a tag that never ends), then a good note.

    Just under the per-element limit (1,000,000), so the HTML reader, not the limit, has to deal with it."""
    html = "<a " * 333_333
    return _write(work, "html-lt-a.json", _bundle(_document("lt-a", html, "text/html"), _document("good", CARDIAC)))


def gen_html_nested(work: Path) -> Path:
    """999,978 characters: 199,990 nested ``<div>`` tags around a sentence that must be read (under the limit)."""
    html = "<div>" * 199_990 + NEOPLASM
    return _write(work, "html-nested.json", _bundle(_document("nested", html, "text/html")))


def gen_budget_50_notes(work: Path) -> Path:
    """One request of 50 long notes, about 43 MB of JSON: the first ones predicted, the rest too-costly."""
    notes = [_document(f"long-{i:02d}", _prose(640_000)) for i in range(50)]
    return _write(work, "budget-50-notes.json", _bundle(*notes))


def gen_plain_1m(work: Path) -> Path:
    """A 1,000,000-character plain note: exactly the default per-element limit, so predicted."""
    return _write(work, "plain-1m.json", _document("plain-1m", _prose(1_000_000)))


def gen_over_element_limit(work: Path) -> Path:
    """A note one character over the per-element limit (1,000,001) next to a good note."""
    return _write(
        work, "over-limit.json", _bundle(_document("too-long", _prose(1_000_001)), _document("good", CARDIAC))
    )


def gen_deep_array(work: Path) -> Path:
    """A 10,000-deep array inside one entry; the entries around it are good."""
    deep = "[" * 10_000 + "]" * 10_000
    bad = json.dumps(_document("deep", NEOPLASM))[:-1] + f', "extension": {deep}}}'
    text = json.dumps(_bundle(_document("before", CARDIAC), {}, _document("after", NEOPLASM))).replace("{}", bad)
    return _write(work, "deep-array.json", text)


def gen_bundle_nested_600(work: Path) -> Path:
    """A Bundle nested 601 deep (JSON text); the top-level note is good."""
    # Written as text: json.dumps itself recurses once per level and stops near 1,000.
    bottom = json.dumps(_bundle(_document("bottom", NEOPLASM)))
    opening = '{"resourceType": "Bundle", "type": "collection", "entry": [{"resource": '
    inner = opening * 600 + bottom + "}]}" * 600
    top = json.dumps(_bundle(_document("top", CARDIAC), {})).replace("{}", inner)
    return _write(work, "bundle-nested-600.json", top)


GENERATORS: dict[str, Callable[[Path], Path]] = {
    "html_lt_a": gen_html_lt_a,
    "html_nested": gen_html_nested,
    "budget_50_notes": gen_budget_50_notes,
    "plain_1m": gen_plain_1m,
    "over_element_limit": gen_over_element_limit,
    "deep_array": gen_deep_array,
    "bundle_nested_600": gen_bundle_nested_600,
}


# --- bundles tampered after signing -----------------------------------------------------------------------------


def _rewrite_manifest(bundle: Path, edit: Callable[[dict[str, Any]], None], key: Path | None) -> None:
    """Re-hash the bundle and write its manifest (signed with ``key``, or unsigned), after ``edit``."""
    from fhirplug.bundle import write_manifest

    raw = json.loads((bundle / "manifest.json").read_text())
    edit(raw)
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(bundle, raw, variants=variants, signing_key=key)


def _strip_and_edit(bundle: Path, outside: Path) -> None:
    """What an attacker with write access does: delete the signature, change a code, re-hash, leave it unsigned."""
    (bundle / "manifest.sig").unlink()

    def recode(raw: dict[str, Any]) -> None:
        raw["outputs"]["labels"][0]["code"] = "999999"

    _rewrite_manifest(bundle, recode, None)


def _symlink_dir_outside(bundle: Path, outside: Path) -> None:
    (outside / "elsewhere").mkdir(exist_ok=True)
    (bundle / "extras").symlink_to(outside / "elsewhere", target_is_directory=True)


def _empty_dir(bundle: Path, outside: Path) -> None:
    (bundle / "empty").mkdir()


def _symlink_identical(bundle: Path, outside: Path) -> None:
    copy = outside / "labels-copy.json"
    shutil.copyfile(bundle / "labels.json", copy)
    (bundle / "labels.json").unlink()
    (bundle / "labels.json").symlink_to(copy)


def _sig_dir(bundle: Path, outside: Path) -> None:
    (bundle / "manifest.sig").unlink()
    (bundle / "manifest.sig").mkdir()


def _deep_manifest(bundle: Path, outside: Path) -> None:
    (bundle / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)


def _digits_schema_version(bundle: Path, outside: Path) -> None:
    manifest = bundle / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text.replace('"schema_version": 1', '"schema_version": ' + "1" * 5000))


def _readme_fifo(bundle: Path, outside: Path) -> None:
    (bundle / "README.md").unlink()
    os.mkfifo(bundle / "README.md")


def _readme_dev_zero(bundle: Path, outside: Path) -> None:
    (bundle / "README.md").unlink()
    (bundle / "README.md").symlink_to("/dev/zero")


TAMPERS: dict[str, Callable[[Path, Path], None]] = {
    "none": lambda bundle, outside: None,
    "strip_and_edit": _strip_and_edit,
    "symlink_dir_outside": _symlink_dir_outside,
    "empty_dir": _empty_dir,
    "symlink_identical": _symlink_identical,
    "sig_dir": _sig_dir,
    "deep_manifest": _deep_manifest,
    "digits_schema_version": _digits_schema_version,
    "readme_fifo": _readme_fifo,
    "readme_dev_zero": _readme_dev_zero,
}


@dataclass
class Workspace:
    """A scratch folder with key pair A (made by ``fhirplug keygen``) and the default plugin's trust flags."""

    root: Path
    key: Path
    public: Path
    default_flags: list[str]

    @classmethod
    def create(cls, root: Path) -> Workspace:
        root.mkdir(parents=True, exist_ok=True)
        keys = root / "keys"
        shutil.rmtree(keys, ignore_errors=True)  # a re-used --work folder: keygen refuses to overwrite a key
        done = subprocess.run(
            [*fhirplug_command(), "keygen", "--out", str(keys), "--name", "a"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"fhirplug keygen failed ({done.returncode}): {done.stderr.strip()}")
        return cls(root, keys / "a.key", keys / "a.pub", default_plugin_flags())

    def signed_copy(self, name: str, base: str = "tiny-notes") -> Path:
        """A private copy of ``base`` (tiny-notes or bc5cdr-ner) re-signed with key A."""
        source = {"tiny-notes": TINY_PLUGIN, "bc5cdr-ner": NER_PLUGIN}[base]
        target = self.root / name / base
        if target.parent.exists():
            shutil.rmtree(target.parent)
        shutil.copytree(source, target)
        _rewrite_manifest(target, lambda raw: None, self.key)
        return target


def _assertion_x(ws: Workspace, name: str) -> Path:
    """A copy of bc5cdr-ner whose assertion.json is ``{"x": 1}``, re-hashed and signed by key A: the signature is
    good, so only the check at load can refuse it."""
    bundle = ws.signed_copy(name, "bc5cdr-ner")
    (bundle / "assertion.json").write_text('{"x": 1}\n')
    _rewrite_manifest(bundle, lambda raw: None, ws.key)
    return bundle


def build_bundle(spec: dict[str, Any], ws: Workspace, name: str) -> Path:
    """The plugin bundle a trust case loads: a signed copy, then its tamper (after signing)."""
    if spec.get("tamper") == "assertion_x":
        return _assertion_x(ws, name)
    bundle = ws.signed_copy(name, spec.get("base", "tiny-notes"))
    outside = ws.root / name / "outside"
    outside.mkdir(exist_ok=True)
    TAMPERS[spec.get("tamper", "none")](bundle, outside)
    return bundle


# --- running one case -------------------------------------------------------------------------------------------


def fhirplug_command() -> list[str]:
    """The installed ``fhirplug`` console script next to this interpreter (the venv's), else the module."""
    script = Path(sys.executable).parent / "fhirplug"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from fhirplug.cli import main; main()"]


def default_plugin_flags() -> list[str]:
    """``[]`` when the default plugin loads as first-party (pinned), else ``["--allow-unsigned"]``."""
    done = subprocess.run(
        [*fhirplug_command(), "verify", str(DEFAULT_PLUGIN)], capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode == 0:
        return []
    if done.returncode == 3 and re.search(r"unsigned|pin", done.stderr):
        return ["--allow-unsigned"]
    raise RuntimeError(f"the default plugin does not verify ({done.returncode}): {done.stderr.strip()[-500:]}")


@dataclass
class Run:
    """What a child process did."""

    exit: int | None  # None: killed at the deadline
    stdout: str
    stderr: str
    seconds: float
    peak_rss_mb: float


def _high_water_kb(pid: int) -> int | None:
    """The process's peak resident set so far (``VmHWM``), or None once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else None


def run_child(argv: Sequence[str], env: dict[str, str], timeout_s: float, cwd: Path) -> Run:
    """Run ``argv`` with a deadline, sampling its peak RSS every 10 ms.

    The peak is the child's own ``VmHWM`` (a high-water mark, so a sample misses at most the last 10 ms), not
    ``ru_maxrss`` of ``wait4``/``RUSAGE_CHILDREN``: Linux folds the parent's resident set into that when the child
    is started by vfork, as ``subprocess`` does, and this runner holds 43 MB inputs.
    """
    out_path, err_path = cwd / "stdout.txt", cwd / "stderr.txt"
    started = time.perf_counter()
    peak_kb = 0
    with out_path.open("wb") as out, err_path.open("wb") as err:
        child = subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd)
        status: int | None = None
        while True:
            peak_kb = max(peak_kb, _high_water_kb(child.pid) or 0)
            try:
                status = child.wait(timeout=0.01)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.perf_counter() - started > timeout_s:
                child.kill()
                child.wait()
                break
    seconds = time.perf_counter() - started
    return Run(
        exit=status,
        stdout=out_path.read_text(encoding="utf-8", errors="replace"),
        stderr=err_path.read_text(encoding="utf-8", errors="replace"),
        seconds=seconds,
        peak_rss_mb=peak_kb / 1024,
    )


#: API cases: a program run by ``python -c`` with argv = [plugin, out folder, "1" if --allow-unsigned]. It writes
#: out.json / issues.json as ``predict -o/--outcome`` would, or value.json for a plain value. It imports this
#: file for the input builders.
API_PREAMBLE = f"""
import json, sys
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import fhirplug
from adversarial import CARDIAC, NEOPLASM, _bundle, _document
plugin = fhirplug.load_plugin(sys.argv[1], allow_unsigned=sys.argv[3] == "1")
out = Path(sys.argv[2])
"""
API_PROGRAMS: dict[str, str] = {
    "predict_texts_empty": """
scores = plugin.predict_texts([])
labels = len(plugin.manifest.outputs.labels)
(out / "value.json").write_text(json.dumps({"shape": list(scores.shape), "labels": labels}))
""",
    "nested_dict_bundle_600": """
inner = _bundle(_document("bottom", NEOPLASM))
for _ in range(600):
    inner = _bundle(inner)
result = plugin.predict(_bundle(_document("top", CARDIAC), inner), source_name="dict")
(out / "out.json").write_text(json.dumps(result.to_fhir()))
(out / "issues.json").write_text(json.dumps(result.outcome()))
""",
}


@dataclass
class Result:
    """One case's verdict."""

    id: str
    cls: str
    clean: bool
    why: list[str]
    exit: int | None
    seconds: float
    peak_rss_mb: float
    command: str
    stderr_tail: str = ""
    facts: dict[str, Any] = field(default_factory=dict)


def _resolve_input(spec: Any, work: Path) -> Path:
    if isinstance(spec, dict):
        return GENERATORS[spec["generate"]](work)
    return ADVERSARIAL / str(spec)


def _fill(args: Sequence[str], values: dict[str, str]) -> list[str]:
    return [a.format(**values) for a in args]


def _predictions(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """(source reference, element, codes, snippet) of every prediction resource in the output."""
    found = []
    for resource in resources:
        span = next((e for e in resource.get("extension", []) if e.get("url", "").endswith("/evidence-span")), None)
        if span is None:
            continue
        parts = {p["url"]: p for p in span.get("extension", [])}
        codes: list[str] = []
        for prediction in resource.get("prediction", []):
            codes += [c.get("code") for c in prediction.get("outcome", {}).get("coding", [])]
        codes += [c.get("code") for c in resource.get("code", {}).get("coding", [])]
        found.append(
            {
                "source": parts.get("source", {}).get("valueReference", {}).get("reference"),
                "element": parts.get("element", {}).get("valueString"),
                "codes": codes,
                "snippet": parts.get("snippet", {}).get("valueString", ""),
            }
        )
    return found


def _read_output(path: Path, ndjson: bool) -> list[dict[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if ndjson:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    bundle = json.loads(text)
    return [e["resource"] for e in bundle.get("entry", [])]


def _matches(prediction: dict[str, Any], want: dict[str, Any]) -> bool:
    return (
        prediction["source"] == want["source"]
        and ("element" not in want or prediction["element"] == want["element"])
        and ("code" not in want or want["code"] in prediction["codes"])
        and ("snippet" not in want or want["snippet"] in prediction["snippet"])
    )


def _issue_matches(issue: dict[str, Any], want: dict[str, Any]) -> bool:
    return (
        issue.get("code") == want["code"]
        and ("severity" not in want or issue.get("severity") == want["severity"])
        and ("expression" not in want or want["expression"] in issue.get("expression", []))
        and ("diagnostics" not in want or want["diagnostics"] in issue.get("diagnostics", ""))
    )


def judge(case: dict[str, Any], run: Run, out_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """Every way ``run`` falls short of clean for ``case`` (empty: clean), and facts measured on the way."""
    expect = case["expect"]
    why: list[str] = []
    facts: dict[str, Any] = {}
    if run.exit is None:
        return [f"hang: still running after {case.get('timeout_s', DEFAULT_TIMEOUT_S):g} s, killed"], facts
    if "Traceback" in run.stderr or "Traceback" in run.stdout:
        why.append("a traceback reached the user")
    if run.exit not in expect["exit"]:
        why.append(f"exit {run.exit}, expected {' or '.join(map(str, expect['exit']))}")
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    command = case.get("command", "predict")
    if run.exit in (1, 2, 3, 5, 6, 7) and not last.startswith("Error: "):
        why.append(f"stderr does not end with a one-line 'Error: ...' message (last line: {last[:120]!r})")
    if command == "predict" and run.exit in (0, 4) and not SUMMARY.match(last):
        why.append(f"stderr does not end with the prediction summary (last line: {last[:120]!r})")
    if "stderr" in expect and expect["stderr"] not in last:
        why.append(f"the last stderr line does not say {expect['stderr']!r}")
    if "stdout" in expect and expect["stdout"] not in run.stdout:
        why.append(f"stdout does not say {expect['stdout']!r}")
    out, issues_path = out_dir / "out.json", out_dir / "issues.json"
    if expect.get("no_output"):
        if out.exists():
            why.append("a refused plugin still wrote output (a tampered bundle was accepted)")
        return why, facts
    if "value" in expect:
        try:
            value = json.loads((out_dir / "value.json").read_text())
        except (OSError, ValueError) as exc:
            return [*why, f"no value written ({exc})"], facts
        facts["value"] = value
        if value != expect["value"]:
            why.append(f"value {value}, expected {expect['value']}")
        return why, facts
    if not any(k in expect for k in ("predicted", "not_predicted", "issues", "errors")):
        return why, facts
    try:
        predictions = _predictions(_read_output(out, "ndjson" in case.get("args", [])))
        outcome = json.loads(issues_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as exc:
        return [*why, f"no readable output Bundle and OperationOutcome ({type(exc).__name__}: {exc})"], facts
    issues = outcome.get("issue", [])
    errors = sum(i.get("severity") in ("error", "fatal") for i in issues)
    facts.update(predictions=len(predictions), errors=errors)
    for want in expect.get("predicted", []):
        # A good input is delivered when it is predicted, or when the plugin read it and abstained (an
        # informational issue naming that source: the text is outside its domain, e.g. a one-line note for a
        # plugin trained on abstracts) — both are the plugin's answer for that record.
        abstained = any(
            i.get("code") == "informational"
            and "abstained" in i.get("diagnostics", "")
            and str(want.get("source", "")) in i.get("diagnostics", "")
            for i in issues
        )
        if not abstained and not any(_matches(p, want) for p in predictions):
            why.append(f"good input not predicted: {want}")
    for want in expect.get("not_predicted", []):
        if any(_matches(p, want) for p in predictions):
            why.append(f"text that must not be read was predicted: {want}")
    for want in expect.get("issues", []):
        if not any(_issue_matches(i, want) for i in issues):
            why.append(f"issue missing from the OperationOutcome: {want}")
    if "errors" in expect and errors != expect["errors"]:
        why.append(f"{errors} error issue(s), expected {expect['errors']}")
    return why, facts


def run_case(case: dict[str, Any], ws: Workspace) -> Result:
    """Build the case's input, run it in a child process, and judge it."""
    work = ws.root / case["id"]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    command = case.get("command", "predict")
    # The caller's own FHIRPLUG_ALLOW_UNSIGNED must not leak into cases that do not set it.
    env = {k: v for k, v in os.environ.items() if k != "FHIRPLUG_ALLOW_UNSIGNED"} | case.get("env", {})
    if "bundle" in case:
        plugin, flags = build_bundle(case["bundle"], ws, case["id"] + "-bundle"), []
    else:
        plugin, flags = DEFAULT_PLUGIN, list(ws.default_flags)
    values = {"key": str(ws.public), "bundle": str(plugin)}
    if command == "api":
        argv = [sys.executable, "-c", API_PREAMBLE + API_PROGRAMS[case["program"]], str(plugin), str(work)]
        argv.append("1" if "--allow-unsigned" in flags else "0")
    elif command == "verify":
        argv = [*fhirplug_command(), "verify", str(plugin), *flags, *_fill(case.get("args", []), values)]
    else:
        inputs = case["input"] if isinstance(case["input"], list) else [case["input"]]
        paths = [str(_resolve_input(i, work)) for i in inputs]
        argv = [*fhirplug_command(), "predict", str(plugin), *paths, "-o", str(work / "out.json")]
        argv += ["--outcome", str(work / "issues.json"), *flags, *_fill(case.get("args", []), values)]
    timeout_s = float(case.get("timeout_s", DEFAULT_TIMEOUT_S))
    run = run_child(argv, env, timeout_s, work)
    why, facts = judge(case, run, work)
    shown = shlex.join(argv if command != "api" else [*argv[:2], f"<{case['program']}>", *argv[3:]])
    tail = "\n".join(run.stderr.strip().splitlines()[-3:])
    return Result(case["id"], case["class"], not why, why, run.exit, run.seconds, run.peak_rss_mb, shown, tail, facts)


# --- the report ---------------------------------------------------------------------------------------------------


def load_cases(path: Path = MANIFEST) -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = json.loads(path.read_text(encoding="utf-8"))["cases"]
    return cases


def table(results: Sequence[Result]) -> str:
    rows = [("case", "class", "verdict", "exit", "seconds", "peak MB")]
    for r in results:
        verdict = "clean" if r.clean else "NOT CLEAN: " + "; ".join(r.why)
        rows.append((r.id, r.cls, verdict, str(r.exit), f"{r.seconds:.1f}", f"{r.peak_rss_mb:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        left = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:2]))
        lines.append(f"{left}  {row[3]:>4}  {row[4]:>7}  {row[5]:>7}  {row[2]}")
    return "\n".join(lines)


def totals(results: Sequence[Result]) -> dict[str, Any]:
    by_class: dict[str, list[int]] = {}
    for r in results:
        counts = by_class.setdefault(r.cls, [0, 0])
        counts[0] += r.clean
        counts[1] += 1
    return {
        "clean": sum(r.clean for r in results),
        "total": len(results),
        "by_class": {cls: {"clean": c, "total": t} for cls, (c, t) in by_class.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the cases, verdicts and totals here")
    parser.add_argument("--only", action="append", default=[], metavar="ID", help="run these case ids only")
    parser.add_argument("--fast", action="store_true", help="leave out the cases marked slow")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one, removed after)")
    args = parser.parse_args(argv)
    python = Path(sys.executable)
    shown = python.relative_to(REPO) if python.is_relative_to(REPO) else python
    print("$ " + shlex.join([str(shown), "benchmarks/adversarial.py", *(argv or sys.argv[1:])]))
    cases = [c for c in load_cases() if (not args.only or c["id"] in args.only) and not (args.fast and c.get("slow"))]
    unknown = set(args.only) - {c["id"] for c in cases}
    if unknown:
        parser.error(f"no such case(s): {', '.join(sorted(unknown))}")
    root = args.work or Path(tempfile.mkdtemp(prefix="fhirplug-adversarial-"))
    try:
        ws = Workspace.create(root)
        print(f"default plugin: {DEFAULT_PLUGIN.relative_to(REPO)} {' '.join(ws.default_flags) or '(first-party pin)'}")
        results = []
        for case in cases:
            result = run_case(case, ws)
            results.append(result)
            mark = "clean" if result.clean else "NOT CLEAN"
            print(f"  {result.id}: {mark} ({result.seconds:.1f} s)", file=sys.stderr, flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results))
    summary = totals(results)
    per_class = ", ".join(f"{cls} {v['clean']}/{v['total']}" for cls, v in summary["by_class"].items())
    print(f"\n{summary['clean']} of {summary['total']} clean ({per_class})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"command": "benchmarks/adversarial.py " + shlex.join(argv or sys.argv[1:]), **summary}
        report["default_plugin_flags"] = ws.default_flags
        report["cases"] = [asdict(r) for r in results]
        text = json.dumps(report, indent=2) + "\n"
        # No machine paths in a committed results file: the repository and the scratch folder are named relatively.
        text = text.replace(str(REPO / ".venv" / "bin") + "/", "").replace(str(REPO) + "/", "")
        text = text.replace(str(root) + "/", "WORK/")
        args.json.write_text(text, encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if summary["clean"] == summary["total"] else 1


if __name__ == "__main__":
    sys.exit(main())
