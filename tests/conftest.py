"""Test set-up: offline hub, two threads, the shared model builders importable."""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402

# tiny models: one thread avoids thread start-up and contention costs that dominate at this size
torch.set_num_threads(1)
