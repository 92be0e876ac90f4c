// Fused conv + BatchNorm + activation (DESIGN 3.4) on cuDNN's graph API, through cudnn-frontend.
//
// out = act(conv2d(x, weight) + bias) * post_scale + post_shift + residual, forward only, as one
// cuDNN operation graph per call signature:
//
//   x, weight -> conv_fprop -> [+ bias] -> [act] -> [* post_scale] -> [+ post_shift] -> [+ residual] -> out
//
// with the stages the call needs and nothing else. Convolution and pointwise math in fp32 (compute
// and intermediate type FLOAT); x, weight, residual and out in one dtype (half, bfloat16 or float);
// bias, post_scale and post_shift fp32 (Cout,) vectors (the Python side casts them). Every conv form
// is handed to cuDNN as it is: dense kxk, 1x1, grouped (groups = Cin / weight.size(1), as the
// graph API infers it), depthwise, strided, dilated; any strides (cuDNN's engines decide which
// layouts they take: the runtime-fusion engines want channels_last).
//
// Activations, as cuDNN's pointwise modes:
//   relu RELU_FWD, relu6 RELU_FWD with upper clip 6, gelu GELU_FWD (erf), gelu_tanh
//   GELU_APPROX_TANH_FWD, silu SWISH_FWD with beta 1, hardswish z * relu6(z + 3) / 6 as four
//   pointwise nodes (ADD, RELU_FWD clipped, MUL, MUL by 1/6).
//
// Numerics: engines whose notes say reduced-precision reduction are never chosen; for fp32 inputs
// neither are tensor-core or down-converting engines (TF32 would miss DESIGN 8's 1e-5), so fp32 runs
// only where cuDNN has a full-fp32 engine for the graph.
//
// A graph is built once per signature (device, dtype, every size, stride and pointer alignment,
// conv geometry, act, which optional inputs exist), by validate -> build_operation_graph ->
// create_execution_plans (heuristics A, then fallback) -> check_support -> build_plans (the first
// plan the heuristics rank that builds), and kept in a process-wide map with its workspace size,
// or with cuDNN's message when a stage fails. A rejected signature stays rejected: nothing is retried.
// Its first execution outside CUDA-graph capture times the heuristics' first kTunedPlans plans (those
// that build within kTuneBuildSeconds) on the call's own tensors (cudnn-frontend's autotune: a device
// sync, a few runs of each) and keeps the fastest for good, as PyTorch's cudnn.benchmark does for its
// convs; LINATTN_TUNE=0 (measured dispatch off) keeps the heuristics' plan. (The eager baseline the
// benchmarks compare with runs PyTorch's default: the heuristics' choice.)
// Execution is on torch's current stream with a cuDNN handle of torch's per-thread, per-device pool,
// and the workspace comes from torch's caching allocator.
//
// Ops:
//   conv_bn_act_fwd_cudnn(x, weight, bias, stride, padding, dilation, groups, act, post_scale,
//       post_shift, residual, out)   the forward into out; NotImplementedError with cuDNN's
//       message when cuDNN cannot run the graph
//   conv_bn_act_cudnn_check(device, dtype, sizes and strides, alignments, geometry, act, flags)
//       -> str   builds (or finds) the graph of a signature without tensors and returns "" when
//       cuDNN runs it, else cuDNN's message: the registry's limit (linattn/ops/_conv_bn_act_cudnn.py)
//
// All of cudnn-frontend (header only, template heavy) is in this one translation unit, which has no
// device code: the GPU compile gate sees no kernel of it.

#define CUDNN_FRONTEND_SKIP_JSON_LIB  // the frontend's JSON (de)serialisation is not used
#include <cudnn_frontend.h>

#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cudnn/Handle.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "conv_bn_act/conv_checks.h"

namespace linattn {
namespace {

using namespace conv;  // Act, act_code and the call's checks (conv_checks.h)
namespace fe = cudnn_frontend;
using Dims = std::array<int64_t, 4>;

// The graph's tensors, by uid (the variant pack of an execution).
enum Uid : int64_t { kX = 1, kW, kBias, kScale, kShift, kResidual, kY };

constexpr int64_t kMaxAlignment = 16;  // what cuDNN's engines ask of a pointer at most

// The largest power of two (up to 16) that divides a pointer: the alignment the graph may assume.
int64_t alignment_of(const void* ptr) {
  const auto p = reinterpret_cast<uintptr_t>(ptr);
  if (p == 0) return kMaxAlignment;
  return std::min<int64_t>(kMaxAlignment, static_cast<int64_t>(p & (~p + 1)));
}

Dims dims_of(c10::IntArrayRef v, const char* name) {
  LINATTN_CHECK(CBA_OP, v.size() == 4, name, " must have 4 entries, got ", v);
  return {v[0], v[1], v[2], v[3]};
}

std::array<int64_t, 2> pair_of(c10::IntArrayRef v, const char* name, int64_t low) {
  LINATTN_CHECK(CBA_OP, v.size() == 2 && v[0] >= low && v[1] >= low, name, " must be two ints >= ", low, ", got ",
                v);
  return {v[0], v[1]};
}

// Everything a graph depends on. The conv output size follows from the rest.
struct Signature {
  c10::DeviceIndex device = 0;
  at::ScalarType dtype = at::kHalf;
  Dims x_size{}, x_stride{}, w_size{}, w_stride{}, y_stride{}, r_stride{};
  std::array<int64_t, 2> stride{}, padding{}, dilation{};
  int act = kIdentity;
  bool bias = false, scale = false, shift = false, residual = false;
  // pointer alignments in bytes: x, weight, out, residual, bias, post_scale, post_shift
  std::array<int64_t, 7> align{};

  Dims y_size() const {
    Dims y{x_size[0], w_size[0], 0, 0};
    for (int d = 0; d < 2; ++d) {
      y[2 + d] = (x_size[2 + d] + 2 * padding[d] - dilation[d] * (w_size[2 + d] - 1) - 1) / stride[d] + 1;
    }
    return y;
  }

  std::string key() const {  // std::to_string, not a stream: no locale on the hot path
    std::string s = std::to_string(device) + '|' + std::to_string(static_cast<int>(dtype)) + '|' +
                    std::to_string(act) + '|' + char('0' + bias) + char('0' + scale) + char('0' + shift) +
                    char('0' + residual);
    auto put = [&s](char tag, const auto& v) {
      s += tag;
      for (auto e : v) s += std::to_string(e) + ',';
    };
    put('x', x_size);
    put('/', x_stride);
    put('w', w_size);
    put('/', w_stride);
    put('y', y_stride);
    put('r', r_stride);
    put('s', stride);
    put('p', padding);
    put('d', dilation);
    put('a', align);
    return s;
  }
};

// One signature's graph: built (workspace bytes), or rejected (cuDNN's message).
struct Entry {
  std::mutex mutex;  // executions of one plan are serialised (a plan is not documented as reentrant)
  std::shared_ptr<fe::graph::Graph> graph;
  int64_t workspace = 0;
  std::string error;
  bool tuned = false;  // the plan timed against the others (or that could not be done): tune() ran
};

constexpr int64_t kTunedPlans = 6;  // heuristics-ranked plans timed at the first execution
// Building a plan of a runtime-fusion engine compiles its kernel (NVRTC, up to seconds): no plan is built
// for the timing once this much time went into building them, so a model's first call stays bounded.
constexpr double kTuneBuildSeconds = 1.0;

constexpr int64_t kTuneWorkspace = int64_t{256} << 20;  // no plan needing more is timed (bytes)

// Whether a graph's plans may be timed at all: not with LINATTN_TUNE=0 (linattn/_tune.py: measured dispatch
// off), read when a graph's first execution comes.
bool tuning_on() {
  const char* env = std::getenv("LINATTN_TUNE");
  return env == nullptr || std::string(env) != "0";
}

// Not now: a stream is capturing a CUDA graph (a device sync there breaks the capture).
bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The heuristics' first kTunedPlans plans built (within kTuneBuildSeconds, none needing over kTuneWorkspace
// bytes or the heuristics' plan's) and timed on the call's tensors (pack), the fastest made the one executed.
// Best effort: a plan that does not build or run is skipped. Each plan built makes itself the graph's
// candidate in cudnn-frontend, so whatever keeps the tune from finishing (fewer than two plans, a failed run,
// an allocation that throws) builds the heuristics' plan again, which makes it the candidate again.
void tune(Entry& entry, cudnnHandle_t handle, std::unordered_map<int64_t, void*>& pack,
          const at::TensorOptions& options) {
  fe::graph::Graph& g = *entry.graph;
  const int64_t count = std::min<int64_t>(g.get_execution_plan_count(), kTunedPlans);
  g.deselect_workspace_greater_than(std::max(entry.workspace, kTuneWorkspace));
  int64_t built = 0, heuristics = -1;  // the first that builds: the heuristics' plan (build_plans took it)
  const auto start = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < count; ++i) {
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > kTuneBuildSeconds) break;
    if (!g.build_plan_at_index(i).is_good()) continue;
    if (heuristics < 0) heuristics = i;
    ++built;
  }
  bool tuned = false;
  if (built >= 2) {
    try {
      const at::Tensor workspace =
          at::empty({std::max<int64_t>(g.get_autotune_workspace_size(), 1)}, options.dtype(at::kByte));
      tuned = g.autotune(handle, pack, workspace.data_ptr()).is_good();
    } catch (const std::exception&) {  // the workspace's allocation: run the heuristics' plan instead
    }
  }
  if (!tuned && heuristics >= 0) g.build_plan_at_index(heuristics);  // the candidate again (already built)
  int64_t size = 0;
  if (g.get_workspace_size(size).is_good()) entry.workspace = size;
}

std::string one_line(std::string message) {
  std::replace(message.begin(), message.end(), '\n', ' ');
  constexpr size_t kMax = 1500;
  if (message.size() > kMax) message = message.substr(0, kMax) + " ...";
  return message;
}

std::optional<fe::DataType_t> cudnn_type(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return fe::DataType_t::HALF;
    case at::kBFloat16:
      return fe::DataType_t::BFLOAT16;
    case at::kFloat:
      return fe::DataType_t::FLOAT;
    default:
      return std::nullopt;
  }
}

std::vector<int64_t> vec(const Dims& d) { return {d[0], d[1], d[2], d[3]}; }

// Records a failed stage's message in error; true when it failed.
bool failed(std::string& error, const char* stage, fe::error_t status) {
  if (status.is_good()) return false;
  error = std::string("cuDNN ") + stage + ": " + one_line(status.get_message());
  return true;
}

// The operation graph of `sig`, validated (nothing here needs a GPU), or null with the reason in error.
std::shared_ptr<fe::graph::Graph> make_graph(const Signature& sig, std::string& error) {
  const std::optional<fe::DataType_t> io = cudnn_type(sig.dtype);
  if (!io) {
    error = std::string("cuDNN graph: dtype ") + c10::toString(sig.dtype) +
            " is not taken (float32, float16, bfloat16)";
    return nullptr;
  }
  const int64_t K = sig.w_size[0];
  auto g = std::make_shared<fe::graph::Graph>();
  g->set_io_data_type(*io)
      .set_intermediate_data_type(fe::DataType_t::FLOAT)
      .set_compute_data_type(fe::DataType_t::FLOAT);

  auto X = g->tensor(fe::graph::Tensor_attributes()
                         .set_name("x")
                         .set_uid(kX)
                         .set_dim(vec(sig.x_size))
                         .set_stride(vec(sig.x_stride))
                         .set_data_type(*io)
                         .set_alignment(sig.align[0]));
  auto W = g->tensor(fe::graph::Tensor_attributes()
                         .set_name("weight")
                         .set_uid(kW)
                         .set_dim(vec(sig.w_size))
                         .set_stride(vec(sig.w_stride))
                         .set_data_type(*io)
                         .set_alignment(sig.align[1]));
  auto y = g->conv_fprop(X, W,
                         fe::graph::Conv_fprop_attributes()
                             .set_name("conv")
                             .set_padding({sig.padding[0], sig.padding[1]})
                             .set_stride({sig.stride[0], sig.stride[1]})
                             .set_dilation({sig.dilation[0], sig.dilation[1]})
                             .set_compute_data_type(fe::DataType_t::FLOAT));

  auto pointwise = [](fe::PointwiseMode_t mode, const char* name) {
    return fe::graph::Pointwise_attributes().set_name(name).set_mode(mode).set_compute_data_type(
        fe::DataType_t::FLOAT);
  };
  auto channel_vector = [&](const char* name, int64_t uid, int64_t align) {
    return g->tensor(fe::graph::Tensor_attributes()
                         .set_name(name)
                         .set_uid(uid)
                         .set_dim({1, K, 1, 1})
                         .set_stride({K, 1, K, K})
                         .set_data_type(fe::DataType_t::FLOAT)
                         .set_alignment(align));
  };
  auto scalar = [&](float value) {  // a constant, passed by value
    return g->tensor(fe::graph::Tensor_attributes(value).set_dim({1, 1, 1, 1}).set_stride({1, 1, 1, 1}));
  };

  if (sig.bias) {
    y = g->pointwise(y, channel_vector("bias", kBias, sig.align[4]), pointwise(fe::PointwiseMode_t::ADD, "bias"));
  }
  switch (sig.act) {
    case kRelu:
      y = g->pointwise(y, pointwise(fe::PointwiseMode_t::RELU_FWD, "relu"));
      break;
    case kRelu6:
      y = g->pointwise(
          y, pointwise(fe::PointwiseMode_t::RELU_FWD, "relu6").set_relu_lower_clip(0.f).set_relu_upper_clip(6.f));
      break;
    case kGelu:
      y = g->pointwise(y, pointwise(fe::PointwiseMode_t::GELU_FWD, "gelu"));
      break;
    case kGeluTanh:
      y = g->pointwise(y, pointwise(fe::PointwiseMode_t::GELU_APPROX_TANH_FWD, "gelu_tanh"));
      break;
    case kSilu:
      y = g->pointwise(y, pointwise(fe::PointwiseMode_t::SWISH_FWD, "silu").set_swish_beta(1.f));
      break;
    case kHardswish: {  // z * relu6(z + 3) / 6
      auto t = g->pointwise(y, scalar(3.f), pointwise(fe::PointwiseMode_t::ADD, "hardswish_shift"));
      t = g->pointwise(t, pointwise(fe::PointwiseMode_t::RELU_FWD, "hardswish_clip")
                              .set_relu_lower_clip(0.f)
                              .set_relu_upper_clip(6.f));
      t = g->pointwise(y, t, pointwise(fe::PointwiseMode_t::MUL, "hardswish_gate"));
      y = g->pointwise(t, scalar(1.f / 6.f), pointwise(fe::PointwiseMode_t::MUL, "hardswish_scale"));
      break;
    }
    default:
      break;
  }
  if (sig.scale) {
    y = g->pointwise(y, channel_vector("post_scale", kScale, sig.align[5]),
                     pointwise(fe::PointwiseMode_t::MUL, "post_scale"));
  }
  if (sig.shift) {
    y = g->pointwise(y, channel_vector("post_shift", kShift, sig.align[6]),
                     pointwise(fe::PointwiseMode_t::ADD, "post_shift"));
  }
  if (sig.residual) {
    auto R = g->tensor(fe::graph::Tensor_attributes()
                           .set_name("residual")
                           .set_uid(kResidual)
                           .set_dim(vec(sig.y_size()))
                           .set_stride(vec(sig.r_stride))
                           .set_data_type(*io)
                           .set_alignment(sig.align[3]));
    y = g->pointwise(y, R, pointwise(fe::PointwiseMode_t::ADD, "residual"));
  }
  y->set_output(true)
      .set_name("out")
      .set_uid(kY)
      .set_dim(vec(sig.y_size()))
      .set_stride(vec(sig.y_stride))
      .set_data_type(*io)
      .set_alignment(sig.align[2]);

  if (failed(error, "validate", g->validate())) return nullptr;
  return g;
}

// Builds the graph of `sig` into entry (graph and workspace, or error): each stage's failure is the reason the
// registry reports. Runs with sig.device current.
void build(const Signature& sig, Entry& entry) {
  std::shared_ptr<fe::graph::Graph> g = make_graph(sig, entry.error);
  if (!g) return;
  cudnnHandle_t handle = at::native::getCudnnHandle();
  if (failed(entry.error, "build_operation_graph", g->build_operation_graph(handle))) return;
  if (failed(entry.error, "create_execution_plans",
             g->create_execution_plans({fe::HeurMode_t::A, fe::HeurMode_t::FALLBACK}))) {
    return;
  }
  std::vector<fe::NumericalNote_t> barred{fe::NumericalNote_t::REDUCED_PRECISION_REDUCTION};
  if (sig.dtype == at::kFloat) {
    barred.push_back(fe::NumericalNote_t::TENSOR_CORE);
    barred.push_back(fe::NumericalNote_t::DOWN_CONVERT_INPUTS);
  }
  g->deselect_numeric_notes(barred);
  if (failed(entry.error, "check_support", g->check_support())) return;
  if (failed(entry.error, "build_plans", g->build_plans(fe::BuildPlanPolicy_t::HEURISTICS_CHOICE))) return;
  int64_t workspace = 0;
  if (failed(entry.error, "get_workspace_size", g->get_workspace_size(workspace))) return;
  entry.graph = std::move(g);
  entry.workspace = workspace;
}

// The entry of a signature, built on first use (sig.device current). Entries are never evicted: a
// model has a few hundred distinct conv calls at most.
std::shared_ptr<Entry> entry_for(const Signature& sig) {
  static std::mutex mutex;
  // never destroyed: at exit its descriptors would be freed after cuDNN or the driver may be gone (PyTorch leaks
  // its cuDNN handle pools for the same reason)
  static auto* cache = new std::unordered_map<std::string, std::shared_ptr<Entry>>();
  const std::string key = sig.key();
  std::shared_ptr<Entry> entry;
  {
    const std::lock_guard<std::mutex> lock(mutex);
    auto& slot = (*cache)[key];
    if (!slot) slot = std::make_shared<Entry>();
    entry = slot;
  }
  const std::lock_guard<std::mutex> lock(entry->mutex);
  if (!entry->graph && entry->error.empty()) {
    try {
      build(sig, *entry);
    } catch (const std::exception& err) {
      entry->error = std::string("cuDNN graph: ") + one_line(err.what());
    }
    if (!entry->graph && entry->error.empty()) entry->error = "cuDNN graph: not built";
  }
  return entry;
}

// ---- ops -------------------------------------------------------------------------------------------

void conv_bn_act_fwd_cudnn(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                           int64_t groups, const std::string& act, const std::optional<at::Tensor>& post_scale,
                           const std::optional<at::Tensor>& post_shift, const std::optional<at::Tensor>& residual,
                           const at::Tensor& out) {
  const ConvSizes s = check_call(x, weight, bias, stride, padding, dilation, groups, act, post_scale, post_shift,
                                 residual, out);
  if (residual.has_value()) check_no_overlap(out, *residual, "residual");
  Signature sig;
  sig.stride = {stride[0], stride[1]};
  sig.padding = {padding[0], padding[1]};
  sig.dilation = {dilation[0], dilation[1]};
  sig.act = s.act;
  sig.device = x.device().index();
  sig.dtype = x.scalar_type();
  sig.x_size = dims_of(x.sizes(), "x");
  sig.x_stride = dims_of(x.strides(), "x");
  sig.w_size = dims_of(weight.sizes(), "weight");
  sig.w_stride = dims_of(weight.strides(), "weight");
  sig.y_stride = dims_of(out.strides(), "out");
  sig.bias = bias.has_value();
  sig.scale = post_scale.has_value();
  sig.shift = post_shift.has_value();
  sig.residual = residual.has_value();
  if (sig.residual) sig.r_stride = dims_of(residual->strides(), "residual");
  auto align = [](const std::optional<at::Tensor>& t) { return t.has_value() ? alignment_of(t->data_ptr()) : 0; };
  sig.align = {alignment_of(x.data_ptr()), alignment_of(weight.data_ptr()), alignment_of(out.data_ptr()),
               align(residual),           align(bias),                      align(post_scale),
               align(post_shift)};

  const c10::cuda::CUDAGuard guard(x.device());
  const std::shared_ptr<Entry> entry = entry_for(sig);
  TORCH_CHECK_NOT_IMPLEMENTED(entry->error.empty(), "linattn." CBA_OP " (cuda): cuDNN cannot run this call: ",
                              entry->error);

  std::unordered_map<int64_t, void*> pack{{kX, x.data_ptr()}, {kW, weight.data_ptr()}, {kY, out.data_ptr()}};
  if (sig.bias) pack[kBias] = bias->data_ptr();
  if (sig.scale) pack[kScale] = post_scale->data_ptr();
  if (sig.shift) pack[kShift] = post_shift->data_ptr();
  if (sig.residual) pack[kResidual] = residual->data_ptr();
  cudnnHandle_t handle = at::native::getCudnnHandle();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(cudnnSetStream(handle, stream) == CUDNN_STATUS_SUCCESS, "linattn." CBA_OP
              " (cuda): cudnnSetStream failed");
  const std::lock_guard<std::mutex> lock(entry->mutex);
  if (!entry->tuned && !tuning_on()) {
    entry->tuned = true;  // LINATTN_TUNE=0: the heuristics' plan for good
  } else if (!entry->tuned && !capturing()) {
    entry->tuned = true;  // one try: what it leaves is kept
    tune(*entry, handle, pack, x.options());
  }
  // after tune(): the plan it keeps may want another workspace size; none allocated for a plan that needs none
  at::Tensor workspace;
  if (entry->workspace > 0) workspace = at::empty({entry->workspace}, x.options().dtype(at::kByte));
  fe::error_t status = entry->graph->execute(handle, pack, workspace.defined() ? workspace.data_ptr() : nullptr);
  TORCH_CHECK(status.is_good(), "linattn." CBA_OP " (cuda): cuDNN execute failed: ", one_line(status.get_message()));
}

std::string conv_bn_act_cudnn_check(int64_t device, at::ScalarType dtype, c10::IntArrayRef x_size,
                                    c10::IntArrayRef x_stride, c10::IntArrayRef w_size, c10::IntArrayRef w_stride,
                                    c10::IntArrayRef out_stride, at::OptionalIntArrayRef residual_stride,
                                    c10::IntArrayRef alignment, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, const std::string& act, bool bias, bool post_scale,
                                    bool post_shift) {
  Signature sig;
  sig.device = static_cast<c10::DeviceIndex>(device);
  sig.dtype = dtype;
  sig.x_size = dims_of(x_size, "x_size");
  sig.x_stride = dims_of(x_stride, "x_stride");
  sig.w_size = dims_of(w_size, "w_size");
  sig.w_stride = dims_of(w_stride, "w_stride");
  sig.y_stride = dims_of(out_stride, "out_stride");
  sig.stride = pair_of(stride, "stride", 1);
  sig.padding = pair_of(padding, "padding", 0);
  sig.dilation = pair_of(dilation, "dilation", 1);
  sig.act = act_code(act);
  sig.bias = bias;
  sig.scale = post_scale;
  sig.shift = post_shift;
  sig.residual = residual_stride.has_value();
  if (sig.residual) sig.r_stride = dims_of(*residual_stride, "residual_stride");
  LINATTN_CHECK(CBA_OP, alignment.size() == 4, "alignment must be [x, weight, out, residual], got ", alignment);
  // the per-channel vectors: fp32 tensors of their own (16-byte aligned by the caching allocator)
  sig.align = {alignment[0], alignment[1], alignment[2], sig.residual ? alignment[3] : 0,
               bias ? kMaxAlignment : 0, post_scale ? kMaxAlignment : 0, post_shift ? kMaxAlignment : 0};
  LINATTN_CHECK(CBA_OP, sig.w_size[0] >= 1 && sig.w_size[1] >= 1 && sig.x_size[1] % sig.w_size[1] == 0,
                "weight (Cout, Cin/groups, KH, KW) ", w_size, " does not fit x ", x_size);
  const c10::cuda::CUDAGuard guard(sig.device);
  return entry_for(sig)->error;
}

}  // namespace
}  // namespace linattn

TORCH_LIBRARY_FRAGMENT(linattn, m) {
  m.def(
      "conv_bn_act_fwd_cudnn(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "int groups, str act, Tensor? post_scale, Tensor? post_shift, Tensor? residual, Tensor(a!) out) -> ()");
  m.def(
      "conv_bn_act_cudnn_check(int device, ScalarType dtype, int[] x_size, int[] x_stride, int[] w_size, "
      "int[] w_stride, int[] out_stride, int[]? residual_stride, int[] alignment, int[] stride, int[] padding, "
      "int[] dilation, str act, bool bias, bool post_scale, bool post_shift) -> str",
      &linattn::conv_bn_act_cudnn_check);
}

TORCH_LIBRARY_IMPL(linattn, CUDA, m) { m.impl("conv_bn_act_fwd_cudnn", &linattn::conv_bn_act_fwd_cudnn); }
