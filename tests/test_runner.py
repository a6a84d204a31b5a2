"""The segment runner (runner.py): cutting streams into segments, the loop, the BPTT loss."""

import copy

import torch

from memformers.config import ModelConfig
from memformers.memory.configs import KNNConfig
from memformers.memory.state import collect_state_tensors
from memformers.model import MemformerLM, lm_loss
from memformers.runner import Segment, SegmentRunner, segments_of


def tiny(**kw) -> MemformerLM:
    torch.manual_seed(0)
    return MemformerLM(ModelConfig(n_layers=2, d_model=32, n_heads=4, head_dim=8, d_ff=64,
                                   vocab_size=50, xl_cache=True, **kw))


def test_segments_of_pads_flags_and_limits_grad():
    tokens = torch.arange(2 * 10).view(2, 10)
    targets = tokens + 1
    segs = segments_of(tokens, 4, targets, grad_segments=2)
    assert len(segs) == 3
    assert [s.new_doc.tolist() for s in segs] == [[True, True], [False, False], [False, False]]
    assert [s.grad for s in segs] == [False, True, True]
    assert torch.equal(torch.cat([s.tokens for s in segs], 1)[:, :10], tokens)
    last = segs[-1]
    assert last.mask.tolist() == [[True, True, False, False]] * 2
    assert last.targets[:, 2:].eq(-100).all() and last.tokens[:, 2:].eq(0).all()
    assert segs[0].mask.all()
    whole = segments_of(tokens[:, :8], 4)
    assert [s.grad for s in whole] == [True] * 2 and whole[0].mask is None  # no padding


def test_loss_equals_a_hand_written_loop_and_counts_targets():
    model = tiny(knn=KNNConfig(layers=[1], capacity=16, top_k=2))
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 24), generator=g)
    targets = torch.randint(0, 50, (2, 24), generator=g)
    targets[0, :5] = -100
    total, n = SegmentRunner(model).loss(segments_of(tokens, 8, targets))
    ref.allocate_state(2)
    want = sum(lm_loss(ref(tokens[:, s:s + 8], new_doc=torch.tensor([s == 0] * 2)),
                       targets[:, s:s + 8], reduction="sum") for s in (0, 8, 16))
    assert int(n) == 48 - 5
    assert torch.allclose(total, want)
    state, ref_state = collect_state_tensors(model), collect_state_tensors(ref)
    assert state.keys() == ref_state.keys()
    assert all(torch.equal(state[k], ref_state[k]) for k in state)


def test_no_grad_segments_build_no_graph_but_write_state():
    model = tiny()
    tokens = torch.randint(0, 50, (1, 16))
    segs = segments_of(tokens, 8, tokens, grad_segments=1)
    runner = SegmentRunner(model)
    outs = [(seg.grad, logits.requires_grad) for seg, logits, _ in runner.run(segs)]
    assert outs == [(False, False), (True, True)]
    assert model.blocks[0].attn.cache.keys is not None  # the first segment was committed


def test_fresh_state_gives_the_held_state_back():
    model = tiny(knn=KNNConfig(layers=[1], capacity=16, top_k=2))
    runner = SegmentRunner(model)
    list(runner.run(segments_of(torch.randint(0, 50, (2, 16)), 8)))
    before = collect_state_tensors(model)
    model.train()
    with runner.fresh_state(3):
        assert not model.training and not torch.is_grad_enabled()
        list(runner.run(segments_of(torch.randint(0, 50, (3, 16)), 8)))
    after = collect_state_tensors(model)
    assert model.training and before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_uncommitted_segment_leaves_the_state_alone():
    model = tiny()
    runner = SegmentRunner(model)
    list(runner.run(segments_of(torch.randint(0, 50, (1, 8)), 8)))
    before = collect_state_tensors(model)
    runner.forward(Segment(torch.randint(0, 50, (1, 5)), commit=False))
    after = collect_state_tensors(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
