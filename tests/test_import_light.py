"""`import diffkit` loads only the core's dependencies, never the demo's or the CLI's."""

import subprocess
import sys

# The packages of the `demo` extra (and matplotlib, the docs' figures).
OPTIONAL = ("sklearn", "rich", "PIL", "tqdm", "yaml", "matplotlib")

LOADED = """
import sys
{before}
already = set(sys.modules)
import diffkit
optional = {optional!r}
print(sorted(m for m in set(sys.modules) - already if m.split(".")[0] in optional))
print("diffkit.cli" in sys.modules, "diffkit_demo" in sys.modules)
"""

BLOCKED = """
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {optional!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None

sys.meta_path.insert(0, Block())
import diffkit as dk
import torch
config = dk.builder.parse_config('{{"data_shape": [1, 8, 8], "schedule": {{"kind": "cosine"}}, '
    '"denoiser": {{"kind": "unet", "in_channels": 1, "base_channels": 8, "channel_mult": [1], '
    '"attention_resolutions": [], "attention_head_dim": 8, "norm_groups": 4, '
    '"blocks_per_level": 1}}}}')
try:
    dk.builder.parse_config("data_shape: [1, 8, 8]")
except ImportError as err:
    print("yaml:", err)
print(type(config).__name__)

class Terminal:
    def isatty(self):
        return True

    def write(self, text):
        pass

    def flush(self):
        pass

bar = dk.training.progress_bar(3, "train", file=Terminal())
print(type(bar).__name__)
"""


def _run(code: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_import_diffkit_loads_none_of_the_demo_packages_nor_the_cli() -> None:
    # torch itself imports tqdm when it is installed (torch.hub): count what diffkit adds
    found, cli = _run(LOADED.format(before="import torch", optional=OPTIONAL))
    assert found == "[]", f"import diffkit loaded {found}"
    assert cli == "False False"


def test_diffkit_imports_and_reads_json_configs_without_the_demo_extra() -> None:
    yaml_error, name, bar = _run(BLOCKED.format(optional=OPTIONAL))
    assert name == "PipelineConfig"
    assert bar == "_ProgressLines"  # no tqdm: a terminal gets plain progress lines
    assert "pip install 'diffkit[demo]'" in yaml_error and "pyyaml" in yaml_error
