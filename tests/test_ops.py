"""Token ops against fixtures whose expected values are worked out by hand."""
import torch

from stagevar.ops.projection import cell_grid, cell_layout, cell_sum, random_cell_projection
from stagevar.ops.sampling import sample_top_k_top_p
from stagevar.ops.tokens import Selection, restore_tokens, select_tokens, upsample_hidden


def test_deviation_picks_tokens_farthest_from_the_mean():
    # 4 tokens, 1 channel: values 0, 1, 10, 2 -> mean 3.25; squared deviations 10.6, 5.1, 45.6, 1.6
    x = torch.tensor([[[0.0], [1.0], [10.0], [2.0]]])
    sel = select_tokens("deviation", x, (2, 2), 2, batch_size=1)
    assert sel.positions.tolist() == [[0, 2]]          # positions come back sorted


def test_deviation_reuses_conditional_choice_for_unconditional_rows():
    x = torch.zeros(2, 4, 1)
    x[0, 3] = 5.0     # conditional row: token 3 stands out
    x[1, 0] = 5.0     # unconditional row: token 0 would
    sel = select_tokens("deviation", x, (2, 2), 1, batch_size=1)
    assert sel.positions.tolist() == [[3], [3]]


def test_cell_grid_by_hand():
    cells, centres = cell_grid(4, 6, 2, 3)
    assert cells.view(4, 6).tolist() == [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]]
    # cell (0,0) spans rows 0-1, cols 0-1 -> centre (1, 1) = token 7
    assert centres.tolist() == [7, 9, 11, 19, 21, 23]
    assert all(cells[c] == i for i, c in enumerate(centres.tolist()))


def test_uneven_cells_have_centres_inside_them():
    cells, centres = cell_grid(13, 13, 5, 4)
    assert all(int(cells[c]) == i for i, c in enumerate(centres.tolist()))
    assert cells.max() == 19


def test_random_projection_rows_are_convex_combinations_of_their_cell():
    cells, _, members = cell_layout(4, 4, 2, 2)
    w = random_cell_projection(cells, members, batch_size=3, generator=torch.Generator().manual_seed(0))
    sums = torch.zeros(3, 4).index_add_(1, cells, w)
    assert torch.allclose(sums, torch.ones(3, 4))
    assert (w > 0).all()


def test_projection_of_a_cellwise_constant_input_is_that_constant():
    # if every token of a cell holds the same vector, the projected token equals it exactly
    cells, centres = cell_grid(4, 4, 2, 2)
    per_cell = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    x = per_cell[cells].unsqueeze(0)                     # (1, 16, 2)
    sel = select_tokens("random_projection", x, (4, 4), 4, batch_size=1, generator=torch.Generator().manual_seed(1))
    assert sel.positions.tolist() == [centres.tolist()]
    assert torch.allclose(sel.apply(x), per_cell.unsqueeze(0))


def test_gather_selection_by_hand():
    x = torch.arange(12.0).view(1, 4, 3)
    sel = Selection(torch.tensor([[1, 3]]))
    assert sel.apply(x).tolist() == [[[3.0, 4.0, 5.0], [9.0, 10.0, 11.0]]]


def test_restore_cached_update_and_cached_output_by_hand():
    sel = Selection(torch.tensor([[1]]))
    x_sub = torch.tensor([[[100.0]]])
    x_start = torch.tensor([[[1.0], [2.0], [3.0]]])
    prev_a = torch.tensor([[[10.0], [10.0], [10.0]]])
    prev_b = torch.tensor([[[15.0], [13.0], [11.0]]])
    upd = restore_tokens("cached_update", sel, x_sub, x_start, prev_a, prev_b)
    assert upd.flatten().tolist() == [1.0 + 5.0, 100.0, 3.0 + 1.0]
    out = restore_tokens("cached_output", sel, x_sub, x_start, prev_a, prev_b)
    assert out.flatten().tolist() == [15.0, 100.0, 11.0]


def test_upsample_hidden_of_constant_and_of_identity_size():
    prev = torch.full((2, 4, 3), 7.0)
    assert torch.allclose(upsample_hidden(prev, (2, 2), (3, 3)), torch.full((2, 9, 3), 7.0))
    x = torch.randn(1, 6, 2)
    assert torch.allclose(upsample_hidden(x, (2, 3), (2, 3)), x)


def test_greedy_sampling_returns_argmax_and_does_not_modify_input():
    logits = torch.tensor([[[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]]])
    before = logits.clone()
    assert sample_top_k_top_p(logits, top_k=1, generator=torch.Generator().manual_seed(0)).tolist() == [[1, 0]]
    assert torch.equal(logits, before)


def test_top_p_keeps_only_the_nucleus():
    # probabilities ~ [0.88, 0.12, ~0]: top_p 0.5 keeps only the first
    logits = torch.tensor([[[2.0, 0.0, -20.0]]]).repeat(1, 50, 1)
    out = sample_top_k_top_p(logits, top_p=0.5, generator=torch.Generator().manual_seed(0))
    assert (out == 0).all()


def test_cell_members_list_every_token_once_in_order():
    for h, w, gh, gw in ((4, 6, 2, 3), (13, 13, 5, 4), (16, 16, 7, 7), (3, 5, 1, 2)):
        cells, _, members = cell_layout(h, w, gh, gw)
        for i, row in enumerate(members.tolist()):
            real = [j for j in row if j < h * w]
            assert real == sorted(real) and all(int(cells[j]) == i for j in real)
            assert row[len(real):] == [h * w] * (len(row) - len(real))          # padding only at the end
        assert sorted(j for row in members.tolist() for j in row if j < h * w) == list(range(h * w))


def test_ordered_cell_sum_is_index_add_bit_for_bit():
    """The fixed-order sum used on CUDA (where index_add_ accumulates in any order) adds each cell's
    tokens in the order CPU index_add_ does: the same bits."""
    g = torch.Generator().manual_seed(0)
    for h, w, gh, gw in ((16, 16, 7, 7), (13, 13, 5, 4), (32, 32, 9, 9)):
        cells, _, members = cell_layout(h, w, gh, gw)
        x = torch.randn(3, h * w, 8, generator=g) * 1e3
        plain = cell_sum(x, cells, members, ordered=False)
        assert torch.equal(plain, torch.zeros(3, gh * gw, 8).index_add_(1, cells, x))
        assert torch.equal(cell_sum(x, cells, members, ordered=True), plain)
