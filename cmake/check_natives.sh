#!/usr/bin/env bash
# The portability check of the release natives (run by Maven in every build, on the libraries the
# platform jars hold): fails when a library
# - needs a glibc newer than GLIBC_MAX (a GLIBC_x.y version above it in its dynamic symbols),
# - needs a libstdc++ newer than GLIBCXX_MAX (the one the presets' libtorch needs already),
# - has an RPATH/RUNPATH entry other than $ORIGIN (a build directory, or any absolute path),
# - or is not stripped (has a .symtab).
# Usage: check_natives.sh GLIBC_MAX GLIBCXX_MAX LIBRARY...
#   e.g. check_natives.sh 2.28 3.4.30 target/natives/*/dev/gspo4j/internal/*/*.so
set -euo pipefail
glibc_max=$1
glibcxx_max=$2
shift 2
[ $# -gt 0 ] || { echo "check_natives: no library given" >&2; exit 2; }
# newer A B: whether version A is above version B.
newer() { [ "$1" != "$2" ] && [ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | tail -1)" = "$1" ]; }
failed=0
for lib in "$@"; do
  [ -f "$lib" ] || { echo "check_natives: $lib: no such file" >&2; failed=1; continue; }
  before=$failed
  failed=0
  symbols=$(objdump -T "$lib")
  glibc=$(grep -oE '\(GLIBC_[0-9.]+\)' <<<"$symbols" | tr -d '()' | sed 's/GLIBC_//' | sort -uV | tail -1 || true)
  glibcxx=$(grep -oE '\(GLIBCXX_[0-9.]+\)' <<<"$symbols" | tr -d '()' | sed 's/GLIBCXX_//' | sort -uV | tail -1 || true)
  if [ -n "$glibc" ] && newer "$glibc" "$glibc_max"; then
    echo "check_natives: $lib needs GLIBC_$glibc, above the bound $glibc_max:" >&2
    grep -E "\(GLIBC_[0-9.]+\)" <<<"$symbols" | while read -r line; do
      v=$(grep -oE 'GLIBC_[0-9.]+' <<<"$line" | sed 's/GLIBC_//')
      if newer "$v" "$glibc_max"; then echo "  $line" >&2; fi
    done
    failed=1
  fi
  if [ -n "$glibcxx" ] && newer "$glibcxx" "$glibcxx_max"; then
    echo "check_natives: $lib needs GLIBCXX_$glibcxx, above the bound $glibcxx_max" >&2
    failed=1
  fi
  paths=$(objdump -p "$lib" | awk '$1 == "RPATH" || $1 == "RUNPATH" {print $2}')
  for entry in ${paths//:/ }; do
    case "$entry" in
      '$ORIGIN' | '$ORIGIN/') ;;
      *) echo "check_natives: $lib has the RUNPATH entry '$entry' (only \$ORIGIN is allowed)" >&2; failed=1 ;;
    esac
  done
  if objdump -h "$lib" | grep -qE '[[:space:]]\.symtab[[:space:]]' || readelf -S "$lib" 2>/dev/null | grep -q '\.symtab'; then
    echo "check_natives: $lib is not stripped (has .symtab)" >&2
    failed=1
  fi
  if [ $failed = 0 ]; then
    echo "check_natives: $(basename "$(dirname "$lib")")/$(basename "$lib"): GLIBC_${glibc:-none} <= $glibc_max, GLIBCXX_${glibcxx:-none} <= $glibcxx_max, RUNPATH '${paths}', stripped"
  fi
  failed=$((failed | before))
done
exit $failed
