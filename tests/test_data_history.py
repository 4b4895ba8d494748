"""History sampling: JanusVLN's frame choice for step j, against hand-computed lists."""

import numpy as np
import pytest

from vlnflow.data.history import history_indices

# H = 8. j <= 8: every frame; j > 8: linspace(0, j, 9) truncated to int.
# j = 9:  0, 1.125, 2.25, 3.375, 4.5, 5.625, 6.75, 7.875, 9
# j = 37: 0, 4.625, 9.25, 13.875, 18.5, 23.125, 27.75, 32.375, 37
EXPECTED_NONE = {
    0: [0],
    5: [0, 1, 2, 3, 4, 5],
    8: [0, 1, 2, 3, 4, 5, 6, 7, 8],
    9: [0, 1, 2, 3, 4, 5, 6, 7, 9],
    37: [0, 4, 9, 13, 18, 23, 27, 32, 37],
}
EXPECTED_REPEAT_FIRST = {
    0: [0, 0, 0, 0, 0, 0, 0, 0, 0],
    5: [0, 0, 0, 0, 1, 2, 3, 4, 5],  # three pads + 0..5 = 9 frames
    8: [0, 1, 2, 3, 4, 5, 6, 7, 8],
    9: [0, 1, 2, 3, 4, 5, 6, 7, 9],
    37: [0, 4, 9, 13, 18, 23, 27, 32, 37],
}


@pytest.mark.parametrize("j", sorted(EXPECTED_NONE))
def test_no_padding_matches_hand_computed(j):
    assert history_indices(j, 8, "none") == EXPECTED_NONE[j]


@pytest.mark.parametrize("j", sorted(EXPECTED_REPEAT_FIRST))
def test_repeat_first_matches_hand_computed(j):
    got = history_indices(j, 8, "repeat_first")
    assert got == EXPECTED_REPEAT_FIRST[j]
    assert len(got) == 9


def test_matches_reference_linspace_for_long_episodes():
    for j in range(9, 500):
        assert history_indices(j, 8) == np.linspace(0, j, 9, dtype=int).tolist()


def test_other_history_lengths_and_bad_values():
    assert history_indices(3, 2) == [0, 1, 3]
    assert history_indices(1, 4, "repeat_first") == [0, 0, 0, 0, 1]
    assert history_indices(6, 0) == [6]
    with pytest.raises(ValueError, match="history.pad"):
        history_indices(3, 8, "mirror")
    with pytest.raises(ValueError, match="step"):
        history_indices(-1, 8)


def test_result_is_a_fresh_list():
    first = history_indices(20, 8)
    first.append(99)
    assert history_indices(20, 8) == [0, 2, 5, 7, 10, 12, 15, 17, 20]
