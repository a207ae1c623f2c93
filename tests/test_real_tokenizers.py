"""Real tokenizers on CPU: the Qwen2.5 / DeepSeek-R1-Distill fixtures of tests/realtok.py, the teacher
compatibility check and the teacher-input builder on them, and plain AutoTokenizer / AutoModelForCausalLM
round trips of saved folders (toy and real vocabularies)."""

import dataclasses
import hashlib
import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, TokenizersBackend

from common.data import encode_prompts, render_prompt
from common.logprobs import completion_logps
from common.models import TeacherCompat, check_compatible, load_model, load_tokenizer, teacher_inputs
from common.toy import TOKENIZER_DIR, load_toy_tokenizer, toy_config_path
from tests.realtok import MODELS, QWEN25_INSTRUCT_SYSTEM, QWEN25_MATH_SYSTEM, real_models  # noqa: F401 (fixture)

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
ROWS = [{"problem": "Ann has 12 apples. She buys 7 more. How many apples does Ann have now?"},
        {"problem": "Compute $\\frac{3}{4} + \\sqrt{16}$."}]
TEXTS = [
    "Ann has 12 apples. 12 + 7 = 19. The answer is \\boxed{19}.",
    "Let $f(x) = 3x^2 - \\frac{1}{2}$; then $\\sqrt{2} \\le \\pi r^2$ and 2024 + 0.5 = 2024.5",
    "Привет, 世界! naïve café — 🙂\n\n  indented\tTab  ",
]
TOY_TOKENIZER_SHA256 = "f09d30929df4ce23fee2a6a81ea2307011da0579d4f2e706ba0b830707d23312"  # assets/toy/tokenizer/tokenizer.json


@pytest.fixture(scope="session")
def toks(real_models):
    return {kind: load_tokenizer(str(path)) for kind, path in real_models.items()}


@pytest.fixture(scope="session")
def nets(real_models):
    return {kind: load_model(str(path), trainable=False) for kind, path in real_models.items()}


# ----------------------------------------------------------------------------- the fixtures


def test_fixtures_load(toks, nets):
    for kind, tok in toks.items():
        rows, tie, _, _, bos, eos, gen = MODELS[kind]
        assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151665  # r1: LlamaTokenizerFast on disk
        assert nets[kind].get_output_embeddings().weight.shape[0] == rows
        assert nets[kind].config.tie_word_embeddings == tie
        assert (nets[kind].config.bos_token_id, nets[kind].config.eos_token_id) == (bos, eos)
        assert nets[kind].generation_config.eos_token_id == gen["eos_token_id"]
    assert (toks["math"].eos_token, toks["math"].eos_token_id, toks["math"].pad_token_id) == ("<|endoftext|>", 151643, 151643)
    assert (toks["instruct"].eos_token_id, toks["instruct"].pad_token_id) == (151645, 151643)
    r1 = toks["r1"]
    assert (r1.eos_token, r1.eos_token_id, r1.bos_token_id, r1.pad_token_id) == ("<｜end▁of▁sentence｜>", 151643, 151646, 151643)
    assert r1.convert_ids_to_tokens([151644, 151645, 151646, 151648, 151649, 151650]) == [
        "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>", "<think>", "</think>", "<|quad_start|>"]
    assert toks["math"].convert_ids_to_tokens([151644, 151646, 151648, 151664]) == [
        "<|im_start|>", "<|object_ref_start|>", "<|box_start|>", "<|file_sep|>"]


def test_chat_templates_render_as_published(toks):
    user = f"{ROWS[0]['problem']}\n{INSTRUCTION}"
    for kind, system in (("math", QWEN25_MATH_SYSTEM), ("instruct", QWEN25_INSTRUCT_SYSTEM)):
        text = render_prompt(toks[kind], ROWS[0]["problem"], "chat", INSTRUCTION)
        assert text == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert "\\boxed{}." in QWEN25_MATH_SYSTEM and "\\\\" not in QWEN25_MATH_SYSTEM
    text = render_prompt(toks["r1"], ROWS[0]["problem"], "chat", INSTRUCTION)
    assert text == f"<｜begin▁of▁sentence｜><｜User｜>{user}<｜Assistant｜><think>\n"
    r1_ids = encode_prompts(toks["r1"], ROWS, "chat", INSTRUCTION)
    assert all(p[:2] == [151646, 151644] and p[-3:] == [151645, 151648, 198] for p in r1_ids)
    math_ids = encode_prompts(toks["math"], ROWS, "chat", INSTRUCTION)
    assert all(p[:3] == [151644, 8948, 198] and p[-3:] == [151644, 77091, 198] for p in math_ids)  # system / assistant


def test_encode_decode_round_trip(toks):
    for text in TEXTS:
        ids = {kind: tok(text, add_special_tokens=False)["input_ids"] for kind, tok in toks.items()}
        assert ids["math"] == ids["instruct"] == ids["r1"]  # one BPE
        for kind, tok in toks.items():
            assert tok.decode(ids[kind]) == text
    for tok in toks.values():
        for token in (tok.eos_token, "<|im_start|>" if tok is not toks["r1"] else "<｜User｜>"):
            assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1


# ----------------------------------------------------------------------------- check_compatible


def test_math_student_instruct_teacher(toks, nets):
    compat = check_compatible(toks["math"], toks["instruct"], nets["math"], nets["instruct"], allow_teacher_template=True)
    assert isinstance(compat, TeacherCompat) and dataclasses.is_dataclass(compat)
    assert compat.vocab_limit == 151936  # 1.5B rows; the 7B teacher has 152,064
    assert not compat.same_template and compat.needs_teacher_inputs  # other default system prompt
    assert compat.stop_id_map == {} and compat.teacher_eos_id == 151645  # 151643 stops Qwen2.5-Instruct too
    assert compat.renamed == {}
    with pytest.raises(ValueError, match=r"chat templates differ .* allow_teacher_template=True"):
        check_compatible(toks["math"], toks["instruct"], nets["math"], nets["instruct"])  # a caller without teacher_inputs


def test_math_student_r1_teacher(toks, nets):
    compat = check_compatible(toks["math"], toks["r1"], nets["math"], nets["r1"], allow_teacher_template=True)
    assert compat.vocab_limit == 151936 and not compat.same_template
    assert compat.stop_id_map == {} and compat.teacher_eos_id == 151643  # <|endoftext|> == <｜end▁of▁sentence｜>
    assert set(compat.renamed) == set(range(151643, 151650))
    assert compat.renamed[151646] == ("<|object_ref_start|>", "<｜begin▁of▁sentence｜>")
    assert "7 special tokens renamed" in compat.describe()
    # a student that stops at <|im_end|>: for R1 that id is <｜Assistant｜>, so the teacher scores its own EOS there
    mapped = check_compatible(toks["math"], toks["r1"], nets["math"], nets["r1"], stop_ids=[151643, 151645],
                              allow_teacher_template=True)
    assert mapped.stop_id_map == {151645: 151643} and mapped.needs_teacher_inputs


def test_same_tokenizer_and_template(toks, nets):
    compat = check_compatible(toks["math"], toks["math"], nets["math"], nets["math"])
    assert compat.same_template and not compat.needs_teacher_inputs and compat.vocab_limit == 151936


def test_toy_versus_qwen_fails_clearly(toks, nets):
    toy_tok, toy = load_toy_tokenizer(), load_model(str(toy_config_path("student")), seed=0, trainable=False)
    with pytest.raises(ValueError, match=r"incompatible") as err:
        check_compatible(toy_tok, toks["math"], toy, nets["math"])
    assert "token id 0 decodes to '<|endoftext|>' for the student but '!' for the teacher" in str(err.value)
    with pytest.raises(ValueError, match=r"do not cover the student tokenizer's 151665 tokens"):
        check_compatible(toks["math"], toy_tok, nets["math"], toy)
    grown = load_toy_tokenizer()
    grown.add_tokens(["<|zz|>"])  # a teacher whose own prompts could hold an id its model lacks
    with pytest.raises(ValueError, match=rf"tokenizer has {len(grown)} tokens, more than its {len(toy_tok)} embedding rows"):
        check_compatible(toy_tok, grown, toy, toy)


def test_broken_id_mapping_names_the_id_and_both_strings(real_models, toks, nets):
    spec = json.loads((real_models["math"] / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = (piece for piece, i in vocab.items() if i in (1000, 1001))
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped, merges untouched
    broken = TokenizersBackend(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token="<|endoftext|>")
    broken.chat_template = toks["math"].chat_template
    first, second = toks["math"].decode([1000]), toks["math"].decode([1001])
    with pytest.raises(ValueError) as err:
        check_compatible(toks["math"], broken, nets["math"], nets["math"])
    assert f"token id 1000 decodes to {first!r} for the student but {second!r} for the teacher" in str(err.value)
    assert "2 of the student's 151665 ids differ" in str(err.value)


# ----------------------------------------------------------------------------- teacher_inputs


def test_teacher_inputs_layout():
    prompts = [[5, 6, 7], [8]]
    completion = torch.tensor([[1, 2, 9, 0], [3, 0, 0, 0], [4, 4, 4, 4], [1, 9, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ids, attn = teacher_inputs(prompts, completion, mask, pad_id=-1, num_samples=2, stop_id_map={9: 77})
    assert ids.tolist() == [[5, 6, 7, 1, 2, 77, -1], [5, 6, 7, 3, -1, -1, -1],
                            [-1, -1, 8, 4, 4, 4, 4], [-1, -1, 8, 1, 77, -1, -1]]
    assert attn.tolist() == [[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0]]
    with pytest.raises(ValueError, match="2 prompts x 1 samples != 4 completions"):
        teacher_inputs(prompts, completion, mask, pad_id=0)


def test_teacher_inputs_score_the_completion_under_the_teachers_own_prompt(toks, nets):
    student, teacher = toks["math"], toks["r1"]
    compat = check_compatible(student, teacher, nets["math"], nets["r1"], allow_teacher_template=True)
    answers = [" 12 + 7 = 19. The answer is \\boxed{19}.", " $\\frac{3}{4} + 4 = \\frac{19}{4}$"]
    seqs = [student(a, add_special_tokens=False)["input_ids"] + [student.eos_token_id] for a in answers for _ in range(2)]
    seqs[1] = seqs[1][:3]  # a truncated sample, no EOS
    T = max(map(len, seqs))
    completion = torch.full((len(seqs), T), student.pad_token_id)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, s in enumerate(seqs):
        completion[r, : len(s)], mask[r, : len(s)] = torch.tensor(s), 1
    teacher_prompts = encode_prompts(teacher, ROWS, "chat", INSTRUCTION)
    ids, attn = teacher_inputs(teacher_prompts, completion, mask, teacher.pad_token_id, num_samples=2,
                               stop_id_map=compat.stop_id_map)
    assert torch.equal(ids[:, -T:][mask.bool()], completion[mask.bool()])
    assert torch.equal(attn.sum(1), torch.tensor([len(teacher_prompts[r // 2]) + len(s) for r, s in enumerate(seqs)]))
    for r in range(len(seqs)):  # left-padded prompts in the teacher's format
        assert ids[r, : -T][attn[r, :-T].bool()].tolist() == teacher_prompts[r // 2]
    batched = completion_logps(nets["r1"], ids, attn, T, vocab_limit=compat.vocab_limit)["logps"]
    for r, s in enumerate(seqs):  # the same numbers as one unpadded sequence at a time
        alone = torch.tensor([teacher_prompts[r // 2] + s])
        ref = completion_logps(nets["r1"], alone, torch.ones_like(alone), len(s), vocab_limit=compat.vocab_limit)["logps"][0]
        torch.testing.assert_close(batched[r, : len(s)], ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- plain AutoTokenizer round trips


def _assert_round_trip(tok, model, folder):
    """Save with save_pretrained, reload with plain Auto* classes: same ids, same log-probs."""
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    tok2, model2 = AutoTokenizer.from_pretrained(str(folder)), AutoModelForCausalLM.from_pretrained(str(folder))
    prompts = [render_prompt(tok, r["problem"], "chat", INSTRUCTION) for r in ROWS]
    assert [render_prompt(tok2, r["problem"], "chat", INSTRUCTION) for r in ROWS] == prompts
    for text in TEXTS + prompts:
        for special in (True, False):
            assert tok2(text, add_special_tokens=special)["input_ids"] == tok(text, add_special_tokens=special)["input_ids"]
    assert (tok2.eos_token_id, tok2.pad_token_id, len(tok2)) == (tok.eos_token_id, tok.pad_token_id, len(tok))
    ids = torch.tensor([tok(prompts[0] + TEXTS[0], add_special_tokens=False)["input_ids"]])
    T = len(tok(TEXTS[0], add_special_tokens=False)["input_ids"])
    logps = [completion_logps(m.eval(), ids, torch.ones_like(ids), T)["logps"] for m in (model, model2)]
    assert torch.equal(logps[0], logps[1])
    return tok2


def test_toy_tokenizer_unchanged_and_round_trips_through_autotokenizer(tmp_path):
    assert hashlib.sha256((TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest() == TOY_TOKENIZER_SHA256
    tok = load_tokenizer(str(toy_config_path("student")))
    assert tok("Ann has 12 apples.")["input_ids"] == load_toy_tokenizer()("Ann has 12 apples.")["input_ids"]
    tok2 = _assert_round_trip(tok, load_model(str(toy_config_path("student")), seed=0), tmp_path / "m")
    assert type(tok2).__name__ == "TokenizersBackend"  # not Qwen2Tokenizer, whose regex splits differently


def test_old_toy_folder_still_loads_and_resaves_for_autotokenizer(tmp_path):
    old = tmp_path / "old"
    load_model(str(toy_config_path("student")), seed=0).save_pretrained(old)
    load_toy_tokenizer().save_pretrained(old)
    cfg = json.loads((old / "tokenizer_config.json").read_text())
    del cfg["auto_map"]  # as saved before the fix
    (old / "tokenizer_config.json").write_text(json.dumps(cfg))
    probe = "Ann has 12 apples. 12 + 7 = 19.<|im_end|>"
    assert AutoTokenizer.from_pretrained(str(old))(probe)["input_ids"] != load_toy_tokenizer()(probe)["input_ids"]
    tok = load_tokenizer(str(old))
    assert tok(probe)["input_ids"] == load_toy_tokenizer()(probe)["input_ids"]
    _assert_round_trip(tok, load_model(str(old), trainable=False), tmp_path / "new")


@pytest.mark.parametrize("kind", ["math", "r1"])
def test_real_vocab_folders_round_trip_through_autotokenizer(real_models, toks, kind, tmp_path):
    _assert_round_trip(toks[kind], load_model(str(real_models[kind]), trainable=False), tmp_path / kind)
