"""Slurm rank and address detection, without Slurm (scontrol is stubbed)."""
import pytest

from dmoe.startup import launchers
from dmoe.startup.launchers import slurm_tasks_on_node


@pytest.mark.parametrize("spec,node,expected",
                         [("1(x2)", 1, 1), ("2(x3),1", 0, 2), ("2(x3),1", 3, 1), ("4", 0, 4)])
def test_slurm_tasks_on_node(spec, node, expected):
    assert slurm_tasks_on_node(spec, node) == expected


def fake_scontrol(node_line):
    def run(*args):
        return "vn1\nvn2\n" if args[:2] == ("show", "hostnames") else node_line
    return run


def test_master_addr_is_node_addr_when_the_name_does_not_resolve(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "vn[1-2]")
    node = "NodeName=vn1 Arch=x86_64 NodeAddr=127.0.0.1 Port=16818"
    monkeypatch.setattr(launchers, "_scontrol", fake_scontrol(node))

    def no_dns(*args):
        raise OSError("Name or service not known")
    monkeypatch.setattr(launchers.socket, "getaddrinfo", no_dns)
    assert launchers._slurm_master_addr() == "127.0.0.1"


def test_master_addr_is_the_first_host_name_when_it_resolves(monkeypatch):
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_STEP_NODELIST", "vn[1-2]")
    monkeypatch.setattr(launchers, "_scontrol", fake_scontrol("NodeName=vn1 NodeAddr=10.0.0.9"))
    monkeypatch.setattr(launchers.socket, "getaddrinfo", lambda *a: [])
    assert launchers._slurm_master_addr() == "vn1"
