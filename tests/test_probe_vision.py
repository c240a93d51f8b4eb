"""bench/probe_vision.py's linear probe: separable labels are found, random labels are not."""

import torch

from bench.probe_vision import probe


def test_probe_separable_vs_random_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = torch.bucketize(x[:, 0], torch.tensor([-0.5, 0.5]))  # 3 classes along one feature
    assert probe(x[:400], y[:400], x[400:], y[400:], 3) > 90.0  # chance is ~40%
    noise = torch.randint(0, 3, (600,), generator=g)
    assert probe(x[:400], noise[:400], x[400:], noise[400:], 3) < 50.0
