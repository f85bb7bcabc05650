// qlora: the command-line front end.
//   qlora train CONFIG [--set key=value ...] [--dry-run]
//               [--nproc-per-node N [--nnodes M --node-rank R --master-addr A --master-port P]]
//   qlora plan CONFIG [--set ...]
//   qlora eval CONFIG [--adapter DIR] [--set ...]
//   qlora generate (CONFIG | --model PATH [--template T]) --prompt TEXT [--adapter DIR]
//                  [--max-new-tokens N] [--set ...]
//   qlora quantize --model PATH --out DIR [--quant-type nf4|fp4] [--blocksize N]
//   [--no-double-quant] qlora inspect FILE
// Exit codes: 0 success, 1 runtime error (named file/key in the message), 2 usage,
// 3 plan / --dry-run: the run does not fit in free memory,
// 130 / 143: training stopped by SIGINT / SIGTERM after saving a checkpoint.
#include <c10/util/Exception.h>
#include <signal.h>
#include <CLI/CLI.hpp>

#include <cstdio>
#include <fstream>
#include <iomanip>
#include <iostream>

#include "inspect.h"
#include "qlora/dist/launcher.h"
#include "qlora/export/export.h"
#include "qlora/export/hf_folder.h"
#include "qlora/models/loader.h"
#include "qlora/train/memory_plan.h"
#include "qlora/train/model_context.h"
#include "qlora/train/stop_signals.h"
#include "qlora/train/trainer.h"

namespace {

using qlora::train::ModelContext;
using qlora::train::TrainConfig;
using qlora::train::Trainer;

void print_generations(const char* title,
                       const std::vector<std::pair<std::string, std::string>>& g) {
  if (g.empty()) return;
  std::cout << title << "\n";
  for (const auto& [prompt, text] : g) std::cout << "  > " << prompt << "\n    " << text << "\n";
}

// The memory a run will need, from metadata only; exit 3 when it does not fit.
int plan(const TrainConfig& config) {
  const qlora::train::MemoryPlan p = qlora::train::plan_memory(config);
  std::cout << qlora::train::format_memory_plan(p);
  return p.fits() ? 0 : 3;
}

int train(const std::string& config_path, const std::vector<std::string>& sets, bool dry_run) {
  if (dry_run) return plan(TrainConfig::from_yaml_file(config_path, sets));
  Trainer trainer(TrainConfig::from_yaml_file(config_path, sets));
  const qlora::train::StopSignalHandler stop_on_signal;
  const auto s = trainer.run();
  std::cout << std::fixed << std::setprecision(4) << "\n== qlora train: done ==\n"
            << "held-out eval loss: before " << s.eval_loss_before << "  after "
            << s.eval_loss_after << "  (" << std::setprecision(1)
            << 100.0 * (s.eval_loss_before - s.eval_loss_after) / s.eval_loss_before << "% lower)\n"
            << "steps " << s.steps << " (skipped " << s.skipped_steps << ")"
            << (s.resumed_from_step ? ", resumed from step " + std::to_string(s.resumed_from_step)
                                    : "")
            << "\ntraining throughput " << s.tokens_per_second << " tokens/s, peak RSS "
            << s.peak_rss_bytes / (1024.0 * 1024.0) << " MiB, wall " << s.wall_seconds << " s\n";
  print_generations("generations before training:", s.generations_before);
  print_generations("generations after training:", s.generations_after);
  std::cout << "wrote:\n";
  for (const auto& p : s.paths) std::cout << "  " << p << "\n";
  return 0;
}

// A config for commands that only need a model: from a file, or from --model.
TrainConfig model_config(const std::string& config_path, const std::string& model_path,
                         const std::string& template_name, std::vector<std::string> sets) {
  if (!config_path.empty()) return TrainConfig::from_yaml_file(config_path, sets);
  if (model_path.empty()) throw std::invalid_argument("give a CONFIG file or --model PATH");
  sets.insert(sets.begin(),
              {"model.path=" + model_path, "data.train=unused", "data.template=" + template_name});
  return TrainConfig::from_yaml_string("{}", sets, "--model");
}

std::optional<std::string> optional_path(const std::string& path) {
  return path.empty() ? std::nullopt : std::optional<std::string>(path);
}

int evaluate(const TrainConfig& config, const std::string& adapter) {
  ModelContext ctx = ModelContext::load(config, optional_path(adapter));
  const auto splits = qlora::train::load_data_splits(config, *ctx.tokenizer, /*need_train=*/false);
  const double loss = ctx.evaluate(splits.eval, config.training.micro_batch_size);
  std::cout << std::fixed << std::setprecision(4) << "eval loss " << loss << "  perplexity "
            << std::exp(loss) << "\n";
  return 0;
}

int generate(const TrainConfig& config, const std::string& adapter,
             const std::vector<std::string>& prompts, int64_t max_new) {
  ModelContext ctx = ModelContext::load(config, optional_path(adapter));
  for (const auto& [prompt, text] : ctx.generate(prompts, max_new))
    std::cout << "> " << prompt << "\n" << text << "\n";
  return 0;
}

int quantize(const std::string& model_path, const std::string& out, const std::string& quant_type,
             int64_t blocksize, bool double_quant) {
  qlora::models::LoadOptions load;
  const qlora::QuantConfig quant{blocksize, quant_type, double_quant};
  load.quantize = qlora::nn::QuantizedBaseConfig{quant, at::kFloat};
  qlora::models::LoadReport report;
  auto model = qlora::models::load_llama(model_path, load, &report);
  qlora::exporters::save_bnb_4bit_folder(model, out, quant, at::kFloat);
  // The tokenizer files travel with the weights when the source has them.
  qlora::exporters::copy_tokenizer_files(model_path, out);
  std::cout << "wrote " << out << ": " << report.quantized.size() << " layers in " << quant_type
            << (double_quant ? " (double quantisation)" : "") << ", blocksize " << blocksize
            << "\n";
  return 0;
}

int export_model(const TrainConfig& config, const std::string& adapter, const std::string& format,
                 const std::string& out, const std::string& outtype) {
  ModelContext ctx = ModelContext::load(config, optional_path(adapter));
  const auto parsed = qlora::exporters::parse_format(format);
  if (!parsed) throw std::invalid_argument("unknown export format \"" + format + "\"");
  qlora::exporters::export_model({ctx.model, ctx.lora, ctx.model_path, ctx.tokenizer_source},
                                 {*parsed, out, outtype});
  std::cout << "wrote " << out << " (" << format << ")\n";
  return 0;
}

}  // namespace

// The worker command for the launcher: our own arguments without the launcher's options.
std::vector<std::string> worker_arguments(int argc, char** argv) {
  static const std::vector<std::string> launcher_options = {
      "--nproc-per-node", "--nnodes", "--node-rank", "--master-addr", "--master-port"};
  std::vector<std::string> out{argv[0]};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    bool skip = false;
    for (const auto& o : launcher_options) {
      if (a == o) {
        skip = true;
        ++i;  // and its value
      } else if (a.rfind(o + "=", 0) == 0) {
        skip = true;
      }
    }
    if (!skip) out.push_back(a);
  }
  return out;
}

int main(int argc, char** argv) {
  CLI::App app{"qlora: QLoRA fine-tuning in one native binary"};
  app.require_subcommand(1);
  std::string config, adapter, file;
  std::vector<std::string> sets, prompts;
  int64_t max_new_tokens = 48;

  auto* train_cmd = app.add_subcommand("train", "fine-tune a model as a YAML config says");
  train_cmd->add_option("config", config, "YAML config (see configs/)")
      ->required()
      ->check(CLI::ExistingFile);
  train_cmd->add_option("--set", sets, "override a config key, e.g. --set training.lr=1e-4");
  bool dry_run = false;
  train_cmd->add_flag("--dry-run", dry_run, "print the memory plan (qlora plan) and stop");
  qlora::dist::LaunchOptions launch;
  auto* nproc_opt = train_cmd->add_option(
      "--nproc-per-node", launch.nproc_per_node,
      "start N data-parallel workers here (c10d; as torchrun --nproc-per-node)");
  nproc_opt->check(CLI::Range(1, 1024));
  train_cmd->add_option("--nnodes", launch.nnodes, "machines in the job (with --nproc-per-node)")
      ->check(CLI::Range(1, 1 << 16));
  train_cmd->add_option("--node-rank", launch.node_rank, "this machine's index in [0, nnodes)");
  train_cmd->add_option("--master-addr", launch.master_addr,
                        "rank 0's address (default 127.0.0.1)");
  train_cmd->add_option("--master-port", launch.master_port,
                        "rank 0's store port (default: a free port; required with --nnodes > 1)");

  auto* plan_cmd = app.add_subcommand(
      "plan", "the memory a training run will need, before loading anything (exit 3: too much)");
  plan_cmd->add_option("config", config, "YAML config")->required()->check(CLI::ExistingFile);
  plan_cmd->add_option("--set", sets, "override a config key");

  auto* eval_cmd =
      app.add_subcommand("eval", "held-out loss and perplexity of a model (+ adapter)");
  eval_cmd->add_option("config", config, "YAML config")->required()->check(CLI::ExistingFile);
  eval_cmd->add_option("--adapter", adapter, "PEFT adapter folder to apply");
  eval_cmd->add_option("--set", sets, "override a config key");

  std::string gen_model, gen_template = "alpaca";
  auto* gen_cmd = app.add_subcommand("generate", "complete instructions with a model (+ adapter)");
  gen_cmd->add_option("config", config, "YAML config naming the model and template")
      ->check(CLI::ExistingFile);
  gen_cmd->add_option("--model", gen_model, "model path (instead of a config)");
  gen_cmd->add_option("--template", gen_template, "prompt template with --model")
      ->check(CLI::IsMember({"alpaca", "chatml", "smollm2", "plain"}));
  gen_cmd->add_option("--prompt", prompts, "an instruction (repeatable)")->required();
  gen_cmd->add_option("--adapter", adapter, "PEFT adapter folder to apply");
  gen_cmd->add_option("--max-new-tokens", max_new_tokens, "tokens to generate")
      ->check(CLI::PositiveNumber);
  gen_cmd->add_option("--set", sets, "override a config key");

  std::string model_path, out_dir, quant_type = "nf4";
  int64_t blocksize = 64;
  bool double_quant = true;
  auto* quant_cmd = app.add_subcommand("quantize", "a model -> a bitsandbytes 4-bit HF folder");
  quant_cmd->add_option("--model", model_path, "HF folder or .gguf")->required();
  quant_cmd->add_option("--out", out_dir, "output folder")->required();
  quant_cmd->add_option("--quant-type", quant_type, "nf4 or fp4")
      ->check(CLI::IsMember({"nf4", "fp4"}));
  quant_cmd->add_option("--blocksize", blocksize, "32 ... 4096");
  quant_cmd->add_flag("!--no-double-quant", double_quant, "skip double quantisation of absmax");

  std::string format, outtype = "f16";
  auto* export_cmd = app.add_subcommand(
      "export", "write a fine-tune out: PEFT adapter, merged HF folder, GGUF, QNAT");
  export_cmd->add_option("config", config, "YAML config naming the model")
      ->check(CLI::ExistingFile);
  export_cmd->add_option("--model", gen_model, "model path (instead of a config)");
  export_cmd->add_option("--adapter", adapter, "PEFT adapter folder of the fine-tune");
  export_cmd->add_option("--format", format, "peft | hf | gguf | gguf-adapter | qnat")
      ->required()
      ->check(CLI::IsMember(qlora::exporters::format_names()));
  export_cmd->add_option("--out", out_dir, "output folder or file")->required();
  export_cmd->add_option(
      "--outtype", outtype,
      "hf: f32 | f16 | bf16; gguf: also q8_0 | q4_0 | q4_k_m | q4_k_s | q5_k_m | q5_k_s | q6_k");
  export_cmd->add_option("--set", sets, "override a config key");

  auto* inspect_cmd = app.add_subcommand("inspect", "summarise a safetensors or GGUF file");
  inspect_cmd->add_option("file", file, "the file")->required()->check(CLI::ExistingFile);

  CLI11_PARSE(app, argc, argv);
  // A file-size limit (ulimit -f) then fails the write with EFBIG, which our
  // writers report with the path, instead of killing the process.
  signal(SIGXFSZ, SIG_IGN);
  try {
    if (*train_cmd && nproc_opt->count() && !dry_run) {
      launch.worker_argv = worker_arguments(argc, argv);
      // A collective gives up after the configured timeout; the launcher gives
      // the survivors that long (and a little) before it kills them.
      const auto cfg = TrainConfig::from_yaml_file(config, sets);
      launch.grace =
          std::chrono::seconds(static_cast<int64_t>(cfg.training.distributed.timeout_seconds) + 10);
      return qlora::dist::launch_workers(launch);
    }
    if (*train_cmd) return train(config, sets, dry_run);
    if (*plan_cmd) return plan(TrainConfig::from_yaml_file(config, sets));
    if (*eval_cmd) return evaluate(model_config(config, "", "", sets), adapter);
    if (*gen_cmd)
      return generate(model_config(config, gen_model, gen_template, sets), adapter, prompts,
                      max_new_tokens);
    if (*inspect_cmd) return qlora::cli::inspect(file, std::cout);
    if (*export_cmd)
      return export_model(model_config(config, gen_model, "alpaca", sets), adapter, format, out_dir,
                          outtype);
    if (*quant_cmd) return quantize(model_path, out_dir, quant_type, blocksize, double_quant);
  } catch (const qlora::train::Interrupted& e) {
    std::cerr << "qlora: " << e.what() << "\n";
    return e.exit_code();
  } catch (const c10::Error& e) {
    std::cerr << "qlora: error: " << e.what_without_backtrace() << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "qlora: error: " << e.what() << "\n";
    return 1;
  }
  return 2;
}
