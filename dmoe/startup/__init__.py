"""Start-up: from a launched process to a rank with a config, a device and a process group.

    launchers.py      which launcher started us (torchrun, deepspeed, srun, mpirun, python)
                      and this process's rank / world size / local rank
    process_group.py  threads, device, backend, the default process group; free ports
    command.py        the shared start-up of `dmoe train` and the tools: logging, config
                      checks, one-line errors, --nproc re-launch under torchrun
A new launcher is taught in launchers.py; the user-facing scripts stay in launch/.
"""
