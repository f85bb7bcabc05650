// Test driver for the optimizer conformance test: runs PagedAdamW on the
// parameters in IN (tensors "p.<name>") with the gradients "g<step>.<name>",
// and writes the final parameters to OUT.
//   optim_tool IN OUT STEPS LR WEIGHT_DECAY BITS [--paged]
#include <torch/torch.h>

#include <iostream>
#include <map>

#include "qlora/io/safetensors.h"
#include "qlora/optim/paged_adamw.h"

int main(int argc, char** argv) {
  if (argc < 7) {
    std::cerr << "usage: optim_tool IN OUT STEPS LR WEIGHT_DECAY BITS [--paged]\n";
    return 2;
  }
  try {
    const auto in = qlora::io::SafetensorsReader::open(argv[1]).load_all();
    const int64_t steps = std::stoll(argv[3]);
    std::map<std::string, at::Tensor> params;
    for (const auto& [key, t] : in)
      if (key.rfind("p.", 0) == 0) params[key.substr(2)] = t.clone().requires_grad_();
    std::vector<at::Tensor> list;
    for (auto& [name, p] : params) list.push_back(p);
    qlora::optim::PagedAdamW opt(list, qlora::optim::PagedAdamWOptions(std::stod(argv[4]))
                                           .weight_decay(std::stod(argv[5]))
                                           .optim_bits(std::stoll(argv[6]))
                                           .paged(argc > 7 && std::string(argv[7]) == "--paged"));
    for (int64_t s = 0; s < steps; ++s) {
      for (auto& [name, p] : params) p.mutable_grad() = in.at("g" + std::to_string(s) + "." + name);
      opt.step();
    }
    std::map<std::string, at::Tensor> out;
    for (auto& [name, p] : params) out[name] = p.detach();
    qlora::io::save_safetensors(argv[2], out);
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
