"""Discovery: tasks and plugins found through entry points, the way pluggy loads setuptools plugins.

- Tasks: entry-point group ``fhirplug.tasks``; each entry point names a :class:`~fhirplug.tasks.base.Task`
  subclass. The built-ins ``text-classification`` and ``token-classification`` are registered through
  fhirplug's own entry points, and are also known without them (a source checkout that was never installed
  still works).
- Plugins: entry-point group ``fhirplug.plugins`` (an entry point names a callable returning the bundle
  directory, or a module with a ``BUNDLE_PATH``), every bundle directory under the folders listed in
  ``FHIRPLUG_PLUGIN_PATH`` (os.pathsep-separated), and the first-party bundles of a source checkout
  (``plugins/<name>/bundle``).
"""

from __future__ import annotations

import os
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path

from fhirplug.errors import PluginNotFoundError, TaskError
from fhirplug.manifest import MANIFEST_FILE
from fhirplug.tasks.base import Task

__all__ = ["discover_plugins", "get_task", "known_tasks", "resolve_plugin"]

TASK_GROUP = "fhirplug.tasks"
PLUGIN_GROUP = "fhirplug.plugins"
PLUGIN_PATH_ENV = "FHIRPLUG_PLUGIN_PATH"
#: A source checkout: sdk/fhirplug/registry.py → the repository root.
_CHECKOUT_PLUGINS = Path(__file__).resolve().parents[2] / "plugins"


@cache
def known_tasks() -> dict[str, type[Task]]:
    """Every task, by pipeline tag: the built-ins, then those other distributions register."""
    from fhirplug.tasks.text_classification import TextClassification
    from fhirplug.tasks.token_classification import TokenClassification

    tasks: dict[str, type[Task]] = {
        TextClassification.name: TextClassification,
        TokenClassification.name: TokenClassification,
    }
    for ep in entry_points(group=TASK_GROUP):
        if ep.name in tasks and ep.value.startswith("fhirplug.tasks."):
            continue
        try:
            cls = ep.load()
        except Exception as exc:  # a broken third-party distribution must not hide the others
            raise TaskError(f"task entry point {ep.name!r} ({ep.value}) failed to import: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TaskError(f"task entry point {ep.name!r} ({ep.value}) is not a fhirplug Task subclass")
        tasks[ep.name] = cls
    return tasks


def get_task(name: str) -> type[Task]:
    tasks = known_tasks()
    if name not in tasks:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def _bundles_under(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for manifest in sorted(folder.glob(f"*/{MANIFEST_FILE}")) + sorted(folder.glob(f"*/bundle/{MANIFEST_FILE}")):
        bundle = manifest.parent
        name = bundle.parent.name if bundle.name == "bundle" else bundle.name
        found.setdefault(name, bundle)
    return found


def discover_plugins() -> dict[str, Path]:
    """Plugin name → bundle directory, from entry points, FHIRPLUG_PLUGIN_PATH and a source checkout."""
    found: dict[str, Path] = {}
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            target = ep.load()
            path = target() if callable(target) else getattr(target, "BUNDLE_PATH", target)
            found.setdefault(ep.name, Path(path))
        except Exception:
            continue
    for folder in filter(None, os.environ.get(PLUGIN_PATH_ENV, "").split(os.pathsep)):
        for name, path in _bundles_under(Path(folder)).items():
            found.setdefault(name, path)
    for name, path in _bundles_under(_CHECKOUT_PLUGINS).items():
        found.setdefault(name, path)
    return found


def resolve_plugin(name_or_path: str | os.PathLike[str]) -> Path:
    """A bundle directory from a path, or from the name of a discovered plugin."""
    path = Path(name_or_path)
    if (path / MANIFEST_FILE).is_file() or path.is_dir():
        return path
    plugins = discover_plugins()
    if str(name_or_path) in plugins:
        return plugins[str(name_or_path)]
    known = ", ".join(sorted(plugins)) or "none"
    raise PluginNotFoundError(
        f"{name_or_path}: no such bundle directory and no discovered plugin of that name (discovered: {known}); "
        f"give a bundle path or add its folder to {PLUGIN_PATH_ENV}"
    )
