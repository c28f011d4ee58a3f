#!/usr/bin/env bash
# The one script for the device machine: installs carried wheels, runs the GPU tests and benchmarks,
# writes logs and JSON under $OUT. Usage (from the repo root): bash benchmarks/device_run.sh [steps...]
# steps: info tests smoke kernels latency throughput throughput-cold sass (default: info tests smoke); tensor parallelism:
# tp-tests, and with TP=<size> (default 2): latency-70b-tp, latency-70b-tp-nccl, profile-tp, budget-70b-tp,
# serve-70b-tp, tune-gemv-tp (one GPU is enough for that one: it tunes one rank's shard shapes), ab-tp (A/B of environment
# settings, e.g. AB="- HOPPERLLM_GEMV_PREFETCH=16 HOPPERLLM_FUSED_MLP=0,HOPPERLLM_PDL=1"); ab: the same on one GPU
# (MODEL=dummy:llama-2-7b by default)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
# the tree arrives without .git: the caller writes the commit to .commit (git rev-parse HEAD > .commit)
export HOPPERLLM_GIT_COMMIT=${HOPPERLLM_GIT_COMMIT:-$(cat .commit 2>/dev/null)}
steps=${*:-info tests smoke}
# tput SECONDS NUM_PROMPTS [flags...]: the Llama-3-8B FP8 + FP8 KV 2048/128 throughput run (issue #7's case)
tput() {
  local secs=$1 n=$2; shift 2
  # HOPPERLLM_SRC=<dir>: run the hopperllm package found there (an older commit's tree, carried) instead of this one
  ( cd "${HOPPERLLM_SRC:-.}" && timeout "$secs" python3 -m hopperllm.entrypoints.cli bench throughput --model dummy:llama-3-8b \
    --quantization fp8 --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --num-prompts "$n" "$@" 2>&1 )
}
for step in $steps; do
  echo "=== $step ==="
  case $step in
    info)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv | tee "$OUT/info.txt"
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/info.txt"
      echo "commit $HOPPERLLM_GIT_COMMIT" | tee -a "$OUT/info.txt" ;;
    tests)
      timeout 420 python3 -m pytest -q -x tests/gpu -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -30 ;;
    spec-draft)  # speculative decoding with a draft model: its GPU tests, then Llama-2-7B FP8 + FP8 KV batch 1 2048/128
      # without drafts and with dummy llama-68m / llama-160m drafts (random weights accept ~no draft: each round's cost)
      timeout 240 python3 -m pytest -q tests/gpu/test_gpu_speculative.py -p no:cacheprovider 2>&1 | tee "$OUT/spec_tests.log" | tail -5
      # (the FP8 7B drafting for itself: the same weights, every draft accepted: K target decode steps + one verify a round)
      for run in "none 0" "llama-68m 2" "llama-68m 4" "llama-160m 4" "llama-2-7b 4 fp8"; do read -r draft k q <<< "$run"
        spec=(); [ "$draft" != none ] && spec=(--speculative-config "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": $k${q:+, \"quantization\": \"$q\"}}")
        echo "--- draft $draft k=$k"
        timeout 200 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b --quantization fp8 \
          --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 1 --num-iters 5 "${spec[@]}" \
          --output-json "$OUT/latency-spec-$draft-k$k.json" 2>&1 | grep -E "Mean|accepted|Error|error" ; done ;;
    spec-final)  # speculative decoding's GPU tests, then FP8 batch 1 and 4 without drafts and with a draft, K = 4 (random
      # weights accept ~no draft: a round's cost): Llama-2-7B with llama-68m at 1920/128 (the draft drafts only within
      # the 2048 positions it was trained on), Llama-3-8B with Llama-3.2-1B at 2048/128
      timeout 120 python3 -m pytest -q tests/gpu/test_gpu_speculative.py -p no:cacheprovider 2>&1 | tail -3
      for run in "llama-2-7b 1920 1 none" "llama-2-7b 1920 1 llama-68m" "llama-2-7b 1920 4 none" "llama-2-7b 1920 4 llama-68m" \
                 "llama-3-8b 2048 1 none" "llama-3-8b 2048 1 llama-3.2-1b"; do read -r target inlen b draft <<< "$run"
        spec=(); [ "$draft" != none ] && spec=(--speculative-config "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": 4}")
        echo "--- $target batch $b draft $draft"
        timeout 120 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:$target --quantization fp8 \
          --kv-cache-dtype fp8 --input-len $inlen --output-len 128 --batch-size $b --num-iters 5 --num-iters-warmup 1 \
          "${spec[@]}" --output-json "$OUT/latency-spec-$target-b$b-$draft.json" 2>&1 | grep -E "Mean|accepted|Error|error" ; done ;;
    spec-chain)  # v35: the draft's steps after a round's first in one chain, verify rows quantizing in the attention
      # launch: the speculative GPU tests, Llama-2-7B FP8 batch 1 / 4 at 1920/128 without drafts, with llama-68m K = 4,
      # and batch 4 with disable_by_batch_size 4 (no drafts: the plain figure expected); then a profile of the rounds
      timeout 150 python3 -m pytest -q tests/gpu/test_gpu_speculative.py -p no:cacheprovider 2>&1 | tail -3
      mkdir -p "$OUT/lat"
      for run in "1 none" "1 llama-68m" "4 none" "4 llama-68m" "4 llama-68m 4"; do read -r b draft dis <<< "$run"
        spec=(); [ "$draft" != none ] && spec=(--speculative-config \
          "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": 4${dis:+, \"disable_by_batch_size\": $dis}}")
        echo "--- 7B batch $b draft $draft${dis:+ disable_by_batch_size $dis}"
        timeout 75 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b --quantization fp8 \
          --kv-cache-dtype fp8 --input-len 1920 --output-len 128 --batch-size $b --num-iters 5 --num-iters-warmup 1 \
          "${spec[@]}" --output-json "$OUT/lat/latency-7b-b$b-$draft${dis:+-dis$dis}.json" 2>&1 | grep -E "Mean|accepted|Error|error"
      done
      python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
        "$OUT/lat" "$OUT/latency-spec-chain.json" && rm -r "$OUT/lat"
      timeout 100 python3 benchmarks/profile_speculative.py --draft dummy:llama-68m --context 1700 \
        --output-json "$OUT/profile-spec-chain.json" 2>&1 | grep -v "^USDT" | head -30 ;;
    spec-gaps)  # v35: where the GPU idles in a round (Llama-2-7B FP8 batch 1, llama-68m K = 4, and no drafts), by host
      # phase; Llama-3-8B FP8 batch 1 2048/128 without drafts and with a Llama-3.2-1B draft, K = 4
      for d in dummy:llama-68m none; do timeout 120 python3 benchmarks/profile_speculative.py --draft $d --context 1700 \
        --profile-steps 8 --output-json "$OUT/profile-gaps-${d#dummy:}.json" 2>&1 | grep -v "^USDT" | head -32; done
      mkdir -p "$OUT/lat"
      for draft in none llama-3.2-1b; do spec=(); [ "$draft" != none ] && spec=(--speculative-config \
          "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": 4}")
        echo "--- 8B batch 1 draft $draft"
        timeout 100 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-3-8b --quantization fp8 \
          --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 1 --num-iters 5 --num-iters-warmup 1 \
          "${spec[@]}" --output-json "$OUT/lat/latency-8b-b1-$draft.json" 2>&1 | grep -E "Mean|accepted|Error|error"
      done
      python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
        "$OUT/lat" "$OUT/latency-spec-8b.json" && rm -r "$OUT/lat" ;;
    spec-chain-graph)  # v35: the draft's whole proposal in one CUDA graph: the speculative GPU tests, Llama-2-7B FP8 at
      # 1920/128 batch 1 / 4 with llama-68m K = 4 (random weights: a round's cost), the round's GPU idle by host phase
      timeout 150 python3 -m pytest -q tests/gpu/test_gpu_speculative.py -p no:cacheprovider 2>&1 | tail -3
      mkdir -p "$OUT/lat"
      for run in "1 llama-68m" "4 llama-68m" "1 llama-160m"; do read -r b draft <<< "$run"
        echo "--- 7B batch $b draft $draft"
        timeout 75 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b --quantization fp8 \
          --kv-cache-dtype fp8 --input-len 1920 --output-len 128 --batch-size $b --num-iters 5 --num-iters-warmup 1 \
          --speculative-config "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": 4}" \
          --output-json "$OUT/lat/latency-7b-b$b-$draft.json" 2>&1 | grep -E "Mean|accepted|Error|error"
      done
      python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
        "$OUT/lat" "$OUT/latency-spec-chain-graph.json" && rm -r "$OUT/lat"
      timeout 120 python3 benchmarks/profile_speculative.py --draft dummy:llama-68m --context 1700 --profile-steps 8 \
        --output-json "$OUT/profile-gaps-chain-graph.json" 2>&1 | grep -v "^USDT" | head -34 ;;
    spec-v35)  # v35's last figures: the speculative GPU tests, Llama-2-7B FP8 1920/128 batch 1 with llama-68m K = 4 / 2, and
      # Llama-3-8B FP8 2048/128 batch 1 with a Llama-3.2-1B draft K = 4 in bf16 and in FP8 (random weights: a round's cost)
      timeout 150 python3 -m pytest -q tests/gpu/test_gpu_speculative.py -p no:cacheprovider 2>&1 | tail -25
      mkdir -p "$OUT/lat"
      for run in "llama-2-7b 1920 llama-68m 4" "llama-2-7b 1920 llama-68m 2" "llama-3-8b 2048 llama-3.2-1b 4" \
                 "llama-3-8b 2048 llama-3.2-1b 4 fp8"; do
        read -r target inlen draft k q <<< "$run"
        echo "--- $target batch 1 draft $draft k=$k ${q:-bf16}"
        timeout 150 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:$target --quantization fp8 \
          --kv-cache-dtype fp8 --input-len $inlen --output-len 128 --batch-size 1 --num-iters 5 --num-iters-warmup 1 \
          --speculative-config "{\"model\": \"dummy:$draft\", \"num_speculative_tokens\": $k${q:+, \"quantization\": \"$q\"}}" \
          --output-json "$OUT/lat/latency-$target-b1-$draft-k$k-${q:-bf16}.json" 2>&1 | grep -E "Mean|accepted|Error|error"
      done
      python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
        "$OUT/lat" "$OUT/latency-spec-v35.json" && rm -r "$OUT/lat" ;;
    ab-spec-chain)  # v35 A/B in one call: Llama-2-7B FP8 1920/128 batch 1 with llama-68m K = 4, the session's start (4b03773's
      # hopperllm/, carried in .old: a launch a draft step) against this tree (the round's drafts in one graph), alternating
      mkdir -p "$OUT/ab"
      for i in $(seq ${PAIRS:-2}); do for v in old new; do src=.; c=$HOPPERLLM_GIT_COMMIT
        [ $v = old ] && src=.old && c=4b037736f7aa6cec8ef15e984b908c0a5cc8ea01
        echo "--- $v run $i"
        ( cd $src && PYTHONPATH=$PWD:$PYTHONPATH HOPPERLLM_GIT_COMMIT=$c timeout 120 python3 -m hopperllm.entrypoints.cli bench latency \
          --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8 --input-len 1920 --output-len 128 --batch-size 1 \
          --num-iters 5 --num-iters-warmup 1 --speculative-config '{"model": "dummy:llama-68m", "num_speculative_tokens": 4}' \
          --output-json "$OUT/ab/latency-7b-b1-llama-68m-$v-run$i.json" 2>&1 | grep -E "TPOT|E2E|Error|error" ); done; done
      python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
        "$OUT/ab" "$OUT/ab-spec-chain${TAG:-}.json" && rm -r "$OUT/ab" ;;
    verify-groups)  # HOPPERLLM_VERIFY_ROW_GROUPS (v35, prepared): the kernel's and the model's GPU tests, then Llama-2-7B FP8
      # 1920/128 with llama-68m K = 4 at batch 1 and 4: off / on / on with a 128-register cap, alternating (random
      # weights: a round's cost). The log and the merged records are rewritten as it goes (a timeout keeps them).
      log="$OUT/verify-groups.log"
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_speculative.py tests/kernels/test_paged_attention.py::test_row_groups_equal_one_call_a_row \
        tests/kernels/test_paged_attention.py::test_row_groups_reject_new_kv -p no:cacheprovider 2>&1 | tail -15 | tee -a "$log"
      rm -rf /tmp/ab; mkdir -p /tmp/ab
      for i in $(seq ${PAIRS:-2}); do for b in 1 4; do for arm in "0 0" "1 0" "1 128"; do read -r g cap <<< "$arm"
        echo "--- batch $b groups $g maxnreg $cap run $i" | tee -a "$log"
        HOPPERLLM_VERIFY_ROW_GROUPS=$g HOPPERLLM_VERIFY_ROW_GROUPS_MAXNREG=$cap timeout 120 python3 -m hopperllm.entrypoints.cli \
          bench latency --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8 --input-len 1920 --output-len 128 \
          --batch-size $b --num-iters 5 --num-iters-warmup 1 \
          --speculative-config '{"model": "dummy:llama-68m", "num_speculative_tokens": 4}' \
          --output-json "/tmp/ab/latency-7b-b$b-llama-68m-groups$g-cap$cap-run$i.json" 2>&1 | grep -E "Mean TPOT|Error|error" | tee -a "$log"
        python3 -c "import glob, json, sys; json.dump({f.split('/')[-1]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + '/*.json'))}, open(sys.argv[2], 'w'), indent=1)" \
          /tmp/ab "$OUT/ab-verify-groups.json"
      done; done; done
      ;;
    verify-groups-quick)  # the row groups' GPU tests and one batch-1 pair, each record written as it finishes
      timeout 100 python3 -m pytest -q tests/kernels/test_paged_attention.py tests/gpu/test_gpu_speculative.py -k row_groups \
        -p no:cacheprovider 2>&1 | tail -8
      for g in 0 1; do echo "--- batch 1 groups $g"
        HOPPERLLM_VERIFY_ROW_GROUPS=$g timeout 90 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b \
          --quantization fp8 --kv-cache-dtype fp8 --input-len 1920 --output-len 128 --batch-size 1 --num-iters 5 \
          --num-iters-warmup 1 --speculative-config '{"model": "dummy:llama-68m", "num_speculative_tokens": 4}' \
          --output-json "$OUT/latency-7b-b1-llama-68m-groups$g.json" 2>&1 | grep -E "Mean TPOT|Error|error"; done ;;
    profile-spec)  # a round of draft-model speculation on Llama-2-7B FP8 batch 1: host phases and the top kernels / ops
      for d in none dummy:llama-68m; do timeout 200 python3 benchmarks/profile_speculative.py --draft $d \
        --output-json "$OUT/profile-spec-${d#dummy:}.json" 2>&1 | grep -v "^USDT" | head -${LINES_SPEC:-75}; done ;;
    tests-all)
      timeout 540 python3 -m pytest -q tests/gpu tests/kernels tests/layers -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40 ;;
    smoke)
      timeout 300 python3 benchmarks/smoke_latency.py --model dummy:llama-2-7b --quantization fp8 --kv-cache-dtype fp8 \
        --output-json "$OUT/smoke_7b_fp8.json" 2>&1 | tee "$OUT/smoke.log" | tail -15 ;;
    tune-attn)
      timeout 240 python3 benchmarks/tune_attention.py --output-json "$OUT/tune_attention.json" 2>&1 | grep -v "^skip" | tee "$OUT/tune_attention.log" | tail -8 ;;
    tune-attn-loop)  # the decode key loop's variants (PREFETCH,stages) with the quantizing tail: the 7B's and
      # 8B's batch 1, the 8B at 64 sequences, the 70B's TP=2 heads at 1 and 8 sequences (one GPU)
      V=${VARIANTS:-0,3 1,1}
      for spec in "llama2-7b b1|8 16 32|32 64 128" "llama3-8b b1|16 32|32 64" "llama2-70b tp2 b1|16 32|32 64" \
                  "llama3-8b b64|1 2|32 64 128" "llama2-70b tp2 b8|8 16|32 64"; do IFS='|' read -r sh sp bn <<< "$spec"
        timeout 200 python3 benchmarks/tune_attention.py --shapes "$sh" --splits $sp --block-n $bn --variants $V --quant-out \
          --output-json "$OUT/tune-attn-loop-${sh// /-}.json" 2>&1 | tail -3; done ;;
    tune-attn-70b)  # batch-1 decode attention at the 70B's head layouts (TP=1, 2, 8), one GPU
      timeout 300 python3 benchmarks/tune_attention.py --shapes "llama2-70b b1" "llama2-70b tp2 b1" "llama2-70b tp8 b1" \
        --output-json "$OUT/tune_attention_70b.json" 2>&1 | grep -v "^skip" | tee "$OUT/tune_attention_70b.log" | tail -8 ;;
    tune-attn-stages)  # the 70B TP=2 decode attention (batch 1, 8 sequences) over pipeline stages and warps, with the
      # model's quantizing tail, and the kernel's registers / shared memory under this Triton (one GPU)
      python3 benchmarks/kernel_resources.py --quant-out --num-stages 3 2>&1 | tail -1 | tee "$OUT/kernel_resources.txt"
      python3 benchmarks/kernel_resources.py --quant-out --num-stages 5 2>&1 | tail -1 | tee -a "$OUT/kernel_resources.txt"
      timeout 300 python3 benchmarks/tune_attention.py --shapes "llama2-70b tp2 b1" "llama2-70b tp2 b8" --splits 16 32 \
        --block-n 32 64 --num-stages 3 4 5 6 --num-warps 4 8 --quant-out --output-json "$OUT/tune_attention_stages.json" 2>&1 \
        | grep -v "^skip" | tail -4 ;;
    fused-tests)  # the fused decode kernels (MLP GEMVs, attention) at real shapes
      timeout 300 python3 -m pytest -q tests/gpu/test_gpu_fused_kernels.py tests/gpu/test_gpu_attention.py -p no:cacheprovider 2>&1 \
        | tee "$OUT/fused_tests.log" | tail -15 ;;
    attn-tests)  # the attention kernels' GPU tests (every decode key-loop variant; 360 s at v25)
      timeout 420 python3 -m pytest -q tests/gpu/test_gpu_attention.py -p no:cacheprovider 2>&1 | tee "$OUT/attn_tests.log" | tail -8 ;;
    ab-prefill-fp8qk)  # HOPPERLLM_PREFILL_FP8_QK: its GPU test, the prefill kernel at the tuned shapes both ways, then
      # the Llama-3-8B throughput run both ways (after a warm-up run, so neither is a call's first)
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_attention.py -k "prefill" -p no:cacheprovider 2>&1 | tail -3
      for v in 0 1; do HOPPERLLM_PREFILL_FP8_QK=$v timeout 200 python3 benchmarks/tune_attention.py --no-decode --prefill \
        --output-json "$OUT/tune_prefill_fp8qk$v.json" 2>&1 | grep -v "^skip" | tail -3; done
      tput 100 200 | grep "Output token"
      for v in 0 1 0 1; do HOPPERLLM_PREFILL_FP8_QK=$v tput 150 1000 --output-json "$OUT/throughput-8b-fp8qk$v-$RANDOM.json" \
        | grep "Output token" | sed "s/^/fp8qk=$v /"; done ;;
    fp8qk-default)  # FP8 QK^T in prefill as the default: the GPU tests it touches (prefill attention, the model
      # against HF / the CPU emulation), the 7B's MHA prefill both ways, Llama-3-8B throughput without it and with it
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_attention.py -k "prefill" tests/gpu/test_gpu_model.py \
        -p no:cacheprovider 2>&1 | tail -3
      for v in 0 1; do HOPPERLLM_PREFILL_FP8_QK=$v timeout 100 python3 benchmarks/tune_attention.py --no-decode --prefill \
        --prefill-shapes "llama2-7b 1x2048" --output-json "$OUT/tune_prefill_7b_fp8qk$v.json" 2>&1 | grep -v "^skip" | tail -1; done
      tput 100 200 | grep "Output token"
      for v in 0 1; do HOPPERLLM_PREFILL_FP8_QK=$v tput 150 1000 --output-json "$OUT/throughput-8b-fp8qk$v-default.json" \
        | grep "Output token\|Triton" | sed "s/^/fp8qk=$v /"; done ;;
    tune-gemv-small)  # batch-1 GEMV configs for the Llama-2-7B and Llama-3-8B matrices (MODELS=7b,8b), as their
      # decode launches them (the three-launch MLP: plain GEMVs)
      timeout 400 python3 benchmarks/tune_gemv.py --models "${MODELS:-7b,8b}" --unfused ${SPLITK:+--split-k $SPLITK} \
        --output-json "$OUT/tune_gemv_small.json" 2>&1 | grep -v "^  skip" | tail -40 ;;
    stream-k)  # the stream-K GEMV: its GPU tests at real shapes, then a sweep of its launches against today's configs
      # for Llama-3-8B and the 70B's TP=8 shard (fused MLP launches, as their decode runs them) and Llama-2-7B (three)
      timeout 90 python3 -m pytest -q tests/gpu/test_gpu_fused_kernels.py -k "stream_k or tuned" -p no:cacheprovider 2>&1 | tail -3
      timeout 130 python3 benchmarks/tune_gemv.py --models 8b,70b-tp8 --stream-k --output-json "$OUT/tune_gemv_stream_k.json" \
        2>&1 | grep -v "^  skip" | tail -32
      timeout 70 python3 benchmarks/tune_gemv.py --models 7b --unfused --stream-k --output-json "$OUT/tune_gemv_stream_k_7b.json" \
        2>&1 | grep -v "^  skip" | tail -16 ;;
    ab-stream-k)  # the stream-K table (default since v23) against HOPPERLLM_GEMV_STREAM_K=0 (GEMV_TUNED's split-K
      # configs) end to end: the GPU test of every tuned config, then batch-1 latency of Llama-2-7B and Llama-3-8B
      timeout 120 python3 -m pytest -q tests/gpu/test_gpu_fused_kernels.py -k "stream_k or tuned" -p no:cacheprovider 2>&1 | tail -2
      MODEL=dummy:llama-2-7b AB="- HOPPERLLM_GEMV_STREAM_K=0 -" OUT="$OUT" bash "$0" ab
      MODEL=dummy:llama-3-8b AB="HOPPERLLM_GEMV_STREAM_K=0 -" OUT="$OUT" bash "$0" ab ;;
    stream-k-tp)  # stream-K launches for one rank of the 70B at TP=2 and TP=4 (one GPU is enough)
      timeout 150 python3 benchmarks/tune_gemv.py --models 70b-tp2,70b-tp4 --stream-k --output-json "$OUT/tune_gemv_stream_k_tp.json" \
        2>&1 | grep -v "^  skip" | tail -32 ;;
    structured)  # structured outputs on the GPU (carry .whl with the llguidance wheel: pip download llguidance)
      timeout 300 python3 -m pytest -q tests/gpu/test_gpu_structured_outputs.py -p no:cacheprovider 2>&1 | tail -5 ;;
    session-13)  # what session 12 landed after its device time, on the GPU: speculative decoding, penalties
      # under async scheduling (the model and sampler tests), structured outputs. Before the call:
      # pip download --no-deps -d .whl llguidance; git rev-parse HEAD > .commit; carry .commit and .whl
      timeout 400 python3 -m pytest -q tests/gpu/test_gpu_speculative.py tests/gpu/test_gpu_structured_outputs.py tests/gpu/test_gpu_async_penalties.py \
        tests/gpu/test_gpu_model.py tests/layers/test_sampler.py -p no:cacheprovider 2>&1 | tail -5 ;;
    timeline)  # per-program phase times of the GEMVs and decode attention inside the model graph (7B and 8B batch 1,
      # 8B at 64 sequences)
      for m in "dummy:llama-2-7b 1" "dummy:llama-3-8b 1" "dummy:llama-3-8b 64"; do set -- $m
        timeout 150 python3 benchmarks/decode_timeline.py --model "$1" --batch-size "$2" \
          --output-json "$OUT/decode-timeline-${1#dummy:}-b$2.json" 2>&1 | grep -v "Capturing\|it/s\|^ *\"\|^ *[]{}[]" | tail -30; done ;;
    pdl-check)  # whether PDL overlaps two GEMVs, eagerly and in a graph (benchmarks/pdl_check.py)
      timeout 120 python3 benchmarks/pdl_check.py --output-json "$OUT/pdl-check.json" 2>&1 | grep -v "^{\|^ \|^}" | tail -10 ;;
    fp16-dots)  # float16 products with the FP8 cache (HOPPERLLM_DECODE_DOT_FP16, HOPPERLLM_PREFILL_PV_FP16): decode
      # attention at the throughput run's batches and at batch 1 (in CUDA graphs), the prefill tiles both ways,
      # the 7B's batch-1 decode graph (splits rounded up against down, float16 products)
      timeout 150 python3 benchmarks/tune_attention.py --shapes "llama3-8b b64" "llama3-8b b128" "llama3-8b b256" \
        --block-n 32 64 128 --variants 1,0,3 1,0,3,1 1,0,2 1,0,2,1 --output-json "$OUT/tune-attn-fp16-big.json" 2>&1 | grep -v "^skip" | tail -3
      timeout 90 python3 benchmarks/tune_attention.py --shapes "llama2-7b b1" "llama3-8b b1" --splits 8 16 32 \
        --block-n 32 64 128 --variants 1,0,3 1,0,3,1 --quant-out --output-json "$OUT/tune-attn-fp16-b1.json" 2>&1 | grep -v "^skip" | tail -2
      for v in 0 1; do HOPPERLLM_PREFILL_PV_FP16=$v timeout 60 python3 benchmarks/tune_attention.py --no-decode --prefill \
        --prefill-shapes "llama3-8b 4x2048" "llama2-7b 1x2048" --prefill-configs 128,64,4,2 128,64,4,3 256,64,8,2 128,128,8,3 \
        --output-json "$OUT/tune-prefill-pvfp16-$v.json" 2>&1 | grep -v "^skip" | tail -2; done
      (cd benchmarks && timeout 120 python3 ab_decode.py --model dummy:llama-2-7b --variants pdl1 sp8 fp16 sp8-fp16 pdl1 \
        --output-json "$OUT/ab-decode-7b-b1.json" 2>&1 | grep "replay\|FAILED") ;;
    fp16-ab)  # the float16 products (default since v25) against bfloat16 in the Llama-3-8B throughput run, then the
      # attention GPU tests with what time is left
      tput 200 1000 --output-json "$OUT/throughput-8b-fp16.json" | grep "Output token\|Triton" | sed "s/^/fp16 /"
      HOPPERLLM_DECODE_DOT_FP16=0 HOPPERLLM_PREFILL_PV_FP16=0 tput 200 1000 --output-json "$OUT/throughput-8b-bf16.json" \
        | grep "Output token\|Triton" | sed "s/^/bf16 /"
      timeout $((560 - SECONDS)) python3 -m pytest -q tests/gpu/test_gpu_attention.py -p no:cacheprovider 2>&1 \
        | tee "$OUT/attn_tests.log" | tail -8 ;;
    v25-final)  # the model against HF / the CPU emulation with v25's defaults, Llama-2-7B batch-1 latency with HF's
      # static cache in the same run, and a second Llama-3-8B throughput run
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_model.py -p no:cacheprovider 2>&1 | tail -3
      OUT="$OUT" bash "$0" latency
      [ $SECONDS -lt 450 ] && tput 150 1000 --output-json "$OUT/throughput-8b-fp16-2.json" | grep "Output token" ;;
    v26-graph)  # decode graphs staged from the host (inputs copied straight into the graphs' buffers, the LM head
      # inside the graph, no sampling tensors for greedy batches): the model tests, Llama-2-7B batch 1 against
      # HOPPERLLM_GRAPH_STAGING=0 alternating, one Llama-3-8B throughput run
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_model.py tests/layers/test_sampler.py -p no:cacheprovider 2>&1 | tail -2
      AB="- HOPPERLLM_GRAPH_STAGING=0 - HOPPERLLM_GRAPH_STAGING=0" OUT="$OUT" bash "$0" ab
      tput 150 1000 --output-json "$OUT/throughput-llama-3-8b-fp8-v26.json" | grep "Output token\|jit" ;;
    v27-prefill-graphs)  # HOPPERLLM_PREFILL_GRAPHS=1 (single-sequence prefill steps replay a CUDA graph; v26 found the
      # batch-1 TTFT host-bound): the GPU test, the prefill's host enqueue vs device time in separate processes
      # with and without, then Llama-2-7B batch 1 alternating
      timeout 300 python3 -m pytest -q tests/gpu/test_gpu_model.py -p no:cacheprovider 2>&1 | tail -2  # decode graphs too (capture refactored after v26)
      for e in 1 0 1 0; do HOPPERLLM_PREFILL_GRAPHS=$e timeout 60 python3 benchmarks/ttft_probe.py \
        --output-json "$OUT/ttft-probe-pg$e-$SECONDS.json" 2>&1 | tail -1 | sed "s/^/pg$e /"; done
      AB="HOPPERLLM_PREFILL_GRAPHS=1 - HOPPERLLM_PREFILL_GRAPHS=1 -" OUT="$OUT" bash "$0" ab ;;
    v27-final)  # prefill graphs by default: Llama-3-8B throughput, the model tests, Llama-2-7B batch 1 with HF's static
      # cache in the same run, then (time left) where the throughput run's steps go and how busy the GPU is
      tput 150 1000 --output-json "$OUT/throughput-llama-3-8b-fp8-v27.json" | grep "Output token\|jit"
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_model.py -p no:cacheprovider 2>&1 | tail -2
      OUT="$OUT" bash "$0" latency | grep "E2E\|TTFT\|TPOT\|ratio\|HF"
      [ $SECONDS -lt 420 ] && timeout $((590 - SECONDS)) python3 benchmarks/profile_throughput.py --num-prompts 1000 \
        --profile-steps 2 --window-steps 6 --output-json "$OUT/profile-tput-v27.json" 2>&1 | tail -3 ;;
    v27-host)  # v27's throughput profile had the GPU idle 4% of mixed steps at the step boundaries (the host's ~117 ms
      # a step): the prefill-graph test with v27's buckets, then cProfile of 5 steady-state mixed steps
      timeout 150 python3 -m pytest -q tests/gpu/test_gpu_model.py -k prefill_graphs -p no:cacheprovider 2>&1 | tail -2
      timeout 300 python3 benchmarks/profile_throughput.py --num-prompts 300 --profile-steps 0 --cprofile-steps 5 \
        > "$OUT/cprofile-tput-v27.txt" 2>&1; grep -m3 "function calls\|elapsed" "$OUT/cprofile-tput-v27.txt" ;;
    v27-gaps)  # the GPU's idle time at each throughput step's boundary from CUDA events (no profiler), the host's time
      # between launches and the collector's pauses; then the same with gc.disable(), then with eager module loading
      for v in "" "--gc-off" "CUDA_MODULE_LOADING=EAGER"; do
        [ $SECONDS -lt 330 ] || break
        f=""; e=""; case $v in --*) f=$v ;; ?*) e=$v ;; esac
        env $e timeout 150 python3 benchmarks/profile_throughput.py --num-prompts 1000 --profile-steps 0 --step-gaps $f \
          --output-json "$OUT/step-gaps-v27${v//[^A-Za-z]/-}.json" 2>&1 | grep -m1 output_tok_per_s | sed "s/^/[$v] /"
      done ;;
    v27-window)  # the GPU's busy share over 8 steady-state mixed steps (~500 decodes each), traced without host op
      # records (v27's profiler window with them: 95.4% busy, but its own host cost may have starved the GPU)
      timeout 200 python3 benchmarks/profile_throughput.py --num-prompts 1000 --profile-steps 0 --step-gaps \
        --window-steps 8 --window-at 150 --window-cuda-only --output-json "$OUT/window-cuda-v27.json" 2>&1 | grep -m1 output_tok_per_s ;;
    v27-b512)  # the decode kernel alone at the steady-state mixed step's decodes (512 x 2112 keys, scattered blocks):
      # against the 864 us a layer it took inside the throughput run's mixed steps
      timeout 150 python3 benchmarks/tune_attention.py --shapes "llama3-8b b512" "llama3-8b b256" --splits 1 \
        --block-n 64 128 256 --num-warps 4 8 --num-stages 2 3 --output-json "$OUT/tune-attn-b512-v27.json" 2>&1 | grep -v "^skip" | tail -3
      # the same default config with the tables scattered over a throughput-sized cache (3.9 GB a layer): the footprint's cost
      timeout 100 python3 benchmarks/tune_attention.py --shapes "llama3-8b b512" --splits 1 --block-n 128 --num-stages 3 \
        --cache-blocks 118730 --output-json "$OUT/tune-attn-b512-bigcache-v27.json" 2>&1 | grep -v "^skip" | tail -1 ;;
    tp-prefill-graphs)  # (2+ GPUs) HOPPERLLM_PREFILL_GRAPHS_TP=1: its GPU test, then the 70B's TP latency with and without
      timeout 300 python3 -m pytest -q tests/gpu/test_gpu_tensor_parallel.py -k prefill_graphs -p no:cacheprovider 2>&1 | tail -2
      AB="- HOPPERLLM_PREFILL_GRAPHS_TP=1" OUT="$OUT" bash "$0" ab-tp ;;
    tune-prefill)
      timeout 300 python3 benchmarks/tune_attention.py --no-decode --prefill --output-json "$OUT/tune_prefill.json" 2>&1 | grep -v "^skip" | tail -4 ;;
    sass)  # the device's own SASS (its Triton, not this CPU's) of the kernels the 8B throughput and 7B batch-1 runs
      # launch: a short run of each with an empty Triton cache, then every cubin it compiled through cuobjdump,
      # in one tarball ($OUT/sass-<triton version>.tar.gz). v28: offline SASS from Triton 3.9 mispredicted 3.6's
      echo "profilers: $(command -v ncu nsys || true) $(ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -2)"
      tc=$(mktemp -d); export TRITON_CACHE_DIR=$tc
      timeout 120 python3 benchmarks/tune_attention.py --shapes "llama3-8b b512" "llama2-7b b1" --splits 1 16 \
        --block-n 32 128 --num-stages 3 2>&1 | grep floor | cut -c1-120
      tput 150 64 | grep "Output token"
      tv=$(python3 -c "import triton; print(triton.__version__)"); d=$(mktemp -d)/sass-$tv; mkdir -p "$d"
      cod=$(python3 -c "import os, triton; print(os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/cuobjdump'))")
      [ -x "$cod" ] || cod=$(command -v cuobjdump)
      for c in $(find "$tc" -name "*.cubin"); do
        n=$(basename "$(dirname "$c")")-$(basename "$c" .cubin)
        "$cod" -sass "$c" > "$d/$n.sass" 2>/dev/null; "$cod" -res-usage "$c" > "$d/$n.res" 2>/dev/null
        cp "${c%.cubin}.json" "$d/$n.meta.json" 2>/dev/null
      done
      ls "$d" | wc -l; tar -czf "$OUT/sass-$tv.tar.gz" -C "$(dirname "$d")" "$(basename "$d")"; unset TRITON_CACHE_DIR ;;
    gpu-final)
      timeout 500 python3 -m pytest -q tests/gpu -k "not 70b" -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    profile)
      timeout 200 python3 benchmarks/profile_decode.py --window-steps 20 --output-json "$OUT/profile.json" 2>&1 | grep -v Capturing | tail -80
 ;;
    profile-70b)
      timeout 400 python3 benchmarks/profile_decode.py --model dummy:llama-2-70b --gpu-memory-utilization 0.95 --output-json "$OUT/profile_70b.json" 2>&1 | grep -v Capturing | tail -70 ;;
    profile-8b)
      timeout 200 python3 benchmarks/profile_decode.py --model dummy:llama-3-8b --prefill --output-json "$OUT/profile_8b.json" 2>&1 | grep -v Capturing | grep -v '"\(count\|total_us\)"' | tail -40 ;;
    tp-1gpu)
      timeout 400 python3 -m pytest -q tests/gpu/test_gpu_tensor_parallel.py -k "70b or too_large" -p no:cacheprovider 2>&1 | tee "$OUT/tp_1gpu.log" | tail -15 ;;
    model-tests)
      timeout 300 python3 -m pytest -q tests/gpu/test_gpu_model.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_model_tests.log" | tail -30 ;;
    latency)
      timeout 400 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b --quantization fp8 \
        --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 1 --num-iters-warmup 2 --num-iters 5 \
        --max-num-seqs 16 --baseline hf --output-json "$OUT/latency-llama-2-7b-fp8-h100.json" 2>&1 | grep -v "Capturing\|it/s\]" | tee "$OUT/latency.log" | tail -30 ;;
    latency-quick)
      timeout 300 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-7b --quantization fp8 \
        --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 1 --num-iters-warmup 2 --num-iters 5 \
        --max-num-seqs 16 --output-json "$OUT/latency-llama-2-7b-fp8.json" 2>&1 | grep -v "Capturing\|it/s\]" | tee "$OUT/latency.log" | tail -22 ;;
    throughput)
      tput 420 1000 --output-json "$OUT/throughput-llama-3-8b-fp8.json" | grep -v "Capturing\|it/s\]" \
        | tee "$OUT/throughput.log" | tail -22 ;;
    throughput-cold)  # the throughput run with an empty Triton cache: what a fresh machine pays, and the kernel
      # variants compiled inside the timed run (JitWatch; start-up should leave none)
      TRITON_CACHE_DIR=$(mktemp -d) tput 300 "${PROMPTS:-1000}" --output-json "$OUT/throughput-llama-3-8b-fp8-cold.json" \
        | grep "Output token\|Triton\|Error" | tail -4 ;;
    throughput-16k)
      tput 420 1000 --max-num-batched-tokens 16384 --max-num-seqs 512 --output-json "$OUT/throughput-llama-3-8b-fp8-16k.json" \
        | grep -v "Capturing\|it/s\]" | tail -12 ;;
    latency-70b)
      timeout 500 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-70b --quantization fp8 \
        --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 1 --num-iters-warmup 1 --num-iters 3 \
        --max-num-seqs 8 --gpu-memory-utilization 0.95 --output-json "$OUT/latency-llama-2-70b-fp8.json" 2>&1 \
        | grep -v "Capturing\|it/s\]" | tee "$OUT/latency70.log" | tail -22 ;;
    ab-decode)
      timeout 300 python3 benchmarks/ab_decode.py --output-json "$OUT/ab_decode.json" 2>&1 | grep -v "Capturing\|it/s\]" | grep -v '^ *"\|^ *}\|^{' | tail -20 ;;
    ab-rot)
      timeout 240 python3 benchmarks/ab_decode.py --variants pdl1-pf4-rot1 pdl1-pf4-rot0 pdl1-pf4-rot1 pdl1-pf4-rot0 \
        --output-json "$OUT/ab_rot_7b.json" 2>&1 | grep -v "Capturing\|it/s\]" | grep -v '^ *"\|^ *}\|^{' | tail -8
      timeout 300 python3 benchmarks/ab_decode.py --model dummy:llama-2-70b --gpu-memory-utilization 0.95 \
        --variants pdl1-pf4-rot1 pdl1-pf4-rot0 pdl1-pf4-rot1 pdl1-pf4-rot0 \
        --output-json "$OUT/ab_rot_70b.json" 2>&1 | grep -v "Capturing\|it/s\]" | grep -v '^ *"\|^ *}\|^{' | tail -8 ;;
    ab-prefill)
      timeout 300 python3 benchmarks/ab_prefill.py --output-json "$OUT/ab_prefill.json" 2>&1 | grep -v '^ *"\|^ *}\|^{\|^ *\]\|^ *\[' | tail -40 ;;
    ab-scaled-mm)
      timeout 200 python3 benchmarks/ab_scaled_mm.py --output-json "$OUT/ab_scaled_mm.json" 2>&1 | grep -v '^ *"\|^ *}\|^{\|^ *\]\|^ *\[' | tail -30 ;;
    ab-decode-70b)
      timeout 500 python3 benchmarks/ab_decode.py --model dummy:llama-2-70b --gpu-memory-utilization 0.95 \
        --variants pdl1-pf4 pdl1-pf4-ck1024 pdl1-pf4-mt256 pdl1-pf4-ck1024-mt256 pdl1-pf4-ck4096 \
        --output-json "$OUT/ab_decode_70b.json" 2>&1 | grep -v "Capturing\|it/s\]" | grep -v '^ *"\|^ *}\|^{' | tail -20 ;;
    profile-tput)
      timeout 300 python3 benchmarks/profile_throughput.py --num-prompts 300 --profile-steps 0 --output-json "$OUT/profile_tput.json" 2>&1 | tail -80 ;;
    cprofile-tput)
      timeout 300 python3 benchmarks/profile_throughput.py --num-prompts 300 --profile-steps 0 --cprofile-steps 5 2>&1 | tail -150 ;;
    scaled-mm-m)
      timeout 120 python3 benchmarks/bench_scaled_mm_m.py 2>&1 | tee "$OUT/scaled_mm_m.log" | tail -12 ;;
    profile-tput-nopdl)
      HOPPERLLM_PDL=0 timeout 300 python3 benchmarks/profile_throughput.py --output-json "$OUT/profile_tput_nopdl.json" 2>&1 | tail -40 ;;
    profile-b256)
      timeout 300 python3 benchmarks/profile_decode.py --model dummy:llama-3-8b --batch-size 256 --output-json "$OUT/profile_b256.json" 2>&1 | grep -v Capturing | grep -v '"\(count\|total_us\)"' | tail -40 ;;
    tune-gemv)
      timeout 420 python3 benchmarks/tune_gemv.py --output-json "$OUT/tune_gemv.json" 2>&1 | grep -v "^  skip" | tail -50 ;;
    tune-gemv-tp)
      timeout 400 python3 benchmarks/tune_gemv.py --models 70b-tp${TP:-2} ${SPLITK:+--split-k $SPLITK} --output-json "$OUT/tune_gemv_tp.json" 2>&1 | grep -v "^  skip" | tail -30 ;;
    kernels)
      timeout 200 python3 benchmarks/bench_kernels.py --output-json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    tp-tests)  # every tensor-parallel size the machine has GPUs for (2, 4, 8)
      timeout 540 python3 -m pytest -q tests/gpu/test_gpu_tensor_parallel.py -k "not 70b" -p no:cacheprovider 2>&1 | tee "$OUT/tp_tests.log" | tail -25 ;;
    latency-70b-tp)  # TP=2 by default; TP=8 bash benchmarks/device_run.sh latency-70b-tp ...
      timeout 420 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-70b --quantization fp8 \
        --kv-cache-dtype fp8 --tensor-parallel-size ${TP:-2} --input-len 2048 --output-len 128 --batch-size 1 \
        --num-iters-warmup 2 --num-iters 5 --max-num-seqs 8 --output-json "$OUT/latency-llama-2-70b-fp8-tp${TP:-2}.json" 2>&1 \
        | grep -v "Capturing\|it/s\]" | tee "$OUT/latency70tp.log" | tail -22 ;;
    ab)  # one GPU: the latency run of MODEL (default dummy:llama-2-7b), batch BATCH, under each environment in AB
      model=${MODEL:-dummy:llama-2-7b}
      for v in ${AB:--}; do
        echo "--- ${v} ---"
        env $( [ "$v" = "-" ] || echo "${v//,/ }" ) timeout 240 python3 -m hopperllm.entrypoints.cli bench latency --model $model \
          --quantization fp8 --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size ${BATCH:-1} \
          --num-iters-warmup 2 --num-iters 5 --max-num-seqs 16 --output-json "$OUT/ab-${model##*:}-b${BATCH:-1}-${v//[^A-Za-z0-9_]/_}-$(date +%s).json" 2>&1 \
          | grep "Mean E2E\|Mean TPOT\|Mean TTFT"
      done ;;
    v29-power)  # the throughput run's FP8 GEMMs, decode and prefill attention at a steady-state mixed step's shapes,
      # each back to back for 6 s: the rate at the top clock against the rate at the 700 W limit, J a call (v29
      # found the throughput run at 1,545-1,575 MHz, sw_power_cap 92% of its samples)
      timeout 200 python3 benchmarks/power_floor.py --seconds 6 --output-json "$OUT/power-floor-8b-v29.json" 2>&1 | tail -8 ;;
    v29-7b-stages)  # the 7B's batch-1 decode config (16 slices of 32-key tiles, MHA) runs 3 pipeline stages; the 70B's
      # TP=2 shard at the same 16 slices ran 12.19 us at 3 and 10.89 at 5 (v21), the 7B's was never swept. The
      # kernel over stages, then Llama-2-7B batch 1 alternating default / 5 stages (GPU clock in the JSON)
      timeout 150 python3 benchmarks/tune_attention.py --shapes "llama2-7b b1" --splits 16 32 --block-n 32 64 \
        --num-stages 3 4 5 6 --quant-out --output-json "$OUT/tune-attn-7b-b1-stages-v29.json" 2>&1 | grep "best" | cut -c1-300
      MODEL=dummy:llama-2-7b AB="- HOPPERLLM_DECODE_NUM_STAGES=5 - HOPPERLLM_DECODE_NUM_STAGES=5" OUT="$OUT" bash "$0" ab ;;
    v30-power-accum)  # v29's GEMM joules were measured without the model's fast accumulation: the layer's GEMMs both
      # ways (fp8.scaled_mm as the model calls it), then the decode attention again for the energy budget
      timeout 150 python3 benchmarks/power_floor.py --seconds 6 --ops gemm decode prefill mixed --accum fast plain \
        --output-json "$OUT/power-floor-8b-accum-v30.json" 2>&1 | tail -6 ;;
    v30-mixed-harness)  # power_floor.py's mixed op (a steady-state mixed step's layer: GEMMs, decode and prefill
      # attention back to back at the power limit) as an A/B harness, checked against a known throughput effect:
      # bfloat16 decode products (HOPPERLLM_DECODE_DOT_FP16=0) cost v25's throughput 4.4%; prediction: the mixed
      # layer 3-5% longer with them, alternating
      for v in - HOPPERLLM_DECODE_DOT_FP16=0 - HOPPERLLM_DECODE_DOT_FP16=0; do
        env $( [ "$v" = "-" ] || echo "$v" ) timeout 60 python3 benchmarks/power_floor.py --seconds 8 --ops mixed \
          --output-json "$OUT/power-mixed-${v//[^A-Za-z0-9_]/_}-$(date +%s).json" 2>&1 | tail -1 | sed "s/^/[$v] /"
      done ;;
    v30-keep-7b)  # the last layer's o_proj / MLP on the sampled rows only (b914d07): Llama-2-7B batch 1 alternating
      # with HOPPERLLM_KEEP_SAMPLED_ROWS=0; prediction: TTFT -0.4 to -0.7 ms (1/32 of the prefill's ~88% o_proj + MLP
      # GEMM share), TPOT unchanged (decode steps sample every row)
      MODEL=dummy:llama-2-7b AB="- HOPPERLLM_KEEP_SAMPLED_ROWS=0 - HOPPERLLM_KEEP_SAMPLED_ROWS=0" OUT="$OUT" bash "$0" ab ;;
    v30-keep-tput)  # the same in the power-bound 8B throughput run: the skipped GEMMs are ~1.8% of a mixed step's
      # joules (1.73 of ~98 J); prediction +1.5 to +2.5% output tok/s
      TAG=v30-keep-rows AB="- HOPPERLLM_KEEP_SAMPLED_ROWS=0 - HOPPERLLM_KEEP_SAMPLED_ROWS=0" OUT="$OUT" bash "$0" ab-tput ;;
    v31-maxnreg)  # the batch decode config's register cap (HOPPERLLM_DECODE_MAXNREG; perf-notes v30: Nsight Compute saw
      # the 8B's 512 decodes at 218 registers, 2 programs an SM, DRAM 45%, latency-bound). Offline (Triton 3.6): the
      # quantizing variant (decode-only steps) 218 -> 168 with 8 bytes of spills = 3 programs an SM; the mixed
      # steps' variant 168 -> 128 with none = 4. The GPU test (same bits), the kernel at 64-512 decodes both ways,
      # then the 8B throughput alternating default / 128 / 168. Prediction: the kernel -10 to -20% where the cap
      # adds a program an SM; throughput +1 to +3% (decode attention is ~18% of a mixed step's joules)
      timeout 150 python3 -m pytest -q tests/gpu/test_gpu_attention.py -k register_cap -p no:cacheprovider 2>&1 | tail -2
      for qo in "" --quant-out; do
        timeout 150 python3 benchmarks/tune_attention.py --shapes "llama3-8b b64" "llama3-8b b256" "llama3-8b b512" \
          --splits 1 --block-n 128 --num-warps 4 --num-stages 3 --maxnreg 0 128 168 $qo \
          --output-json "$OUT/tune-attention-maxnreg${qo:+-quant}-v31.json" 2>&1 | grep "best" | cut -c1-220
        python3 - "$OUT/tune-attention-maxnreg${qo:+-quant}-v31.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"   {r['shape']:16s} quant_out={r['quant_out']!s:5s} maxnreg={r['maxnreg']!s:4s} {r['us']:8.1f} us {r['pct_of_floor']:5.1f}% of floor")
PY
      done
      TAG=v31-maxnreg AB="- HOPPERLLM_DECODE_MAXNREG=128 - HOPPERLLM_DECODE_MAXNREG=168 -" AB_UNTIL=420 OUT="$OUT" bash "$0" ab-tput ;;
    v31-maxnreg-b256)  # decode-only steps (the quantizing variant) at a serving-sized batch: Llama-3-8B, 256 sequences
      # of 2048 + 128, TPOT alternating default / HOPPERLLM_DECODE_MAXNREG=168
      for v in - HOPPERLLM_DECODE_MAXNREG=168 - HOPPERLLM_DECODE_MAXNREG=168; do
        env $( [ "$v" = "-" ] || echo "$v" ) timeout 200 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-3-8b \
          --quantization fp8 --kv-cache-dtype fp8 --input-len 2048 --output-len 128 --batch-size 256 --max-num-seqs 256 \
          --num-iters-warmup 1 --num-iters 3 --output-json "$OUT/ab-8b-b256-${v//[^A-Za-z0-9_]/_}-$(date +%s).json" 2>&1 \
          | grep "Mean E2E\|Mean TPOT\|Mean TTFT" | sed "s/^/[$v] /"
      done ;;
    v31-maxnreg-default)  # the register caps as defaults (a09d70b: maxnreg 128; quantizing 168, 128 below 128 sequences): the GPU
      # attention and model tests, the quantizing variant at 32 / 64 / 128 sequences under 0 / 128 / 168 (where the
      # small-batch cap should hand over), then the 8B throughput alternating default / HOPPERLLM_DECODE_MAXNREG=0.
      # Prediction: +0.5 to +1% (v31-maxnreg: 3,472-3,476 tok/s with one cap for both variants, 3,448-3,452 without)
      timeout 200 python3 -m pytest -q tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_model.py -p no:cacheprovider 2>&1 | tail -2
      timeout 100 python3 benchmarks/tune_attention.py --shapes "llama3-8b b32" "llama3-8b b64" "llama3-8b b128" \
        --splits 1 --block-n 128 --num-warps 4 --num-stages 3 --maxnreg 0 128 168 --quant-out \
        --output-json "$OUT/tune-attention-maxnreg-small-quant-v31.json" 2>&1 | grep -c best
      python3 - "$OUT/tune-attention-maxnreg-small-quant-v31.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"   {r['shape']:16s} quant_out={r['quant_out']!s:5s} maxnreg={r['maxnreg']!s:4s} {r['us']:8.1f} us {r['pct_of_floor']:5.1f}% of floor")
PY
      TAG=v31-maxnreg-default AB="- HOPPERLLM_DECODE_MAXNREG=0 - HOPPERLLM_DECODE_MAXNREG=0" AB_UNTIL=520 OUT="$OUT" bash "$0" ab-tput ;;
    v31-maxnreg-grid)  # the quantizing variant's cap by programs an SM (none up to 2, 128 up to 4, 168 beyond): the GPU
      # test, then the kernel at 8B 32 / 64 / 128 decodes (two slices at 32, as the engine picks) and the 7B's MHA
      # at 32 with the defaults against none; the rows name the cap each launch took
      timeout 100 python3 -m pytest -q tests/gpu/test_gpu_attention.py -k register_cap -p no:cacheprovider 2>&1 | tail -1
      timeout 120 python3 benchmarks/tune_attention.py --shapes "llama3-8b b32" "llama3-8b b64" "llama3-8b b128" "llama2-7b b32" \
        --block-n 128 --num-warps 4 --num-stages 3 --maxnreg -1 0 --quant-out \
        --output-json "$OUT/tune-attention-maxnreg-grid-quant-v31.json" 2>&1 | grep -c best
      python3 - "$OUT/tune-attention-maxnreg-grid-quant-v31.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"   {r['shape']:16s} splits={r['splits']} maxnreg={r['maxnreg']!s:4s} {r['us']:8.1f} us {r['pct_of_floor']:5.1f}% of floor")
PY
      ;;
    v31-b1-maxnreg)  # batch 1's decode attention under register caps (offline, Triton 3.6: the split configs compile to
      # 125-128 registers, 4 programs an SM; 80 gives 6 with no spill, 64 gives 8 with 64-72 bytes spilled). The 7B's
      # 16 slices are 512 programs (one wave at 4 an SM); 32 slices (1,024) ran 17.6 us against 14.3 (v29) as two
      # waves, one wave at 8 an SM. The 8B's and the 70B TP=2 shard's 128 / 64 programs: more slices, more warps.
      # Prediction: the 7B's 32 slices at 64 registers 12-13 us (-10 to -15% against 16 slices uncapped); the GQA
      # shapes -10 to -20% at 32-64 slices capped
      timeout 200 python3 benchmarks/tune_attention.py --shapes "llama2-7b b1" "llama3-8b b1" "llama2-70b tp2 b1" \
        --splits 16 32 64 --block-n 32 --num-warps 4 --num-stages 3 --maxnreg 0 64 80 --quant-out \
        --output-json "$OUT/tune-attention-b1-maxnreg-quant-v31.json" 2>&1 | grep -c best
      python3 - "$OUT/tune-attention-b1-maxnreg-quant-v31.json" <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["rows"]:
    print(f"   {r['shape']:18s} splits={r['splits']:2d} maxnreg={r['maxnreg']!s:4s} {r['us']:7.1f} us {r['pct_of_floor']:5.1f}% of floor")
PY
      ;;
    v32-serve-overlap)  # (carry .whl) the server's engine loop with HOPPERLLM_SERVE_OVERLAP=1 (the next step starts before a
      # step's outputs reach the streams) against the default, alternating, at 8 req/s and all 200 requests at once.
      # On the CPU with a zero model both are GIL-bound Python and it gained nothing; here the step waits on the GPU
      # with the GIL released. Prediction: rate inf TPOT 22.6 -> 15-18 ms, 41.6 -> 48-55 req/s; at 8 req/s TPOT
      # 4.6 -> 4.0-4.3 ms. (The server's log is dropped: eight JSON files come back.)
      i=0
      for v in 0 1 1 0; do
        i=$((i + 1)); HOPPERLLM_SERVE_OVERLAP=$v SERVE_TAG=overlap$v-run$i RATES="8 inf" PROMPTS=200 OUT="$OUT" bash "$0" serve
      done
      rm -f "$OUT/serve-server.log" ;;
    v32-engine-process)  # (carry .whl) the server with the engine core in a process of its own
      # (HOPPERLLM_ENABLE_MULTIPROCESSING=1, core_proc.py) against one process (the loop's overlap on in both),
      # alternating, at 8 req/s and all 200 requests at once. On the 2-core CPU with a zero model: TPOT 17.5 ->
      # 12.6 ms at ~190 streams. Prediction here: rate inf TPOT 21.6-22.6 -> 15-17 ms, req/s 42-43 -> 50-55;
      # 8 req/s unchanged within noise. The server's startup line (event loop, HTTP, where the core runs) is
      # printed from its log.
      i=0
      for v in 0 1 1 0; do
        i=$((i + 1)); HOPPERLLM_ENABLE_MULTIPROCESSING=$v SERVE_TAG=mp$v-run$i RATES="8 inf" PROMPTS=200 OUT="$OUT" bash "$0" serve
        grep -m1 "serving .* on http" "$OUT/serve-server.log" | sed "s/^/[mp $v] /"
        grep -m3 "Traceback\|ERROR" "$OUT/serve-server.log" | sed "s/^/[mp $v] /"
      done
      rm -f "$OUT/serve-server.log" ;;
    v32-serve-floor)  # (carry .whl) serving's own floor: the offline throughput run over the same 200 random
      # 1024/128 prompts (the engine alone, no HTTP), then the server (engine core in its own process, the
      # default) at 4, 8, 16 req/s and all at once: how much of rate inf's time is the server's
      tput 200 200 --input-len 1024 --output-json "$OUT/throughput-llama-3-8b-fp8-200x1024.json" \
        | grep "Throughput\|Output token\|Elapsed\|requests/s" | tail -4
      SERVE_TAG=v32 PROMPTS=200 OUT="$OUT" bash "$0" serve
      grep -m1 "serving .* on http" "$OUT/serve-server.log"; grep -m3 "Traceback\|ERROR" "$OUT/serve-server.log" ;;
    v32-check)  # the GPU tests of attention and the model (the kernels' SM count now from launch.num_sms), then
      # the 7B batch-1 smoke latency (its decode splits are planned from that count)
      timeout 270 python3 -m pytest -q -x tests/gpu/test_gpu_attention.py tests/gpu/test_gpu_model.py -p no:cacheprovider \
        2>&1 | tee "$OUT/gpu_tests.log" | tail -4
      OUT="$OUT" bash "$0" smoke ;;
    v29-power-attn)  # decode attention's energy a byte against a copy's (v29-power: 0.53 J for 2.2 GB of K / V at 693 W,
      # 17% of a steady-state mixed step's energy): float16 products (default) and bfloat16 (more conversions)
      timeout 100 python3 benchmarks/power_floor.py --seconds 5 --ops decode copy --output-json "$OUT/power-floor-attn-v29.json" 2>&1 | tail -3
      HOPPERLLM_DECODE_DOT_FP16=0 timeout 100 python3 benchmarks/power_floor.py --seconds 5 --ops decode \
        --output-json "$OUT/power-floor-attn-bf16-v29.json" 2>&1 | tail -2 ;;
    serve)  # (carry .whl: fastapi, starlette, uvicorn, uvloop, httptools, pydantic and their needs for Python 3.12) the
      # OpenAI-compatible server under load: Llama-3-8B FP8 + FP8 KV, random 1024/128 prompts streamed at each rate
      # in RATES (req/s; inf sends all at once), vLLM's benchmark_serving metrics; the server's log beside
      model=${SERVE_MODEL:-dummy:llama-3-8b}
      python3 -m hopperllm.entrypoints.cli serve --model "$model" ${SERVE_FLAGS---quantization fp8 --kv-cache-dtype fp8} \
        --port 8011 > "$OUT/serve-server.log" 2>&1 &
      spid=$!
      python3 - <<'PY' || { echo "server did not come up"; tail -20 "$OUT/serve-server.log"; }
import time, urllib.request
for _ in range(300):
    try:
        urllib.request.urlopen("http://127.0.0.1:8011/health", timeout=2)
        break
    except Exception:
        time.sleep(1)
else:
    raise SystemExit(1)
PY
      seed=0
      for rate in ${RATES:-4 8 16 inf}; do  # a seed a rate: the server's prefix cache keeps the earlier rates' prompts
        seed=$((seed + 1))
        timeout 200 python3 -m hopperllm.entrypoints.cli bench serve --port 8011 --num-prompts ${PROMPTS:-300} --seed $seed \
          --request-rate $rate --random-input-len 1024 --random-output-len 128 --goodput ttft:500 tpot:50 \
          --disable-tqdm --output-json "$OUT/serve-${model##*:}${SERVE_TAG:+-$SERVE_TAG}-rate$rate.json" 2>&1 \
          | grep -i "throughput\|mean ttft\|p99 ttft\|mean tpot\|p99 tpot\|goodput\|failed" | sed "s/^/[rate $rate] /"
      done
      kill -INT $spid; wait $spid ;;
    tests-rest)  # the GPU tests other than attention and model (v32's GPU check ran those two before its budget ran out)
      timeout 330 python3 -m pytest -q tests/gpu -p no:cacheprovider \
        --ignore tests/gpu/test_gpu_attention.py --ignore tests/gpu/test_gpu_model.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15 ;;
    ncu-stalls)  # where the attention kernels' warps wait: per stall reason (cycles a warp waits per issued
      # instruction, Nsight Compute's WarpStateStats breakdown) and per SASS instruction (source counters' samples),
      # for the 7B's batch-1 MHA decode launch (3.6x its read floor, v24-v31), the 8B's batch 1 and the 8B's prefill
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      for t in "--decode|llama2-7b b1" "--decode|llama3-8b b1" "--prefill|llama3-8b 4x2048"; do
        IFS='|' read -r kind sh <<< "$t"
        name=ncu-stalls-${kind#--}-${sh// /-}
        kname=$( [ "$kind" = "--decode" ] && echo _decode_split_kernel || echo _prefill_kernel )
        timeout 150 "$ncu" --clock-control none --kernel-name "regex:$kname" --launch-skip 5 --launch-count 1 \
          --section WarpStateStats --section SourceCounters --section SpeedOfLight --section Occupancy \
          --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" --import-source no \
          -o /tmp/$name python3 benchmarks/ncu_target.py $kind "$sh" > /tmp/ncu.out 2> /tmp/ncu.err
        { echo "== $name"; tail -5 /tmp/ncu.out; cat /tmp/ncu.err; } >> "$OUT/ncu-stderr.log"
        "$ncu" -i /tmp/$name.ncu-rep --page raw --csv > "$OUT/$name-raw.csv" 2>> "$OUT/ncu-stderr.log"
        "$ncu" -i /tmp/$name.ncu-rep --page source --print-source sass --csv > "$OUT/$name-sass.csv" 2>> "$OUT/ncu-stderr.log"
        echo "$name: raw $(wc -c < "$OUT/$name-raw.csv") bytes, sass $(wc -l < "$OUT/$name-sass.csv") lines"
        python3 - "$OUT/$name-raw.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1])))
if len(rows) >= 3:
    head, vals = rows[0], rows[-1]
    pairs = [(h.split("issue_stalled_")[1].split("_per_issue")[0], v) for h, v in zip(head, vals) if "issue_stalled_" in h]
    pairs = sorted(((k, float(v.replace(",", ""))) for k, v in pairs if v.replace(",", "").replace(".", "").isdigit()), key=lambda kv: -kv[1])
    print("   ", " ".join(f"{k}={v:.2f}" for k, v in pairs[:8]))
    for key in ("gpu__time_duration.sum", "sm__warps_active.avg.pct_of_peak_sustained_active", "launch__registers_per_thread"):
        if key in head:
            print("   ", key, vals[head.index(key)])
PY
      done ;;
    prefix-cache)  # what the prefix cache buys (vLLM's random dataset with a shared prefix): Llama-3-8B FP8 + FP8 KV, 400
      # prompts of one 1536-token prefix + 512 own tokens, 128 out, with the cache, without, with again
      i=0
      for pc in enable no-enable enable; do
        i=$((i + 1))
        timeout 150 python3 -m hopperllm.entrypoints.cli bench throughput --model dummy:llama-3-8b --quantization fp8 \
          --kv-cache-dtype fp8 --prefix-len 1536 --input-len 512 --output-len 128 --num-prompts 400 --$pc-prefix-caching \
          --output-json "$OUT/throughput-llama-3-8b-fp8-prefix1536-$i-$pc.json" 2>&1 \
          | grep "Request throughput\|Output token\|Prefix cache\|Duration" | sed "s/^/[$pc] /"
      done ;;
    ncu-attn)  # Nsight Compute on the attention kernels (the machines run Firecracker, where ncu reads the counters;
      # --clock-control none leaves the clocks alone): warp stall reasons, issue-slot use, occupancy and memory
      # throughput of the decode kernel at the 7B's and 8B's batch 1, the 8B's 512-decode mixed step and the 70B
      # TP=2 shard, and of the 8B's prefill; CSV a kernel. What timing left open (perf-notes v29): whether the
      # 7B's batch-1 key loop waits on memory or on issue, and what holds prefill at ~370 TFLOP/s
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      for t in "--decode|llama2-7b b1" "--decode|llama3-8b b1" "--decode|llama3-8b b512" "--decode|llama2-70b tp2 b1" \
               "--prefill|llama3-8b 4x2048"; do
        IFS='|' read -r kind sh <<< "$t"
        name=ncu-${kind#--}-${sh// /-}
        kname=$( [ "$kind" = "--decode" ] && echo _decode_split_kernel || echo _prefill_kernel )
        timeout 120 "$ncu" --clock-control none --kernel-name "regex:$kname" --launch-skip 5 --launch-count 1 \
          --section SpeedOfLight --section Occupancy --section LaunchStats --section SchedulerStats \
          --section WarpStateStats --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
          --csv --page details python3 benchmarks/ncu_target.py $kind "$sh" > "$OUT/$name.csv" 2> /tmp/ncu.err
        { echo "== $name"; cat /tmp/ncu.err; } >> "$OUT/ncu-stderr.log"  # one log: a call brings back 8 files
        echo "$name: $(wc -l < "$OUT/$name.csv") lines; $(grep -i 'error' /tmp/ncu.err | head -2)"
        grep -i '"Duration"\|Issue Slots Busy\|Achieved Occupancy\|Memory Throughput\|No Eligible' "$OUT/$name.csv" \
          | awk -F'","' '{print "   ", $(NF-2), $(NF-1), $NF}' | head -8
      done ;;
    v29-budget)  # the scheduler's token budget: 16384 (vLLM's offline default on >= 70 GiB GPUs) against our 8192;
      # v2x's single runs had 16384 + 512 sequences +1.4%, and the 8B's GEMMs run 1,408 TFLOP/s at M = 16384 against
      # 1,203 at 8192 (bench_scaled_mm_m); the runs' JSON also carry the GPU's clock and throttle reasons (v28)
      # v29: the 64-row prefill tiles (64:64:4:2, 1.5% faster alone in the sweep) as a fifth run, after the budget's pairs
      TAG=v29-budget AB="- --max-num-batched-tokens=16384 - --max-num-batched-tokens=16384 HOPPERLLM_PREFILL_CONFIG=64:64:4:2" \
        OUT="$OUT" bash "$0" ab-tput ;;
    v29-prefill-bm64)  # prefill tiles of 64 rows (HOPPERLLM_PREFILL_CONFIG): under Triton 3.6 64 rows / 64 keys / 4 warps
      # compile to 168 registers, no spills, three programs an SM, where the default 128 rows take 255 with 104
      # bytes of spills and two (perf-notes v28). Their GPU test, the kernel at the tuned shapes (the default
      # first and last), then the 8B throughput alternating with the best 64-row config (the 7B's prefill in the sweep)
      timeout 120 python3 -m pytest -q tests/gpu/test_gpu_attention.py -k "64_row_tiles and 64-64-4-2" -p no:cacheprovider 2>&1 | tail -2
      timeout 150 python3 benchmarks/tune_attention.py --no-decode --prefill --prefill-shapes "llama3-8b 4x2048" "llama2-7b 1x2048" \
        --prefill-configs 128,64,4,2 64,64,4,2 64,64,4,3 64,128,4,2 128,64,4,2 --output-json "$OUT/tune-prefill-bm64-v29.json" 2>&1 \
        | grep "best" | cut -c1-300
      cfg=$(python3 - "$OUT/tune-prefill-bm64-v29.json" <<'PY'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["shape"] == "prefill llama3-8b 4x2048" and r["BLOCK_M"] == 64]
best = min(rows, key=lambda r: r["us"])
print(f"{best['BLOCK_M']},{best['BLOCK_N']},{best['num_warps']},{best['num_stages']}")
PY
)
      echo "best 64-row config for the 8B: $cfg"
      TAG=v29-prefill-bm64 AB="- HOPPERLLM_PREFILL_CONFIG=${cfg//,/:} - HOPPERLLM_PREFILL_CONFIG=${cfg//,/:}" AB_UNTIL=250 OUT="$OUT" bash "$0" ab-tput ;;
    ab-tput)  # one GPU: the Llama-3-8B 1000-prompt throughput run under each environment in AB ("-" is the default),
      # after a 200-prompt warm-up; the runs' JSON merged into one file ($OUT/ab-tput-<TAG>.json; a call brings back 8)
      tput 100 200 | grep "Output token" | sed "s/^/[warm-up] /"
      i=0
      for v in ${AB:--}; do
        i=$((i + 1)); [ $SECONDS -lt ${AB_UNTIL:-480} ] || break
        (
        flags=()  # a variant starting with "--" is engine flags (commas for spaces), else environment settings
        case $v in -) ;; --*) flags=(${v//,/ }) ;; *) export ${v//,/ } ;; esac
        tput 130 1000 "${flags[@]}" --output-json "$OUT/ab-tput-part-$(printf %02d $i)-${v//[^A-Za-z0-9_=]/_}.json" \
          | grep "Output token\|GPU 0\|GPU energy" | sed "s/^/[$v] /" )  # (a subshell: env would run the tput binary, not the function)
      done
      python3 - "$OUT" "${TAG:-ab}" <<'PY'
import glob, json, os, sys
parts = sorted(glob.glob(os.path.join(sys.argv[1], "ab-tput-part-*.json")))
json.dump({os.path.basename(f): json.load(open(f)) for f in parts}, open(os.path.join(sys.argv[1], f"ab-tput-{sys.argv[2]}.json"), "w"), indent=1)
for f in parts:
    os.remove(f)
PY
      ;;
    ab-tp)  # the TP latency run (batch BATCH, default 1) under each environment in AB (space-separated; "-" is the default), 2 + 3 iterations
      for v in ${AB:--}; do  # e.g. AB="- HOPPERLLM_FUSED_MLP=0"
        echo "--- ${v} ---"
        env $( [ "$v" = "-" ] || echo "${v//,/ }" ) timeout 240 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-70b \
          --quantization fp8 --kv-cache-dtype fp8 --tensor-parallel-size ${TP:-2} --input-len 2048 --output-len 128 --batch-size ${BATCH:-1} \
          --num-iters-warmup 2 --num-iters 3 --max-num-seqs 8 --output-json "$OUT/ab-tp${TP:-2}-b${BATCH:-1}-${v//[^A-Za-z0-9_]/_}.json" 2>&1 \
          | grep "Mean E2E\|Mean TPOT\|Mean TTFT"
      done ;;
    latency-70b-tp-nccl)
      HOPPERLLM_ALLREDUCE=nccl timeout 420 python3 -m hopperllm.entrypoints.cli bench latency --model dummy:llama-2-70b \
        --quantization fp8 --kv-cache-dtype fp8 --tensor-parallel-size ${TP:-2} --input-len 2048 --output-len 128 --batch-size 1 \
        --num-iters-warmup 2 --num-iters 5 --max-num-seqs 8 --output-json "$OUT/latency-llama-2-70b-fp8-tp${TP:-2}-nccl.json" 2>&1 \
        | grep -v "Capturing\|it/s\]" | tail -12 ;;
    profile-tp)
      timeout 400 python3 benchmarks/profile_tp.py --model dummy:llama-2-70b -tp ${TP:-2} --batch-size ${BATCH:-1} --output-json "$OUT/profile-tp${TP:-2}-b${BATCH:-1}.json" 2>&1 \
        | grep -v Capturing | python3 -c "import sys; t=sys.stdin.read(); print(t[:6000])" ;;
    budget-70b-tp)
      timeout 560 python3 -m hopperllm.entrypoints.cli bench budget --model dummy:llama-2-70b --quantization fp8 \
        --kv-cache-dtype fp8 --tensor-parallel-size ${TP:-2} --input-len 2048 --output-len 128 --budget 2.5 \
        --batch-sizes ${BATCHES:-$( [ "${TP:-2}" -ge 4 ] && echo 1,2,4,6,8,12,16,20,24 || echo 1,2,3,4,5,6,8 )} \
        --num-prompts ${PROMPTS:-$( [ "${TP:-2}" -ge 4 ] && echo 48 || echo 24 )} --max-num-seqs 32 --output-json "$OUT/budget-llama-2-70b-fp8-tp${TP:-2}.json" 2>&1 \
        | grep -v "Capturing\|it/s\]\|req/s" | tee "$OUT/budget70tp.log" | tail -30 ;;
    serve-70b-tp)  # (carry .whl) the OpenAI server over Llama-2-70B FP8 + FP8 KV at TP=${TP:-2}: the engine core in its
      # own process spawns the ranks; 2048/128 prompts would match the budget run, the serve step's 1024/128 keeps
      # it comparable with the 8B's serving rows. Rates 1 2 4 and all 100 at once
      SERVE_MODEL=dummy:llama-2-70b SERVE_FLAGS="--quantization fp8 --kv-cache-dtype fp8 --tensor-parallel-size ${TP:-2}" \
        SERVE_TAG=tp${TP:-2} RATES="${RATES:-1 2 4 inf}" PROMPTS=${PROMPTS:-100} OUT="$OUT" bash "$0" serve
      grep -m1 "serving .* on http" "$OUT/serve-server.log"; grep -m3 "Traceback\|ERROR" "$OUT/serve-server.log" ;;
    *) echo "unknown step $step" ;;
  esac
done
