#!/usr/bin/env bash
# A CUDA 13.4 toolkit from NVIDIA's wheels on PyPI, for building `--features cuda` (and `nccl`)
# on a machine without one (docs/scale-out.md, "The CUDA build"). Needs pip; installs nothing
# system-wide. Usage:
#   bash scripts/cuda-from-pypi.sh /opt/cuda13      # then: source /opt/cuda13/env.sh
#   cargo build --release -p rlhf-cli --features cuda
# 13.4 is the newest CUDA release cudarc 0.19 knows. The cu12 nvcc wheels looked at (12.6.85,
# 12.9.86) ship ptxas but no nvcc, hence cu13.
set -euo pipefail
dest=${1:?usage: cuda-from-pypi.sh DIR}
mkdir -p "$dest/wheels"
pip download --no-deps -q -d "$dest/wheels" \
  nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92 \
  nvidia-cuda-runtime==13.4.92 nvidia-cuda-nvrtc==13.4.92 nvidia-cuda-cccl \
  nvidia-cublas nvidia-curand nvidia-nccl-cu13
for w in "$dest"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dest"; done
root="$dest/nvidia/cu13"
chmod +x "$root"/bin/* "$root"/nvvm/bin/*
# The linker wants unversioned names.
cd "$root/lib"
for l in cublas cublasLt cudart nvrtc; do ln -sf "lib$l.so.13" "lib$l.so"; done
ln -sf libcurand.so.10 libcurand.so
ln -sf ../../nccl/lib/libnccl.so.2 libnccl.so
ln -sf ../../nccl/lib/libnccl.so.2 libnccl.so.2
# The driver's libcuda.so comes with the GPU driver, not with a toolkit wheel. For linking, a
# stand-in that exports the driver API cudarc declares, as the CUDA toolkit's lib64/stubs
# provides: every entry point returns CUDA_ERROR_UNKNOWN. At run time the driver's own
# libcuda.so.1 is loaded instead.
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* 2>/dev/null | tail -1)
if [ -z "$cudarc" ]; then
  echo "cudarc's sources are not in the cargo registry yet: run 'cargo fetch' first" >&2
  exit 1
fi
mkdir -p stubs
{
  echo "/* Link-time stand-in for the driver's libcuda.so.1. */"
  grep -o "fn cu[A-Za-z0-9_]*" "$cudarc/src/driver/sys/mod.rs" | sort -u |
    sed 's/^fn //' | awk '{print "int " $1 "(void) { return 999; }"}'
} > stubs/stub.c
cc -shared -fPIC -o stubs/libcuda.so -Wl,-soname,libcuda.so.1 stubs/stub.c
cat > "$dest/env.sh" <<EOF
export CUDA_ROOT=$root
export PATH=$root/bin:\$PATH
export LIBRARY_PATH=$root/lib:$root/lib/stubs
# No GPU to ask here: build for Hopper (H100/H200); set your GPU's compute capability instead.
export CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13040
EOF
echo "done: source $dest/env.sh, then cargo build --release -p rlhf-cli --features cuda"
