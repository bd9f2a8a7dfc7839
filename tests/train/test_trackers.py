"""Trackers behind the metric writer: selection from config.train.trackers, and Weights & Biases (a fake
module in every environment; the real one offline where it is installed)."""

import json
import subprocess
import sys
import types

import pytest

from jaxmodels.train.config import ConfigError
from jaxmodels.train.loop import train_and_evaluate
from jaxmodels.train.trackers import check_trackers
from tests.tiny import tiny_config


class _FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls, self.id = calls, kwargs["id"] or f"run{len(calls['init'])}"
        self.config = types.SimpleNamespace(update=lambda config, **_: calls["config"].append(config))
        calls["init"].append(kwargs)

    def log(self, scalars, step):
        self.calls["log"].append((step, scalars))

    def finish(self):
        self.calls["finish"] += 1


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in `wandb` module that records the calls the tracker makes."""
    calls = {"init": [], "config": [], "log": [], "finish": 0}
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: _FakeRun(calls, **kw)))
    return calls


def test_wandb_tracker_logs_config_and_scalars_and_reuses_the_run_id_on_resume(tmp_path, fake_wandb):
    config = tiny_config(train__num_steps=4, train__trackers=("jsonl", "wandb"), train__wandb_project="proj")
    train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "wandb_run_id").read_text() == "run0"
    first = fake_wandb["init"][0]
    assert first["project"] == "proj" and first["id"] is None and first["name"] == tmp_path.name
    assert fake_wandb["config"][0]["train"]["num_steps"] == 4
    steps = [step for step, scalars in fake_wandb["log"] if "train/loss" in scalars]
    assert steps == [1, 2, 3, 4] and fake_wandb["finish"] == 1
    assert not (tmp_path / "tensorboard").exists()  # not selected

    config.train.num_steps = 6
    train_and_evaluate(config, str(tmp_path))
    assert fake_wandb["init"][1]["id"] == "run0" and fake_wandb["init"][1]["resume"] == "allow"
    assert (tmp_path / "wandb_run_id").read_text() == "run0"


def test_wandb_offline_run_is_resumed_with_the_same_id(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = tiny_config(train__num_steps=2, train__checkpoint_every=2, train__trackers=("jsonl", "wandb"))
    train_and_evaluate(config, str(tmp_path))
    run_id = (tmp_path / "wandb_run_id").read_text()
    config.train.num_steps = 3
    train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "wandb_run_id").read_text() == run_id
    runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(run_id) for name in runs)


def test_trackers_are_checked_before_anything_is_built(monkeypatch):
    with pytest.raises(ConfigError, match=r"unknown trackers \['mlflow'\]; choose from \['jsonl', 'tensorboard'"):
        check_trackers(("jsonl", "mlflow"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"wandb is not installed; pip install 'jaxmodels\[wandb\]'"):
        train_and_evaluate(tiny_config(train__trackers=("wandb",)), "/nonexistent/never/created")


def test_jsonl_rows_keep_their_format(tmp_path):
    train_and_evaluate(tiny_config(train__num_steps=2, train__trackers=("jsonl",)), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 2]  # eval 0, train 1 and 2, eval 2
    assert set(rows[0]) == {"step", "eval/loss", "eval/bits_per_byte", "eval/perplexity", "eval/num_tokens",
                            "eval/num_bytes", "eval/unigram_entropy_bits_per_byte"}


def test_the_tensorboard_tracker_does_not_import_torch(tmp_path):
    # tensorboardX imports torch when it is installed: seconds at the start of every run, for nothing.
    code = ("import sys\nfrom etils import epath\nfrom jaxmodels.train.trackers import TensorBoardTracker\n"
            f"t = TensorBoardTracker(epath.Path({str(tmp_path)!r}), 0)\nt.write(1, {{'loss': 2.0}})\nt.close()\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\nimport torch\nprint(torch.__name__)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "torch", r.stderr[-2000:]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
