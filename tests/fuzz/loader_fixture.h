// The small dataset and loader options the loader_state target restores
// states into; the seed writer takes its seeds from the same loader, so the
// seeds carry a fingerprint the target accepts.
#pragma once

#include <memory>

#include "qlora/data/data_loader.h"

namespace qlora::fuzz {

inline std::shared_ptr<const data::Dataset> loader_fixture_dataset() {
  std::vector<data::Example> examples;
  for (int32_t i = 0; i < 23; ++i) {
    data::Example e;
    for (int32_t t = 0; t <= i % 7; ++t) {
      e.input_ids.push_back(t + i);
      e.labels.push_back(t == 0 ? -100 : t + i);
    }
    examples.push_back(std::move(e));
  }
  return std::make_shared<data::Dataset>(std::move(examples));
}

inline data::LoaderOptions loader_fixture_options(bool packing) {
  data::LoaderOptions o;
  o.micro_batch_size = 3;
  o.seed = 7;
  o.packing = packing;
  o.max_length = 16;
  return o;
}

}  // namespace qlora::fuzz
