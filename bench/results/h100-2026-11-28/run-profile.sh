python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
timeout 330 python3 bench/profile_step.py --preset 1b --device cuda --kinds short,medium --variants eager,layers,decoder --warmup 4 --windows 6 --top 14 2>&1 | grep -v -e Warning -e USDT | cut -c1-170 > $OUT/profile.txt
grep "^==" $OUT/profile.txt; tail -5 $OUT/profile.txt
