// A checkpoint's data-loader state (trainer_state.json "data") on any bytes,
// restored into a loader, which must then either refuse it and stay as it
// was, or serve batches from where the state says.
#include "fuzz_support.h"
#include "loader_fixture.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (const bool packing : {false, true}) {
    data::DataLoader loader(fuzz::loader_fixture_dataset(), fuzz::loader_fixture_options(packing));
    const auto before = loader.state().to_json();
    try {
      loader.restore(data::LoaderState::from_json(text));
    } catch (const std::invalid_argument& e) {
      if (loader.state().to_json() != before)
        fuzz::finding("a refused state changed the loader", e.what());
      continue;
    }
    for (int i = 0; i < 12; ++i) (void)loader.next();
  }
  return 0;
}
