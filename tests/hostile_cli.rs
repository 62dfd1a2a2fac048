//! Hostile inputs through every command and tool: each case is one bad input, and
//! `hostile_common::check` asserts a non-zero exit without a panic, one error line naming the
//! file, flag or tensor, and the fixture (inputs, earlier outputs) byte-identical with nothing left
//! behind. The promises are listed in docs/RELIABILITY.md.

mod hostile_common;

use hostile_common::{Case, Fixture, case, check_all, check_env};

/// Common `train` flags: a tiny SFT run on the fixture's model and data.
macro_rules! sft {
    ($rest:literal) => {
        concat!(
            "train --stage sft --model {model} --data {sft} --max-steps 1 --batch-size 2 --micro-batch-size 2 --lora-rank 2 ",
            $rest
        )
    };
}

const TRAIN: &[Case] = &[
    // Numeric flags and config keys out of range: the key and the range are named.
    case(
        "batch 0",
        "zhllama",
        sft!("--output {new} --batch-size 0"),
        &["batch_size = 0", "≥ 1"],
    ),
    case(
        "micro batch 0",
        "zhllama",
        sft!("--output {new} --micro-batch-size 0"),
        &["micro_batch_size"],
    ),
    case(
        "negative lr",
        "zhllama",
        sft!("--output {new} --learning-rate=-1e-4"),
        &["learning_rate", "[0, ∞)"],
    ),
    case(
        "NaN lr",
        "zhllama",
        sft!("--output {new} --learning-rate NaN"),
        &["learning_rate = NaN"],
    ),
    case(
        "infinite lr",
        "zhllama",
        sft!("--output {new} --learning-rate inf"),
        &["learning_rate"],
    ),
    case(
        "beta1 = 1",
        "zhllama",
        sft!("--output {new} --adam-beta1 1"),
        &["adam_beta1", "[0, 1)"],
    ),
    case(
        "beta2 > 1",
        "zhllama",
        sft!("--output {new} --adam-beta2 1.5"),
        &["adam_beta2"],
    ),
    case(
        "negative warmup ratio",
        "zhllama",
        sft!("--output {new} --warmup-ratio=-0.1"),
        &["warmup_ratio", "[0, 1]"],
    ),
    case(
        "negative clip norm",
        "zhllama",
        sft!("--output {new} --max-grad-norm=-1"),
        &["max_grad_norm"],
    ),
    case(
        "negative weight decay",
        "zhllama",
        sft!("--output {new} --weight-decay=-0.01"),
        &["weight_decay"],
    ),
    case(
        "zero epsilon",
        "zhllama",
        sft!("--output {new} --adam-epsilon 0"),
        &["adam_epsilon"],
    ),
    case(
        "max steps 0",
        "zhllama",
        sft!("--output {new} --max-steps 0"),
        &["max_steps"],
    ),
    case(
        "dropout 1",
        "zhllama",
        sft!("--output {new} --lora-dropout 1"),
        &["lora_dropout"],
    ),
    case(
        "max length 1",
        "zhllama",
        sft!("--output {new} --max-length 1"),
        &["max_length"],
    ),
    case(
        "logging steps 0",
        "zhllama",
        sft!("--output {new} --logging-steps 0"),
        &["logging_steps"],
    ),
    case(
        "alpha NaN",
        "zhllama",
        sft!("--output {new} --lora-alpha NaN"),
        &["lora_alpha"],
    ),
    case(
        "batch not divisible",
        "zhllama",
        sft!("--output {new} --batch-size 3"),
        &["batch_size 3"],
    ),
    case(
        "unknown key",
        "zhllama",
        sft!("--output {new} --no-such-key 1"),
        &["no_such_key"],
    ),
    case(
        "unparsable lr",
        "zhllama",
        sft!("--output {new} --learning-rate abc"),
        &["learning_rate", "abc"],
    ),
    case(
        "world size 0 dry run",
        "zhllama",
        "train --stage sft --model {model} --dry-run --world-size 0",
        &["world_size"],
    ),
    case(
        "dry run batch 0",
        "zhllama",
        "train --stage pt1 --model {model} --dry-run --batch-size 0",
        &["batch_size"],
    ),
    case(
        "bad toml",
        "zhllama",
        sft!("--output {new} --config {bad.toml}"),
        &["{bad.toml}"],
    ),
    case(
        "missing toml",
        "zhllama",
        sft!("--output {new} --config {nope.toml}"),
        &["{nope.toml}"],
    ),
    case(
        "toml wrong type",
        "zhllama",
        sft!("--output {new} --config {file.txt}"),
        &["{file.txt}"],
    ),
    // The run directory.
    case(
        "fresh run into a run",
        "zhllama",
        sft!("--output {run}"),
        &["{run}", "already holds a training run", "--resume"],
    ),
    case(
        "output is the model",
        "zhllama",
        sft!("--output {model}"),
        &["--output {model}", "--model"],
    ),
    case(
        "output is the data",
        "zhllama",
        sft!("--output {sft}"),
        &["--data {sft}"],
    ),
    case(
        "output inside the model",
        "zhllama",
        sft!("--output {model__run}"),
        &["overlaps", "--model"],
    ),
    case(
        "output is a file",
        "zhllama",
        sft!("--output {file.txt}"),
        &["{file.txt}", "not a directory"],
    ),
    case(
        "output is foreign",
        "zhllama",
        sft!("--output {foreign}"),
        &["{foreign}", "--overwrite"],
    ),
    case(
        "overwrite and resume",
        "zhllama",
        sft!("--output {run} --overwrite --resume"),
        &["--overwrite", "--resume"],
    ),
    case(
        "resume from nowhere",
        "zhllama",
        sft!("--output {run} --resume-from {run__checkpoint-99}"),
        &["checkpoint-99"],
    ),
    // Run identity on resume, and the tokenizer the data was made with.
    case(
        "resume with another model",
        "zhllama",
        "train --stage sft --model {model2} --data {sft} --output {run} --resume --max-steps 1 --save-steps 1 --batch-size 2 --micro-batch-size 2 --lora-rank 2",
        &["refusing to resume", "--model file model.safetensors"],
    ),
    case(
        "resume with other data",
        "zhllama",
        "train --stage sft --model {model} --data {sft2} --output {run} --resume --max-steps 1 --save-steps 1 --batch-size 2 --micro-batch-size 2 --lora-rank 2",
        &["refusing to resume", "--data"],
    ),
    case(
        "tokenizer not the data's",
        "zhllama",
        sft!("--output {new} --tokenizer {tok__zh.model}"),
        &["{tok__zh.model}", "{sft}"],
    ),
    // Data, model and tokenizer.
    case(
        "pt data for sft",
        "zhllama",
        "train --stage sft --model {model} --data {pt} --output {new} --max-steps 1",
        &["{pt}", "SFT"],
    ),
    case(
        "damaged shard payload",
        "zhllama",
        "train --stage pt1 --model {model} --data {pt_damaged} --output {new} --max-steps 1 --batch-size 2 --micro-batch-size 2",
        &[
            "{pt_damaged__train.tok}",
            "payload checksum mismatch",
            "blocks 0..=",
        ],
    ),
    case(
        "shard not the manifest's",
        "zhllama",
        "train --stage pt1 --model {model} --data {pt_swapped} --output {new} --max-steps 1 --batch-size 2 --micro-batch-size 2",
        &[
            "{pt_swapped__train.tok}",
            "{pt_swapped__manifest.json}",
            "payload digest",
        ],
    ),
    case(
        "no data flag",
        "zhllama",
        "train --stage sft --model {model} --output {new}",
        &["--data"],
    ),
    case(
        "missing data",
        "zhllama",
        sft!("--output {new} --data {nope}"),
        &["{nope}"],
    ),
    case(
        "untargeted sft data",
        "zhllama",
        "train --stage sft --model {model} --data {sft_untargeted} --output {new} --max-steps 1 --batch-size 2 --micro-batch-size 2",
        &["{sft_untargeted}", "no example has a target"],
    ),
    case(
        "NaN weight",
        "zhllama",
        "train --stage sft --model {nan_model} --data {sft} --output {new} --max-steps 1 --batch-size 2 --micro-batch-size 2",
        &["model.norm.weight", "non-finite"],
    ),
    case(
        "huge config",
        "zhllama",
        "train --stage sft --model {huge_model} --data {sft} --output {new} --max-steps 1 --batch-size 2 --micro-batch-size 2",
        &["model.embed_tokens.weight"],
    ),
    case(
        "garbage tokenizer",
        "zhllama",
        sft!("--output {new} --tokenizer {garbage.bin}"),
        &["{garbage.bin}"],
    ),
    case(
        "missing model",
        "zhllama",
        "train --stage sft --model {nope} --data {sft} --output {new}",
        &["{nope}"],
    ),
];

const EVAL_GENERATE: &[Case] = &[
    case(
        "eval overflowing activations",
        "zhllama",
        "eval --model {hot_model} --tokens {tokens.json}",
        &["{hot_model}", "non-finite", "overflowed"],
    ),
    case(
        "generate overflowing activations",
        "zhllama",
        "generate --model {hot_model} --tokenizer {tok__en.model} --prompt the",
        &["non-finite logit", "overflowed"],
    ),
    case(
        "eval NaN weight",
        "zhllama",
        "eval --model {nan_model} --tokens {tokens.json}",
        &["model.norm.weight", "non-finite"],
    ),
    case(
        "eval huge config",
        "zhllama",
        "eval --model {huge_model} --tokens {tokens.json}",
        &["model.embed_tokens.weight", "config.json"],
    ),
    case(
        "eval missing tokens",
        "zhllama",
        "eval --model {model} --tokens {nope.json}",
        &["{nope.json}"],
    ),
    case(
        "eval tokens not JSON",
        "zhllama",
        "eval --model {model} --tokens {bad.json}",
        &["{bad.json}"],
    ),
    case(
        "eval token out of vocab",
        "zhllama",
        "eval --model {model} --tokens {tokens_oov.json}",
        &["{tokens_oov.json}", "100000"],
    ),
    case(
        "eval no sequences",
        "zhllama",
        "eval --model {model} --tokens {tokens_empty.json}",
        &["{tokens_empty.json}"],
    ),
    case(
        "eval missing model",
        "zhllama",
        "eval --model {nope} --tokens {tokens.json}",
        &["{nope}"],
    ),
    case(
        "eval model is a file",
        "zhllama",
        "eval --model {file.txt} --tokens {tokens.json}",
        &["{file.txt}"],
    ),
    case(
        "generate NaN weight",
        "zhllama",
        "generate --model {nan_model} --tokenizer {tok__en.model} --prompt the",
        &["model.norm.weight", "non-finite"],
    ),
    case(
        "generate negative temperature",
        "zhllama",
        "generate --model {model} --tokenizer {tok__en.model} --prompt the --temperature=-1",
        &["temperature"],
    ),
    case(
        "generate top-p 2",
        "zhllama",
        "generate --model {model} --tokenizer {tok__en.model} --prompt the --top-p 2",
        &["top_p"],
    ),
    case(
        "generate NaN repetition penalty",
        "zhllama",
        "generate --model {model} --tokenizer {tok__en.model} --prompt the --repetition-penalty NaN",
        &["repetition_penalty"],
    ),
    case(
        "generate missing tokenizer",
        "zhllama",
        "generate --model {model} --tokenizer {nope.model} --prompt the",
        &["{nope.model}"],
    ),
    case(
        "generate garbage tokenizer",
        "zhllama",
        "generate --model {model} --tokenizer {garbage.bin} --prompt the",
        &["{garbage.bin}"],
    ),
    case(
        "generate missing input",
        "zhllama",
        "generate --model {model} --tokenizer {tok__en.model} --input {nope.txt}",
        &["{nope.txt}"],
    ),
    case(
        "generate missing adapter",
        "zhllama",
        "generate --model {model} --adapter {nope} --tokenizer {tok__en.model} --prompt the",
        &["{nope}"],
    ),
    case(
        "generate huge config",
        "zhllama",
        "generate --model {huge_model} --tokenizer {tok__en.model} --prompt the",
        &["model.embed_tokens.weight"],
    ),
    case(
        "tokenize output is input",
        "zhllama",
        "tokenize --tokenizer {tok__en.model} --input {prompts.txt} --output {prompts.txt}",
        &["--output {prompts.txt}", "--input"],
    ),
    case(
        "tokenize output is tokenizer",
        "zhllama",
        "tokenize --tokenizer {tok__en.model} --input {prompts.txt} --output {tok__en.model}",
        &["--tokenizer"],
    ),
    case(
        "tokenize missing input",
        "zhllama",
        "tokenize --tokenizer {tok__en.model} --input {nope.txt}",
        &["{nope.txt}"],
    ),
    case(
        "tokenize garbage tokenizer",
        "zhllama",
        "tokenize --tokenizer {garbage.bin} --input {prompts.txt}",
        &["{garbage.bin}"],
    ),
    case(
        "plot over metrics",
        "zhllama",
        "plot {run} --output {run__metrics.jsonl}",
        &["metrics.jsonl"],
    ),
    case("plot missing run", "zhllama", "plot {nope}", &["{nope}"]),
    case(
        "plot no metrics",
        "zhllama",
        "plot {foreign}",
        &["{foreign}"],
    ),
];

const MERGE_LORA: &[Case] = &[
    case(
        "output is the adapter",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {run__adapter}",
        &["--adapter {run__adapter}", "input"],
    ),
    case(
        "output is the base",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {model}",
        &["--base {model}"],
    ),
    case(
        "output inside the adapter",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {run__adapter__merged}",
        &["overlaps"],
    ),
    case(
        "output is a file",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {file.txt}",
        &["{file.txt}", "not a directory"],
    ),
    case(
        "output is foreign",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {foreign}",
        &["{foreign}", "--overwrite"],
    ),
    case(
        "output is a run",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {run}",
        &["--output {run}"],
    ),
    case(
        "NaN base",
        "zhllama",
        "merge-lora --base {nan_model} --adapter {run__adapter} --output {new}",
        &["model.norm.weight"],
    ),
    case(
        "missing adapter",
        "zhllama",
        "merge-lora --base {model} --adapter {nope} --output {new}",
        &["{nope}"],
    ),
    case(
        "shard bytes 0",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {new} --max-shard-bytes 0",
        &["--max-shard-bytes"],
    ),
    case(
        "huge base",
        "zhllama",
        "merge-lora --base {huge_model} --adapter {run__adapter} --output {new}",
        &["{huge_model}"],
    ),
    case(
        "merged tensor overflows",
        "zhllama",
        "merge-lora --base {model} --adapter {overflow_adapter} --output {new}",
        &[
            "merged tensor model.layers.",
            "non-finite",
            "nothing written to {new}",
        ],
    ),
];

const EXPORT: &[Case] = &[
    case(
        "missing model dir",
        "zhllama",
        "export --model {nope} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{nope}"],
    ),
    case(
        "model dir without config",
        "zhllama",
        "export --model {foreign} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{foreign__config.json}"],
    ),
    case(
        "garbage safetensors",
        "zhllama",
        "export --model {garbage_model} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{garbage_model__model.safetensors}"],
    ),
    case(
        "garbage tokenizer",
        "zhllama",
        "export --model {model} --tokenizer {garbage.bin} --output {new.gguf}",
        &["{garbage.bin}"],
    ),
    case(
        "output is the weights",
        "zhllama",
        "export --model {model} --tokenizer {tok__en.model} --output {model__model.safetensors}",
        &["--output {model__model.safetensors}", "--model {model}"],
    ),
    case(
        "output is the tokenizer",
        "zhllama",
        "export --model {model} --tokenizer {tok__en.model} --output {tok__en.model} --overwrite",
        &["--tokenizer {tok__en.model}", "input"],
    ),
    case(
        "output inside the adapter",
        "zhllama",
        "export --model {model} --adapter {run__adapter} --tokenizer {tok__en.model} --output {run__adapter__m.gguf}",
        &["--adapter {run__adapter}"],
    ),
    case(
        "output exists",
        "zhllama",
        "export --model {model} --tokenizer {tok__en.model} --output {file.txt}",
        &["--output {file.txt}", "--overwrite"],
    ),
    case(
        "output is a directory",
        "zhllama",
        "export --model {model} --tokenizer {tok__en.model} --output {empty_dir} --overwrite",
        &["--output {empty_dir}", "directory"],
    ),
    case(
        "bad outtype",
        "zhllama",
        "export --model {model} --tokenizer {tok__en.model} --output {new.gguf} --outtype q4_k",
        &["--outtype", "q4_k", "q8_0"],
    ),
    case(
        "NaN weight",
        "zhllama",
        "export --model {nan_model} --tokenizer {tok__en.model} --output {new.gguf}",
        &["model.norm.weight", "non-finite"],
    ),
    case(
        "huge config",
        "zhllama",
        "export --model {huge_model} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{huge_model}"],
    ),
    case(
        "tokenizer of another vocabulary",
        "zhllama",
        "export --model {model} --tokenizer {merged} --output {new.gguf}",
        &["{merged}", "vocabulary"],
    ),
    case(
        "missing adapter",
        "zhllama",
        "export --model {model} --adapter {nope} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{nope}"],
    ),
    case(
        "adapter r disagrees with its tensors",
        "zhllama",
        "export --model {model} --adapter {r3_adapter} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{r3_adapter}"],
    ),
    case(
        "adapter for another model",
        "zhllama",
        "export --model {huge_model} --adapter {run__adapter} --tokenizer {tok__en.model} --output {new.gguf}",
        &["{huge_model}"],
    ),
    case(
        "merged tensor overflows",
        "zhllama",
        "export --model {model} --adapter {overflow_adapter} --tokenizer {tok__en.model} --output {new.gguf}",
        &["non-finite", "{overflow_adapter}", "tensor model.layers."],
    ),
];

const DATA: &[Case] = &[
    case(
        "block size 0",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus__en.txt} --output {new} --block-size 0",
        &["--block-size 0"],
    ),
    case(
        "validation fraction 1",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus__en.txt} --output {new} --validation-fraction 1",
        &["--validation-fraction", "[0, 1)"],
    ),
    case(
        "validation fraction NaN",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus__en.txt} --output {new} --validation-fraction NaN",
        &["--validation-fraction"],
    ),
    case(
        "pretrain output exists",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus__en.txt} --output {pt} --quiet",
        &["{pt}", "already exists"],
    ),
    case(
        "pretrain output is input dir",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus} --output {corpus} --quiet",
        &["--input {corpus}"],
    ),
    case(
        "pretrain output inside input",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {corpus} --output {corpus__shards} --quiet",
        &["overlaps"],
    ),
    case(
        "pretrain garbage tokenizer",
        "zhllama",
        "data pretrain --tokenizer {garbage.bin} --input {corpus__en.txt} --output {new} --quiet",
        &["{garbage.bin}"],
    ),
    case(
        "pretrain missing input",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {nope.txt} --output {new} --quiet",
        &["{nope.txt}"],
    ),
    case(
        "pretrain empty input dir",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {empty_dir} --output {new} --quiet",
        &["{empty_dir}"],
    ),
    case(
        "pretrain empty file",
        "zhllama",
        "data pretrain --tokenizer {tok__en.model} --input {empty.txt} --output {new} --quiet",
        &["{empty.txt}"],
    ),
    case(
        "sft max len 0",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {alpaca.json} --output {new} --max-len 0",
        &["--max-len 0"],
    ),
    case(
        "sft no target left",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {alpaca.json} --output {new} --max-len 4 --quiet",
        &["{alpaca.json}", "no trainable example", "--max-len 4"],
    ),
    case(
        "sft not JSON",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {bad.json} --output {new} --quiet",
        &["{bad.json}"],
    ),
    case(
        "sft missing output field",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {missing_output.json} --output {new} --quiet",
        &["{missing_output.json}"],
    ),
    case(
        "sft output exists",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {alpaca.json} --output {run} --quiet",
        &["{run}", "already exists"],
    ),
    case(
        "sft output is input",
        "zhllama",
        "data sft --tokenizer {tok__en.model} --input {alpaca.json} --output {alpaca.json} --quiet",
        &["--input {alpaca.json}"],
    ),
];

const TOOLS: &[Case] = &[
    case(
        "merge into the llama dir",
        "merge-tokenizers",
        "--llama-tokenizer-dir {merged} --chinese-sp-model-file {tok__zh.model} --output-dir {merged}",
        &["--llama-tokenizer-dir {merged}"],
    ),
    case(
        "merge over the chinese model",
        "merge-tokenizers",
        "--llama-tokenizer-dir {tok__en.model} --chinese-sp-model-file {tok__zh.model} --output-dir {tok__zh.model}",
        &["--chinese-sp-model-file"],
    ),
    case(
        "merge into the model dir",
        "merge-tokenizers",
        "--llama-tokenizer-dir {tok__en.model} --chinese-sp-model-file {tok__zh.model} --output-dir {model}",
        &["{model}", "--overwrite"],
    ),
    case(
        "merge into a foreign dir",
        "merge-tokenizers",
        "--llama-tokenizer-dir {tok__en.model} --chinese-sp-model-file {tok__zh.model} --output-dir {foreign}",
        &["{foreign}"],
    ),
    case(
        "merge onto a file",
        "merge-tokenizers",
        "--llama-tokenizer-dir {tok__en.model} --chinese-sp-model-file {tok__zh.model} --output-dir {file.txt}",
        &["{file.txt}", "not a directory"],
    ),
    case(
        "merge garbage llama",
        "merge-tokenizers",
        "--llama-tokenizer-dir {garbage.bin} --chinese-sp-model-file {tok__zh.model} --output-dir {new}",
        &["{garbage.bin}"],
    ),
    case(
        "merge missing chinese",
        "merge-tokenizers",
        "--llama-tokenizer-dir {tok__en.model} --chinese-sp-model-file {nope.model} --output-dir {new}",
        &["{nope.model}"],
    ),
    case(
        "vocab output is input",
        "train-vocab",
        "{corpus__en.txt} --vocab-size 40 --output {corpus__en.txt}",
        &["--output {corpus__en.txt}"],
    ),
    case(
        "vocab output inside input dir",
        "train-vocab",
        "{corpus} --vocab-size 40 --output {corpus__v.model}",
        &["{corpus}"],
    ),
    case(
        "vocab size 0",
        "train-vocab",
        "{corpus__en.txt} --vocab-size 0 --output {new.model}",
        &["--vocab-size 0"],
    ),
    case(
        "vocab coverage 0",
        "train-vocab",
        "{corpus__en.txt} --character-coverage 0 --output {new.model}",
        &["--character-coverage"],
    ),
    case(
        "vocab coverage NaN",
        "train-vocab",
        "{corpus__en.txt} --character-coverage NaN --output {new.model}",
        &["--character-coverage"],
    ),
    case(
        "vocab piece length 0",
        "train-vocab",
        "{corpus__en.txt} --max-piece-length 0 --output {new.model}",
        &["--max-piece-length"],
    ),
    case(
        "vocab output is a dir",
        "train-vocab",
        "{corpus__en.txt} --vocab-size 40 --output {foreign}",
        &["{foreign}", "directory"],
    ),
    case(
        "vocab missing input",
        "train-vocab",
        "{nope.txt} --vocab-size 40 --output {new.model}",
        &["{nope.txt}"],
    ),
    case(
        "vocab too small",
        "train-vocab",
        "{corpus__zh.txt} --vocab-size 10 --output {new.model}",
        &["--vocab-size"],
    ),
    case(
        "prep output is input",
        "prep-data",
        "--alpaca {alpaca.json} --output {alpaca.json}",
        &["{alpaca.json}", "alpaca"],
    ),
    case(
        "prep stats is output",
        "prep-data",
        "--alpaca {alpaca.json} --output {new.json} --stats {new.json}",
        &["--stats"],
    ),
    case(
        "prep stats is input",
        "prep-data",
        "--alpaca {alpaca.json} --output {new.json} --stats {alpaca.json}",
        &["--stats {alpaca.json}"],
    ),
    case(
        "prep no sources",
        "prep-data",
        "--output {new.json}",
        &["no input"],
    ),
    case(
        "prep malformed alpaca",
        "prep-data",
        "--alpaca {bad.json} --output {new.json}",
        &["{bad.json}"],
    ),
    case(
        "prep output is a dir",
        "prep-data",
        "--alpaca {alpaca.json} --output {foreign}",
        &["{foreign}"],
    ),
    case(
        "crawl concurrency 0",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --concurrency 0",
        &["--concurrency 0"],
    ),
    case(
        "crawl negative temperature",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --temperature=-1",
        &["--temperature"],
    ),
    case(
        "crawl rouge 0",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --rouge-threshold 0",
        &["--rouge-threshold"],
    ),
    case(
        "crawl target 0",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --target 0",
        &["--target"],
    ),
    case(
        "crawl rpm NaN",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --rpm NaN",
        &["--rpm"],
    ),
    case(
        "crawl output is topics",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {topics.txt} --topics-file {topics.txt}",
        &["--topics-file"],
    ),
    case(
        "crawl empty topics",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --topics-file {empty.txt}",
        &["{empty.txt}"],
    ),
    case(
        "crawl missing key file",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --api-key-file {nope.key}",
        &["{nope.key}"],
    ),
    case(
        "crawl output is a dir",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {foreign}",
        &["{foreign}"],
    ),
    case(
        "crawl raw log is output",
        "crawl-prompts",
        "--base-url http://127.0.0.1:9 --model m --output {new.jsonl} --raw-log {new.jsonl}",
        &["--raw-log"],
    ),
];

#[test]
fn hostile_train() {
    check_all(&Fixture::new(), TRAIN);
}

#[test]
fn hostile_eval_generate_tokenize_plot() {
    check_all(&Fixture::new(), EVAL_GENERATE);
}

#[test]
fn hostile_merge_lora() {
    check_all(&Fixture::new(), MERGE_LORA);
}

/// A model that does not fit the memory budget (`ZHLLAMA_MEMORY_LIMIT` stands in for a small
/// machine: the fixture model needs ~40 KB) is refused before anything is allocated.
const MEMORY: &[Case] = &[
    case(
        "eval over budget",
        "zhllama",
        "eval --model {model} --tokens {tokens.json}",
        &[
            "model {model} needs at least",
            "for eval",
            "ZHLLAMA_MEMORY_LIMIT",
        ],
    ),
    case(
        "generate over budget",
        "zhllama",
        "generate --model {model} --tokenizer {tok__en.model} --prompt the",
        &["model {model} needs at least", "for generate"],
    ),
    case(
        "merge-lora over budget",
        "zhllama",
        "merge-lora --base {model} --adapter {run__adapter} --output {new}",
        &["model {model} needs at least", "for merge-lora"],
    ),
    case(
        "train over budget",
        "zhllama",
        sft!("--output {new}"),
        &["model {model} needs at least", "for training"],
    ),
];

#[test]
fn hostile_memory() {
    let fx = Fixture::new();
    for c in MEMORY {
        check_env(&fx, c, &[("ZHLLAMA_MEMORY_LIMIT", "1000")]);
    }
    check_env(
        &fx,
        &case(
            "memory limit not a number",
            "zhllama",
            "eval --model {model} --tokens {tokens.json}",
            &["ZHLLAMA_MEMORY_LIMIT=\"lots\""],
        ),
        &[("ZHLLAMA_MEMORY_LIMIT", "lots")],
    );
    // The same commands within budget (or with the check off) get past the check.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_zhllama"))
        .args(["eval", "--model"])
        .arg(fx.path("model"))
        .arg("--tokens")
        .arg(fx.path("tokens.json"))
        .env("ZHLLAMA_MEMORY_LIMIT", "off")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    eprintln!("{} hostile cases passed", MEMORY.len() + 1);
}

#[test]
fn hostile_export() {
    check_all(&Fixture::new(), EXPORT);
}

#[test]
fn hostile_data() {
    check_all(&Fixture::new(), DATA);
}

#[test]
fn hostile_tools() {
    check_all(&Fixture::new(), TOOLS);
}

/// A second run on a locked output is refused while the first holds it.
#[test]
fn hostile_locked_run_dir() {
    let fx = Fixture::new();
    let dir = fx.path("locked");
    let lock = zhllama::util::lock::RunLock::acquire(&dir).unwrap();
    check_all(
        &fx,
        &[case(
            "second run on a locked output",
            "zhllama",
            sft!("--output {locked}"),
            &["{locked}", "in use by another training run"],
        )],
    );
    drop(lock);
}

#[test]
fn at_least_80_cases() {
    let n = TRAIN.len()
        + EVAL_GENERATE.len()
        + MERGE_LORA.len()
        + EXPORT.len()
        + MEMORY.len()
        + 1
        + DATA.len()
        + TOOLS.len()
        + 1;
    assert!(n >= 80, "only {n} hostile cases");
}
