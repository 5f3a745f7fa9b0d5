#!/usr/bin/env bash
# Builds llama.cpp's llama-server and llama-quantize (CPU only) into bench/.cache/llama.cpp/build/bin
# from the llama.cpp sources vendored in the llama-cpp-python sdist (PyPI, checksum-verified), unless
# they are already there. Called by the benchmark scripts; needs cmake (bench/.venv has it).
#
# Not GGML_NATIVE: on VMs whose CPU advertises AMX that the OS does not enable, a native build dies
# with an illegal instruction in its AMX kernels. The instruction sets a native build would detect are
# named instead, from /proc/cpuinfo (AVX-512/VNNI/BF16 where present, else AVX2/FMA/F16C), AMX off.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=bench/.cache
THREADS=${THREADS:-2}
LLAMA_CPP_PYTHON=${LLAMA_CPP_PYTHON:-0.3.36}
BIN=$CACHE/llama.cpp/build/bin
mkdir -p "$CACHE"
[ -d bench/.venv/bin ] && export PATH="$PWD/bench/.venv/bin:$PATH"

if [ ! -f "$CACHE/llama.cpp/build/CMakeCache.txt" ]; then
    # The sdist itself (pip download --no-binary would build its build tools from source).
    SDIST=$CACHE/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz
    if [ ! -f "$SDIST" ]; then
        url=$(curl -sf https://pypi.org/simple/llama-cpp-python/ |
            grep -o "https://[^\"]*llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz#sha256=[0-9a-f]*" | head -1)
        curl -sfL "${url%%#*}" -o "$SDIST"
        echo "${url##*sha256=}  $SDIST" | sha256sum --check --quiet
    fi
    rm -rf "$CACHE/llama-cpp-python" && mkdir -p "$CACHE/llama-cpp-python"
    tar -xzf "$SDIST" -C "$CACHE/llama-cpp-python" --strip-components=1
    rm -rf "$CACHE/llama.cpp" && cp -r "$CACHE/llama-cpp-python/vendor/llama.cpp" "$CACHE/llama.cpp"
    has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
    cmake -S "$CACHE/llama.cpp" -B "$CACHE/llama.cpp/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2="$(has avx2)" -DGGML_FMA="$(has fma)" -DGGML_F16C="$(has f16c)" \
        -DGGML_BMI2="$(has bmi2)" -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" \
        -DGGML_AVX512_VNNI="$(has avx512_vnni)" -DGGML_AVX512_BF16="$(has avx512_bf16)" \
        -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >/dev/null
fi
for target in llama-server llama-quantize; do
    [ -x "$BIN/$target" ] || cmake --build "$CACHE/llama.cpp/build" --target "$target" -j "$THREADS" >/dev/null
done
