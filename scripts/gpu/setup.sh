# Device side, sourced: unpack vLLM 0.26.0 (carried per ../shared/gpu) and make rlkv-vllm loadable.
# carry: [".carry/sm90", ".carry/fi", ".carry/s"] (+ ".cache/rlkv-cuda": the CUDA fatbins built here)
# once per machine: later calls in the same command reuse the unpacked tree
[ -d /tmp/site/vllm ] && [ -d /tmp/llama8b ] || bash .carry/s/onecall.sh 0  # exit code: a final du's
[ -d /tmp/site/vllm ] && [ -d /tmp/llama8b ] || { echo "unpack failed"; return 1; }
# optional extra wheels (.whl, carried when a test needs a package the image lacks)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_t .whl/*.whl || return 1
fi
# register the vllm.general_plugins entry point without pip: a dist-info on sys.path
_d=/tmp/site_rlkv/rlkv_vllm-0.1.0.dist-info; mkdir -p $_d
printf 'Metadata-Version: 2.1\nName: rlkv-vllm\nVersion: 0.1.0\n' > $_d/METADATA
printf '[vllm.general_plugins]\nrlkv = rlkv_vllm:register\n' > $_d/entry_points.txt
export PYTHONPATH=/tmp/site:/tmp/site_fi:/tmp/site_t:/tmp/site_rlkv:$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false VLLM_USE_FLASHINFER_SAMPLER=0
# CUDA fatbins built on the CPU machine (same nvcc 13.0); else the device's nvcc builds them
[ -d .cache/rlkv-cuda ] && export RLKV_CUDA_CACHE=$PWD/.cache/rlkv-cuda
# Triton rounds float32 dots through TF32 by default, in vLLM's own attention too; the
# token-exact comparisons with the float64 oracle need IEEE float32 (stock and RLKV alike)
export TRITON_F32_DEFAULT=ieee
python3 - <<'PY' | tee ${OUT:-/tmp}/env.txt
import torch, vllm, triton, transformers, rlkv_vllm
from importlib.metadata import entry_points
from rlkv_vllm.ops import cuda_decode
print("gpu", torch.cuda.get_device_name(0), "torch", torch.__version__, "triton", triton.__version__,
      "vllm", vllm.__version__, "transformers", transformers.__version__, "rlkv", rlkv_vllm.__version__)
print("plugins", [e.value for e in entry_points(group="vllm.general_plugins")])
print("cuda decode kernel:", cuda_decode.unavailable_reason("cuda") or "loads")
PY
