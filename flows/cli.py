"""The `saeflow` command line.

    saeflow run [CONFIG] [--run-name NAME] [--artifacts-dir DIR] [--set key=value ...] [--new]
    saeflow serve [CONFIG] [--cron EXPR | --interval SECONDS] [--name NAME] [--new-each-run] ...
    saeflow sweep SWEEP [--artifacts-dir DIR] [--set key=value ...] [--dask-address A | --dask-workers N] [--yes]
    saeflow report RUN [--artifacts-dir DIR]
    saeflow analyze RUN --prompt TEXT [--prompt TEXT ...] [--token-index I] [--artifacts-dir DIR] [--device D]
    saeflow stop (RUN ... | --all) [--artifacts-dir DIR]
    saeflow config-reference

Exit status: 0 done; 2 the config or the command line is wrong, the run (or sweep) is already
running elsewhere, or (report, analyze) the run has not finished; 1 the run (or a sweep member)
failed, or (stop) no run was running; 75 it was stopped by SIGTERM/SIGINT or `saeflow stop` at a
safe point (training after writing a checkpoint); 130 a second Ctrl-C. After 1, 75 or 130,
running the same command again continues. The README's "Running your own" has the details.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import flows  # noqa: F401  (process defaults before torch and Prefect start)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="saeflow", description="Restartable SAE training pipeline (SAELens + Prefect).")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline (continues the run if it exists)")
    run.add_argument("config", nargs="?", help="YAML config; left out: the config stored by the run that --run-name names, else the built-in offline demo")
    run.add_argument("--run-name", help="run name (default: derived from the config, so the same config continues its run)")
    run.add_argument("--artifacts-dir", default="artifacts", help="where every output goes (default: ./artifacts)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--new", action="store_true", help="start a fresh run under a new name; the old run is kept")
    serve = commands.add_parser("serve", help="serve the pipeline as a Prefect deployment on a schedule (needs a Prefect server)")
    serve.add_argument("config", nargs="?", help="YAML config; left out: the config stored by the run that --run-name names, else the built-in offline demo")
    when = serve.add_mutually_exclusive_group()
    when.add_argument("--cron", help="cron schedule in UTC, e.g. '0 2 * * *'")
    when.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS")
    serve.add_argument("--name", help="deployment name (default: the run's name; with --new-each-run, the name and -new-each-run)")
    serve.add_argument("--run-name", help="run that every scheduled flow run continues (default: the config's stable name)")
    serve.add_argument("--new-each-run", action="store_true", help="make every scheduled flow run a fresh run named with its scheduled time")
    serve.add_argument("--artifacts-dir", default="artifacts")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sweep = commands.add_parser("sweep", help="run every member of a sweep file in parallel and compare them")
    sweep.add_argument("sweep_file", help="sweep YAML (see configs/demo_sweep.yaml)")
    sweep.add_argument("--artifacts-dir", default="artifacts")
    sweep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a key in every member")
    sweep.add_argument("--yes", action="store_true", help="allow more than 1,000 members")
    where = sweep.add_mutually_exclusive_group()
    where.add_argument("--dask-address", help="run members on an existing Dask cluster, e.g. tcp://10.0.0.5:8786")
    where.add_argument("--dask-workers", type=int, help="run members on a local Dask cluster of this many worker processes")
    report = commands.add_parser("report", help="print a finished run's metrics and the paths of its report files")
    report.add_argument("run", help="run name")
    report.add_argument("--artifacts-dir", default="artifacts")
    analyze = commands.add_parser("analyze", help="find the top features of new prompts with a finished run's SAE (no retraining)")
    analyze.add_argument("run", help="run name")
    analyze.add_argument("--prompt", action="append", required=True, help="prompt to analyse (repeatable)")
    analyze.add_argument("--token-index", type=int, help="token position to analyse (default: the run's analysis_token_index)")
    analyze.add_argument("--artifacts-dir", default="artifacts")
    analyze.add_argument("--device", help="device for the model and the SAE, e.g. cpu for a run trained on a GPU (default: the run's device)")
    stop = commands.add_parser(
        "stop",
        help="ask running runs to write a checkpoint at the end of their current training step and stop, wherever they run "
        "(a Dask worker, another machine sharing the artifacts folder); running them again continues them",
    )
    stop.add_argument("runs", nargs="*", metavar="RUN", help="run names")
    stop.add_argument("--all", action="store_true", help="every run of the artifacts folder that is running")
    stop.add_argument("--artifacts-dir", default="artifacts")
    commands.add_parser("config-reference", help="print every config key with its default and meaning")
    return parser


def _stop(args) -> int:
    from tasks.artifacts import run_dir
    from tasks.stopping import request_stop

    runs = Path(args.artifacts_dir) / "runs"
    if args.all == bool(args.runs):
        print("saeflow: name the runs to stop, or give --all", file=sys.stderr)
        return EXIT_BAD_INPUT
    missing = [name for name in args.runs if not run_dir(args.artifacts_dir, name).is_dir()]
    if missing:
        print(f"saeflow: no run {', '.join(repr(m) for m in missing)} in {runs}; {runs_there(runs)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    names = args.runs or sorted(p.name for p in runs.glob("*") if p.is_dir())
    asked = 0
    for name in names:
        if (run_dir(args.artifacts_dir, name) / "trained" / "manifest.json").is_file():
            if args.runs:
                print(f"run '{name}' has finished training; nothing to stop")
            continue
        holder = request_stop(run_dir(args.artifacts_dir, name))
        if holder is not None:
            print(
                f"asked run '{name}' ({holder}) to stop: in training it writes a checkpoint at the end of the current step; "
                f"before training (filling or importing its store) it stops after its model batch or shard, keeping the "
                f"shards written (a model being built or data being tokenised is finished first)"
            )
            asked += 1
        elif args.runs:
            print(f"run '{name}' is not running")
    if not asked:
        print(f"saeflow: {'none of these runs' if args.runs else f'no run in {runs}'} is running; nothing to stop", file=sys.stderr)
        return EXIT_FAILED
    return 0


class RunNotReady(Exception):
    """The named run does not exist or has not finished."""


def finished_run(artifacts_dir: str, name: str) -> dict:
    """The summary of a finished run, or RunNotReady saying what exists and what to do."""
    from tasks.artifacts import read_json, run_dir

    folder = run_dir(artifacts_dir, name)
    if not folder.is_dir():
        raise RunNotReady(f"no run '{name}' in {folder.parent}; {runs_there(folder.parent)}")
    summary = folder / "summary.json"
    if not summary.is_file():
        from tasks.checkpoint import checkpoint_folders, checkpoint_root, checkpoint_step, missing_checkpoints, newest_whole_checkpoint
        from tasks.stopping import lock_holder

        stored = folder / "config.json"
        artifacts = artifacts_option(artifacts_dir)
        try:
            config = read_json(stored)["config"] if stored.is_file() else {}
        except (ValueError, KeyError, TypeError) as error:  # cut short or zeroed by a crash of the machine
            raise RunNotReady(
                f"run '{name}' has not finished, and its {stored} cannot be read ({type(error).__name__}: {error}); restore it, "
                f"or delete it and continue the run with its config file (`saeflow run CONFIG --run-name {shlex.quote(name)}{artifacts}`)"
            ) from None
        progress = training_progress(folder, config.get("training_tokens"))
        if holder := lock_holder(folder / ".lock"):
            if (folder / "trained" / "manifest.json").is_file():
                doing = "its training has finished; it is saving, evaluating and analysing the SAE"
            else:
                doing = (
                    f"{f'training, {progress}' if progress else 'before training (or in its first steps)'}. `saeflow stop "
                    f"{shlex.quote(name)}{artifacts}` stops it (in training at a checkpoint, in a fill or import after its "
                    f"model batch or shard)"
                )
            raise RunNotReady(f"run '{name}' is running ({holder}): {doing}")
        if missing := missing_checkpoints(config.get("checkpoint_path"), folder):
            raise RunNotReady(f"{missing}. Then run `saeflow run --run-name {shlex.quote(name)}{artifacts}` to finish it")
        root = checkpoint_root(config.get("checkpoint_path"), folder)
        newest, written = newest_whole_checkpoint(root), checkpoint_folders(root)
        found = [f"checkpoints up to {newest.name}" if newest else "no usable checkpoint" if written else "no checkpoint"]
        if broken := [p.name for p in reversed(written) if newest is None or checkpoint_step(p) > checkpoint_step(newest)]:
            found[0] += f" ({', '.join(broken)} {'is' if len(broken) == 1 else 'are'} incomplete or corrupted: set aside when it continues)"
        found += [f"{n}/" for n in ("trained", "sae") if (folder / n).is_dir()]
        found += [n for n in ("metrics.json", "analysis.json") if (folder / n).is_file()]
        raise RunNotReady(
            f"run '{name}' has not finished: it has {', '.join(found)}{f' (training logged {progress})' if progress else ''}. "
            f"Run `saeflow run --run-name {shlex.quote(name)}{artifacts}` (it reads the run's stored config) to finish it"
        )
    return read_json(summary)


def artifacts_option(artifacts_dir: str) -> str:
    """` --artifacts-dir DIR` for a command the user is told to run, or '' for the default folder."""
    return "" if artifacts_dir == "artifacts" else f" --artifacts-dir {shlex.quote(artifacts_dir)}"


def runs_there(runs: Path) -> str:
    """The runs of a `runs` folder, for a message about a name not among them."""
    names = sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []
    if names:
        return f"runs there: {', '.join(names)}"
    return "there are no runs there: give the --artifacts-dir the run was started with (default: ./artifacts)"


def training_progress(folder: Path, training_tokens: int | None) -> str | None:
    """The last row of a run's `train_log.jsonl` in words (step, share of the training tokens,
    speed, loss, L0, and how long ago), or None before its first row."""
    log = folder / "train_log.jsonl"
    tail = b""
    if log.is_file():
        with log.open("rb") as f:  # the last rows only: a multi-day run's log holds megabytes
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            tail = f.read()
    row = None
    for line in reversed(tail.decode(errors="replace").splitlines()):
        try:
            row = json.loads(line)
            break
        except json.JSONDecodeError:  # a row cut short by a kill
            continue
    if row is None:
        return None
    share = f" ({100 * row['tokens'] / training_tokens:.1f}% of {training_tokens:,} tokens)" if training_tokens else ""
    ago = time.time() - log.stat().st_mtime
    numbers = [f"{row['tokens_per_s']:,.0f} tokens/s" if row.get("tokens_per_s") is not None else None]
    numbers += [f"loss {row['loss']:.4g}" if row.get("loss") is not None else None, f"L0 {row['l0']:.1f}" if row.get("l0") is not None else None]
    return f"step {row['step']:,}{share}, {', '.join(n for n in numbers if n)}, logged {_duration(ago)} ago"


def _disk_full(error: BaseException, artifacts_dir: str) -> str:
    """A line on the full disk behind `error`, if that is what it is (an OSError, or a
    safetensors write error, which names no file), else ''."""
    import errno
    import shutil

    said = str(error)
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or any(s in said for s in ("No space left on device", "StorageFull", "Disk quota exceeded"))
    if not full:
        return ""
    try:
        free = f" ({shutil.disk_usage(artifacts_dir).free / 1e9:.1f} GB free there now)"
    except OSError:
        free = ""
    return f"A disk is full (or your quota on it used up): the artifacts folder's, {artifacts_dir}{free}, or that of checkpoint_path or of the temporary folder. Free some space. "


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def check_prefect_api() -> None:
    """A scheduled deployment needs a Prefect server; say so before anything starts."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    from tasks.config import ConfigError

    url = PREFECT_API_URL.value()
    if not url:
        raise ConfigError("PREFECT_API_URL is not set: start a server (`prefect server start`) and point PREFECT_API_URL at it, e.g. http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        error = client.api_healthcheck()
    if error is not None:
        raise ConfigError(f"cannot reach the Prefect API at {url} ({error}); start it with `prefect server start` or fix PREFECT_API_URL")


def _serve(args) -> int:
    from pathlib import Path

    from flows.pipeline import pipeline_for
    from tasks.config import ConfigError, check_run_name
    from tasks.preflight import check_artifacts_dir, check_new_run, check_new_run_named, default_run_name, resolve

    if args.interval is not None and args.interval <= 0:
        raise ConfigError(f"--interval is {args.interval:g}; give a number of seconds above 0")
    if args.cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        try:
            CronSchedule(cron=args.cron)
        except ValidationError:
            raise ConfigError(f"--cron '{args.cron}' is not a cron expression; give five fields: minute hour day month weekday, e.g. '0 2 * * *' (02:00 UTC daily)") from None
    cfg = resolve(_run_config(args))
    check_artifacts_dir(args.artifacts_dir)
    if args.new_each_run:
        check_new_run(cfg)
        if args.run_name:  # it names fresh runs, which have plain names
            check_run_name(args.run_name)
    else:
        check_new_run_named(cfg, args.artifacts_dir, args.run_name or default_run_name(cfg, args.artifacts_dir))
    check_prefect_api()
    artifacts_dir = str(Path(args.artifacts_dir).resolve())
    parameters = {"config": cfg.model_dump(mode="json"), "run_name": args.run_name, "artifacts_dir": artifacts_dir, "new_each_run": args.new_each_run}
    # Two configs served at once get two deployments, and so do one config's continued and fresh runs.
    run = args.run_name or (default_run_name(cfg) if args.new_each_run else default_run_name(cfg, args.artifacts_dir))
    name = args.name or f"{run.replace('/', '-')}{'-new-each-run' if args.new_each_run else ''}"  # Prefect's names hold no /
    # One flow run at a time: one that comes due while the previous still trains waits for it
    # (Late in the UI), instead of failing on the run's lock.
    pipeline_for(artifacts_dir).serve(name=name, cron=args.cron, interval=args.interval, parameters=parameters, limit=1)
    return 0


def _run_config(args):
    """The config of `saeflow run` and `serve`: the file given; without one, the config stored by the run that
    `--run-name` names (so that a run is continued by its name alone), else the demo's. A
    `--run-name` without a config and without a stored one is refused, not given the demo."""
    from tasks.artifacts import run_dir
    from tasks.config import ConfigError, load_config, make_config

    if args.config is None and args.run_name:
        stored = run_dir(args.artifacts_dir, args.run_name) / "config.json"
        if not stored.is_file():
            runs = sorted(p.parent.name for p in stored.parent.parent.glob("*/config.json"))
            raise ConfigError(
                f"no run '{args.run_name}' with a stored config in {stored.parent.parent} (runs there: "
                f"{', '.join(runs) or 'none'}); give its --artifacts-dir, or a config file to start it"
            )
        from tasks.preflight import DERIVED_FIELDS, stored_run_config

        print(f"saeflow: the config stored in {stored}", file=sys.stderr)
        # Without what preflight filled in, so that a --set of hook_name or the model derives them again.
        values = {k: v for k, v in stored_run_config(stored)["config"].items() if k not in DERIVED_FIELDS}
        return make_config(values, args.overrides)
    return load_config(args.config, args.overrides)


def _report(args) -> int:
    summary = finished_run(args.artifacts_dir, args.run)
    from tasks.report import NOT_HELD_OUT, metric_value, metrics_table

    metrics = summary["metrics"]["metrics"]
    held_out = f"{metrics['eval_rows']} held-out activation rows" if "eval_rows" in metrics else f"{metrics['eval_contexts']} held-out contexts"
    print(f"Run {args.run} — metrics on {held_out}" + (f" (not held out: {NOT_HELD_OUT})" if metrics.get("eval_repeats_training") else "") + "\n")
    for row in metrics_table(metrics):
        print(f"  {row['metric']:<34} {metric_value(row['value'])}")
    print("\nFiles:")
    dashboard = [("dashboard", summary["analysis"]["dashboard"])] if "dashboard" in summary["analysis"] else []
    for name, path in [("report", summary["report"]["path"]), *dashboard, *[("plot", p) for p in summary["report"]["plots"]], ("metrics", summary["metrics"]["path"]), ("SAE", summary["sae"]["path"])]:
        print(f"  {name:<10} {path}")
    return 0


def _analyze(args) -> int:
    from tasks.artifacts import read_json, run_dir

    stored = run_dir(args.artifacts_dir, args.run) / "config.json"
    cfg = read_json(stored)["config"] if stored.exists() else None
    if cfg is not None and (cfg.get("activations_path") or cfg.get("synthetic") is not None):  # finished or not
        source = cfg.get("activations_path") or "sae_lens.synthetic"
        raise RunNotReady(f"run '{args.run}' has no model to run prompts through (no model: the activations come from {source})")
    summary = finished_run(args.artifacts_dir, args.run)
    import logging

    from tasks.analyse import check_token_index, logit_effects, top_features_for_prompt
    from tasks.config import ConfigError
    from tasks.load import open_sae
    from tasks.preflight import check_device_name, missing_device
    from tasks.model import load_model, select_cuda_device

    logger = logging.getLogger("saeflow.analyze")
    logger.propagate = False
    logger.handlers = [logging.StreamHandler(sys.stderr)]
    logger.handlers[0].setFormatter(logging.Formatter("saeflow: %(message)s"))
    if "" in args.prompt:
        raise ConfigError("--prompt is empty: it has nothing to analyse; give the text to analyse")
    index = cfg["analysis_token_index"] if args.token_index is None else args.token_index
    setting = "--token-index" if args.token_index is not None else "--token-index (by default the run's analysis_token_index)"
    device = args.device or cfg["device"]
    check_device_name(device)
    missing = missing_device(device)
    if missing:
        raise ConfigError(f"run '{args.run}' {'is analysed' if args.device else 'was trained'} on {device}, but {missing}; add --device cpu")
    select_cuda_device(device)
    try:
        check_token_index(summary["model"], cfg["model_from_pretrained_kwargs"], args.prompt, index, cfg["context_size"], cfg["prepend_bos"], setting)
        model = load_model(summary["model"], device, from_pretrained_kwargs=cfg["model_from_pretrained_kwargs"])
        sae, _ = open_sae({"path": summary["sae"]["path"]}, device)
    except OSError as error:  # the model's or the SAE's files moved since the run
        if summary["model"]["kind"] == "pretrained":
            where = f"{summary['model']['name']}, from the Hugging Face cache, which must hold it where the hub cannot be reached"
        else:
            where = summary["model"]["path"]
        artifacts = artifacts_option(args.artifacts_dir)
        raise RunNotReady(
            f"run '{args.run}' cannot be analysed: {type(error).__name__}: {error}. It reads its model ({where}) and its SAE "
            f"({summary['sae']['path']}) where the run found or left them: if they moved, put them back, or run the run again "
            f"(`saeflow run --run-name {shlex.quote(args.run)}{artifacts}`) to make what is missing"
        ) from None
    for prompt in args.prompt:
        result = top_features_for_prompt(model, sae, prompt, index, cfg["top_k_features"], cfg["context_size"], cfg["prepend_bos"], logger)
        bos = " (the BOS token prepend_bos adds)" if result["is_bos"] else ""
        print(f"{prompt!r} at token {result['token']!r}{bos}:" + ("" if result["top_features"] else " no feature fires"))
        effects = {e["feature"]: e for e in logit_effects(model, sae, [f["feature"] for f in result["top_features"]], cfg["top_k_tokens"])[0]}
        for feature in result["top_features"]:
            line = f"  feature {feature['feature']:>6}  activation {feature['activation']:.4f}"
            if feature["feature"] in effects:
                effect = effects[feature["feature"]]
                line += f"  promotes {[t['token'] for t in effect['promoted']]}  inhibits {[t['token'] for t in effect['inhibited']]}"
            print(line)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the `saeflow` command line on `argv` (default: the process's); returns the exit status."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # here, where a reader gone away (`saeflow report RUN | head`) is caught
        return code
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to write at exit
        return 128 + signal.SIGPIPE  # as a program the signal ended


def temporary_server_port() -> None:
    """Without a Prefect server of its own (PREFECT_API_URL), Prefect starts a temporary one on a
    port it draws from 8000-8999 with Python's global generator, and a server that cannot bind
    its port leaves its command talking to whichever server holds that port, until that one's
    command ends. Commands started together (a job array, two terminals) drew the same port
    whenever something had seeded the generator alike. Here the kernel picks a free port for it."""
    import socket

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.port is None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            server.port = probe.getsockname()[1]


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    from tasks.config import ConfigError, check_run_name, config_reference

    if args.command == "config-reference":
        print(config_reference())
        return 0
    try:
        for name in [getattr(args, "run_name", None), getattr(args, "run", None), *getattr(args, "runs", [])]:
            if name is not None:
                check_run_name(name, args.artifacts_dir)
    except ConfigError as error:
        print(f"saeflow: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.command == "stop":
        return _stop(args)
    if args.command in ("report", "analyze"):
        try:
            return _report(args) if args.command == "report" else _analyze(args)
        except (RunNotReady, ConfigError) as error:
            print(f"saeflow: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT

    if args.command in ("sweep", "serve"):
        temporary_server_port()
    if args.command == "sweep":
        from flows.sweep import run_sweep
        from tasks.artifacts import Busy
        from tasks.stopping import PREEMPTIONS, STOP_CHECKPOINTS, STOP_REQUESTS, no_retries_once_the_temporary_server_ends

        STOP_REQUESTS.clear()
        PREEMPTIONS.clear()
        STOP_CHECKPOINTS.clear()
        try:
            with no_retries_once_the_temporary_server_ends():
                rows = run_sweep(args.sweep_file, args.artifacts_dir, args.overrides, args.yes, args.dask_address, args.dask_workers)
        except ConfigError as error:
            print(f"saeflow: config error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Busy as error:
            print(f"saeflow: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as error:  # noqa: BLE001 - one short message instead of a traceback
            if not STOP_REQUESTS:  # such as Prefect's temporary server gone without a signal
                print(
                    f"saeflow: sweep failed: {type(error).__name__}: {error}\nFix the cause and run the same command again: "
                    f"finished members and checkpoints are kept. The Prefect logs above have the details.",
                    file=sys.stderr,
                )
                return EXIT_FAILED
            # The signal also stopped the temporary Prefect server, so the sweep could not finish its table.
            written = "".join(f"\n  {message}" for message in PREEMPTIONS) or " none"
            print(
                f"saeflow: sweep stopped by {STOP_REQUESTS[0]}. Stopped on the way out:{written}\nRun the same "
                f"command again to continue it. (Prefect could not be told: {type(error).__name__}: {error})",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        failed = [r for r in rows if r["state"] != "Completed"]
        for number, row in enumerate(rows, 1):  # numbered as in frontier.png
            if "l0" in row:
                ce = f"  CE score {row['ce_loss_score']:.3f}" if row["ce_loss_score"] is not None else ""  # none without a model
                detail = f"  L0 {row['l0']:.1f}  EV {row['explained_variance']:.3f}{ce}  dead {row['dead_features']}"
            else:
                detail = f"  {row.get('error')}"
            print(f"{number:>2}  {row['state']:<10} {row['label']:<40} {row['run']}{detail}")
        if failed and (STOP_REQUESTS or all(r["state"] == "Stopped" for r in failed)):
            # members stopped in other processes (Dask workers) are not counted here
            how = f"{len(STOP_CHECKPOINTS)} in training, each" if STOP_CHECKPOINTS else "those in training each"
            cause = f"by {STOP_REQUESTS[0]}" if STOP_REQUESTS else "(by `saeflow stop`, or by a signal to the workers its members ran on)"
            print(
                f"saeflow: sweep stopped {cause}: the members marked Stopped stopped at a safe point ({how} after writing "
                f"a checkpoint at the end of its step). Run the same command again to continue it.",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        return EXIT_FAILED if failed else 0
    if args.command == "serve":
        try:
            return _serve(args)
        except ConfigError as error:
            print(f"saeflow: config error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT

    from tasks.artifacts import Busy

    claimed = contextlib.ExitStack()  # the run's locks, held from its claim to the end of its flow run
    try:
        cfg = _run_config(args)
        from tasks.preflight import claim_run, resolve

        cfg = resolve(cfg)
        temporary_server_port()
        from prefect.exceptions import CancelledRun

        from flows import pipeline
        from tasks.stopping import CANCELLED_IN_PREFECT, OUTSIDE_SAFE_POINTS, PREEMPTIONS, Preempted, no_retries_once_the_temporary_server_ends, raised_while, sigterm_interrupts, terminated_by

        run_name = claim_run(cfg, args.artifacts_dir, args.run_name, args.new, keep_locks=claimed)
    except ConfigError as error:
        print(f"saeflow: config error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Busy as error:  # refused before a Prefect flow run is created
        print(f"saeflow: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT

    print(f"saeflow: run '{run_name}' (artifacts in {args.artifacts_dir})", file=sys.stderr)
    if args.new:  # the same command would start yet another run
        again = f"run `saeflow run --run-name {shlex.quote(run_name)} --artifacts-dir {shlex.quote(str(args.artifacts_dir))}` to continue it"
    else:
        again = "run the same command again to continue it"
    again_capitalised = again[0].upper() + again[1:]
    PREEMPTIONS.clear()
    try:
        with claimed, sigterm_interrupts(), no_retries_once_the_temporary_server_ends():
            summary = pipeline.run_pipeline(cfg, run_name, args.artifacts_dir)
    except Preempted as error:
        print(f"saeflow: run '{run_name}' {error}. {again_capitalised}.", file=sys.stderr)
        return EXIT_PREEMPTED
    except CancelledRun as error:  # cancelled in the Prefect UI: stopped at a safe point, or after its last stage
        if not PREEMPTIONS:
            print(f"saeflow: run '{run_name}': {error}", file=sys.stderr)
        elif CANCELLED_IN_PREFECT in PREEMPTIONS[-1]:
            print(f"saeflow: run '{run_name}' {PREEMPTIONS[-1]}. {again_capitalised}.", file=sys.stderr)
        else:  # and a signal
            print(f"saeflow: run '{run_name}' was cancelled in Prefect and {PREEMPTIONS[-1]}. {again_capitalised}.", file=sys.stderr)
        return EXIT_PREEMPTED
    except ConfigError as error:  # found once the model is built (the prompts' tokens need its tokenizer)
        print(f"saeflow: config error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        if PREEMPTIONS:  # SIGTERM outside filling and training (`Terminated`)
            print(f"saeflow: run '{run_name}' {PREEMPTIONS[-1]}. {again_capitalised}.", file=sys.stderr)
            return EXIT_PREEMPTED
        print(f"saeflow: run '{run_name}' interrupted; {again}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 - one short message instead of a traceback
        # Stopped as asked, but the signal also stopped the temporary Prefect server.
        stop = PREEMPTIONS[-1] if PREEMPTIONS else (name := terminated_by(error)) and f"stopped by {name} {OUTSIDE_SAFE_POINTS}"
        if stop:
            print(
                f"saeflow: run '{run_name}' {stop}. {again_capitalised}. "
                f"(Prefect could not be told: {type(error).__name__}: {error}; the signal stopped its temporary server too.)",
                file=sys.stderr,
            )
            return EXIT_PREEMPTED
        if raised_while(error, KeyboardInterrupt):  # Ctrl-C in a terminal also ends the temporary server
            print(f"saeflow: run '{run_name}' interrupted; {again}", file=sys.stderr)
            return EXIT_FAILED
        print(
            f"saeflow: run '{run_name}' failed: {type(error).__name__}: {error}\n{_disk_full(error, args.artifacts_dir)}"
            f"Fix the cause and {again}: finished stages and checkpoints are kept. "
            f"The Prefect logs above have the details.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(json.dumps({k: summary[k] for k in ("run_name", "run_dir")} | {"sae": summary["sae"]["path"], "report": summary["report"]["path"], "dashboard": summary["analysis"].get("dashboard")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
