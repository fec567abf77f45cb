"""NVML lookups with a fake pynvml: by UUID (then PCI bus id), never by CUDA ordinal, and
every return code checked."""
from types import SimpleNamespace

from dmoe.tools.gpu_stats import GpuProbe


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


class FakeNVML:
    """Two GPUs in NVML's numbering; CUDA sees only the second (CUDA_VISIBLE_DEVICES=1)."""
    NVMLError = NVMLError
    NVML_SUCCESS, NVML_PCIE_UTIL_TX_BYTES, NVML_PCIE_UTIL_RX_BYTES = 0, 0, 1
    NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_TX, NVML_FI_DEV_NVLINK_THROUGHPUT_DATA_RX = 138, 139
    GPUS = {"GPU-aaaa": ("00000000:1b:00.0", b"H200 #0"), "GPU-bbbb": ("00000000:9c:00.0", b"H200 #1")}

    def __init__(self, uuid_works=True):
        self.uuid_works, self.calls = uuid_works, []

    def nvmlInit(self):
        self.calls.append("init")

    def nvmlDeviceGetHandleByIndex(self, i):
        raise AssertionError("looked up by index")

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if not self.uuid_works or uuid not in self.GPUS:
            raise NVMLError("Not Found")
        return uuid

    def nvmlDeviceGetHandleByPciBusId_v2(self, pci):
        for uuid, (bus, _) in self.GPUS.items():
            if bus == pci:
                return uuid
        raise NVMLError("Not Found")

    def nvmlDeviceGetName(self, h):
        return self.GPUS[h][1]

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=42)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=3e9)

    def nvmlDeviceGetPcieThroughput(self, h, which):
        raise NVMLError_NotSupported("Not Supported")

    def nvmlDeviceGetFieldValues(self, h, fields):
        # a field value with its own failing return code (NVML_ERROR_NOT_SUPPORTED = 3)
        return [SimpleNamespace(nvmlReturn=3, value=SimpleNamespace(ullVal=7))]


def test_lookup_by_uuid_not_ordinal():
    nvml = FakeNVML()
    probe = GpuProbe(0, nvml=nvml, ids=("GPU-bbbb", "00000000:9c:00.0"))
    assert probe.handle == "GPU-bbbb" and "H200 #1" in probe.note and "uuid" in probe.note


def test_falls_back_to_pci_bus_id():
    probe = GpuProbe(0, nvml=FakeNVML(uuid_works=False), ids=("GPU-bbbb", "00000000:9c:00.0"))
    assert probe.handle == "GPU-bbbb" and "pci 00000000:9c:00.0" in probe.note


def test_unknown_device_is_a_note_not_a_crash():
    probe = GpuProbe(0, nvml=FakeNVML(uuid_works=False), ids=("GPU-cccc", "00000000:01:00.0"))
    assert probe.handle is None and probe.note.startswith("no GPU:") and "GPU-cccc" in probe.note
    assert probe.sample() == {}
    assert GpuProbe(None).note == "no GPU: a CPU run"


def test_failed_counters_are_reported_and_not_asked_again():
    nvml = FakeNVML()
    probe = GpuProbe(0, nvml=nvml, ids=("GPU-aaaa", "00000000:1b:00.0"))
    assert probe.sample() == {"gpu_util_pct": 42.0, "mem_used_gb": 3.0}
    assert set(probe.errors) == {"pcie_tx_mbps", "pcie_rx_mbps", "nvlink_tx_kib", "nvlink_rx_kib"}
    assert "NotSupported" in probe.errors["pcie_tx_mbps"]
    assert probe.sample() == {"gpu_util_pct": 42.0, "mem_used_gb": 3.0}
