#!/usr/bin/env bash
# Build the C yardsticks that `dsd bench --against` and `python -m bench` compare dsd with:
#   llama.cpp's llama-bench (+ llama-quantize, llama-imatrix, for making real quantized test files),
#   from the llama.cpp that llama-cpp-python 0.3.36 vendors (the version its wheels are built from);
#   ik_llama.cpp's llama-bench, when given its source (a git directory or a source tree).
#
# usage: bash bench/build_yardsticks.sh [--force] [IK_LLAMA_SOURCE]
#   IK_LLAMA_SOURCE  an ik_llama.cpp git directory (e.g. a bare mirror) or source tree; without it
#                    only llama.cpp is built
#   --force          rebuild binaries that already exist
# Output: $DSD_YARDSTICKS_DIR (default ~/.cache/dsd-yardsticks)/llama.cpp/{llama-bench,llama-quantize,
# llama-imatrix} and .../ik_llama.cpp/llama-bench, each folder with a BUILD_INFO file (source, flags)
# and ik's with BUILD_COMMIT (built from an extracted tree, its llama-bench reports "unknown").
# Needs cmake, a C++17 compiler and pip.  On 2 cores: ~8 min for llama.cpp, ~25 min for ik_llama.cpp.
set -euo pipefail

LLAMA_CPP_PYTHON_VERSION=0.3.36
OUT=${DSD_YARDSTICKS_DIR:-$HOME/.cache/dsd-yardsticks}
JOBS=${JOBS:-$(nproc)}

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }
die() { echo "build_yardsticks.sh: $*" >&2; exit 1; }

force=0
ik_source=""
for arg in "$@"; do
  case $arg in
    --force) force=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) die "unknown option $arg (see --help)" ;;
    *) [ -z "$ik_source" ] || die "one IK_LLAMA_SOURCE only (got $ik_source and $arg)"; ik_source=$arg ;;
  esac
done
[ -z "$ik_source" ] || [ -d "$ik_source" ] || die "$ik_source is not a directory; pass ik_llama.cpp's git directory or source tree"
for tool in cmake c++ git; do
  command -v "$tool" >/dev/null || die "$tool is not installed (apt-get install cmake g++ git)"
done

work=$(mktemp -d "${TMPDIR:-/tmp}/dsd-yardsticks.XXXXXX")
trap 'rm -rf "$work"' EXIT

have_cpu_flag() { grep -qw "$1" /proc/cpuinfo; }

# x86 instruction sets by explicit flags rather than -march=native: a native llama.cpp build enables
# its AMX backend, which crashed with a general protection fault in libggml-cpu on this machine kind.
# AVX-512 (and its VNNI / VBMI / BF16 parts) only where the CPU reports them.
llama_cpp_isa=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
               -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
have_cpu_flag bmi2 && llama_cpp_isa+=(-DGGML_BMI2=ON)
have_cpu_flag avx_vnni && llama_cpp_isa+=(-DGGML_AVX_VNNI=ON)
if have_cpu_flag avx512f; then
  llama_cpp_isa+=(-DGGML_AVX512=ON)
  have_cpu_flag avx512_vnni && llama_cpp_isa+=(-DGGML_AVX512_VNNI=ON)
  have_cpu_flag avx512vbmi && llama_cpp_isa+=(-DGGML_AVX512_VBMI=ON)
  have_cpu_flag avx512_bf16 && llama_cpp_isa+=(-DGGML_AVX512_BF16=ON)
fi
# CPU only, static (the copied binaries need no libggml*.so beside them), no downloads
common=(-DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF
        -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF)

# build SRC BUILD_DIR DEST "TARGETS" CMAKE_FLAGS...: configure, build the targets, copy them to DEST
build() {
  local src=$1 dir=$2 dest=$3 targets=$4; shift 4
  echo "configuring $src" >&2
  cmake -S "$src" -B "$dir" "$@" > "$dir.configure.log" 2>&1 || { tail -20 "$dir.configure.log" >&2; die "cmake failed for $src"; }
  echo "building $targets with $JOBS jobs (log: $dir.build.log)" >&2
  # shellcheck disable=SC2086  # TARGETS is a space-separated list
  cmake --build "$dir" --target $targets -j"$JOBS" > "$dir.build.log" 2>&1 || { tail -30 "$dir.build.log" >&2; die "build failed for $src"; }
  mkdir -p "$dest"
  for t in $targets; do
    install -m 755 "$dir/bin/$t" "$dest/$t"
  done
  { echo "source: $src"; echo "built: $(date -u +%FT%TZ) on $(uname -m), $(c++ --version | head -1)";
    echo "cmake flags: $*"; } > "$dest/BUILD_INFO"
}

all_present() { local d=$1; shift; for t in "$@"; do [ -x "$d/$t" ] || return 1; done; }

# -- llama.cpp, from the llama-cpp-python sdist ------------------------------------------------------
llama_targets=(llama-bench llama-quantize llama-imatrix)
if [ $force = 1 ] || ! all_present "$OUT/llama.cpp" "${llama_targets[@]}"; then
  echo "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (its vendored llama.cpp)" >&2
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$work/sdist" \
    || die "pip download of llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed (network, or the package index)"
  tar -xzf "$work"/sdist/llama_cpp_python-*.tar.gz -C "$work"
  src=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
  [ -f "$src/CMakeLists.txt" ] || die "the sdist has no vendor/llama.cpp/CMakeLists.txt"
  build "$src" "$work/build-llama.cpp" "$OUT/llama.cpp" "${llama_targets[*]}" "${common[@]}" "${llama_cpp_isa[@]}"
  echo "llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist, vendor/llama.cpp" >> "$OUT/llama.cpp/BUILD_INFO"
else
  echo "llama.cpp yardsticks already in $OUT/llama.cpp (--force rebuilds)" >&2
fi

# -- ik_llama.cpp ---------------------------------------------------------------------------------------
if [ -n "$ik_source" ]; then
  if [ $force = 1 ] || ! all_present "$OUT/ik_llama.cpp" llama-bench; then
    commit=""
    if git --git-dir="$ik_source" rev-parse --verify -q HEAD >/dev/null 2>&1; then
      # a git directory: extract HEAD's tree.  A stored mirror may lack a few large blobs (web UI
      # assets, none needed by llama-bench), so fall back to file by file, skipping those.
      commit=$(git --git-dir="$ik_source" rev-parse HEAD)
      src="$work/ik_llama.cpp"; mkdir -p "$src"
      if ! git --git-dir="$ik_source" archive HEAD 2>/dev/null | tar -x -C "$src" 2>/dev/null; then
        skipped=0
        while IFS=$'\t' read -r meta path; do
          [ "${meta%% *}" = 160000 ] && continue  # submodule entry
          mkdir -p "$src/$(dirname "$path")"
          git --git-dir="$ik_source" cat-file blob "${meta##* }" > "$src/$path" 2>/dev/null || { rm -f "$src/$path"; skipped=$((skipped + 1)); }
        done < <(git --git-dir="$ik_source" ls-tree -r HEAD)
        echo "extracted ik_llama.cpp $commit file by file ($skipped missing blobs skipped)" >&2
      fi
    elif [ -f "$ik_source/CMakeLists.txt" ]; then
      src=$ik_source
      commit=$(git -C "$src" rev-parse HEAD 2>/dev/null || true)
    else
      die "$ik_source is neither a git directory nor a source tree with CMakeLists.txt; pass ik_llama.cpp's"
    fi
    grep -q "fused-moe\|fmoe" "$src/examples/llama-bench/llama-bench.cpp" 2>/dev/null \
      || die "$ik_source does not look like ik_llama.cpp (its llama-bench has no -fmoe)"
    # ik_llama.cpp has no AMX backend, and -march=native is its documented CPU build (its iqk kernels
    # pick their AVX-512 paths from the compiler's target flags); only the f16 KV cache's flash
    # attention kernels are compiled (GGML_IQK_FA_ALL_QUANTS=OFF), which llama-bench's defaults use.
    build "$src" "$work/build-ik" "$OUT/ik_llama.cpp" llama-bench "${common[@]}" -DGGML_NATIVE=ON -DGGML_IQK_FA_ALL_QUANTS=OFF
    if [ -n "$commit" ]; then
      echo "$commit" > "$OUT/ik_llama.cpp/BUILD_COMMIT"
      echo "ik_llama.cpp commit $commit" >> "$OUT/ik_llama.cpp/BUILD_INFO"
    fi
  else
    echo "ik_llama.cpp yardstick already in $OUT/ik_llama.cpp (--force rebuilds)" >&2
  fi
fi

ls -l "$OUT"/*/llama-bench
