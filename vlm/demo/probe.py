"""What the demo measures besides the score: linear probes of the vision features, and confusion matrices.

`probe_features` fits one multinomial logistic regression per attribute on the training clips' prepared
tokens (what the projector reads: (N, T, K, Dv), flattened) and reports accuracy on the held-out clips:
the ceiling a per-clip linear readout of the frozen tower could reach, printed before stage 1 so a bad
score can be put on the tower or on the decoder side. `confusion` counts, per attribute, the value a
caption names against the true one ("none" when it names none or several).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from data.korean import MOTIONS, VOCAB, parse_attributes

NONE = "none"  # a caption that names no value (or contradictory ones) of an attribute


def fit_linear_probe(
    x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
    classes: int, weight_decay: float = 1e-3, steps: int = 100,
) -> float:  # fmt: skip
    """Held-out accuracy of an L2-regularised softmax regression fitted by L-BFGS on standardised features."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6  # standardised: one weight decay fits every layer
    xt, xv = (x_train - mean) / std, (x_val - mean) / std
    w = torch.zeros(xt.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, y_train) + weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xv @ w + b).argmax(1) == y_val).float().mean())


def labels(attrs: Sequence[Mapping[str, str]], key: str) -> torch.Tensor:
    """Class indices (into VOCAB[key]) of one attribute."""
    return torch.tensor([VOCAB[key].index(a[key]) for a in attrs])


def probe_features(
    train_feats: torch.Tensor,
    train_attrs: Sequence[Mapping[str, str]],
    val_feats: torch.Tensor,
    val_attrs: Sequence[Mapping[str, str]],
) -> dict[str, float]:
    """{attribute: held-out linear-probe accuracy} from (N, ...) features of train and val clips."""
    xt, xv = train_feats.flatten(1).float(), val_feats.flatten(1).float()
    return {
        k: fit_linear_probe(xt, labels(train_attrs, k), xv, labels(val_attrs, k), len(VOCAB[k]))
        for k in VOCAB
    }


def edge_sides(attrs: Sequence[Mapping[str, str]]) -> torch.Tensor:
    """(N, 2) class indices of the side the shape is on in the first and the last frame: 0 left, 1 right,
    2 top, 3 bottom (what the decoder warm-up's per-frame text names there)."""
    side = {(-1, 0): 0, (1, 0): 1, (0, -1): 2, (0, 1): 3}  # unit vector from the centre, image axes
    rows = []
    for a in attrs:
        dx, dy = MOTIONS[a["motion"]]
        rows.append([side[(-dx, -dy)], side[(dx, dy)]])  # it starts on the side it moves away from
    return torch.tensor(rows)


def probe_tokens(
    train_feats: torch.Tensor,
    train_attrs: Sequence[Mapping[str, str]],
    val_feats: torch.Tensor,
    val_attrs: Sequence[Mapping[str, str]],
) -> dict[str, float]:
    """What one token says by itself, read by one linear probe shared by every token: the clip's colour
    and shape (all tokens), and the side the shape is on (tokens of the first and last frames). This is
    what a per-token projector can pass on; `probe_features` reads the tokens flattened, position-aware.
    (N, T, K, Dv) features."""

    def rows(
        x: torch.Tensor, attrs: Sequence[Mapping[str, str]], key: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n, t, k, d = x.shape
        if key == "side":
            edges = x[:, [0, t - 1]]  # (N, 2, K, Dv)
            y = edge_sides(attrs)[:, :, None].expand(n, 2, k)
            return edges.reshape(-1, d), y.reshape(-1)
        return x.reshape(-1, d), labels(attrs, key).repeat_interleave(t * k)

    out = {}
    for key, classes in (("color", len(VOCAB["color"])), ("shape", len(VOCAB["shape"])), ("side", 4)):
        (xt, yt), (xv, yv) = (
            rows(train_feats.float(), train_attrs, key),
            rows(val_feats.float(), val_attrs, key),
        )
        out[key] = fit_linear_probe(xt, yt, xv, yv, classes)
    return out


def confusion(
    predictions: Mapping[str, str], attributes: Mapping[str, Mapping[str, str]]
) -> dict[str, dict[str, Any]]:
    """Per attribute: {"values": [...VOCAB, "none"], "counts": rows = true value, columns = named value}."""
    out: dict[str, dict[str, Any]] = {}
    keys = [k for k in predictions if k in attributes]
    parsed = {k: parse_attributes(predictions[k]) for k in keys}
    for attr, values in VOCAB.items():
        cols = [*values, NONE]
        counts = [[0] * len(cols) for _ in values]
        for k in keys:
            got = parsed[k][attr]
            counts[values.index(attributes[k][attr])][cols.index(got if got in values else NONE)] += 1
        out[attr] = {"values": cols, "counts": counts}
    return out
