"""benchmarks/vision.py runs on the CPU with --small (its GPU figures come from the full run), writes its JSON and
says which PyTorch cases it skipped; its configs are valid at the paper shapes."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import vision
from jaxmodels.train.config import validate_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_small_run_writes_json_and_names_what_it_skipped(tmp_path):
    out = tmp_path / "vision.json"
    subprocess.run([sys.executable, "-m", "benchmarks.vision", "--small", "--cases", "roi_align,vit_b16",
                    "--out", str(out)], cwd=ROOT, check=True, capture_output=True, text=True,
                   env={**os.environ, "PYTHONPATH": ROOT})
    result = json.loads(out.read_text())
    assert set(result["cases"]) == {"roi_align", "vit_b16"} and result["small"]
    for case, r in result["cases"].items():
        ours = r["jax"]
        assert "error" not in ours, ours
        assert ours.get("median_s", ours.get("median_step_s")) > 0
        missing = vision.missing_modules(vision.NEEDS[case])
        if missing:
            assert r["torch"] == {"skipped": f"not installed: {', '.join(missing)}"}
        else:  # torch and its library are here: both ran and agree
            assert r["speedup_vs_torch"] > 0
            assert case != "roi_align" or r["max_abs_diff"] < 1e-4
    assert result["cases"]["vit_b16"]["jax"]["train_flops_per_example"] > 0


@pytest.mark.parametrize("case", ["swin_t", "vit_b16"])
def test_paper_shape_configs_are_valid(case):
    config = vision.model_config(case, 128, small=False)
    validate_config(config, num_devices=1)
    assert config.model.dtype == "bfloat16" and config.model.image_size == 224 and config.model.num_classes == 1000
