import os

# Never reach for a hub from the tests (and fail fast if something tries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# The tests' tensors are small: one intra-op thread avoids oversubscribing a 2-core runner (and the
# subprocesses the sweep test launches), and makes timings steadier when something else is running.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A tiny random SD folder (superdiff.testing.tiny_sd_components), saved once for the CLI and app tests."""
    from superdiff.pipelines import SuperDiffPipeline
    from superdiff.testing import tiny_sd_components

    path = tmp_path_factory.mktemp("tiny-sd")
    SuperDiffPipeline(**tiny_sd_components()).save_pretrained(path)
    return str(path)
