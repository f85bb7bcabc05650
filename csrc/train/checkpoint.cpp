#include "train/checkpoint.h"

#include <torch/serialize.h>
#include <unistd.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <sstream>
#include <vector>

#include "qlora/io/atomic_file.h"
#include "qlora/nn/peft_adapter.h"
#include "train/output_folder.h"
#include "util/fs.h"
#include "util/json_file.h"
#include "util/rng_state.h"

namespace qlora::train::detail {
namespace {

constexpr const char* kPrefix = "checkpoint-";
constexpr const char* kTmpPrefix = ".tmp-checkpoint-";
constexpr const char* kStateFile = "/trainer_state.json";

// The step of a folder named checkpoint-<digits>, else nothing.
std::optional<int64_t> checkpoint_step(const std::string& name) {
  const size_t n = std::char_traits<char>::length(kPrefix);
  if (name.compare(0, n, kPrefix) != 0 || name.size() == n ||
      name.find_first_not_of("0123456789", n) != std::string::npos)
    return std::nullopt;
  return std::stoll(name.substr(n));
}

void write_text(const std::string& path, const std::string& text) {
  io::write_bytes_atomic(path, text.data(), text.size());
}

}  // namespace

std::string checkpoint_name(int64_t step) { return kPrefix + std::to_string(step); }

namespace {

void write_checkpoint_files(const std::string& tmp, const CheckpointParts& parts,
                            const LoopState& state) {
  nn::save_peft_adapter(tmp + "/adapter", *parts.model, parts.lora, {parts.base_model});
  {
    torch::serialize::OutputArchive archive;
    parts.optimizer.save(archive);
    // The CPU generator seeds LoRA dropout: a resumed run draws the masks an
    // uninterrupted one would. A GPU run keeps its device generator too.
    const util::RngState rng = util::RngState::capture(parts.device);
    archive.write("rng_state", rng.cpu);
    if (rng.device_state.defined()) archive.write("device_rng_state", rng.device_state);
    std::ostringstream bytes;
    archive.save_to(bytes);
    write_text(tmp + "/optimizer.pt", bytes.str());
  }
  nlohmann::json j;
  j["step"] = state.step;
  j["total_steps"] = state.total_steps;
  j["skipped_steps"] = state.skipped_steps;
  j["consecutive_nonfinite"] = state.consecutive_nonfinite;
  j["trained_tokens"] = state.trained_tokens;
  j["train_seconds"] = state.train_seconds;
  j["data"] = nlohmann::json::parse(state.data_state_json);
  write_text(tmp + "/config.yaml", parts.config_yaml);
  write_text(tmp + kStateFile, j.dump(2) + "\n");
}

std::string what_is_left(const std::string& output_dir) {
  std::optional<std::string> latest;
  try {
    latest = find_latest_checkpoint(output_dir);
  } catch (const std::exception&) {
  }
  return latest ? "; the last complete checkpoint, " + *latest + ", is intact"
                : "; no earlier checkpoint exists";
}

// One try: a temporary folder, filled, then renamed into place; on failure
// nothing partial is left and the error is rethrown.
void write_checkpoint_once(const std::string& tmp, const std::string& final_dir,
                           const CheckpointParts& parts, const LoopState& state) {
  try {
    fs::remove_tree(tmp);
    fs::make_dir(tmp);  // not mkdir -p: a removed output folder must show, not be re-made here
    write_checkpoint_files(tmp, parts, state);
    fs::remove_tree(final_dir);  // a re-run of the same step replaces it
    fs::rename_durably(tmp, final_dir);
  } catch (...) {
    try {
      fs::remove_tree(tmp);
    } catch (const std::exception&) {
    }
    throw;
  }
}

}  // namespace

std::string save_checkpoint(const std::string& output_dir, const CheckpointParts& parts,
                            const LoopState& state) {
  const std::string final_dir = output_dir + "/" + checkpoint_name(state.step);
  const std::string tmp =
      output_dir + "/" + kTmpPrefix + std::to_string(state.step) + "-" + std::to_string(getpid());
  try {
    write_into_output_folder(output_dir, final_dir,
                             [&] { write_checkpoint_once(tmp, final_dir, parts, state); });
  } catch (const std::exception& e) {
    throw CheckpointError("cannot save checkpoint " + final_dir + ": " + e.what() +
                          what_is_left(output_dir));
  }
  return final_dir;
}

LoopState load_checkpoint(const std::string& dir, const CheckpointParts& parts) {
  const auto j = util::read_json_file(dir + kStateFile, "checkpoint state");
  nn::load_peft_adapter(dir + "/adapter", *parts.model);
  torch::serialize::InputArchive archive;
  // States saved on one device resume on another (GPU <-> CPU): map them to
  // the device training runs on now.
  archive.load_from(dir + "/optimizer.pt", parts.device);
  parts.optimizer.load(archive);
  util::RngState rng;
  archive.read("rng_state", rng.cpu);
  rng.cpu = rng.cpu.cpu();
  at::Tensor device_state;
  if (parts.device.is_cuda() && archive.try_read("device_rng_state", device_state)) {
    rng.device = parts.device;
    rng.device_state = device_state.cpu();
  }
  rng.restore();
  LoopState s;
  s.step = j.at("step").get<int64_t>();
  s.total_steps = j.value("total_steps", int64_t{0});
  s.skipped_steps = j.at("skipped_steps").get<int64_t>();
  s.consecutive_nonfinite = j.at("consecutive_nonfinite").get<int64_t>();
  s.trained_tokens = j.at("trained_tokens").get<int64_t>();
  s.train_seconds = j.at("train_seconds").get<double>();
  s.data_state_json = j.at("data").dump();
  return s;
}

std::optional<std::string> find_latest_checkpoint(const std::string& output_dir) {
  if (!fs::is_dir(output_dir)) return std::nullopt;
  std::optional<int64_t> best;
  for (const auto& name : fs::list_dir(output_dir)) {
    const auto step = checkpoint_step(name);
    if (!step || !fs::exists(output_dir + "/" + name + kStateFile)) continue;
    best = std::max(best.value_or(*step), *step);
  }
  if (!best) return std::nullopt;
  return output_dir + "/" + checkpoint_name(*best);
}

void prune_checkpoints(const std::string& output_dir, int64_t keep_last) {
  std::vector<int64_t> steps;
  for (const auto& name : fs::list_dir(output_dir)) {
    const std::string path = output_dir + "/" + name;
    if (name.rfind(kTmpPrefix, 0) == 0) {
      fs::remove_tree(path);
    } else if (const auto step = checkpoint_step(name)) {
      if (fs::exists(path + kStateFile))
        steps.push_back(*step);
      else
        fs::remove_tree(path);
    }
  }
  std::sort(steps.begin(), steps.end());
  while (static_cast<int64_t>(steps.size()) > keep_last) {
    fs::remove_tree(output_dir + "/" + checkpoint_name(steps.front()));
    steps.erase(steps.begin());
  }
}

}  // namespace qlora::train::detail
