"""eval/: benchmark registry, metrics, evaluate_rows, the evaluate CLI (resume, refusal) and scripts/compare.py.

Offline and fast: tiny randomly initialised students built from assets/toy/student_config.json (they
never write \\boxed{}, so extraction failures are counted, not crashes) and a few rows per benchmark.
"""

import itertools
import json
import re
import types
from pathlib import Path

import pytest
import torch

import common.evaluation as evaluation
import eval.evaluate as ev
from common.errors import BadInput
from common.models import load_model, load_tokenizer
from common.toy import toy_config_path
from eval.benchmarks import BENCHMARKS, PAPER_BENCHMARKS, BenchmarkError, load_benchmark, resolve_names
from eval.table import markdown_table
from scripts import compare

STUDENT = str(toy_config_path("student"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode fastest on one thread (a second one only adds synchronisation)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def student():
    return load_model(STUDENT, seed=0, trainable=False), load_tokenizer(STUDENT)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def cli_args(out_dir, **overrides) -> ev.Args:
    values = {"model_name_or_path": STUDENT, "benchmarks": "toy,aime24", "limit": 3, "max_new_tokens": 8,
              "output_dir": str(out_dir), "batch_size": 8}
    values.update(overrides)
    return ev.Args(**values)


# ----------------------------------------------------------------------------- registry


def test_shipped_benchmarks_load_with_their_counts(offline):
    for name in [n for n in BENCHMARKS if BENCHMARKS[n].get("shipped", True)]:
        rows, source = load_benchmark(name)
        assert len(rows) == BENCHMARKS[name]["n_rows"], name
        assert len({r["id"] for r in rows}) == len(rows) and all(r["problem"] and r["answer"] for r in rows)
    assert resolve_names("all") == list(PAPER_BENCHMARKS) and BENCHMARKS["olympiadbench"]["n_rows"] == 674


def test_unknown_benchmark_lists_valid_names(capsys):
    with pytest.raises(BenchmarkError, match="unknown benchmark.*'foo'.*valid names: all, math500.*aime24"):
        resolve_names("math500,foo")
    with pytest.raises(SystemExit) as e:
        ev.cli(["--model_name_or_path", STUDENT, "--benchmarks", "foo"])
    assert e.value.code == 2 and re.search("error: unknown benchmark.*valid names", capsys.readouterr().err)


def test_missing_data_offline_says_where_and_how(offline, tmp_path):
    with pytest.raises(BenchmarkError) as err:
        load_benchmark("math500", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "math500.jsonl") in msg and "HuggingFaceH4/MATH-500" in msg and "HF_DATASETS_OFFLINE" in msg
    with pytest.raises(BenchmarkError, match=r"gsm8k\.jsonl \(this benchmark is not shipped.*openai/gsm8k.*Fix: unset"):
        load_benchmark("gsm8k", tmp_path)


def test_row_count_is_asserted(offline, tmp_path):
    lines = [json.dumps({"id": f"m{i}", "problem": "1+1?", "answer": "2"}) for i in range(3)]
    (tmp_path / "math500.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(BenchmarkError, match=r"math500: expected 500 rows, got 3 from .*math500\.jsonl"):
        load_benchmark("math500", tmp_path)


# ----------------------------------------------------------------------------- metrics


def test_pass_at_k_matches_brute_force():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert evaluation.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_benchmark_metrics_on_known_records():
    correct = [[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]]  # 3 problems x 4 samples
    records = [{"correct": bool(v), "status": "ok" if v else ("no_answer" if p == 1 else "ok"), "extract_method":
                "none" if p == 1 else "boxed", "finish_reason": "length" if p == 1 else "stop", "repetitive_zlib": False,
                "repetitive_ngram": p == 1, "n_tokens": 10 * (p + 1)} for p, row in enumerate(correct) for v in row]
    m = evaluation.benchmark_metrics(records, 4)
    assert m["acc"] == pytest.approx(5 / 12) and m["pass@1"] == pytest.approx(m["acc"])
    per_run = torch.tensor(correct, dtype=torch.float64).mean(0)
    assert m["acc_std"] == pytest.approx(float(per_run.std()))  # ddof = 1
    assert m["pass@4"] == pytest.approx(2 / 3) and set(k for k in m if k.startswith("pass@")) == {"pass@1", "pass@2", "pass@4"}
    assert m["no_answer_frac"] == m["truncated_frac"] == m["repetition_frac"] == m["method_none_frac"] == pytest.approx(1 / 3)
    assert m["len_mean"] == pytest.approx(20.0)


# ----------------------------------------------------------------------------- evaluate_rows


def test_model_that_never_boxes_counts_failures(student, offline):
    model, tokenizer = student
    rows = load_benchmark("toy")[0][:4]
    metrics, samples = ev.evaluate_rows(model, tokenizer, rows, n_samples=2, greedy=False, temperature=1.0,
                                        max_new_tokens=12, batch_size=8, seed=3)
    assert len(samples) == 8 and [(s["row_index"], s["sample_index"]) for s in samples] == [(i, j) for i in range(4) for j in range(2)]
    assert metrics["acc"] == 0.0 and metrics["pass@2"] == 0.0 and metrics["method_boxed_frac"] == 0.0
    assert metrics["no_answer_frac"] == pytest.approx(sum(s["status"] == "no_answer" for s in samples) / 8)
    assert all(s["extract_method"] in ("none", "last_number", "answer_is", "final_answer") for s in samples)
    _, again = ev.evaluate_rows(model, tokenizer, rows, n_samples=2, greedy=False, temperature=1.0,
                                max_new_tokens=12, batch_size=8, seed=3)
    assert [s["response"] for s in again] == [s["response"] for s in samples]  # a seed fixes the samples
    with pytest.raises(ValueError, match="greedy"):
        ev.evaluate_rows(model, tokenizer, rows, n_samples=2, greedy=True)


def test_sharded_ranks_partition_rows_and_match_one_process(student, monkeypatch):
    """Each rank evaluates rows rank, rank + R, ...; gathered, they equal the single-process result."""
    model, tokenizer = student
    rows = load_benchmark("toy")[0][:5]
    full_metrics, full = ev.evaluate_rows(model, tokenizer, rows, max_new_tokens=6, batch_size=8)
    monkeypatch.setattr("accelerate.utils.gather_object", lambda records: records)  # one rank's view: its shard
    gathered = []
    for rank in range(2):
        fake = types.SimpleNamespace(process_index=rank, num_processes=2, unwrap_model=lambda m: m)
        _, part = ev.evaluate_rows(model, tokenizer, rows, max_new_tokens=6, batch_size=8, accelerator=fake)
        assert sorted({s["row_index"] for s in part}) == list(range(rank, 5, 2))
        gathered += part
    gathered.sort(key=lambda s: (s["row_index"], s["sample_index"]))
    assert [s["response"] for s in gathered] == [s["response"] for s in full]  # greedy: sharding changes nothing
    assert evaluation.benchmark_metrics(gathered, 1) == full_metrics


# ----------------------------------------------------------------------------- CLI: outputs, resume, refusal


def test_cli_writes_results_and_resumes_after_interruption(offline, tmp_path, monkeypatch):
    real = ev.evaluate_rows
    calls = []

    def interrupted(*args, desc="eval", **kwargs):
        calls.append(desc)
        if desc == "aime24":
            raise KeyboardInterrupt  # the run dies while evaluating the second benchmark
        return real(*args, desc=desc, **kwargs)

    monkeypatch.setattr(ev, "evaluate_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ev.main(cli_args(tmp_path))
    toy_result = tmp_path / "toy" / "result.json"
    assert toy_result.is_file() and not (tmp_path / "aime24" / "result.json").exists()
    stamp = (toy_result.stat().st_mtime_ns, toy_result.read_text())

    calls.clear()
    monkeypatch.setattr(ev, "evaluate_rows", lambda *a, desc="eval", **k: calls.append(desc) or real(*a, desc=desc, **k))
    results = ev.main(cli_args(tmp_path))
    assert calls == ["aime24"], "a finished benchmark was evaluated again"
    assert (toy_result.stat().st_mtime_ns, toy_result.read_text()) == stamp
    assert set(results["benchmarks"]) == {"toy", "aime24"} and results["commit"] and results["date"]
    assert results["settings"]["max_new_tokens"] == 8 and results["settings"]["temperature"] == 0.0
    toy = results["benchmarks"]["toy"]
    assert toy["metrics"]["no_answer_frac"] + toy["metrics"]["acc"] <= 1.0 and toy["data_sha256"]
    lines = [json.loads(x) for x in (tmp_path / "aime24" / "samples.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and {"extract_method", "extracted", "status", "correct", "finish_reason"} <= set(lines[0])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["benchmarks"].keys() == results["benchmarks"].keys()
    assert (tmp_path / "results.md").read_text() == markdown_table([on_disk])


def test_results_folder_from_other_settings_is_refused(offline, tmp_path):
    ev.main(cli_args(tmp_path, benchmarks="toy"))
    before = {p: p.read_text() for p in tmp_path.rglob("*.json*")}
    with pytest.raises(ev.ResultsFolderError, match=r"different settings:\n  max_new_tokens: folder has 8, this run has 9"):
        ev.main(cli_args(tmp_path, benchmarks="toy,aime24", max_new_tokens=9))
    assert {p: p.read_text() for p in tmp_path.rglob("*.json*")} == before
    assert not (tmp_path / "aime24").exists()


def test_paper_preset_fills_defaults_only():
    args = ev.apply_preset(ev.Args(model_name_or_path="m", preset="paper", top_p=0.9))
    assert (args.temperature, args.top_p, args.max_new_tokens) == (0.6, 0.9, 8192)
    assert [ev.n_samples_for(args, n) for n in PAPER_BENCHMARKS] == [1, 1, 1, 32, 32, 32]
    assert ev.n_samples_for(ev.apply_preset(ev.Args(model_name_or_path="m", preset="paper", n_samples=4)), "aime24") == 4


# ----------------------------------------------------------------------------- table and compare.py


def fake_results(label, accs, **settings):
    return {"model": f"/m/{label}", "label": label, "settings": {"temperature": 0.6, **settings},
            "benchmarks": {name: {"metrics": {"acc": acc}} for name, acc in accs.items()}}


def test_markdown_table_format():
    a = fake_results("base", {"aime24": 0.1, "math500": 0.5, "toy": 0.25})
    b = fake_results("SFT|x", {"math500": 0.7, "aime24": 0.2})
    assert markdown_table([a, b]) == (
        "| model | MATH500 | AIME24 | Toy | average |\n"
        "|---|---:|---:|---:|---:|\n"
        "| base | 50.0 | 10.0 | 25.0 | 28.3 |\n"
        "| SFT/x | 70.0 | 20.0 | – | – |\n")


def test_compare_merges_results(tmp_path, capsys):
    paths = []
    for label, accs, temp in (("b", {"aime24": 0.1, "amc23": 0.3}, 0.6), ("s", {"aime24": 0.2, "amc23": 0.4}, 1.0)):
        (tmp_path / label).mkdir()
        (tmp_path / label / "results.json").write_text(json.dumps(fake_results(label, accs, temperature=temp)))
        paths.append(str(tmp_path / label))
    out = tmp_path / "table.md"
    text = compare.main([*paths[:1], str(Path(paths[1]) / "results.json"), "--labels", "base,OPD", "--out", str(out)])
    assert text.startswith("| model | AMC23 | AIME24 | average |\n|---|---:|---:|---:|\n| base | 30.0 | 10.0 | 20.0 |\n"
                           "| OPD | 40.0 | 20.0 | 30.0 |\n")
    assert "OPD: different settings: temperature=1.0 (vs 0.6)" in text
    assert out.read_text() == text and capsys.readouterr().out == text
    with pytest.raises(BadInput, match="no results.json"):  # the script's error_boundary: one `error:` line, exit 2
        compare.main([str(tmp_path / "missing")])
