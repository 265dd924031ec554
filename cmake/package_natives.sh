#!/usr/bin/env bash
# Lays out the release natives for the platform jars (Maven, prepare-package), then checks them:
#   OUT/linux-x86_64/dev/gspo4j/internal/linux-x86_64/      libgspo4j.so (CPU kernels) + JNI glue
#   OUT/linux-x86_64-gpu/dev/gspo4j/internal/linux-x86_64-gpu/  libgspo4j.so (CPU + CUDA) + JNI glue
# The second only when the CMake build made the CUDA flavour (stage/linux-x86_64-gpu).
# Usage: package_natives.sh NATIVE_BUILD GLUE_DIR OUT GLIBC_MAX GLIBCXX_MAX
set -euo pipefail
build=$1 glue=$2 out=$3 glibc_max=$4 glibcxx_max=$5
rm -rf "$out"
for platform in linux-x86_64 linux-x86_64-gpu; do
  [ -d "$build/stage/$platform" ] || continue
  dir="$out/$platform/dev/gspo4j/internal/$platform"
  mkdir -p "$dir"
  cp "$build/stage/$platform/libgspo4j.so" "$glue"/libjni*.so "$dir/"
done
[ -d "$out/linux-x86_64" ] || { echo "package_natives: $build/stage/linux-x86_64 is missing" >&2; exit 1; }
exec "$(dirname "$0")/check_natives.sh" "$glibc_max" "$glibcxx_max" "$out"/*/dev/gspo4j/internal/*/*.so
