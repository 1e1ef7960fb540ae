"""mkdocs hook: draw the figures of ``docs/scripts/figures.py`` into the site on every build.

The PNGs are added as generated files, so pages link to them like any other file
(``![...](../figures/schedules.png)``) and ``mkdocs build --strict`` checks those links.
"""

import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.diffkit")


def _figures_module() -> Any:
    path = Path(__file__).with_name("figures.py")
    spec = importlib.util.spec_from_file_location("diffkit_docs_figures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_files(files: Files, config: Any) -> Files:
    start = time.perf_counter()
    for path, png in _figures_module().render_all().items():
        files.append(File.generated(config, path, content=png))
    log.info("diffkit: drew the documentation figures in %.1fs", time.perf_counter() - start)
    return files
