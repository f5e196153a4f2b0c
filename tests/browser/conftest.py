"""Browser-test set-up: the app served on a free localhost port with temporary models/outputs folders, a
headless Debian Chromium driven by Playwright, and a screenshot of every step kept as an artifact when a test
fails (test-artifacts/<test>/, with the server and training logs).

One app and one browser serve the whole session; the demo style LoRA is trained once through the page
(`trained`, in trained_run.py) and shared by the tests that need a finished run, each asserting its own part."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = ROOT / "test-artifacts"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Studio:
    url: str
    models_dir: Path
    outputs_dir: Path
    log: Path
    proc: subprocess.Popen

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])


def _stop_trainings(outputs_dir: Path) -> None:
    """Never leave a training process behind a finished test (they run in their own session)."""
    for pid_file in (outputs_dir / "runs").glob("*/train.pid"):
        try:
            pid = int(pid_file.read_text().split()[0])
            if str(pid_file.parent / "config.toml").encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


@pytest.fixture(scope="session")
def studio_dirs(tmp_path_factory) -> tuple[Path, Path, Path]:  # noqa: D103
    root = tmp_path_factory.mktemp("studio")
    (root / "models" / "Lora").mkdir(parents=True)
    return root, root / "models", root / "outputs"


@pytest.fixture(scope="session")
def studio(studio_dirs):
    root, models, outputs = studio_dirs
    port = free_port()
    log = root / "server.log"
    # One torch thread for the app and the trainings it starts (they inherit its environment): on a small shared
    # machine, with Chromium and the server busy beside them, two intra-op threads keep waiting on each other
    # whenever one is descheduled, and a step takes several times longer than with one thread.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", GRADIO_ANALYTICS_ENABLED="False",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app.main", "--port", str(port), "--models-dir", str(models),
                                 "--outputs-dir", str(outputs)], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    studio = Studio(f"http://127.0.0.1:{port}", models, outputs, log, proc)
    deadline = time.time() + 240
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with code {proc.returncode}:\n{studio.log_tail()}")
        try:
            with urllib.request.urlopen(studio.url, timeout=5) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the app did not answer within 240 s:\n{studio.log_tail()}")
        time.sleep(1)
    yield studio
    _stop_trainings(outputs)
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


class Shots:
    """A screenshot after every step; copied to test-artifacts/ with the logs when the test fails."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.n = 0
        self.pages: list = []

    def take(self, page, name: str) -> None:
        self.n += 1
        try:
            page.screenshot(path=str(self.folder / f"{self.n:02d}-{name}.png"), full_page=True)
        except Exception as e:  # noqa: BLE001 - a screenshot must never be the failure
            (self.folder / f"{self.n:02d}-{name}.txt").write_text(f"screenshot failed: {e}")


@pytest.fixture
def shots(request, tmp_path, studio_dirs):
    shots = Shots(tmp_path / "shots")
    yield shots
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for i, page in enumerate(shots.pages):  # the state at the moment of failure
            shots.take(page, f"at-failure-page{i}")
        target = ARTIFACTS / request.node.name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(shots.folder, target)
        root, _, outputs = studio_dirs
        if (root / "server.log").exists():
            shutil.copy(root / "server.log", target / "server.log")
        for run in (outputs / "runs").glob("*"):
            for name in ("train.log", "events.jsonl", "config.toml"):
                if (run / name).exists():
                    shutil.copy(run / name, target / f"run-{run.name}-{name}")
    # A page left open keeps polling the app and rendering in its own Chromium process for the rest of the
    # session: a dozen of them took more than a core from every test after the browser tests.
    for page in shots.pages:
        try:
            page.context.close()
        except Exception:  # noqa: BLE001 - already closed by the test
            pass


@pytest.fixture(autouse=True)
def no_training_outlives_its_test(request):
    """A failed queue test would leave a 2000-step training running, and the queue would start the next: both
    would slow every later test of the session. Empty the queue first, so killing a training starts nothing."""
    yield
    if "studio" not in request.fixturenames:
        return
    outputs = request.getfixturevalue("studio").outputs_dir
    (outputs / "runs" / "queue.json").unlink(missing_ok=True)
    _stop_trainings(outputs)


from trained_run import trained  # noqa: E402,F401 - the session's one trained run, a fixture
