//! Training and evaluation commands: each takes `--config run.toml`, `--set key=value` overrides
//! and `--resume`, and writes a run directory.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use rlhf_methods::{quickstart, rm, sft};

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
