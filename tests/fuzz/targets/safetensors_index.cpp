// A Hugging Face model.safetensors.index.json on any bytes, beside two
// valid shards it may or may not describe correctly.
#include <torch/torch.h>

#include "fuzz_support.h"
#include "qlora/io/safetensors.h"

using namespace qlora;

namespace {

void write_shards_once() {
  static const bool done = [] {
    const std::string dir = fuzz::scratch_dir();
    using Named = std::vector<std::pair<std::string, at::Tensor>>;
    io::save_safetensors(dir + "/model-00001-of-00002.safetensors",
                         Named{{"model.embed_tokens.weight", torch::ones({4, 2})},
                               {"model.norm.weight", torch::ones({2})}});
    io::save_safetensors(dir + "/model-00002-of-00002.safetensors",
                         Named{{"lm_head.weight", torch::zeros({4, 2}, torch::kBFloat16)}});
    return true;
  }();
  (void)done;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  write_shards_once();
  const std::string path = fuzz::write_scratch("model.safetensors.index.json", data, size);
  fuzz::expect_refusal_or_success(path, [&] {
    const auto model = io::ShardedSafetensors::open(path);
    for (const auto& name : model.names()) (void)model.get(name);
  });
  return 0;
}
