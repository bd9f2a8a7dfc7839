"""Inference from a trained run (`jaxmodels.inference`, `python -m jaxmodels.generate`): one tiny run trained per
module; the loaded parameters are the checkpoint's, the command reproduces the run's sample, batched prompts of
different lengths give each prompt's text alone, EOS and the padded vocabulary are respected, and the errors."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from jaxmodels.data.tokenizers import ByteTokenizer
from jaxmodels.generate import main
from jaxmodels.inference import LoadModelError, generate_text, load_model, run_tokenizer
from jaxmodels.train.loop import train_and_evaluate
from tests.tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(workdir, summary) of a tiny lm_tiny run of 8 steps with checkpoints at steps 4 and 8."""
    workdir = str(tmp_path_factory.mktemp("run"))
    return workdir, train_and_evaluate(tiny_config(train__trackers=("jsonl",)), workdir)


def _checkpoint_params(workdir, step):
    """The params of checkpoint `step` read as NumPy arrays, independently of `load_model`."""
    path = os.path.join(workdir, "checkpoints", str(step), "default")
    checkpointer = ocp.PyTreeCheckpointer()
    metadata = checkpointer.metadata(path).item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))["params"]


def _by_path(tree) -> dict:
    """{"blocks/0/attn/w_q": leaf, ...}: the checkpoint's metadata spells list indices as strings."""
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_load_model_gives_the_checkpoint_params(run):
    workdir, _ = run
    for step in (None, 4):
        model, config = load_model(workdir, step=step)
        params, expected = _by_path(nnx.state(model, nnx.Param).to_pure_dict()), _by_path(
            _checkpoint_params(workdir, step or 8))
        assert params.keys() == expected.keys()
        for name, got in params.items():
            assert got.devices() == {jax.devices()[0]}
            np.testing.assert_array_equal(got, expected[name])
    assert config.model.num_layers == 1 and config.sample.prompt == "def "
    model, config = load_model(workdir, dtype=jnp.bfloat16)
    assert config.model.dtype == config.model.param_dtype == "bfloat16"
    expected = _by_path(_checkpoint_params(workdir, 8))
    for name, got in _by_path(nnx.state(model, nnx.Param).to_pure_dict()).items():
        assert got.dtype == jnp.bfloat16
        np.testing.assert_array_equal(got, expected[name].astype(jnp.bfloat16))


def _env():
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONIOENCODING="utf-8",
               XLA_FLAGS="--xla_backend_optimization_level=0")  # one device, unlike the 8 the run trained on
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_the_command_reproduces_the_run_sample(run):
    workdir, summary = run
    sample = json.loads(open(os.path.join(workdir, "summary.json")).read())["sample"]
    assert sample == summary["sample"]
    r = subprocess.run([sys.executable, "-m", "jaxmodels.generate", "--workdir", workdir, "--prompt", "def ",
                        "--max_new_tokens", "8", "--temperature", "0.8", "--top_k", "0", "--top_p", "1.0",
                        "--seed", "0"], env=_env(), capture_output=True, text=True, encoding="utf-8", cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    header, rest = r.stdout.split("\n", 1)
    text, speed = rest.rsplit("\n", 2)[:2]
    assert header == "=== 1/1: 'def '" and text == sample
    assert "8 new tokens in" in speed and "tokens/s on cpu:0" in speed


def test_the_command_defaults_to_the_run_settings(run, tmp_path, capsys):
    workdir, summary = run
    main(["--workdir", workdir])  # prompt, max_new_tokens, temperature, top_k and seed from the run's config
    out = capsys.readouterr().out
    assert out.startswith(f"=== 1/1: 'def '\n{summary['sample']}\n"), out
    (tmp_path / "prompts.json").write_text(json.dumps(["def ", "x\ny"]))  # a JSON list: prompts with newlines
    (tmp_path / "prompts.txt").write_text("if \n\nfor \n")  # one per line, empty lines skipped
    main(["--workdir", workdir, "--prompts_file", str(tmp_path / "prompts.json")])
    out = capsys.readouterr().out
    assert out.startswith(f"=== 1/2: 'def '\n{summary['sample']}\n=== 2/2: 'x\\ny'\n"), out
    main(["--workdir", workdir, "--prompt", "a", "--prompts_file", str(tmp_path / "prompts.txt"), "--max_new_tokens",
          "2"])
    assert [line for line in capsys.readouterr().out.splitlines() if line.startswith("===")] == [
        "=== 1/3: 'a'", "=== 2/3: 'if '", "=== 3/3: 'for '"]


class _Ids(ByteTokenizer):
    """Text = one character per id (chr), ids 0..199 only, so that the model's 256 ids are a padded vocabulary;
    an optional EOS id."""

    vocab_size = 200

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))


def test_prompts_of_different_lengths_give_each_prompts_text_alone(run):
    model, config = load_model(run[0])
    kw = dict(max_new_tokens=8, temperature=0.9, top_p=0.95)
    prompts = ["def ", "class ", "for "]  # token lengths 4, 6, 4: groups 0 ("def ", "for ") and 1 ("class ")
    texts, stats = generate_text(model, run_tokenizer(config), prompts, seed=3, **kw)
    assert stats["groups"] == 2 and stats["new_tokens"] == 24 and stats["tokens_per_second"] > 0
    assert all(t.startswith(p) for t, p in zip(texts, prompts))
    assert generate_text(model, run_tokenizer(config), ["class "], seed=3 + 1, **kw)[0] == [texts[1]]
    assert generate_text(model, run_tokenizer(config), ["def ", "for "], seed=3, **kw)[0] == [texts[0], texts[2]]


def test_texts_end_at_the_tokenizers_eos_and_never_hold_padding_ids(run):
    model, _ = load_model(run[0])
    kw = dict(seed=1, max_new_tokens=12, temperature=1.5)
    free, stats = generate_text(model, _Ids(), ["ab", "cd"], **kw)
    new = [_Ids().encode(text[2:]) for text in free]
    assert stats["new_tokens"] == 24 and max(map(max, new)) < 200  # ids >= 200 (padding) are never sampled
    eos_id = new[0][3]
    stopped, stats = generate_text(model, _Ids(eos_id), ["ab", "cd"], **kw)
    stops = [row.index(eos_id) if eos_id in row else len(row) for row in new]
    assert stopped == [text[:2 + stop] for text, stop in zip(free, stops)]  # cut before the EOS
    assert stats["new_tokens"] == sum(min(stop + 1, 12) for stop in stops)  # the EOS counted, nothing after it


def test_errors_name_the_workdir_and_what_to_do(run, tmp_path, capsys):
    workdir, _ = run
    with pytest.raises(LoadModelError, match=f"no such workdir {tmp_path / 'missing'}"):
        load_model(tmp_path / "missing")
    with pytest.raises(LoadModelError, match=f"workdir {tmp_path} has no config.json"):
        load_model(tmp_path)
    shutil.copy(os.path.join(workdir, "config.json"), tmp_path / "config.json")
    with pytest.raises(LoadModelError, match=f"workdir {tmp_path} has no checkpoint yet; train first"):
        load_model(tmp_path)
    with pytest.raises(LoadModelError, match=r"no checkpoint of step 5; its checkpoints are of steps \[4, 8\]"):
        load_model(workdir, step=5)
    with pytest.raises(SystemExit, match=f"error: workdir {tmp_path} has no checkpoint yet"):
        main(["--workdir", str(tmp_path)])
    with pytest.raises(SystemExit, match="error: --top_k must be at most the vocabulary size 256"):
        main(["--workdir", workdir, "--top_k", "300"])
    with pytest.raises(SystemExit, match="error: .*No such file"):
        main(["--workdir", workdir, "--prompts_file", str(tmp_path / "missing.txt")])
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(SystemExit, match=f"error: --prompts_file {tmp_path / 'empty.json'} holds no prompt"):
        main(["--workdir", workdir, "--prompts_file", str(tmp_path / "empty.json")])
    for flag, value, message in [("--top_p", "1.5", r"--top_p must be a real number in (0, 1], got 1.5"),
                                 ("--max_new_tokens", "0", "--max_new_tokens must be a positive int"),
                                 ("--temperature", "hot", "expected a real number, got 'hot'"),
                                 ("--prompt", "", "a prompt must be non-empty text")]:
        with pytest.raises(SystemExit):
            main(["--workdir", workdir, flag, value])
        assert f"argument {flag}: {message}" in capsys.readouterr().err
