"""Bundle trust (GitHub issue 9): a trust list cannot be weakened, first-party bundles are pinned, and the bundle
directory is read as hostile input: regular files only, never blocking, never following a link, no tracebacks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fhirplug import load_plugin
from fhirplug._pins import CHECKOUT_PLUGINS, PINS, compute_pins
from fhirplug._pins import main as pins_main
from fhirplug._safe_read import BundleDir
from fhirplug.bundle import SIGNATURE_FILE, generate_keypair, verify_bundle, write_manifest
from fhirplug.cli import main
from fhirplug.errors import FhirplugError, IntegrityError, ManifestError, SignatureError, UsageError
from fhirplug.manifest import parse_manifest
from fhirplug.plugin import Plugin
from tests.conftest import REPO, TINY_PLUGIN
from tests.sdk.test_bundle import _resign

TEXTS = ["Patient with diabetes and hypertension.", "History of asthma, no diabetes.", "Unremarkable visit."]
FIRST_PARTY = sorted(p.parent for p in (REPO / "plugins").glob("*/bundle/manifest.json"))


def _attack(bundle: Path, code: str = "999999") -> None:
    """What an attacker with write access does to a signed bundle: delete the signature, edit the manifest."""
    (bundle / SIGNATURE_FILE).unlink()
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["outputs"]["labels"][0]["code"] = code
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(bundle, raw, variants=variants)


@pytest.fixture
def signed(tiny_bundle: Path, tmp_path: Path) -> tuple[Path, Path]:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    _resign(tiny_bundle, tmp_path / "a.key")
    return tiny_bundle, tmp_path / "a.pub"


# --- a trust list cannot be weakened -------------------------------------------------------------------------


def test_a_trust_list_refuses_a_stripped_and_edited_bundle_even_with_allow_unsigned(signed: tuple[Path, Path]) -> None:
    bundle, key = signed
    assert verify_bundle(bundle, trusted_keys=[key]).trusted_by == "key"
    _attack(bundle)
    for allow in (False, True):
        with pytest.raises(SignatureError, match=r"unsigned \(no manifest\.sig\) but trusted keys were given"):
            verify_bundle(bundle, trusted_keys=[key], allow_unsigned=allow)
        with pytest.raises(SignatureError, match="must be signed by one of them"):
            load_plugin(bundle, trusted_keys=[key], allow_unsigned=allow)


def test_the_attack_works_only_where_the_caller_opts_out_of_keys(signed: tuple[Path, Path]) -> None:
    bundle, _ = signed
    _attack(bundle)
    # Without a trust list, allow_unsigned is the caller's explicit choice; the attacker's code then shows.
    assert load_plugin(bundle, allow_unsigned=True).manifest.outputs.labels[0].code == "999999"


def test_cli_refuses_trusted_key_with_allow_unsigned(signed: tuple[Path, Path]) -> None:
    bundle, key = signed
    _attack(bundle)
    runner = CliRunner()
    both = runner.invoke(main, ["verify", str(bundle), "--trusted-key", str(key), "--allow-unsigned"])
    assert both.exit_code == 2, both.output
    assert "cannot be combined with --trusted-key" in both.output
    predict = runner.invoke(main, ["predict", str(bundle), "-", "--trusted-key", str(key), "--allow-unsigned"])
    assert predict.exit_code == 2 and "cannot be combined" in predict.output


def test_the_allow_unsigned_environment_variable_is_not_read(signed: tuple[Path, Path]) -> None:
    bundle, key = signed
    _attack(bundle)
    runner = CliRunner()
    env = {"FHIRPLUG_ALLOW_UNSIGNED": "1"}
    with_key = runner.invoke(main, ["verify", str(bundle), "--trusted-key", str(key)], env=env)
    assert with_key.exit_code == 3, with_key.output
    assert "must be signed by one of them" in with_key.output
    alone = runner.invoke(main, ["verify", str(bundle)], env=env)
    assert alone.exit_code == 3, alone.output
    assert "no longer read" in alone.stderr and "the bundle is unsigned" in alone.output


def test_trusted_keys_must_be_a_list(signed: tuple[Path, Path]) -> None:
    bundle, key = signed
    with pytest.raises(UsageError, match="list of key files"):
        verify_bundle(bundle, trusted_keys=str(key))  # type: ignore[arg-type]


def test_verify_says_how_it_was_trusted(signed: tuple[Path, Path]) -> None:
    bundle, key = signed
    runner = CliRunner()
    by_key = runner.invoke(main, ["verify", str(bundle), "--trusted-key", str(key)])
    assert by_key.exit_code == 0, by_key.output
    assert "trusted: signed by key " in by_key.output
    unsigned = runner.invoke(main, ["verify", str(TINY_PLUGIN), "--allow-unsigned"])
    assert unsigned.exit_code == 0, unsigned.output
    assert "trusted: unsigned, allowed by --allow-unsigned" in unsigned.output
    pinned = runner.invoke(main, ["verify", str(REPO / "plugins" / "synthea-conditions" / "bundle")])
    assert pinned.exit_code == 0, pinned.output
    assert "trusted: first-party pin" in pinned.output


# --- first-party pins ------------------------------------------------------------------------------------------


def test_pins_are_current() -> None:
    """Fails when a first-party bundle was rebuilt: run `python -m fhirplug._pins --update` and commit it."""
    assert FIRST_PARTY, "no committed first-party bundle under plugins/"
    current = compute_pins(CHECKOUT_PLUGINS)
    assert current == PINS, "stale pins: run `python -m fhirplug._pins --update`"
    assert pins_main([]) == 0


@pytest.mark.parametrize("bundle", FIRST_PARTY, ids=[p.parent.name for p in FIRST_PARTY])
def test_first_party_bundles_are_trusted_by_pin_without_allow_unsigned(bundle: Path) -> None:
    verified = verify_bundle(bundle)
    assert verified.trusted_by == "pin" and verified.signed_by is None
    assert verified.manifest_sha256 == PINS[bundle.parent.name]


def test_an_edited_first_party_bundle_loses_its_pin(tmp_path: Path) -> None:
    source = REPO / "plugins" / "synthea-conditions" / "bundle"
    copy = tmp_path / "synthea-conditions"
    shutil.copytree(source, copy)
    assert verify_bundle(copy).trusted_by == "pin"  # the pin is on the manifest's bytes, not the folder
    raw = json.loads((copy / "manifest.json").read_text())
    raw["outputs"]["labels"][0]["code"] = "999999"
    variants = [{k: v for k, v in spec.items() if k != "sha256"} for spec in raw.pop("variants")]
    raw.pop("files")
    write_manifest(copy, raw, variants=variants)
    with pytest.raises(SignatureError, match="so it is not the first-party bundle"):
        verify_bundle(copy)
    assert verify_bundle(copy, allow_unsigned=True).trusted_by == "unsigned"


def test_a_pin_does_not_stand_in_for_a_trust_list(tmp_path: Path) -> None:
    generate_keypair(tmp_path / "a.key", tmp_path / "a.pub")
    with pytest.raises(SignatureError, match="trusted keys were given"):
        verify_bundle(REPO / "plugins" / "synthea-conditions" / "bundle", trusted_keys=[tmp_path / "a.pub"])


def test_a_third_party_unsigned_bundle_still_needs_the_flag() -> None:
    with pytest.raises(SignatureError, match="unsigned"):
        verify_bundle(TINY_PLUGIN)


def test_pins_check_reports_a_stale_pin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plugins = tmp_path / "plugins"
    shutil.copytree(REPO / "plugins" / "synthea-conditions" / "bundle", plugins / "synthea-conditions" / "bundle")
    manifest = plugins / "synthea-conditions" / "bundle" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes().replace(b'"version": "', b'"version": "9'))
    assert pins_main(["--plugins", str(plugins)]) == 1
    assert "synthea-conditions: pinned" in capsys.readouterr().out


# --- files are read once: what is on disk after verification does not matter ----------------------------------


def test_a_file_swapped_after_verification_is_not_used(tiny_bundle: Path, tiny_plugin: Plugin) -> None:
    verified = verify_bundle(tiny_bundle, allow_unsigned=True)
    # Swap the model for the int8 one (a valid model with other outputs) and break the tokenizer, on disk.
    shutil.copyfile(tiny_bundle / "model.int8.onnx", tiny_bundle / "model.fp32.onnx")
    (tiny_bundle / "tokenizer.json").write_text("{}")
    swapped = load_plugin(TINY_PLUGIN, allow_unsigned=True, variant="int8", provider="cpu").predict_texts(TEXTS)
    reference = tiny_plugin.predict_texts(TEXTS)
    assert not np.allclose(swapped, reference, atol=1e-6)  # the swap would be visible
    plugin = Plugin(verified, variant="fp32", provider="cpu")
    np.testing.assert_allclose(plugin.predict_texts(TEXTS), reference, rtol=0, atol=1e-6)


# --- only regular files, by name --------------------------------------------------------------------------------


def test_a_symlink_to_a_directory_outside_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tiny_bundle / "extras").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(IntegrityError, match=r"extras: is a symbolic link"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_an_empty_extra_directory_is_refused(tiny_bundle: Path) -> None:
    (tiny_bundle / "empty").mkdir()
    with pytest.raises(IntegrityError, match=r"empty: a directory that holds no declared file"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_a_declared_file_replaced_by_a_symlink_to_an_identical_copy_is_refused(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "labels-copy.json"
    shutil.copyfile(tiny_bundle / "labels.json", copy)
    (tiny_bundle / "labels.json").unlink()
    (tiny_bundle / "labels.json").symlink_to(copy)
    with pytest.raises(IntegrityError, match=r"labels\.json: is a symbolic link"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_a_symlink_to_a_device_is_refused(tiny_bundle: Path) -> None:
    (tiny_bundle / "README.md").unlink()
    (tiny_bundle / "README.md").symlink_to("/dev/null")
    with pytest.raises(IntegrityError, match=r"README\.md: is a symbolic link"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_a_socket_is_refused(tiny_bundle: Path) -> None:
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(tiny_bundle / "sock"))
        with pytest.raises(IntegrityError, match=r"sock: is a socket"):
            verify_bundle(tiny_bundle, allow_unsigned=True)
    finally:
        server.close()


def _finishes(func: object, seconds: float = 20.0) -> BaseException | None:
    """Run ``func`` in a daemon thread; fail the test (not hang it) when it blocks."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            func()  # type: ignore[operator]
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still blocked after {seconds} s"
    return outcome[0]


def test_a_fifo_is_refused_without_blocking(tiny_bundle: Path) -> None:
    (tiny_bundle / "README.md").unlink()
    os.mkfifo(tiny_bundle / "README.md")
    error = _finishes(lambda: verify_bundle(tiny_bundle, allow_unsigned=True))
    assert isinstance(error, IntegrityError) and "README.md: is a FIFO" in str(error)


def test_a_symlink_to_dev_zero_neither_hangs_nor_eats_memory(tiny_bundle: Path) -> None:
    (tiny_bundle / "README.md").unlink()
    (tiny_bundle / "README.md").symlink_to("/dev/zero")
    # In a child with 2 GiB of address space and a deadline: reading /dev/zero to its end never returns.
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
        "from fhirplug.bundle import verify_bundle\n"
        "from fhirplug.errors import IntegrityError\n"
        "try:\n"
        "    verify_bundle(sys.argv[1], allow_unsigned=True)\n"
        "except IntegrityError as exc:\n"
        "    print('refused:', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tiny_bundle)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "README.md: is a symbolic link" in done.stdout


def test_a_file_swapped_for_a_fifo_after_the_walk_is_refused_without_blocking(tiny_bundle: Path) -> None:
    with BundleDir(tiny_bundle, ManifestError) as folder:
        assert folder.entries()["labels.json"].kind == "file"
        (tiny_bundle / "labels.json").unlink()
        os.mkfifo(tiny_bundle / "labels.json")
        error = _finishes(lambda: folder.read("labels.json", IntegrityError))
    assert isinstance(error, IntegrityError) and "labels.json: is a FIFO" in str(error)


def test_a_file_swapped_for_a_symlink_after_the_walk_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    copy = tmp_path / "labels.json"
    shutil.copyfile(tiny_bundle / "labels.json", copy)
    with BundleDir(tiny_bundle, ManifestError) as folder:
        folder.entries()
        (tiny_bundle / "labels.json").unlink()
        (tiny_bundle / "labels.json").symlink_to(copy)
        with pytest.raises(IntegrityError, match="replaced by a symbolic link"):
            folder.read("labels.json", IntegrityError)


def test_a_file_that_grows_after_the_walk_is_refused(tiny_bundle: Path) -> None:
    with BundleDir(tiny_bundle, ManifestError) as folder:
        folder.entries()
        with (tiny_bundle / "labels.json").open("ab") as handle:
            handle.write(b" ")
        with pytest.raises(IntegrityError, match="size changed"):
            folder.read("labels.json", IntegrityError)


def test_a_directory_named_manifest_sig_is_refused(tiny_bundle: Path) -> None:
    (tiny_bundle / SIGNATURE_FILE).mkdir()
    with pytest.raises(SignatureError, match=r"manifest\.sig: is a directory, not a regular file"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_a_symlinked_manifest_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    shutil.move(tiny_bundle / "manifest.json", tmp_path / "manifest.json")
    (tiny_bundle / "manifest.json").symlink_to(tmp_path / "manifest.json")
    with pytest.raises(ManifestError, match=r"manifest\.json: is a symbolic link"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_size_caps(tiny_bundle: Path) -> None:
    (tiny_bundle / SIGNATURE_FILE).write_bytes(b"A" * 5000)
    with pytest.raises(SignatureError, match=r"manifest\.sig: is 5000 bytes, more than the 4096"):
        verify_bundle(tiny_bundle, allow_unsigned=True)
    (tiny_bundle / SIGNATURE_FILE).unlink()
    (tiny_bundle / "manifest.json").write_bytes(b" " * (1 << 20) + b"{}")
    with pytest.raises(ManifestError, match=r"more than the 1048576"):
        verify_bundle(tiny_bundle, allow_unsigned=True)


def test_packaging_refuses_what_verification_would(tiny_bundle: Path, tmp_path: Path) -> None:
    (tiny_bundle / "notes").symlink_to(tmp_path)
    with pytest.raises(IntegrityError, match="notes: is a symbolic link"):
        _resign(tiny_bundle, None)


# --- hostile manifest bytes: only FhirplugError comes out --------------------------------------------------------

GOOD = (TINY_PLUGIN / "manifest.json").read_bytes()


@st.composite
def _manifest_bytes(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "spliced", "nested", "digits"]))
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "nested":
        depth = draw(st.integers(1, 3000))
        return b'{"schema_version": 1, "metrics": ' + b"[" * depth + b"]" * draw(st.integers(0, depth)) + b"}"
    if kind == "digits":
        key = draw(st.sampled_from([b'"schema_version": 1', b'"opset": 13', b'"max_tokens": 32']))
        return GOOD.replace(key, key.split(b":")[0] + b": " + b"9" * draw(st.integers(15, 6000)), 1)
    data = bytearray(GOOD)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(0, len(data) - 1))
        if kind == "mutated":
            data[at] = draw(st.integers(0, 255))
        else:
            data[at:at] = draw(st.sampled_from([b"{", b"[", b"]", b'"', b"\\", b",", b"1e999", b"NaN", b"\xff"]))
    return bytes(data)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(_manifest_bytes())
def test_parse_manifest_raises_only_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


@settings(derandomize=True, max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(manifest=_manifest_bytes(), signature=st.one_of(st.none(), st.binary(max_size=200)))
def test_verify_bundle_raises_only_fhirplug_errors(
    hostile_bundle: Path, manifest: bytes, signature: bytes | None
) -> None:
    (hostile_bundle / "manifest.json").write_bytes(manifest)
    sig = hostile_bundle / SIGNATURE_FILE
    if signature is None:
        sig.unlink(missing_ok=True)
    else:
        sig.write_bytes(signature)
    with contextlib.suppress(FhirplugError):
        verify_bundle(hostile_bundle, allow_unsigned=True)


@pytest.fixture(scope="module")
def hostile_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("hostile") / "tiny-notes"
    shutil.copytree(TINY_PLUGIN, target)
    return target


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: "[" * 100_000 + "]" * 100_000, "nested 100000 levels deep"),
        (lambda t: t.replace('"schema_version": 1', '"schema_version": ' + "1" * 5000), "integer of 5000 digits"),
        (lambda t: t.replace('"schema_version": 1', '"schema_version": true'), "schema_version is True"),
        (lambda t: t.replace('"schema_version": 1', '"schema_version": 1, "schema_version": 1'), "duplicate key"),
        (lambda t: t.replace('"temperature": 1.5', '"temperature": NaN'), "NaN and Infinity are not allowed"),
        (lambda t: t.replace('"labels.json":', '"../labels.json":'), "not a file name inside the bundle"),
    ],
    ids=["deep", "digits", "bool-version", "duplicate", "nan", "traversal"],
)
def test_hostile_manifests_are_manifest_errors(tiny_bundle: Path, edit: object, message: str) -> None:
    manifest = tiny_bundle / "manifest.json"
    text = edit(manifest.read_text())  # type: ignore[operator]
    assert text != manifest.read_text()
    manifest.write_text(text)
    with pytest.raises(ManifestError, match=message):
        verify_bundle(tiny_bundle, allow_unsigned=True)
