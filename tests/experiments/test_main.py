"""The command line: override errors before compiling, SIGTERM checkpointing, the local launcher (2 processes ==
1). The remote launchers are tested in tests/launch/."""

import json
import os
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from jaxmodels.main import unknown_override
from tests.tiny import cli_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "experiments", "configs", "lm_tiny.py")


def _env(devices=1):
    env = dict(os.environ, JAX_PLATFORMS="cpu",  # optimisation level 0 as in conftest: compile time dominates
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _main(workdir, *extra, **overrides):
    return [sys.executable, "-m", "jaxmodels.main", f"--config={CONFIG}", f"--workdir={workdir}",
            *cli_overrides(**overrides), *extra]


def test_unknown_override_names_field_and_choices():
    cfg = ml_collections.ConfigDict({"model": {"num_layers": 2, "embed_dim": 8}})
    msg = unknown_override(cfg, "model.num_layerz")
    assert "model.num_layerz" in msg and "['embed_dim', 'num_layers']" in msg
    assert unknown_override(cfg, "model.num_layers") is None
    assert "config has no field 'modle'" in unknown_override(cfg, "modle.x")


@pytest.mark.parametrize("flag,expected", [
    ("--config.model.num_layerz=2", "valid fields: ['attention'"),
    ("--config.model.mlp_kind=relu", "choose one of ['swiglu', 'gelu']"),
    ("--config.train.num_steps=many", "invalid literal for int"),
])
def test_bad_overrides_fail_fast_with_a_clear_message(tmp_path, flag, expected):
    t = time.perf_counter()
    r = subprocess.run(_main(tmp_path, flag), env=_env(), capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0
    assert expected in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "checkpoints")  # failed before building anything
    assert time.perf_counter() - t < 60


def test_the_checkout_shim_runs_the_same_entry_point(tmp_path):
    cmd = _main(tmp_path, "--config.model.num_layerz=2")
    r = subprocess.run([sys.executable, "-m", "experiments.main", *cmd[3:]], env=_env(), capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode != 0 and "unknown config field 'model.num_layerz'" in r.stderr, r.stderr[-2000:]


def _rows(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sigterm_saves_a_checkpoint_and_the_rerun_matches_an_uninterrupted_run(tmp_path):
    steps = dict(train__num_steps=400, train__checkpoint_every=1000)
    proc = subprocess.Popen(_main(tmp_path / "a", **steps), env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "a" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    saved = sorted(int(d) for d in os.listdir(tmp_path / "a" / "checkpoints") if d.isdigit())
    assert len(saved) == 1 and 0 < saved[0] < 400  # written at the interruption, not at an interval
    assert max(r["step"] for r in _rows(tmp_path / "a")) == saved[0]

    # Resume to a short horizon would change the LR schedule, so finish the same 400-step run.
    r = subprocess.run(_main(tmp_path / "a", **steps), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming from step {saved[0]}" in r.stdout + r.stderr
    r = subprocess.run(_main(tmp_path / "b", **steps), env=_env(), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    loss = lambda rows: {x["step"]: x["train/loss"] for x in rows if "train/loss" in x}
    assert loss(_rows(tmp_path / "a")) == loss(_rows(tmp_path / "b"))


def test_two_processes_agree_with_one(tmp_path):
    common = dict(train__num_steps=5)
    one = subprocess.run(_main(tmp_path / "one", **common), env=_env(devices=8), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "launch.local", "--num_processes", "2", "--devices_per_process", "4",
                          "--", *_main(tmp_path / "two", **common)[3:]], env=_env(), cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "process 1:" in two.stdout and "JAX_PROCESS_ID=1" in two.stdout
    a = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "one") if "train/loss" in r}
    b = {r["step"]: r["train/loss"] for r in _rows(tmp_path / "two") if "train/loss" in r}
    assert a.keys() == b.keys() and a
    for s in a:
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s])
