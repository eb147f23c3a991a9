python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c "import sys,torch,transformers,peft;print(sys.version.split()[0],'torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__)"; nproc; } 2>&1 | tee $OUT/env.txt
timeout 220 python3 bench/bench_step.py --preset 1b --device cuda --windows 20 --kinds short,medium,long,2100 2>&1 | grep -v Warning | tee $OUT/step.txt
timeout 300 python3 bench/bench_step.py --preset 1b --device cuda --windows 20 --kinds short,medium,long,2100 --compile 2>&1 | grep -v Warning | tee $OUT/step-compile.txt
