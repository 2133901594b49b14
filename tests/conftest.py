"""Shared pytest setup: tests marked `cuda` skip cleanly where no usable GPU is present."""

import pytest


def pytest_collection_modifyitems(config, items):
    cuda_items = [i for i in items if "cuda" in i.keywords]
    if not cuda_items:
        return
    from crystal.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}")
        for item in cuda_items:
            item.add_marker(skip)
