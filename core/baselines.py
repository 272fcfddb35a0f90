"""Baseline learned members: an MLP and an LSTM that predict the next bar's direction.

Both read a window of ``core.features`` rows ``[batch, window, features]`` and
output a target position in [-1, 1]: ``tanh(logit / 2) = 2 P(up) - 1``, so a
model that is sure the next bar closes higher says +1 and one with no view
says 0. The features' mean and standard deviation over the training data are
buffers of the model, so the exported ONNX graph takes raw feature rows, the
same rows the live ensemble computes.

Training is plain supervised learning on the store's history: for each bar
``t`` past the warm-up, the window ending at ``t`` and the label ``close[t+1] >
close[t]`` (bars with no change are left out), binary cross-entropy on the
logit, Adam. The last ``holdout`` share of each symbol's windows is kept out
and its hit rate reported, so a model is registered with an out-of-sample
number, not its training fit.

Export is ONNX with a dynamic batch axis, checked against torch on random
inputs (max abs difference under 1e-5) before it is returned.

Not here: registering (``actors.registry``), the CLI (``raytrade models
train-baseline``), or the RL policy (``core.rl``).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import nn

from core.features import FEATURE_NAMES, WARMUP, compute_features, feature_spec_hash

PARITY_TOLERANCE = 1e-5
OPSET = 17


class _Normalised(nn.Module):
    def __init__(self, n_features: int, mean: np.ndarray | None, std: np.ndarray | None):
        super().__init__()
        mean = np.zeros(n_features) if mean is None else mean
        std = np.ones(n_features) if std is None else std
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(np.maximum(std, 1e-8), dtype=torch.float32))

    folded = False  # True on export copies whose first layer took in mean and std

    def normalised(self, x: torch.Tensor) -> torch.Tensor:
        # A plain Python test, so an export (traced on exactly `window` rows,
        # the ONNX input's fixed length) carries no Slice that copies the input.
        if x.shape[1] != self.window:
            x = x[:, -self.window:, :]
        return x if self.folded else (x - self.mean) / self.std

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def folded_copy(self) -> "_Normalised":
        """A copy that computes the same positions with the normalisation inside its first layer.

        ``W (x - mean) / std + b = (W / std) x + (b - W mean / std)``, computed
        in float64: the exported graph then has no ``Sub``/``Div`` over the
        whole ``[batch, window, features]`` input (ONNX Runtime broadcasts them
        slowly over 9 features: ~0.2 ms of the LSTM's ~2.7 ms at batch 256, half
        of the MLP's time). Rounding differs from the unfolded model by about
        ``eps * |mean| / std``; ``export_onnx`` checks parity and keeps the
        unfolded graph where that is too much.
        """
        import copy

        twin = copy.deepcopy(self)
        weight, bias = twin._first_layer()
        scale = (1.0 / self.std.double()).repeat(weight.shape[1] // self.n_features)
        shift = (self.mean.double() / self.std.double()).repeat(weight.shape[1] // self.n_features)
        with torch.no_grad():
            w = weight.double()
            bias.copy_((bias.double() - w @ shift).float())
            weight.copy_((w * scale).float())
        twin.folded = True
        return twin.eval()

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        """(weight [out, in], bias [out]) of the layer that reads the normalised features."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(0.5 * self.logits(x))


class MLPDirection(_Normalised):
    """The window flattened, two hidden layers."""

    def __init__(self, n_features: int, window: int = 8, hidden: int = 64, mean=None, std=None):
        super().__init__(n_features, mean, std)
        self.window, self.n_features = window, n_features
        self.net = nn.Sequential(
            nn.Linear(window * n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalised(x)
        return self.net(z.reshape(z.shape[0], self.window * self.n_features)).squeeze(-1)

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net[0].weight, self.net[0].bias  # inputs in (window, feature) order, as reshaped


class LSTMDirection(_Normalised):
    """One LSTM layer over the window; the last hidden state decides."""

    def __init__(self, n_features: int, window: int = 32, hidden: int = 32, mean=None, std=None):
        super().__init__(n_features, mean, std)
        self.window, self.n_features = window, n_features
        self.lstm = nn.LSTM(n_features, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        # h_n, the last step's hidden state (out[:, -1] of one forward layer):
        # the export then reads the op's Y_h and the sequence Y can be dropped.
        _, (h_n, _) = self.lstm(self.normalised(x))
        return self.head(h_n[-1]).squeeze(-1)

    def _first_layer(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lstm.weight_ih_l0, self.lstm.bias_ih_l0


KINDS = {"mlp": MLPDirection, "lstm": LSTMDirection}
DEFAULT_WINDOW = {"mlp": 8, "lstm": 32}


def direction_windows(bars: Any, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(X [N, window, F], y [N], ends [N]) from one symbol's bars: windows ending at bar ``ends[i]``,
    label close[t+1] > close[t] (bars whose close does not move are left out)."""
    feats = compute_features(bars)
    close = np.asarray(bars["close"], dtype=np.float64)
    T = feats.shape[0]
    first = WARMUP + window - 1
    ends = np.arange(first, T - 1)
    if len(ends) == 0:
        return np.empty((0, window, feats.shape[1]), np.float32), np.empty(0, np.float32), ends
    move = close[ends + 1] - close[ends]
    ends, move = ends[move != 0], move[move != 0]
    idx = ends[:, None] + np.arange(-window + 1, 1)[None, :]
    return feats[idx].astype(np.float32), (move > 0).astype(np.float32), ends


@dataclass
class TrainResult:
    model: nn.Module
    onnx: bytes
    metadata: dict[str, Any]
    history: list[float] = field(default_factory=list)


def train_direction_model(
    bars_by_symbol: Mapping[str, Any],
    kind: str = "mlp",
    window: int | None = None,
    epochs: int = 5,
    batch_size: int = 256,
    lr: float = 1e-3,
    holdout: float = 0.2,
    seed: int = 0,
    max_samples: int | None = None,
) -> TrainResult:
    """Train, export to ONNX, check parity; metadata is what the registry records."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    window = window or DEFAULT_WINDOW[kind]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    xs_tr, ys_tr, xs_te, ys_te, ranges = [], [], [], [], []
    for sym, bars in bars_by_symbol.items():
        X, y, ends = direction_windows(bars, window)
        if len(X) < 10:
            continue
        cut = int(len(X) * (1 - holdout))
        xs_tr.append(X[:cut]); ys_tr.append(y[:cut]); xs_te.append(X[cut:]); ys_te.append(y[cut:])
        if "ts" in bars and len(bars["ts"]) and cut > 0:
            ts = np.asarray(bars["ts"])
            # Training saw bars from the first through the label bar of its last window; the held-out
            # windows start after it. Backtests over the training bars are in-sample (tune.models).
            ranges.append((str(sym), str(pd.Timestamp(ts[0])), str(pd.Timestamp(ts[ends[cut - 1] + 1]))))
    if not xs_tr:
        raise ValueError(f"not enough history: need more than {WARMUP + window + 10} bars of a symbol")
    X_tr, y_tr = np.concatenate(xs_tr), np.concatenate(ys_tr)
    X_te, y_te = np.concatenate(xs_te), np.concatenate(ys_te)
    if max_samples and len(X_tr) > max_samples:
        keep = rng.choice(len(X_tr), max_samples, replace=False)
        X_tr, y_tr = X_tr[keep], y_tr[keep]
    flat = X_tr.reshape(-1, X_tr.shape[-1])
    model = KINDS[kind](X_tr.shape[-1], window=window, mean=flat.mean(0), std=flat.std(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss()
    Xt, yt = torch.from_numpy(X_tr), torch.from_numpy(y_tr)
    history = []
    model.train()
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(Xt)))
        total = 0.0
        for i in range(0, len(Xt), batch_size):
            b = perm[i : i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model.logits(Xt[b]), yt[b])
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        history.append(total / len(Xt))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(X_te)).numpy() if len(X_te) else np.empty(0)
    called = pred != 0
    hit = float(np.mean((pred[called] > 0) == (y_te[called] > 0.5))) if called.any() else float("nan")
    onnx_bytes = export_onnx(model, window, X_tr.shape[-1])
    diff = parity(model, onnx_bytes, window, X_tr.shape[-1], seed=seed)
    metadata = {
        "kind": kind,
        "window": window,
        "feature_names": list(FEATURE_NAMES),
        "feature_spec_hash": feature_spec_hash(),
        "params": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "holdout": holdout},
        "training_data": [{"symbol": s, "first": a, "last": b} for s, a, b in ranges],
        "train_samples": int(len(X_tr)),
        "holdout_samples": int(len(X_te)),
        "holdout_hit_rate": hit,
        "onnx_torch_max_abs_diff": diff,
        "tags": ["baseline", kind],
    }
    return TrainResult(model, onnx_bytes, metadata, history)


def export_onnx(model: nn.Module, window: int, n_features: int, *, fold: bool = True) -> bytes:
    """ONNX bytes with a dynamic batch axis; input ``features [batch, window, F]``, output ``position [batch]``.

    The graph is made for ONNX Runtime: the normalisation folded into the
    first layer (``folded_copy``) where that keeps parity with ``model``, and
    recurrent outputs nobody reads dropped (``core.onnx_graph.lean_recurrent``).
    """
    from core.onnx_graph import lean_recurrent

    model.eval()
    if fold and isinstance(model, _Normalised):
        data = lean_recurrent(_torch_export(model.folded_copy(), window, n_features))
        try:
            parity(model, data, window, n_features)
            return data
        except AssertionError as e:  # |mean| / std too large for float32: keep the subtraction
            warnings.warn(f"exporting without folding the normalisation: {e}", stacklevel=2)
    return lean_recurrent(_torch_export(model, window, n_features))


def _torch_export(model: nn.Module, window: int, n_features: int) -> bytes:
    buf = io.BytesIO()
    example = torch.zeros(2, window, n_features)
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter warns about LSTMs and dynamic batches, and
        # about its own deprecation; parity() checks what matters.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), buf,
            input_names=["features"], output_names=["position"],
            dynamic_axes={"features": {0: "batch"}, "position": {0: "batch"}},
            opset_version=OPSET, dynamo=False,  # the TorchScript exporter: no onnxscript dependency
        )
    return buf.getvalue()


def parity(model: nn.Module, onnx_bytes: bytes, window: int, n_features: int, n: int = 64, seed: int = 0) -> float:
    """Max abs difference between torch and ONNX Runtime (CPU) on random inputs; raises over 1e-5."""
    import onnxruntime as ort

    x = np.random.default_rng(seed).standard_normal((n, window, n_features)).astype(np.float32)
    x *= model.std.numpy() if hasattr(model, "std") else 1.0
    x += model.mean.numpy() if hasattr(model, "mean") else 0.0
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x})[0].reshape(want.shape)
    diff = float(np.max(np.abs(got - want)))
    if not diff < PARITY_TOLERANCE:
        raise AssertionError(f"ONNX export differs from torch by {diff:.3g} (tolerance {PARITY_TOLERANCE})")
    return diff


def random_model(kind: str, n_features: int | None = None, window: int | None = None, seed: int = 0, **kw: Any) -> nn.Module:
    """An untrained model with fixed random weights (tests, benchmarks)."""
    torch.manual_seed(seed)
    n_features = n_features or len(FEATURE_NAMES)
    return KINDS[kind](n_features, window=window or DEFAULT_WINDOW[kind], **kw).eval()
