"""Train a dmoe model (`dmoe train`). With no arguments: the packaged default config
(dmoe/configs/default.yaml, the same from any directory).

    python launch/train.py                                   # one rank
    torchrun --nproc_per_node 2 launch/train.py              # plain torch engine, 2 ranks
    deepspeed --num_gpus 2 launch/train.py                   # DeepSpeed engine (ZeRO 1/2)
    srun -N2 -n4 python launch/train.py                      # Slurm
    mpirun -np 4 python launch/train.py                      # MPI (ranks via mpi4py)
    ... --config configs/default.yaml --parallel.ep=2 --moe.capacity_factor=1.5
    python launch/train.py --help                            # every config key, with defaults
    python launch/train.py --dry-run --world-size 8 --parallel.ep=4   # check and size, then exit
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dmoe.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(sys.argv[1:]))
