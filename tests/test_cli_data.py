"""common/cli.py and common/data.py: config precedence, bad flags/configs, dataset validation."""

import json
from dataclasses import dataclass, field

import pytest

from common.cli import parse, save_config
from common.data import DataError, filter_by_length, load_rows, parse_field_map, render_prompt
from common.toy import load_toy_tokenizer


@dataclass
class _Args:
    lr: float = field(default=1e-3, metadata={"help": "learning rate"})
    steps: int = 10
    name: str = "x"
    flag: bool = False


def test_defaults_config_and_flag_precedence(tmp_path):
    assert parse(_Args, []) == _Args()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.5\nsteps: 3\n")
    assert parse(_Args, ["--config", str(cfg)]) == _Args(lr=0.5, steps=3)
    # a flag beats the config, whichever comes first
    assert parse(_Args, ["--steps", "7", f"--config={cfg}"]) == _Args(lr=0.5, steps=7)
    assert parse(_Args, ["--flag", "true", "--name", "y"]) == _Args(flag=True, name="y")


def test_unknown_flag_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as e:
        parse(_Args, ["--no_such_flag", "1"])
    assert e.value.code == 2
    assert "no_such_flag" in capsys.readouterr().err


@pytest.mark.parametrize("text, msg", [("lr: [1, 2\n", "not valid YAML"), ("- 1\n- 2\n", "expected a mapping"),
                                       ("lr: 1\nbogus: 2\n", "unknown field")])
def test_malformed_config(tmp_path, text, msg, capsys):
    """A bad --config is one line on stderr naming the file, exit status 2 (like a bad flag)."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    for argv, want in ((["--config", str(cfg)], msg), (["--config", str(tmp_path / "missing.yaml")], "not found")):
        with pytest.raises(SystemExit) as e:
            parse(_Args, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and want in err and ("bad.yaml" in err or "missing.yaml" in err), err
        assert len(err.strip().splitlines()) == 1, err


def test_saved_config_round_trips(tmp_path):
    args = _Args(lr=0.25, steps=4, name="z", flag=True)
    path = save_config(args, tmp_path / "run")
    assert parse(_Args, ["--config", str(path)]) == args


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_rows_jsonl_and_parquet(tmp_path):
    rows = [{"id": "a", "problem": "1+1?", "answer": 2, "solution": "1+1=2. \\boxed{2}"}, {"problem": "p", "answer": "x"}]
    got = load_rows(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert [r["answer"] for r in got] == ["2", "x"]  # answers are strings
    import datasets

    datasets.Dataset.from_list([{"q": "2+2?", "a": "4"}]).to_parquet(str(tmp_path / "d.parquet"))
    got = load_rows(str(tmp_path / "d.parquet"), fields=parse_field_map("problem=q,answer=a"))
    assert got[0]["problem"] == "2+2?" and got[0]["answer"] == "4"


def test_bad_rows_name_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing required field\(s\) \['answer'\]"):
        load_rows(path)
    path = _write_jsonl(tmp_path / "s.jsonl", [{"problem": "p", "answer": "1"}])
    with pytest.raises(DataError, match=r"s\.jsonl:1: .*solution"):
        load_rows(path, need_solution=True)
    (tmp_path / "j.jsonl").write_text('{"problem": "p", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"j\.jsonl:2: invalid JSON"):
        load_rows(str(tmp_path / "j.jsonl"))
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_rows(str(tmp_path / "e.jsonl"))
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DataError, match="field map"):
        parse_field_map("problem")


def test_render_prompt_chat_and_plain():
    tok = load_toy_tokenizer()
    chat = render_prompt(tok, "What is 1+1?", "chat", "Think.")
    assert chat == "<|im_start|>user\nWhat is 1+1?\nThink.<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "What is 1+1?", "plain", "") == "Question: What is 1+1?\nAnswer: "
    with pytest.raises(DataError, match="unknown prompt template"):
        render_prompt(tok, "x", "other")


def test_filter_by_length_skip_and_error():
    rows = [{"id": i} for i in range(4)]
    kept, skipped = filter_by_length(rows, [3, 9, 2, 10], 5, "skip")
    assert [r["id"] for r in kept] == [0, 2] and skipped == 2
    with pytest.raises(DataError, match=r"2 prompt\(s\) longer than max_prompt_length=5, e.g. row 1"):
        filter_by_length(rows, [3, 9, 2, 10], 5, "error")
    with pytest.raises(DataError, match="every prompt"):
        filter_by_length(rows, [9, 9, 9, 9], 5, "skip")


def test_shuffled_indices_resume_and_epochs():
    from common.data import shuffled_indices

    whole = shuffled_indices(10, 0, 25, seed=3)
    assert whole[:10] != list(range(10)) and sorted(whole[:10]) == list(range(10))  # one epoch = a permutation
    assert sorted(whole[10:20]) == list(range(10)) and whole[10:20] != whole[:10]  # a new shuffle per epoch
    assert shuffled_indices(10, 7, 18, seed=3) == whole[7:25]  # any cursor continues the same stream
