"""GPU counters through NVML (nvidia-ml-py), or one line saying why there are none.

    probe = GpuProbe(cuda_ordinal)    # never raises; None: a CPU run
    probe.note                        # "no GPU: NVML library not found" when unavailable
    probe.sample()                    # {} or {gpu_util, mem_used_gb, pcie_tx_mbps, ...}
    probe.errors                      # counters NVML refused: {name: its NVML error}

The NVML device is found by the CUDA device's UUID (then its PCI bus id), never by the
CUDA ordinal: NVML numbers every GPU of the machine and ignores CUDA_VISIBLE_DEVICES, so
ordinal i is another GPU as soon as that variable is set (srun --gpus-per-task, docker
--gpus). Every NVML call's return code is checked (pynvml raises NVMLError on anything
but NVML_SUCCESS): a failed lookup is the note, a failed counter goes to `errors`.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def cuda_device_ids(ordinal: int) -> tuple[str, str]:
    """(NVML UUID "GPU-...", PCI bus id "dddddddd:bb:dd.0") of CUDA device `ordinal`."""
    import torch

    props = torch.cuda.get_device_properties(ordinal)
    uuid = str(props.uuid)
    uuid = uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"
    pci = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return uuid, pci


def nvml_handle(nvml, uuid: str, pci: str):
    """The NVML handle for a UUID, else for a PCI bus id; (handle, how it was found)."""
    try:
        return nvml.nvmlDeviceGetHandleByUUID(uuid), f"uuid {uuid}"
    except nvml.NVMLError as err:
        first = err
    try:
        by_pci = getattr(nvml, "nvmlDeviceGetHandleByPciBusId_v2", None) or nvml.nvmlDeviceGetHandleByPciBusId
        return by_pci(pci), f"pci {pci}"
    except nvml.NVMLError as err:
        raise LookupError(f"NVML has no device with {uuid} ({_text(first)}) or PCI bus id {pci} "
                          f"({_text(err)})") from err


class GpuProbe:
    def __init__(self, cuda_ordinal: int | None = 0, nvml=None, ids: tuple[str, str] | None = None):
        self.handle, self.nvml, self.note, self.errors = None, None, "", {}
        if cuda_ordinal is None:
            self.note = "no GPU: a CPU run"
            return
        try:
            if nvml is None:
                import pynvml as nvml
            nvml.nvmlInit()
            uuid, pci = ids or cuda_device_ids(cuda_ordinal)
            self.handle, how = nvml_handle(nvml, uuid, pci)
            self.nvml = nvml
            self.note = f"GPU cuda:{cuda_ordinal} ({how}): {_text(nvml.nvmlDeviceGetName(self.handle))}"
        except Exception as err:  # NVMLError_LibraryNotFound, no device, no package, no CUDA
            self.handle, self.note = None, f"no GPU: {_reason(err)}"

    def sample(self) -> dict:
        """Utilisation, memory, PCIe and NVLink throughput now; a counter that fails is left out
        (and its NVML error kept in self.errors, logged once)."""
        if self.handle is None:
            return {}
        n, h, out = self.nvml, self.handle, {}
        self._try(out, "gpu_util_pct", lambda: n.nvmlDeviceGetUtilizationRates(h).gpu)
        self._try(out, "mem_used_gb", lambda: n.nvmlDeviceGetMemoryInfo(h).used / 1e9)
        self._try(out, "pcie_tx_mbps", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_TX_BYTES) / 1e3)
        self._try(out, "pcie_rx_mbps", lambda: n.nvmlDeviceGetPcieThroughput(h, n.NVML_PCIE_UTIL_RX_BYTES) / 1e3)
        self._try(out, "nvlink_tx_kib", lambda: _nvlink(n, h, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX))
        self._try(out, "nvlink_rx_kib", lambda: _nvlink(n, h, n.NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX))
        return out

    def _try(self, out: dict, key: str, fn) -> None:
        if key in self.errors:
            return  # refused once (unsupported on this device or driver): not asked again
        try:
            out[key] = float(fn())
        except Exception as err:
            self.errors[key] = _reason(err)
            log.info("NVML counter %s unavailable: %s", key, self.errors[key])


def _nvlink(n, h, field_id):
    """Cumulative NVLink data counter (KiB), summed over links (scope 0xFFFFFFFF = all).
    Field values carry their own return code (nvmlReturn): checked here."""
    values = n.nvmlDeviceGetFieldValues(h, [(field_id, 0xFFFFFFFF)])
    ret = getattr(values[0], "nvmlReturn", 0)
    if ret != getattr(n, "NVML_SUCCESS", 0):
        raise n.NVMLError(ret)
    return float(values[0].value.ullVal)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _reason(err: Exception) -> str:
    name = type(err).__name__
    if "LibraryNotFound" in name:
        return "NVML library not found"
    return f"{name}: {err}".splitlines()[0][:120]
