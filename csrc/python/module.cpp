// The Python extension module. The ops live in libtorch_batchnorm and register with the
// dispatcher when it loads; this module links it, so importing it loads the ops.

#include <pybind11/pybind11.h>

#include "torch_batchnorm/ops.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch_batchnorm native library: BatchNorm ops under torch.ops.torch_batchnorm";
  m.def("compiled_with_cuda", &torch_batchnorm::compiled_with_cuda,
        "Whether the CUDA kernels were compiled into this build.");
}
