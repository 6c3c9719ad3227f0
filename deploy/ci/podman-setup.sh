#!/usr/bin/env bash
# Makes podman able to build and run the stageformer image on a Debian machine that has no Docker
# daemon and cannot pull from a container registry (as in CI):
#   1. installs podman, buildah, runc and debootstrap with apt-get when they are missing (needs root);
#   2. builds a local base image, Debian bookworm with Python 3, that stands in for the default CPU base
#      (python:3.12-slim-bookworm), unless an image of that name exists already.
# Usage: deploy/ci/podman-setup.sh [tools|base|all]   (default: all)
# Environment: STAGEFORMER_TEST_BASE_IMAGE (default localhost/stageformer-base:bookworm),
#              DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

what=${1:-all}
base_image=${STAGEFORMER_TEST_BASE_IMAGE:-localhost/stageformer-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

install_tools() {
    local missing=() tool
    for tool in podman buildah runc debootstrap; do
        command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
    done
    if ((${#missing[@]})); then
        echo "podman-setup: installing ${missing[*]}" >&2
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

build_base() {
    if podman image exists "$base_image"; then
        return 0
    fi
    echo "podman-setup: building $base_image with debootstrap (about 2 minutes)" >&2
    rootfs=$(mktemp -d /var/tmp/stageformer-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" "$mirror" >/dev/null
    # what an image never needs: downloaded packages, package lists, documentation
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
        "$rootfs"/usr/share/doc "$rootfs"/usr/share/man "$rootfs"/usr/share/locale
    tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base_image" >/dev/null
    echo "podman-setup: $base_image ready" >&2
}

case "$what" in
    tools) install_tools ;;
    base) build_base ;;
    all) install_tools && build_base ;;
    *) echo "usage: $0 [tools|base|all]" >&2 && exit 2 ;;
esac
