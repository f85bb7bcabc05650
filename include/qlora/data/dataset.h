// Instruction-tuning data: records read from Alpaca JSON/JSONL, chat JSONL or plain text,
// rendered through a prompt template, tokenised with a loss mask, batched (optionally packed)
// and served by a resumable, deterministic loader.
//
// Conventions shared with Hugging Face transformers, so a batch here trains the same as there:
//  - labels are UNSHIFTED per-token targets (labels[t] == input_ids[t] where supervised,
//    kIgnoreIndex elsewhere); the loss shifts them, comparing logits[t] with labels[t + 1].
//  - The prompt is never supervised; the completion and the EOS after it are.
//  - The first label of every example is kIgnoreIndex, always. In an unpacked row it is never a
//    target anyway (nothing precedes it); in a packed row it is what stops the last token of one
//    example from being trained to predict the first token of the next. For instruction data it
//    is a prompt token already; for raw-text data we give it up on purpose.
//
// Everything random is reproducible across platforms: std::mt19937_64 (fully specified by the
// standard) driven through our own Fisher-Yates and uniform integer, never std::shuffle or
// std::uniform_int_distribution, whose outputs differ between standard libraries.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qlora::tokenizers {
class Tokenizer;
}

namespace qlora::data {

// The label of tokens that contribute no loss (PyTorch's cross_entropy ignore_index default).
inline constexpr int32_t kIgnoreIndex = -100;

// ---------------------------------------------------------------------------------------------
// Records and readers
// ---------------------------------------------------------------------------------------------

// What a reader does with a malformed record (bad JSON, missing, empty or mistyped fields,
// unknown roles) or an empty file: kSkip reports it in ReadResult::issues and goes on;
// kReject throws DataError at the first one. Either way the message is "file:line: what".
enum class Strictness { kSkip, kReject };

struct DataIssue {
  std::string file;
  int64_t line = 0;  // 1-based line where the offending record starts
  std::string message;

  std::string to_string() const;  // "file:line: message"
};

// Malformed data under Strictness::kReject, or a file that cannot be read. The message names
// the file and line.
class DataError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class Role { kSystem, kUser, kAssistant };
const char* role_name(Role role);  // "system" | "user" | "assistant"

struct Message {
  Role role = Role::kUser;
  std::string content;
};

enum class RecordKind {
  kInstruction,  // Alpaca: instruction, optional input, output
  kChat,         // messages; the last one is the assistant's reply that is trained on
  kCompletion,   // raw text, trained on in full
};

struct Record {
  RecordKind kind = RecordKind::kInstruction;
  std::string instruction;        // kInstruction
  std::string input;              // kInstruction; empty when the record has none
  std::string output;             // kInstruction
  std::vector<Message> messages;  // kChat
  std::string text;               // kCompletion
  std::string file;               // where the record was read from, for messages
  int64_t line = 0;
};

struct ReadResult {
  std::vector<Record> records;
  std::vector<DataIssue> issues;  // only under Strictness::kSkip
};

enum class DataFormat {
  kAuto,         // by extension: .json -> kAlpacaJson, .txt -> kText, .jsonl -> kChatJsonl if
                 // the first record has "messages", else kAlpacaJsonl
  kAlpacaJson,   // one JSON array of {"instruction", "input"?, "output"} objects
  kAlpacaJsonl,  // one such object per line
  kChatJsonl,    // one {"messages": [{"role", "content"}, ...]} object per line
  kText,         // plain text, see TextUnit
};
// "auto", "alpaca_json", "alpaca_jsonl", "chat_jsonl", "text"; throws std::invalid_argument.
DataFormat parse_data_format(const std::string& name);

// How a plain-text file is cut into documents. kParagraph (the default): a document is a run
// of non-blank lines, its lines joined with '\n'; blank (whitespace-only) lines separate
// documents. kLine: every non-blank line is a document.
enum class TextUnit { kParagraph, kLine };

// Record rules: a record must be a JSON object; required string fields must be non-blank
// (not only whitespace); "input" may be absent, null or a string; fields we do not know are
// ignored. Chat: "messages" is a non-empty array of {"role": system|user|assistant, "content":
// non-blank string} whose last message is the assistant's. Blank JSONL lines are skipped. A
// file with no record at all is reported as an issue at line 1. A file that cannot be opened
// throws DataError under both strictness modes: that is a wrong path, not bad data.
ReadResult read_alpaca_json(const std::string& path, Strictness strictness);
ReadResult read_alpaca_jsonl(const std::string& path, Strictness strictness);
ReadResult read_chat_jsonl(const std::string& path, Strictness strictness);
ReadResult read_text(const std::string& path, Strictness strictness,
                     TextUnit unit = TextUnit::kParagraph);
ReadResult read_records(const std::string& path, DataFormat format, Strictness strictness,
                        TextUnit unit = TextUnit::kParagraph);

// The same parsers on text already in memory; `name` stands for the file in messages.
ReadResult parse_alpaca_json(std::string_view content, const std::string& name,
                             Strictness strictness);
ReadResult parse_alpaca_jsonl(std::string_view content, const std::string& name,
                              Strictness strictness);
ReadResult parse_chat_jsonl(std::string_view content, const std::string& name,
                            Strictness strictness);
ReadResult parse_text(std::string_view content, const std::string& name, Strictness strictness,
                      TextUnit unit = TextUnit::kParagraph);

// ---------------------------------------------------------------------------------------------
// Prompt templates
// ---------------------------------------------------------------------------------------------

// The prompt (context, never trained on) and the completion (trained on, EOS appended).
struct RenderedText {
  std::string prompt;
  std::string completion;
};

// SmolLM2-Instruct's chat template inserts this system message when a conversation has none.
inline constexpr const char* kSmolLM2SystemPrompt =
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

struct PromptTemplate {
  enum class Kind {
    // Stanford Alpaca's train.py text, exactly: the prompt ends in "### Response:" with no
    // newline and the output follows it directly.
    kAlpaca,
    // "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the generation prompt
    // "<|im_start|>assistant\n"; the completion is the reply followed by "<|im_end|>" (then EOS,
    // unless EOS is <|im_end|> itself, as in SmolLM2-Instruct). Instruction records become one
    // user turn: the instruction, and the input after a blank line when there is one.
    kChatML,
    // Prompt "{instruction}\n{input}\n" ("{instruction}\n" without input), completion "{output}".
    kPlain,
  };

  Kind kind = Kind::kAlpaca;
  // ChatML only: a system message put first when the conversation has none (SmolLM2-Instruct's
  // template does this with kSmolLM2SystemPrompt). Empty: none is added.
  std::string default_system;

  static PromptTemplate alpaca();
  static PromptTemplate chatml(std::string default_system = {});
  static PromptTemplate plain();
  // "alpaca" | "chatml" | "plain" | "smollm2" (chatml with kSmolLM2SystemPrompt); throws
  // std::invalid_argument listing these.
  static PromptTemplate from_name(const std::string& name);
  std::string name() const;

  // Completion records render as an empty prompt and their text under every template. Chat
  // records need kChatML: the others throw DataError naming the record's file:line.
  RenderedText render(const Record& record) const;
};

// ---------------------------------------------------------------------------------------------
// Tokenisation
// ---------------------------------------------------------------------------------------------

struct Example {
  std::vector<int32_t> input_ids;
  std::vector<int32_t> labels;  // same length, unshifted, kIgnoreIndex where not supervised
  std::shared_ptr<const Record> record;  // the record it came from; null if built by hand

  int64_t size() const { return static_cast<int64_t>(input_ids.size()); }
  int64_t supervised_tokens() const;
};

// Truncation, when prompt + completion (P + C tokens, BOS and EOS included) exceed max_length:
// the completion is cut first, from its end (so a cut completion has no EOS: the model must not
// learn to stop mid-answer), down to max(max_length - P, min_completion_tokens) tokens; if the
// prompt still does not fit, it is cut from its start, keeping BOS and the tokens nearest the
// answer (the "### Response:" / "<|im_start|>assistant\n" header). An example left with no
// supervised token is dropped and reported.
struct TokenizeOptions {
  int64_t max_length = 2048;
  int64_t min_completion_tokens = 32;
};

// Prompt and completion are encoded separately (without the tokenizer's own special tokens) and
// concatenated, so the label boundary falls exactly between them: BOS (when tokenizer.add_bos())
// + encode(prompt) | encode(completion) + EOS (skipped when the completion already ends with it
// or the tokenizer has none). Returns nullopt when nothing supervised is left; `truncated` tells
// whether max_length cut anything.
std::optional<Example> tokenize_example(const RenderedText& text,
                                        const tokenizers::Tokenizer& tokenizer,
                                        const TokenizeOptions& options, bool* truncated = nullptr);

struct TokenizeResult {
  std::vector<Example> examples;
  std::vector<DataIssue> issues;  // dropped examples, with the record's file:line
  int64_t truncated = 0;          // kept examples that max_length cut
};
TokenizeResult tokenize_records(const std::vector<Record>& records, const PromptTemplate& tmpl,
                                const tokenizers::Tokenizer& tokenizer,
                                const TokenizeOptions& options);

// The id padding is written with: pad, else EOS, else 0 (padding is masked out either way).
int32_t padding_id(const tokenizers::Tokenizer& tokenizer);

// ---------------------------------------------------------------------------------------------
// Batching and packing
// ---------------------------------------------------------------------------------------------

// All tensors int64 [B, T] on the CPU, rows right-padded to the longest row of the batch.
struct Batch {
  at::Tensor input_ids;       // pad id on padding
  at::Tensor labels;          // kIgnoreIndex on padding
  at::Tensor attention_mask;  // 1 on tokens, 0 on padding
  at::Tensor position_ids;    // 0, 1, 2, ... restarting at every example of a packed row
  at::Tensor segment_ids;     // 1, 2, 3, ... per example within the row, 0 on padding; attend
                              // only where the segment ids of query and key are equal
  int64_t label_tokens = 0;   // labels != kIgnoreIndex: the loss's normaliser
  int64_t num_examples = 0;
};

// Each row holds one or more examples laid end to end. Throws std::invalid_argument on an empty
// batch or row.
Batch collate_rows(const std::vector<std::vector<const Example*>>& rows, int32_t pad_id);
// One example per row.
Batch collate_examples(const std::vector<const Example*>& examples, int32_t pad_id);

// Greedy next-fit packing of examples, taken in `order`, into rows of at most max_length
// tokens: an example joins the current row when it fits, else starts a new one. Order is kept,
// so a shuffled order gives shuffled rows. Returns indices into `lengths` per row. Throws
// std::invalid_argument if an example is longer than max_length.
std::vector<std::vector<size_t>> pack_greedy(const std::vector<int64_t>& lengths,
                                             const std::vector<size_t>& order, int64_t max_length);

// ---------------------------------------------------------------------------------------------
// Deterministic randomness
// ---------------------------------------------------------------------------------------------

// Uniform in [0, n) by rejection on a 64-bit draw (unbiased, identical on every platform).
// n must be > 0.
uint64_t uniform_below(std::mt19937_64& rng, uint64_t n);
// Fisher-Yates (from the last index down, swapping i with uniform_below(i + 1)) on 0..n-1,
// with std::mt19937_64 seeded by `seed`.
std::vector<size_t> shuffled_indices(size_t n, uint64_t seed);
// FNV-1a, 64-bit: a hash that never changes between runs, builds or platforms.
uint64_t stable_hash(std::string_view bytes);

// ---------------------------------------------------------------------------------------------
// Dataset and loader
// ---------------------------------------------------------------------------------------------

class Dataset;
struct DatasetSplit;

class Dataset {
 public:
  Dataset() = default;
  explicit Dataset(std::vector<Example> examples);

  size_t size() const { return examples_.size(); }
  bool empty() const { return examples_.empty(); }
  const Example& operator[](size_t i) const { return examples_[i]; }
  const std::vector<Example>& examples() const { return examples_; }
  int64_t num_tokens() const;
  int64_t num_label_tokens() const;
  int64_t max_example_length() const;

  // In place, with shuffled_indices(size(), seed).
  void shuffle(uint64_t seed);
  // Exactly round(size * eval_fraction) examples, picked by shuffled_indices(size, seed), go to
  // eval; both parts keep the dataset's order. eval_fraction must be in [0, 1].
  DatasetSplit split(double eval_fraction, uint64_t seed) const;
  // Examples with equal keys land on the same side. A key goes to eval when
  // (top 53 bits of splitmix64(stable_hash(key) ^ seed)) / 2^53 < eval_fraction: stable (a key's
  // side never depends on the other keys, so adding data moves nothing) but only approximately the
  // fraction.
  DatasetSplit split_by_key(const std::function<std::string(const Example&)>& key_fn,
                            double eval_fraction, uint64_t seed) const;

  // Hash of every example's tokens and labels: a restored loader checks it is fed the same data.
  uint64_t fingerprint() const;

 private:
  std::vector<Example> examples_;
};

struct DatasetSplit {
  Dataset train;
  Dataset eval;
};

struct LoadOptions {
  DataFormat format = DataFormat::kAuto;
  Strictness strictness = Strictness::kReject;
  TextUnit text_unit = TextUnit::kParagraph;
  PromptTemplate prompt_template = PromptTemplate::alpaca();
  TokenizeOptions tokenize;
};

struct LoadedDataset {
  Dataset dataset;
  std::vector<DataIssue> issues;  // skipped records (kSkip) and dropped examples
  int64_t records = 0;            // records read
  int64_t truncated = 0;          // examples that max_length cut
};

// read_records + tokenize_records.
LoadedDataset load_dataset(const std::string& path, const tokenizers::Tokenizer& tokenizer,
                           const LoadOptions& options);

struct LoaderOptions {
  int64_t micro_batch_size = 1;
  bool shuffle = true;  // a new order every epoch, from (seed, epoch)
  uint64_t seed = 0;
  bool packing = false;
  int64_t max_length = 0;  // the packed row length; required when packing
  bool drop_last = false;  // drop an epoch's last, smaller batch
  int32_t pad_id = 0;      // see padding_id()
};

// Everything needed to continue exactly where a loader stopped. The RNG state is (seed, epoch):
// epoch e's order is a Fisher-Yates shuffle driven by a fresh mt19937_64 seeded with
// splitmix64(seed ^ splitmix64(e)), so no engine state has to be saved.
struct LoaderState {
  uint64_t seed = 0;
  int64_t epoch = 0;
  int64_t position = 0;  // batches already served in this epoch
  // Of the dataset and the options that shape batches (shuffle, micro batch, packing, length,
  // drop_last); restore() refuses a state taken on different data or settings.
  uint64_t fingerprint = 0;

  std::string to_json() const;
  static LoaderState from_json(const std::string& json);  // throws std::invalid_argument
};

class DataLoader {
 public:
  // Throws std::invalid_argument on an empty dataset, micro_batch_size < 1, packing without a
  // max_length that fits every example, or drop_last with fewer examples than one batch.
  DataLoader(std::shared_ptr<const Dataset> dataset, LoaderOptions options);

  // The next batch of the current epoch, or nullopt when the epoch is over, in which case the
  // loader has moved on to the start of the next epoch. So `while (auto b = loader.next())`
  // runs exactly one epoch.
  std::optional<Batch> next();

  int64_t epoch() const { return epoch_; }
  int64_t position() const { return position_; }
  int64_t batches_per_epoch() const;  // of the current epoch (packing makes it vary)

  LoaderState state() const;
  // Throws std::invalid_argument if the state's fingerprint does not match this loader's.
  void restore(const LoaderState& state);

 private:
  void plan_epoch();
  uint64_t config_fingerprint() const;

  std::shared_ptr<const Dataset> dataset_;
  LoaderOptions options_;
  uint64_t dataset_fingerprint_ = 0;
  int64_t epoch_ = 0;
  int64_t position_ = 0;
  std::vector<std::vector<size_t>> rows_;  // this epoch's rows: example indices
};

}  // namespace qlora::data
