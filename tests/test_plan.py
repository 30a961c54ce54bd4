import pytest
import torch

from relaxrec_megatron.recursion import SharingPlan, init_shared, shared_init_sources
from relaxrec_megatron.recursion.plan import PlanError


def test_cycle_order_is_paper_eq2():
    plan = SharingPlan(6, 2, "cycle")
    assert plan.num_shared == 3
    assert plan.layout() == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert [plan.shared_index(l) for l in range(6)] == [l % 3 for l in range(6)]
    assert plan.tied_layers(1) == [1, 4]


def test_sequence_order_repeats_each_layer():
    plan = SharingPlan(6, 3, "sequence")
    assert plan.layout() == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert plan.tied_layers(1) == [3, 4, 5]
    for l in range(6):
        assert plan.unrolled_index(plan.shared_index(l), plan.loop_index(l)) == l


def test_early_exits_read_the_ends_of_cycle_loops():
    plan = SharingPlan(6, 3, "cycle")
    assert plan.exit_layers() == [1, 3, 5] and [plan.loop_end(l) for l in range(6)] == [None, 0, None, 1, None, 2]
    for no_exits in (SharingPlan(6, 3, "sequence"), SharingPlan(6, 1, "cycle")):
        with pytest.raises(PlanError, match="early exits need a CYCLE model with 2 or more loops"):
            no_exits.exit_layers()


@pytest.mark.parametrize(
    "layers, expected",
    [
        (18, [0, 2, 4, 6, 8, 11, 13, 15, 17]),  # Gemma 2B
        (22, [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21]),  # TinyLlama
        (16, [0, 2, 4, 6, 9, 11, 13, 15]),  # Pythia 1B
    ],
)
def test_stepwise_indices_of_the_paper_models(layers, expected):
    assert shared_init_sources(SharingPlan(layers, 2), "stepwise") == [[i] for i in expected]


def test_average_lower_upper_sources():
    cyc, seq = SharingPlan(8, 2, "cycle"), SharingPlan(8, 2, "sequence")
    assert shared_init_sources(cyc, "average") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert shared_init_sources(seq, "average") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert shared_init_sources(cyc, "lower") == [[0], [1], [2], [3]]
    assert shared_init_sources(cyc, "upper") == [[4], [5], [6], [7]]


def test_init_shared_is_the_mean():
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(init_shared([a, b]), (a + b) / 2)
    assert init_shared([a.bfloat16()]).dtype == torch.float32


@pytest.mark.parametrize("layers, loops", [(18, 4), (30, 4), (4, 0), (0, 1)])
def test_loops_must_divide_layers(layers, loops):
    with pytest.raises(PlanError):
        SharingPlan(layers, loops)


def test_error_names_valid_loop_counts():
    with pytest.raises(PlanError, match=r"choose one of \[1, 2, 3, 6, 9, 18\]"):
        SharingPlan(18, 4)
