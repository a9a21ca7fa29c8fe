#!/usr/bin/env python3
"""slurm-dpo: SFT -> preference pairs -> DPO beta sweep -> reward-vs-KL eval, as SLURM jobs.

`slurm-dpo` (installed by `pip install -e .`) and `python launch.py` are the same command.

  python launch.py run --preset tiny --run-dir runs/tiny          # whole pipeline
  python launch.py status --run-dir runs/tiny --watch              # queue + training progress
  python launch.py logs dpo --task 0.1 --run-dir runs/tiny         # a job's output
  python launch.py cancel --run-dir runs/tiny                      # cancel the run's jobs
  python launch.py config --preset gpt2-large --set dpo.betas=[0.1] # print the resolved config
  python launch.py prefetch --preset gpt2-large --run-dir R        # download hub models/data (login node)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `python launch.py` from anywhere

from jobs.presets import PRESET_HELP, PRESETS  # noqa: E402  (after the path insert)
from pipeline.registry import STAGE_BY_NAME  # noqa: E402

DEFAULT_RUN_DIR = "runs/{name}"
STAGE_NAMES = ", ".join(STAGE_BY_NAME)


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=list(PRESETS),
                        help="starting configuration: " + "; ".join(f"{name} ({text})" for name, text in PRESET_HELP.items()))
    parser.add_argument("--config", metavar="FILE.yaml", help="YAML file layered over the preset")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one field, repeatable, e.g. --set dpo.betas=[0.1] --set slurm.dpo.time=02:00:00")


def _run_dir_arg(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--run-dir", required=required, metavar="DIR",
                        help="the run directory (config, data, checkpoints, results, job records)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slurm-dpo")
    except PackageNotFoundError:  # a checkout used without `pip install -e .`
        return "unknown (not installed; run `pip install -e .`)"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or Path(sys.argv[0]).name, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="submit (or continue) a run: every stage that is not done or queued",
                         description="Submit every stage that is not done, queued or running. On SLURM all stages "
                                     "are submitted at once with afterok dependencies and the command returns; "
                                     "locally they run one after another. Re-running is safe and does no repeated work.")
    _config_args(run)
    _run_dir_arg(run)
    run.add_argument("--executor", default="auto", choices=["auto", "slurm", "local"],
                     help="auto: SLURM when `sbatch` is on the PATH, else local subprocess jobs")
    run.add_argument("--until", metavar="STAGE", help=f"submit only up to this stage ({STAGE_NAMES})")
    run.add_argument("--dry-run", action="store_true",
                     help="print every sbatch script that would be submitted; submit and write nothing")

    prefetch = sub.add_parser("prefetch", help="download the run's hub models and datasets now (on the login node)",
                              description="Resolve every hub reference of the config (policy model and tokenizer, "
                                          "dataset, reward classifier) to a commit sha, record it in "
                                          "RUN/hub_revisions.json and download it into the cache (hub.cache_dir). "
                                          "`run` does this before submitting; jobs then read the cache offline.")
    _config_args(prefetch)
    _run_dir_arg(prefetch)

    resume = sub.add_parser("resume", help="continue a run after a failure or kill: resubmit what is not done")
    _run_dir_arg(resume, required=True)
    resume.add_argument("--executor", default="auto", choices=["auto", "slurm", "local"], help="as for run")
    resume.add_argument("--until", metavar="STAGE", help="as for run")
    resume.add_argument("--set", dest="sets", action="append", default=[], metavar="slurm.STAGE.KEY=VALUE",
                        help="change a SLURM resource for the jobs submitted from now on, e.g. "
                             "--set slurm.dpo.nodes=1 after a node failure (the ML config stays the run's)")

    status = sub.add_parser("status", help="one row per stage / array task: state, step, restarts, ETA")
    _run_dir_arg(status, required=True)
    status.add_argument("--watch", action="store_true", help="refresh until every stage is finished")
    status.add_argument("--interval", type=float, default=10.0, help="seconds between refreshes with --watch")
    status.add_argument("--json", action="store_true", help="print a JSON list of rows instead of a table")
    status.add_argument("--all", dest="show_all", action="store_true",
                        help="one row per array task even for a big sweep (else a stage of more than 8 tasks is "
                             "one row: its arms as method x strengths x seeds and the count per state)")
    status.add_argument("--task", metavar="PATTERN",
                        help="only these tasks, one row each: a key (0.1, ipo:0.5) or a shell pattern ('ipo:*', "
                             "'*:seed3'), or a stage name")

    cancel = sub.add_parser("cancel", help="cancel every queued or running job of the run")
    _run_dir_arg(cancel, required=True)

    logs = sub.add_parser("logs", help="print a stage job's stdout/stderr")
    logs.add_argument("stage", help=STAGE_NAMES)
    logs.add_argument("--task", help="array task: a dpo arm's key (a beta: 0.1, where 1, 1.0 and 1e0 name the same; or METHOD:BETA[:seedN], e.g. ipo:0.5, dpo:0.1:seed1), a shard number for pairs")
    _run_dir_arg(logs, required=True)
    logs.add_argument("--stderr", action="store_true", help="show stderr instead of stdout")
    logs.add_argument("--lines", type=int, default=60, help="show the last N lines (0 = all)")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")

    config = sub.add_parser("config", help="print the resolved config (or every field's help with --fields)")
    _config_args(config)
    config.add_argument("--fields", action="store_true", help="list every field with its help and default")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in ("run", "resume", "prefetch"):
            from jobs.launcher import launch, prefetch_only

            run_dir = args.run_dir
            if args.command != "resume" and run_dir is None:
                from jobs.config import resolve_config

                run_dir = DEFAULT_RUN_DIR.format(name=resolve_config(args.preset, args.config, args.sets).name)
            if args.command == "prefetch":
                return prefetch_only(run_dir, args.preset, args.config, args.sets)
            if args.command == "resume":
                return launch(run_dir, None, None, args.sets, args.executor, until=args.until)
            return launch(run_dir, args.preset, args.config, args.sets, args.executor, dry_run=args.dry_run,
                          until=args.until)
        if args.command == "status":
            from jobs.status import show_status

            return show_status(args.run_dir, watch=args.watch, as_json=args.json, interval=args.interval,
                               show_all=args.show_all, task=args.task)
        if args.command == "cancel":
            from jobs.status import cancel_run

            return cancel_run(args.run_dir)
        if args.command == "logs":
            from jobs.status import show_logs

            return show_logs(args.run_dir, args.stage, args.task, stderr=args.stderr, lines=args.lines,
                             follow=args.follow)
        if args.command == "config":
            from jobs.config import ExperimentConfig, config_to_yaml, resolve_config
            from pipeline.configlib import field_help

            if args.fields:
                for name, text, default in field_help(ExperimentConfig):
                    print(f"{name:<32} {text} [default: {default!r}]")
                return 0
            print(config_to_yaml(resolve_config(args.preset, args.config, args.sets)), end="")
            return 0
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `status --json | head`
        sys.stderr.close()
        return 0
    return 1


def cli() -> None:
    """Entry point of `python launch.py` and the installed `slurm-dpo`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    cli()
