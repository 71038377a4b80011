python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
R=$OUT/res; mkdir -p $R
python3 benchmarks/bench_memory.py --preset tnl-1b-hybrid-1to7 --settings offload --lengths 524288 \
  --budget-s 250 --candidate-timeout 240 --out $R/memory_hybrid > $R/memory_hybrid.log 2>&1; echo "rc=$?" >> $R/memory_hybrid.log
tail -5 $R/memory_hybrid.log
