"""common/hub.py offline: the generated model card, --push_to_hub with only the hub calls mocked (HfApi.create_repo /
upload_folder), the start-up checks, and the wandb completions table (wandb disabled / a recording run)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

import common.hub as hub

CONFIG = {"run_dir": "runs/opd", "seed": 0, "model_name_or_path": "Qwen/Qwen2.5-Math-1.5B",
          "teacher_name_or_path": "/data/models/openthinker3-7b", "train_data": "open-r1/OpenR1-Math-220k:default:train",
          "golden_data": "data/openr1/opd.jsonl", "system_prompt": "", "learning_rate": 1e-6, "max_steps": 200}
FINAL = {"step": 200, "alarmed": False, "val": {"acc": 0.4125, "mean_length": 812.5, "truncated": 0.05}}


def _run_dir(tmp_path, method="opd"):
    run = tmp_path / "opd-run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "final" / "model.safetensors").write_bytes(b"\0" * 8)
    (run / "config.yaml").write_text(yaml.safe_dump({"method": method, **CONFIG}, sort_keys=False))
    (run / "final_eval.json").write_text(json.dumps(FINAL))
    return run


def test_model_card_content(tmp_path):
    path = hub.write_model_card(tmp_path, "opd", CONFIG, FINAL, repo_id="me/qwen-opd",
                                source_url="https://github.com/acme/stable-opd")
    text = path.read_text()
    head, body = text.split("---\n")[1], text.split("---\n", 2)[2]
    meta = yaml.safe_load(head)
    assert meta["base_model"] == "Qwen/Qwen2.5-Math-1.5B" and meta["datasets"] == ["open-r1/OpenR1-Math-220k"]
    assert meta["library_name"] == "transformers" and "opd" in meta["tags"]
    assert body.startswith("\n# qwen-opd\n") and "on-policy distillation" in body
    assert "[`methods/opd.py`](https://github.com/acme/stable-opd/blob/main/methods/opd.py)" in body
    assert "- teacher: `/data/models/openthinker3-7b`" in body
    assert "`open-r1/OpenR1-Math-220k:default:train`, `data/openr1/opd.jsonl`" in body
    assert "| acc | mean_length | truncated |" in body and "| 0.4125 | 812.5 | 0.05 |" in body
    assert yaml.safe_load(body.split("```yaml\n")[1].split("```")[0]) == CONFIG  # the resolved config, whole
    assert "arXiv:2604.08527" in body and "@article{" in body
    from huggingface_hub import ModelCard

    card = ModelCard.load(path)  # the hub library reads our metadata
    assert card.data.base_model == "Qwen/Qwen2.5-Math-1.5B"


def test_model_card_without_repo_url_or_hub_ids(tmp_path):
    cfg = {**CONFIG, "model_name_or_path": "runs/sft/final", "train_data": "data/toy/train.jsonl", "golden_data": ""}
    text = hub.model_card("sft", cfg, {}, source_url="")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in meta and "datasets" not in meta  # local paths are no hub metadata
    assert "`methods/sft.py` of stable-opd" in text and "(no final evaluation was run)" in text


class _Recorder:
    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def install(self, monkeypatch):
        from huggingface_hub import HfApi, RepoUrl

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", repo_id, kw))
            full = repo_id if "/" in repo_id else f"me/{repo_id}"  # the hub puts a bare name under the token's user
            return RepoUrl(f"https://huggingface.co/{full}")

        def upload_folder(api, **kw):
            if self.fail:
                raise ConnectionError("no route to host")
            readme = Path(kw["folder_path"]) / "README.md"
            self.calls.append(("upload_folder", kw["repo_id"], {**kw, "readme": readme.read_text()}))

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


def test_push_run_writes_card_then_uploads(tmp_path, monkeypatch):
    rec = _Recorder().install(monkeypatch)
    run = _run_dir(tmp_path)
    url = hub.push_run(run, "me/qwen-opd", private=True)
    assert url == "https://huggingface.co/me/qwen-opd"
    (c_name, c_repo, c_kw), (u_name, u_repo, u_kw) = rec.calls
    assert (c_name, c_repo, c_kw) == ("create_repo", "me/qwen-opd", {"private": True, "repo_type": "model", "exist_ok": True})
    assert u_name == "upload_folder" and u_repo == "me/qwen-opd" and u_kw["folder_path"] == str(run / "final")
    assert "# qwen-opd" in u_kw["readme"] and "0.4125" in u_kw["readme"]  # the card was there before the upload
    assert (run / "final" / "README.md").is_file()


def test_push_failures_are_clear(tmp_path, monkeypatch):
    _Recorder(fail=True).install(monkeypatch)
    run = _run_dir(tmp_path)
    with pytest.raises(hub.HubError, match=r"failed \(ConnectionError: no route to host\); the model is saved there: "
                                           r"retry with `python -m common.hub"):
        hub.push_run(run, "me/x")
    with pytest.raises(hub.HubError, match="no saved model"):
        hub.push_run(tmp_path / "nothing", "me/x")


def test_push_final_main_process_only(tmp_path, monkeypatch):
    rec = _Recorder().install(monkeypatch)
    run = _run_dir(tmp_path)
    args = SimpleNamespace(run_dir=str(run), push_to_hub=True, hub_model_id="", hub_private=False)
    acc = SimpleNamespace(is_main_process=False, print=print)
    assert hub.push_final(acc, args, run, FINAL) is None and rec.calls == []
    assert hub.push_final(SimpleNamespace(is_main_process=True, print=print), SimpleNamespace(run_dir=str(run), push_to_hub=False), run) is None
    url = hub.push_final(SimpleNamespace(is_main_process=True, print=print), args, run, FINAL)
    assert url.endswith("/me/opd-run") and rec.calls[0][1] == "opd-run"  # default repo id: the run folder's name
    assert rec.calls[1][1] == "me/opd-run"
    hub.main([str(run), "org/other", "--private"])  # the later-push command line
    assert rec.calls[-2][1:] == ("org/other", {"private": True, "repo_type": "model", "exist_ok": True})


def test_check_push_to_hub(tmp_path, monkeypatch):
    args = SimpleNamespace(run_dir="runs/grpo", push_to_hub=True, hub_model_id="me/model")
    hub.check_push_to_hub(SimpleNamespace(run_dir="x", push_to_hub=False))  # not asked: nothing to check
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE=1"):
        hub.check_push_to_hub(args)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(ValueError, match="needs a Hugging Face token"):
        hub.check_push_to_hub(args)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_fake")
    hub.check_push_to_hub(args)
    for bad in ("a/b/c", "me/has space", "-x"):
        with pytest.raises(ValueError, match="expected `name` or `org/name`"):
            hub.check_push_to_hub(SimpleNamespace(**{**vars(args), "hub_model_id": bad}))


ROWS = [{"prompt": "1+1?", "completion": "\\boxed{2}", "reward": 1.0, "advantage": 0.87, "finish": "stop", "length": 4},
        {"prompt": "1+1?", "completion": "3 3 3", "reward": 0.0, "advantage": -0.87, "finish": "length"}]


def test_completions_table():
    table = hub.completions_table(ROWS, step=7)
    assert table.columns == ["step", "prompt", "completion", "reward", "advantage", "finish", "length"]
    assert table.data[0] == [7, "1+1?", "\\boxed{2}", 1.0, 0.87, "stop", 4]
    assert table.data[1][-1] is None  # a missing key is an empty cell


def test_log_completions_only_to_wandb():
    import wandb

    class _Run:
        def __init__(self):
            self.logged = []

        def log(self, data, step=None):
            self.logged.append((data, step))

    run = _Run()
    wandb_tracker = SimpleNamespace(name="wandb", tracker=run)
    acc = SimpleNamespace(is_main_process=True, trackers=[SimpleNamespace(name="tensorboard", tracker=None), wandb_tracker])
    assert hub.log_completions(acc, ROWS, step=3)
    (data, step), = run.logged
    assert step == 3 and isinstance(data["completions"], wandb.Table) and len(data["completions"].data) == 2
    assert not hub.log_completions(SimpleNamespace(is_main_process=True, trackers=[]), ROWS, 3)
    assert not hub.log_completions(SimpleNamespace(is_main_process=False, trackers=[wandb_tracker]), ROWS, 3)
    assert not hub.log_completions(acc, [], 3)
    disabled = wandb.init(mode="disabled")  # a real (disabled) wandb run takes the table
    try:
        assert hub.log_completions(SimpleNamespace(is_main_process=True, trackers=[SimpleNamespace(name="wandb", tracker=disabled)]),
                                   ROWS, 4)
    finally:
        disabled.finish()
