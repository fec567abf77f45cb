#!/usr/bin/env bash
# Builds dmoe's image and trains with it on two "nodes" (two containers, --network host),
# with no registry: dockerd started by hand (data under a temp dir), the base image made by
# debootstrap and `docker import`. Used by tests/system/test_docker.py; runnable alone:
#   tests/system/docker_two_nodes.sh WORKDIR      (root; Debian docker.io and debootstrap)
# Leaves WORKDIR/result.env (timings) and WORKDIR/shared (data, run, checkpoints); stops the
# daemon and removes its data on exit. DMOE_DOCKER_KEEP_BASE=DIR caches the base image tar.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)
W=${1:?usage: docker_two_nodes.sh WORKDIR}
mkdir -p "$W"
W=$(cd "$W" && pwd)
D=$(mktemp -d /tmp/dmoe-docker.XXXXXX)     # the daemon's files: short (unix socket paths < 108)
mkdir -p "$W/shared"
chmod 777 "$W/shared"                      # the image runs as uid 1000
export DOCKER_HOST=unix://$D/docker.sock
MIRROR=$(sed -n 's/^URIs: *//p; s/^deb \(\[[^]]*\] \)\?\(http[^ ]*\) .*/\2/p' \
         /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | grep -v security | head -n 1) || true
MIRROR=${MIRROR:-http://deb.debian.org/debian}
t0=$SECONDS
stamp() { echo "$1=$((SECONDS - t0))" >> "$W/result.env"; echo "== $1 at $((SECONDS - t0)) s" >&2; }
: > "$W/result.env"

cleanup() {
  set +e
  docker rm -f dmoe-node0 dmoe-node1 >/dev/null 2>&1
  if [[ -n ${dpid:-} ]]; then
    kill "$dpid" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.2; done
  fi
  umount "$D/exec/netns/default" 2>/dev/null
  grep -o " $D[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount 2>/dev/null
  rm -rf "$D"
}
trap cleanup EXIT

dockerd --data-root "$D/data" --exec-root "$D/exec" --pidfile "$D/pid" -H "$DOCKER_HOST" \
  --iptables=false --ip6tables=false --bridge=none --storage-driver=vfs > "$W/dockerd.log" 2>&1 &
dpid=$!
for _ in $(seq 100); do docker info >/dev/null 2>&1 && break; sleep 0.2; done
docker info >/dev/null
stamp dockerd_up

# the base image: Debian bookworm minbase (no registry to pull python:3.11-slim from)
base_tar=${DMOE_DOCKER_KEEP_BASE:-$W}/bookworm-minbase.tar
if [[ ! -s $base_tar ]]; then
  mkdir -p "$(dirname "$base_tar")"
  debootstrap --variant=minbase bookworm "$W/rootfs" "$MIRROR" > "$W/debootstrap.log" 2>&1
  tar -C "$W/rootfs" -c . > "$base_tar"
  rm -rf "$W/rootfs"
fi
docker import "$base_tar" dmoe-base:bookworm >/dev/null
stamp base_image

# build context: the files the Dockerfile copies, plus torch's wheel as this machine's pip
# finds it (no multi-GB CUDA download inside the build)
ctx=$W/context
rm -rf "$ctx"
mkdir -p "$ctx/wheels" "$ctx/certs"
(cd "$REPO" && cp -r dmoe launch configs docker requirements.txt constraints.txt pyproject.toml README.md .dockerignore "$ctx/")
# this machine's extra CA certificates (registries may be reached through a TLS proxy)
cp /usr/local/share/ca-certificates/*.crt "$ctx/certs/" 2>/dev/null || true
torch_spec=$("$REPO/.venv/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])")
"$REPO/.venv/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$ctx/wheels" "$torch_spec" \
  > "$W/wheel.log" 2>&1 || echo "no local torch wheel: the build downloads it" >&2
docker build --network host -f "$ctx/docker/Dockerfile" --build-arg BASE=dmoe-base:bookworm \
  --build-arg TORCH_SPEC="$torch_spec" -t dmoe:test "$ctx" > "$W/build.log" 2>&1
rm -rf "$ctx"
stamp image_built

# two nodes, one rank each, EP=2 across them; data, run and checkpoints on the shared volume.
# Both containers share the host's name and their torchruns the same PID, so each gets its
# own LOCAL_ADDR (127.0.0.x are all this machine) to tell them apart in the rendezvous.
port=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
args=(--config configs/default.yaml --model.d_model=32 --model.n_layers=2 --model.n_heads=2
      --model.seq_len=32 --model.ffn_dim=64 --moe.num_experts=4 --moe.expert_ffn_dim=32 --moe.every=1
      --parallel.ep=2 --train.steps=12 --train.micro_batch_size=8 --train.warmup_steps=1
      --train.log_every=4 --train.eval_every=6 --train.eval_batches=2 --train.lr=0.01
      --train.save_every=12 --train.overwrite=true --data.max_corpus_mb=0.5
      --data.data_dir=/workspace/data --train.run_dir=/workspace/run)
for i in 0 1; do
  docker run -d --name "dmoe-node$i" --network host -v "$W/shared:/workspace" \
    -e NNODES=2 -e NODE_RANK="$i" -e NPROC_PER_NODE=1 -e MASTER_ADDR=127.0.0.1 -e MASTER_PORT="$port" \
    -e LOCAL_ADDR="127.0.0.$((i + 1))" \
    -e RDZV_ID=dmoe-test -e DMOE_NO_PROGRESS=1 dmoe:test "${args[@]}" > /dev/null
done
rc0=$(docker wait dmoe-node0)
rc1=$(docker wait dmoe-node1)
docker logs dmoe-node0 > "$W/node0.log" 2>&1
docker logs dmoe-node1 > "$W/node1.log" 2>&1
echo "rc0=$rc0" >> "$W/result.env"
echo "rc1=$rc1" >> "$W/result.env"
stamp trained
