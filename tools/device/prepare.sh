#!/usr/bin/env bash
# Run on the CPU machine before a GPU check: fetches what the build needs
# that the GPU machines lack (no Debian -dev packages, no network there):
# the .debs of our header libraries and their run-time libraries, into the
# git-ignored .device-deps/debs, and unpacks them into .device-deps/prefix
# (never into /) to check that a configure finds everything there.
#   bash tools/device/prepare.sh        # then: device run, carry .device-deps/debs
set -euo pipefail
cd "$(dirname "$0")/../.."

DEPS=.device-deps
PACKAGES=(
  nlohmann-json3-dev libcli11-dev libgloo-dev
  libyaml-cpp-dev libyaml-cpp0.7
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
  libpcre2-dev libpcre2-8-0
  libgtest-dev libgmock-dev
)
LIMIT_MB=40  # of the 64 MiB that travel to the GPU machine, with the source tree

mkdir -p "$DEPS/debs"
(
  cd "$DEPS/debs"
  have=()
  for p in "${PACKAGES[@]}"; do compgen -G "${p}_*.deb" >/dev/null || have+=("$p"); done
  if ((${#have[@]})); then
    echo "[prepare] apt-get download ${have[*]}"
    if ! apt-get download "${have[@]}"; then
      # Stale or missing package lists: refresh them once.
      SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
      $SUDO apt-get update -qq
      apt-get download "${have[@]}"
    fi
  fi
)
size=$(du -sm "$DEPS/debs" | cut -f1)
echo "[prepare] $DEPS/debs: $(ls "$DEPS/debs" | wc -l) packages, ${size} MiB"
if ((size > LIMIT_MB)); then
  echo "[prepare] more than ${LIMIT_MB} MiB: too much to travel" >&2
  exit 1
fi
rm -rf "$DEPS/prefix"
mkdir -p "$DEPS/prefix"
for d in "$DEPS"/debs/*.deb; do dpkg-deb -x "$d" "$DEPS/prefix"; done
echo "[prepare] unpacked into $DEPS/prefix"
