// The checks of a conv_bn_act call on its cuDNN graph (cudnn_graph.cpp): the op's name in errors, the activation
// codes, and the argument checks.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>

#include <array>
#include <cstdint>
#include <optional>
#include <string>

#include "common.h"

#define CBA_OP "conv_bn_act"  // the op named in error messages

namespace linattn {
namespace conv {

// Activation codes, in the order of linattn.reference.CONV_ACTIVATIONS.
enum Act : int { kIdentity = 0, kRelu, kRelu6, kGelu, kGeluTanh, kHardswish, kSilu };
constexpr std::array<const char*, 7> kActNames{"identity", "relu", "relu6", "gelu", "gelu_tanh", "hardswish",
                                               "silu"};

inline int act_code(const std::string& act) {
  for (int i = 0; i < static_cast<int>(kActNames.size()); ++i) {
    if (act == kActNames[i]) return i;
  }
  LINATTN_CHECK(CBA_OP, false, "act must be one of identity, relu, relu6, gelu, gelu_tanh, hardswish, silu, got '",
                act, "'");
  return 0;
}

inline void check_pair(const char* name, c10::IntArrayRef v, int64_t low) {
  LINATTN_CHECK(CBA_OP, v.size() == 2 && v[0] >= low && v[1] >= low, name, " must be two ints >= ", low, ", got ",
                v);
}

// The per-channel vectors reach the kernels as contiguous fp32.
inline void check_vector(const char* name, const std::optional<at::Tensor>& t, const at::Tensor& x, int64_t C) {
  if (!t.has_value()) return;
  LINATTN_CHECK(CBA_OP, t->device() == x.device(), name, " must be on x's device ", x.device(), ", got ",
                t->device());
  LINATTN_CHECK_TYPE(CBA_OP, t->scalar_type() == at::kFloat, name, " must be float32, got ", t->scalar_type());
  LINATTN_CHECK(CBA_OP, t->dim() == 1 && t->size(0) == C && t->is_contiguous(), name, " must be a contiguous (",
                C, ",) vector, got shape ", t->sizes(), " strides ", t->strides());
}

// Outputs are written while inputs are still being read (by other blocks, too).
inline void check_no_overlap(const at::Tensor& out, const at::Tensor& input, const char* input_name) {
  const at::MemOverlapStatus status = at::get_overlap_status(out, input);
  LINATTN_CHECK(CBA_OP, status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial,
                "out must not share memory with ", input_name);
}

struct ConvSizes {
  int64_t B, Cin, H, W, Cout, KH, KW, Ho, Wo;
  int act;
};

// Every check of a forward call but the residual's overlap with out (checked by the caller):
// ranks, devices, dtypes, the conv's geometry, out's and the residual's shapes, the per-channel vectors.
inline ConvSizes check_call(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                            int64_t groups, const std::string& act, const std::optional<at::Tensor>& post_scale,
                            const std::optional<at::Tensor>& post_shift, const std::optional<at::Tensor>& residual,
                            const at::Tensor& out) {
  CHECK_DIM(CBA_OP, x, 4, "(B, Cin, H, W)");
  CHECK_DIM(CBA_OP, weight, 4, "(Cout, Cin/groups, KH, KW)");
  CHECK_DIM(CBA_OP, out, 4, "(B, Cout, Ho, Wo)");
  CHECK_CUDA(CBA_OP, x);
  CHECK_SAME_DEVICE(CBA_OP, weight, x);
  CHECK_SAME_DEVICE(CBA_OP, out, x);
  CHECK_FLOATING_DTYPE(CBA_OP, x);
  CHECK_SAME_DTYPE(CBA_OP, weight, x);
  CHECK_SAME_DTYPE(CBA_OP, out, x);
  check_pair("stride", stride, 1);
  check_pair("padding", padding, 0);
  check_pair("dilation", dilation, 1);
  ConvSizes s{};
  s.act = act_code(act);
  s.B = x.size(0), s.Cin = x.size(1), s.H = x.size(2), s.W = x.size(3);
  s.Cout = weight.size(0), s.KH = weight.size(2), s.KW = weight.size(3);
  LINATTN_CHECK(CBA_OP, s.B >= 1 && s.Cin >= 1 && s.H >= 1 && s.W >= 1, "x must not be empty, got shape ",
                x.sizes());
  LINATTN_CHECK(CBA_OP, groups >= 1 && s.Cin % groups == 0 && s.Cout % groups == 0 && s.Cout >= 1,
                "groups must be >= 1 and divide Cin (", s.Cin, ") and Cout (", s.Cout, "), got ", groups);
  CHECK_SHAPE(CBA_OP, weight, s.Cout, s.Cin / groups, s.KH, s.KW);
  s.Ho = (s.H + 2 * padding[0] - dilation[0] * (s.KH - 1) - 1) / stride[0] + 1;
  s.Wo = (s.W + 2 * padding[1] - dilation[1] * (s.KW - 1) - 1) / stride[1] + 1;
  LINATTN_CHECK(CBA_OP, s.Ho >= 1 && s.Wo >= 1, "x of size (", s.H, ", ", s.W, ") is smaller than the dilated kernel");
  CHECK_SHAPE(CBA_OP, out, s.B, s.Cout, s.Ho, s.Wo);
  CHECK_NO_INTERNAL_OVERLAP(CBA_OP, out);
  check_vector("bias", bias, x, s.Cout);
  check_vector("post_scale", post_scale, x, s.Cout);
  check_vector("post_shift", post_shift, x, s.Cout);
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    CHECK_DIM(CBA_OP, r, 4, "(B, Cout, Ho, Wo)");
    CHECK_SAME_DEVICE(CBA_OP, r, x);
    CHECK_SAME_DTYPE(CBA_OP, r, x);
    CHECK_SHAPE(CBA_OP, r, s.B, s.Cout, s.Ho, s.Wo);
  }
  check_no_overlap(out, x, "x");
  check_no_overlap(out, weight, "weight");
  return s;
}

}  // namespace conv
}  // namespace linattn
