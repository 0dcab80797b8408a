"""Sweeps: members in parallel on a local Dask cluster, one shared activation store, a killed sweep
re-run trains only the unfinished members; bad sweep files are refused before any work."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import TINY_MODEL, held_by_another_thread, tiny_config
from flows.sweep import sweep_members
from tasks.config import ConfigError

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent
SLOW = {"expansion_factor": 32, "train_batch_size_tokens": 4096, "training_tokens": 65_536, "n_batches_in_buffer": 128, "n_checkpoints": 2}


def write_sweep(folder: Path, grid: dict, **extra) -> Path:
    base = {**tiny_config(**SLOW).model_dump(exclude_unset=True), "model_cfg": TINY_MODEL}
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "base": base, "grid": grid, **extra}))
    return path


def test_a_killed_dask_sweep_rerun_trains_only_unfinished_members(prefect_server, tmp_path):
    sweep = write_sweep(tmp_path, {"l1_coefficient": [0.5, 1.0, 2.0]})
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, "-m", "flows.cli", "sweep", str(sweep), "--artifacts-dir", str(artifacts), "--dask-workers", "2"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    while not list(artifacts.glob("runs/*/summary.json")):
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)  # the sweep and its Dask workers
    first.wait()
    finished = {p.parent.name: (p.parent / "trained" / "manifest.json").stat().st_mtime_ns for p in artifacts.glob("runs/*/summary.json")}
    assert 1 <= len(finished) < 3  # two workers: the third member starts once one of the first two is done
    stores = list(artifacts.glob("activations/*"))
    assert len(stores) == 1
    shard_time = next(stores[0].glob("shard-*")).stat().st_mtime_ns

    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stdout + second.stderr
    assert re.search(r"^ 1  Completed +l1_coefficient=0.5 +\S+  L0 [\d.]+  EV [\d.-]+  CE score [\d.-]+  dead \d+$", second.stdout, re.M), second.stdout
    rows = json.loads((artifacts / "sweeps" / "t" / "members.json").read_text())
    assert [r["state"] for r in rows] == ["Completed"] * 3
    assert [r["label"] for r in rows] == [f"l1_coefficient={v}" for v in (0.5, 1.0, 2.0)]
    for name, mtime in finished.items():  # finished members were not trained again
        assert (artifacts / "runs" / name / "trained" / "manifest.json").stat().st_mtime_ns == mtime
    assert len(list(artifacts.glob("runs/*/summary.json"))) == 3
    assert list(artifacts.glob("activations/*")) == stores and next(stores[0].glob("shard-*")).stat().st_mtime_ns == shard_time
    assert (artifacts / "sweeps" / "t" / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows_by_l1 = sorted(rows, key=lambda r: r["label"])
    assert all(0 < r["l0"] and r["explained_variance"] <= 1 for r in rows_by_l1)

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        table, = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["saeflow-sweep-t-members"])))
        sweeps = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-t"])), sort=FlowRunSort.START_TIME_ASC)
    assert len(json.loads(table.data) if isinstance(table.data, str) else table.data) == 3
    # the killed sweep's flow run, which its process could not end, is marked Crashed by the next
    assert [r.state.name for r in sweeps if r.parameters["artifacts_dir"] == str(artifacts)] == ["Crashed", "Completed"]


def test_sigterm_to_a_dask_sweep_or_to_its_whole_job_stops_the_members_at_a_safe_point(prefect_server, tmp_path):
    """On Dask the members run in the workers' processes. SIGTERM to the sweep's process alone is
    passed on to them through a marker file; SIGTERM to the whole job (the sweep and its local
    cluster's worker processes, as a batch scheduler sends it) reaches the workers, which note it
    while members run there. Either way each member writes a checkpoint at the end of its step,
    the sweep reports it Stopped and exits 75, and the next run resumes it from that checkpoint
    (the end of a resumed run is tested in tests/test_resume.py)."""
    sweep = write_sweep(tmp_path, {"l1_coefficient": [0.5, 1.0]})
    artifacts = tmp_path / "artifacts"
    command = [sys.executable, "-m", "flows.cli", "sweep", str(sweep), "--artifacts-dir", str(artifacts), "--dask-workers", "2"]
    command += ["--set", "training_tokens=262144", "--set", "n_checkpoints=4"]  # 64 steps, checkpoints after steps 13, 26, 39, 52

    def stopped_by(send) -> tuple[dict[str, tuple[str, str]], str]:
        """Start the sweep, `send` SIGTERM once each member has written a checkpoint in this run;
        returns each member's stop (what stopped it and the checkpoint it wrote) and the output."""
        before = set(artifacts.glob("runs/*/checkpoints/step-*"))
        first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        deadline = time.monotonic() + 600
        while len({p.parents[1] for p in set(artifacts.glob("runs/*/checkpoints/step-*")) - before}) < 2:
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        send(first)
        output, _ = first.communicate(timeout=300)
        assert first.returncode == 75, output
        assert "sweep stopped by SIGTERM: the members marked Stopped stopped at a safe point" in output
        rows = json.loads((artifacts / "sweeps" / "t" / "members.json").read_text())
        assert [r["state"] for r in rows] == ["Stopped", "Stopped"], rows
        stops = {}
        for row in rows:
            match = re.search(r"stopped by (.+?) after step \d+; checkpoint (\S+) written", row["error"])
            assert match and Path(match[2]) == max((artifacts / "runs" / row["run"] / "checkpoints").glob("step-*")), row
            stops[row["run"]] = (match[1], Path(match[2]).name)
        assert not (artifacts / "sweeps" / "t" / "stopped").exists()
        return stops, output

    to_the_sweep, _ = stopped_by(lambda process: process.send_signal(signal.SIGTERM))
    assert {why for why, _ in to_the_sweep.values()} == {"SIGTERM to the sweep"}
    to_the_job, output = stopped_by(lambda process: os.killpg(process.pid, signal.SIGTERM))
    assert {why for why, _ in to_the_job.values()} == {"SIGTERM"}
    # the second run resumed each member where the first stopped it
    assert sorted(re.findall(r"Resuming training from (step-\d+) ", output)) == sorted(checkpoint for _, checkpoint in to_the_sweep.values()), output
    assert all(to_the_job[run][1] > to_the_sweep[run][1] for run in to_the_job)


@pytest.mark.parametrize(
    ("grid", "extra", "message"),
    [
        ({"l1_coeficient": [1.0]}, {}, "sweep axis 'l1_coeficient' is not a config key; did you mean 'l1_coefficient'?"),
        ({"lr": []}, {}, "sweep axis 'lr' needs a non-empty list of values"),
        ({"seed": list(range(1001))}, {}, "the sweep has 1001 members (more than 1000); pass --yes"),
        ({"lr": [0.001]}, {"budget": 3}, "a sweep file holds only base, grid, members, name"),
        ({"hook_name": ["blocks.0.hook_resid_post", "blocks.7.hook_resid_post"]}, {}, "unknown hook_name 'blocks.7.hook_resid_post'"),
        ({"top_k_tokens": [3, 4]}, {}, "sweep members 1 and 2 ({'top_k_tokens': 3} and {'top_k_tokens': 4}) are the same run"),
        ({"expansion_factor": [4, 8], "d_sae": [256]}, {}, "sweep member {'d_sae': 256, 'expansion_factor': 4} sets expansion_factor, but d_sae is set, which overrides it"),
        ({"lr": [0.001]}, {"name": "../escaped"}, "name '../escaped' must be a plain folder name (it names sweeps/<name>/); give the sweep a name:"),
    ],
)
def test_bad_sweep_files_are_refused_before_any_work(tmp_path, grid, extra, message):
    with pytest.raises(ConfigError) as error:
        sweep_members(write_sweep(tmp_path, grid, **extra))
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: missing.yaml\ngrid: {lr: [0.001]}\n", "base config file {folder}/missing.yaml does not exist (base: is a config path relative"),
        ("grid: [lr, 1]\n", "grid must map config keys to lists of values"),
        ("members: [lr=1]\n", "members must be a list of mappings of config keys"),
        ("grid: {lr: [1\n", "sweep file {folder}/sweep.yaml is not valid YAML"),
        ("model_name: demo\nlr: 0.001\n", "found ['lr', 'model_name'] (2 of them are config keys: is it a run's config? Run it with `saeflow run {folder}/sweep.yaml`, or name it as a sweep's base: sweep.yaml)"),
    ],
)
def test_malformed_sweep_files_are_config_errors(tmp_path, text, message):
    (tmp_path / "sweep.yaml").write_text(text)
    with pytest.raises(ConfigError) as error:
        sweep_members(tmp_path / "sweep.yaml")
    assert message.format(folder=tmp_path) in str(error.value)


def test_a_set_that_overrides_what_the_sweep_varies_is_refused(tmp_path):
    sweep = write_sweep(tmp_path, {"lr": [0.0001, 0.001]}, members=[{"l1_coefficient": 2.0}])
    with pytest.raises(ConfigError, match=r"^--set l1_coefficient, lr would give every member of .* the same value of what the sweep varies"):
        sweep_members(sweep, ["lr=5e-4", "l1_coefficient=1", "seed=3"])
    assert len(sweep_members(sweep, ["seed=3"])[1]) == 3
    with pytest.raises(ConfigError, match=r"^--set expects key=value, got 'lr'$"):
        sweep_members(sweep, ["lr"])
    with pytest.raises(ConfigError, match=r"^--set l1_coeficient: not a config key; did you mean 'l1_coefficient'\?$"):
        sweep_members(sweep, ["l1_coeficient=2"])


def test_every_refused_member_is_told_at_once_and_labels_name_only_their_architecture_s_settings(tmp_path):
    from flows.sweep import member_labels

    sweep = write_sweep(tmp_path, {}, members=[{"architecture": "topk", "k": 100000}, {"lr": -0.001}, {"lr": 0.001}])
    with pytest.raises(ConfigError) as refused:
        sweep_members(sweep)
    told = str(refused.value).splitlines()
    assert len(told) == 2 and told[0].startswith("sweep member {'architecture': 'topk', 'k': 100000}: ") and "100000" in told[0]
    assert told[1].startswith("sweep member {'lr': -0.001}: ") and "lr" in told[1]
    with pytest.raises(ConfigError, match=r"^all 2 sweep members are refused alike, e.g. sweep member {'lr': -0.001}: lr: Input should be greater than 0$"):
        sweep_members(write_sweep(tmp_path, {"lr": [-0.001, -0.002]}))

    _, configs = sweep_members(write_sweep(tmp_path, {"l1_coefficient": [1.0, 5.0]}, members=[{"architecture": "topk", "k": 8}]))
    assert member_labels(configs) == [
        "architecture=standard,l1_coefficient=1.0", "architecture=standard,l1_coefficient=5.0", "architecture=topk,k=8",
    ]


def test_members_of_an_expansion_factor_and_of_a_d_sae_are_two_saes(tmp_path):
    name, configs = sweep_members(write_sweep(tmp_path, {}, members=[{"expansion_factor": 4}, {"d_sae": 256}], name="widths 1"))
    assert name == "widths 1" and [c.sae_width for c in configs] == [128, 256]


def test_a_new_member_whose_warm_up_outlasts_it_is_refused_before_any_server(tmp_path):
    from flows.sweep import run_sweep

    sweep = write_sweep(tmp_path, {"l1_warm_up_steps": [10, 100, 200]}, base={**tiny_config().model_dump(exclude_unset=True), "model_cfg": TINY_MODEL, "training_tokens": 8192})
    with pytest.raises(ConfigError) as refused:
        run_sweep(str(sweep), str(tmp_path / "artifacts"))
    told = str(refused.value).splitlines()  # both refused members at once
    assert len(told) == 2 and "l1_warm_up_steps (100) exceeds the run's 16 training steps" in told[0] and "(200)" in told[1]
    assert all(line.startswith("sweep member l1_warm_up_steps=") for line in told)
    assert not (tmp_path / "artifacts" / "runs").exists() and not (tmp_path / "artifacts" / "sweeps").exists()


def test_a_local_dask_cluster_is_refused_members_on_a_gpu(tmp_path, monkeypatch):
    """Its workers have no GPU resource: the members would wait forever."""
    import tasks.preflight
    from flows.sweep import run_sweep

    monkeypatch.setattr(tasks.preflight, "missing_device", lambda device: None)  # as on a GPU machine
    sweep = write_sweep(tmp_path, {"lr": [0.0001, 0.001]})
    with pytest.raises(ConfigError, match="--dask-workers starts local Dask workers without a GPU resource, so members on cuda would wait forever"):
        run_sweep(str(sweep), str(tmp_path / "artifacts"), overrides=["device=cuda"], dask_workers=2)
    assert not (tmp_path / "artifacts").exists()


def test_a_sweep_whose_shared_stores_would_not_fit_stops_before_any_data_is_tokenised(prefect_server, tmp_path, monkeypatch):
    import shutil

    from flows.sweep import run_sweep
    from tasks.activations import NotEnoughDisk

    sweep = write_sweep(tmp_path, {"hook_name": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]})
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=1_000_000) if str(path).startswith(str(tmp_path)) else real_disk_usage(path))
    with pytest.raises(NotEnoughDisk, match=r"the activation stores the sweep's members share \(tiny-test at blocks.0.hook_resid_post, tiny-test at blocks.1.hook_resid_post\) would not fit: .* need [\d.]+ MB more"):
        run_sweep(str(sweep), str(tmp_path / "artifacts"))
    assert not (tmp_path / "artifacts" / "tokens").exists() and not (tmp_path / "artifacts" / "activations").exists()


def test_an_unreachable_dask_scheduler_is_refused(tmp_path, capsys):
    from flows.cli import EXIT_BAD_INPUT, main

    sweep = write_sweep(tmp_path, {"lr": [0.001]})
    assert main(["sweep", str(sweep), "--artifacts-dir", str(tmp_path), "--dask-address", "tcp://127.0.0.1:9"]) == EXIT_BAD_INPUT
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err
    for address in ("10.0.0.5", "tcp://10.0.0.5", "10.0.0.5:port"):  # Dask's runner wants the port: it failed after the server started
        assert main(["sweep", str(sweep), "--artifacts-dir", str(tmp_path), "--dask-address", address]) == EXIT_BAD_INPUT
        assert f"--dask-address {address} names no scheduler port; give host and port, e.g. tcp://10.0.0.5:8786" in capsys.readouterr().err
    assert main(["sweep", str(sweep), "--artifacts-dir", str(tmp_path), "--dask-workers", "0"]) == EXIT_BAD_INPUT
    assert "--dask-workers is 0; give at least 1 worker process" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_sweep_is_held_from_its_check_through_its_flow_run(tmp_path, monkeypatch):
    """Two commands of one sweep started together: the one that passed the check holds the sweep
    until its flow run ends, so the other is refused before starting a Prefect server or flow run."""
    import threading

    import flows.sweep
    from tasks.artifacts import Busy

    refused = []

    class Sweep:  # the sweep's flow, as far as holding its lock goes
        def with_options(self, **options):
            return self

        def __call__(self, name, artifacts_dir, **parameters):
            def other_command():
                try:
                    with flows.sweep.sweep_lock(name, artifacts_dir):
                        pass
                except Busy as error:
                    refused.append(str(error))

            other = threading.Thread(target=other_command)
            other.start()
            other.join()
            with flows.sweep.sweep_lock(name, artifacts_dir):  # the flow takes it again, in this thread
                return self

        def result(self, **options):
            return []

    monkeypatch.setattr(flows.sweep, "sae_sweep", Sweep())
    assert flows.sweep.run_sweep(str(write_sweep(tmp_path, {"l1_coefficient": [1.0, 2.0]})), str(tmp_path / "artifacts")) == []
    assert len(refused) == 1 and refused[0].startswith(f"sweep 't' (in {tmp_path / 'artifacts'}) is in use by process {os.getpid()}")


def test_a_failing_member_does_not_stop_the_others_and_a_running_sweep_is_not_started_twice(prefect_server, tmp_path, capsys):
    from flows.cli import EXIT_BAD_INPUT, EXIT_FAILED, main

    from tasks.artifacts import run_dir
    from tasks.preflight import default_run_name

    members = [{"training_tokens": 8192}, {"training_tokens": 8192, "lr": 0.001, "analysis_token_index": 99}, {"training_tokens": 8192, "lr": 0.002}]
    sweep = write_sweep(tmp_path, {}, members=members)
    artifacts = tmp_path / "artifacts"
    with held_by_another_thread(artifacts / "sweeps" / "t" / ".lock"):  # as by another process
        assert main(["sweep", str(sweep), "--artifacts-dir", str(artifacts)]) == EXIT_BAD_INPUT
    assert f"sweep 't' (in {artifacts}) is in use by process {os.getpid()}" in capsys.readouterr().err
    assert not (artifacts / "runs").exists()

    busy = run_dir(artifacts, default_run_name(sweep_members(sweep)[1][2], artifacts))
    with held_by_another_thread(busy / ".lock"):  # the third member, run by another process
        assert main(["sweep", str(sweep), "--artifacts-dir", str(artifacts)]) == EXIT_FAILED
    printed = capsys.readouterr().out
    assert re.search(r"^ 1  Completed +lr=0.0003 +\S+  L0 [\d.]+  EV [\d.-]+  CE score [\d.-]+  dead \d+$", printed, re.M), printed
    assert re.search(r"^ 2  Failed +lr=0.001 +\S+  ConfigError: analysis_token_index is 99, but prompt", printed, re.M), printed
    rows = json.loads((artifacts / "sweeps" / "t" / "members.json").read_text())
    assert [r["state"] for r in rows] == ["Completed", "Failed", "Failed"]
    assert rows[1]["error"].startswith("ConfigError: analysis_token_index is 99, but prompt") and "l0" in rows[0]
    assert rows[2]["error"].startswith(f"Busy: run '{busy.name}' is in use by process {os.getpid()}")
    assert rows[2]["error"].endswith("wait for it to finish, then run the sweep again (this member then continues)")  # a sweep has no --new
    assert (tmp_path / "artifacts" / "sweeps" / "t" / "frontier.png").is_file()
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        sweeps = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-t"])))
    state, = [r.state for r in sweeps if r.parameters["artifacts_dir"] == str(artifacts)]
    assert state.is_failed() and state.message == "2 of 3 members did not complete (2 Failed); the members table says why"


def test_members_at_two_hooks_get_their_stores_from_one_shared_fill_which_sigterm_stops_between_shards(prefect_server, tmp_path, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    import tasks.activations
    import tasks.model
    from conftest import task_states
    from flows.sweep import run_sweep

    sweep = write_sweep(tmp_path, {"hook_name": ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"], "l1_coefficient": [1.0, 2.0]}, name="hooks")
    small = ["training_tokens=8192", "expansion_factor=4", "train_batch_size_tokens=512", "n_batches_in_buffer=16"]
    monkeypatch.setattr(tasks.activations, "SHARD_BYTES", 1)  # a shard per model batch
    forward, calls = tasks.model.hooks_activations, []

    def hooks_activations(*args):  # SIGTERM arrives during the shared fill's third model batch
        calls.append(1)
        return (signal_once_every_thread_gets_here(1)(forward) if len(calls) == 3 else forward)(*args)

    with monkeypatch.context() as patch:
        patch.setattr(tasks.model, "hooks_activations", hooks_activations)
        rows = run_sweep(str(sweep), str(tmp_path / "artifacts"), overrides=small)
    assert len(calls) == 3
    assert [r["state"] for r in rows] == ["Stopped"] * 4
    assert all(r["error"].endswith("not started: SIGTERM was received before it started") for r in rows)
    stores = sorted((tmp_path / "artifacts" / "activations").iterdir())
    written = [json.loads((s / "manifest.json").read_text())["shards"] for s in stores]
    assert len(stores) == 2 and [len(shards) for shards in written] == [3, 3]
    kept = {s / shard["file"]: (s / shard["file"]).stat().st_mtime_ns for s, shards in zip(stores, written) for shard in shards}
    assert not list((tmp_path / "artifacts" / "runs").glob("*/checkpoints"))

    rows = run_sweep(str(sweep), str(tmp_path / "artifacts"), overrides=small)
    assert [r["state"] for r in rows] == ["Completed"] * 4
    assert sorted((tmp_path / "artifacts" / "activations").iterdir()) == stores
    assert all(json.loads((s / "manifest.json").read_text())["complete"] for s in stores)
    assert {path: path.stat().st_mtime_ns for path in kept} == kept  # the fill resumed after them
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-hooks"])), sort=FlowRunSort.START_TIME_DESC)
    states = task_states(runs[0].state)
    assert states["fill-activation-stores"] == "Completed"


def signal_once_every_thread_gets_here(parties: int):
    """A wrapper for a function the members call: the calls of `parties` threads meet there, one
    of them sends this process SIGTERM, and all go on once the sweep's handler has noted it."""
    import threading

    from tasks.stopping import STOP_REQUESTS

    barrier = threading.Barrier(parties, timeout=300)

    def at_the_signal(function):
        def wrapped(*args, **kwargs):
            if not STOP_REQUESTS and barrier.wait() == 0:
                os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while not STOP_REQUESTS:
                assert time.monotonic() < deadline, "the sweep's SIGTERM handler did not note the signal"
                time.sleep(0.01)
            return function(*args, **kwargs)

        return wrapped

    return at_the_signal


def test_sigterm_stops_every_training_member_with_a_checkpoint_and_the_rerun_resumes_them(prefect_server, tmp_path, monkeypatch, capfd):
    """Members train in threads, where no signal handler runs: the sweep notes SIGTERM for them,
    each writes a checkpoint at the end of its step, and the command exits 75. The step is a log
    step, whose progress update would hang on a Prefect server the signal stopped: it is left out."""
    import prefect.artifacts

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterName, LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import FlowRunSort

    import tasks.activations
    import tasks.artifacts
    from flows.cli import EXIT_PREEMPTED, main
    from tasks.artifacts import verify_manifest
    from tasks.stopping import STOP_REQUESTS

    sweep = write_sweep(tmp_path, {"l1_coefficient": [1.0, 2.0]})
    command = ["sweep", str(sweep), "--artifacts-dir", str(tmp_path / "artifacts"), "--set", "training_tokens=8192", "--set", "train_batch_size_tokens=512", "--set", "n_checkpoints=0", "--set", "log_every=3"]
    update_progress = prefect.artifacts.update_progress_artifact

    def progress_unless_stopped(*args, **kwargs):
        if STOP_REQUESTS:
            raise ConnectionError("the Prefect server is gone")
        return update_progress(*args, **kwargs)

    calls = {}
    at_the_signal = signal_once_every_thread_gets_here(2)
    fetch = tasks.activations.ShuffledBatches.__next__

    def next_batch(self):  # both members meet at their third batch
        calls[self] = calls.get(self, 0) + 1
        return (at_the_signal(fetch) if calls[self] == 3 else fetch)(self)

    handler = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(tasks.activations.ShuffledBatches, "__next__", next_batch)
    monkeypatch.setattr(prefect.artifacts, "update_progress_artifact", progress_unless_stopped)
    monkeypatch.setattr(tasks.artifacts.ProgressArtifact, "MIN_SECONDS", 0.0)  # an update at every log row
    assert main(command) == EXIT_PREEMPTED
    monkeypatch.undo()
    assert signal.getsignal(signal.SIGTERM) is handler
    out, err = capfd.readouterr()
    assert "SIGTERM received: stopping at the next safe point" in err
    assert "sweep stopped by SIGTERM: the members marked Stopped stopped at a safe point (2 in training" in err and "Run the same command again" in err
    rows = json.loads((tmp_path / "artifacts" / "sweeps" / "t" / "members.json").read_text())
    assert [r["state"] for r in rows] == ["Stopped", "Stopped"]
    for row in rows:
        run = tmp_path / "artifacts" / "runs" / row["run"]
        assert f"stopped by SIGTERM after step 3; checkpoint {run / 'checkpoints' / 'step-000000003'} written" in row["error"]
        assert verify_manifest(run / "checkpoints" / "step-000000003") is not None and not (run / "trained").exists()
    with get_client(sync_client=True) as client:  # a stop as asked, not a failure, in the UI
        sweep_run = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-t"])), sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
        members = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[sweep_run.id])))
    assert sweep_run.state.name == "Preempted" and sweep_run.state.message == "2 of 2 members stopped at a safe point; run the sweep again to continue it"
    assert sorted(m.name for m in members if m.name.startswith("member")) == ["member l1_coefficient=1.0", "member l1_coefficient=2.0"]  # what each varies, in the UI

    assert main(command) == 0
    rows = json.loads((tmp_path / "artifacts" / "sweeps" / "t" / "members.json").read_text())
    assert [r["state"] for r in rows] == ["Completed", "Completed"]
    for row in rows:
        trained = json.loads((tmp_path / "artifacts" / "runs" / row["run"] / "trained" / "manifest.json").read_text())
        assert trained["resumed_from_step"] == 3 and trained["n_training_steps"] == 16
        with get_client(sync_client=True) as client:  # a member's own lines are on its own flow run's page, not its sweep's
            member = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[row["run"]])), sort=FlowRunSort.START_TIME_DESC, limit=1)[0]
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[member.id])))
        assert any(log.message.startswith("Activations: cached") for log in logs)


def test_members_initialised_at_once_in_threads_get_the_weights_they_get_alone():
    """Sweep members are threads of one process: a member's seed and initial draws from torch's
    global generator, interleaved with another member's initialisation or checkpoint restore,
    gave it other weights (4 of 20 tries of 4 members without the lock)."""
    import threading

    import torch

    from tasks.checkpoint import _rng_state, _set_rng_state
    from tasks.preflight import resolve
    from tasks.train import new_training_sae

    cfgs = [resolve(tiny_config(seed=seed, expansion_factor=32)) for seed in (1, 2, 3, 4)]
    alone = [new_training_sae(cfg)[0].state_dict() for cfg in cfgs]
    restoring, done = _rng_state("cpu"), threading.Event()

    def resuming_member():  # restores a checkpoint's generator state, over and over
        while not done.wait(0.001):
            _set_rng_state(restoring, "cpu")

    resuming = threading.Thread(target=resuming_member)
    resuming.start()
    try:
        for _ in range(3):
            barrier, made = threading.Barrier(len(cfgs)), [None] * len(cfgs)

            def member(i):
                barrier.wait()
                made[i] = new_training_sae(cfgs[i])[0].state_dict()

            threads = [threading.Thread(target=member, args=(i,)) for i in range(len(cfgs))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert all(torch.equal(made[i][k], alone[i][k]) for i in range(len(cfgs)) for k in alone[i])
    finally:
        done.set()
        resuming.join()


def test_a_cancel_of_the_sweep_in_the_prefect_ui_stops_its_members_at_a_safe_point(prefect_server, tmp_path, monkeypatch, capsys):
    """A sweep's flow run has no runner to stop it: cancelled in the UI, it trained every member
    to the end, stayed Cancelling, and the command failed. Now its members stop as on SIGTERM."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.states import Cancelling

    import tasks.stopping
    import tasks.train
    from flows.cli import EXIT_PREEMPTED, main

    def the_sweep():
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-t"])), sort=FlowRunSort.START_TIME_DESC, limit=1)[0]

    after_step, cancelled = tasks.train.TrainingLog.after_step, []

    def cancelled_at_step_3(self, trainer, step_output, stopping=False):
        if trainer.n_training_steps == 3 and not cancelled:
            cancelled.append(True)
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(the_sweep().id, Cancelling(message="cancelled in the UI"))
        if cancelled:
            time.sleep(0.3)  # training looks for a stop at most once a second
        return after_step(self, trainer, step_output, stopping)

    monkeypatch.setattr(tasks.stopping, "CANCEL_POLL_SECONDS", 0.1)
    monkeypatch.setattr(tasks.train.TrainingLog, "after_step", cancelled_at_step_3)
    sweep = write_sweep(tmp_path, {"l1_coefficient": [1.0, 2.0]})
    command = ["sweep", str(sweep), "--artifacts-dir", str(tmp_path / "artifacts"), "--set", "training_tokens=16384", "--set", "train_batch_size_tokens=512", "--set", "n_checkpoints=0"]
    assert main(command) == EXIT_PREEMPTED
    assert "saeflow: sweep stopped by its cancel in Prefect: the members marked Stopped stopped at a safe point" in capsys.readouterr().err
    rows = json.loads((tmp_path / "artifacts" / "sweeps" / "t" / "members.json").read_text())
    assert [r["state"] for r in rows] == ["Stopped", "Stopped"] and all("stopped by its cancel in Prefect " in r["error"] for r in rows)
    state = the_sweep().state
    assert state.is_cancelled() and state.message == "Cancelled in Prefect: 0 of 2 members completed; run the sweep again to continue it"


def test_a_ctrl_c_after_a_sweep_s_cancel_in_prefect_is_a_first_one():
    """The sweep notes its cancel among the stop requests, where a Ctrl-C counted as the second and
    exited at once, without the members' checkpoints."""
    script = (
        "import os, signal\n"
        "from tasks.stopping import CANCELLED_IN_PREFECT, STOP_REQUESTS, stop_signals\n"
        "with stop_signals():\n"
        "    STOP_REQUESTS.append(CANCELLED_IN_PREFECT)\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    print(STOP_REQUESTS)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['its cancel in Prefect', 'SIGINT']"
    assert "SIGINT received: stopping at the next safe point" in result.stderr
