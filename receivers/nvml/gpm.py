"""GPU performance metrics (GPM, Hopper and newer): NVML computes them from two samples of one GPU, or of one MIG
GPU instance, as rates over the time between the samples. Each source keeps two samples (the library allocates
them) and reuses them collection after collection: the one taken last time, and one to fill now."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import metrics as M

# nvml.h's NVML_GPM_METRIC_* id -> (metric, point attributes); NVML answers percentages
GPM_METRICS = (
    (1, M.ENGINE_UTILIZATION, None),                         # GRAPHICS_UTIL
    (2, M.SM_UTILIZATION, None),                             # SM_UTIL
    (3, M.SM_OCCUPANCY, None),                               # SM_OCCUPANCY
    (5, M.PIPE_UTILIZATION, {"hw.gpu.pipe": "tensor"}),      # ANY_TENSOR_UTIL
    (11, M.PIPE_UTILIZATION, {"hw.gpu.pipe": "fp64"}),       # FP64_UTIL
    (12, M.PIPE_UTILIZATION, {"hw.gpu.pipe": "fp32"}),       # FP32_UTIL
    (13, M.PIPE_UTILIZATION, {"hw.gpu.pipe": "fp16"}),       # FP16_UTIL
    (4, M.PIPE_UTILIZATION, {"hw.gpu.pipe": "integer"}),     # INTEGER_UTIL
    (10, M.MEM_BANDWIDTH_UTILIZATION, None),                 # DRAM_BW_UTIL
)
METRICS_GET_VERSION = 1  # NVML_GPM_METRICS_GET_VERSION


def metrics_request(nvml, first, second):
    """An nvmlGpmMetricsGet_t asking GPM_METRICS of two samples (19 KB with pynvml's metric array)."""
    req = nvml.c_nvmlGpmMetricsGet_t()
    req.version, req.numMetrics, req.sample1, req.sample2 = METRICS_GET_VERSION, len(GPM_METRICS), first, second
    for i, (metric_id, _, _) in enumerate(GPM_METRICS):
        req.metrics[i].metricId = metric_id
    return req


# q(call name, function, *args): the receiver's value call (None on an error it counted; raises on a lost GPU)
Query = Callable[..., Any]


class GpmSampler:
    def __init__(self, nvml) -> None:
        self.nvml = nvml
        self._samples: dict[str, list] = {}  # source key -> [sample taken last time or None, sample to fill]
        self._request = None                  # one nvmlGpmMetricsGet_t, reused

    def sample(self, key: str, q: Query, call: str, fn, *args) -> list[tuple[M.MetricSpec, dict | None, float]]:
        """Take a sample of source `key` with fn(*args, sample); the metrics since the source's previous sample
        (none for its first sample, or when a call failed)."""
        N = self.nvml
        pair = self._samples.setdefault(key, [None, None])
        if pair[1] is None:
            pair[1] = q("nvmlGpmSampleAlloc", N.nvmlGpmSampleAlloc)
            if pair[1] is None:
                return []
        if q(call, fn, *args, pair[1]) is None:
            return []
        last, taken = pair
        pair[0], pair[1] = taken, last  # the older sample is filled next time
        if last is None:
            return []
        if self._request is None:
            self._request = metrics_request(N, last, taken)
        req = self._request
        req.sample1, req.sample2 = last, taken
        if q("nvmlGpmMetricsGet", N.nvmlGpmMetricsGet, req) is None:
            return []
        # a metric this GPU or instance does not have answers an error in its own slot: left out
        return [(spec, attrs, req.metrics[i].value / 100) for i, (_, spec, attrs) in enumerate(GPM_METRICS)
                if req.metrics[i].nvmlReturn == 0]

    def keep(self, keys: set[str]) -> None:
        """Free the samples of every source not in `keys` (gone, reconfigured, or no longer readable)."""
        for key in [k for k in self._samples if k not in keys]:
            for s in self._samples.pop(key):
                if s is not None:
                    try:
                        self.nvml.nvmlGpmSampleFree(s)
                    except self.nvml.NVMLError:
                        pass  # the sample is lost to this process either way

    def forget_gpu(self, gpu_key: str) -> None:
        """Start afresh on a GPU (and its instances) that fell off the bus: a sample from before a reset does not
        pair with one after it."""
        self.keep({k for k in self._samples if k != gpu_key and not k.startswith(f"{gpu_key}/")})

    def close(self) -> None:
        self.keep(set())

    def __contains__(self, key: str) -> bool:
        return key in self._samples
