"""mkdocs hook: draw the figures of ``docs/scripts/figures.py`` into the site.

The PNGs are added as generated files, so pages link to them like any other file
(``![...](../figures/schedules.png)``) and ``mkdocs build --strict`` checks those links.
They are cached in ``.cache/docs-figures/`` (git-ignored) under a hash of
``figures.py`` and every file of ``src/diffkit`` and ``src/diffkit_demo`` (one figure runs
the demo), so a rebuild redraws them only when the code they are drawn from has changed.
"""

import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

log = logging.getLogger("mkdocs.hooks.diffkit")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "docs-figures"


def _figures_module() -> Any:
    spec = importlib.util.spec_from_file_location("diffkit_docs_figures", HERE / "figures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fingerprint() -> str:
    digest = hashlib.sha256()
    packages = (ROOT / "src" / "diffkit", ROOT / "src" / "diffkit_demo")
    sources = [HERE / "figures.py", *sorted(p for pkg in packages for p in pkg.rglob("*.py"))]
    for path in sources:
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _render() -> dict[str, bytes]:
    folder = CACHE / _fingerprint()
    module = _figures_module()
    paths = list(module.FIGURES)
    if all((folder / p).is_file() for p in paths):
        log.info("diffkit: documentation figures from the cache %s", folder)
        return {p: (folder / p).read_bytes() for p in paths}
    start = time.perf_counter()
    figures = module.render_all()
    log.info("diffkit: drew the documentation figures in %.1fs", time.perf_counter() - start)
    for p, png in figures.items():
        target = folder / p
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(png)
    return figures


def on_files(files: Files, config: Any) -> Files:
    for path, png in _render().items():
        files.append(File.generated(config, path, content=png))
    return files
