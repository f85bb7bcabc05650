// A tiny LLaMA configuration shared by the model and QNAT tests.
#pragma once

#include "qlora/models/llama_config.h"

namespace qlora::test {

inline models::LlamaConfig tiny_llama_config() {
  models::LlamaConfig c;
  c.vocab_size = 64;
  c.hidden_size = 32;
  c.intermediate_size = 48;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 128;
  c.initializer_range = 0.1;  // peaked logits: greedy choices are far from ties
  c.eos_token_ids = {};
  return c;
}

}  // namespace qlora::test
