#!/usr/bin/env bash
# Debian packages the test suite needs beyond Python: a Slurm cluster started by the tests
# themselves (tests/system/slurm_cluster.sh: munged, slurmctld, two slurmd; no systemd).
# `scripts/system-deps.sh docker`: what tests/system/test_docker.py needs instead (Debian's
# docker engine, started by the test itself, and debootstrap for a local base image).
# Installs only what is missing; `apt-get update` at most once. Needs root or sudo.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
PACKAGES=(slurmctld slurmd slurm-client munge)
[[ ${1:-} == docker ]] && PACKAGES=(docker.io debootstrap)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
(( ${#missing[@]} )) || exit 0
sudo=()
(( EUID == 0 )) || sudo=(sudo -E)
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
