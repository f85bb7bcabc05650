// qlora_fuzz_seeds OUT: the seeds only our own writers can make, one folder
// per fuzz target: QNAT files of a tiny QLoRA model (NF4 and FP4, with and
// without the adapter), a PEFT adapter, GGUF files from our writer with every
// metadata type and several tensor types, and data-loader states. The rest
// of the corpus (tokenizers, configs, datasets, gguf-py files) comes from
// tools/fuzz/make_seed_corpus.py, which runs this program first.
#include <sys/stat.h>
#include <torch/torch.h>

#include <iostream>

#include "loader_fixture.h"
#include "qlora/io/gguf_writer.h"
#include "qlora/models/llama.h"
#include "qlora/models/qnat.h"
#include "qlora/nn/apply_lora.h"
#include "qlora/nn/lora_layer.h"
#include "qlora/nn/peft_adapter.h"
#include "tiny_llama.h"

using namespace qlora;

namespace {

std::string folder(const std::string& out, const std::string& target) {
  const std::string dir = out + "/" + target;
  mkdir(dir.c_str(), 0755);
  return dir;
}

models::LlamaConfig tiny_config() {
  models::LlamaConfig c = test::tiny_llama_config();
  c.num_hidden_layers = 1;  // seeds stay small: fuzzing speed is bytes per input
  return c;
}

models::LlamaForCausalLM tiny_qlora(const std::string& quant_type, nn::LoRAConfig* lora) {
  torch::manual_seed(0);
  models::LlamaForCausalLM m(tiny_config());
  lora->r = 2;
  lora->alpha = 4;
  lora->target_modules = {"q_proj", "v_proj", "down_proj"};
  nn::apply_lora(*m, *lora, nn::QuantizedBaseConfig{{64, quant_type, true}, at::kFloat});
  return m;
}

void write_gguf(const std::string& path, bool with_vocab) {
  io::GgufWriter w;
  w.add_string("general.architecture", "llama");
  w.add_u8("fuzz.u8", 1);
  w.add_i8("fuzz.i8", -1);
  w.add_u16("fuzz.u16", 2);
  w.add_i16("fuzz.i16", -2);
  w.add_u32("llama.block_count", 1);
  w.add_i32("fuzz.i32", -3);
  w.add_u64("fuzz.u64", 4);
  w.add_i64("fuzz.i64", -4);
  w.add_f32("llama.rope.freq_base", 10000.0f);
  w.add_f64("fuzz.f64", 0.5);
  w.add_bool("fuzz.bool", true);
  w.add_u32("llama.context_length", 64);
  w.add_u32("llama.embedding_length", 32);
  w.add_u32("llama.feed_forward_length", 48);
  w.add_u32("llama.attention.head_count", 4);
  w.add_u32("llama.attention.head_count_kv", 2);
  w.add_f32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.add_i64_array("fuzz.i64s", {1, -2, 3});
  if (with_vocab) {
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>", "a", "b", "ab", "Ġ", "Ġa"};
    w.add_string("tokenizer.ggml.model", "gpt2");
    w.add_string("tokenizer.ggml.pre", "smollm");
    w.add_string_array("tokenizer.ggml.tokens", tokens);
    w.add_i32_array("tokenizer.ggml.token_type", {3, 3, 3, 1, 1, 1, 1, 1});
    w.add_string_array("tokenizer.ggml.merges", {"a b", "Ġ a"});
    w.add_u32("tokenizer.ggml.bos_token_id", 1);
    w.add_u32("tokenizer.ggml.eos_token_id", 2);
    w.add_f32_array("tokenizer.ggml.scores", std::vector<float>(tokens.size(), 0.0f));
  }
  torch::manual_seed(1);
  w.add_tensor("token_embd.weight", torch::randn({64, 32}), io::GgmlType::F16);
  w.add_tensor("output_norm.weight", torch::ones({32}), io::GgmlType::F32);
  w.add_tensor("blk.0.attn_q.weight", torch::randn({32, 32}), io::GgmlType::Q8_0);
  w.add_tensor("blk.0.attn_k.weight", torch::randn({16, 32}), io::GgmlType::Q4_0);
  w.add_tensor("blk.0.attn_v.weight", torch::randn({16, 32}), io::GgmlType::BF16);
  w.write(path);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: qlora_fuzz_seeds OUT\n";
    return 2;
  }
  const std::string out = argv[1];
  mkdir(out.c_str(), 0755);
  try {
    const std::string qnat = folder(out, "qnat");
    for (const std::string quant_type : {"nf4", "fp4"}) {
      nn::LoRAConfig lora;
      auto m = tiny_qlora(quant_type, &lora);
      models::QnatMetadata meta;
      meta.lora = lora;
      models::save_qnat(qnat + "/tiny_" + quant_type + ".qnat", m, meta);
      meta.include_adapter = false;
      models::save_qnat(qnat + "/tiny_" + quant_type + "_base.qnat", m, meta);
      if (quant_type == "nf4") {
        const std::string st = folder(out, "safetensors");
        nn::save_peft_adapter(out + "/safetensors/adapter", *m, lora, {"tiny"});
      }
    }
    write_gguf(folder(out, "gguf") + "/ours.gguf", false);
    write_gguf(folder(out, "gguf_vocab") + "/ours_vocab.gguf", true);
    const std::string states = folder(out, "loader_state");
    for (const bool packing : {false, true}) {
      data::DataLoader loader(fuzz::loader_fixture_dataset(),
                              fuzz::loader_fixture_options(packing));
      for (int i = 0; i < 3; ++i) {
        const std::string json = loader.state().to_json();
        const std::string name =
            states + "/state_" + std::to_string(packing) + "_" + std::to_string(i) + ".json";
        FILE* f = std::fopen(name.c_str(), "wb");
        if (f == nullptr || std::fwrite(json.data(), 1, json.size(), f) != json.size())
          throw std::runtime_error("cannot write " + name);
        std::fclose(f);
        for (int k = 0; k < 4; ++k) (void)loader.next();
      }
    }
  } catch (const std::exception& e) {
    std::cerr << "qlora_fuzz_seeds: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
