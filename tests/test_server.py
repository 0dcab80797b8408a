"""Against a real `prefect server start` on loopback: a served deployment with an interval
schedule, a triggered run, and the run as the Prefect UI shows it in headless Chromium."""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from conftest import tiny_config
from tasks.preflight import default_run_name, resolve
from tasks.report import artifact_key

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    """`prefect server start` on a free loopback port, with its own database."""
    port, home = free_port(), tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{port}/api"
    env = os.environ | {"PREFECT_HOME": str(home), "PREFECT_UI_API_URL": url, "PREFECT_API_URL": url}
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert server.poll() is None and time.monotonic() < deadline, "prefect server did not start"
        time.sleep(0.5)
    yield url
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def api(url: str, path: str, body: dict | None = None):
    response = httpx.post(f"{url}{path}", json=body or {}, timeout=30)
    response.raise_for_status()
    return response.json()


@pytest.fixture(scope="module")
def served_run(real_server, tmp_path_factory):
    """Serve the tiny config every hour, trigger its deployment twice, return what happened."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    work = tmp_path_factory.mktemp("served")
    cfg = resolve(tiny_config(training_tokens=8192, n_checkpoints=1))
    config = work / "run.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = os.environ | {"PREFECT_API_URL": real_server}
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", str(config), "--interval", "3600", "--name", "hourly", "--artifacts-dir", str(work / "artifacts")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (deployments := api(real_server, "/deployments/filter")):
            assert serve.poll() is None, serve.stdout.read()
            assert time.monotonic() < deadline, "deployment never appeared"
            time.sleep(0.5)
        with temporary_settings({PREFECT_API_URL: real_server}):
            first = run_deployment("saeflow/hourly", timeout=600)
            second = run_deployment("saeflow/hourly", timeout=600)
            long = {"config": cfg.model_copy(update=LONG_TRAINING).model_dump(mode="json"), "run_name": "cancelled-in-ui"}
            cancelled = cancel_in_training(real_server, long)
    finally:
        serve.send_signal(signal.SIGINT)
        try:
            serve.wait(timeout=60)
        except subprocess.TimeoutExpired:
            serve.kill()
    return {"url": real_server, "cfg": cfg, "deployment": deployments[0], "first": first, "second": second, "cancelled": cancelled, "work": work}


# Large SAE: training takes several seconds (32 steps); a cancel reaches it in about one.
LONG_TRAINING = {"expansion_factor": 64, "train_batch_size_tokens": 4096, "training_tokens": 131_072, "n_checkpoints": 4}


def cancel_in_training(url: str, parameters: dict):
    """Trigger a flow run with `parameters` on the served deployment and cancel it, as the UI's
    Cancel does, once its training runs; returns the flow run once it has ended."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    run = run_deployment("saeflow/hourly", parameters=parameters, timeout=0)
    deadline = time.monotonic() + 300
    while task_states(url, run.id).get("train-sae") != "Running":
        assert time.monotonic() < deadline, f"training never started: {task_states(url, run.id)}"
        time.sleep(0.2)
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(message="cancelled in the UI"))
        deadline = time.monotonic() + 120
        while not (run := client.read_flow_run(run.id)).state.is_final():
            assert time.monotonic() < deadline, f"still {run.state.name} two minutes after the cancel"
            time.sleep(0.5)
    return run


def task_states(url: str, flow_run_id) -> dict[str, str]:
    runs = api(url, "/task_runs/filter", {"flow_runs": {"id": {"any_": [str(flow_run_id)]}}})
    return {run["name"].rsplit("-", 1)[0]: (run["state"] or {}).get("name") for run in runs}  # no state yet: None


def test_served_deployment_has_its_schedule_and_triggered_runs_complete(served_run):
    deployment = served_run["deployment"]
    assert deployment["name"] == "hourly"
    assert [s["schedule"]["interval"] for s in deployment["schedules"]] == [3600.0]
    first, second = served_run["first"], served_run["second"]
    name = default_run_name(served_run["cfg"])
    assert first.name == second.name == name
    assert first.state.is_completed() and second.state.is_completed()
    assert sorted(tag.split(":")[0] for tag in first.tags) == ["architecture", "d_sae", "hook", "model"]  # set by the flow run itself
    states = task_states(served_run["url"], first.id)
    assert states["train-sae"] == "Completed" and len(states) == 9
    # the second scheduled run of a finished run does nothing costly
    assert set(task_states(served_run["url"], second.id).values()) == {"Cached"}
    logs = api(served_run["url"], "/logs/filter", {"logs": {"flow_run_id": {"any_": [str(first.id)]}}})
    assert any("step 16/16" in log["message"] for log in logs)
    for run in (first, second):  # the cached run's page shows the report and metrics too
        artifacts = api(served_run["url"], "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [str(run.id)]}}})
        assert {a["key"] for a in artifacts if a["key"]} == {artifact_key(name, "report"), artifact_key(name, "metrics")}


def chromium(url: str, profile: Path, *flags: str) -> str:
    """Load `url` in headless Chromium after its scripts ran; returns the page's text."""
    binary = shutil.which("chromium")
    assert binary, "chromium is not installed; .ci/run installs Debian's chromium package"
    result = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=20000", *flags, url],
        capture_output=True, text=True, timeout=120,
    )
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", result.stdout))


def test_the_prefect_ui_shows_the_run_its_state_and_its_report(served_run, tmp_path):
    base = served_run["url"].removesuffix("/api")
    run = served_run["first"]
    profile = tmp_path / "chromium-profile"
    page = chromium(f"{base}/runs/flow-run/{run.id}", profile, "--dump-dom")
    assert f"Flow Run: {run.name}" in page and "Completed" in page and "Artifacts" in page
    key = artifact_key(run.name, "report")
    artifact_page = chromium(f"{base}/artifacts/key/{key}", profile, "--dump-dom")
    assert f"Artifact: {key}" in artifact_page and f"saeflow report of run {run.name}" in artifact_page
    screenshot = tmp_path / "flow-run.png"  # kept for people to look at
    chromium(f"{base}/runs/flow-run/{run.id}", profile, "--window-size=1400,1000", f"--screenshot={screenshot}")
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_serve_refuses_an_unreachable_api(tmp_path):
    env = os.environ | {"PREFECT_API_URL": f"http://127.0.0.1:{free_port()}/api"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve", "--interval", "60", "--artifacts-dir", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "cannot reach the Prefect API at http://127.0.0.1:" in result.stderr and "prefect server start" in result.stderr


def test_a_cancel_in_the_ui_stops_training_at_a_checkpoint_and_shows_cancelled(served_run):
    """The next flow run resumes from that checkpoint as any rerun does (tests/test_resume.py)."""
    from tasks.artifacts import verify_manifest

    run, url = served_run["cancelled"], served_run["url"]
    assert run.state.is_cancelled(), run.state
    stopped = re.fullmatch(r"Cancelled: stopped by SIGTERM after step (\d+); checkpoint (\S+) written\. Run it again to continue", run.state.message)
    assert stopped, run.state.message
    step, checkpoint = int(stopped[1]), Path(stopped[2])
    assert checkpoint == served_run["work"] / "artifacts" / "runs" / "cancelled-in-ui" / "checkpoints" / f"step-{step:09d}" and step < 32
    assert verify_manifest(checkpoint)["n_training_steps"] == step
    assert task_states(url, run.id)["train-sae"] == "Failed"  # Prefect's own cancel would show the running task Crashed
