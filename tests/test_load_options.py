"""common/models.py load options: a teacher's own dtype, attn_implementation, validated extra from_pretrained
kwargs; and the chunked distillation loss with a bf16 teacher beside an fp32 student (real-vocabulary fixtures)."""

import pytest
import torch

from common.logprobs import completion_hidden
from common.losses import aggregation_weights, chunked_divergence_loss
from common.models import ModelLoadError, check_attn_implementation, load_frozen, load_model, parse_model_kwargs
from common.toy import toy_config_path
from tests.realtok import real_models  # noqa: F401  (session fixture)


def test_attn_implementation_reaches_the_model(real_models):  # noqa: F811
    default = load_model(str(real_models["math"]), trainable=False)
    for attn in ("eager", "sdpa"):
        model = load_frozen(str(real_models["math"]), attn_implementation=attn)
        assert model.config._attn_implementation == attn
        random_init = load_model(str(toy_config_path("student")), attn_implementation=attn, seed=0)
        assert random_init.config._attn_implementation == attn
    # None / "" keep transformers' default, as before this option existed
    assert load_frozen(str(real_models["math"]), attn_implementation="").config._attn_implementation == \
        default.config._attn_implementation
    # eager and sdpa compute the same function
    ids = torch.tensor([[9707, 11, 1879, 0, 220, 16, 10, 16]])
    outs = [load_frozen(str(real_models["math"]), attn_implementation=a)(ids).logits for a in ("eager", "sdpa")]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-5)


def test_attn_implementation_is_checked_before_loading():
    with pytest.raises(ValueError, match="unknown attn_implementation 'flash'"):
        check_attn_implementation("flash")
    import importlib.util

    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        with pytest.raises(ValueError, match="flash_attention_2 needs"):
            load_model(str(toy_config_path("student")), attn_implementation="flash_attention_2")
    assert check_attn_implementation(None) is None and check_attn_implementation("") is None
    with pytest.raises(ModelLoadError, match="unknown attn_implementation"):  # one `error:` line in a run
        load_model("/no/such/folder", attn_implementation="flash")


def test_teacher_dtype_of_its_own(real_models):  # noqa: F811
    student = load_model(str(real_models["math"]), dtype="float32")
    teacher = load_frozen(str(real_models["instruct"]), dtype="bfloat16", device="cpu")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_model_kwargs_parse_and_validate():
    assert parse_model_kwargs(None) == {} and parse_model_kwargs("  ") == {} and parse_model_kwargs({}) == {}
    assert parse_model_kwargs('{"revision": "main", "use_cache": false}') == {"revision": "main", "use_cache": False}
    for spec, msg in (('{"revision": ', "not valid JSON"), ('["a"]', "must be a JSON object"),
                      ('{"dtype": "bfloat16"}', "'dtype' has its own option, use --dtype / --teacher_dtype"),
                      ('{"torch_dtype": "auto"}', "has its own option"),
                      ('{"load_in_4bit": true}', "--teacher_quantization"),
                      ('{"attn_implementation": "eager"}', "--attn_implementation"),
                      ({"bad key": 1}, "not a keyword name"), ({"x": object()}, "not a JSON value")):
        with pytest.raises(ValueError, match=msg):
            parse_model_kwargs(spec)


def test_model_kwargs_reach_from_pretrained(real_models, monkeypatch):  # noqa: F811
    model = load_frozen(str(real_models["math"]), model_kwargs='{"use_cache": false}')  # a config override
    assert model.config.use_cache is False
    # device_map: the model is placed by from_pretrained, not moved again by load_frozen
    model = load_frozen(str(real_models["math"]), device="meta", model_kwargs={"device_map": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="apply to from_pretrained .* is a config"):
        load_model(str(toy_config_path("student")), model_kwargs={"revision": "main"})
    seen = {}
    from transformers import AutoModelForCausalLM

    def fake_from_pretrained(name, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake_from_pretrained)
    with pytest.raises(OSError):
        load_frozen(str(real_models["math"]), "bfloat16", attn_implementation="eager",
                    model_kwargs={"revision": "abc123", "trust_remote_code": False})
    assert seen == {"revision": "abc123", "trust_remote_code": False, "dtype": torch.bfloat16, "attn_implementation": "eager"}


def test_chunked_loss_with_bf16_teacher_and_fp32_student(real_models):  # noqa: F811
    """The full-vocabulary distillation loss on real-vocabulary models (151,936 vs 152,064 rows): a bf16 teacher's
    hidden states and head beside an fp32 student's. Same value as with the fp32 teacher up to bf16 rounding;
    fp32 gradients for the student only."""
    torch.manual_seed(0)
    student = load_model(str(real_models["math"]), dtype="float32")
    teachers = {d: load_frozen(str(real_models["instruct"]), d) for d in ("float32", "bfloat16")}
    ids = torch.randint(0, 151_000, (2, 12))
    attn = torch.ones_like(ids)
    attn[1, :3] = 0  # left padding
    T = 6
    mask = torch.ones(2, T)
    mask[0, -2:] = 0
    weights = aggregation_weights(mask, "token_mean")
    results = {}
    for dtype, teacher in teachers.items():
        with torch.no_grad():
            h_t, w_t = completion_hidden(teacher, ids, attn, T)
        student.zero_grad(set_to_none=True)
        h_s, w_s = completion_hidden(student, ids, attn, T)
        assert h_t.dtype == w_t.dtype == getattr(torch, dtype) and h_s.dtype == torch.float32
        loss, values = chunked_divergence_loss(h_s, w_s, h_t, w_t, weights, kind="reverse_kl", chunk_size=4,
                                               vocab_limit=151_936)
        loss.backward()
        grad = w_s.grad if w_s.grad is not None else student.get_output_embeddings().weight.grad
        assert loss.dtype == values.dtype == torch.float32 and torch.isfinite(loss) and grad.dtype == torch.float32
        assert torch.all(values[mask == 0] == 0)
        results[dtype] = (float(loss.detach()), grad.clone())
    (l32, g32), (l16, g16) = results["float32"], results["bfloat16"]
    assert l16 == pytest.approx(l32, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(g32.flatten(), g16.flatten(), dim=0) > 0.99
    for kind in ("forward_kl", "jsd"):  # every divergence takes the mixed dtypes
        with torch.no_grad():
            h_t, w_t = completion_hidden(teachers["bfloat16"], ids, attn, T)
            h_s, w_s = completion_hidden(student, ids, attn, T)
            loss, _ = chunked_divergence_loss(h_s, w_s, h_t, w_t, weights, kind=kind, vocab_limit=151_936)
        assert torch.isfinite(loss)
