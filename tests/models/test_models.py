"""The model registry: building a model by name, and one clear error for an unknown one."""

from __future__ import annotations

import pytest

from fedmerge import ConfigError
from fedmerge.models import build_model


def test_unknown_model():
    with pytest.raises(ConfigError, match="model='resnet9000'"):
        build_model("resnet9000", (1, 8, 8), 10)
