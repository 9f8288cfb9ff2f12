"""RssSampler sees a transient allocation that is gone by the end of the block."""

import time

import torch

from moequant.runinfo import RssSampler, current_rss_bytes, return_free_memory


def test_sampler_catches_a_transient_peak():
    return_free_memory()
    base = current_rss_bytes()
    with RssSampler(interval=0.005) as s:
        t = torch.ones(256 << 20, dtype=torch.uint8)  # 256 MiB, touched
        deadline = time.monotonic() + 10.0  # on a loaded machine the sampler thread may wait for a core
        while s.peak_bytes < base + (200 << 20) and time.monotonic() < deadline:
            time.sleep(0.01)
        del t
        # Where glibc served the block from its heap rather than its own mapping (the suite's earlier imports
        # can change the mmap threshold), the pages go back to the OS at the trim the product also does.
        return_free_memory()
        time.sleep(0.05)
    assert current_rss_bytes() < base + (128 << 20)  # the block freed it
    assert s.peak_bytes >= base + (200 << 20)  # and the sampler saw it
