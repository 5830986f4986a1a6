"""Write a plugin folder's model card (plugins/<name>/README.md) from the card its real build generated.

The build's card (inside the bundle) is kept as it is, with repository-relative paths in the commands, the
multi-label exact-match row named as such, and the example inputs with what the committed bundle yields.

    python plugins/write_card.py <name> BUILD_BUNDLE "<the exact convert command that was run>"
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import fhirplug

HERE = Path(__file__).parent


def main(name: str, build: str, command: str) -> None:
    folder = HERE / name
    card = (Path(build) / "README.md").read_text(encoding="utf-8")
    card = re.sub(r"\| accuracy \|", "| exact-match accuracy (all codes right) |", card) if "AUROC" in card else card
    card = card.split("## Reproduce")[0].rstrip() + "\n"
    plugin = fhirplug.load_plugin(folder / "bundle", allow_unsigned=True)
    rows = ["| example | code | display | probability |", "|---|---|---|---|"]
    for path in sorted((folder / "examples").glob("*.json")):
        for p in plugin.predict_files([path]).predictions:
            rows.append(f"| {path.name} | {p.code} | {p.display} | {p.probability:.3f} |")
    expected = json.loads((folder / "expected.json").read_text())
    card += "\n## Example inputs (committed int8 bundle)\n\n" + "\n".join(rows) + "\n\n"
    card += f"`expected.json` promises: {json.dumps(expected)} (checked by tests/plugins/test_first_party.py).\n"
    card += (
        "\n## Reproduce\n\nFrom the repository root, with the train extra and the offline base model installed "
        "(see the top-level README), and ../shared/data beside the checkout:\n\n```bash\n"
        f"{command}\n"
        f'python -c "from fhirplug_convert.package import publish_variants as p; '
        f"p('plugins/{name}/build/bundle', 'plugins/{name}/bundle', ['int8'])\"\n"
        f'python plugins/write_card.py {name} plugins/{name}/build/bundle "{command}"\n```\n'
    )
    (folder / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {folder / 'README.md'}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
