"""diffkit's offline demos, text -> image and text -> video on real digits (``diffkit demo``).

Everything is trained from scratch on scikit-learn's bundled handwritten digits (no
download), on the CPU, in minutes (``train.device`` can move the denoiser's training to a
GPU). This package ships in the ``diffkit`` distribution but is no part of the library:
install its dependencies with ``pip install 'diffkit[demo]'``.

- [`diffkit_demo.recipes`][diffkit_demo.recipes]: the recipes as configs
  ([`ImageDemoConfig`][diffkit_demo.recipes.config.ImageDemoConfig],
  [`VideoDemoConfig`][diffkit_demo.recipes.config.VideoDemoConfig]) and their runs
  ([`run_image_demo`][diffkit_demo.recipes.image.run_image_demo],
  [`run_video_demo`][diffkit_demo.recipes.video.run_video_demo], ``run_demo``);
- [`diffkit_demo.datasets`][diffkit_demo.datasets]: the captioned digits, still and moving;
- [`diffkit_demo.judges`][diffkit_demo.judges]: independent classifiers that score samples;
- [`diffkit_demo.output`][diffkit_demo.output]: sample grids as images, GIFs of clips.
"""

from diffkit_demo import datasets as datasets
from diffkit_demo import judges as judges
from diffkit_demo import output as output
from diffkit_demo import recipes as recipes
from diffkit_demo.judges import DigitJudge as DigitJudge
from diffkit_demo.judges import VideoJudge as VideoJudge
from diffkit_demo.recipes import PIPELINE_DIR as PIPELINE_DIR
from diffkit_demo.recipes import DemoResult as DemoResult
from diffkit_demo.recipes import ImageDemoConfig as ImageDemoConfig
from diffkit_demo.recipes import VideoDemoConfig as VideoDemoConfig
from diffkit_demo.recipes import default_config as default_config
from diffkit_demo.recipes import fast_config as fast_config
from diffkit_demo.recipes import run_demo as run_demo
