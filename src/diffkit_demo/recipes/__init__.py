"""The demo recipes: their configs, the image and video runs, and ``run_demo``."""

import os
from typing import Any

from diffkit_demo.recipes.config import PIPELINE_DIR as PIPELINE_DIR
from diffkit_demo.recipes.config import DemoConfig as DemoConfig
from diffkit_demo.recipes.config import ImageDemoConfig as ImageDemoConfig
from diffkit_demo.recipes.config import StageTrainConfig as StageTrainConfig
from diffkit_demo.recipes.config import VideoDemoConfig as VideoDemoConfig
from diffkit_demo.recipes.config import default_config as default_config
from diffkit_demo.recipes.config import fast_config as fast_config
from diffkit_demo.recipes.config import load_demo_config as load_demo_config
from diffkit_demo.recipes.config import parse_demo_config as parse_demo_config
from diffkit_demo.recipes.config import recipe_yaml as recipe_yaml
from diffkit_demo.recipes.image import run_image_demo as run_image_demo
from diffkit_demo.recipes.stages import DemoResult as DemoResult
from diffkit_demo.recipes.stages import generate_samples as generate_samples
from diffkit_demo.recipes.stages import training_device as training_device
from diffkit_demo.recipes.video import run_video_demo as run_video_demo


def run_demo(
    config: DemoConfig,
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    console: Any = None,
) -> DemoResult:
    """Run the image or the video recipe, as ``config.kind`` says."""
    if isinstance(config, ImageDemoConfig):
        return run_image_demo(config, out, progress=progress, console=console)
    return run_video_demo(config, out, progress=progress, console=console)
