"""The ``spinemm`` command: phantom, cache, inspect, predict, evaluate, zero-shot, demo.

Exit codes: 0 done; 2 bad input (a usage error, or a file, folder, table, DICOM, model or config
spinemm cannot use: one line that names it); 1 an unexpected error (one line; ``--debug`` shows
the traceback); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .constants import CANAL, CONDITIONS, LEVELS
from .errors import SpineError

EXIT_OK, EXIT_UNEXPECTED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
#: A model name as every command reads it (spinemm.models.names).
MODEL_HELP = "a pipeline or model folder, a preset (e.g. spine-tiny), a .safetensors file or hf-hub:org/name"


def _cmd_phantom(args: argparse.Namespace) -> None:
    from .data.phantom import make_phantom

    root = make_phantom(args.root, n_studies=args.n_studies, n_test=args.n_test, seed=args.seed,
                        image_size=args.image_size, label_noise=args.label_noise, progress=not args.quiet,
                        workers=args.workers, variety=args.variety, oblique_axial=args.oblique_axial,
                        axial_slices=tuple(args.axial_slices) if args.axial_slices else None,
                        overwrite=args.overwrite)
    info = json.loads((Path(root) / "phantom_info.json").read_text())
    print(f"phantom written to {root}: {args.n_studies} train studies, {info.get('n_test')} test studies")
    print(f"  prior-only score {info['prior_score']:.4f}   oracle floor {info['oracle_score']:.4f}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from .data.summary import summarize

    print(summarize(args.root, split=args.split))
    if args.png:
        from .data.tables import load_tables
        from .viz import study_montage

        study = args.study if args.study is not None else int(load_tables(args.root, args.split).study_id.iloc[0])
        print(f"montage written to {study_montage(args.root, study, args.png, split=args.split)}")


def _cmd_predict(args: argparse.Namespace) -> None:
    from .data.store import SeriesStore
    from .files import OutputLock, write_together
    from .inference import predict
    from .pipeline import load_pipeline

    out = Path(args.out)
    # one run writes into --out at a time (taken before the work, so a clash is refused at once); every
    # rank has all rows and the main one writes them, the pair replacing the old pair whole
    with OutputLock(out) if _main_rank() else contextlib.nullcontext():
        model = load_pipeline(args.model)
        _note_if_preset(args.model)
        store = SeriesStore(args.data, args.split, cache_dir=args.cache_dir)  # the overlays read the same series
        with warnings.catch_warnings(record=True) as caught:  # shown as ever, and kept beside the outputs
            warnings.simplefilter("default")
            submission, locations = predict(model, args.data, split=args.split, batch_size=args.batch_size,
                                            device=args.device, store=store, workers=args.workers)
        for w in caught:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if not _main_rank():
            return
        # warnings.txt names every series that was not read (its findings keep the detect stage's
        # grades, read from the study's other series) and all else predict warned about; empty if none
        notes = "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
        write_together({out / "submission.csv": submission.to_csv(index=False).encode(),
                        out / "locations.csv": locations.to_csv(index=False).encode(),
                        out / "warnings.txt": notes.encode()})
        print(f"wrote {out / 'submission.csv'} ({len(submission)} rows) and {out / 'locations.csv'}"
              + (f"; {len(caught)} warning(s) in {out / 'warnings.txt'}" if caught else ""))
        if args.png:
            from .viz import location_overlays

            for path in location_overlays(args.data, locations, out / "overlays", split=args.split,
                                          max_studies=args.png, store=store):
                print(f"  overlay {path}")


def _note_if_preset(name: str) -> None:
    from .models.factory import list_models

    if name in list_models():
        print(f"note: {name} is a preset: its upstream towers are as configured, its fusion and heads are "
              f"untrained (random), so its predictions only show the pipeline runs", file=sys.stderr)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    from .files import write_atomic
    from .metrics import evaluate_frames, format_metrics

    result = evaluate_frames(pd.read_csv(args.solution), pd.read_csv(args.submission))
    print(format_metrics(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=2).encode())


def _cmd_zero_shot(args: argparse.Namespace) -> None:
    from .models.factory import load_model
    from .text import severity_prompts
    from .zero_shot import zero_shot_classify

    model = load_model(args.model)
    _note_if_preset(args.model)
    prompts = args.prompt or severity_prompts(args.condition, args.level)
    images = [str(p) for p in args.images]
    if args.at is not None:  # the crops the dual encoder was pretrained on, around one point
        from .zero_shot import crop_finding

        x, y = args.at
        images = [crop_finding(p, x, y, side_mm=model.config.roi_side_mm, size=model.image_size) for p in images]
    probs = zero_shot_classify(model, images, prompts)
    names = list(prompts) if isinstance(prompts, dict) else prompts
    for image, row in zip(args.images, probs.tolist(), strict=True):
        best = max(range(len(row)), key=row.__getitem__)
        scores = "  ".join(f"{n}: {p:.3f}" for n, p in zip(names, row, strict=True))
        print(f"{image}: {names[best]}   ({scores})")


def _cmd_demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    settings = {**({"grader": args.grader} if args.grader else {}),
                **({"variety": args.variety, "oblique_axial": 0.3} if args.variety else {})}
    run_demo(args.out, n_studies=args.n_studies, seed=args.seed, quick=args.quick, settings=settings,
             train_seed=args.train_seed, overwrite=args.overwrite)


def _cmd_cache(args: argparse.Namespace) -> None:
    from .data.prepare import fill_cache

    report = fill_cache(args.root, args.cache_dir, split=args.split, workers=args.workers, progress=not args.quiet)
    if _main_rank():  # every rank has the whole report; one prints
        print(f"{args.cache_dir}: {report}")
    if report.failed:
        raise SpineError(f"{len(report.failed)} series could not be read, e.g. {next(iter(report.failed))}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, except where there is none to show (None, an off flag)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="spinemm", description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the command
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, helptext: str, func: Callable[[argparse.Namespace], None]) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=helptext, description=helptext, parents=[debug], formatter_class=_HelpFormatter)
        p.set_defaults(func=func)
        return p

    p = command("phantom", "write the synthetic RSNA-layout phantom dataset", _cmd_phantom)
    p.add_argument("root", help="the folder to write (created)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a phantom already there, finished or interrupted (never other data)")
    p.add_argument("--n-studies", type=int, default=60, help="train studies")
    p.add_argument("--n-test", type=int, default=None, help="test studies (default: a fifth of --n-studies, at least 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.add_argument("--image-size", type=int, default=128, help="pixels per side of each slice (plain phantom)")
    p.add_argument("--variety", choices=["kaggle"], default=None,
                   help="scan like the real RSNA set: each series its own matrix (256-1024 px, some not "
                        "square) and spacing, 15-20 sagittal and 30-60 axial slices, 12/16-bit vendors, "
                        "MONOCHROME1, JPEG 2000 / JPEG-LS / RLE files (default: one square matrix)")
    p.add_argument("--oblique-axial", type=float, default=0.0,
                   help="share of studies whose Axial T2 is one block per level, angled to its disc")
    p.add_argument("--label-noise", type=float, default=0.1,
                   help="fraction of recorded labels that differ from the true grade")
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing studies (default: one per core, 8 studies or more each)")
    p.add_argument("--axial-slices", type=int, nargs=2, default=None, metavar=("FEWEST", "MOST"),
                   help="slices of each Axial T2 series per disc level (default: 3 5, or 6 12 with "
                        "--variety kaggle)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("cache", "decode every series of a folder into a series cache, with all cores", _cmd_cache)
    p.add_argument("root", help="an RSNA-layout folder")
    p.add_argument("--cache-dir", required=True, help="the cache folder (predict and training read it as cache_dir)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to cache")
    p.add_argument("--workers", type=int, default=None,
                   help="processes (default: one per core, shared by the ranks of an accelerate launch; 0: this one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = command("inspect", "summarise an RSNA-layout folder; --png draws one study", _cmd_inspect)
    p.add_argument("root", help="an RSNA-layout folder (train.csv, *_series_descriptions.csv, *_images/)")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to summarise")
    p.add_argument("--png", help="write a montage of one study's three planes here")
    p.add_argument("--study", type=int, help="study for --png (default: the first)")

    p = command("predict", "write submission.csv and locations.csv for a folder", _cmd_predict)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="an RSNA-layout folder")
    p.add_argument("--out", required=True, help="folder for submission.csv, locations.csv (and overlays/)")
    p.add_argument("--split", default="test", choices=["train", "test"], help="which split to predict")
    p.add_argument("--batch-size", type=int, default=2, help="studies per forward pass")
    p.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: where the model is, the CPU)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes, each predicting a share of the studies (0: this process alone)")
    p.add_argument("--cache-dir", default=None, help="a series cache folder (`spinemm cache` fills one)")
    p.add_argument("--png", type=int, nargs="?", const=3, default=0,
                   help="also draw predicted locations for this many studies (3 when given without a number)")

    p = command("evaluate", "official score + accuracy/precision/recall of a submission", _cmd_evaluate)
    p.add_argument("--solution", required=True, help="solution CSV: row_id, the three severity columns, sample_weight")
    p.add_argument("--submission", required=True, help="submission CSV: row_id and the three severity columns")
    p.add_argument("--json", help="also write the metrics here")

    p = command("zero-shot", "score images (DICOM files) against prompts", _cmd_zero_shot)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("images", nargs="+", help="DICOM files")
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: the severity prompts")
    p.add_argument("--condition", default=CANAL, choices=CONDITIONS, help="condition of the default severity prompts")
    p.add_argument("--level", default=None, choices=LEVELS,
                   help="level of the default severity prompts, e.g. l4_l5 (default: none named)")
    p.add_argument("--at", nargs=2, type=float, metavar=("X", "Y"), default=None,
                   help="score a crop around this pixel (column, row), model.config.roi_side_mm wide, as "
                        "pretraining cut them (default: the whole image)")

    p = command("demo", "phantom -> pretrain -> train -> evaluate -> predict -> report", _cmd_demo)
    p.add_argument("--out", default="demo_out", help="folder for the phantom, the runs and report/")
    p.add_argument("--n-studies", type=int, default=None, help="phantom train studies (default: 160, 8 with --quick)")
    p.add_argument("--seed", type=int, default=0, help="seed of the phantom, the split and training")
    p.add_argument("--train-seed", type=int, default=None,
                   help="seed of the split and training alone (default: --seed): the same data, another run")
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out (its phantom and its runs' checkpoints)")
    p.add_argument("--variety", choices=["kaggle"], default=None,
                   help="train and test on studies shaped like the real set (spinemm phantom --variety, "
                        "with 30%% oblique axial blocks); slower: bigger files")
    p.add_argument("--grader", choices=["cnn", "clip-vit", "cnn-film"], default=None,
                   help="the tower pretrained and then read by the grade stage under the BERT queries: a "
                        "conv tower (cnn, the default) or the tiny ViT (clip-vit); or the earlier FiLM "
                        "grader (cnn-film)")
    return parser


def run_guarded(func: Callable[[], Any], name: str, debug: bool) -> int:
    """Call ``func``; turn an error into one line on stderr and an exit code (module docstring).
    With ``debug`` the error propagates with its full traceback."""
    try:
        func()
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # the reader closed the pipe (`spinemm evaluate ... | head -2`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_OK
    except Exception as err:
        if debug:
            raise
        if isinstance(err, (SpineError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
            print(f"{name}: error: {err}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"{name}: unexpected error: {type(err).__name__}: {err} (run with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_UNEXPECTED
    return EXIT_OK


def run_recipe(main: Callable[[list[str]], Any], argv: Sequence[str] | None = None) -> int:
    """What a recipe script's ``__main__`` runs: ``main(argv)`` with the CLI's error handling
    (``--debug`` anywhere in ``argv`` shows tracebacks and is not passed on)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    return run_guarded(lambda: main(args), Path(sys.argv[0]).name, debug)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_guarded(lambda: args.func(args), f"spinemm {args.command}", args.debug)
    finally:
        _leave_process_group()


def _main_rank() -> bool:
    """Whether this process writes a command's outputs: always, unless it is a rank other than 0
    of an ``accelerate launch``."""
    return int(os.environ.get("RANK", "0")) == 0


def _leave_process_group() -> None:
    """Under ``accelerate launch``, leave the process group before exiting. A gloo group left for
    the interpreter's exit to tear down aborted a rank in 4 of 10 two-process ``cache`` runs
    ("terminate called without an active exception")."""
    distributed = sys.modules.get("torch.distributed")  # None: the command never imported torch
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
