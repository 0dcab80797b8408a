"""The `saeflow` command line.

    saeflow run [CONFIG] [--run-name NAME] [--artifacts-dir DIR] [--set key=value ...] [--new]
    saeflow config-reference

Exit status: 0 done; 2 the config or the command line is wrong, or the run is already running
elsewhere (nothing was started); 1 the run failed; 75 training was stopped by SIGTERM/SIGINT after
writing a checkpoint. After 1 or 75, running the same command again continues the run.
"""

from __future__ import annotations

import argparse
import json
import sys

import flows  # noqa: F401  (process defaults before torch and Prefect start)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeflow", description="Restartable SAE training pipeline (SAELens + Prefect).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline (continues the run if it exists)")
    run.add_argument("config", nargs="?", help="YAML config; the built-in offline demo when left out")
    run.add_argument("--run-name", help="run name (default: derived from the config, so the same config continues its run)")
    run.add_argument("--artifacts-dir", default="artifacts", help="where every output goes (default: ./artifacts)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--new", action="store_true", help="start a fresh run under a new name; the old run is kept")
    commands.add_parser("config-reference", help="print every config key with its default and meaning")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from tasks.config import ConfigError, config_reference, load_config

    if args.command == "config-reference":
        print(config_reference())
        return 0

    try:
        cfg = load_config(args.config, args.overrides)
        from tasks.preflight import claim_run, resolve

        cfg = resolve(cfg)
        run_name = claim_run(cfg, args.artifacts_dir, args.run_name, args.new)
    except ConfigError as error:
        print(f"saeflow: config error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    from flows import pipeline
    from tasks.artifacts import Busy, exclusive_lock, run_dir
    from tasks.train import TrainingPreempted

    try:  # refuse before a Prefect flow run is created; the flow takes the lock for real
        with exclusive_lock(run_dir(args.artifacts_dir, run_name) / ".lock", f"run '{run_name}'", wait=False):
            pass
    except Busy as error:
        print(f"saeflow: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    print(f"saeflow: run '{run_name}' (artifacts in {args.artifacts_dir})", file=sys.stderr)
    try:
        summary = pipeline.run_pipeline(cfg, run_name, args.artifacts_dir)
    except TrainingPreempted as error:
        print(f"saeflow: run '{run_name}' {error}. Run the same command again to continue it.", file=sys.stderr)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        print(f"saeflow: run '{run_name}' interrupted; run the same command again to continue it", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 - one short message instead of a traceback
        print(
            f"saeflow: run '{run_name}' failed: {type(error).__name__}: {error}\n"
            f"Fix the cause and run the same command again: finished stages and checkpoints are kept. "
            f"The Prefect logs above have the details.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps({k: summary[k] for k in ("run_name", "run_dir")} | {"sae": summary["sae"]["path"], "analysis": summary["analysis"]["path"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
