python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
R=$OUT/res; mkdir -p $R
CUBLAS_WORKSPACE_CONFIG=:4096:8 MEGATRON_LASP_GPU_REPORT=$R/gpu_hybrid_det.json timeout 200 python3 -m pytest -m gpu \
  tests/test_gpu_hybrid.py -k "resume_on_packed and deterministic" -v -p no:cacheprovider > $R/pytest_det.log 2>&1; echo "rc=$?" >> $R/pytest_det.log
tail -3 $R/pytest_det.log
MEGATRON_LASP_GPU_REPORT=$R/gpu_multirank_modes.json timeout 75 python3 -m pytest -m gpu tests/test_gpu_multirank.py \
  -k "every_mode and sp2" -v -p no:cacheprovider > $R/pytest_modes.log 2>&1; echo "rc=$?" >> $R/pytest_modes.log
tail -3 $R/pytest_modes.log
