#!/usr/bin/env bash
# Podman and the local base images the container tests build on (idempotent; seconds when done):
#   scripts/container-setup.sh
# Needs root, Debian's packages and nothing else: no registry serves base images here, so they are
# made from Debian packages with mmdebstrap and `podman import`.
#   localhost/stand-in/cuda:13.0.2-base   the CUDA base's stand-in: Debian trixie, its python3.13
#                                          (Debian has no 3.12), gcc: what the GPU image's base stage installs
#   localhost/stand-in/debian:bookworm    the CPU image's base: bookworm's python3.11, the CPU tests' Python
set -euo pipefail
SUDO=""
[ "$(id -u)" = 0 ] || SUDO=sudo  # CI here runs as root; GitHub's runners have sudo

need=()
for tool in podman buildah runc mmdebstrap fuse-overlayfs newuidmap slirp4netns; do
  command -v "$tool" >/dev/null || need+=("$tool")
done
[ -x /usr/lib/cni/bridge ] || need+=(cni)
if [ ${#need[@]} -gt 0 ]; then
  echo "== installing podman and friends (missing: ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends podman buildah runc mmdebstrap fuse-overlayfs uidmap \
    slirp4netns containernetworking-plugins debian-archive-keyring ca-certificates >/dev/null
fi

# crun (the default) fails here ("cgroups in hybrid mode not supported"); runc works. Podman's
# default ulimits ask for more than even root can raise on this machine.
conf=/etc/containers/containers.conf
if ! grep -qs '^# gams-worker container tests' "$conf"; then
  $SUDO mkdir -p /etc/containers
  $SUDO tee "$conf" >/dev/null <<'CONF'
# gams-worker container tests (scripts/container-setup.sh)
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
CONF
fi

base_image() {  # base_image NAME SUITE PACKAGES: a Debian minbase with PACKAGES, imported into podman
  local name=$1 suite=$2 packages=$3
  podman image exists "$name" && return 0
  echo "== making $name from Debian $suite (mmdebstrap, about 2 min)"
  local tarball
  tarball=$(mktemp --suffix=.tar)
  mmdebstrap --quiet --variant=minbase --include="$packages" --components=main "$suite" "$tarball" \
    http://deb.debian.org/debian
  podman import --quiet --change 'CMD ["/bin/bash"]' "$tarball" "$name" >/dev/null
  rm -f "$tarball"
}
base_image localhost/stand-in/cuda:13.0.2-base trixie \
  python3.13,python3.13-venv,python3.13-dev,gcc,libc6-dev,ca-certificates
base_image localhost/stand-in/debian:bookworm bookworm python3.11,python3.11-venv,ca-certificates
podman --version
