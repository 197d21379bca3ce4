// update_kernel of the classic rules (SGD, RMSprop, Adagrad; classic_rules.cuh) for float
// parameters; one storage type per translation unit, apart from the Adam family's (adam_kernel_f32.cu).
#include "classic_rules.cuh"

namespace instrumented_adam::cuda::detail {
template void launch_classic_update<float>(Algorithm, int, Stats, const UpdateLaunch&, int64_t, const KernelScalars&,
                                         cudaStream_t);
}  // namespace instrumented_adam::cuda::detail
