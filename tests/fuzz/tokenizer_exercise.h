// What a fuzz target does with a tokenizer it managed to load: the calls
// training and generation make, on fixed texts and on the input's own bytes.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "qlora/tokenizers/tokenizer.h"

namespace qlora::fuzz {

inline void exercise_tokenizer(const tokenizers::Tokenizer& tok, std::string_view input) {
  const std::string texts[] = {"Hello world", " <eos> \n\n  tabs\tand 123", "\xff\xfe broken",
                               std::string(input.substr(0, 256))};
  for (const auto& text : texts) {
    const auto ids = tok.encode(text, true);
    (void)tok.decode(ids, false);
    (void)tok.decode(ids, true);
  }
  const auto n = static_cast<int32_t>(tok.vocab_size());
  // Ids that name no token (negative, past the end) must be skipped, not read.
  (void)tok.decode({-1, 0, n - 1, n, n + 1000, INT32_MAX, INT32_MIN}, false);
  for (int32_t id : {0, n - 1, n, -1}) (void)tok.id_to_token(id);
  (void)tok.token_to_id("<eos>");
  for (int32_t id = 0; id < n && id < 64; ++id) (void)tok.is_special(id);
}

}  // namespace qlora::fuzz
