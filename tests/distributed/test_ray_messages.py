"""The Ray retriever's messages: how to get Ray, and what to do about an address nothing answers at."""

from __future__ import annotations

import socket
import sys

import pytest

from ragkit.distributed import ray_service
from ragkit.distributed.errors import RetrievalUnavailableError


def test_a_missing_ray_names_the_package_not_an_unpublished_distribution(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'ray\[default\]'") as error:
        ray_service._import_ray()
    # ragkit-torch is installed from a clone of the repository; it is not on PyPI.
    assert "pip install 'ragkit-torch" not in str(error.value)
    assert "pip install -e '.[distributed]'" in str(error.value)


def test_an_unreachable_address_says_how_to_start_a_local_ray():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(
        RetrievalUnavailableError, match=rf"Cannot reach the Ray cluster at '127.0.0.1:{port}'"
    ) as error:
        ray_service._check_reachable(f"127.0.0.1:{port}", 1.0)
    # The command line has no address=None: the message names the flag to leave out.
    assert "omit --ray_address" in str(error.value)
