"""`sslforge train | launch | jobs | data | eval | export | compare | report | recipes`.

Everything that can be checked before a process starts (config keys and values, shard paths,
the run directory) is checked here, and reported as one line naming the bad input, exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sslforge.config import ConfigError, check_buildable, list_recipes, load_config, recipe_path
from sslforge.config_effects import ineffective_overrides

EXIT_USAGE = 2


class UsageError(RuntimeError):
    """Bad input detected by the CLI itself."""


def _version() -> str:
    """What bug reports need: the installed distributions' versions, read without importing torch."""
    from importlib.metadata import version

    return f"sslforge {version('sslforge')} (torch {version('torch')})"


PRINT_CONFIG_HELP = "print the resolved config (recipe, overrides, run directory) as YAML and exit; nothing starts"
BATCH_HELP = "images per forward pass of the frozen network (default: %(default)s)"
WORKERS_HELP = "data-loading processes (default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sslforge", description="Distributed self-supervised pretraining.")
    p.add_argument("--version", action="version", version=_version(), help="print the sslforge and torch versions")
    sub = p.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe on local ranks (or as one rank under torchrun/srun)")
    train.add_argument("recipe", help="recipe name (see `sslforge recipes`) or YAML path")
    train.add_argument("overrides", nargs="*", help="key=value config overrides")
    train.add_argument("--nproc", type=int, default=1, help="local ranks to start (one process per rank, owned by this command)")
    train.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)

    launch = sub.add_parser("launch", help="submit a recipe to SLURM through submitit")
    launch.add_argument("recipe", help="recipe name (see `sslforge recipes`) or YAML path")
    launch.add_argument("overrides", nargs="*", help="key=value config overrides (slurm.* among them)")
    launch.add_argument("--slurm", action="store_true", required=True, help="submit to SLURM")
    launch.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    launch.add_argument("--wait", action="store_true", help="block until the job ends; exit with its status")
    launch.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)

    jobs = sub.add_parser("jobs", help="state of a run's SLURM jobs and where their logs are")
    jobs.add_argument("run_dir", help="the run directory (its config.yaml, checkpoints and launch records)")

    data = sub.add_parser("data", help="write shards")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth", help="write the built-in synthetic shapes dataset")
    synth.add_argument("out", help="output directory: OUT/train and OUT/val shards")
    synth.add_argument("--train", type=int, default=10000, help="training samples")
    synth.add_argument("--val", type=int, default=2000, help="validation samples")
    synth.add_argument("--image-size", type=int, default=32, help="image side in pixels (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="fixes every image (default: %(default)s)")
    synth.add_argument("--captions", action="store_true",
                       help="also write KEY.txt: a caption naming the size, colour, shape and position drawn")
    shards = data_sub.add_parser("shards", help="turn an ImageFolder tree into webdataset shards, every image "
                                                "verified (unreadable ones reported and skipped)")
    shards.add_argument("src", metavar="SRC",
                        help="ImageFolder root: SRC/CLASS/IMAGE; labels index the class folders sorted by name")
    shards.add_argument("out", metavar="OUT", help="output directory, new or empty (see --overwrite)")
    shards.add_argument("--max-per-shard", type=int, default=10000, help="images per shard (default: 10000)")
    shards.add_argument("--workers", type=int, default=None,
                        help="processes decoding and verifying images (default: min(8, CPUs)); the shards are "
                             "the same for any number")
    shards.add_argument("--resize", type=int, default=None, metavar="N",
                        help="shrink each image so its shorter side is N px (never enlarged) and re-encode it as "
                             "JPEG (default: store each file's bytes as they are)")
    shards.add_argument("--quality", type=int, default=95, help="JPEG quality of images re-encoded by --resize "
                                                                "(default: 95)")
    shards.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                        help="hold out this fraction of each class as OUT/val, the rest as OUT/train (default: 0, "
                             "all shards in OUT)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffle and of the train/val split")
    shards.add_argument("--overwrite", action="store_true",
                        help="replace the shards an earlier run wrote in OUT, once the new ones are complete (OUT "
                             "holding other files is refused either way)")
    shards.add_argument("--quiet", action="store_true",
                        help="no progress bar (there is none when stderr is not a terminal either)")
    narr = data_sub.add_parser("narratives", help="Localized Narratives (JSONL + <image_id>.jpg images) to "
                                                  "captioned shards: KEY.jpg, KEY.txt, KEY.json")
    narr.add_argument("jsonl", help="a Localized Narratives annotation file (one JSON record per line)")
    narr.add_argument("image_dir", help="directory of the images, named <image_id>.jpg")
    narr.add_argument("out", help="output directory for the captioned shards")
    narr.add_argument("--max-per-shard", type=int, default=10000, help="samples per shard (default: %(default)s)")
    narr.add_argument("--image-size", type=int, default=None,
                      help="resize each image's shorter side to this (default: keep the JPEG bytes as they are)")

    ev = sub.add_parser("eval", help="evaluate a run: kNN and linear probe of its encoder, robustness, token labels "
                                     "and test-time adaptation (TSD) of its classifier, FID and R-precision of its "
                                     "generator")
    ev_sub = ev.add_subparsers(dest="eval_command", required=True)
    lin = ev_sub.add_parser("linear", help="train a linear classifier on a run's frozen encoder (a run of the "
                                           "`linear` method, local ranks or SLURM); top-1 / top-5 on --val")
    lin.add_argument("source", help="pretrained run directory or checkpoint directory")
    lin.add_argument("overrides", nargs="*", help="key=value overrides of the probe's recipe")
    lin.add_argument("--train", required=True, help="labelled shards the classifier is trained on")
    lin.add_argument("--val", required=True, help="labelled shards it is scored on")
    lin.add_argument("--recipe", default="eval/linear_in1k", help="the probe's recipe (default: %(default)s)")
    lin.add_argument("--out", default=None, help="the probe's run directory (default: RUN/linear_<checkpoint>)")
    lin.add_argument("--nproc", type=int, default=1, help="local ranks")
    lin.add_argument("--slurm", action="store_true", help="submit to SLURM (the recipe's slurm section)")
    lin.add_argument("--dry-run", action="store_true", help="with --slurm: print the sbatch script, submit nothing")
    lin.add_argument("--wait", action="store_true", help="with --slurm: block until the job ends")
    knn = ev_sub.add_parser("knn", help="weighted kNN top-1 (faiss)")
    knn.add_argument("source", help="run directory or checkpoint directory")
    knn.add_argument("--train", required=True, help="labelled shards for the feature bank")
    knn.add_argument("--val", required=True, help="labelled shards to classify")
    knn.add_argument("--k", type=int, default=20, help="neighbours that vote (default: %(default)s)")
    knn.add_argument("--temperature", type=float, default=0.07,
                     help="votes weighted by exp(similarity / T) (default: %(default)s)")
    knn.add_argument("--batch-size", type=int, default=256, help=BATCH_HELP)
    knn.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
    knn.add_argument("--random-init", action="store_true",
                     help="evaluate the run's encoder at its initial (random) weights")

    rob = ev_sub.add_parser("robustness", help="a supervised run's top-1 on clean, corrupted (ImageNet-C style) "
                                               "and extra labelled sets")
    rob.add_argument("source", help="run directory or checkpoint directory (a supervised method)")
    rob.add_argument("--val", default=None, help="labelled shards (default: the run's data.val)")
    rob.add_argument("--corruptions", default="benchmark",
                     help="comma-separated names, 'benchmark' (12 of ImageNet-C's 15) or 'all'")
    rob.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, each in 1..5")
    rob.add_argument("--extra", action="append", default=[], metavar="NAME=SHARDS",
                     help="an extra labelled set scored as is, e.g. imagenet-r=/data/in-r (repeatable)")
    rob.add_argument("--baseline", default=None,
                     help="'alexnet' or another run's robustness.json: corruption errors normalised (CE, mCE)")
    rob.add_argument("--batch-size", type=int, default=256, help=BATCH_HELP)
    rob.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
    rob.add_argument("--seed", type=int, default=0, help="fixes the corrupted images")
    tsd = ev_sub.add_parser("tsd", help="test-time adaptation (TSD, CVPR 2023) of a classifier on an unlabelled "
                                        "shifted stream, one process; top-1 before and after")
    tsd.add_argument("source", help="run directory or checkpoint directory (a linear-probe or supervised run)")
    tsd.add_argument("--data", default=None, help="shards streamed once, in order (default: the run's data.val; "
                                                  "labels only score)")
    tsd.add_argument("--corruption", default=None, help="shift the images by this corruption (eval robustness's "
                                                        "names; default: none)")
    tsd.add_argument("--severity", type=int, default=3, help="its severity, 1..5")
    tsd.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate over every parameter")
    tsd.add_argument("--filter-k", type=int, default=100, help="memory entries kept per class (-1: all)")
    tsd.add_argument("--lam", type=float, default=0.0, help="weight of the local neighbour term")
    tsd.add_argument("--norm", choices=["batch", "source"], default="batch",
                     help="batch norm statistics: each test batch's (the official code's) or the trained ones")
    tsd.add_argument("--batch-size", type=int, default=128, help="test images per adaptation step (default: %(default)s)")
    tsd.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
    tsd.add_argument("--seed", type=int, default=0, help="fixes the corrupted images")
    tl = ev_sub.add_parser("token-labels", help="PNG grid of a dense classifier's token label maps and confidences")
    tl.add_argument("source", help="run directory or checkpoint directory (stl_labeler or stl_student)")
    tl.add_argument("--shards", default=None, help="images to draw (default: the run's data.val)")
    tl.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/token_labels_step<N>.png)")
    tl.add_argument("--count", type=int, default=8, help="images in the grid")
    tl.add_argument("--dpi", type=int, default=100, help="resolution of the PNG (default: %(default)s)")
    fid = ev_sub.add_parser("fid", help="FID of a text-to-image run's generator: one image per caption of "
                                        "the real shards, against their images")
    fid.add_argument("source", help="run directory or checkpoint directory (a method that generates from captions)")
    fid.add_argument("--real", required=True, help="captioned shards: the real images and the captions")
    fid.add_argument("--samples", type=int, default=None, help="images compared (default: the run's eval.fid_samples)")
    fid.add_argument("--inception-weights", default=None,
                     help="torch-fidelity's Inception file (default: the run's eval.inception_weights)")
    rp = ev_sub.add_parser("rprecision", help="R-precision of a text-to-image run's images by a separately trained "
                                              "dual encoder (own caption among 100, chance 1%%)")
    rp.add_argument("source", help="run directory or checkpoint directory (a method that generates from captions)")
    rp.add_argument("--dual-encoder", required=True, help="run directory of a dual_encoder run (not the one the "
                                                          "generator was trained against)")
    rp.add_argument("--data", required=True, help="captioned shards whose captions are generated from")
    rp.add_argument("--samples", type=int, default=None, help="captions scored (default: all)")
    for generated in (fid, rp):
        generated.add_argument("--batch-size", type=int, default=64, help="images generated per batch (default: %(default)s)")
        generated.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)
        generated.add_argument("--seed", type=int, default=0, help="fixes the noise of each caption's image")

    cmp = sub.add_parser("compare", help="train variants on the same data, budget and seed; one table of top-1 and time")
    cmp.add_argument("variants", nargs="+", help="[label=]recipe[:key=value,...]")
    cmp.add_argument("--out", required=True, help="directory for the runs, compare.md/.json/.png")
    cmp.add_argument("--set", dest="shared", action="append", default=[], metavar="KEY=VALUE",
                     help="override for every variant (repeatable)")
    cmp.add_argument("--nproc", type=int, default=2, help="local ranks per run")

    rep = sub.add_parser("report", help="PNG plots of runs' metrics.jsonl (overlaid), a t-SNE/UMAP of val "
                                        "embeddings and report.md; to wandb when it is on")
    rep.add_argument("runs", nargs="+", help="run directories")
    rep.add_argument("--out", default=None, help="directory for the PNGs and report.md (default: RUN/report; "
                                                 "required for several runs)")
    rep.add_argument("--embedding", choices=("tsne", "umap", "none"), default="tsne",
                     help="projection of the val embeddings (umap needs umap-learn)")
    rep.add_argument("--samples", type=int, default=2000, help="val samples in the embedding plot")
    rep.add_argument("--val", default=None, help="labelled shards to embed (default: each run's data.val)")
    rep.add_argument("--wandb", choices=("auto", "on", "off"), default="auto",
                     help="log the figures to wandb; auto: when the run logs to wandb (WANDB_MODE overrides)")
    rep.add_argument("--batch-size", type=int, default=256, help=BATCH_HELP)
    rep.add_argument("--workers", type=int, default=2, help=WORKERS_HELP)

    exp = sub.add_parser("export", help="a run's evaluated encoder (and classifier head) as a plain torchvision "
                                        "or timm state_dict, with export.json: how to load it and its preprocessing")
    exp.add_argument("source", help="run directory or checkpoint directory")
    exp.add_argument("out", help="directory for model.pt, model.safetensors and export.json (new or empty)")
    exp.add_argument("--force", action="store_true", help="write into a non-empty OUT (an earlier export's files "
                                                          "are replaced)")
    exp.add_argument("--no-head", action="store_true", help="the encoder alone, even when the run has a classifier")

    sub.add_parser("recipes", help="list the recipes")
    return p


def _check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"run_dir {run_dir} cannot be created: {exc.strerror}") from None
    if not os.access(run_dir, os.W_OK):
        raise UsageError(f"run_dir {run_dir} is not writable")


def preflight(cfg) -> None:  # type: ignore[no-untyped-def]
    """Fail before any rank starts: shard paths must exist, the run dir must be writable."""
    from sslforge.data_pipeline.shards import expand_shards

    for spec in (cfg.data.train, cfg.data.val, cfg.data.knn_train):
        if spec:
            expand_shards(spec)
    _check_run_dir(Path(cfg.run_dir))


def warn_no_effect(cfg, overrides: list[str], command: str) -> None:  # type: ignore[no-untyped-def]
    """One line per given key that cannot change the run, before anything starts."""
    for line in ineffective_overrides(cfg, overrides, command):
        print(f"sslforge: warning: {line}", file=sys.stderr)


def print_config(cfg) -> int:  # type: ignore[no-untyped-def]
    """`--print-config`: the config a run would save as its config.yaml, checked, then exit 0."""
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(cfg, resolve=True), end="")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from sslforge.launcher.env import launched_rank, under_external_launcher
    from sslforge.run_dirs import place_run

    cfg = load_config(args.recipe, args.overrides)
    if not under_external_launcher() or launched_rank() == 0:
        warn_no_effect(cfg, args.overrides, "train")
    place_run(cfg, args.overrides)  # run_dir not given: this experiment's own directory
    if args.print_config:
        return print_config(cfg)
    return train_config(cfg, args.nproc)


def train_config(cfg, nproc: int) -> int:  # type: ignore[no-untyped-def]
    """Train a loaded config on `nproc` local ranks (or as this rank of a torchrun/srun job)."""
    from sslforge.launcher.env import launched_rank, under_external_launcher
    from sslforge.launcher.local_jobs import LocalLaunch
    from sslforge.launcher.worker import run_rank
    from sslforge.resume_guard import check_resume, save_run

    if nproc < 1:
        raise UsageError("--nproc must be >= 1")
    if cfg.optim.batch_size % nproc:
        raise ConfigError(f"invalid value for 'optim.batch_size': {cfg.optim.batch_size} is not divisible "
                          f"by --nproc {nproc}")
    check_buildable(cfg)
    check_resume(cfg)  # before anything is written: the run it resumes must keep its meaning
    preflight(cfg)
    if under_external_launcher():  # this process is one rank of a torchrun/srun job
        if launched_rank() == 0:
            save_run(cfg)
        return run_rank(cfg)
    config_path = save_run(cfg)
    with LocalLaunch(Path(cfg.run_dir), nproc) as launch:  # recorded for `sslforge jobs`
        if nproc == 1:
            launch.exit_status = run_rank(cfg)
        else:
            from sslforge.launcher.local import launch_local

            launch.exit_status = launch_local(config_path, nproc)
    return launch.exit_status


def cmd_launch(args: argparse.Namespace) -> int:
    from sslforge.launcher import slurm
    from sslforge.run_dirs import place_run

    cfg = load_config(args.recipe, args.overrides)
    warn_no_effect(cfg, args.overrides, "launch")
    place_run(cfg, args.overrides)
    if args.print_config:
        return print_config(cfg)
    return slurm.launch(cfg, dry_run=args.dry_run, wait=args.wait)


def cmd_jobs(args: argparse.Namespace) -> int:
    """A run's SLURM jobs and local launches, with their state and logs, then its progress."""
    from sslforge.launcher import local_jobs, slurm

    root = Path(args.run_dir).absolute()
    lines = [*slurm.job_lines(root), *local_jobs.launch_lines(root)]
    if not lines and not (root / "config.yaml").is_file():
        raise UsageError(f"no SLURM jobs recorded in {root} and no local runs: it is not a run directory "
                         "(no config.yaml)")
    print(f"run dir: {root}")
    print("\n".join(lines or ["no launches recorded (trained before they were recorded, or by torchrun/srun)"]))
    print("\n".join(local_jobs.progress_lines(root)))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from sslforge.data_pipeline.synth import write_synthetic

        paths = write_synthetic(args.out, n_train=args.train, n_val=args.val, image_size=args.image_size,
                                seed=args.seed, captions=args.captions)
        print(json.dumps(paths))
        return 0
    if args.data_command == "narratives":
        from sslforge.data_pipeline.captions import narratives_to_shards

        shards, written, skipped = narratives_to_shards(args.jsonl, args.image_dir, args.out, args.max_per_shard,
                                                        args.image_size)
        print(f"wrote {written} narrative(s) in {len(shards)} shard(s) to {args.out}; skipped {skipped} "
              f"whose image is missing or unreadable in {args.image_dir}")
        return 0
    from sslforge.data_pipeline.imagefolder import imagefolder_to_shards

    report = imagefolder_to_shards(args.src, args.out, args.max_per_shard, workers=args.workers, resize=args.resize,
                                   quality=args.quality, val_fraction=args.val_fraction, seed=args.seed,
                                   overwrite=args.overwrite, progress=not args.quiet)
    print(report.summary())
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.eval_command == "robustness":
        return _eval_robustness(args)
    if args.eval_command in ("fid", "rprecision"):
        return _eval_generated(args)
    if args.eval_command == "linear":
        return _eval_linear(args)
    if args.eval_command == "tsd":
        from sslforge.eval.tsd import RESULT_FILE, TSDSettings, tsd_from_run

        settings = TSDSettings(lr=args.lr, filter_k=args.filter_k, lam=args.lam, norm=args.norm)
        result = tsd_from_run(Path(args.source), args.data, args.corruption, args.severity, settings, args.batch_size,
                              args.workers, args.seed)
        print(f"wrote {Path(result['run_dir']) / RESULT_FILE}")
        return 0
    if args.eval_command == "token-labels":
        from sslforge.eval.token_labels import draw_token_labels

        out = draw_token_labels(Path(args.source), args.shards, Path(args.out) if args.out else None,
                                count=args.count, dpi=args.dpi)
        print(f"wrote {out}")
        return 0
    from sslforge.eval.run import evaluate_knn

    top1 = evaluate_knn(Path(args.source), args.train, args.val, k=args.k, temperature=args.temperature,
                        batch_size=args.batch_size, workers=args.workers, random_init=args.random_init)
    print(f"knn_top1 {top1:.2f}")
    return 0


def _eval_linear(args: argparse.Namespace) -> int:
    """The probe's config: its recipe, with the pretrained checkpoint, the data, the pretrained
    run's image size and a run directory beside it filled in unless given; then trained as
    `train` or `launch` would."""
    from sslforge.config import load_resolved, parse_overrides
    from sslforge.eval.run import run_dir_of
    from sslforge.trainer.checkpoint import load_module_weights

    pretrained = run_dir_of(Path(args.source))
    checkpoint = load_module_weights(Path(args.source))[1].resolve()  # the one the probe reads, named in its config
    given = {key for key, _ in parse_overrides(args.overrides)}
    filled = [f"method.source={checkpoint}", f"data.train={args.train}", f"data.val={args.val}"]
    if "data.image_size" not in given:
        filled.append(f"data.image_size={load_resolved(pretrained / 'config.yaml').data.image_size}")
    if "run_dir" not in given:
        filled.append(f"run_dir={args.out or pretrained / f'linear_{checkpoint.name}'}")
    cfg = load_config(args.recipe, [*filled, *args.overrides])
    warn_no_effect(cfg, args.overrides, "launch" if args.slurm else "train")
    if args.slurm:
        from sslforge.launcher import slurm

        return slurm.launch(cfg, dry_run=args.dry_run, wait=args.wait)
    code = train_config(cfg, args.nproc)
    from sslforge.launcher.env import launched_rank

    if code == 0 and launched_rank() == 0:
        from sslforge.eval.linear import final_score

        score = final_score(Path(cfg.run_dir))
        print(f"linear_top1 {score['val_top1']:.2f} linear_top5 {score['val_top5']:.2f} ({cfg.run_dir})")
    return code


def _eval_robustness(args: argparse.Namespace) -> int:
    from sslforge.eval.corruptions import BENCHMARK, CORRUPTIONS
    from sslforge.eval.robustness import RESULT_FILE, robustness_from_run

    named = {"benchmark": list(BENCHMARK), "all": list(CORRUPTIONS)}
    corruptions = named.get(args.corruptions, [c for c in args.corruptions.split(",") if c])
    try:
        severities = [int(s) for s in args.severities.split(",") if s]
    except ValueError:
        raise UsageError(f"--severities must be comma-separated integers, got {args.severities!r}") from None
    extra = {}
    for item in args.extra:
        name, sep, shards = item.partition("=")
        if not sep or not name or not shards:
            raise UsageError(f"--extra takes NAME=SHARDS, got {item!r}")
        extra[name] = shards
    result = robustness_from_run(Path(args.source), args.val, extra, corruptions, severities, args.baseline,
                                 args.batch_size, args.workers, args.seed)
    print(f"wrote {Path(result['run_dir']) / RESULT_FILE}")
    return 0


def _eval_generated(args: argparse.Namespace) -> int:
    from sslforge.config import load_resolved
    from sslforge.eval.generation import score_run
    from sslforge.eval.run import run_dir_of

    if args.samples is not None and args.samples < 2:
        raise UsageError(f"--samples must be >= 2, got {args.samples}")
    if args.eval_command == "fid":
        cfg = load_resolved(run_dir_of(Path(args.source)) / "config.yaml")
        weights = args.inception_weights or cfg.eval.inception_weights
        if not weights:
            raise UsageError(f"FID needs Inception weights: pass --inception-weights or set eval.inception_weights "
                             f"in {args.source}'s config")
        result = score_run(Path(args.source), args.real, fid_weights=weights, dual_encoder=None,
                           samples=args.samples or cfg.eval.fid_samples, batch_size=args.batch_size,
                           workers=args.workers, seed=args.seed)
        print(f"fid {result['fid']:.4f} ({int(result['samples'])} images)")
        return 0
    result = score_run(Path(args.source), args.data, fid_weights=None, dual_encoder=args.dual_encoder,
                       samples=args.samples, batch_size=args.batch_size, workers=args.workers, seed=args.seed)
    print(f"r_precision {result['r_precision']:.4f} ({int(result['samples'])} images, chance 0.01)")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from sslforge.export import export_run

    out = Path(args.out)
    meta = export_run(Path(args.source), out, force=args.force, head=not args.no_head)
    model = meta["model"]
    head = f"with its {model['num_classes']}-class head" if model["num_classes"] else "encoder only"
    print(f"exported {meta['method']} step {meta['step']} ({model['backbone']}, {head}) to {out}: "
          f"{', '.join(meta['weights'].values())}, export.json")
    if model["small_stem"]:
        print("note: the small-image stem (model.small_stem) does not fit a stock torchvision ResNet: "
              "the recipe below replaces conv1 and maxpool before loading")
    print("load it with:\n" + meta["load_python"], end="")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    for name in list_recipes():
        print(f"{name:28s} {recipe_path(name)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from sslforge.compare import compare

    report = compare(args.variants, args.shared, Path(args.out), args.nproc)
    print(report.read_text(), end="")
    print(f"written: {report}, {report.with_suffix('.json')}, {report.with_suffix('.png')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from sslforge.report import write_report

    if args.out is None and len(args.runs) > 1:
        raise UsageError("--out is required with several runs")
    if args.samples < 5:
        raise UsageError(f"--samples must be >= 5, got {args.samples}")
    out = Path(args.out) if args.out else Path(args.runs[0]) / "report"
    report = write_report([Path(r) for r in args.runs], out, args.embedding, args.samples, args.val, args.wandb,
                          args.batch_size, args.workers)
    print(report.read_text(), end="")
    print(f"written: {report} and its figures")
    return 0


COMMANDS = {"compare": cmd_compare, "train": cmd_train, "launch": cmd_launch, "jobs": cmd_jobs, "data": cmd_data,
            "eval": cmd_eval, "export": cmd_export, "recipes": cmd_recipes, "report": cmd_report}


def _known_errors() -> tuple[type[BaseException], ...]:
    from sslforge.data_pipeline import DataError
    from sslforge.eval import EvalError
    from sslforge.trainer.checkpoint import CheckpointError

    errors: list[type[BaseException]] = [ConfigError, UsageError, DataError, FileNotFoundError, CheckpointError,
                                         EvalError]
    try:
        from sslforge.launcher.slurm import SlurmError

        errors.append(SlurmError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow flags (`launch R --slurm data.train=...`)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return COMMANDS[args.command](args)
    except _known_errors() as exc:
        print(f"sslforge: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
