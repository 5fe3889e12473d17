"""The ``tcae`` command.

    tcae demo [--out DIR] [--quick]              synthetic data → train → panels → probe → warp benchmark
    tcae check-learning [--out DIR]              shows the TCAE learning, each number beside its baseline
    tcae train [--config FILE] [--resume [CKPT]] [--data ROOT --image-size 64 ...]
    torchrun --nproc_per_node N -m tcae.cli train ...           the same, DistributedDataParallel

A problem the user can fix (a setting out of range, a damaged checkpoint,
unreadable data, a run folder in use) ends the command with one line,
``error: <message>``, and exit status 1; warnings are one line each too.
    tcae probe CKPT [--data ROOT] [--json FILE]  AU F1 (and pose R²) from frozen embeddings
    tcae prepare VIDEO... OUT [--size 256]       face-crop tracks from video files
    tcae synth OUT [--identities 8 ...]          a synthetic labelled data set
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from . import train as train_module
from .config import RECIPES, TrainConfig, add_config_arguments
from .errors import TCAEError
from .learning import LearningCheck
from .synthetic import AU_STYLES

AU_STYLE_HELP = ("synthetic AUs: 'drawn' redraws the face's parts and adds lines, folds and the mouth's interior; "
                 "'warp' moves the neutral face's content by a smooth displacement per AU, as TCAE assumes "
                 "(default %(default)s)")


def cmd_synth(args: argparse.Namespace) -> int:
    from .synthetic import SyntheticConfig, generate_dataset

    summary = generate_dataset(args.out, SyntheticConfig(
        identities=args.identities, videos_per_identity=args.videos, tracks_per_video=args.tracks,
        frames_per_video=args.frames, size=args.size, seed=args.seed, head_motion=args.head_motion,
        au_style=args.au_style))
    print(f"wrote {summary['frames']} frames of {summary['identities']} identities, {summary['tracks']} tracks, "
          f"to {summary['root']} in {summary['seconds']:.1f} s")
    print("AU occurrence rate: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["occurrence_rate"].items()))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .videos import prepare_videos

    # One argument may be a folder to search; several are video files.
    videos = args.videos[0] if len(args.videos) == 1 else args.videos
    summary = prepare_videos(videos, args.out, size=args.size, every_nth=args.every_nth,
                             margin=args.margin, smoothing=args.smoothing)
    print(json.dumps(summary, indent=1))
    return 0 if summary["videos_ok"] else 1


def cmd_probe(args: argparse.Namespace) -> int:
    from .probe import format_report, probe_checkpoint

    report = probe_checkpoint(args.checkpoint, data=args.data, held_out=args.held_out, seed=args.seed,
                              epochs=args.epochs, device=args.device)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0


@dataclass
class DemoSettings:
    """Sizes of ``tcae demo``: the full one takes 3-5 minutes on two CPU cores, ``--quick`` seconds."""

    identities: int = 16
    videos: int = 2
    frames: int = 32
    width: float = 0.25
    batch_size: int = 16
    steps: int = 400
    probe_epochs: int = 30


QUICK = DemoSettings(identities=4, videos=1, frames=8, width=0.125, batch_size=4, steps=4, probe_epochs=3)


def _bench(out: Path) -> tuple[str | None, str]:
    """The warp benchmark's quick mode into ``out``: (its Markdown table's path, or None and why not)."""
    try:
        from bench.__main__ import main as bench_main
    except ImportError as e:
        return None, f"skipped: bench not importable ({e})"
    try:
        # Its table goes to the file; its progress lines (stderr) stay visible.
        with contextlib.redirect_stdout(io.StringIO()):
            bench_main(["--quick", "--out", str(out)])
    except (Exception, SystemExit) as e:  # the benchmark is an extra: report, do not lose the demo
        return None, f"failed: {e}"
    tables = sorted(out.glob("*.md"), key=lambda p: p.stat().st_mtime)
    return (str(tables[-1]), "") if tables else (None, f"no table written in {out}")


def cmd_demo(args: argparse.Namespace) -> int:
    from .probe import format_report, probe
    from .synthetic import SyntheticConfig, generate_dataset

    s = QUICK if args.quick else DemoSettings()
    steps = args.steps or s.steps
    out = args.out
    start = time.perf_counter()

    print(f"[1/4] synthetic data: {s.identities} identities × {s.videos} videos × {s.frames} frames", flush=True)
    data = generate_dataset(out / "data", SyntheticConfig(identities=s.identities, videos_per_identity=s.videos,
                                                          frames_per_video=s.frames, size=64))

    print(f"[2/4] training {steps} steps", flush=True)
    config = TrainConfig.from_recipe(
        args.recipe, data=str(out / "data"), model={"image_size": 64, "width": s.width}, batch_size=s.batch_size,
        steps=steps, val_every=max(steps // 4, 1), val_batches=2, panel_every=max(steps // 2, 1), ckpt_every=steps,
        log_every=max(steps // 20, 1), out=str(out / "run"))
    model, run = train_module.train(config)

    print("[3/4] AU probe on frozen embeddings", flush=True)
    report = probe(model, out / "data", held_out=config.held_out, seed=config.seed, epochs=s.probe_epochs,
                   device=next(model.parameters()).device)
    print(format_report(report))

    print("[4/4] warp benchmark (quick)", flush=True)
    table, note = (None, "skipped (--no-bench)") if args.no_bench else _bench(out / "bench")

    summary = {
        "data": {"root": data["root"], "identities": data["identities"], "frames": data["frames"]},
        "steps": run["steps"], "batch_size": config.batch_size, "image_size": config.model.image_size,
        "width": config.model.width, "recipe": config.recipe, "backend": config.model.backend,
        "implementation": run["implementation"], "losses": run["losses"], "val": run["val"],
        "train_seconds": run["train_seconds"], "img_per_s": run["img_per_s"],
        "au_f1": {k: v["mean"] for k, v in report["f1"].items()},
        "au_f1_always_present": report["f1_always_present"]["mean"],
        "pose_r2": {k: v["mean"] for k, v in report["pose_r2"].items()},
        "panels": run["panels"], "checkpoint": run["checkpoint"], "metrics": run["metrics"],
        "bench_table": table, "bench_note": note, "total_seconds": time.perf_counter() - start,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(format_summary(summary))
    print(f"\npictures: {Path(run['panels'][-1]).parent}/ (one panel per {config.panel_every} steps; "
          f"the last is {run['panels'][-1]})")
    return 0


def cmd_check_learning(args: argparse.Namespace) -> int:
    from .learning import check_learning, format_learning

    check = dataclasses.replace(LearningCheck(), steps=args.steps, recipe=args.recipe, head_motion=args.head_motion,
                                jitter=not args.no_jitter, seed=args.seed, au_style=args.au_style)
    report = check_learning(args.out, check, threads=args.threads)
    print(format_learning(report))
    print(f"wrote {args.out / 'learning.json'}, {args.out / 'checkpoint.pt'} and {args.out / 'panel.png'}")
    return 0 if report["passed"] else 1


def format_summary(s: dict) -> str:
    """The demo's results as an aligned two-column table."""
    losses = s["losses"]
    rows = [
        ("data", f"{s['data']['root']} ({s['data']['identities']} identities, {s['data']['frames']} frames)"),
        ("training", f"{s['steps']} steps, batch {s['batch_size']}, {s['image_size']} px, width {s['width']}, "
                     f"recipe {s['recipe']}, warp {s['backend']} → {s['implementation']}"),
        ("train time", f"{s['train_seconds']:.1f} s, {s['img_per_s']:.1f} img/s"),
        ("final losses", f"window {losses['loss']:.4f}, total {losses['total']:.4f}, recon {losses['recon']:.4f} "
                         f"(identity baseline {losses['identity']:.4f}), cycle AU {losses['cycle_au']:.4f}, "
                         f"cycle pose {losses['cycle_pose']:.4f}"),
        ("held-out recon", "n/a" if s["val"] is None else f"{s['val']['recon']:.4f} = "
                           f"{s['val']['recon'] / s['val']['identity']:.2f} × identity baseline "
                           f"{s['val']['identity']:.4f}"),
        ("AU F1 (mean)", f"from AU emb {s['au_f1']['au_embedding']:.3f}, "
                         f"from pose emb {s['au_f1']['pose_embedding']:.3f} "
                         f"(always-present detector {s['au_f1_always_present']:.3f})"),
    ]
    if s["pose_r2"]:
        rows.append(("pose R² (mean)", f"from AU emb {s['pose_r2']['au_embedding']:.3f}, from pose emb "
                                       f"{s['pose_r2']['pose_embedding']:.3f} (0 = predicting the mean, "
                                       "< 0 = worse than that)"))
    rows += [("panels", ", ".join(s["panels"])), ("checkpoint", s["checkpoint"]), ("metrics", s["metrics"]),
             ("bench table", s["bench_table"] or s["bench_note"]), ("total time", f"{s['total_seconds']:.1f} s"),
             ("note", f"{s['steps']} CPU steps only start the training (the paper trains for days): the panels "
                      "show the pipeline, and probe scores near the baselines are expected; "
                      "tcae check-learning trains for half an hour and tests each against its baseline")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "TCAE demo summary", *(f"  {k:<{width}}  {v}" for k, v in rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tcae", description="Twin-Cycle Autoencoder: data, training, AU probe.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="synthetic data, brief training, panels, probe and warp benchmark")
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--steps", type=int, help="training steps (default 400; 4 with --quick)")
    p.add_argument("--no-bench", action="store_true", help="skip the warp benchmark")
    p.add_argument("--recipe", default="faithful", choices=sorted(RECIPES),
                   help="training recipe (default %(default)s)")
    p.set_defaults(run=cmd_demo)

    p = sub.add_parser("check-learning", help="train on synthetic faces and show each number beating its baseline")
    p.add_argument("--out", type=Path, default=Path("check_learning"), help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=LearningCheck.steps, help="training steps (default %(default)s)")
    p.add_argument("--recipe", default=LearningCheck.recipe, choices=sorted(RECIPES),
                   help="training recipe (default %(default)s)")
    p.add_argument("--head-motion", type=float, default=LearningCheck.head_motion,
                   help="scale of the synthetic head's motion, 0 = still (default %(default)s)")
    p.add_argument("--no-jitter", action="store_true",
                   help="train without the random crops: with --head-motion 0 only the AUs move")
    p.add_argument("--au-style", default=LearningCheck.au_style, choices=AU_STYLES,
                   help=AU_STYLE_HELP)
    p.add_argument("--seed", type=int, default=LearningCheck.seed,
                   help="seeds the synthetic data, the identity split and the model (default %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: chosen from the cores)")
    p.set_defaults(run=cmd_check_learning)

    p = sub.add_parser("train", help="train the TCAE; on several devices: torchrun --nproc_per_node N -m tcae.cli "
                                     "train ...")
    add_config_arguments(p)
    p.set_defaults(run=train_module.train_from_args)

    p = sub.add_parser("probe", help="AU detection F1 (and pose R²) from a checkpoint's frozen embeddings")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--data", help="labelled frames (default: the checkpoint's training data)")
    p.add_argument("--held-out", type=float, help="identity fraction to test on (default: the checkpoint's)")
    p.add_argument("--seed", type=int, help="split seed (default: the checkpoint's)")
    p.add_argument("--epochs", type=int, default=30, help="detector epochs (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    p.set_defaults(run=cmd_probe)

    p = sub.add_parser("prepare", help="cut face-crop tracks out of videos (needs OpenCV)")
    p.add_argument("videos", nargs="+", help="video files, or one folder searched recursively")
    p.add_argument("out", type=Path)
    p.add_argument("--size", type=int, default=256, help="crop side in pixels (default %(default)s)")
    p.add_argument("--every-nth", type=int, default=1, help="keep every n-th frame (default %(default)s)")
    p.add_argument("--margin", type=float, default=0.3, help="crop margin around the face box (default %(default)s)")
    p.add_argument("--smoothing", type=float, default=0.6, help="crop smoothing over time, 0-1 (default %(default)s)")
    p.set_defaults(run=cmd_prepare)

    p = sub.add_parser("synth", help="render a synthetic data set with AU and pose labels")
    p.add_argument("out", type=Path)
    p.add_argument("--identities", type=int, default=8, help="people (default %(default)s)")
    p.add_argument("--videos", type=int, default=2, help="videos per identity (default %(default)s)")
    p.add_argument("--tracks", type=int, default=1, help="tracks per video (default %(default)s)")
    p.add_argument("--frames", type=int, default=24, help="frames per track (default %(default)s)")
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default %(default)s)")
    p.add_argument("--head-motion", type=float, default=1.0,
                   help="scale of the head's roll, translation, scale and yaw; 0 = still (default %(default)s)")
    p.add_argument("--au-style", default="drawn", choices=AU_STYLES, help=AU_STYLE_HELP)
    p.set_defaults(run=cmd_synth)
    return parser


# Errors that say what is wrong in their message: printed as one line. FileNotFoundError and
# NotADirectoryError come from paths the user gave, ValueError from arguments checked where they are
# used; FloatingPointError is a non-finite loss, diagnosed.
USER_ERRORS = (TCAEError, FileNotFoundError, NotADirectoryError, ValueError, FloatingPointError)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    # Without the source line Python's default format echoes: users did not write it.
    print(f"warning: {message}", file=sys.stderr if file is None else file, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        try:
            return args.run(args)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
