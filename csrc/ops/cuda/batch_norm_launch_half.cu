// The CUDA kernels for half input (see batch_norm_launch.h).

#include "ops/cuda/batch_norm_launch_impl.cuh"

template struct torch_batchnorm::cuda::Launch<c10::Half>;
