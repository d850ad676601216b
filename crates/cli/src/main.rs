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
    /// Win-rate of a policy against a reference (gold and/or reward-model judge); writes eval.json.
    Eval(train_cmds::RunArgs),
    /// Write a built-in testbed task's data files and tokenizer.
    Testbed(train_cmds::TestbedArgs),
    /// The main job on the built-in testbed: task -> SFT -> reward model -> RLOO -> evaluation.
    Quickstart(train_cmds::RunArgs),
    /// Online RL: REINFORCE with a moving-average baseline (sequence-level, KL-shaped reward).
    Reinforce(train_cmds::RunArgs),
    /// Online RL: RLOO_k (k samples per prompt, leave-one-out baseline, no ratio or clip).
    Rloo(train_cmds::RunArgs),
    /// Online RL: token-level policy gradient with a learned value baseline (lambda = 1, no clip).
    VanillaPg(train_cmds::RunArgs),
    /// Online RL: RAFT_k (keep the best of k samples by reward, NLL step on it).
    Raft(train_cmds::RunArgs),
    /// Online RL: GRPO (group-normalised advantages, k3 KL in the loss, clipped ratio).
    Grpo(train_cmds::RunArgs),
    /// Run every online method on a testbed task with the same sample budget over seeds; writes a
    /// Table-1-style markdown table.
    CompareOnline(train_cmds::RunArgs),
    /// Offline preference optimisation on pairs: DPO, IPO, cDPO, SimPO, ORPO (`--loss`).
    Dpo(train_cmds::DpoArgs),
    /// KTO on unpaired data (prompt / completion / label), or on pairs split in two.
    Kto(train_cmds::RunArgs),
    /// Online / iterative DPO: sample pairs from the current policy, label them (reward model,
    /// simulated annotators or a judge), DPO against the previous iterate; repeat.
    OnlineDpo(train_cmds::RunArgs),
    /// Self-rewarding: the policy judges its own candidates (0-5 rubric), best vs worst -> DPO.
    SelfReward(train_cmds::RunArgs),
    /// Online RL: token-level PPO with a critic and GAE; the PPO-max recipe by default, every
    /// component a switch, collapse monitors and a trip-wire (docs/ppo.md).
    Ppo(train_cmds::RunArgs),
}

fn main() {
    let cli = Cli::parse();
    let threads = cli.threads.unwrap_or_else(|| match &cli.command {
        Command::Generate(a) if rlhf_lm::available_cores() <= 2 && a.batch_size <= 8 => 1,
        // The testbed's tiny model: synchronising two threads costs more than it gains.
        Command::Quickstart(_) => 1,
        Command::CompareOnline(_) => 1,
        _ => rlhf_lm::available_cores(),
    });
    rlhf_lm::set_threads(threads);
    let result = match cli.command {
        Command::Generate(a) => model_cmds::generate(a),
        Command::Score(a) => model_cmds::score(a),
        Command::Info(a) => model_cmds::info(a),
        Command::Sft(a) => train_cmds::sft(a),
        Command::Rm(a) => train_cmds::rm(a),
        Command::Eval(a) => train_cmds::eval(a),
        Command::Testbed(a) => train_cmds::testbed(a),
        Command::Quickstart(a) => train_cmds::quickstart(a),
        Command::Reinforce(a) => train_cmds::reinforce(a),
        Command::Rloo(a) => train_cmds::rloo(a),
        Command::VanillaPg(a) => train_cmds::vanilla_pg(a),
        Command::Raft(a) => train_cmds::raft(a),
        Command::Grpo(a) => train_cmds::grpo(a),
        Command::CompareOnline(a) => train_cmds::compare_online(a),
        Command::Dpo(a) => train_cmds::dpo(a),
        Command::Kto(a) => train_cmds::kto(a),
        Command::OnlineDpo(a) => train_cmds::online_dpo(a),
        Command::SelfReward(a) => train_cmds::self_reward(a),
        Command::Ppo(a) => train_cmds::ppo(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
