"""RssSampler sees a transient allocation that is gone by the end of the block."""

import time

import torch

from moequant.runinfo import RssSampler, current_rss_bytes


def test_sampler_catches_a_transient_peak():
    base = current_rss_bytes()
    with RssSampler(interval=0.005) as s:
        t = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB, touched
        time.sleep(0.1)
        del t
        time.sleep(0.05)
    assert current_rss_bytes() < base + (128 << 20)  # the block freed it
    assert s.peak_bytes >= base + (200 << 20)  # and the sampler saw it
