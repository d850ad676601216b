//! Training and evaluation commands: each takes `--config run.toml`, `--set key=value` overrides
//! and `--resume`, and writes a run directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use rlhf_methods::{rm, sft};
use rlhf_recipes::quickstart;
use rlhf_rl::eval;

use crate::config::resolve;

#[derive(Args)]
pub struct RunArgs {
    /// TOML configuration file (keys as in the method's config; see docs/).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override a configuration key: `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Continue the run in `output_dir` from its latest checkpoint.
    #[arg(long)]
    pub resume: bool,
}

fn resolved<T: serde::Serialize + serde::de::DeserializeOwned + Default>(a: &RunArgs) -> Result<T> {
    resolve(a.config.as_deref(), &a.set)
}

pub fn sft(a: RunArgs) -> Result<()> {
    let cfg: sft::SftConfig = resolved(&a)?;
    let summary = sft::run(&cfg, a.resume, &Device::Cpu).context("sft")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub fn rm(a: RunArgs) -> Result<()> {
    let cfg: rm::RmConfig = resolved(&a)?;
    let summary = rm::run(&cfg, a.resume, &Device::Cpu).context("reward model")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub fn quickstart(a: RunArgs) -> Result<()> {
    let cfg: quickstart::QuickstartConfig = resolved(&a)?;
    let started = std::time::Instant::now();
    let report = quickstart::run(&cfg, &Device::Cpu).context("quickstart")?;
    println!("{}", quickstart::format_table(&report));
    println!(
        "wrote {} ({:.0} s)",
        cfg.out_dir.join("report.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn eval(a: RunArgs) -> Result<()> {
    let cfg: eval::EvalConfig = resolved(&a)?;
    let report = eval::run_eval(&cfg, &Device::Cpu).context("eval")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(Args)]
pub struct TestbedArgs {
    /// sentiment | arithmetic | translate
    #[arg(long, default_value = "sentiment")]
    pub task: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Directory for the JSONL files and the tokenizer.
    #[arg(long)]
    pub out: PathBuf,
}

/// Write a testbed task's data (TRL-format JSONL) and its tokenizer, for use with any command.
pub fn testbed(a: TestbedArgs) -> Result<()> {
    let task = rlhf_data::testbed::task_by_name(&a.task, a.seed).map_err(anyhow::Error::msg)?;
    let files = rlhf_data::testbed::write_task_files(task.as_ref(), &a.out)
        .with_context(|| format!("{}", a.out.display()))?;
    let tokenizer = rlhf_data::testbed::tokenizer_for(task.as_ref());
    tokenizer.save_hf(&a.out.join("tokenizer"), None)?;
    println!(
        "{}\n{}\n{}\n{}",
        files.sft.display(),
        files.prompts_train.display(),
        files.prompts_eval.display(),
        a.out.join("tokenizer").display()
    );
    Ok(())
}

/// An online method's command: resolve its config, run, print the summary (eval included).
fn online<M: rlhf_rl::online::Method>(
    a: RunArgs,
    run: fn(
        &rlhf_rl::online::OnlineConfig<M>,
        bool,
        &Device,
    ) -> rlhf_train::Result<rlhf_rl::online::OnlineSummary>,
) -> Result<()> {
    let cfg: rlhf_rl::online::OnlineConfig<M> = resolved(&a)?;
    let summary = run(&cfg, a.resume, &Device::Cpu).context(M::NAME)?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub fn reinforce(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::reinforce::run)
}

pub fn rloo(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::rloo::run)
}

pub fn vanilla_pg(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::vanilla_pg::run)
}

pub fn raft(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::raft::run)
}

pub fn grpo(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::grpo::run)
}

pub fn compare_online(a: RunArgs) -> Result<()> {
    let cfg: rlhf_recipes::compare::CompareConfig = resolved(&a)?;
    let report = rlhf_recipes::compare::run(&cfg, &Device::Cpu).context("compare-online")?;
    println!("{}", rlhf_recipes::compare::format_table(&report));
    Ok(())
}

// ---- offline and iterative preference optimisation -----------------------------------------------

#[derive(Args)]
pub struct DpoArgs {
    #[command(flatten)]
    pub run: RunArgs,
    /// The pair loss: dpo | ipo | cdpo | simpo | orpo (the same as `--set loss=...`).
    #[arg(long)]
    pub loss: Option<String>,
}

/// `rlhf dpo`: DPO / IPO / cDPO / SimPO / ORPO on preference pairs.
pub fn dpo(a: DpoArgs) -> Result<()> {
    let mut run = a.run;
    if let Some(loss) = &a.loss {
        let kind: rlhf_rl::pref_losses::PairLossKind =
            loss.parse().map_err(anyhow::Error::msg)?;
        run.set.push(format!("loss={}", kind.name()));
    }
    let cfg: rlhf_rl::pref::DpoConfig = resolved(&run)?;
    let summary = rlhf_methods::dpo::run(&cfg, run.resume, &Device::Cpu).context("dpo")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `rlhf kto`: KTO on unpaired (prompt, completion, label) data, or on pairs split in two.
pub fn kto(a: RunArgs) -> Result<()> {
    let cfg: rlhf_methods::kto::KtoConfig = resolved(&a)?;
    let summary = rlhf_methods::kto::run(&cfg, a.resume, &Device::Cpu).context("kto")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `rlhf online-dpo`: rounds of sampling from the current policy, labelling (reward model,
/// simulated annotators or a judge) and DPO against the previous iterate.
pub fn online_dpo(a: RunArgs) -> Result<()> {
    let cfg: rlhf_methods::online_dpo::OnlineDpoConfig = resolved(&a)?;
    let summary =
        rlhf_methods::online_dpo::run(&cfg, a.resume, &Device::Cpu).context("online-dpo")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

/// `rlhf self-reward`: the policy judges its own candidates (LLM-as-a-judge), best vs worst
/// become DPO pairs; iterate.
pub fn self_reward(a: RunArgs) -> Result<()> {
    let cfg: rlhf_methods::online_dpo::SelfRewardConfig = resolved(&a)?;
    let summary =
        rlhf_methods::online_dpo::run_self_reward(&cfg, a.resume, &Device::Cpu).context("self-reward")?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}

pub fn ppo(a: RunArgs) -> Result<()> {
    online(a, rlhf_methods::ppo::run)
}
