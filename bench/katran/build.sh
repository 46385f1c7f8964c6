#!/usr/bin/env bash
# Build Katran's XDP balancer (katran/lib/bpf/balancer.bpf.c) from a checkout the user
# provides, the way Katran's own build_bpf_modules_opensource.sh + katran/lib/Makefile-bpf do
# it, with Debian's clang/llvm instead of the clang 12 tarball that script downloads.
#
#   bench/katran/build.sh KATRAN_SRC [OUT_DIR]     (OUT_DIR defaults to build/katran)
#
# Writes OUT_DIR/balancer.bpf.o and OUT_DIR/commit (the checkout's commit, or "unknown").
# Idempotent: installs clang, llvm and bpftool from apt only when missing, and rebuilds only
# when the sources are newer than the object. Every adaptation is listed in
# bench/katran/README.md.
set -euo pipefail

SRC=${1:?usage: bench/katran/build.sh KATRAN_SRC [OUT_DIR]}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${2:-$HERE/../../build/katran}
SRC=$(cd "$SRC" && pwd)
[ -f "$SRC/katran/lib/bpf/balancer.bpf.c" ] || {
	echo "build.sh: $SRC is not a Katran checkout (no katran/lib/bpf/balancer.bpf.c)" >&2
	exit 2
}

need=()
command -v clang >/dev/null || need+=(clang)
command -v llc >/dev/null || need+=(llvm)
command -v bpftool >/dev/null || need+=(bpftool)
if [ ${#need[@]} -gt 0 ]; then
	echo "build.sh: installing ${need[*]} (apt)" >&2
	apt-get install -y "${need[@]}" >/dev/null || {
		apt-get update >/dev/null && apt-get install -y "${need[@]}" >/dev/null
	}
fi

mkdir -p "$OUT/bpfprog/include"
OUT=$(cd "$OUT" && pwd)
OBJ="$OUT/balancer.bpf.o"
commit=$(git -C "$SRC" rev-parse HEAD 2>/dev/null || echo unknown)
# A tree without .git (git archive): the caller may name the commit in KATRAN_COMMIT.
[ "$commit" = unknown ] && [ -n "${KATRAN_COMMIT:-}" ] && commit=$KATRAN_COMMIT

newer=$(find "$SRC/katran/lib/bpf" "$SRC/katran/lib/linux_includes" -newer "$OBJ" 2>/dev/null | head -1 || true)
if [ -f "$OBJ" ] && [ -z "$newer" ] && [ "$(cat "$OUT/commit" 2>/dev/null)" = "$commit" ]; then
	echo "$OBJ"
	exit 0
fi

# As build_bpf_modules_opensource.sh lays it out: the sources under katran/lib/, the
# linux_includes also copied flat into include/ (Makefile-bpf's -I$(obj)/include).
B="$OUT/bpfprog"
rm -rf "$B/katran"
mkdir -p "$B/katran/lib"
cp -r "$SRC/katran/lib/bpf" "$SRC/katran/lib/linux_includes" "$B/katran/lib/"
cp "$SRC"/katran/lib/linux_includes/* "$B/include/"

# Makefile-bpf's rule, flags verbatim (EXTRA_CFLAGS empty: the default build):
#   $(CLANG) $(INCLUDEFLAGS) $(EXTRA_CFLAGS) $(DEBUGBPF) -D__KERNEL__ -Wno-unused-value
#   -Wno-pointer-sign -Wno-compare-distinct-pointer-types -O2 -emit-llvm -c -g $< -o - |
#   $(LLC) -march=bpf -filetype=obj -o $@
# INCLUDEFLAGS = -I$(obj)/usr/include -I$(obj)/include -I$(obj); DEBUGBPF = -DDEBUG.
clang -I"$B/usr/include" -I"$B/include" -I"$B" ${KATRAN_CFLAGS:-} -DDEBUG -D__KERNEL__ \
	-Wno-unused-value -Wno-pointer-sign -Wno-compare-distinct-pointer-types \
	-O2 -emit-llvm -c -g "$B/katran/lib/bpf/balancer.bpf.c" -o - |
	llc -march=bpf -filetype=obj -o "$OBJ.tmp"
mv "$OBJ.tmp" "$OBJ"
echo "$commit" >"$OUT/commit"
echo "$OBJ"
