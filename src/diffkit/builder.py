"""``build(config) -> Pipeline``: assemble a pipeline from a validated config.

``config`` is a [`PipelineConfig`][diffkit.pipeline_config.PipelineConfig], a mapping,
JSON / YAML text or a path; it is validated (its parts checked against each other)
before any weight exists, then each part is built through the registry of its group.
The names of [`diffkit.pipeline_config`][diffkit.pipeline_config] are re-exported here
(``PipelineConfig``, ``registry``, ``parse_config``, ``compatibility_problems``, ...).
"""

import os
from collections.abc import Mapping
from typing import Any

from diffkit.patches import PATCHIFIERS
from diffkit.pipeline import Pipeline
from diffkit.pipeline_config import (
    GROUPS,
    PipelineConfig,
    compatibility_problems,
    parse_config,
    registry,
    to_yaml,
)

__all__ = [
    "GROUPS",
    "PATCHIFIERS",
    "PipelineConfig",
    "build",
    "compatibility_problems",
    "parse_config",
    "registry",
    "to_yaml",
]


def build(config: PipelineConfig | Mapping[str, Any] | str | os.PathLike[str]) -> Pipeline:
    """Build the [`Pipeline`][diffkit.pipeline.Pipeline] a config describes (fresh weights).

    ``config`` may also be a mapping, JSON / YAML text, or a ``pathlib.Path`` to a JSON /
    YAML file (a plain ``str`` is always text); it is validated (parts checked against
    each other) before any component is built. ``build(config).config == config``.
    """
    return Pipeline.from_config(parse_config(config)).eval()
