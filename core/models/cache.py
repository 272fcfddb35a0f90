"""The ensemble's model cache: ONNX Runtime sessions held under a byte budget.

Ray's ``memory`` is a reservation, not a cap, so the replica enforces its own:

- a byte budget (``ensemble.cache_budget_bytes``, default a fraction of the
  ensemble role's ``memory`` in the resource table); a model is charged the
  size of its ONNX artefact, which is what its weights occupy once loaded;
- at most ``max_versions`` versions of one model (default 3);
- least recently used versions are evicted first; versions the ensemble is
  serving right now are pinned and never evicted;
- a model larger than the whole budget is refused with ``ModelTooLarge``,
  naming its size and the budget; one that would fit only by evicting a
  pinned model is refused with ``CacheFull``.

On a replica that holds a GPU, sessions run on the CUDA execution provider
with ``gpu_mem_limit`` set to the replica's share of the GPU (``num_gpus`` in
the table) and inputs and outputs bound with I/O binding; torch's per-process
memory fraction is set to the same share. Otherwise the CPU provider runs
them, with ``intra_op_num_threads`` set to the replica's CPUs: members run
concurrently in their own threads, so one session must not take every core.

Before a session is built the graph goes through
``core.onnx_graph.lean_recurrent`` (recurrent outputs nobody reads and zero
initial states dropped: the same numbers, less work), and on the CPU a
recurrent model runs batches larger than ``rows_per_run`` in chunks whose
gate buffer fits ``GATE_BUFFER_BYTES`` of cache.

A swap loads the new version beside the old one (the old keeps serving until
the new is ready), so for the length of a load the cache holds both.

Not here: which versions to serve (the ensemble asks the registry), checking
artefacts (``core.models.artefacts.ArtefactStore.load_verified``), or which GPU and
budget a Ray replica holds (``actors.model_cache``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from core.onnx_graph import gate_bytes_per_row, lean_recurrent

# The logger cluster.logs.get_logger("model_cache") names; core does not import cluster.
log = logging.getLogger("raytrade.model_cache")

Key = tuple[str, int]

# A recurrent member on the CPU runs a large batch in chunks whose gate buffer
# fits in this much cache (a core's L2 is 1-2 MiB on current x86 servers):
# 64 rows for the baseline LSTM (window 32, hidden 32: 16 KiB a row).
GATE_BUFFER_BYTES = 1 << 20
MIN_ROWS_PER_RUN = 8  # below this a session run's fixed cost outweighs the cache


class ModelTooLarge(MemoryError):
    """A model that can never fit in the cache's budget."""


class CacheFull(MemoryError):
    """A model that would fit only by evicting models being served."""


class BadModelContract(ValueError):
    """An ONNX model whose inputs/outputs are not a feature window in, positions out."""


@dataclass(frozen=True)
class DeviceConfig:
    """Where sessions run and how much of the device they may take."""

    use_cuda: bool = False
    device_id: int = 0
    gpu_mem_limit: int | None = None  # bytes, CUDA only
    intra_op_threads: int = 1

    def providers(self) -> list[Any]:
        if not self.use_cuda:
            return ["CPUExecutionProvider"]
        opts: dict[str, Any] = {"device_id": self.device_id, "arena_extend_strategy": "kSameAsRequested"}
        if self.gpu_mem_limit:
            opts["gpu_mem_limit"] = int(self.gpu_mem_limit)
        return [("CUDAExecutionProvider", opts), "CPUExecutionProvider"]


def detect_device(gpu_share: float, intra_op_threads: int, gpu_ids: list[int] | None = None) -> DeviceConfig:
    """CUDA when this process was given a GPU and CUDA works; CPU otherwise.

    ``gpu_ids`` are the GPUs Ray assigned (``ray.get_gpu_ids()``); none means
    the replica holds no GPU and runs on the CPU provider, even if the machine
    has one (it belongs to someone else's share).
    """
    threads = max(1, int(intra_op_threads))
    if not gpu_ids or gpu_share <= 0:
        return DeviceConfig(False, 0, None, threads)
    try:
        # Imported here, as below: torch takes seconds to import and onnxruntime most of one;
        # modules that only name DeviceConfig (the CLI, Tune's drivers) should not pay for them.
        import onnxruntime as ort
        import torch

        if "CUDAExecutionProvider" not in ort.get_available_providers() or not torch.cuda.is_available():
            log.warning("a GPU was assigned but CUDA is not usable here; running members on the CPU")
            return DeviceConfig(False, 0, None, threads)
        # Ray sets CUDA_VISIBLE_DEVICES to the assigned GPUs: device 0 is ours.
        total = torch.cuda.get_device_properties(0).total_memory
        share = min(1.0, float(gpu_share))
        torch.cuda.set_per_process_memory_fraction(share, 0)
        return DeviceConfig(True, 0, int(total * share), threads)
    except Exception as e:  # noqa: BLE001 - a broken driver must not take the replica down
        log.warning("CUDA setup failed (%s); running members on the CPU", e)
        return DeviceConfig(False, 0, None, threads)


class OnnxModel:
    """One version of one learned member: ``[B, L, F]`` float32 feature windows -> ``[B]`` positions."""

    def __init__(self, name: str, version: int, data: bytes, device: DeviceConfig, n_features: int | None = None):
        import onnxruntime as ort

        self.name, self.version, self.nbytes, self.device = name, int(version), len(data), device
        try:
            graph = lean_recurrent(data)
            gate_bytes = gate_bytes_per_row(graph, 1)  # per window row; times the window below
        except Exception as e:  # noqa: BLE001 - an unreadable graph is ONNX Runtime's to refuse, below
            log.warning("%s v%d: graph pass skipped (%s)", name, version, e)
            graph, gate_bytes = data, 0
        so = ort.SessionOptions()
        so.intra_op_num_threads = device.intra_op_threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        self.session = ort.InferenceSession(graph, sess_options=so, providers=device.providers())
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 3:
            shapes = [(i.name, i.shape) for i in inputs]
            raise BadModelContract(f"{name} v{version}: needs one input [batch, window, features], has {shapes}")
        _, window, feats = inputs[0].shape
        if not isinstance(window, int) or not isinstance(feats, int):
            raise BadModelContract(f"{name} v{version}: window and feature axes must be fixed, got {inputs[0].shape}")
        if n_features is not None and feats != n_features:
            raise BadModelContract(f"{name} v{version}: takes {feats} features, this build computes {n_features}")
        if inputs[0].type != "tensor(float)":
            raise BadModelContract(f"{name} v{version}: input must be float32, is {inputs[0].type}")
        out_shape = outputs[0].shape
        if len(out_shape) not in (1, 2) or (len(out_shape) == 2 and out_shape[1] not in (1, None)):
            raise BadModelContract(f"{name} v{version}: output must be [batch] or [batch, 1], is {out_shape}")
        self.window, self.n_features = int(window), int(feats)
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.providers = self.session.get_providers()
        self.uses_cuda = self.providers[0] == "CUDAExecutionProvider"
        # Rows per session run: the whole batch, except a recurrent model on
        # the CPU, whose gate buffer must stay within a core's L2 (see run()).
        per_row = 0 if self.uses_cuda else gate_bytes * self.window
        self.rows_per_run = max(MIN_ROWS_PER_RUN, GATE_BUFFER_BYTES // per_row) if per_row else None

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x[:, -self.window:, :], dtype=np.float32)
        if self.uses_cuda:
            import onnxruntime as ort

            # I/O binding: the input is copied to the device once and the output
            # stays there until the one copy back, instead of ORT staging both.
            binding = self.session.io_binding()
            binding.bind_ortvalue_input(
                self.input_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", self.device.device_id)
            )
            binding.bind_output(self.output_name, "cuda", self.device.device_id)
            self.session.run_with_iobinding(binding)
            y = binding.copy_outputs_to_cpu()[0]
        elif self.rows_per_run is None or x.shape[0] <= self.rows_per_run:
            y = self.session.run([self.output_name], {self.input_name: x})[0]
        else:
            # ONNX Runtime's CPU LSTM writes every step's gates for the whole
            # batch before the recurrence reads them back ([window, batch, 4 x
            # hidden] floats: 4 MiB for the baseline at batch 256). In chunks
            # of rows_per_run rows that buffer stays in L2; the rows are
            # independent, so the answer is the same (to float rounding).
            # Slices of a C-ordered batch are views: no copy.
            n = self.rows_per_run
            y = np.concatenate([
                np.asarray(self.session.run([self.output_name], {self.input_name: x[i:i + n]})[0]).reshape(-1)
                for i in range(0, x.shape[0], n)
            ])
        return np.asarray(y, dtype=np.float64).reshape(x.shape[0])

    def provider_options(self) -> dict[str, Any]:
        return self.session.get_provider_options()


@dataclass
class _Entry:
    model: Any
    nbytes: int
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)


class ModelCache:
    """LRU cache of loaded model versions under a byte budget."""

    def __init__(
        self,
        budget_bytes: int,
        max_versions: int = 3,
        build: Callable[[str, int, bytes], Any] | None = None,
        device: DeviceConfig | None = None,
        n_features: int | None = None,
    ):
        if budget_bytes <= 0 or max_versions < 1:
            raise ValueError("budget_bytes must be > 0 and max_versions >= 1")
        self.budget_bytes = int(budget_bytes)
        self.max_versions = int(max_versions)
        self.device = device or DeviceConfig()
        self._build = build or (lambda n, v, data: OnnxModel(n, v, data, self.device, n_features))
        self._entries: OrderedDict[Key, _Entry] = OrderedDict()  # oldest use first
        self._pinned: set[Key] = set()
        self._lock = threading.RLock()
        self._loading: dict[Key, threading.Lock] = {}
        self.evictions: list[Key] = []

    # -- accounting -------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def keys(self) -> list[Key]:
        """Cached versions, least recently used first."""
        with self._lock:
            return list(self._entries)

    def __contains__(self, key: Key) -> bool:
        with self._lock:
            return key in self._entries

    def pin(self, keys: set[Key] | list[Key]) -> None:
        """The versions being served now; they are never evicted."""
        with self._lock:
            self._pinned = {(n, int(v)) for n, v in keys}

    # -- loading -----------------------------------------------------------------------
    def get(self, name: str, version: int, fetch: Callable[[], bytes]) -> Any:
        """The loaded version, loading it (``fetch()`` gives the checked bytes) if absent."""
        key = (name, int(version))
        with self._lock:
            e = self._entries.get(key)
            if e is not None:
                self._entries.move_to_end(key)
                e.last_used = time.time()
                return e.model
            load_lock = self._loading.setdefault(key, threading.Lock())
        with load_lock:  # one load per version, however many callers ask at once
            with self._lock:
                if key in self._entries:
                    return self.get(name, version, fetch)
            try:
                data = fetch()
                size = len(data)
                self._plan(key, size)  # refuse before paying for a session
                model = self._build(name, int(version), data)
                with self._lock:
                    for victim in self._plan(key, size):
                        self._evict(victim)
                    self._entries[key] = _Entry(model, size)
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            log.info("loaded %s v%d (%d bytes); cache %d/%d bytes", name, version, size, self.used_bytes, self.budget_bytes)
            return model

    def _plan(self, key: Key, size: int) -> list[Key]:
        """Versions to evict, least recently used first, so ``key`` fits; raises if it cannot."""
        name = key[0]
        if size > self.budget_bytes:
            raise ModelTooLarge(
                f"{name} v{key[1]} is {size:,} bytes and the model cache's budget is {self.budget_bytes:,} bytes: "
                "it can never fit. Raise ensemble.cache_budget_bytes (or the ensemble role's memory) or use a smaller model."
            )
        with self._lock:
            victims: list[Key] = []
            same = [k for k in self._entries if k[0] == name]
            while len(same) - len([v for v in victims if v[0] == name]) >= self.max_versions:
                cand = [k for k in same if k not in self._pinned and k not in victims]
                if not cand:
                    break
                victims.append(cand[0])
            used = sum(e.nbytes for k, e in self._entries.items() if k not in victims)
            for k in self._entries:
                if used + size <= self.budget_bytes:
                    break
                if k in self._pinned or k in victims:
                    continue
                victims.append(k)
                used -= self._entries[k].nbytes
            if used + size > self.budget_bytes:
                pinned = ", ".join(f"{n} v{v}" for n, v in sorted(self._pinned & set(self._entries)))
                raise CacheFull(
                    f"{name} v{key[1]} ({size:,} bytes) does not fit in the model cache's budget of "
                    f"{self.budget_bytes:,} bytes beside the models being served ({pinned}); "
                    "raise ensemble.cache_budget_bytes or serve fewer models."
                )
            return victims

    def _evict(self, key: Key) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.evictions.append(key)
            log.info("evicted %s v%d (%d bytes, least recently used)", key[0], key[1], e.nbytes)

    def evict(self, key: Key) -> bool:
        with self._lock:
            if key in self._pinned:
                return False
            present = key in self._entries
            self._evict(key)
            return present

    # -- reporting ----------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            models = {f"{n}@v{v}": e.nbytes for (n, v), e in self._entries.items()}
            pinned = sorted(f"{n}@v{v}" for n, v in self._pinned & set(self._entries))
        return {
            "models": models,
            "pinned": pinned,
            "cache_bytes": sum(models.values()),
            "budget_bytes": self.budget_bytes,
            "max_versions": self.max_versions,
            "rss_bytes": process_rss(),
            "gpu": gpu_memory(self.device),
        }


def process_rss() -> int:
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def gpu_memory(device: DeviceConfig) -> dict[str, Any] | None:
    if not device.use_cuda:
        return None
    try:
        import torch

        free, total = torch.cuda.mem_get_info(device.device_id)
        return {
            "device": device.device_id,
            "used_bytes": int(total - free),
            "total_bytes": int(total),
            "gpu_mem_limit": device.gpu_mem_limit,
            "torch_allocated_bytes": int(torch.cuda.memory_allocated(device.device_id)),
        }
    except Exception as e:  # noqa: BLE001
        return {"error": str(e)}
