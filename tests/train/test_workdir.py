"""Workdirs: a relative path, a gs:// URL (through a local GCS emulator), and workdirs a run cannot use."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from jaxmodels.train import config as train_config
from jaxmodels.train.loop import Trainer, train_and_evaluate
from jaxmodels.train.paths import WorkdirError
from tests.tiny import cli_overrides, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_relative_workdir_trains_checkpoints_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tiny_config(train__num_steps=2, train__checkpoint_every=2, sample__max_new_tokens=2)
    assert train_and_evaluate(config, "run")["final_step"] == 2
    assert os.path.isdir(tmp_path / "run" / "checkpoints")
    assert Trainer(config, "run").restore_or_init()[0] == 2
    config.train.num_steps = 3
    assert train_and_evaluate(config, "run")["start_step"] == 2


@pytest.fixture(scope="module")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator on localhost (the pure-Python `gcp-storage-emulator`, a test extra) storing the
    bucket "bucket" in a local folder; yields its URL and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, STORAGE_BASE=str(tmp_path_factory.mktemp("gcs")))
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--default-bucket=bucket", "--quiet"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(timeout=30)


def _objects(url: str, prefix: str) -> list[str]:
    """The names of the emulator's objects under `prefix` (GCS JSON API, read without gcsfs)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{url}/storage/v1/b/bucket/o?{query}", timeout=30) as r:
        return sorted(item["name"] for item in json.load(r).get("items", []))


def _read(url: str, name: str) -> str:
    with urllib.request.urlopen(f"{url}/download/storage/v1/b/bucket/o/{urllib.parse.quote(name, safe='')}"
                                "?alt=media", timeout=30) as r:
        return r.read().decode()


def _train_cli(workdir: str, cwd, env_extra: dict, **overrides) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", **env_extra,  # optimisation level 0 as in conftest
               XLA_FLAGS="--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    config = os.path.join(ROOT, "experiments", "configs", "lm_tiny.py")
    cmd = [sys.executable, "-m", "jaxmodels.main", f"--config={config}", f"--workdir={workdir}",
           *cli_overrides(**overrides)]
    run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    if run.returncode and "Malformed StorageGeneration" in run.stderr:
        # The emulator, not the library: on a loaded machine it can answer a TensorStore write with a reply
        # TensorStore cannot parse. Running the same command again resumes from the last checkpoint, so
        # the losses compared below are unchanged (resumes are bit-exact).
        run = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    return run


def _losses(lines: list[str]) -> dict[int, float]:
    rows = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_gs_workdir_trains_resumes_and_writes_nothing_locally(gcs_emulator, tmp_path):
    """A tiny run and its resume with --workdir gs://bucket/run, through the command line as a user runs it.

    The fake is a GCS emulator on localhost (`gcp-storage-emulator`, pure Python from PyPI), not a mock of
    our own code: every client talks the real GCS JSON API to it. epath's gs:// backend (gcsfs: config.json,
    metrics.jsonl, summary.json, the checkpoint directories orbax lists and finalises, TensorBoard events,
    the profile, the loss plot) honours STORAGE_EMULATOR_HOST, and TensorStore's GCS driver (orbax's arrays) honours
    TENSORSTORE_GCS_HTTP_URL. We chose it over fsspec/epath mocks because those cannot reach TensorStore,
    which writes the arrays in C++; fake-gcs-server would need a Go binary. Only localhost is contacted.
    """
    # The emulator serves one request at a time (http.server.HTTPServer); TensorStore's default of many
    # concurrent requests then times out on a loaded machine and its retries confuse the emulator.
    env = {"STORAGE_EMULATOR_HOST": gcs_emulator, "TENSORSTORE_GCS_HTTP_URL": gcs_emulator,
           "TENSORSTORE_GCS_REQUEST_CONCURRENCY": "1"}
    steps = dict(train__checkpoint_every=2, train__profile_steps=(1, 1), sample__max_new_tokens=2)
    first = _train_cli("gs://bucket/run", tmp_path, env, train__num_steps=4, **steps)
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train_cli("gs://bucket/run", tmp_path, env, train__num_steps=6, **steps)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from step 4" in second.stdout + second.stderr

    assert os.listdir(tmp_path) == []  # no local "gs:" folder, nothing else either
    names = _objects(gcs_emulator, "run/")
    for name in ("run/config.json", "run/metrics.jsonl", "run/summary.json"):
        assert name in names
    for prefix in ("run/checkpoints/4/", "run/checkpoints/6/", "run/tensorboard/events.out.tfevents."):
        assert any(n.startswith(prefix) for n in names), prefix
    assert any(n.startswith("run/profile/") and n.endswith(".xplane.pb") for n in names)
    assert json.loads(_read(gcs_emulator, "run/summary.json"))["start_step"] == 4
    plot = subprocess.run([sys.executable, "-m", "jaxmodels.train.plot", "gs://bucket/run"], cwd=tmp_path,
                          env=dict(os.environ, PYTHONPATH=ROOT, **env), capture_output=True, text=True, timeout=120)
    assert plot.returncode == 0 and "run/loss.png" in _objects(gcs_emulator, "run/"), plot.stderr[-3000:]

    # The same two runs with a local workdir give the same losses, bit for bit.
    local = tmp_path.parent / f"{tmp_path.name}_local"
    for num_steps in (4, 6):
        assert _train_cli(str(local), tmp_path, {}, train__num_steps=num_steps, **steps).returncode == 0
    gs_losses = _losses(_read(gcs_emulator, "run/metrics.jsonl").splitlines())
    assert sorted(gs_losses) == list(range(1, 7))
    assert gs_losses == _losses((local / "metrics.jsonl").read_text().splitlines())


def _nothing_built(monkeypatch):
    """Make building the task fail, so that an error from the workdir check shows it came first."""
    def build(_):
        raise AssertionError("the task was built before the workdir was checked")
    monkeypatch.setattr(train_config, "make_task", build)


def test_a_workdir_that_cannot_be_written_fails_before_anything_is_built(tmp_path, monkeypatch):
    _nothing_built(monkeypatch)
    (tmp_path / "file").write_text("not a folder")
    workdir = tmp_path / "file" / "run"  # a path under a regular file: no one, root included, can create it
    with pytest.raises(WorkdirError, match=f"cannot write to workdir {workdir}"):
        train_and_evaluate(tiny_config(), str(workdir))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_workdir_fails_before_anything_is_built(tmp_path, monkeypatch):
    _nothing_built(monkeypatch)
    tmp_path.joinpath("run").mkdir()
    tmp_path.joinpath("run").chmod(0o555)
    with pytest.raises(WorkdirError, match="cannot write to workdir .*PermissionError"):
        train_and_evaluate(tiny_config(), str(tmp_path / "run"))


def test_a_gs_workdir_without_gcsfs_names_what_to_install(tmp_path):
    """Run in a fresh process with gcsfs hidden (epath and fsspec cache their file systems)."""
    script = ("import sys; sys.modules['gcsfs'] = None\n"
              "from jaxmodels.train import loop\n"
              "def build(_): raise AssertionError('the task was built before the workdir was checked')\n"
              "loop.make_task = build\n"
              "from tests.tiny import tiny_config\n"
              "loop.train_and_evaluate(tiny_config(), 'gs://bucket/run')\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("jaxmodels.train.paths.WorkdirError: workdir gs://bucket/run: no file-system backend "
                           "for gs:// URLs is installed"), r.stderr[-3000:]
    assert "pip install 'jaxmodels[gcs]'" in last
    assert os.listdir(tmp_path) == []
