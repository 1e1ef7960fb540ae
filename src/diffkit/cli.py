"""The ``diffkit`` command line: ``demo``, ``train``, ``sample`` and ``info``.

- ``diffkit demo [--task image|video] [--fast] [--out DIR]`` trains the offline
  text -> image (or text -> video) recipe of the ``diffkit_demo`` package on the
  bundled digits and writes samples, a summary and the saved pipeline to ``DIR``;
- ``diffkit train CONFIG.yaml [--out DIR]`` runs a demo recipe from a YAML file (copy
  one from ``configs/``); a ``train_run`` config is for ``python -m diffkit.training``;
- ``diffkit sample RUN_DIR [--prompt TEXT | --label N] ...`` loads a saved pipeline and
  samples: ``--prompt`` for a text pipeline, ``--label`` for a class-conditioned one,
  neither (``--num`` samples) for an unconditional one. Next to the image it writes a
  ``.npz``: ``images`` in [0, 1] shaped ``(n, h, w)`` for one channel and ``(n, c, h, w)``
  for more (videos ``(n, frames, h, w)`` / ``(n, frames, c, h, w)``), and ``prompts`` or
  ``labels`` per sample;
- ``diffkit info RUN_DIR`` prints the component graph with shapes and parameter counts.

Mistakes a user can make (a missing file, a bad config, a prompt too long, an unknown
sampler) print one line ``diffkit: error: ...`` and exit with status 2, no traceback.

The command line needs the ``demo`` extra (``pip install 'diffkit[demo]'``: rich for its
output, Pillow for images, scikit-learn and PyYAML for the recipes); each command imports
what it uses when it runs, and a missing package is reported as one line naming the extra.
``import diffkit`` does not import this module.
"""

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["UserError", "main"]

EXIT_USAGE = 2
# The sub-folder of a demo run that holds its pipeline (diffkit_demo.PIPELINE_DIR; a test
# checks they agree: ``diffkit sample`` and ``info`` need not import the demo for it).
PIPELINE_DIR = "pipeline"
# Top-level modules of the ``demo`` extra (and the demo package itself): a command that
# misses one says which extra to install.
DEMO_EXTRA_MODULES = frozenset({"diffkit_demo", "rich", "PIL", "sklearn", "yaml"})
# What ``diffkit sample --out`` can write (PIL picks the format from the extension).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# What ``diffkit sample`` writes next to the image (its --help and the module doc say it).
SAMPLE_NPZ = (
    "Next to the image it writes a .npz: 'images' in [0, 1], float32, shaped (n, h, w) for "
    "one channel and (n, c, h, w) for more (videos: (n, frames, h, w) or "
    "(n, frames, c, h, w)), in the order of the prompts / labels, --num each; 'prompts' or "
    "'labels' per sample when given. Videos also get one GIF per prompt / label."
)


class UserError(Exception):
    """A mistake in what the user asked for; reported as one line, exit status 2."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _console(quiet: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=False, quiet=quiet, highlight=False)


def _validation_message(err: Any) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e.get("loc", ())) or "(top level)"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(parts)


def _load_recipe(path: str) -> Any:
    """A demo recipe from a YAML file, with every failure turned into a ``UserError``."""
    import yaml
    from pydantic import ValidationError

    from diffkit_demo.recipes import parse_demo_config

    file = Path(path)
    if not file.exists():
        raise UserError(f"config file not found: {path}")
    if not file.is_file():
        raise UserError(f"config path is not a file: {path}")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path} is not valid YAML{where}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a text file") from None
    if isinstance(data, dict) and data.get("kind") == "train_run":
        raise UserError(
            f"{path} is a train_run config: run it with `python -m diffkit.training {path}`; "
            "`diffkit train` runs demo recipes (kind demo_image or demo_video)"
        )
    try:
        return parse_demo_config(data)
    except ValidationError as err:
        raise UserError(f"bad config {path}: {_validation_message(err)}") from None
    except ValueError as err:
        raise UserError(f"bad config {path}: {err}") from None


def _pipeline_dir(run_dir: str) -> Path:
    folder = Path(run_dir)
    if not folder.exists():
        raise UserError(f"run directory not found: {run_dir}")
    for candidate in (folder, folder / PIPELINE_DIR):
        if (candidate / "config.json").is_file():
            return candidate
    raise UserError(
        f"{run_dir} holds no saved pipeline (no config.json in it or in {PIPELINE_DIR}/)"
    )


def _load_pipeline(run_dir: str) -> Any:
    from pydantic import ValidationError

    from diffkit.checkpoint import CheckpointError
    from diffkit.pipeline import Pipeline

    folder = _pipeline_dir(run_dir)
    try:
        return Pipeline.load(folder)
    except CheckpointError as err:
        raise UserError(f"cannot load the pipeline in {folder}: {_one_line(err)}") from None
    except ValidationError as err:
        raise UserError(f"bad pipeline config in {folder}: {_validation_message(err)}") from None
    except RecursionError:  # json / pydantic on a config nested thousands of levels deep
        raise UserError(
            f"bad pipeline config {folder / 'config.json'}: nested too deeply"
        ) from None
    except (ValueError, OSError) as err:  # a tokenizer file (diffkit.files), a refused value
        raise UserError(f"cannot load the pipeline in {folder}: {_one_line(err)}") from None


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())


def _make_folder(folder: Path) -> None:
    """Create ``folder`` and its parents, or say in one line why it cannot be."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the folder {folder}: {err.strerror or err}") from None


def _check_target(target: Path) -> None:
    """Refuse to write ``target`` through a symbolic link or over a non-file."""
    if target.is_symlink():
        raise UserError(f"refusing to write {target}: it is a symbolic link")
    if target.exists() and not target.is_file():
        raise UserError(f"cannot write {target}: it exists and is not a regular file")


def _write_in_place(target: Path, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file in ``target``'s folder, then move it onto ``target``.

    The temporary file is new (``mkstemp``: never an existing file or a link), and
    ``os.replace`` swaps the directory entry: a symbolic link at ``target`` would be
    replaced, not followed; ``_check_target`` refuses one before anything is written.
    """
    _check_target(target)
    fd, name = tempfile.mkstemp(
        prefix=f".{target.stem}-", suffix=f".tmp{target.suffix}", dir=target.parent
    )
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        _check_target(target)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _threads(value: int | None) -> None:
    import torch

    torch.set_num_threads(value or os.cpu_count() or 1)


# --------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------


def _run_recipe(config: Any, args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from diffkit_demo.recipes import fast_config, run_demo, training_device

    update: dict[str, Any] = {}
    if args.seed is not None:
        # the demo's training takes its seed (train.seed) from the recipe's seed
        update["seed"] = args.seed
        update["train"] = {**config.train.to_dict(), "seed": args.seed}
    if args.threads is not None:
        update["threads"] = args.threads
    if update:
        config = type(config).model_validate({**config.to_dict(), **update})
    if args.fast:
        try:
            config = fast_config(config)
        except ValidationError as err:
            message = _validation_message(err)
            raise UserError(f"--fast does not fit this recipe: {message}") from None
    try:
        training_device(config)
    except ValueError as err:
        raise UserError(str(err)) from None
    console = _console(args.quiet)
    task = "image" if config.kind == "demo_image" else "video"
    out = Path(args.out) if args.out else Path(f"diffkit-demo-{task}")
    _make_folder(out)
    console.print(
        f"[bold]diffkit {task} demo[/] → {out}"
        + (" [yellow](--fast smoke run: quality is not the point)[/]" if args.fast else "")
    )
    result = run_demo(
        config, out, progress=not args.no_progress and not args.quiet, console=console
    )
    _print_summary(console, result)
    return 0


def _print_summary(console: Any, result: Any) -> None:
    from rich.table import Table

    table = Table(title=f"diffkit demo ({result.task}) — summary", show_lines=False)
    table.add_column("stage / metric")
    table.add_column("value", justify="right")
    table.add_column("CPU time", justify="right")
    table.add_column("final loss", justify="right")
    for name, seconds in result.times.items():
        loss = result.losses.get(name)
        cpu = result.cpu_times.get(name)
        table.add_row(
            f"time: {name}",
            f"{seconds:.1f} s",
            f"{cpu:.1f} s" if cpu is not None else "",
            f"{loss:.4f}" if loss is not None else "",
        )
    table.add_row(
        "time: total",
        f"{sum(result.times.values()):.1f} s",
        f"{sum(result.cpu_times.values()):.1f} s",
        "",
    )
    labels = {
        "judge_test_accuracy": "judge accuracy on held-out real digits",
        "clip_zero_shot_accuracy": "CLIP zero-shot accuracy (held-out digits)",
        "autoencoder_test_mse": "autoencoder reconstruction MSE (held-out)",
        "prompt_accuracy": "prompt accuracy of the samples (judge)",
        "check_on_real_clips": "video check on real held-out clips",
        "check_on_autoencoded_clips": "video check on those clips after the autoencoder",
        "digit_accuracy": "samples: digit right",
        "direction_accuracy": "samples: direction right",
        "accuracy": "samples: digit and direction right",
    }
    for key, label in labels.items():
        if key in result.metrics:
            value = result.metrics[key]
            text = f"{value:.4f}" if "mse" in key else f"{100 * value:.1f} %"
            table.add_row(label, text)
    console.print(table)
    for name, path in result.files.items():
        console.print(f"  {name}: {path}")


def cmd_demo(args: argparse.Namespace) -> int:
    """``diffkit demo``: the built-in recipe (or ``--config``)."""
    from diffkit_demo.recipes import default_config

    config = _load_recipe(args.config) if args.config else default_config(args.task)
    if args.config and config.kind != f"demo_{args.task}" and args.task_given:
        raise UserError(f"--task {args.task} but {args.config} is a {config.kind} recipe")
    return _run_recipe(config, args)


def cmd_train(args: argparse.Namespace) -> int:
    """``diffkit train CONFIG``: run a recipe from a YAML file."""
    config = _load_recipe(args.config)
    if not args.out:
        args.out = str(Path("runs") / Path(args.config).stem)
    return _run_recipe(config, args)


def _num_classes(pipeline: Any) -> int | None:
    """The denoiser's number of classes (its config's, else its label embedding's), or None."""
    from torch import nn

    classes = getattr(getattr(pipeline.config, "denoiser", None), "num_classes", None)
    if classes is not None:
        return int(classes)
    embed = getattr(pipeline.denoiser, "label_embed", None)
    return int(embed.num_embeddings) if isinstance(embed, nn.Embedding) else None


def _check_prompts(pipeline: Any, prompts: Sequence[str]) -> None:
    text = getattr(pipeline, "text", None)
    if text is None:
        can = "--label" if _num_classes(pipeline) is not None else "--num N unconditionally"
        raise UserError(
            f"this pipeline has no text conditioner; it cannot take --prompt (sample it with {can})"
        )
    tokenizer = getattr(text, "tokenizer", None)
    limit = int(getattr(text, "context_length", 0))
    for prompt in prompts:
        if not prompt.strip():
            raise UserError("empty --prompt; give some text")
        if tokenizer is not None and limit:
            n = len(tokenizer.encode(prompt)) + 2  # start and end tokens
            if n > limit:
                raise UserError(
                    f"prompt too long: {n} tokens with start/end, the text encoder takes at "
                    f"most {limit}: {prompt!r}"
                )


def _check_labels(pipeline: Any, labels: Sequence[int], null_label: int | None) -> int:
    """Refuse ``--label`` / ``--null-label`` the pipeline cannot take; its class count."""
    classes = _num_classes(pipeline)
    if classes is None:
        option = "--label" if labels else "--null-label"
        raise UserError(
            f"this pipeline is not class-conditioned (its denoiser has no num_classes); it "
            f"cannot take {option}"
        )
    for option, values in (("--label", labels), ("--null-label", [null_label])):
        for value in values:
            if value is not None and not 0 <= value < classes:
                raise UserError(
                    f"{option} {value} is out of range: the denoiser has {classes} classes "
                    f"(0 to {classes - 1})"
                )
    return classes


def _conditions(args: argparse.Namespace, pipeline: Any) -> tuple[dict[str, Any], list[str]]:
    """``Pipeline.generate`` keywords for the asked conditions, and one name per group."""
    import torch

    from diffkit.protocols import Conditioning

    labels = [label for group in args.label for label in group]
    classes = _num_classes(pipeline)
    if pipeline.text is not None and classes is not None:
        raise UserError(
            "this pipeline is conditioned on both text and class labels; diffkit sample "
            "takes one of them: use Pipeline.generate(cond=...) from Python"
        )
    if args.prompt and labels:
        raise UserError("pass --prompt or --label, not both")
    if args.prompt:
        _check_prompts(pipeline, args.prompt)
        if args.null_label is not None:
            _check_labels(pipeline, [], args.null_label)
        prompts = [p for p in args.prompt for _ in range(args.num)]
        return {"prompts": prompts}, [repr(p) for p in args.prompt]
    if labels or args.null_label is not None:
        _check_labels(pipeline, labels, args.null_label)
    if labels:
        guidance = args.guidance if args.guidance is not None else pipeline.config.guidance
        if guidance != 1 and args.null_label is None:
            raise UserError(
                f"guidance {guidance:g} on a class-conditioned pipeline needs --null-label "
                "(the 'no label' class it was trained to drop labels to); or pass --guidance 1"
            )
        repeated = torch.tensor([c for c in labels for _ in range(args.num)], dtype=torch.long)
        keywords: dict[str, Any] = {"cond": Conditioning(labels=repeated)}
        if args.null_label is not None and guidance != 1:
            keywords["uncond"] = Conditioning(labels=torch.tensor([args.null_label]))
        return keywords, [f"label {c}" for c in labels]
    if pipeline.text is not None:
        raise UserError("give at least one --prompt (this pipeline is text-conditioned)")
    if classes is not None:
        raise UserError(
            f"this pipeline is class-conditioned ({classes} classes); give --label, e.g. "
            "--label 3 or --label 0,1,2"
        )
    if args.guidance is not None and args.guidance != 1:
        raise UserError(
            "this pipeline is unconditional (no text conditioner, no class labels): "
            "--guidance has nothing to guide towards; leave it out"
        )
    return {"num_samples": args.num}, ["unconditional"]


def cmd_sample(args: argparse.Namespace) -> int:
    """``diffkit sample RUN_DIR [--prompt ... | --label ...]``: sample a saved pipeline."""
    import numpy as np
    import torch

    from diffkit.data import save_grid
    from diffkit.samplers import REGISTRY

    if args.sampler is not None and args.sampler not in REGISTRY:
        raise UserError(f"unknown sampler '{args.sampler}'; known: {', '.join(REGISTRY)}")
    if args.steps is not None and args.steps < 1:
        raise UserError(f"--steps must be at least 1, got {args.steps}")
    if args.guidance is not None and not 0 <= args.guidance < math.inf:
        raise UserError(f"--guidance must be a finite number >= 0, got {args.guidance}")
    if args.num < 1:
        raise UserError(f"--num must be at least 1, got {args.num}")
    if args.out and Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(
            f"--out {args.out}: unknown image extension {Path(args.out).suffix or '(none)'}; "
            f"use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    _threads(args.threads)
    pipeline = _load_pipeline(args.run_dir)
    conditions, groups = _conditions(args, pipeline)
    out = Path(args.out) if args.out else Path(args.run_dir) / "sample.png"
    _make_folder(out.parent)
    for target in (out, out.with_suffix(".npz")):  # refused before sampling, and again after
        _check_target(target)
    generator = torch.Generator().manual_seed(args.seed)
    try:
        samples = pipeline.generate(
            **conditions,
            steps=args.steps,
            guidance=args.guidance,
            sampler=args.sampler,
            generator=generator,
        ).float()
    except FloatingPointError as err:  # NonFiniteError: NaN / inf weights, or a bad dtype
        raise UserError(f"sampling failed: {_one_line(err)}; are the weights damaged?") from None
    except ValueError as err:  # a config that validates but cannot be sampled
        raise UserError(f"cannot sample the pipeline in {args.run_dir}: {_one_line(err)}") from None
    console = _console(args.quiet)
    video = samples.ndim == 5
    # a sampler can overshoot [-1, 1] far more than save_grid accepts: show it clamped
    clamped = samples.clamp(-1, 1)
    unit = ((clamped + 1) / 2).numpy()
    channels = samples.shape[-3]
    # SAMPLE_NPZ's layout: a single channel drops its axis, as in the demo's samples.npz
    array = (unit[:, :, 0] if video else unit[:, 0]) if channels == 1 else unit
    extra: dict[str, Any] = {}
    if "prompts" in conditions:
        extra["prompts"] = np.asarray(conditions["prompts"])
    if "cond" in conditions:
        extra["labels"] = conditions["cond"].labels.numpy()
    npz = out.with_suffix(".npz")
    gifs = [out.with_name(f"{out.stem}-{i}.gif") for i in range(len(groups))] if video else []
    for target in (out, npz, *gifs):
        _check_target(target)
    try:
        if video:
            from diffkit_demo.output import save_gif

            _write_in_place(out, lambda tmp: save_grid(clamped, tmp))
            for i, (group, gif) in enumerate(zip(groups, gifs, strict=True)):
                clips = samples[i * args.num : (i + 1) * args.num]
                _write_in_place(gif, lambda tmp, clips=clips: save_gif(clips, tmp))
                console.print(f"{group} → {gif}")
        else:
            _write_in_place(out, lambda tmp: save_grid(clamped, tmp, nrow=args.num))
        _write_in_place(npz, lambda tmp: np.savez(tmp, images=array, **extra))
    except OSError as err:
        raise UserError(f"cannot write {err.filename or out}: {err.strerror or err}") from None
    console.print(f"{len(samples)} samples → {out} (and {out.with_suffix('.npz').name})")
    return 0


def _params(module: Any) -> int:
    from torch import nn

    if not isinstance(module, nn.Module):
        return 0
    return sum(p.numel() for p in module.parameters())


def cmd_info(args: argparse.Namespace) -> int:
    """``diffkit info RUN_DIR``: the component graph with shapes and parameter counts."""
    from rich.markup import escape
    from rich.table import Table

    from diffkit.config import kind_of

    pipeline = _load_pipeline(args.run_dir)
    config = pipeline.config
    console = _console(False)
    data_shape = tuple(pipeline.data_shape or ())
    latent = tuple(pipeline.latent_shape()) if pipeline.data_shape else ()

    def kind(part: str) -> str:
        sub = getattr(config, part, None)
        return escape(f"[{kind_of(sub)}]") if sub is not None else ""

    def fmt(shape: Sequence[int]) -> str:
        return "(" + ", ".join(str(s) for s in shape) + ")"

    table = Table(title=f"pipeline {_pipeline_dir(args.run_dir)}")
    for column in ("component", "class [kind]", "input → output", "parameters"):
        table.add_column(column, justify="right" if column == "parameters" else "left")
    text = pipeline.text
    if text is not None:
        tokens = f"(context {text.context_length}, {text.token_dim})"
        table.add_row(
            "text",
            f"{type(text).__name__} {kind('text')}",
            f"prompts → tokens {tokens}, pooled ({text.pooled_dim})",
            f"{_params(text):,}",
        )
    denoiser = pipeline.denoiser
    patch = getattr(getattr(config, "denoiser", None), "patch_size", None)
    patches = ""
    if patch is not None and latent:
        sizes = (patch, patch) if isinstance(patch, int) else tuple(patch)
        if len(sizes) == 3:  # tubelets over (frames, height, width); channels sit between
            grid = [latent[0] // sizes[0], latent[-2] // sizes[1], latent[-1] // sizes[2]]
        else:
            grid = [latent[-2] // sizes[0], latent[-1] // sizes[1]]
        count = 1
        for g in grid:
            count *= g
        patches = f"; patches {fmt(sizes)} → {count} tokens"
    table.add_row(
        "denoiser",
        f"{type(denoiser).__name__} {kind('denoiser')}",
        f"x_t {fmt(latent)}, t, cond → {denoiser.prediction} {fmt(latent)}{patches}",
        f"{_params(denoiser):,}",
    )
    if pipeline.encoder is not None:
        encoder = pipeline.encoder
        table.add_row(
            "encoder",
            f"{type(encoder).__name__} {kind('encoder')}",
            f"data {fmt(data_shape)} ⇄ latent {fmt(latent)} (scale {encoder.scaling_factor:.4g})",
            f"{_params(encoder):,}",
        )
    table.add_row(
        "schedule", f"{type(pipeline.schedule).__name__} {kind('schedule')}", "t → α, σ", "0"
    )
    sampler = pipeline.sampler
    sampler_name = type(sampler).__name__ if sampler is not None else "DPMSolverPP (default)"
    table.add_row(
        "sampler",
        f"{sampler_name} {kind('sampler')}",
        f"{getattr(config, 'steps', '?')} steps, guidance {getattr(config, 'guidance', '?')}",
        "0",
    )
    table.add_row("total", "", "", f"{_params(pipeline):,}")
    console.print(table)
    console.print(_flow(pipeline, fmt(latent), fmt(data_shape)))
    return 0


def _flow(pipeline: Any, latent: str, data_shape: str) -> str:
    """The pipeline's data flow, from prompts / labels and noise to samples, as text."""
    classes = _num_classes(pipeline)
    sources = ["prompts ─▶ text"] if pipeline.text is not None else []
    sources += [f"labels ({classes} classes)"] if classes is not None else []
    flow = f"{' + '.join(sources)} ─▶ cond ─┐\n" if sources else ""
    space = "latent" if pipeline.encoder is not None else "sample"
    flow += f"noise {latent} ─▶ sampler ⟲ denoiser ─▶ {space} {latent}"
    if pipeline.encoder is not None:
        flow += f" ─▶ encoder.decode ─▶ {data_shape}"
    return flow


# --------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit status 2 (its own convention)."""

    def error(self, message: str) -> Any:
        self.exit(EXIT_USAGE, f"diffkit: error: {message}\n")


def _int_at_least(text: str, minimum: int) -> int:
    """An integer ``>= minimum`` from ``text``, or argparse's one-line error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
    return value


def _positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1."""
    return _int_at_least(text, 1)


def _label(text: str) -> int:
    """An argparse ``type``: a class label, an integer >= 0."""
    return _int_at_least(text, 0)


def _labels(text: str) -> list[int]:
    """An argparse ``type``: class labels, comma-separated integers >= 0."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"must be integers >= 0 separated by commas, got {text!r}")
    return [_label(part) for part in parts]


def _seed(text: str) -> int:
    """An argparse ``type``: a seed, an integer from 0 to ``diffkit.config.SEED_MAX``."""
    from diffkit.config import SEED_MAX

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be from 0 to 2**63 - 1, got {value}")
    return value


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="output folder (samples, summary.json, pipeline/)")
    p.add_argument("--fast", action="store_true", help="≤ 1 minute smoke run (tests, CI)")
    p.add_argument("--seed", type=_seed, help="override the recipe's seed")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffkit`` argument parser."""
    parser = _Parser(
        prog="diffkit",
        description="diffkit: typed diffusion components. Start with `diffkit demo`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser(
        "demo", help="train the offline text→image (or video) demo on the bundled digits"
    )
    demo.add_argument("--task", choices=("image", "video"), default=None, help="default: image")
    demo.add_argument("--config", help="a recipe YAML to run instead of the built-in one")
    _add_run_options(demo)
    demo.set_defaults(func=cmd_demo)

    trainer = sub.add_parser("train", help="run a recipe from a YAML config (see configs/)")
    trainer.add_argument(
        "config",
        help="recipe YAML (kind: demo_image or demo_video; a train_run config is for "
        "`python -m diffkit.training`)",
    )
    _add_run_options(trainer)
    trainer.set_defaults(func=cmd_train)

    sample = sub.add_parser(
        "sample",
        help="sample a saved pipeline",
        description="Sample a saved pipeline: --prompt for a text pipeline, --label for a "
        "class-conditioned one, neither for an unconditional one. " + SAMPLE_NPZ,
    )
    sample.add_argument("run_dir", help="a demo/train output folder or a saved pipeline")
    sample.add_argument(
        "--prompt", action="append", default=[], help="text (repeatable); text pipelines"
    )
    sample.add_argument(
        "--label",
        action="append",
        type=_labels,
        default=[],
        help="class labels, e.g. 3 or 0,1,2 (repeatable); class-conditioned pipelines",
    )
    sample.add_argument(
        "--null-label",
        type=_label,
        help="the 'no label' class, for guidance != 1 with --label",
    )
    sample.add_argument(
        "--num",
        type=int,
        default=4,
        help="samples per prompt or label (an unconditional pipeline: samples)",
    )
    sample.add_argument("--steps", type=int, help="sampler steps (default: the pipeline's)")
    sample.add_argument("--sampler", help="name in diffkit.samplers.REGISTRY, e.g. dpmpp_2m")
    sample.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    sample.add_argument("--seed", type=_seed, default=0, help="random seed")
    sample.add_argument("--out", help="PNG path (default: RUN_DIR/sample.png)")
    sample.add_argument(
        "--threads", type=_positive_int, help="torch CPU threads (default: all cores)"
    )
    sample.add_argument("--quiet", action="store_true", help="print nothing but errors")
    sample.set_defaults(func=cmd_sample)

    info = sub.add_parser("info", help="component graph, shapes and parameter counts")
    info.add_argument("run_dir", help="a demo/train output folder or a saved pipeline")
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``diffkit`` command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        args.task_given = args.task is not None
        args.task = args.task or "image"
        if args.config and not args.task_given:
            args.task = "image"
    try:
        return int(args.func(args))
    except UserError as err:
        print(f"diffkit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in DEMO_EXTRA_MODULES:
            raise
        print(
            f"diffkit: error: `diffkit {args.command}` needs the module '{err.name}' of the "
            "demo extra: pip install 'diffkit[demo]'",
            file=sys.stderr,
        )
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
