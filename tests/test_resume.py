"""Crash-proof, exact resume: runs killed, interrupted or failed at any moment end with weights
bitwise equal to an uninterrupted run's, and faults leave the last good checkpoint intact."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import held_by_another_thread, start_failing_once, task_states, tiny_config
from flows.pipeline import run_pipeline
from tasks.artifacts import exclusive_lock, verify_manifest, whole_safetensors
from tasks.preflight import claim_run, resolve

ROOT = Path(__file__).resolve().parent.parent
# Large SAE, small store: training takes several seconds, so there is time to signal it mid-way.
SLOW_TRAINING = {"expansion_factor": 64, "train_batch_size_tokens": 4096, "training_tokens": 131_072, "n_batches_in_buffer": 128, "n_checkpoints": 16, "log_every": 2}
# Several shards and checkpoints for the fault-injection tests: 64 steps, checkpoints after steps 13, 26, 39, 52.
FAULTS = {"training_tokens": 32_768, "n_checkpoints": 4}


def start(cfg, artifacts, run_name, **kwargs):
    name = claim_run(cfg, artifacts, run_name, new=False)
    return run_pipeline(cfg, name, artifacts, **kwargs)


def weights(summary_or_run: dict | Path) -> dict[str, torch.Tensor]:
    folder = Path(summary_or_run["training"]["path"]) if isinstance(summary_or_run, dict) else summary_or_run / "trained"
    return load_file(folder / "sae_weights.safetensors")


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def cli(*args: str, driver: tuple[str, int] | None = None, artifacts: Path, config: Path, run_name: str) -> subprocess.Popen:
    command = [sys.executable, str(ROOT / "tests" / "kill_driver.py"), driver[0], str(driver[1])] if driver else [sys.executable, "-m", "flows.cli", "run"]
    return subprocess.Popen(
        [*command, str(config), "--artifacts-dir", str(artifacts), "--run-name", run_name, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(process: subprocess.Popen) -> tuple[int, str]:
    output, _ = process.communicate(timeout=600)
    return process.returncode, output


def wait_for(condition, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"run ended too early:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, "timed out waiting for the run"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


def config_file(tmp_path_factory, name: str, **overrides):
    """A resolved config and the YAML file holding it, for runs started through the CLI."""
    cfg = resolve(tiny_config(**overrides))
    path = tmp_path_factory.mktemp("cfg") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, path


@pytest.fixture(scope="module")
def faults_cfg(tmp_path_factory):
    return config_file(tmp_path_factory, "faults", **FAULTS)


@pytest.fixture(scope="module")
def faults_reference(prefect_server, artifacts, faults_cfg):
    return weights(start(faults_cfg[0], artifacts, "faults-straight"))


@pytest.fixture(scope="module")
def slow_cfg(tmp_path_factory):
    return config_file(tmp_path_factory, "slow", **SLOW_TRAINING)


@pytest.fixture(scope="module")
def slow_reference(prefect_server, artifacts, slow_cfg):
    return weights(start(slow_cfg[0], artifacts, "slow-straight"))


def signal_checkpoint(output: str, checkpoints: Path, newest_before: str) -> Path:
    """The checkpoint the stop (a signal's, or `saeflow stop`'s) names, checked: the newest, complete, at the step it
    stopped after, no earlier than the newest one seen before the signal. (A signal that lands
    just after a scheduled checkpoint stops at that very step, whose checkpoint it keeps.)"""
    match = re.search(r"stopped by (?:SIGTERM|saeflow stop \(from [^)]*\)) after step (\d+); checkpoint (\S+) written", output)
    assert match, output
    folder = Path(match[2])
    assert folder == checkpoints / f"step-{int(match[1]):09d}" == max(checkpoints.glob("step-*"))
    assert folder.name >= newest_before and verify_manifest(folder) is not None
    return folder


def flow_run_states(run_name: str, messages: bool = False) -> list[str]:
    """The state names (or messages) of the flow runs of `run_name`, oldest first."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])), sort=FlowRunSort.START_TIME_ASC)
    return [run.state.message if messages else run.state.name for run in runs]


def ghost_task_states(run_name: str) -> dict[str, str]:
    """Task name -> state name of the first flow run of `run_name`."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        first = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[run_name])), sort=FlowRunSort.START_TIME_ASC)[0]
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first.id])))
    return {run.name.rsplit("-", 1)[0]: run.state.name for run in task_runs}


def flow_run_logs(state) -> str:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # logs reach the server in batches
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    return "\n".join(log.message for log in logs)


def test_sigkill_during_training_resumes_exactly_and_marks_the_ghost_run_crashed(artifacts, slow_cfg, slow_reference):
    cfg, config = slow_cfg
    checkpoints = artifacts / "runs" / "killed" / "checkpoints"
    first = cli(artifacts=artifacts, config=config, run_name="killed")
    wait_for(lambda: any(checkpoints.glob("step-*")), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert not (artifacts / "runs" / "killed" / "trained").exists()
    assert flow_run_states("killed") == ["Running"]  # what Prefect believes of a killed process

    code, output = finish(cli(artifacts=artifacts, config=config, run_name="killed"))
    assert code == 0, output
    assert "Resuming training from step-" in output
    summary = yaml.safe_load((artifacts / "runs" / "killed" / "summary.json").read_text())
    assert summary["training"]["resumed_from_step"] > 0
    assert summary["training"]["n_training_steps"] == cfg.training_tokens // cfg.train_batch_size_tokens
    assert_bitwise_equal(weights(summary), slow_reference)
    assert flow_run_states("killed") == ["Crashed", "Completed"]
    assert ghost_task_states("killed")["train-sae"] == "Crashed"  # the task it was running, as the UI shows it
    # marked when the run is continued, maybe days later: the message says when it was last heard of
    assert re.match(r"Its process ended without reporting \(killed\?\) after it last wrote its training log or a checkpoint, at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC; 'killed' was continued by", flow_run_states("killed", messages=True)[0])
    log = [json.loads(line) for line in (artifacts / "runs" / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(2, 33, 2))  # one entry per logged step across the kill


def test_sigterm_checkpoints_at_the_step_boundary_and_exits_75(artifacts, slow_cfg, slow_reference):
    cfg, config = slow_cfg
    checkpoints = artifacts / "runs" / "termed" / "checkpoints"
    first = cli(artifacts=artifacts, config=config, run_name="termed")
    wait_for(lambda: any(checkpoints.glob("step-*")), first)
    newest_before = max(p.name for p in checkpoints.glob("step-*"))
    first.send_signal(signal.SIGTERM)
    code, output = finish(first)
    assert code == 75, output
    assert "Run the same command again to continue it" in output
    assert "Exception in thread" not in output  # e.g. the temporary-server watch, which runs from the start
    newest = signal_checkpoint(output, checkpoints, newest_before)
    assert not (artifacts / "runs" / "termed" / "trained").exists()

    summary = start(cfg, artifacts, "termed")  # in this process: a new process costs 10 s of imports
    assert summary["training"]["resumed_from_step"] == int(newest.name.removeprefix("step-"))
    assert_bitwise_equal(weights(summary), slow_reference)
    assert flow_run_states("termed") == ["Preempted", "Completed"]  # as the Prefect UI shows them


def test_saeflow_stop_checkpoints_a_run_at_its_step_boundary_and_the_rerun_continues(artifacts, slow_cfg, slow_reference, capsys):
    """`saeflow stop --all` (or `saeflow stop RUN`), from any process that sees the run's folder (here: another thread; it
    writes a request, it sends no signal, as for a sweep member on a Dask worker), stops the run's
    training as SIGTERM does; run again, it continues exactly."""
    import threading

    from flows.cli import main
    from tasks.stopping import STOP_REQUEST_FILE, Preempted

    cfg, _ = slow_cfg
    run, ended = artifacts / "runs" / "stopped", []

    def first_run():
        try:
            start(cfg, artifacts, "stopped")
        except Exception as error:  # noqa: BLE001 - the test looks at it
            ended.append(error)

    first = threading.Thread(target=first_run)
    first.start()
    deadline = time.monotonic() + 300
    while not any((run / "checkpoints").glob("step-*")):
        assert first.is_alive() and time.monotonic() < deadline, ended
        time.sleep(0.02)
    newest_before = max(p.name for p in (run / "checkpoints").glob("step-*"))
    # --all: every run of the folder that is running (the others here are finished or not running)
    assert main(["stop", "--all", "--artifacts-dir", str(artifacts)]) == 0
    assert re.findall(r"asked run '([^']+)' \(process ", capsys.readouterr().out) == ["stopped"]
    first.join(300)
    assert len(ended) == 1 and isinstance(ended[0], Preempted), ended
    newest = signal_checkpoint(str(ended[0]), run / "checkpoints", newest_before)
    assert not (run / STOP_REQUEST_FILE).exists() and not (run / "trained").exists()

    summary = start(cfg, artifacts, "stopped")
    assert flow_run_states("stopped") == ["Preempted", "Completed"]
    assert summary["training"]["resumed_from_step"] == int(newest.name.removeprefix("step-"))
    assert_bitwise_equal(weights(summary), slow_reference)
    assert main(["stop", "stopped", "--artifacts-dir", str(artifacts)]) == 1
    assert "run 'stopped' has finished training; nothing to stop" in capsys.readouterr().out
    assert main(["stop", "--all", "--artifacts-dir", str(artifacts)]) == 1
    assert f"no run in {artifacts / 'runs'} is running; nothing to stop" in capsys.readouterr().err
    assert main(["stop", "--artifacts-dir", str(artifacts)]) == 2
    assert main(["stop", "no-such-run", "--artifacts-dir", str(artifacts)]) == 2
    assert "no run 'no-such-run' in" in capsys.readouterr().err


def test_a_stop_request_made_for_an_earlier_process_of_the_run_is_dropped(tmp_path):
    from tasks.artifacts import write_json
    from tasks.stopping import STOP_REQUEST_FILE, StopRequests, lock_holder, request_stop

    assert request_stop(tmp_path) is None and not (tmp_path / STOP_REQUEST_FILE).exists()  # not running: nothing asked
    with exclusive_lock(tmp_path / ".lock", "run 'r'", wait=False):
        holder = lock_holder(tmp_path / ".lock")
        assert holder.startswith(f"process {os.getpid()} on ")
        write_json(tmp_path / STOP_REQUEST_FILE, {"holder": "process 1 on elsewhere since 2026-11-29 10:00:00", "by": "process 2"})
        requests = StopRequests(tmp_path)
        assert requests.requested() is None and not (tmp_path / STOP_REQUEST_FILE).exists()
        assert request_stop(tmp_path) == holder
        assert requests.requested() is None  # looked less than a second ago
        requests.next_look = 0.0
        assert requests.requested().startswith(f"saeflow stop (from process {os.getpid()} on ")
        for unreadable in ('{"holder": "process', "[]", "{}"):  # cut short, or written by hand
            (tmp_path / STOP_REQUEST_FILE).write_text(unreadable)
            requests.next_look = 0.0
            assert requests.requested() is None and not (tmp_path / STOP_REQUEST_FILE).exists()
    assert lock_holder(tmp_path / ".lock") is None


def test_sigterm_to_the_whole_job_stops_training_at_the_step_boundary_with_worker_processes(artifacts, slow_cfg, tmp_path):
    """Batch schedulers (Slurm) send SIGTERM to every process of a job: here a run with Prefect's
    temporary server (no PREFECT_API_URL), whose training reads in worker processes (as on an
    accelerator; `read_workers` on the CPU). The workers leave the signal to training, which
    checkpoints at the step boundary and exits 75, though the signal stopped the temporary
    server too."""
    _, config = slow_cfg
    checkpoints = artifacts / "runs" / "termed-job" / "checkpoints"
    # Without retries, Prefect's client gives up on the stopped server at once instead of after about 2 minutes.
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_CLIENT_MAX_RETRIES": "0"}
    first = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(config), "--set", "read_workers=2", "--artifacts-dir", str(artifacts), "--run-name", "termed-job"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the job
    )
    wait_for(lambda: any(checkpoints.glob("step-*")), first)
    newest_before = max(p.name for p in checkpoints.glob("step-*"))
    os.killpg(first.pid, signal.SIGTERM)
    code, output = finish(first)
    assert code == 75, output
    assert "2 worker processes read the training batches ahead" in output and "Run the same command again to continue it" in output
    signal_checkpoint(output, checkpoints, newest_before)  # resuming from it: the test above


def child_processes(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):  # ended meanwhile
            continue
    return found


def test_sigterm_outside_training_stops_the_run_at_a_safe_point_or_where_it_is_with_75(faults_cfg, faults_reference, tmp_path):
    """SIGTERM to the run's process alone (`kill PID`) while the store fills: the fill stops after
    its model batch, keeping its shards; once its last shard is written, the fill completes and
    the run stops before training. During a stage with no safe point (here the save) the run ends there, as on Ctrl-C.
    Each exits 75, and Prefect's temporary server, a child of the run's process, ends with it
    instead of living on. SIGTERM to the whole job there ends the server first: still 75."""
    cfg, config = faults_cfg
    artifacts = tmp_path / "artifacts"
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"} | {"PREFECT_HOME": str(tmp_path / "prefect"), "KILL_SIGNAL": "SIGTERM"}
    outside = "stopped by SIGTERM outside the stages that stop at a safe point (filling, training). Run the same command again"
    for point, n, job, says in [
        ("fill-shard", 2, {}, "stopped by SIGTERM while filling activation store(s) "),
        ("fill-end", 1, {}, " (complete), before training. Run the same command again"),
        ("save", 1, {}, outside),
        # a retry of the lost server, then Prefect gives up: the command still knows what stopped it
        ("save", 1, {"KILL_GROUP": "1", "PREFECT_CLIENT_MAX_RETRIES": "1"}, outside + " to continue it. (Prefect could not be told: "),
    ]:
        log = tmp_path / f"{point}.log"  # not a pipe: a process left running would hold it open
        with open(log, "w") as out:
            process = subprocess.Popen(
                [sys.executable, str(ROOT / "tests" / "kill_driver.py"), point, str(n), str(config), "--artifacts-dir", str(artifacts), "--run-name", "termed"],
                cwd=ROOT, env=env | job, stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True,
            )
        children = set()
        while process.poll() is None:
            children |= child_processes(process.pid)
            time.sleep(0.05)
        deadline = time.monotonic() + 10
        while (alive := {pid for pid in children if Path(f"/proc/{pid}").exists()}) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        code, output = process.returncode, log.read_text()
        assert code == 75 and says in output, output
        assert children and not alive, f"processes {alive} of the run outlived it"  # children: the temporary server
        if point == "fill-shard":
            assert "(the shards written are kept)" in output
        if point == "fill-end":
            assert "Activation store(s) " in output and ": resuming at row " in output  # the first run's shards were kept
            assert "Training SAE" not in output  # its progress bar
        if point == "save":
            assert "Filling activation store" not in output  # the fill stopped after its end completed: cached
    summary = start(cfg, artifacts, "termed")
    assert_bitwise_equal(weights(summary), faults_reference)


def test_sigterm_outside_the_safe_points_ends_the_flow_run_preempted_not_crashed(faults_cfg, tmp_path, monkeypatch):
    """In the UI, a run stopped by SIGTERM while its SAE was saved looked like a crash of saeflow."""
    import tasks.save
    from tasks.stopping import OUTSIDE_SAFE_POINTS, Terminated

    def terminated(*args, **kwargs):
        raise Terminated(f"stopped by SIGTERM {OUTSIDE_SAFE_POINTS}")

    monkeypatch.setattr(tasks.save, "firing_frequency", terminated)
    state = start(faults_cfg[0], tmp_path, "termed-in-save", return_state=True)
    assert state.is_cancelled() and state.name == "Preempted"
    assert state.message == f"stopped by SIGTERM {OUTSIDE_SAFE_POINTS}. Run it again to continue"
    assert task_states(state)["save-sae"] == "Crashed" and task_states(state)["train-sae"] == "Completed"


def test_a_stop_after_the_fill_stops_that_run_only(faults_cfg, faults_reference, tmp_path, monkeypatch):
    """SIGTERM noted after the fill's last batch (in process, as through the Python API): the fill
    completes and the run stops before training; running it again in the same process trains
    (the noted stop is not left for it)."""
    import tasks.activations
    from tasks.stopping import Preempted

    cfg, _ = faults_cfg
    fill = tasks.activations._fill

    def fill_then_sigterm(*args, **kwargs):
        refs = fill(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)  # the handler notes it
        return refs

    monkeypatch.setattr(tasks.activations, "_fill", fill_then_sigterm)
    with pytest.raises(Preempted, match=r"stopped by SIGTERM after filling activation store \w+ \(complete\), before training"):
        start(cfg, tmp_path, "after-fill")
    monkeypatch.undo()
    assert not (tmp_path / "runs" / "after-fill" / "checkpoints").exists()
    assert_bitwise_equal(weights(start(cfg, tmp_path, "after-fill")), faults_reference)


def test_checkpoints_every_few_minutes_of_training_leave_the_result_as_it_was(faults_cfg, faults_reference, tmp_path):
    """`checkpoint_every_minutes`, besides the checkpoints spaced by tokens: a period shorter than
    any step writes one after every step; a long one, only the one after the last step (a failure
    while the trained SAE is written then trains nothing again)."""
    cfg, _ = faults_cfg
    total = -(-cfg.training_tokens // cfg.train_batch_size_tokens)
    for name, minutes, expected in (("every-step", 1e-9, list(range(1, total + 1))), ("never", 1e6, [total])):
        timed = cfg.model_copy(update={"n_checkpoints": 0, "checkpoint_every_minutes": minutes, "keep_checkpoints": 1000})
        assert_bitwise_equal(weights(start(timed, tmp_path, name)), faults_reference)
        checkpoints = tmp_path / "runs" / name / "checkpoints"
        assert sorted(int(p.name.removeprefix("step-")) for p in checkpoints.glob("step-*")) == expected


def test_saeflow_stop_during_the_fill_stops_it_at_the_next_batch_keeping_its_shards(faults_cfg, faults_reference, tmp_path, monkeypatch, capsys):
    """Not hours later, after the whole store: the fill looks for the run's stop request as it
    looks for a signal."""
    import tasks.activations
    from flows.cli import main
    from tasks.stopping import STOP_REQUEST_FILE, Preempted

    cfg, _ = faults_cfg
    monkeypatch.setattr(tasks.activations, "SHARD_BYTES", 1)  # a shard per model batch
    save, written = tasks.activations._save_shard, []

    def stop_after_the_second_shard(path, acts, tokens):
        written.append(path.name)
        if len(written) == 2:
            assert main(["stop", "fill-stop", "--artifacts-dir", str(tmp_path)]) == 0
            time.sleep(1.1)  # the fill looks for a request at most once a second; it waits for this shard meanwhile
        return save(path, acts, tokens)

    monkeypatch.setattr(tasks.activations, "_save_shard", stop_after_the_second_shard)
    with pytest.raises(Preempted, match=r"stopped by saeflow stop \(from process \d+ .*\) while filling activation store\(s\) \w+, at row \d+ of \d+ \(the shards written are kept\)"):
        start(cfg, tmp_path, "fill-stop")
    assert "before training (filling or importing its store) it stops after its model batch or shard, keeping the shards" in capsys.readouterr().out
    assert 2 <= len(written) < 8 and "eval_tokens.safetensors" not in written
    run = tmp_path / "runs" / "fill-stop"
    assert not (run / STOP_REQUEST_FILE).exists() and not (run / "checkpoints").exists()
    monkeypatch.undo()
    assert_bitwise_equal(weights(start(cfg, tmp_path, "fill-stop")), faults_reference)


def test_a_cancel_in_the_prefect_ui_stops_a_run_that_saeflow_run_started(artifacts, faults_cfg, faults_reference, monkeypatch, capsys):
    """Such a flow run has no runner to send it SIGTERM: it stayed Cancelling for good, trained on,
    and then could not be marked finished (the command failed). Now it stops at its next safe
    point as on SIGTERM and ends Cancelled; a cancel once training is over ends it Cancelled with
    every stage kept."""
    from prefect import get_client, runtime
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Cancelling

    import tasks.report
    import tasks.stopping
    import tasks.train
    from flows.cli import EXIT_PREEMPTED, main

    def cancel_in_the_ui():
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(runtime.flow_run.id, Cancelling(message="cancelled in the UI"))

    def last_state():
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["ui-cancel"])), sort=FlowRunSort.START_TIME_DESC, limit=1)
        return runs[0].state

    after_step = tasks.train.TrainingLog.after_step

    def cancelled_at_step_20(self, trainer, step_output, stopping=False):
        if trainer.n_training_steps == 20:
            cancel_in_the_ui()
        if trainer.n_training_steps >= 20:
            time.sleep(0.2)  # training looks for a stop at most once a second
        return after_step(self, trainer, step_output, stopping)

    monkeypatch.setattr(tasks.stopping, "CANCEL_POLL_SECONDS", 0.1)
    monkeypatch.setattr(tasks.train.TrainingLog, "after_step", cancelled_at_step_20)
    command = ["run", str(faults_cfg[1]), "--artifacts-dir", str(artifacts), "--run-name", "ui-cancel"]
    assert main(command) == EXIT_PREEMPTED
    err = capsys.readouterr().err
    stop = re.search(r"saeflow: run 'ui-cancel' stopped by its cancel in Prefect after step (\d+); checkpoint \S+step-0+\1 written\. Run the same command again", err)
    assert stop and 20 <= int(stop[1]) < 40, err
    state = last_state()
    assert state.is_cancelled() and state.message.startswith(f"Cancelled: stopped by its cancel in Prefect after step {stop[1]}")

    monkeypatch.setattr(tasks.train.TrainingLog, "after_step", after_step)
    render = tasks.report.render_markdown
    monkeypatch.setattr(tasks.report, "render_markdown", lambda *args: cancel_in_the_ui() or render(*args))
    assert main(command) == EXIT_PREEMPTED
    assert "Cancelled in Prefect once its last stages ran: every stage finished and is kept" in capsys.readouterr().err
    assert last_state().is_cancelled()
    assert_bitwise_equal(weights(artifacts / "runs" / "ui-cancel"), faults_reference)


def test_once_the_temporary_server_has_ended_prefect_s_client_stops_retrying(monkeypatch):
    """Ctrl-C in a terminal reaches the whole process group, Prefect's temporary server too, which
    Prefect does not start again: its client then retried every report with growing back-offs,
    and a run stopped in training took 220 s to exit (9.5 s with this, measured by hand on the
    demo model). The client retries as before while the server lives."""
    import types

    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, get_current_settings

    from tasks.stopping import no_retries_once_the_temporary_server_ends

    monkeypatch.setattr(get_current_settings().client, "max_retries", 5)
    server = types.SimpleNamespace(server_process=subprocess.Popen(["sleep", "60"]))
    monkeypatch.setattr(SubprocessASGIServer, "_instances", {"test-server": server})
    with no_retries_once_the_temporary_server_ends():
        time.sleep(0.5)
        assert PREFECT_CLIENT_MAX_RETRIES.value() == 5  # the server lives
        server.server_process.terminate()
        server.server_process.wait()
        deadline = time.monotonic() + 10
        while PREFECT_CLIENT_MAX_RETRIES.value() != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_second_sigint_exits_at_once():
    script = (
        "import os, signal, time\n"
        "from tasks.stopping import STOP_REQUESTS, stop_signals\n"
        "with stop_signals():\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "    assert STOP_REQUESTS == ['SIGINT'], STOP_REQUESTS\n"
        "    os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('not reached')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, result.stderr
    assert "second SIGINT, exiting now" in result.stderr and "not reached" not in result.stdout


def test_killed_while_writing_a_shard_resumes_the_fill_and_ends_exactly(artifacts, faults_cfg, faults_reference, tmp_path, caplog):
    """The other kill points (a shard in place but not listed, a training step, a checkpoint's
    write) are in the next test, one after another in one run."""
    import logging

    cfg, config = faults_cfg
    fresh = tmp_path / "artifacts"  # own store, so that the kill hits a fill
    code, output = finish(cli(driver=("fill-write", 3), artifacts=fresh, config=config, run_name="once"))
    assert code == -signal.SIGKILL, output
    with caplog.at_level(logging.INFO):
        summary = start(cfg, str(fresh), "once")  # in this process: a new process costs 10 s of imports
    assert re.search(r"resuming at row [1-9]\d* of", caplog.text), caplog.text  # the two shards written before are kept
    assert summary["training"]["resumed_from_step"] == 0
    assert_bitwise_equal(weights(summary), faults_reference)


def test_a_run_killed_while_writing_its_trained_sae_trains_no_step_again(artifacts, faults_cfg, faults_reference):
    cfg, config = faults_cfg
    code, output = finish(cli(driver=("trained-write", 1), artifacts=artifacts, config=config, run_name="at-the-end"))
    assert code == -signal.SIGKILL, output
    assert not (artifacts / "runs" / "at-the-end" / "trained").exists()
    summary = start(cfg, str(artifacts), "at-the-end")
    assert summary["training"]["resumed_from_step"] == summary["training"]["n_training_steps"] == 64
    assert_bitwise_equal(weights(summary), faults_reference)


def test_three_kills_in_one_run_still_end_exactly(faults_cfg, faults_reference, tmp_path):
    cfg, config = faults_cfg
    fresh = tmp_path / "artifacts"
    outputs = []
    for point, n in [("fill-shard", 4), ("train-step", 20), ("checkpoint-write", 1)]:
        code, output = finish(cli(driver=(point, n), artifacts=fresh, config=config, run_name="thrice"))
        assert code == -signal.SIGKILL, output
        outputs.append(output)
    assert re.search(r"resuming at row [1-9]\d* of", outputs[1]), outputs[1]  # the fill went on from its kept shards
    assert "Resuming training from step-000000013" in outputs[2]  # the second process's checkpoint before its kill at step 20
    summary = start(cfg, str(fresh), "thrice")
    assert summary["training"]["resumed_from_step"] == 13  # the third was killed writing step 26's checkpoint
    assert not list((fresh / "runs" / "thrice" / "checkpoints").glob(".tmp-*"))
    assert_bitwise_equal(weights(summary), faults_reference)
    assert flow_run_states("thrice") == ["Crashed", "Crashed", "Crashed", "Completed"]


def inject_nan_at_step(monkeypatch, step: int) -> None:
    import tasks.activations

    real_next = tasks.activations.ShuffledBatches.__next__

    def next_batch(self):
        batch = real_next(self)
        return torch.full_like(batch, float("nan")) if self.next_batch == step else batch

    monkeypatch.setattr(tasks.activations.ShuffledBatches, "__next__", next_batch)


def test_nan_stops_training_keeps_the_last_good_checkpoint_and_a_corrupted_one_is_skipped(
    artifacts, faults_cfg, faults_reference, monkeypatch
):
    cfg = faults_cfg[0].model_copy(update={"retries": 2, "retry_delay_seconds": 0})
    inject_nan_at_step(monkeypatch, 45)
    state = start(cfg, artifacts, "nan", return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "loss is nan at step 45; training stopped before the update. Lower lr, check the activations for NaN/inf, or try normalize_activations, in a new run (`--new`: this one keeps its settings); the checkpoints written so far are kept" in message
    assert task_states(state)["train-sae"] == "Failed"  # not retried: it would fail the same way
    checkpoints = artifacts / "runs" / "nan" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000000013", "step-000000026", "step-000000039"]
    last = load_file(checkpoints / "step-000000039" / "sae_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in last.values())

    # Corrupt the newest checkpoint: the next run skips it, naming it, and resumes from the one before.
    weights_file = checkpoints / "step-000000039" / "sae_weights.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-8:] = b"\xff" * 8
    weights_file.write_bytes(bytes(data))
    monkeypatch.undo()
    state = start(cfg, artifacts, "nan", return_state=True)
    summary = state.result()
    assert "step-000000039 is incomplete or corrupted (it fails its checksums); set aside as broken-step-000000039-" in flow_run_logs(state)
    assert len(list(checkpoints.glob("broken-step-000000039-*"))) == 1  # kept for inspection
    assert summary["training"]["resumed_from_step"] == 26
    assert_bitwise_equal(weights(summary), faults_reference)


def test_a_retry_resumes_from_the_checkpoint_and_other_activations_than_the_checkpoint_s_are_told(artifacts, faults_cfg, faults_reference, monkeypatch, caplog):
    """A training that fails is retried in the same flow run from its newest checkpoint and ends
    bitwise equal. Checkpoints record what their store held; a resume on a store filled again
    with other contents (other hardware, changed data) continues, with a warning that it is not
    exact (here the record is changed as it is read, so the weights still compare)."""
    import logging

    import tasks.checkpoint
    from tasks.activations import store_contents

    real_load_checkpoint = tasks.checkpoint.load_checkpoint

    def as_if_trained_on_other_activations(trainer, folder):
        manifest = real_load_checkpoint(trainer, folder)
        return {**manifest, "data": {**manifest["data"], "store_contents": "0" * 16}}

    monkeypatch.setattr(tasks.checkpoint, "load_checkpoint", as_if_trained_on_other_activations)
    with caplog.at_level(logging.WARNING):
        summary = start_failing_once(faults_cfg[0], artifacts, "other-activations", monkeypatch)
    assert summary["training"]["resumed_from_step"] == 26
    assert "step-000000026 was trained on other contents than" in caplog.text
    assert_bitwise_equal(weights(summary), faults_reference)
    assert flow_run_states("other-activations") == ["Completed"]
    checkpoints = sorted((artifacts / "runs" / "other-activations" / "checkpoints").glob("step-*/manifest.json"))
    assert checkpoints and {json.loads(m.read_text())["data"]["store_contents"] for m in checkpoints} == {store_contents(summary["activations"])}


def test_a_compiled_training_resumes_exactly(artifacts, faults_cfg, faults_reference, monkeypatch):
    """compile_sae: a run retried from its checkpoint ends bitwise equal to an uninterrupted
    compiled run (the compiled step is deterministic), though not to an eager one."""
    import gc
    import weakref

    import tasks.train

    cfg = faults_cfg[0].model_copy(update={"compile_sae": True})
    made, new_training_sae = [], tasks.train.new_training_sae

    def recorded(*args, **kwargs):
        sae, runner_cfg = new_training_sae(*args, **kwargs)
        made.append(weakref.ref(sae))
        return sae, runner_cfg

    monkeypatch.setattr(tasks.train, "new_training_sae", recorded)
    gc.disable()
    try:
        reference = weights(start(cfg, artifacts, "compiled-straight"))
        # The forward pass patched onto the SAE (the loss check, torch.compile's) referred to the
        # SAE: a cycle that kept it (on a GPU, its weights) after its stage, until Python's
        # cycle collector ran.
        assert made and all(sae() is None for sae in made)
    finally:
        gc.enable()
    assert any(not torch.equal(reference[key], faults_reference[key]) for key in reference)

    summary = start_failing_once(cfg, artifacts, "compiled-retried", monkeypatch)
    assert summary["training"]["resumed_from_step"] == 26
    assert_bitwise_equal(weights(summary), reference)


def test_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(artifacts, faults_cfg, monkeypatch):
    import resource

    import tasks.checkpoint

    real_save, calls = tasks.checkpoint.save_checkpoint, []

    def save_until_disk_full(*args, **kwargs):
        calls.append(args[2])
        if len(calls) != 2:
            return real_save(*args, **kwargs)
        # The second checkpoint: no file can grow past 1 kB, so the real writers (SAELens's, safetensors')
        # fail with their own errors, as on a full disk.
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))
        try:
            return real_save(*args, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    monkeypatch.setattr(tasks.checkpoint, "save_checkpoint", save_until_disk_full)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG) instead of killing the process
    try:
        state = start(faults_cfg[0].model_copy(update={"retries": 1, "retry_delay_seconds": 0}), artifacts, "full-disk", return_state=True)
    finally:
        signal.signal(signal.SIGXFSZ, previous)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert "could not write checkpoint" in message and "File too large" in message and "the previous checkpoint step-000000013 is intact" in message
    assert len(calls) == 2  # not retried: it would fail again
    checkpoints = artifacts / "runs" / "full-disk" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000000013"]
    assert verify_manifest(checkpoints / "step-000000013") is not None


def test_non_finite_weights_at_a_checkpoint_stop_training_without_a_retry(artifacts, faults_cfg, monkeypatch):
    import tasks.checkpoint

    real_save, calls = tasks.checkpoint.save_checkpoint, []

    def save_with_a_nan_weight_at_the_second(trainer, *args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:
            trainer.sae.W_dec.data[0, 0] = float("nan")
        return real_save(trainer, *args, **kwargs)

    monkeypatch.setattr(tasks.checkpoint, "save_checkpoint", save_with_a_nan_weight_at_the_second)
    state = start(faults_cfg[0].model_copy(update={"retries": 1, "retry_delay_seconds": 0}), artifacts, "nan-weights", return_state=True)
    assert state.is_failed()
    assert "SAE parameter W_dec holds non-finite values at step 26; no checkpoint of this state is written" in str(state.result(raise_on_failure=False))
    assert calls == [13, 26]  # not retried: it would fail again
    checkpoints = artifacts / "runs" / "nan-weights" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-000000013"]


def test_a_second_process_on_the_same_run_is_refused(artifacts, faults_cfg, capsys):
    from flows.cli import EXIT_BAD_INPUT, main

    cfg, config = faults_cfg
    name = claim_run(cfg, artifacts, "busy", new=False)
    stored = (artifacts / "runs" / name / "config.json").read_text()
    with held_by_another_thread(artifacts / "runs" / name / ".lock"):  # as by another process
        command = ["run", str(config), "--artifacts-dir", str(artifacts), "--run-name", "busy", "--set", "keep_checkpoints=1"]
        assert main(command) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"run 'busy' is in use by process {os.getpid()}" in err and "--new" in err
    assert flow_run_states("busy") == []
    assert (artifacts / "runs" / name / "config.json").read_text() == stored  # the running run's record is left alone


def test_a_run_of_the_same_name_training_into_a_shared_checkpoint_folder_is_refused(prefect_server, faults_cfg, tmp_path, capsys):
    """Two artifacts folders whose runs share checkpoint_path: the run's lock in one does not cover
    the other's run of the same name, the checkpoint folder's lock does."""
    from flows.cli import EXIT_BAD_INPUT, main
    from tasks.checkpoint import checkpoint_folder_lock

    cfg, config = faults_cfg
    shared = tmp_path / "shared"
    cfg = resolve(cfg.model_copy(update={"checkpoint_path": str(shared)}))
    name = claim_run(cfg, tmp_path / "b", "same", new=False)
    with held_by_another_thread(lambda: checkpoint_folder_lock(str(shared), tmp_path / "a" / "runs" / "same")):  # run 'same' of artifacts folder a trains
        command = ["run", str(config), "--artifacts-dir", str(tmp_path / "b"), "--run-name", "same", "--set", f"checkpoint_path={shared}"]
        assert main(command) == EXIT_BAD_INPUT
        state = run_pipeline(cfg, name, tmp_path / "b", return_state=True)  # a flow started past the command line's check
    err = capsys.readouterr().err
    held = f"checkpoint folder {shared / 'same'} is in use by process {os.getpid()}"
    assert held in err and "give this run a checkpoint_path of its own, or another --run-name" in err
    assert state.is_failed() and held in str(state.result(raise_on_failure=False))
    assert not list((shared / "same").glob("step-*")) and task_states(state) == {}


def test_checkpoints_name_their_run_and_another_run_s_are_refused(artifacts, faults_cfg, faults_reference, tmp_path):
    """The same run name in another artifacts folder with a shared checkpoint_path (or a run folder
    deleted and started again with new settings) must not continue another run's training."""
    import shutil

    from tasks.checkpoint import run_owner
    from tasks.config import ConfigError

    cfg = faults_cfg[0]
    checkpoints = sorted((artifacts / "runs" / "faults-straight" / "checkpoints").glob("step-*"))
    assert checkpoints and all(json.loads((c / "manifest.json").read_text())["run"] == run_owner(cfg, "faults-straight") for c in checkpoints)
    shutil.copytree(checkpoints[-1], tmp_path / "shared" / "faults-straight" / checkpoints[-1].name)
    other = cfg.model_copy(update={"lr": 1e-3, "checkpoint_path": str(tmp_path / "shared")})
    with pytest.raises(ConfigError, match=f"checkpoint {tmp_path / 'shared' / 'faults-straight' / checkpoints[-1].name} was written by run 'faults-straight' with other settings \\(lr\\); run 'faults-straight' would continue its training"):
        claim_run(other, tmp_path / "elsewhere", "faults-straight", new=False)
    assert not (tmp_path / "elsewhere" / "runs").exists()  # a refused claim creates nothing
    same = cfg.model_copy(update={"checkpoint_path": str(tmp_path / "shared")})
    assert claim_run(same, tmp_path / "elsewhere", "faults-straight", new=False) == "faults-straight"  # the same settings continue it
    # A checkpoint written before a setting existed (an older saeflow) still belongs to its run.
    manifest = tmp_path / "shared" / "faults-straight" / checkpoints[-1].name / "manifest.json"
    record = json.loads(manifest.read_text())
    del record["run"]["result_fields"]["activation_mode"]
    manifest.write_text(json.dumps(record))
    assert claim_run(same, tmp_path / "elsewhere", "faults-straight", new=False) == "faults-straight"
    # The run's own checkpoints, with a setting changed: the config-drift refusal and its ways forward.
    with pytest.raises(ConfigError, match=r"^run 'faults-straight' was started with a different config \(lr: 0.0003 -> 0.001\)\. Start a new run with --new"):
        claim_run(cfg.model_copy(update={"lr": 1e-3}), artifacts, "faults-straight", new=False)


def test_training_fed_by_worker_processes_ends_bitwise_equal_and_resumes_exactly(artifacts, faults_cfg, faults_reference, monkeypatch):
    """What training does on an accelerator, here on the CPU (`read_workers`): the batches that
    worker processes read (`WorkerReads`) train the weights that reading in the loop trains, also
    when a retry resumes from a checkpoint part-way; no worker is left behind."""
    import multiprocessing

    import tasks.activations

    real_init, real_next, given, limits = tasks.activations.WorkerReads.__init__, tasks.activations.WorkerReads.__next__, [], []

    def noting_init(self, batches, workers, limit=None):
        limits.append((batches.next_batch, limit))
        real_init(self, batches, workers, limit)

    def noting_next(self):
        given.append(True)
        return real_next(self)

    monkeypatch.setattr(tasks.activations.WorkerReads, "__init__", noting_init)
    monkeypatch.setattr(tasks.activations.WorkerReads, "__next__", noting_next)
    summary = start_failing_once(faults_cfg[0].model_copy(update={"read_workers": 2}), artifacts, "worker-reads", monkeypatch)
    assert summary["training"]["resumed_from_step"] == 26
    assert len(given) == 31 + (64 - 26)  # every batch of both attempts came from the workers
    assert limits == [(0, 64), (26, 64 - 26)]  # none read past the run's last batch
    assert_bitwise_equal(weights(summary), faults_reference)
    assert multiprocessing.active_children() == []


def test_a_training_log_row_cut_short_is_dropped_when_training_resumes(tmp_path, monkeypatch, caplog):
    """A full disk or a power loss can leave the last row of train_log.jsonl half written; the
    resumed run drops it (and the rows after its checkpoint) instead of failing on it."""
    import logging
    from types import SimpleNamespace

    import prefect.artifacts

    from tasks.train import TrainingLog

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *args, **kwargs: None)
    log = tmp_path / "train_log.jsonl"
    rows = [json.dumps({"step": step, "loss": 1.0 / step}) for step in (10, 20, 30)]
    log.write_text("\n".join(rows) + '\n{"step": 40, "tok')
    trainer = SimpleNamespace(n_training_steps=20, n_training_samples=20 * 512, cfg=SimpleNamespace(total_training_samples=33_024, train_batch_size_samples=512))
    training_log = TrainingLog(log, tiny_config(), logging.getLogger("saeflow-test"))
    with caplog.at_level(logging.WARNING):
        training_log.start(trainer)
    assert log.read_text() == rows[0] + "\n" + rows[1] + "\n"
    assert "dropping a row that was not written whole" in caplog.text
    assert training_log.total == 65  # 33,024 tokens in batches of 512: the last step is the 65th


def test_every_log_step_gets_a_row_and_the_prefect_log_a_line_at_most_every_few_seconds(tmp_path, monkeypatch, caplog):
    """A GPU's steps take milliseconds: a Prefect log line every `log_every` steps was several a
    second, a million lines in a two-day run. The rows of train_log.jsonl keep every one."""
    import logging
    from types import SimpleNamespace

    import prefect.artifacts

    from tasks.train import TrainingLog

    monkeypatch.setattr(prefect.artifacts, "create_progress_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", lambda *args, **kwargs: None)
    monkeypatch.setattr(TrainingLog, "LINE_SECONDS", 1e9)
    metrics = {"losses/overall_loss": 1.0, "metrics/l0": 3.0, "metrics/explained_variance": 0.5, "sparsity/dead_features": 0, "details/current_learning_rate": 1e-3}
    trainer = SimpleNamespace(n_training_steps=0, n_training_samples=0, cfg=SimpleNamespace(total_training_samples=5 * 512, train_batch_size_samples=512))
    trainer.build_train_step_log_dict = lambda output, samples: metrics
    log = TrainingLog(tmp_path / "train_log.jsonl", tiny_config(log_every=1), logging.getLogger("saeflow-test"))
    log.start(trainer)
    with caplog.at_level(logging.INFO, logger="saeflow-test"):
        for step in range(1, 6):
            trainer.n_training_steps, trainer.n_training_samples = step, step * 512
            log.after_step(trainer, None)
    assert [json.loads(line)["step"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5]
    assert [r.getMessage().split(" |")[0] for r in caplog.records] == ["step 1/5", "step 5/5"]


def test_a_gpu_checkpoint_keeps_the_training_gpu_s_rng_and_resumes_where_fewer_gpus_are_visible(monkeypatch):
    """Only the training device's CUDA RNG state is saved, so a job requeued onto a machine with
    fewer GPUs resumes; older checkpoints (one state per visible GPU) restore the training GPU's."""
    from tasks.checkpoint import _rng_state, _set_rng_state

    restored = {}
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([int(str(device)[-1])], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.update({str(device): int(state)}))
    assert _rng_state("cpu")["cuda"] == []
    state = _rng_state("cuda:5")
    assert [int(s) for s in state["cuda"]] == [5]
    _set_rng_state(state, "cuda:0")  # requeued onto a one-GPU machine
    assert restored == {"cuda:0": 5}
    _set_rng_state({**state, "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}, "cuda:3")
    assert restored["cuda:3"] == 3
    _set_rng_state({**state, "cuda": [torch.tensor([9], dtype=torch.uint8)]}, "cpu")  # a GPU checkpoint resumed on the CPU
    assert "cpu" not in restored


def test_only_ghost_runs_of_the_same_artifacts_folder_are_marked_crashed(artifacts, faults_cfg, faults_reference, tmp_path):
    """A flow run left Running under this run's name is this run's ghost only if it ran in the
    same artifacts folder: the same name in another folder is another run, perhaps alive."""
    from prefect import get_client
    from prefect.states import Running

    from flows.pipeline import sae_pipeline

    with get_client(sync_client=True) as client:
        ghost, other = (
            client.create_flow_run(sae_pipeline, name="faults-straight", parameters={"artifacts_dir": str(folder)}, state=Running()).id
            for folder in (artifacts, tmp_path)
        )
    start(faults_cfg[0], artifacts, "faults-straight")  # finished: every stage is cached
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(ghost).state.name == "Crashed"
        assert client.read_flow_run(other).state.name == "Running"


def test_a_run_is_continued_by_its_name_alone_with_its_stored_config_also_when_served(artifacts, faults_cfg, faults_reference, capsys, monkeypatch):
    import flows.pipeline
    from flows.cli import main

    assert main(["run", "--artifacts-dir", str(artifacts), "--run-name", "faults-straight"]) == 0  # finished: all cached
    assert f"the config stored in {artifacts / 'runs' / 'faults-straight' / 'config.json'}" in capsys.readouterr().err

    served = {}
    monkeypatch.setattr(flows.pipeline, "pipeline_for", lambda artifacts_dir: type("Flow", (), {"serve": lambda self, **kwargs: served.update(kwargs)})())
    assert main(["serve", "--artifacts-dir", str(artifacts), "--run-name", "faults-straight", "--interval", "3600"]) == 0
    assert served["name"] == "faults-straight" and served["parameters"]["run_name"] == "faults-straight"
    assert served["parameters"]["config"] == faults_cfg[0].model_dump(mode="json")


def test_a_read_error_is_not_taken_for_a_corrupt_checkpoint(tmp_path, monkeypatch, caplog):
    """EIO or a stale NFS handle while a checkpoint is verified may pass: the run fails and says
    so, instead of setting a good checkpoint aside and training its steps again."""
    import errno
    import logging

    import tasks.artifacts
    from tasks.artifacts import write_manifest
    from tasks.checkpoint import resume_point

    folder = tmp_path / "step-000000005"
    folder.mkdir()
    (folder / "sae_weights.safetensors").write_bytes(b"weights")
    write_manifest(folder, {"n_training_steps": 5})

    def unreadable(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    with monkeypatch.context() as patch:
        patch.setattr(tasks.artifacts, "file_sha256", unreadable)
        with pytest.raises(OSError, match="Input/output error"):
            resume_point(tmp_path, logging.getLogger("test"))
    assert resume_point(tmp_path, logging.getLogger("test")) == folder  # kept, and good once readable
    (folder / "sae_weights.safetensors").unlink()
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path, logging.getLogger("test")) is None  # a missing file is an incomplete checkpoint
    assert len(list(tmp_path.glob("broken-step-000000005-*"))) == 1
    assert f"No usable checkpoint in {tmp_path} (the 1 set aside are kept): training starts again from step 0" in caplog.text


def test_checkpoints_are_ordered_by_their_step_number_past_nine_digits(tmp_path):
    """Names are padded to 9 digits; a run past 10^9 steps must still resume from its newest."""
    import logging

    from tasks.artifacts import write_manifest
    from tasks.checkpoint import checkpoint_folders, resume_point

    for steps in (999_999_999, 1_000_000_000, 5):
        folder = tmp_path / f"step-{steps:09d}"
        folder.mkdir()
        write_manifest(folder, {"n_training_steps": steps})
    (tmp_path / "step-notes").mkdir()
    (tmp_path / "step-\u00b2").mkdir()  # a digit to str.isdigit, not to int()
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["step-1000000000", "step-999999999", "step-000000005"]
    assert resume_point(tmp_path, logging.getLogger("test")) == tmp_path / "step-1000000000"


def test_a_run_is_held_from_its_claim_to_the_end_of_its_flow_run(prefect_server, artifacts, faults_cfg, monkeypatch, capsys, tmp_path):
    """A `--new` run and a plain one of the same name started together: once the `--new` one has
    claimed the name, the plain one is refused as busy (it took the name between the claim and
    the flow run, and the `--new` run was refused), and another `--new` one takes the next name.
    The artifacts folder is given through a symlink, which the flow resolves: its run is still
    the one the command holds."""
    import threading

    import tasks.preflight
    from flows.cli import main
    from tasks.artifacts import Busy

    real_claim = tasks.preflight.claim_run
    others: dict[str, str] = {}

    def claimed_then_raced(*args, **kwargs):
        name = real_claim(*args, **kwargs)

        def other_commands():
            try:
                real_claim(faults_cfg[0], artifacts, "raced", False)
            except Busy as error:
                others["plain"] = str(error)
            others["new"] = real_claim(faults_cfg[0], artifacts, "raced", True)

        racer = threading.Thread(target=other_commands)
        racer.start()
        racer.join()
        return name

    monkeypatch.setattr(tasks.preflight, "claim_run", claimed_then_raced)
    (tmp_path / "link").symlink_to(artifacts)
    assert main(["run", str(faults_cfg[1]), "--artifacts-dir", str(tmp_path / "link"), "--run-name", "raced", "--new"]) == 0
    assert "saeflow: run 'raced' (artifacts in" in capsys.readouterr().err
    assert others["plain"].startswith(f"run 'raced' is in use by process {os.getpid()}") and others["new"] == "raced-2"
    assert (artifacts / "runs" / "raced" / "sae" / "manifest.json").is_file()


def test_the_next_write_of_a_folder_removes_what_a_killed_write_of_it_left(tmp_path):
    """A SIGKILL inside `atomic_dir` (a pretokenise, a model build, a sae/ swap) leaves hidden
    folders, gigabytes for big data; the next write of the same folder removes them, and only them."""
    from tasks.artifacts import atomic_dir

    left = [tmp_path / ".tmp-sae-0123abcd", tmp_path / ".old-sae-89ef4567"]
    other = tmp_path / ".tmp-sae-v2-0123abcd"  # another folder's, perhaps being written now
    for folder in (*left, other):
        folder.mkdir()
        (folder / "weights").write_bytes(b"x")
    with atomic_dir(tmp_path / "sae") as tmp:
        (tmp / "cfg.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-sae-v2-0123abcd", "sae"]


def test_a_replacement_that_cannot_take_its_place_leaves_the_old_folder(tmp_path, monkeypatch):
    import tasks.artifacts
    from tasks.artifacts import atomic_dir

    with atomic_dir(tmp_path / "sae") as tmp:
        (tmp / "cfg.json").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-sae-"):
            raise OSError(28, "No space left on device")
        real_rename(src, dst)

    monkeypatch.setattr(tasks.artifacts.os, "rename", rename)
    with pytest.raises(OSError, match="No space left"), atomic_dir(tmp_path / "sae", replace=True) as tmp:
        (tmp / "cfg.json").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["sae"] and (tmp_path / "sae" / "cfg.json").read_text() == "old"


def test_waiting_for_a_lock_says_who_holds_it(tmp_path, caplog):
    """A run waiting hours for a store another process fills must not look hung."""
    import logging
    import threading

    with held_by_another_thread(tmp_path / ".lock") as (_, release):
        threading.Timer(0.3, release.set).start()
        with caplog.at_level(logging.INFO, logger="saeflow"), exclusive_lock(tmp_path / ".lock", "activation store S", wait=True):
            pass
    assert f"Waiting for activation store S, in use by process {os.getpid()}" in caplog.text


def test_waiting_for_a_lock_ends_when_the_process_is_asked_to_stop(tmp_path):
    """A sweep's member waiting for a store that another process fills stops with the sweep,
    instead of holding the whole job until that fill ends."""
    import threading

    from tasks.stopping import Preempted, stop_signals

    with held_by_another_thread(tmp_path / ".lock") as (holder, _):
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
        with stop_signals(), pytest.raises(Preempted, match=r"stopped by SIGTERM while waiting for activation store S, in use by process \d+ on "):
            with exclusive_lock(tmp_path / ".lock", "activation store S", wait=True):
                pass
        assert holder.is_alive()  # the holder was not waited for


def test_waiting_for_a_lock_ends_when_the_run_is_stopped_by_saeflow_stop(tmp_path):
    """A run waiting for a store, model or token folder that another process makes stops at
    `saeflow stop` (or a cancel in Prefect), not once that process is done, hours later."""
    import threading

    from tasks.stopping import Preempted, StopRequests, request_stop

    run = tmp_path / "runs" / "r"
    with exclusive_lock(run / ".lock", "run 'r'", wait=False), held_by_another_thread(tmp_path / "store.lock") as (holder, _):
        threading.Timer(0.3, request_stop, (run,)).start()
        with pytest.raises(Preempted, match=r"stopped by saeflow stop .* while waiting for activation store S, in use by process \d+ on "):
            with exclusive_lock(tmp_path / "store.lock", "activation store S", wait=True, stop_requests=StopRequests(run)):
                pass
        assert holder.is_alive()  # the holder was not waited for
    assert not (run / "stop-request.json").exists()  # done: a later run of the name is not stopped by it


def test_a_run_starting_while_saeflow_stop_probes_its_lock_is_not_refused(tmp_path):
    """`lock_holder` holds the lock shared for an instant; a start at that instant outlasts it,
    while a lock that stays held is refused as busy."""
    import fcntl
    import threading

    from tasks.artifacts import Busy

    lock = tmp_path / ".lock"
    lock.touch()

    def probe(seconds, probing):
        with open(lock) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            probing.set()
            time.sleep(seconds)

    for seconds, refused in ((0.05, False), (1.0, True)):
        probing = threading.Event()
        thread = threading.Thread(target=probe, args=(seconds, probing))
        thread.start()
        probing.wait(10)
        try:
            with exclusive_lock(lock, "run 'r'", wait=False):
                taken = True
        except Busy:
            taken = False
        thread.join()
        assert taken is not refused, seconds


def test_files_a_machine_crash_cut_short_or_zeroed_after_their_stage_are_made_again(artifacts, faults_cfg, faults_reference):
    """A store shard cut short, a trained SAE zeroed and a log row cut short on disk, after their stages finished: the
    cached results stood for them, so every later run failed in the next stage. Now each stage runs
    again: the fill writes the shard anew, training sets trained/ aside and makes it from its
    checkpoint after the last step (no step retrained), and the SAE ends bit for bit the same."""
    cfg = faults_cfg[0]
    first = start(cfg, artifacts, "crashed")
    before = {k: v.clone() for k, v in weights(first).items()}  # load_file maps the file, which is zeroed below
    store = Path(first["activations"]["path"])
    shard = store / json.loads((store / "manifest.json").read_text())["shards"][-1]["file"]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    trained = Path(first["training"]["path"]) / "sae_weights.safetensors"
    trained.write_bytes(bytes(trained.stat().st_size))

    state = start(cfg, artifacts, "crashed", return_state=True)
    summary = state.result()
    assert task_states(state)["fill-activations"] == "Completed" and task_states(state)["train-sae"] == "Completed"
    assert whole_safetensors(shard)
    assert summary["training"]["resumed_from_step"] == summary["training"]["n_training_steps"]  # trained 0 steps
    assert len(list((artifacts / "runs" / "crashed").glob("broken-trained-*"))) == 1  # kept for inspection
    assert re.search(r"trained is incomplete or corrupted \(it fails its checksums\); set aside as broken-trained-\w+; training continues from step-0+64", flow_run_logs(state))
    assert_bitwise_equal(weights(summary), before)

    # The training log's last row cut short after training, and the report to write again: the
    # report stage drops that row, where it failed on every later run.
    log = artifacts / "runs" / "crashed" / "train_log.jsonl"
    log.write_text(log.read_text()[:-40] + "\0" * 16)
    Path(summary["report"]["path"]).unlink()
    state = start(cfg, artifacts, "crashed", return_state=True)
    assert state.is_completed() and task_states(state)["report"] == "Completed" and task_states(state)["train-sae"] == "Cached"
    assert "train_log.jsonl: dropping a row that was not written whole" in flow_run_logs(state)


def test_a_run_whose_checkpoint_folder_moved_is_refused_until_told_where_it_is(artifacts, faults_cfg, faults_reference, tmp_path):
    """Moved with the job's folder (checkpoint_path outside the artifacts folder), its checkpoints
    were not found and training started again from step 0, silently. Now the run is refused,
    naming the missing folder; given the new checkpoint_path it continues from its checkpoint."""
    from tasks.config import ConfigError

    cfg = faults_cfg[0].model_copy(update={"checkpoint_path": str(tmp_path / "m1")})
    first = start(cfg, artifacts, "moved")
    trained = Path(first["training"]["path"]) / "sae_weights.safetensors"
    trained.write_bytes(bytes(trained.stat().st_size))  # zeroed by a crash of the machine
    (tmp_path / "m1").rename(tmp_path / "m2")
    with pytest.raises(ConfigError, match=rf"run 'moved' wrote checkpoints \(the last: {tmp_path}/m1/moved/step-0+64\), but its checkpoint folder {tmp_path}/m1/moved does not exist now"):
        start(cfg, artifacts, "moved")
    assert not (tmp_path / "m1" / "moved").exists()  # nothing trained into the old place
    summary = start(cfg.model_copy(update={"checkpoint_path": str(tmp_path / "m2")}), artifacts, "moved")
    assert summary["training"]["resumed_from_step"] == summary["training"]["n_training_steps"] == 64
    assert_bitwise_equal(weights(summary), faults_reference)


def test_a_cancel_seen_as_a_run_ends_does_not_stop_a_later_run_of_its_folder(tmp_path, monkeypatch):
    """The watch's look may still be under way when the run ends: what it then finds must not be
    left behind for the next run of the folder in this process (a Dask worker, a notebook)."""
    import threading

    import tasks.stopping
    from tasks.stopping import CANCELLED_RUNS, StopRequests, watching_for_cancel

    looking, answered = threading.Event(), threading.Event()

    def slow_look(flow_run_id=None):
        looking.set()
        time.sleep(0.3)
        answered.set()
        return True

    monkeypatch.setattr(tasks.stopping, "CANCEL_POLL_SECONDS", 0.01)
    monkeypatch.setattr(tasks.stopping, "cancelled_in_prefect", slow_look)
    with watching_for_cancel(tmp_path):
        assert looking.wait(5)
    assert answered.wait(5)
    time.sleep(0.05)
    assert str(tmp_path.resolve()) not in CANCELLED_RUNS and StopRequests(tmp_path).requested() is None
