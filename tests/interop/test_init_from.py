"""The command line (`python -m jaxmodels.interop.hf import|export`) and config.train.init_from: a run starts at
step 0 from an imported Hugging Face checkpoint (or another run's params), resuming wins over it, shapes that do
not fit are named, and the trained run exports back to transformers with equal logits."""

import importlib.util
import json

import jax
import ml_collections
import numpy as np
import pytest
import transformers

from jaxmodels.data.tokenizers import make_tokenizer, train_bpe
from jaxmodels.interop.hf import load_hf, main
from jaxmodels.train.config import ConfigError
from jaxmodels.train.loop import Trainer, train_and_evaluate
from tests.interop.common import assert_trees_equal, hf_model, our_logits, params_of, their_logits
from tests.tiny import tiny_config

TINY_LLAMA = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                  intermediate_size=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
                  bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _config(model_section, **overrides):
    config = tiny_config(**{"train__num_steps": 2, "train__checkpoint_every": 2, "train__trackers": ("jsonl",),
                            **overrides})
    config.model = model_section
    return config


def _start(config, workdir):
    """(step, params) the run in `workdir` starts from, on one device."""
    step, state = Trainer(config, str(workdir), devices=jax.devices()[:1]).restore_or_init()
    return step, jax.tree.map(np.asarray, state["params"])


def test_train_from_an_imported_checkpoint_then_export_it(tmp_path, capsys):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_LLAMA), tmp_path / "hf")
    imported = tmp_path / "imported"
    main(["import", "--hf_dir", str(tmp_path / "hf"), "--out", str(imported)])
    printed = capsys.readouterr().out
    assert "imported LlamaForCausalLM" in printed and f"--config {imported / 'config.py'}" in printed
    section = ml_collections.ConfigDict(json.loads((imported / "model_config.json").read_text()))
    spec = importlib.util.spec_from_file_location("finetune_config", imported / "config.py")  # the written config
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.get_config()
    assert written.model.to_dict() == section.to_dict() and written.train.init_from == str(imported)
    assert written.data.tokenizer == "byte"  # the checkpoint has no tokenizer files
    config = _config(section, train__init_from=str(imported))

    step, params = _start(config, tmp_path / "probe")
    assert step == 0
    assert_trees_equal(params, params_of(load_hf(tmp_path / "hf")[1]))

    summary = train_and_evaluate(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    assert summary["final_step"] == 2 and all(np.isfinite(v) for v in summary["eval_end"].values())
    capsys.readouterr()
    step, trained = _start(_config(section, train__num_steps=3, train__init_from=str(imported)), tmp_path / "run")
    assert step == 2 and "config.train.init_from" in capsys.readouterr().out  # resuming wins, with a note
    assert not np.array_equal(trained["embed"]["embedding"], params["embed"]["embedding"])
    assert_trees_equal(_start(_config(section, train__init_from=str(tmp_path / "run")), tmp_path / "from_run")[1],
                        trained)  # another run's workdir: its latest params

    main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    assert "as LlamaForCausalLM" in capsys.readouterr().out
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").float().eval()
    ours = load_hf(tmp_path / "exported")[1]
    assert_trees_equal(params_of(ours), trained)
    tokens = np.random.RandomState(1).randint(0, 256, (2, 12))
    np.testing.assert_allclose(our_logits(ours, tokens), their_logits(theirs, tokens), rtol=0, atol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")  # the run's (byte) tokenizer
    assert tokenizer.encode("def é", add_special_tokens=False) == list("def é".encode())


def test_params_that_do_not_fit_the_model_are_named_with_both_shapes(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_LLAMA), tmp_path / "hf")
    main(["import", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    section = ml_collections.ConfigDict(json.loads((tmp_path / "imported" / "model_config.json").read_text()))
    section.mlp_dim = 48
    with pytest.raises(ConfigError, match=r"config.train.init_from=.*do not fit the model .*"
                                          r"blocks/0/mlp/w_down: \(64, 32\) in the checkpoint, \(48, 32\) in the "
                                          r"model; blocks/0/mlp/w_gate: \(32, 64\) in the checkpoint, \(32, 48\)"):
        _start(_config(section, train__init_from=str(tmp_path / "imported")), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"holds no parameters to start from"):
        _start(_config(section, train__init_from=str(tmp_path / "hf")), tmp_path / "run")
    with pytest.raises(ConfigError, match=r"config.train.init_from must be a path .*got None"):
        _start(_config(section, train__init_from=None), tmp_path / "run")


def test_the_command_line_reports_refusals_without_a_traceback(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**TINY_LLAMA), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "architectures": ["BertForMaskedLM"]}))
    with pytest.raises(SystemExit, match=r"error: unsupported architecture \['BertForMaskedLM'\]"):
        main(["import", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])


def test_import_copies_the_tokenizer_and_the_written_config_uses_it(tmp_path):
    hf_model(transformers.LlamaForCausalLM, transformers.LlamaConfig(**{**TINY_LLAMA, "vocab_size": 384}),
             tmp_path / "hf")
    bpe = train_bpe([f"def f{i}(x): return x * {i}\n" for i in range(50)], 300, str(tmp_path / "hf" / "tokenizer.json"))
    main(["import", "--hf_dir", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")])
    spec = importlib.util.spec_from_file_location("finetune_config", tmp_path / "imported" / "config.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.get_config().data.tokenizer == str(tmp_path / "imported")
    copied = make_tokenizer(str(tmp_path / "imported"))
    assert copied.encode("def g(y):") == bpe.encode("def g(y):") and copied.eos_id == bpe.eos_id
