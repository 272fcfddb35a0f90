"""The model cache's budget and eviction order, ONNX/torch parity, and the CUDA path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.baselines import _torch_export, export_onnx, parity, random_model, train_direction_model
from core.features import FEATURE_NAMES
from core.models.cache import (
    GATE_BUFFER_BYTES,
    BadModelContract,
    CacheFull,
    DeviceConfig,
    ModelCache,
    ModelTooLarge,
    OnnxModel,
    detect_device,
)
from core.onnx_graph import gate_bytes_per_row, lean_recurrent

F = len(FEATURE_NAMES)


class _Fake:
    def __init__(self, name, version):
        self.name, self.version = name, version


def _cache(budget, max_versions=3):
    loads = []

    def build(name, version, data):
        loads.append((name, version))
        return _Fake(name, version)

    return ModelCache(budget, max_versions, build=build), loads


def test_least_recently_used_is_evicted_first():
    cache, loads = _cache(100)
    blob = b"x" * 40
    for name in ("a", "b"):
        cache.get(name, 1, lambda: blob)
    cache.get("c", 1, lambda: blob)  # 120 > 100: a, the oldest, goes
    assert cache.evictions == [("a", 1)] and cache.keys() == [("b", 1), ("c", 1)]
    cache.get("b", 1, lambda: pytest.fail("a hit must not fetch"))  # b is now the most recent
    cache.get("d", 1, lambda: blob)
    assert cache.evictions == [("a", 1), ("c", 1)]
    assert cache.keys() == [("b", 1), ("d", 1)] and cache.used_bytes == 80
    assert loads == [("a", 1), ("b", 1), ("c", 1), ("d", 1)]


def test_at_most_n_versions_of_one_model():
    cache, _ = _cache(10_000, max_versions=3)
    for v in (1, 2, 3):
        cache.get("m", v, lambda: b"x" * 10)
    cache.get("other", 1, lambda: b"x" * 10)
    cache.get("m", 2, lambda: b"")  # touch v2: v1 is now m's least recently used
    cache.get("m", 4, lambda: b"x" * 10)
    assert cache.evictions == [("m", 1)]
    assert sorted(k for k in cache.keys() if k[0] == "m") == [("m", 2), ("m", 3), ("m", 4)]


def test_a_model_that_can_never_fit_is_refused_with_its_size_and_the_budget():
    cache, loads = _cache(1000)
    with pytest.raises(ModelTooLarge) as e:
        cache.get("huge", 1, lambda: b"x" * 4096)
    msg = str(e.value)
    assert "4,096 bytes" in msg and "1,000 bytes" in msg and "never fit" in msg
    assert loads == [] and cache.keys() == []  # refused before a session was built


def test_models_being_served_are_never_evicted():
    cache, _ = _cache(100)
    cache.get("a", 1, lambda: b"x" * 60)
    cache.pin({("a", 1)})
    with pytest.raises(CacheFull, match="a v1"):
        cache.get("b", 1, lambda: b"x" * 60)
    assert cache.keys() == [("a", 1)] and cache.evictions == []
    cache.pin(set())
    cache.get("b", 1, lambda: b"x" * 60)
    assert cache.keys() == [("b", 1)]


def test_budget_holds_with_real_onnx_sessions_and_snapshot_reports_them():
    blobs = {k: export_onnx(random_model(k, seed=1), m.window, F) for k, m in
             (("mlp", random_model("mlp")), ("lstm", random_model("lstm")))}
    budget = len(blobs["mlp"]) + len(blobs["lstm"]) + 100
    cache = ModelCache(budget, 3, n_features=F)
    cache.get("mlp", 1, lambda: blobs["mlp"])
    cache.get("lstm", 1, lambda: blobs["lstm"])
    cache.get("mlp", 2, lambda: blobs["mlp"])  # no room for three: mlp v1, the oldest, goes
    assert cache.evictions == [("mlp", 1)]
    snap = cache.snapshot()
    assert snap["models"] == {"lstm@v1": len(blobs["lstm"]), "mlp@v2": len(blobs["mlp"])}
    assert snap["cache_bytes"] <= snap["budget_bytes"] == budget
    assert snap["rss_bytes"] > 50_000_000 and snap["gpu"] is None


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_onnx_matches_torch_at_every_batch_size(kind):
    torch.set_num_threads(1)
    model = random_model(kind, seed=3)
    data = export_onnx(model, model.window, F)
    assert parity(model, data, model.window, F) < 1e-5
    onnx_model = OnnxModel(kind, 1, data, DeviceConfig(), n_features=F)
    rng = np.random.default_rng(0)
    for batch in (1, 7, 256, 300):  # the batch axis is dynamic; 300 is not a whole number of LSTM chunks
        # Longer windows than the model reads: the member takes the last rows.
        x = rng.standard_normal((batch, model.window + 5, F)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x[:, -model.window:])).numpy()
        got = onnx_model.run(x)
        assert got.shape == (batch,)
        assert np.max(np.abs(got - want)) < 1e-5


def _ops(data: bytes) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load_from_string(data).graph.node]


def _run(data: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"features": x})[0]


def _normalised_model(kind: str, seed: int, spread: float = 1.0):
    """A random model whose normalisation is not the identity (as a trained one's is not)."""
    model = random_model(kind, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.std.copy_(torch.rand(F, generator=g) + 0.1)
        model.mean.copy_(spread * model.std * torch.randn(F, generator=g))
    return model


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_export_folds_the_normalisation_into_the_first_layer(kind):
    model = _normalised_model(kind, seed=11, spread=3.0)  # |mean| / std up to ~3, as real features have
    data = export_onnx(model, model.window, F)
    ops = _ops(data)
    assert "Sub" not in ops and "Div" not in ops
    assert "Slice" not in ops  # the input is exactly `window` rows: nothing to cut
    assert parity(model, data, model.window, F) < 1e-5
    plain = _torch_export(model, model.window, F)
    assert "Sub" in _ops(plain) and "Div" in _ops(plain)


def test_export_keeps_the_subtraction_where_folding_would_lose_precision():
    # |mean| / std = 1e6: (W / std) x - W mean / std cancels catastrophically in float32.
    model = _normalised_model("mlp", seed=12)
    with torch.no_grad():
        model.mean.fill_(1e3)
        model.std.fill_(1e-3)
    with pytest.warns(UserWarning, match="without folding"):
        data = export_onnx(model, model.window, F)
    assert "Sub" in _ops(data) and "Div" in _ops(data)
    assert parity(model, data, model.window, F) < 1e-5


def test_lean_recurrent_drops_the_unread_sequence_and_zero_states_and_computes_the_same():
    model = _normalised_model("lstm", seed=13)
    raw = _torch_export(model, model.window, F)
    lean = lean_recurrent(raw)
    import onnx

    before = [n for n in onnx.load_from_string(raw).graph.node if n.op_type == "LSTM"][0]
    after = [n for n in onnx.load_from_string(lean).graph.node if n.op_type == "LSTM"][0]
    assert before.output[0] and len(before.input) == 7  # the exporter names Y and feeds zero states
    assert list(after.output) == ["", before.output[1]] and len(after.input) == 4
    assert "ConstantOfShape" in _ops(raw) and "ConstantOfShape" not in _ops(lean)
    x = np.random.default_rng(1).standard_normal((33, model.window, F)).astype(np.float32)
    assert np.array_equal(_run(lean, x), _run(raw, x))
    mlp = _torch_export(random_model("mlp"), 8, F)
    assert lean_recurrent(mlp) is mlp  # no recurrent node: the bytes as stored


def test_recurrent_members_run_large_cpu_batches_in_cache_sized_chunks():
    lstm, mlp = random_model("lstm", seed=14), random_model("mlp", seed=14)
    lstm_data = export_onnx(lstm, lstm.window, F)
    per_row = gate_bytes_per_row(lstm_data, lstm.window)
    assert per_row == lstm.window * 4 * 32 * 4  # window x 4 gates x hidden 32, float32
    member = OnnxModel("lstm", 1, lstm_data, DeviceConfig(), n_features=F)
    assert member.rows_per_run == GATE_BUFFER_BYTES // per_row == 64
    assert OnnxModel("mlp", 1, export_onnx(mlp, mlp.window, F), DeviceConfig(), n_features=F).rows_per_run is None
    x = np.random.default_rng(2).standard_normal((300, lstm.window, F)).astype(np.float32)
    whole = OnnxModel("lstm", 1, lstm_data, DeviceConfig(), n_features=F)
    whole.rows_per_run = None
    assert np.max(np.abs(member.run(x) - whole.run(x))) < 1e-6


def test_trained_baselines_export_with_parity(tmp_path):
    from core.synthetic import generate_bars

    bars = generate_bars(["SPY"], 600, seed=4)
    res = train_direction_model({"SPY": bars}, "lstm", epochs=1)
    assert res.metadata["onnx_torch_max_abs_diff"] < 1e-5
    assert res.metadata["window"] == 32 and res.metadata["train_samples"] > 300
    assert 0.0 <= res.metadata["holdout_hit_rate"] <= 1.0
    assert res.metadata["feature_names"] == list(FEATURE_NAMES)


def test_a_model_that_is_not_a_feature_window_member_is_refused():
    model = random_model("mlp", n_features=F + 2)
    data = export_onnx(model, model.window, F + 2)
    with pytest.raises(BadModelContract, match=f"takes {F + 2} features, this build computes {F}"):
        OnnxModel("wrong", 1, data, DeviceConfig(), n_features=F)


def test_no_gpu_assigned_means_cpu_provider_even_with_cuda_installed():
    dev = detect_device(gpu_share=0.25, intra_op_threads=2, gpu_ids=[])
    assert dev == DeviceConfig(False, 0, None, 2) and dev.providers() == ["CPUExecutionProvider"]


@pytest.mark.gpu
def test_replica_holding_a_gpu_runs_members_on_cuda_with_gpu_mem_limit():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU: torch.cuda.is_available() is False on this machine")
    share = 0.25
    dev = detect_device(gpu_share=share, intra_op_threads=1, gpu_ids=[0])
    total = torch.cuda.get_device_properties(0).total_memory
    assert dev.use_cuda and dev.gpu_mem_limit == int(total * share)
    model = random_model("lstm", seed=5)
    data = export_onnx(model, model.window, F)
    gpu = OnnxModel("lstm", 1, data, dev, n_features=F)
    assert gpu.providers[0] == "CUDAExecutionProvider" and gpu.uses_cuda
    opts = gpu.provider_options()["CUDAExecutionProvider"]
    assert int(opts["gpu_mem_limit"]) == int(total * share)
    x = np.random.default_rng(0).standard_normal((256, model.window, F)).astype(np.float32)
    cpu = OnnxModel("lstm", 1, data, DeviceConfig(), n_features=F)
    assert np.max(np.abs(gpu.run(x) - cpu.run(x))) < 1e-4  # I/O binding path against the CPU provider
    snap = ModelCache(10**9, device=dev).snapshot()
    assert snap["gpu"]["gpu_mem_limit"] == int(total * share) and snap["gpu"]["total_bytes"] == total
    print(f"CUDA provider options: gpu_mem_limit={opts['gpu_mem_limit']} of {total} bytes; providers {gpu.providers}")
