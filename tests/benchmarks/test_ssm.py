"""benchmarks/ssm.py --small: the selective-scan benchmark runs on the CPU (the fused kernel interpreted), writes its
JSON, and its cases compute one scan; listing an "ssd" case gives every implementation A of shape (d_inner, 1)."""

import json

import pytest

from benchmarks import ssm


def test_small_run_with_ssd_cases_writes_json_and_agrees(tmp_path):
    out = tmp_path / "ssm.json"
    result = ssm.main(["--small", "--implementations", "associative,sequential,fused,ssd,ssd_q8",
                       "--backward", "associative,ssd_q8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["small"] and saved["A_shape"] == [64, 1] and saved["results"] == result["results"]
    rows = {r["implementation"]: r for r in saved["results"]}
    assert list(rows) == ["associative", "sequential", "fused", "ssd", "ssd_q8"]
    for name, row in rows.items():
        assert row["fwd_s"] > 0 and row["rel_err_vs_first"] < 1e-2, (name, row)  # bf16 outputs of one scan
    assert rows["ssd_q8"]["fwd_bwd_s"] > 0 and max(rows["ssd_q8"]["grad_rel_err_vs_first"]) < 1e-2


def test_implementation_names():
    assert ssm.implementation("ssd_q16").keywords == {"implementation": "ssd", "chunk_size": 16}
    with pytest.raises(SystemExit, match="unknown implementation 'ssd16'"):
        ssm.implementation("ssd16")
