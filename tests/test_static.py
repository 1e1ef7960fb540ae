"""The code in ``tests/static`` (type-checked by CI's pyright) runs, and configs stay checkable."""

import ast
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from diffkit.config import Config

ROOT = Path(__file__).resolve().parents[1]


def _user_code() -> ModuleType:
    path = ROOT / "tests" / "static" / "user_code.py"
    spec = importlib.util.spec_from_file_location("diffkit_static_user_code", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_user_code_runs() -> None:
    user = _user_code()
    configs = user.default_configs()
    assert configs and all(isinstance(c, Config) for c in configs)
    run = user.a_training_run()
    assert run.train.steps == 4 and run.pipeline.data_shape == (1, 16, 16)
    assert user.sample_with_own_denoiser().shape == (2, 1, 4, 4)


def test_user_code_covers_every_defaultable_config() -> None:
    """A new public config without required fields must be added to ``default_configs``."""

    def subclasses(cls: type) -> set[type]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    built = {type(c) for c in _user_code().default_configs()}
    missing = sorted(
        f"{c.__module__}.{c.__qualname__}"
        for c in subclasses(Config)
        if c.__module__.startswith("diffkit.")  # not the tests' own configs
        and not c.__name__.startswith("_")
        and not inspect.isabstract(c)  # bases such as SamplerBase: nothing to build
        and "kind" in c.model_fields  # not an abstract base (ScheduleBase)
        and not c.__module__.startswith("diffkit_demo")  # recipes, built from YAML
        and not any(f.is_required() for f in c.model_fields.values())
        and c not in built
    )
    assert not missing, f"add these to tests/static/user_code.py default_configs(): {missing}"


def test_field_defaults_are_keywords() -> None:
    """``Field(x, ...)``: pyright's pydantic support misses a positional default, so users'
    checkers would report every such field as a missing argument; write ``default=x``."""
    offenders = []
    for path in sorted((ROOT / "src" / "diffkit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "Field"
                and node.args
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not offenders, f"Field with a positional default (use default=): {offenders}"
