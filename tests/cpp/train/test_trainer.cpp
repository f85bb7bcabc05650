// Trainer pieces: the accumulation-normalised loss, LR schedules and config
// validation (the end-to-end runs are in tests/python/test_trainer_cli.py).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "qlora/train/config.h"
#include "qlora/train/device.h"
#include "qlora/train/lr_schedule.h"
#include "reference_loss.h"
#include "test_utils.h"
#include "train/label_tokens.h"
#include "train/output_folder.h"
#include "util/fs.h"

namespace {

using namespace qlora::train;
using qlora::test::expect_error;
using qlora::test::summed_causal_lm_loss;
using qlora::train::detail::count_label_tokens;

TEST(TrainerLoss, AccumulatedMicroBatchesEqualOneBigBatch) {
  torch::manual_seed(0);
  // Uneven label counts per micro-batch: the case where per-batch means differ.
  const at::Tensor logits = torch::randn({4, 6, 11}, torch::requires_grad());
  at::Tensor labels = torch::randint(0, 11, {4, 6});
  labels.index_put_({0, torch::indexing::Slice(0, 5)}, -100);  // 1 label token left... then shifted
  labels.index_put_({2, torch::indexing::Slice(0, 2)}, -100);
  labels.select(1, 0).fill_(-100);

  const int64_t n = count_label_tokens(labels);
  const at::Tensor big = summed_causal_lm_loss(logits, labels) / n;
  big.backward();
  const at::Tensor big_grad = logits.grad().clone();

  logits.mutable_grad().zero_();
  at::Tensor total = torch::zeros({});
  for (int64_t i = 0; i < 4; ++i) {
    const at::Tensor loss =
        summed_causal_lm_loss(logits.narrow(0, i, 1), labels.narrow(0, i, 1)) / n;
    loss.backward();
    total = total + loss.detach();
  }
  EXPECT_TRUE(at::allclose(total, big.detach(), 1e-6, 1e-6));
  EXPECT_TRUE(at::allclose(logits.grad(), big_grad, 1e-6, 1e-7));
  // The mean of per-micro-batch means would differ: that is the bug this avoids.
  double mean_of_means = 0;
  for (int64_t i = 0; i < 4; ++i)
    mean_of_means += (summed_causal_lm_loss(logits.narrow(0, i, 1), labels.narrow(0, i, 1)) /
                      count_label_tokens(labels.narrow(0, i, 1)))
                         .item<double>() /
                     4;
  EXPECT_GT(std::abs(mean_of_means - big.item<double>()), 1e-3);
}

TEST(TrainerLoss, MatchesCrossEntropyMeanOverShiftedLabels) {
  torch::manual_seed(1);
  const at::Tensor logits = torch::randn({2, 5, 7});
  at::Tensor labels = torch::randint(0, 7, {2, 5});
  labels[1][3] = -100;
  const at::Tensor ref = torch::nn::functional::cross_entropy(
      logits.narrow(1, 0, 4).reshape({-1, 7}), labels.narrow(1, 1, 4).reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().ignore_index(-100));
  EXPECT_TRUE(
      at::allclose(summed_causal_lm_loss(logits, labels) / count_label_tokens(labels), ref));
}

TEST(LRSchedule, WarmupThenDecay) {
  LRSchedule cosine("cosine", 1.0, 10, 110);
  EXPECT_DOUBLE_EQ(cosine.lr(0), 0.0);
  EXPECT_DOUBLE_EQ(cosine.lr(5), 0.5);
  EXPECT_DOUBLE_EQ(cosine.lr(10), 1.0);
  EXPECT_NEAR(cosine.lr(60), 0.5, 1e-12);
  EXPECT_NEAR(cosine.lr(110), 0.0, 1e-12);
  LRSchedule linear("linear", 2.0, 0, 100);
  EXPECT_DOUBLE_EQ(linear.lr(25), 1.5);
  LRSchedule constant("constant", 3.0, 2, 100);
  EXPECT_DOUBLE_EQ(constant.lr(1), 1.5);
  EXPECT_DOUBLE_EQ(constant.lr(99), 3.0);
  EXPECT_THROW(LRSchedule("step", 1, 0, 1), std::invalid_argument);
}

const char* kMinimal = "model: {path: m.gguf}\ndata: {train: t.jsonl}\n";

TEST(TrainConfig, DefaultsOverridesAndRoundTrip) {
  const auto c = TrainConfig::from_yaml_string(
      kMinimal,
      {"training.lr=1e-4", "lora.target_modules=[q_proj, v_proj]", "model.quantize=false"});
  EXPECT_DOUBLE_EQ(c.training.lr, 1e-4);
  EXPECT_EQ(c.lora.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_FALSE(c.model.quantize);
  EXPECT_EQ(c.training.optimizer, "paged_adamw_8bit");
  const auto again = TrainConfig::from_yaml_string(c.to_yaml());
  EXPECT_EQ(again.to_yaml(), c.to_yaml());
}

// Found by fuzzing: a prompt or path with a carriage return (or other control bytes) was
// written plain and read back as another string, so a checkpoint's config changed on resume.
TEST(TrainConfig, StringsWithControlBytesRoundTrip) {
  TrainConfig c = TrainConfig::from_yaml_string(kMinimal);
  c.generation.prompts = {"line\rreturn", "tab\there",  "two\nlines",     "del\x7f", "bell\x07",
                          "caf\xc3\xa9",  "  spaced  ", "#not a comment", "- dash",  ""};
  c.data.train = "dir with\rCR/train.jsonl";
  const std::string yaml = c.to_yaml();
  const TrainConfig again = TrainConfig::from_yaml_string(yaml);
  EXPECT_EQ(again.generation.prompts, c.generation.prompts) << yaml;
  EXPECT_EQ(again.data.train, c.data.train) << yaml;
  EXPECT_EQ(again.to_yaml(), yaml);
}

TEST(TrainConfig, MistakesAreClearErrors) {
  expect_error(
      [] {
        TrainConfig::from_yaml_string("model: {path: m}\ndata: {train: t}\ntraining: {lrr: 1}\n");
      },
      "unknown key \"training.lrr\"; valid keys are:");
  expect_error([] { TrainConfig::from_yaml_string(kMinimal, {"training.micro_batch_size=big"}); },
               "key \"training.micro_batch_size\" has an invalid value \"big\"");
  expect_error([] { TrainConfig::from_yaml_string(kMinimal, {"training.optimizer=sgd"}); },
               "\"training.optimizer\" must be one of paged_adamw_32bit, paged_adamw_8bit, adamw");
  expect_error([] { TrainConfig::from_yaml_string("data: {train: t}\n"); },
               "\"model.path\" is required");
  expect_error([] { TrainConfig::from_yaml_string(kMinimal, {"training.lr"}); },
               "expected key=value");
  expect_error([] { TrainConfig::from_yaml_string("model: [\n"); }, "not valid YAML");
  expect_error(
      [] { TrainConfig::from_yaml_string(kMinimal, {"training.selective_recompute=true"}); },
      "\"training.selective_recompute\" needs \"training.gradient_checkpointing\": true");
  EXPECT_TRUE(TrainConfig::from_yaml_string(kMinimal, {"training.gradient_checkpointing=true",
                                                       "training.selective_recompute=true"})
                  .training.selective_recompute);
  expect_error([] { TrainConfig::from_yaml_file("/nonexistent/config.yaml"); },
               "/nonexistent/config.yaml: cannot open the config file");
}

}  // namespace

TEST(TrainDevice, SettingsResolveOrSayWhatIsMissing) {
  using qlora::train::resolve_compute_dtype;
  using qlora::train::resolve_device;
  EXPECT_EQ(resolve_device("cpu"), c10::Device(c10::kCPU));
  EXPECT_EQ(resolve_compute_dtype("auto", c10::Device(c10::kCPU)), at::kFloat);
  EXPECT_EQ(resolve_compute_dtype("bfloat16", c10::Device(c10::kCPU)), at::kBFloat16);
  qlora::test::expect_error([] { resolve_device("tpu"); }, "auto, cpu, cuda or cuda:N");
  qlora::test::expect_error([] { resolve_device("cuda:x"); }, "auto, cpu, cuda or cuda:N");
  qlora::test::expect_error([] { resolve_compute_dtype("fp8", c10::Device(c10::kCPU)); },
                            "model.compute_dtype must be");
  if (torch::cuda::is_available()) {
    EXPECT_EQ(resolve_device("auto"), c10::Device(c10::kCUDA, 0));
    qlora::test::expect_error([] { resolve_device("cuda:999"); },
                              "training.device: cuda:999, but only");
  } else {
    EXPECT_EQ(resolve_device("auto"), c10::Device(c10::kCPU));
    qlora::test::expect_error([] { resolve_device("cuda"); }, "training.device: cuda, but ");
    qlora::test::expect_error([] { resolve_device("cuda:1"); }, "training.device: cuda:1, but ");
  }
}

// A folder removed under a run (before a write or in the middle of it) is
// made again and the write repeated once; other failures are not retried.
TEST(OutputFolder, RemovedFolderIsMadeAgainAndTheWriteRepeated) {
  namespace fs = qlora::fs;
  using qlora::train::detail::write_into_output_folder;
  qlora::test::TempDir scratch;
  const std::string out = scratch.path() + "/out";

  int calls = 0;
  write_into_output_folder(out, "file", [&] {  // gone before the write
    ++calls;
    EXPECT_TRUE(fs::is_dir(out));
  });
  EXPECT_EQ(calls, 1);

  calls = 0;
  write_into_output_folder(out, "file", [&] {  // removed during the write
    if (++calls == 1) {
      fs::remove_tree(out);
      throw std::runtime_error("cannot write " + out + "/file: No such file or directory");
    }
    EXPECT_TRUE(fs::is_dir(out));
  });
  EXPECT_EQ(calls, 2);

  // How often a write that always fails ran, and that its error came through.
  const auto calls_of_failing_write = [&](bool remove_folder) {
    int n = 0;
    qlora::test::expect_error(
        [&] {
          write_into_output_folder(out, "file", [&] {
            ++n;
            if (remove_folder) fs::remove_tree(out);
            throw std::runtime_error("write failed");
          });
        },
        "write failed");
    return n;
  };
  EXPECT_EQ(calls_of_failing_write(false), 1);  // the folder is there: a real failure
  EXPECT_EQ(calls_of_failing_write(true), 2);   // removed again and again: one retry only
  fs::remove_tree(out);
}
