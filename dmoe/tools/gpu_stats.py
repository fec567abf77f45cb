"""GPU counters through NVML (nvidia-ml-py), or one line saying why there are none.

    probe = GpuProbe(local_rank)      # never raises
    probe.note                        # "no GPU: NVML library not found" when unavailable
    probe.sample()                    # {} or {gpu_util, mem_used_gb, pcie_tx_mbps, ...}
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class GpuProbe:
    def __init__(self, index: int = 0):
        self.handle, self.nvml, self.note = None, None, ""
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.nvml = pynvml
            self.note = f"GPU {index}: {_text(pynvml.nvmlDeviceGetName(self.handle))}"
        except Exception as err:  # NVMLError_LibraryNotFound, no device, no package
            self.note = f"no GPU: {_reason(err)}"

    def sample(self) -> dict:
        """Utilisation, memory, PCIe and NVLink throughput now; a counter that fails is left out."""
        if self.handle is None:
            return {}
        n, h, out = self.nvml, self.handle, {}
        _try(out, "gpu_util_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu)
        _try(out, "mem_used_gb", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 1e9)
        _try(out, "pcie_tx_mbps", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) / 1e3)
        _try(out, "pcie_rx_mbps", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) / 1e3)
        _try(out, "nvlink_tx_kib", lambda: _nvlink(n, h, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX))
        _try(out, "nvlink_rx_kib", lambda: _nvlink(n, h, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX))
        return out


def _nvlink(n, h, field_id):
    """Cumulative NVLink data counter (KiB), summed over links (scope 0xFFFFFFFF = all)."""
    values = n.nvmlDeviceGetFieldValues(h, [(field_id, 0xFFFFFFFF)])
    return float(values[0].value.ullVal)


def _try(out: dict, key: str, fn) -> None:
    try:
        out[key] = float(fn())
    except Exception:  # counter unsupported on this device or driver
        pass


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(err: Exception) -> str:
    name = type(err).__name__
    if "LibraryNotFound" in name:
        return "NVML library not found"
    return f"{name}: {err}".splitlines()[0][:120]
