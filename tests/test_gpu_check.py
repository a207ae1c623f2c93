"""scripts/gpu_check.py's CPU dry run: the same items, subprocesses, deadlines and outputs as on the GPU (tiny widths,
the real vocabulary). Kept small for CI: a few items, one forced per-item timeout, one global-deadline skip."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dry_run(out: Path, *extra: str) -> list[dict]:
    cmd = [sys.executable, str(ROOT / "scripts/gpu_check.py"), "--dry_run", "--out", str(out), *extra]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True, text=True)
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_dry_run_writes_results_table_and_probe(tmp_path):
    rows = dry_run(tmp_path, "--items", "a_bf16,d,f")
    by = {r["item"]: r for r in rows}
    assert [r["item"] for r in rows] == ["a_bf16", "d", "f"]  # priority order, one line per item
    a = by["a_bf16"]
    assert a["status"] == "ok", a
    assert a["shape"] == "2x2x48" and len(a["steps"]) == 2 and a["tokens"] > 0 and 0 < a["stopped"] < 4
    assert all(s["loss"] == s["loss"] and s["update_s"] > 0 for s in a["steps"])  # finite, timed
    assert by["d"]["status"] == "skipped" and by["d"]["reason"]
    assert by["f"]["status"] in ("ok", "skipped")  # skipped (with its reason) where bitsandbytes does not import
    env = json.loads((tmp_path / "env.json").read_text())
    assert {"torch", "transformers", "accelerate", "free_disk_GiB", "cuda_available"} <= env.keys()
    table = (tmp_path / "table.md").read_text()
    assert all(f"| {name} | {by[name]['status']} |" in table for name in by)
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and not any(f.is_dir() for f in files)  # no checkpoint, no final/


def test_dry_run_per_item_timeout_and_global_deadline(tmp_path):
    rows = dry_run(tmp_path, "--items", "c,b", "--item_timeout", "3", "--deadline", "6")
    assert rows[0]["item"] == "c" and rows[0]["status"] == "timeout" and rows[0]["wall_s"] < 6  # killed at its limit
    assert rows[1]["item"] == "b" and rows[1]["status"] in ("skipped", "timeout", "ok")
    if rows[1]["status"] == "skipped":
        assert "deadline" in rows[1]["reason"]
