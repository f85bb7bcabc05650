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
//
// This header includes every stage; each has its own header in qlora/data/.
#pragma once

#include "qlora/data/batching.h"
#include "qlora/data/data_loader.h"
#include "qlora/data/dataset.h"
#include "qlora/data/prompt_template.h"
#include "qlora/data/random.h"
#include "qlora/data/records.h"
#include "qlora/data/tokenize.h"
