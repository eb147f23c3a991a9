# Issue #24, GPU figures: ONE run on a lent H100/H200 (the device tool, <= 600 s).
# Here: `make gpu-wheels` (the trainer's other dependencies as wheels in .whl/), then the
# device tool: run(command="bash bench/gpu/issue24.sh", carry=[".whl"], timeout_s=600).
# The machine has torch, transformers and PEFT but no registry. Raw outputs go under $OUT;
# commit them under bench/results/<gpu>-<date>/ with a README, as h100-2026-11-28/ was.
# Budget: 15 + 150 + 150 + 130 + 120 = 565 s of timeouts; each step goes on if one fails.
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import sys,torch,transformers,peft;print(sys.version.split()[0],'torch',torch.__version__,'transformers',transformers.__version__,'peft',peft.__version__,'sm',torch.cuda.get_device_capability())"
  nproc; git log -1 --format='commit %H' 2>/dev/null; } 2>&1 | tee $OUT/env.txt
timeout 15 python3 -c "import trainer.grouped, bench.step_adapters" 2>&1 | tail -3 | tee $OUT/imports.txt

# 1. Many adapters: 32 x 16 x ~40 tokens; one at a time / grouped (torch._grouped_mm on
#    SM90) / plain PEFT loop in turn; the last column is the grouped step's largest weight
#    difference from the single step after one window (bf16), against the largest move.
#    If grouped_mm fails on this card, the same with it off.
timeout 150 python3 bench/bench_step.py --preset 1b --device cuda --adapters 32 --kinds short \
    --warmup 2 --windows 5 2>&1 | grep -v Warning | tee $OUT/adapters.txt
grep -q "graphs after warm-up" $OUT/adapters.txt || timeout 120 python3 bench/bench_step.py \
    --preset 1b --device cuda --adapters 32 --kinds short --warmup 2 --windows 5 \
    --grouped-mm off 2>&1 | grep -v Warning | tee $OUT/adapters-loop.txt

# 2. The eager default against the plain loop at every window kind (after the state-copy
#    and per-micro-batch changes), with length buckets: lorastream columns, MFU, GiB, graphs.
timeout 150 python3 bench/bench_step.py --preset 1b --device cuda --windows 10 --eval-size 0 \
    --kinds short,medium,long,2100 --length-buckets 2>&1 | grep -v Warning | tee $OUT/step.txt

# 3. Recompiles: the compiled step with length buckets, TORCH_LOGS=recompiles (every
#    recompile is logged; the table's "graphs" column counts those after warm-up).
TORCH_LOGS=recompiles timeout 130 python3 bench/bench_step.py --preset 1b --device cuda \
    --windows 6 --warmup 3 --eval-size 0 --kinds short,medium --compile --length-buckets \
    > $OUT/step-compile-recompiles.txt 2>&1
grep -c -i recompil $OUT/step-compile-recompiles.txt | sed 's/^/recompile log lines: /'
tail -8 $OUT/step-compile-recompiles.txt

# 4. Where the eager step's time goes now (wall against GPU kernels).
timeout 120 python3 bench/profile_step.py --preset 1b --device cuda --kinds short,medium \
    --variants eager --warmup 3 --windows 4 --top 14 2>&1 | grep -v -e Warning -e USDT \
    | cut -c1-170 > $OUT/profile.txt
grep "^==" $OUT/profile.txt
