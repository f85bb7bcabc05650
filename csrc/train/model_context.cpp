#include "qlora/train/model_context.h"

#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <torch/cuda.h>
#include <torch/utils.h>

#include <chrono>
#include <cmath>
#include <sstream>

#include "qlora/data/data_loader.h"
#include "qlora/models/loader.h"
#include "qlora/nn/peft_adapter.h"
#include "qlora/train/device.h"
#include "train/label_tokens.h"
#include "util/log.h"

namespace qlora::train {
namespace {

// Restores training mode when a scope that evaluates or generates ends.
struct EvalMode {
  explicit EvalMode(models::LlamaForCausalLM& m) : model(m) { model->eval(); }
  ~EvalMode() { model->train(); }
  models::LlamaForCausalLM& model;
};

}  // namespace

ModelContext ModelContext::load(const TrainConfig& config,
                                const std::optional<std::string>& adapter) {
  const auto& c = config;
  if (c.training.threads > 0) at::set_num_threads(static_cast<int>(c.training.threads));
  torch::manual_seed(static_cast<uint64_t>(c.training.seed));

  ModelContext ctx;
  ctx.device = resolve_device(c.training.device);
  const at::ScalarType compute = resolve_compute_dtype(c.model.compute_dtype, ctx.device);
  if (ctx.device.is_cuda()) {
    make_current(ctx.device);
    torch::cuda::manual_seed_all(static_cast<uint64_t>(c.training.seed));
    log::info("device: " + describe_device(ctx.device) + ", compute " +
              std::string(c10::toString(compute)));
  }
  ctx.model_path = c.model.path;
  ctx.tokenizer_source = c.model.tokenizer.empty() ? c.model.path : c.model.tokenizer;
  ctx.prompt_template = data::PromptTemplate::from_name(c.data.template_name);
  // An adapter's own config decides the LoRA layers it fits.
  ctx.lora = adapter ? nn::read_peft_adapter_config(*adapter) : c.lora;

  models::LoadOptions load;
  load.lora = ctx.lora;
  load.format = c.model.format;
  load.device = ctx.device;
  // On a GPU the whole model computes in a 16-bit compute dtype (embeddings,
  // norms, the head and the hidden states too, as transformers' QLoRA with
  // torch_dtype=bfloat16: half the activation memory, flash attention); on
  // the CPU only the 4-bit matmuls do, the rest stays float32.
  if (ctx.device.is_cuda() && compute != at::kFloat) load.dtype = compute;
  if (c.model.base_format == "gguf-native")
    load.gguf_native = models::LoadOptions::GgufNativeBase{compute};
  else if (c.model.quantize)
    load.quantize = nn::QuantizedBaseConfig{
        QuantConfig{c.model.blocksize, c.model.quant_type, c.model.double_quant}, compute};
  models::LoadReport report;
  const auto t0 = std::chrono::steady_clock::now();
  ctx.model = models::load_llama(c.model.path, load, &report);
  ctx.model->set_gradient_checkpointing(c.training.gradient_checkpointing,
                                        c.training.selective_recompute);
  std::ostringstream msg;
  msg << "loaded " << c.model.path << " (" << report.format << ") in "
      << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s; ";
  if (report.lora) msg << *report.lora;
  log::info(msg.str());

  ctx.tokenizer = tokenizers::load_tokenizer(ctx.tokenizer_source);
  if (adapter) ctx.load_adapter(*adapter);
  return ctx;
}

void ModelContext::load_adapter(const std::string& dir) { nn::load_peft_adapter(dir, *model); }

double ModelContext::evaluate(const std::shared_ptr<const data::Dataset>& eval,
                              int64_t micro_batch_size) {
  if (!eval || eval->empty()) return std::nan("");
  const auto [total, tokens] = evaluate_sums(eval, micro_batch_size);
  return total / std::max<int64_t>(1, tokens);
}

std::pair<double, int64_t> ModelContext::evaluate_sums(
    const std::shared_ptr<const data::Dataset>& eval, int64_t micro_batch_size, int64_t shard,
    int64_t num_shards) {
  if (!eval || eval->empty()) return {0.0, 0};
  torch::NoGradGuard no_grad;
  EvalMode mode(model);
  data::LoaderOptions lo;
  lo.micro_batch_size = micro_batch_size;
  lo.shuffle = false;
  lo.pad_id = data::padding_id(*tokenizer);
  lo.num_shards = num_shards;
  lo.shard = shard;
  data::DataLoader loader(eval, lo);
  double total = 0;
  int64_t tokens = 0;
  while (auto b = loader.next()) {
    if (b->input_ids.size(0) == 0) continue;
    total += model
                 ->summed_loss(b->input_ids.to(device), b->labels.to(device),
                               b->attention_mask.to(device))
                 .item<double>();
    tokens += detail::count_label_tokens(b->labels);
  }
  return {total, tokens};
}

std::vector<std::pair<std::string, std::string>> ModelContext::generate(
    const std::vector<std::string>& prompts, int64_t max_new_tokens) {
  std::vector<std::pair<std::string, std::string>> out;
  torch::NoGradGuard no_grad;
  EvalMode mode(model);
  for (const auto& prompt : prompts) {
    data::Record r;
    r.instruction = prompt;
    const std::string text = prompt_template.render(r).prompt;
    std::vector<int32_t> ids = tokenizer->encode(text, true);
    std::vector<int64_t> ids64(ids.begin(), ids.end());
    const at::Tensor input =
        at::from_blob(ids64.data(), {1, static_cast<int64_t>(ids64.size())}, at::kLong).to(device);
    models::GenerationConfig g;
    g.max_new_tokens = max_new_tokens;
    if (tokenizer->eos_id()) g.stop_token_ids = std::vector<int64_t>{*tokenizer->eos_id()};
    const at::Tensor seq = model->generate(input, g).cpu();
    std::vector<int32_t> fresh;
    for (int64_t i = input.size(1); i < seq.size(1); ++i) {
      const int32_t id = static_cast<int32_t>(seq[0][i].item<int64_t>());
      if (tokenizer->eos_id() && id == *tokenizer->eos_id()) break;
      fresh.push_back(id);
    }
    out.emplace_back(prompt, tokenizer->decode(fresh, true));
  }
  return out;
}

DataSplits load_data_splits(const TrainConfig& config, const tokenizers::Tokenizer& tokenizer,
                            bool need_train) {
  const auto& c = config;
  data::LoadOptions opts;
  opts.prompt_template = data::PromptTemplate::from_name(c.data.template_name);
  opts.tokenize.max_length = c.data.max_length;
  opts.strictness = c.data.strict ? data::Strictness::kReject : data::Strictness::kSkip;
  const auto load = [&](const std::string& path) {
    auto loaded = data::load_dataset(path, tokenizer, opts);
    for (const auto& issue : loaded.issues) log::warn(issue.to_string());
    if (loaded.truncated > 0)
      log::warn(path + ": " + std::to_string(loaded.truncated) + " of " +
                std::to_string(loaded.records) + " examples longer than data.max_length (" +
                std::to_string(c.data.max_length) + " tokens) truncated");
    return std::move(loaded.dataset);
  };
  data::Dataset train, eval;
  if (!c.data.eval.empty()) {
    eval = load(c.data.eval);
    if (need_train) train = load(c.data.train);
  } else {
    // The eval split is drawn from the training file, so it must be read.
    train = load(c.data.train);
    if (c.data.eval_split > 0) {
      auto split = train.split(c.data.eval_split, static_cast<uint64_t>(c.training.seed));
      train = std::move(split.train);
      eval = std::move(split.eval);
    }
  }
  if (c.data.eval_max_examples > 0 &&
      static_cast<int64_t>(eval.size()) > c.data.eval_max_examples) {
    std::vector<data::Example> head(eval.examples().begin(),
                                    eval.examples().begin() + c.data.eval_max_examples);
    eval = data::Dataset(std::move(head));
  }
  if (need_train && train.empty())
    throw std::runtime_error(c.data.train + ": no training examples");
  return {std::make_shared<data::Dataset>(std::move(train)),
          std::make_shared<data::Dataset>(std::move(eval))};
}

}  // namespace qlora::train
