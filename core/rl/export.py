"""The trained policy as an ensemble member: ONNX under the member contract, checked against torch.

The ensemble's member contract is one input ``features [batch, window, F]`` and a
first output ``position [batch]``: it carries no position and no episode clock. The
trained policy also sees its position, the episode's log wealth and the time left
(``core.rl.env``). The member ONNX therefore feeds the policy the observation of an
episode's first decision (flat, log wealth 0, the whole episode ahead), which every
training episode starts with, and returns the greedy target position.

Not here: exporting the full policy for analysis (``core.rl.cvar_ppo.export_onnx``),
or judging the member (``core.rl.evaluate``).
"""

from __future__ import annotations

import copy
import io
import json
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from core.rl.cvar_ppo import ActorCritic

PARITY_TOLERANCE = 1e-5


class MemberPolicy(nn.Module):
    """The policy under the ensemble's member contract: feature windows ``[B, W, F]`` in,
    target positions ``[B]`` (and action probabilities) out. The observation is that of an
    episode's first decision (see the module docstring), laid out as ``core.rl.env`` does."""

    def __init__(self, policy: ActorCritic) -> None:
        super().__init__()
        self.actor = copy.deepcopy(policy.actor).cpu().eval()
        self.register_buffer("action_values", policy.action_values.detach().cpu().clone())

    @staticmethod
    def observation(features: torch.Tensor) -> torch.Tensor:
        """Flat window, then position 0, log wealth 0, time left 1: ``TradingEnv``'s first observation."""
        b = features.shape[0]
        zeros = torch.zeros(b, 2, dtype=features.dtype, device=features.device)
        ones = torch.ones(b, 1, dtype=features.dtype, device=features.device)
        return torch.cat([features.reshape(b, -1), zeros, ones], dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.actor(self.observation(features))
        return self.action_values[logits.argmax(dim=-1)], torch.softmax(logits, dim=-1)


def export_member_onnx(policy: ActorCritic, window: int, n_features: int, check_windows: np.ndarray,
                       metadata: dict[str, Any] | None = None) -> tuple[bytes, float]:
    """ONNX bytes of ``MemberPolicy`` with a dynamic batch axis, and the largest probability
    difference from torch. Checked on ``check_windows`` (the held-out windows: the inputs that
    will be judged) and on random rows; raises if any position differs or a probability is
    off by ``PARITY_TOLERANCE`` or more."""
    # Imported here: onnx and onnxruntime take about two seconds together, and only an export needs them.
    import onnx
    import onnxruntime as ort

    module = MemberPolicy(policy)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # As in core.rl.cvar_ppo.export_onnx: the TorchScript exporter, deprecated but supported.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(module, (torch.zeros(2, window, n_features),), buf, dynamo=False, opset_version=17,
                          input_names=["features"], output_names=["position", "probs"],
                          dynamic_axes={"features": {0: "batch"}, "position": {0: "batch"}, "probs": {0: "batch"}})
    model = onnx.load_model_from_string(buf.getvalue())
    props = {"window": str(window), "n_features": str(n_features),
             "action_values": json.dumps(policy.action_values.tolist())}
    props.update({str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    data = model.SerializeToString()

    g = torch.Generator().manual_seed(0)
    rows = torch.cat([torch.as_tensor(np.asarray(check_windows, np.float32)),
                      torch.randn(64, window, n_features, generator=g)])
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    got_pos, got_probs = session.run(None, {"features": rows.numpy()})
    with torch.no_grad():
        want_pos, want_probs = (t.numpy() for t in module(rows))
    max_diff = float(np.abs(got_probs - want_probs).max())
    if not max_diff < PARITY_TOLERANCE or not np.array_equal(got_pos, want_pos):
        raise RuntimeError(f"member ONNX disagrees with torch: max prob diff {max_diff:.3g}, "
                           f"{int((got_pos != want_pos).sum())} of {len(rows)} positions differ")
    return data, max_diff
