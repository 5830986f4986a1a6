"""``fhirplug convert``: the converter's click command (the SDK's CLI attaches it lazily).

Exit codes: 0 the bundle has every variant the recipe asked for (or left out only what ``export.allow_drop``
permits) · 7 nothing written (bad recipe or data, fp32 export disagrees with torch, a ``parity.require`` variant
failed) · 8 bundle written without some variants (they failed the parity gate; ``parity.json`` says why).
"""

from __future__ import annotations

import json

import click

from fhirplug.errors import FhirplugError, MissingExtraError

__all__ = ["PARTIAL_BUNDLE_EXIT", "RECIPE_REFERENCE", "convert"]

#: Exit status of a run that wrote a bundle without some of its variants (they failed the parity gate).
PARTIAL_BUNDLE_EXIT = 8
#: Where users find every recipe key, its default and meaning, and example recipes.
RECIPE_REFERENCE = "docs/recipe.md"


class _ConvertFailed(click.ClickException):
    """A one-line message and the error family's exit code (7 for ConvertError), no traceback."""

    def __init__(self, error: FhirplugError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code


class _PartialBundle(click.ClickException):
    """The bundle was written, but without variants that failed the parity gate: exit 8, no traceback."""

    exit_code = PARTIAL_BUNDLE_EXIT


def _timings_line(timings: dict[str, float]) -> str:
    stages = " · ".join(f"{stage} {seconds:.1f} s" for stage, seconds in timings.items())
    return f"timings: {stages} · total {sum(timings.values()):.1f} s"


@click.command(
    "convert",
    epilog=f"Recipe reference (every key, its default and meaning, an example per method and task): "
    f"{RECIPE_REFERENCE} in the fhirplug repository, or print it with `python -m fhirplug_convert._recipe_docs`. "
    "Exit codes: 0 built; 7 nothing written (recipe, data, fp32 parity, a parity.require variant); "
    f"{PARTIAL_BUNDLE_EXIT} built without some variants (they failed the parity gate; see parity.json).",
)
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@click.option(
    "--sign-key",
    type=click.Path(exists=True, dir_okay=False),
    help="ed25519 private key (PEM) to sign the manifest with (make one with `fhirplug keygen`).",
)
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop training after N optimizer steps.")
@click.option("--epochs", type=click.IntRange(min=1), help="Override training.epochs.")
@click.option("--max-train-examples", type=click.IntRange(min=1), help="Train on at most N examples.")
@click.option(
    "--save-checkpoint",
    type=click.Path(file_okay=False),
    help="Also save the trained PyTorch model + tokenizer here (the baseline for benchmarks/compare.py).",
)
@click.option(
    "--from-checkpoint",
    type=click.Path(file_okay=False),
    help="Skip training: package the model this recipe fine-tuned earlier (saved with --save-checkpoint).",
)
@click.option("--quiet", is_flag=True, help="No progress bars or step lines; only the result.")
def convert(
    recipe: str,
    out_dir: str,
    sign_key: str | None,
    max_steps: int | None,
    epochs: int | None,
    max_train_examples: int | None,
    save_checkpoint: str | None,
    from_checkpoint: str | None,
    quiet: bool,
) -> None:
    """Fine-tune, export, quantize, parity-check and package a plugin from RECIPE (TOML or YAML)."""
    try:
        from fhirplug_convert.pipeline import convert as run
    except ImportError as exc:  # torch, transformers, onnx …: the [train] extra is not installed
        raise _ConvertFailed(MissingExtraError("train", "fhirplug convert")) from exc

    try:
        result = run(
            recipe,
            out_dir,
            sign_key=sign_key,
            progress=False if quiet else None,
            log=None if quiet else lambda line: click.echo(line, err=True),
            max_steps=max_steps,
            epochs=epochs,
            max_train_examples=max_train_examples,
            checkpoint=save_checkpoint,
            from_checkpoint=from_checkpoint,
        )
    except FhirplugError as exc:
        report = getattr(exc, "report", None)  # a failed parity gate: show what was measured, then the verdict
        if report is not None:
            click.echo(json.dumps(report, indent=2, sort_keys=True), err=True)
        raise _ConvertFailed(exc) from exc
    if not quiet:
        click.echo(_timings_line(result.timings), err=True)
    variants = ", ".join(result.parity.get("packaged", []))
    dropped = result.parity.get("dropped", [])
    click.echo(f"built {result.bundle} ({variants})" + (f"; left out: {', '.join(dropped)}" if dropped else ""))
    if result.left_out:
        reasons = " | ".join(
            f"{p}: {'; '.join(result.parity['variants'][p].get('reasons', ['failed']))}" for p in result.left_out
        )
        raise _PartialBundle(
            f"bundle written without {', '.join(result.left_out)}, which failed the parity gate ({reasons}); "
            "list it in export.allow_drop to accept this, or in parity.require to make it an error"
        )
