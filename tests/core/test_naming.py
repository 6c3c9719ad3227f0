"""The one model-name rule, shared by export and the server."""

from __future__ import annotations

import pytest

from stageformer.core.naming import check_model_name, is_model_name


@pytest.mark.parametrize("name", ["digits", "_best", "poolformer_s12.int8", "a-b", "A1", "x" * 128])
def test_names_a_url_segment_and_a_directory_can_carry(name: str) -> None:
    assert is_model_name(name) and check_model_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "-flag", "a/b", "..", "a b", "x" * 129, "é"])
def test_names_that_are_refused_say_how_to_fix_them(name: str) -> None:
    assert not is_model_name(name)
    with pytest.raises(ValueError, match="use at most 128 letters, digits"):
        check_model_name(name)
