// Test driver for the bad-batch test: trains as `qlora train CONFIG` would,
// but at step STEP one trainable parameter's gradient becomes NaN, as one
// bad batch makes it; prints the run's summary JSON.
//   bad_batch_tool CONFIG STEP
#include <torch/torch.h>

#include <iostream>
#include <limits>

#include "qlora/train/trainer.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: bad_batch_tool CONFIG STEP\n";
    return 2;
  }
  try {
    const int64_t bad_step = std::stoll(argv[2]);
    qlora::train::Trainer trainer(qlora::train::TrainConfig::from_yaml_file(argv[1]));
    trainer.set_gradient_hook([bad_step](int64_t step, const std::vector<at::Tensor>& params) {
      if (step != bad_step) return;
      at::Tensor grad = params.at(0).mutable_grad();
      grad.view(-1)[0] = std::numeric_limits<float>::quiet_NaN();
    });
    std::cout << trainer.run().to_json();
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
