#!/usr/bin/env bash
# Carry what the GPU machine lacks (DALI and its codecs, webdataset, facenet-pytorch, FG-NET) in
# four `run` calls, each doing GPU work while the next part waits (see ../shared/GPU.md).
#
#   here:   bash benchmarks/gpu_carry.sh prepare
#           -> .gpuwheels-0 (webdataset, facenet-pytorch as wheels; FG-NET images and points; the
#              last piece of the packages) and .gpuwheels-1 .. -3 (the rest), each under 64 MiB
#              with the working tree, in folders git ignores.
#   there:  call 1 carries .gpuwheels-0 and may run `bash benchmarks/gpu_carry.sh early` (what
#           needs no DALI: MTCNN, the compiled step on on-device data); calls 2-4 carry -1, -2, -3,
#           back to back (a machine keeps ignored files only while warm, 30 s between calls);
#           call 4 runs `bash benchmarks/gpu_carry.sh install`. Each call then exports
#           PYTHONPATH=/tmp/agecl-site:$PWD (after `early`: /tmp/agecl-site0:$PWD).
#
# Why not the shared gpu-wheels.sh: the packages installed and then xz-compressed are 199 MB
# against 275 MB of wheels, one call fewer; and DALI's codec wheels ship nvidia/__init__.py, a
# regular package that would hide the image's own nvidia.* (cuBLAS, cuDNN ...) behind ours, so
# `install` turns it into one that spans both (pkgutil.extend_path).
set -euo pipefail
cd "$(dirname "$0")/.."
PART=${PART:-61M}  # three parts of 64.0 MB + the tree (1.8 MB) stay under the 64 MiB a call carries
FGNET=${FGNET:-../shared/data/fgnet}
EARLY="webdataset braceexpand facenet_pytorch"  # wheel-name prefixes that `early` installs

prepare() {
  for p in /.gpuwheels*; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >>.git/info/exclude; done
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  plat="--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
  # shellcheck disable=SC2046,SC2086
  python3 -m pip download -q --no-deps $plat -d "$tmp/whl" $(cat benchmarks/gpu_wheels.txt)
  # shellcheck disable=SC2086
  python3 -m pip install -q --no-index --no-deps --no-compile $plat --target "$tmp/site" "$tmp"/whl/*.whl
  echo "gpu-carry: compressing $(du -sh "$tmp/site" | cut -f1) of packages (xz, a few minutes)"
  tar -C "$tmp/site" -cf - . | xz -6 -T0 >"$tmp/site.tar.xz"
  rm -rf .gpuwheels-*
  split -b "$PART" -d -a 1 "$tmp/site.tar.xz" "$tmp/part."
  n=$(ls "$tmp"/part.* | wc -l)
  [ "$n" = 4 ] || { echo "gpu-carry: $n parts, expected 4: change PART or the calls" >&2; exit 1; }
  for i in 1 2 3; do mkdir ".gpuwheels-$i"; mv "$tmp/part.$((i - 1))" ".gpuwheels-$i/"; done
  mkdir -p .gpuwheels-0/early
  mv "$tmp/part.3" .gpuwheels-0/
  for w in $EARLY; do cp "$tmp"/whl/"$w"-*.whl .gpuwheels-0/early/; done
  sha256sum "$tmp/site.tar.xz" | cut -d' ' -f1 >.gpuwheels-0/site.sha256
  if [ -d "$FGNET/images" ]; then
    mkdir -p .gpuwheels-0/fgnet && cp -r "$FGNET/images" "$FGNET/points" .gpuwheels-0/fgnet/
  fi
  du -sh .gpuwheels-*
}

early() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/agecl-site0 .gpuwheels-0/early/*.whl
  echo "gpu-carry: webdataset and facenet-pytorch installed into /tmp/agecl-site0"
}

install() {
  for i in 0 1 2 3; do
    [ -d ".gpuwheels-$i" ] || { echo "gpu-carry: .gpuwheels-$i is not here (the machine went cold?): carry the four again" >&2; exit 3; }
  done
  cat .gpuwheels-1/part.0 .gpuwheels-2/part.1 .gpuwheels-3/part.2 .gpuwheels-0/part.3 >/tmp/agecl-site.tar.xz
  [ "$(sha256sum /tmp/agecl-site.tar.xz | cut -d' ' -f1)" = "$(cat .gpuwheels-0/site.sha256)" ] ||
    { echo "gpu-carry: checksum mismatch in the carried parts" >&2; exit 4; }
  rm -rf /tmp/agecl-site && mkdir -p /tmp/agecl-site
  xz -dc -T0 /tmp/agecl-site.tar.xz | tar -x -C /tmp/agecl-site
  echo "__path__ = __import__('pkgutil').extend_path(__path__, __name__)  # the image's nvidia.* too" \
    >>/tmp/agecl-site/nvidia/__init__.py
  echo "gpu-carry: installed into /tmp/agecl-site"
}

case "${1:-}" in
  prepare) prepare ;;
  early) early ;;
  install) install ;;
  *) echo "usage: gpu_carry.sh prepare | early | install" >&2; exit 2 ;;
esac
