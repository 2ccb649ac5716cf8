import os

# Never reach for a hub from the tests (and fail fast if something tries).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import torch  # noqa: E402

# The tests' tensors are small: one intra-op thread avoids oversubscribing a 2-core runner (and the
# subprocesses the sweep test launches), and makes timings steadier when something else is running.
torch.set_num_threads(1)
