import torch

from memformers.config import ModelConfig
from memformers.memory import track_usage, usage_report
from memformers.memory.configs import KNNConfig
from memformers.memory.knn_usage import KNNRetrievalStats
from memformers.model import MemformerLM
from memformers.runner import Segment


def observe(s, tokens, targets, new_doc):
    t = torch.tensor([tokens])
    s.observe(t, torch.tensor([targets]), torch.ones_like(t, dtype=torch.bool),
              torch.tensor([new_doc]))


def test_precision_top1_copy_and_chance_on_a_constructed_case():
    s = KNNRetrievalStats(n_heads=2)
    s.enabled = True
    observe(s, [0, 1, 2, 3, 1, 2], [1, 2, 3, 1, 2, 3], True)
    # capacity 4, 6 pairs written: slot w % 4 holds pair w for w = 2..5, i.e. (own token,
    # next token) slot 0: pair 4 (1, 2), 1: pair 5 (2, 3), 2: pair 2 (2, 3), 3: pair 3 (3, 1)
    slots = torch.tensor([[[[2, 1], [3, -1]],      # head 0: 3 pairs, all hits, no copy
                           [[0, 3], [-1, -1]]]])   # head 1: 2 pairs, no hit, one copy
    s.record(slots, torch.tensor([6]), 4)
    observe(s, [3, 3], [3, 1], False)
    r = s.report()
    assert r["precision"] == [1.0, 0.0] and r["top1"] == [1.0, 0.0]
    assert r["copy"] == [0.0, 0.5]
    # the memory holds next tokens [3, 1, 2, 3]: a random pair predicts 3 with 2/4, 1 with 1/4
    assert abs(r["chance"] - (0.5 + 0.25) / 2) < 1e-12 and r["queries"] == 2


def test_a_new_document_restarts_the_history():
    s = KNNRetrievalStats(n_heads=1)
    s.enabled = True
    observe(s, [5, 5, 5], [5, 5, 5], True)
    observe(s, [6, 7], [7, 8], True)
    s.record(torch.tensor([[[[0], [1]]]]), torch.tensor([2]), 8)  # pairs 0, 1: next 7, 8
    observe(s, [8, 8], [8, 8], False)
    assert s.report()["precision"] == [0.5]


def test_evaluation_collects_one_query_per_scored_position_with_a_memory():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=2, head_dim=16, d_ff=64, vocab_size=20,
                      xl_cache=True, knn=KNNConfig(layers=[1], capacity=64, top_k=4,
                                                   storage_dtype="float32"))
    model = MemformerLM(cfg).eval()
    model.allocate_state(2)
    tokens = torch.randint(0, 20, (2, 3 * 8 + 1))
    with torch.no_grad(), track_usage(model) as usage:
        for s in range(3):
            seg = Segment(tokens[:, s * 8:(s + 1) * 8], tokens[:, s * 8 + 1:(s + 1) * 8 + 1],
                          torch.ones(2, 8, dtype=torch.bool),
                          torch.full((2,), s == 0))
            model(seg.tokens, new_doc=seg.new_doc, mask=seg.mask)
            usage.observe(seg)
    r = usage_report(model)["knn_retrieval"]["blocks.1"]
    assert r["queries"] == 2 * 2 * 8  # segments 2 and 3 of both streams read a memory
    assert all(0 <= p <= 1 for p in r["precision"]) and 0 < r["chance"] <= 1


def test_a_memory_of_next_tokens_is_scored_directly():
    s = KNNRetrievalStats(n_heads=1)  # the kNN-LM's statistics
    s.enabled = True
    observe(s, [0, 1, 2, 3], [1, 2, 3, 3], True)
    s.record_next_tokens(torch.tensor([[[[3, 1], [2, -1]]]]), 64)
    observe(s, [3, 3], [3, 1], False)
    r = s.report()
    assert r["precision"] == [1 / 3] and r["top1"] == [0.5] and "copy" not in r
    assert abs(r["chance"] - (2 / 4 + 1 / 4) / 2) < 1e-12


def test_a_stream_with_an_empty_memory_is_skipped():
    s = KNNRetrievalStats(n_heads=1)
    s.enabled = True
    observe(s, [1, 2], [2, 3], True)
    s.record(torch.tensor([[[[-1], [-1]]]]), torch.tensor([0]), 8)
    observe(s, [3, 4], [4, 5], True)
    assert s.report() is None
