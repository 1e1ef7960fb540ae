"""mkdocs hook: draw the figures of ``docs/scripts/figures.py`` into the site.

The PNGs are added as generated files, so pages link to them like any other file
(``![...](../figures/schedules.png)``) and ``mkdocs build --strict`` checks those links.

Each figure is cached on its own in ``.cache/docs-figures/`` (git-ignored), under a hash
of its inputs only (:meth:`figures.Figure.key`: its function's source, the helpers it
names, and the source files it declares it depends on). Editing one file of ``src/``
redraws only the figures that declared it; every other figure comes from the cache.
Drawing runs torch on one thread, so a build does not fight other work for the cores.
"""

import importlib.util
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch
from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.diffkit")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "docs-figures"


def _figures_module() -> Any:
    spec = importlib.util.spec_from_file_location("diffkit_docs_figures", HERE / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # inspect.getsource finds its classes through it
    spec.loader.exec_module(module)
    return module


def _render() -> dict[str, bytes]:
    module = _figures_module()
    out: dict[str, bytes] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for path, figure in module.FIGURES.items():
            cached = CACHE / f"{Path(path).stem}-{figure.key(ROOT)}.png"
            if cached.is_file():
                out[path] = cached.read_bytes()
                continue
            start = time.perf_counter()
            png = figure.draw()
            log.info("diffkit: drew %s in %.1fs", path, time.perf_counter() - start)
            # Older versions stay: switching branches back finds them (delete .cache freely).
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(png)
            out[path] = png
    finally:
        torch.set_num_threads(threads)
    return out


def on_files(files: Files, config: Any) -> Files:
    for path, png in _render().items():
        files.append(File.generated(config, path, content=png))
    return files
