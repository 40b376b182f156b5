#!/usr/bin/env bash
# Compile-checks every CUDA source without a GPU machine: Debian trixie's nvidia-cuda-toolkit (nvcc 12.4)
# in a debootstrap chroot (made once, at /opt/trixie; root and the Debian mirror needed). The real
# build is CUDA 13.0 on the GPU machine (build/device/gpu_check.sh); this only catches compile errors.
#   bash build/device/nvcc_check.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
root=${Q3N_CHROOT:-/opt/trixie}
if [ ! -x "$root/usr/bin/nvcc" ]; then
  command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap
  debootstrap --variant=minbase --components=main,contrib,non-free trixie "$root" http://deb.debian.org/debian
  echo "deb http://deb.debian.org/debian trixie main contrib non-free non-free-firmware" > "$root/etc/apt/sources.list"
  chroot "$root" bash -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit g++"
fi
mkdir -p "$root/src"
mountpoint -q "$root/src" || mount --bind "$repo" "$root/src"
trap 'umount "$root/src"' EXIT
includes="-Inative/include -Inative/src -I/usr/include"
[ -d "$repo/.carry/root/usr/include" ] && includes="$includes -I.carry/root/usr/include -I.carry/root/usr/src/googletest/googletest/include"
[ -d /usr/include/nlohmann ] && mkdir -p "$root/usr/local/include" && cp -rn /usr/include/nlohmann "$root/usr/local/include/" 2>/dev/null || true
[ -d /usr/include/gtest ] && cp -rn /usr/include/gtest "$root/usr/local/include/" 2>/dev/null || true
failed=0
for f in $(cd "$repo" && ls native/src/cuda/*.cu tests/native/cuda/*.cu bench/*.cu 2>/dev/null); do
  if out=$(chroot "$root" bash -c "cd /src && nvcc -c -std=c++20 -allow-unsupported-compiler \
        -gencode=arch=compute_90a,code=sm_90a $includes -DQ3N_WITH_CUDA=1 -DQ3N_VERSION='\"0\"' \
        -DQ3N_FIXTURE_DIR='\"/src/tests/fixtures\"' $f -o /tmp/check.o" 2>&1); then
    echo "ok   $f"
  else
    echo "FAIL $f"; echo "$out" | grep -E "error" | head -10; failed=1
  fi
done
exit $failed
