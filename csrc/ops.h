// Declarations shared by the op registration and the backends.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace deqfast {

// Checks with messages that name the argument, what was expected and what came.
void check_state_args(const char* op, const at::Tensor& x, const at::Tensor& best_x, const at::Tensor& best_residual,
                      const at::Tensor& best_rel, const at::Tensor& nstep, const at::Tensor& converged,
                      const at::Tensor& failed);
void check_history_args(const char* op, const at::Tensor& x, const at::Tensor& F, const at::Tensor& G, int64_t slot);
void check_same(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like);
// All of anderson_step's argument checks (both backends).
void check_anderson_step_args(const char* op, const at::Tensor& x, const at::Tensor& F, const at::Tensor& G,
                              const at::Tensor& gram, const at::Tensor& partials, const at::Tensor& best_x,
                              const at::Tensor& best_residual, const at::Tensor& best_rel, const at::Tensor& nstep,
                              const at::Tensor& converged, const at::Tensor& failed, int64_t n_filled, int64_t slot);
// All of fixed_point_step's argument checks; returns whether an offset is given.
bool check_fixed_point_step_args(const char* op, const at::Tensor& x, const at::Tensor& fx,
                                 const c10::optional<at::Tensor>& offset, const at::Tensor& best_x,
                                 const at::Tensor& best_residual, const at::Tensor& best_rel, const at::Tensor& nstep,
                                 const at::Tensor& converged, const at::Tensor& failed);

// at::assert_no_overlap of pass A's outputs F, G with its inputs x, fx and with each other.
void check_history_overlap(const at::Tensor& x, const at::Tensor& fx, const at::Tensor& F, const at::Tensor& G);
// anderson_fused_step's checks (both backends): anderson_step's, plus fx and the scratch buffers.
void check_anderson_fused_step_args(const char* op, const at::Tensor& x, const at::Tensor& fx, const at::Tensor& F,
                                    const at::Tensor& G, const at::Tensor& gram, const at::Tensor& partials,
                                    const at::Tensor& alpha, const at::Tensor& flags, const at::Tensor& best_x,
                                    const at::Tensor& best_residual, const at::Tensor& best_rel,
                                    const at::Tensor& nstep, const at::Tensor& converged, const at::Tensor& failed,
                                    int64_t n_filled, int64_t slot);

// broyden_direction's checks (both backends): U, V (B, m, d) like x (B, d), filled in [0, m].
void check_broyden_direction_args(const char* op, const at::Tensor& U, const at::Tensor& V, const at::Tensor& x,
                                  int64_t filled);
// broyden_update's checks (both backends): dx, dg (B, d); U, V (B, m, d) like them; accept (B,) bool;
// filled in [0, m], slot in [0, m) with slot <= filled; U, V overlap no input nor each other.
void check_broyden_update_args(const char* op, const at::Tensor& dx, const at::Tensor& dg, const at::Tensor& U,
                               const at::Tensor& V, const at::Tensor& accept, int64_t filled, int64_t slot);

// broyden_fused_step's checks (both backends): x_next, fx_next, x, gx, restart_x, restart_g, best_x (B, d) alike;
// restart_sq, best_residual, best_rel (B,) in the accumulation dtype; U, V (B, m, d); filled, slot as
// broyden_update's; no written tensor overlaps another tensor.
void check_broyden_fused_step_args(const char* op, const at::Tensor& x_next, const at::Tensor& fx_next,
                                   const at::Tensor& x, const at::Tensor& gx, const at::Tensor& U, const at::Tensor& V,
                                   const at::Tensor& restart_x, const at::Tensor& restart_g,
                                   const at::Tensor& restart_sq, const at::Tensor& pending, const at::Tensor& best_x,
                                   const at::Tensor& best_residual, const at::Tensor& best_rel,
                                   const at::Tensor& nstep, const at::Tensor& converged, const at::Tensor& failed,
                                   int64_t filled, int64_t slot);

// What deqfast.solvers.broyden computes in torch ops before its step, with the same ATen ops (so the same
// bits on either device): g = fx − x, ‖g‖² (B,) and the norms ‖g‖, ‖fx‖ (B,) in the accumulation dtype,
// each squared norm summed as its _row_sum does (chunks of 16384 elements beyond that length) and its
// square root taken by torch's sqrt (SampleState.update's clamp_min(0) leaves a sum of squares as it is).
struct BroydenResidual {
  at::Tensor g, g_sq, g_norm, f_norm;
};
BroydenResidual broyden_residual(const at::Tensor& x, const at::Tensor& fx);

// "" when the CUDA backend is not compiled in, else e.g. "CUDA 13.0, archs sm_80 sm_90".
std::string cuda_build_info();
// The architectures nvcc compiled the kernels for (__CUDA_ARCH_LIST__), e.g. {"sm_80", "sm_90"}; {} without CUDA.
std::vector<std::string> cuda_build_archs();
// "" when the kernels can run on CUDA device `device` (cudaFuncGetAttributes finds an image for it),
// else the reason; the answer is cached per device.
std::string cuda_kernel_status(int64_t device);

}  // namespace deqfast
