# XLA/NCCL settings for training on NVIDIA GPUs (H100/H200); sourced by single_machine.sh and slurm_gpu.sbatch.
# The XLA flags are the ones MaxText's A3 (8 x H100) recipes use: overlap collectives with compute,
# combine small collectives, pipeline FSDP's all-gathers and reduce-scatters across the layer scan.
export XLA_FLAGS="${XLA_FLAGS:-} \
 --xla_gpu_enable_latency_hiding_scheduler=true \
 --xla_gpu_enable_triton_gemm=false \
 --xla_gpu_all_reduce_combine_threshold_bytes=1073741824 \
 --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
 --xla_gpu_enable_pipelined_all_gather=true \
 --xla_gpu_enable_pipelined_reduce_scatter=true \
 --xla_gpu_enable_while_loop_double_buffering=true"
# jax preallocates 75% of GPU memory by default; the train step's memory is known (printed before step 1).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
