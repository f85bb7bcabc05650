// QnatFile::open (our NF4 container) on any bytes, with and without the
// checksum pass, then every tensor view.
#include "fuzz_support.h"
#include "qlora/io/qnat_file.h"

using namespace qlora;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = fuzz::write_scratch("input.qnat", data, size);
  for (const bool verify : {true, false}) {
    fuzz::expect_refusal_or_success(path, [&] {
      const auto file = io::QnatFile::open(path, verify);
      (void)file.metadata_json();
      for (const auto& t : file.tensors()) (void)file.tensor(t.name, /*verify_checksum=*/true);
    });
  }
  return 0;
}
