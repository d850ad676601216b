//! Pipelines and evaluation (the methods' commands come from the registry): each takes `--config run.toml`, `--set key=value` overrides
//! and `--resume`, and writes a run directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use rlhf_recipes::quickstart;
use rlhf_rl::eval;

use rlhf_train::config::resolve;

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
    Ok(resolve(a.config.as_deref(), &a.set)?)
}

pub fn quickstart(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: quickstart::QuickstartConfig = resolved(&a)?;
    let started = std::time::Instant::now();
    let report = quickstart::run(&cfg, device).context("quickstart")?;
    println!("{}", quickstart::format_table(&report));
    println!(
        "wrote {} ({:.0} s)",
        cfg.out_dir.join("report.json").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn eval(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: eval::EvalConfig = resolved(&a)?;
    let report = eval::run_eval(&cfg, device).context("eval")?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

#[derive(Args)]
pub struct TestbedArgs {
    /// sentiment | arithmetic | translate | dialogue (multi-turn: logs, held-out logs and an
    /// `init/` tiny model with the game's chat template)
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
    if a.task == "dialogue" {
        return testbed_dialogue(&a);
    }
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

/// The multi-turn game: its logs (TRL `messages` + `user_context`), held-out logs, tokenizer and a
/// fresh tiny model with the game's chat template (`init/`), ready for `dialogue-sft`.
fn testbed_dialogue(a: &TestbedArgs) -> Result<()> {
    use rlhf_data::testbed::dialogue as game;
    let task = game::DialogueTask::new(a.seed, game::DialogueSize::default());
    std::fs::create_dir_all(&a.out).with_context(|| format!("{}", a.out.display()))?;
    let (logs, eval) = (a.out.join("logs.jsonl"), a.out.join("eval_logs.jsonl"));
    game::write_logs(&logs, task.logs()).with_context(|| format!("{}", logs.display()))?;
    game::write_logs(&eval, task.eval_logs()).with_context(|| format!("{}", eval.display()))?;
    let lm = rlhf_rl::dialogue::testbed_dialogue_model(a.seed, &Device::Cpu)?;
    lm.tokenizer
        .save_hf(&a.out.join("tokenizer"), lm.chat_template.as_ref())?;
    lm.save(&a.out.join("init"))?;
    println!(
        "{}\n{}\n{}\n{}",
        logs.display(),
        eval.display(),
        a.out.join("tokenizer").display(),
        a.out.join("init").display()
    );
    Ok(())
}

/// The testbed `dialogue` game's scripted user behind the user-simulator command protocol of
/// `dialogue-rl` (`environment.source = "command"`): `{"dialogues": [{"user_context", "messages"}]}`
/// on stdin, `{"replies": [{"content", "won", "done"}]}` on stdout.
pub fn dialogue_user() -> Result<()> {
    use rlhf_data::testbed::dialogue as game;
    use std::io::Read;
    let mut input = String::new();
    std::io::stdin()
        .read_to_string(&mut input)
        .context("reading stdin")?;
    let v: serde_json::Value = serde_json::from_str(&input).context("stdin is not JSON")?;
    let dialogues = v["dialogues"]
        .as_array()
        .context("stdin: no `dialogues` list")?;
    let mut replies = Vec::with_capacity(dialogues.len());
    for (i, d) in dialogues.iter().enumerate() {
        let ctx = d["user_context"].as_str().unwrap_or("");
        let item = game::item_from_context(ctx).with_context(|| {
            format!("dialogues[{i}].user_context: {ctx:?} names no animal of the game")
        })?;
        let last = d["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .with_context(|| format!("dialogues[{i}].messages: missing or empty"))?;
        let (content, won) = game::reply(item, last);
        replies.push(serde_json::json!({"content": content, "won": won, "done": won}));
    }
    println!("{}", serde_json::json!({ "replies": replies }));
    Ok(())
}

pub fn compare_online(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: rlhf_recipes::compare::CompareConfig = resolved(&a)?;
    let report = rlhf_recipes::compare::run(&cfg, device).context("compare-online")?;
    println!("{}", rlhf_recipes::compare::format_table(&report));
    Ok(())
}

pub fn compare_rest(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: rlhf_recipes::rest_table::RestTableConfig = resolved(&a)?;
    let table = rlhf_recipes::rest_table::run(&cfg, device).context("compare-rest")?;
    println!("{}", rlhf_recipes::rest_table::format_markdown(&table));
    Ok(())
}

pub fn compare_dialogue(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: rlhf_recipes::dialogue::CompareDialogueConfig = resolved(&a)?;
    let report = rlhf_recipes::dialogue::run(&cfg, device).context("compare-dialogue")?;
    println!("{}", rlhf_recipes::dialogue::format_markdown(&report));
    println!("wrote {}", cfg.out_dir.join("report.json").display());
    Ok(())
}

pub fn rlp(a: RunArgs, device: &Device) -> Result<()> {
    let cfg: rlhf_recipes::rlp::RlpConfig = resolved(&a)?;
    let report = rlhf_recipes::rlp::run(&cfg, a.resume, device).context("rlp")?;
    println!("{}", rlhf_recipes::rlp::format_report(&report));
    println!("wrote {}", cfg.out_dir.join("report.json").display());
    Ok(())
}

pub fn rlp_table(a: RunArgs) -> Result<()> {
    let cfg: rlhf_recipes::rlp::RlpTableConfig = resolved(&a)?;
    println!(
        "{}",
        rlhf_recipes::rlp::seeds_table(&cfg).context("rlp-table")?
    );
    Ok(())
}
