"""Fixtures shared by the test files."""

import pytest

from tests.daemon_helpers import small_trained_model
from tests.test_model import toy_text


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    """A small model trained once per test session on the toy grammar (tests.test_model.toy_text)."""
    return small_trained_model(tmp_path_factory.mktemp("model") / "m.pt", toy_text(400))
