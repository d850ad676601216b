//! `rlhf plot`: training curves of one or more run directories in one SVG picture.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use rlhf_train::run::CURVES_FILE;
use rlhf_train::training_curves::write_overlay;

#[derive(Args)]
pub struct PlotArgs {
    /// Run directories (or their `metrics.jsonl` files); several are overlaid, one line per run,
    /// labelled with the directory's name.
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// Where to write the SVG. Default: the run's own `curves.svg` for one run and every metric
    /// family, else `plot.svg` in the current directory.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Only these metrics, one panel each (names as in metrics.jsonl: `--metrics loss,eval/winrate`).
    /// Default: every family of quantities the runs log (loss, reward, KL, length, win-rate, ...).
    #[arg(long, value_delimiter = ',', value_name = "NAME,...")]
    pub metrics: Option<Vec<String>>,
}

pub fn plot(a: PlotArgs) -> Result<()> {
    let out = match (&a.out, a.runs.as_slice(), &a.metrics) {
        (Some(out), _, _) => out.clone(),
        (None, [run], None) if run.is_dir() => run.join(CURVES_FILE),
        _ => PathBuf::from("plot.svg"),
    };
    match write_overlay(&a.runs, a.metrics.as_deref(), &out)? {
        Some(path) => println!("wrote {}", path.display()),
        None => eprintln!("nothing to plot: the runs have logged no value of these metrics yet"),
    }
    Ok(())
}
