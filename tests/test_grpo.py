"""methods/grpo.py: advantages and loss on hand-built tensors, end-to-end runs on a tiny toy policy that answers
\\boxed{1} or \\boxed{2} at random (so rewards vary within groups), exact resume, the reference KL, 2 processes."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import methods.grpo as grpo
from common.cli import parse
from common.data import COT_INSTRUCTION, encode_prompts, shuffled_indices
from common.losses import k3
from common.models import load_model
from common.toy import build_toy_world, load_toy_tokenizer, toy_config_path
from tests.method_runs import ENV
from tests.method_runs import run_method as run


# ----------------------------------------------------------------------------- pure functions

def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
    adv, zero = grpo.group_advantages_PG(rewards, "group")
    assert zero.tolist() == [False, True, False]
    s0, s2 = 0.5, (1 / 3) ** 0.5  # sample std (ddof 1) of (1, 0, 0, 0) and (0, 1, 1, 0)
    assert torch.allclose(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s0 + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4))
    assert torch.allclose(adv[2], torch.tensor([-0.5, 0.5, 0.5, -0.5]) / (s2 + 1e-4))
    adv_b, _ = grpo.group_advantages_PG(rewards, "batch")
    s_all = rewards.flatten().std()  # one std over the whole (global) batch
    assert torch.allclose(adv_b[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (s_all + 1e-4))
    adv_n, _ = grpo.group_advantages_PG(rewards, "none")  # Dr. GRPO: centred only
    assert torch.allclose(adv_n, torch.tensor([[0.75, -0.25, -0.25, -0.25], [0, 0, 0, 0], [-0.5, 0.5, 0.5, -0.5]]))
    for a in (adv, adv_b, adv_n):
        assert torch.allclose(a.sum(-1), torch.zeros(3), atol=1e-6)  # the group is its own baseline
    # equal non-binary rewards (a format bonus): mean-centring is not exactly 0 in floats; zero_std makes it so
    adv_f, zero_f = grpo.group_advantages_PG(torch.full((1, 3), 0.1), "group")
    assert zero_f.tolist() == [True] and torch.equal(adv_f, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="scale_rewards"):
        grpo.group_advantages_PG(rewards, "std")
    with pytest.raises(ValueError, match="at least 2"):
        grpo.group_advantages_PG(rewards[:, :1], "group")


def test_loss_clips_asymmetrically():
    logp = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5], [1.25], [0.78]]))
    old = torch.zeros(6, 1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0])
    loss, clipped, kl = grpo.grpo_loss_BT(logp, old, adv, eps_low=0.2, eps_high=0.28)
    # r = 1.25 with A > 0 is inside clip-higher (a symmetric 0.2 would clip it at 1.2); r = 0.78 with A < 0 is clipped at 0.8
    assert torch.allclose(loss.flatten(), torch.tensor([-1.28, -0.5, 1.5, 0.8, -1.25, 0.8]))
    assert clipped.flatten().tolist() == [True, False, False, True, False, True]
    assert torch.equal(kl, torch.zeros(6, 1))
    sym, _, _ = grpo.grpo_loss_BT(logp, old, adv, eps_low=0.2, eps_high=0.2)
    assert sym[4].item() == pytest.approx(-1.2)


def test_policy_gradient_is_the_expected_reward_gradient():
    """At r = 1, E_{y~pi}[grad of -A(y) r(y)] with A = R - E[R] is -grad E_pi[R], enumerated exactly over V outcomes."""
    torch.manual_seed(0)
    V = 6
    theta = torch.randn(V, dtype=torch.float64, requires_grad=True)
    reward = torch.tensor([1.0, 0, 0, 1, 0, 0], dtype=torch.float64)
    logp = torch.log_softmax(theta, -1)
    prob = logp.detach().exp()
    adv = reward - (prob * reward).sum()
    loss, _, _ = grpo.grpo_loss_BT(logp[:, None], logp.detach()[:, None], adv, 0.2, 0.28)
    (prob * loss[:, 0]).sum().backward()
    expected = -torch.autograd.grad((torch.softmax(theta, -1) * reward).sum(), theta)[0]
    assert torch.allclose(theta.grad, expected, atol=1e-12)


def test_k3_reference_term_by_hand():
    logp = torch.log(torch.tensor([[0.5, 0.2]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    adv = torch.zeros(1)
    loss, _, kl = grpo.grpo_loss_BT(logp, logp.detach(), adv, 0.2, 0.28, beta=0.5, ref_logp_BT=ref)
    r = 0.5  # pi_ref / pi_theta at the first token; k3 = r - 1 - log r >= 0, and 0 where the models agree
    assert torch.allclose(kl, torch.tensor([[r - 1 - torch.log(torch.tensor(r)).item(), 0.0]]))
    assert torch.allclose(kl, k3(logp, ref))
    loss.sum().backward()
    assert torch.allclose(logp.grad, torch.tensor([[0.5 * (1 - r), 0.0]]))  # d/dlogp of beta (e^(ref - logp) + logp)


def test_global_weights_single_process_equal_the_aggregation():
    from common.losses import aggregation_weights

    class _Acc:  # a one-process stand-in for the Accelerator
        num_processes, device = 1, "cpu"

        @staticmethod
        def reduce(x, op):
            return x

    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]]).float()
    for mode in grpo.AGGREGATIONS:
        assert torch.allclose(grpo.global_weights_BT(_Acc, mask, mode), aggregation_weights(mask, mode))


# ----------------------------------------------------------------------------- a tiny world with varying rewards

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 0.45M random toy student fine-tuned for a few seconds to answer "The answer is \\boxed{1}." or
    "...\\boxed{2}." at random; golds alternate 1 / 2, so a sample is correct with probability ~1/2."""
    root = tmp_path_factory.mktemp("grpo")
    data = build_toy_world(root / "toy", n_train=64, n_val=8, n_test=8, max_steps=2)
    for split in ("train", "val"):
        rows = [json.loads(x) for x in Path(data[split]).read_text().splitlines()]
        Path(data[split]).write_text("".join(json.dumps({**r, "answer": str(1 + i % 2)}) + "\n" for i, r in enumerate(rows)))
    tok = load_toy_tokenizer()
    torch.manual_seed(0)
    model = load_model(str(toy_config_path("student")), seed=0)
    rows = [json.loads(x) for x in Path(data["train"]).read_text().splitlines()][:8]
    prompts = encode_prompts(tok, rows, "chat", COT_INSTRUCTION)
    seqs, starts = [], []
    for p in prompts:
        for a in (1, 2):
            seqs.append(p + tok(f"The answer is \\boxed{{{a}}}.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            starts.append(len(p))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    labels = ids.masked_fill(attn == 0, -100)
    for i, s in enumerate(starts):
        labels[i, :s] = -100
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "student")
    tok.save_pretrained(root / "student")
    return {"student": root / "student", **data}


def grpo_args(world, run_dir, **overrides):
    args = {"run_dir": run_dir, "model_name_or_path": world["student"], "train_data": world["train"], "val_data": world["val"],
            "per_device_prompts": 4, "num_generations": 4, "max_completion_length": 16, "max_steps": 2, "eval_every": 0,
            "eval_samples": 4, "save_every": 0, "learning_rate": 1e-3, "rep_window_chars": 50, "rep_threshold": 3.0}
    args.update(overrides)
    return [x for k, v in args.items() for x in (f"--{k}", str(v))]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir):
    return [m for m in metrics(run_dir) if "train/loss" in m]


def params(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


REQUIRED = ["rollout/len_mean", "rollout/len_max", "rollout/truncated_frac", "rollout/repetition_frac", "rollout/eos_frac",
            "rollout/repeat_token_frac", "rollout/reward_mean", "rollout/correct_frac", "grpo/zero_std_frac", "grpo/clip_frac",
            "grpo/adv_abs_mean", "grpo/entropy", "train/loss", "train/grad_norm", "train/lr", "perf/step_s", "perf/rollout_s",
            "perf/reward_s", "perf/update_s", "perf/tokens_per_s", "alarm/truncation"]


def test_smoke_accelerate_launch_and_exact_resume(world, tmp_path):
    """4 steps through `accelerate launch` == 2 steps, then resume to 4 (params and logged losses identical)."""
    a, b = tmp_path / "a", tmp_path / "b"
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu", "methods/grpo.py",
                *grpo_args(world, a, max_steps=4, eval_every=2)])
    assert "reference" not in proc.stdout  # beta = 0: no reference model is loaded
    rows = train_rows(a)
    assert len(rows) == 4
    for key in REQUIRED:
        assert key in rows[0], key
        assert all(torch.isfinite(torch.tensor(r[key])) for r in rows), key
    assert "grpo/ref_kl" not in rows[0]
    assert any(0 < r["rollout/reward_mean"] < 1 and r["grpo/zero_std_frac"] < 1 for r in rows)  # a real learning signal
    assert any("eval/val/acc" in m for m in metrics(a))
    before, after = load_file(str(world["student"] / "model.safetensors")), params(a)
    for k in after:
        assert not torch.equal(before[k], after[k]), f"{k} did not change"

    run([sys.executable, "methods/grpo.py", *grpo_args(world, b, max_steps=2, eval_every=2)])
    proc = run([sys.executable, "methods/grpo.py", *grpo_args(world, b, max_steps=4, eval_every=2)])
    assert "resumed from" in proc.stdout
    pb = params(b)
    assert all(torch.equal(after[k], pb[k]) for k in after)
    for key in ("train/loss", "rollout/reward_mean", "grpo/zero_std_frac"):
        assert [r[key] for r in rows] == [r[key] for r in train_rows(b)], key


def test_reference_kl_and_the_other_options(world, tmp_path):
    """beta > 0 loads the reference and logs grpo/ref_kl; stored old log-probs over 2 epochs x 2 minibatches."""
    proc = run([sys.executable, "methods/grpo.py", *grpo_args(world, tmp_path / "run", beta=0.1, ppo_epochs=2, num_minibatches=2,
                                                              scale_rewards="none", aggregation="seq_mean_token_mean",
                                                              mask_truncated="true", format_reward=0.1, max_steps=2)])
    assert "reference" in proc.stdout
    rows = train_rows(tmp_path / "run")
    for r in rows:
        for key in ("grpo/ref_kl", "perf/ref_s", "train/loss", "grpo/clip_frac"):
            assert torch.isfinite(torch.tensor(r[key])), key
        assert r["grpo/ref_kl"] >= 0 and 1 <= r["grpo/updates"] <= 4
    # with a format bonus every well-formed answer earns at least 0.1
    assert all(r["rollout/reward_mean"] >= r["rollout/correct_frac"] for r in rows)


@pytest.mark.parametrize("flag, value, message", [
    ("scale_rewards", "std", "scale_rewards"), ("aggregation", "sum", "aggregation"), ("num_generations", 1, "num_generations"),
    ("epsilon_low", 1.5, "epsilon_low"), ("ref_quantization", "3bit", "ref_quantization"), ("ppo_epochs", 0, "ppo_epochs"),
])
def test_bad_inputs_are_clear_errors(world, tmp_path, flag, value, message, capsys):
    """Declared choices and ranges: refused by parse, one line naming the flag, exit status 2 (tests/test_bad_inputs.py)."""
    with pytest.raises(SystemExit) as e:
        grpo.main(parse(grpo.Args, grpo_args(world, tmp_path / "run", **{flag: value})))
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_two_processes_group_statistics_are_global(world, tmp_path):
    """2 ranks x P prompts: every rank holds the same global reward matrix, its own P whole groups (the global
    batch's rank-th slice), and the advantages / zero-std fraction a single process computes on that matrix
    (with the batch std, which is only right when taken over both ranks)."""
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    run_dir = tmp_path / "run"
    P, G = 2, 4
    proc = run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", "0",
                "--mixed_precision", "no", "--dynamo_backend", "no", "methods/grpo.py",
                *grpo_args(world, run_dir, per_device_prompts=P, num_generations=G, scale_rewards="batch", log_groups="true")], env=env)
    assert "2 process(es)" in proc.stdout and "replicas in sync across 2 ranks" in proc.stdout
    logged = {m["step"]: m for m in train_rows(run_dir)}
    n_prompts = len(Path(world["train"]).read_text().splitlines())
    spread = 0
    for line in (run_dir / "groups.jsonl").read_text().splitlines():
        rec = json.loads(line)
        views = sorted(rec["ranks"], key=lambda v: v["rank"])
        assert [v["rank"] for v in views] == [0, 1]
        glob = torch.tensor(views[0]["global_rewards"])
        assert glob.shape == (2 * P, G) and views[1]["global_rewards"] == views[0]["global_rewards"]
        assert torch.equal(torch.cat([torch.tensor(v["rewards"]) for v in views]), glob)  # rank-major, groups whole
        assert views[0]["prompt_idx"] + views[1]["prompt_idx"] == shuffled_indices(n_prompts, (rec["step"] - 1) * 2 * P, 2 * P, 0)
        adv, zero = grpo.group_advantages_PG(glob, "batch")  # what one process computes on the global batch
        for r, v in enumerate(views):
            assert torch.allclose(torch.tensor(v["adv"]), adv[r * P : (r + 1) * P], atol=1e-6)
            assert v["zero_std_frac"] == pytest.approx(float(zero.float().mean()))
        m = logged[rec["step"]]
        assert m["grpo/zero_std_frac"] == pytest.approx(float(zero.float().mean()))
        assert m["rollout/reward_mean"] == pytest.approx(float(glob.mean()))
        assert m["grpo/adv_abs_mean"] == pytest.approx(float(adv.abs().mean()), abs=1e-6)
        spread += int(glob.std() > 0)
    assert spread > 0  # the check is not vacuous: rewards varied
