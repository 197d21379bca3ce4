// update_kernel for double parameters (see adam_kernel.cuh); one storage type per translation unit.
#include "adam_kernel.cuh"

namespace instrumented_adam::cuda::detail {
template void launch_update<double>(Algorithm, bool, Stats, const UpdateLaunch&, int64_t, const KernelScalars&,
                                 cudaStream_t);
}  // namespace instrumented_adam::cuda::detail
