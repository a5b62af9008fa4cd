"""The ``spinemm`` command: phantom, cache, inspect, predict, evaluate, zero-shot, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import SpineError


def _cmd_phantom(args: argparse.Namespace) -> None:
    from .data.phantom import make_phantom

    root = make_phantom(args.root, n_studies=args.n_studies, n_test=args.n_test, seed=args.seed,
                        image_size=args.image_size, label_noise=args.label_noise, progress=not args.quiet,
                        workers=args.workers)
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
    from .inference import predict
    from .pipeline import load_pipeline

    model = load_pipeline(args.model)
    store = SeriesStore(args.data, args.split, cache_dir=args.cache_dir)  # the overlays read the same series
    submission, locations = predict(model, args.data, split=args.split, batch_size=args.batch_size,
                                    device=args.device, store=store, workers=args.workers)
    if int(os.environ.get("RANK", "0")) != 0:  # under `accelerate launch`: every rank has all rows; one writes
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    submission.to_csv(out / "submission.csv", index=False)
    locations.to_csv(out / "locations.csv", index=False)
    print(f"wrote {out / 'submission.csv'} ({len(submission)} rows) and {out / 'locations.csv'}")
    if args.png:
        from .viz import location_overlays

        for path in location_overlays(args.data, locations, out / "overlays", split=args.split, max_studies=args.png,
                                      store=store):
            print(f"  overlay {path}")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    import pandas as pd

    from .metrics import evaluate_frames, format_metrics

    result = evaluate_frames(pd.read_csv(args.solution), pd.read_csv(args.submission))
    print(format_metrics(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


def _cmd_zero_shot(args: argparse.Namespace) -> None:
    from .models.factory import load_model
    from .text import severity_prompts
    from .zero_shot import zero_shot_classify

    model = load_model(args.model)
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

    settings = {"grader": args.grader} if args.grader else None
    run_demo(args.out, n_studies=args.n_studies, seed=args.seed, quick=args.quick, settings=settings)


def _cmd_cache(args: argparse.Namespace) -> None:
    from .data.prepare import fill_cache

    report = fill_cache(args.root, args.cache_dir, split=args.split, workers=args.workers, progress=not args.quiet)
    print(f"{args.cache_dir}: {report}")
    if report.failed:
        raise SpineError(f"{len(report.failed)} series could not be read, e.g. {next(iter(report.failed))}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spinemm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("phantom", help="write the synthetic RSNA-layout phantom dataset")
    p.add_argument("root")
    p.add_argument("--n-studies", type=int, default=60)
    p.add_argument("--n-test", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--label-noise", type=float, default=0.1)
    p.add_argument("--workers", type=int, default=None,
                   help="processes writing studies (default: one per core, 8 studies or more each)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_phantom)

    p = sub.add_parser("cache", help="decode every series of a folder into a series cache, with all cores")
    p.add_argument("root", help="an RSNA-layout folder")
    p.add_argument("--cache-dir", required=True, help="the cache folder (predict/train read it with --cache-dir)")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core; 0: this one)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("inspect", help="summarise an RSNA-layout folder; --png draws one study")
    p.add_argument("root")
    p.add_argument("--split", default="train", choices=["train", "test"])
    p.add_argument("--png", help="write a montage of one study's three planes here")
    p.add_argument("--study", type=int, help="study for --png (default: the first)")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("predict", help="write submission.csv and locations.csv for a folder")
    p.add_argument("--model", required=True, help="a folder written by save_pretrained")
    p.add_argument("--data", required=True, help="an RSNA-layout folder")
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--device", default=None)
    p.add_argument("--workers", type=int, default=0,
                   help="CPU processes, each predicting a share of the studies (0: this process alone)")
    p.add_argument("--cache-dir", default=None, help="a series cache folder (`spinemm cache` fills one)")
    p.add_argument("--png", type=int, nargs="?", const=3, default=0,
                   help="also draw predicted locations for this many studies (default 3)")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("evaluate", help="official score + accuracy/precision/recall of a submission")
    p.add_argument("--solution", required=True)
    p.add_argument("--submission", required=True)
    p.add_argument("--json", help="also write the metrics here")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("zero-shot", help="score images (DICOM files) against prompts")
    p.add_argument("--model", required=True)
    p.add_argument("images", nargs="+")
    p.add_argument("--prompt", action="append", help="a prompt (repeat); default: severity prompts")
    p.add_argument("--condition", default="spinal_canal_stenosis")
    p.add_argument("--level", default=None)
    p.add_argument("--at", nargs=2, type=float, metavar=("X", "Y"), default=None,
                   help="score a crop around this pixel (column, row), model.config.roi_side_mm wide, as "
                        "pretraining cut them; default: the whole image")
    p.set_defaults(func=_cmd_zero_shot)

    p = sub.add_parser("demo", help="phantom -> pretrain -> train -> evaluate -> predict -> report")
    p.add_argument("--out", default="demo_out")
    p.add_argument("--n-studies", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a much smaller run, for smoke tests")
    p.add_argument("--grader", choices=["cnn", "clip-vit", "cnn-film"], default=None,
                   help="the grade stage's vision tower under the BERT queries: a conv tower (cnn, the "
                        "default), pretraining's ViT (clip-vit); or the earlier FiLM grader (cnn-film)")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except SpineError as err:
        print(f"spinemm {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
