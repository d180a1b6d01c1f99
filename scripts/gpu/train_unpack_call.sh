#!/bin/bash
# Device side, call 1 of the training study (scripts/gpu/train_call.sh is call 2): unpack the trainer's
# packages into /tmp/site_train and, while the machine is up, run the fused learner's CUDA tests
# (tests/core/test_fused.py: compiled FlexAttention kernels vs core.batched, bf16 vs the fp64 oracle,
# memory) on the device's own torch; they need no vLLM.
# carry: [".carry/train"]. Result: $OUT/fused-tests.log
set -uo pipefail
t0=$(date +%s)
bash .carry/train/unpack_train.sh || exit 1
echo "unpack $(( $(date +%s) - t0 ))s"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
[ "${FUSED_TESTS:-1}" = 0 ] && exit 0  # FUSED_TESTS=0: unpack only
export PYTHONPATH=$PWD:/tmp/site_train TRITON_F32_DEFAULT=ieee
# --noconftest: the suite's conftest imports vLLM, which this call does not carry
timeout 240 python3 -m pytest --noconftest tests/core/test_fused.py -q -rs -p no:cacheprovider -k cuda \
  > $OUT/fused-tests.log 2>&1
echo "fused tests rc=$?"; tail -25 $OUT/fused-tests.log
echo "total $(( $(date +%s) - t0 ))s"
