"""Test environment: offline, no trackers, the repo root importable; shared tiny fixtures."""

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)

# The longest files first, so that under `pytest -n 2 --dist loadfile` (scripts/test.sh) no long file starts last
# and runs alone on one worker at the end (xdist's own order, most tests first, put the 2-test files of 20-30 s
# subprocess runs last). Measured per-file wall times on 2 cores, slowest first (durations, 3cd659b); files not
# named here follow, most tests first as xdist would order them. A stale list costs time, never a test.
SLOWEST_FILES = ["test_paper_recipes.py", "test_sft.py", "test_stable_opd.py", "test_opd.py", "test_lora.py",
                 "test_grpo.py", "test_gpu_check.py", "test_ablation_equivalence.py"]


def pytest_configure(config):
    if getattr(config.option, "dist", "no") == "loadfile":
        config.option.loadscopereorder = False  # keep the order below (pytest_collection_modifyitems)


def pytest_collection_modifyitems(config, items):
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)

    def rank(path: str):
        name = path.rsplit("/", 1)[-1]
        return (SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES), -len(files[path]))

    items[:] = [item for path in sorted(files, key=rank) for item in files[path]]
