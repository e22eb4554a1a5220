"""The demo's parts that decide what it reports: the text warm-up's vision text and its compact-vocabulary
loss, the linear probe, the confusion matrices, the blind control's frames, precision and output paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from data.korean import MOTIONS
from vlm.demo.probe import NONE, confusion, edge_sides, fit_linear_probe, probe_tokens
from vlm.demo.run import BlindFrames, output_dir, resolve_precision
from vlm.demo.warm_decoder import SIDES, CompactVocab, vision_text
from vlm.demo.warm_vision import TokenHeads, frame_positions


def test_sides_are_the_first_and_last_frames_positions():
    assert SIDES == {
        "왼쪽에서 오른쪽으로": ("왼쪽", "오른쪽으로"),
        "오른쪽에서 왼쪽으로": ("오른쪽", "왼쪽으로"),
        "위에서 아래로": ("위", "아래로"),
        "아래에서 위로": ("아래", "위로"),
    }
    assert set(SIDES) == set(MOTIONS)


def test_vision_text_styles():
    a = {"color": "빨간", "shape": "삼각형", "motion": "아래에서 위로"}
    assert vision_text(a, "words", 4) == "빨간 삼각형 아래에서 위로"
    # per frame: the side only where the shape is at an edge (first and last frame), no particles
    lines = ["빨간 삼각형 아래", "빨간 삼각형", "빨간 삼각형", "빨간 삼각형 위"]
    assert vision_text(a, "frames", 4).split("\n") == lines


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab, bias=False)

    def get_input_embeddings(self) -> nn.Module:
        return self.emb

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def test_compact_loss_is_the_full_vocabulary_loss_when_every_other_id_is_counted():
    torch.manual_seed(0)
    lm = _TinyLM(50, 8)
    used = torch.tensor([3, 7, 11, 20])
    vocab = CompactVocab(lm, used, negatives=1000)  # more than the 46 other ids: all of them, no sample
    hidden, target = torch.randn(6, 8), used[torch.tensor([0, 1, 2, 3, 1, 0])]
    full = F.cross_entropy(hidden @ lm.head.weight.T, target).detach()
    torch.testing.assert_close(vocab.loss(hidden, target), full, rtol=1e-5, atol=1e-6)
    # a sample of the other ids estimates the same thing (it would be far off without the log-ratio term)
    sampled = CompactVocab(lm, used, negatives=20)
    torch.manual_seed(1)
    with torch.no_grad():
        est = torch.stack([sampled.loss(hidden, target) for _ in range(60)]).mean()
    assert abs(float(est) - float(full)) < 0.1 * float(full)


def test_compact_rows_train_and_are_written_back():
    torch.manual_seed(0)
    lm = _TinyLM(50, 8)
    before = lm.head.weight.detach().clone()
    used = torch.tensor([3, 7])
    vocab = CompactVocab(lm, used, negatives=10)
    with torch.no_grad():
        vocab.head.add_(1.0)
        vocab.emb.mul_(0)
    vocab.write_back(lm)
    torch.testing.assert_close(lm.head.weight[used], before[used] + 1.0)
    assert torch.equal(lm.emb.weight[used], torch.zeros(2, 8))
    others = torch.ones(50, dtype=torch.bool)
    others[used] = False
    assert torch.equal(lm.head.weight[others], before[others])  # the unused rows are untouched


def test_linear_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (300,), generator=g)
    x = torch.randn(300, 20, generator=g) + 3 * F.one_hot(y, 20).float()  # class in dims 0..2
    assert fit_linear_probe(x[:200], y[:200], x[200:], y[200:], 3) > 0.85  # Bayes: 0.97; chance: 1/3
    noise = torch.randn(300, 20, generator=g)
    assert fit_linear_probe(noise[:200], y[:200], noise[200:], y[200:], 3) < 0.5


def test_confusion_counts_named_values_and_none():
    attrs = {
        "a": {"color": "빨간", "shape": "원", "motion": "위에서 아래로"},
        "b": {"color": "파란", "shape": "사각형", "motion": "아래에서 위로"},
        "c": {"color": "파란", "shape": "삼각형", "motion": "아래에서 위로"},
    }
    preds = {
        "a": "빨간 원이 위에서 아래로 움직인다.",  # all right
        "b": "빨간 사각형이 움직인다.",  # wrong colour, no motion
        "c": "파란 원 또는 삼각형이 아래에서 위로 이동한다.",  # two shapes named: none
    }
    m = confusion(preds, attrs)
    color = m["color"]
    assert color["values"] == ["빨간", "파란", "초록", "노란", NONE]
    assert color["counts"] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    assert m["shape"]["counts"] == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]]
    motion = m["motion"]["counts"]
    assert motion[2] == [0, 0, 1, 0, 0] and motion[3] == [0, 0, 0, 1, 1]
    for a in m.values():  # every clip is counted once per attribute
        assert sum(map(sum, a["counts"])) == 3


class _Videos:
    def __init__(self) -> None:
        self.records = [{"video": "x"}]
        self.sample_kw = {"num_frames": 2}

    def __len__(self) -> int:
        return 1

    def decode(self, i: int) -> torch.Tensor:
        return torch.full((2, 4, 4, 3), 200, dtype=torch.uint8)

    def __getitem__(self, i: int) -> dict:
        return {"frames": self.decode(i), "captions": ["c"]}


def test_blind_frames_are_zero_and_keep_the_rest():
    videos = _Videos()
    blind = BlindFrames(videos)
    assert blind.records is videos.records and blind.sample_kw is videos.sample_kw
    assert blind[0]["captions"] == ["c"] and int(blind[0]["frames"].sum()) == 0
    assert blind.decode(0).shape == (2, 4, 4, 3) and int(blind.decode(0).max()) == 0


def test_output_dir_per_seed_and_precision(monkeypatch):
    from types import SimpleNamespace

    assert str(output_dir(SimpleNamespace(output="o/demo", seed=0))) == "o/demo"
    assert str(output_dir(SimpleNamespace(output="o/demo", seed=2))) == "o/demo/seed2"
    monkeypatch.setattr("vlm.demo.run.cpu_has_bf16", lambda: False)
    assert resolve_precision("auto") == "32-true"
    monkeypatch.setattr("vlm.demo.run.cpu_has_bf16", lambda: True)
    assert resolve_precision("auto") == "bf16-mixed"
    assert resolve_precision("32-true") == "32-true"
    with pytest.raises(ValueError, match="precision='fp8'"):
        resolve_precision("fp8")


MOTION_LIST = list(MOTIONS)  # 왼→오, 오→왼, 위→아래, 아래→위


def test_frame_positions_run_along_the_motion_axis_only():
    where, axis = frame_positions(MOTION_LIST, 4)
    assert where.shape == (4, 4, 2) and axis.shape == (4, 1, 2)
    third = 1 / 3
    torch.testing.assert_close(where[0, :, 0], torch.tensor([-1.0, -third, third, 1.0]))  # left → right
    torch.testing.assert_close(where[1, :, 0], torch.tensor([1.0, third, -third, -1.0]))  # right → left
    torch.testing.assert_close(
        where[3, :, 1], torch.tensor([1.0, third, -third, -1.0])
    )  # bottom → top (y down)
    assert axis[:, 0].tolist() == [[1, 0], [1, 0], [0, 1], [0, 1]]  # the across coordinate is not a target


def test_edge_sides_name_where_the_shape_starts_and_ends():
    sides = edge_sides([{"motion": m} for m in MOTION_LIST])  # 0 left, 1 right, 2 top, 3 bottom
    assert sides.tolist() == [[0, 1], [1, 0], [2, 3], [3, 2]]
    names = ("왼쪽", "오른쪽", "위", "아래")  # the same sides the decoder warm-up's text names
    for m, (a, b) in zip(MOTION_LIST, sides.tolist(), strict=True):
        start, end = SIDES[m]
        assert names[a] == start and end.startswith(names[b])


def test_token_heads_share_one_readout_across_tokens():
    heads = TokenHeads(8)
    x = torch.randn(2, 3, 4, 8)
    logits, where = heads(x)
    assert logits["color"].shape == (2, 3, 4, 4) and logits["shape"].shape == (2, 3, 4, 3)
    assert where.shape == (2, 3, 4, 2)
    swapped = x[:, :, [1, 0, 2, 3]]  # the same token at another place gives the same answer
    torch.testing.assert_close(heads(swapped)[1][:, :, 0], where[:, :, 1])


def test_token_probe_reads_where_only_when_each_token_carries_it():
    g = torch.Generator().manual_seed(0)
    attrs = [{"color": "빨간", "shape": "원", "motion": MOTION_LIST[i % 4]} for i in range(160)]
    sides = edge_sides(attrs)  # (N, 2)
    code = torch.zeros(160, 4, 2, 8)  # (N, T, K, Dv): every token of the first/last frame names the side
    code[:, 0] = 3 * F.one_hot(sides[:, 0], 8).float()[:, None]
    code[:, -1] = 3 * F.one_hot(sides[:, 1], 8).float()[:, None]
    x = code + 0.3 * torch.randn(160, 4, 2, 8, generator=g)
    assert probe_tokens(x[:120], attrs[:120], x[120:], attrs[120:])["side"] > 0.9
    # the side only in which token is bright (position, not content): a shared probe cannot read it
    where = torch.zeros(160, 4, 2, 8)
    where[torch.arange(160), 0, sides[:, 0] % 2, 0] = 3.0
    where[torch.arange(160), -1, sides[:, 1] % 2, 0] = 3.0
    y = where + 0.3 * torch.randn(160, 4, 2, 8, generator=g)
    assert probe_tokens(y[:120], attrs[:120], y[120:], attrs[120:])["side"] < 0.6
