// Declarations shared by the op registration and the backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>

namespace deqfast {

// Checks with messages that name the argument, what was expected and what came.
void check_state_args(const char* op, const at::Tensor& x, const at::Tensor& best_x, const at::Tensor& best_residual,
                      const at::Tensor& best_rel, const at::Tensor& nstep, const at::Tensor& converged,
                      const at::Tensor& failed);
void check_history_args(const char* op, const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, int64_t slot);
void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like);

// "" when the CUDA backend is not compiled in, else e.g. "CUDA 13.0, archs sm_80 sm_90".
std::string cuda_build_info();

}  // namespace deqfast
