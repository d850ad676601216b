//! The `rlhf` command.

mod config;
mod model_cmds;
mod train_cmds;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rlhf",
    version,
    about = "Train language models from preferences"
)]
struct Cli {
    /// CPU threads (default: all cores; `generate` with small batches defaults to 1 on <= 2 cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate completions for prompts.
    Generate(model_cmds::GenerateArgs),
    /// Per-token log-probs of completions given prompts.
    Score(model_cmds::ScoreArgs),
    /// Architecture, size, tokenizer and chat template of a model.
    Info(model_cmds::InfoArgs),
    /// Supervised fine-tuning on prompt/completion or chat data.
    Sft(train_cmds::RunArgs),
    /// Train a reward model on preference pairs (Bradley-Terry; optional LM regulariser).
    Rm(train_cmds::RunArgs),
    /// The main job on the built-in testbed: task -> SFT -> reward model -> evaluation.
    Quickstart(train_cmds::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| match &cli.command {
        Command::Generate(a) if rlhf_lm::available_cores() <= 2 && a.batch_size <= 8 => 1,
        _ => rlhf_lm::available_cores(),
    });
    rlhf_lm::set_threads(threads);
    let result = match cli.command {
        Command::Generate(a) => model_cmds::generate(a),
        Command::Score(a) => model_cmds::score(a),
        Command::Info(a) => model_cmds::info(a),
        Command::Sft(a) => train_cmds::sft(a),
        Command::Rm(a) => train_cmds::rm(a),
        Command::Quickstart(a) => train_cmds::quickstart(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
