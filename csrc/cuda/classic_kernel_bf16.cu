// update_kernel of the classic rules (SGD, RMSprop, Adagrad; classic_rules.cuh) for __nv_bfloat16
// parameters; one storage type per translation unit, apart from the Adam family's (adam_kernel_bf16.cu).
#include "classic_rules.cuh"

namespace instrumented_adam::cuda::detail {
template void launch_classic_update<__nv_bfloat16>(Algorithm, int, Stats, const UpdateLaunch&, int64_t, const KernelScalars&,
                                         cudaStream_t);
}  // namespace instrumented_adam::cuda::detail
