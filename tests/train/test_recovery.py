"""Nothing silent, nothing lost: one run per workdir, recovery past a damaged checkpoint, resumes that say
what changed, finished runs left alone, a limit on skipped steps, a signal in the last step."""

import contextlib
import json
import shutil

import pytest

from jaxmodels.train import loop
from jaxmodels.train.checkpoint import CheckpointError
from jaxmodels.train.loop import NonFiniteLossError, train_and_evaluate
from jaxmodels.train.workdir import WorkdirLock, WorkdirLockedError
from tests.tiny import tiny_config


def _rows(workdir):
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]


def test_a_second_run_on_a_workdir_in_use_is_refused(tmp_path):
    held = WorkdirLock(tmp_path)
    held.acquire()  # as a live run would
    with pytest.raises(WorkdirLockedError, match="in use by another run"):
        train_and_evaluate(tiny_config(train__num_steps=2), str(tmp_path))
    held.release()
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before it wrote anything


def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_completes(tmp_path):
    cfg = tiny_config(train__num_steps=8)
    train_and_evaluate(cfg, str(tmp_path))
    (tmp_path / "summary.json").unlink()  # as if the run had died right after its last save
    shutil.rmtree(tmp_path / "checkpoints" / "8" / "default")
    s = train_and_evaluate(cfg, str(tmp_path))
    assert s["start_step"] == 4 and s["final_step"] == 8 and not s["interrupted"]
    assert (tmp_path / "checkpoints.unreadable" / "8").is_dir()  # kept for inspection
    s = train_and_evaluate(tiny_config(train__num_steps=12), str(tmp_path))  # and no crash loop after it
    assert s["start_step"] == 8 and s["final_step"] == 12


def test_resuming_with_another_model_is_refused_unless_allowed(tmp_path, capsys):
    train_and_evaluate(tiny_config(train__num_steps=2), str(tmp_path))
    changed = tiny_config(train__num_steps=4, model__attention__position="alibi")
    with pytest.raises(CheckpointError, match=r"model.attention.position: 'rope' -> 'alibi'.*--allow_config_changes"):
        train_and_evaluate(changed, str(tmp_path))
    s = train_and_evaluate(changed, str(tmp_path), allow_config_changes=True)
    assert s["start_step"] == 2 and s["final_step"] == 4
    out = capsys.readouterr().out
    assert "resuming with config changes:" in out and "train.num_steps: 2 -> 4" in out


def test_rerunning_a_finished_run_changes_nothing(tmp_path, capsys):
    cfg = tiny_config(train__num_steps=4)
    first = train_and_evaluate(cfg, str(tmp_path))
    rows = _rows(tmp_path)
    again = train_and_evaluate(cfg, str(tmp_path))
    assert again == json.loads(json.dumps(first)) and _rows(tmp_path) == rows  # no duplicate eval row
    assert "already finished at step 4" in capsys.readouterr().out


def test_a_fresh_start_drops_rows_of_an_attempt_that_never_checkpointed(tmp_path):
    tmp_path.joinpath("metrics.jsonl").write_text('{"step": 0, "eval/loss": 1.0}\n{"step": 1, "train/loss": 2.0}\n')
    train_and_evaluate(tiny_config(train__num_steps=2), str(tmp_path))
    assert [r["step"] for r in _rows(tmp_path) if "eval/loss" in r] == [0, 2]


def test_skip_halts_after_too_many_non_finite_steps_in_a_row(tmp_path):
    cfg = tiny_config(optimizer__learning_rate=1e30, optimizer__grad_clip_norm=0.0, optimizer__warmup_steps=0,
                      optimizer__schedule="constant", train__max_consecutive_skips=2)
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps up to step \d+ were not finite "
                                                 r"\(train.max_consecutive_skips=2\)"):
        train_and_evaluate(cfg, str(tmp_path))


def test_a_signal_during_the_last_step_ends_the_run_as_interrupted(tmp_path, monkeypatch):
    @contextlib.contextmanager
    def signal_after_the_loop(signums):  # the signal arrives once the last step has run
        calls = []

        def requested():
            calls.append(1)
            return len(calls) > 2  # False after steps 1 and 2, True after the loop
        yield requested

    monkeypatch.setattr(loop, "stop_on_signals", signal_after_the_loop)
    s = train_and_evaluate(tiny_config(train__num_steps=2), str(tmp_path))
    assert s["interrupted"] and s["final_step"] == 2 and "eval_end" not in s
    assert (tmp_path / "checkpoints" / "2").is_dir()


def test_a_data_error_mid_run_saves_the_last_finished_step_first(tmp_path, monkeypatch):
    from jaxmodels.data.errors import DataError
    from jaxmodels.tasks.lm import LanguageModeling

    original = LanguageModeling.train_batches

    def damaged_after_three(self, start_step, process_index, process_count):
        source = original(self, start_step, process_index, process_count)
        for _ in range(start_step, 3):
            yield next(source)
        raise DataError("record 7 of the shard cannot be read (corrupt bytes)", ["/data/shard-0"],
                        "re-prepare it", step=3)

    monkeypatch.setattr(LanguageModeling, "train_batches", damaged_after_three)
    with pytest.raises(DataError, match="while reading the batch of step 3: /data/shard-0"):
        train_and_evaluate(tiny_config(train__num_steps=8), str(tmp_path))
    assert (tmp_path / "checkpoints" / "3").is_dir()  # nothing learned is lost
    assert max(r["step"] for r in _rows(tmp_path)) == 3
