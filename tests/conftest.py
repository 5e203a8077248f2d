"""Test-suite settings. Tiny models run fastest on one thread, and CI's two cores are shared with pytest
itself: several OpenMP threads spinning on tiny matmuls made the suite 30x slower."""

import warnings

import torch

torch.set_num_threads(1)
warnings.filterwarnings("ignore", message=".*is deprecated and will be removed in version.*")
