"""benchmarks/flash_attention.py --small: every section runs on the CPU (kernels interpreted) and writes its JSON."""

import json

from benchmarks import flash_attention


def test_small_run_writes_every_section(tmp_path):
    out = tmp_path / "flash.json"
    result = flash_attention.main(["--small", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["small"] and saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert {r["section"] for r in saved["rows"]} == {"sweep", "dense", "window", "sparse"}
    assert all("time_s" in r for r in saved["rows"]), [r for r in saved["rows"] if "error" in r]
    assert saved["best_configs"] == {"16": [[16, 16, 4, 2]] * 3}
    assert {s["section"] for s in saved["summary"]} == {"dense", "window", "sparse"}
