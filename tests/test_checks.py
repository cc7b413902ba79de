"""lpt_peft.checks: the one integer check used at API boundaries."""

import numpy as np
import pytest
import torch

from lpt_peft.checks import as_int, check_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(3), torch.tensor(3)])
def test_integers_of_every_kind_are_accepted(value):
    assert check_int(value, "x") == 3 and type(check_int(value, "x")) is int


@pytest.mark.parametrize("value", [True, np.bool_(True), 3.0, "3", None, torch.tensor([3])])
def test_non_integers_are_refused(value):
    assert as_int(value) is None
    with pytest.raises(ValueError, match=r"^x must be an integer >= 1, got "):
        check_int(value, "x")


def test_bounds_and_hint_are_in_the_message():
    assert check_int(0, "rank", minimum=0, maximum=1) == 0
    with pytest.raises(ValueError, match=r"^rank must be an integer >= 0 and <= 1, got 2\. \(for num_replicas=2\)$"):
        check_int(2, "rank", minimum=0, maximum=1, hint="(for num_replicas=2)")
