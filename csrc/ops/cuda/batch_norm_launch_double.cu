// The CUDA kernels for double input (see batch_norm_launch.h).

#include "ops/cuda/batch_norm_launch_impl.cuh"

template struct torch_batchnorm::cuda::Launch<double>;
