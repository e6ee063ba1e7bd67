#!/usr/bin/env bash
# Builds local base images with no image registry at all:
#   debootstrap (Debian minbase) → docker import → node / python from Debian
#   packages on top, with the host CA bundle trusted.
# `make images-local` then builds meshbox's runner images on these bases.
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CA=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
work=target/local-images
mkdir -p "$work"

if ! docker image inspect "meshbox-local/debian:$SUITE" >/dev/null 2>&1; then
  echo "debootstrap $SUITE (minbase) …"
  rm -rf "$work/rootfs"
  debootstrap --variant=minbase "$SUITE" "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log"; exit 1; }
  tar -C "$work/rootfs" -c . | docker import - "meshbox-local/debian:$SUITE" >/dev/null
  rm -rf "$work/rootfs"
fi

build_base() { # name, packages…
  local name=$1; shift
  local ctx="$work/$name"
  rm -rf "$ctx"; mkdir -p "$ctx"
  cp "$CA" "$ctx/ca-bundle.pem"
  cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM meshbox-local/debian:$SUITE
COPY ca-bundle.pem /usr/local/share/ca-certificates/meshbox-host-bundle.crt
RUN apt-get update -qq \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $* >/dev/null \\
 && rm -rf /var/lib/apt/lists/* \\
 && cat /usr/local/share/ca-certificates/meshbox-host-bundle.crt >> /etc/ssl/certs/ca-certificates.crt
DOCKERFILE
  echo "building meshbox-local/$name:$SUITE …"
  docker build -q -t "meshbox-local/$name:$SUITE" "$ctx" >/dev/null
}

docker image inspect "meshbox-local/node:$SUITE" >/dev/null 2>&1 \
  || build_base node nodejs npm git ca-certificates
docker image inspect "meshbox-local/python:$SUITE" >/dev/null 2>&1 \
  || build_base python python3 python3-venv python3-pip git ca-certificates
echo "local base images ready"
