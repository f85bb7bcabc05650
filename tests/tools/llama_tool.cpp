// Command-line bridge for the Python LLaMA parity tests:
//   llama_tool logits MODEL_PATH IDS_JSON OUT.safetensors [options]
//       load MODEL_PATH (a Hugging Face / bitsandbytes folder or a .gguf
//       file), run the ids through it and save float32 logits [B, T, V]
//       under "logits".
//   llama_tool generate MODEL_PATH IDS_JSON N [options]
//       greedy decoding of N new tokens (stopping at the config's EOS);
//       prints the full sequences as JSON, one list per row.
// IDS_JSON is a JSON list of equally long int lists, inline or in a file.
// Options:
//   --quantize nf4|fp4   quantise every Linear but lm_head while loading
//   --double-quant       with --quantize: double quantisation of absmax
//   --blocksize N        with --quantize (default 64)
//   --gguf               read MODEL_PATH as GGUF whatever its name
//   --gguf-native        keep the GGUF Linear weights in their ggml blocks
//   --mask MASK_JSON     attention_mask of 0/1, same shape as the ids
//   --dtype NAME         float32 (default), bfloat16 or float16
// Exits 0 on success, 1 with the error on stderr, 2 on bad usage.
#include <c10/util/Exception.h>

#include <fstream>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "qlora/io/safetensors.h"
#include "qlora/models/loader.h"

namespace {

using qlora::models::LoadOptions;

struct Args {
  std::string command, model, ids, third;
  LoadOptions load;
  std::optional<std::string> mask;
};

int usage() {
  std::cerr << "usage: llama_tool logits MODEL_PATH IDS_JSON OUT.safetensors [options]\n"
               "       llama_tool generate MODEL_PATH IDS_JSON N [options]\n"
               "options: --quantize nf4|fp4 --double-quant --blocksize N --gguf --gguf-native "
               "--mask JSON "
               "--dtype float32|bfloat16|float16\n";
  return 2;
}

// A [B, T] int64 tensor from a JSON list of lists, given inline or as a file.
at::Tensor read_matrix(const std::string& arg) {
  std::string text = arg;
  if (!arg.empty() && arg[0] != '[') {
    std::ifstream in(arg);
    TORCH_CHECK(in, "cannot open ", arg);
    std::stringstream s;
    s << in.rdbuf();
    text = s.str();
  }
  const auto j = nlohmann::json::parse(text);
  TORCH_CHECK(j.is_array() && !j.empty() && j[0].is_array(), "expected a list of int lists");
  std::vector<int64_t> flat;
  const size_t T = j[0].size();
  for (const auto& row : j) {
    TORCH_CHECK(row.is_array() && row.size() == T, "rows must all have ", T, " entries");
    for (const auto& v : row) flat.push_back(v.get<int64_t>());
  }
  return at::tensor(flat, at::kLong)
      .view({static_cast<int64_t>(j.size()), static_cast<int64_t>(T)});
}

at::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "unknown dtype ", name);
}

bool parse(int argc, char** argv, Args& a) {
  if (argc < 5) return false;
  a.command = argv[1];
  a.model = argv[2];
  a.ids = argv[3];
  a.third = argv[4];
  std::optional<std::string> quant;
  bool double_quant = false;
  int64_t blocksize = 64;
  for (int i = 5; i < argc; ++i) {
    const std::string opt = argv[i];
    const bool has_value = i + 1 < argc;
    if (opt == "--quantize" && has_value) {
      quant = argv[++i];
    } else if (opt == "--double-quant") {
      double_quant = true;
    } else if (opt == "--blocksize" && has_value) {
      blocksize = std::stoll(argv[++i]);
    } else if (opt == "--gguf") {
      a.load.format = "gguf";
    } else if (opt == "--gguf-native") {
      a.load.gguf_native = qlora::models::LoadOptions::GgufNativeBase{};
    } else if (opt == "--mask" && has_value) {
      a.mask = argv[++i];
    } else if (opt == "--dtype" && has_value) {
      a.load.dtype = parse_dtype(argv[++i]);
    } else {
      return false;
    }
  }
  if (quant) {
    qlora::nn::QuantizedBaseConfig base;
    base.quant.quant_type = *quant;
    base.quant.blocksize = blocksize;
    base.quant.double_quant = double_quant;
    base.compute_dtype = at::kFloat;
    a.load.quantize = base;
  }
  return a.command == "logits" || a.command == "generate";
}

void print_report(const qlora::models::LoadReport& r) {
  std::cerr << "loaded " << r.format << " (" << r.config_source
            << "): " << r.config.num_hidden_layers << " layers, " << r.quantized.size()
            << " 4-bit Linear layers\n";
}

int run(const Args& a) {
  qlora::models::LoadReport report;
  auto model = qlora::models::load_llama(a.model, a.load, &report);
  print_report(report);
  const at::Tensor ids = read_matrix(a.ids);
  std::optional<at::Tensor> mask;
  if (a.mask) mask = read_matrix(*a.mask);
  at::NoGradGuard no_grad;
  if (a.command == "logits") {
    const at::Tensor logits = model->forward(ids, mask);
    const std::map<std::string, at::Tensor> tensors{{"logits", logits.contiguous()}};
    qlora::io::save_safetensors(a.third, tensors);
    return 0;
  }
  qlora::models::GenerationConfig g;
  g.max_new_tokens = std::stoll(a.third);
  const at::Tensor out = model->generate(ids, g, mask).contiguous();
  nlohmann::json rows = nlohmann::json::array();
  for (int64_t b = 0; b < out.size(0); ++b) {
    std::vector<int64_t> row(out[b].data_ptr<int64_t>(), out[b].data_ptr<int64_t>() + out.size(1));
    rows.push_back(row);
  }
  std::cout << rows.dump() << '\n';
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, args)) return usage();
  try {
    return run(args);
  } catch (const c10::Error& e) {
    std::cerr << e.msg() << '\n';
  } catch (const std::exception& e) {
    std::cerr << e.what() << '\n';
  }
  return 1;
}
