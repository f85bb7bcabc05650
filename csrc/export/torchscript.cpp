#include "qlora/export/torchscript.h"

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/linear.h>

#include <iomanip>
#include <sstream>

#include "qlora/nn/lora_layer.h"
#include "qlora/nn/qlora_linear.h"

#include <torch/csrc/jit/frontend/resolver.h>
#include <torch/csrc/jit/frontend/sugared_value.h>

namespace qlora::exporters {

namespace {

// TorchScript spells dtypes as ScalarType integers.
const std::string kF32 = std::to_string(static_cast<int>(at::kFloat));

std::string literal(double v) {
  std::ostringstream s;
  s << std::setprecision(17) << v;
  std::string out = s.str();
  if (out.find_first_of(".eEn") == std::string::npos) out += ".0";
  return out;
}

std::string dtype_literal(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
    case at::kHalf:
    case at::kBFloat16:
      return std::to_string(static_cast<int>(t));
    default:
      TORCH_CHECK(false, "TorchScript export: unsupported dtype ", t);
  }
}

// TorchScript lines that define `absmax` and `y` (the base output, bias
// included) for a QLoRA layer, and `w` (the dense base) when DoRA needs it.
std::string qlora_base_source(const nn::QLoRALinearImpl& q, bool need_weight) {
  const auto& st = q.quant_state();
  std::ostringstream src;
  if (st.nested) {
    src << "    absmax = qlora.dequantize_blockwise(self.weight_absmax, "
           "self.weight_nested_absmax, self.weight_nested_quant_map, "
        << st.nested->blocksize << ", " + kF32 + ") + " << literal(st.nested->offset) << "\n";
  } else {
    src << "    absmax = self.weight_absmax\n";
  }
  const std::string shape =
      "[" + std::to_string(st.shape[0]) + ", " + std::to_string(st.shape[1]) + "]";
  const std::string compute = dtype_literal(q.compute_dtype());
  src << "    bias = self.bias\n"
      << "    b: Optional[Tensor] = None\n"
      << "    if bias is not None:\n"
      << "        b = bias.to(" << compute << ")\n"
      << "    y = qlora.matmul_4bit(x.to(" << compute << "), self.weight, absmax, " << st.blocksize
      << ", \"" << st.quant_type << "\", " << shape << ", b).to(x.dtype)\n";
  if (need_weight)
    src << "    w = qlora.dequantize_4bit(self.weight, absmax, " << st.blocksize << ", \""
        << st.quant_type << "\", " << shape << ", " << dtype_literal(st.dtype)
        << ").to(" + kF32 + ")\n";
  return src.str();
}

std::string dense_base_source() {
  return "    bias = self.bias\n"
         "    b: Optional[Tensor] = None\n"
         "    if bias is not None:\n"
         "        b = bias.to(x.dtype)\n"
         "    y = torch.linear(x, self.weight.to(x.dtype), b)\n"
         "    w = self.weight.to(" +
         kF32 + ")\n";
}

// Resolves `torch.<op>` to aten and `qlora.<op>` to our ops while compiling
// the generated sources (TorchScript serialises the calls as ops.qlora.*).
struct OpsResolver : torch::jit::Resolver {
  std::shared_ptr<torch::jit::SugaredValue> resolveValue(const std::string& name,
                                                         torch::jit::GraphFunction&,
                                                         const torch::jit::SourceRange&) override {
    if (name == "torch") return std::make_shared<torch::jit::BuiltinModule>("aten");
    if (name == "qlora") return std::make_shared<torch::jit::BuiltinModule>("qlora");
    return nullptr;
  }
  c10::TypePtr resolveType(const std::string&, const torch::jit::SourceRange&) override {
    return nullptr;
  }
};

void define(torch::jit::Module& m, const std::string& source) {
  m.define(source, std::make_shared<OpsResolver>());
}

}  // namespace

torch::jit::Module script_lora_layer(const nn::LoRALayerImpl& layer) {
  const auto* q = dynamic_cast<const nn::QLoRALinearImpl*>(&layer);
  torch::jit::Module m(q ? "QLoRALinear" : "LoRALinear");
  for (const auto& p : layer.named_parameters(false))
    m.register_parameter(p.key(), p.value(), false);
  for (const auto& b : layer.named_buffers(false)) m.register_buffer(b.key(), b.value());
  if (!layer.base_bias())
    m.register_attribute("bias", c10::OptionalType::create(c10::TensorType::get()), c10::IValue());
  const bool dora = layer.lora_config().use_dora;
  std::ostringstream src;
  src << "def forward(self, x: Tensor) -> Tensor:\n"
      << (q ? qlora_base_source(*q, dora) : dense_base_source()) << "    xl = x.to(" + kF32 + ")\n"
      << "    lora = torch.linear(torch.linear(xl, self.lora_A), "
         "self.lora_B)\n";
  const std::string s = literal(layer.scaling());
  if (dora) {
    src << "    norm = torch.linalg_vector_norm(w + " << s
        << " * torch.matmul(self.lora_B, self.lora_A), 2, [1])\n"
        << "    mag = (self.lora_magnitude_vector / norm).view(1, -1)\n"
        << "    base = y.to(" + kF32 + ")\n"
        << "    if bias is not None:\n"
        << "        base = base - bias.to(" + kF32 + ")\n"
        << "    delta = (mag - 1) * base + mag * lora * " << s << "\n";
  } else {
    src << "    delta = lora * " << s << "\n";
  }
  src << "    return y + delta.to(y.dtype)\n";
  define(m, src.str());
  return m;
}

SequentialBuilder& SequentialBuilder::add(const std::string& name, torch::jit::Module module) {
  modules_.emplace_back(name, std::move(module));
  steps_.push_back("self." + name + ".forward(x)");
  return *this;
}

SequentialBuilder& SequentialBuilder::add_activation(const std::string& function) {
  static const std::map<std::string, std::string> calls = {{"relu", "torch.relu(x)"},
                                                           {"gelu", "torch.gelu(x)"},
                                                           {"silu", "torch.silu(x)"},
                                                           {"tanh", "torch.tanh(x)"}};
  auto it = calls.find(function);
  TORCH_CHECK(it != calls.end(), "TorchScript export: unsupported activation \"", function, "\"");
  steps_.push_back(it->second);
  return *this;
}

torch::jit::Module SequentialBuilder::build(const std::string& class_name) const {
  torch::jit::Module m(class_name);
  for (const auto& [name, sub] : modules_) m.register_module(name, sub);
  std::ostringstream src;
  src << "def forward(self, x: Tensor) -> Tensor:\n";
  for (const auto& step : steps_) src << "    x = " << step << "\n";
  src << "    return x\n";
  define(m, src.str());
  return m;
}

torch::jit::Module script_module(torch::nn::Module& module) {
  if (auto* layer = dynamic_cast<nn::LoRALayerImpl*>(&module)) return script_lora_layer(*layer);
  if (auto* linear = dynamic_cast<torch::nn::LinearImpl*>(&module)) {
    torch::jit::Module m("Linear");
    m.register_parameter("weight", linear->weight, false);
    if (linear->bias.defined()) {
      m.register_parameter("bias", linear->bias, false);
      define(m,
             "def forward(self, x: Tensor) -> Tensor:\n    return torch.linear(x, "
             "self.weight, self.bias)\n");
    } else {
      define(m,
             "def forward(self, x: Tensor) -> Tensor:\n    return torch.linear(x, "
             "self.weight)\n");
    }
    return m;
  }
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&module)) {
    SequentialBuilder builder;
    for (const auto& child : seq->named_children()) {
      torch::nn::Module& c = *child.value();
      if (dynamic_cast<torch::nn::ReLUImpl*>(&c))
        builder.add_activation("relu");
      else if (dynamic_cast<torch::nn::GELUImpl*>(&c))
        builder.add_activation("gelu");
      else if (dynamic_cast<torch::nn::SiLUImpl*>(&c))
        builder.add_activation("silu");
      else if (dynamic_cast<torch::nn::TanhImpl*>(&c))
        builder.add_activation("tanh");
      else
        builder.add("layer" + child.key(), script_module(c));
    }
    return builder.build();
  }
  TORCH_CHECK(false, "TorchScript export: no exporter for module ", module.name(),
              " (supported: LoRA/QLoRA layers, Linear, ReLU/GELU/SiLU/Tanh, Sequential)");
}

}  // namespace qlora::exporters
