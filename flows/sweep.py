"""Sweeps: many runs from one base config, trained in parallel, compared on one frontier.

A sweep file:

    name: demo-l1                      # default: the file's name
    base: demo.yaml                    # a config path (relative to this file) or a mapping;
                                       # default: the built-in demo
    grid:                              # every combination of these values
      l1_coefficient: [0.5, 1.0, 2.0]
      expansion_factor: [4, 8]
    members:                           # and/or explicit members (overrides of the base)
      - {lr: 0.001}

Each member is an ordinary run (its stable name, its own folder, restartable). Members that
share model, hook and data share one activation store: the first to get there fills it, the
others wait for it; members at different hooks of the same model and data get their stores
filled together, from one model pass. Re-running a sweep finds the finished members cached and trains the rest. SIGTERM/SIGINT
stops each member at its next safe point (training writes a checkpoint first): in threads at
once; on Dask through the workers' own handlers (a signal to the whole job) or through a marker
file the sweep writes (a signal to its process alone).
The sweep writes `<artifacts>/sweeps/<name>/members.json` and `frontier.png` (L0 against
explained variance and CE-loss score) and publishes a table artifact of every member's metrics.
"""

from __future__ import annotations

import contextlib
import itertools
from collections import Counter
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import FlowRunContext
from prefect.exceptions import CancelledRun, MissingResult
from prefect.futures import as_completed
from prefect.states import Cancelled, Failed
from prefect.task_runners import ThreadPoolTaskRunner

from tasks.artifacts import BUSY_HINT, RESULTS_DIRNAME, Busy, exclusive_lock, run_dir, write_json
from tasks.config import ARCHITECTURE_FIELDS, DEMO_CONFIG, ConfigError, RunConfig, make_config, parse_override, read_yaml_mapping, stable_hash, unknown_key_hint
from tasks.preflight import check_new_run_named, claim_run, default_run_name, resolve
from tasks.stopping import CANCELLED_IN_PREFECT, Preempted, cancelled_in_prefect, member_in_dask_worker, polling, stop_requested, stop_signals, sweep_stopped_by, watching_for_cancel

SWEEP_FLOW_NAME = "saeflow-sweep"
MAX_MEMBERS_WITHOUT_YES = 1000
SWEEP_KEYS = {"name", "base", "grid", "members"}


def sweep_members(path: str | Path, overrides: list[str] = (), yes: bool = False, runs_here: bool = True) -> tuple[str, list[RunConfig]]:
    """Read a sweep file into its name and its members' resolved configs, or raise ConfigError."""
    path = Path(path)
    spec = read_yaml_mapping(path, "sweep file")
    if set(spec) - SWEEP_KEYS:
        config_keys = (set(spec) - SWEEP_KEYS) & set(RunConfig.model_fields)
        hint = f" ({len(config_keys)} of them {'is a config key' if len(config_keys) == 1 else 'are config keys'}: is it a run's config? Run it with `saeflow run {path}`, or name it as a sweep's base: {path.name})" if config_keys else ""
        raise ConfigError(f"{path}: a sweep file holds only {', '.join(sorted(SWEEP_KEYS))}; found {sorted(set(spec) - SWEEP_KEYS)}{hint}")
    base = spec.get("base")
    if base is None or isinstance(base, str):
        try:
            base_values = read_yaml_mapping(DEMO_CONFIG if base is None else path.parent / base, "base config file")
        except ConfigError as error:
            raise ConfigError(f"sweep file {path}: {error} (base: is a config path relative to the sweep file's folder, or a mapping of config keys)") from None
    elif isinstance(base, dict):
        base_values = base
    else:
        raise ConfigError(f"sweep file {path}: base must be a config path or a mapping of config keys, not {base!r}")
    fields = list(RunConfig.model_fields)
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"sweep file {path}: grid must map config keys to lists of values (e.g. grid: {{lr: [0.0001, 0.001]}}), not {grid!r}")
    for key, values in grid.items():
        if key not in fields:
            raise ConfigError(f"sweep axis '{key}' is not a config key{unknown_key_hint(key)}")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"sweep axis '{key}' needs a non-empty list of values, got {values!r}")
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []
    listed = spec.get("members") or []
    if not isinstance(listed, list) or not all(isinstance(m, dict) for m in listed):
        raise ConfigError(
            f"sweep file {path}: members must be a list of mappings of config keys (e.g. members: [{{lr: 0.001}}] "
            f"or '- lr: 0.001' lines), not {listed!r}"
        )
    members = combos + listed
    for override in overrides:  # a misspelt --set is told as such, not as every member's error
        key = parse_override(override)[0]
        if key not in fields:
            raise ConfigError(f"--set {key}: not a config key{unknown_key_hint(key)}")
    varied = {key for member in members for key in member}
    clashing = sorted(varied & {parse_override(override)[0] for override in overrides})  # a bad --set is told as such
    if clashing:
        raise ConfigError(
            f"--set {', '.join(clashing)} would give every member of {path} the same value of what the sweep varies; "
            f"change it in the sweep file, or drop the --set"
        )
    if not members:
        raise ConfigError(f"{path} defines no member: give a grid or a members list")
    if len(members) > MAX_MEMBERS_WITHOUT_YES and not yes:
        raise ConfigError(f"the sweep has {len(members)} members (more than {MAX_MEMBERS_WITHOUT_YES}); pass --yes if you mean it")
    configs, refused = [], {}
    for member in members:  # every member's problem at once, not one per try
        try:
            configs.append(resolve(make_config({**base_values, **member}, overrides), runs_here))
        except ConfigError as error:
            refused[str(member)] = str(error)
    if refused:
        raise ConfigError(refused_members(refused, len(members)))
    overridden = [m for m, c in zip(members, configs) if "expansion_factor" in m and c.d_sae is not None]
    if overridden:
        raise ConfigError(
            f"{path}: sweep member {overridden[0]} sets expansion_factor, but d_sae is set, which overrides it, so it "
            f"would not train the SAE it says; vary d_sae instead, or drop d_sae"
        )
    names = [default_run_name(c) for c in configs]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(
                f"sweep members {names.index(name) + 1} and {i + 1} ({members[names.index(name)]} and {members[i]}) are the same run: "
                f"they differ only in settings that do not change the trained SAE; make them differ or drop one"
            )
    name = spec.get("name") or path.stem
    if not isinstance(name, str) or Path(name).name != name or name.startswith("."):
        raise ConfigError(f"sweep file {path}: name {name!r} must be a plain folder name (it names sweeps/<name>/); give the sweep a name: of that kind")
    return name, configs


STOPPED_MARKER = "stopped"  # in the sweep's folder, while a stopped sweep on Dask waits for its members


@task(name="sweep-member")
def run_member(config: dict[str, Any], run_name: str, artifacts_dir: str, stopped_marker: str | None = None) -> dict[str, Any]:
    """One member: the ordinary pipeline, as a subflow run; none once the sweep was asked to stop
    (a signal to this process, or, on Dask, `stopped_marker` written by the sweep's process)."""
    from flows.pipeline import pipeline_for, summary_of

    if stop := stop_requested() or (stopped_marker and sweep_stopped_by(Path(stopped_marker))):
        raise Preempted(f"not started: {stop} was received before it started")
    with member_in_dask_worker(run_dir(artifacts_dir, run_name), Path(stopped_marker)) if stopped_marker else contextlib.nullcontext():
        return summary_of(pipeline_for(artifacts_dir)(config=config, run_name=run_name, artifacts_dir=artifacts_dir, return_state=True))


@contextlib.contextmanager
def _marking_a_stop(marker: Path):
    """On Dask, where the members run in the workers' processes and this process's signals do
    not reach them (a signal sent to the whole job does: `member_in_dask_worker`), a thread
    writes `marker` within a second of this process being asked to stop: members not started yet
    then do not start, and running ones stop at their next safe point (`StopRequests`)."""

    def mark_a_stop() -> bool:
        if (stop := stop_requested()) and not marker.is_file():
            marker.write_text("the sweep's cancel in Prefect" if stop == CANCELLED_IN_PREFECT else f"{stop} to the sweep")
        return False  # looks until the sweep ends

    with polling(1.0, mark_a_stop, "sweep-stop-marker"):
        yield


def plot_frontier(rows: list[dict[str, Any]], path: Path) -> None:
    """Plot the members' sparsity against reconstruction (the frontier) into `path`, numbered as in the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Points are numbered as the members are listed below the plots (and in the table): labels of
    # several varied settings written beside each point piled up and squeezed the axes.
    key_height = 0.18 * len(rows) + 0.3
    fig, axes = plt.subplots(1, 2, figsize=(10, 4 + key_height))
    for ax, key, label in zip(axes, ("explained_variance", "ce_loss_score"), ("explained variance", "CE-loss score")):
        done = [(number, r) for number, r in enumerate(rows, 1) if r["state"] == "Completed" and r[key] is not None]
        if not done:  # without a model there is no CE-loss score
            completed = any(r["state"] == "Completed" for r in rows)
            ax.text(0.5, 0.5, f"no {label} (no model)" if completed else "no member completed", ha="center", va="center", transform=ax.transAxes)
        ax.scatter([r["l0"] for _, r in done], [r[key] for _, r in done])
        for number, r in done:
            ax.annotate(str(number), (r["l0"], r[key]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(label)
        ax.set_title(f"Sparsity vs {label}")
    key = "\n".join(f"{number}  {r['label']}" + ("" if r["state"] == "Completed" else f" ({r['state']})") for number, r in enumerate(rows, 1))
    fig.text(0.01, 0.01, key, fontsize=8, family="monospace", va="bottom")
    fig.tight_layout(rect=(0, key_height / (4 + key_height), 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


@flow(name=SWEEP_FLOW_NAME, flow_run_name="sweep-{name}", task_runner=ThreadPoolTaskRunner(max_workers=4))
def sae_sweep(name: str, members: list[dict[str, Any]], labels: list[str], artifacts_dir: str) -> list[dict[str, Any]]:
    """Run every member (in parallel on the flow's task runner), then write the sweep's table,
    `members.json` and `frontier.png`. A failed member is reported, not fatal: the flow run then
    ends Failed, saying how many members did not complete, with the rows as its result ("Preempted",
    of type Cancelled, when those members were all stopped at a safe point)."""
    from prefect.artifacts import create_table_artifact

    from flows.pipeline import PREEMPTED, crash_ghost_runs
    from tasks.report import artifact_key

    folder = Path(artifacts_dir) / "sweeps" / name
    with sweep_lock(name, artifacts_dir):
        crash_ghost_runs(f"sweep-{name}", artifacts_dir, SWEEP_FLOW_NAME)
        names = [default_run_name(RunConfig(**config), artifacts_dir) for config in members]
        for config, run_name in zip(members, names):
            with contextlib.suppress(Busy):  # a member another process runs fails on its own, reported below
                claim_run(RunConfig(**config), artifacts_dir, run_name, new=False)
        # Only this (the main) thread can handle signals: here SIGTERM asks each member to stop at
        # its next safe point (training: a checkpoint at the step boundary). Members in threads see
        # it at once; on Dask the sweep writes a marker file that they look for.
        in_threads = isinstance(FlowRunContext.get().task_runner, ThreadPoolTaskRunner)
        marker = folder / STOPPED_MARKER
        marker.unlink(missing_ok=True)  # an earlier stop's
        with stop_signals(), watching_for_cancel(), contextlib.nullcontext() if in_threads else _marking_a_stop(marker):
            futures = _run_members(members, names, labels, artifacts_dir, None if in_threads else marker)
            rows = [_member_row(run_name, label, future) for run_name, label, future in zip(names, labels, futures)]
        marker.unlink(missing_ok=True)
        write_json(folder / "members.json", rows)
        plot_frontier(rows, folder / "frontier.png")
        create_table_artifact(rows, key=artifact_key(f"sweep-{name}", "members"), description=f"Members of sweep {name}")
    unfinished = Counter(row["state"] for row in rows if row["state"] != "Completed")
    if cancelled_in_prefect():  # Prefect allows a Cancelling run no other end
        done = f"{len(rows) - sum(unfinished.values())} of {len(rows)} members completed; run the sweep again to continue it" if unfinished else "every member had completed"
        return Cancelled(message=f"Cancelled in Prefect: {done}", data=rows)
    if set(unfinished) == {"Stopped"}:  # stopped at safe points, as asked: not a failure in the UI
        return Cancelled(name=PREEMPTED, message=f"{unfinished['Stopped']} of {len(rows)} members stopped at a safe point; run the sweep again to continue it", data=rows)
    if unfinished:  # the sweep's flow run shows it in the UI; the rows still reach the caller
        counts = ", ".join(f"{n} {state}" for state, n in unfinished.items())
        return Failed(message=f"{sum(unfinished.values())} of {len(rows)} members did not complete ({counts}); the members table says why", data=rows)
    return rows


def sweep_lock(name: str, artifacts_dir: str):
    """The lock a sweep holds while it runs: one process per sweep name and artifacts folder."""
    hint = "wait for it to finish (a different sweep needs a name of its own: `name:` in its sweep file)"
    return exclusive_lock(Path(artifacts_dir) / "sweeps" / name / ".lock", f"sweep '{name}' (in {artifacts_dir})", wait=False, hint=hint)


def _run_members(members: list[dict[str, Any]], names: list[str], labels: list[str], artifacts_dir: str, stopped_marker: Path | None) -> list:
    """Submit every member; returns their futures, in order. Members whose stores differ only in
    their hook wait for one shared model pass that fills all those stores; the others start at once."""
    fills = shared_fills(members, artifacts_dir)
    waiting = {id(fill): indices for fill, indices in fills}
    futures = {}
    for i in range(len(members)):
        if not any(i in indices for indices in waiting.values()):
            futures[i] = _submit_member(members[i], names[i], labels[i], artifacts_dir, stopped_marker)
    for fill in as_completed([fill for fill, _ in fills]):  # failed or not: members fill what is missing
        for i in waiting[id(fill)]:
            futures[i] = _submit_member(members[i], names[i], labels[i], artifacts_dir, stopped_marker)
    return [futures[i] for i in range(len(members))]


def _member_row(run_name: str, label: str, future) -> dict[str, Any]:
    """A member's row of the sweep table, once it has ended."""
    future.wait()
    state = future.state
    if not state.is_final():  # a Dask worker that died (OOM) leaves its task run Running
        return {"run": run_name, "label": label, "state": "Crashed", "error": f"its worker ended while it was {state.name}"}
    row = {"run": run_name, "label": label, "state": state.name}
    if state.is_completed():
        metrics = future.result()["metrics"]["metrics"]
        # no CE or KL score without a model (activations_path, synthetic)
        row.update({k: metrics.get(k) for k in ("l0", "explained_variance", "ce_loss_score", "kl_div_score", "mse", "dead_features")})
    else:
        row["error"] = (state.message or "").removeprefix("Task run encountered an exception ")  # Prefect's words before the error's own
        with contextlib.suppress(MissingResult):  # the member's exception, where Prefect kept it
            error = state.result(raise_on_failure=False)
            if isinstance(error, (Preempted, CancelledRun)):
                row["state"] = "Stopped"  # by a signal or `saeflow stop` (or cancelled in the UI), at a safe point: the next run continues it
            elif isinstance(error, Busy):  # `saeflow sweep` has no --new
                row["error"] = row["error"].replace(BUSY_HINT, "wait for it to finish, then run the sweep again (this member then continues)")
    return row


def _submit_member(config: dict[str, Any], run_name: str, label: str, artifacts_dir: str, stopped_marker: Path | None):
    member = run_member.with_options(task_run_name=lambda: f"member {label}")  # told apart in the UI by what they vary
    with _gpu_resource(config["device"]):  # a Dask cluster places one GPU member per GPU worker
        return member.submit(config, run_name, artifacts_dir, None if stopped_marker is None else str(stopped_marker))


def shared_fills(members: list[dict[str, Any]], artifacts_dir: str) -> list[tuple[Any, list[int]]]:
    """Submit one `fill_activation_stores` per group of members that read the same tokens through
    the same model at different hooks; returns each fill's future and its members' indices."""
    from tasks.activations import NotEnoughDisk, check_room_for_stores, fill_activation_stores, shared_pass_key, store_spec
    from tasks.model import build_model, model_spec
    from tasks.tokens import pretokenise, tokens_spec

    groups: dict[str, list[int]] = {}
    for i, config in enumerate(members):
        cfg = RunConfig(**config)
        if cfg.activation_mode != "cached" or cfg.activation_source is not None:  # no model pass to share
            continue
        unbuilt = store_spec(cfg, {"kind": None, "name": cfg.model_name, "path": None})
        groups.setdefault(stable_hash([model_spec(cfg), shared_pass_key(unbuilt)]), []).append(i)
    prepared = []  # models built and stores known for every group before any data is tokenised
    for indices in groups.values():
        configs = [RunConfig(**members[i]) for i in indices]
        if len({(c.hook_name, c.hook_head_index) for c in configs}) < 2:
            continue
        try:
            model_ref = build_model(model_spec(configs[0]), artifacts_dir)
        except Exception as error:  # the members will report it, each on its own
            get_run_logger().warning(f"Could not prepare a shared fill for {configs[0].model_name}: {error}")
            continue
        specs = list({stable_hash(s): s for s in (store_spec(c, model_ref) for c in configs)}.values())
        prepared.append((indices, configs, model_ref, specs))
    try:  # all groups' stores at once, before any fill starts (filled one by one, they would fill the disk all the same)
        check_room_for_stores([spec for *_, specs in prepared for spec in specs], artifacts_dir)
    except NotEnoughDisk as error:
        hooks = ", ".join(f"{c.model_name} at {c.hook_name}" for _, configs, _, _ in prepared for c in configs)
        raise NotEnoughDisk(f"the activation stores the sweep's members share ({hooks}) would not fit: {error}") from None
    fills = []
    for indices, configs, model_ref, specs in prepared:
        try:
            text = tokens_spec(configs[0], model_ref)  # the same contexts for the whole group
            tokens_ref = pretokenise(text, model_ref, configs[0].model_from_pretrained_kwargs, artifacts_dir) if text else None
        except Exception as error:  # the members will report it, each on its own
            get_run_logger().warning(f"Could not prepare a shared fill for {configs[0].model_name}: {error}")
            continue
        with _gpu_resource(configs[0].device):
            fills.append((fill_activation_stores.submit(specs, model_ref, tokens_ref, artifacts_dir), indices))
    return fills


def _gpu_resource(device: str):
    if not device.startswith("cuda"):
        return contextlib.nullcontext()
    import dask

    return dask.annotate(resources={"GPU": 1})


def refused_members(refused: dict[str, str], n_members: int) -> str:
    """One message for the refused members (each by its label or values) and their errors: every
    one at once, so that a sweep is not fixed one member per try; one line when all of several
    members are refused alike."""
    first, error = next(iter(refused.items()))
    if n_members > 1 and len(refused) == n_members and len(set(refused.values())) == 1:
        return f"all {n_members} sweep members are refused alike, e.g. sweep member {first}: {error}"
    return "\n".join(f"sweep member {member}: {error}" for member, error in refused.items())


def member_labels(configs: list[RunConfig]) -> list[str]:
    """Short labels naming what differs between members (e.g. `l1_coefficient=2.0`), each with
    only the settings its architecture has (no `k` for a standard SAE)."""
    dumps = [c.result_fields() for c in configs]
    varying = [k for k in dumps[0] if len({repr(d.get(k)) for d in dumps}) > 1 and k not in ("d_in", "hook_layer")]

    def applies(key: str, values: dict) -> bool:
        return key not in ARCHITECTURE_FIELDS or values["architecture"] in ARCHITECTURE_FIELDS[key]

    return [",".join(f"{k}={d[k]}" for k in varying if applies(k, d)) or "base" for d in dumps]


def sweep_runner(dask_address: str | None, dask_workers: int | None):
    """The task runner for the members: threads, or Dask (an existing cluster or a local one)."""
    if dask_address is None and dask_workers is None:
        return ThreadPoolTaskRunner(max_workers=4)
    from prefect_dask import DaskTaskRunner

    if dask_address is not None:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": dask_workers, "threads_per_worker": 1, "processes": True})


def check_dask_address(address: str) -> None:
    """Refuse an unreachable scheduler before anything starts."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if not parsed.hostname or port is None:
        raise ConfigError(f"--dask-address {address} names no scheduler port; give host and port, e.g. tcp://{parsed.hostname or '10.0.0.5'}:8786 (`dask scheduler` listens on 8786)")
    try:
        socket.create_connection((parsed.hostname, port), timeout=5).close()
    except OSError as error:
        raise ConfigError(f"cannot reach the Dask scheduler at {address} ({error}); start it with `dask scheduler` or fix --dask-address") from None


def run_sweep(path: str, artifacts_dir: str, overrides: list[str] = (), yes: bool = False, dask_address: str | None = None, dask_workers: int | None = None) -> list[dict[str, Any]]:
    """Validate the sweep file, then run its flow; returns one row per member."""
    if dask_workers is not None and dask_workers < 1:
        raise ConfigError(f"--dask-workers is {dask_workers}; give at least 1 worker process (or leave it out to run members in threads)")
    name, configs = sweep_members(path, overrides, yes, runs_here=dask_address is None)  # a cluster's machines have their own devices
    if dask_address is not None:
        check_dask_address(dask_address)
    if dask_workers is not None and any(c.device.startswith("cuda") for c in configs):
        # Members on a GPU ask Dask for a GPU resource, which a local cluster's workers do not have.
        raise ConfigError(
            "--dask-workers starts local Dask workers without a GPU resource, so members on cuda would wait forever; "
            "on one machine leave --dask-workers out (members then run in threads, sharing the device), or start one "
            "`dask worker` per GPU (CUDA_VISIBLE_DEVICES=i ... --resources GPU=1) and give --dask-address"
        )
    artifacts_dir = str(Path(artifacts_dir).resolve())
    refused = {}
    for cfg, label in zip(configs, member_labels(configs)):
        try:
            check_new_run_named(cfg, artifacts_dir, default_run_name(cfg, artifacts_dir))
        except ConfigError as error:
            refused[label] = str(error)
    if refused:
        raise ConfigError(refused_members(refused, len(configs)))
    # Refused here, before any Prefect server or flow run, and held through the flow run (which,
    # in this thread, takes it again): two commands of one sweep started together never both start.
    with sweep_lock(name, artifacts_dir):
        sweep = sae_sweep.with_options(task_runner=sweep_runner(dask_address, dask_workers), result_storage=Path(artifacts_dir) / RESULTS_DIRNAME)
        state = sweep(name=name, members=[c.model_dump(mode="json") for c in configs], labels=member_labels(configs), artifacts_dir=artifacts_dir, return_state=True)
    rows = state.result(raise_on_failure=False, _sync=True)  # Failed (or Preempted) with the rows when a member did not complete
    if isinstance(rows, BaseException):
        raise rows
    return rows

